//! Acknowledged writes reach the disk within seconds without a flush: a client writes 8 MiB and
//! never flushes, the daemon is killed with SIGKILL 3.5 s later, and a new daemon serves every
//! byte.

mod common;

use std::time::Duration;

use common::nbd_client::nbdsh;
use common::*;

#[test]
fn unflushed_writes_survive_a_kill_after_the_commit_interval() {
    let mut e = env();
    ok(&e, &["volume", "create", "v", "--size", "16M"]);
    let d = Daemon::start(&e);
    // 4 MiB in 64 KiB writes, 4 MiB in 4 KiB writes, then it waits, connected, never flushing.
    let script = r#"
import sys
data = bytes((i * 7) % 251 for i in range(8 << 20))
for off in range(0, 4 << 20, 65536):
    h.pwrite(data[off:off + 65536], off)
for off in range(4 << 20, 8 << 20, 4096):
    h.pwrite(data[off:off + 4096], off)
print("written", flush=True)
sys.stdin.readline()
"#;
    let (mut client, _out, line) = nbdsh(&d.uri("v"), script);
    assert_eq!(line.trim(), "written");
    std::thread::sleep(Duration::from_millis(3500));
    let mut d = d;
    d.signal("-KILL");
    let _ = client.kill();
    let _ = client.wait();
    e.daemon = Some(Daemon::start(&e));
    let got = cairn(
        &e,
        &["volume", "read", "v", "--offset", "0", "--length", "8M"],
    )
    .stdout;
    let want: Vec<u8> = (0..8usize << 20).map(|i| ((i * 7) % 251) as u8).collect();
    let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first_bad.is_none(),
        "lost after the kill: first differing byte {first_bad:?} of {}",
        got.len()
    );
    fsck_clean(&e);
}
