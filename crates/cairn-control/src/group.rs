//! Groups: several VMs and volumes checkpointed at one instant and rewound together (an
//! application whose web server and database live in two VMs). A group is kept in
//! `STORE/groups.json` with the checkpoints taken of it; each member holds its own checkpoint of
//! the same name, so every member-level command (list, space, diff, backup) works on it too.
//!
//! `checkpoint create GROUP@NAME` pauses every running member together
//! (`cairn_vm::checkpoint::together`); a stopped VM's disks are at rest, so its checkpoint is
//! disk-only and taken in the same transaction. All or nothing: a member that fails removes what
//! the others made. `checkpoint apply GROUP@NAME` applies each member's, `checkpoint delete`
//! deletes each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cairn_engine::Store;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
use crate::execute::vm_store;
use crate::files::{load_json, write_atomic};
use crate::reports::ApplyReport;

/// A group of VMs and volumes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// Its name (shared with no VM or volume).
    pub name: String,
    /// Member VMs.
    #[serde(default)]
    pub vms: Vec<String>,
    /// Member volumes (not VM disks).
    #[serde(default)]
    pub volumes: Vec<String>,
    /// Checkpoints taken of the group, oldest first.
    #[serde(default)]
    pub checkpoints: Vec<GroupCheckpoint>,
}

impl Group {
    /// Every member, VMs first.
    pub fn members(&self) -> impl Iterator<Item = &String> {
        self.vms.iter().chain(&self.volumes)
    }
}

/// A checkpoint of a group.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupCheckpoint {
    /// Its name (each member's checkpoint has it too).
    pub name: String,
    /// When, ms since the Unix epoch.
    pub created_ms: u64,
    /// The description given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// What it holds of each member.
    pub members: Vec<MemberCheckpoint>,
}

/// One member's part of a group checkpoint.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberCheckpoint {
    /// The VM or volume.
    pub member: String,
    /// As `checkpoint list` says it (`standard (memory and disks)`, `disk-only, VM stopped`...),
    /// or `volume`.
    pub kind: String,
    /// How long the VM was paused (running VMs), in µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_us: Option<u64>,
}

/// One group operation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "group", rename_all = "snake_case")]
pub enum GroupOp {
    /// Make a group.
    Create {
        /// Its name.
        name: String,
        /// Member VMs.
        #[serde(default)]
        vms: Vec<String>,
        /// Member volumes.
        #[serde(default)]
        volumes: Vec<String>,
    },
    /// Every group.
    List,
    /// Forget a group (its members and their checkpoints stay).
    Delete {
        /// Its name.
        name: String,
    },
}

/// Replies of group operations.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum GroupReply {
    /// Groups.
    Groups(Vec<Group>),
    /// A checkpoint of a group, just taken.
    Checkpoint(GroupCheckpoint),
    /// A group's checkpoints.
    Checkpoints {
        /// The group.
        group: String,
        /// Its checkpoints (the page asked for), oldest first.
        checkpoints: Vec<GroupCheckpoint>,
        /// When more remain after this page: the cursor to ask for the next with.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<String>,
    },
    /// What applying a group checkpoint did to each member.
    Applied(Vec<ApplyReport>),
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
struct Groups {
    groups: BTreeMap<String, Group>,
}

fn file(store: &Path) -> PathBuf {
    store.join("groups.json")
}

fn load(store: &Path) -> Result<Groups, OpError> {
    load_json(&file(store), "make the groups again")
}

fn save(store: &Path, g: &Groups) -> Result<(), OpError> {
    write_atomic(
        &file(store),
        &serde_json::to_vec_pretty(g).expect("groups serialize"),
    )
}

fn dir(store: &Store) -> Result<&Path, OpError> {
    store
        .dir()
        .ok_or_else(|| OpError::new(ErrorKind::Invalid, "groups need a store in a directory"))
}

