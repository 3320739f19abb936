//! Long copies-on-write sent straight to the disk (`O_DIRECT`), past the host's page cache.
//!
//! **Why.** Copy-on-write never overwrites a block a checkpoint shares: the write goes to a new
//! block, at a file offset the page cache has no page for. A buffered write there must first get
//! a new page from the kernel, and on a virtual machine whose free memory goes back to the host
//! (virtio balloon free-page reporting, as on this project's machine) such a page can cost a fault
//! in the host as well. Measured here, 1 MiB writes at queue depth 1 plus `fdatasync`, 2 GiB per
//! round: overwriting cached pages 1539–2243 MiB/s, buffered writes to new offsets 280–705 MiB/s
//! (erratic: 169–1500 on other days), the same with `O_DIRECT` 2271–2373 MiB/s, into holes too.
//! In Cairn, rewriting 2 GiB of a checkpointed volume with 1 MiB writes ran at 266–433 MiB/s
//! buffered and 1110–1394 MiB/s direct (`docs/design.md`, "Write path").
//!
//! **Why only long writes.** A direct write waits for the disk; a buffered one only for the copy.
//! At queue depth 1, 512 MiB in writes of each size (MiB/s, buffered new / direct): 4 KiB 330–1097 /
//! 60, 16 KiB 405–848 / 224–229, 64 KiB 598–791 / 702–715, 256 KiB 348–1461 / 1526–1560, 1 MiB
//! 1024–1062 / 1790–1966. From 256 KiB on direct wins every time, so only writes of at least
//! [`LONG_WRITE`] take this path, and random writes keep their speed. The choice is by the length
//! of the whole write, not of each run of adjacent blocks in it: a 1 MiB write whose new blocks
//! straddle a group's refcount page goes out as two runs, and a profile showed the shorter pieces
//! going through the page cache.
//!
//! **Why only copies-on-write.** The store sends only those here (`Store::write`); first writes to
//! unwritten ranges and a defrag's copies stay buffered. Data written direct comes back into the
//! page cache through readahead, in smaller folios than a 1 MiB write creates, and in-place
//! overwrites of it then ran 20–25% slower (1299–1578 against 1608–1967 MiB/s); a defragmented
//! head written direct read sequentially at 0.80 of the control instead of 1.00. A volume without
//! checkpoints therefore behaves exactly as before.
//!
//! **What it costs.** The blocks written are not in the page cache afterwards: reading them back
//! soon goes to the disk once, as it does for a VM disk opened with QEMU's `cache=none`, where the
//! guest's own page cache holds what it just wrote. Random 4 KiB reads of a just-rewritten 1 GiB
//! ran at 33k–38k IOPS against 698k–737k buffered, until each block had been read once. Only
//! fresh blocks take this path: nothing can have read them since they were allocated (they are
//! reserved to the write), so no page of the read mapping is in the way, and a page left cached
//! from before the block was freed was dropped by the hole punch that freed it (the kernel also
//! writes back and drops any page cached in the range of a direct write). Durability is unchanged:
//! the data sits in the disk's volatile cache until the commit's `fdatasync`, as buffered data
//! sits in the page cache.
//!
//! A caller's buffer need not be aligned to the disk's sectors: an unaligned one is copied, 1 MiB at
//! a time, into an aligned buffer kept per thread (aligned and unaligned sources ran at the same
//! speed within this machine's noise). A file system without `O_DIRECT` never gets a direct
//! writer, and one that refuses a direct write (`EINVAL`) turns this path off for the rest of the
//! store's life; the write is then done buffered, so nothing is lost either way.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// Shortest write whose fresh blocks are sent past the page cache (the module documentation says
/// why).
pub(crate) const LONG_WRITE: usize = 256 * 1024;

/// Alignment of a direct write's offset, length and buffer: the largest sector size disks use,
/// so it holds whatever the disk's own requirement.
const ALIGN: usize = 4096;

/// Size of the per-thread aligned buffer an unaligned write is copied through.
const BOUNCE: usize = 1 << 20;

