//! VM definitions, kept in the store directory as `vms/NAME/vm.json` (written to a temporary
//! file, synced, then renamed, so a crash leaves the old or the new definition, never half of one).
//! The VM's QMP socket, serial log and pid file live in the same directory.

use std::path::{Path, PathBuf};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::VmError;

/// Directory of VM definitions inside a store.
pub const VMS_DIR: &str = "vms";
/// Smallest memory a VM may have.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Most vCPUs a VM may have.
pub const MAX_CPUS: u32 = 64;

/// A VM definition.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// Name (same rules as volume names).
    pub name: String,
    /// Memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// Volumes attached as virtio disks, in order; the first is the boot disk.
    pub disks: Vec<String>,
    /// Kernel to boot directly (else firmware boots the first disk).
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub kernel: Option<PathBuf>,
    /// Initramfs for `kernel`.
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub append: Option<String>,
    /// Network: `user` (QEMU's user-mode NAT) or none.
    pub net: Option<String>,
    /// MAC address of the network card (fresh per VM and per clone).
    pub mac: String,
    /// SMBIOS UUID: the machine identity guests see (fresh per VM and per clone).
    pub uuid: String,
    /// Accelerator to force (`kvm` or `tcg`); chosen at start when absent.
    pub accel: Option<String>,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// The VM checkpoint the VM was last taken or applied from.
    #[serde(default)]
    pub parent: Option<String>,
}

/// A fresh locally administered MAC in QEMU's 52:54:00 range.
pub fn fresh_mac() -> String {
    let b: [u8; 3] = rand::rng().random();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

/// A fresh random (version 4) UUID.
pub fn fresh_uuid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl VmSpec {
    /// Checks what can be checked without the store: name, sizes, files, network.
    pub fn validate(&self) -> Result<(), VmError> {
        cairn_engine::validate_name(&self.name).map_err(|e| VmError::Invalid(e.to_string()))?;
        let bad = |why: String| Err(VmError::Invalid(format!("VM '{}': {why}", self.name)));
        if self.memory < MIN_MEMORY {
            return bad(format!("memory must be at least {} MiB", MIN_MEMORY >> 20));
        }
        if !self.memory.is_multiple_of(1 << 20) {
            return bad("memory must be a whole number of MiB".into());
        }
        if self.cpus == 0 || self.cpus > MAX_CPUS {
            return bad(format!("cpus must be 1 to {MAX_CPUS}"));
        }
        if self.disks.is_empty() && self.kernel.is_none() {
            return bad("give at least one --disk, or a --kernel to boot".into());
        }
        for (i, d) in self.disks.iter().enumerate() {
            if self.disks[..i].contains(d) {
                return bad(format!("volume '{d}' is attached twice"));
            }
        }
        if self.initrd.is_some() && self.kernel.is_none()
            || self.append.is_some() && self.kernel.is_none()
        {
            return bad("--initrd and --append need --kernel".into());
        }
        for f in [&self.kernel, &self.initrd].into_iter().flatten() {
            if !f.is_absolute() {
                return bad(format!("{} must be an absolute path", f.display()));
            }
        }
        match self.net.as_deref() {
            None | Some("user") => {}
            Some(n) => return bad(format!("unknown network '{n}'; use --net user")),
        }
        match self.accel.as_deref() {
            None | Some("kvm") | Some("tcg") => {}
            Some(a) => return bad(format!("unknown accelerator '{a}'; use kvm or tcg")),
        }
        Ok(())
    }
}

/// Writes `value` as JSON to `path` so that a crash leaves the old file or the new one: a
/// temporary file is written and synced, renamed over `path`, and the directory synced.
pub(crate) fn write_json_atomic<T: Serialize>(
    path: &Path,
    value: &T,
    op: &'static str,
) -> Result<(), VmError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| VmError::io(op, dir, e))?;
    let text = serde_json::to_vec_pretty(value)
        .map_err(|e| VmError::Invalid(format!("cannot encode {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| VmError::io(op, path, e))
}

/// The VM definitions of one store.
#[derive(Debug, Clone)]
pub struct VmStore {
    dir: PathBuf,
}

impl VmStore {
    /// The definitions kept in `store_dir`.
    pub fn new(store_dir: &Path) -> VmStore {
        VmStore {
            dir: store_dir.join(VMS_DIR),
        }
    }

    /// Directory of one VM (definition, QMP socket, console log).
    pub fn vm_dir(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn spec_path(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("vm.json")
    }

    /// Every definition, by name.
    pub fn list(&self) -> Result<Vec<VmSpec>, VmError> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(VmError::io("listing VMs", &self.dir, e)),
        };
        for entry in rd {
            let entry = entry.map_err(|e| VmError::io("listing VMs", &self.dir, e))?;
            if let Some(name) = entry.file_name().to_str() {
                if self.spec_path(name).exists() {
                    out.push(self.get(name)?);
                }
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// One definition.
    pub fn get(&self, name: &str) -> Result<VmSpec, VmError> {
        cairn_engine::validate_name(name).map_err(|e| VmError::Invalid(e.to_string()))?;
        let p = self.spec_path(name);
        let text = match std::fs::read(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(VmError::UnknownVm(name.to_string()))
            }
            Err(e) => return Err(VmError::io("reading VM definition", &p, e)),
        };
        serde_json::from_slice(&text).map_err(|e| {
            VmError::Invalid(format!(
                "VM definition {} is damaged ({e}); fix or delete it",
                p.display()
            ))
        })
    }

    /// Whether a definition exists.
    pub fn exists(&self, name: &str) -> bool {
        self.spec_path(name).exists()
    }

    /// Writes a definition atomically (new or replacing).
    pub fn save(&self, spec: &VmSpec) -> Result<(), VmError> {
        spec.validate()?;
        write_json_atomic(&self.spec_path(&spec.name), spec, "saving VM definition")
    }

    /// Removes a definition and its runtime files.
    pub fn delete(&self, name: &str) -> Result<(), VmError> {
        self.get(name)?;
        let dir = self.vm_dir(name);
        std::fs::remove_dir_all(&dir).map_err(|e| VmError::io("deleting VM", &dir, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory: 256 << 20,
            cpus: 1,
            disks: vec!["d1".into()],
            kernel: None,
            initrd: None,
            append: None,
            net: None,
            mac: fresh_mac(),
            uuid: fresh_uuid(),
            accel: None,
            created_ms: 0,
            parent: None,
        }
    }

    #[test]
    fn definitions_round_trip_and_bad_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vms = VmStore::new(dir.path());
        assert!(vms.list().expect("list").is_empty());
        vms.save(&spec("a")).expect("save");
        vms.save(&spec("b")).expect("save");
        assert_eq!(vms.get("a").expect("get"), vms.list().expect("list")[0]);
        assert!(matches!(vms.get("zz"), Err(VmError::UnknownVm(_))));
        let mut s = spec("c");
        s.memory = 1 << 20;
        assert!(vms.save(&s).is_err());
        let mut s = spec("c");
        s.disks = vec!["x".into(), "x".into()];
        assert!(vms.save(&s).is_err());
        let mut s = spec("c");
        s.net = Some("bridge".into());
        assert!(vms.save(&s).is_err());
        assert!(vms.save(&spec("bad name")).is_err());
        vms.delete("a").expect("delete");
        assert_eq!(vms.list().expect("list").len(), 1);
        assert_ne!(fresh_uuid(), fresh_uuid());
        assert_eq!(fresh_uuid().len(), 36);
    }
}
