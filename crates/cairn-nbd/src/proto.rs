// On-disk and wire code: a length or index that does not fit its field is a corruption bug.
#![cfg_attr(not(test), warn(clippy::cast_possible_truncation))]
//! The NBD wire format (NetworkBlockDevice/nbd `doc/proto.md`, with the extended-headers
//! extension): constants, parsers for what clients send and encoders for what the server sends.
//!
//! Everything here is a pure function over bytes, with no I/O and no engine, so that the fuzz target
//! can drive the parsers directly and the server stays a thin loop around them. Parsers never
//! panic: every malformed input becomes a [`ProtoError`].

use thiserror::Error;

/// First 8 bytes the server sends: "NBDMAGIC".
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// Newstyle negotiation marker, also the magic of every option request: "IHAVEOPT".
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: the client wants no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// `NBD_OPT_EXPORT_NAME`.
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`.
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// `NBD_REP_ACK`.
pub const REP_ACK: u32 = 1;
/// `NBD_REP_SERVER`: one export in a list.
pub const REP_SERVER: u32 = 2;
/// `NBD_REP_INFO`.
pub const REP_INFO: u32 = 3;
/// `NBD_REP_META_CONTEXT`.
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
/// The option is not supported.
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
/// The option is forbidden by policy.
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
/// The option is malformed.
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
/// TLS must be negotiated first.
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
/// The export does not exist.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
/// The server is shutting down.
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
/// The request is too big.
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;
/// Extended headers were negotiated and take precedence.
pub const REP_ERR_EXT_HEADER_REQD: u32 = REP_ERR | 10;

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flag: the flags field is meaningful.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// The export is read-only.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// FLUSH is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// The FUA flag is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// TRIM is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// WRITE_ZEROES is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// The DF (don't fragment) flag on READ is supported.
pub const TF_SEND_DF: u16 = 1 << 7;
/// A FLUSH on one connection covers writes completed on every connection.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// The FAST_ZERO flag on WRITE_ZEROES is supported.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flag: force unit access (durable before the reply).
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// Command flag: WRITE_ZEROES must not leave a hole.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// Command flag: READ must come back as one data chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// Command flag: BLOCK_STATUS wants one extent per context.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// Command flag: WRITE_ZEROES must fail fast rather than be slow.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// Command flag (extended headers): the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Reply chunk flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: no payload.
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a hole (reads as zeros) at an offset.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: block status with 32-bit descriptors.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: block status with 64-bit descriptors (extended headers).
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// Chunk type: an error for the whole request.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `NBD_EPERM`: write to a read-only export.
pub const EPERM: u32 = 1;
/// `NBD_EIO`.
pub const EIO: u32 = 5;
/// `NBD_ENOMEM`.
pub const ENOMEM: u32 = 12;
/// `NBD_EINVAL`.
pub const EINVAL: u32 = 22;
/// `NBD_ENOSPC`.
pub const ENOSPC: u32 = 28;
/// `NBD_EOVERFLOW`.
pub const EOVERFLOW: u32 = 75;
/// `NBD_ENOTSUP`.
pub const ENOTSUP: u32 = 95;
/// `NBD_ESHUTDOWN`.
pub const ESHUTDOWN: u32 = 108;

/// `base:allocation` status bit: the range is a hole.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` status bit: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// Longest string (export name, query) the server accepts, as the spec allows.
pub const MAX_STRING: usize = 4096;

/// Something a client sent that does not follow the protocol.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtoError {
    /// A magic number did not match.
    #[error("bad {what} magic {found:#x}")]
    BadMagic {
        /// Which message.
        what: &'static str,
        /// What was received.
        found: u64,
    },
    /// A message was shorter than its fixed part.
    #[error("{what} is {got} bytes, needs {need}")]
    Short {
        /// Which message.
        what: &'static str,
        /// Bytes present.
        got: usize,
        /// Bytes needed.
        need: usize,
    },
    /// Option data whose fields do not add up.
    #[error("malformed {what}: {why}")]
    Malformed {
        /// Which message.
        what: &'static str,
        /// What is wrong.
        why: &'static str,
    },
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(x)
}

