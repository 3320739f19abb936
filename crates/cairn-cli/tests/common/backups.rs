//! Volumes, data and repositories for the backup tests.

use super::*;

/// Reads a whole volume (or checkpoint) through the CLI.
pub fn contents(e: &Env, target: &str, len: u64) -> Vec<u8> {
    read_target(e, target, 0, len)
}

/// Bytes that compress but do not repeat: `len` of them from the multiplier `mul`.
pub fn data(len: u32, mul: u32, shift: u32) -> Vec<u8> {
    (0..len)
        .map(|i| (i.wrapping_mul(mul) >> shift) as u8)
        .collect()
}

/// Writes `bytes` into `volume` at `offset` from a file, as a user would.
pub fn write_from(e: &Env, volume: &str, offset: &str, bytes: &[u8]) {
    let f = e.work.join(format!("{volume}-{offset}.bin"));
    std::fs::write(&f, bytes).expect("data file");
    let from = f.to_str().expect("utf8");
    ok(
        e,
        &[
            "volume", "write", volume, "--offset", offset, "--from", from,
        ],
    );
}

/// Volume `vol` of `size` holding `bytes` from offset 0, its checkpoint `vol@a`, and an
/// initialised encrypted repository.
pub fn volume_and_repo(e: &Env, vol: &str, size: &str, bytes: &[u8]) -> Repo {
    let r = repo(e);
    ok(e, &["volume", "create", vol, "--size", size]);
    write_from(e, vol, "0", bytes);
    ok(e, &["checkpoint", "create", &format!("{vol}@a")]);
    ok(e, &["backup", "init", &r.dir, "--key-file", &r.key]);
    r
}

pub struct Repo {
    pub dir: String,
    pub key: String,
}

pub fn repo(e: &Env) -> Repo {
    let key = e.work.join("key");
    std::fs::write(&key, "correct horse battery staple\n").expect("key file");
    Repo {
        dir: e.work.join("repo").display().to_string(),
        key: key.display().to_string(),
    }
}
