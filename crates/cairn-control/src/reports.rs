//! What operations report beyond the engine's own types: a VM checkpoint as users see it (its
//! kind, consistency and size with memory), a VM's space per checkpoint, and what an apply did.

use cairn_engine::{SpaceReport, Store, VolumeInfo};
use cairn_vm::checkpoint::{state_volume, CheckpointKind, Consistency, VmCheckpoint};
use serde::{Deserialize, Serialize};

/// A VM checkpoint as reported to users.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCheckpointInfo {
    /// VM name.
    pub vm: String,
    /// Checkpoint name.
    pub name: String,
    /// `standard` (memory and disks) or `disk-only`.
    pub kind: CheckpointKind,
    /// For disk-only checkpoints: `application`, `crash` or `vm-stopped`.
    pub consistency: Option<Consistency>,
    /// Why the consistency is what it is.
    pub consistency_note: Option<String>,
    /// The disks it covers.
    pub disks: Vec<String>,
    /// Parent checkpoint.
    pub parent: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Description.
    pub description: Option<String>,
    /// Whether the VM was last taken or applied from it.
    pub is_head_parent: bool,
    /// Taken by Cairn to keep the state an apply replaced.
    pub automatic: bool,
    /// Sum of the disks' sizes.
    pub size: u64,
    /// Bytes its disks map.
    pub disks_referenced: u64,
    /// Bytes its saved memory and device state maps in the state volume (0 for disk-only).
    pub memory_referenced: u64,
    /// Disks and memory together.
    pub referenced: u64,
}

impl VmCheckpointInfo {
    /// The report of `cp`; `head` is the checkpoint the VM was last taken or applied from.
    pub fn of(store: &Store, cp: &VmCheckpoint, head: Option<&str>) -> VmCheckpointInfo {
        let referenced_on = |volume: &str| -> (u64, u64) {
            store
                .checkpoint_info(volume, &cp.name)
                .map_or((0, 0), |c| (c.size, c.referenced))
        };
        let (mut size, mut disks_referenced) = (0, 0);
        for d in &cp.disks {
            let (s, r) = referenced_on(d);
            size += s;
            disks_referenced += r;
        }
        let memory_referenced = match cp.kind {
            CheckpointKind::Standard => referenced_on(&state_volume(&cp.vm)).1,
            CheckpointKind::DiskOnly => 0,
        };
        VmCheckpointInfo {
            vm: cp.vm.clone(),
            name: cp.name.clone(),
            kind: cp.kind,
            consistency: cp.consistency,
            consistency_note: cp.consistency_note.clone(),
            disks: cp.disks.clone(),
            parent: cp.parent.clone(),
            created_ms: cp.created_ms,
            description: cp.description.clone(),
            is_head_parent: head == Some(cp.name.as_str()),
            automatic: cp.automatic,
            size,
            disks_referenced,
            memory_referenced,
            referenced: disks_referenced + memory_referenced,
        }
    }
}

/// Space held by one VM checkpoint: its disks' checkpoints and its memory state together.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCheckpointSpace {
    /// Checkpoint name.
    pub name: String,
    /// Bytes its disks' checkpoints map.
    pub disks_referenced: u64,
    /// Bytes (data and block-map pages) deleting its disks' checkpoints frees.
    pub disks_unique: u64,
    /// Bytes its memory state maps.
    pub memory_referenced: u64,
    /// Bytes deleting its memory state frees.
    pub memory_unique: u64,
    /// Disks and memory.
    pub referenced: u64,
    /// Disks and memory: what deleting the VM checkpoint frees. Its parts live on different
    /// volumes, so their unique bytes add up.
    pub unique: u64,
}

/// A VM's space: its volumes (disks and state volume) as the engine reports them, and each VM
/// checkpoint's total.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpaceReport {
    /// VM name.
    pub vm: String,
    /// Per VM checkpoint, oldest first.
    pub checkpoints: Vec<VmCheckpointSpace>,
    /// The engine's report, limited to the VM's volumes.
    pub store: SpaceReport,
}

impl VmSpaceReport {
    /// Sums each VM checkpoint's parts out of `store`'s per-volume report.
    pub fn of(vm: &str, cps: &[VmCheckpoint], store: SpaceReport) -> VmSpaceReport {
        let part = |volume: &str, name: &str| -> (u64, u64) {
            store
                .volumes
                .iter()
                .find(|v| v.name == volume)
                .and_then(|v| v.checkpoints.iter().find(|c| c.name == name))
                .map_or((0, 0), |c| (c.referenced, c.unique))
        };
        let checkpoints = cps
            .iter()
            .filter(|c| !c.pending)
            .map(|cp| {
                let (mut dr, mut du) = (0, 0);
                for d in &cp.disks {
                    let (r, u) = part(d, &cp.name);
                    dr += r;
                    du += u;
                }
                let (mr, mu) = match cp.kind {
                    CheckpointKind::Standard => part(&state_volume(vm), &cp.name),
                    CheckpointKind::DiskOnly => (0, 0),
                };
                VmCheckpointSpace {
                    name: cp.name.clone(),
                    disks_referenced: dr,
                    disks_unique: du,
                    memory_referenced: mr,
                    memory_unique: mu,
                    referenced: dr + mr,
                    unique: du + mu,
                }
            })
            .collect();
        VmSpaceReport {
            vm: vm.to_string(),
            checkpoints,
            store,
        }
    }
}

pub use cairn_vm::checkpoint::{KeptState, VmOutcome};

/// What an apply did.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReport {
    /// `VOLUME@CHECKPOINT` or `VM@CHECKPOINT` applied.
    pub applied: String,
    /// The checkpoint that keeps the state the apply replaced, if one was taken.
    pub saved_as: Option<String>,
    /// Whether Cairn chose to take it (the state differed from every checkpoint).
    pub saved_automatically: bool,
    /// For a VM: what became of it.
    pub vm: Option<VmOutcome>,
    /// For a volume: its head now.
    pub volume: Option<VolumeInfo>,
}

impl ApplyReport {
    /// The report of applying `applied`, having kept `kept`.
    pub fn new(
        applied: String,
        kept: Option<&KeptState>,
        vm: Option<VmOutcome>,
        volume: Option<VolumeInfo>,
    ) -> ApplyReport {
        ApplyReport {
            applied,
            saved_as: kept.map(|k| k.name.clone()),
            saved_automatically: kept.is_some_and(|k| k.automatic),
            vm,
            volume,
        }
    }
}
