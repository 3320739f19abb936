//! A running VM's checkpoint, in phases so that several VMs can be paused together (a group
//! checkpoint): [`Runtime::prepare_checkpoint`] (record, memory snapshot set up, guest frozen),
//! [`Taking::pause`], [`Taking::take_paused`] (disks, memory snapshot started), [`Taking::resume`]
//! (guest running, thawed), [`Runtime::complete_checkpoint`] (disks durable, memory saved,
//! record completed). [`Runtime::take_checkpoint`] runs them for one VM. A [`Taking`] dropped at
//! any point removes what it made (its [`Pending`]), and one dropped while the guest is paused
//! is resumed first by [`Taking::resume`], which every caller runs whatever happened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::Store;
use serde_json::json;
use tracing::{info, warn};

use super::blocking;
use super::record::{
    persist_disks, take_disks, CheckpointKind, Consistency, Timings, VmCheckpoint,
};
use super::state::store_state;
use super::take::{Pending, Take, AGENT_ANSWER, AGENT_FREEZE};
use crate::guest_agent::{AgentError, GuestAgent};
use crate::qmp::Qmp;
use crate::runtime::{self, Runtime, SnapshotFile};
use crate::VmError;

/// One running VM's checkpoint between its phases.
pub struct Taking {
    pending: Pending,
    qmp: Arc<Qmp>,
    how: Take,
    started: Instant,
    prepared: Option<SnapshotFile>,
    frozen: Option<(GuestAgent, Instant)>,
    frozen_for: Option<Duration>,
    /// When the guest was paused, while it is.
    paused_at: Option<Instant>,
    paused: Duration,
    /// Whether the disks were checkpointed (not yet durable).
    taken: Option<Result<(), VmError>>,
    snapshot: Option<Result<SnapshotFile, VmError>>,
}

impl Taking {
    /// The VM.
    pub fn vm(&self) -> &str {
        &self.pending.cp().vm
    }

    /// How long the guest was paused.
    pub fn paused(&self) -> Duration {
        self.paused
    }

