//! Block devices the engine stores its files on: a real file, or a simulated disk for crash tests.
//!
//! The engine never assumes more of a device than a disk gives: a write may sit in a volatile cache
//! until `sync`, unsynced writes may be lost, reordered or torn at sector granularity on power loss.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::{Arc, Mutex};

mod background;
mod direct;
mod mapping;
use background::BackgroundReader;
use direct::DirectWriter;
pub(crate) use direct::LONG_WRITE;
use mapping::ReadMapping;

/// Positional I/O with explicit durability, as the engine needs it from a file or a disk.
pub trait Device: Send + Sync {
    /// Reads `buf.len()` bytes at `offset`; bytes past the end of the device read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// [`Device::read_at`] for volume data, which is read at random more often than not: a device
    /// may serve short reads from a memory mapping instead, and may fail with `UnexpectedEof`
    /// where data would lie past its end.
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_at(buf, offset)
    }
    /// [`Device::read_data_at`] for one run of a read in many runs (a fragmented range), whose
    /// blocks the caller found in the host's cache or has just hinted with [`Device::prefetch`]:
    /// a device may serve somewhat longer runs from its mapping.
    fn read_fragment_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_data_at(buf, offset)
    }
    /// [`Device::read_data_at`] for background work that reads data once (a backup): a device
    /// may read what is not in the host's cache in exactly the requested size, without readahead,
    /// and leave nothing of it in the cache (`device/background.rs` says why).
    fn read_background_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_data_at(buf, offset)
    }
    /// Writes all of `buf` at `offset`, growing the device if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// [`Device::write_at`] for whole data blocks freshly allocated to a long copy-on-write (at
    /// least `LONG_WRITE` bytes), which nothing has read since: a device may send them straight
    /// to the disk, past its cache.
    fn write_new_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_at(buf, offset)
    }
    /// Makes every write completed before this call durable.
    fn sync(&self) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the device holds no bytes at all.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Reserves host storage for a range (growing the device), so later writes there cannot run
    /// out of space; fails with `StorageFull` when the host has none.
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Releases the storage behind a range; it then reads as zeros.
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Bytes the device really occupies on the host (sparse files count only allocated extents).
    fn allocated_bytes(&self) -> io::Result<u64>;
    /// Hints that `len` bytes at `offset` will be read soon, so their reads can be issued
    /// together rather than one by one; a device may ignore it.
    fn prefetch(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
    /// Hints that the data block at `offset` will be copied from memory soon, if the device
    /// serves it from a mapping (see [`Device::read_data_at`]); a device may ignore it.
    fn prefetch_block(&self, _offset: u64) {}
    /// Whether the data block at `offset` is in the host's memory (its page cache); `None` if
    /// the device cannot tell.
    fn is_cached(&self, _offset: u64) -> Option<bool> {
        None
    }
}

/// A device backed by a host file.
pub struct FileDevice {
    file: File,
    mapping: Option<ReadMapping>,
    direct: Option<DirectWriter>,
    background: Option<BackgroundReader>,
}

impl FileDevice {
    /// Wraps an open read-write file.
    pub fn new(file: File) -> Self {
        FileDevice {
            file,
            mapping: None,
            direct: None,
            background: None,
        }
    }

    /// Wraps an open read-write file and serves data reads from a mapping of it where that is
    /// cheaper (`device/mapping.rs` says when and why); without one if the file cannot be mapped.
    pub fn with_read_mapping(file: File) -> Self {
        let mapping = ReadMapping::new(&file);
        FileDevice {
            file,
            mapping,
            direct: None,
            background: None,
        }
    }

    /// Also sends the writes the engine marks as fresh ([`Device::write_new_at`]) straight to the
    /// disk (`device/direct.rs` says why), through a second handle on `path`, the file this device
    /// wraps; unchanged if the file system cannot do that.
    pub fn with_direct_writes(mut self, path: &Path) -> Self {
        self.direct = DirectWriter::open(path);
        self
    }

