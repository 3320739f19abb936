//! Helpers shared by the CLI's integration tests: a fresh store, running `cairn`, and a running
//! `cairn serve` daemon.
#![allow(dead_code)]

pub mod backups;
pub mod guest;
pub mod nbd_client;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Env {
    pub store: PathBuf,
    pub work: PathBuf,
    /// Declared before the temporary directory so it stops before the directory goes.
    pub daemon: Option<Daemon>,
    _tmp: tempfile::TempDir,
}

/// A fresh, initialised store with no daemon.
pub fn env() -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = Env {
        store: tmp.path().join("store"),
        work: tmp.path().to_path_buf(),
        daemon: None,
        _tmp: tmp,
    };
    ok(&e, &["init"]);
    e
}

/// A fresh, initialised store at `store` (which the caller cleans up), with a work directory
/// of its own.
pub fn env_at(store: PathBuf) -> Env {
    let tmp = tempfile::tempdir().expect("tempdir");
    let e = Env {
        store,
        work: tmp.path().to_path_buf(),
        daemon: None,
        _tmp: tmp,
    };
    ok(&e, &["init"]);
    e
}

/// A fresh store owned by a running daemon: every command goes through its control API.
pub fn env_with_daemon() -> Env {
    let mut e = env();
    e.daemon = Some(Daemon::start(&e));
    e
}

/// `cairn --store STORE args`, not started yet.
pub fn command(e: &Env, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
    c.arg("--store")
        .arg(&e.store)
        .args(args)
        .env_remove("CAIRN_STORE");
    c
}

/// `len` bytes of `src` (a volume or `VOLUME@CHECKPOINT`) from `off`, read through the CLI.
pub fn read_target(e: &Env, src: &str, off: u64, len: u64) -> Vec<u8> {
    let o = cairn(
        e,
        &[
            "volume",
            "read",
            src,
            "--offset",
            &off.to_string(),
            "--length",
            &len.to_string(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

pub fn cairn(e: &Env, args: &[&str]) -> Output {
    command(e, args).output().expect("run cairn")
}

/// Runs a command that must succeed; returns its stdout.
pub fn ok(e: &Env, args: &[&str]) -> String {
    let o = cairn(e, args);
    assert!(
        o.status.success(),
        "cairn {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must fail with a one-line error containing `want`, and no panic.
pub fn fails(e: &Env, args: &[&str], want: &str) {
    let o = cairn(e, args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "cairn {args:?} should fail");
    assert!(!err.contains("panicked"), "cairn {args:?} panicked: {err}");
    assert!(
        err.contains(want),
        "cairn {args:?}: expected '{want}' in: {err}"
    );
    assert_eq!(
        err.trim_end().lines().count(),
        1,
        "error should be one line: {err}"
    );
    // With --json, the same failure is a JSON object on stdout and nothing on stderr.
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = cairn(e, &a);
    assert!(!o.status.success(), "cairn {a:?} should fail");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|_| {
        panic!(
            "cairn {a:?}: stdout is not a JSON error: {}",
            String::from_utf8_lossy(&o.stdout)
        )
    });
    let message = v["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains(want), "cairn {a:?}: {v}");
    assert!(v["error"]["kind"].is_string(), "cairn {a:?}: {v}");
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Runs a command that must fail with `--json`; returns the error's kind.
pub fn fails_json(e: &Env, args: &[&str]) -> String {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    let o = cairn(e, &a);
    assert!(!o.status.success(), "cairn {a:?} should fail");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("a JSON error");
    v["error"]["kind"].as_str().expect("kind").to_string()
}

pub fn json(e: &Env, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--json"];
    a.extend_from_slice(args);
    serde_json::from_str(&ok(e, &a)).expect("valid JSON")
}

/// What `checkpoint list TARGET --json` lists, for a volume or a VM.
pub fn checkpoints(e: &Env, target: &str) -> Vec<serde_json::Value> {
    let list = json(e, &["checkpoint", "list", target]);
    let arr = list["checkpoints"].as_array().or(list.as_array()).cloned();
    arr.unwrap_or_default()
}

/// The names of `target`'s checkpoints, in listing order.
pub fn checkpoint_names(e: &Env, target: &str) -> Vec<String> {
    checkpoints(e, target)
        .iter()
        .filter_map(|c| c["name"].as_str().map(str::to_string))
        .collect()
}

pub fn fsck_clean(e: &Env) {
    let out = ok(e, &["fsck"]);
    assert!(out.contains("no problems"), "fsck: {out}");
}

/// A running `cairn serve`; killed on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    store: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    log: PathBuf,
}

impl Daemon {
    pub fn start(e: &Env) -> Daemon {
        Self::start_with(e, &[])
    }

    pub fn start_with(e: &Env, extra: &[&str]) -> Daemon {
        Self::start_env(e, extra, &[])
    }

    pub fn start_env(e: &Env, extra: &[&str], envs: &[(&str, &str)]) -> Daemon {
        let log = e.work.join(format!("serve-{}.log", unique()));
        let child = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .arg("--store")
            .arg(&e.store)
            .arg("serve")
            .args(extra)
            .envs(envs.iter().copied())
            .env_remove("CAIRN_STORE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn cairn serve");
        let mut d = Daemon {
            child: Some(child),
            store: e.store.clone(),
            socket: e.store.join("nbd.sock"),
            control: e.store.join("control.sock"),
            log,
        };
        let t = Instant::now();
        // The control socket is bound last, so once it answers everything does.
        while UnixStream::connect(&d.control).is_err() {
            if let Some(Ok(Some(st))) = d.child.as_mut().map(|c| c.try_wait()) {
                panic!("daemon exited with {st}: {}", d.log());
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "daemon did not start: {}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends `sig` (e.g. "-TERM") and waits for the exit.
    pub fn signal(&mut self, sig: &str) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        Command::new("kill")
            .args([sig, &child.id().to_string()])
            .status()
            .expect("kill");
        child.wait().expect("wait")
    }
}

/// Kills the QEMUs a stopped daemon left running in `store` (a daemon leaves VMs running when it
/// stops), so that no test leaves a guest behind.
pub fn kill_left_vms(store: &Path) {
    let Ok(dirs) = std::fs::read_dir(store.join("vms")) else {
        return;
    };
    for d in dirs.flatten() {
        let Ok(text) = std::fs::read(d.path().join("run.json")) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&text) else {
            continue;
        };
        let pid = v["pid"].as_u64().unwrap_or(0);
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid > 0 && String::from_utf8_lossy(&cmdline).contains(&*store.to_string_lossy()) {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.is_some() {
            let st = self.signal("-TERM");
            kill_left_vms(&self.store);
            // Only assert when not already unwinding from another failure.
            if !std::thread::panicking() {
                assert!(
                    st.success(),
                    "daemon exit after SIGTERM: {st}\n{}",
                    self.log()
                );
            }
        }
    }
}

fn unique() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// Not every test binary runs peer tools.
#[allow(unused_imports)]
pub use cairn_test_peers::{output, run};

/// `len` bytes that no compressor shrinks (xorshift64 from `seed`).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
