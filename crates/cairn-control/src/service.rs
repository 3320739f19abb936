//! The one place every operation runs. A [`Service`] holds the store and, in the daemon, the VM
//! runtime and the NBD server; the front ends (the CLI without a daemon, the daemon's HTTP API)
//! only turn requests into [`Op`]s and replies into output.
//!
//! Operations that need QEMU (starting VMs, checkpoints of running VMs, applying memory state)
//! go to the VM runtime; everything else runs [`execute`] on the blocking pool, the same code the
//! CLI runs when no daemon is there ([`Service::run_here`]).

use std::sync::Arc;
use std::time::Duration;

use cairn_engine::Store;
use cairn_vm::checkpoint::{self as ck, Keep, Take};
use cairn_vm::{Runtime, VmError, VmStore};

use crate::backup::{BackupGuards, BackupOp, LiveRestores, MountedExport};
use crate::error::{ErrorKind, OpError};
use crate::execute::execute;
use crate::ops::{Op, Reply};
use crate::progress::{no_progress, Progress};
use crate::reports::{ApplyReport, VmCheckpointInfo};

mod groups;
mod nbd_users;
mod serving;

use nbd_users::NbdUsers;

/// What runs a store's operations.
pub struct Service {
    store: Arc<Store>,
    vms: Option<(Arc<Runtime>, Arc<cairn_nbd::Server>)>,
    backups: BackupGuards,
    /// Volumes being restored live (daemon only).
    live: LiveRestores,
    /// Mounted backups' exports (daemon only).
    mounts: Arc<std::sync::Mutex<Vec<MountedExport>>>,
}

impl Service {
    /// Creates an empty store in `dir`.
    pub fn init(dir: &std::path::Path, options: cairn_engine::Options) -> Result<(), OpError> {
        Store::init(dir, options)?;
        Ok(())
    }

    /// Opens the store in `dir` for [`Service::local`] use (the CLI without a daemon).
    pub fn open(dir: &std::path::Path, options: cairn_engine::Options) -> Result<Service, OpError> {
        Ok(Service::local(Arc::new(Store::open(dir, options)?)))
    }

    /// A service over `store` alone: nothing runs, so VMs are all stopped (the CLI without a
    /// daemon).
    pub fn local(store: Arc<Store>) -> Service {
        Service {
            store,
            vms: None,
            backups: BackupGuards::default(),
            live: LiveRestores::default(),
            mounts: Arc::default(),
        }
    }

    /// A service over `store` alone that shares `guards` (for work moved to another thread).
    fn local_with(store: Arc<Store>, guards: BackupGuards) -> Service {
        Service {
            backups: guards,
            ..Service::local(store)
        }
    }

    /// The daemon's service: the store `nbd` serves, and the VMs `runtime` runs on it. Live
    /// restores a stopped daemon left are served again at once, as far as they got.
    pub fn daemon(nbd: Arc<cairn_nbd::Server>, runtime: Arc<Runtime>) -> Service {
        let s = Service {
            store: nbd.store().clone(),
            vms: Some((runtime, nbd)),
            backups: BackupGuards::default(),
            live: LiveRestores::default(),
            mounts: Arc::default(),
        };
        s.pick_up_live_restores();
        s
    }

