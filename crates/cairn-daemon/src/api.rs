//! The control API the daemon serves: `POST /v1/ops` runs one [`Op`] through the same
//! [`execute`] the CLI uses without a daemon; `GET /v1/status` describes the daemon. Operations
//! run on tokio's blocking pool, since the engine does synchronous I/O.

use std::future::Future;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use cairn_control::{execute, DaemonStatus, ErrorKind, Op, OpError, Reply, StreamLine};
use cairn_engine::Store;
use cairn_vm::guest_agent::GuestAgent;
use cairn_vm::{Runtime, VmError};

use crate::nbd_clients;
use tracing::{info, warn};

#[derive(Clone)]
struct ApiState {
    store: Arc<Store>,
    nbd: Arc<cairn_nbd::Server>,
    runtime: Arc<Runtime>,
    status: Arc<DaemonStatus>,
}

/// The API's routes over the store `nbd` serves and its VMs.
pub fn router(nbd: Arc<cairn_nbd::Server>, runtime: Arc<Runtime>, status: DaemonStatus) -> Router {
    Router::new()
        .route("/v1/ops", post(ops))
        .route("/v1/status", get(daemon_status))
        // An operation carries at most MAX_DATA bytes, base64-encoded in JSON.
        .layer(axum::extract::DefaultBodyLimit::max(
            (cairn_control::MAX_DATA as usize) * 4 / 3 + (64 << 10),
        ))
        .with_state(ApiState {
            store: nbd.store().clone(),
            nbd,
            runtime,
            status: Arc::new(status),
        })
}

/// Serves the API on `listener` until `stop` completes (calls in flight finish first).
pub async fn serve(
    listener: tokio::net::UnixListener,
    nbd: Arc<cairn_nbd::Server>,
    runtime: Arc<Runtime>,
    status: DaemonStatus,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    if let Err(e) = axum::serve(listener, router(nbd, runtime, status))
        .with_graceful_shutdown(stop)
        .await
    {
        warn!("control API stopped: {e}");
    }
}

fn http_status(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Exists => StatusCode::CONFLICT,
        ErrorKind::Invalid => StatusCode::BAD_REQUEST,
        ErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        ErrorKind::Busy => StatusCode::LOCKED,
        ErrorKind::Corrupt | ErrorKind::Io => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorKind::Daemon => StatusCode::BAD_GATEWAY,
        ErrorKind::State => StatusCode::CONFLICT,
        ErrorKind::Vm => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

fn failure(e: OpError) -> Response {
    (http_status(e.kind), Json(e)).into_response()
}

async fn ops(State(st): State<ApiState>, headers: HeaderMap, body: Bytes) -> Response {
    let op: Op = match serde_json::from_slice(&body) {
        Ok(op) => op,
        Err(e) => {
            warn!("api: malformed request refused: {e}");
            return failure(OpError::new(
                ErrorKind::Invalid,
                format!("malformed operation: {e}"),
            ));
        }
    };
    let name = serde_json::to_value(&op)
        .ok()
        .and_then(|v| v["op"].as_str().map(str::to_string))
        .unwrap_or_default();
    let streamed = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(cairn_control::NDJSON));
    if streamed {
        return streamed_run(st, op, name);
    }
    match run(&st, op, &name, Progress::none()).await {
        Ok(reply) => {
            info!("api: {name}");
            (StatusCode::OK, Json(reply)).into_response()
        }
        Err(e) => {
            info!("api: {name} failed: {e}");
            failure(e)
        }
    }
}

/// Answers at once and streams the operation's progress, then its outcome, one JSON line each
/// ([`StreamLine`]). The operation runs to its end even if the client goes away: work such as a
/// delete is not left half-done because a terminal closed.
fn streamed_run(st: ApiState, op: Op, name: String) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Bytes>();
    let line = |l: &StreamLine| {
        let mut v = serde_json::to_vec(l).unwrap_or_default();
        v.push(b'\n');
        Bytes::from(v)
    };
    let progress = Progress::to(tx.clone(), line);
    tokio::spawn(async move {
        let end = match run(&st, op, &name, progress).await {
            Ok(reply) => {
                info!("api: {name}");
                StreamLine::Reply(Box::new(reply))
            }
            Err(e) => {
                info!("api: {name} failed: {e}");
                StreamLine::Error(e)
            }
        };
        let _ = tx.send(line(&end));
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, cairn_control::NDJSON)],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Where an operation reports how far it got: a streamed answer's channel, or nowhere. Reports
/// closer together than a tenth of a second are dropped; the outcome follows anyway.
#[derive(Clone)]
struct Progress(Option<Arc<dyn Fn(u64) + Send + Sync>>);

