//! A hand-written NBD client, for the input no real client sends, and libnbd's nbdsh running a
//! script that stays connected.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use cairn_nbd::proto::*;

use super::Daemon;

/// A minimal client for input no real client sends.
pub struct Raw {
    pub s: UnixStream,
}

impl Raw {
    pub fn connect(d: &Daemon) -> Raw {
        let s = UnixStream::connect(&d.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Raw { s }
    }

    /// Reads the greeting and answers with fixed newstyle + no zeroes.
    pub fn hello(d: &Daemon) -> Raw {
        let mut r = Raw::connect(d);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (reply type, data).
    pub fn reply(&mut self) -> (u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).expect("option reply");
        assert_eq!(h[..8], OPTION_REPLY_MAGIC.to_be_bytes());
        let kind = u32::from_be_bytes(h[12..16].try_into().expect("4"));
        let len = u32::from_be_bytes(h[16..20].try_into().expect("4"));
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).expect("option data");
        (kind, d)
    }

    /// GO to an export; returns the final reply type.
    pub fn go(&mut self, name: &str) -> u32 {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d);
        loop {
            let (k, _) = self.reply();
            if k != REP_INFO {
                return k;
            }
        }
    }

    pub fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) {
        let mut b = Vec::new();
        Request {
            flags,
            kind,
            cookie: 7,
            offset,
            length: length as u64,
        }
        .encode(false, &mut b);
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads a simple reply's error code.
    pub fn simple(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        u32::from_be_bytes(h[4..8].try_into().expect("4"))
    }

    /// True when the server has closed the connection.
    pub fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

/// libnbd's nbdsh on `uri` running `script`, its stdin and stdout piped, once it has printed its
/// first line (returned with the child and the rest of its output). nbdsh is `python3 -m nbd`;
/// Debian's python3 has the module, another one first on PATH may not.
pub fn nbdsh(uri: &str, script: &str) -> (Child, BufReader<ChildStdout>, String) {
    let mut client = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", uri, "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbdsh");
    let mut out = BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    out.read_line(&mut line).expect("nbdsh's first line");
    (client, out, line)
}