    /// Also reads for background work ([`Device::read_background_at`]) through a handle of their
    /// own on `path`, the file this device wraps (`device/background.rs` says why); unchanged if
    /// it cannot be opened.
    pub fn with_background_reads(mut self, path: &Path) -> Self {
        self.background = BackgroundReader::open(path);
        self
    }

    fn note_len(&self, end: u64) {
        if let Some(m) = &self.mapping {
            m.note_len(end);
        }
    }
}

impl Device for FileDevice {
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.mapping.as_ref().is_some_and(|m| m.read(buf, offset)) {
            return Ok(());
        }
        // Volume data never lies past the end of the file Cairn grew to hold it, so reaching the
        // end means the file was cut short: an error (UnexpectedEof), not zeros.
        self.file.read_exact_at(buf, offset)?;
        if let Some(m) = &self.mapping {
            m.map_after_read(offset, buf.len());
        }
        Ok(())
    }

    fn read_fragment_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self
            .mapping
            .as_ref()
            .is_some_and(|m| m.read_fragment(buf, offset))
        {
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    fn read_background_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match &self.background {
            Some(b) if self.is_cached(offset) != Some(true) => b.read(buf, offset),
            _ => self.read_data_at(buf, offset),
        }
    }

    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        let Some(len) = std::num::NonZeroU64::new(len) else {
            return Ok(());
        };
        rustix::fs::fadvise(&self.file, offset, Some(len), rustix::fs::Advice::WillNeed)
            .map_err(io::Error::from)
    }

    fn prefetch_block(&self, offset: u64) {
        if let Some(m) = &self.mapping {
            m.prefetch(offset);
        }
    }

    fn is_cached(&self, offset: u64) -> Option<bool> {
        self.mapping.as_ref().and_then(|m| m.is_resident(offset))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)?;
        self.note_len(offset + buf.len() as u64);
        Ok(())
    }

    fn write_new_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if let Some(d) = &self.direct {
            if d.write(buf, offset)? {
                self.note_len(offset + buf.len() as u64);
                return Ok(());
            }
        }
        self.write_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        rustix::fs::fallocate(&self.file, rustix::fs::FallocateFlags::empty(), offset, len)
            .map_err(io::Error::from)?;
        self.note_len(offset + len);
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{fallocate, FallocateFlags};
        fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(io::Error::from)
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.blocks() * 512)
    }
}

/// Sector size at which the simulated disk tears writes on power loss.
pub const SIM_SECTOR: usize = 512;

/// Shared power supply of a set of simulated disks: counts I/O operations and cuts power at a chosen one.
#[derive(Default)]
pub struct PowerSupply {
    state: Mutex<PowerState>,
}

#[derive(Default)]
struct PowerState {
    ops: u64,
    cut_at: Option<u64>,
    off: bool,
}

impl PowerSupply {
    /// A supply that never fails.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Cuts power just before the `op`-th write or sync from now (counting from 0).
    pub fn cut_after(&self, op: u64) {
        let mut s = lock(&self.state);
        s.cut_at = Some(s.ops + op);
    }

    /// Whether power has been cut.
    pub fn is_off(&self) -> bool {
        lock(&self.state).off
    }

    /// Number of writes and syncs seen so far.
    pub fn ops(&self) -> u64 {
        lock(&self.state).ops
    }

    fn tick(&self) -> io::Result<()> {
        let mut s = lock(&self.state);
        if !s.off && s.cut_at == Some(s.ops) {
            s.off = true;
        }
        if s.off {
            return Err(io::Error::other("simulated power loss"));
        }
        s.ops += 1;
        Ok(())
    }
}

// A panic while holding a simulator lock leaves plain bytes behind; they stay usable.
use crate::sync::lock;

/// An in-memory disk that keeps what is durable apart from what is only cached, to simulate power loss.
pub struct SimDevice {
    power: Arc<PowerSupply>,
    state: Mutex<SimState>,
}

