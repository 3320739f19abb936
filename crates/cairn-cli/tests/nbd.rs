//! `cairn serve` against real NBD clients: qemu-io, qemu-img, nbdinfo and nbdcopy, plus a
//! hand-written client for the malformed input no real client would send.
#![allow(missing_docs)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_nbd::proto::*;

mod common;
use common::*;

/// Runs cairn; it must succeed.
fn cairn(e: &Env, args: &[&str]) -> String {
    ok(e, args)
}

/// `(start, length)` of the data extents `qemu-img map` reports.
fn qemu_img_data_extents(uri: &str) -> Vec<(u64, u64)> {
    let out = run("qemu-img", &["map", "-f", "raw", "--output=json", uri]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("map json");
    v.as_array()
        .expect("array")
        .iter()
        .filter(|x| x["data"] == true)
        .map(|x| {
            (
                x["start"].as_u64().expect("start"),
                x["length"].as_u64().expect("length"),
            )
        })
        .collect()
}

#[test]
fn qemu_io_reads_writes_and_holes_show_in_maps() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "64M"]);
    cairn(&e, &["volume", "create", "w", "--size", "1M"]);
    let d = Daemon::start(&e);
    let v = d.uri("v");
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1M 1M",
            "-c",
            "write -P 0x17 8M 4k",
            "-c",
            "write -P 0x33 12345 777", // unaligned: read-modify-write inside the engine
            "-c",
            "read -P 0xab 1M 1M",
            "-c",
            "read -P 0x17 8M 4k",
            "-c",
            "read -P 0x33 12345 777",
            "-c",
            "read -P 0 0 12345",
            "-c",
            "read -P 0 20M 4M", // a hole: sent as a hole chunk
            "-c",
            "write -z -u 1M 64k", // write-zeroes that may unmap: a hole again
            "-c",
            "read -P 0 1M 64k",
            "-c",
            "discard 2040k 8k",
            "-c",
            "read -P 0 2040k 8k",
            "-c",
            "flush",
            &v,
        ],
    );
    // Holes are exactly where nothing is stored.
    assert_eq!(
        qemu_img_data_extents(&v),
        vec![
            (12288, 4096),
            ((1 << 20) + (64 << 10), 1024 * 1024 - 72 * 1024),
            (8 << 20, 4096)
        ]
    );
    let map = run("nbdinfo", &["--map", &v]);
    let data: Vec<&str> = map.lines().filter(|l| l.contains("data")).collect();
    assert_eq!(data.len(), 3, "nbdinfo --map:\n{map}");
    // Cairn's own context: nothing has changed since a checkpoint until it is written.
    drop(d);
    cairn(&e, &["checkpoint", "create", "v@c1"]);
    let d = Daemon::start(&e);
    let v = d.uri("v");
    run("qemu-io", &["-f", "raw", "-c", "write -P 1 32M 8k", &v]);
    let changed = run("nbdinfo", &["--map=cairn:changed:c1", &v]);
    let lines: Vec<Vec<&str>> = changed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        lines,
        vec![
            vec!["0", "33554432", "0"],
            vec!["33554432", "8192", "1"],
            vec!["33562624", "33546240", "0"]
        ],
        "{changed}"
    );
    // Listing shows heads and checkpoints; a checkpoint export is read-only.
    let list = run("nbdinfo", &["--list", "--json", &d.uri("")]);
    for name in ["\"v\"", "\"w\"", "\"v@c1\""] {
        assert!(list.contains(name), "{name} not listed: {list}");
    }
    let o = output(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &d.uri("v@c1")],
    );
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(
        text.contains("read-only") || text.contains("Permission denied"),
        "{text}"
    );
    run(
        "qemu-io",
        &[
            "-r",
            "-f",
            "raw",
            "-c",
            "read -P 0xab 1088k 952k",
            &d.uri("v@c1"),
        ],
    );
    // volume info --json shows the URI clients use.
    drop(d);
    let info: serde_json::Value =
        serde_json::from_str(&cairn(&e, &["--json", "volume", "info", "v"])).expect("json");
    assert_eq!(
        info["nbd_uri"],
        format!(
            "nbd+unix:///v?socket={}",
            e.store.join("nbd.sock").display()
        )
    );
    fsck_clean(&e);
}

