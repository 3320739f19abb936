//! `cairn demo`: Cairn's main job on the store, step by step, through the same operations as
//! every other command (so it works with or without a daemon).

use anyhow::{bail, Result};
use cairn_control::{Op, Reply, Service};
use std::path::Path;

use crate::backend::Backend;
use crate::output::outln;
use crate::store_options;
use crate::units::human;

pub fn run(dir: &Path) -> Result<()> {
    if !dir.join(cairn_engine::store::DATA_FILE).exists() {
        Service::init(dir, store_options())?;
        outln!("initialised store at {}", dir.display());
    }
    let store = Backend::open(dir)?;
    let name = "demo";
    if store.call(Op::VolumeInfo { name: name.into() }).is_ok() {
        store.call(Op::VolumeDelete { name: name.into() })?;
    }
    store.volume(Op::VolumeCreate {
        name: name.into(),
        size: 1 << 30,
    })?;
    outln!("created volume '{name}' (1 GiB, nothing allocated)");
    let write = |offset: u64, byte: u8, len: usize| {
        store.done(Op::VolumeWrite {
            name: name.into(),
            offset,
            data: vec![byte; len],
        })
    };
    let checkpoint = |cp: &str, what: &str| {
        store.call(Op::CheckpointCreate {
            volume: name.into(),
            name: Some(cp.into()),
            description: Some(what.into()),
            disk_only: false,
            quiesce: false,
            automatic: false,
        })
    };
    write(0, b'A', 4 << 20)?;
    checkpoint("clean", "freshly installed")?;
    outln!("wrote 4 MiB of 'A' and took checkpoint {name}@clean (O(1))");
    write(1 << 20, b'B', 64 << 10)?;
    checkpoint("patched", "after an update")?;
    outln!("overwrote 64 KiB with 'B' and took checkpoint {name}@patched");
    let Reply::Extents(d) = store.call(Op::Diff {
        a: format!("{name}@clean"),
        b: format!("{name}@patched"),
    })?
    else {
        bail!("the store answered a diff with something else");
    };
    outln!(
        "diff clean..patched: {} range(s), {} bytes",
        d.len(),
        d.iter().map(|e| e.length).sum::<u64>()
    );
    write(0, b'X', 8192)?;
    store.call(Op::CheckpointApply {
        volume: name.into(),
        name: "clean".into(),
        save_current: None,
        discard_current: true,
        force: false,
    })?;
    let b = store.bytes(Op::VolumeRead {
        target: name.into(),
        offset: 1 << 20,
        length: 1,
    })?;
    outln!(
        "broke the disk, then applied {name}@clean: byte at 1 MiB reads '{}' again",
        b.first().copied().unwrap_or(b'?') as char
    );
    let Reply::Space(sp) = store.call(Op::Space {
        volume: Some(name.into()),
    })?
    else {
        bail!("the store answered a space query with something else");
    };
    for c in sp.volumes.iter().flat_map(|v| &v.checkpoints) {
        outln!(
            "  checkpoint {:<8} references {:>9}, unique {:>9}",
            c.name,
            human(c.referenced),
            human(c.unique)
        );
    }
    let Reply::Fsck(report) = store.call(Op::Fsck)? else {
        bail!("the store answered fsck with something else");
    };
    outln!(
        "fsck: {}",
        if report.ok() {
            "no problems"
        } else {
            "PROBLEMS"
        }
    );
    outln!(
        "\nnext: cairn --store {} checkpoint list demo --tree",
        dir.display()
    );
    Ok(())
}
