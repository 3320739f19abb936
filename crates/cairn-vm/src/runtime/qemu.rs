//! Finding QEMU (and checking its version), choosing an accelerator, and building a VM's QEMU
//! command line.

use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;

/// Oldest QEMU Cairn drives (`mapped-ram` migration streams appeared in 9.0).
pub const MIN_QEMU: (u32, u32) = (9, 0);

/// The QEMU binary found on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qemu {
    /// Program to run.
    pub program: PathBuf,
    /// Version (major, minor, micro).
    pub version: (u32, u32, u32),
}

/// Finds `qemu-system-x86_64` (or `$CAIRN_QEMU`) and checks its version.
pub fn find_qemu() -> Result<Qemu, VmError> {
    let program = std::env::var_os("CAIRN_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"));
    let out = std::process::Command::new(&program)
        .arg("--version")
        .output()
        .map_err(|e| {
            VmError::Qemu(format!(
                "cannot run {} ({e}); install QEMU with ./scripts/setup-qemu.sh (Debian: qemu-system-x86 from bookworm-backports)",
                program.display()
            ))
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .split("version ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .map(|v| {
            let mut n = v.split('.').map(|x| x.parse::<u32>().unwrap_or(0));
            (
                n.next().unwrap_or(0),
                n.next().unwrap_or(0),
                n.next().unwrap_or(0),
            )
        })
        .ok_or_else(|| {
            VmError::Qemu(format!(
                "cannot read the version of {}: {text}",
                program.display()
            ))
        })?;
    if (version.0, version.1) < MIN_QEMU {
        return Err(VmError::Qemu(format!(
            "{} is QEMU {}.{}.{}; Cairn needs {}.{} or newer (./scripts/setup-qemu.sh installs 10.x)",
            program.display(),
            version.0,
            version.1,
            version.2,
            MIN_QEMU.0,
            MIN_QEMU.1
        )));
    }
    Ok(Qemu { program, version })
}

/// The accelerator to use and why: KVM when `/dev/kvm` opens and is not PVM-based nested
/// virtualization (which cannot run stock guests), TCG otherwise. `forced` overrides.
pub fn choose_accel(forced: Option<&str>) -> (String, String) {
    if let Some(a) = forced.or(std::env::var("CAIRN_ACCEL").ok().as_deref()) {
        return (a.to_string(), "chosen explicitly".into());
    }
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm");
    match kvm {
        Err(e) => ("tcg".into(), format!("/dev/kvm unusable ({e})")),
        Ok(_) if Path::new("/sys/module/kvm_pvm").exists() => (
            "tcg".into(),
            "/dev/kvm is PVM nested virtualization, which cannot run stock guests".into(),
        ),
        Ok(_) => ("kvm".into(), "/dev/kvm works".into()),
    }
}

/// QEMU's id for the guest agent's channel.
pub(super) const AGENT_CHARDEV: &str = "qga0";

/// The QEMU command line for a VM (without the program).
pub fn qemu_args(spec: &VmSpec, dir: &Path, nbd_socket: &Path, accel: &str) -> Vec<String> {
    qemu_args_at(spec, dir, nbd_socket, accel, None)
}

/// [`qemu_args`] with the disks attached read-only from checkpoint `at` instead of the heads
/// (for a helper QEMU that must look exactly like the VM at that checkpoint).
pub(super) fn qemu_args_at(
    spec: &VmSpec,
    dir: &Path,
    nbd_socket: &Path,
    accel: &str,
    at: Option<&str>,
) -> Vec<String> {
    let p = |f: &str| dir.join(f).display().to_string();
    let mut a: Vec<String> = vec![
        "-name".into(),
        format!("{},debug-threads=on", spec.name),
        "-accel".into(),
        accel.into(),
        "-machine".into(),
        "q35".into(),
        "-cpu".into(),
        if accel == "kvm" { "host" } else { "max" }.into(),
        "-m".into(),
        format!("{}M", spec.memory >> 20),
        "-smp".into(),
        spec.cpus.to_string(),
        "-uuid".into(),
        spec.uuid.clone(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        // The vAPIC option ROM's state does not load back into a fresh QEMU (see
        // docs/qemu-state-notes.md); without it, saved memory state restores.
        "-global".into(),
        "apic.vapic=off".into(),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", p("qmp.sock")),
        // The serial console: a socket `vm console --attach` connects a terminal to, and a log
        // of everything the guest printed, attached or not (appended across runs).
        "-chardev".into(),
        format!(
            "socket,id=serial0,path={},server=on,wait=off,logfile={},logappend=on",
            p("console.sock"),
            p("console.log")
        ),
        "-serial".into(),
        "chardev:serial0".into(),
        "-pidfile".into(),
        p("qemu.pid"),
        // The guest agent's channel: a virtio-serial port the agent in the guest opens, a unix
        // socket on this side (see guest_agent.rs). Always there, like Hyper-V's integration
        // services, so any guest that runs qemu-guest-agent can be quiesced.
        "-chardev".into(),
        format!(
            "socket,id={AGENT_CHARDEV},path={},server=on,wait=off",
            p("qga.sock")
        ),
        "-device".into(),
        "virtio-serial-pci,id=vser0".into(),
        "-device".into(),
        format!("virtserialport,bus=vser0.0,chardev={AGENT_CHARDEV},name=org.qemu.guest_agent.0"),
    ];
    for (i, vol) in spec.disks.iter().enumerate() {
        let export = match at {
            Some(c) => format!("{vol}@{c}"),
            None => vol.clone(),
        };
        let node = json!({
            "driver": "raw",
            "node-name": format!("disk{i}"),
            "read-only": at.is_some(),
            "file": {
                "driver": "nbd",
                "node-name": format!("nbd{i}"),
                "read-only": at.is_some(),
                "server": { "type": "unix", "path": nbd_socket },
                "export": export,
                // A daemon restarting leaves QEMU running (see reattach.rs): requests wait for it.
                "reconnect-delay": super::RECONNECT_DELAY.as_secs(),
            },
        });
        a.push("-blockdev".into());
        a.push(node.to_string());
        let mut dev = format!("virtio-blk-pci,drive=disk{i},id=vd{i}");
        if i == 0 && spec.kernel.is_none() {
            dev.push_str(",bootindex=0");
        }
        a.push("-device".into());
        a.push(dev);
    }
    if let Some(k) = &spec.kernel {
        a.push("-kernel".into());
        a.push(k.display().to_string());
        if let Some(i) = &spec.initrd {
            a.push("-initrd".into());
            a.push(i.display().to_string());
        }
        if let Some(t) = &spec.append {
            a.push("-append".into());
            a.push(t.clone());
        }
    }
    if spec.net.as_deref() == Some("user") {
        a.push("-netdev".into());
        a.push("user,id=net0".into());
        a.push("-device".into());
        a.push(format!("virtio-net-pci,netdev=net0,mac={}", spec.mac));
    }
    a
}
