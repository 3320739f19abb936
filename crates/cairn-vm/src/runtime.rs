//! Running VMs: one `qemu-system-x86_64` process per VM, supervised by the daemon.
//!
//! Every disk is attached through Cairn's own NBD socket, so QEMU never touches the store's files
//! and a QEMU that dies can leave at most unflushed guest writes behind, exactly like a power cut
//! for that guest; the store itself stays consistent. Each VM gets a QMP socket, a serial log
//! (appended across runs) and a QEMU log in `vms/NAME/`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::process::Command;
use tokio::sync::{oneshot, watch};
use tracing::{info, warn};

use crate::guest_agent::{AgentError, GuestAgent};
use crate::qmp::Qmp;
use crate::spec::{VmSpec, VmStore};
use crate::VmError;

mod qemu;
mod reattach;
mod snapshot;

pub use qemu::{choose_accel, find_qemu, qemu_args, Qemu, MIN_QEMU};
use qemu::{qemu_args_at, AGENT_CHARDEV};
pub use reattach::RECONNECT_DELAY;
use reattach::{Process, RunRecord};
pub use snapshot::{
    discard_snapshot, ensure_snapshot_capabilities, finish_snapshot, prepare_snapshot,
    start_snapshot, wait_migration, wait_migration_reporting, SnapshotFile,
};

/// What `vm status` reports.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// VM name.
    pub name: String,
    /// `running`, `paused` or `stopped`.
    pub state: String,
    /// QEMU's pid while running.
    pub pid: Option<u32>,
    /// Seconds since start while running.
    pub uptime_secs: Option<u64>,
    /// Accelerator while running (`kvm` or `tcg`), and why it was chosen.
    pub accel: Option<String>,
    /// How the last run ended, if it ended while the daemon watched.
    pub last_exit: Option<String>,
    /// When it ended, ms since the Unix epoch.
    pub last_exit_ms: Option<u64>,
    /// Serial console log.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub console: PathBuf,
    /// After a stop: whether the guest ignored the power-off request and QEMU was stopped hard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hard_stop: Option<bool>,
}

struct Running {
    pid: u32,
    started: Instant,
    accel: String,
    qmp: Arc<Qmp>,
    kill: Mutex<Option<oneshot::Sender<()>>>,
    exited: watch::Receiver<bool>,
    stop_requested: std::sync::atomic::AtomicBool,
}

/// The VMs of one store, as run by its daemon.
pub struct Runtime {
    store_dir: PathBuf,
    nbd_socket: PathBuf,
    vms: VmStore,
    running: Mutex<HashMap<String, Arc<Running>>>,
    last_exit: Mutex<HashMap<String, (String, u64)>>,
}

