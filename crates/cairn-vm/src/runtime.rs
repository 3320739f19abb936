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

/// Oldest QEMU Cairn drives (`mapped-ram` migration streams appeared in 9.0).
pub const MIN_QEMU: (u32, u32) = (9, 0);

/// The QEMU binary found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// Program to run.
    pub program: PathBuf,
    /// Version (major, minor, micro).
    pub version: (u32, u32, u32),
}

/// Finds `qemu-system-x86_64` (or `$CAIRN_QEMU`) and checks its version.
pub fn find_qemu() -> Result<Qemu, VmError> {
    let program = std::env::var_os("CAIRN_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let out = std::process::Command::new(&program)
        .arg("--version")
        .output()
        .map_err(|e| {
            VmError::Qemu(format!(
                "cannot run {} ({e}); install QEMU with ./scripts/setup-qemu.sh (Debian: qemu-system-x86 from bookworm-backports)",
                program.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split("version ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|v| {
            let mut n = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
            (
                n.next().unwrap_or(0),
                n.next().unwrap_or(0),
                n.next().unwrap_or(0),
            )
        })
        .ok_or_else(|| {
            VmError::Qemu(format!(
                "cannot read the version of {}: {text}",
                program.display()
            ))
        })?;
    if (version.0, version.1) < MIN_QEMU {
        return Err(VmError::Qemu(format!(
            "{} is QEMU {}.{}.{}; Cairn needs {}.{} or newer (./scripts/setup-qemu.sh installs 10.x)",
            program.display(),
            version.0,
            version.1,
            version.2,
            MIN_QEMU.0,
            MIN_QEMU.1
        )));
    }
    Ok(Qemu { program, version })
}

/// The accelerator to use and why: KVM when `/dev/kvm` opens and is not PVM-based nested
/// virtualization (which cannot run stock guests), TCG otherwise. `forced` overrides.
pub fn choose_accel(forced: Option<&str>) -> (String, String) {
    if let Some(a) = forced.or(std::env::var("CAIRN_ACCEL").ok().as_deref()) {
        return (a.to_string(), "chosen explicitly".into());
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match kvm {
        Err(e) => ("tcg".into(), format!("/dev/kvm unusable ({e})")),
        Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => (
            "tcg".into(),
            "/dev/kvm is PVM nested virtualization, which cannot run stock guests".into(),
        ),
        Ok(_) => ("kvm".into(), "/dev/kvm works".into()),
    }
}

/// What `vm status` reports.
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// QEMU's id for the guest agent's channel.
const AGENT_CHARDEV: &str = "qga0";

/// The QEMU command line for a VM (without the program).
pub fn qemu_args(spec: &VmSpec, dir: &Path, nbd_socket: &Path, accel: &str) -> Vec<String> {
    qemu_args_at(spec, dir, nbd_socket, accel, None)
}

/// [`qemu_args`] with the disks attached read-only from checkpoint `at` instead of the heads
/// (for a helper QEMU that must look exactly like the VM at that checkpoint).
fn qemu_args_at(
    spec: &VmSpec,
    dir: &Path,
    nbd_socket: &Path,
    accel: &str,
    at: Option<&str>,
) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},debug-threads=on", spec.name),
        "-accel".into(),
        accel.into(),
        "-machine".into(),
        "q35".into(),
        "-cpu".into(),
        if accel == "kvm" { "host" } else { "max" }.into(),
        "-m".into(),
        format!("{}M", spec.memory >> 20),
        "-smp".into(),
        spec.cpus.to_string(),
        "-uuid".into(),
        spec.uuid.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        // The vAPIC option ROM's state does not load back into a fresh QEMU (see
        // docs/qemu-state-notes.md); without it, saved memory state restores.
        "-global".into(),
        "apic.vapic=off".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p("qmp.sock")),
        "-chardev".into(),
        format!("file,id=serial0,path={},append=on", p("console.log")),
        "-serial".into(),
        "chardev:serial0".into(),
        "-pidfile".into(),
        p("qemu.pid"),
        // The guest agent's channel: a virtio-serial port the agent in the guest opens, a unix
        // socket on this side (see guest_agent.rs). Always there, like Hyper-V's integration
        // services, so any guest that runs qemu-guest-agent can be quiesced.
        "-chardev".into(),
        format!(
            "socket,id={AGENT_CHARDEV},path={},server=on,wait=off",
            p("qga.sock")
        ),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-device".into(),
        format!("virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name=org.qemu.guest_agent.0"),
    ];
    for (i, vol) in spec.disks.iter().enumerate() {
        let export = match at {
            Some(c) => format!("{vol}@{c}"),
            None => vol.clone(),
        };
        let node = json!({
            "driver": "raw",
            "node-name": format!("disk{i}"),
            "read-only": at.is_some(),
            "file": {
                "driver": "nbd",
                "node-name": format!("nbd{i}"),
                "read-only": at.is_some(),
                "server": { "type": "unix", "path": nbd_socket },
                "export": export,
            },
        });
        a.push("-blockdev".into());
        a.push(node.to_string());
        let mut dev = format!("virtio-blk-pci,drive=disk{i},id=vd{i}");
        if i == 0 && spec.kernel.is_none() {
            dev.push_str(",bootindex=0");
        }
        a.push("-device".into());
        a.push(dev);
    }
    if let Some(k) = &spec.kernel {
        a.push("-kernel".into());
        a.push(k.display().to_string());
        if let Some(i) = &spec.initrd {
            a.push("-initrd".into());
            a.push(i.display().to_string());
        }
        if let Some(t) = &spec.append {
            a.push("-append".into());
            a.push(t.clone());
        }
    }
    if spec.net.as_deref() == Some("user") {
        a.push("-netdev".into());
        a.push("user,id=net0".into());
        a.push("-device".into());
        a.push(format!("virtio-net-pci,netdev=net0,mac={}", spec.mac));
    }
    a
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
        let mut child = Command::new(&qemu.program)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(log2)
            .kill_on_drop(true)
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
        let (kill_tx, kill_rx) = oneshot::channel::<()>();
        let (exit_tx, exit_rx) = watch::channel(false);
        let run = Arc::new(Running {
            pid,
            started: Instant::now(),
            accel: format!("{accel} ({why})"),
            qmp,
            kill: Mutex::new(Some(kill_tx)),
            exited: exit_rx,
            stop_requested: std::sync::atomic::AtomicBool::new(false),
        });
        lock(&self.running).insert(name.to_string(), run.clone());
        lock(&self.last_exit).remove(name);
        info!("vm {name}: started QEMU {pid} on {accel} ({why})");
        let me = self.clone();
        let vm = name.to_string();
        tokio::spawn(async move {
            let status = tokio::select! {
                st = child.wait() => st,
                _ = kill_rx => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            let how = match &status {
                Ok(st) => st.to_string(),
                Err(e) => format!("wait failed: {e}"),
            };
            let requested = run.stop_requested.load(std::sync::atomic::Ordering::SeqCst);
            if requested {
                info!("vm {vm}: QEMU {pid} stopped ({how})");
            } else {
                warn!("vm {vm}: QEMU {pid} exited unexpectedly ({how}); the store is unaffected");
            }
            lock(&me.running).remove(&vm);
            lock(&me.last_exit).insert(
                vm,
                (
                    format!(
                        "{}{how}",
                        if requested {
                            "stopped: "
                        } else {
                            "exited unexpectedly: "
                        }
                    ),
                    now_ms(),
                ),
            );
            let _ = exit_tx.send(true);
        });
        Ok(self.status(name))
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

/// Starts the background snapshot into a file from [`prepare_snapshot`].
pub async fn start_snapshot(qmp: &Qmp, snapshot: &SnapshotFile) -> Result<(), VmError> {
    let uri = format!("file:/dev/fdset/{}", snapshot.fdset);
    qmp.execute("migrate", json!({ "uri": uri })).await?;
    Ok(())
}

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

/// Waits until the migration (save or load) completes; its failure is an error. QEMU announces
/// each status change with a `MIGRATION` event (with the `events` capability on, as Cairn sets
/// it); `query-migrate` is asked only at the start and then rarely, as a safety net: it runs
/// under QEMU's big lock, and polling it every 10 ms during a background snapshot kept taking
/// that lock from the running guest.
pub async fn wait_migration(qmp: &Qmp, timeout: Duration) -> Result<serde_json::Value, VmError> {
    let mut events = qmp.events();
    let t = Instant::now();
    loop {
        let r = qmp.execute("query-migrate", json!({})).await?;
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

fn tail(p: &Path) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    let mut lines: Vec<&str> = lines.into_iter().rev().collect();
    if lines.is_empty() {
        lines.push("(QEMU printed nothing)");
    }
    lines.join(" | ")
}
