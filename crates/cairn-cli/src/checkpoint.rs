//! `cairn checkpoint ...`: checkpoints of a volume, or of a VM (every disk at one instant, and
//! its memory when it runs), listed as a table or a tree.

use anyhow::{bail, Result};
use cairn_control::reports::{ApplyReport, VmCheckpointInfo};
use cairn_control::{Op, Reply};
use cairn_engine::{CheckpointInfo, Target};
use clap::Subcommand;
use serde::Serialize;

use crate::backend::Backend;
use crate::output::outln;
use crate::units::human;
use crate::{confirm, print_json, spinner, time_str};

#[derive(Subcommand)]
pub enum CheckpointCmd {
    /// Take a checkpoint of a volume's head (O(1); implies a flush), or of a VM: every disk at
    /// one instant, plus memory and device state when it runs (a standard checkpoint).
    Create {
        /// VOLUME@NAME or VM@NAME; VOLUME or VM alone names it from the time
        /// (cp-YYYYMMDD-HHMMSS, UTC).
        target: String,
        /// Description.
        #[arg(short = 'm', long = "message")]
        message: Option<String>,
        /// For a running VM: only the disks, no memory state. If the guest runs
        /// qemu-guest-agent, its file systems are frozen first (application-consistent);
        /// otherwise the disks are crash-consistent. The output says which.
        #[arg(long)]
        disk_only: bool,
        /// With --disk-only: fail, taking nothing, unless the guest agent freezes the guest's
        /// file systems.
        #[arg(long)]
        quiesce: bool,
    },
    /// List the checkpoints of a volume or VM.
    List {
        /// Volume or VM name.
        name: String,
        /// Show the checkpoint tree, with where the current state is.
        #[arg(long)]
        tree: bool,
    },
    /// Make a volume's head (or a VM's disks, and memory) a checkpoint's state; newer checkpoints
    /// are kept. The state it replaces is kept too, as an automatic checkpoint
    /// (auto-YYYYMMDD-HHMMSS) when it differs from every checkpoint, unless --discard-current.
    Apply {
        /// VOLUME@CHECKPOINT or VM@CHECKPOINT.
        target: String,
        /// Keep the current state as a checkpoint with this name.
        #[arg(long, conflicts_with = "discard_current")]
        save_current: Option<String>,
        /// Keep nothing of the current state.
        #[arg(long)]
        discard_current: bool,
        /// Disconnect NBD clients of the volume (a VM's disks) first; without it, an apply
        /// under connected clients is refused, because their caches would no longer match.
        #[arg(long)]
        force: bool,
    },
    /// Delete a checkpoint; only data nothing else references is freed, and its children move
    /// up to its parent.
    Delete {
        /// VOLUME@CHECKPOINT or VM@CHECKPOINT.
        target: String,
        /// Also delete every checkpoint under it.
        #[arg(long)]
        children: bool,
    },
    /// Change a checkpoint's description.
    Edit {
        /// VOLUME@CHECKPOINT or VM@CHECKPOINT.
        target: String,
        /// The new description ("" removes it).
        #[arg(short = 'm', long = "message")]
        message: String,
    },
    /// Rename a checkpoint.
    Rename {
        /// VOLUME@OLD or VM@OLD.
        target: String,
        /// New name: NEW or VOLUME@NEW.
        new_name: String,
    },
    /// Keep a checkpoint whatever a lifecycle policy says (it cannot be deleted until unpinned).
    Pin {
        /// VOLUME@CHECKPOINT or VM@CHECKPOINT.
        target: String,
    },
    /// Let lifecycle policies expire a pinned checkpoint again.
    Unpin {
        /// VOLUME@CHECKPOINT or VM@CHECKPOINT.
        target: String,
    },
}

/// `VOLUME@CHECKPOINT` split in two; the checkpoint is required.
pub fn checkpoint_target(s: &str) -> Result<(String, String)> {
    let t = Target::parse(s)?;
    match t.checkpoint {
        Some(c) => Ok((t.volume, c)),
        None => bail!("'{s}' names no checkpoint; write VOLUME@CHECKPOINT"),
    }
}

/// One checkpoint as the table and tree draw it, a volume's or a VM's.
#[derive(Debug, Clone)]
struct Row {
    name: String,
    parent: Option<String>,
    created_ms: u64,
    description: Option<String>,
    is_head_parent: bool,
    automatic: bool,
    referenced: u64,
    /// For a VM checkpoint: what it holds and how consistent, in a few words.
    kind: Option<String>,
}

