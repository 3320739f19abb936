//! `cairn demo`: the VM story in under a minute. A store of its own, `cairn serve`, the test guest
//! (scripts/build-guest.sh) booted on a Cairn volume, a standard checkpoint while it runs, its
//! disk broken, the checkpoint applied, and the guest running again with its disk and its counter
//! back; then the checkpoint tree and the space each checkpoint holds. Everything goes through
//! the same operations as every other command; the store, the daemon and QEMU it started are
//! cleaned up at the end (`--keep` keeps the store).

use anyhow::{bail, Context, Result};
use cairn_control::ops::VmDefinition;
use cairn_control::{Op, Reply};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::checkpoint::CheckpointCmd;
use crate::output::outln;

/// Where the test guest is: `CAIRN_GUEST_DIR`, else `target/guest` here or beside the binary's
/// build directory.
fn guest_dir() -> Result<PathBuf> {
    let mut tries = Vec::new();
    if let Ok(d) = std::env::var("CAIRN_GUEST_DIR") {
        tries.push(PathBuf::from(d));
    }
    tries.push(PathBuf::from("target/guest"));
    if let Ok(exe) = std::env::current_exe() {
        if let Some(target) = exe.parent().and_then(Path::parent) {
            tries.push(target.join("guest"));
        }
    }
    for d in &tries {
        if d.join("vmlinuz").exists() && d.join("initrd.img").exists() {
            return Ok(std::fs::canonicalize(d)?);
        }
    }
    bail!("the test guest is missing; ./scripts/demo.sh builds it (scripts/build-guest.sh), or set CAIRN_GUEST_DIR")
}

/// The demo's store and daemon; dropping it stops the VM and the daemon and removes the store.
struct Stage {
    dir: PathBuf,
    daemon: Option<Child>,
    keep: bool,
}

