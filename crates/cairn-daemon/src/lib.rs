//! `cairn serve`: the long-running process that owns a store and serves its volumes and
//! checkpoints over NBD (a unix socket in the store, optionally TCP), and every store operation
//! over the control API (JSON over HTTP on `control.sock` in the store; see [`api`]).
//!
//! Shutdown is orderly on SIGTERM or SIGINT: stop accepting, let every connection finish the
//! requests it already read, flush the store, remove the socket. After SIGKILL nothing that was
//! flushed is lost, because the engine's own crash safety covers it; the next start replays the
//! journal and removes the stale socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_engine::{Options, Store};
use cairn_nbd::{Server, ServerConfig};
use tracing::{info, warn};

pub mod api;
mod lifecycle;

/// File name of the NBD unix socket inside the store directory.
pub const NBD_SOCKET: &str = "nbd.sock";

/// Where a store's NBD socket lives.
pub fn nbd_socket(store_dir: &Path) -> PathBuf {
    store_dir.join(NBD_SOCKET)
}

/// The `nbd+unix://` URI of an export (a volume `NAME` or a checkpoint `NAME@CHECKPOINT`).
pub fn nbd_uri(store_dir: &Path, export: &str) -> String {
    format!(
        "nbd+unix:///{}?socket={}",
        export,
        nbd_socket(store_dir).display()
    )
}

/// How to run the daemon.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Store directory.
    pub store_dir: PathBuf,
    /// Engine tunables.
    pub options: Options,
    /// Also serve NBD on this TCP address.
    pub nbd_listen: Option<SocketAddr>,
    /// NBD server tunables.
    pub nbd: ServerConfig,
    /// Run the lifecycle policies (scheduled checkpoints, retention, the floor's reclaim).
    pub lifecycle: bool,
    /// Also serve the HTTP API and web UI on TCP.
    pub http: Option<cairn_http::HttpConfig>,
    /// Power running VMs off when the daemon stops, instead of leaving them running for the
    /// next daemon to reattach.
    pub stop_vms_on_exit: bool,
}

