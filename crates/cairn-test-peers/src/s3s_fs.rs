//! `s3s-fs`: an S3 server over a directory, one process; buckets are its subdirectories.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Test credentials every server here accepts.
pub const KEY_ID: &str = "cairntestkey";
/// The secret of [`KEY_ID`].
pub const SECRET: &str = "cairntestsecret0123456789";

/// A running s3s-fs; killed on drop.
pub struct S3Server {
    child: Child,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl S3Server {
    /// Serves `root` with bucket `bucket` on a free port.
    pub fn start(root: &Path, bucket: &str) -> S3Server {
        std::fs::create_dir_all(root.join(bucket)).expect("bucket dir");
        S3Server::on_port(root, crate::free_port())
    }

    /// Serves `root` on `port` (again, after a stop, on the same data).
    pub fn on_port(root: &Path, port: u16) -> S3Server {
        let child = Command::new(crate::cargo_bin("s3s-fs"))
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .args(["--access-key", KEY_ID, "--secret-key", SECRET])
            .arg(root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("s3s-fs runs (scripts/setup-tests.sh installs it)");
        crate::wait_port(port, "s3s-fs");
        S3Server { child, port }
    }

    /// Its endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}
