//! Checkpoint operations whose target names a VM: every disk (and the memory state) at once.
//! Without a daemon nothing runs, so these see a stopped VM; the daemon handles the running
//! cases itself and calls back into the helpers here for the rest.

use cairn_engine::Store;
use cairn_vm::checkpoint::{self as ck, CheckpointKind, VmCheckpoint};
use cairn_vm::{VmError, VmStore};

use crate::error::{ErrorKind, OpError};
use crate::execute::{needs_daemon, subtree_leaves_first, vm_store};
use crate::names::timestamp_name;
use crate::ops::{Op, Reply};
use crate::reports::{ApplyReport, KeptState, VmCheckpointInfo, VmOutcome, VmSpaceReport};

/// Prefix of checkpoints created without a name.
pub const UNNAMED_PREFIX: &str = "cp";
/// Prefix of the checkpoints an apply takes of the state it replaces.
pub const AUTOMATIC_PREFIX: &str = "auto";

/// The names of a VM's checkpoints (pending ones included, since their names are taken).
fn vm_checkpoint_names(vms: &VmStore, vm: &str) -> Result<Vec<String>, VmError> {
    Ok(vms.checkpoints(vm)?.into_iter().map(|c| c.name).collect())
}

/// A name for a new checkpoint of a VM, free on the VM and on every disk.
pub fn new_vm_checkpoint_name(
    store: &Store,
    vms: &VmStore,
    vm: &str,
    prefix: &str,
) -> Result<String, OpError> {
    let mut taken = vm_checkpoint_names(vms, vm)?;
    for d in vms.get(vm)?.disks {
        taken.extend(store.list_checkpoints(&d)?.into_iter().map(|c| c.name));
    }
    Ok(timestamp_name(prefix, cairn_vm::now_ms(), &taken))
}

/// Takes a checkpoint of a stopped VM (every disk; disk-only).
pub fn vm_checkpoint_stopped(
    store: &Store,
    vms: &VmStore,
    vm: &str,
    name: &str,
    description: Option<&str>,
    automatic: bool,
) -> Result<VmCheckpoint, OpError> {
    let spec = vms.get(vm)?;
    let mut cp = ck::begin(
        vms,
        store,
        &spec,
        name,
        description,
        false,
        cairn_vm::now_ms(),
    )?;
    cp.automatic = automatic;
    if let Err(e) = ck::take_disks(store, &cp).and_then(|_| ck::persist_disks(store, &cp)) {
        ck::abandon(vms, &cp);
        return Err(e.into());
    }
    Ok(ck::finish(vms, cp)?)
}

/// Keeps a VM's current state before an apply, as [`KeptState::choose`] decides: a stopped
/// VM's disks only when they differ from the checkpoint they came from, a running VM's always
/// (its memory has moved on). Returns the name without taking anything when `running`: the
/// daemon takes a running VM's checkpoint itself.
pub fn keep_before_apply(
    store: &Store,
    vms: &VmStore,
    vm: &str,
    save_current: Option<&str>,
    discard_current: bool,
    running: bool,
) -> Result<Option<KeptState>, OpError> {
    let kept = KeptState::choose(
        save_current,
        discard_current,
        || Ok(running || ck::disks_changed(store, &vms.get(vm)?)?),
        || new_vm_checkpoint_name(store, vms, vm, AUTOMATIC_PREFIX),
    )?;
    if let (Some(k), false) = (&kept, running) {
        vm_checkpoint_stopped(store, vms, vm, &k.name, None, k.automatic)?;
    }
    Ok(kept)
}

/// Rewinds a stopped VM's disks to `cp`; if that fails part-way, puts them back to `saved`
/// (the checkpoint just taken of them) so the VM is left as it was, and says so.
pub fn apply_disks_or_restore(
    store: &Store,
    vms: &VmStore,
    cp: &VmCheckpoint,
    saved: Option<&str>,
) -> Result<(), OpError> {
    let Err(e) = ck::apply_disks(vms, store, cp) else {
        return Ok(());
    };
    let e = OpError::from(e);
    let Some(saved) = saved else {
        return Err(OpError::new(
            e.kind,
            format!(
                "{e}; applying {}@{} stopped part-way and the replaced state was discarded: apply a checkpoint again to make the disks consistent",
                cp.vm, cp.name
            ),
        ));
    };
    let back = vms
        .checkpoint(&cp.vm, saved)
        .and_then(|back| ck::apply_disks(vms, store, &back))
        .map_err(OpError::from);
    Err(put_back_error(e, &cp.vm, saved, back))
}

/// The error of an apply that failed after it changed the VM, once the VM was put back to the
/// checkpoint `saved` kept of its state (`back` says whether that worked).
pub fn put_back_error(e: OpError, vm: &str, saved: &str, back: Result<(), OpError>) -> OpError {
    let message = match back {
        Ok(()) => format!("{e}; nothing was applied: VM '{vm}' is back as it was ({vm}@{saved})"),
        Err(r) => format!(
            "{e}; putting VM '{vm}' back to {vm}@{saved} failed too ({r}): apply it by hand"
        ),
    };
    OpError::new(e.kind, message)
}

