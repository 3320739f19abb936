//! Metadata readahead: the first cold lookup under a leaf's parent hints the device to read all
//! of that parent's leaves, so a cold sequential read does not wait for one leaf at a time.

mod common;

use cairn_engine::device::{Device, PowerSupply, SimDevice};
use cairn_engine::{Store, Target};
use common::{sim_devices, small_opts, BS};
use std::io;
use std::sync::{Arc, Mutex};

/// A simulated disk that records the prefetch hints it is given.
struct HintedDevice {
    inner: Arc<SimDevice>,
    hints: Mutex<Vec<(u64, u64)>>,
}

impl Device for HintedDevice {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
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
        self.hints.lock().expect("hints").push((offset, len));
        Ok(())
    }
}

fn hinted_blocks(dev: &HintedDevice) -> u64 {
    dev.hints
        .lock()
        .expect("hints")
        .iter()
        .map(|h| h.1 / BS)
        .sum()
}

#[test]
fn a_cold_read_hints_every_leaf_under_its_parent_once() {
    let (data, journal) = sim_devices(PowerSupply::new());
    // 64 MiB: 16,384 blocks in 33 leaves under one parent (the root).
    let size = 64 << 20;
    {
        let s =
            Store::open_devices(data.clone(), journal.clone(), small_opts(), "sim").expect("open");
        s.create_volume("v", size).expect("create");
        s.write("v", 0, &vec![0x5A; size as usize]).expect("write");
        s.flush().expect("flush");
    }
    let dev = Arc::new(HintedDevice {
        inner: data,
        hints: Mutex::new(Vec::new()),
    });
    let s = Store::open_devices(dev.clone(), journal, small_opts(), "sim").expect("reopen");
    dev.hints.lock().expect("hints").clear();

    let head = Target::head("v");
    let mut buf = vec![0; BS as usize];
    s.read(&head, 0, &mut buf).expect("read");
    assert_eq!(buf, vec![0x5A; BS as usize]);
    let leaves = size / BS / 510 + 1;
    // The first leaf was being read anyway; it may or may not be among the hinted.
    let hinted = hinted_blocks(&dev);
    assert!(
        hinted >= leaves - 1,
        "a cold read hinted {hinted} metadata blocks, want every one of the {leaves} leaves"
    );

    // The parent is now cached: reading under other leaves hints nothing more.
    s.read(&head, size - BS, &mut buf).expect("read");
    s.read(&head, size / 2, &mut buf).expect("read");
    assert_eq!(
        hinted_blocks(&dev),
        hinted,
        "a warm parent hinted its leaves again"
    );
}
