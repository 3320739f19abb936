//! Every store operation a user can ask for, as data: [`Op`] in, [`Reply`] out. `execute.rs`
//! performs them; the CLI builds an `Op` from its arguments and either runs `execute` on a store
//! it opened itself or sends the `Op` to the daemon, which runs the same `execute` on the store
//! it owns. So each command's logic exists once, whichever way it is reached, and the JSON the
//! daemon speaks is exactly these types.

use cairn_engine::fsck::FsckReport;
use cairn_engine::{CheckpointInfo, DefragReport, Extent, SpaceReport, VolumeInfo};
use cairn_vm::{VmSpec, VmStatus};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::backup::{BackupOp, BackupReply};
use crate::lifecycle::{LifecycleOp, LifecycleReply};
use crate::reports::{ApplyReport, VmCheckpointInfo, VmSpaceReport};

/// The most checkpoints one page of a list holds over HTTP and the control socket: a volume's
/// 10,000 checkpoints are 2 MB of JSON, and a page keeps every answer small and quick.
pub const MAX_CHECKPOINT_PAGE: u32 = 1000;

/// Largest data an `Op::VolumeWrite` carries or an `Op::VolumeRead` returns; bigger transfers
/// are split by the caller (bulk data belongs on NBD, not in JSON).
pub const MAX_DATA: u64 = 4 << 20;

/// One operation on a store.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
        #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
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
        /// Taken by a lifecycle policy: marked automatic, so the policy's retention applies.
        #[serde(default)]
        automatic: bool,
    },
    /// Checkpoints of a volume.
    CheckpointList {
        /// Volume.
        volume: String,
        /// Lists only what comes after this cursor: the `next` of the page before.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        after: Option<String>,
        /// Lists at most this many (at least 1); all when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        limit: Option<u32>,
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
        /// Disconnect NBD clients of the heads being rewound instead of refusing (daemon only:
        /// without one, nobody else can have the store open).
        #[serde(default)]
        force: bool,
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
    /// The exact bytes deleting these checkpoints of a volume or VM together would free.
    SpaceFreed {
        /// VM or volume.
        target: String,
        /// Checkpoint names.
        checkpoints: Vec<String>,
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
    /// A backup operation (`crate::backup`).
    Backup(BackupOp),
    /// A lifecycle operation: policies, pins, pruning (`crate::lifecycle`).
    Lifecycle(LifecycleOp),
    /// Groups of VMs and volumes checkpointed together.
    Group(crate::group::GroupOp),
    /// Manage the HTTP API's tokens (refused over HTTP itself).
    Token(crate::tokens::TokenOp),
}

/// The user-settable fields of a VM; on edit, `None` keeps the current value.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub kernel: Option<PathBuf>,
    /// Initramfs file.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// `user` or none.
    pub net: Option<String>,
    /// `kvm` or `tcg`; automatic when absent.
    pub accel: Option<String>,
}

/// What an [`Op`] returns.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
        /// Its checkpoints (the page asked for), oldest first.
        checkpoints: Vec<CheckpointInfo>,
        /// The head's parent.
        head_parent: Option<String>,
        /// When more remain after this page: the cursor to ask for the next with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// One VM checkpoint.
    VmCheckpoint(VmCheckpointInfo),
    /// A VM's checkpoints and which one it was last taken or applied from.
    VmCheckpoints {
        /// Its checkpoints (the page asked for), oldest first.
        checkpoints: Vec<VmCheckpointInfo>,
        /// The VM's parent checkpoint.
        head_parent: Option<String>,
        /// When more remain after this page: the cursor to ask for the next with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
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
    /// Bytes a delete would free.
    Freed {
        /// Exact bytes.
        bytes: u64,
    },
    /// Fsck report.
    Fsck(FsckReport),
    /// What a defrag moved and cost.
    Defrag(DefragReport),
    /// Bytes read (base64 in JSON).
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = Byte))]
    Bytes(#[serde(with = "b64")] Vec<u8>),
    /// One VM definition.
    Vm(VmSpec),
    /// VM definitions.
    Vms(Vec<VmSpec>),
    /// A VM's run state.
    VmStatus(VmStatus),
    /// What a backup operation returned.
    Backup(BackupReply),
    /// What a lifecycle operation returned.
    Lifecycle(LifecycleReply),
    /// What a group operation (or a checkpoint operation on a group) did.
    Group(crate::group::GroupReply),
    /// What a token operation did.
    Token(crate::tokens::TokenReply),
}

fn default_min_extents() -> u64 {
    cairn_engine::DEFRAG_MIN_EXTENTS
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

impl Op {
    /// Whether `op` only reads: what a read-only API token may ask for.
    pub fn is_read_only(&self) -> bool {
        use crate::backup::BackupOp as B;
        use crate::group::GroupOp as G;
        use crate::lifecycle::LifecycleOp as L;
        match self {
            Op::VolumeList
            | Op::VolumeInfo { .. }
            | Op::VolumeRead { .. }
            | Op::CheckpointList { .. }
            | Op::Diff { .. }
            | Op::Space { .. }
            | Op::SpaceFreed { .. }
            | Op::Fsck
            | Op::VmList
            | Op::VmInfo { .. }
            | Op::VmStatus { .. } => true,
            Op::Backup(b) => matches!(
                b,
                B::RepoList
                    | B::List { .. }
                    | B::Info { .. }
                    | B::Verify { .. }
                    | B::Mounts
                    | B::Live
            ),
            Op::Lifecycle(l) => match l {
                L::PolicyShow { .. } | L::PolicyList | L::Events { .. } | L::PrunePreview(_) => {
                    true
                }
                L::Prune { dry_run, .. } => *dry_run,
                L::Floor { set } => set.is_none(),
                _ => false,
            },
            Op::Group(g) => matches!(g, G::List),
            _ => false,
        }
    }

    /// `self` with a checkpoint list's page limited to [`MAX_CHECKPOINT_PAGE`] (a larger or
    /// missing limit becomes the maximum); other operations unchanged.
    pub fn with_page_limit(self) -> Op {
        match self {
            Op::CheckpointList {
                volume,
                after,
                limit,
            } => Op::CheckpointList {
                volume,
                after,
                limit: Some(
                    limit
                        .unwrap_or(MAX_CHECKPOINT_PAGE)
                        .min(MAX_CHECKPOINT_PAGE),
                ),
            },
            op => op,
        }
    }

    /// The VM, volume or group a checkpoint operation names (and the volume of a space query).
    pub fn checkpoint_target(&self) -> Option<&str> {
        match self {
            Op::CheckpointCreate { volume, .. }
            | Op::CheckpointList { volume, .. }
            | Op::CheckpointApply { volume, .. }
            | Op::CheckpointDelete { volume, .. }
            | Op::CheckpointEdit { volume, .. }
            | Op::CheckpointRename { volume, .. }
            | Op::Clone { volume, .. } => Some(volume),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                force: true,
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
}
