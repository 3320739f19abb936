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

    pub(super) fn exports(&self) -> Result<Vec<Export>, String> {
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
    pub(super) fn match_contexts(
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

    pub(super) async fn negotiate(
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

    pub(super) fn session(
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
}
