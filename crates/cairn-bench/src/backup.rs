//! Backups against restic and borg, on the same data in the same run: a volume image of what
//! disks hold (half random, a quarter zeros, a quarter text, in 1 MiB runs), backed up in full,
//! then again after 1% of its 4 KiB blocks changed at scattered places, then restored to a file.
//! Every tool runs as its users run it (one process per command, from its own CLI), each round
//! into fresh repositories, rounds alternating the tools; the table holds medians. Cairn
//! encrypts (its default), restic always does, borg runs unencrypted with its default lz4.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cairn_engine::{Options, Store};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::median;

const MIB: u64 = 1 << 20;
const PASS: &str = "bench passphrase";

/// One tool's figures in one round.
#[derive(Debug, Clone, Copy, Default)]
struct Round {
    full_s: f64,
    /// CPU seconds of Cairn and of the S3 server (if any) during the full backup.
    full_cpu: (f64, f64),
    /// The same during the restore.
    restore_cpu: (f64, f64),
    repo_full: u64,
    inc_s: f64,
    growth: u64,
    restore_s: f64,
    peak_rss_kib: u64,
}

/// Bytes under `dir`.
pub(crate) fn du(dir: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => n += du(&e.path()),
                Ok(m) => n += m.len(),
                Err(_) => {}
            }
        }
    }
    n
}

/// Runs a command to completion; returns seconds taken.
fn timed(cmd: &mut Command, what: &str) -> Result<f64> {
    Ok(measured(cmd, what)?.0)
}

/// CPU seconds process `pid` has used so far (user and system), from `/proc/PID/stat`.
fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / rustix::param::clock_ticks_per_second() as f64)
}

/// [`measured`], plus the CPU seconds the command used (sampled with its memory, so up to 10 ms
/// short) and those process `server` used meanwhile (0 without one).
fn measured_cpu(
    cmd: &mut Command,
    what: &str,
    server: Option<u32>,
) -> Result<(f64, u64, (f64, f64))> {
    let before = server.and_then(cpu_secs).unwrap_or(0.0);
    let mut own = 0.0;
    let (secs, peak) = measured_with(cmd, what, &mut |pid| {
        own = cpu_secs(pid).unwrap_or(own);
    })?;
    let used = server
        .and_then(cpu_secs)
        .map_or(0.0, |after| after - before);
    Ok((secs, peak, (own, used)))
}

/// Runs a command to completion; returns seconds taken and its peak anonymous resident memory in
/// KiB, sampled every 10 ms (file pages are left out: Cairn reads volumes through a mapping of
/// the store's data file, and those pages are the host's page cache, shared and reclaimable).
pub(crate) fn measured(cmd: &mut Command, what: &str) -> Result<(f64, u64)> {
    measured_with(cmd, what, &mut |_| {})
}

/// [`measured`], calling `sample` with the process id at every memory sample.
fn measured_with(cmd: &mut Command, what: &str, sample: &mut dyn FnMut(u32)) -> Result<(f64, u64)> {
    let t = Instant::now();
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {what}; scripts/setup-tests.sh installs it"))?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak = 0;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if let Ok(text) = std::fs::read_to_string(&status_file) {
            let anon = text
                .lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak = peak.max(anon.unwrap_or(0));
        }
        sample(child.id());
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let secs = t.elapsed().as_secs_f64();
    let err = reader.join().unwrap_or_default();
    if !status.success() {
        bail!(
            "{what} failed: {}",
            err.lines().last().unwrap_or("no message")
        );
    }
    Ok((secs, peak))
}

/// Writes the image: 1 MiB runs of random, zero or text data.
fn make_image(path: &Path, size: u64) -> Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = StdRng::seed_from_u64(7);
    let text: Vec<u8> =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor. "
            .iter()
            .cycle()
            .take(MIB as usize)
            .copied()
            .collect();
    let mut buf = vec![0u8; MIB as usize];
    for i in 0..size / MIB {
        match rng.random_range(0..4u32) {
            0 | 1 => {
                rng.fill(&mut buf[..]);
                f.write_all(&buf)?;
            }
            2 => f.write_all(&vec![0u8; MIB as usize])?,
            _ => {
                // Text that is not all the same 1 MiB, so it does not dedup away.
                let mut t = text.clone();
                t[..8].copy_from_slice(&i.to_le_bytes());
                f.write_all(&t)?;
            }
        }
    }
    f.flush()?;
    Ok(())
}

