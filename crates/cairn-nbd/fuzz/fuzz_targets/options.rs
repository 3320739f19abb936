//! Handshake-phase option headers and option data (GO/INFO export requests, meta context
//! queries): parsing never panics, never over-allocates, and rejects trailing garbage.
#![no_main]

use cairn_nbd::proto::{ExportRequest, MetaContextRequest, OptionHeader, MAX_STRING};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = OptionHeader::parse(data) {
        assert_eq!(&data[..8], b"IHAVEOPT");
        let _ = (h.option, h.length);
    }
    if let Ok(r) = ExportRequest::parse(data) {
        assert!(r.name.len() <= MAX_STRING);
        assert_eq!(4 + r.name.len() + 2 + 2 * r.info.len(), data.len());
    }
    if let Ok(m) = MetaContextRequest::parse(data) {
        let used: usize = 8 + m.export.len() + m.queries.iter().map(|q| 4 + q.len()).sum::<usize>();
        assert_eq!(used, data.len());
    }
});
