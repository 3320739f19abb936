//! Helpers shared by the backup tests.
#![allow(dead_code)]

/// Bytes that do not repeat within a volume (xorshift), so no two chunks dedup by accident.
pub fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
