//! Commits: the background committer, the commit paths of `Core` (in place, concurrent, with
//! a step of freeing), releasing freed space, and writing a sealed transaction.

use super::*;

/// A thread that commits when writes have dirtied `dirty_limit` metadata pages, so the write that
/// crosses the limit does not wait for a commit (at full scale one took 165 ms, and a write that
/// found another in flight waited for both: 381 ms); and when the oldest uncommitted write is
/// `commit_interval` old, so acknowledged writes reach the disk within seconds without a flush.
pub(super) struct Committer {
    pub(super) signal: Arc<(Mutex<CommitterState>, std::sync::Condvar)>,
    pub(super) thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
pub(super) struct CommitterState {
    pub(super) wanted: bool,
    pub(super) stop: bool,
}

impl Committer {
    pub(super) fn start(core: Arc<Core>) -> Result<Committer> {
        let interval = core.state().opts.commit_interval;
        let signal: Arc<(Mutex<CommitterState>, std::sync::Condvar)> = Arc::default();
        let sig = signal.clone();
        let thread = std::thread::Builder::new()
            .name("cairn-commit".into())
            .spawn(move || loop {
                let timed = {
                    let mut g = lock(&sig.0);
                    let mut timed = false;
                    while !g.wanted && !g.stop && !timed {
                        g = match interval {
                            // Looks a few times per interval whether the oldest write waits too
                            // long: a sleeping thread's wakeups, and nothing on the write path.
                            Some(i) => {
                                let (g, _) = sig
                                    .1
                                    .wait_timeout(g, i / 4)
                                    .unwrap_or_else(|e| e.into_inner());
                                timed = core.commit_overdue(i);
                                g
                            }
                            None => sig.1.wait(g).unwrap_or_else(|e| e.into_inner()),
                        };
                    }
                    if g.stop {
                        return;
                    }
                    g.wanted = false;
                    timed
                };
                if timed {
                    // Acknowledged long copies-on-write are linked first, so the commit covers
                    // them too.
                    core.write_behind.wait_all();
                }
                core.background_commit();
                // Trees left by a crashed delete or a large unmap: a step at a time, each
                // committed, stopping early when the store closes.
                while !lock(&sig.0).stop
                    && !core.poisoned.load(Ordering::SeqCst)
                    && core.background_free_step()
                {
                    core.try_release_space();
                }
            })
            .map_err(Error::io("start the background commit thread", "store"))?;
        Ok(Committer {
            signal,
            thread: Some(thread),
        })
    }

    pub(super) fn wake(&self) {
        lock(&self.signal.0).wanted = true;
        self.signal.1.notify_one();
    }

    pub(super) fn stop(&mut self) {
        lock(&self.signal.0).stop = true;
        self.signal.1.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Core {
    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    /// Whether the oldest write not yet committed was linked `interval` ago or more.
    fn commit_overdue(&self, interval: std::time::Duration) -> bool {
        self.state()
            .unflushed_since
            .is_some_and(|t| t.elapsed() >= interval)
    }

    pub(super) fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        read_lock(&self.gate)
    }

    pub(super) fn flush(&self) -> Result<()> {
        let _g = self.shared();
        self.commit_concurrent()?;
        drop(_g);
        self.try_release_space();
        Ok(())
    }

    /// The background committer's work. A store left untrusted by a failed operation is left to
    /// the next caller to heal; a failure here is kept for the next flush to report.
    pub(super) fn background_commit(&self) {
        if self.poisoned.load(Ordering::SeqCst) {
            return;
        }
        // The error is recorded before the gate is let go: the reload that discards the writes
        // needs the gate exclusively, so no flush can succeed in between. And before the commit
        // lock is: a flush waiting for it then fails on the poisoned store and reports this
        // error (once), not its own.
        let g = self.shared();
        let c = self.commit_lock();
        let attempted = match self.commit_holding(&c, false) {
            Ok(wrote) => wrote,
            Err(e) => {
                lock(&self.background_error).get_or_insert(Error::Invalid(format!(
                    "a background commit failed ({e}); writes since the last flush were discarded"
                )));
                true
            }
        };
        drop(c);
        drop(g);
        self.try_release_space();
        if attempted {
            self.state().stats.background_commits += 1;
        }
    }

    /// Commits without holding the state lock across the syncs, so reads and writes on every
    /// volume go on during the tens of milliseconds a commit's `fdatasync`s take. The transaction
    /// is sealed under the lock (records, superblock, shared references to the dirty pages), then
    /// synced, journaled and written in place outside it. Callers hold the store gate shared, so no
    /// reload or release of freed blocks runs meanwhile.
    ///
    /// When the journal is due for a reset, the reset (a data sync and a journal header write)
    /// also runs outside the lock, with the journal held: at full scale such commits came every
    /// few seconds and each held every volume's I/O for 20–300 ms. Only the blocks quarantined
    /// when the transaction was sealed become reusable after that reset: a block freed later was
    /// freed by a change the reset does not cover.
    /// Returns whether there was a transaction to write.
    pub(super) fn commit_concurrent(&self) -> Result<bool> {
        self.commit_holding(&lock(&self.commit_lock), false)
    }

    /// The commit lock, for an operation that makes a change and then commits it with
    /// [`Core::commit_holding`]: holding it from before the change, no other concurrent commit
    /// can seal the change first and fail with it, leaving a reload to undo it while this caller
    /// finds nothing to commit and reports success. Taken after a volume's gate, never before.
    pub(super) fn commit_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.commit_lock)
    }

