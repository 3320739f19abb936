//! Checkpoint operations whose target names a VM: every disk (and the memory state) at once.
//! These see a stopped VM: the [`Service`](crate::Service) sends those of running VMs to the VM
//! runtime.

use std::sync::Arc;

use cairn_engine::Store;
use cairn_vm::checkpoint::{self as ck, Keep};

use crate::error::{ErrorKind, OpError};
use crate::execute::{subtree_leaves_first, vm_store};
use crate::ops::{Op, Reply};
use crate::paging::Page;
use crate::reports::{ApplyReport, VmCheckpointInfo, VmSpaceReport};

/// Checkpoint operations whose target names a VM; `None` when it names a volume.
pub(crate) fn execute_vm_checkpoint(store: &Arc<Store>, op: &Op) -> Result<Option<Reply>, OpError> {
    let Ok(vms) = vm_store(store) else {
        return Ok(None);
    };
    let vm = match op {
        Op::Space { volume: Some(v) } => v.as_str(),
        op => match op.checkpoint_target() {
            Some(t) => t,
            None => return Ok(None),
        },
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
            automatic,
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
                None => ck::new_checkpoint_name(store, &vms, vm, ck::UNNAMED_PREFIX)?,
            };
            let cp = ck::take_stopped(&vms, store, vm, &name, description.as_deref(), *automatic)?;
            Reply::VmCheckpoint(VmCheckpointInfo::of(store, &cp, Some(&cp.name)))
        }
        Op::CheckpointList { after, limit, .. } => {
            let head = head()?;
            let mut all = vms.checkpoints(vm)?;
            all.retain(|c| !c.pending);
            let (page, next) =
                Page::new(after, *limit)?.of(all, |c| (c.created_ms, c.name.as_str()))?;
            let checkpoints = page
                .iter()
                .map(|c| VmCheckpointInfo::of(store, c, head.as_deref()))
                .collect();
            Reply::VmCheckpoints {
                checkpoints,
                head_parent: head,
                next,
            }
        }
        Op::CheckpointApply {
            name,
            save_current,
            discard_current,
            ..
        } => {
            let keep = Keep {
                save_current: save_current.clone(),
                discard_current: *discard_current,
            };
            let applied = ck::apply_stopped(store, &vms, vm, name, &keep)?;
            Reply::Applied(ApplyReport::new(
                format!("{vm}@{name}"),
                applied.kept.as_ref(),
                Some(applied.outcome),
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
