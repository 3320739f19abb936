//! Transmission-phase request headers, compact and extended: parsing never panics, and what
//! parses re-encodes to the same header.
#![no_main]

use cairn_nbd::proto::Request;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for extended in [false, true] {
        if let Ok(r) = Request::parse(data, extended) {
            let _ = r.payload_len(extended);
            let mut out = Vec::new();
            r.encode(extended, &mut out);
            assert_eq!(out[..], data[..Request::size(extended)]);
            assert_eq!(Request::parse(&out, extended), Ok(r));
        }
    }
});