#[test]
fn checkpoint_exports_compare_and_nbdcopy_round_trips() {
    let e = env();
    let src = e.work.join("src.raw");
    let mut img = vec![0u8; 32 << 20];
    let mut x: u32 = 12345;
    for chunk in img.chunks_mut(4096).step_by(3) {
        for b in chunk.iter_mut() {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            *b = (x >> 16) as u8;
        }
    }
    std::fs::write(&src, &img).expect("write");
    let s = src.to_str().expect("utf8");
    cairn(&e, &["volume", "import", "v", s]);
    cairn(&e, &["checkpoint", "create", "v@base"]);
    cairn(
        &e,
        &[
            "volume",
            "write",
            "v",
            "--offset",
            "0",
            "--pattern",
            "0x42",
            "--length",
            "1M",
        ],
    );
    let d = Daemon::start(&e);
    // The checkpoint still holds the imported bytes; the head does not.
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("v@base")],
    );
    let o = output(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("v")],
    );
    assert_eq!(o.status.code(), Some(1), "head differs from the import");
    // nbdcopy out of a checkpoint, and into a head over four connections at once.
    let out = e.work.join("out.raw");
    run("nbdcopy", &[&d.uri("v@base"), out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read") == img);
    // The CLI works while the daemon owns the store: it goes through the control API.
    assert!(cairn(&e, &["volume", "list"]).contains("v"));
    run(
        "nbdcopy",
        &["--connections=4", "--requests=16", s, &d.uri("v")],
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("v")],
    );
    drop(d);
    fsck_clean(&e);
}

#[test]
fn qcow2_vhdx_vmdk_round_trip_byte_identical() {
    let e = env();
    for fmt in ["qcow2", "vhdx", "vmdk"] {
        let img = e.work.join(format!("in.{fmt}"));
        let i = img.to_str().expect("utf8");
        run("qemu-img", &["create", "-f", fmt, i, "48M"]);
        run(
            "qemu-io",
            &[
                "-f",
                fmt,
                "-c",
                "write -P 0x61 0 64k",
                "-c",
                "write -P 0x62 5M 3M",
                "-c",
                "write -P 0x63 47M 12k",
                i,
            ],
        );
        let name = format!("from-{fmt}");
        cairn(&e, &["volume", "import", &name, i]);
        let info: serde_json::Value =
            serde_json::from_str(&cairn(&e, &["--json", "volume", "info", &name])).expect("json");
        assert_eq!(info["size"], 48 << 20);
        assert_eq!(
            info["referenced"],
            (64 << 10) + (3 << 20) + (12 << 10),
            "{fmt}: zeros take no space"
        );
        let out = e.work.join(format!("out.{fmt}"));
        let o = out.to_str().expect("utf8");
        cairn(&e, &["volume", "export", &name, o]);
        let probed = run("qemu-img", &["info", "--output=json", o]);
        assert!(
            probed.contains(&format!("\"format\": \"{fmt}\"")),
            "{probed}"
        );
        run("qemu-img", &["compare", i, o]);
        // And to a sparse raw file.
        let raw = e.work.join(format!("out-{fmt}.raw"));
        cairn(
            &e,
            &[
                "volume",
                "export",
                &name,
                raw.to_str().expect("utf8"),
                "--format",
                "raw",
            ],
        );
        run("qemu-img", &["compare", i, raw.to_str().expect("utf8")]);
        use std::os::unix::fs::MetadataExt;
        let used = std::fs::metadata(&raw).expect("stat").blocks() * 512;
        assert!(used < 8 << 20, "{fmt}: raw export is sparse ({used} bytes)");
    }
    // A failed import keeps nothing.
    let bad = e.work.join("bad.qcow2");
    std::fs::write(&bad, b"QFI\xfbthis is not really a qcow2 image").expect("write");
    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--store")
        .arg(&e.store)
        .args(["volume", "import", "bad", bad.to_str().expect("utf8")])
        .output()
        .expect("run");
    assert!(!o.status.success());
    assert!(!cairn(&e, &["volume", "list"]).contains("bad"));
    fsck_clean(&e);
}