impl From<&CheckpointInfo> for Row {
    fn from(c: &CheckpointInfo) -> Row {
        Row {
            name: c.name.clone(),
            parent: c.parent.clone(),
            created_ms: c.created_ms,
            description: c.description.clone(),
            is_head_parent: c.is_head_parent,
            automatic: c.automatic,
            referenced: c.referenced,
            kind: None,
        }
    }
}

impl From<&VmCheckpointInfo> for Row {
    fn from(c: &VmCheckpointInfo) -> Row {
        Row {
            name: c.name.clone(),
            parent: c.parent.clone(),
            created_ms: c.created_ms,
            description: c.description.clone(),
            is_head_parent: c.is_head_parent,
            automatic: c.automatic,
            referenced: c.referenced,
            kind: Some(vm_kind(c)),
        }
    }
}

/// "standard", "disk-only, application-consistent (the guest agent froze 2 file systems)"...
fn vm_kind(c: &VmCheckpointInfo) -> String {
    let kind = cairn_vm::checkpoint::kind_summary(c.kind, c.consistency);
    match &c.consistency_note {
        Some(note) => format!("{kind} ({note})"),
        None => kind.to_string(),
    }
}

pub fn run(store: &Backend, cmd: CheckpointCmd, json: bool, yes: bool) -> Result<()> {
    match cmd {
        CheckpointCmd::Create {
            target,
            message,
            disk_only,
            quiesce,
        } => {
            let t = Target::parse(&target)?;
            let op = Op::CheckpointCreate {
                volume: t.volume.clone(),
                name: t.checkpoint,
                description: message,
                disk_only,
                quiesce,
                automatic: false,
            };
            // Only a running VM's standard checkpoint reports progress: its memory being saved.
            let sp = spinner("checkpointing");
            let reply = store.call_with_progress(op, &mut |n| {
                sp.set_message(format!("saving the VM's memory: {}", human(n)))
            })?;
            sp.finish_and_clear();
            match reply {
                Reply::Checkpoint(info) if json => print_json(&info)?,
                Reply::VmCheckpoint(info) if json => print_json(&info)?,
                Reply::Checkpoint(info) => {
                    outln!("created checkpoint {}@{}", info.volume, info.name)
                }
                Reply::VmCheckpoint(info) => outln!(
                    "created checkpoint {}@{}: {}",
                    info.vm,
                    info.name,
                    vm_kind(&info)
                ),
                Reply::Group(g) => crate::group::print_reply(&t.volume, g, json)?,
                other => bail!("unexpected reply {other:?}"),
            }
        }
        CheckpointCmd::List { name, tree } => {
            let reply = store.checkpoint_list(&name)?;
            if let Reply::Group(g) = reply {
                return crate::group::print_reply(&name, g, json);
            }
            let (rows, head) = match &reply {
                Reply::Checkpoints {
                    checkpoints,
                    head_parent,
                    ..
                } => (
                    checkpoints.iter().map(Row::from).collect::<Vec<_>>(),
                    head_parent.clone(),
                ),
                Reply::VmCheckpoints {
                    checkpoints,
                    head_parent,
                    ..
                } => (
                    checkpoints.iter().map(Row::from).collect(),
                    head_parent.clone(),
                ),
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                match (&reply, tree) {
                    (_, true) => print_json(&tree_json(&rows, head.as_deref(), None))?,
                    (Reply::Checkpoints { checkpoints, .. }, false) => print_json(checkpoints)?,
                    (Reply::VmCheckpoints { checkpoints, .. }, false) => print_json(checkpoints)?,
                    _ => {}
                }
            } else if tree {
                for line in tree_lines(&rows, head.as_deref()) {
                    outln!("{line}");
                }
                if head.is_none() {
                    outln!("* now: the current state (taken from no checkpoint)");
                }
            } else {
                list_table(&rows, head.as_deref());
            }
        }
        CheckpointCmd::Apply {
            target,
            save_current,
            discard_current,
            force,
        } => {
            let (v, c) = checkpoint_target(&target)?;
            let op = Op::CheckpointApply {
                volume: v.clone(),
                name: c,
                save_current,
                discard_current,
                force,
            };
            // A running VM's current state is saved first, memory included; that reports progress.
            let sp = spinner("applying");
            let reply = store.call_with_progress(op, &mut |n| {
                sp.set_message(format!("saving the VM's current memory: {}", human(n)))
            });
            sp.finish_and_clear();
            let report = match reply? {
                Reply::Applied(r) => r,
                Reply::Group(g) => return crate::group::print_reply(&v, g, json),
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                print_json(&report)?;
            } else {
                print_applied(&v, &report);
            }
        }
        CheckpointCmd::Delete { target, children } => {
            let (v, c) = checkpoint_target(&target)?;
            if children {
                confirm(
                    &format!("delete {target} and every checkpoint under it"),
                    yes,
                )?;
            }
            let sp = crate::spinner("deleting");
            let op = Op::CheckpointDelete {
                volume: v,
                name: c,
                children,
            };
            let reply = store.call_with_progress(op, &mut |n| {
                sp.set_message(format!("deleting {target}: {} freed", human(n)))
            })?;
            sp.finish_and_clear();
            let deleted = match reply {
                Reply::Deleted(d) => d,
                other => bail!("unexpected reply {other:?}"),
            };
            if json {
                print_json(&serde_json::json!({ "deleted": deleted }))?;
            } else {
                for d in deleted {
                    outln!("deleted checkpoint {d}");
                }
            }
        }
        CheckpointCmd::Edit { target, message } => {
            let (v, c) = checkpoint_target(&target)?;
            let description = (!message.is_empty()).then_some(message);
            let reply = store.call(Op::CheckpointEdit {
                volume: v,
                name: c,
                description: description.clone(),
            })?;
            if json {
                print_checkpoint_json(&reply)?;
            } else {
                match description {
                    Some(d) => outln!("{target}: description is now \"{d}\""),
                    None => outln!("{target}: description removed"),
                }
            }
        }
        CheckpointCmd::Pin { target } => pin(store, &target, true, json)?,
        CheckpointCmd::Unpin { target } => pin(store, &target, false, json)?,
        CheckpointCmd::Rename { target, new_name } => {
            let (v, c) = checkpoint_target(&target)?;
            // `VM@new` as well as `new`, as long as it names the same volume or VM.
            let new_name = match Target::parse(&new_name)? {
                Target {
                    volume,
                    checkpoint: Some(n),
                } if volume == v => n,
                Target {
                    checkpoint: Some(_),
                    volume,
                } => bail!(
                    "'{new_name}' names '{volume}', not '{v}': a rename keeps a checkpoint where it is; give the new name alone or as {v}@NEW"
                ),
                Target { volume, .. } => volume,
            };
            let reply = store.call(Op::CheckpointRename {
                volume: v.clone(),
                name: c,
                new_name: new_name.clone(),
            })?;
            if json {
                print_checkpoint_json(&reply)?;
            } else {
                outln!("renamed {target} to {v}@{new_name}");
            }
        }
    }
    Ok(())
}

