//! Memory snapshots of a running VM: QEMU's background snapshot into a state file, its re-layout
//! with fixed page offsets (`mapped-ram`), and waiting for a migration stream to finish.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::process::Command;
use tracing::warn;

use super::*;

impl Runtime {
    /// Rewrites a stream-format state file (what a live background snapshot produces) in QEMU's
    /// `mapped-ram` layout, where every guest page has a fixed offset: a helper QEMU shaped like
    /// the VM at checkpoint `checkpoint` loads the stream and saves it again. Runs off the
    /// guest's critical path; it is what lets unchanged memory be stored once.
    pub async fn to_mapped_ram(
        &self,
        name: &str,
        checkpoint: &str,
        stream: &Path,
        out: &Path,
    ) -> Result<(), VmError> {
        let spec = self.vms.get(name)?;
        let qemu = find_qemu()?;
        let (accel, _) = choose_accel(spec.accel.as_deref());
        let dir = self.vms.vm_dir(name).join("helper");
        std::fs::create_dir_all(&dir).map_err(|e| VmError::io("creating", &dir, e))?;
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let mut args = qemu_args_at(&spec, &dir, &self.nbd_socket, &accel, Some(checkpoint));
        args.extend(["-S", "-incoming", "defer"].map(String::from));
        let mut child = Command::new(&qemu.program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| VmError::Qemu(format!("cannot start the helper QEMU: {e}")))?;
        let qmp = connect_qmp(&mut child, &qmp_path, "the helper QEMU", None).await?;
        let r: Result<(), VmError> = async {
            let events = json!({ "capabilities": [{ "capability": "events", "state": true }] });
            qmp.execute("migrate-set-capabilities", events).await?;
            qmp.execute(
                "migrate-incoming",
                json!({ "uri": format!("file:{}", stream.display()) }),
            )
            .await?;
            wait_migration(&qmp, Duration::from_secs(600)).await?;
            let caps = json!({ "capabilities": [
                { "capability": "background-snapshot", "state": false },
                { "capability": "mapped-ram", "state": true }
            ]});
            qmp.execute("migrate-set-capabilities", caps).await?;
            qmp.execute(
                "migrate",
                json!({ "uri": format!("file:{}", out.display()) }),
            )
            .await?;
            wait_migration(&qmp, Duration::from_secs(600)).await?;
            Ok(())
        }
        .await;
        let _ = qmp.execute("quit", json!({})).await;
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        let _ = std::fs::remove_dir_all(&dir);
        r
    }
}

/// Makes QEMU ready for background snapshots (capability `background-snapshot` on, `mapped-ram`
/// off), touching nothing when it already is: turning the capability on makes QEMU test
/// userfaultfd write protection over all guest RAM under its big lock, which stalled a running
/// 1 GiB guest for about 20 ms. So a VM is made ready when it starts, before the guest runs,
/// and a checkpoint only checks.
pub async fn ensure_snapshot_capabilities(qmp: &Qmp) -> Result<(), VmError> {
    let caps = qmp.execute("query-migrate-capabilities", json!({})).await?;
    let state = |name: &str| {
        caps.as_array()
            .and_then(|a| a.iter().find(|c| c["capability"] == name))
            .and_then(|c| c["state"].as_bool())
            .unwrap_or(false)
    };
    if state("background-snapshot") && !state("mapped-ram") && state("events") {
        return Ok(());
    }
    let set = json!({ "capabilities": [
        { "capability": "events", "state": true },
        { "capability": "mapped-ram", "state": false },
        { "capability": "background-snapshot", "state": true }
    ]});
    qmp.execute("migrate-set-capabilities", set).await?;
    Ok(())
}

/// The state file a background snapshot is being written to, opened by Cairn and lent to QEMU.
pub struct SnapshotFile {
    file: std::fs::File,
    fdset: u64,
    path: PathBuf,
}

