//! The NBD server against real clients, in process over a real store: qemu-io reads, writes,
//! zeroes and discards with holes where nothing is stored, the changed-blocks context, export
//! listing and read-only checkpoints; qemu-img compare and nbdcopy (several connections) on heads
//! and checkpoints; many clients at once; libnbd's edge requests; TLS with QEMU's
//! `tls-creds-x509` on TCP while the unix socket stays plain. What only the daemon does (SIGTERM,
//! SIGKILL, applying under clients, import and export) is tested with `cairn serve` in
//! `cairn-cli/tests/nbd*.rs`.
#![allow(missing_docs)]

use std::process::{Command, Stdio};

use cairn_nbd::ServerConfig;

mod common;
use common::*;

const MIB: u64 = 1 << 20;

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
    let d = Served::new(&[("v", 64 * MIB), ("w", MIB)]);
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
    d.store
        .create_checkpoint("v", "c1", None)
        .expect("checkpoint");
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
    d.fsck_clean();
}

#[test]
fn checkpoint_exports_compare_and_nbdcopy_round_trips() {
    let d = Served::new(&[("v", 32 * MIB)]);
    let src = d.work.join("src.raw");
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
    d.store.write("v", 0, &img).expect("write the image");
    d.store
        .create_checkpoint("v", "base", None)
        .expect("checkpoint");
    d.store.write("v", 0, &[0x42; 1 << 20]).expect("write");
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
    let out = d.work.join("out.raw");
    run("nbdcopy", &[&d.uri("v@base"), out.to_str().expect("utf8")]);
    assert!(std::fs::read(&out).expect("read") == img);
    run(
        "nbdcopy",
        &["--connections=4", "--requests=16", s, &d.uri("v")],
    );
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", s, &d.uri("v")],
    );
    d.fsck_clean();
}

#[test]
fn many_clients_at_once() {
    let d = Served::new(&[("a", 16 * MIB), ("b", 16 * MIB)]);
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
    d.fsck_clean();
}

/// libnbd (through nbdsh) with its own client-side checks off, so that it sends what the spec
/// allows but discourages: the server answers as the spec says and keeps the connection.
#[test]
fn libnbd_edge_requests_get_spec_answers() {
    let d = Served::new(&[("v", MIB)]);
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
}

/// A connection reuses its long payload and reply buffers: whatever a buffer held for one
/// request must never show in another's reply. Data, then holes in the same-sized buffer (as one
/// chunk with DF, and with simple replies), then differing payloads of the same length.
#[test]
fn reused_buffers_never_carry_one_request_into_another() {
    let d = Served::new(&[("v", 16 * MIB)]);
    let script = r#"
import nbd
h.set_strict_mode(0)
M = 1 << 20
for i in range(4):
    h.pwrite(bytes([0x10 + i]) * M, i * M)
for i in range(4):
    assert h.pread(M, i * M) == bytes([0x10 + i]) * M, f"data at {i} MiB"
    assert h.pread(M, 8 * M, nbd.CMD_FLAG_DF) == bytes(M), "a hole after data (DF)"
    assert h.pread(M, 8 * M) == bytes(M), "a hole after data"
half = h.pread(M, 3 * M + M // 2, nbd.CMD_FLAG_DF)
assert half == bytes([0x13]) * (M // 2) + bytes(M // 2), "half data, half hole (DF)"
print("ok")
"#;
    for structured in ["True", "False"] {
        let script = format!(
            "h.set_request_structured_replies({structured})\nh.connect_uri({:?})\n{script}",
            d.uri("v")
        );
        let out = output("/usr/bin/python3", &["-m", "nbd", "-c", &script]);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && text.contains("ok"),
            "structured replies {structured}: {text}"
        );
    }
    d.fsck_clean();
}

#[test]
fn tcp_with_tls_serves_qemu_and_refuses_plain_clients() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (srv, cli) = cairn_test_peers::tls::make_certs(certs.path());
    let (cert, key) = (srv.join("server-cert.pem"), srv.join("server-key.pem"));
    let config = ServerConfig {
        tls: Some(cairn_nbd::tls::server_config(&cert, &key).expect("TLS config")),
        ..ServerConfig::default()
    };
    let d = Served::with(&[("v", 16 * MIB)], config, true);
    let port = d.tcp.expect("a TCP port").port();
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
    // A key that does not match the certificate is a clear error.
    let e = cairn_nbd::tls::server_config(&cert, &cert).expect_err("a certificate is no key");
    assert!(e.to_string().contains("private key"), "{e}");
}