thread_local! {
    /// This thread's aligned copy buffer (`BOUNCE + ALIGN` bytes, so an aligned window fits).
    static BOUNCE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A second handle on a file, opened with `O_DIRECT`, for long writes of fresh blocks.
pub(crate) struct DirectWriter {
    file: File,
    /// Cleared when the file system refuses a direct write: later writes go buffered at once.
    enabled: AtomicBool,
}

impl DirectWriter {
    /// Opens `path` for direct writes; `None` when its file system cannot do them.
    pub(crate) fn open(path: &Path) -> Option<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(DirectWriter {
            file,
            enabled: AtomicBool::new(true),
        })
    }

    /// Writes all of `buf` at `offset` past the page cache. `Ok(false)` means the caller must
    /// write it the usual way: the write is empty or unaligned, or the file system refused it
    /// (part of it may have been written; writing all of it again is harmless).
    pub(crate) fn write(&self, buf: &[u8], offset: u64) -> io::Result<bool> {
        if buf.is_empty()
            || !buf.len().is_multiple_of(ALIGN)
            || !offset.is_multiple_of(ALIGN as u64)
            || !self.enabled.load(Ordering::Relaxed)
        {
            return Ok(false);
        }
        let r = if buf.as_ptr().align_offset(ALIGN) == 0 {
            self.write_all(buf, offset)
        } else {
            BOUNCE_BUF.with(|cell| {
                let mut v = cell.borrow_mut();
                if v.len() < BOUNCE + ALIGN {
                    v.resize(BOUNCE + ALIGN, 0);
                }
                let skip = v.as_ptr().align_offset(ALIGN);
                let window = &mut v[skip..skip + BOUNCE];
                for (i, chunk) in buf.chunks(BOUNCE).enumerate() {
                    let staged = &mut window[..chunk.len()];
                    staged.copy_from_slice(chunk);
                    self.write_all(staged, offset + (i * BOUNCE) as u64)?;
                }
                Ok(())
            })
        };
        match r {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                self.enabled.store(false, Ordering::Relaxed);
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// `write_all_at` that gives up (with `EINVAL`) rather than continue from an unaligned point
    /// after a short write.
    fn write_all(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            match self.file.write_at(buf, offset) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) if n.is_multiple_of(ALIGN) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Ok(_) => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether direct writes are still on (tests).
    #[cfg(test)]
    pub(crate) fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    #[test]
    fn unaligned_writes_are_left_to_the_caller() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        std::fs::write(&path, []).expect("create file");
        let Some(d) = DirectWriter::open(&path) else {
            return; // no O_DIRECT on this file system: nothing to test
        };
        let buf = pattern(LONG_WRITE, 1);
        assert!(
            !d.write(&buf, 512).expect("direct write"),
            "unaligned offset"
        );
        assert!(
            !d.write(&buf[..LONG_WRITE - 512], 0).expect("direct write"),
            "unaligned length"
        );
        assert!(!d.write(&[], 0).expect("direct write"), "nothing");
        assert!(
            d.write(&buf[..ALIGN], 0).expect("direct write"),
            "one block"
        );
        assert!(d.is_enabled());
    }

    #[test]
    fn direct_writes_read_back_through_the_page_cache_aligned_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("open file");
        let Some(d) = DirectWriter::open(&path) else {
            return;
        };
        // Cache the old contents first: the direct write must replace the cached pages too.
        let len = 3 * BOUNCE + 5 * ALIGN;
        f.write_all_at(&pattern(len + 2 * ALIGN, 7), 0)
            .expect("buffered write");
        let mut old = vec![0u8; len];
        f.read_exact_at(&mut old, ALIGN as u64).expect("read");
        // An unaligned source: one byte into a buffer.
        let src = pattern(len + 1, 9);
        assert!(d.write(&src[1..], ALIGN as u64).expect("direct write"));
        let mut back = vec![0u8; len];
        f.read_exact_at(&mut back, ALIGN as u64).expect("read");
        assert!(back == src[1..], "unaligned source read back differently");
        // An aligned source goes without the copy.
        let mut v = vec![0u8; len + ALIGN];
        let skip = v.as_ptr().align_offset(ALIGN);
        let aligned = &mut v[skip..skip + len];
        aligned.copy_from_slice(&pattern(len, 3));
        assert!(d.write(aligned, ALIGN as u64).expect("direct write"));
        f.read_exact_at(&mut back, ALIGN as u64).expect("read");
        assert!(
            back[..] == aligned[..],
            "aligned source read back differently"
        );
        // The blocks around it are untouched.
        let mut edge = vec![0u8; ALIGN];
        f.read_exact_at(&mut edge, 0).expect("read");
        assert!(edge == pattern(len + 2 * ALIGN, 7)[..ALIGN]);
        assert!(d.is_enabled());
    }
}
