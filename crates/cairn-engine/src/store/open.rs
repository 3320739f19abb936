//! Opening, creating and formatting a store, its gates, and the flush that makes every
//! acknowledged write durable.

use super::*;

impl Store {
    /// Creates a new store in `dir` (created if missing) and opens it.
    pub fn init(dir: &Path, opts: Options) -> Result<Store> {
        std::fs::create_dir_all(dir)
            .map_err(Error::io("create directory", dir.display().to_string()))?;
        let lockf = lock_dir(dir)?;
        let data_path = dir.join(DATA_FILE);
        if data_path.exists() {
            return Err(Error::StoreExists(dir.display().to_string()));
        }
        let data = open_file(&data_path, true, FileAccess::data(&opts))?;
        let journal = open_file(&dir.join(JOURNAL_FILE), true, FileAccess::PLAIN)?;
        Self::format(&*data, &data_path.display().to_string())?;
        let mut s = Self::open_devices(data, journal, opts, &dir.display().to_string())?;
        s.dir = Some(dir.to_path_buf());
        s._lock = Some(lockf);
        Ok(s)
    }

    /// Opens the store in `dir`, recovering from a crash if needed.
    pub fn open(dir: &Path, opts: Options) -> Result<Store> {
        let data_path = dir.join(DATA_FILE);
        if !data_path.exists() {
            return Err(Error::NoStore(dir.display().to_string()));
        }
        let lockf = lock_dir(dir)?;
        let data = open_file(&data_path, false, FileAccess::data(&opts))?;
        let journal = open_file(&dir.join(JOURNAL_FILE), true, FileAccess::PLAIN)?;
        let mut s = Self::open_devices(data, journal, opts, &dir.display().to_string())?;
        s.dir = Some(dir.to_path_buf());
        s._lock = Some(lockf);
        Ok(s)
    }

    /// Writes an empty store's first blocks to a data device (the journal starts empty).
    pub fn format(data: &dyn Device, path: &str) -> Result<()> {
        Self::format_layout(data, path, Layout::Clusters)
    }

    /// [`Store::format`] in a given layout. Format 1 ([`Layout::Groups`]) is what builds before
    /// format 2 wrote; tests create such stores to check that they keep working.
    pub fn format_layout(data: &dyn Device, path: &str, layout: Layout) -> Result<()> {
        let sb = Superblock {
            catalog_root: 0,
            catalog_depth: 1,
            next_id: 1,
            high_water: layout.first_data_block(),
            alloc_cursor: layout.first_data_block(),
            generation: 1,
            allocated: u64::from(layout.counts_superblock()),
            layout,
        };
        if layout.counts_superblock() {
            // Format 1 counts the superblock as allocated, in group 0's refcount page (block 0).
            let mut rc = new_page(PageKind::Refcount, 0);
            set_refcount(&mut rc, layout.refcount_slot(SUPERBLOCK).1, 1);
            crate::format::seal(&mut rc);
            data.write_at(&rc[..], 0)
                .map_err(Error::io("write", path))?;
        }
        // In format 2 nothing is allocated yet, so no refcount page exists: the first
        // allocation creates cluster 0's first one (`Meta::find_free`).
        data.write_at(&sb.encode()[..], SUPERBLOCK * BS)
            .map_err(Error::io("write", path))?;
        data.sync().map_err(Error::io("sync", path))
    }