#[test]
fn many_clients_at_once() {
    let e = env();
    cairn(&e, &["volume", "create", "a", "--size", "16M"]);
    cairn(&e, &["volume", "create", "b", "--size", "16M"]);
    let d = Daemon::start(&e);
    // Four writers on one export (each its own connection) and two on another, all at once.
    let mut kids = Vec::new();
    for (vol, i) in [("a", 0), ("a", 1), ("a", 2), ("a", 3), ("b", 0), ("b", 1)] {
        let pat = format!("write -P {} {}M 2M", 0x10 + i, i * 4);
        kids.push(
            Command::new("qemu-io")
                .args(["-f", "raw", "-c", &pat, "-c", "flush", &d.uri(vol)])
                .stdout(Stdio::null())
                .spawn()
                .expect("qemu-io"),
        );
    }
    for mut k in kids {
        assert!(k.wait().expect("wait").success());
    }
    for (vol, n) in [("a", 4), ("b", 2)] {
        let mut args = vec!["-r".to_string(), "-f".into(), "raw".into()];
        for i in 0..n {
            args.push("-c".into());
            args.push(format!("read -P {} {}M 2M", 0x10 + i, i * 4));
        }
        args.push(d.uri(vol));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        run("qemu-io", &a);
    }
    drop(d);
    fsck_clean(&e);
}

