//! `cairn serve`'s NBD server when clients misbehave or the daemon is stopped: malformed input
//! from a hand-written client gets the spec's error and disturbs nobody, SIGTERM closes cleanly
//! and SIGKILL keeps what was flushed, a checkpoint taken under a writing client is consistent,
//! and applying a checkpoint under a connected client is refused unless forced.
#![allow(missing_docs)]

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_nbd::proto::*;

mod common;
use common::nbd_client::{nbdsh, Raw};
use common::*;

#[test]
fn bad_input_gets_the_spec_error_and_disturbs_nobody() {
    let e = env();
    ok(&e, &["volume", "create", "v", "--size", "1M"]);
    ok(&e, &["volume", "create", "other", "--size", "1M"]);
    ok(&e, &["checkpoint", "create", "v@c"]);
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
    let got = ok(
        &e,
        &["volume", "read", "v", "--offset", "4096", "--length", "4"],
    );
    assert_eq!(got, "abcd");
    let got = ok(
        &e,
        &["volume", "read", "v", "--offset", "8192", "--length", "4"],
    );
    assert_eq!(got.as_bytes(), &[0, 0, 0, 0]);
    fsck_clean(&e);
}

#[test]
fn sigterm_closes_cleanly_and_sigkill_keeps_what_was_flushed() {
    let e = env();
    ok(&e, &["volume", "create", "v", "--size", "8M"]);
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
    let got = ok(
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
    ok(&e, &["volume", "create", "v", "--size", "4G"]);
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
    ok(&e, &["checkpoint", "create", "v@mid"]);
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

/// Applying a checkpoint under a connected client would change its disk behind its back: the
/// apply is refused, naming the client, and changes nothing; `--force` disconnects the client
/// first, so its next request fails instead of reading rewound data.
#[test]
fn apply_under_a_connected_client_is_refused_unless_forced() {
    let e = env();
    ok(&e, &["volume", "create", "v", "--size", "1M"]);
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
        ok(&e, &args);
    };
    pattern("0x11");
    ok(&e, &["checkpoint", "create", "v@a"]);
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
    let (mut client, mut out, mut line) = nbdsh(&d.uri("v"), script);
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
