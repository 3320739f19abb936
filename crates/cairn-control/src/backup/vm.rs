//! VM backups: every disk of a VM checkpoint, its saved memory and device state (for a standard
//! checkpoint), the VM's definition and the checkpoint's record, in one backup; restored as a new
//! VM with a fresh identity (MAC, SMBIOS UUID) whose checkpoint of the same name resumes the guest
//! where it was.

use cairn_backup::create::Source;
use cairn_backup::{Manifest, Repository};
use cairn_engine::Store;
use cairn_vm::checkpoint::{state_volume, CheckpointKind, VmCheckpoint};
use cairn_vm::{VmError, VmSpec};
use serde::{Deserialize, Serialize};

use super::{BackupGuards, RestoreReport};
use crate::error::{ErrorKind, OpError};

/// What a VM backup keeps besides its images.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmExtra {
    spec: VmSpec,
    checkpoint: VmCheckpoint,
}

/// What `NAME@CHECKPOINT` backs up: a VM checkpoint's parts if `NAME` is a VM, else a volume.
pub(super) fn source<'a>(
    store: &'a Store,
    store_id: &'a str,
    name: &str,
    checkpoint: &str,
) -> Result<Source<'a>, OpError> {
    let vms = match crate::execute::vm_store(store) {
        Ok(v) if v.exists(name) => v,
        _ => return Ok(Source::volume(store, store_id, name, checkpoint)),
    };
    let cp = vms.checkpoint(name, checkpoint)?;
    if cp.pending {
        return Err(OpError::new(
            ErrorKind::State,
            format!("VM checkpoint '{name}@{checkpoint}' is still being taken; back it up once it is complete"),
        ));
    }
    let spec = vms.get(name)?;
    let extra = VmExtra {
        spec,
        checkpoint: cp.clone(),
    };
    Ok(Source {
        store,
        store_id,
        kind: "vm",
        name: name.into(),
        checkpoint: checkpoint.into(),
        volumes: cp.parts(),
        extra: Some(serde_json::to_value(&extra).expect("VM records serialize")),
    })
}

/// What restoring VM backup `m` as new VM `new` makes: its disks (`NEW-DISK`), in the order of
/// the backup's images, then its memory state's volume (for a standard checkpoint).
pub(crate) struct VmPlan {
    extra: VmExtra,
    /// The new disks' names.
    pub disks: Vec<String>,
    /// The volume each image goes to.
    pub targets: Vec<String>,
}

impl VmPlan {
    /// Checks that backup `m` is a VM's and that nothing of VM `new` exists yet.
    pub(crate) fn new(store: &Store, m: &Manifest, new: &str) -> Result<VmPlan, OpError> {
        let extra: VmExtra = m
            .extra
            .clone()
            .and_then(|v| serde_json::from_value(v).ok())
            .ok_or_else(|| {
                OpError::new(
                    ErrorKind::Corrupt,
                    format!("backup {} of VM '{}' lacks its VM definition; restore its disks with `--to-file` per image is not possible either", m.id, m.name),
                )
            })?;
        cairn_engine::validate_name(new)?;
        let vms = crate::execute::vm_store(store)?;
        if vms.exists(new) {
            return Err(VmError::Exists(new.into()).into());
        }
        let cp = &extra.checkpoint;
        let disks: Vec<String> = cp.disks.iter().map(|d| format!("{new}-{d}")).collect();
        let mut targets = disks.clone();
        if cp.kind == CheckpointKind::Standard {
            targets.push(state_volume(new));
        }
        if targets.len() != m.images.len() {
            return Err(OpError::new(
                ErrorKind::Corrupt,
                format!(
                    "backup {} holds {} images for {} VM parts",
                    m.id,
                    m.images.len(),
                    targets.len()
                ),
            ));
        }
        for t in &targets {
            if store.volume_info(t).is_ok() {
                return Err(cairn_engine::Error::VolumeExists(t.clone()).into());
            }
        }
        Ok(VmPlan {
            extra,
            disks,
            targets,
        })
    }

    /// The checkpoint the backup was taken of.
    pub(crate) fn checkpoint(&self) -> &VmCheckpoint {
        &self.extra.checkpoint
    }

    /// The new VM's definition: the backed-up one with the new disks, a fresh MAC and UUID, and
    /// `parent` as its checkpoint.
    pub(crate) fn spec(&self, new: &str, parent: Option<String>) -> VmSpec {
        VmSpec {
            name: new.into(),
            disks: self.disks.clone(),
            mac: cairn_vm::spec::fresh_mac(),
            uuid: cairn_vm::spec::fresh_uuid(),
            created_ms: cairn_vm::now_ms(),
            parent,
            ..self.extra.spec.clone()
        }
    }
}

/// Restores VM backup `m` as new VM `new`: disks `NEW-DISK` (as `clone` names them), memory state
/// in `NEW.state`, each with the checkpoint, then the definition with a fresh MAC and UUID and
/// the VM checkpoint record. Whatever fails, nothing of the new VM is left behind.
pub(super) fn restore_vm(
    store: &Store,
    guards: &BackupGuards,
    r: &Repository,
    m: &Manifest,
    new: &str,
    progress: &mut dyn cairn_backup::Progress,
) -> Result<RestoreReport, OpError> {
    let plan = VmPlan::new(store, m, new)?;
    let vms = crate::execute::vm_store(store)?;
    let cp = plan.checkpoint();
    let (disks, targets) = (&plan.disks, &plan.targets);
    let total: u64 = m.images.iter().map(|i| i.size.max(1)).sum();
    let mut before = 0u64;
    let mut made: Vec<String> = Vec::new();
    let result = (|| -> Result<(), OpError> {
        for (i, t) in targets.iter().enumerate() {
            let size = m.images[i].size.max(1);
            let mut part = Part {
                whole: &mut *progress,
                before,
                size,
                total,
            };
            super::restore::image_to_volume(store, guards, r, m, i, t, &mut part)?;
            made.push(t.clone());
            store.create_checkpoint(t, &cp.name, cp.description.as_deref())?;
            before += size;
        }
        vms.save(&plan.spec(new, Some(cp.name.clone())))?;
        let record = VmCheckpoint {
            vm: new.into(),
            disks: disks.clone(),
            parent: None,
            pending: false,
            automatic: false,
            ..cp.clone()
        };
        if let Err(e) = vms.save_checkpoint(&record) {
            let _ = vms.delete(new);
            return Err(e.into());
        }
        Ok(())
    })();
    if let Err(e) = result {
        for t in &made {
            let _ = store.delete_volume(t);
        }
        return Err(e);
    }
    let next = match cp.kind {
        CheckpointKind::Standard => format!(
            "`cairn checkpoint apply {new}@{}` (with `cairn serve` running) resumes the guest where it was",
            cp.name
        ),
        CheckpointKind::DiskOnly => format!("`cairn vm start {new}` boots it from the restored disks"),
    };
    Ok(RestoreReport {
        id: m.id.clone(),
        to: new.into(),
        size: m.images.iter().map(|i| i.size).sum(),
        next: Some(next),
    })
}

/// One image's share of a VM restore's progress.
struct Part<'a> {
    whole: &'a mut dyn cairn_backup::Progress,
    /// Bytes of the images restored before this one, of `total`.
    before: u64,
    size: u64,
    total: u64,
}

impl cairn_backup::Progress for Part<'_> {
    fn report(&mut self, millionths: u64) {
        let n = (self.before * 1_000_000 + millionths * self.size) / self.total;
        self.whole.report(n);
    }

    fn cancelled(&self) -> bool {
        self.whole.cancelled()
    }
}
