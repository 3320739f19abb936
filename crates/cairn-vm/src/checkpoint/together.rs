//! Checkpoints of several running VMs (and plain volumes) at one instant: a group checkpoint.
//! Every VM is prepared first (record, memory snapshot set up, file systems frozen), then all
//! are paused together; once every one stands still, the plain volumes are checkpointed, and each
//! VM's disks are checkpointed and its memory snapshot started, after which it resumes without
//! waiting for the others (what was captured is each VM as it stood when all were paused).
//! Memory is saved afterwards, VM by VM, with the guests running.
//!
//! All or nothing: if any member fails, what the others made is removed.

use std::sync::Arc;
use std::time::Duration;

use cairn_engine::Store;
use futures::future::join_all;
use tracing::warn;

use super::blocking;
use super::record::{delete, VmCheckpoint};
use super::running::Taking;
use super::take::Take;
use crate::runtime::Runtime;
use crate::VmError;

/// What a checkpoint taken together made.
#[derive(Debug)]
pub struct Together {
    /// Each running VM's checkpoint, in the order given.
    pub vms: Vec<VmCheckpoint>,
    /// How long each VM was paused, in the same order.
    pub paused: Vec<Duration>,
}

/// Removes what a group that failed made: the finished VM checkpoints `vms` and the plain
/// volumes' checkpoints `name` (on the blocking pool; failures are logged).
async fn undo(
    store: &Arc<Store>,
    defs: &crate::spec::VmStore,
    vms: Vec<VmCheckpoint>,
    volumes: Vec<String>,
    name: &str,
) {
    let (store, defs, name) = (store.clone(), defs.clone(), name.to_string());
    let _ = blocking(move || {
        for cp in &vms {
            if let Err(e) = delete(&defs, &store, cp) {
                warn!(
                    "removing {}@{} of a failed group checkpoint: {e}",
                    cp.vm, cp.name
                );
            }
        }
        for v in &volumes {
            if let Err(e) = store.delete_checkpoint(v, &name) {
                warn!("removing {v}@{name} of a failed group checkpoint: {e}");
            }
        }
        Ok(())
    })
    .await;
}

impl Runtime {
    /// Checkpoint `name` of the running VMs `vms` and the plain volumes `volumes` at one
    /// instant (see the module's documentation). `progress` hears the bytes of memory saved.
    #[allow(clippy::too_many_arguments)]
    pub async fn take_together(
        &self,
        store: &Arc<Store>,
        vms: &[String],
        volumes: &[String],
        name: &str,
        description: Option<String>,
        how: Take,
        automatic: bool,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Together, VmError> {
        let mut takings: Vec<Taking> = Vec::new();
        for vm in vms {
            // An error drops the ones prepared so far, which removes what they made.
            let t = self
                .prepare_checkpoint(store, vm, name, description.clone(), how, automatic)
                .await?;
            takings.push(t);
        }
        let t0 = std::time::Instant::now();
        let paused = join_all(takings.iter_mut().map(Taking::pause)).await;
        let all_paused = t0.elapsed();
        let mut failed = paused.into_iter().find_map(Result::err);
        let mut made_volumes: Vec<String> = Vec::new();
        if failed.is_none() {
            // Every guest stands still from here: the plain volumes are taken first, in the
            // window.
            let (store2, vols, n, d) = (
                store.clone(),
                volumes.to_vec(),
                name.to_string(),
                description.clone(),
            );
            let made = blocking(move || {
                let mut made = Vec::new();
                for v in &vols {
                    if let Err(e) = store2.create_checkpoint_unflushed(v, &n, d.as_deref()) {
                        return Ok(Err((made, VmError::from(e))));
                    }
                    made.push(v.clone());
                }
                Ok(Ok(made))
            });
            match made.await {
                Ok(Ok(m)) => made_volumes = m,
                Ok(Err((m, e))) => {
                    made_volumes = m;
                    failed = Some(e);
                }
                Err(e) => failed = Some(e),
            }
        }
        if failed.is_none() {
            // Each VM's disks and memory snapshot capture it as it stood when all were paused;
            // once its own have started it resumes, without waiting for the others'.
            join_all(takings.iter_mut().map(|t| async move {
                t.take_paused(store).await;
                t.resume().await;
            }))
            .await;
        } else {
            join_all(takings.iter_mut().map(Taking::resume)).await;
        }
        tracing::info!(
            "group checkpoint {name}: all {} paused after {all_paused:?}, all running again after {:?}",
            takings.len(),
            t0.elapsed()
        );
        let pauses: Vec<Duration> = takings.iter().map(Taking::paused).collect();
        let defs = self.definitions();
        if let Some(e) = failed {
            drop(takings);
            undo(store, defs, Vec::new(), made_volumes, name).await;
            return Err(e);
        }
        let store2 = store.clone();
        if let Err(e) = blocking(move || Ok(store2.flush()?)).await {
            undo(store, defs, Vec::new(), made_volumes, name).await;
            return Err(e);
        }
        let mut done: Vec<VmCheckpoint> = Vec::new();
        let mut failed = None;
        for t in takings {
            if failed.is_some() {
                // Dropped unfinished: its parts go.
                continue;
            }
            match self.complete_checkpoint(store, t, progress).await {
                Ok(cp) => done.push(cp),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            undo(store, defs, done, made_volumes, name).await;
            return Err(e);
        }
        Ok(Together {
            vms: done,
            paused: pauses,
        })
    }
}