impl Progress {
    fn none() -> Progress {
        Progress(None)
    }

    fn to(
        tx: tokio::sync::mpsc::UnboundedSender<Bytes>,
        line: impl Fn(&StreamLine) -> Bytes + Send + Sync + 'static,
    ) -> Progress {
        let last = std::sync::Mutex::new(None::<std::time::Instant>);
        Progress(Some(Arc::new(move |n| {
            let mut last = last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < std::time::Duration::from_millis(100)) {
                return;
            }
            *last = Some(std::time::Instant::now());
            let _ = tx.send(line(&StreamLine::Progress(n)));
        })))
    }

    fn report(&self, n: u64) {
        if let Some(f) = &self.0 {
            f(n)
        }
    }
}

/// Runs one operation: those that need QEMU or know what runs here, all else through the same
/// `execute` the CLI runs without a daemon.
async fn run(st: &ApiState, op: Op, name: &str, progress: Progress) -> Result<Reply, OpError> {
    let rewound = match &op {
        Op::CheckpointApply {
            volume,
            name,
            force,
            ..
        } if st.runtime.user_of(volume).is_none() => {
            // (A running VM's disk is refused below, with a better message than its QEMU.)
            let heads = rewound_heads(st, volume, name);
            let qemu = st.runtime.status(volume).pid;
            let what = format!("{volume}@{name}");
            nbd_clients::check(&st.nbd, &heads, qemu, *force, &what)?;
            Some((heads, *force, what))
        }
        _ => None,
    };
    if let Some(r) = running_vm_checkpoint(st, &op, &progress).await {
        return r;
    }
    let rt = &st.runtime;
    let vm_reply = match &op {
        Op::VmStart { name } => Some(rt.start(name).await.map(Reply::VmStatus)),
        Op::VmStop { name, timeout_secs } => Some(
            rt.stop(name, std::time::Duration::from_secs(*timeout_secs))
                .await
                .map(Reply::VmStatus),
        ),
        Op::VmKill { name } => Some(rt.kill(name).await.map(Reply::VmStatus)),
        Op::VmStatus { name } => Some(
            rt.definitions()
                .get(name)
                .map(|_| Reply::VmStatus(rt.status(name))),
        ),
        Op::VmDelete { name } if rt.is_running(name) => Some(Err(VmError::Running(name.clone()))),
        Op::VmEdit(def) if rt.is_running(&def.name) => {
            Some(Err(VmError::Running(def.name.clone())))
        }
        Op::CheckpointApply { volume, .. } | Op::VolumeDelete { name: volume } => {
            rt.user_of(volume).map(|vm| {
                Err(VmError::Invalid(format!(
                    "volume '{volume}' is a disk of running VM '{vm}'; stop the VM first"
                )))
            })
        }
        _ => None,
    };
    if let Some(r) = vm_reply {
        return r.map_err(OpError::from);
    }
    // The heads an apply rewinds take no new clients while it runs, and the ones on them go.
    let _fence = match &rewound {
        Some((heads, force, what)) => {
            Some(nbd_clients::clear(&st.nbd, heads, None, *force, what).await?)
        }
        None => None,
    };
    let store = st.store.clone();
    tokio::task::spawn_blocking(move || execute(&store, op, &mut |n| progress.report(n)))
        .await
        .map_err(|e| {
            OpError::new(
                ErrorKind::Daemon,
                format!("operation {name} crashed in the daemon: {e}"),
            )
        })?
}

async fn daemon_status(State(st): State<ApiState>) -> Json<DaemonStatus> {
    Json((*st.status).clone())
}

fn join_err(e: tokio::task::JoinError) -> OpError {
    OpError::new(
        ErrorKind::Daemon,
        format!("operation crashed in the daemon: {e}"),
    )
}