    /// The store.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Runs `op` here, synchronously: for a service without VMs (see [`Service::local`]).
    pub fn run_here(&self, op: Op, progress: &mut dyn FnMut(u64)) -> Result<Reply, OpError> {
        self.check_allowed(&op)?;
        if let Some(g) = self.group_of(&op) {
            // A group's members run through the same async path as the daemon's, here on a
            // runtime of this call's own (no VM runs without a daemon).
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OpError::new(ErrorKind::Io, format!("cannot start a runtime: {e}")))?;
            return rt.block_on(self.run_group(g, op, &no_progress()));
        }
        match op {
            Op::Backup(b) => crate::backup::run(&self.store, &self.backups, b, &mut &mut *progress),
            Op::Lifecycle(l) => self.lifecycle(l, progress),
            op => execute(&self.store, op, progress),
        }
    }

    /// Runs a lifecycle operation; checkpoints a backup is reading are not pruned.
    fn lifecycle(
        &self,
        op: crate::lifecycle::LifecycleOp,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Reply, OpError> {
        let guards = &self.backups;
        let busy = |v: &str, c: &str| guards.check_free(v, Some(c)).is_err();
        crate::lifecycle::run(&self.store, op, &busy, progress)
    }

    /// Refuses to delete or rename a checkpoint that a backup is reading, to delete a pinned
    /// one, and to take one when the store's file system is below its floor.
    fn check_allowed(&self, op: &Op) -> Result<(), OpError> {
        match op {
            Op::CheckpointCreate { volume, .. } => {
                crate::lifecycle::space::check_floor(&self.store, volume)
            }
            Op::VolumeCreate { name, .. } => crate::group::check_name_free(&self.store, name),
            Op::VmCreate(def) => crate::group::check_name_free(&self.store, &def.name),
            Op::CheckpointDelete {
                volume,
                name,
                children,
            } => {
                let only = (!children).then_some(name.as_str());
                self.backups.check_free(volume, only)?;
                crate::lifecycle::check_not_pinned(&self.store, volume, name)
            }
            Op::CheckpointRename { volume, name, .. } => {
                self.backups.check_free(volume, Some(name))
            }
            Op::VolumeDelete { name } => self.backups.check_free(name, None),
            _ => Ok(()),
        }
    }

    /// Runs `op`. `progress` hears how far long work got.
    pub async fn run(&self, op: Op, progress: Progress) -> Result<Reply, OpError> {
        self.check_allowed(&op)?;
        self.check_live(&op)?;
        if let Some(g) = self.group_of(&op) {
            return self.run_group(g, op, &progress).await;
        }
        if let Op::Backup(
            b @ (BackupOp::Restore { live: true, .. }
            | BackupOp::Mount { .. }
            | BackupOp::Unmount { .. }
            | BackupOp::Mounts
            | BackupOp::Live),
        ) = op
        {
            return self.run_serving(b, progress).await;
        }
        if let Op::Lifecycle(l) = op {
            let (store, guards) = (self.store.clone(), self.backups.clone());
            return on_blocking_pool(move || {
                Service::local_with(store, guards).lifecycle(l, &mut |n| progress.report(n))
            })
            .await;
        }
        if let Op::Backup(b) = op {
            let (store, guards) = (self.store.clone(), self.backups.clone());
            return on_blocking_pool(move || {
                crate::backup::run(&store, &guards, b, &mut progress.clone())
            })
            .await;
        }
        let Some((rt, nbd)) = &self.vms else {
            let store = self.store.clone();
            return on_blocking_pool(move || execute(&store, op, &mut |n| progress.report(n)))
                .await;
        };
        let vms = rt.definitions();
        match &op {
            Op::VmStart { name } => return Ok(Reply::VmStatus(rt.start(name).await?)),
            Op::VmStop { name, timeout_secs } => {
                let timeout = Duration::from_secs(*timeout_secs);
                return Ok(Reply::VmStatus(rt.stop(name, timeout).await?));
            }
            Op::VmKill { name } => return Ok(Reply::VmStatus(rt.kill(name).await?)),
            Op::VmStatus { name } => {
                vms.get(name)?;
                return Ok(Reply::VmStatus(rt.status(name)));
            }
            Op::VmDelete { name } if rt.is_running(name) => {
                return Err(VmError::Running(name.clone()).into())
            }
            Op::VmEdit(def) if rt.is_running(&def.name) => {
                return Err(VmError::Running(def.name.clone()).into())
            }
            Op::CheckpointApply { volume, .. } | Op::VolumeDelete { name: volume } => {
                if let Some(vm) = rt.user_of(volume) {
                    return Err(OpError::new(
                        ErrorKind::State,
                        format!(
                            "volume '{volume}' is a disk of running VM '{vm}'; stop the VM first"
                        ),
                    ));
                }
            }
            _ => {}
        }
        match op {
            Op::CheckpointCreate {
                volume: vm,
                name,
                description,
                disk_only,
                quiesce,
                automatic,
            } if rt.is_running(&vm) => {
                if quiesce && !disk_only {
                    return Err(OpError::new(
                        ErrorKind::Invalid,
                        "--quiesce applies to --disk-only checkpoints: a standard checkpoint keeps the guest's memory, caches included",
                    ));
                }
                let how = match disk_only {
                    true => Take::DiskOnly { quiesce },
                    false => Take::Standard,
                };
                let name = match name {
                    Some(n) => n,
                    None => {
                        let (store, vms, vm) = (self.store.clone(), vms.clone(), vm.clone());
                        on_blocking_pool(move || {
                            Ok(ck::new_checkpoint_name(
                                &store,
                                &vms,
                                &vm,
                                ck::UNNAMED_PREFIX,
                            )?)
                        })
                        .await?
                    }
                };
                let report = |n| progress.report(n);
                let take = rt.take_checkpoint(
                    &self.store,
                    &vm,
                    &name,
                    description,
                    how,
                    automatic,
                    &report,
                );
                // Dropping the take on a cancel abandons the half-made checkpoint.
                let cp = tokio::select! {
                    cp = take => cp?,
                    () = progress.until_cancelled() => {
                        return Err(crate::progress::cancelled(&format!("checkpoint '{name}' of VM '{vm}'")));
                    }
                };
                Ok(Reply::VmCheckpoint(VmCheckpointInfo::of(
                    &self.store,
                    &cp,
                    Some(&cp.name),
                )))
            }
            Op::CheckpointApply {
                volume: vm,
                name,
                save_current,
                discard_current,
                force,
            } if vms.exists(&vm) && (rt.is_running(&vm) || is_standard(vms, &vm, &name)) => {
                let keep = Keep {
                    save_current,
                    discard_current,
                };
                let users = NbdUsers {
                    server: nbd.clone(),
                    force,
                    what: format!("{vm}@{name}"),
                };
                let report = |n| progress.report(n);
                let applied = rt
                    .apply_checkpoint(&self.store, &vm, &name, &keep, &users, &report)
                    .await?;
                Ok(Reply::Applied(ApplyReport::new(
                    format!("{vm}@{name}"),
                    applied.kept.as_ref(),
                    Some(applied.outcome),
                    None,
                )))
            }
            Op::CheckpointApply {
                ref volume,
                ref name,
                force,
                ..
            } => {
                // The heads take no new clients while they are rewound, and the ones on them
                // are refused, or with `force` disconnected.
                let users = NbdUsers {
                    server: nbd.clone(),
                    force,
                    what: format!("{volume}@{name}"),
                };
                let heads = match vms.exists(volume) {
                    true => vms
                        .checkpoint(volume, name)
                        .map(|c| c.disks)
                        .unwrap_or_default(),
                    false => vec![volume.clone()],
                };
                use cairn_vm::checkpoint::DiskUsers;
                let _fence = users.clear(&heads, None).await?;
                let store = self.store.clone();
                on_blocking_pool(move || execute(&store, op, &mut |n| progress.report(n))).await
            }
            op => {
                let store = self.store.clone();
                on_blocking_pool(move || execute(&store, op, &mut |n| progress.report(n))).await
            }
        }
    }
}

