//! Reads for background work (a backup's), through a handle of their own that never reads ahead
//! and leaves nothing behind in the host's page cache.
//!
//! **Why.** A backup reads a checkpoint once, beside a VM that uses the same disk. Through the
//! store's usual handle its sequential reads grow the kernel's readahead to the device's largest
//! request (4 MiB here, `max_sectors_kb`), and a VM's 4 KiB read that reaches the disk behind one
//! waits for all of it; and the pages it reads push the VM's own out of the page cache. Measured
//! with `cairn bench --backup-large` (48 GiB of data, larger than the page cache), a VM's p99 read
//! latency during a backup was 3.6-5.6x idle that way. `O_DIRECT` would size each request
//! exactly too, but on ext4 a direct read holds the file's inode lock (shared) while the disk
//! works, and every buffered write to the file (the VM's) needs it exclusively: the VM's p99 write
//! latency rose to 4.7-5.2x, and `perf` showed its writes waiting in `ext4_buffered_write_iter`'s
//! `down_write` behind the backup's reads.
//!
//! **How.** A second handle on the file, opened read-only with `POSIX_FADV_RANDOM`: the kernel
//! reads exactly the pages asked for (the advice belongs to this open file alone, so the VMs'
//! streams keep their readahead). After each read, `POSIX_FADV_DONTNEED` drops the range's pages
//! again. Only ranges that were not cached are read this way (the device asks first), so the pages
//! dropped are the ones this read brought in; data the VMs have cached is copied as usual.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::path::Path;

use rustix::fs::{fadvise, Advice};

/// A read-only handle on a file for background reads.
pub(crate) struct BackgroundReader {
    file: File,
}

impl BackgroundReader {
    /// Opens `path` for background reads; `None` if it cannot be opened or advised.
    pub(crate) fn open(path: &Path) -> Option<Self> {
        let file = File::open(path).ok()?;
        fadvise(&file, 0, None, Advice::Random).ok()?;
        Some(BackgroundReader { file })
    }

    /// Reads all of `buf` at `offset` (reaching the end of the file is `UnexpectedEof`), then
    /// drops the range from the page cache.
    pub(crate) fn read(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)?;
        if let Some(len) = NonZeroU64::new(buf.len() as u64) {
            // Best effort: pages left cached cost memory, not correctness.
            let _ = fadvise(&self.file, offset, Some(len), Advice::DontNeed);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn reads_what_was_written_and_errs_past_the_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create");
        let data: Vec<u8> = (0..3 * 65536u32).map(|i| (i % 251) as u8).collect();
        // Written and not yet written back: the reader sees it all the same.
        f.write_all_at(&data, 0).expect("write");
        let r = BackgroundReader::open(&path).expect("open");
        let mut buf = vec![0u8; 65536 + 100];
        r.read(&mut buf, 65536 - 50).expect("read");
        assert!(buf[..] == data[65536 - 50..2 * 65536 + 50]);
        let e = r.read(&mut buf, 3 * 65536 - 10).expect_err("past the end");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