/// A minimal client for input no real client sends.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(d: &Daemon) -> Raw {
        let s = UnixStream::connect(&d.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        Raw { s }
    }

    /// Reads the greeting and answers with fixed newstyle + no zeroes.
    fn hello(d: &Daemon) -> Raw {
        let mut r = Raw::connect(d);
        let mut g = [0u8; 18];
        r.s.read_exact(&mut g).expect("greeting");
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        r.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// Reads one option reply: (reply type, data).
    fn reply(&mut self) -> (u32, Vec<u8>) {
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
    fn go(&mut self, name: &str) -> u32 {
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

    fn request(&mut self, kind: u16, flags: u16, offset: u64, length: u32, payload: &[u8]) {
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
    fn simple(&mut self) -> u32 {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("simple reply");
        assert_eq!(h[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        u32::from_be_bytes(h[4..8].try_into().expect("4"))
    }

    /// True when the server has closed the connection.
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.s.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn bad_input_gets_the_spec_error_and_disturbs_nobody() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "1M"]);
    cairn(&e, &["volume", "create", "other", "--size", "1M"]);
    cairn(&e, &["checkpoint", "create", "v@c"]);
    let d = Daemon::start(&e);
    // A well-behaved client stays connected through everything below.
    let mut good = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &d.uri("other")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut good_in = good.stdin.take().expect("stdin");
    writeln!(good_in, "write -P 0x77 0 64k").expect("cmd");

    // Garbage instead of the client flags' follow-up: bad option magic closes the connection.
    let mut r = Raw::hello(&d);
    r.send(b"GET / HTTP/1.1\r\n\r\n");
    assert!(r.closed());
    // Unknown handshake flags.
    let mut r = Raw::connect(&d);
    let mut g = [0u8; 18];
    r.s.read_exact(&mut g).expect("greeting");
    r.send(&0xffff_0000u32.to_be_bytes());
    assert!(r.closed());
    // Truncated handshake: the client goes away mid-option.
    let mut r = Raw::hello(&d);
    r.send(&IHAVEOPT.to_be_bytes()[..5]);
    drop(r);
    // Unknown option, malformed GO, unknown export, over-long option data.
    let mut r = Raw::hello(&d);
    r.option(0xdead, b"");
    assert_eq!(r.reply().0, REP_ERR_UNSUP);
    r.option(OPT_GO, &[0, 0, 0, 99, b'v']);
    assert_eq!(r.reply().0, REP_ERR_INVALID);
    assert_eq!(r.go("nosuch"), REP_ERR_UNKNOWN);
    assert_eq!(r.go("v@nosuch"), REP_ERR_UNKNOWN);
    assert_eq!(r.go("bad name!"), REP_ERR_UNKNOWN);
    r.option(OPT_LIST, &vec![0u8; 100 << 10]);
    assert_eq!(r.reply().0, REP_ERR_TOO_BIG);
    r.option(OPT_SET_META_CONTEXT, b"");
    assert_eq!(
        r.reply().0,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    // The same connection can still choose an export after all that.
    assert_eq!(r.go("v"), REP_ACK);
    // Requests past the end, over the payload limit, unknown commands, bad flags.
    r.request(CMD_READ, 0, 1 << 20, 4096, &[]);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_WRITE, 0, (1 << 20) - 512, 1024, &[0u8; 1024]);
    assert_eq!(r.simple(), ENOSPC);
    r.request(CMD_READ, 0, u64::MAX - 10, 4096, &[]);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_READ, 0, 0, 64 << 20, &[]);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_WRITE, 0, 0, 33 << 20, &vec![0u8; 33 << 20]);
    assert_eq!(r.simple(), EINVAL, "write over the limit, payload skipped");
    r.request(99, 0, 0, 0, &[]);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_READ, 0x4000, 0, 512, &[]);
    assert_eq!(r.simple(), EINVAL);
    r.request(CMD_BLOCK_STATUS, 0, 0, 512, &[]);
    assert_eq!(r.simple(), EINVAL, "block status without a context");
    // Still in sync: a good request works.
    r.request(CMD_WRITE, CMD_FLAG_FUA, 4096, 4, b"abcd");
    assert_eq!(r.simple(), 0);
    // A bad request magic ends the connection.
    r.send(&[0u8; 28]);
    assert!(r.closed());
    // Writes to a checkpoint are refused with EPERM.
    let mut r = Raw::hello(&d);
    assert_eq!(r.go("v@c"), REP_ACK);
    r.request(CMD_WRITE, 0, 0, 4, b"abcd");
    assert_eq!(r.simple(), EPERM);
    r.request(CMD_TRIM, 0, 0, 4096, &[]);
    assert_eq!(r.simple(), EPERM);
    // A client that disconnects in the middle of a write's payload.
    let mut r = Raw::hello(&d);
    assert_eq!(r.go("v"), REP_ACK);
    r.request(CMD_WRITE, 0, 8192, 4096, &[1u8; 100]);
    drop(r);
    // NBD_OPT_EXPORT_NAME on an unknown export closes (the option has no error reply).
    let mut r = Raw::hello(&d);
    r.option(OPT_EXPORT_NAME, b"nosuch");
    assert!(r.closed());
    // A zero-length READ with structured replies gets one NONE chunk with the done flag (an
    // OFFSET_DATA chunk must carry data), and the connection stays usable.
    let mut r = Raw::hello(&d);
    r.option(OPT_STRUCTURED_REPLY, b"");
    assert_eq!(r.reply().0, REP_ACK);
    assert_eq!(r.go("v"), REP_ACK);
    r.request(CMD_READ, 0, 0, 0, &[]);
    let mut h = [0u8; 20];
    r.s.read_exact(&mut h).expect("structured reply");
    assert_eq!(h[..4], STRUCTURED_REPLY_MAGIC.to_be_bytes());
    assert_eq!(u16::from_be_bytes([h[6], h[7]]), REPLY_TYPE_NONE);
    assert_eq!(
        u16::from_be_bytes([h[4], h[5]]) & REPLY_FLAG_DONE,
        REPLY_FLAG_DONE
    );
    assert_eq!(u32::from_be_bytes([h[16], h[17], h[18], h[19]]), 0);
    // FUA is advertised, so every command accepts it; a trim past the end is EINVAL (a bad
    // request), a write past the end ENOSPC.
    let mut r = Raw::hello(&d);
    assert_eq!(r.go("v"), REP_ACK);
    r.request(CMD_READ, CMD_FLAG_FUA, 0, 512, &[]);
    assert_eq!(r.simple(), 0, "READ with FUA");
    let mut data = [0u8; 512];
    r.s.read_exact(&mut data).expect("read data");
    r.request(CMD_FLUSH, CMD_FLAG_FUA, 0, 0, &[]);
    assert_eq!(r.simple(), 0, "FLUSH with FUA");
    r.request(CMD_TRIM, CMD_FLAG_FUA, (1 << 20) - 4096, 8192, &[]);
    assert_eq!(r.simple(), EINVAL, "TRIM past the end");
    r.request(CMD_WRITE_ZEROES, 0, (1 << 20) - 4096, 8192, &[]);
    assert_eq!(r.simple(), ENOSPC, "WRITE_ZEROES past the end");
    // ABORT is acknowledged.
    let mut r = Raw::hello(&d);
    r.option(OPT_ABORT, b"");
    assert_eq!(r.reply().0, REP_ACK);

    // The good client never noticed.
    writeln!(good_in, "read -P 0x77 0 64k").expect("cmd");
    drop(good_in);
    let out = good.wait_with_output().expect("qemu-io");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("failed"), "{text}");
    // Every refusal was logged (once), and nothing panicked.
    let log = d.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("bad option magic"), "{log}");
    assert!(log.contains("export 'nosuch' refused"), "{log}");
    drop(d);
    // The write acknowledged with FUA is there; the half-sent one is not.
    let got = cairn(
        &e,
        &["volume", "read", "v", "--offset", "4096", "--length", "4"],
    );
    assert_eq!(got, "abcd");
    let got = cairn(
        &e,
        &["volume", "read", "v", "--offset", "8192", "--length", "4"],
    );
    assert_eq!(got.as_bytes(), &[0, 0, 0, 0]);
    fsck_clean(&e);
}

