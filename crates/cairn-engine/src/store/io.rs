//! Reads and writes of heads and checkpoints: planning copies-on-write, striped data I/O,
//! sparse and fragmented reads, write-zeroes and trim.

use super::*;

impl Store {
    /// Writes `data` at byte `offset` of a volume's head. Not durable until `flush`.
    pub fn write(&self, volume: &str, offset: u64, data: &[u8]) -> Result<()> {
        if data.is_empty() {
            return self.check_range("write", &Target::head(volume), offset, 0);
        }
        self.maybe_commit()?;
        let (vid, vg) = self.volume_gate(volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        let first = offset / BS;
        let end = offset + data.len() as u64;
        let last = (end - 1) / BS;
        self.core
            .write_behind
            .wait_range(vid, first, last - first + 1);
        let partial = |vbn: u64| offset > vbn * BS || end < (vbn + 1) * BS;
        // Partial blocks are read-modify-write: serialize them per block.
        let mut stripe_ids: Vec<usize> = [first, last]
            .into_iter()
            .filter(|&v| partial(v))
            .map(|v| self.stripe(vid, v))
            .collect();
        stripe_ids.sort_unstable();
        stripe_ids.dedup();
        let _stripes: Vec<_> = stripe_ids.iter().map(|&i| lock(&self.stripes[i])).collect();
        let mut plan = self
            .state()
            .prepare_write(vid, volume, offset, data.len() as u64)?;
        if !self.writers.is_empty() && WriteBehind::qualifies(offset, data, &plan) {
            match self.core.write_behind.try_queue(vid, first, plan, data) {
                Ok(()) => {
                    self.grow_ahead();
                    return Ok(());
                }
                Err(p) => plan = p,
            }
        }
        let io = self.write_planned(&plan, first, offset, data);
        let mut st = self.state();
        if io.is_err() {
            st.meta.unreserve_plan(&plan);
            return io;
        }
        let r = st.link_write(vid, first, &plan);
        st.poison_on(r)?;
        drop(st);
        self.grow_ahead();
        Ok(())
    }

    /// Preallocates the next stretch of the data file when it is due, without the state lock.
    /// Best effort: on failure (a full disk) the allocator's own growth reports `NoSpace`.
    pub(super) fn grow_ahead(&self) {
        let Ok(_g) = self.grow_lock.try_lock() else {
            return;
        };
        let Some((from, to)) = self.state().meta.growth_due() else {
            return;
        };
        if self.data.allocate(from, to - from).is_ok() {
            let mut st = self.state();
            st.meta.allocated_end = st.meta.allocated_end.max(to);
        }
    }

    pub(super) fn write_planned(
        &self,
        plan: &[(u64, Fill)],
        first: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let partial = |vbn: u64| offset > vbn * BS || end < (vbn + 1) * BS;
        // Only the first and the last block can be partial.
        let (mut lo, mut hi) = (0, plan.len());
        if partial(first) {
            self.write_partial(plan[0], first, offset, data)?;
            lo = 1;
        }
        if hi > lo && partial(first + hi as u64 - 1) {
            self.write_partial(plan[hi - 1], first + hi as u64 - 1, offset, data)?;
            hi -= 1;
        }
        if lo == hi {
            return Ok(());
        }
        let src = ((first + lo as u64) * BS - offset) as usize;
        write_runs(
            &*self.data,
            &plan[lo..hi],
            &data[src..src + (hi - lo) * BLOCK_SIZE],
            data.len() >= LONG_WRITE,
        )
    }

    /// Read-modify-write of block `vbn`, which the write of `data` at `offset` covers in part.
    pub(super) fn write_partial(
        &self,
        (phys, fill): (u64, Fill),
        vbn: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<()> {
        let end = offset + data.len() as u64;
        let mut buf = [0u8; BLOCK_SIZE];
        match fill {
            Fill::Zero => {}
            Fill::InPlace => self.read_data(&mut buf, phys)?,
            Fill::CopyFrom(src) => self.read_data(&mut buf, src)?,
        }
        let bstart = vbn * BS;
        let lo = offset.max(bstart);
        let hi = end.min(bstart + BS);
        buf[(lo - bstart) as usize..(hi - bstart) as usize]
            .copy_from_slice(&data[(lo - offset) as usize..(hi - offset) as usize]);
        self.write_data(&buf, phys)
    }

    /// The lock stripe of block `vbn` of volume `vid`: a cheap multiplicative mix, since this is
    /// on the write path and the inputs are our own numbers.
    pub(super) fn stripe(&self, vid: u64, vbn: u64) -> usize {
        let h = (vid ^ vbn.rotate_left(20)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) % self.stripes.len() as u64) as usize
    }

    pub(super) fn read_data(&self, buf: &mut [u8], block: u64) -> Result<()> {
        self.data_read_result(block, self.data.read_data_at(buf, block * BS))
    }

    /// [`Store::read_data`] for one run of a fragmented read (see [`Device::read_fragment_at`]).
    pub(super) fn read_fragment(&self, buf: &mut [u8], block: u64) -> Result<()> {
        self.data_read_result(block, self.data.read_fragment_at(buf, block * BS))
    }

    pub(super) fn data_read_result(&self, block: u64, r: std::io::Result<()>) -> Result<()> {
        r.map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => Error::corrupt(
                block,
                "volume data lies past the end of the data file (the file was cut short)",
            ),
            _ => Error::io("data read", "data file")(e),
        })
    }

    pub(super) fn write_data(&self, buf: &[u8], block: u64) -> Result<()> {
        self.data
            .write_at(buf, block * BS)
            .map_err(Error::io("data write", "data file"))
    }

    pub(super) fn check_range(
        &self,
        op: &'static str,
        t: &Target,
        offset: u64,
        len: u64,
    ) -> Result<()> {
        let st = self.state();
        let (_, _, size) = st.resolve(t)?;
        check_range(op, t, offset, len, size)
    }

    /// Reads `buf.len()` bytes at `offset` from a head or checkpoint; unwritten ranges read as zeros.
    pub fn read(&self, target: &Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_into(target, offset, buf, None, false)
    }

    /// [`Store::read`] for background work that reads a checkpoint once, beside VMs using the
    /// same disk (a backup): what is not in the host's cache is read in exactly the requested
    /// size, without readahead, and does not stay in the cache, so the VMs' requests do not queue
    /// behind long reads and keep their cached data (`device/background.rs` says why).
    pub fn read_background(&self, target: &Target, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.read_into(target, offset, buf, None, true)
    }

    /// [`Store::read`] that also says which parts of `buf` are holes (read as zeros, no data
    /// stored): runs of `(length, is_hole)` covering `buf` in order. Servers use it to send holes
    /// without their zeros.
    pub fn read_sparse(
        &self,
        target: &Target,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Vec<(u64, bool)>> {
        let mut runs = Vec::new();
        self.read_into(target, offset, buf, Some(&mut runs), false)?;
        Ok(runs)
    }

    pub(super) fn read_into(
        &self,
        target: &Target,
        offset: u64,
        buf: &mut [u8],
        runs: Option<&mut Vec<(u64, bool)>>,
        background: bool,
    ) -> Result<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return self.check_range("read", target, offset, 0);
        }
        let (vid, vg) = self.volume_gate(&target.volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        let first = offset / BS;
        let nblocks = (offset + len).div_ceil(BS) - first;
        if target.checkpoint.is_none() {
            self.core.write_behind.wait_range(vid, first, nblocks);
        }
        let phys = {
            let mut st = self.state();
            let (root, depth, size) = st.resolve_id(vid, target)?;
            check_range("read", target, offset, len, size)?;
            let mut v = Vec::with_capacity(nblocks as usize);
            st.meta
                .lookup_range(root, depth, first, nblocks, &mut v, background)?;
            v
        };
        if let Some(runs) = runs {
            for (i, p) in phys.iter().enumerate() {
                let b = first + i as u64;
                let l = ((b + 1) * BS).min(offset + len) - (b * BS).max(offset);
                match runs.last_mut() {
                    Some((rl, hole)) if *hole == (*p == 0) => *rl += l,
                    _ => runs.push((l, *p == 0)),
                }
            }
        }
        let read_blocks = |out: &mut [u8]| match background {
            true => self.read_blocks_background(&phys, out),
            false => self.read_blocks(&phys, out),
        };
        if offset.is_multiple_of(BS) && len.is_multiple_of(BS) {
            return read_blocks(buf);
        }
        let mut tmp = vec![0u8; nblocks as usize * BLOCK_SIZE];
        read_blocks(&mut tmp)?;
        let skip = (offset - first * BS) as usize;
        buf.copy_from_slice(&tmp[skip..skip + len as usize]);
        Ok(())
    }

    /// Reads the blocks `phys` (0: a hole) into `out`, one run of adjacent blocks at a time. The
    /// runs [`PREFETCH_RUNS`] ahead are hinted to the device while one is copied: in a fragmented
    /// range most runs are lone blocks copied from a mapping, and the hints overlap their cache
    /// misses (docs/design.md, "Read path").
    pub(super) fn read_blocks(&self, phys: &[u64], out: &mut [u8]) -> Result<()> {
        let fragmented = self.hint_if_cold(phys);
        let hint = |r: std::ops::Range<usize>| match phys[r.start] {
            0 => {}
            b => self.data.prefetch_block(b * BS),
        };
        let mut ahead = block_runs(phys).skip(1);
        ahead.by_ref().take(PREFETCH_RUNS).for_each(hint);
        for r in block_runs(phys) {
            let dst = &mut out[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE];
            match phys[r.start] {
                0 => dst.fill(0),
                b if fragmented => self.read_fragment(dst, b)?,
                b => self.read_data(dst, b)?,
            }
            if let Some(n) = ahead.next() {
                hint(n);
            }
        }
        Ok(())
    }

    /// [`Store::read_blocks`] for background work: one device read a run, each with
    /// [`crate::device::Device::read_background_at`], and no hints (they would fill the cache).
    fn read_blocks_background(&self, phys: &[u64], out: &mut [u8]) -> Result<()> {
        for r in block_runs(phys) {
            let dst = &mut out[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE];
            match phys[r.start] {
                0 => dst.fill(0),
                b => self.data_read_result(b, self.data.read_background_at(dst, b * BS))?,
            }
        }
        Ok(())
    }

    /// Before a fragmented read, asks the device whether a few of its blocks are in the host's
    /// cache ([`COLD_PROBES`], spread over the read); if one is not, hints every run of it to the
    /// device at once. Without that a cold fragmented read waited for one disk read per run, one
    /// after the other, since no readahead follows scattered blocks: 66-78 MiB/s for a head 63%
    /// rewritten after checkpoints. Returns whether the read is fragmented (then the probes
    /// were cached, or every run has been hinted).
    pub(super) fn hint_if_cold(&self, phys: &[u64]) -> bool {
        let data_runs = || block_runs(phys).filter(|r| phys[r.start] != 0);
        let runs = data_runs().count();
        if runs < COLD_CHECK_RUNS {
            return false;
        }
        let mut probes = (0..COLD_PROBES).map(|k| k * runs / COLD_PROBES).peekable();
        let cold = data_runs().enumerate().any(|(i, r)| {
            probes.next_if_eq(&i).is_some()
                && self.data.is_cached(phys[r.start] * BS) == Some(false)
        });
        if cold {
            for r in data_runs() {
                let _ = self.data.prefetch(phys[r.start] * BS, r.len() as u64 * BS);
            }
        }
        true
    }

    /// Writes `data` to the blocks `phys` (one per 4 KiB, none 0), a run of adjacent blocks at a
    /// time, through the page cache: the write-side twin of [`Store::read_blocks`]. A defrag's
    /// copies go this way: sent straight to the disk they came back into the page cache in small
    /// folios, and the defragmented head read sequentially at 0.80 of the control instead of 1.00.
    pub(super) fn write_blocks(&self, phys: &[u64], data: &[u8]) -> Result<()> {
        for r in block_runs(phys) {
            self.write_data(
                &data[r.start * BLOCK_SIZE..r.end * BLOCK_SIZE],
                phys[r.start],
            )?;
        }
        Ok(())
    }

    /// Makes a range read as zeros and releases the whole blocks in it (trim and write-zeroes).
    pub fn write_zeroes(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.check_range("write-zeroes", &Target::head(volume), offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let full_start = offset.div_ceil(BS);
        let full_end = end / BS;
        if full_start >= full_end {
            return self.write(volume, offset, &vec![0; len as usize]);
        }
        if offset < full_start * BS {
            self.write(
                volume,
                offset,
                &vec![0; (full_start * BS - offset) as usize],
            )?;
        }
        if full_end * BS < end {
            self.write(
                volume,
                full_end * BS,
                &vec![0; (end - full_end * BS) as usize],
            )?;
        }
        self.maybe_commit()?;
        // Freed blocks stay quarantined while reads that looked them up may be in flight.
        let (vid, vg) = self.volume_gate(volume)?;
        let _g = self.shared();
        let _v = read_lock(&vg);
        self.core
            .write_behind
            .wait_range(vid, full_start, full_end - full_start);
        let mut st = self.state();
        let id = st.volume_id(volume)?;
        let v = st.volumes[&id].clone();
        let mut root = v.root;
        let r = st
            .meta
            .unmap(&mut root, tree_depth(v.size), full_start, full_end);
        let n = st.poison_on(r)?;
        let vm = st.volume_mut(id);
        vm.root = root;
        vm.mapped -= n;
        // An acknowledged zeroing is due for a commit by time, as a write is.
        st.note_unflushed();
        let handed_over = !st.meta.to_drop.is_empty();
        drop(st);
        if handed_over {
            // Its commit turns the subtree into a dropped tree, which it then frees.
            if let Some(c) = &self.committer {
                c.wake();
            }
        }
        Ok(())
    }

    /// Discards a range: Cairn always releases it, so it reads as zeros afterwards.
    pub fn trim(&self, volume: &str, offset: u64, len: u64) -> Result<()> {
        self.write_zeroes(volume, offset, len)
    }
}

/// Writes whole blocks `data` to their planned blocks, one write per run of host-adjacent blocks
/// of one kind: the fresh copies of shared blocks in a `long` write straight to the disk
/// ([`Device::write_new_at`]; `device/direct.rs` says why only those, not first writes to
/// unwritten ranges), the rest through the page cache. Shared by [`Store::write_planned`] and the
/// write-behind threads.
pub(super) fn write_runs(
    dev: &dyn Device,
    plan: &[(u64, Fill)],
    data: &[u8],
    long: bool,
) -> Result<()> {
    let direct = |i: usize| long && matches!(plan[i].1, Fill::CopyFrom(_));
    let mut i = 0;
    while i < plan.len() {
        let mut j = i + 1;
        while j < plan.len() && plan[j].0 == plan[j - 1].0 + 1 && direct(j) == direct(i) {
            j += 1;
        }
        let run = &data[i * BLOCK_SIZE..j * BLOCK_SIZE];
        let at = plan[i].0 * BS;
        if direct(i) {
            dev.write_new_at(run, at)
        } else {
            dev.write_at(run, at)
        }
        .map_err(Error::io("data write", "data file"))?;
        i = j;
    }
    Ok(())
}