/// Checkpoint operations that need QEMU: taking one of a running VM, applying one to a running
/// VM, and applying a standard checkpoint (which resumes the guest); `None` for the others.
async fn running_vm_checkpoint(
    st: &ApiState,
    op: &Op,
    progress: &Progress,
) -> Option<Result<Reply, OpError>> {
    let rt = &st.runtime;
    match op {
        Op::CheckpointCreate {
            volume,
            name,
            description,
            disk_only,
            quiesce,
        } if rt.is_running(volume) => {
            if *quiesce && !disk_only {
                return Some(Err(OpError::new(
                    ErrorKind::Invalid,
                    "--quiesce applies to --disk-only checkpoints: a standard checkpoint keeps the guest's memory, caches included",
                )));
            }
            let how = if *disk_only {
                Take::DiskOnly { quiesce: *quiesce }
            } else {
                Take::Standard
            };
            let name = match name {
                Some(n) => n.clone(),
                None => match blocking(st, {
                    let vm = volume.clone();
                    move |store, vms| {
                        cairn_control::new_vm_checkpoint_name(
                            store,
                            vms,
                            &vm,
                            cairn_control::UNNAMED_PREFIX,
                        )
                    }
                })
                .await
                {
                    Ok(n) => n,
                    Err(e) => return Some(Err(e)),
                },
            };
            let described = description.clone();
            let taken = take_running(st, volume, &name, described, how, false, progress).await;
            Some(taken.map(|cp| {
                Reply::VmCheckpoint(cairn_control::reports::VmCheckpointInfo::of(
                    &st.store,
                    &cp,
                    Some(&cp.name),
                ))
            }))
        }
        Op::CheckpointApply {
            volume,
            name,
            save_current,
            discard_current,
            force,
        } if rt.definitions().exists(volume)
            && (rt.is_running(volume) || is_standard(st, volume, name)) =>
        {
            let (save, discard) = (save_current.clone(), *discard_current);
            Some(apply_running(st, volume, name, (save, discard), *force, progress).await)
        }
        _ => None,
    }
}

/// Runs `f` on the blocking pool with the store and the VM definitions.
async fn blocking<T: Send + 'static>(
    st: &ApiState,
    f: impl FnOnce(&Store, &cairn_vm::VmStore) -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    let (store, vms) = (st.store.clone(), st.runtime.definitions().clone());
    tokio::task::spawn_blocking(move || f(&store, &vms))
        .await
        .map_err(join_err)?
}

/// The volumes whose heads applying `target@name` rewinds: a VM checkpoint's disks, or the
/// volume itself.
fn rewound_heads(st: &ApiState, target: &str, name: &str) -> Vec<String> {
    let vms = st.runtime.definitions();
    match vms.exists(target) {
        true => vms
            .checkpoint(target, name)
            .map(|c| c.disks)
            .unwrap_or_default(),
        false => vec![target.to_string()],
    }
}

fn is_standard(st: &ApiState, vm: &str, name: &str) -> bool {
    st.runtime
        .definitions()
        .checkpoint(vm, name)
        .is_ok_and(|c| c.kind == cairn_vm::checkpoint::CheckpointKind::Standard)
}

/// Deletes what a failed checkpoint made (disk and state checkpoints, record).
async fn undo(st: &ApiState, cp: &cairn_vm::checkpoint::VmCheckpoint, e: OpError) -> OpError {
    let (store, vms, cp) = (
        st.store.clone(),
        st.runtime.definitions().clone(),
        cp.clone(),
    );
    let _ = tokio::task::spawn_blocking(move || {
        let _ = cairn_vm::checkpoint::delete(&vms, &store, &cp);
        cairn_vm::checkpoint::abandon(&vms, &cp);
    })
    .await;
    e
}

/// What checkpoint of a running VM to take.
#[derive(Debug, Clone, Copy)]
enum Take {
    /// Disks, memory and device state.
    Standard,
    /// Disks only, quiesced through the guest agent when one answers; `quiesce` makes that
    /// a requirement.
    DiskOnly { quiesce: bool },
}

/// How long the guest agent gets to answer its first command: it answers in milliseconds when
/// it runs; when it does not, a disk-only checkpoint falls back to crash-consistent this late.
const AGENT_ANSWER: std::time::Duration = std::time::Duration::from_secs(3);
/// How long freezing may take: the guest flushes its dirty data first.
const AGENT_FREEZE: std::time::Duration = std::time::Duration::from_secs(60);