    /// [`Core::commit_concurrent`] with the commit lock already held; `reset` resets the journal
    /// even if it is not due, so that the blocks freed so far go back to the host (deletes).
    pub(super) fn commit_holding(&self, _c: &MutexGuard<'_, ()>, reset: bool) -> Result<bool> {
        let t = std::time::Instant::now();
        let mut st = self.state();
        let journal = st.journal.clone();
        let mut journal = lock(&journal);
        let reset = reset || st.reset_due(journal.used());
        let sealed = st.seal()?;
        let (epoch, pages) = match sealed {
            Some(sealed) => sealed,
            None if reset => (0, Vec::new()),
            None => return Ok(false),
        };
        let frees_at_seal = st.meta.frees;
        let dev = st.meta.dev.clone();
        let path = st.meta.path.clone();
        drop(st);
        // Checksums are computed here, on copies, outside the state lock.
        let sealed: Vec<(u64, Box<Page>)> = pages
            .iter()
            .map(|(b, p)| {
                let mut c = Box::new(**p);
                crate::format::seal(&mut c);
                (*b, c)
            })
            .collect();
        drop(pages);
        let mut r = if sealed.is_empty() {
            Ok(())
        } else {
            write_transaction(&*dev, &path, &mut journal, &sealed)
        };
        if reset && r.is_ok() {
            // The in-place writes must be durable before the journal forgets their images.
            r = dev
                .sync()
                .map_err(Error::io("sync", &path))
                .and_then(|()| journal.reset());
        }
        drop(journal);
        let mut st = self.state();
        st.stats.commits += 1;
        st.stats.commit_nanos += t.elapsed().as_nanos() as u64;
        st.stats.pages_committed += sealed.len() as u64;
        st.poison_on(r)?;
        let wrote = !sealed.is_empty();
        if wrote {
            st.meta.cache.mark_clean_upto(epoch);
            st.meta.decremented_sealed.clear();
        }
        if reset {
            st.stats.journal_resets += 1;
            st.meta.reset_covered(frees_at_seal);
        }
        Ok(wrote)
    }

    /// Makes `change` under the state lock, then one step of freeing the dropped trees, and
    /// commits both as one transaction, holding the commit lock from before the change (see
    /// [`Core::commit_lock`]); the caller holds its volume's gate, if any, and the store gate
    /// shared. Returns the change's value and whether trees are left to free. When none are,
    /// the commit also resets the journal, so the freed blocks can go back to the host: a delete
    /// that fits one step is one commit.
    pub(super) fn commit_with_free_step<T>(
        &self,
        freed: &mut u64,
        change: impl FnOnce(&mut State) -> Result<T>,
    ) -> Result<(T, bool)> {
        let c = self.commit_lock();
        let (value, left) = {
            let mut st = self.state();
            let value = change(&mut st)?;
            st.drop_some(freed)?;
            (value, !st.dropped.is_empty())
        };
        self.commit_holding(&c, !left)?;
        Ok((value, left))
    }

    /// The background committer's share of [`Store::free_dropped`]: one step, committed. Says
    /// whether there was anything to free; a failure is kept for the next flush, as a failed
    /// background commit is (recorded before the gate is let go, for the same reason).
    pub(super) fn background_free_step(&self) -> bool {
        let _g = self.shared();
        let c = self.commit_lock();
        let mut freed = 0;
        let r = {
            let mut st = self.state();
            if st.dropped.is_empty() {
                return false;
            }
            st.drop_some(&mut freed)
        };
        match r.and_then(|()| self.commit_holding(&c, false)) {
            Ok(_) => true,
            Err(e) => {
                lock(&self.background_error).get_or_insert(Error::Invalid(format!(
                    "freeing a deleted tree in the background failed ({e}); writes since the last flush were discarded"
                )));
                false
            }
        }
    }

    /// Releases the blocks whose journal reset is done, if the store happens to be quiescent.
    pub(super) fn try_release_space(&self) {
        let taken = match self.gate.try_write() {
            Ok(_g) => self.state().meta.start_release(),
            Err(_) => None,
        };
        if let Some(taken) = taken {
            self.punch_and_release(taken);
        }
    }

