//! Taking a VM checkpoint, of a stopped VM or a running one, as one transaction: a [`Pending`]
//! record first, then the parts, then the record completed. Until then every way out (an error,
//! a panic, a future dropped half-way) removes the parts made so far and the record, so a
//! half-made checkpoint never shows; a crash is rolled back at the next start instead
//! ([`VmStore::roll_back_pending`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::Store;
use serde_json::json;
use tracing::{info, warn};

use super::blocking;
use super::record::{
    abandon, begin, drop_disk_checkpoints, finish, persist_disks, state_volume, take_disks,
    CheckpointKind, Consistency, Timings, VmCheckpoint,
};
use super::state::store_state;
use crate::guest_agent::{AgentError, GuestAgent};
use crate::runtime::{self, Runtime};
use crate::spec::VmStore;
use crate::VmError;

/// Prefix of checkpoints created without a name.
pub const UNNAMED_PREFIX: &str = "cp";
/// Prefix of the checkpoints an apply takes of the state it replaces.
pub const AUTOMATIC_PREFIX: &str = "auto";

/// What checkpoint of a running VM to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Disks, memory and device state.
    Standard,
    /// Disks only, quiesced through the guest agent when one answers; `quiesce` makes that a
    /// requirement.
    DiskOnly {
        /// Fail rather than take a crash-consistent checkpoint.
        quiesce: bool,
    },
}

/// How long the guest agent gets to answer its first command: it answers in milliseconds when
/// it runs; when it does not, a disk-only checkpoint falls back to crash-consistent this late.
const AGENT_ANSWER: Duration = Duration::from_secs(3);
/// How long freezing may take: the guest flushes its dirty data first.
const AGENT_FREEZE: Duration = Duration::from_secs(60);

/// A name for a new checkpoint of a VM, free on the VM and on every disk.
pub fn new_checkpoint_name(
    store: &Store,
    vms: &VmStore,
    vm: &str,
    prefix: &str,
) -> Result<String, VmError> {
    let mut taken: Vec<String> = vms.checkpoints(vm)?.into_iter().map(|c| c.name).collect();
    for d in vms.get(vm)?.disks {
        taken.extend(store.list_checkpoints(&d)?.into_iter().map(|c| c.name));
    }
    Ok(cairn_engine::names::timestamp_name(
        prefix,
        crate::now_ms(),
        &taken,
    ))
}

/// A VM checkpoint being taken. Its record is pending; [`Pending::finish`] completes it, and
/// dropping it unfinished removes whatever parts exist and the record.
pub struct Pending {
    vms: VmStore,
    store: Arc<Store>,
    cp: Option<VmCheckpoint>,
    disks_taken: bool,
    state_stored: bool,
}

impl Pending {
    /// Records a pending checkpoint `name` of VM `vm` (nothing else is touched yet).
    pub fn begin(
        vms: &VmStore,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        description: Option<&str>,
        running: bool,
    ) -> Result<Pending, VmError> {
        let spec = vms.get(vm)?;
        let cp = begin(
            vms,
            store,
            &spec,
            name,
            description,
            running,
            crate::now_ms(),
        )?;
        Ok(Pending {
            vms: vms.clone(),
            store: store.clone(),
            cp: Some(cp),
            disks_taken: false,
            state_stored: false,
        })
    }

    /// The record as it stands.
    pub fn cp(&self) -> &VmCheckpoint {
        self.cp
            .as_ref()
            .expect("a pending checkpoint has its record until finished")
    }

    fn cp_mut(&mut self) -> &mut VmCheckpoint {
        self.cp
            .as_mut()
            .expect("a pending checkpoint has its record until finished")
    }

    /// Completes the record and makes it the VM's parent checkpoint.
    pub fn finish(mut self) -> Result<VmCheckpoint, VmError> {
        let done = finish(&self.vms, self.cp().clone())?;
        self.cp = None;
        Ok(done)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(cp) = self.cp.take() else {
            return;
        };
        // Only parts this checkpoint made: a disk checkpoint of the same name made meanwhile by
        // someone else (which made taking the disks fail) stays.
        let mut parts = match self.disks_taken {
            true => cp.disks.clone(),
            false => Vec::new(),
        };
        if self.state_stored {
            parts.push(state_volume(&cp.vm));
        }
        if let Err(e) = drop_disk_checkpoints(&self.store, &parts, &cp.name) {
            warn!(
                "vm {}: removing the parts of unfinished checkpoint {}: {e}",
                cp.vm, cp.name
            );
        }
        abandon(&self.vms, &cp);
    }
}

