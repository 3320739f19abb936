//! Fixed-newstyle negotiation: the options a client may send before transmission (exports,
//! structured replies, meta contexts, TLS), answered as the NBD spec says, and the session it
//! ends in.

use super::*;

impl Server {
    pub(super) fn resolve(&self, name: &str) -> Result<Export, String> {
        if name.is_empty() {
            return Err(
                "Cairn has no default export; name a volume (NAME) or a checkpoint \
                        (NAME@CHECKPOINT)"
                    .into(),
            );
        }
        if let Some(image) = self.image(name) {
            return Ok(Export {
                name: name.to_string(),
                target: Target::head(name),
                size: image.size(),
                read_only: true,
                image: Some(image),
            });
        }
        let target = Target::parse(name).map_err(|e| e.to_string())?;
        if target.checkpoint.is_none() && self.is_fenced(&target.volume) {
            return Err(format!(
                "volume '{}' is being rewound to a checkpoint; connect again in a moment",
                target.volume
            ));
        }
        let (size, read_only) = match &target.checkpoint {
            None => (
                self.store
                    .volume_info(&target.volume)
                    .map_err(|e| e.to_string())?
                    .size,
                false,
            ),
            Some(c) => {
                let cp = self
                    .store
                    .checkpoint_info(&target.volume, c)
                    .map_err(|e| e.to_string())?;
                (cp.size, true)
            }
        };
        Ok(Export {
            name: name.to_string(),
            target,
            size,
            read_only,
            image: None,
        })
    }

