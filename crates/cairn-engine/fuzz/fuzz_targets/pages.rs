//! The store's own page decoders (superblock, catalog record) on any page content: decoding
//! never panics, whatever a damaged disk holds. The checksum is made valid first, so the fuzzer
//! gets past it to the fields behind it.
#![no_main]

use cairn_engine::format::{seal, Page, Record, Superblock, BLOCK_SIZE, SUPERBLOCK};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut page: Box<Page> = Box::new([0u8; BLOCK_SIZE]);
    let n = data.len().min(BLOCK_SIZE);
    page[..n].copy_from_slice(&data[..n]);
    let _ = Superblock::decode(&page, "fuzz");
    let _ = Record::decode(&page, SUPERBLOCK);
    seal(&mut page);
    if let Ok(sb) = Superblock::decode(&page, "fuzz") {
        // What decodes encodes again to a page that decodes the same.
        let again = Superblock::decode(&sb.encode(), "fuzz").expect("re-encoded superblock");
        assert_eq!(sb, again);
    }
    let _ = Record::decode(&page, SUPERBLOCK);
});
