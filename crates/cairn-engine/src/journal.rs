// On-disk and wire code: a length or index that does not fit its field is a corruption bug.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]
//! The metadata journal: every commit first appends full images of the metadata pages it changed,
//! syncs, and only then writes them in place. Replaying the journal after a crash turns any mix of
//! torn or missing in-place writes back into the last committed state.
//!
//! Layout: block 0 is a header holding the journal's sequence number; transactions follow, each as
//! one or more descriptors (a page listing up to [`ADDRS_PER_DESC`] block addresses, the checksum of
//! the images that follow it, and a "last" flag on the final descriptor), each followed by its
//! images. A reset (after the data file is synced) writes a header with the next sequence number, so
//! older records left further on in the file no longer match and are ignored.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::format::{
    get_u32, get_u64, new_page, put_u32, put_u64, seal, verify, Page, PageKind, BLOCK_SIZE,
};
use std::sync::Arc;

/// Block addresses one descriptor lists.
pub const ADDRS_PER_DESC: usize = 500;
const DESC_ADDRS: usize = 48;
const FLAG_LAST: u32 = 1;

/// The journal file and where the next transaction goes.
pub struct Journal {
    dev: Arc<dyn Device>,
    path: String,
    seq: u64,
    tail: u64,
    next_txn: u64,
}

impl Journal {
    /// Starts a fresh, empty journal on `dev` (overwriting whatever it held) and syncs it.
    pub fn create(dev: Arc<dyn Device>, path: &str, seq: u64) -> Result<Self> {
        let mut j = Journal {
            dev,
            path: path.into(),
            seq,
            tail: BLOCK_SIZE as u64,
            next_txn: 0,
        };
        j.write_header()?;
        Ok(j)
    }

    fn write_header(&mut self) -> Result<()> {
        let mut h = new_page(PageKind::JournalHeader, 0);
        put_u64(&mut h, 16, self.seq);
        seal(&mut h);
        self.dev
            .write_at(&h[..], 0)
            .map_err(Error::io("journal header write", &self.path))?;
        self.dev
            .sync()
            .map_err(Error::io("journal sync", &self.path))?;
        self.tail = BLOCK_SIZE as u64;
        self.next_txn = 0;
        Ok(())
    }

    /// Reads every complete transaction in order and hands its (block, image) pairs to `apply`.
    /// Returns the journal's sequence number (0 if it had no valid header) and the transactions seen.
    pub fn replay(
        dev: &dyn Device,
        path: &str,
        mut apply: impl FnMut(u64, &Page) -> Result<()>,
    ) -> Result<(u64, u64)> {
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        dev.read_at(&mut page[..], 0)
            .map_err(Error::io("journal read", path))?;
        if verify(&page, 0, PageKind::JournalHeader).is_err() {
            // A header is rewritten only after the data file was synced, so a torn one means
            // nothing is pending.
            return Ok((0, 0));
        }
        let seq = get_u64(&page, 16);
        let len = dev.len().map_err(Error::io("journal stat", path))?;
        let mut off = BLOCK_SIZE as u64;
        let mut txn = 0u64;
        let mut pending: Vec<(u64, Box<Page>)> = Vec::new();
        while off + BLOCK_SIZE as u64 <= len {
            dev.read_at(&mut page[..], off)
                .map_err(Error::io("journal read", path))?;
            if verify(&page, off, PageKind::JournalDesc).is_err()
                || get_u64(&page, 16) != seq
                || get_u64(&page, 24) != txn
            {
                break;
            }
            let count = get_u32(&page, 32) as usize;
            let flags = get_u32(&page, 36);
            let want_crc = get_u32(&page, 40);
            if count > ADDRS_PER_DESC {
                break;
            }
            let addrs: Vec<u64> = (0..count)
                .map(|i| get_u64(&page, DESC_ADDRS + i * 8))
                .collect();
            let body_len = (count * BLOCK_SIZE) as u64;
            if off + BLOCK_SIZE as u64 + body_len > len {
                break;
            }
            let mut body = vec![0u8; count * BLOCK_SIZE];
            dev.read_at(&mut body, off + BLOCK_SIZE as u64)
                .map_err(Error::io("journal read", path))?;
            if crc32c::crc32c(&body) != want_crc {
                break;
            }
            for (i, a) in addrs.into_iter().enumerate() {
                let mut img = Box::new([0u8; BLOCK_SIZE]);
                img.copy_from_slice(&body[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE]);
                pending.push((a, img));
            }
            off += BLOCK_SIZE as u64 + body_len;
            if flags & FLAG_LAST != 0 {
                for (a, img) in pending.drain(..) {
                    apply(a, &img)?;
                }
                txn += 1;
            }
        }
        Ok((seq, txn))
    }