fn need(what: &'static str, b: &[u8], n: usize) -> Result<(), ProtoError> {
    if b.len() < n {
        return Err(ProtoError::Short {
            what,
            got: b.len(),
            need: n,
        });
    }
    Ok(())
}

/// A cursor over option data that fails cleanly instead of reading past the end.
struct Fields<'a> {
    what: &'static str,
    b: &'a [u8],
}

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Malformed {
                what: self.what,
                why: "a length field runs past the end of the option data",
            });
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.take(2).map(|b| u16_at(b, 0))
    }
    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.take(4).map(|b| u32_at(b, 0))
    }
    fn string(&mut self) -> Result<String, ProtoError> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return Err(ProtoError::Malformed {
                what: self.what,
                why: "string longer than 4096 bytes",
            });
        }
        let raw = self.take(n)?;
        String::from_utf8(raw.to_vec()).map_err(|_| ProtoError::Malformed {
            what: self.what,
            why: "string is not UTF-8",
        })
    }
    fn end(&self) -> Result<(), ProtoError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(ProtoError::Malformed {
                what: self.what,
                why: "trailing bytes after the last field",
            })
        }
    }
}

/// The fixed 16-byte header of an option request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code.
    pub option: u32,
    /// Bytes of data that follow.
    pub length: u32,
}

impl OptionHeader {
    /// Bytes on the wire.
    pub const SIZE: usize = 16;

    /// Parses the header; the magic must be `IHAVEOPT`.
    pub fn parse(b: &[u8]) -> Result<Self, ProtoError> {
        need("option header", b, Self::SIZE)?;
        let magic = u64_at(b, 0);
        if magic != IHAVEOPT {
            return Err(ProtoError::BadMagic {
                what: "option",
                found: magic,
            });
        }
        Ok(OptionHeader {
            option: u32_at(b, 8),
            length: u32_at(b, 12),
        })
    }
}

/// The data of `NBD_OPT_GO` / `NBD_OPT_INFO`: an export name and the information items wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportRequest {
    /// Export name.
    pub name: String,
    /// `NBD_INFO_*` items requested.
    pub info: Vec<u16>,
}

impl ExportRequest {
    /// Parses the option data.
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut f = Fields {
            what: "NBD_OPT_GO/INFO data",
            b: data,
        };
        let name = f.string()?;
        let n = f.u16()?;
        let mut info = Vec::with_capacity(n as usize);
        for _ in 0..n {
            info.push(f.u16()?);
        }
        f.end()?;
        Ok(ExportRequest { name, info })
    }
}

/// The data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

impl MetaContextRequest {
    /// Parses the option data.
    pub fn parse(data: &[u8]) -> Result<Self, ProtoError> {
        let mut f = Fields {
            what: "meta context data",
            b: data,
        };
        let export = f.string()?;
        let n = f.u32()?;
        // Each query takes at least 4 bytes, so a count larger than that is a lie; checking it
        // first keeps a hostile count from reserving memory.
        if n as usize > f.b.len() / 4 {
            return Err(ProtoError::Malformed {
                what: f.what,
                why: "more queries announced than the data can hold",
            });
        }
        let mut queries = Vec::with_capacity(n as usize);
        for _ in 0..n {
            queries.push(f.string()?);
        }
        f.end()?;
        Ok(MetaContextRequest { export, queries })
    }
}

/// One transmission-phase request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// `NBD_CMD_FLAG_*` bits.
    pub flags: u16,
    /// `NBD_CMD_*` type.
    pub kind: u16,
    /// Opaque value echoed in the reply.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Effect length, or payload length for WRITE (and with `CMD_FLAG_PAYLOAD_LEN`).
    pub length: u64,
}

impl Request {
    /// Bytes of a compact header.
    pub const COMPACT_SIZE: usize = 28;
    /// Bytes of an extended header.
    pub const EXTENDED_SIZE: usize = 32;

    /// Header size for the negotiated mode.
    pub fn size(extended: bool) -> usize {
        if extended {
            Self::EXTENDED_SIZE
        } else {
            Self::COMPACT_SIZE
        }
    }