/// Flushes and freezes the guest's file systems through its agent. Returns the connection (to
/// thaw through), how many were frozen, and whether they were frozen already (by someone else,
/// whose freeze Cairn leaves in place).
async fn freeze_guest(
    st: &ApiState,
    vm: &str,
) -> Result<(GuestAgent, u64, bool), cairn_vm::guest_agent::AgentError> {
    let mut agent = st.runtime.guest_agent(vm, AGENT_ANSWER).await?;
    if agent.is_frozen(AGENT_ANSWER).await? {
        return Ok((agent, 0, true));
    }
    match agent.freeze(AGENT_FREEZE).await {
        Ok(n) => Ok((agent, n, false)),
        Err(e) => {
            // A freeze that failed part-way, or is still running in the guest, may leave some
            // file systems frozen: thaw after it (the agent runs commands in order).
            if let Err(t) = agent.thaw(AGENT_FREEZE).await {
                warn!("vm {vm}: thawing after a failed freeze: {t}");
            }
            Err(e)
        }
    }
}

/// Thaws what [`freeze_guest`] froze; a guest left frozen blocks on its next write, so this
/// retries before giving up.
async fn thaw_guest(vm: &str, agent: &mut GuestAgent) -> Result<(), String> {
    let mut last = String::new();
    for _ in 0..3 {
        match agent.thaw(AGENT_FREEZE).await {
            Ok(_) => return Ok(()),
            Err(e) => {
                warn!("vm {vm}: thawing the guest's file systems: {e}");
                last = e.to_string();
            }
        }
    }
    Err(last)
}

