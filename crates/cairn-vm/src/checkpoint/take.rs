//! Taking a VM checkpoint, of a stopped VM (here) or a running one (`running.rs`), as one
//! transaction: a [`Pending`] record first, then the parts, then the record completed. Until then every way out (an error,
//! a panic, a future dropped half-way) removes the parts made so far and the record, so a
//! half-made checkpoint never shows; a crash is rolled back at the next start instead
//! ([`VmStore::roll_back_pending`]).

use std::sync::Arc;
use std::time::Duration;

use cairn_engine::Store;
use tracing::warn;

use super::record::{
    abandon, begin, drop_disk_checkpoints, finish, persist_disks, state_volume, take_disks,
    VmCheckpoint,
};
use crate::spec::VmStore;
use crate::VmError;

/// Prefix of checkpoints created without a name.
pub const UNNAMED_PREFIX: &str = "cp";
/// Prefix of the checkpoints an apply takes of the state it replaces.
pub const AUTOMATIC_PREFIX: &str = "auto";

/// What checkpoint of a running VM to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Disks, memory and device state.
    Standard,
    /// Disks only, quiesced through the guest agent when one answers; `quiesce` makes that a
    /// requirement.
    DiskOnly {
        /// Fail rather than take a crash-consistent checkpoint.
        quiesce: bool,
    },
}

/// How long the guest agent gets to answer its first command: it answers in milliseconds when
/// it runs; when it does not, a disk-only checkpoint falls back to crash-consistent this late.
pub(super) const AGENT_ANSWER: Duration = Duration::from_secs(3);
/// How long freezing may take: the guest flushes its dirty data first.
pub(super) const AGENT_FREEZE: Duration = Duration::from_secs(60);

/// A name for a new checkpoint of a VM, free on the VM and on every disk.
pub fn new_checkpoint_name(
    store: &Store,
    vms: &VmStore,
    vm: &str,
    prefix: &str,
) -> Result<String, VmError> {
    let mut taken: Vec<String> = vms.checkpoints(vm)?.into_iter().map(|c| c.name).collect();
    for d in vms.get(vm)?.disks {
        taken.extend(store.list_checkpoints(&d)?.into_iter().map(|c| c.name));
    }
    Ok(cairn_engine::names::timestamp_name(
        prefix,
        crate::now_ms(),
        &taken,
    ))
}

/// A VM checkpoint being taken. Its record is pending; [`Pending::finish`] completes it, and
/// dropping it unfinished removes whatever parts exist and the record.
pub struct Pending {
    vms: VmStore,
    store: Arc<Store>,
    cp: Option<VmCheckpoint>,
    pub(super) disks_taken: bool,
    pub(super) state_stored: bool,
}

impl Pending {
    /// Records a pending checkpoint `name` of VM `vm` (nothing else is touched yet).
    pub fn begin(
        vms: &VmStore,
        store: &Arc<Store>,
        vm: &str,
        name: &str,
        description: Option<&str>,
        running: bool,
    ) -> Result<Pending, VmError> {
        let spec = vms.get(vm)?;
        let cp = begin(
            vms,
            store,
            &spec,
            name,
            description,
            running,
            crate::now_ms(),
        )?;
        Ok(Pending {
            vms: vms.clone(),
            store: store.clone(),
            cp: Some(cp),
            disks_taken: false,
            state_stored: false,
        })
    }

    /// The record as it stands.
    pub fn cp(&self) -> &VmCheckpoint {
        self.cp
            .as_ref()
            .expect("a pending checkpoint has its record until finished")
    }

    pub(super) fn cp_mut(&mut self) -> &mut VmCheckpoint {
        self.cp
            .as_mut()
            .expect("a pending checkpoint has its record until finished")
    }

