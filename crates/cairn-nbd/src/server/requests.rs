//! One transmission request, run against the store: its checks (flags, bounds, read-only), its
//! work, and its reply (simple or structured, with holes and block status).

use super::*;

/// Maps an engine error to the NBD error a client gets.
pub(super) fn errno(e: &EngineError) -> u32 {
    match e {
        EngineError::NoSpace { .. } => ENOSPC,
        EngineError::OutOfRange { .. } | EngineError::Invalid(_) => EINVAL,
        _ => EIO,
    }
}

/// Why a request failed: the errno the client gets, and the reason the log and a structured
/// error reply carry.
#[derive(Debug)]
pub(super) struct RequestError {
    errno: u32,
    reason: String,
}

impl RequestError {
    fn new(errno: u32, reason: String) -> RequestError {
        RequestError { errno, reason }
    }
}

impl From<EngineError> for RequestError {
    fn from(e: EngineError) -> RequestError {
        RequestError::new(errno(&e), e.to_string())
    }
}

type Outcome = Result<Option<Vec<u8>>, RequestError>;

impl Session {
    /// Runs one request and returns its complete reply.
    pub(super) fn execute(&self, req: &Request, payload: &[u8]) -> Vec<u8> {
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
            Err(RequestError {
                errno: code,
                reason: why,
            }) => {
                // Logged once here; the client also gets the text in structured mode.
                warn!(
                    "nbd: {}: request type {} at {}+{} on '{}' failed: {why}",
                    self.peer, req.kind, req.offset, req.length, self.export.name
                );
                self.error_reply(req, code, &why)
            }
        }
    }

    pub(super) fn error_reply(&self, req: &Request, code: u32, why: &str) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        if self.structured {
            error_chunk(&mut out, self.extended, req, code, why);
        } else {
            simple_reply(&mut out, code, req.cookie);
        }
        out
    }

    fn check(&self, req: &Request, allowed_flags: u16, write: bool) -> Result<(), RequestError> {
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
            return Err(RequestError::new(
                EINVAL,
                format!("flags {:#x} not valid for this command", req.flags),
            ));
        }
        if write && self.export.read_only {
            return Err(RequestError::new(
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
            return Err(RequestError::new(
                if writes_data { ENOSPC } else { EINVAL },
                format!(
                    "{}+{} reaches past the end of '{}' ({} bytes)",
                    req.offset, req.length, self.export.name, self.export.size
                ),
            ));
        }
        Ok(())
    }

    fn flush_if_fua(&self, req: &Request) -> Result<(), RequestError> {
        if req.flags & CMD_FLAG_FUA != 0 {
            self.flush()?;
        }
        Ok(())
    }

    /// Commits every acknowledged write (and, on a head still being filled, what is filled).
    fn flush(&self) -> Result<(), RequestError> {
        match &self.backfill {
            Some(b) => b.flush().map_err(|why| RequestError::new(EIO, why)),
            None => self.store.flush().map_err(RequestError::from),
        }
    }

    /// Fills the range a request touches first, on a head still being filled.
    fn fill(&self, req: &Request) -> Result<(), RequestError> {
        match &self.backfill {
            Some(b) => b
                .ensure(req.offset, req.length)
                .map_err(|why| RequestError::new(EIO, why)),
            None => Ok(()),
        }
    }

    /// Whether block status must call every byte data: an image (whose holes are not worth
    /// finding), or a head not yet filled (whose holes may be data still to come).
    fn all_data(&self) -> bool {
        self.export.image.is_some() || self.backfill.as_ref().is_some_and(|b| !b.is_complete())
    }

    fn run(&self, req: &Request, payload: &[u8]) -> Outcome {
        let vol = &self.export.target.volume;
        if req.kind != CMD_WRITE && !payload.is_empty() {
            return Err(RequestError::new(
                EINVAL,
                "this command takes no payload".into(),
            ));
        }
        match req.kind {
            CMD_READ => {
                self.check(req, CMD_FLAG_DF, false)?;
                if req.length > self.max_payload as u64 {
                    return Err(RequestError::new(
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
                self.fill(req)?;
                self.store
                    .write(vol, req.offset, payload)
                    .map_err(RequestError::from)?;
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_FLUSH => {
                self.check(req, 0, false)?;
                self.flush()?;
                Ok(None)
            }
            CMD_TRIM => {
                self.check(req, 0, true)?;
                self.fill(req)?;
                self.store
                    .trim(vol, req.offset, req.length)
                    .map_err(RequestError::from)?;
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_WRITE_ZEROES => {
                self.check(req, CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO, true)?;
                self.fill(req)?;
                if req.flags & CMD_FLAG_NO_HOLE != 0 {
                    if req.flags & CMD_FLAG_FAST_ZERO != 0 {
                        // Allocated zeros mean writing them: not fast, so say so at once.
                        return Err(RequestError::new(
                            ENOTSUP,
                            "allocated zeros cannot be written fast".into(),
                        ));
                    }
                    let chunk = vec![0u8; (1 << 20).min(req.length as usize)];
                    let mut at = req.offset;
                    let end = req.offset + req.length;
                    while at < end {
                        let n = (end - at).min(chunk.len() as u64) as usize;
                        self.store
                            .write(vol, at, &chunk[..n])
                            .map_err(RequestError::from)?;
                        at += n as u64;
                    }
                } else {
                    self.store
                        .write_zeroes(vol, req.offset, req.length)
                        .map_err(RequestError::from)?;
                }
                self.flush_if_fua(req)?;
                Ok(None)
            }
            CMD_BLOCK_STATUS => {
                self.check(req, CMD_FLAG_REQ_ONE, false)?;
                self.block_status(req).map(Some)
            }
            CMD_CACHE => Err(RequestError::new(
                EINVAL,
                "NBD_CMD_CACHE is not advertised".into(),
            )),
            other => Err(RequestError::new(
                EINVAL,
                format!("unknown command type {other}"),
            )),
        }
    }

    fn read(&self, req: &Request) -> Result<Vec<u8>, RequestError> {
        let len = req.length as usize;
        let t = &self.export.target;
        self.fill(req)?;
        if !self.structured {
            let mut out = self.buffers.take(16 + len);
            match &self.export.image {
                Some(image) => image
                    .read(req.offset, &mut out[16..])
                    .map_err(|why| RequestError::new(EIO, why))?,
                None => self
                    .store
                    .read(t, req.offset, &mut out[16..])
                    .map_err(RequestError::from)?,
            }
            let mut hdr = Vec::with_capacity(16);
            simple_reply(&mut hdr, 0, req.cookie);
            out[..16].copy_from_slice(&hdr);
            return Ok(out);
        }
        // The data goes straight after room for one chunk header, so the common all-data case
        // needs no copy.
        let hs = chunk_header_size(self.extended) + 8;
        let mut out = self.buffers.take(hs + len);
        let runs = match &self.export.image {
            Some(image) => {
                image
                    .read(req.offset, &mut out[hs..])
                    .map_err(|why| RequestError::new(EIO, why))?;
                vec![(len as u64, false)]
            }
            None => self
                .store
                .read_sparse(t, req.offset, &mut out[hs..])
                .map_err(RequestError::from)?,
        };
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
        self.buffers.give(out);
        Ok(rep)
    }

    fn block_status(&self, req: &Request) -> Result<Vec<u8>, RequestError> {
        if self.contexts.is_empty() {
            return Err(RequestError::new(
                EINVAL,
                "no metadata context was negotiated (NBD_OPT_SET_META_CONTEXT)".into(),
            ));
        }
        if req.length == 0 {
            return Err(RequestError::new(
                EINVAL,
                "block status of zero bytes".into(),
            ));
        }
        let t = &self.export.target;
        let len = req.length.min(MAX_STATUS_SPAN);
        let mut out = Vec::new();
        for (i, c) in self.contexts.iter().enumerate() {
            let set = match c {
                Context::Allocation if self.all_data() => Ok(vec![Extent {
                    offset: req.offset,
                    length: len,
                }]),
                Context::Allocation => self.store.mapped_range(t, req.offset, len),
                Context::ChangedSince(cp) => {
                    self.store
                        .diff_range(&Target::checkpoint(&t.volume, cp), t, req.offset, len)
                }
            }
            .map_err(RequestError::from)?;
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
pub(super) fn descriptors(
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

#[cfg(test)]
mod tests {
    use super::*;

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
