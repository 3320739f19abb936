//! Backups the daemon serves: mounts (a backup's images as read-only NBD exports) and live
//! restores (a volume or VM usable at once, its data copied in behind it). Both need the NBD
//! server, and a VM's live restore the runtime, so they run only in the daemon.

use std::path::PathBuf;
use std::sync::Arc;

use cairn_backup::reader::ImageReader;
use cairn_backup::restore::restore;
use cairn_backup::sink::FileSink;
use cairn_backup::{Manifest, Repository};
use cairn_engine::sync::lock;
use cairn_engine::Store;
use cairn_vm::checkpoint::CheckpointKind;
use cairn_vm::Runtime;
use tracing::warn;

use super::{on_blocking_pool, Progress, Service};
use crate::backup::live::{self, LiveRecord, LiveRestore, LiveRestores};
use crate::backup::vm::VmPlan;
use crate::backup::{mount, BackupOp, BackupReply, RepoSpec, RestoreReport, RestoreTo};
use crate::error::{ErrorKind, OpError};
use crate::ops::{Op, Reply};

/// What a live restore of one volume needs from the daemon.
#[derive(Clone)]
struct LiveContext {
    store: Arc<Store>,
    dir: PathBuf,
    nbd: Arc<cairn_nbd::Server>,
    lives: LiveRestores,
    /// Background copy's bytes per second at most.
    rate_limit: Option<u64>,
}

impl LiveContext {
    /// Makes volume `name` from image `image` of `m` and starts filling it; or, when `name`
    /// is recorded as being filled from that very image (a daemon restarted), goes on.
    /// Returns whether it went on.
    fn start(
        &self,
        r: &Arc<Repository>,
        m: &Manifest,
        image: usize,
        name: &str,
    ) -> Result<bool, OpError> {
        cairn_engine::validate_name(name)?;
        let reader = ImageReader::open(r.clone(), m.clone(), image)?;
        let size = m.images[image].size;
        if self.store.volume_info(name).is_ok() {
            if !live::recorded(&self.dir).iter().any(|v| v == name) {
                return Err(cairn_engine::Error::VolumeExists(name.into()).into());
            }
            let l = LiveRestore::load(self.store.clone(), &self.dir, name, Some(reader))?;
            if l.record().backup != m.id || l.record().image != image {
                return Err(OpError::new(
                    ErrorKind::Exists,
                    format!(
                        "volume '{name}' is being restored live from backup {}, not {}; restore to another name",
                        l.record().backup,
                        m.id
                    ),
                ));
            }
            self.nbd.attach_backfill(name, l.clone());
            self.run(l);
            return Ok(true);
        }
        let record = LiveRecord {
            volume: name.into(),
            backup: m.id.clone(),
            image,
            repository: r.location().to_string(),
            size,
        };
        let l = LiveRestore::start(self.store.clone(), &self.dir, record, reader)?;
        // The hook is in place before the volume exists, so no client ever reads it unfilled.
        self.nbd.attach_backfill(name, l.clone());
        if let Err(e) = self.store.create_volume(name, size) {
            self.nbd.detach_backfill(name);
            l.abandon();
            return Err(e.into());
        }
        self.run(l);
        Ok(false)
    }

    /// Registers `l` (its backfill already attached) and starts its background copy, which
    /// detaches it once complete.
    fn run(&self, l: Arc<LiveRestore>) {
        let name = l.volume().to_string();
        self.lives.insert(l.clone());
        let (nbd, lives) = (self.nbd.clone(), self.lives.clone());
        l.run_background(self.rate_limit, move || {
            nbd.detach_backfill(&name);
            lives.remove(&name);
        });
    }

    /// Undoes a live restore of `name` (a later step of its VM's restore failed).
    fn undo(&self, name: &str) {
        self.nbd.detach_backfill(name);
        if let Some(l) = self.lives.get(name) {
            l.abandon();
        }
        self.lives.remove(name);
        let _ = self.store.delete_volume(name);
    }
}

impl Service {
    fn live_context(&self) -> Result<(LiveContext, Arc<Runtime>), OpError> {
        let Some((rt, nbd)) = &self.vms else {
            return Err(crate::backup::needs_daemon());
        };
        let dir = self
            .store
            .dir()
            .ok_or_else(|| OpError::new(ErrorKind::Invalid, "backups need a store in a directory"))?
            .to_path_buf();
        Ok((
            LiveContext {
                store: self.store.clone(),
                dir,
                nbd: nbd.clone(),
                lives: self.live.clone(),
                rate_limit: None,
            },
            rt.clone(),
        ))
    }