    /// Pauses the guest (QEMU drains and flushes its I/O on `stop`). On failure nothing is left
    /// frozen or half set up.
    pub async fn pause(&mut self) -> Result<(), VmError> {
        self.paused_at = Some(Instant::now());
        if let Err(e) = self.qmp.execute("stop", json!({})).await {
            self.paused_at = None;
            self.undo().await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Thaws the guest and drops the memory snapshot set up, after a failure.
    async fn undo(&mut self) {
        let vm = self.vm().to_string();
        if let Some((mut agent, _)) = self.frozen.take() {
            let _ = thaw_guest(&vm, &mut agent).await;
        }
        if let Some(file) = self.prepared.take() {
            runtime::discard_snapshot(&self.qmp, file).await;
        }
    }

    /// With the guest paused: checkpoints the disks (O(1) each, durable at completion) and
    /// starts the memory snapshot at this instant.
    pub async fn take_paused(&mut self, store: &Arc<Store>) {
        let taken = {
            let (store, cp) = (store.clone(), self.pending.cp().clone());
            blocking(move || take_disks(&store, &cp)).await
        };
        self.pending.disks_taken = taken.is_ok();
        self.snapshot = match (taken.is_ok(), self.prepared.take()) {
            (true, Some(file)) => Some(match runtime::start_snapshot(&self.qmp, &file).await {
                Ok(()) => Ok(file),
                Err(e) => {
                    runtime::discard_snapshot(&self.qmp, file).await;
                    Err(e)
                }
            }),
            (false, Some(file)) => {
                runtime::discard_snapshot(&self.qmp, file).await;
                None
            }
            (_, None) => None,
        };
        self.taken = Some(taken);
    }

    /// Resumes the guest if it is paused (whatever happened: a failed checkpoint must not leave
    /// it paused), then thaws its file systems.
    pub async fn resume(&mut self) {
        let vm = self.vm().to_string();
        if let Some(at) = self.paused_at.take() {
            let resumed = self.qmp.execute("cont", json!({})).await;
            self.paused = at.elapsed();
            if let Err(e) = resumed {
                warn!(
                    "vm {vm}: could not resume after checkpoint {}: {e}",
                    self.pending.cp().name
                );
            }
        }
        if let Some((mut agent, since)) = self.frozen.take() {
            let thawed = thaw_guest(&vm, &mut agent).await;
            self.frozen_for = Some(since.elapsed());
            if let Err(e) = thawed {
                let cp = self.pending.cp_mut();
                cp.consistency_note = Some(format!(
                    "{}; but thawing failed ({e}): the guest's file systems may still be frozen",
                    cp.consistency_note.take().unwrap_or_default()
                ));
            }
        }
    }
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
        let mut t = self
            .prepare_checkpoint(store, vm, name, description, how, automatic)
            .await?;
        t.pause().await?;
        t.take_paused(store).await;
        t.resume().await;
        self.complete_checkpoint(store, t, progress).await
    }

    /// The first phase: the pending record, the memory snapshot set up (standard), the guest's
    /// file systems frozen (disk-only, when its agent answers).
    pub async fn prepare_checkpoint(
        &self,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        description: Option<String>,
        how: Take,
        automatic: bool,
    ) -> Result<Taking, VmError> {
        let started = Instant::now();
        let vms = self.definitions().clone();
        let mut pending = {
            let (vms, store) = (vms.clone(), store.clone());
            let (vm, name) = (vm.to_string(), name.to_string());
            blocking(move || Pending::begin(&vms, &store, &vm, &name, description.as_deref(), true))
                .await?
        };
        pending.cp_mut().automatic = automatic;
        let qmp = self.qmp(vm)?;
        let prepared = match how {
            Take::Standard => {
                runtime::ensure_snapshot_capabilities(&qmp).await?;
                let state_file = vms.vm_dir(vm).join(format!("state-{name}.tmp"));
                let _ = std::fs::remove_file(&state_file);
                Some(runtime::prepare_snapshot(&qmp, &state_file).await?)
            }
            Take::DiskOnly { .. } => None,
        };
        let mut t = Taking {
            pending,
            qmp,
            how,
            started,
            prepared,
            frozen: None,
            frozen_for: None,
            paused_at: None,
            paused: Duration::ZERO,
            taken: None,
            snapshot: None,
        };
        if let Take::DiskOnly { quiesce } = how {
            match self.freeze_guest(vm).await {
                Ok((agent, n, already)) => {
                    let cp = t.pending.cp_mut();
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
                    t.frozen = (!already).then_some((agent, Instant::now()));
                }
                Err(e) if quiesce => {
                    return Err(VmError::State(format!(
                        "cannot quiesce VM '{vm}': {e}; checkpoint '{name}' was not taken (without --quiesce, Cairn takes a crash-consistent one)"
                    )));
                }
                Err(e) => {
                    let cp = t.pending.cp_mut();
                    cp.consistency = Some(Consistency::Crash);
                    cp.consistency_note = Some(e.to_string());
                }
            }
        }
        Ok(t)
    }

    /// The last phase, with the guest running again: the disk checkpoints made durable (one
    /// commit), the memory snapshot saved (standard), the record completed.
    pub async fn complete_checkpoint(
        &self,
        store: &Arc<Store>,
        mut t: Taking,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<VmCheckpoint, VmError> {
        let (vm, name) = (t.vm().to_string(), t.pending.cp().name.clone());
        let taken = match t.taken.take() {
            Some(Ok(())) => {
                let (store, cp) = (store.clone(), t.pending.cp().clone());
                blocking(move || persist_disks(&store, &cp)).await
            }
            Some(Err(e)) => Err(e),
            None => Err(VmError::Internal(format!(
                "checkpoint {vm}@{name} completed before its disks were taken"
            ))),
        };
        if let Err(e) = taken {
            if let Some(Ok(file)) = t.snapshot.take() {
                let _ = t.qmp.execute("migrate_cancel", json!({})).await;
                let _ = runtime::wait_migration(&t.qmp, Duration::from_secs(30)).await;
                runtime::discard_snapshot(&t.qmp, file).await;
            }
            return Err(e);
        }
        let mut timings = Timings {
            frozen_us: t.frozen_for.map(|f| f.as_micros() as u64),
            paused_us: t.paused.as_micros() as u64,
            ..Timings::default()
        };
        let paused = t.paused;
        if let Some(started) = t.snapshot.take() {
            self.save_memory(store, &mut t.pending, started, &mut timings, progress)
                .await?;
            info!(
                "vm {vm}: standard checkpoint {name}: guest paused {paused:?} for the disks, QEMU reports {} ms of snapshot downtime, {} bytes of state, {:?} in all",
                timings.snapshot_downtime_ms.unwrap_or(0),
                t.pending.cp().state_len.unwrap_or(0),
                t.started.elapsed()
            );
        } else {
            info!(
                "vm {vm}: checkpoint {name} of {} disk(s), {}, guest paused {paused:?}{}",
                t.pending.cp().disks.len(),
                t.pending.cp().kind_summary(),
                t.frozen_for
                    .map(|f| format!(", file systems frozen {f:?}"))
                    .unwrap_or_default()
            );
        }
        debug_assert!(matches!(t.how, Take::Standard) || t.pending.cp().state_len.is_none());
        timings.total_us = t.started.elapsed().as_micros() as u64;
        t.pending.cp_mut().timings = Some(timings);
        let pending = t.pending;
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