/// Why the daemon could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] cairn_engine::Error),
    /// A listening socket could not be set up.
    #[error("cannot listen on {what}: {source}")]
    Listen {
        /// The socket path or address.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP API could not be served.
    #[error(transparent)]
    Http(#[from] cairn_http::HttpError),
    /// The async runtime could not start.
    #[error("cannot start the runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// What a started daemon listens on, reported once it accepts connections.
#[derive(Debug, Clone)]
pub struct Listening {
    /// The NBD unix socket.
    pub nbd_socket: PathBuf,
    /// The NBD TCP address, if any (with the real port when 0 was asked).
    pub nbd_tcp: Option<SocketAddr>,
    /// Whether TCP clients must use TLS.
    pub tls: bool,
    /// The HTTP API's base URL, if served.
    pub http: Option<String>,
}

/// Runs the daemon until SIGTERM or SIGINT; `ready` is called once every socket accepts.
pub fn run(config: DaemonConfig, ready: impl FnOnce(&Listening)) -> Result<(), DaemonError> {
    let store = Arc::new(Store::open(&config.store_dir, config.options.clone())?);
    // VMs need QEMU; volumes and NBD do not, so a missing or old QEMU is a warning here and an
    // error only when a VM is started.
    match cairn_vm::find_qemu() {
        Ok(q) => info!(
            "QEMU {}.{}.{} at {}",
            q.version.0,
            q.version.1,
            q.version.2,
            q.program.display()
        ),
        Err(e) => warn!("VMs cannot run: {e}"),
    }
    // A VM checkpoint half-made when the last owner died is undone before anyone sees it.
    match cairn_vm::VmStore::new(&config.store_dir).roll_back_pending(&store) {
        Ok(gone) if !gone.is_empty() => {
            info!("rolled back half-made VM checkpoints: {}", gone.join(", "))
        }
        Ok(_) => {}
        Err(e) => warn!("cannot check for half-made VM checkpoints: {e}"),
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("cairn-serve")
        .build()
        .map_err(DaemonError::Runtime)?;
    let result = rt.block_on(serve(store.clone(), &config, ready));
    drop(rt);
    // Last reference: dropping the store commits and closes it.
    if let Err(e) = store.flush() {
        warn!("final flush failed: {e}");
    }
    drop(store);
    result
}

async fn serve(
    store: Arc<Store>,
    config: &DaemonConfig,
    ready: impl FnOnce(&Listening),
) -> Result<(), DaemonError> {
    use tokio::signal::unix::{signal, SignalKind};
    let listen_err = |what: String| move |source| DaemonError::Listen { what, source };
    let sock = nbd_socket(&config.store_dir);
    // We hold the store lock, so a socket left here is from a daemon that died.
    let _ = std::fs::remove_file(&sock);
    let unix =
        tokio::net::UnixListener::bind(&sock).map_err(listen_err(sock.display().to_string()))?;
    restrict(&sock);
    let server = Server::new(store, config.nbd.clone());
    let mut nbd_tcp = None;
    if let Some(addr) = config.nbd_listen {
        let tcp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(listen_err(addr.to_string()))?;
        let local = tcp.local_addr().map_err(listen_err(addr.to_string()))?;
        nbd_tcp = Some(local);
        tokio::spawn(server.clone().serve_tcp(tcp));
    }
    tokio::spawn(server.clone().serve_unix(unix));
    // QEMUs a previous daemon left running reconnect to the NBD socket by themselves; their
    // QMP sockets are picked up before the API answers, so `vm status` is right from the start.
    let runtime = Arc::new(cairn_vm::Runtime::new(&config.store_dir, &sock));
    let reattached = runtime.reattach().await;
    if !reattached.is_empty() {
        info!("reattached running VMs: {}", reattached.join(", "));
    }
    // The control socket comes last: once it answers, clients may rely on everything else.
    let control = cairn_control::control_socket(&config.store_dir);
    let _ = std::fs::remove_file(&control);
    let control_listener = tokio::net::UnixListener::bind(&control)
        .map_err(listen_err(control.display().to_string()))?;
    restrict(&control);
    let status = cairn_control::DaemonStatus {
        pid: std::process::id(),
        store: config.store_dir.clone(),
        nbd_socket: sock.clone(),
        nbd_tcp: nbd_tcp.map(|a| a.to_string()),
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    let (stop_api, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let service = Arc::new(cairn_control::Service::daemon(
        server.clone(),
        runtime.clone(),
    ));
    let (stop_http, http_stopped) = tokio::sync::watch::channel(false);
    let mut http_url = None;
    // One set of jobs for both front ends: the web UI lists the CLI's long work too.
    let http_state = cairn_http::AppState::new(service.clone(), status.clone());
    let http_task = match &config.http {
        Some(h) => {
            let server = cairn_http::bind(h).await?;
            http_url = Some(server.url());
            let state = http_state.clone();
            let mut stopped = http_stopped.clone();
            Some(tokio::spawn(server.serve(state, async move {
                let _ = stopped.wait_for(|s| *s).await;
            })))
        }
        None => None,
    };
    let lifecycle = match config.lifecycle {
        true => lifecycle::start(service.clone()),
        false => {
            info!("lifecycle policies are not run (--no-lifecycle)");
            None
        }
    };
    let api_task = tokio::spawn(api::serve(
        control_listener,
        service,
        status,
        http_state,
        async move {
            let _ = api_stopped.await;
        },
    ));
    let mut term = signal(SignalKind::terminate()).map_err(DaemonError::Runtime)?;
    let mut int = signal(SignalKind::interrupt()).map_err(DaemonError::Runtime)?;
    let listening = Listening {
        nbd_socket: sock.clone(),
        nbd_tcp,
        tls: config.nbd.tls.is_some(),
        http: http_url,
    };
    info!(
        "serving store {} on {}{}",
        config.store_dir.display(),
        sock.display(),
        nbd_tcp.map(|a| format!(" and {a}")).unwrap_or_default()
    );
    ready(&listening);
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: finishing requests in flight, then flushing"),
        _ = int.recv() => info!("SIGINT: finishing requests in flight, then flushing"),
    }
    // New API calls are refused from here; calls in flight finish first.
    let _ = std::fs::remove_file(&control);
    if let Some(l) = lifecycle {
        l.stop().await;
    }
    let _ = stop_api.send(());
    let _ = stop_http.send(true);
    let _ = api_task.await;
    if let Some(t) = http_task {
        let _ = t.await;
    }
    if config.stop_vms_on_exit {
        // Asked for: power them off first (hard after 10 s), before their disks go away.
        runtime.stop_all(std::time::Duration::from_secs(10)).await;
    } else {
        // QEMU keeps running; its disk requests wait for the next daemon (see cairn-vm's
        // reattach.rs).
        runtime.leave_running();
    }
    server.shutdown().await;
    let _ = std::fs::remove_file(&sock);
    info!("all connections closed");
    Ok(())
}

/// The socket gives full access to every volume: only the store's owner may connect.
fn restrict(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        warn!("cannot restrict {} to its owner: {e}", path.display());
    }
}

/// An NBD server on a private socket for the length of one command: how the CLI feeds
/// `qemu-img` when no daemon owns the store.
pub struct PrivateServer {
    rt: tokio::runtime::Runtime,
    server: Arc<Server>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    /// Starts serving `store` on a fresh socket in a private (0700) temporary directory.
    pub fn start(store: Arc<Store>) -> Result<PrivateServer, DaemonError> {
        let dir = tempfile::Builder::new()
            .prefix("cairn-")
            .tempdir()
            .map_err(|source| DaemonError::Listen {
                what: "a private temporary directory".into(),
                source,
            })?;
        let socket = dir.path().join(NBD_SOCKET);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .thread_name("cairn-nbd")
            .build()
            .map_err(DaemonError::Runtime)?;
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&socket).map_err(|source| DaemonError::Listen {
                what: socket.display().to_string(),
                source,
            })?
        };
        let server = Server::new(store, ServerConfig::default());
        rt.spawn(server.clone().serve_unix(listener));
        Ok(PrivateServer {
            rt,
            server,
            socket,
            _dir: dir,
        })
    }

    /// The `nbd+unix://` URI of an export on this server.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{}?socket={}", export, self.socket.display())
    }

    /// Closes every connection after its requests in flight, then stops.
    pub fn stop(self) {
        self.rt.block_on(self.server.shutdown());
    }
}