/// Picks 1% of the image's 4 KiB blocks at random and the bytes each gets.
fn changes(size: u64, seed: u64) -> Vec<(u64, [u8; 4096])> {
    let mut rng = StdRng::seed_from_u64(seed);
    let blocks = size / 4096;
    let mut picked: Vec<u64> = (0..blocks / 100)
        .map(|_| rng.random_range(0..blocks))
        .collect();
    picked.sort_unstable();
    picked.dedup();
    picked
        .into_iter()
        .map(|b| {
            let mut d = [0u8; 4096];
            rng.fill(&mut d[..]);
            (b * 4096, d)
        })
        .collect()
}

fn apply_to_file(path: &Path, ch: &[(u64, [u8; 4096])]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    for (off, d) in ch {
        f.write_all_at(d, *off)?;
    }
    f.sync_all()?;
    Ok(())
}

/// Loads the image into a volume of a new store (zero runs stay holes, as `volume import` leaves
/// them) and takes checkpoint `full`.
fn load_store(store: &Path, image: &Path, size: u64, options: &Options) -> Result<()> {
    use std::io::Read;
    Store::init(store, options.clone())?;
    let s = Store::open(store, options.clone())?;
    s.create_volume("disk", size)?;
    let mut f = std::fs::File::open(image)?;
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut off = 0;
    while off < size {
        f.read_exact(&mut buf)?;
        for (i, c) in buf.chunks(MIB as usize).enumerate() {
            if c.iter().any(|&b| b != 0) {
                s.write("disk", off + i as u64 * MIB, c)?;
            }
        }
        off += buf.len() as u64;
    }
    s.create_checkpoint("disk", "full", None)?;
    s.flush()?;
    Ok(())
}

/// Where Cairn's backups of a round go: a directory, or a prefix on an S3 server.
struct CairnRepo {
    /// `--repo` value.
    arg: String,
    /// More flags (the S3 endpoint).
    flags: Vec<String>,
    /// Environment (S3 credentials).
    env: Vec<(String, String)>,
    /// Whose size is the repository's (a local repository's directory).
    disk: Option<PathBuf>,
    /// The S3 server's process, whose CPU time is counted.
    server: Option<u32>,
}

/// `cairn --store STORE ARGS` with the benchmark's passphrase.
pub(crate) fn cairn_command(store: &Path, args: &[&str]) -> Result<Command> {
    let mut c = Command::new(crate::cairn_exe()?);
    c.arg("--store")
        .arg(store)
        .args(args)
        .env("CAIRN_BACKUP_PASSPHRASE", PASS);
    Ok(c)
}

fn cairn(store: &Path, repo: &CairnRepo, args: &[&str]) -> Result<Command> {
    let mut c = Command::new(crate::cairn_exe()?);
    c.arg("--store")
        .arg(store)
        .args(args)
        .arg("--repo")
        .arg(&repo.arg)
        .args(&repo.flags)
        .env("CAIRN_BACKUP_PASSPHRASE", PASS)
        .envs(repo.env.iter().map(|(k, v)| (k, v)));
    Ok(c)
}