use cairn_engine::sync::lock;

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Runtime {
    /// The runtime of the store in `store_dir`, whose NBD socket is `nbd_socket`.
    pub fn new(store_dir: &Path, nbd_socket: &Path) -> Runtime {
        Runtime {
            store_dir: store_dir.to_path_buf(),
            nbd_socket: nbd_socket.to_path_buf(),
            vms: VmStore::new(store_dir),
            running: Mutex::new(HashMap::new()),
            last_exit: Mutex::new(HashMap::new()),
        }
    }

    /// The definitions.
    pub fn definitions(&self) -> &VmStore {
        &self.vms
    }

    /// Whether a VM is running.
    pub fn is_running(&self, name: &str) -> bool {
        lock(&self.running).contains_key(name)
    }

    /// The running VM that has `volume` attached, if any.
    pub fn user_of(&self, volume: &str) -> Option<String> {
        let running: Vec<String> = lock(&self.running).keys().cloned().collect();
        running.into_iter().find(|n| {
            self.vms
                .get(n)
                .map(|s| s.disks.iter().any(|d| d == volume))
                .unwrap_or(false)
        })
    }

    /// Starts a VM; returns once QEMU answers on QMP.
    pub async fn start(self: &Arc<Self>, name: &str) -> Result<VmStatus, VmError> {
        self.launch(name, false).await
    }

    /// Starts a VM from saved state (`file`, written by a standard checkpoint): QEMU starts
    /// paused waiting for it, loads it, and the guest resumes where it was saved.
    pub async fn resume_from(
        self: &Arc<Self>,
        name: &str,
        file: &Path,
    ) -> Result<VmStatus, VmError> {
        self.launch(name, true).await?;
        let qmp = self.qmp(name)?;
        let loaded: Result<(), VmError> = async {
            let caps = json!({ "capabilities": [
                { "capability": "events", "state": true },
                { "capability": "mapped-ram", "state": true }
            ]});
            qmp.execute("migrate-set-capabilities", caps).await?;
            qmp.execute(
                "migrate-incoming",
                json!({ "uri": format!("file:{}", file.display()) }),
            )
            .await?;
            wait_migration(&qmp, Duration::from_secs(600)).await?;
            // A background-snapshot state resumes by itself; `cont` covers the other kind and
            // is refused harmlessly when the guest already runs.
            let _ = qmp.execute("cont", json!({})).await;
            if let Err(e) = ensure_snapshot_capabilities(&qmp).await {
                warn!("vm {name}: preparing for later checkpoints: {e}");
            }
            Ok(())
        }
        .await;
        if let Err(e) = loaded {
            let _ = self.kill(name).await;
            return Err(e);
        }
        Ok(self.status(name))
    }

    async fn launch(self: &Arc<Self>, name: &str, incoming: bool) -> Result<VmStatus, VmError> {
        let spec = self.vms.get(name)?;
        if let Some(r) = lock(&self.running).get(name) {
            return Err(VmError::Invalid(format!(
                "VM '{name}' is already running (QEMU pid {})",
                r.pid
            )));
        }
        for d in &spec.disks {
            if let Some(other) = self.user_of(d) {
                return Err(VmError::Invalid(format!(
                    "volume '{d}' is in use by running VM '{other}'; stop it first"
                )));
            }
        }
        let qemu = find_qemu()?;
        let (accel, why) = choose_accel(spec.accel.as_deref());
        let dir = self.vms.vm_dir(name);
        let qmp_path = dir.join("qmp.sock");
        let _ = std::fs::remove_file(&qmp_path);
        let log_path = dir.join("qemu.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| VmError::io("opening the QEMU log", &log_path, e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| VmError::io("opening the QEMU log", &log_path, e))?;
        let mut args = qemu_args(&spec, &dir, &self.nbd_socket, &accel);
        if incoming {
            args.extend(["-S", "-incoming", "defer"].map(String::from));
        }
        // QEMU outlives the daemon when it is left running (see reattach.rs): it is not killed
        // when its handle drops, and it has its own process group, so a Ctrl-C meant for a
        // `cairn serve` in a terminal does not reach it.
        let mut child = Command::new(&qemu.program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(false)
            .process_group(0)
            .spawn()
            .map_err(|e| VmError::Qemu(format!("cannot start {}: {e}", qemu.program.display())))?;
        let pid = child.id().unwrap_or(0);
        let qmp = connect_qmp(
            &mut child,
            &qmp_path,
            &format!("QEMU for VM '{name}'"),
            Some(&log_path),
        )
        .await?;
        if !incoming {
            // Before the guest runs; see ensure_snapshot_capabilities.
            if let Err(e) = ensure_snapshot_capabilities(&qmp).await {
                warn!("vm {name}: preparing for checkpoints: {e}");
            }
        }
        let record = RunRecord {
            pid,
            accel: format!("{accel} ({why})"),
            started_ms: now_ms(),
        };
        if let Err(e) = record.save(&dir) {
            warn!("vm {name}: {e}; a daemon started later will not find this QEMU");
        }
        info!("vm {name}: started QEMU {pid} on {accel} ({why})");
        self.supervise(name, &record, qmp, Process::Child(child));
        Ok(self.status(name))
    }

    /// Watches a QEMU until it exits (or is killed through [`Runtime::kill`]), then records how
    /// it ended and forgets it.
    fn supervise(
        self: &Arc<Self>,
        name: &str,
        record: &RunRecord,
        qmp: Arc<Qmp>,
        process: Process,
    ) {
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(false);
        let age = Duration::from_millis(now_ms().saturating_sub(record.started_ms));
        let run = Arc::new(Running {
            pid: record.pid,
            started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
            accel: record.accel.clone(),
            qmp,
            kill: Mutex::new(Some(kill_tx)),
            exited: exit_rx,
            stop_requested: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&self.running).insert(name.to_string(), run.clone());
        lock(&self.last_exit).remove(name);
        let me = self.clone();
        let vm = name.to_string();
        let pid = record.pid;
        tokio::spawn(async move {
            let how = process.ended(kill_rx).await;
            let requested = run.stop_requested.load(std::sync::atomic::Ordering::SeqCst);
            if requested {
                info!("vm {vm}: QEMU {pid} stopped ({how})");
            } else {
                warn!("vm {vm}: QEMU {pid} exited unexpectedly ({how}); the store is unaffected");
            }
            RunRecord::remove(&me.vms.vm_dir(&vm));
            lock(&me.running).remove(&vm);
            let said = match requested {
                true => "stopped: ",
                false => "exited unexpectedly: ",
            };
            lock(&me.last_exit).insert(vm, (format!("{said}{how}"), now_ms()));
            let _ = exit_tx.send(true);
        });
    }

    /// Asks the guest to power off (ACPI), waits up to `timeout`, then stops QEMU hard.
    pub async fn stop(&self, name: &str, timeout: Duration) -> Result<VmStatus, VmError> {
        let run = self.running_vm(name)?;
        run.stop_requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut exited = run.exited.clone();
        let _ = run.qmp.execute("system_powerdown", json!({})).await;
        let graceful = tokio::time::timeout(timeout, exited.wait_for(|e| *e))
            .await
            .is_ok();
        if !graceful {
            warn!("vm {name}: guest did not power off within {timeout:?}; stopping QEMU");
            let _ = run.qmp.execute("quit", json!({})).await;
            if tokio::time::timeout(Duration::from_secs(5), exited.wait_for(|e| *e))
                .await
                .is_err()
            {
                self.kill_running(&run);
                let _ = exited.wait_for(|e| *e).await;
            }
        }
        let mut status = self.status(name);
        status.hard_stop = Some(!graceful);
        Ok(status)
    }

    /// Kills QEMU at once (the guest loses what it had not flushed, as on power loss).
    pub async fn kill(&self, name: &str) -> Result<VmStatus, VmError> {
        let run = self.running_vm(name)?;
        run.stop_requested
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.kill_running(&run);
        let mut exited = run.exited.clone();
        let _ = exited.wait_for(|e| *e).await;
        Ok(self.status(name))
    }

    fn kill_running(&self, run: &Running) {
        if let Some(tx) = lock(&run.kill).take() {
            let _ = tx.send(());
        }
    }

    fn running_vm(&self, name: &str) -> Result<Arc<Running>, VmError> {
        self.vms.get(name)?;
        lock(&self.running)
            .get(name)
            .cloned()
            .ok_or_else(|| VmError::NotRunning(name.to_string()))
    }

    /// A synchronised connection to the guest agent of a running VM, or why there is none. The
    /// guest must have opened its agent port (QEMU tells), and the agent must answer within
    /// `timeout`.
    pub async fn guest_agent(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<GuestAgent, AgentError> {
        let qmp = self
            .qmp(name)
            .map_err(|e| AgentError::Unavailable(e.to_string()))?;
        let chardevs = qmp
            .execute("query-chardev", json!({}))
            .await
            .map_err(|e| AgentError::Unavailable(format!("QEMU did not list its channels: {e}")))?;
        let open = chardevs.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["label"] == AGENT_CHARDEV)
                .map(|c| c["frontend-open"].as_bool().unwrap_or(false))
        });
        match open {
            None => Err(AgentError::Unavailable(
                "this VM's QEMU has no guest agent channel (started by an older Cairn?)".into(),
            )),
            Some(false) => Err(AgentError::Unavailable(
                "the guest has not opened its agent port (is qemu-guest-agent installed and running in it?)".into(),
            )),
            Some(true) => {
                GuestAgent::connect(&self.vms.vm_dir(name).join("qga.sock"), timeout).await
            }
        }
    }

    /// The QMP connection of a running VM.
    pub fn qmp(&self, name: &str) -> Result<Arc<Qmp>, VmError> {
        Ok(self.running_vm(name)?.qmp.clone())
    }

    /// State, pid, uptime and accelerator.
    pub fn status(&self, name: &str) -> VmStatus {
        let run = lock(&self.running).get(name).cloned();
        // One lock, taken once: two guards of it in one expression would deadlock.
        let last = lock(&self.last_exit).get(name).cloned();
        VmStatus {
            name: name.to_string(),
            state: if run.is_some() { "running" } else { "stopped" }.into(),
            pid: run.as_ref().map(|r| r.pid),
            uptime_secs: run.as_ref().map(|r| r.started.elapsed().as_secs()),
            accel: run.as_ref().map(|r| r.accel.clone()),
            last_exit: last.as_ref().map(|e| e.0.clone()),
            last_exit_ms: last.map(|e| e.1),
            console: self.vms.vm_dir(name).join("console.log"),
            hard_stop: None,
        }
    }

    /// Stops every VM (daemon shutdown): its disks are about to go away with the daemon.
    pub async fn stop_all(&self, timeout: Duration) {
        let names: Vec<String> = lock(&self.running).keys().cloned().collect();
        for n in names {
            if let Err(e) = self.stop(&n, timeout).await {
                warn!("vm {n}: {e}");
            }
        }
    }

    /// Store directory.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }
}

/// Connects to a QEMU's QMP socket as soon as QEMU has created it (it does so while starting),
/// failing if QEMU exits first or takes more than 30 s; `log` is quoted in the error.
async fn connect_qmp(
    child: &mut tokio::process::Child,
    path: &Path,
    what: &str,
    log: Option<&Path>,
) -> Result<Arc<Qmp>, VmError> {
    let detail = || log.map(|l| format!(": {}", tail(l))).unwrap_or_default();
    let t = Instant::now();
    loop {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(VmError::Qemu(format!(
                "{what} exited at start ({st}){}",
                detail()
            )));
        }
        if let Ok(q) = Qmp::connect(path).await {
            return Ok(q);
        }
        if t.elapsed() > Duration::from_secs(30) {
            let _ = child.start_kill();
            return Err(VmError::Qemu(format!(
                "{what} did not open its QMP socket within 30 s{}",
                detail()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let mut lines: Vec<&str> = lines.into_iter().rev().collect();
    if lines.is_empty() {
        lines.push("(QEMU printed nothing)");
    }
    lines.join(" | ")
}