    /// Releases the blocks whose journal reset is done, waiting until the store is quiescent
    /// and until a release already under way is done (a delete returns with its space back).
    pub(super) fn release_space(&self) {
        loop {
            let taken = {
                let _g = write_lock(&self.gate);
                let mut st = self.state();
                if st.meta.ready.is_empty() {
                    return;
                }
                st.meta.start_release()
            };
            match taken {
                Some(taken) => return self.punch_and_release(taken),
                // Another release took its blocks and has not yet taken the gate to punch them.
                // Sleep rather than spin, so that taking the gate exclusively again and again
                // cannot keep it from the shared hold it waits for; the next turn then waits
                // for its punching.
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }

    /// Punches the blocks [`Meta::start_release`] took and makes them allocatable. Taking them
    /// needed the gate exclusively, for one instant: once nothing is in flight, no request can
    /// still read them, since none can look them up any more. Punching needs it only shared, so
    /// that no reload of the durable state runs meanwhile: on a filesystem that discards
    /// synchronously (this project's machine, ext4 without a journal, mounted with `discard`) a
    /// delete's punches took 0.6 s, and all that time every volume's I/O used to wait.
    pub(super) fn punch_and_release(&self, (token, blocks): (u64, Vec<u64>)) {
        let _g = self.shared();
        let dev = {
            let st = self.state();
            if st.meta.releasing != Some(token) {
                return;
            }
            st.meta.dev.clone()
        };
        crate::meta::punch_blocks(&*dev, &blocks);
        self.state().meta.finish_release(token, &blocks);
    }
}

impl Store {
    /// Frees what deleted checkpoints and volumes (and large unmaps) left behind, a committed
    /// step at a time, reporting bytes freed so far to `progress`; returns when nothing is left.
    /// Other requests run between steps. Deletes call it; after a crash the background committer
    /// (or the next delete) finishes what a killed delete had started.
    pub fn free_dropped(&self, progress: &mut dyn FnMut(u64)) -> Result<()> {
        self.heal()?;
        self.free_rest(0, progress)
    }

    /// The end of a delete or apply that committed itself with a first step of freeing
    /// ([`Core::commit_with_free_step`]): frees what is `left`, or just releases the blocks.
    pub(super) fn finish_drop(
        &self,
        left: bool,
        freed: u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<()> {
        if left {
            return self.free_rest(freed, progress);
        }
        self.core.release_space();
        progress(freed * BS);
        Ok(())
    }

    /// [`Store::free_dropped`] with `freed` blocks already counted.
    pub(super) fn free_rest(&self, mut freed: u64, progress: &mut dyn FnMut(u64)) -> Result<()> {
        loop {
            // The last step's commit also resets the journal, so freed blocks go back to the
            // host now, as a delete promises.
            let ((), left) = {
                let _g = self.shared();
                self.core.commit_with_free_step(&mut freed, |_| Ok(()))?
            };
            if !left {
                break;
            }
            progress(freed * BS);
            self.core.try_release_space();
        }
        self.core.release_space();
        progress(freed * BS);
        Ok(())
    }

    /// Trees waiting to be freed (see [`Store::free_dropped`]).
    pub fn dropped_trees(&self) -> usize {
        self.state().dropped.len()
    }

    /// Commits once enough metadata is dirty: in the background past `dirty_limit`, here past
    /// twice that (or past the limit without a background committer).
    pub(super) fn maybe_commit(&self) -> Result<()> {
        let (dirty, limit) = {
            let st = self.state();
            (st.meta.cache.dirty_count(), st.opts.dirty_limit)
        };
        match &self.committer {
            Some(c) if dirty > limit && dirty <= 2 * limit => c.wake(),
            _ if dirty > limit => self.flush()?,
            _ => {}
        }
        Ok(())
    }
}

/// A transaction sealed by a concurrent commit: the page cache epoch it covers and its pages.
pub(super) type Sealed = (u64, Vec<(u64, Arc<Page>)>);

/// Makes one transaction durable: the data file is synced first (every data block the pages point
/// to is on disk), then the page images are journaled and synced (the commit point), then written
/// in place, coalesced into runs of adjacent blocks (no sync: the journal covers them).
pub(super) fn write_transaction<P: std::ops::Deref<Target = Page>>(
    dev: &dyn Device,
    path: &str,
    journal: &mut Journal,
    pages: &[(u64, P)],
) -> Result<()> {
    dev.sync().map_err(Error::io("sync", path))?;
    let list: Vec<(u64, &Page)> = pages.iter().map(|(b, p)| (*b, &**p)).collect();
    journal.append(&list)?;
    let mut i = 0;
    while i < list.len() {
        let mut j = i + 1;
        while j < list.len() && list[j].0 == list[j - 1].0 + 1 {
            j += 1;
        }
        let mut buf = Vec::with_capacity((j - i) * BLOCK_SIZE);
        for (_, p) in &list[i..j] {
            buf.extend_from_slice(&p[..]);
        }
        dev.write_at(&buf, list[i].0 * BS)
            .map_err(Error::io("metadata write", path))?;
        i = j;
    }
    Ok(())
}
