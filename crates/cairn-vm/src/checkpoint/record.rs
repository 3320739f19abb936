//! A VM checkpoint's record and the operations on it as a whole: begin and finish, delete,
//! rename, describe, clone, and the checks an apply makes first.

use cairn_engine::{Error as EngineError, Store};
use serde::{Deserialize, Serialize};

use crate::spec::{VmSpec, VmStore};
use crate::VmError;

/// What a VM checkpoint holds.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointKind {
    /// Every disk at one instant (crash-consistent); applying it boots the VM cold.
    DiskOnly,
    /// Every disk plus memory and device state of the running VM at that instant; applying it
    /// resumes the guest where it was.
    Standard,
}

/// How the disks of a disk-only checkpoint stand with respect to the guest's file systems.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Consistency {
    /// The VM was stopped: nothing was writing to its disks.
    VmStopped,
    /// All disks at one instant, as after a power cut: the guest's file systems replay their
    /// journals (and applications their logs) when it boots from them.
    Crash,
    /// The guest agent flushed and froze the guest's file systems first, so they are clean on
    /// the disks (like a Hyper-V production checkpoint).
    Application,
}

/// Name of the volume that keeps a VM's saved memory and device state.
pub fn state_volume(vm: &str) -> String {
    format!("{vm}.state")
}

/// The record of one VM checkpoint.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmCheckpoint {
    /// Checkpoint name (also the name of each disk's engine checkpoint).
    pub name: String,
    /// VM name.
    pub vm: String,
    /// What it holds.
    pub kind: CheckpointKind,
    /// The disks it covers, in the VM's order.
    pub disks: Vec<String>,
    /// The VM checkpoint the VM was last taken or applied from.
    pub parent: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Description given at creation.
    pub description: Option<String>,
    /// Whether the VM was running when it was taken.
    pub taken_running: bool,
    /// True until every disk checkpoint exists.
    pub pending: bool,
    /// Bytes of saved VM state in the state volume's checkpoint of the same name (standard
    /// checkpoints only).
    #[serde(default)]
    pub state_len: Option<u64>,
    /// How long taking it took (running VMs), for `vm` benchmarks and diagnosis.
    #[serde(default)]
    pub timings: Option<Timings>,
    /// For a disk-only checkpoint: how consistent its disks are (`None` in records made before
    /// Cairn tracked it, and for standard checkpoints, which resume with the guest's caches).
    #[serde(default)]
    pub consistency: Option<Consistency>,
    /// Why the consistency is what it is, e.g. how many file systems the agent froze, or why
    /// no agent was used.
    #[serde(default)]
    pub consistency_note: Option<String>,
    /// Taken by Cairn to keep the state an apply replaced, not asked for by name.
    #[serde(default)]
    pub automatic: bool,
    /// The VM's memory when taken: a standard checkpoint resumes only into the same memory size.
    #[serde(default)]
    pub memory: Option<u64>,
    /// The VM's vCPUs when taken, for the same reason.
    #[serde(default)]
    pub cpus: Option<u32>,
}

impl VmCheckpoint {
    /// The volumes that hold a checkpoint of its name on its behalf: every disk, and the state
    /// volume for a standard checkpoint.
    pub fn parts(&self) -> Vec<String> {
        let mut parts = self.disks.clone();
        if self.kind == CheckpointKind::Standard {
            parts.push(state_volume(&self.vm));
        }
        parts
    }

    /// What it holds, in a few words: "standard", "disk-only, application-consistent"...
    pub fn kind_summary(&self) -> &'static str {
        kind_summary(self.kind, self.consistency)
    }
}

/// A checkpoint's kind and consistency in a few words, as the CLI and the daemon's log say them.
pub fn kind_summary(kind: CheckpointKind, consistency: Option<Consistency>) -> &'static str {
    match (kind, consistency) {
        (CheckpointKind::Standard, _) => "standard (memory and disks)",
        (CheckpointKind::DiskOnly, None) => "disk-only",
        (CheckpointKind::DiskOnly, Some(Consistency::VmStopped)) => "disk-only, VM stopped",
        (CheckpointKind::DiskOnly, Some(Consistency::Crash)) => "disk-only, crash-consistent",
        (CheckpointKind::DiskOnly, Some(Consistency::Application)) => {
            "disk-only, application-consistent"
        }
    }
}