    /// Opens a store on explicit devices (used for crash simulation); replays the journal first.
    pub fn open_devices(
        data: Arc<dyn Device>,
        journal_dev: Arc<dyn Device>,
        opts: Options,
        path: &str,
    ) -> Result<Store> {
        let dpath = format!("{path}/{DATA_FILE}");
        let journal = recover(&*data, journal_dev.clone(), path)?;
        let mut page = Box::new([0u8; BLOCK_SIZE]);
        data.read_at(&mut page[..], SUPERBLOCK * BS)
            .map_err(Error::io("read superblock", &dpath))?;
        let sb = Superblock::decode(&page, path)?;
        let allocated_end = data.len().map_err(Error::io("stat", &dpath))?;
        let meta = Meta {
            allocated_end,
            prealloc: opts.prealloc_bytes.max(BS) / BS * BS,
            dev: data.clone(),
            path: dpath,
            cache: PageCache::new(opts.cache_pages, path),
            sb,
            quarantine: Default::default(),
            frees: 0,
            ready: Vec::new(),
            releasing: None,
            release_tokens: 0,
            reserved: Default::default(),
            decremented: Default::default(),
            decremented_sealed: Default::default(),
            data_written: false,
            to_drop: Vec::new(),
        };
        let mut st = State {
            meta,
            journal: Arc::new(Mutex::new(journal)),
            opts,
            volumes: BTreeMap::new(),
            checkpoints: BTreeMap::new(),
            dropped: BTreeMap::new(),
            volume_ids: FxHashMap::default(),
            checkpoint_ids: BTreeMap::new(),
            dirty_records: BTreeSet::new(),
            deleted_records: BTreeSet::new(),
            unflushed_since: None,
            poisoned: Arc::new(AtomicBool::new(false)),
            stats: Stats::default(),
        };
        st.load_catalog()?;
        let background = st.opts.background_commits;
        let writer_threads = if st.opts.write_behind {
            WRITE_BEHIND_THREADS
        } else {
            0
        };
        let pending = !st.dropped.is_empty();
        let core = Arc::new(Core {
            poisoned: st.poisoned.clone(),
            state: Mutex::new(st),
            commit_lock: Mutex::new(()),
            gate: RwLock::new(()),
            background_error: Mutex::new(None),
            write_behind: WriteBehind::new(),
        });
        let mut writers = Vec::new();
        for _ in 0..writer_threads {
            let (c, d) = (core.clone(), data.clone());
            writers.push(
                std::thread::Builder::new()
                    .name("cairn-write".into())
                    .spawn(move || c.write_behind.run(&c, &*d))
                    .map_err(Error::io("start the write-behind thread", "store"))?,
            );
        }
        let committer = if background {
            let c = Committer::start(core.clone())?;
            if pending {
                c.wake();
            }
            Some(c)
        } else {
            None
        };
        Ok(Store {
            core,
            committer,
            writers,
            grow_lock: Mutex::new(()),
            volume_gates: Mutex::new(FxHashMap::default()),
            data,
            journal_dev,
            stripes: (0..64).map(|_| Mutex::new(())).collect(),
            dir: None,
            _lock: None,
        })
    }

    /// Runs `f` on the store's metadata under the state lock (unit tests of `meta`).
    #[cfg(test)]
    pub(crate) fn with_meta<R>(&self, f: impl FnOnce(&mut Meta) -> R) -> R {
        f(&mut self.state().meta)
    }

    /// Counters since the store was opened.
    pub fn stats(&self) -> Stats {
        let mut s = self.state().stats;
        s.writes_behind = self.core.write_behind.queued();
        s
    }

    /// The clock the store takes creation times from.
    pub fn clock(&self) -> crate::Clock {
        self.state().opts.clock.clone()
    }

    /// The directory this store lives in, if it was opened from one.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub(super) fn state(&self) -> MutexGuard<'_, State> {
        self.core.state()
    }

    pub(super) fn exclusive(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        write_lock(&self.core.gate)
    }

    pub(super) fn shared(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.core.shared()
    }
    /// After a failed operation left the in-memory state untrusted: wait until nothing is in
    /// flight and reload the durable state (what a crash at that moment would have left).
    pub(super) fn heal(&self) -> Result<()> {
        if !self.core.poisoned.load(Ordering::SeqCst) {
            return Ok(());
        }
        let _g = self.exclusive();
        self.core.write_behind.wait_all();
        let mut st = self.state();
        if st.poisoned.load(Ordering::SeqCst) {
            let unflushed = st.has_changes();
            st.reload()?;
            // Writes acknowledged since the last flush are gone: the next flush must not say
            // they are durable (as fsync reports a writeback error once).
            if unflushed {
                lock(&self.core.background_error).get_or_insert(Error::Invalid(
                    "an operation failed midway and the store went back to its last commit: writes since the last flush were discarded".into(),
                ));
            }
        }
        Ok(())
    }

    /// The gate of a volume, looked up by name.
    pub(super) fn volume_gate(&self, name: &str) -> Result<(u64, Arc<RwLock<()>>)> {
        self.heal()?;
        let id = self.state().volume_id(name)?;
        let g = lock(&self.volume_gates)
            .entry(id)
            .or_insert_with(|| Arc::new(RwLock::new(())))
            .clone();
        Ok((id, g))
    }

    /// Makes every write acknowledged so far durable.
    pub fn flush(&self) -> Result<()> {
        self.core.write_behind.wait_all();
        self.heal()?;
        if let Some(e) = lock(&self.core.background_error).take() {
            return Err(e);
        }
        self.core.flush().map_err(|e| {
            // A background commit that failed just before this one (and made it fail) has
            // recorded why by now: that is the error to report. The reload comes now, while
            // this flush reports the loss, so that the next flush does not report it again.
            let earlier = lock(&self.core.background_error).take();
            let _ = self.heal();
            lock(&self.core.background_error).take();
            earlier.unwrap_or(e)
        })
    }
}