    /// Serves the live restores a stopped daemon left: what is filled is served, the rest is
    /// refused until `backup restore --live` is run again (the daemon holds no passphrase).
    pub(super) fn pick_up_live_restores(&self) {
        let Ok((cx, _)) = self.live_context() else {
            return;
        };
        for name in live::recorded(&cx.dir) {
            if self.store.volume_info(&name).is_err() {
                // The daemon stopped between the record and the volume: nothing was served.
                if let Ok(l) = LiveRestore::load(cx.store.clone(), &cx.dir, &name, None) {
                    l.abandon();
                }
                continue;
            }
            match LiveRestore::load(cx.store.clone(), &cx.dir, &name, None) {
                Ok(l) => {
                    warn!(
                        "volume '{name}' is being restored live from backup {} and waits for `cairn backup restore {} --to {name} --live` to go on",
                        l.record().backup,
                        l.record().backup
                    );
                    cx.nbd.attach_backfill(&name, l.clone());
                    cx.lives.insert(l);
                }
                Err(e) => warn!("live restore of '{name}': {e}"),
            }
        }
    }

    /// Refuses what would checkpoint, rewind or resize a volume being restored live (it would
    /// keep the part not copied yet as zeros); fills what a read or write through the service
    /// touches first; a deleted volume's live restore ends with it.
    pub(super) fn check_live(&self, op: &Op) -> Result<(), OpError> {
        let volumes: Vec<String> = match op {
            Op::VolumeRead { target, .. } => {
                vec![cairn_engine::Target::parse(target)?.volume]
            }
            Op::VolumeWrite { name, .. }
            | Op::VolumeResize { name, .. }
            | Op::VolumeDelete { name } => vec![name.clone()],
            Op::CheckpointCreate { volume, .. } | Op::CheckpointApply { volume, .. } => {
                match crate::execute::vm_store(&self.store)
                    .ok()
                    .and_then(|v| v.get(volume).ok())
                {
                    Some(spec) => spec.disks,
                    None => vec![volume.clone()],
                }
            }
            Op::Backup(BackupOp::Create { target, .. }) => {
                vec![cairn_engine::Target::parse(target)?.volume]
            }
            _ => return Ok(()),
        };
        let Some(busy) = self.live.any_of(&volumes) else {
            return Ok(());
        };
        let l = self.live.get(&busy).expect("listed");
        match op {
            Op::VolumeRead { offset, length, .. } => {
                cairn_nbd::Backfill::ensure(l.as_ref(), *offset, *length).map_err(live_error)
            }
            Op::VolumeWrite { offset, data, .. } => {
                cairn_nbd::Backfill::ensure(l.as_ref(), *offset, data.len() as u64)
                    .map_err(live_error)
            }
            Op::VolumeDelete { name } => {
                if let Some(vm) = self.vms.as_ref().and_then(|(rt, _)| rt.user_of(name)) {
                    return Err(OpError::new(
                        ErrorKind::State,
                        format!(
                            "volume '{name}' is a disk of running VM '{vm}'; stop the VM first"
                        ),
                    ));
                }
                if let Some((_, nbd)) = &self.vms {
                    nbd.detach_backfill(name);
                }
                l.abandon();
                self.live.remove(name);
                Ok(())
            }
            _ => {
                let s = l.status();
                Err(OpError::new(
                    ErrorKind::State,
                    format!(
                        "volume '{busy}' is still being restored live from backup {} ({}% copied); wait until `cairn backup live` no longer lists it",
                        s.record.backup,
                        s.filled_bytes * 100 / s.record.size.max(1)
                    ),
                ))
            }
        }
    }

    /// Runs the backup operations that serve backups.
    pub(super) async fn run_serving(
        &self,
        op: BackupOp,
        progress: Progress,
    ) -> Result<Reply, OpError> {
        let (cx, rt) = self.live_context()?;
        let reply = match op {
            BackupOp::Mount { repo, id } => {
                let dir = cx.dir.clone();
                let images = on_blocking_pool(move || {
                    let r = Arc::new(crate::backup::open(&dir, &repo)?);
                    let m = r.manifest(&id)?;
                    mount::open_images(r, &m)
                })
                .await?;
                let mut made: Vec<mount::MountedExport> = Vec::new();
                for (e, source) in images {
                    if let Err(why) = cx.nbd.attach_image(&e.export, source) {
                        for m in &made {
                            cx.nbd.detach_image(&m.export);
                        }
                        return Err(OpError::new(
                            ErrorKind::Exists,
                            format!("{why}: backup {} is mounted already", e.backup),
                        ));
                    }
                    made.push(e);
                }
                lock(&self.mounts).extend(made.iter().cloned());
                BackupReply::Mounted(made)
            }
            BackupOp::Unmount { id } => {
                let mut mounts = lock(&self.mounts);
                let names: Vec<String> = mounts.iter().map(|m| m.export.clone()).collect();
                let gone = mount::matching(&names, &id)?;
                for n in &gone {
                    cx.nbd.detach_image(n);
                }
                let (out, keep): (Vec<_>, Vec<_>) =
                    mounts.drain(..).partition(|m| gone.contains(&m.export));
                *mounts = keep;
                BackupReply::Mounted(out)
            }
            BackupOp::Mounts => BackupReply::Mounted(lock(&self.mounts).clone()),
            BackupOp::Live => BackupReply::Live(self.live.status()),
            BackupOp::Restore {
                repo,
                id,
                to,
                rate_limit,
                ..
            } => {
                let RestoreTo::Volume { name } = to else {
                    return Err(OpError::new(
                        ErrorKind::Invalid,
                        "--live restores into a new volume or VM (--to NAME); a file cannot be used before it is written",
                    ));
                };
                let cx = LiveContext { rate_limit, ..cx };
                BackupReply::Restored(restore_live(cx, rt, repo, id, name, progress).await?)
            }
            other => {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("not an operation that serves backups: {other:?}"),
                ))
            }
        };
        Ok(Reply::Backup(reply))
    }
}

