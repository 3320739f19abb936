//! Journal replay over any journal file content: it never panics, hands out only whole pages,
//! and what it reports is within the file. Where the fuzzer's first byte of a page says so, the
//! page gets a journal page header (the file's header first, descriptors after) and a valid
//! checksum, so replay gets past those checks to the fields behind them.
#![no_main]

use std::sync::Arc;

use cairn_engine::device::{PowerSupply, SimDevice};
use cairn_engine::format::{new_page, seal, Page, PageKind, BLOCK_SIZE};
use cairn_engine::journal::Journal;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let pages = data.len().div_ceil(BLOCK_SIZE).clamp(1, 64);
    let mut image = vec![0u8; pages * BLOCK_SIZE];
    let n = data.len().min(image.len());
    image[..n].copy_from_slice(&data[..n]);
    // A mix of valid and damaged pages: bit 1 of a page's first byte stamps a journal page
    // header over its first 16 bytes, bit 0 seals it.
    for (i, chunk) in image.chunks_exact_mut(BLOCK_SIZE).enumerate() {
        let choice = chunk[0];
        let page: &mut Page = chunk.try_into().expect("a whole page");
        if choice & 2 == 2 {
            let kind = match i {
                0 => PageKind::JournalHeader,
                _ => PageKind::JournalDesc,
            };
            page[..16].copy_from_slice(&new_page(kind, 0)[..16]);
        }
        if choice & 1 == 1 {
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