    /// Parses a header in the negotiated mode.
    pub fn parse(b: &[u8], extended: bool) -> Result<Self, ProtoError> {
        need("request header", b, Self::size(extended))?;
        let magic = u32_at(b, 0);
        let want = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != want {
            return Err(ProtoError::BadMagic {
                what: "request",
                found: magic as u64,
            });
        }
        Ok(Request {
            flags: u16_at(b, 4),
            kind: u16_at(b, 6),
            cookie: u64_at(b, 8),
            offset: u64_at(b, 16),
            length: if extended {
                u64_at(b, 24)
            } else {
                u32_at(b, 24) as u64
            },
        })
    }

    /// Bytes of payload that follow this header on the wire. A WRITE always carries its length
    /// as payload: the spec wants `CMD_FLAG_PAYLOAD_LEN` on it in extended mode, but QEMU 10
    /// sends extended WRITEs without the flag, and reading them any other way loses sync.
    pub fn payload_len(&self, extended: bool) -> u64 {
        let has = self.kind == CMD_WRITE || extended && self.flags & CMD_FLAG_PAYLOAD_LEN != 0;
        if has {
            self.length
        } else {
            0
        }
    }

    /// Encodes the header (clients and tests).
    pub fn encode(&self, extended: bool, out: &mut Vec<u8>) {
        if extended {
            out.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            out.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        out.extend_from_slice(&self.flags.to_be_bytes());
        out.extend_from_slice(&self.kind.to_be_bytes());
        out.extend_from_slice(&self.cookie.to_be_bytes());
        out.extend_from_slice(&self.offset.to_be_bytes());
        if extended {
            out.extend_from_slice(&self.length.to_be_bytes());
        } else {
            let length =
                u32::try_from(self.length).expect("compact request headers carry 32-bit lengths");
            out.extend_from_slice(&length.to_be_bytes());
        }
    }
}

/// A length field of 32 bits. What the server sends is bounded far below 4 GiB (option data,
/// export names, payloads under the advertised maximum, status replies cut at
/// `MAX_STATUS_EXTENTS`), so a longer one is a bug in Cairn, not input.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("wire lengths are bounded below 4 GiB")
}

/// Appends an option reply.
pub fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&len32(data.len()).to_be_bytes());
    out.extend_from_slice(data);
}

/// Data of an `NBD_INFO_EXPORT` reply.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&size.to_be_bytes());
    d.extend_from_slice(&flags.to_be_bytes());
    d
}

/// Data of an `NBD_INFO_BLOCK_SIZE` reply.
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&min.to_be_bytes());
    d.extend_from_slice(&preferred.to_be_bytes());
    d.extend_from_slice(&max.to_be_bytes());
    d
}

/// Data of an `NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION` reply.
pub fn info_text(kind: u16, text: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + text.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(text.as_bytes());
    d
}