fn print_checkpoint_json(reply: &Reply) -> Result<()> {
    match reply {
        Reply::Checkpoint(info) => print_json(info),
        Reply::VmCheckpoint(info) => print_json(info),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn print_applied(target: &str, r: &ApplyReport) {
    if let Some(s) = &r.saved_as {
        let why = if r.saved_automatically {
            " (automatic: it differed from every checkpoint; --discard-current keeps nothing)"
        } else {
            ""
        };
        outln!("kept the replaced state as {target}@{s}{why}");
    }
    match r.vm {
        Some(outcome) => outln!(
            "applied {}: every disk of VM '{target}' is now that checkpoint's state; the VM: {outcome}",
            r.applied
        ),
        None => outln!(
            "applied {}: the head of '{target}' is now that checkpoint's state",
            r.applied
        ),
    }
}

fn list_table(rows: &[Row], head: Option<&str>) {
    let vm = rows.iter().any(|r| r.kind.is_some());
    outln!(
        "{:<24} {:<22} {:>12} {:<20} {}DESCRIPTION",
        "NAME",
        "CREATED",
        "REFERENCED",
        "PARENT",
        if vm { "KIND / " } else { "" }
    );
    for c in rows {
        let mark = if c.is_head_parent { " *" } else { "" };
        let auto = if c.automatic { " [automatic]" } else { "" };
        let what = match (&c.kind, &c.description) {
            (Some(k), Some(d)) => format!("{k} / {d}"),
            (Some(k), None) => k.clone(),
            (None, d) => d.clone().unwrap_or_default(),
        };
        outln!(
            "{:<24} {:<22} {:>12} {:<20} {what}{auto}{mark}",
            c.name,
            time_str(c.created_ms),
            human(c.referenced),
            c.parent.as_deref().unwrap_or("-"),
        );
    }
    if head.is_some() {
        outln!("* marks the checkpoint the current state was taken or applied from");
    }
    if vm {
        outln!("REFERENCED counts a VM checkpoint's disks and its memory state together");
    }
}

#[derive(Serialize)]
struct TreeNode {
    name: String,
    created_ms: u64,
    description: Option<String>,
    automatic: bool,
    kind: Option<String>,
    /// The current state was taken or applied from this checkpoint.
    head_here: bool,
    children: Vec<TreeNode>,
}

fn tree_json(rows: &[Row], head: Option<&str>, parent: Option<&str>) -> Vec<TreeNode> {
    rows.iter()
        .filter(|c| c.parent.as_deref() == parent)
        .map(|c| TreeNode {
            name: c.name.clone(),
            created_ms: c.created_ms,
            description: c.description.clone(),
            automatic: c.automatic,
            kind: c.kind.clone(),
            head_here: head == Some(c.name.as_str()),
            children: tree_json(rows, head, Some(&c.name)),
        })
        .collect()
}

/// The lines of `checkpoint list --tree`: each checkpoint under its parent, and the current state
/// ("* now") as the last child of the checkpoint it was last taken or applied from, so the branch
/// drawn last under a checkpoint is the one closed with "└─".
fn tree_lines(rows: &[Row], head: Option<&str>) -> Vec<String> {
    fn walk(
        rows: &[Row],
        parent: Option<&str>,
        indent: &str,
        head: Option<&str>,
        out: &mut Vec<String>,
    ) {
        let kids: Vec<&Row> = rows
            .iter()
            .filter(|c| c.parent.as_deref() == parent)
            .collect();
        // A current state without a parent checkpoint is reported by the caller, not drawn.
        let head_here = parent.is_some() && head == parent;
        for (i, c) in kids.iter().enumerate() {
            let last = i + 1 == kids.len() && !head_here;
            let desc = c
                .description
                .as_deref()
                .map(|d| format!("  ({d})"))
                .unwrap_or_default();
            let auto = if c.automatic { "  [automatic]" } else { "" };
            out.push(format!(
                "{indent}{}{} {}{desc}{auto}",
                if last { "└─ " } else { "├─ " },
                c.name,
                time_str(c.created_ms)
            ));
            let sub = format!("{indent}{}", if last { "   " } else { "│  " });
            walk(rows, Some(&c.name), &sub, head, out);
        }
        if head_here {
            out.push(format!("{indent}└─ * now (the current state)"));
        }
    }
    let mut out = Vec::new();
    walk(rows, None, "", head, &mut out);
    out
}

/// `checkpoint pin|unpin`.
fn pin(store: &Backend, target: &str, pinned: bool, json: bool) -> Result<()> {
    let op = Op::Lifecycle(cairn_control::lifecycle::LifecycleOp::Pin {
        target: target.into(),
        pinned,
    });
    match store.call(op)? {
        Reply::Lifecycle(r) if json => print_json(&r)?,
        Reply::Lifecycle(_) => outln!("{} {target}", if pinned { "pinned" } else { "unpinned" }),
        other => bail!("unexpected reply {other:?}"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(name: &str, parent: Option<&str>) -> Row {
        Row {
            name: name.into(),
            parent: parent.map(str::to_string),
            created_ms: 0,
            description: None,
            is_head_parent: false,
            automatic: false,
            referenced: 0,
            kind: None,
        }
    }

    /// The drawing without the creation times.
    fn shapes(cps: &[Row], head: Option<&str>) -> Vec<String> {
        tree_lines(cps, head)
            .iter()
            .map(|l| l.split(" 19").next().unwrap_or(l).to_string())
            .collect()
    }

    #[test]
    fn the_head_is_the_last_branch_of_its_checkpoint() {
        // base has two children (a, with its own child c, and b); the head was applied from base.
        let cps = [
            cp("base", None),
            cp("a", Some("base")),
            cp("c", Some("a")),
            cp("b", Some("base")),
        ];
        assert_eq!(
            shapes(&cps, Some("base")),
            [
                "└─ base",
                "   ├─ a",
                "   │  └─ c",
                "   ├─ b",
                "   └─ * now (the current state)"
            ]
        );
        assert_eq!(
            shapes(&cps, Some("c")),
            [
                "└─ base",
                "   ├─ a",
                "   │  └─ c",
                "   │     └─ * now (the current state)",
                "   └─ b"
            ]
        );
    }

    #[test]
    fn several_roots_are_drawn_as_siblings() {
        let cps = [cp("r1", None), cp("x", Some("r1")), cp("r2", None)];
        assert_eq!(
            shapes(&cps, Some("r2")),
            [
                "├─ r1",
                "│  └─ x",
                "└─ r2",
                "   └─ * now (the current state)"
            ]
        );
    }
}
