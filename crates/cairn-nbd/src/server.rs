//! The NBD server: fixed-newstyle negotiation, then one transmission loop per connection.
//!
//! Each connection has one task that reads requests and one that writes replies. Every request
//! runs on tokio's blocking pool, because the engine does synchronous file I/O; that also makes
//! requests on one connection run in parallel, and replies go out in completion order, as NBD
//! allows. The number of requests in flight per connection is bounded, so a client that pipelines
//! without reading its replies cannot make the server buffer without limit.
//!
//! Multi-connection flush semantics hold because all connections share one engine [`Store`]: a
//! write is linked into the volume before it is acknowledged, and `Store::flush` commits every
//! linked write of every connection. So the server advertises `NBD_FLAG_CAN_MULTI_CONN`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_engine::{Error as EngineError, Extent, Store, Target};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::proto::*;

mod attached;
mod buffers;
mod clients;
mod handshake;
mod requests;

pub use attached::{Backfill, ImageSource};
pub use clients::{ClientInfo, Fence};

/// Tunables of a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload accepted (advertised in `NBD_INFO_BLOCK_SIZE`).
    pub max_payload: u32,
    /// Requests one connection may have in flight.
    pub max_in_flight: usize,
    /// Time a client gets to finish negotiation.
    pub handshake_timeout: Duration,
    /// TLS for TCP clients: when set, TCP clients must upgrade with `NBD_OPT_STARTTLS` before
    /// anything else (the unix socket, guarded by file permissions, stays plain).
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_payload: 32 << 20,
            max_in_flight: 64,
            handshake_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

/// Option data larger than this is refused with `NBD_REP_ERR_TOO_BIG` (and skipped).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Option data larger than this is not even skipped: the connection is closed.
const MAX_OPTION_SKIP: u32 = 16 << 20;
/// Negotiation that takes more options than this is abuse; the connection is closed.
const MAX_OPTIONS: usize = 10_000;
/// Block-status replies cover at most this much of the export (the spec lets a server answer
/// less than was asked; clients ask again from where the reply stopped).
const MAX_STATUS_SPAN: u64 = (u32::MAX as u64) & !4095;
/// Block-status replies carry at most this many descriptors per context.
const MAX_STATUS_EXTENTS: usize = 1 << 16;
/// Name prefix of Cairn's meta context: `cairn:changed:CHECKPOINT` marks ranges that differ
/// from that checkpoint (status bit 1), like QEMU's `qemu:dirty-bitmap:NAME`.
pub const CHANGED_CONTEXT: &str = "cairn:changed:";
/// The standard allocation context.
pub const ALLOCATION_CONTEXT: &str = "base:allocation";

/// A byte stream a client is connected through (unix socket, TCP, TLS).
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Stream for T {}

/// Serves a store's volumes and checkpoints as NBD exports.
pub struct Server {
    store: Arc<Store>,
    config: ServerConfig,
    shutdown: watch::Sender<bool>,
    /// Each connection holds a clone; `shutdown` waits until all are dropped.
    live: Mutex<Option<mpsc::Sender<()>>>,
    all_closed: tokio::sync::Mutex<mpsc::Receiver<()>>,
    clients: Mutex<clients::Registry>,
    clients_changed: tokio::sync::Notify,
    attached: Mutex<attached::Attached>,
}

/// One metadata context a client selected.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Context {
    Allocation,
    ChangedSince(String),
}

impl Context {
    fn name(&self) -> String {
        match self {
            Context::Allocation => ALLOCATION_CONTEXT.to_string(),
            Context::ChangedSince(c) => format!("{CHANGED_CONTEXT}{c}"),
        }
    }
}

/// An export as resolved at negotiation.
#[derive(Clone)]
struct Export {
    name: String,
    target: Target,
    size: u64,
    read_only: bool,
    /// Set for an attached image (then `target` means nothing).
    image: Option<Arc<dyn ImageSource>>,
}

impl Export {
    fn flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN;
        if self.read_only {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
        }
        f
    }
    fn description(&self) -> String {
        if let Some(image) = &self.image {
            return image.description();
        }
        match &self.target.checkpoint {
            None => format!("Cairn volume '{}' (head, read-write)", self.target.volume),
            Some(c) => format!(
                "Cairn checkpoint '{}' of volume '{}' (read-only)",
                c, self.target.volume
            ),
        }
    }
}