/// Checkpoint operations whose target names a VM; `None` when it names a volume.
pub(crate) fn execute_vm_checkpoint(store: &Store, op: &Op) -> Result<Option<Reply>, OpError> {
    let Ok(vms) = vm_store(store) else {
        return Ok(None);
    };
    let vm = match op {
        Op::CheckpointCreate { volume, .. }
        | Op::CheckpointList { volume }
        | Op::CheckpointApply { volume, .. }
        | Op::CheckpointDelete { volume, .. }
        | Op::CheckpointEdit { volume, .. }
        | Op::CheckpointRename { volume, .. }
        | Op::Clone { volume, .. } => volume,
        Op::Space { volume: Some(v) } => v,
        _ => return Ok(None),
    };
    if !vms.exists(vm) {
        return Ok(None);
    }
    let head = || -> Result<Option<String>, OpError> { Ok(vms.get(vm)?.parent) };
    Ok(Some(match op {
        Op::CheckpointCreate {
            name,
            description,
            quiesce,
            ..
        } => {
            if *quiesce {
                return Err(OpError::new(
                    ErrorKind::State,
                    format!("VM '{vm}' is not running, so there is no guest to quiesce; its disks are at rest: take the checkpoint without --quiesce"),
                ));
            }
            let name = match name {
                Some(n) => n.clone(),
                None => new_vm_checkpoint_name(store, &vms, vm, UNNAMED_PREFIX)?,
            };
            let cp = vm_checkpoint_stopped(store, &vms, vm, &name, description.as_deref(), false)?;
            Reply::VmCheckpoint(VmCheckpointInfo::of(store, &cp, Some(&cp.name)))
        }
        Op::CheckpointList { .. } => {
            let head = head()?;
            let checkpoints = vms
                .checkpoints(vm)?
                .iter()
                .filter(|c| !c.pending)
                .map(|c| VmCheckpointInfo::of(store, c, head.as_deref()))
                .collect();
            Reply::VmCheckpoints {
                checkpoints,
                head_parent: head,
            }
        }
        Op::CheckpointApply {
            name,
            save_current,
            discard_current,
            ..
        } => {
            let cp = vms.checkpoint(vm, name)?;
            ck::check_applicable(&vms, store, &cp)?;
            if cp.kind == CheckpointKind::Standard {
                return Err(needs_daemon(
                    "applying a checkpoint with memory state (the guest resumes in QEMU)",
                ));
            }
            let kept = keep_before_apply(
                store,
                &vms,
                vm,
                save_current.as_deref(),
                *discard_current,
                false,
            )?;
            apply_disks_or_restore(store, &vms, &cp, kept.as_ref().map(|k| k.name.as_str()))?;
            Reply::Applied(ApplyReport::new(
                format!("{vm}@{name}"),
                kept.as_ref(),
                Some(VmOutcome::Stopped),
                None,
            ))
        }
        Op::CheckpointDelete { name, children, .. } => {
            let cp = vms.checkpoint(vm, name)?;
            let order = if *children {
                let tree: Vec<(String, Option<String>)> = vms
                    .checkpoints(vm)?
                    .into_iter()
                    .filter(|c| !c.pending)
                    .map(|c| (c.name, c.parent))
                    .collect();
                subtree_leaves_first(&tree, &cp.name).unwrap_or_default()
            } else {
                vec![cp.name]
            };
            let mut deleted = Vec::new();
            for n in order {
                let c = vms.checkpoint(vm, &n)?;
                ck::delete(&vms, store, &c)?;
                deleted.push(format!("{vm}@{n}"));
            }
            Reply::Deleted(deleted)
        }
        Op::CheckpointEdit {
            name, description, ..
        } => {
            let cp = vms.checkpoint(vm, name)?;
            let cp = ck::describe(&vms, store, &cp, description.as_deref())?;
            Reply::VmCheckpoint(VmCheckpointInfo::of(store, &cp, head()?.as_deref()))
        }
        Op::CheckpointRename { name, new_name, .. } => {
            let cp = vms.checkpoint(vm, name)?;
            let cp = ck::rename(&vms, store, &cp, new_name)?;
            Reply::VmCheckpoint(VmCheckpointInfo::of(store, &cp, head()?.as_deref()))
        }
        Op::Clone {
            checkpoint,
            new_name,
            ..
        } => {
            let cp = vms.checkpoint(vm, checkpoint)?;
            Reply::Vm(ck::clone_vm(
                &vms,
                store,
                &cp,
                new_name,
                cairn_vm::now_ms(),
            )?)
        }
        Op::Space { .. } => {
            // A VM's space is that of its disks and of its saved memory states.
            let spec = vms.get(vm)?;
            let mut r = store.space(None)?;
            let state = ck::state_volume(&spec.name);
            r.volumes
                .retain(|v| spec.disks.contains(&v.name) || v.name == state);
            Reply::VmSpace(VmSpaceReport::of(vm, &vms.checkpoints(vm)?, r))
        }
        _ => return Ok(None),
    }))
}
