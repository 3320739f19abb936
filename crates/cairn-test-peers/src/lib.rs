//! The real servers Cairn's tests run against, started on 127.0.0.1 by the tests themselves and
//! stopped when dropped: [`s3s_fs`] (a one-process S3 server over a directory) and [`garage`] (a
//! Garage cluster). `scripts/setup-tests.sh` installs both. [`tls`] makes certificates for the
//! TLS tests.

pub mod garage;
pub mod s3s_fs;
pub mod tls;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A tool from `cargo install` (in `~/.cargo/bin`, or on the PATH).
pub(crate) fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var("HOME").unwrap_or_default();
    let p = Path::new(&home).join(".cargo/bin").join(name);
    match p.exists() {
        true => p,
        false => PathBuf::from(name),
    }
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Waits until something listens on `port`.
pub(crate) fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a peer tool (qemu-img, qemu-io, nbdinfo, nbdcopy, openssl...); it must succeed; returns
/// its stdout.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let o = output(cmd, args);
    assert!(
        o.status.success(),
        "{cmd} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a peer tool and returns what happened.
pub fn output(cmd: &str, args: &[&str]) -> Output {
    Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd} is installed by scripts/setup-tests.sh: {e}"))
}
