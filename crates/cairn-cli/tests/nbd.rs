//! `cairn serve`'s NBD side as the daemon runs it: import and export through it (qcow2, vhdx,
//! vmdk, raw), TLS from the command line, the URI `volume info` gives, and a flush on one
//! connection that makes another's write survive SIGKILL. The protocol against real clients is
//! tested in `cairn-nbd/tests/clients.rs`; misbehaving clients and a stopped daemon in
//! `nbd_faults.rs`.
#![allow(missing_docs)]

use std::process::Command;

use cairn_nbd::proto::*;

mod common;
use common::nbd_client::Raw;
use common::*;

/// Runs cairn; it must succeed.
fn cairn(e: &Env, args: &[&str]) -> String {
    ok(e, args)
}

/// `volume info --json` names the URI clients use to reach a volume through the daemon.
#[test]
fn volume_info_names_the_nbd_uri() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "1M"]);
    let info: serde_json::Value =
        serde_json::from_str(&cairn(&e, &["--json", "volume", "info", "v"])).expect("json");
    assert_eq!(
        info["nbd_uri"],
        format!(
            "nbd+unix:///v?socket={}",
            e.store.join("nbd.sock").display()
        )
    );
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
fn serve_with_tls_serves_qemu_img_and_refuses_a_key_that_does_not_match() {
    let e = env();
    cairn(&e, &["volume", "create", "v", "--size", "16M"]);
    let (srv, cli) = cairn_test_peers::tls::make_certs(&e.work);
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
    // QEMU through TLS (the protocol side is tested in cairn-nbd/tests/clients.rs).
    run(
        "qemu-img",
        &["info", "--object", &object, "--image-opts", &image],
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