/// A checkpoint of every disk of a running VM at one instant: the guest is paused (QEMU drains
/// and flushes its I/O on `stop`), the disks are checkpointed (O(1) each), and, for a standard
/// checkpoint, QEMU starts a background snapshot of memory and device state at that same
/// instant; the guest resumes at once while QEMU writes the snapshot, which then moves into the
/// VM's state volume. A disk-only checkpoint first has the guest agent (if one answers) freeze
/// the guest's file systems, and thaws them as soon as the guest runs again.
async fn take_running(
    st: &ApiState,
    vm: &str,
    name: &str,
    description: Option<String>,
    how: Take,
    automatic: bool,
    progress: &Progress,
) -> Result<cairn_vm::checkpoint::VmCheckpoint, OpError> {
    use cairn_vm::checkpoint as ck;
    let with_memory = matches!(how, Take::Standard);
    let vms = st.runtime.definitions().clone();
    let spec = vms.get(vm)?;
    let store = st.store.clone();
    let mut cp = {
        let (vms, store, name) = (vms.clone(), store.clone(), name.to_string());
        tokio::task::spawn_blocking(move || {
            ck::begin(
                &vms,
                &store,
                &spec,
                &name,
                description.as_deref(),
                true,
                cairn_vm::now_ms(),
            )
        })
        .await
        .map_err(join_err)??
    };
    cp.automatic = automatic;
    let qmp = st.runtime.qmp(vm)?;
    let state_file = vms.vm_dir(vm).join(format!("state-{name}.tmp"));
    if with_memory {
        if let Err(e) = cairn_vm::runtime::ensure_snapshot_capabilities(&qmp).await {
            ck::abandon(&vms, &cp);
            return Err(e.into());
        }
    }
    let t = std::time::Instant::now();
    let prepared = if with_memory {
        let _ = std::fs::remove_file(&state_file);
        match cairn_vm::runtime::prepare_snapshot(&qmp, &state_file).await {
            Ok(f) => Some(f),
            Err(e) => {
                ck::abandon(&vms, &cp);
                return Err(e.into());
            }
        }
    } else {
        None
    };
    let mut frozen = None;
    if let Take::DiskOnly { quiesce } = how {
        match freeze_guest(st, vm).await {
            Ok((agent, n, already)) => {
                cp.consistency = Some(ck::Consistency::Application);
                cp.consistency_note = Some(if already {
                    "the guest's file systems were already frozen; left frozen".into()
                } else {
                    format!(
                        "the guest agent froze {n} file system{}",
                        if n == 1 { "" } else { "s" }
                    )
                });
                // Cairn thaws only what it froze.
                frozen = (!already).then_some((agent, std::time::Instant::now()));
            }
            Err(e) if quiesce => {
                ck::abandon(&vms, &cp);
                return Err(OpError::new(
                    ErrorKind::State,
                    format!("cannot quiesce VM '{vm}': {e}; checkpoint '{name}' was not taken (without --quiesce, Cairn takes a crash-consistent one)"),
                ));
            }
            Err(e) => {
                cp.consistency = Some(ck::Consistency::Crash);
                cp.consistency_note = Some(e.to_string());
            }
        }
    }
    let pause = std::time::Instant::now();
    if let Err(e) = qmp.execute("stop", serde_json::json!({})).await {
        if let Some((mut agent, _)) = frozen {
            let _ = thaw_guest(vm, &mut agent).await;
        }
        if let Some(file) = prepared {
            cairn_vm::runtime::discard_snapshot(&qmp, file).await;
        }
        ck::abandon(&vms, &cp);
        return Err(VmError::from(e).into());
    }
    let taken = {
        let (store, cp) = (store.clone(), cp.clone());
        tokio::task::spawn_blocking(move || ck::take_disks(&store, &cp))
            .await
            .map_err(join_err)
            .and_then(|r| r.map_err(OpError::from))
    };
    let snapshot = match (taken.is_ok(), prepared) {
        (true, Some(file)) => Some(match cairn_vm::runtime::start_snapshot(&qmp, &file).await {
            Ok(()) => Ok(file),
            Err(e) => {
                cairn_vm::runtime::discard_snapshot(&qmp, file).await;
                Err(e)
            }
        }),
        (false, Some(file)) => {
            cairn_vm::runtime::discard_snapshot(&qmp, file).await;
            None
        }
        (_, None) => None,
    };
    // Resume whatever happened: a failed checkpoint must not leave the guest paused.
    let resumed = qmp.execute("cont", serde_json::json!({})).await;
    let paused = pause.elapsed();
    if let Err(e) = resumed {
        warn!("vm {vm}: could not resume after checkpoint {name}: {e}");
    }
    let mut frozen_for = None;
    if let Some((mut agent, since)) = frozen {
        let thawed = thaw_guest(vm, &mut agent).await;
        frozen_for = Some(since.elapsed());
        if let Err(e) = thawed {
            cp.consistency_note = Some(format!(
                "{}; but thawing failed ({e}): the guest's file systems may still be frozen",
                cp.consistency_note.take().unwrap_or_default()
            ));
        }
    }
    // The disk checkpoints are durable from here: one commit, with the guest running again.
    let taken = match taken {
        Ok(()) => {
            let (store, cp) = (store.clone(), cp.clone());
            tokio::task::spawn_blocking(move || ck::persist_disks(&store, &cp))
                .await
                .map_err(join_err)
                .and_then(|r| r.map_err(OpError::from))
        }
        Err(e) => Err(e),
    };
    if let Err(e) = taken {
        if let Some(Ok(file)) = snapshot {
            let _ = qmp.execute("migrate_cancel", serde_json::json!({})).await;
            let _ =
                cairn_vm::runtime::wait_migration(&qmp, std::time::Duration::from_secs(30)).await;
            cairn_vm::runtime::discard_snapshot(&qmp, file).await;
        }
        ck::abandon(&vms, &cp);
        return Err(e);
    }
    let mut snapshot_downtime = None;
    let (mut snapshot_for, mut relayout_for, mut store_for) = (None, None, None);
    if let Some(started) = snapshot {
        let phase = std::time::Instant::now();
        let done = match started {
            Ok(file) => {
                // Progress: bytes of memory written so far.
                let report = |n| progress.report(n);
                let ten_minutes = std::time::Duration::from_secs(600);
                let r =
                    cairn_vm::runtime::wait_migration_reporting(&qmp, ten_minutes, &report).await;
                cairn_vm::runtime::finish_snapshot(&qmp, file).await;
                r
            }
            Err(e) => Err(e),
        };
        let downtime = done.as_ref().ok().and_then(|r| r["downtime"].as_u64());
        snapshot_downtime = downtime;
        if let Err(e) = done {
            let _ = std::fs::remove_file(&state_file);
            return Err(undo(st, &cp, e.into()).await);
        }
        // Re-lay the state with fixed page offsets so unchanged memory is shared between
        // checkpoints; the guest is already running again.
        snapshot_for = Some(phase.elapsed());
        let phase = std::time::Instant::now();
        let mapped = vms.vm_dir(vm).join(format!("state-{name}.mapped"));
        let converted = st
            .runtime
            .to_mapped_ram(vm, name, &state_file, &mapped)
            .await;
        let _ = std::fs::remove_file(&state_file);
        if let Err(e) = converted {
            let _ = std::fs::remove_file(&mapped);
            return Err(undo(st, &cp, e.into()).await);
        }
        relayout_for = Some(phase.elapsed());
        let phase = std::time::Instant::now();
        let state_file = mapped;
        let stored = {
            let (store, cp2, file) = (store.clone(), cp.clone(), state_file.clone());
            tokio::task::spawn_blocking(move || ck::store_state(&store, &cp2, &file))
                .await
                .map_err(join_err)
                .and_then(|r| r.map_err(OpError::from))
        };
        let _ = std::fs::remove_file(&state_file);
        store_for = Some(phase.elapsed());
        match stored {
            Ok(len) => {
                cp.kind = ck::CheckpointKind::Standard;
                cp.state_len = Some(len);
            }
            Err(e) => return Err(undo(st, &cp, e).await),
        }
        info!(
            "vm {vm}: standard checkpoint {name}: guest paused {paused:?} for the disks, QEMU reports {} ms of snapshot downtime, {} bytes of state, {:?} in all",
            downtime.unwrap_or(0),
            cp.state_len.unwrap_or(0),
            t.elapsed()
        );
    } else {
        info!(
            "vm {vm}: checkpoint {name} of {} disk(s), {}, guest paused {paused:?}{}",
            cp.disks.len(),
            cp.kind_summary(),
            frozen_for
                .map(|f| format!(", file systems frozen {f:?}"))
                .unwrap_or_default()
        );
    }
    cp.timings = Some(ck::Timings {
        frozen_us: frozen_for.map(|f| f.as_micros() as u64),
        paused_us: paused.as_micros() as u64,
        snapshot_downtime_ms: snapshot_downtime,
        total_us: t.elapsed().as_micros() as u64,
        snapshot_us: snapshot_for.map(|d| d.as_micros() as u64),
        relayout_us: relayout_for.map(|d| d.as_micros() as u64),
        store_us: store_for.map(|d| d.as_micros() as u64),
    });
    let cp = tokio::task::spawn_blocking(move || ck::finish(&vms, cp))
        .await
        .map_err(join_err)??;
    Ok(cp)
}