    pub(super) fn exports(&self) -> Result<Vec<Export>, String> {
        let mut out = Vec::new();
        for v in self.store.list_volumes().map_err(|e| e.to_string())? {
            out.push(Export {
                name: v.name.clone(),
                target: Target::head(&v.name),
                size: v.size,
                read_only: false,
                image: None,
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
                    image: None,
                });
            }
        }
        for (name, image) in self.images() {
            out.push(Export {
                target: Target::head(&name),
                name,
                size: image.size(),
                read_only: true,
                image: Some(image),
            });
        }
        Ok(out)
    }

    /// Contexts of `export` matching `queries`; `list` allows the namespace-only wildcards.
    pub(super) fn match_contexts(
        &self,
        export: &Export,
        queries: &[String],
        list: bool,
    ) -> Result<Vec<Context>, String> {
        // An image has no checkpoints to tell changes from.
        let checkpoints: Vec<String> = match export.image {
            Some(_) => Vec::new(),
            None => self
                .store
                .list_checkpoints(&export.target.volume)
                .map_err(|e| e.to_string())?
                .into_iter()
                .map(|c| c.name)
                .collect(),
        };
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

    pub(super) async fn negotiate(
        &self,
        s: &mut Box<dyn Stream>,
        peer: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Result<Option<Session>, ConnError> {
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
        let mut n = Negotiation {
            peer: peer.to_string(),
            no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
            ..Negotiation::default()
        };
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
            let next = match h.option {
                _ if tls.is_some()
                    && !n.secured
                    && h.option != OPT_STARTTLS
                    && h.option != OPT_ABORT =>
                {
                    n.before_tls(&mut out, h.option)?
                }
                OPT_EXPORT_NAME => self.export_name(&mut n, &mut out, data)?,
                OPT_ABORT => {
                    option_reply(&mut out, h.option, REP_ACK, &[]);
                    // The client may already have hung up; that is fine.
                    let _ = s.write_all(&out).await;
                    let _ = s.flush().await;
                    return Ok(None);
                }
                OPT_LIST => self.list(&n, &mut out, &data),
                OPT_STARTTLS => match (&tls, n.secured, data.is_empty()) {
                    (None, _, _) => {
                        let why = b"TLS is not enabled on this socket";
                        option_reply(&mut out, h.option, REP_ERR_UNSUP, why);
                        Next::Reply
                    }
                    (Some(_), true, _) => n.invalid(&mut out, h.option, "TLS is already in use"),
                    (Some(_), _, false) => {
                        n.invalid(&mut out, h.option, "NBD_OPT_STARTTLS takes no data")
                    }
                    (Some(acceptor), false, true) => {
                        n.start_tls(s, &mut out, acceptor).await?;
                        continue;
                    }
                },
                OPT_INFO | OPT_GO => self.info_or_go(&mut n, &mut out, h.option, &data),
                OPT_STRUCTURED_REPLY => n.structured_reply(&mut out, &data),
                OPT_EXTENDED_HEADERS => n.extended_headers(&mut out, &data),
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                    self.meta_context(&mut n, &mut out, h.option, &data)
                }
                other => {
                    debug!("nbd: {peer}: unsupported option {other}");
                    let why = b"option not supported by Cairn";
                    option_reply(&mut out, other, REP_ERR_UNSUP, why);
                    Next::Reply
                }
            };
            s.write_all(&out).await?;
            s.flush().await?;
            if let Next::Transmit(export) = next {
                return Ok(Some(self.session(export, n)));
            }
        }
        Err(ConnError::Closed(format!(
            "more than {MAX_OPTIONS} options without choosing an export"
        )))
    }

    /// `NBD_OPT_EXPORT_NAME`: the old way in. It has no error reply, so an unknown export ends
    /// the session.
    fn export_name(
        &self,
        n: &mut Negotiation,
        out: &mut Vec<u8>,
        data: Vec<u8>,
    ) -> Result<Next, ConnError> {
        if n.extended {
            return Err(ConnError::Closed(
                "NBD_OPT_EXPORT_NAME after extended headers".into(),
            ));
        }
        let name = String::from_utf8(data)
            .map_err(|_| ConnError::Closed("export name is not UTF-8".into()))?;
        let export = self.resolve(&name).map_err(ConnError::Closed)?;
        out.extend_from_slice(&export.size.to_be_bytes());
        out.extend_from_slice(&export.flags().to_be_bytes());
        if !n.no_zeroes {
            out.extend_from_slice(&[0u8; 124]);
        }
        Ok(Next::Transmit(export))
    }

    /// `NBD_OPT_LIST`: every volume head and checkpoint.
    fn list(&self, n: &Negotiation, out: &mut Vec<u8>, data: &[u8]) -> Next {
        if !data.is_empty() {
            return n.invalid(out, OPT_LIST, "NBD_OPT_LIST takes no data");
        }
        match self.exports() {
            Ok(list) => {
                for e in list {
                    let entry = rep_server(&e.name, &e.description());
                    option_reply(out, OPT_LIST, REP_SERVER, &entry);
                }
                option_reply(out, OPT_LIST, REP_ACK, &[]);
            }
            Err(e) => option_reply(out, OPT_LIST, REP_ERR_SHUTDOWN, e.as_bytes()),
        }
        Next::Reply
    }

    /// `NBD_OPT_INFO` describes an export; `NBD_OPT_GO` also starts transmission on it.
    fn info_or_go(&self, n: &mut Negotiation, out: &mut Vec<u8>, option: u32, data: &[u8]) -> Next {
        let req = match ExportRequest::parse(data) {
            Ok(r) => r,
            Err(e) => return n.invalid(out, option, &e.to_string()),
        };
        let export = match self.resolve(&req.name) {
            Ok(export) => export,
            Err(why) => {
                warn!("nbd: {}: export '{}' refused: {why}", n.peer, req.name);
                option_reply(out, option, REP_ERR_UNKNOWN, why.as_bytes());
                return Next::Reply;
            }
        };
        option_reply(
            out,
            option,
            REP_INFO,
            &info_export(export.size, export.flags()),
        );
        // Always sent: it tells clients our payload limit.
        let sizes = info_block_size(1, 4096, self.config.max_payload);
        option_reply(out, option, REP_INFO, &sizes);
        if req.info.contains(&INFO_NAME) {
            option_reply(out, option, REP_INFO, &info_text(INFO_NAME, &export.name));
        }
        if req.info.contains(&INFO_DESCRIPTION) {
            let text = info_text(INFO_DESCRIPTION, &export.description());
            option_reply(out, option, REP_INFO, &text);
        }
        option_reply(out, option, REP_ACK, &[]);
        match option {
            OPT_GO => Next::Transmit(export),
            _ => Next::Reply,
        }
    }

    /// `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT`.
    fn meta_context(
        &self,
        n: &mut Negotiation,
        out: &mut Vec<u8>,
        option: u32,
        data: &[u8],
    ) -> Next {
        let set = option == OPT_SET_META_CONTEXT;
        if !n.structured {
            return n.invalid(out, option, "negotiate structured replies first");
        }
        let req = match MetaContextRequest::parse(data) {
            Ok(req) => req,
            Err(e) => return n.invalid(out, option, &e.to_string()),
        };
        let found = self
            .resolve(&req.export)
            .and_then(|ex| self.match_contexts(&ex, &req.queries, !set));
        match found {
            Err(why) => {
                warn!("nbd: {}: meta contexts refused: {why}", n.peer);
                option_reply(out, option, REP_ERR_UNKNOWN, why.as_bytes());
            }
            Ok(found) => {
                for (i, c) in found.iter().enumerate() {
                    let id = u32::try_from(i + 1).unwrap_or(u32::MAX);
                    option_reply(
                        out,
                        option,
                        REP_META_CONTEXT,
                        &rep_meta_context(id, &c.name()),
                    );
                }
                option_reply(out, option, REP_ACK, &[]);
                if set {
                    n.contexts = found;
                    n.contexts_for = req.export;
                }
            }
        }
        Next::Reply
    }

    fn session(&self, export: Export, n: Negotiation) -> Session {
        // Contexts set for another export than the one chosen do not apply.
        let contexts = match n.contexts_for == export.name {
            true => n.contexts,
            false => Vec::new(),
        };
        let backfill = match (&export.image, &export.target.checkpoint) {
            (None, None) => self.backfill(&export.target.volume),
            _ => None,
        };
        Session {
            store: self.store.clone(),
            backfill,
            export,
            structured: n.structured,
            extended: n.extended,
            contexts,
            max_payload: self.config.max_payload,
            peer: n.peer,
            buffers: Default::default(),
        }
    }
}