/// Takes a checkpoint of a stopped VM: every disk, at rest.
pub fn take_stopped(
    vms: &VmStore,
    store: &Arc<Store>,
    vm: &str,
    name: &str,
    description: Option<&str>,
    automatic: bool,
) -> Result<VmCheckpoint, VmError> {
    let mut pending = Pending::begin(vms, store, vm, name, description, false)?;
    pending.cp_mut().automatic = automatic;
    take_disks(store, pending.cp())?;
    pending.disks_taken = true;
    persist_disks(store, pending.cp())?;
    pending.finish()
}

impl Runtime {
    /// A checkpoint of every disk of a running VM at one instant: the guest is paused (QEMU
    /// drains and flushes its I/O on `stop`), the disks are checkpointed (O(1) each), and, for a
    /// standard checkpoint, QEMU starts a background snapshot of memory and device state at that
    /// same instant; the guest resumes at once while QEMU writes the snapshot, which then moves
    /// into the VM's state volume. A disk-only checkpoint first has the guest agent (if one
    /// answers) freeze the guest's file systems, and thaws them as soon as the guest runs again.
    /// `progress` hears the bytes of memory saved so far.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_checkpoint(
        &self,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        description: Option<String>,
        how: Take,
        automatic: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<VmCheckpoint, VmError> {
        let with_memory = matches!(how, Take::Standard);
        let vms = self.definitions().clone();
        let mut pending = {
            let (vms, store) = (vms.clone(), store.clone());
            let (vm, name) = (vm.to_string(), name.to_string());
            blocking(move || Pending::begin(&vms, &store, &vm, &name, description.as_deref(), true))
                .await?
        };
        pending.cp_mut().automatic = automatic;
        let qmp = self.qmp(vm)?;
        let state_file = vms.vm_dir(vm).join(format!("state-{name}.tmp"));
        if with_memory {
            runtime::ensure_snapshot_capabilities(&qmp).await?;
        }
        let t = Instant::now();
        let prepared = match with_memory {
            true => {
                let _ = std::fs::remove_file(&state_file);
                Some(runtime::prepare_snapshot(&qmp, &state_file).await?)
            }
            false => None,
        };
        let mut frozen = None;
        if let Take::DiskOnly { quiesce } = how {
            match self.freeze_guest(vm).await {
                Ok((agent, n, already)) => {
                    let cp = pending.cp_mut();
                    cp.consistency = Some(Consistency::Application);
                    cp.consistency_note = Some(if already {
                        "the guest's file systems were already frozen; left frozen".into()
                    } else {
                        format!(
                            "the guest agent froze {n} file system{}",
                            if n == 1 { "" } else { "s" }
                        )
                    });
                    // Cairn thaws only what it froze.
                    frozen = (!already).then_some((agent, Instant::now()));
                }
                Err(e) if quiesce => {
                    return Err(VmError::State(format!(
                        "cannot quiesce VM '{vm}': {e}; checkpoint '{name}' was not taken (without --quiesce, Cairn takes a crash-consistent one)"
                    )));
                }
                Err(e) => {
                    let cp = pending.cp_mut();
                    cp.consistency = Some(Consistency::Crash);
                    cp.consistency_note = Some(e.to_string());
                }
            }
        }
        let pause = Instant::now();
        if let Err(e) = qmp.execute("stop", json!({})).await {
            if let Some((mut agent, _)) = frozen {
                let _ = thaw_guest(vm, &mut agent).await;
            }
            if let Some(file) = prepared {
                runtime::discard_snapshot(&qmp, file).await;
            }
            return Err(e.into());
        }
        let taken = {
            let (store, cp) = (store.clone(), pending.cp().clone());
            blocking(move || take_disks(&store, &cp)).await
        };
        pending.disks_taken = taken.is_ok();
        let snapshot = match (taken.is_ok(), prepared) {
            (true, Some(file)) => Some(match runtime::start_snapshot(&qmp, &file).await {
                Ok(()) => Ok(file),
                Err(e) => {
                    runtime::discard_snapshot(&qmp, file).await;
                    Err(e)
                }
            }),
            (false, Some(file)) => {
                runtime::discard_snapshot(&qmp, file).await;
                None
            }
            (_, None) => None,
        };
        // Resume whatever happened: a failed checkpoint must not leave the guest paused.
        let resumed = qmp.execute("cont", json!({})).await;
        let paused = pause.elapsed();
        if let Err(e) = resumed {
            warn!("vm {vm}: could not resume after checkpoint {name}: {e}");
        }
        let mut frozen_for = None;
        if let Some((mut agent, since)) = frozen {
            let thawed = thaw_guest(vm, &mut agent).await;
            frozen_for = Some(since.elapsed());
            if let Err(e) = thawed {
                let cp = pending.cp_mut();
                cp.consistency_note = Some(format!(
                    "{}; but thawing failed ({e}): the guest's file systems may still be frozen",
                    cp.consistency_note.take().unwrap_or_default()
                ));
            }
        }
        // The disk checkpoints are durable from here: one commit, with the guest running again.
        let taken = match taken {
            Ok(()) => {
                let (store, cp) = (store.clone(), pending.cp().clone());
                blocking(move || persist_disks(&store, &cp)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = taken {
            if let Some(Ok(file)) = snapshot {
                let _ = qmp.execute("migrate_cancel", json!({})).await;
                let _ = runtime::wait_migration(&qmp, Duration::from_secs(30)).await;
                runtime::discard_snapshot(&qmp, file).await;
            }
            return Err(e);
        }
        let mut timings = Timings {
            frozen_us: frozen_for.map(|f| f.as_micros() as u64),
            paused_us: paused.as_micros() as u64,
            ..Timings::default()
        };
        if let Some(started) = snapshot {
            self.save_memory(store, &mut pending, started, &mut timings, progress)
                .await?;
            info!(
                "vm {vm}: standard checkpoint {name}: guest paused {paused:?} for the disks, QEMU reports {} ms of snapshot downtime, {} bytes of state, {:?} in all",
                timings.snapshot_downtime_ms.unwrap_or(0),
                pending.cp().state_len.unwrap_or(0),
                t.elapsed()
            );
        } else {
            info!(
                "vm {vm}: checkpoint {name} of {} disk(s), {}, guest paused {paused:?}{}",
                pending.cp().disks.len(),
                pending.cp().kind_summary(),
                frozen_for
                    .map(|f| format!(", file systems frozen {f:?}"))
                    .unwrap_or_default()
            );
        }
        timings.total_us = t.elapsed().as_micros() as u64;
        pending.cp_mut().timings = Some(timings);
        blocking(move || pending.finish()).await
    }

    /// A standard checkpoint's second half, with the guest running again: waits for QEMU's
    /// snapshot, re-lays it with fixed page offsets (so unchanged memory is shared between
    /// checkpoints) and moves it into the state volume.
    async fn save_memory(
        &self,
        store: &Arc<Store>,
        pending: &mut Pending,
        started: Result<runtime::SnapshotFile, VmError>,
        timings: &mut Timings,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<(), VmError> {
        let (vm, name) = (pending.cp().vm.clone(), pending.cp().name.clone());
        let qmp = self.qmp(&vm)?;
        let dir = self.definitions().vm_dir(&vm);
        let state_file = dir.join(format!("state-{name}.tmp"));
        let phase = Instant::now();
        let done = match started {
            Ok(file) => {
                let ten_minutes = Duration::from_secs(600);
                let r = runtime::wait_migration_reporting(&qmp, ten_minutes, progress).await;
                runtime::finish_snapshot(&qmp, file).await;
                r
            }
            Err(e) => Err(e),
        };
        timings.snapshot_downtime_ms = done.as_ref().ok().and_then(|r| r["downtime"].as_u64());
        if let Err(e) = done {
            let _ = std::fs::remove_file(&state_file);
            return Err(e);
        }
        timings.snapshot_us = Some(phase.elapsed().as_micros() as u64);
        let phase = Instant::now();
        let mapped = dir.join(format!("state-{name}.mapped"));
        let converted = self.to_mapped_ram(&vm, &name, &state_file, &mapped).await;
        let _ = std::fs::remove_file(&state_file);
        if let Err(e) = converted {
            let _ = std::fs::remove_file(&mapped);
            return Err(e);
        }
        timings.relayout_us = Some(phase.elapsed().as_micros() as u64);
        let phase = Instant::now();
        // From here the state volume may hold a checkpoint of this name: it is a part now.
        pending.state_stored = true;
        let stored = {
            let (store, cp, file) = (store.clone(), pending.cp().clone(), mapped.clone());
            blocking(move || store_state(&store, &cp, &file)).await
        };
        let _ = std::fs::remove_file(&mapped);
        timings.store_us = Some(phase.elapsed().as_micros() as u64);
        let cp = pending.cp_mut();
        cp.kind = CheckpointKind::Standard;
        cp.state_len = Some(stored?);
        Ok(())
    }

    /// Flushes and freezes the guest's file systems through its agent. Returns the connection
    /// (to thaw through), how many were frozen, and whether they were frozen already (by someone
    /// else, whose freeze Cairn leaves in place).
    async fn freeze_guest(&self, vm: &str) -> Result<(GuestAgent, u64, bool), AgentError> {
        let mut agent = self.guest_agent(vm, AGENT_ANSWER).await?;
        if agent.is_frozen(AGENT_ANSWER).await? {
            return Ok((agent, 0, true));
        }
        match agent.freeze(AGENT_FREEZE).await {
            Ok(n) => Ok((agent, n, false)),
            Err(e) => {
                // A freeze that failed part-way, or is still running in the guest, may leave
                // some file systems frozen: thaw after it (the agent runs commands in order).
                if let Err(t) = agent.thaw(AGENT_FREEZE).await {
                    warn!("vm {vm}: thawing after a failed freeze: {t}");
                }
                Err(e)
            }
        }
    }
}

/// Thaws what [`Runtime::freeze_guest`] froze; a guest left frozen blocks on its next write, so
/// this retries before giving up.
async fn thaw_guest(vm: &str, agent: &mut GuestAgent) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        match agent.thaw(AGENT_FREEZE).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                warn!("vm {vm}: thawing the guest's file systems: {e}");
                last = e.to_string();
            }
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;

    fn store_with_vm() -> (tempfile::TempDir, Arc<Store>, VmStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path(), cairn_engine::Options::default()).expect("init");
        store.create_volume("d1", 1 << 20).expect("d1");
        store.create_volume("d2", 1 << 20).expect("d2");
        let vms = VmStore::new(dir.path());
        vms.save(&VmSpec {
            name: "v".into(),
            memory: 64 << 20,
            cpus: 1,
            disks: vec!["d1".into(), "d2".into()],
            kernel: None,
            initrd: None,
            append: None,
            net: None,
            mac: crate::spec::fresh_mac(),
            uuid: crate::spec::fresh_uuid(),
            accel: None,
            created_ms: 0,
            parent: None,
        })
        .expect("vm");
        (dir, Arc::new(store), vms)
    }

    fn names(store: &Store, volume: &str) -> Vec<String> {
        let cps = store.list_checkpoints(volume).expect("list");
        cps.into_iter().map(|c| c.name).collect()
    }

    #[test]
    fn an_unfinished_checkpoint_leaves_nothing_behind() {
        let (_dir, store, vms) = store_with_vm();
        // Dropped after its disks were taken: the parts and the record go.
        let mut pending = Pending::begin(&vms, &store, "v", "a", None, false).expect("begin");
        take_disks(&store, pending.cp()).expect("take");
        pending.disks_taken = true;
        assert_eq!(names(&store, "d1"), ["a"]);
        let records = vms.checkpoints("v").expect("records");
        assert!(records.len() == 1 && records[0].pending, "{records:?}");
        drop(pending);
        assert!(names(&store, "d1").is_empty() && names(&store, "d2").is_empty());
        assert!(vms.checkpoints("v").expect("records").is_empty());

        // Dropped before: a checkpoint of the same name someone else made on a disk stays.
        let pending = Pending::begin(&vms, &store, "v", "b", None, false).expect("begin");
        store.create_checkpoint("d2", "b", None).expect("theirs");
        assert!(take_disks(&store, pending.cp()).is_err());
        drop(pending);
        assert_eq!(names(&store, "d2"), ["b"]);
        assert!(names(&store, "d1").is_empty());
        assert!(vms.checkpoints("v").expect("records").is_empty());

        // Finished: everything stays, and the VM now hangs on it.
        let cp = take_stopped(&vms, &store, "v", "c", Some("kept"), false).expect("take");
        assert!(!cp.pending);
        assert_eq!(names(&store, "d1"), ["c"]);
        assert_eq!(vms.get("v").expect("vm").parent.as_deref(), Some("c"));
    }
}