/// Data of an `NBD_REP_SERVER` reply (one export of a list).
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&len32(name.len()).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// Data of an `NBD_REP_META_CONTEXT` reply.
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// Appends a simple reply header.
pub fn simple_reply(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// Bytes of a chunk header in the negotiated mode.
pub fn chunk_header_size(extended: bool) -> usize {
    if extended {
        32
    } else {
        20
    }
}

/// Appends a structured (or extended) reply chunk header; `payload` is the chunk's length.
pub fn chunk_header(
    out: &mut Vec<u8>,
    extended: bool,
    flags: u16,
    kind: u16,
    req: &Request,
    payload: u64,
) {
    if extended {
        out.extend_from_slice(&EXTENDED_REPLY_MAGIC.to_be_bytes());
    } else {
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    }
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&req.cookie.to_be_bytes());
    if extended {
        out.extend_from_slice(&req.offset.to_be_bytes());
        out.extend_from_slice(&payload.to_be_bytes());
    } else {
        let payload = u32::try_from(payload).expect("compact chunks carry less than 4 GiB");
        out.extend_from_slice(&payload.to_be_bytes());
    }
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk that ends the reply.
pub fn error_chunk(out: &mut Vec<u8>, extended: bool, req: &Request, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    chunk_header(
        out,
        extended,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        req,
        6 + msg.len() as u64,
    );
    out.extend_from_slice(&error.to_be_bytes());
    // At most 1,024 bytes (cut above), so the length fits its 16 bits.
    out.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(msg);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk.
pub fn hole_chunk(out: &mut Vec<u8>, extended: bool, req: &Request, offset: u64, len: u32) {
    chunk_header(out, extended, 0, REPLY_TYPE_OFFSET_HOLE, req, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
}

/// Appends a block-status chunk for one context: 32-bit descriptors, or 64-bit ones in extended
/// mode. `extents` are `(length, flags)`.
pub fn block_status_chunk(
    out: &mut Vec<u8>,
    extended: bool,
    done: bool,
    req: &Request,
    context: u32,
    extents: &[(u64, u32)],
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    if extended {
        let len = 8 + 16 * extents.len() as u64;
        chunk_header(out, true, flags, REPLY_TYPE_BLOCK_STATUS_EXT, req, len);
        out.extend_from_slice(&context.to_be_bytes());
        out.extend_from_slice(&len32(extents.len()).to_be_bytes());
        for &(l, f) in extents {
            out.extend_from_slice(&l.to_be_bytes());
            out.extend_from_slice(&(f as u64).to_be_bytes());
        }
    } else {
        let len = 4 + 8 * extents.len() as u64;
        chunk_header(out, false, flags, REPLY_TYPE_BLOCK_STATUS, req, len);
        out.extend_from_slice(&context.to_be_bytes());
        for &(l, f) in extents {
            out.extend_from_slice(
                &u32::try_from(l)
                    .expect("compact block status covers less than 4 GiB per descriptor")
                    .to_be_bytes(),
            );
            out.extend_from_slice(&f.to_be_bytes());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u32).to_be_bytes().to_vec();
        v.extend_from_slice(s.as_bytes());
        v
    }

    #[test]
    fn export_request_round_trip_and_rejects_lies() {
        let mut d = string("vm@base");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&INFO_NAME.to_be_bytes());
        let r = ExportRequest::parse(&d).expect("parse");
        assert_eq!(r.name, "vm@base");
        assert_eq!(r.info, vec![INFO_BLOCK_SIZE, INFO_NAME]);
        // Every truncation fails cleanly; so does trailing garbage and a name length that lies.
        for n in 0..d.len() {
            assert!(ExportRequest::parse(&d[..n]).is_err(), "prefix {n}");
        }
        let mut long = d.clone();
        long.push(0);
        assert!(ExportRequest::parse(&long).is_err());
        let mut lie = d.clone();
        lie[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(ExportRequest::parse(&lie).is_err());
    }

    #[test]
    fn meta_request_counts_are_checked() {
        let mut d = string("vm");
        d.extend_from_slice(&1u32.to_be_bytes());
        d.extend_from_slice(&string("base:allocation"));
        let r = MetaContextRequest::parse(&d).expect("parse");
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
        let mut lie = string("vm");
        lie.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(MetaContextRequest::parse(&lie).is_err());
        let mut bad_utf8 = string("vm");
        bad_utf8.extend_from_slice(&1u32.to_be_bytes());
        bad_utf8.extend_from_slice(&2u32.to_be_bytes());
        bad_utf8.extend_from_slice(&[0xff, 0xfe]);
        assert!(MetaContextRequest::parse(&bad_utf8).is_err());
    }

    #[test]
    fn requests_round_trip_in_both_modes() {
        for extended in [false, true] {
            let r = Request {
                flags: CMD_FLAG_FUA,
                kind: CMD_WRITE,
                cookie: 0x1122_3344_5566_7788,
                offset: 1 << 40,
                length: 4096,
            };
            let mut b = Vec::new();
            r.encode(extended, &mut b);
            assert_eq!(b.len(), Request::size(extended));
            assert_eq!(Request::parse(&b, extended), Ok(r));
            assert!(Request::parse(&b, !extended).is_err());
            assert!(Request::parse(&b[..b.len() - 1], extended).is_err());
        }
    }

    #[test]
    fn option_header_needs_ihaveopt() {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&OPT_GO.to_be_bytes());
        b.extend_from_slice(&7u32.to_be_bytes());
        assert_eq!(
            OptionHeader::parse(&b),
            Ok(OptionHeader {
                option: OPT_GO,
                length: 7
            })
        );
        b[0] ^= 1;
        assert!(matches!(
            OptionHeader::parse(&b),
            Err(ProtoError::BadMagic { .. })
        ));
    }
}
