//! Helpers shared by the engine's integration tests: an in-memory model of volumes and checkpoints.
#![allow(dead_code, missing_docs)]

use cairn_engine::device::{Device, PowerSupply, SimDevice};
use cairn_engine::format::Layout;
use cairn_engine::{Options, Store};
use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

pub const BS: u64 = 4096;

/// Small caches so that eviction and forced commits happen in tests too.
pub fn small_opts() -> Options {
    Options {
        cache_pages: 64,
        dirty_limit: 48,
        journal_limit: 256 * 1024,
        prealloc_bytes: 64 * 1024,
        // Power-cut tests count device operations: commits happen where the test makes them.
        background_commits: false,
        // Deletes free their trees over several committed steps, and crashes land between them.
        drop_step: 7,
        mapped_reads: true,
        direct_writes: true,
        // Long copies-on-write (the model's writes of 250 KB and more) are linked by the store's
        // write-behind thread, while the test goes on.
        write_behind: true,
        clock: cairn_engine::Clock::system(),
        // Without a background committer there is no commit by time either.
        commit_interval: None,
    }
}

/// A freshly formatted data device and an empty journal device on one power supply.
pub fn sim_devices(power: Arc<PowerSupply>) -> (Arc<SimDevice>, Arc<SimDevice>) {
    sim_devices_in(power, Layout::Clusters)
}

/// [`sim_devices`] in a given layout (format 1 for stores written by earlier builds).
pub fn sim_devices_in(power: Arc<PowerSupply>, layout: Layout) -> (Arc<SimDevice>, Arc<SimDevice>) {
    let data = SimDevice::new(Vec::new(), power.clone());
    let journal = SimDevice::new(Vec::new(), power);
    Store::format_layout(&*data, "sim", layout).expect("format");
    (data, journal)
}

pub fn sim_store(power: Arc<PowerSupply>) -> (Arc<SimDevice>, Arc<SimDevice>, Store) {
    let (data, journal) = sim_devices(power);
    let store =
        Store::open_devices(data.clone(), journal.clone(), small_opts(), "sim").expect("open");
    (data, journal, store)
}

/// Opens a store from the disk images a simulated power cut left, panicking with `ctx` on failure.
pub fn reopen_crashed(data: Vec<u8>, journal: Vec<u8>, ctx: &str) -> Store {
    let power = PowerSupply::new();
    Store::open_devices(
        SimDevice::new(data, power.clone()),
        SimDevice::new(journal, power),
        small_opts(),
        "sim",
    )
    .unwrap_or_else(|e| panic!("{ctx}: reopen failed: {e}"))
}

/// Asserts that fsck finds a recovered store clean, and returns the names of `volume`'s
/// checkpoints.
pub fn recovered_checkpoints(s: &Store, volume: &str, ctx: &str) -> Vec<String> {
    let report = s.fsck().expect("fsck runs");
    assert!(
        report.ok(),
        "{ctx}: fsck after recovery: {:?}",
        report.errors
    );
    s.list_checkpoints(volume)
        .expect("list")
        .into_iter()
        .map(|c| c.name)
        .collect()
}

/// One state of a volume in the model: bytes, and a version per block (0 = never written or zeroed
/// as a whole block) so that diffs can be predicted exactly.
#[derive(Clone, Debug, PartialEq)]
pub struct MState {
    pub bytes: Vec<u8>,
    pub versions: Vec<u64>,
    pub parent: Option<String>,
}

impl MState {
    pub fn new(size: u64) -> Self {
        MState {
            bytes: vec![0; size as usize],
            versions: vec![0; size.div_ceil(BS) as usize],
            parent: None,
        }
    }
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }
    pub fn mapped(&self) -> u64 {
        self.versions.iter().filter(|&&v| v != 0).count() as u64
    }
    pub fn resize(&mut self, size: u64) {
        self.bytes.resize(size as usize, 0);
        self.versions.resize(size.div_ceil(BS) as usize, 0);
    }
}

#[derive(Default, Debug)]
pub struct MVolume {
    pub head: Option<MState>,
    pub checkpoints: BTreeMap<String, MState>,
    /// A defrag moved some of its blocks: diffs across it may report moved ranges as changed.
    pub defragged: bool,
}

#[derive(Default, Debug)]
pub struct Model {
    pub volumes: BTreeMap<String, MVolume>,
    pub next_version: u64,
}

impl Model {
    pub fn head(&mut self, v: &str) -> &mut MState {
        self.volumes
            .get_mut(v)
            .and_then(|x| x.head.as_mut())
            .expect("model volume")
    }

    pub fn write(&mut self, v: &str, off: u64, data: &[u8]) {
        self.next_version += 1;
        let ver = self.next_version;
        let h = self.head(v);
        h.bytes[off as usize..off as usize + data.len()].copy_from_slice(data);
        if !data.is_empty() {
            for b in off / BS..=(off + data.len() as u64 - 1) / BS {
                h.versions[b as usize] = ver;
            }
        }
    }

