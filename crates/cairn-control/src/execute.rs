//! The one function that performs an [`Op`] on a store ([`execute`]); operations on a VM's
//! checkpoints go on to `vm_ops.rs`.

use std::sync::Arc;

use cairn_engine::{Error as EngineError, SaveCurrent, Store, Target};
use cairn_vm::checkpoint::head_changed_since;
use cairn_vm::{VmError, VmSpec, VmStatus, VmStore};

use crate::error::{ErrorKind, OpError};
use crate::ops::{Op, Reply, MAX_DATA};
use crate::paging::Page;
use crate::reports::{ApplyReport, KeptState};

/// The VM definitions of the store.
pub(crate) fn vm_store(store: &Store) -> Result<VmStore, OpError> {
    store.dir().map(VmStore::new).ok_or_else(|| {
        OpError::new(
            ErrorKind::Invalid,
            "this store has no directory for VM definitions",
        )
    })
}

/// Checks that every disk is a volume that no other VM has attached.
fn check_disks(store: &Store, vms: &VmStore, spec: &VmSpec) -> Result<(), OpError> {
    let others = vms.list()?;
    for d in &spec.disks {
        store.volume_info(d)?;
        for other in &others {
            if other.name != spec.name && other.disks.contains(d) {
                return Err(OpError::new(
                    ErrorKind::State,
                    format!(
                        "volume '{d}' is attached to VM '{}'; a disk belongs to one VM (clone it for another)",
                        other.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

fn needs_daemon(what: &str) -> OpError {
    VmError::NeedsDaemon(what.to_string()).into()
}

/// A name for a new checkpoint of a volume, free on it.
fn new_volume_checkpoint_name(
    store: &Store,
    volume: &str,
    prefix: &str,
) -> Result<String, OpError> {
    let taken: Vec<String> = store
        .list_checkpoints(volume)?
        .into_iter()
        .map(|c| c.name)
        .collect();
    Ok(crate::names::timestamp_name(
        prefix,
        cairn_vm::now_ms(),
        &taken,
    ))
}

/// `name` and every checkpoint under it in `tree` (name and parent of each), leaves first, so
/// deleting them in order never deletes a checkpoint before its descendants; `name` comes last.
/// `None` when `tree` has no `name`.
pub(crate) fn subtree_leaves_first(
    tree: &[(String, Option<String>)],
    name: &str,
) -> Option<Vec<String>> {
    fn walk(tree: &[(String, Option<String>)], name: &str, out: &mut Vec<String>) {
        for (child, parent) in tree {
            if parent.as_deref() == Some(name) {
                walk(tree, child, out);
            }
        }
        out.push(name.to_string());
    }
    if !tree.iter().any(|(n, _)| n == name) {
        return None;
    }
    let mut out = Vec::new();
    walk(tree, name, &mut out);
    Some(out)
}

fn checked_len(what: &str, len: u64) -> Result<(), OpError> {
    if len > MAX_DATA {
        return Err(OpError::new(
            ErrorKind::Invalid,
            format!("{what} of {len} bytes is over the {MAX_DATA}-byte limit of one operation; split it"),
        ));
    }
    Ok(())
}

/// Performs `op` on `store`. `progress` hears the bytes freed so far by deletes.
pub fn execute(
    store: &Arc<Store>,
    op: Op,
    progress: &mut dyn FnMut(u64),
) -> Result<Reply, OpError> {
    if let Some(r) = crate::vm_ops::execute_vm_checkpoint(store, &op)? {
        return Ok(r);
    }
    if let Op::Lifecycle(l) = op {
        // A caller without a Service has no backup running that could be reading a checkpoint.
        return crate::lifecycle::run(store, l, &|_, _| false, progress);
    }
    execute_store(store, op, progress)
}

fn execute_store(store: &Store, op: Op, progress: &mut dyn FnMut(u64)) -> Result<Reply, OpError> {
    Ok(match op {
        Op::VolumeCreate { name, size } => Reply::Volume(store.create_volume(&name, size)?),
        Op::VolumeList => Reply::Volumes(store.list_volumes()?),
        Op::VolumeInfo { name } => Reply::Volume(store.volume_info(&name)?),
        Op::VolumeResize { name, size } => Reply::Volume(store.resize_volume(&name, size)?),
        Op::VolumeDelete { name } => {
            if let Ok(vms) = vm_store(store) {
                if let Some(vm) = vms.list()?.into_iter().find(|v| {
                    v.disks.contains(&name) || cairn_vm::checkpoint::state_volume(&v.name) == name
                }) {
                    return Err(OpError::new(
                        ErrorKind::State,
                        format!(
                            "volume '{name}' is a disk of VM '{}'; delete or edit the VM first",
                            vm.name
                        ),
                    ));
                }
                // A disk detached from its VM still holds parts of the VM's checkpoints.
                let parts = vms.checkpoints_on(&name)?;
                if let Some(first) = parts.first() {
                    let names: Vec<String> = parts
                        .iter()
                        .map(|c| format!("{}@{}", c.vm, c.name))
                        .collect();
                    return Err(OpError::new(
                        ErrorKind::State,
                        format!(
                            "volume '{name}' holds part of VM checkpoint(s) {}; delete those first (`cairn checkpoint delete {}@{}`)",
                            names.join(", "),
                            first.vm,
                            first.name
                        ),
                    ));
                }
            }
            store.delete_volume_with_progress(&name, progress)?;
            Reply::Done
        }
        Op::VolumeDefrag {
            name,
            dry_run,
            min_extents,
        } => Reply::Defrag(store.defrag(&name, min_extents, dry_run, progress)?),
        Op::VolumeWrite { name, offset, data } => {
            checked_len("a write", data.len() as u64)?;
            store.write(&name, offset, &data)?;
            store.flush()?;
            Reply::Done
        }
        Op::VolumeRead {
            target,
            offset,
            length,
        } => {
            checked_len("a read", length)?;
            let mut buf = vec![0u8; length as usize];
            store.read(&Target::parse(&target)?, offset, &mut buf)?;
            Reply::Bytes(buf)
        }
        Op::CheckpointCreate {
            volume,
            name,
            description,
            quiesce,
            automatic,
            ..
        } => {
            if quiesce {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("'{volume}' is a volume, not a VM: --quiesce freezes a running guest's file systems through its guest agent"),
                ));
            }
            let name = match name {
                Some(n) => n,
                None => new_volume_checkpoint_name(
                    store,
                    &volume,
                    cairn_vm::checkpoint::UNNAMED_PREFIX,
                )?,
            };
            let mut info = store.create_checkpoint(&volume, &name, description.as_deref())?;
            if automatic {
                // A crash before this leaves it manual: kept, never wrongly pruned.
                info = store.set_checkpoint_flags(&volume, &name, Some(true), None)?;
            }
            Reply::Checkpoint(info)
        }
        Op::CheckpointList {
            volume,
            after,
            limit,
        } => {
            let page = Page::new(&after, limit)?;
            let (checkpoints, next) =
                store.list_checkpoints_page(&volume, page.after_id()?, page.limit())?;
            Reply::Checkpoints {
                checkpoints,
                head_parent: store.volume_info(&volume)?.parent,
                next: next.map(|id| id.to_string()),
            }
        }
        Op::CheckpointApply {
            volume,
            name,
            save_current,
            discard_current,
            ..
        } => {
            // Checked first, so a bad target takes no automatic checkpoint.
            store.list_checkpoints(&volume)?;
            let kept = KeptState::choose(
                save_current.as_deref(),
                discard_current,
                || {
                    let parent = store.volume_info(&volume)?.parent;
                    Ok(head_changed_since(store, &volume, parent.as_deref())?)
                },
                || {
                    new_volume_checkpoint_name(
                        store,
                        &volume,
                        cairn_vm::checkpoint::AUTOMATIC_PREFIX,
                    )
                },
            )?;
            let save = kept.as_ref().map(|k| SaveCurrent {
                name: &k.name,
                automatic: k.automatic,
            });
            let info = store.apply_checkpoint_saving(&volume, &name, save)?;
            let applied = Target::checkpoint(&volume, &name).to_string();
            Reply::Applied(ApplyReport::new(applied, kept.as_ref(), None, Some(info)))
        }
        Op::CheckpointDelete {
            volume,
            name,
            children,
        } => {
            let order = if children {
                let tree: Vec<(String, Option<String>)> = store
                    .list_checkpoints(&volume)?
                    .into_iter()
                    .map(|c| (c.name, c.parent))
                    .collect();
                subtree_leaves_first(&tree, &name).ok_or(EngineError::UnknownCheckpoint {
                    volume: volume.clone(),
                    name,
                })?
            } else {
                vec![name]
            };
            let vms = vm_store(store).ok();
            for n in &order {
                if let Some(vms) = &vms {
                    vms.check_not_a_part(&volume, n, "delete")?;
                }
            }
            let mut deleted = Vec::new();
            for n in order {
                store.delete_checkpoint_with_progress(&volume, &n, progress)?;
                deleted.push(Target::checkpoint(&volume, &n).to_string());
            }
            Reply::Deleted(deleted)
        }
        Op::CheckpointEdit {
            volume,
            name,
            description,
        } => {
            Reply::Checkpoint(store.describe_checkpoint(&volume, &name, description.as_deref())?)
        }
        Op::CheckpointRename {
            volume,
            name,
            new_name,
        } => {
            if let Ok(vms) = vm_store(store) {
                vms.check_not_a_part(&volume, &name, "rename")?;
            }
            Reply::Checkpoint(store.rename_checkpoint(&volume, &name, &new_name)?)
        }
        Op::Clone {
            volume,
            checkpoint,
            new_name,
        } => Reply::Volume(store.clone_checkpoint(&volume, &checkpoint, &new_name)?),
        Op::Diff { a, b } => Reply::Extents(store.diff(&Target::parse(&a)?, &Target::parse(&b)?)?),
        Op::Space { volume } => Reply::Space(store.space(volume.as_deref())?),
        Op::SpaceFreed {
            target,
            checkpoints,
        } => Reply::Freed {
            bytes: space_freed(store, &target, &checkpoints)?,
        },
        Op::Fsck => Reply::Fsck(store.fsck()?),
        Op::Flush => {
            store.flush()?;
            Reply::Done
        }
        Op::VmCreate(def) => {
            let vms = vm_store(store)?;
            cairn_engine::validate_name(&def.name)?;
            if vms.exists(&def.name) {
                return Err(VmError::Exists(def.name).into());
            }
            let spec = VmSpec {
                name: def.name,
                memory: def.memory.unwrap_or(512 << 20),
                cpus: def.cpus.unwrap_or(1),
                disks: def.disks.unwrap_or_default(),
                kernel: def.kernel,
                initrd: def.initrd,
                append: def.append,
                net: def.net,
                mac: cairn_vm::spec::fresh_mac(),
                uuid: cairn_vm::spec::fresh_uuid(),
                accel: def.accel,
                created_ms: cairn_vm::now_ms(),
                parent: None,
            };
            spec.validate()?;
            check_disks(store, &vms, &spec)?;
            vms.save(&spec)?;
            Reply::Vm(spec)
        }
        Op::VmList => Reply::Vms(vm_store(store)?.list()?),
        Op::VmInfo { name } => Reply::Vm(vm_store(store)?.get(&name)?),
        Op::VmEdit(def) => {
            let vms = vm_store(store)?;
            let mut spec = vms.get(&def.name)?;
            if let Some(m) = def.memory {
                spec.memory = m;
            }
            if let Some(c) = def.cpus {
                spec.cpus = c;
            }
            if let Some(d) = def.disks {
                spec.disks = d;
            }
            if def.kernel.is_some() {
                spec.kernel = def.kernel;
            }
            if def.initrd.is_some() {
                spec.initrd = def.initrd;
            }
            if def.append.is_some() {
                spec.append = def.append;
            }
            if def.net.is_some() {
                spec.net = def.net;
            }
            if def.accel.is_some() {
                spec.accel = def.accel;
            }
            spec.validate()?;
            check_disks(store, &vms, &spec)?;
            vms.save(&spec)?;
            Reply::Vm(spec)
        }
        Op::VmDelete { name } => {
            vm_store(store)?.delete(&name)?;
            // The saved memory states belong to the VM alone; its disks are kept.
            match store.delete_volume(&cairn_vm::checkpoint::state_volume(&name)) {
                Ok(()) | Err(cairn_engine::Error::UnknownVolume(_)) => {}
                Err(e) => return Err(e.into()),
            }
            Reply::Done
        }
        // A caller without a Service has no other operation running that could hold a pin.
        Op::Backup(b) => crate::backup::run(
            store,
            &crate::backup::BackupGuards::default(),
            b,
            &mut &mut *progress,
        )?,
        Op::Lifecycle(_) => unreachable!("execute runs lifecycle operations before this"),
        Op::Group(g) => Reply::Group(crate::group::run(store, g)?),
        Op::Token(t) => {
            let dir = store.dir().ok_or_else(|| {
                OpError::new(
                    ErrorKind::Invalid,
                    "tokens belong to a store in a directory",
                )
            })?;
            Reply::Token(crate::tokens::run(dir, t)?)
        }
        Op::VmStatus { name } => {
            let vms = vm_store(store)?;
            vms.get(&name)?;
            // Without a daemon nothing runs.
            Reply::VmStatus(VmStatus {
                console: vms.vm_dir(&name).join("console.log"),
                name,
                state: "stopped".into(),
                pid: None,
                uptime_secs: None,
                accel: None,
                last_exit: None,
                last_exit_ms: None,
                hard_stop: None,
            })
        }
        Op::VmStart { .. } => return Err(needs_daemon("starting a VM")),
        Op::VmStop { .. } | Op::VmKill { .. } => return Err(needs_daemon("stopping a VM")),
    })
}

/// What deleting `names` of `target` together frees: for a VM, summed over its disks and its
/// memory-state volume (a VM checkpoint is a checkpoint of the same name on each).
fn space_freed(store: &Store, target: &str, names: &[String]) -> Result<u64, OpError> {
    let vms = vm_store(store).ok().filter(|v| v.exists(target));
    let Some(vms) = vms else {
        return Ok(store.space_freed_by_deleting(target, names)?);
    };
    let spec = vms.get(target)?;
    let mut volumes = spec.disks.clone();
    volumes.push(cairn_vm::checkpoint::state_volume(target));
    let mut found = std::collections::HashSet::new();
    let mut bytes = 0;
    for v in &volumes {
        let Ok(cps) = store.list_checkpoints(v) else {
            continue;
        };
        let here: Vec<String> = names
            .iter()
            .filter(|n| cps.iter().any(|c| &c.name == *n))
            .cloned()
            .collect();
        found.extend(here.iter().cloned());
        if !here.is_empty() {
            bytes += store.space_freed_by_deleting(v, &here)?;
        }
    }
    if let Some(missing) = names.iter().find(|n| !found.contains(*n)) {
        return Err(VmError::UnknownCheckpoint {
            vm: target.to_string(),
            name: missing.clone(),
        }
        .into());
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::Options;

    #[test]
    fn a_subtree_is_deleted_leaves_first() {
        let node = |n: &str, p: Option<&str>| (n.to_string(), p.map(str::to_string));
        let tree = [
            node("root", None),
            node("a", Some("root")),
            node("a1", Some("a")),
            node("b", Some("root")),
            node("other", None),
        ];
        assert_eq!(
            subtree_leaves_first(&tree, "root"),
            Some(vec!["a1".into(), "a".into(), "b".into(), "root".into()])
        );
        assert_eq!(subtree_leaves_first(&tree, "b"), Some(vec!["b".into()]));
        assert_eq!(subtree_leaves_first(&tree, "nope"), None);
    }

    #[test]
    fn execute_maps_engine_errors_to_kinds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Arc::new(Store::init(dir.path(), Options::default()).expect("init"));
        let mut none = |_| {};
        let e =
            execute(&store, Op::VolumeInfo { name: "x".into() }, &mut none).expect_err("unknown");
        assert_eq!(e.kind, ErrorKind::NotFound);
        let create = Op::VolumeCreate {
            name: "v".into(),
            size: 1 << 20,
        };
        execute(&store, create.clone(), &mut none).expect("create");
        assert_eq!(
            execute(&store, create, &mut none).expect_err("dup").kind,
            ErrorKind::Exists
        );
        let big = Op::VolumeRead {
            target: "v".into(),
            offset: 0,
            length: MAX_DATA + 1,
        };
        assert_eq!(
            execute(&store, big, &mut none).expect_err("big").kind,
            ErrorKind::Invalid
        );
    }
}
