//! Every store operation a user can ask for, as data ([`Op`] in, [`Reply`] out), and the one
//! function that performs it ([`execute`]).
//!
//! The CLI builds an `Op` from its arguments and either runs `execute` on a store it opened
//! itself or sends the `Op` to the daemon, which runs the same `execute` on the store it owns.
//! So each command's logic exists once, whichever way it is reached, and the JSON the daemon
//! speaks is exactly these types.

use cairn_engine::fsck::FsckReport;
use cairn_engine::{
    CheckpointInfo, DefragReport, Error as EngineError, Extent, SaveCurrent, SpaceReport, Store,
    Target, VolumeInfo,
};
use cairn_vm::{VmError, VmSpec, VmStatus, VmStore};

use crate::reports::{ApplyReport, KeptState, VmCheckpointInfo, VmSpaceReport};
use cairn_vm::checkpoint::head_changed_since;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Largest data an `Op::VolumeWrite` carries or an `Op::VolumeRead` returns; bigger transfers
/// are split by the caller (bulk data belongs on NBD, not in JSON).
pub const MAX_DATA: u64 = 4 << 20;

/// One operation on a store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Create an empty volume.
    VolumeCreate {
        /// Name.
        name: String,
        /// Size in bytes.
        size: u64,
    },
    /// All volumes.
    VolumeList,
    /// One volume.
    VolumeInfo {
        /// Name.
        name: String,
    },
    /// Grow a volume.
    VolumeResize {
        /// Name.
        name: String,
        /// New size in bytes.
        size: u64,
    },
    /// Delete a volume and its checkpoints.
    VolumeDelete {
        /// Name.
        name: String,
    },
    /// Move a head's fragmented ranges into contiguous blocks (shared blocks are copied).
    VolumeDefrag {
        /// Name.
        name: String,
        /// Only report what a run would move and cost.
        #[serde(default)]
        dry_run: bool,
        /// Move a 2 MiB range only when it lies in at least this many extents.
        #[serde(default = "default_min_extents")]
        min_extents: u64,
    },
    /// Write bytes to a head, then flush.
    VolumeWrite {
        /// Volume.
        name: String,
        /// Byte offset.
        offset: u64,
        /// The bytes (base64 in JSON), at most [`MAX_DATA`].
        #[serde(with = "b64")]
        data: Vec<u8>,
    },
    /// Read bytes from a head or checkpoint.
    VolumeRead {
        /// `VOLUME` or `VOLUME@CHECKPOINT`.
        target: String,
        /// Byte offset.
        offset: u64,
        /// Bytes, at most [`MAX_DATA`].
        length: u64,
    },
    /// Take a checkpoint of a head, or of every disk of a VM (with its memory when it runs,
    /// unless `disk_only`).
    CheckpointCreate {
        /// Volume or VM.
        volume: String,
        /// Checkpoint name; without one, Cairn names it from the time (`cp-YYYYMMDD-HHMMSS`).
        #[serde(default)]
        name: Option<String>,
        /// Optional description.
        description: Option<String>,
        /// For a running VM: disks only, no memory state.
        #[serde(default)]
        disk_only: bool,
        /// With `disk_only`: fail unless the guest agent freezes the guest's file systems
        /// (otherwise Cairn falls back to crash-consistent and says so).
        #[serde(default)]
        quiesce: bool,
    },
    /// Checkpoints of a volume.
    CheckpointList {
        /// Volume.
        volume: String,
    },
    /// Make the head (or a VM's disks, and memory) a checkpoint's state. The state it replaces
    /// is kept as a checkpoint first: named `save_current`, else, when it differs from every
    /// checkpoint, an automatic one (`auto-YYYYMMDD-HHMMSS`), unless `discard_current`.
    CheckpointApply {
        /// Volume or VM.
        volume: String,
        /// Checkpoint.
        name: String,
        /// Keep the current state under this name.
        save_current: Option<String>,
        /// Keep nothing of the current state.
        #[serde(default)]
        discard_current: bool,
    },
    /// Delete a checkpoint (its children move up to its parent).
    CheckpointDelete {
        /// Volume or VM.
        volume: String,
        /// Checkpoint.
        name: String,
        /// Also delete every checkpoint under it.
        #[serde(default)]
        children: bool,
    },
    /// Replace a checkpoint's description.
    CheckpointEdit {
        /// Volume or VM.
        volume: String,
        /// Checkpoint.
        name: String,
        /// New description (`None` removes it).
        description: Option<String>,
    },
    /// Rename a checkpoint.
    CheckpointRename {
        /// Volume.
        volume: String,
        /// Current name.
        name: String,
        /// New name.
        new_name: String,
    },
    /// A new volume whose head starts as a checkpoint.
    Clone {
        /// Source volume.
        volume: String,
        /// Source checkpoint.
        checkpoint: String,
        /// New volume's name.
        new_name: String,
    },
    /// Ranges that differ between two states of a volume.
    Diff {
        /// `VOLUME` or `VOLUME@CHECKPOINT`.
        a: String,
        /// Same.
        b: String,
    },
    /// Space accounting.
    Space {
        /// Only this volume.
        volume: Option<String>,
    },
    /// Check every invariant of the open store.
    Fsck,
    /// Make every acknowledged write durable.
    Flush,
    /// Define a VM.
    VmCreate(VmDefinition),
    /// All VM definitions.
    VmList,
    /// One VM definition.
    VmInfo {
        /// VM name.
        name: String,
    },
    /// Change a stopped VM's definition; fields left out stay as they are.
    VmEdit(VmDefinition),
    /// Delete a stopped VM: its definition, its VM checkpoint records and its saved memory states
    /// (the state volume). Its disks stay, each with its own checkpoints, as plain volumes.
    VmDelete {
        /// VM name.
        name: String,
    },
    /// Start a VM (daemon only).
    VmStart {
        /// VM name.
        name: String,
    },
    /// Power a VM off: ACPI, then a hard stop after `timeout_secs` (daemon only).
    VmStop {
        /// VM name.
        name: String,
        /// Seconds the guest gets to power off.
        timeout_secs: u64,
    },
    /// Kill a VM's QEMU at once (daemon only).
    VmKill {
        /// VM name.
        name: String,
    },
    /// State, pid, uptime, accelerator.
    VmStatus {
        /// VM name.
        name: String,
    },
}