fn round_cairn(
    store: &Path,
    ch: &[(u64, [u8; 4096])],
    tag: &str,
    repo: &CairnRepo,
    out: &Path,
) -> Result<Round> {
    let size = |r: &CairnRepo| r.disk.as_deref().map_or(0, du);
    let init = repo.arg.clone();
    let mut c = Command::new(crate::cairn_exe()?);
    c.arg("--store")
        .arg(store)
        .args(["backup", "init", &init])
        .args(&repo.flags)
        .env("CAIRN_BACKUP_PASSPHRASE", PASS)
        .envs(repo.env.iter().map(|(k, v)| (k, v)));
    timed(&mut c, "cairn backup init")?;
    let (full_s, peak_rss_kib, full_cpu) = measured_cpu(
        &mut cairn(store, repo, &["backup", "create", "disk@full"])?,
        "cairn backup create",
        repo.server,
    )?;
    let mut r = Round {
        full_s,
        full_cpu,
        peak_rss_kib,
        ..Round::default()
    };
    r.repo_full = size(repo);
    {
        let s = Store::open(store, Options::default())?;
        for (off, d) in ch {
            s.write("disk", *off, d)?;
        }
        s.create_checkpoint("disk", tag, None)?;
        s.flush()?;
    }
    let target = format!("disk@{tag}");
    r.inc_s = timed(
        &mut cairn(store, repo, &["backup", "create", &target])?,
        "cairn backup create",
    )?;
    r.growth = size(repo) - r.repo_full;
    let list = cairn(store, repo, &["--json", "backup", "list"])?.output()?;
    let v: serde_json::Value = serde_json::from_slice(&list.stdout)?;
    let id = v
        .as_array()
        .and_then(|a| a.last())
        .and_then(|b| b["id"].as_str())
        .context("a backup id")?
        .to_string();
    let out_s = out.to_str().context("utf-8")?;
    (r.restore_s, _, r.restore_cpu) = measured_cpu(
        &mut cairn(
            store,
            repo,
            &["--yes", "backup", "restore", &id, "--to-file", out_s],
        )?,
        "cairn backup restore",
        repo.server,
    )?;
    std::fs::remove_file(out)?;
    if let Some(d) = &repo.disk {
        std::fs::remove_dir_all(d)?;
    }
    Ok(r)
}

/// The steps of a file-based peer's round, each as the command that does it.
enum Step {
    Init,
    Full,
    Incremental,
    /// Restore the latest backup into this directory.
    Restore(PathBuf),
}

/// A round of a peer that backs up the image file: init, full backup, the change, incremental,
/// restore; `command` makes each step's command.
fn round_peer(
    dir: &Path,
    name: &str,
    image: &Path,
    ch: &[(u64, [u8; 4096])],
    repo: &Path,
    command: &dyn Fn(Step) -> Command,
) -> Result<Round> {
    timed(&mut command(Step::Init), &format!("{name} init"))?;
    let (full_s, peak_rss_kib) = measured(&mut command(Step::Full), &format!("{name} backup"))?;
    let mut r = Round {
        full_s,
        peak_rss_kib,
        ..Round::default()
    };
    r.repo_full = du(repo);
    apply_to_file(image, ch)?;
    r.inc_s = timed(&mut command(Step::Incremental), &format!("{name} backup"))?;
    r.growth = du(repo) - r.repo_full;
    let target = dir.join(format!("{name}-restore"));
    std::fs::create_dir_all(&target)?;
    r.restore_s = timed(
        &mut command(Step::Restore(target.clone())),
        &format!("{name} restore"),
    )?;
    std::fs::remove_dir_all(&target)?;
    std::fs::remove_dir_all(repo)?;
    Ok(r)
}

fn round_restic(dir: &Path, image: &Path, ch: &[(u64, [u8; 4096])]) -> Result<Round> {
    let repo = dir.join("restic-repo");
    let command = |step: Step| {
        let mut c = Command::new("restic");
        c.arg("--repo")
            .arg(&repo)
            .arg("--quiet")
            .env("RESTIC_PASSWORD", PASS)
            .env("RESTIC_CACHE_DIR", dir.join("restic-cache"));
        match step {
            Step::Init => c.arg("init"),
            Step::Full | Step::Incremental => c.arg("backup").arg(image),
            Step::Restore(to) => c.args(["restore", "latest", "--target"]).arg(to),
        };
        c
    };
    round_peer(dir, "restic", image, ch, &repo, &command)
}

