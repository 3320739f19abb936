//! `cairn serve` against real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and nbdsh, TLS with
//! QEMU, and a flush on one connection covering another's writes. Misbehaving clients and a
//! stopped daemon are in `nbd_faults.rs`.
#![allow(missing_docs)]

use std::process::{Command, Stdio};

use cairn_nbd::proto::*;

mod common;
use common::nbd_client::Raw;
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
