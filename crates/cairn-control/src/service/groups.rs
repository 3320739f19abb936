//! Checkpoint operations on a group (`crate::group`): create takes every member at one instant,
//! apply and delete run the member-level operation on each member through [`Service::run`], so
//! each is guarded as if asked alone.

use cairn_vm::checkpoint::{self as ck, Take};

use super::{on_blocking_pool, Progress, Service};
use crate::error::{ErrorKind, OpError};
use crate::execute::vm_store;
use crate::group::{self, Group, GroupCheckpoint, GroupReply, MemberCheckpoint};
use crate::ops::{Op, Reply};
use crate::paging::Page;

impl Service {
    /// The group a checkpoint operation names, if it names one (not a VM or volume).
    pub(super) fn group_of(&self, op: &Op) -> Option<Group> {
        group::find(&self.store, op.checkpoint_target()?)
    }

    /// Runs checkpoint operation `op` on group `g` (see [`Service::group_of`]).
    pub(super) async fn run_group(
        &self,
        g: Group,
        op: Op,
        progress: &Progress,
    ) -> Result<Reply, OpError> {
        let reply = match op {
            Op::CheckpointCreate {
                name,
                description,
                disk_only,
                quiesce,
                automatic,
                ..
            } => {
                let how = match (disk_only, quiesce) {
                    (false, true) => return Err(OpError::new(
                        ErrorKind::Invalid,
                        "--quiesce applies to --disk-only checkpoints: a standard checkpoint keeps the guest's memory, caches included",
                    )),
                    (false, false) => Take::Standard,
                    (true, q) => Take::DiskOnly { quiesce: q },
                };
                let cp = self
                    .create_group_checkpoint(&g, name, description, how, automatic, progress)
                    .await?;
                GroupReply::Checkpoint(cp)
            }
            Op::CheckpointList { after, limit, .. } => {
                let (checkpoints, next) = Page::new(&after, limit)?
                    .of(g.checkpoints.clone(), |c| (c.created_ms, c.name.as_str()))?;
                GroupReply::Checkpoints {
                    group: g.name.clone(),
                    checkpoints,
                    next,
                }
            }
            Op::CheckpointApply {
                name,
                save_current,
                discard_current,
                force,
                ..
            } => {
                self.check_members_have(&g, &name).await?;
                // All members at once, so that no guest runs long ahead of the others.
                let applies = g.members().map(|m| {
                    let op = Op::CheckpointApply {
                        volume: m.clone(),
                        name: name.clone(),
                        save_current: save_current.clone(),
                        discard_current,
                        force,
                    };
                    Box::pin(self.run(op, progress.clone()))
                });
                let results = futures::future::join_all(applies).await;
                let mut reports = Vec::new();
                let mut failures = Vec::new();
                for (m, r) in g.members().zip(results) {
                    match r {
                        Ok(Reply::Applied(r)) => reports.push(r),
                        Ok(_) => {}
                        Err(e) => failures.push((m.clone(), e)),
                    }
                }
                if let Some((m, e)) = failures.first() {
                    let done: Vec<&str> = reports.iter().map(|r| r.applied.as_str()).collect();
                    return Err(OpError::new(e.kind, format!(
                        "applying {}@{name} failed on member '{m}': {}; applied: {}; fix that and apply {}@{name} again",
                        g.name, e.message, if done.is_empty() { "none".into() } else { done.join(", ") }, g.name)));
                }
                GroupReply::Applied(reports)
            }
            Op::CheckpointDelete { name, children, .. } => {
                if children {
                    return Err(OpError::new(ErrorKind::Invalid, format!(
                        "a group checkpoint is deleted alone; delete the members' later checkpoints one by one (`cairn checkpoint list {}`)", g.name)));
                }
                let mut deleted = Vec::new();
                for m in g.members() {
                    if !self.member_has(m, &name).await? {
                        continue;
                    }
                    let op = Op::CheckpointDelete {
                        volume: m.clone(),
                        name: name.clone(),
                        children: false,
                    };
                    if let Reply::Deleted(d) = Box::pin(self.run(op, progress.clone())).await? {
                        deleted.extend(d);
                    }
                }
                let (store, gname, n) = (self.store.clone(), g.name.clone(), name.clone());
                on_blocking_pool(move || group::forget_checkpoint(&store, &gname, &n)).await?;
                return Ok(Reply::Deleted(deleted));
            }
            _ => {
                return Err(OpError::new(ErrorKind::Invalid, format!(
                    "'{}' is a group: rename, describe or clone its members' checkpoints one by one", g.name)))
            }
        };
        Ok(Reply::Group(reply))
    }

    /// Whether member `m` (a VM or volume) has checkpoint `name`.
    async fn member_has(&self, m: &str, name: &str) -> Result<bool, OpError> {
        let (store, m, name) = (self.store.clone(), m.to_string(), name.to_string());
        on_blocking_pool(move || {
            let vms = vm_store(&store)?;
            Ok(match vms.exists(&m) {
                true => vms.checkpoint(&m, &name).is_ok_and(|c| !c.pending),
                // A member deleted since has nothing to apply or delete.
                false => store.checkpoint_info(&m, &name).is_ok(),
            })
        })
        .await
    }

    async fn check_members_have(&self, g: &Group, name: &str) -> Result<(), OpError> {
        for m in g.members() {
            if !self.member_has(m, name).await? {
                return Err(OpError::new(ErrorKind::NotFound, format!(
                    "member '{m}' of group '{}' has no checkpoint '{name}'; `cairn checkpoint list {}` shows the group's", g.name, g.name)));
            }
        }
        Ok(())
    }