#[test]
fn sigterm_closes_cleanly_and_sigkill_keeps_what_was_flushed() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "8M"]);
    let mut d = Daemon::start(&e);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x5e 0 1M",
            "-c",
            "flush",
            &d.uri("v"),
        ],
    );
    let status = d.signal("-KILL");
    assert!(!status.success());
    assert!(d.socket.exists(), "SIGKILL leaves the socket behind");
    // The next start replaces the stale socket; the flushed data is there.
    let mut d = Daemon::start(&e);
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x5e 0 1M", &d.uri("v")],
    );
    // SIGTERM with a client connected: the daemon flushes, closes and exits 0.
    let mut client = Command::new("qemu-io")
        .args(["-f", "raw", &d.uri("v")])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("qemu-io");
    let mut cin = client.stdin.take().expect("stdin");
    writeln!(cin, "write -P 0x6f 2M 1M").expect("cmd");
    std::thread::sleep(Duration::from_millis(500));
    let status = d.signal("-TERM");
    assert!(
        status.success(),
        "exit after SIGTERM: {status}\n{}",
        d.log()
    );
    assert!(!d.socket.exists(), "socket removed");
    drop(cin);
    let _ = client.wait();
    fsck_clean(&e);
    let got = cairn(
        &e,
        &[
            "volume", "read", "v", "--offset", "2097152", "--length", "2",
        ],
    );
    assert_eq!(
        got.as_bytes(),
        &[0x6f, 0x6f],
        "acknowledged write kept by SIGTERM's flush"
    );
}

#[test]
fn checkpoint_taken_while_a_client_writes_is_consistent() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let e = env();
    // Large enough that the writer is still writing when the checkpoint returns, however fast
    // writes are (a 64 MiB volume was once written through before `checkpoint create` returned).
    cairn(&e, &["volume", "create", "v", "--size", "4G"]);
    let d = Daemon::start(&e);
    let mut r = Raw::hello(&d);
    assert_eq!(r.go("v"), REP_ACK);
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // One client writes block after block, each stamped with its number, waiting for each ack.
    let writer = std::thread::spawn(move || {
        let mut log = Vec::new();
        for i in 0..(4u64 << 30) / 4096 {
            if stop2.load(Ordering::Relaxed) {
                break;
            }
            let mut block = vec![0xEEu8; 4096];
            block[..8].copy_from_slice(&(i + 1).to_le_bytes());
            let sent = Instant::now();
            r.request(CMD_WRITE, 0, i * 4096, 4096, &block);
            assert_eq!(r.simple(), 0);
            log.push((sent, Instant::now()));
        }
        log
    });
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    cairn(&e, &["checkpoint", "create", "v@mid"]);
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let log = writer.join().expect("writer");
    let path = e.work.join("mid.raw");
    run("nbdcopy", &[&d.uri("v@mid"), path.to_str().expect("utf8")]);
    let mut data = vec![0u8; log.len() * 4096];
    std::io::Read::read_exact(&mut std::fs::File::open(&path).expect("open"), &mut data)
        .expect("read");
    let present: Vec<bool> = (0..log.len())
        .map(|i| data[i * 4096..i * 4096 + 8] == (i as u64 + 1).to_le_bytes())
        .collect();
    let (mut before, mut after) = (0, 0);
    for (i, &(sent, acked)) in log.iter().enumerate() {
        if acked < t0 {
            before += 1;
            assert!(
                present[i],
                "write {i}, acknowledged before the checkpoint, is missing"
            );
        }
        if sent > t1 {
            after += 1;
            assert!(
                !present[i],
                "write {i}, sent after the checkpoint, is in it"
            );
        }
    }
    // One client's writes are ordered, so the checkpoint holds exactly a prefix of them.
    let k = present.iter().take_while(|&&p| p).count();
    assert!(
        present[k..].iter().all(|&p| !p),
        "checkpoint is not a prefix"
    );
    let longest_write = log
        .iter()
        .map(|(sent, acked)| *acked - *sent)
        .max()
        .unwrap_or_default();
    assert!(
        before > 0 && after > 0,
        "the test saw writes on both sides ({before}, {after}); {} writes in all, the checkpoint \
         took {:?}, the longest write {longest_write:?}",
        log.len(),
        t1 - t0
    );
    drop(d);
    fsck_clean(&e);
}

