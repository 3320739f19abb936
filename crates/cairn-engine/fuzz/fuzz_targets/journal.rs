//! Journal replay over any journal file content: it never panics, hands out only whole pages,
//! and what it reports is within the file. Pages are sealed first where the fuzzer left room for
//! a checksum, so replay gets past the checks to the descriptors behind them.
#![no_main]

use std::sync::Arc;

use cairn_engine::device::{PowerSupply, SimDevice};
use cairn_engine::format::{seal, Page, BLOCK_SIZE};
use cairn_engine::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pages = data.len().div_ceil(BLOCK_SIZE).clamp(1, 64);
    let mut image = vec![0u8; pages * BLOCK_SIZE];
    let n = data.len().min(image.len());
    image[..n].copy_from_slice(&data[..n]);
    // Seal every page whose first byte is odd: a mix of valid and damaged pages.
    for chunk in image.chunks_exact_mut(BLOCK_SIZE) {
        if chunk[0] & 1 == 1 {
            let page: &mut Page = chunk.try_into().expect("a whole page");
            seal(page);
        }
    }
    let dev = SimDevice::new(image, PowerSupply::new());
    let mut seen = 0u64;
    let result = Journal::replay(&*dev, "fuzz", |_, page| {
        assert_eq!(page.len(), BLOCK_SIZE);
        seen += 1;
        Ok(())
    });
    if let Ok((_, txns)) = result {
        assert!(txns <= pages as u64);
    }
    let _: Arc<SimDevice> = dev;
});