/// The user-settable fields of a VM; on edit, `None` keeps the current value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmDefinition {
    /// VM name.
    pub name: String,
    /// Memory in bytes.
    pub memory: Option<u64>,
    /// vCPUs.
    pub cpus: Option<u32>,
    /// Volumes, in order (replaces the list on edit).
    pub disks: Option<Vec<String>>,
    /// Kernel file.
    pub kernel: Option<PathBuf>,
    /// Initramfs file.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// `user` or none.
    pub net: Option<String>,
    /// `kvm` or `tcg`; automatic when absent.
    pub accel: Option<String>,
}

/// What an [`Op`] returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", content = "value", rename_all = "snake_case")]
pub enum Reply {
    /// Nothing to report.
    Done,
    /// One volume.
    Volume(VolumeInfo),
    /// Volumes.
    Volumes(Vec<VolumeInfo>),
    /// One checkpoint.
    Checkpoint(CheckpointInfo),
    /// A volume's checkpoints and which one its head came from.
    Checkpoints {
        /// All checkpoints.
        checkpoints: Vec<CheckpointInfo>,
        /// The head's parent.
        head_parent: Option<String>,
    },
    /// One VM checkpoint.
    VmCheckpoint(VmCheckpointInfo),
    /// A VM's checkpoints and which one it was last taken or applied from.
    VmCheckpoints {
        /// All of them, oldest first.
        checkpoints: Vec<VmCheckpointInfo>,
        /// The VM's parent checkpoint.
        head_parent: Option<String>,
    },
    /// Checkpoints deleted, in the order they went.
    Deleted(Vec<String>),
    /// What an apply did.
    Applied(ApplyReport),
    /// A VM's space, per VM checkpoint.
    VmSpace(VmSpaceReport),
    /// Byte ranges.
    Extents(Vec<Extent>),
    /// Space report.
    Space(SpaceReport),
    /// Fsck report.
    Fsck(FsckReport),
    /// What a defrag moved and cost.
    Defrag(DefragReport),
    /// Bytes read (base64 in JSON).
    Bytes(#[serde(with = "b64")] Vec<u8>),
    /// One VM definition.
    Vm(VmSpec),
    /// VM definitions.
    Vms(Vec<VmSpec>),
    /// A VM's run state.
    VmStatus(VmStatus),
}

fn default_min_extents() -> u64 {
    cairn_engine::DEFRAG_MIN_EXTENTS
}

/// What kind of failure an [`OpError`] is, so callers (and HTTP) can react without parsing text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// A volume or checkpoint that does not exist.
    NotFound,
    /// A name already taken.
    Exists,
    /// A request that cannot be done as asked (bad name, range, size...).
    Invalid,
    /// The host filesystem is full.
    NoSpace,
    /// The store is held by another process.
    Busy,
    /// The store's metadata is damaged.
    Corrupt,
    /// The host failed an I/O call.
    Io,
    /// The daemon could not be reached or answered nonsense.
    Daemon,
    /// The object is in the wrong state for the request (e.g. a running VM).
    State,
    /// QEMU is missing, too old, or failed.
    Vm,
}

/// A failed operation: a kind and the one-line message users see.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct OpError {
    /// Kind of failure.
    pub kind: ErrorKind,
    /// What failed, on which object, and what to do.
    pub message: String,
}

impl OpError {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> OpError {
        OpError {
            kind,
            message: message.into(),
        }
    }
}