/// The group named `name`, if `name` is no VM or volume and a group has it.
pub fn find(store: &Store, name: &str) -> Option<Group> {
    let d = store.dir()?;
    if store.volume_info(name).is_ok() || vm_store(store).is_ok_and(|v| v.exists(name)) {
        return None;
    }
    load(d).ok()?.groups.remove(name)
}

/// Refuses a new VM or volume named like a group (its name would hide the group).
pub fn check_name_free(store: &Store, name: &str) -> Result<(), OpError> {
    let Some(d) = store.dir() else {
        return Ok(());
    };
    if load(d)?.groups.contains_key(name) {
        return Err(OpError::new(
            ErrorKind::Exists,
            format!(
                "'{name}' is a group's name; choose another, or `cairn group delete {name}` first"
            ),
        ));
    }
    Ok(())
}

/// Records a checkpoint taken of group `group`.
pub(crate) fn record_checkpoint(
    store: &Store,
    group: &str,
    cp: GroupCheckpoint,
) -> Result<(), OpError> {
    let d = dir(store)?;
    let mut all = load(d)?;
    if let Some(g) = all.groups.get_mut(group) {
        g.checkpoints.retain(|c| c.name != cp.name);
        g.checkpoints.push(cp);
    }
    save(d, &all)
}

/// Forgets checkpoint `name` of group `group`.
pub(crate) fn forget_checkpoint(store: &Store, group: &str, name: &str) -> Result<(), OpError> {
    let d = dir(store)?;
    let mut all = load(d)?;
    if let Some(g) = all.groups.get_mut(group) {
        g.checkpoints.retain(|c| c.name != name);
    }
    save(d, &all)
}

/// Runs a group operation.
pub fn run(store: &Store, op: GroupOp) -> Result<GroupReply, OpError> {
    let d = dir(store)?;
    let mut all = load(d)?;
    match op {
        GroupOp::Create { name, vms, volumes } => {
            cairn_engine::validate_name(&name)?;
            if store.volume_info(&name).is_ok() || vm_store(store).is_ok_and(|v| v.exists(&name)) {
                return Err(OpError::new(
                    ErrorKind::Exists,
                    format!("'{name}' is already a VM or volume; give the group another name"),
                ));
            }
            if all.groups.contains_key(&name) {
                return Err(OpError::new(
                    ErrorKind::Exists,
                    format!("group '{name}' exists; `cairn group delete {name}` first"),
                ));
            }
            if vms.is_empty() && volumes.is_empty() {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("group '{name}' needs members: give --vm NAME and/or --volume NAME"),
                ));
            }
            let defs = vm_store(store)?;
            let mut seen = std::collections::HashSet::new();
            for m in vms.iter().chain(&volumes) {
                if !seen.insert(m) {
                    return Err(OpError::new(
                        ErrorKind::Invalid,
                        format!("'{m}' is named twice"),
                    ));
                }
            }
            for vm in &vms {
                defs.get(vm)?;
            }
            for v in &volumes {
                store.volume_info(v)?;
                if let Some(owner) = defs.list()?.into_iter().find(|s| s.disks.contains(v)) {
                    return Err(OpError::new(
                        ErrorKind::Invalid,
                        format!(
                            "volume '{v}' is a disk of VM '{}': add the VM with --vm {}",
                            owner.name, owner.name
                        ),
                    ));
                }
            }
            let g = Group {
                name: name.clone(),
                vms,
                volumes,
                checkpoints: Vec::new(),
            };
            all.groups.insert(name, g.clone());
            save(d, &all)?;
            Ok(GroupReply::Groups(vec![g]))
        }
        GroupOp::List => Ok(GroupReply::Groups(all.groups.into_values().collect())),
        GroupOp::Delete { name } => {
            if all.groups.remove(&name).is_none() {
                return Err(OpError::new(
                    ErrorKind::NotFound,
                    format!("no group named '{name}'; `cairn group list` shows them"),
                ));
            }
            save(d, &all)?;
            Ok(GroupReply::Groups(Vec::new()))
        }
    }
}