    async fn create_group_checkpoint(
        &self,
        g: &Group,
        name: Option<String>,
        description: Option<String>,
        how: Take,
        automatic: bool,
        progress: &Progress,
    ) -> Result<GroupCheckpoint, OpError> {
        let store = self.store.clone();
        let (g2, name2) = (g.clone(), name.clone());
        // Every member exists and none has the name yet: checked before anything is made.
        let name = on_blocking_pool(move || {
            let vms = vm_store(&store)?;
            let mut taken = Vec::new();
            for vm in &g2.vms {
                if !vms.exists(vm) {
                    return Err(OpError::new(ErrorKind::NotFound, format!(
                        "member VM '{vm}' of group '{}' no longer exists; `cairn group delete {}` and make the group again without it", g2.name, g2.name)));
                }
                taken.extend(vms.checkpoints(vm)?.into_iter().map(|c| c.name));
                for d in vms.get(vm)?.disks {
                    taken.extend(store.list_checkpoints(&d)?.into_iter().map(|c| c.name));
                }
            }
            for v in &g2.volumes {
                let cps = store.list_checkpoints(v).map_err(|e| match e {
                    cairn_engine::Error::UnknownVolume(_) => OpError::new(ErrorKind::NotFound, format!(
                        "member volume '{v}' of group '{}' no longer exists; `cairn group delete {}` and make the group again without it", g2.name, g2.name)),
                    e => e.into(),
                })?;
                taken.extend(cps.into_iter().map(|c| c.name));
            }
            match name2 {
                Some(n) if taken.contains(&n) => Err(OpError::new(ErrorKind::Exists, format!(
                    "a member of group '{}' already has a checkpoint '{n}'; choose another name", g2.name))),
                Some(n) => Ok(n),
                None => Ok(cairn_engine::names::timestamp_name(
                    ck::UNNAMED_PREFIX,
                    store.clock().now_ms(),
                    &taken,
                )),
            }
        })
        .await?;
        let running: Vec<String> = match &self.vms {
            Some((rt, _)) => g.vms.iter().filter(|v| rt.is_running(v)).cloned().collect(),
            None => Vec::new(),
        };
        let stopped: Vec<String> = g
            .vms
            .iter()
            .filter(|v| !running.contains(v))
            .cloned()
            .collect();
        let mut members = Vec::new();
        // Stopped VMs are at rest: any instant is theirs, so they go first, disk-only.
        let mut made_stopped = Vec::new();
        for vm in &stopped {
            let (store, vm2, n, d) = (
                self.store.clone(),
                vm.clone(),
                name.clone(),
                description.clone(),
            );
            let taken = on_blocking_pool(move || {
                let vms = vm_store(&store)?;
                Ok(ck::take_stopped(
                    &vms,
                    &store,
                    &vm2,
                    &n,
                    d.as_deref(),
                    automatic,
                )?)
            })
            .await;
            match taken {
                Ok(cp) => {
                    members.push(MemberCheckpoint {
                        member: vm.clone(),
                        kind: cp.kind_summary().into(),
                        paused_us: None,
                    });
                    made_stopped.push(cp);
                }
                Err(e) => {
                    self.drop_stopped(made_stopped).await;
                    return Err(e);
                }
            }
        }
        let together = match &self.vms {
            Some((rt, _)) => {
                let report = |n| progress.report(n);
                rt.take_together(
                    &self.store,
                    &running,
                    &g.volumes,
                    &name,
                    description.clone(),
                    how,
                    automatic,
                    &report,
                )
                .await
                .map_err(OpError::from)
            }
            None => {
                let (store, vols, n, d) = (
                    self.store.clone(),
                    g.volumes.clone(),
                    name.clone(),
                    description.clone(),
                );
                on_blocking_pool(move || {
                    let mut made: Vec<String> = Vec::new();
                    for v in &vols {
                        if let Err(e) = store.create_checkpoint(v, &n, d.as_deref()) {
                            for m in &made {
                                let _ = store.delete_checkpoint(m, &n);
                            }
                            return Err(e.into());
                        }
                        made.push(v.clone());
                    }
                    Ok(cairn_vm::checkpoint::Together {
                        vms: Vec::new(),
                        paused: Vec::new(),
                    })
                })
                .await
            }
        };
        let together = match together {
            Ok(t) => t,
            Err(e) => {
                self.drop_stopped(made_stopped).await;
                return Err(e);
            }
        };
        for (cp, paused) in together.vms.iter().zip(&together.paused) {
            members.push(MemberCheckpoint {
                member: cp.vm.clone(),
                kind: cp.kind_summary().into(),
                paused_us: Some(paused.as_micros() as u64),
            });
        }
        for v in &g.volumes {
            members.push(MemberCheckpoint {
                member: v.clone(),
                kind: "volume".into(),
                paused_us: None,
            });
        }
        // In the group's order of members.
        let order: Vec<&String> = g.members().collect();
        members.sort_by_key(|m| order.iter().position(|o| **o == m.member));
        let cp = GroupCheckpoint {
            name,
            created_ms: self.store.clock().now_ms(),
            description,
            members,
        };
        let (store, gname, rec) = (self.store.clone(), g.name.clone(), cp.clone());
        on_blocking_pool(move || group::record_checkpoint(&store, &gname, rec)).await?;
        Ok(cp)
    }

    /// Removes stopped members' checkpoints a failed group checkpoint made.
    async fn drop_stopped(&self, made: Vec<ck::VmCheckpoint>) {
        let store = self.store.clone();
        let _ = on_blocking_pool(move || {
            let vms = vm_store(&store)?;
            for cp in &made {
                let _ = ck::delete(&vms, &store, cp);
            }
            Ok(())
        })
        .await;
    }
}