    /// Completes the record and makes it the VM's parent checkpoint.
    pub fn finish(mut self) -> Result<VmCheckpoint, VmError> {
        let done = finish(&self.vms, self.cp().clone())?;
        self.cp = None;
        Ok(done)
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let Some(cp) = self.cp.take() else {
            return;
        };
        // Only parts this checkpoint made: a disk checkpoint of the same name made meanwhile by
        // someone else (which made taking the disks fail) stays.
        let mut parts = match self.disks_taken {
            true => cp.disks.clone(),
            false => Vec::new(),
        };
        if self.state_stored {
            parts.push(state_volume(&cp.vm));
        }
        if let Err(e) = drop_disk_checkpoints(&self.store, &parts, &cp.name) {
            warn!(
                "vm {}: removing the parts of unfinished checkpoint {}: {e}",
                cp.vm, cp.name
            );
        }
        abandon(&self.vms, &cp);
    }
}

/// Takes a checkpoint of a stopped VM: every disk, at rest.
pub fn take_stopped(
    vms: &VmStore,
    store: &Arc<Store>,
    vm: &str,
    name: &str,
    description: Option<&str>,
    automatic: bool,
) -> Result<VmCheckpoint, VmError> {
    let mut pending = Pending::begin(vms, store, vm, name, description, false)?;
    pending.cp_mut().automatic = automatic;
    take_disks(store, pending.cp())?;
    pending.disks_taken = true;
    persist_disks(store, pending.cp())?;
    pending.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::VmSpec;

    fn store_with_vm() -> (tempfile::TempDir, Arc<Store>, VmStore) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::init(dir.path(), cairn_engine::Options::default()).expect("init");
        store.create_volume("d1", 1 << 20).expect("d1");
        store.create_volume("d2", 1 << 20).expect("d2");
        let vms = VmStore::new(dir.path());
        vms.save(&VmSpec {
            name: "v".into(),
            memory: 64 << 20,
            cpus: 1,
            disks: vec!["d1".into(), "d2".into()],
            kernel: None,
            initrd: None,
            append: None,
            net: None,
            mac: crate::spec::fresh_mac(),
            uuid: crate::spec::fresh_uuid(),
            accel: None,
            created_ms: 0,
            parent: None,
        })
        .expect("vm");
        (dir, Arc::new(store), vms)
    }

    fn names(store: &Store, volume: &str) -> Vec<String> {
        let cps = store.list_checkpoints(volume).expect("list");
        cps.into_iter().map(|c| c.name).collect()
    }

    #[test]
    fn an_unfinished_checkpoint_leaves_nothing_behind() {
        let (_dir, store, vms) = store_with_vm();
        // Dropped after its disks were taken: the parts and the record go.
        let mut pending = Pending::begin(&vms, &store, "v", "a", None, false).expect("begin");
        take_disks(&store, pending.cp()).expect("take");
        pending.disks_taken = true;
        assert_eq!(names(&store, "d1"), ["a"]);
        let records = vms.checkpoints("v").expect("records");
        assert!(records.len() == 1 && records[0].pending, "{records:?}");
        drop(pending);
        assert!(names(&store, "d1").is_empty() && names(&store, "d2").is_empty());
        assert!(vms.checkpoints("v").expect("records").is_empty());

        // Dropped before: a checkpoint of the same name someone else made on a disk stays.
        let pending = Pending::begin(&vms, &store, "v", "b", None, false).expect("begin");
        store.create_checkpoint("d2", "b", None).expect("theirs");
        assert!(take_disks(&store, pending.cp()).is_err());
        drop(pending);
        assert_eq!(names(&store, "d2"), ["b"]);
        assert!(names(&store, "d1").is_empty());
        assert!(vms.checkpoints("v").expect("records").is_empty());

        // Finished: everything stays, and the VM now hangs on it.
        let cp = take_stopped(&vms, &store, "v", "c", Some("kept"), false).expect("take");
        assert!(!cp.pending);
        assert_eq!(names(&store, "d1"), ["c"]);
        assert_eq!(vms.get("v").expect("vm").parent.as_deref(), Some("c"));
    }
}