struct SimState {
    /// Writes that would grow the device past this fail with ENOSPC (a full disk).
    capacity: Option<u64>,
    /// This many next writes and syncs fail with EIO (a failing disk), then all succeed again.
    failures: u64,
    live: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

fn apply(img: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let end = offset as usize + data.len();
    if img.len() < end {
        img.resize(end, 0);
    }
    img[offset as usize..end].copy_from_slice(data);
}

impl SimDevice {
    /// A disk holding `image` durably, on the given power supply.
    pub fn new(image: Vec<u8>, power: Arc<PowerSupply>) -> Arc<Self> {
        Arc::new(SimDevice {
            power,
            state: Mutex::new(SimState {
                capacity: None,
                failures: 0,
                live: image.clone(),
                durable: image,
                pending: Vec::new(),
            }),
        })
    }

    /// What the disk holds after a power cut: the durable image plus an arbitrary subset of the
    /// unsynced writes, applied in arbitrary order, each possibly torn at sector boundaries.
    pub fn crash_image(&self, rng: &mut dyn FnMut(u32) -> u32) -> Vec<u8> {
        let s = lock(&self.state);
        let mut img = s.durable.clone();
        let mut order: Vec<usize> = (0..s.pending.len()).collect();
        for i in (1..order.len()).rev() {
            let j = rng(i as u32 + 1) as usize;
            order.swap(i, j);
        }
        for i in order {
            let (off, data) = &s.pending[i];
            match rng(4) {
                0 => {} // lost entirely
                1 => {
                    // torn: each sector independently
                    for (k, chunk) in data.chunks(SIM_SECTOR).enumerate() {
                        if rng(2) == 0 {
                            apply(&mut img, off + (k * SIM_SECTOR) as u64, chunk);
                        }
                    }
                }
                _ => apply(&mut img, *off, data),
            }
        }
        img
    }

    /// Makes writes that would grow the device past `bytes` fail as on a full disk (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        lock(&self.state).capacity = bytes;
    }

    /// Makes the next `n` writes or syncs fail with an I/O error.
    pub fn fail_next(&self, n: u64) {
        lock(&self.state).failures = n;
    }

    /// How many of the failures [`SimDevice::fail_next`] armed have not happened yet.
    pub fn failures_pending(&self) -> u64 {
        lock(&self.state).failures
    }

    /// The image as the running system sees it (including unsynced writes).
    pub fn live_image(&self) -> Vec<u8> {
        lock(&self.state).live.clone()
    }
}

impl Device for SimDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.power.is_off() {
            return Err(io::Error::other("simulated power loss"));
        }
        let s = lock(&self.state);
        let start = (offset as usize).min(s.live.len());
        let end = (offset as usize + buf.len()).min(s.live.len());
        let n = end - start;
        buf[..n].copy_from_slice(&s.live[start..end]);
        buf[n..].fill(0);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.power.tick()?;
        let mut s = lock(&self.state);
        if s.failures > 0 {
            s.failures -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let end = offset + buf.len() as u64;
        if s.capacity
            .is_some_and(|c| end > c && end > s.live.len() as u64)
        {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        apply(&mut s.live, offset, buf);
        s.pending.push((offset, buf.to_vec()));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.power.tick()?;
        let mut s = lock(&self.state);
        if s.failures > 0 {
            s.failures -= 1;
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        let pending = std::mem::take(&mut s.pending);
        for (off, data) in pending {
            apply(&mut s.durable, off, &data);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.state).live.len() as u64)
    }

    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut s = lock(&self.state);
        let end = offset + len;
        if s.capacity.is_some_and(|c| end > c) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        // Like fallocate, a size change that need not survive a crash.
        if (s.live.len() as u64) < end {
            s.live.resize(end as usize, 0);
        }
        Ok(())
    }

    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let cur = self.len()?;
        let end = (offset + len).min(cur);
        if end > offset {
            self.write_at(&vec![0; (end - offset) as usize], offset)?;
        }
        Ok(())
    }

    fn allocated_bytes(&self) -> io::Result<u64> {
        let s = lock(&self.state);
        Ok(s.live
            .chunks(4096)
            .filter(|c| c.iter().any(|&b| b != 0))
            .count() as u64
            * 4096)
    }
}
