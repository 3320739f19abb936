//! `cairn space [NAME]`: what each checkpoint and head holds, and what deleting it would free; for
//! a VM, each VM checkpoint's disks and memory together.

use anyhow::{bail, Result};
use cairn_control::reports::VmSpaceReport;
use cairn_control::{Op, Reply};
use cairn_engine::SpaceReport;

use crate::backend::Backend;
use crate::output::outln;
use crate::print_json;
use crate::units::human;

pub fn run(store: &Backend, name: Option<String>, json: bool) -> Result<()> {
    match store.call(Op::Space { volume: name })? {
        Reply::Space(r) if json => print_json(&r),
        Reply::VmSpace(r) if json => print_json(&r),
        Reply::Space(r) => {
            volumes(&r);
            Ok(())
        }
        Reply::VmSpace(r) => {
            vm(&r);
            volumes(&r.store);
            Ok(())
        }
        other => bail!("unexpected reply {other:?}"),
    }
}

fn vm(r: &VmSpaceReport) {
    if r.checkpoints.is_empty() {
        outln!("VM {}: no checkpoints", r.vm);
        return;
    }
    outln!("VM {}: per checkpoint, disks + memory state = total", r.vm);
    outln!(
        "  {:<28} {:>23} {:>23} {:>23}",
        "CHECKPOINT",
        "DISKS (ref / unique)",
        "MEMORY (ref / unique)",
        "TOTAL (ref / unique)"
    );
    let pair = |r: u64, u: u64| format!("{} / {}", human(r), human(u));
    for c in &r.checkpoints {
        outln!(
            "  {:<28} {:>23} {:>23} {:>23}",
            c.name,
            pair(c.disks_referenced, c.disks_unique),
            pair(c.memory_referenced, c.memory_unique),
            pair(c.referenced, c.unique)
        );
    }
    outln!();
}

fn volumes(r: &SpaceReport) {
    let mut unique_above_referenced = false;
    for v in &r.volumes {
        let since = match &v.head_changed_since {
            Some(base) => format!("since {base}"),
            None => "since creation (no checkpoint to compare with)".into(),
        };
        outln!(
            "volume {} ({}): head references {}, {} changed {since}, {} held only by the head",
            v.name,
            human(v.size),
            human(v.head_referenced),
            human(v.head_changed),
            human(v.head_unique)
        );
        if !v.checkpoints.is_empty() {
            outln!(
                "  {:<32} {:>12} {:>22}",
                "CHECKPOINT",
                "REFERENCED",
                "UNIQUE (freed if deleted)"
            );
            for c in &v.checkpoints {
                unique_above_referenced |= c.unique > c.referenced;
                outln!(
                    "  {:<32} {:>12} {:>22}",
                    c.name,
                    human(c.referenced),
                    human(c.unique)
                );
            }
        }
    }
    outln!(
        "store: {} in use by blocks, data file spans {}, {} used on the host",
        human(r.allocated),
        human(r.file_size),
        human(r.host_used)
    );
    if r.dropped_trees > 0 {
        outln!(
            "       {} deleted tree(s) not yet freed (an interrupted delete): the daemon frees them, or the next delete",
            r.dropped_trees
        );
    }
    if unique_above_referenced {
        outln!("REFERENCED counts data; UNIQUE also counts the block-map pages only that checkpoint holds, so it can be larger");
    }
}