/// Creates the file a background snapshot of memory and device state will go to, and lends it
/// to QEMU as a descriptor in an fd set (QMP `add-fd`); [`start_snapshot`] then starts the
/// snapshot into it (`migrate` to `file:/dev/fdset/N`), and [`finish_snapshot`] takes it back,
/// whatever the outcome. Split so that only `migrate` happens while the guest is paused.
///
/// Why not let QEMU open the file itself (`file:PATH`): QEMU truncates it and, at the end,
/// closes it from its main loop while holding its big lock; ext4 starts writeback of the whole
/// file on the last close of a file truncated to zero (its "replace by truncate" heuristic,
/// `auto_da_alloc`). For a 1 GiB guest that close took 50–60 ms, during which the guest's vCPU
/// waited for the lock: the longest pause the guest saw during a standard checkpoint
/// (docs/benchmarks.md). While Cairn holds a descriptor of its own, QEMU's closes are not the
/// last, and cost nothing.
pub async fn prepare_snapshot(qmp: &Qmp, path: &Path) -> Result<SnapshotFile, VmError> {
    use std::os::fd::AsFd;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| VmError::io("creating the state file", path, e))?;
    let fdset = match qmp
        .execute_with_fd("add-fd", json!({ "opaque": "cairn-state" }), file.as_fd())
        .await
    {
        Ok(a) => a["fdset-id"].as_u64().ok_or_else(|| {
            VmError::Qemu(format!("QEMU's add-fd answered without an fdset-id: {a}"))
        }),
        Err(e) => Err(e.into()),
    };
    match fdset {
        Ok(fdset) => Ok(SnapshotFile {
            file,
            fdset,
            path: path.to_path_buf(),
        }),
        Err(e) => {
            let _ = std::fs::remove_file(path);
            Err(e)
        }
    }
}