/// Restores backup `id` live as `name`: a volume, or a VM that starts at once.
async fn restore_live(
    cx: LiveContext,
    rt: Arc<Runtime>,
    repo: RepoSpec,
    id: String,
    name: String,
    progress: Progress,
) -> Result<RestoreReport, OpError> {
    let dir = cx.dir.clone();
    let (r, m) = on_blocking_pool(move || {
        let r = Arc::new(crate::backup::open(&dir, &repo)?);
        let m = r.manifest(&id)?;
        Ok((r, m))
    })
    .await?;
    if m.kind == "vm" {
        return restore_vm_live(cx, rt, r, m, name, progress).await;
    }
    let (c, n, rm) = (cx.clone(), name.clone(), m.clone());
    let resumed = on_blocking_pool(move || c.start(&r, &rm, 0, &n)).await?;
    Ok(RestoreReport {
        id: m.id.clone(),
        to: name.clone(),
        size: m.images[0].size,
        next: Some(match resumed {
            true => format!("'{name}' goes on filling in the background; `cairn backup live` shows how far"),
            false => format!("'{name}' is usable now, its data copied in behind it; `cairn backup live` shows how far"),
        }),
    })
}

/// Restores VM backup `m` live as VM `new`: its memory state (for a standard checkpoint) is
/// restored first, into a file QEMU loads; its disks become volumes filled behind the VM, which
/// starts at once (resuming from memory, or booting). Whatever fails, nothing of it is left.
async fn restore_vm_live(
    cx: LiveContext,
    rt: Arc<Runtime>,
    r: Arc<Repository>,
    m: Manifest,
    new: String,
    progress: Progress,
) -> Result<RestoreReport, OpError> {
    let (store, mm, n) = (cx.store.clone(), m.clone(), new.clone());
    let plan = Arc::new(on_blocking_pool(move || VmPlan::new(&store, &mm, &n)).await?);
    let vms = rt.definitions().clone();
    vms.save(&plan.spec(&new, None))?;
    let state = match plan.checkpoint().kind {
        CheckpointKind::Standard => Some(vms.vm_dir(&new).join("restore-live.tmp")),
        CheckpointKind::DiskOnly => None,
    };
    let made = {
        let (cx, plan, r, m, state) = (
            cx.clone(),
            plan.clone(),
            r.clone(),
            m.clone(),
            state.clone(),
        );
        on_blocking_pool(move || {
            let mut made = Vec::new();
            let result = (|| -> Result<(), OpError> {
                if let Some(path) = &state {
                    let image = m.images.len() - 1;
                    let mut sink = FileSink::create(path, m.images[image].size)?;
                    restore(&r, &m, image, &mut sink, &mut progress.clone())?;
                    sink.finish()?;
                    if let Some(len) = plan.checkpoint().state_len {
                        std::fs::File::options()
                            .write(true)
                            .open(path)
                            .and_then(|f| f.set_len(len))
                            .map_err(|e| {
                                OpError::new(
                                    ErrorKind::Io,
                                    format!("cannot size {}: {e}", path.display()),
                                )
                            })?;
                    }
                }
                for (i, disk) in plan.disks.iter().enumerate() {
                    cx.start(&r, &m, i, disk)?;
                    made.push(disk.clone());
                }
                Ok(())
            })();
            match result {
                Ok(()) => Ok(made),
                Err(e) => {
                    for d in &made {
                        cx.undo(d);
                    }
                    Err(e)
                }
            }
        })
        .await
    };
    let started = match made {
        Ok(made) => {
            let s = match &state {
                Some(file) => rt.resume_from(&new, file).await.map(|_| ()),
                None => rt.start(&new).await.map(|_| ()),
            };
            s.map_err(|e| (OpError::from(e), made))
        }
        Err(e) => Err((e, Vec::new())),
    };
    if let Some(f) = &state {
        let _ = std::fs::remove_file(f);
    }
    if let Err((e, made)) = started {
        for d in &made {
            cx.undo(d);
        }
        let _ = vms.delete(&new);
        return Err(e);
    }
    let how = match state {
        Some(_) => "resumed from its memory state",
        None => "booted",
    };
    Ok(RestoreReport {
        id: m.id.clone(),
        to: new.clone(),
        size: m.images.iter().map(|i| i.size).sum(),
        next: Some(format!(
            "VM '{new}' runs ({how}); its disks fill in behind it, `cairn backup live` shows how far"
        )),
    })
}

fn live_error(why: String) -> OpError {
    OpError::new(ErrorKind::Remote, why)
}