impl Stage {
    fn start(keep: bool) -> Result<Stage> {
        let dir = std::env::temp_dir().join(format!("cairn-demo-{}", std::process::id()));
        let mut stage = Stage {
            dir: dir.clone(),
            daemon: None,
            keep,
        };
        cairn_control::Service::init(&dir, crate::store_options())?;
        let log = std::fs::File::create(dir.join("serve.log"))?;
        let child = Command::new(std::env::current_exe()?)
            .arg("--store")
            .arg(&dir)
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting cairn serve")?;
        stage.daemon = Some(child);
        let control = cairn_control::control_socket(&dir);
        let t = Instant::now();
        while std::os::unix::net::UnixStream::connect(&control).is_err() {
            if t.elapsed() > Duration::from_secs(20) {
                bail!(
                    "cairn serve did not start; see {}",
                    dir.join("serve.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(stage)
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("vms/web/console.log")).unwrap_or_default()
    }

    /// The last counter the guest printed after the console's first `from` bytes.
    fn counter_after(&self, from: usize) -> Option<u64> {
        let log = self.console();
        log.get(from.min(log.len())..)?
            .lines()
            .rev()
            .filter_map(|l| l.strip_prefix("cairn-counter "))
            .find_map(|n| n.trim().parse().ok())
    }

    /// The first counter the guest prints after the console's first `from` bytes.
    fn first_counter_after(&self, from: usize) -> Result<u64> {
        let t = Instant::now();
        loop {
            let log = self.console();
            let first = log
                .get(from.min(log.len())..)
                .and_then(|l| {
                    l.lines()
                        .filter_map(|l| l.strip_prefix("cairn-counter "))
                        .next()
                })
                .and_then(|n| n.trim().parse().ok());
            if let Some(c) = first {
                return Ok(c);
            }
            if t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "the guest did not run again; its console is in {}",
                    self.dir.join("vms/web/console.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until the guest prints a counter of at least `n` after `from` bytes of console.
    fn wait_counter(&self, from: usize, n: u64) -> Result<u64> {
        let t = Instant::now();
        loop {
            if let Some(c) = self.counter_after(from).filter(|&c| c >= n) {
                return Ok(c);
            }
            if t.elapsed() > Duration::from_secs(120) {
                bail!(
                    "the guest stopped counting; its console is in {}",
                    self.dir.join("vms/web/console.log").display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Stage {
    fn drop(&mut self) {
        if let Ok(b) = Backend::open(&self.dir) {
            let _ = b.call(Op::VmKill { name: "web".into() });
        }
        if let Some(mut d) = self.daemon.take() {
            let _ = Command::new("kill").arg(d.id().to_string()).status();
            let _ = d.wait();
        }
        if self.keep {
            outln!("kept the store: cairn --store {} ...", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// The counter the guest last wrote to block 0 of its disk (or of a checkpoint of it).
fn disk_counter(store: &Backend, target: &str) -> Result<String> {
    let b = store.bytes(Op::VolumeRead {
        target: target.into(),
        offset: 0,
        length: 22,
    })?;
    let text = String::from_utf8_lossy(&b)
        .trim_matches('\0')
        .trim()
        .to_string();
    Ok(if text.is_empty() {
        "zeros".into()
    } else {
        format!("\"{text}\"")
    })
}

pub fn run(keep: bool) -> Result<()> {
    let t0 = Instant::now();
    let guest = guest_dir()?;
    let stage = Stage::start(keep)?;
    let step = |what: &str| outln!("\n[{:>4.1} s] {what}", t0.elapsed().as_secs_f64());
    step(&format!(
        "a new store in {}, served by `cairn serve`",
        stage.dir.display()
    ));
    let store = Backend::open(&stage.dir)?;
    store.volume(Op::VolumeCreate {
        name: "web-disk".into(),
        size: 256 << 20,
    })?;
    store.call(Op::VmCreate(VmDefinition {
        name: "web".into(),
        memory: Some(256 << 20),
        cpus: Some(1),
        disks: Some(vec!["web-disk".into()]),
        kernel: Some(guest.join("vmlinuz")),
        initrd: Some(guest.join("initrd.img")),
        append: Some("console=ttyS0 rdinit=/init quiet".into()),
        ..VmDefinition::default()
    }))?;
    outln!("  VM 'web': 256 MiB of RAM, its disk the Cairn volume 'web-disk' (256 MiB, nothing allocated yet)");
    let Reply::VmStatus(st) = store.call(Op::VmStart { name: "web".into() })? else {
        bail!("unexpected reply to vm start");
    };
    outln!("  started on {}", st.accel.as_deref().unwrap_or("QEMU"));
    step(
        "booting the test guest: it counts every second, on its console and in block 0 of its disk",
    );
    let up = stage.wait_counter(0, 3)?;
    outln!("  the guest is up and counting: {up}");

    step("a standard checkpoint, web@before: disks, memory and devices, taken while it runs");
    let Reply::VmCheckpoint(_) = store.call(Op::CheckpointCreate {
        volume: "web".into(),
        name: Some("before".into()),
        description: Some("the demo's known good state".into()),
        disk_only: false,
        quiesce: false,
        automatic: false,
    })?
    else {
        bail!("unexpected reply to checkpoint create");
    };
    let at = disk_counter(&store, "web-disk@before")?;
    let record = std::fs::read(stage.dir.join("vms/web/checkpoints/before.json"))?;
    let record: serde_json::Value = serde_json::from_slice(&record)?;
    let paused = record["timings"]["paused_us"].as_f64().unwrap_or(0.0) / 1000.0;
    outln!("  the guest was paused {paused:.1} ms; the checkpoint's disk holds {at}");
    let later = stage.wait_counter(0, up + 4)?;
    outln!("  the guest counts on: {later}");

    step("breaking the guest's disk: 1 MiB of zeros over its start, behind its back");
    store.done(Op::VolumeWrite {
        name: "web-disk".into(),
        offset: 0,
        data: vec![0; 1 << 20],
    })?;
    outln!(
        "  block 0 of web-disk now reads {}",
        disk_counter(&store, "web-disk")?
    );

    step("applying web@before: the disk and the running guest go back to that instant");
    let Reply::Applied(r) = store.call(Op::CheckpointApply {
        volume: "web".into(),
        name: "before".into(),
        save_current: Some("broken".into()),
        discard_current: false,
        force: false,
    })?
    else {
        bail!("unexpected reply to checkpoint apply");
    };
    // The apply returns once the guest runs again from the checkpoint's memory.
    let mark = stage.console().len();
    let resumed = stage.first_counter_after(mark)?;
    outln!(
        "  the guest runs again without a reboot, counting from {resumed} (it was at {later}); the broken state is kept as web@{}",
        r.saved_as.as_deref().unwrap_or("?")
    );
    outln!(
        "  block 0 of web-disk: {} (no longer zeros: the guest writes on from the checkpoint)",
        disk_counter(&store, "web-disk")?
    );

    step("the checkpoint tree (`cairn checkpoint list web --tree`)");
    crate::checkpoint::run(
        &store,
        CheckpointCmd::List {
            name: "web".into(),
            tree: true,
        },
        false,
        true,
    )?;
    step("the space each checkpoint holds (`cairn space web`)");
    crate::space::run(&store, Some("web".into()), false)?;
    step(&format!(
        "done in {:.0} s; stopping the VM and the daemon{}",
        t0.elapsed().as_secs_f64(),
        if keep { "" } else { ", removing the store" }
    ));
    drop(stage);
    Ok(())
}
