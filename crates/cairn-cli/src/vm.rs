//! `cairn vm ...`: VM definitions (with or without a daemon) and running VMs (through the
//! daemon, which supervises QEMU).

use crate::output::outln;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use cairn_control::ops::VmDefinition;
use cairn_control::{Op, Reply};
use cairn_vm::{VmSpec, VmStatus};
use clap::Subcommand;

use crate::backend::Backend;
use crate::console;
use crate::units::{human, parse_size};
use crate::{confirm, print_json, time_str};

#[derive(Subcommand)]
pub enum VmCmd {
    /// Define a VM whose disks are Cairn volumes.
    Create {
        /// VM name.
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// List VMs.
    List,
    /// Show a VM's definition.
    Info {
        /// VM name.
        name: String,
    },
    /// Change a stopped VM (options given replace the current values; --disk replaces the list).
    Edit {
        /// VM name.
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Delete a stopped VM: its definition, its VM checkpoints' records and their saved memory
    /// (the VM.state volume) go. Its disks stay as volumes, each keeping its own checkpoint of
    /// every VM checkpoint (usable with `cairn checkpoint apply DISK@NAME`, clone, export).
    Delete {
        /// VM name.
        name: String,
    },
    /// Start a VM (needs `cairn serve`).
    Start {
        /// VM name.
        name: String,
    },
    /// Power a VM off: ACPI first, a hard stop after --timeout.
    Stop {
        /// VM name.
        name: String,
        /// Seconds the guest gets to power off.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Kill a VM's QEMU at once (like pulling the plug).
    Kill {
        /// VM name.
        name: String,
    },
    /// State, pid, uptime and accelerator.
    Status {
        /// VM name.
        name: String,
    },
    /// Print the VM's serial console log.
    Console {
        /// VM name.
        name: String,
        /// Keep printing what the VM writes, until interrupted.
        #[arg(long, short, conflicts_with = "attach")]
        follow: bool,
        /// Connect this terminal to the running VM's serial console, input included (as
        /// `virsh console` does); Ctrl-] detaches. Without it, the console's log is printed.
        #[arg(long)]
        attach: bool,
    },
}

#[derive(clap::Args)]
pub struct Settings {
    /// Memory, e.g. 512M (default 512M on create).
    #[arg(long)]
    memory: Option<String>,
    /// vCPUs (default 1 on create).
    #[arg(long)]
    cpus: Option<u32>,
    /// A volume to attach (repeat for more; the first is the boot disk).
    #[arg(long = "disk", value_name = "VOLUME")]
    disks: Vec<String>,
    /// Boot this kernel directly instead of the first disk's firmware boot.
    #[arg(long, value_name = "FILE")]
    kernel: Option<PathBuf>,
    /// Initramfs for --kernel.
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// Kernel command line for --kernel.
    #[arg(long, value_name = "TEXT")]
    append: Option<String>,
    /// Network: `user` (QEMU user-mode NAT).
    #[arg(long)]
    net: Option<String>,
    /// Force an accelerator (kvm or tcg); chosen at start otherwise.
    #[arg(long)]
    accel: Option<String>,
}

/// The daemon runs elsewhere: files must be given as absolute paths.
fn absolute(p: Option<PathBuf>) -> Result<Option<PathBuf>> {
    p.map(|p| std::fs::canonicalize(&p).with_context(|| format!("cannot find {}", p.display())))
        .transpose()
}

impl Settings {
    fn definition(self, name: String) -> Result<VmDefinition> {
        Ok(VmDefinition {
            name,
            memory: self.memory.as_deref().map(parse_size).transpose()?,
            cpus: self.cpus,
            disks: (!self.disks.is_empty()).then_some(self.disks),
            kernel: absolute(self.kernel)?,
            initrd: absolute(self.initrd)?,
            append: self.append,
            net: self.net,
            accel: self.accel,
        })
    }
}

fn vm(r: Reply) -> Result<VmSpec> {
    match r {
        Reply::Vm(v) => Ok(v),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn status(r: Reply) -> Result<VmStatus> {
    match r {
        Reply::VmStatus(s) => Ok(s),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn print_status(s: &VmStatus, json: bool) -> Result<()> {
    if json {
        return print_json(s);
    }
    match s.pid {
        Some(pid) => outln!(
            "VM '{}': {}, QEMU pid {pid}, up {} s, accelerator {}",
            s.name,
            s.state,
            s.uptime_secs.unwrap_or(0),
            s.accel.as_deref().unwrap_or("?")
        ),
        None => outln!("VM '{}': {}", s.name, s.state),
    }
    if let Some(e) = &s.last_exit {
        outln!(
            "last run: {e} at {}",
            s.last_exit_ms.map(time_str).unwrap_or_default()
        );
    }
    outln!("console: {}", s.console.display());
    Ok(())
}

fn print_spec(v: &VmSpec) {
    outln!("name:     {}", v.name);
    outln!("memory:   {}", human(v.memory));
    outln!("cpus:     {}", v.cpus);
    outln!(
        "disks:    {}",
        if v.disks.is_empty() {
            "-".to_string()
        } else {
            v.disks.join(", ")
        }
    );
    if let Some(k) = &v.kernel {
        outln!("kernel:   {}", k.display());
    }
    if let Some(i) = &v.initrd {
        outln!("initrd:   {}", i.display());
    }
    if let Some(a) = &v.append {
        outln!("append:   {a}");
    }
    outln!("net:      {}", v.net.as_deref().unwrap_or("none"));
    outln!("mac:      {}", v.mac);
    outln!("uuid:     {}", v.uuid);
    outln!("accel:    {}", v.accel.as_deref().unwrap_or("automatic"));
    outln!("created:  {}", time_str(v.created_ms));
}

/// Runs one `cairn vm` command.
pub fn run(backend: &Backend, dir: &Path, cmd: VmCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        VmCmd::Create { name, settings } => {
            let mut def = settings.definition(name)?;
            def.memory.get_or_insert(512 << 20);
            let v = vm(backend.call(Op::VmCreate(def))?)?;
            if json {
                print_json(&v)?;
            } else {
                outln!(
                    "created VM '{}' ({}, {} vCPU, disks: {})",
                    v.name,
                    human(v.memory),
                    v.cpus,
                    if v.disks.is_empty() {
                        "none".into()
                    } else {
                        v.disks.join(", ")
                    }
                );
            }
        }
        VmCmd::List => {
            let vms = match backend.call(Op::VmList)? {
                Reply::Vms(v) => v,
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                print_json(&vms)?;
            } else {
                outln!(
                    "{:<20} {:>10} {:>5}  {:<10} DISKS",
                    "NAME",
                    "MEMORY",
                    "CPUS",
                    "STATE"
                );
                for v in vms {
                    let st = status(backend.call(Op::VmStatus {
                        name: v.name.clone(),
                    })?)?;
                    outln!(
                        "{:<20} {:>10} {:>5}  {:<10} {}",
                        v.name,
                        human(v.memory),
                        v.cpus,
                        st.state,
                        v.disks.join(", ")
                    );
                }
            }
        }
        VmCmd::Info { name } => {
            let v = vm(backend.call(Op::VmInfo { name })?)?;
            if json {
                print_json(&v)?;
            } else {
                print_spec(&v);
            }
        }
        VmCmd::Edit { name, settings } => {
            let v = vm(backend.call(Op::VmEdit(settings.definition(name)?))?)?;
            if json {
                print_json(&v)?;
            } else {
                outln!("updated VM '{}'", v.name);
            }
        }
        VmCmd::Delete { name } => {
            let v = vm(backend.call(Op::VmInfo { name: name.clone() })?)?;
            let checkpoints = match backend.checkpoint_list(&name)? {
                Reply::VmCheckpoints { checkpoints, .. } => checkpoints,
                other => bail!("unexpected reply {other:?}"),
            };
            let disks = if v.disks.is_empty() {
                "it has no disks".to_string()
            } else {
                format!("its disks {} stay", v.disks.join(", "))
            };
            if !checkpoints.is_empty() {
                confirm(
                    &format!(
                        "delete VM '{name}' and its {} checkpoint(s) with their saved memory ({disks}, with their own checkpoints)",
                        checkpoints.len()
                    ),
                    yes,
                )?;
            }
            backend.done(Op::VmDelete { name: name.clone() })?;
            if json {
                print_json(&serde_json::json!({
                    "deleted": name,
                    "checkpoints_deleted": checkpoints.iter().map(|c| &c.name).collect::<Vec<_>>(),
                    "disks_kept": v.disks,
                }))?;
            } else {
                outln!(
                    "deleted VM '{name}': its definition, {} checkpoint record(s) and saved memory are gone; {disks}, each with its own checkpoints",
                    checkpoints.len()
                );
            }
        }
        VmCmd::Start { name } => {
            let s = status(backend.call(Op::VmStart { name })?)?;
            print_status(&s, json)?;
        }
        VmCmd::Stop { name, timeout } => {
            let sp = crate::spinner(&format!(
                "asked VM '{name}' to power off (ACPI); waiting up to {timeout} s before a hard stop"
            ));
            let s = status(backend.call(Op::VmStop {
                name: name.clone(),
                timeout_secs: timeout,
            })?)?;
            sp.finish_and_clear();
            if !json {
                match s.hard_stop {
                    Some(true) => outln!(
                        "VM '{name}' did not power off within {timeout} s: QEMU was stopped hard (the guest lost what it had not written, as on a power cut)"
                    ),
                    Some(false) => outln!("VM '{name}' powered off"),
                    None => {}
                }
            }
            print_status(&s, json)?;
        }
        VmCmd::Kill { name } => {
            let s = status(backend.call(Op::VmKill { name })?)?;
            print_status(&s, json)?;
        }
        VmCmd::Status { name } => {
            let s = status(backend.call(Op::VmStatus { name })?)?;
            print_status(&s, json)?;
        }
        VmCmd::Console {
            name,
            follow,
            attach,
        } => {
            backend.call(Op::VmInfo { name: name.clone() })?;
            let vm_dir = cairn_vm::VmStore::new(dir).vm_dir(&name);
            if attach {
                let st = status(backend.call(Op::VmStatus { name: name.clone() })?)?;
                if st.state != "running" {
                    bail!("VM '{name}' is not running: there is no console to attach to; start it with `cairn vm start {name}` (`cairn vm console {name}` shows its log)");
                }
                console::attach(&name, &vm_dir)?;
            } else {
                console::show_log(&vm_dir.join("console.log"), follow)?;
            }
        }
    }
    Ok(())
}
