//! Request payloads and read replies in buffers a connection reuses.
//!
//! A 1 MiB read's reply was a fresh `vec![0u8; n]`: the allocator zeroed a megabyte that the
//! engine then overwrote, 8% of the daemon's time during sequential 1 MiB reads (a profile of
//! `cairn bench --nbd`), and writes' payloads paid the same before the socket filled them. A
//! connection now keeps the long buffers its replies and payloads leave behind and hands them out
//! again as they are, so a stream of equal requests zeroes nothing. What a reused buffer holds from
//! before is never sent: a payload is filled by the socket read (or the connection closes), and a
//! read reply by the engine or the backup reader, which write every byte, zeros for holes included.

use std::sync::Mutex;

use cairn_engine::sync::lock;

/// Shorter buffers are not kept: allocating and zeroing them costs little.
const MIN_KEPT: usize = 64 << 10;
/// Longer buffers are not kept either: requests that long are rare, and one would pin its memory.
const MAX_KEPT: usize = (4 << 20) + 64;
/// Bytes of buffers a connection keeps at most (16 replies of 1 MiB in flight).
const KEPT_BYTES: usize = 16 << 20;

/// Buffers one connection reuses.
#[derive(Default)]
pub(super) struct Buffers {
    free: Mutex<Vec<Vec<u8>>>,
}

impl Buffers {
    /// A buffer of `len` bytes whose contents are left from an earlier request (zeros if new):
    /// the caller overwrites every byte before any of it leaves the server.
    pub(super) fn take(&self, len: usize) -> Vec<u8> {
        if !(MIN_KEPT..=MAX_KEPT).contains(&len) {
            return vec![0u8; len];
        }
        let found = {
            let mut free = lock(&self.free);
            // The one closest in length, so equal requests zero nothing.
            let best = (0..free.len())
                .filter(|&i| free[i].capacity() >= len)
                .min_by_key(|&i| free[i].len().abs_diff(len));
            best.map(|i| free.swap_remove(i))
        };
        match found {
            Some(mut buf) => {
                // Shrinking writes nothing; growing zeroes only the added part.
                buf.resize(len, 0);
                buf
            }
            None => vec![0u8; len],
        }
    }

    /// Keeps `buf` for a later [`Buffers::take`], if it is worth keeping and there is room.
    pub(super) fn give(&self, buf: Vec<u8>) {
        if !(MIN_KEPT..=MAX_KEPT).contains(&buf.capacity()) {
            return;
        }
        let mut free = lock(&self.free);
        let kept: usize = free.iter().map(Vec::capacity).sum();
        if kept + buf.capacity() <= KEPT_BYTES {
            free.push(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_buffer_given_back_is_taken_again_at_the_asked_length() {
        let b = Buffers::default();
        let mut first = b.take(1 << 20);
        assert!(first.iter().all(|&x| x == 0), "a new buffer is zeroed");
        first.fill(7);
        let at = first.as_ptr();
        b.give(first);
        let again = b.take(1 << 20);
        assert_eq!(again.as_ptr(), at, "the same allocation comes back");
        assert_eq!(again.len(), 1 << 20);
        b.give(again);
        let shorter = b.take(100 << 10);
        assert_eq!(shorter.len(), 100 << 10);
        b.give(shorter);
        // Grown back: only the added part is zeroed, the rest is the caller's to overwrite.
        let longer = b.take(1 << 20);
        assert_eq!(longer.len(), 1 << 20);
        assert!(longer[(100 << 10)..].iter().all(|&x| x == 0));
    }

    #[test]
    fn short_long_and_surplus_buffers_are_not_kept() {
        let b = Buffers::default();
        b.give(vec![1u8; 4096]);
        b.give(vec![1u8; 8 << 20]);
        assert!(lock(&b.free).is_empty());
        for _ in 0..20 {
            b.give(vec![1u8; 1 << 20]);
        }
        assert_eq!(lock(&b.free).len(), 16, "at most 16 MiB is kept");
        assert!(b.take(4096).iter().all(|&x| x == 0));
    }
}
