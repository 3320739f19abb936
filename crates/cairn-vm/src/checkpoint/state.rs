//! A standard checkpoint's memory and device state: moved into the VM's state volume after QEMU
//! saved it, and written out again for QEMU to load.

use cairn_engine::{Error as EngineError, Store};

use super::record::{engine, state_volume, VmCheckpoint};
use crate::VmError;

/// Moves a saved-state file into the VM's state volume and checkpoints it as `cp.name`. Only
/// blocks whose content differs from what the volume holds are written, and zero blocks are
/// trimmed, so what stays the same between two saves of an idle guest is stored once (the
/// engine shares it between the checkpoints).
pub fn store_state(
    store: &Store,
    cp: &VmCheckpoint,
    file: &std::path::Path,
) -> Result<u64, VmError> {
    use std::io::Read;
    let vol = state_volume(&cp.vm);
    let mut f =
        std::fs::File::open(file).map_err(|e| VmError::io("reading saved state", file, e))?;
    let len = f
        .metadata()
        .map_err(|e| VmError::io("reading saved state", file, e))?
        .len();
    let size = len.div_ceil(1 << 20).max(1) << 20;
    match store.volume_info(&vol) {
        Ok(v) if v.size < size => {
            store.resize_volume(&vol, size).map_err(engine)?;
        }
        Ok(_) => {}
        Err(EngineError::UnknownVolume(_)) => {
            store.create_volume(&vol, size).map_err(engine)?;
        }
        Err(e) => return Err(engine(e)),
    }
    let head = cairn_engine::Target::head(&vol);
    let cap = store.volume_info(&vol).map_err(engine)?.size;
    const CHUNK: usize = 1 << 20;
    let (mut buf, mut old) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0u64;
    while at < cap {
        let n = ((cap - at) as usize).min(CHUNK);
        let got = if at < len {
            let want = ((len - at) as usize).min(n);
            f.read_exact(&mut buf[..want])
                .map_err(|e| VmError::io("reading saved state", file, e))?;
            want
        } else {
            0
        };
        buf[got..n].fill(0);
        store.read(&head, at, &mut old[..n]).map_err(engine)?;
        for b in (0..n).step_by(4096) {
            let e = (b + 4096).min(n);
            if buf[b..e] == old[b..e] {
                continue;
            }
            if buf[b..e].iter().all(|&x| x == 0) {
                store
                    .trim(&vol, at + b as u64, (e - b) as u64)
                    .map_err(engine)?;
            } else {
                store
                    .write(&vol, at + b as u64, &buf[b..e])
                    .map_err(engine)?;
            }
        }
        at += n as u64;
    }
    store
        .create_checkpoint(&vol, &cp.name, Some("VM memory and device state"))
        .map_err(engine)?;
    Ok(len)
}

/// Writes a checkpoint's saved state out to `file` for QEMU to load.
pub fn load_state(store: &Store, cp: &VmCheckpoint, file: &std::path::Path) -> Result<(), VmError> {
    use std::os::unix::fs::FileExt;
    let len = cp.state_len.ok_or_else(|| {
        VmError::Invalid(format!(
            "checkpoint '{}@{}' holds no memory state",
            cp.vm, cp.name
        ))
    })?;
    let t = cairn_engine::Target::checkpoint(&state_volume(&cp.vm), &cp.name);
    let f = std::fs::File::create(file).map_err(|e| VmError::io("writing saved state", file, e))?;
    let io = |e| VmError::io("writing saved state", file, e);
    // Sparse like the original: only what the state volume maps is written.
    f.set_len(len).map_err(io)?;
    let mut buf = vec![0u8; 1 << 20];
    for ext in store.mapped_range(&t, 0, len).map_err(engine)? {
        let mut at = ext.offset;
        let end = ext.offset + ext.length;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            store.read(&t, at, &mut buf[..n]).map_err(engine)?;
            f.write_all_at(&buf[..n], at).map_err(io)?;
            at += n as u64;
        }
    }
    Ok(())
}
