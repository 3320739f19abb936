//! `cairn group ...`: groups of VMs and volumes that `checkpoint create GROUP@NAME` takes at
//! one instant and `checkpoint apply GROUP@NAME` rewinds together.

use anyhow::{bail, Result};
use cairn_control::group::{GroupCheckpoint, GroupOp, GroupReply};
use cairn_control::{Op, Reply};
use clap::Subcommand;

use crate::backend::Backend;
use crate::output::outln;
use crate::{print_json, time_str};

#[derive(Subcommand)]
pub enum GroupCmd {
    /// Make a group: `checkpoint create NAME@CHECKPOINT` then pauses every running member
    /// together and takes them all at one instant (stopped VMs disk-only, at rest).
    Create {
        /// The group's name (no VM or volume may have it).
        name: String,
        /// A member VM (repeat for more).
        #[arg(long = "vm", value_name = "VM")]
        vms: Vec<String>,
        /// A member volume that is no VM's disk (repeat for more).
        #[arg(long = "volume", value_name = "VOLUME")]
        volumes: Vec<String>,
    },
    /// Every group and its members.
    List,
    /// Forget a group; its members and their checkpoints stay.
    Delete {
        /// The group.
        name: String,
    },
}

pub fn run(store: &Backend, cmd: GroupCmd, json: bool) -> Result<()> {
    let op = match cmd {
        GroupCmd::Create { name, vms, volumes } => GroupOp::Create { name, vms, volumes },
        GroupCmd::List => GroupOp::List,
        GroupCmd::Delete { name } => GroupOp::Delete { name },
    };
    let Reply::Group(GroupReply::Groups(groups)) = store.call(Op::Group(op))? else {
        bail!("unexpected reply");
    };
    if json {
        return print_json(&groups);
    }
    for g in &groups {
        let mut members: Vec<String> = g.vms.iter().map(|v| format!("VM {v}")).collect();
        members.extend(g.volumes.iter().map(|v| format!("volume {v}")));
        outln!(
            "{}: {} ({} checkpoint{})",
            g.name,
            members.join(", "),
            g.checkpoints.len(),
            if g.checkpoints.len() == 1 { "" } else { "s" }
        );
    }
    Ok(())
}

/// One group checkpoint on one line, with each member's part.
pub fn describe(group: &str, cp: &GroupCheckpoint) -> String {
    let parts: Vec<String> = cp
        .members
        .iter()
        .map(|m| match m.paused_us {
            Some(us) => format!(
                "{} {} (paused {:.1} ms)",
                m.member,
                m.kind,
                us as f64 / 1000.0
            ),
            None => format!("{} {}", m.member, m.kind),
        })
        .collect();
    format!(
        "{group}@{}  {}  {}{}",
        cp.name,
        time_str(cp.created_ms),
        parts.join(", "),
        cp.description
            .as_deref()
            .map(|d| format!("  \"{d}\""))
            .unwrap_or_default()
    )
}

/// Prints what a checkpoint command on a group replied.
pub fn print_reply(target: &str, reply: GroupReply, json: bool) -> Result<()> {
    if json {
        return match reply {
            GroupReply::Checkpoints { checkpoints, .. } => print_json(&checkpoints),
            other => print_json(&other),
        };
    }
    match reply {
        GroupReply::Checkpoint(cp) => outln!("created {}", describe(target, &cp)),
        GroupReply::Checkpoints {
            group, checkpoints, ..
        } => {
            if checkpoints.is_empty() {
                outln!("group {group} has no checkpoints yet");
            }
            for cp in &checkpoints {
                outln!("{}", describe(&group, cp));
            }
        }
        GroupReply::Applied(reports) => {
            for r in &reports {
                match &r.saved_as {
                    Some(s) => outln!("applied {} (the state before is kept as {s})", r.applied),
                    None => outln!("applied {}", r.applied),
                }
            }
        }
        GroupReply::Groups(_) => {}
    }
    Ok(())
}
