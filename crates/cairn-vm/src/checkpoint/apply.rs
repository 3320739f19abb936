//! Making a VM a checkpoint's state. Everything the apply needs is checked, and a standard
//! checkpoint's memory written out for QEMU, before anything stops; then the state being replaced
//! is kept as a checkpoint (unless told otherwise), QEMU is stopped, the disks are rewound, and
//! the VM resumes from the saved memory (standard) or boots cold (disk-only, if it was running).
//! If a step after QEMU stopped fails, the VM is put back to the state kept first.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_engine::Store;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::blocking;
use super::record::{apply_disks, check_applicable, disks_changed, CheckpointKind, VmCheckpoint};
use super::state::load_state;
use super::take::{new_checkpoint_name, take_stopped, Take, AUTOMATIC_PREFIX};
use crate::runtime::Runtime;
use crate::spec::VmStore;
use crate::VmError;

/// What became of a VM when a checkpoint was applied to it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmOutcome {
    /// It was running and now runs from the checkpoint's memory.
    ResumedFromMemory,
    /// It was stopped and now runs from the checkpoint's memory.
    StartedFromMemory,
    /// It was running and was booted cold from the checkpoint's disks.
    ColdBoot,
    /// It was stopped and stays stopped, its disks rewound.
    Stopped,
}

impl std::fmt::Display for VmOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VmOutcome::ResumedFromMemory => "resumed from memory",
            VmOutcome::StartedFromMemory => "started, resumed from memory",
            VmOutcome::ColdBoot => "cold boot",
            VmOutcome::Stopped => "stopped",
        })
    }
}

/// The checkpoint an apply takes of the state it replaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeptState {
    /// Its name.
    pub name: String,
    /// Whether Cairn chose to take it (and its name) rather than the user.
    pub automatic: bool,
}

impl KeptState {
    /// What an apply keeps of the state it replaces: the checkpoint `save_current` names;
    /// nothing when told to discard it, or when it equals the checkpoint it came from (`changed`
    /// says whether it differs); else an automatic checkpoint named by `automatic_name`.
    pub fn choose<E>(
        save_current: Option<&str>,
        discard_current: bool,
        changed: impl FnOnce() -> Result<bool, E>,
        automatic_name: impl FnOnce() -> Result<String, E>,
    ) -> Result<Option<KeptState>, E> {
        Ok(match save_current {
            Some(name) => Some(KeptState {
                name: name.to_string(),
                automatic: false,
            }),
            None if discard_current || !changed()? => None,
            None => Some(KeptState {
                name: automatic_name()?,
                automatic: true,
            }),
        })
    }
}

/// What an apply keeps of the state it replaces (see [`KeptState::choose`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keep {
    /// Keep it under this name.
    pub save_current: Option<String>,
    /// Keep nothing.
    pub discard_current: bool,
}

/// What an apply did to a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The checkpoint that keeps the replaced state, if one was taken.
    pub kept: Option<KeptState>,
    /// What became of the VM.
    pub outcome: VmOutcome,
}

/// Who else uses a VM's disks (NBD clients other than its own QEMU), consulted before an apply
/// changes the disks under them.
pub trait DiskUsers: Sync {
    /// Held while the disks are rewound: nobody new gets on them meanwhile.
    type Fence: Send;
    /// Refuses while others than process `qemu` use `disks`, unless the apply is forced.
    fn check(&self, disks: &[String], qemu: Option<u32>) -> Result<(), VmError>;
    /// Fences `disks` and clears them of users: what process `qemu` left always, the others when
    /// the apply is forced (else it is refused).
    fn clear(
        &self,
        disks: &[String],
        qemu: Option<u32>,
    ) -> impl Future<Output = Result<Self::Fence, VmError>> + Send;
}

/// No one but the VM uses its disks (a store without a daemon serves no clients).
pub struct NoUsers;

impl DiskUsers for NoUsers {
    type Fence = ();
    fn check(&self, _: &[String], _: Option<u32>) -> Result<(), VmError> {
        Ok(())
    }
    async fn clear(&self, _: &[String], _: Option<u32>) -> Result<(), VmError> {
        Ok(())
    }
}