/// What negotiation agreed on.
struct Session {
    store: Arc<Store>,
    export: Export,
    structured: bool,
    extended: bool,
    contexts: Vec<Context>,
    max_payload: u32,
    peer: String,
    /// Set while the head this session writes is still being filled.
    backfill: Option<Arc<dyn Backfill>>,
    /// Long payloads and replies, reused.
    buffers: buffers::Buffers,
}

/// Why a connection ended early; logged once.
#[derive(Debug, thiserror::Error)]
enum ConnError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("{0}")]
    Closed(String),
}

impl Server {
    /// A server over `store`.
    pub fn new(store: Arc<Store>, config: ServerConfig) -> Arc<Server> {
        let (tx, rx) = mpsc::channel(1);
        Arc::new(Server {
            store,
            config,
            shutdown: watch::channel(false).0,
            live: Mutex::new(Some(tx)),
            all_closed: tokio::sync::Mutex::new(rx),
            clients: Mutex::default(),
            clients_changed: tokio::sync::Notify::new(),
            attached: Mutex::default(),
        })
    }

    /// The store being served.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Accepts unix-socket clients until [`Server::shutdown`].
    pub async fn serve_unix(self: Arc<Self>, listener: tokio::net::UnixListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, _)) => {
                        let cred = s.peer_cred().ok().and_then(|c| c.pid());
                        let (peer, pid) = clients::unix_peer(cred);
                        self.spawn_client(Box::new(s), peer, pid, false)
                    }
                    Err(e) => {
                        warn!("nbd: accept on unix socket failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }

    /// Accepts TCP clients until [`Server::shutdown`].
    pub async fn serve_tcp(self: Arc<Self>, listener: tokio::net::TcpListener) {
        let mut stop = self.shutdown.subscribe();
        loop {
            tokio::select! {
                r = listener.accept() => match r {
                    Ok((s, addr)) => {
                        let _ = s.set_nodelay(true);
                        let tls = self.config.tls.is_some();
                        self.spawn_client(Box::new(s), addr.to_string(), None, tls)
                    }
                    Err(e) => {
                        warn!("nbd: accept on TCP failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                _ = stop.changed() => return,
            }
        }
    }

    /// Serves one already-connected client (used by the listeners, and by tests over pipes);
    /// `tls` makes the client upgrade to TLS before anything else.
    pub fn spawn_connection(self: &Arc<Self>, stream: Box<dyn Stream>, peer: String, tls: bool) {
        self.spawn_client(stream, peer, None, tls)
    }

    fn spawn_client(
        self: &Arc<Self>,
        stream: Box<dyn Stream>,
        peer: String,
        pid: Option<u32>,
        tls: bool,
    ) {
        let Some(token) = cairn_engine::sync::lock(&self.live).clone() else {
            return; // shutting down
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _token = token;
            me.connection(stream, peer, pid, tls).await;
        });
    }

    /// Stops accepting, lets every connection finish the requests it has in flight (new ones are
    /// not read), and waits until all connections are closed. The caller then flushes the store.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        cairn_engine::sync::lock(&self.live).take();
        let _ = self.all_closed.lock().await.recv().await;
    }

    async fn connection(
        self: Arc<Self>,
        mut stream: Box<dyn Stream>,
        peer: String,
        pid: Option<u32>,
        tls: bool,
    ) {
        let acceptor = if tls {
            self.config.tls.clone().map(tokio_rustls::TlsAcceptor::from)
        } else {
            None
        };
        let negotiated = tokio::time::timeout(
            self.config.handshake_timeout,
            self.negotiate(&mut stream, &peer, acceptor),
        )
        .await;
        let session = match negotiated {
            Err(_) => {
                warn!("nbd: {peer}: negotiation timed out; closing");
                return;
            }
            Ok(Err(e)) => {
                warn!("nbd: {peer}: negotiation failed: {e}; closing");
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(s))) => s,
        };
        let Some(registration) = self.register(&session.export, &peer, pid) else {
            warn!(
                "nbd: {peer}: '{}' is being rewound to a checkpoint; closing",
                session.export.name
            );
            return;
        };
        info!(
            "nbd: {peer}: serving '{}' ({} bytes{}{})",
            session.export.name,
            session.export.size,
            if session.export.read_only {
                ", read-only"
            } else {
                ""
            },
            if session.extended {
                ", extended headers"
            } else if session.structured {
                ", structured replies"
            } else {
                ""
            }
        );
        let kicked = registration.kicked.clone();
        if let Err(e) = self.transmit(stream, Arc::new(session), kicked).await {
            warn!("nbd: {peer}: {e}; closing");
        }
    }

    async fn transmit(
        &self,
        stream: Box<dyn Stream>,
        sess: Arc<Session>,
        mut kicked: watch::Receiver<bool>,
    ) -> Result<(), ConnError> {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let replies = sess.clone();
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            while let Some(buf) = rx.recv().await {
                wr.write_all(&buf).await?;
                replies.buffers.give(buf);
                if rx.is_empty() {
                    wr.flush().await?;
                }
            }
            wr.flush().await?;
            wr.shutdown().await
        });
        let slots = Arc::new(Semaphore::new(self.config.max_in_flight));
        let mut stop = self.shutdown.subscribe();
        let ext = sess.extended;
        let result = loop {
            let mut hdr = [0u8; Request::EXTENDED_SIZE];
            let hs = Request::size(ext);
            let read = tokio::select! {
                r = rd.read_exact(&mut hdr[..hs]) => r,
                _ = stop.changed() => break Ok(()),
                _ = kicked.changed() => break Ok(()),
            };
            match read {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!("nbd: {}: client hung up without NBD_CMD_DISC", sess.peer);
                    break Ok(());
                }
                Err(e) => break Err(e.into()),
            }
            let req = match Request::parse(&hdr[..hs], ext) {
                Ok(r) => r,
                Err(e) => break Err(e.into()),
            };
            let plen = req.payload_len(ext);
            if plen > sess.max_payload as u64 {
                if ext {
                    break Err(ConnError::Closed(format!(
                        "request payload of {plen} bytes is over the {} advertised",
                        sess.max_payload
                    )));
                }
                // Compact headers: stay in sync by skipping the payload, then refuse.
                if let Err(e) =
                    tokio::io::copy(&mut (&mut rd).take(plen), &mut tokio::io::sink()).await
                {
                    break Err(e.into());
                }
                warn!(
                    "nbd: {}: {plen}-byte write over the {}-byte limit refused",
                    sess.peer, sess.max_payload
                );
                let _ = tx.send(sess.error_reply(&req, EINVAL, "payload over the limit"));
                continue;
            }
            let mut payload = sess.buffers.take(plen as usize);
            if let Err(e) = rd.read_exact(&mut payload).await {
                break Err(ConnError::Closed(format!(
                    "client went away in the middle of a request's payload ({e})"
                )));
            }
            if req.kind == CMD_DISC {
                debug!("nbd: {}: disconnect requested", sess.peer);
                break Ok(());
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                break Ok(());
            };
            let (tx, sess) = (tx.clone(), sess.clone());
            tokio::task::spawn_blocking(move || {
                let reply = guarded(
                    || sess.execute(&req, &payload),
                    |why| {
                        error!(
                            "nbd: {}: request type {} at {}+{} on '{}' crashed: {why}; it gets EIO",
                            sess.peer, req.kind, req.offset, req.length, sess.export.name
                        );
                        sess.error_reply(&req, EIO, "internal error in the server (logged)")
                    },
                );
                let _ = tx.send(reply);
                sess.buffers.give(payload);
                drop(permit);
            });
        };
        // Requests already read still complete and get their replies before the socket closes.
        let _ = slots
            .acquire_many(self.config.max_in_flight as u32)
            .await
            .map(drop);
        drop(tx);
        match writer.await {
            Ok(Err(e)) if result.is_ok() => debug!("nbd: {}: writing replies: {e}", sess.peer),
            _ => {}
        }
        result
    }
}

/// Runs `request`; if it panics (a bug), returns `on_panic(message)` instead, so the client gets
/// an error reply for that cookie rather than waiting forever, and the connection goes on.
fn guarded(request: impl FnOnce() -> Vec<u8>, on_panic: impl FnOnce(String) -> Vec<u8>) -> Vec<u8> {
    // The engine's locks recover from poisoning, and a request that panicked is never
    // acknowledged: the client sees an I/O error, as after a write the disk failed.
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(request)) {
        Ok(reply) => reply,
        Err(p) => {
            let why = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "panic without a message".into());
            on_panic(why)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_that_panics_still_gets_a_reply() {
        let ok = guarded(|| vec![1, 2, 3], |_| vec![9]);
        assert_eq!(ok, vec![1, 2, 3]);
        let got = guarded(
            || panic!("index out of bounds in request 7"),
            |why| why.into_bytes(),
        );
        assert_eq!(got, b"index out of bounds in request 7".to_vec());
        let formatted = guarded(|| panic!("{} of {}", 1, 2), |why| why.into_bytes());
        assert_eq!(formatted, b"1 of 2".to_vec());
    }
}
