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
#[derive(Debug, Clone)]
struct Export {
    name: String,
    target: Target,
    size: u64,
    read_only: bool,
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
                        self.spawn_connection(Box::new(s), "unix client".into(), false)
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
                        self.spawn_connection(Box::new(s), addr.to_string(), tls)
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
        let Some(token) = self.live.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            return; // shutting down
        };
        let me = self.clone();
        tokio::spawn(async move {
            let _token = token;
            me.connection(stream, peer, tls).await;
        });
    }

    /// Stops accepting, lets every connection finish the requests it has in flight (new ones are
    /// not read), and waits until all connections are closed. The caller then flushes the store.
    pub async fn shutdown(&self) {
        let _ = self.shutdown.send(true);
        self.live.lock().unwrap_or_else(|e| e.into_inner()).take();
        let _ = self.all_closed.lock().await.recv().await;
    }

    async fn connection(self: Arc<Self>, mut stream: Box<dyn Stream>, peer: String, tls: bool) {
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
        if let Err(e) = self.transmit(stream, Arc::new(session)).await {
            warn!("nbd: {peer}: {e}; closing");
        }
    }

    fn resolve(&self, name: &str) -> Result<Export, String> {
        if name.is_empty() {
            return Err(
                "Cairn has no default export; name a volume (NAME) or a checkpoint \
                        (NAME@CHECKPOINT)"
                    .into(),
            );
        }
        let target = Target::parse(name).map_err(|e| e.to_string())?;
        let (size, read_only) = match &target.checkpoint {
            None => (
                self.store
                    .volume_info(&target.volume)
                    .map_err(|e| e.to_string())?
                    .size,
                false,
            ),
            Some(c) => {
                let cps = self
                    .store
                    .list_checkpoints(&target.volume)
                    .map_err(|e| e.to_string())?;
                let cp = cps.iter().find(|x| &x.name == c).ok_or_else(|| {
                    EngineError::UnknownCheckpoint {
                        volume: target.volume.clone(),
                        name: c.clone(),
                    }
                    .to_string()
                })?;
                (cp.size, true)
            }
        };
        Ok(Export {
            name: name.to_string(),
            target,
            size,
            read_only,
        })
    }

    fn exports(&self) -> Result<Vec<Export>, String> {
        let mut out = Vec::new();
        for v in self.store.list_volumes().map_err(|e| e.to_string())? {
            out.push(Export {
                name: v.name.clone(),
                target: Target::head(&v.name),
                size: v.size,
                read_only: false,
            });
            for c in self
                .store
                .list_checkpoints(&v.name)
                .map_err(|e| e.to_string())?
            {
                out.push(Export {
                    name: format!("{}@{}", v.name, c.name),
                    target: Target::checkpoint(&v.name, &c.name),
                    size: c.size,
                    read_only: true,
                });
            }
        }
        Ok(out)
    }

    /// Contexts of `export` matching `queries`; `list` allows the namespace-only wildcards.
    fn match_contexts(
        &self,
        export: &Export,
        queries: &[String],
        list: bool,
    ) -> Result<Vec<Context>, String> {
        let checkpoints: Vec<String> = self
            .store
            .list_checkpoints(&export.target.volume)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|c| c.name)
            .collect();
        let all = || {
            let mut v = vec![Context::Allocation];
            v.extend(checkpoints.iter().cloned().map(Context::ChangedSince));
            v
        };
        if queries.is_empty() {
            return Ok(if list { all() } else { Vec::new() });
        }
        let mut out: Vec<Context> = Vec::new();
        for q in queries {
            let found: Vec<Context> = if q == ALLOCATION_CONTEXT || (list && q == "base:") {
                vec![Context::Allocation]
            } else if list && (q == "cairn:" || q == CHANGED_CONTEXT) {
                checkpoints
                    .iter()
                    .cloned()
                    .map(Context::ChangedSince)
                    .collect()
            } else if let Some(c) = q.strip_prefix(CHANGED_CONTEXT) {
                checkpoints
                    .iter()
                    .filter(|x| *x == c)
                    .cloned()
                    .map(Context::ChangedSince)
                    .collect()
            } else {
                Vec::new() // unknown namespaces and leaves are ignored, as the spec requires
            };
            for c in found {
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    async fn negotiate(
        &self,
        s: &mut Box<dyn Stream>,
        peer: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Option<Session>, ConnError> {
        let mut secured = false;
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        s.write_all(&hello).await?;
        s.flush().await?;
        let client_flags = s.read_u32().await?;
        if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(ConnError::Closed(format!(
                "client sent unknown handshake flags {client_flags:#x}"
            )));
        }
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
        let (mut structured, mut extended) = (false, false);
        let mut contexts: Vec<Context> = Vec::new();
        let mut contexts_for = String::new();
        let mut out = Vec::new();
        for _ in 0..MAX_OPTIONS {
            let mut hdr = [0u8; OptionHeader::SIZE];
            s.read_exact(&mut hdr).await?;
            let h = OptionHeader::parse(&hdr)?;
            out.clear();
            if h.length > MAX_OPTION_DATA {
                if h.length > MAX_OPTION_SKIP {
                    return Err(ConnError::Closed(format!(
                        "option {} carries {} bytes of data",
                        h.option, h.length
                    )));
                }
                tokio::io::copy(&mut (&mut *s).take(h.length as u64), &mut tokio::io::sink())
                    .await?;
                warn!(
                    "nbd: {peer}: option {} with {} bytes of data refused",
                    h.option, h.length
                );
                option_reply(
                    &mut out,
                    h.option,
                    REP_ERR_TOO_BIG,
                    b"option data too large",
                );
                s.write_all(&out).await?;
                continue;
            }
            let mut data = vec![0u8; h.length as usize];
            s.read_exact(&mut data).await?;
            let invalid = |out: &mut Vec<u8>, why: &str| {
                warn!("nbd: {peer}: option {} refused: {why}", h.option);
                option_reply(out, h.option, REP_ERR_INVALID, why.as_bytes());
            };
            if tls.is_some() && !secured && h.option != OPT_STARTTLS && h.option != OPT_ABORT {
                if h.option == OPT_EXPORT_NAME {
                    return Err(ConnError::Closed(
                        "NBD_OPT_EXPORT_NAME without TLS on a TLS-only server".into(),
                    ));
                }
                warn!("nbd: {peer}: option {} refused before STARTTLS", h.option);
                option_reply(
                    &mut out,
                    h.option,
                    REP_ERR_TLS_REQD,
                    b"this server requires TLS: negotiate NBD_OPT_STARTTLS first",
                );
                s.write_all(&out).await?;
                s.flush().await?;
                continue;
            }
            match h.option {
                OPT_EXPORT_NAME => {
                    if extended {
                        return Err(ConnError::Closed(
                            "NBD_OPT_EXPORT_NAME after extended headers".into(),
                        ));
                    }
                    let name = String::from_utf8(data)
                        .map_err(|_| ConnError::Closed("export name is not UTF-8".into()))?;
                    // This option has no error reply: an unknown export ends the session.
                    let export = self.resolve(&name).map_err(ConnError::Closed)?;
                    out.extend_from_slice(&export.size.to_be_bytes());
                    out.extend_from_slice(&export.flags().to_be_bytes());
                    if !no_zeroes {
                        out.extend_from_slice(&[0u8; 124]);
                    }
                    s.write_all(&out).await?;
                    s.flush().await?;
                    if contexts_for != name {
                        contexts.clear();
                    }
                    return Ok(Some(
                        self.session(export, structured, false, contexts, peer),
                    ));
                }
                OPT_ABORT => {
                    option_reply(&mut out, h.option, REP_ACK, &[]);
                    // The client may already have hung up; that is fine.
                    let _ = s.write_all(&out).await;
                    let _ = s.flush().await;
                    return Ok(None);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        invalid(&mut out, "NBD_OPT_LIST takes no data");
                    } else {
                        match self.exports() {
                            Ok(list) => {
                                for e in list {
                                    option_reply(
                                        &mut out,
                                        h.option,
                                        REP_SERVER,
                                        &rep_server(&e.name, &e.description()),
                                    );
                                }
                                option_reply(&mut out, h.option, REP_ACK, &[]);
                            }
                            Err(e) => {
                                option_reply(&mut out, h.option, REP_ERR_SHUTDOWN, e.as_bytes())
                            }
                        }
                    }
                }
                OPT_STARTTLS => match &tls {
                    None => option_reply(
                        &mut out,
                        h.option,
                        REP_ERR_UNSUP,
                        b"TLS is not enabled on this socket",
                    ),
                    Some(_) if secured => invalid(&mut out, "TLS is already in use"),
                    Some(_) if !data.is_empty() => {
                        invalid(&mut out, "NBD_OPT_STARTTLS takes no data")
                    }
                    Some(acceptor) => {
                        option_reply(&mut out, h.option, REP_ACK, &[]);
                        s.write_all(&out).await?;
                        s.flush().await?;
                        // Swap the plain stream for the TLS one; the placeholder is never used.
                        let plain = std::mem::replace(s, Box::new(tokio::io::duplex(1).0));
                        let secure = acceptor
                            .accept(plain)
                            .await
                            .map_err(|e| ConnError::Closed(format!("TLS handshake failed: {e}")))?;
                        *s = Box::new(secure);
                        secured = true;
                        // The spec makes the client negotiate these again over TLS.
                        structured = false;
                        extended = false;
                        contexts.clear();
                        contexts_for.clear();
                        debug!("nbd: {peer}: TLS established");
                        continue;
                    }
                },
                OPT_INFO | OPT_GO => {
                    let req = match ExportRequest::parse(&data) {
                        Ok(r) => r,
                        Err(e) => {
                            invalid(&mut out, &e.to_string());
                            s.write_all(&out).await?;
                            continue;
                        }
                    };
                    match self.resolve(&req.name) {
                        Err(why) => {
                            warn!("nbd: {peer}: export '{}' refused: {why}", req.name);
                            option_reply(&mut out, h.option, REP_ERR_UNKNOWN, why.as_bytes());
                        }
                        Ok(export) => {
                            option_reply(
                                &mut out,
                                h.option,
                                REP_INFO,
                                &info_export(export.size, export.flags()),
                            );
                            // Always sent: it tells clients our payload limit.
                            option_reply(
                                &mut out,
                                h.option,
                                REP_INFO,
                                &info_block_size(1, 4096, self.config.max_payload),
                            );
                            if req.info.contains(&INFO_NAME) {
                                option_reply(
                                    &mut out,
                                    h.option,
                                    REP_INFO,
                                    &info_text(INFO_NAME, &export.name),
                                );
                            }
                            if req.info.contains(&INFO_DESCRIPTION) {
                                option_reply(
                                    &mut out,
                                    h.option,
                                    REP_INFO,
                                    &info_text(INFO_DESCRIPTION, &export.description()),
                                );
                            }
                            option_reply(&mut out, h.option, REP_ACK, &[]);
                            if h.option == OPT_GO {
                                s.write_all(&out).await?;
                                s.flush().await?;
                                if contexts_for != export.name {
                                    contexts.clear();
                                }
                                return Ok(Some(
                                    self.session(export, structured, extended, contexts, peer),
                                ));
                            }
                        }
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if !data.is_empty() {
                        invalid(&mut out, "NBD_OPT_STRUCTURED_REPLY takes no data");
                    } else if extended {
                        option_reply(
                            &mut out,
                            h.option,
                            REP_ERR_EXT_HEADER_REQD,
                            b"extended headers are already in use",
                        );
                    } else {
                        structured = true;
                        option_reply(&mut out, h.option, REP_ACK, &[]);
                    }
                }
                OPT_EXTENDED_HEADERS => {
                    if !data.is_empty() {
                        invalid(&mut out, "NBD_OPT_EXTENDED_HEADERS takes no data");
                    } else {
                        extended = true;
                        structured = true;
                        option_reply(&mut out, h.option, REP_ACK, &[]);
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    let set = h.option == OPT_SET_META_CONTEXT;
                    if !structured {
                        invalid(&mut out, "negotiate structured replies first");
                    } else {
                        match MetaContextRequest::parse(&data) {
                            Err(e) => invalid(&mut out, &e.to_string()),
                            Ok(req) => match self
                                .resolve(&req.export)
                                .and_then(|ex| self.match_contexts(&ex, &req.queries, !set))
                            {
                                Err(why) => {
                                    warn!("nbd: {peer}: meta contexts refused: {why}");
                                    option_reply(
                                        &mut out,
                                        h.option,
                                        REP_ERR_UNKNOWN,
                                        why.as_bytes(),
                                    );
                                }
                                Ok(found) => {
                                    for (i, c) in found.iter().enumerate() {
                                        option_reply(
                                            &mut out,
                                            h.option,
                                            REP_META_CONTEXT,
                                            &rep_meta_context(i as u32 + 1, &c.name()),
                                        );
                                    }
                                    option_reply(&mut out, h.option, REP_ACK, &[]);
                                    if set {
                                        contexts = found;
                                        contexts_for = req.export;
                                    }
                                }
                            },
                        }
                    }
                }
                other => {
                    debug!("nbd: {peer}: unsupported option {other}");
                    option_reply(
                        &mut out,
                        other,
                        REP_ERR_UNSUP,
                        b"option not supported by Cairn",
                    );
                }
            }
            s.write_all(&out).await?;
            s.flush().await?;
        }
        Err(ConnError::Closed(format!(
            "more than {MAX_OPTIONS} options without choosing an export"
        )))
    }

    fn session(
        &self,
        export: Export,
        structured: bool,
        extended: bool,
        contexts: Vec<Context>,
        peer: &str,
    ) -> Session {
        Session {
            store: self.store.clone(),
            export,
            structured,
            extended,
            contexts,
            max_payload: self.config.max_payload,
            peer: peer.to_string(),
        }
    }

    async fn transmit(&self, stream: Box<dyn Stream>, sess: Arc<Session>) -> Result<(), ConnError> {
        let (rd, wr) = tokio::io::split(stream);
        let mut rd = BufReader::with_capacity(256 << 10, rd);
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        let writer = tokio::spawn(async move {
            let mut wr = BufWriter::with_capacity(256 << 10, wr);
            while let Some(buf) = rx.recv().await {
                wr.write_all(&buf).await?;
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
            let mut payload = vec![0u8; plen as usize];
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
                    || sess.execute(&req, payload),
                    |why| {
                        error!(
                            "nbd: {}: request type {} at {}+{} on '{}' crashed: {why}; it gets EIO",
                            sess.peer, req.kind, req.offset, req.length, sess.export.name
                        );
                        sess.error_reply(&req, EIO, "internal error in the server (logged)")
                    },
                );
                let _ = tx.send(reply);
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

/// Maps an engine error to the NBD error a client gets.
fn errno(e: &EngineError) -> u32 {
    match e {
        EngineError::NoSpace { .. } => ENOSPC,
        EngineError::OutOfRange { .. } | EngineError::Invalid(_) => EINVAL,
        _ => EIO,
    }
}

type Outcome = Result<Option<Vec<u8>>, (u32, String)>;

impl Session {
    /// Runs one request and returns its complete reply.
    fn execute(&self, req: &Request, payload: Vec<u8>) -> Vec<u8> {
        match self.run(req, payload) {
            Ok(Some(reply)) => reply,
            Ok(None) => {
                let mut out = Vec::with_capacity(32);
                if self.extended {
                    chunk_header(&mut out, true, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
                } else {
                    simple_reply(&mut out, 0, req.cookie);
                }
                out
            }
            Err((code, why)) => {
                // Logged once here; the client also gets the text in structured mode.
                warn!(
                    "nbd: {}: request type {} at {}+{} on '{}' failed: {why}",
                    self.peer, req.kind, req.offset, req.length, self.export.name
                );
                self.error_reply(req, code, &why)
            }
        }
    }

    fn error_reply(&self, req: &Request, code: u32, why: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.structured {
            error_chunk(&mut out, self.extended, req, code, why);
        } else {
            simple_reply(&mut out, code, req.cookie);
        }
        out
    }

    fn check(&self, req: &Request, allowed_flags: u16, write: bool) -> Result<(), (u32, String)> {
        // FUA is advertised, and the spec then makes it valid on every command (a command that
        // writes nothing has nothing to persist, so the bit is ignored there).
        let allowed = allowed_flags
            | CMD_FLAG_FUA
            | if self.extended {
                CMD_FLAG_PAYLOAD_LEN
            } else {
                0
            };
        if req.flags & !allowed != 0 {
            return Err((
                EINVAL,
                format!("flags {:#x} not valid for this command", req.flags),
            ));
        }
        if write && self.export.read_only {
            return Err((
                EPERM,
                format!(
                    "'{}' is a checkpoint and read-only; write to the volume's head",
                    self.export.name
                ),
            ));
        }
        let end = req.offset.checked_add(req.length);
        if end.is_none_or(|e| e > self.export.size) {
            // The spec: ENOSPC for writes past the end (a full device), EINVAL for reads, trims
            // and the rest (a bad request).
            let writes_data = matches!(req.kind, CMD_WRITE | CMD_WRITE_ZEROES);
            return Err((
                if writes_data { ENOSPC } else { EINVAL },
                format!(
                    "{}+{} reaches past the end of '{}' ({} bytes)",
                    req.offset, req.length, self.export.name, self.export.size
                ),
            ));
        }
        Ok(())
    }

    fn flush_if_fua(&self, req: &Request) -> Result<(), (u32, String)> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.store.flush().map_err(fail)?;
        }
        Ok(())
    }

    fn run(&self, req: &Request, payload: Vec<u8>) -> Outcome {
        let vol = &self.export.target.volume;
        if req.kind != CMD_WRITE && !payload.is_empty() {
            return Err((EINVAL, "this command takes no payload".into()));
        }
        match req.kind {
            CMD_READ => {
                self.check(req, CMD_FLAG_DF, false)?;
                if req.length > self.max_payload as u64 {
                    return Err((
                        if self.structured { EOVERFLOW } else { EINVAL },
                        format!(
                            "read of {} bytes is over the {}-byte limit",
                            req.length, self.max_payload
                        ),
                    ));
                }
                if req.length == 0 && self.structured {
                    // The spec leaves a zero-length read's reply open but forbids disconnecting;
                    // an OFFSET_DATA chunk must carry at least one byte, so the answer is a bare
                    // success: one NBD_REPLY_TYPE_NONE chunk with the done flag.
                    let mut out = Vec::with_capacity(32);
                    let ext = self.extended;
                    chunk_header(&mut out, ext, REPLY_FLAG_DONE, REPLY_TYPE_NONE, req, 0);
                    return Ok(Some(out));
                }
                self.read(req).map(Some)
            }
            CMD_WRITE => {
                self.check(req, 0, true)?;
                self.store.write(vol, req.offset, &payload).map_err(fail)?;
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_FLUSH => {
                self.check(req, 0, false)?;
                self.store.flush().map_err(fail)?;
                Ok(None)
            }
            CMD_TRIM => {
                self.check(req, 0, true)?;
                self.store.trim(vol, req.offset, req.length).map_err(fail)?;
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_WRITE_ZEROES => {
                self.check(req, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, true)?;
                if req.flags & CMD_FLAG_NO_HOLE != 0 {
                    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                        // Allocated zeros mean writing them: not fast, so say so at once.
                        return Err((ENOTSUP, "allocated zeros cannot be written fast".into()));
                    }
                    let chunk = vec![0u8; (1 << 20).min(req.length as usize)];
                    let mut at = req.offset;
                    let end = req.offset + req.length;
                    while at < end {
                        let n = (end - at).min(chunk.len() as u64) as usize;
                        self.store.write(vol, at, &chunk[..n]).map_err(fail)?;
                        at += n as u64;
                    }
                } else {
                    self.store
                        .write_zeroes(vol, req.offset, req.length)
                        .map_err(fail)?;
                }
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_BLOCK_STATUS => {
                self.check(req, CMD_FLAG_REQ_ONE, false)?;
                self.block_status(req).map(Some)
            }
            CMD_CACHE => Err((EINVAL, "NBD_CMD_CACHE is not advertised".into())),
            other => Err((EINVAL, format!("unknown command type {other}"))),
        }
    }

    fn read(&self, req: &Request) -> Result<Vec<u8>, (u32, String)> {
        let len = req.length as usize;
        let t = &self.export.target;
        if !self.structured {
            let mut out = vec![0u8; 16 + len];
            self.store
                .read(t, req.offset, &mut out[16..])
                .map_err(fail)?;
            let mut hdr = Vec::with_capacity(16);
            simple_reply(&mut hdr, 0, req.cookie);
            out[..16].copy_from_slice(&hdr);
            return Ok(out);
        }
        // The data goes straight after room for one chunk header, so the common all-data case
        // needs no copy.
        let hs = chunk_header_size(self.extended) + 8;
        let mut out = vec![0u8; hs + len];
        let runs = self
            .store
            .read_sparse(t, req.offset, &mut out[hs..])
            .map_err(fail)?;
        let one_chunk =
            req.flags & CMD_FLAG_DF != 0 || runs.len() <= 1 && runs.first().is_none_or(|r| !r.1);
        if one_chunk {
            let mut hdr = Vec::with_capacity(hs);
            chunk_header(
                &mut hdr,
                self.extended,
                REPLY_FLAG_DONE,
                REPLY_TYPE_OFFSET_DATA,
                req,
                8 + len as u64,
            );
            hdr.extend_from_slice(&req.offset.to_be_bytes());
            out[..hs].copy_from_slice(&hdr);
            return Ok(out);
        }
        let data = &out[hs..];
        let mut rep = Vec::with_capacity(out.len() + runs.len() * hs);
        let mut at = 0usize;
        for (i, &(l, hole)) in runs.iter().enumerate() {
            let done = if i + 1 == runs.len() {
                REPLY_FLAG_DONE
            } else {
                0
            };
            let off = req.offset + at as u64;
            if hole {
                chunk_header(
                    &mut rep,
                    self.extended,
                    done,
                    REPLY_TYPE_OFFSET_HOLE,
                    req,
                    12,
                );
                rep.extend_from_slice(&off.to_be_bytes());
                rep.extend_from_slice(&(l as u32).to_be_bytes());
            } else {
                chunk_header(
                    &mut rep,
                    self.extended,
                    done,
                    REPLY_TYPE_OFFSET_DATA,
                    req,
                    8 + l,
                );
                rep.extend_from_slice(&off.to_be_bytes());
                rep.extend_from_slice(&data[at..at + l as usize]);
            }
            at += l as usize;
        }
        Ok(rep)
    }

    fn block_status(&self, req: &Request) -> Result<Vec<u8>, (u32, String)> {
        if self.contexts.is_empty() {
            return Err((
                EINVAL,
                "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)".into(),
            ));
        }
        if req.length == 0 {
            return Err((EINVAL, "block status of zero bytes".into()));
        }
        let t = &self.export.target;
        let len = req.length.min(MAX_STATUS_SPAN);
        let mut out = Vec::new();
        for (i, c) in self.contexts.iter().enumerate() {
            let set = match c {
                Context::Allocation => self.store.mapped_range(t, req.offset, len),
                Context::ChangedSince(cp) => {
                    self.store
                        .diff_range(&Target::checkpoint(&t.volume, cp), t, req.offset, len)
                }
            }
            .map_err(fail)?;
            let (inside, outside) = match c {
                Context::Allocation => (0, STATE_HOLE | STATE_ZERO),
                Context::ChangedSince(_) => (1, 0),
            };
            let mut ext = descriptors(&set, req.offset, len, inside, outside);
            if req.flags & CMD_FLAG_REQ_ONE != 0 {
                ext.truncate(1);
            }
            let done = i + 1 == self.contexts.len();
            block_status_chunk(&mut out, self.extended, done, req, i as u32 + 1, &ext);
        }
        Ok(out)
    }
}

/// Turns the extents of a set into consecutive `(length, flags)` descriptors covering
/// `offset..offset + len`: `inside` for bytes in the set, `outside` for the rest.
fn descriptors(
    set: &[Extent],
    offset: u64,
    len: u64,
    inside: u32,
    outside: u32,
) -> Vec<(u64, u32)> {
    fn push(out: &mut Vec<(u64, u32)>, l: u64, f: u32) {
        if l == 0 {
            return;
        }
        match out.last_mut() {
            Some((pl, pf)) if *pf == f => *pl += l,
            _ => out.push((l, f)),
        }
    }
    let mut out: Vec<(u64, u32)> = Vec::new();
    let end = offset + len;
    let mut at = offset;
    for e in set {
        if out.len() >= MAX_STATUS_EXTENTS {
            break;
        }
        push(&mut out, e.offset.saturating_sub(at), outside);
        push(&mut out, e.length, inside);
        at = e.offset + e.length;
    }
    if out.len() < MAX_STATUS_EXTENTS {
        push(&mut out, end.saturating_sub(at), outside);
    }
    out.truncate(MAX_STATUS_EXTENTS);
    out
}

fn fail(e: EngineError) -> (u32, String) {
    (errno(&e), e.to_string())
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

    #[test]
    fn descriptors_cover_the_range_without_gaps() {
        let set = [
            Extent {
                offset: 4096,
                length: 4096,
            },
            Extent {
                offset: 8192,
                length: 100,
            },
            Extent {
                offset: 20000,
                length: 1000,
            },
        ];
        let d = descriptors(&set, 0, 30000, 0, 3);
        assert_eq!(
            d,
            vec![
                (4096, 3),
                (4196, 0),
                (20000 - 8292, 3),
                (1000, 0),
                (9000, 3)
            ]
        );
        assert_eq!(d.iter().map(|x| x.0).sum::<u64>(), 30000);
        assert_eq!(descriptors(&[], 10, 5, 0, 3), vec![(5, 3)]);
    }
}