/// Starts the background snapshot into a file from [`prepare_snapshot`], with the guest paused,
/// and returns once the snapshot holds the guest as it is now: its device state saved and its
/// memory write-protected, so the guest can resume.
///
/// `migrate` returns as soon as QEMU's snapshot thread exists. That thread first sets the
/// snapshot up (12-26 ms for the 1 GiB guest of `cairn bench --vm`), then stops the guest
/// itself, saves the device state and write-protects memory; a guest resumed before then runs
/// on, and the snapshot holds a later moment than the disk checkpoints taken during the pause
/// (docs/decisions/0015: 141-152 of 131,072 pages differed from the memory at the pause in half
/// of six hand runs). QEMU announces no event for "write protection on", but it saves memory
/// pages only after it, so the first page counted in `query-migrate` says the guest may run.
pub async fn start_snapshot(qmp: &Qmp, snapshot: &SnapshotFile) -> Result<(), VmError> {
    let uri = format!("file:/dev/fdset/{}", snapshot.fdset);
    let t = Instant::now();
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    loop {
        let r = qmp.execute("query-migrate", json!({})).await?;
        let started = match r["status"].as_str() {
            Some("completed") => true,
            Some("failed") | Some("cancelled") => {
                return Err(VmError::Qemu(format!(
                    "QEMU's memory snapshot failed as it started: {}",
                    r["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ => pages_saved(&r["ram"]) > 0,
        };
        if started {
            tracing::debug!(
                "memory snapshot started {:?} after migrate (QEMU's setup: {} ms)",
                t.elapsed(),
                r["setup-time"]
            );
            return Ok(());
        }
        if t.elapsed() > SNAPSHOT_START_LIMIT {
            let _ = qmp.execute("migrate_cancel", json!({})).await;
            return Err(VmError::Qemu(format!(
                "QEMU's memory snapshot did not start within {SNAPSHOT_START_LIMIT:?}; it was \
                 cancelled (the guest resumes without one)"
            )));
        }
        tokio::time::sleep(SNAPSHOT_START_POLL).await;
    }
}

/// Memory pages a running migration has saved so far, from `query-migrate`'s `ram` (zero pages
/// are counted apart from the others, under a name that changed across QEMU versions).
fn pages_saved(ram: &serde_json::Value) -> u64 {
    ["normal", "duplicate", "zero-pages"]
        .iter()
        .filter_map(|k| ram[*k].as_u64())
        .sum()
}

/// How often [`start_snapshot`] asks whether the snapshot has started: each question takes
/// QEMU's big lock, which its snapshot thread needs too, so not in a tight loop.
const SNAPSHOT_START_POLL: Duration = Duration::from_millis(2);

/// How long the guest may stay paused waiting for the snapshot to start before it is given up.
const SNAPSHOT_START_LIMIT: Duration = Duration::from_secs(10);

/// Takes the state file back from QEMU (after the snapshot completed, failed or was cancelled).
/// Cairn's own descriptor is closed a while later, off the async workers: QEMU closes its copy
/// in a cleanup step after it reports completion, which QMP does not report (`query-fdsets`
/// forgets the set at once), and Cairn's close must come last so the writeback happens here,
/// not under QEMU's lock. The delay is orders of magnitude longer than that cleanup takes; the
/// file's contents are complete and readable meanwhile.
pub async fn finish_snapshot(qmp: &Qmp, snapshot: SnapshotFile) {
    if let Err(e) = qmp
        .execute("remove-fd", json!({ "fdset-id": snapshot.fdset }))
        .await
    {
        warn!("QEMU kept the state file's fd set {}: {e}", snapshot.fdset);
    }
    let file = snapshot.file;
    tokio::spawn(async move {
        tokio::time::sleep(SNAPSHOT_FILE_GRACE).await;
        let _ = tokio::task::spawn_blocking(move || drop(file)).await;
    });
}

/// [`finish_snapshot`] for a snapshot whose file is not wanted (it failed, or the checkpoint
/// did): also removes the file.
pub async fn discard_snapshot(qmp: &Qmp, snapshot: SnapshotFile) {
    let path = snapshot.path.clone();
    finish_snapshot(qmp, snapshot).await;
    let _ = std::fs::remove_file(path);
}

/// How long Cairn keeps its descriptor of a state file after the snapshot into it ended.
const SNAPSHOT_FILE_GRACE: Duration = Duration::from_secs(10);

/// Waits until the migration (save or load) completes; its failure is an error. QEMU announces
/// each status change with a `MIGRATION` event (with the `events` capability on, as Cairn sets
/// it); `query-migrate` is asked only at the start and then rarely, as a safety net: it runs
/// under QEMU's big lock, and polling it every 10 ms during a background snapshot kept taking
/// that lock from the running guest.
pub async fn wait_migration(qmp: &Qmp, timeout: Duration) -> Result<serde_json::Value, VmError> {
    wait_migration_reporting(qmp, timeout, &|_| {}).await
}

/// [`wait_migration`], telling `progress` the bytes of memory transferred at each look.
pub async fn wait_migration_reporting(
    qmp: &Qmp,
    timeout: Duration,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<serde_json::Value, VmError> {
    let mut events = qmp.events();
    let t = Instant::now();
    loop {
        let r = qmp.execute("query-migrate", json!({})).await?;
        if let Some(n) = r["ram"]["transferred"].as_u64() {
            progress(n);
        }
        match r["status"].as_str() {
            Some("completed") => return Ok(r),
            Some("failed") | Some("cancelled") => {
                return Err(VmError::Qemu(format!(
                    "QEMU's state transfer failed: {}",
                    r["error-desc"].as_str().unwrap_or("no reason given")
                )))
            }
            _ => {}
        }
        if t.elapsed() > timeout {
            return Err(VmError::Qemu(format!(
                "QEMU's state transfer did not finish within {timeout:?}"
            )));
        }
        // Until the next event that ends the migration, or half a second.
        let ended = async {
            loop {
                match events.recv().await {
                    Ok(e) if e.name == "MIGRATION" => {
                        if matches!(
                            e.data["status"].as_str(),
                            Some("completed" | "failed" | "cancelled")
                        ) {
                            return;
                        }
                    }
                    Ok(_) => {}
                    // Events missed, or QEMU went away: the next query says where things are.
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), ended).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_saved_counts_zero_and_other_pages_under_either_name() {
        assert_eq!(pages_saved(&json!(null)), 0, "no `ram` yet (setup)");
        assert_eq!(pages_saved(&json!({ "normal": 0, "duplicate": 0 })), 0);
        assert_eq!(pages_saved(&json!({ "normal": 0, "duplicate": 239 })), 239);
        assert_eq!(pages_saved(&json!({ "normal": 166, "zero-pages": 3 })), 169);
        assert_eq!(
            pages_saved(&json!({ "transferred": 169310, "total": 1 << 30 })),
            0,
            "bytes written during setup are not pages"
        );
    }
}