/// A saved-state file written out for QEMU to load; removed when dropped, whatever happened.
struct StateFile(std::path::PathBuf);

impl StateFile {
    /// Writes checkpoint `cp`'s memory state to `VMDIR/restore-NAME.tmp`.
    async fn load(st: &ApiState, cp: &cairn_vm::checkpoint::VmCheckpoint) -> Result<Self, OpError> {
        let path = st
            .runtime
            .definitions()
            .vm_dir(&cp.vm)
            .join(format!("restore-{}.tmp", cp.name));
        let file = StateFile(path.clone());
        let cp = cp.clone();
        blocking(st, move |store, _| {
            Ok(cairn_vm::checkpoint::load_state(store, &cp, &path)?)
        })
        .await?;
        Ok(file)
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Applying a checkpoint to a VM the daemon runs (or to any VM, for a standard checkpoint).
/// Everything the apply needs is checked, and the memory state written out for QEMU, before
/// anything stops; then the state being replaced is kept (as `save_current`, else as an automatic
/// checkpoint, unless `discard_current`), QEMU is killed, the disks are rewound, and the VM
/// resumes from the saved memory (standard) or boots cold (disk-only, if it was running). If a
/// step after the kill fails, the VM is put back to the state kept first. NBD clients of the disks
/// other than the VM's QEMU were checked for before; the disks take no new ones while they are
/// rewound, and `force` disconnects any that came since.
async fn apply_running(
    st: &ApiState,
    vm: &str,
    name: &str,
    (save_current, discard_current): (Option<String>, bool),
    force: bool,
    progress: &Progress,
) -> Result<Reply, OpError> {
    use cairn_control::reports::{ApplyReport, VmOutcome};
    use cairn_vm::checkpoint as ck;
    let cp = st.runtime.definitions().checkpoint(vm, name)?;
    let running = st.runtime.is_running(vm);
    let standard = cp.kind == ck::CheckpointKind::Standard;
    blocking(st, {
        let cp = cp.clone();
        move |store, vms| Ok(ck::check_applicable(vms, store, &cp)?)
    })
    .await?;
    if standard || running {
        cairn_vm::find_qemu()?;
    }
    let t = std::time::Instant::now();
    let state = match standard {
        true => Some(StateFile::load(st, &cp).await?),
        false => None,
    };
    // A stopped VM's state is kept here; a running VM's is a standard checkpoint, taken below.
    let kept = blocking(st, {
        let vm = vm.to_string();
        move |store, vms| {
            cairn_control::keep_before_apply(
                store,
                vms,
                &vm,
                save_current.as_deref(),
                discard_current,
                running,
            )
        }
    })
    .await?;
    if let (Some(k), true) = (&kept, running) {
        take_running(st, vm, &k.name, None, Take::Standard, k.automatic, progress).await?;
    }
    let saved = kept.as_ref().map(|k| k.name.as_str());
    let qemu = st.runtime.status(vm).pid;
    if running {
        st.runtime.kill(vm).await?;
    }
    let what = format!("{vm}@{name}");
    let applied = match nbd_clients::clear(&st.nbd, &cp.disks, qemu, force, &what).await {
        Ok(fence) => {
            let r = blocking(st, {
                let (cp, saved) = (cp.clone(), saved.map(str::to_string));
                move |store, vms| {
                    cairn_control::apply_disks_or_restore(store, vms, &cp, saved.as_deref())
                }
            })
            .await;
            drop(fence);
            r
        }
        Err(e) => Err(e),
    };
    let started = match (applied, &state) {
        (Err(e), _) => {
            // The disks are back as they were (or the error says why not); so is the VM.
            if let (true, Some(saved)) = (running, saved) {
                if let Err(r) = resume_saved(st, vm, saved).await {
                    warn!("vm {vm}: resuming the state kept before the failed apply: {r}");
                }
            }
            return Err(e);
        }
        (Ok(()), Some(file)) => st.runtime.resume_from(vm, &file.0).await.map(|_| ()),
        (Ok(()), None) if running => st.runtime.start(vm).await.map(|_| ()),
        (Ok(()), None) => Ok(()),
    };
    drop(state);
    if let Err(e) = started {
        return Err(put_back(st, vm, name, saved, running, e.into()).await);
    }
    let outcome = match (standard, running) {
        (true, true) => VmOutcome::ResumedFromMemory,
        (true, false) => VmOutcome::StartedFromMemory,
        (false, true) => VmOutcome::ColdBoot,
        (false, false) => VmOutcome::Stopped,
    };
    info!("vm {vm}: applied {name} ({outcome}) in {:?}", t.elapsed());
    Ok(Reply::Applied(ApplyReport::new(
        format!("{vm}@{name}"),
        kept.as_ref(),
        Some(outcome),
        None,
    )))
}

/// Resumes a VM from a standard checkpoint (or boots it from a disk-only one): its disks are
/// rewound to it first.
async fn resume_saved(st: &ApiState, vm: &str, saved: &str) -> Result<(), OpError> {
    use cairn_vm::checkpoint as ck;
    let cp = st.runtime.definitions().checkpoint(vm, saved)?;
    blocking(st, {
        let cp = cp.clone();
        move |store, vms| Ok(ck::apply_disks(vms, store, &cp)?)
    })
    .await?;
    if cp.kind == ck::CheckpointKind::Standard {
        let file = StateFile::load(st, &cp).await?;
        st.runtime.resume_from(vm, &file.0).await?;
    } else {
        st.runtime.start(vm).await?;
    }
    Ok(())
}

/// After an apply failed once its VM was stopped: puts the VM back to the state kept first
/// (running again if it ran), and returns the error saying what happened.
async fn put_back(
    st: &ApiState,
    vm: &str,
    name: &str,
    saved: Option<&str>,
    was_running: bool,
    e: OpError,
) -> OpError {
    let Some(saved) = saved else {
        return OpError::new(
            e.kind,
            format!("{e}; applying {vm}@{name} rewound the disks but could not start the VM, and the replaced state was discarded: VM '{vm}' is stopped"),
        );
    };
    let back = if was_running {
        resume_saved(st, vm, saved).await
    } else {
        let (vm, saved) = (vm.to_string(), saved.to_string());
        blocking(st, move |store, vms| {
            let cp = vms.checkpoint(&vm, &saved)?;
            Ok(cairn_vm::checkpoint::apply_disks(vms, store, &cp)?)
        })
        .await
    };
    cairn_control::put_back_error(e, vm, saved, back)
}