fn is_standard(vms: &VmStore, vm: &str, name: &str) -> bool {
    vms.checkpoint(vm, name)
        .is_ok_and(|c| c.kind == ck::CheckpointKind::Standard)
}

/// Runs store work (synchronous file I/O) on tokio's blocking pool.
async fn on_blocking_pool<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        OpError::new(
            ErrorKind::Daemon,
            format!("an operation crashed in the daemon (a bug; see its log): {e}"),
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While a backup reads a checkpoint, deleting or renaming it (or its volume) is refused
    /// with kind busy; once the backup ends, it goes through.
    #[test]
    fn a_backup_pins_its_checkpoint() {
        let dir = tempfile::tempdir().expect("tmp");
        Service::init(dir.path(), cairn_engine::Options::default()).expect("init");
        let s = Service::open(dir.path(), cairn_engine::Options::default()).expect("open");
        s.store().create_volume("v", 1 << 20).expect("vol");
        s.store().create_checkpoint("v", "a", None).expect("cp");
        s.store().create_checkpoint("v", "b", None).expect("cp");
        let pin = s.backups.pin("v", "a");
        let delete = |name: &str, children| Op::CheckpointDelete {
            volume: "v".into(),
            name: name.into(),
            children,
        };
        let none = &mut |_| {};
        for op in [
            delete("a", false),
            Op::CheckpointRename {
                volume: "v".into(),
                name: "a".into(),
                new_name: "z".into(),
            },
            Op::VolumeDelete { name: "v".into() },
        ] {
            let e = s.run_here(op, none).expect_err("pinned");
            assert_eq!(e.kind, ErrorKind::Busy, "{e}");
            assert!(
                e.message.contains("v@a") && e.message.contains("backed up"),
                "{e}"
            );
        }
        s.run_here(delete("b", false), none)
            .expect("another checkpoint is free");
        drop(pin);
        s.run_here(delete("a", false), none)
            .expect("free once the backup ends");
    }
}