/// What negotiation has agreed on so far.
#[derive(Default)]
struct Negotiation {
    peer: String,
    no_zeroes: bool,
    secured: bool,
    structured: bool,
    extended: bool,
    contexts: Vec<Context>,
    contexts_for: String,
}

/// What follows an option's reply.
enum Next {
    /// More options.
    Reply,
    /// Transmission on this export.
    Transmit(Export),
}

impl Negotiation {
    fn invalid(&self, out: &mut Vec<u8>, option: u32, why: &str) -> Next {
        warn!("nbd: {}: option {option} refused: {why}", self.peer);
        option_reply(out, option, REP_ERR_INVALID, why.as_bytes());
        Next::Reply
    }

    /// An option other than STARTTLS on a TLS-only server before TLS.
    fn before_tls(&self, out: &mut Vec<u8>, option: u32) -> Result<Next, ConnError> {
        if option == OPT_EXPORT_NAME {
            return Err(ConnError::Closed(
                "NBD_OPT_EXPORT_NAME without TLS on a TLS-only server".into(),
            ));
        }
        warn!(
            "nbd: {}: option {option} refused before STARTTLS",
            self.peer
        );
        let why = b"this server requires TLS: negotiate NBD_OPT_STARTTLS first";
        option_reply(out, option, REP_ERR_TLS_REQD, why);
        Ok(Next::Reply)
    }

    fn structured_reply(&mut self, out: &mut Vec<u8>, data: &[u8]) -> Next {
        let option = OPT_STRUCTURED_REPLY;
        if !data.is_empty() {
            return self.invalid(out, option, "NBD_OPT_STRUCTURED_REPLY takes no data");
        }
        if self.extended {
            let why = b"extended headers are already in use";
            option_reply(out, option, REP_ERR_EXT_HEADER_REQD, why);
        } else {
            self.structured = true;
            option_reply(out, option, REP_ACK, &[]);
        }
        Next::Reply
    }

    fn extended_headers(&mut self, out: &mut Vec<u8>, data: &[u8]) -> Next {
        let option = OPT_EXTENDED_HEADERS;
        if !data.is_empty() {
            return self.invalid(out, option, "NBD_OPT_EXTENDED_HEADERS takes no data");
        }
        self.extended = true;
        self.structured = true;
        option_reply(out, option, REP_ACK, &[]);
        Next::Reply
    }

    /// Acknowledges `NBD_OPT_STARTTLS` and swaps the plain stream for a TLS one. The spec makes
    /// the client negotiate everything again over TLS.
    async fn start_tls(
        &mut self,
        s: &mut Box<dyn Stream>,
        out: &mut Vec<u8>,
        acceptor: &tokio_rustls::TlsAcceptor,
    ) -> Result<(), ConnError> {
        option_reply(out, OPT_STARTTLS, REP_ACK, &[]);
        s.write_all(out).await?;
        s.flush().await?;
        // The placeholder is never used.
        let plain = std::mem::replace(s, Box::new(tokio::io::duplex(1).0));
        let secure = acceptor
            .accept(plain)
            .await
            .map_err(|e| ConnError::Closed(format!("TLS handshake failed: {e}")))?;
        *s = Box::new(secure);
        self.secured = true;
        self.structured = false;
        self.extended = false;
        self.contexts.clear();
        self.contexts_for.clear();
        debug!("nbd: {}: TLS established", self.peer);
        Ok(())
    }
}