/// Measured while taking a checkpoint of a running VM.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    /// Microseconds the guest was paused by Cairn (QMP stop to cont, disks checkpointed).
    pub paused_us: u64,
    /// Downtime QEMU reported for the memory snapshot, in ms.
    pub snapshot_downtime_ms: Option<u64>,
    /// Microseconds from the request to the checkpoint being recorded.
    pub total_us: u64,
    /// Microseconds the guest's file systems were frozen (application-consistent checkpoints).
    #[serde(default)]
    pub frozen_us: Option<u64>,
    /// Standard checkpoints: microseconds QEMU took to write the memory snapshot...
    #[serde(default)]
    pub snapshot_us: Option<u64>,
    /// ...to re-lay it with fixed page offsets (the helper QEMU)...
    #[serde(default)]
    pub relayout_us: Option<u64>,
    /// ...and to store it in the state volume.
    #[serde(default)]
    pub store_us: Option<u64>,
}

impl VmStore {
    fn checkpoint_path(&self, vm: &str, name: &str) -> std::path::PathBuf {
        self.vm_dir(vm)
            .join("checkpoints")
            .join(format!("{name}.json"))
    }

    /// Checkpoints of a VM, oldest first (pending ones included).
    pub fn checkpoints(&self, vm: &str) -> Result<Vec<VmCheckpoint>, VmError> {
        self.get(vm)?;
        let dir = self.vm_dir(vm).join("checkpoints");
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(VmError::io("listing VM checkpoints", &dir, e)),
        };
        for entry in rd {
            let p = entry
                .map_err(|e| VmError::io("listing VM checkpoints", &dir, e))?
                .path();
            if p.extension().is_some_and(|x| x == "json") {
                let text = std::fs::read(&p).map_err(|e| VmError::io("reading", &p, e))?;
                let cp: VmCheckpoint = serde_json::from_slice(&text).map_err(|e| {
                    VmError::Invalid(format!("checkpoint record {} is damaged: {e}", p.display()))
                })?;
                out.push(cp);
            }
        }
        out.sort_by_key(|c| (c.created_ms, c.name.clone()));
        Ok(out)
    }

    /// One checkpoint of a VM.
    pub fn checkpoint(&self, vm: &str, name: &str) -> Result<VmCheckpoint, VmError> {
        self.checkpoints(vm)?
            .into_iter()
            .find(|c| c.name == name && !c.pending)
            .ok_or_else(|| VmError::UnknownCheckpoint {
                vm: vm.to_string(),
                name: name.to_string(),
            })
    }

    /// Every VM checkpoint (of any VM) with a part on `volume`.
    pub fn checkpoints_on(&self, volume: &str) -> Result<Vec<VmCheckpoint>, VmError> {
        let mut out = Vec::new();
        for vm in self.list()? {
            for cp in self.checkpoints(&vm.name)? {
                if cp.parts().iter().any(|p| p == volume) {
                    out.push(cp);
                }
            }
        }
        Ok(out)
    }

    /// Refuses a change to volume checkpoint `volume@checkpoint` when it is part of a VM
    /// checkpoint: the VM checkpoint would list a part that is gone, and applying it would fail
    /// half-way. `what` is the change ("delete", "rename").
    pub fn check_not_a_part(
        &self,
        volume: &str,
        checkpoint: &str,
        what: &str,
    ) -> Result<(), VmError> {
        let owner = self
            .checkpoints_on(volume)?
            .into_iter()
            .find(|c| c.name == checkpoint);
        match owner {
            Some(cp) => Err(VmError::State(format!(
                "checkpoint '{volume}@{checkpoint}' is part of VM checkpoint '{vm}@{name}'; {what} it through the VM: `cairn checkpoint {what} {vm}@{name}`",
                vm = cp.vm,
                name = cp.name
            ))),
            None => Ok(()),
        }
    }

    /// Writes a record atomically.
    pub fn save_checkpoint(&self, cp: &VmCheckpoint) -> Result<(), VmError> {
        crate::spec::write_json_atomic(
            &self.checkpoint_path(&cp.vm, &cp.name),
            cp,
            "saving checkpoint record",
        )
    }

    /// Removes a record.
    pub fn remove_checkpoint(&self, vm: &str, name: &str) -> Result<(), VmError> {
        let p = self.checkpoint_path(vm, name);
        std::fs::remove_file(&p).map_err(|e| VmError::io("deleting checkpoint record", &p, e))
    }

    /// Deletes what a crash left of half-made checkpoints of every VM; returns what it removed.
    pub fn roll_back_pending(&self, store: &Store) -> Result<Vec<String>, VmError> {
        let mut removed = Vec::new();
        for vm in self.list()? {
            for cp in self
                .checkpoints(&vm.name)?
                .into_iter()
                .filter(|c| c.pending)
            {
                drop_disk_checkpoints(store, &cp.disks, &cp.name)?;
                self.remove_checkpoint(&vm.name, &cp.name)?;
                removed.push(format!("{}@{}", vm.name, cp.name));
            }
        }
        Ok(removed)
    }
}