    pub fn zero(&mut self, v: &str, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let end = off + len;
        let fs = off.div_ceil(BS);
        let fe = end / BS;
        if fs >= fe {
            self.write(v, off, &vec![0; len as usize]);
            return;
        }
        if off < fs * BS {
            self.write(v, off, &vec![0; (fs * BS - off) as usize]);
        }
        if fe * BS < end {
            self.write(v, fe * BS, &vec![0; (end - fe * BS) as usize]);
        }
        let h = self.head(v);
        h.bytes[(fs * BS) as usize..(fe * BS) as usize].fill(0);
        for b in fs..fe {
            h.versions[b as usize] = 0;
        }
    }

    /// Blocks whose version differs, as (byte offset, byte length) runs clipped to the larger size.
    pub fn diff(a: &MState, b: &MState) -> Vec<(u64, u64)> {
        let n = a.versions.len().max(b.versions.len());
        let max = a.size().max(b.size());
        let mut out: Vec<(u64, u64)> = Vec::new();
        for i in 0..n {
            let va = a.versions.get(i).copied().unwrap_or(0);
            let vb = b.versions.get(i).copied().unwrap_or(0);
            if va != vb {
                let s = i as u64 * BS;
                let l = BS.min(max - s);
                match out.last_mut() {
                    Some((os, ol)) if *os + *ol == s => *ol += l,
                    _ => out.push((s, l)),
                }
            }
        }
        out
    }
}

/// Where a [`PausingDevice`] stops.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PauseAt {
    Sync,
    PunchHole,
}

/// A simulated disk that, once armed, stops the next `sync` or hole punch (as chosen) until the
/// test lets it go on: the way to hold a store in the middle of a commit or a release.
pub struct PausingDevice {
    pub inner: Arc<SimDevice>,
    at: PauseAt,
    armed: std::sync::atomic::AtomicBool,
    paused: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    resume: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl PausingDevice {
    /// The device, a receiver told when it has stopped, and a sender that lets it go on (a
    /// message, or dropping the sender).
    pub fn new(
        inner: Arc<SimDevice>,
        at: PauseAt,
    ) -> (
        Arc<Self>,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (paused_tx, paused_rx) = std::sync::mpsc::channel();
        let (resume_tx, resume_rx) = std::sync::mpsc::channel();
        let dev = Arc::new(PausingDevice {
            inner,
            at,
            armed: false.into(),
            paused: std::sync::Mutex::new(paused_tx),
            resume: std::sync::Mutex::new(resume_rx),
        });
        (dev, paused_rx, resume_tx)
    }

    /// Makes the next pause point stop.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn maybe_pause(&self, here: PauseAt) {
        if here == self.at && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            let _ = self.paused.lock().expect("lock").send(());
            let _ = self.resume.lock().expect("lock").recv();
        }
    }
}

impl cairn_engine::device::Device for PausingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.maybe_pause(PauseAt::Sync);
        self.inner.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn allocate(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.maybe_pause(PauseAt::PunchHole);
        self.inner.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> std::io::Result<u64> {
        self.inner.allocated_bytes()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A hint to the disk: offset and length.
    Hint(u64, u64),
    /// A hint to the CPU of one block.
    Warm(u64),
    /// A read of data: offset and length.
    Read(u64, u64),
    /// A question whether the block at this offset is cached.
    Asked(u64),
}

/// A simulated disk that answers "is it cached?" as the test says and records what it is asked.
pub struct RecordingDevice {
    pub inner: Arc<SimDevice>,
    /// 0: cannot tell; 1: cached; 2: not cached; 3: cached but for the block at `cold_offset`.
    pub cached: AtomicU8,
    /// The one block not cached in mode 3 of `cached`.
    pub cold_offset: AtomicU64,
    pub events: Mutex<Vec<Event>>,
}

impl RecordingDevice {
    /// Wraps `inner`; it cannot tell what is cached until the test says.
    pub fn new(inner: Arc<SimDevice>) -> Arc<Self> {
        Arc::new(RecordingDevice {
            inner,
            cached: AtomicU8::new(0),
            cold_offset: AtomicU64::new(0),
            events: Mutex::new(Vec::new()),
        })
    }
    /// Everything recorded so far, forgotten here.
    pub fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().expect("events"))
    }
    fn record(&self, e: Event) {
        self.events.lock().expect("events").push(e);
    }
    /// Blocks hinted to the disk so far.
    pub fn hinted_blocks(&self) -> u64 {
        self.events
            .lock()
            .expect("events")
            .iter()
            .map(|e| match e {
                Event::Hint(_, len) => len / BS,
                _ => 0,
            })
            .sum()
    }
}

impl Device for RecordingDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn read_data_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.record(Event::Read(offset, buf.len() as u64));
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync(&self) -> io::Result<()> {
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn allocate(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.allocate(offset, len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
    fn allocated_bytes(&self) -> io::Result<u64> {
        self.inner.allocated_bytes()
    }
    fn prefetch(&self, offset: u64, len: u64) -> io::Result<()> {
        self.record(Event::Hint(offset, len));
        Ok(())
    }
    fn prefetch_block(&self, offset: u64) {
        self.record(Event::Warm(offset));
    }
    fn is_cached(&self, offset: u64) -> Option<bool> {
        self.record(Event::Asked(offset));
        match self.cached.load(Ordering::SeqCst) {
            1 => Some(true),
            2 => Some(false),
            3 => Some(offset != self.cold_offset.load(Ordering::SeqCst)),
            _ => None,
        }
    }
}