fn round_borg(dir: &Path, image: &Path, ch: &[(u64, [u8; 4096])]) -> Result<Round> {
    let repo = dir.join("borg-repo");
    let repo_s = repo.to_str().context("utf-8")?.to_string();
    let command = |step: Step| {
        let mut c = Command::new("borg");
        c.env("BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK", "yes")
            .env("BORG_BASE_DIR", dir.join("borg-home"))
            .env("BORG_RELOCATED_REPO_ACCESS_IS_OK", "yes");
        match step {
            Step::Init => c.args(["init", "-e", "none", &repo_s]),
            Step::Full => c.args(["create", &format!("{repo_s}::full")]).arg(image),
            Step::Incremental => c.args(["create", &format!("{repo_s}::inc")]).arg(image),
            Step::Restore(to) => c
                .current_dir(to)
                .args(["extract", &format!("{repo_s}::inc")]),
        };
        c
    };
    round_peer(dir, "borg", image, ch, &repo, &command)
}

/// Runs the backup benchmark in `dir`; returns the Markdown report.
pub fn run(dir: &Path, quick: bool, options: &Options) -> Result<String> {
    let size = if quick { 256 * MIB } else { 4096 * MIB };
    let rounds = if quick { 1 } else { 3 };
    let started = Instant::now();
    let image = dir.join("image.raw");
    let mut results: Vec<(&str, Vec<Round>)> = vec![
        ("Cairn", vec![]),
        ("restic", vec![]),
        ("borg", vec![]),
        ("Cairn to Garage", vec![]),
    ];
    // A one-node Garage on loopback, for Cairn's backups to S3.
    let garage = cairn_test_peers::garage::Garage::start(&dir.join("garage"), 1);
    let s3 = |round: u64| CairnRepo {
        arg: format!("s3://{}/round{round}", garage.bucket),
        flags: vec![
            "--s3-endpoint".into(),
            format!("http://127.0.0.1:{}", garage.nodes[0].s3_port),
        ],
        env: vec![
            ("AWS_ACCESS_KEY_ID".into(), garage.key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY".into(), garage.secret.clone()),
            ("AWS_REGION".into(), "garage".into()),
        ],
        disk: None,
        server: garage.nodes[0].child.as_ref().map(Child::id),
    };
    let local = |round: u64| {
        let d = dir.join(format!("cairn-repo-{round}"));
        CairnRepo {
            arg: d.display().to_string(),
            flags: vec![],
            env: vec![],
            disk: Some(d),
            server: None,
        }
    };
    let restored = dir.join("cairn-restore.raw");
    let mut changed_bytes = 0;
    for round in 0..rounds {
        eprintln!("bench: backup round {}/{rounds}", round + 1);
        make_image(&image, size)?;
        let ch = changes(size, 100 + round);
        changed_bytes = ch.len() as u64 * 4096;
        let store = dir.join(format!("store-{round}"));
        load_store(&store, &image, size, options)?;
        // Tools in a different order each round.
        for k in 0..4 {
            let which = (k + round as usize) % 4;
            let r = match which {
                0 => round_cairn(
                    &store,
                    &ch,
                    &format!("inc{round}"),
                    &local(round),
                    &restored,
                )?,
                3 => round_cairn(&store, &ch, &format!("s3inc{round}"), &s3(round), &restored)?,
                1 => round_restic(dir, &image, &ch)?,
                _ => {
                    // restic's round changed the image: start borg from the same original.
                    make_image(&image, size)?;
                    round_borg(dir, &image, &ch)?
                }
            };
            if which == 1 {
                make_image(&image, size)?;
            }
            results[which].1.push(r);
        }
        std::fs::remove_dir_all(&store)?;
    }
    let m = |i: usize, f: fn(&Round) -> f64| median(results[i].1.iter().map(f).collect());
    let mib = |b: f64| b / MIB as f64;
    let sz = size as f64;
    let mut out = format!(
        "### Backups: Cairn vs restic and borg ({} MiB image, 1% of 4 KiB blocks changed = {} MiB; medians of {rounds} round(s))\n\n",
        size / MIB,
        changed_bytes / MIB
    );
    out += "| job | Cairn | restic | borg | Cairn vs restic | Cairn vs borg |\n|---|---|---|---|---|---|\n";
    let row = |out: &mut String,
               name: &str,
               f: fn(&Round) -> f64,
               unit: &dyn Fn(f64) -> String,
               lower_better: bool| {
        let (c, r, b) = (m(0, f), m(1, f), m(2, f));
        let ratio = |x: f64| match lower_better {
            true => format!("{:.1}x faster", x / c),
            false => format!("{:.2}", c / x),
        };
        *out += &format!(
            "| {name} | {} | {} | {} | {} | {} |\n",
            unit(c),
            unit(r),
            unit(b),
            ratio(r),
            ratio(b)
        );
    };
    let secs = |s: f64| format!("{s:.2} s ({:.0} MiB/s)", mib(sz) / s);
    let plain_secs = |s: f64| format!("{s:.2} s");
    let mibs = |b: f64| format!("{:.1} MiB", mib(b));
    row(&mut out, "full backup", |r| r.full_s, &secs, true);
    row(
        &mut out,
        "repository after full",
        |r| r.repo_full as f64,
        &mibs,
        false,
    );
    row(
        &mut out,
        "incremental after 1% change",
        |r| r.inc_s,
        &plain_secs,
        true,
    );
    row(
        &mut out,
        "repository growth",
        |r| r.growth as f64,
        &mibs,
        false,
    );
    row(
        &mut out,
        "restore (latest, to a file)",
        |r| r.restore_s,
        &secs,
        true,
    );
    row(
        &mut out,
        "peak anonymous memory, full backup",
        |r| r.peak_rss_kib as f64 * 1024.0,
        &mibs,
        false,
    );
    let growth = |i: usize| m(i, |r| r.growth as f64) / changed_bytes as f64;
    out += &format!(
        "\nRepository growth per changed byte: Cairn {:.2}, restic {:.1}, borg {:.1} (goal: Cairn at most 1.2). Run took {:.0} s.\n",
        growth(0),
        growth(1),
        growth(2),
        started.elapsed().as_secs_f64()
    );
    out += "\n| Cairn's repository | full backup | incremental after 1% change | restore |\n|---|---|---|---|\n";
    for (i, what) in [(0, "local directory"), (3, "Garage, one node on loopback")] {
        out += &format!(
            "| {what} | {} | {} | {} |\n",
            secs(m(i, |r| r.full_s)),
            plain_secs(m(i, |r| r.inc_s)),
            secs(m(i, |r| r.restore_s))
        );
    }
    out += &format!(
        "\nGarage / local: full {:.2}x, incremental {:.2}x, restore {:.2}x the time (goal: within 2x).\n",
        m(3, |r| r.full_s) / m(0, |r| r.full_s),
        m(3, |r| r.inc_s) / m(0, |r| r.inc_s),
        m(3, |r| r.restore_s) / m(0, |r| r.restore_s)
    );
    // What bounds the S3 rows: the two cores Cairn and Garage share.
    let cpu = |i: usize, wall: fn(&Round) -> f64, c: fn(&Round) -> (f64, f64)| {
        let of = |f: &dyn Fn(&Round) -> f64| median(results[i].1.iter().map(f).collect());
        let (w, own, server) = (of(&wall), of(&|r| c(r).0), of(&|r| c(r).1));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "Cairn {own:.1} s + Garage {server:.1} s of CPU in {w:.1} s ({:.0}% of {cores:.0} cores)",
            100.0 * (own + server) / (w * cores)
        )
    };
    out += &format!(
        "CPU time to Garage: full backup {}; restore {}. To the local directory: full backup {}; restore {}.\n",
        cpu(3, |r| r.full_s, |r| r.full_cpu),
        cpu(3, |r| r.restore_s, |r| r.restore_cpu),
        cpu(0, |r| r.full_s, |r| r.full_cpu),
        cpu(0, |r| r.restore_s, |r| r.restore_cpu)
    );
    Ok(out)
}
