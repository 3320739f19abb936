//! `cairn demo`: Cairn's main job on the store, step by step.

use anyhow::Result;
use cairn_engine::{Store, Target};
use std::path::Path;

use crate::output::outln;
use crate::store_options;
use crate::units::human;

pub fn run(dir: &Path) -> Result<()> {
    if !dir.join(cairn_engine::store::DATA_FILE).exists() {
        Store::init(dir, store_options())?;
        outln!("initialised store at {}", dir.display());
    }
    let store = Store::open(dir, store_options())?;
    let name = "demo";
    if store.volume_info(name).is_ok() {
        store.delete_volume(name)?;
    }
    store.create_volume(name, 1 << 30)?;
    outln!("created volume '{name}' (1 GiB, nothing allocated)");
    store.write(name, 0, &vec![b'A'; 4 << 20])?;
    let clean = store.create_checkpoint(name, "clean", Some("freshly installed"))?;
    outln!(
        "wrote 4 MiB of 'A' and took checkpoint {name}@{} (O(1))",
        clean.name
    );
    store.write(name, 1 << 20, &vec![b'B'; 64 << 10])?;
    store.create_checkpoint(name, "patched", Some("after an update"))?;
    outln!("overwrote 64 KiB with 'B' and took checkpoint {name}@patched");
    let d = store.diff(
        &Target::parse("demo@clean")?,
        &Target::parse("demo@patched")?,
    )?;
    outln!(
        "diff clean..patched: {} range(s), {} bytes",
        d.len(),
        d.iter().map(|e| e.length).sum::<u64>()
    );
    store.write(name, 0, &vec![b'X'; 8192])?;
    store.apply_checkpoint(name, "clean", None)?;
    let mut b = [0u8; 1];
    store.read(&Target::head(name), 1 << 20, &mut b)?;
    outln!(
        "broke the disk, then applied {name}@clean: byte at 1 MiB reads '{}' again",
        b[0] as char
    );
    let sp = store.space(Some(name))?;
    for c in &sp.volumes[0].checkpoints {
        outln!(
            "  checkpoint {:<8} references {:>9}, unique {:>9}",
            c.name,
            human(c.referenced),
            human(c.unique)
        );
    }
    let report = store.fsck()?;
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