/// Keeps a VM's current state before an apply, as [`KeptState::choose`] decides: a stopped
/// VM's disks only when they differ from the checkpoint they came from, a running VM's always
/// (its memory has moved on). Takes the checkpoint of a stopped VM; for a running one returns
/// the name only, since that checkpoint needs QEMU.
pub fn keep_before_apply(
    store: &Arc<Store>,
    vms: &VmStore,
    vm: &str,
    keep: &Keep,
    running: bool,
) -> Result<Option<KeptState>, VmError> {
    let kept = KeptState::choose(
        keep.save_current.as_deref(),
        keep.discard_current,
        || Ok(running || disks_changed(store, &vms.get(vm)?)?),
        || new_checkpoint_name(store, vms, vm, AUTOMATIC_PREFIX),
    )?;
    if let (Some(k), false) = (&kept, running) {
        take_stopped(vms, store, vm, &k.name, None, k.automatic)?;
    }
    Ok(kept)
}

/// Rewinds a stopped VM's disks to `cp`; if that fails part-way, puts them back to `saved` (the
/// checkpoint just taken of them) so the VM is left as it was, and says so.
pub fn apply_disks_or_restore(
    store: &Store,
    vms: &VmStore,
    cp: &VmCheckpoint,
    saved: Option<&str>,
) -> Result<(), VmError> {
    let Err(e) = apply_disks(vms, store, cp) else {
        return Ok(());
    };
    let Some(saved) = saved else {
        return Err(e.context(format!(
            "applying {}@{} stopped part-way and the replaced state was discarded: apply a checkpoint again to make the disks consistent",
            cp.vm, cp.name
        )));
    };
    let back = vms
        .checkpoint(&cp.vm, saved)
        .and_then(|back| apply_disks(vms, store, &back));
    Err(put_back_error(e, &cp.vm, saved, back))
}

/// The error of an apply that failed after it changed the VM, once the VM was put back to the
/// checkpoint `saved` kept of its state (`back` says whether that worked).
fn put_back_error(e: VmError, vm: &str, saved: &str, back: Result<(), VmError>) -> VmError {
    match back {
        Ok(()) => e.context(format!(
            "nothing was applied: VM '{vm}' is back as it was ({vm}@{saved})"
        )),
        Err(r) => e.context(format!(
            "putting VM '{vm}' back to {vm}@{saved} failed too ({r}): apply it by hand"
        )),
    }
}

/// Applies a disk-only checkpoint to a stopped VM (no QEMU involved).
pub fn apply_stopped(
    store: &Arc<Store>,
    vms: &VmStore,
    vm: &str,
    name: &str,
    keep: &Keep,
) -> Result<Applied, VmError> {
    let cp = vms.checkpoint(vm, name)?;
    check_applicable(vms, store, &cp)?;
    if cp.kind == CheckpointKind::Standard {
        return Err(VmError::NeedsDaemon(
            "applying a checkpoint with memory state (the guest resumes in QEMU)".into(),
        ));
    }
    let kept = keep_before_apply(store, vms, vm, keep, false)?;
    apply_disks_or_restore(store, vms, &cp, kept.as_ref().map(|k| k.name.as_str()))?;
    Ok(Applied {
        kept,
        outcome: VmOutcome::Stopped,
    })
}

/// A saved-state file written out for QEMU to load; removed when dropped, whatever happened.
struct StateFile(PathBuf);