    /// Appends one transaction holding `pages` and syncs the journal: on return it is durable.
    pub fn append(&mut self, pages: &[(u64, &Page)]) -> Result<()> {
        let mut buf =
            Vec::with_capacity((pages.len() + pages.len().div_ceil(ADDRS_PER_DESC)) * BLOCK_SIZE);
        let chunks: Vec<_> = pages.chunks(ADDRS_PER_DESC).collect();
        for (ci, chunk) in chunks.iter().enumerate() {
            let mut d = new_page(PageKind::JournalDesc, 0);
            put_u64(&mut d, 16, self.seq);
            put_u64(&mut d, 24, self.next_txn);
            // At most ADDRS_PER_DESC, far below 2^32.
            put_u32(&mut d, 32, chunk.len().try_into().unwrap_or(u32::MAX));
            put_u32(
                &mut d,
                36,
                if ci + 1 == chunks.len() { FLAG_LAST } else { 0 },
            );
            let mut crc = 0u32;
            for (i, (addr, img)) in chunk.iter().enumerate() {
                put_u64(&mut d, DESC_ADDRS + i * 8, *addr);
                crc = crc32c::crc32c_append(crc, &img[..]);
            }
            put_u32(&mut d, 40, crc);
            seal(&mut d);
            buf.extend_from_slice(&d[..]);
            for (_, img) in chunk.iter() {
                buf.extend_from_slice(&img[..]);
            }
        }
        self.dev
            .write_at(&buf, self.tail)
            .map_err(Error::io("journal write", &self.path))?;
        self.dev
            .sync()
            .map_err(Error::io("journal sync", &self.path))?;
        self.tail += buf.len() as u64;
        self.next_txn += 1;
        Ok(())
    }

    /// Bytes of transactions since the last reset.
    pub fn used(&self) -> u64 {
        self.tail - BLOCK_SIZE as u64
    }

    /// Forgets every transaction; the caller must have synced the data file first.
    pub fn reset(&mut self) -> Result<()> {
        self.seq += 1;
        self.write_header()
    }

    /// The device the journal lives on.
    pub fn device(&self) -> Arc<dyn Device> {
        self.dev.clone()
    }

    /// The current sequence number.
    pub fn seq(&self) -> u64 {
        self.seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{PowerSupply, SimDevice};
    use crate::format::{new_page, seal};

    fn img(v: u8) -> Box<Page> {
        let mut p = new_page(PageKind::Tree, 0);
        p[100] = v;
        seal(&mut p);
        p
    }

    #[test]
    fn replays_complete_transactions_only() {
        let dev = SimDevice::new(Vec::new(), PowerSupply::new());
        let mut j = Journal::create(dev.clone(), "j", 7).expect("create");
        let (a, b) = (img(1), img(2));
        j.append(&[(10, &a), (11, &b)]).expect("append");
        let many: Vec<Box<Page>> = (0..1200).map(|i| img(i as u8)).collect();
        let refs: Vec<(u64, &Page)> = many
            .iter()
            .enumerate()
            .map(|(i, p)| (100 + i as u64, &**p))
            .collect();
        j.append(&refs).expect("append big");
        let mut seen = Vec::new();
        let (seq, n) = Journal::replay(&*dev, "j", |a, _| {
            seen.push(a);
            Ok(())
        })
        .expect("replay");
        assert_eq!((seq, n), (7, 2));
        assert_eq!(seen.len(), 1202);
        // A reset hides everything written before it.
        j.reset().expect("reset");
        let (seq, n) = Journal::replay(&*dev, "j", |_, _| Ok(())).expect("replay");
        assert_eq!((seq, n), (8, 0));
    }

    #[test]
    fn torn_transaction_is_ignored() {
        let dev = SimDevice::new(Vec::new(), PowerSupply::new());
        let mut j = Journal::create(dev.clone(), "j", 1).expect("create");
        let a = img(1);
        j.append(&[(10, &a)]).expect("append");
        j.append(&[(11, &a)]).expect("append");
        // Corrupt the second transaction's image.
        dev.write_at(&[9], 4 * BLOCK_SIZE as u64 - 1).expect("poke");
        let mut seen = Vec::new();
        Journal::replay(&*dev, "j", |a, _| {
            seen.push(a);
            Ok(())
        })
        .expect("replay");
        assert_eq!(seen, vec![10]);
    }
}