pub(super) fn drop_disk_checkpoints(
    store: &Store,
    disks: &[String],
    name: &str,
) -> Result<(), VmError> {
    for d in disks {
        match store.delete_checkpoint(d, name) {
            Ok(())
            | Err(EngineError::UnknownCheckpoint { .. })
            | Err(EngineError::UnknownVolume(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

pub(super) fn engine(e: EngineError) -> VmError {
    VmError::Engine(e)
}

/// Checks everything applying `cp` to its VM needs, before anything is stopped or changed:
/// every part exists, the VM still has those disks (and, for a standard checkpoint, the same
/// disks, memory and vCPUs QEMU saved its state with), and none of them belongs to another VM.
pub fn check_applicable(vms: &VmStore, store: &Store, cp: &VmCheckpoint) -> Result<(), VmError> {
    let spec = vms.get(&cp.vm)?;
    let target = format!("{}@{}", cp.vm, cp.name);
    for part in cp.parts() {
        match store.checkpoint_info(&part, &cp.name) {
            Ok(_) => {}
            Err(EngineError::UnknownCheckpoint { .. } | EngineError::UnknownVolume(_)) => {
                return Err(VmError::State(format!(
                    "cannot apply {target}: its part '{part}@{}' is missing, so the checkpoint is damaged; nothing was changed (delete it with `cairn checkpoint delete {target}`)",
                    cp.name
                )))
            }
            Err(e) => return Err(e.into()),
        }
    }
    for d in &cp.disks {
        if !spec.disks.contains(d) {
            return Err(VmError::State(format!(
                "cannot apply {target}: its disk '{d}' is no longer attached to VM '{}'; attach it again (`cairn vm edit {} --disk ...`) or use `cairn checkpoint apply {d}@{}` for that volume alone; nothing was changed",
                cp.vm, cp.vm, cp.name
            )));
        }
    }
    if cp.kind == CheckpointKind::Standard {
        if cp.state_len.is_none() {
            return Err(VmError::State(format!(
                "cannot apply {target}: its record names no memory state; nothing was changed"
            )));
        }
        let same_hw = spec.disks == cp.disks
            && cp.memory.is_none_or(|m| m == spec.memory)
            && cp.cpus.is_none_or(|c| c == spec.cpus);
        if !same_hw {
            return Err(VmError::State(format!(
                "cannot apply {target}: QEMU saved its memory for {} of memory, {} vCPU(s) and disks {}, and VM '{}' now has {}, {} and {}; edit the VM back to resume it; nothing was changed",
                cp.memory.map_or("the same amount".to_string(), |m| format!("{} MiB", m >> 20)),
                cp.cpus.map_or("the same".to_string(), |c| c.to_string()),
                cp.disks.join(", "),
                cp.vm,
                format_args!("{} MiB", spec.memory >> 20),
                spec.cpus,
                spec.disks.join(", ")
            )));
        }
    }
    Ok(())
}

/// Whether the VM's disks differ from the checkpoint it was last taken or applied from (or,
/// without one, hold any data): a stopped VM whose disks are unchanged loses nothing when a
/// checkpoint is applied over it.
pub fn disks_changed(store: &Store, spec: &VmSpec) -> Result<bool, VmError> {
    for d in &spec.disks {
        if head_changed_since(store, d, spec.parent.as_deref())? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Whether a volume's head differs from its checkpoint `base` (a `base` it lacks counts as
/// different), or, without a base, holds any data: what an apply would lose without keeping it.
pub fn head_changed_since(
    store: &Store,
    volume: &str,
    base: Option<&str>,
) -> Result<bool, EngineError> {
    let head = cairn_engine::Target::head(volume);
    match base {
        Some(b) => match store.diff(&cairn_engine::Target::checkpoint(volume, b), &head) {
            Ok(diff) => Ok(!diff.is_empty()),
            Err(EngineError::UnknownCheckpoint { .. }) => Ok(true),
            Err(e) => Err(e),
        },
        None => Ok(store.volume_info(volume)?.referenced > 0),
    }
}

/// Records a pending checkpoint (call before the disks are checkpointed).
pub fn begin(
    vms: &VmStore,
    store: &Store,
    spec: &VmSpec,
    name: &str,
    description: Option<&str>,
    running: bool,
    now_ms: u64,
) -> Result<VmCheckpoint, VmError> {
    cairn_engine::validate_name(name).map_err(engine)?;
    if vms.checkpoints(&spec.name)?.iter().any(|c| c.name == name) {
        return Err(VmError::Engine(EngineError::CheckpointExists {
            volume: spec.name.clone(),
            name: name.to_string(),
        }));
    }
    if spec.disks.is_empty() {
        return Err(VmError::Invalid(format!(
            "VM '{}' has no disks to checkpoint",
            spec.name
        )));
    }
    // Fail before touching anything if a disk already has a checkpoint of that name.
    for d in &spec.disks {
        match store.checkpoint_info(d, name) {
            Err(EngineError::UnknownCheckpoint { .. }) => {}
            Ok(_) => {
                return Err(VmError::Engine(EngineError::CheckpointExists {
                    volume: d.clone(),
                    name: name.to_string(),
                }))
            }
            Err(e) => return Err(engine(e)),
        }
    }
    let cp = VmCheckpoint {
        name: name.to_string(),
        vm: spec.name.clone(),
        kind: CheckpointKind::DiskOnly,
        disks: spec.disks.clone(),
        parent: spec.parent.clone(),
        created_ms: now_ms,
        description: description.map(str::to_string),
        taken_running: running,
        pending: true,
        state_len: None,
        timings: None,
        consistency: (!running).then_some(Consistency::VmStopped),
        consistency_note: None,
        automatic: false,
        memory: Some(spec.memory),
        cpus: Some(spec.cpus),
    };
    vms.save_checkpoint(&cp)?;
    Ok(cp)
}

/// Checkpoints every disk in memory (the caller has paused the guest if it runs, and makes them
/// durable with [`persist_disks`], after resuming it); rolls back on failure. Each takes
/// microseconds, so the pause does not include the commit.
pub fn take_disks(store: &Store, cp: &VmCheckpoint) -> Result<(), VmError> {
    for (i, d) in cp.disks.iter().enumerate() {
        if let Err(e) = store.create_checkpoint_unflushed(d, &cp.name, cp.description.as_deref()) {
            let _ = drop_disk_checkpoints(store, &cp.disks[..i], &cp.name);
            return Err(engine(e));
        }
    }
    Ok(())
}

/// Makes the disk checkpoints [`take_disks`] took durable, all in one commit; on failure nothing
/// of them remains (the engine falls back to its last durable state).
pub fn persist_disks(store: &Store, cp: &VmCheckpoint) -> Result<(), VmError> {
    store.flush().map_err(|e| {
        let _ = drop_disk_checkpoints(store, &cp.disks, &cp.name);
        engine(e)
    })
}

/// Marks the record complete and makes it the VM's parent checkpoint.
pub fn finish(vms: &VmStore, mut cp: VmCheckpoint) -> Result<VmCheckpoint, VmError> {
    cp.pending = false;
    vms.save_checkpoint(&cp)?;
    let mut spec = vms.get(&cp.vm)?;
    spec.parent = Some(cp.name.clone());
    vms.save(&spec)?;
    Ok(cp)
}

/// Gives up on a pending record (its disk checkpoints are already gone).
pub fn abandon(vms: &VmStore, cp: &VmCheckpoint) {
    let _ = vms.remove_checkpoint(&cp.vm, &cp.name);
}

/// Makes every disk the checkpoint's state (the VM must be stopped).
pub fn apply_disks(vms: &VmStore, store: &Store, cp: &VmCheckpoint) -> Result<(), VmError> {
    for d in &cp.disks {
        store.apply_checkpoint(d, &cp.name, None).map_err(engine)?;
    }
    let mut spec = vms.get(&cp.vm)?;
    spec.parent = Some(cp.name.clone());
    vms.save(&spec)
}

/// Deletes a VM checkpoint: its children move up to its parent (as each disk's engine
/// checkpoints do), then each part's engine checkpoint goes, then the record. A crash part-way
/// leaves the children already re-parented, which is the final shape.
pub fn delete(vms: &VmStore, store: &Store, cp: &VmCheckpoint) -> Result<(), VmError> {
    for mut child in vms.checkpoints(&cp.vm)? {
        if child.parent.as_deref() == Some(cp.name.as_str()) {
            child.parent = cp.parent.clone();
            vms.save_checkpoint(&child)?;
        }
    }
    drop_disk_checkpoints(store, &cp.disks, &cp.name)?;
    drop_disk_checkpoints(store, &[state_volume(&cp.vm)], &cp.name)?;
    vms.remove_checkpoint(&cp.vm, &cp.name)?;
    let mut spec = vms.get(&cp.vm)?;
    if spec.parent.as_deref() == Some(cp.name.as_str()) {
        spec.parent = cp.parent.clone();
        vms.save(&spec)?;
    }
    Ok(())
}

/// Replaces a VM checkpoint's description, on its record and on each disk's checkpoint.
pub fn describe(
    vms: &VmStore,
    store: &Store,
    cp: &VmCheckpoint,
    description: Option<&str>,
) -> Result<VmCheckpoint, VmError> {
    for d in &cp.disks {
        store.describe_checkpoint(d, &cp.name, description)?;
    }
    let mut cp = cp.clone();
    cp.description = description.map(str::to_string);
    vms.save_checkpoint(&cp)?;
    Ok(cp)
}

/// Renames a VM checkpoint: each disk's engine checkpoint, the record, and references to it.
pub fn rename(
    vms: &VmStore,
    store: &Store,
    cp: &VmCheckpoint,
    new: &str,
) -> Result<VmCheckpoint, VmError> {
    cairn_engine::validate_name(new).map_err(engine)?;
    if vms.checkpoints(&cp.vm)?.iter().any(|c| c.name == new) {
        return Err(VmError::Invalid(format!(
            "checkpoint '{}@{new}' already exists; pick another name",
            cp.vm
        )));
    }
    for (i, d) in cp.disks.iter().enumerate() {
        if let Err(e) = store.rename_checkpoint(d, &cp.name, new) {
            // Put back the ones already renamed.
            for done in &cp.disks[..i] {
                let _ = store.rename_checkpoint(done, new, &cp.name);
            }
            return Err(engine(e));
        }
    }
    if cp.kind == CheckpointKind::Standard {
        if let Err(e) = store.rename_checkpoint(&state_volume(&cp.vm), &cp.name, new) {
            for done in &cp.disks {
                let _ = store.rename_checkpoint(done, new, &cp.name);
            }
            return Err(engine(e));
        }
    }
    let mut renamed = cp.clone();
    renamed.name = new.to_string();
    vms.save_checkpoint(&renamed)?;
    vms.remove_checkpoint(&cp.vm, &cp.name)?;
    for mut child in vms.checkpoints(&cp.vm)? {
        if child.parent.as_deref() == Some(cp.name.as_str()) {
            child.parent = Some(new.to_string());
            vms.save_checkpoint(&child)?;
        }
    }
    let mut spec = vms.get(&cp.vm)?;
    if spec.parent.as_deref() == Some(cp.name.as_str()) {
        spec.parent = Some(new.to_string());
        vms.save(&spec)?;
    }
    Ok(renamed)
}

/// A new VM from a checkpoint: every disk cloned (sharing all blocks) as `NEW-DISK`, a fresh MAC
/// and machine UUID, the same memory, CPUs, kernel and network.
pub fn clone_vm(
    vms: &VmStore,
    store: &Store,
    cp: &VmCheckpoint,
    new_name: &str,
    now_ms: u64,
) -> Result<VmSpec, VmError> {
    cairn_engine::validate_name(new_name).map_err(engine)?;
    if vms.exists(new_name) {
        return Err(VmError::Exists(new_name.to_string()));
    }
    let source = vms.get(&cp.vm)?;
    let names: Vec<String> = cp.disks.iter().map(|d| format!("{new_name}-{d}")).collect();
    for (i, (d, n)) in cp.disks.iter().zip(&names).enumerate() {
        if let Err(e) = store.clone_checkpoint(d, &cp.name, n) {
            for made in &names[..i] {
                let _ = store.delete_volume(made);
            }
            return Err(engine(e));
        }
    }
    let spec = VmSpec {
        name: new_name.to_string(),
        disks: names.clone(),
        mac: crate::spec::fresh_mac(),
        uuid: crate::spec::fresh_uuid(),
        created_ms: now_ms,
        parent: None,
        ..source
    };
    if let Err(e) = vms.save(&spec) {
        for made in &names {
            let _ = store.delete_volume(made);
        }
        return Err(e);
    }
    Ok(spec)
}