impl StateFile {
    /// Writes checkpoint `cp`'s memory state to `VMDIR/restore-NAME.tmp`.
    async fn load(store: &Arc<Store>, vms: &VmStore, cp: &VmCheckpoint) -> Result<Self, VmError> {
        let path = vms.vm_dir(&cp.vm).join(format!("restore-{}.tmp", cp.name));
        let file = StateFile(path.clone());
        let (store, cp) = (store.clone(), cp.clone());
        blocking(move || load_state(&store, &cp, &path)).await?;
        Ok(file)
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Runtime {
    /// Applies checkpoint `name` to VM `vm`: a running VM (any checkpoint), or a stopped one
    /// with a standard checkpoint (which starts it from memory). `users` are the disks' other
    /// clients, refused or cleared before the disks change; `progress` hears the bytes of
    /// memory saved while the running state is kept.
    pub async fn apply_checkpoint(
        self: &Arc<Self>,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        keep: &Keep,
        users: &impl DiskUsers,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Applied, VmError> {
        let vms = self.definitions().clone();
        let cp = vms.checkpoint(vm, name)?;
        let running = self.is_running(vm);
        let standard = cp.kind == CheckpointKind::Standard;
        let qemu = self.status(vm).pid;
        users.check(&cp.disks, qemu)?;
        {
            let (vms, store, cp) = (vms.clone(), store.clone(), cp.clone());
            blocking(move || check_applicable(&vms, &store, &cp)).await?;
        }
        if standard || running {
            crate::find_qemu()?;
        }
        let t = std::time::Instant::now();
        let state = match standard {
            true => Some(StateFile::load(store, &vms, &cp).await?),
            false => None,
        };
        // A stopped VM's state is kept here; a running VM's is a standard checkpoint, taken below.
        let kept = {
            let (vms, store, vm, keep) = (vms.clone(), store.clone(), vm.to_string(), keep.clone());
            blocking(move || keep_before_apply(&store, &vms, &vm, &keep, running)).await?
        };
        if let (Some(k), true) = (&kept, running) {
            let (kname, auto) = (k.name.clone(), k.automatic);
            self.take_checkpoint(store, vm, &kname, None, Take::Standard, auto, progress)
                .await?;
        }
        let saved = kept.as_ref().map(|k| k.name.as_str());
        if running {
            self.kill(vm).await?;
        }
        let applied = match users.clear(&cp.disks, qemu).await {
            Ok(fence) => {
                let (store, vms, cp, saved) = (
                    store.clone(),
                    vms.clone(),
                    cp.clone(),
                    saved.map(str::to_string),
                );
                let r =
                    blocking(move || apply_disks_or_restore(&store, &vms, &cp, saved.as_deref()))
                        .await;
                drop(fence);
                r
            }
            Err(e) => Err(e),
        };
        let started = match (applied, &state) {
            (Err(e), _) => {
                // The disks are back as they were (or the error says why not); so is the VM.
                if let (true, Some(saved)) = (running, saved) {
                    if let Err(r) = self.resume_saved(store, vm, saved).await {
                        warn!("vm {vm}: resuming the state kept before the failed apply: {r}");
                    }
                }
                return Err(e);
            }
            (Ok(()), Some(file)) => self.resume_from(vm, &file.0).await.map(|_| ()),
            (Ok(()), None) if running => self.start(vm).await.map(|_| ()),
            (Ok(()), None) => Ok(()),
        };
        drop(state);
        if let Err(e) = started {
            return Err(self.put_back(store, vm, name, saved, running, e).await);
        }
        let outcome = match (standard, running) {
            (true, true) => VmOutcome::ResumedFromMemory,
            (true, false) => VmOutcome::StartedFromMemory,
            (false, true) => VmOutcome::ColdBoot,
            (false, false) => VmOutcome::Stopped,
        };
        info!("vm {vm}: applied {name} ({outcome}) in {:?}", t.elapsed());
        Ok(Applied { kept, outcome })
    }

    /// Resumes a VM from a standard checkpoint (or boots it from a disk-only one): its disks are
    /// rewound to it first.
    async fn resume_saved(
        self: &Arc<Self>,
        store: &Arc<Store>,
        vm: &str,
        saved: &str,
    ) -> Result<(), VmError> {
        let vms = self.definitions().clone();
        let cp = vms.checkpoint(vm, saved)?;
        {
            let (vms, store, cp) = (vms.clone(), store.clone(), cp.clone());
            blocking(move || apply_disks(&vms, &store, &cp)).await?;
        }
        if cp.kind == CheckpointKind::Standard {
            let file = StateFile::load(store, &vms, &cp).await?;
            self.resume_from(vm, &file.0).await?;
        } else {
            self.start(vm).await?;
        }
        Ok(())
    }

    /// After an apply failed once its VM was stopped: puts the VM back to the state kept first
    /// (running again if it ran), and returns the error saying what happened.
    async fn put_back(
        self: &Arc<Self>,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        saved: Option<&str>,
        was_running: bool,
        e: VmError,
    ) -> VmError {
        let Some(saved) = saved else {
            return e.context(format!(
                "applying {vm}@{name} rewound the disks but could not start the VM, and the replaced state was discarded: VM '{vm}' is stopped"
            ));
        };
        let back = if was_running {
            self.resume_saved(store, vm, saved).await
        } else {
            let (vms, store) = (self.definitions().clone(), store.clone());
            let (vm, saved) = (vm.to_string(), saved.to_string());
            blocking(move || {
                let cp = vms.checkpoint(&vm, &saved)?;
                apply_disks(&vms, &store, &cp)
            })
            .await
        };
        put_back_error(e, vm, saved, back)
    }
}