impl ErrorKind {
    /// The kind's name in JSON (`not_found`, `no_space`...).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Exists => "exists",
            ErrorKind::Invalid => "invalid",
            ErrorKind::NoSpace => "no_space",
            ErrorKind::Busy => "busy",
            ErrorKind::Corrupt => "corrupt",
            ErrorKind::Io => "io",
            ErrorKind::Daemon => "daemon",
            ErrorKind::State => "state",
            ErrorKind::Vm => "vm",
        }
    }

    /// The kind of an engine error.
    pub fn of_engine(e: &EngineError) -> ErrorKind {
        use EngineError as E;
        match e {
            E::UnknownVolume(_) | E::UnknownCheckpoint { .. } | E::NoStore(_) => {
                ErrorKind::NotFound
            }
            E::VolumeExists(_) | E::CheckpointExists { .. } | E::StoreExists(_) => {
                ErrorKind::Exists
            }
            E::InvalidName { .. }
            | E::OutOfRange { .. }
            | E::InvalidSize { .. }
            | E::Invalid(_) => ErrorKind::Invalid,
            E::NoSpace { .. } => ErrorKind::NoSpace,
            E::Locked { .. } => ErrorKind::Busy,
            E::Corrupt { .. } | E::Format { .. } => ErrorKind::Corrupt,
            E::Io { .. } => ErrorKind::Io,
        }
    }

    /// The kind of a VM error.
    pub fn of_vm(e: &VmError) -> ErrorKind {
        match e {
            VmError::UnknownVm(_) => ErrorKind::NotFound,
            VmError::Exists(_) => ErrorKind::Exists,
            VmError::Running(_) | VmError::NotRunning(_) => ErrorKind::State,
            VmError::Invalid(_) => ErrorKind::Invalid,
            VmError::UnknownCheckpoint { .. } => ErrorKind::NotFound,
            VmError::State(_) => ErrorKind::State,
            VmError::Engine(e) => ErrorKind::of_engine(e),
            VmError::Qemu(_) | VmError::Qmp(_) => ErrorKind::Vm,
            VmError::Io { .. } => ErrorKind::Io,
        }
    }
}

impl From<EngineError> for OpError {
    fn from(e: EngineError) -> OpError {
        OpError::new(ErrorKind::of_engine(&e), e.to_string())
    }
}

impl From<VmError> for OpError {
    fn from(e: VmError) -> OpError {
        OpError::new(ErrorKind::of_vm(&e), e.to_string())
    }
}

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

pub(crate) fn needs_daemon(what: &str) -> OpError {
    OpError::new(
        ErrorKind::State,
        format!("{what} needs the Cairn daemon, which runs and supervises VMs; start it with `cairn serve`"),
    )
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
pub fn execute(store: &Store, op: Op, progress: &mut dyn FnMut(u64)) -> Result<Reply, OpError> {
    if let Some(r) = crate::vm_ops::execute_vm_checkpoint(store, &op)? {
        return Ok(r);
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
                None => new_volume_checkpoint_name(store, &volume, crate::vm_ops::UNNAMED_PREFIX)?,
            };
            Reply::Checkpoint(store.create_checkpoint(&volume, &name, description.as_deref())?)
        }
        Op::CheckpointList { volume } => Reply::Checkpoints {
            checkpoints: store.list_checkpoints(&volume)?,
            head_parent: store.volume_info(&volume)?.parent,
        },
        Op::CheckpointApply {
            volume,
            name,
            save_current,
            discard_current,
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
                || new_volume_checkpoint_name(store, &volume, crate::vm_ops::AUTOMATIC_PREFIX),
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

/// Serde helper: bytes as a base64 string.
mod b64 {
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(b))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::Options;

    #[test]
    fn ops_and_replies_survive_json() {
        let ops = [
            Op::VolumeWrite {
                name: "v".into(),
                offset: 7,
                data: vec![0, 1, 255],
            },
            Op::CheckpointApply {
                volume: "v".into(),
                name: "c".into(),
                save_current: Some("s".into()),
                discard_current: false,
            },
            Op::Fsck,
        ];
        for op in ops {
            let j = serde_json::to_string(&op).expect("json");
            assert_eq!(serde_json::from_str::<Op>(&j).expect("parse"), op);
        }
        let r = Reply::Bytes(vec![9; 10]);
        let j = serde_json::to_string(&r).expect("json");
        assert_eq!(serde_json::from_str::<Reply>(&j).expect("parse"), r);
    }

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
    fn kind_names_are_their_json() {
        use ErrorKind as K;
        for k in [
            K::NotFound,
            K::Exists,
            K::Invalid,
            K::NoSpace,
            K::Busy,
            K::Corrupt,
            K::Io,
            K::Daemon,
            K::State,
            K::Vm,
        ] {
            assert_eq!(serde_json::to_value(k).expect("json"), k.name());
        }
    }

    #[test]
    fn execute_maps_engine_errors_to_kinds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path(), Options::default()).expect("init");
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