#[test]
fn tcp_with_tls_serves_qemu_and_refuses_plain_clients() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "16M"]);
    let (srv, cli) = common::make_certs(&e.work);
    let cert = srv.join("server-cert.pem");
    let key = srv.join("server-key.pem");
    let d = Daemon::start_with(
        &e,
        &[
            "--nbd-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().expect("utf8"),
            "--tls-key",
            key.to_str().expect("utf8"),
        ],
    );
    // The daemon prints the port it got.
    let log = d.log();
    let port = log
        .split("nbd://127.0.0.1:")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse::<u16>().ok())
        .unwrap_or_else(|| panic!("no port in: {log}"));
    let object = format!(
        "tls-creds-x509,id=tls0,dir={},endpoint=client",
        cli.display()
    );
    let image = format!(
        "driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={port},export=v,tls-creds=tls0"
    );
    run(
        "qemu-io",
        &[
            "--object",
            &object,
            "--image-opts",
            &image,
            "-c",
            "write -P 0x42 0 64k",
            "-c",
            "read -P 0x42 0 64k",
        ],
    );
    // qemu-img too (the issue's peer), through TLS.
    run(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &image],
    );
    // Without TLS: refused with the spec's error, which the client shows.
    let plain = format!("nbd://127.0.0.1:{port}/v");
    let o = output("qemu-io", &["-f", "raw", "-c", "read 0 4k", &plain]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("requires TLS"), "{err}");
    // The unix socket stays plain (it is guarded by file permissions).
    run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0x42 0 64k", &d.uri("v")],
    );
    drop(d);
    // A key that does not match the certificate is a clear startup error.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cairn"))
        .arg("--store")
        .arg(&e.store)
        .args(["serve", "--nbd-listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&cert)
        .output()
        .expect("run");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("private key"), "{err}");
}

#[test]
fn flush_on_one_connection_covers_writes_of_another() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "4M"]);
    let mut d = Daemon::start(&e);
    // The server advertises CAN_MULTI_CONN; this is what it promises.
    let info = run("nbdinfo", &["--json", &d.uri("v")]);
    assert!(info.contains("\"can_multi_conn\": true"), "{info}");
    let mut a = Raw::hello(&d);
    assert_eq!(a.go("v"), REP_ACK);
    let mut b = Raw::hello(&d);
    assert_eq!(b.go("v"), REP_ACK);
    a.request(CMD_WRITE, 0, 8192, 5, b"hello");
    assert_eq!(a.simple(), 0);
    b.request(CMD_FLUSH, 0, 0, 0, &[]);
    assert_eq!(b.simple(), 0);
    // Power cut, as far as the daemon is concerned: no chance to flush anything more.
    let status = d.signal("-KILL");
    assert!(!status.success());
    let got = cairn(
        &e,
        &["volume", "read", "v", "--offset", "8192", "--length", "5"],
    );
    assert_eq!(
        got, "hello",
        "a write acknowledged on A, flushed on B, survives"
    );
    fsck_clean(&e);
}

/// libnbd (through nbdsh) with its own client-side checks off, so that it sends what the spec
/// allows but discourages: the server answers as the spec says and keeps the connection.
#[test]
fn libnbd_edge_requests_get_spec_answers() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "1M"]);
    let d = Daemon::start(&e);
    let script = r#"
import nbd
h.set_strict_mode(0)
assert h.pread(0, 0) == b"", "zero-length read"
h.pwrite(b"x" * 512, 0, nbd.CMD_FLAG_FUA)
assert h.pread(512, 0, nbd.CMD_FLAG_FUA) == b"x" * 512, "read with FUA"
h.flush(nbd.CMD_FLAG_FUA)
try:
    h.trim(8192, (1 << 20) - 4096)
    raise SystemExit("trim past the end succeeded")
