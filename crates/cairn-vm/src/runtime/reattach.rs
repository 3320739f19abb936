//! VMs outlive their daemon. When `cairn serve` stops (an upgrade, a restart), it can leave each
//! QEMU running instead of powering the guests off, as libvirt does: QEMU's NBD client waits for
//! the socket to come back ([`RECONNECT_DELAY`]), guest I/O pauses meanwhile, and the next daemon
//! finds the QEMU again from the record its VM directory keeps (`run.json`), reconnects to its
//! QMP socket and supervises it as if it had started it.

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{pidfd_open, pidfd_send_signal, Pid, PidfdFlags, Signal};

use super::*;

/// How long QEMU holds a VM's disk requests while Cairn's NBD socket is gone (a daemon
/// restarting); after that they fail, and the guest sees I/O errors until the daemon is back.
pub const RECONNECT_DELAY: Duration = Duration::from_secs(60);

/// What a running VM's directory records, so that a later daemon can find its QEMU again.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct RunRecord {
    pub(super) pid: u32,
    pub(super) accel: String,
    pub(super) started_ms: u64,
}

const RUN_RECORD: &str = "run.json";

impl RunRecord {
    /// Written whole or not at all (a temporary file renamed over).
    pub(super) fn save(&self, dir: &Path) -> Result<(), VmError> {
        let tmp = dir.join("run.json.tmp");
        let text = serde_json::to_vec(self).map_err(|e| VmError::Invalid(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(|e| VmError::io("recording QEMU's pid", &tmp, e))?;
        std::fs::rename(&tmp, dir.join(RUN_RECORD))
            .map_err(|e| VmError::io("recording QEMU's pid", &tmp, e))
    }

    fn load(dir: &Path) -> Option<RunRecord> {
        let text = std::fs::read(dir.join(RUN_RECORD)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub(super) fn remove(dir: &Path) {
        let _ = std::fs::remove_file(dir.join(RUN_RECORD));
    }
}

/// A QEMU being supervised: one this daemon started (its child), or one an earlier daemon left
/// running (watched through a pidfd, since only its parent could wait for it).
pub(super) enum Process {
    Child(tokio::process::Child),
    Adopted(OwnedFd),
}

/// Returns once the process behind `pidfd` has exited. The pidfd is polled without blocking a
/// few times a second: registering it with tokio's reactor would take `unsafe`, and a VM's
/// exit is noticed soon enough this way.
async fn exited(pidfd: &OwnedFd) {
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        let zero = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match poll(&mut fds, Some(&zero)) {
            Ok(n) if n > 0 => return,
            Err(_) => return,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

impl Process {
    /// Waits until QEMU has exited, killing it first if `kill` fires; says how it ended.
    pub(super) async fn ended(self, kill: oneshot::Receiver<()>) -> String {
        match self {
            Process::Child(mut child) => {
                let status = tokio::select! {
                    st = child.wait() => st,
                    Ok(()) = kill => {
                        let _ = child.start_kill();
                        child.wait().await
                    }
                };
                match status {
                    Ok(st) => st.to_string(),
                    Err(e) => format!("wait failed: {e}"),
                }
            }
            Process::Adopted(fd) => {
                tokio::select! {
                    _ = exited(&fd) => "exit status unknown: an earlier daemon started it".into(),
                    Ok(()) = kill => {
                        let _ = pidfd_send_signal(fd.as_fd(), Signal::KILL);
                        exited(&fd).await;
                        "signal: 9 (SIGKILL)".into()
                    }
                }
            }
        }
    }
}

impl Runtime {
    /// Leaves every VM running for the next daemon (daemon shutdown); returns the VMs left.
    /// Nothing needs doing to QEMU itself: it is not killed when the daemon's handles drop.
    pub fn leave_running(&self) -> Vec<String> {
        let mut left: Vec<(String, u32)> = lock(&self.running)
            .iter()
            .map(|(n, r)| (n.clone(), r.pid))
            .collect();
        left.sort();
        for (n, pid) in &left {
            info!(
                "vm {n}: left running (QEMU {pid}); its disk I/O waits up to {} s for the next `cairn serve`, which reattaches it",
                RECONNECT_DELAY.as_secs()
            );
        }
        left.into_iter().map(|(n, _)| n).collect()
    }

    /// Finds the QEMUs an earlier daemon left running and supervises them again; returns the
    /// VMs reattached. A record whose QEMU is gone is cleared and reported in `vm status`.
    pub async fn reattach(self: &Arc<Self>) -> Vec<String> {
        let mut found = Vec::new();
        let Ok(specs) = self.vms.list() else {
            return found;
        };
        for spec in specs {
            let dir = self.vms.vm_dir(&spec.name);
            let Some(record) = RunRecord::load(&dir) else {
                continue;
            };
            match self.adopt(&spec.name, &record).await {
                Ok(()) => {
                    info!("vm {}: reattached to QEMU {}", spec.name, record.pid);
                    found.push(spec.name);
                }
                Err(why) => {
                    warn!("vm {}: not reattached: {why}", spec.name);
                    RunRecord::remove(&dir);
                    let said = format!("exited while no daemon watched: {why}");
                    lock(&self.last_exit).insert(spec.name, (said, now_ms()));
                }
            }
        }
        found
    }

    async fn adopt(self: &Arc<Self>, name: &str, record: &RunRecord) -> Result<(), String> {
        let dir = self.vms.vm_dir(name);
        let qmp_path = dir.join("qmp.sock");
        // A pid is this VM's QEMU only if its command line names this VM's QMP socket: pids are
        // reused.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", record.pid))
            .map_err(|_| format!("QEMU {} is gone", record.pid))?;
        let wanted = qmp_path.display().to_string();
        if !String::from_utf8_lossy(&cmdline).contains(&wanted) {
            return Err(format!("pid {} is no longer its QEMU", record.pid));
        }
        let pid = i32::try_from(record.pid)
            .ok()
            .and_then(Pid::from_raw)
            .ok_or_else(|| format!("bad pid {}", record.pid))?;
        let fd = pidfd_open(pid, PidfdFlags::empty())
            .map_err(|e| format!("cannot watch QEMU {}: {e}", record.pid))?;
        let qmp = tokio::time::timeout(Duration::from_secs(10), Qmp::connect(&qmp_path))
            .await
            .map_err(|_| "its QMP socket did not answer within 10 s".to_string())?
            .map_err(|e| format!("its QMP socket: {e}"))?;
        // A checkpoint the last daemon was taking when it went was rolled back at start; the
        // pause or state save it began goes too, so the guest runs again.
        let status = qmp
            .execute("query-status", json!({}))
            .await
            .map_err(|e| format!("QEMU did not report its state: {e}"))?;
        match status["status"].as_str().unwrap_or("") {
            "running" => {}
            "inmigrate" | "prelaunch" => {
                let _ = pidfd_send_signal(fd.as_fd(), Signal::KILL);
                return Err("it was still loading a saved state; QEMU was stopped".into());
            }
            other => {
                let _ = qmp.execute("migrate_cancel", json!({})).await;
                match qmp.execute("cont", json!({})).await {
                    Ok(_) => info!("vm {name}: resumed the guest, left {other} by the last daemon"),
                    Err(e) => warn!("vm {name}: guest left {other}; resuming it: {e}"),
                }
            }
        }
        self.supervise(name, record, qmp, Process::Adopted(fd));
        // A guest frozen for a checkpoint the last daemon did not finish is thawed.
        let me = self.clone();
        let vm = name.to_string();
        tokio::spawn(async move {
            let short = Duration::from_secs(3);
            if let Ok(mut agent) = me.guest_agent(&vm, short).await {
                if agent.is_frozen(short).await.unwrap_or(false) {
                    match agent.thaw(short).await {
                        Ok(_) => {
                            info!("vm {vm}: thawed file systems left frozen by the last daemon")
                        }
                        Err(e) => warn!("vm {vm}: file systems are frozen; thawing: {e}"),
                    }
                }
            }
        });
        Ok(())
    }
}