except nbd.Error as err:
    assert err.errno == "EINVAL", f"trim past the end: errno {err.errno}, want EINVAL"
try:
    h.pread(8192, (1 << 20) - 4096)
    raise SystemExit("read past the end succeeded")
except nbd.Error as err:
    assert err.errno == "EINVAL", f"read past the end: errno {err.errno}, want EINVAL"
try:
    h.pwrite(b"y" * 8192, (1 << 20) - 4096)
    raise SystemExit("write past the end succeeded")
except nbd.Error as err:
    assert err.errno == "ENOSPC", f"write past the end: errno {err.errno}, want ENOSPC"
assert h.pread(0, 0) == b"", "still connected"
print("ok")
"#;
    // nbdsh is `python3 -m nbd`; Debian's python3 has the module, another one first on PATH may
    // not.
    let out = output(
        "/usr/bin/python3",
        &["-m", "nbd", "-u", &d.uri("v"), "-c", script],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && text.contains("ok"), "{text}");
    assert!(!d.log().contains("panicked"));
}

/// Applying a checkpoint under a connected client would change its disk behind its back: the
/// apply is refused, naming the client, and changes nothing; `--force` disconnects the client
/// first, so its next request fails instead of reading rewound data.
#[test]
fn apply_under_a_connected_client_is_refused_unless_forced() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "1M"]);
    let pattern = |byte: &str| {
        let args = [
            "volume",
            "write",
            "v",
            "--pattern",
            byte,
            "--length",
            "4096",
        ];
        cairn(&e, &args);
    };
    pattern("0x11");
    cairn(&e, &["checkpoint", "create", "v@a"]);
    pattern("0x22");
    let d = Daemon::start(&e);
    // A client on the head that reads, then waits for a line before it reads again.
    let script = r#"
import sys
print(h.pread(1, 0).hex(), flush=True)
sys.stdin.readline()
try:
    h.pread(1, 0)
    print("still connected", flush=True)
except nbd.Error as err:
    print("disconnected:", err, flush=True)
"#;
    let mut client = Command::new("/usr/bin/python3")
        .args(["-m", "nbd", "-u", &d.uri("v"), "-c", script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn nbdsh");
    let mut out = std::io::BufReader::new(client.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("first read");
    assert_eq!(line.trim(), "22");
    // A reader of a checkpoint is no bother: that data does not change.
    let other = run("nbdinfo", &["--size", &d.uri("v@a")]);
    assert_eq!(other.trim(), (1 << 20).to_string());

    fails(
        &e,
        &["checkpoint", "apply", "v@a"],
        "1 NBD client is connected",
    );
    assert_eq!(fails_json(&e, &["checkpoint", "apply", "v@a"]), "busy");
    let o = common::cairn(&e, &["checkpoint", "apply", "v@a"]);
    let why = String::from_utf8_lossy(&o.stderr);
    assert!(
        why.contains(&format!("pid {}", client.id())) && why.contains("--force"),
        "the refusal names the client and the way out: {why}"
    );
    assert_eq!(read_byte(&e), 0x22, "a refused apply changes nothing");
    let list = json(&e, &["checkpoint", "list", "v"]);
    assert_eq!(list.as_array().map(|a| a.len()), Some(1), "{list}");

    ok(&e, &["checkpoint", "apply", "v@a", "--force"]);
    assert_eq!(read_byte(&e), 0x11);
    let stdin = client.stdin.as_mut().expect("stdin");
    stdin.write_all(b"\n").expect("wake the client");
    line.clear();
    std::io::BufRead::read_line(&mut out, &mut line).expect("second read");
    assert!(line.starts_with("disconnected"), "{line}");
    assert!(client.wait().expect("wait").success());
    // With the client gone, an apply needs no force.
    ok(&e, &["checkpoint", "apply", "v@a"]);
    assert!(
        d.log().contains("disconnecting from 'v' on request"),
        "{}",
        d.log()
    );
}

fn read_byte(e: &Env) -> u8 {
    let o = common::cairn(e, &["volume", "read", "v", "--length", "1"]);
    assert!(o.status.success());
    o.stdout[0]
}
