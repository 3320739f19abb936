//! The space checkpoints may take: a budget per VM or volume (bytes its checkpoints hold beyond
//! the head), and a floor of free space on the store's file system under which no new checkpoint
//! is taken and the daemon reclaims automatic ones.
//!
//! Why a floor protects the heads' writes: a checkpoint costs nothing when taken, but every
//! later overwrite of a block it shares with the head needs a new block. Near the floor, refusing
//! new checkpoints stops that debt from growing, and deleting automatic checkpoints pays it back.

use std::path::Path;

use cairn_engine::Store;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};

/// The default floor's cap: 10% of the file system, but never more than this.
pub const DEFAULT_FLOOR_CAP: u64 = 10 << 30;

/// The free space kept on the store's file system.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Floor {
    /// 10% of the file system or 10 GiB, whichever is less.
    #[default]
    Default,
    /// This many bytes.
    Bytes(u64),
    /// This share of the file system, in percent.
    Percent(u32),
    /// None: checkpoints are never refused for space.
    Off,
}

impl Floor {
    /// Parses `10G`, `512M`, `15%`, `off` or `default`; `size` reads a size (the front end's
    /// units).
    pub fn parse(s: &str, size: impl Fn(&str) -> Option<u64>) -> Result<Floor, OpError> {
        let bad = || {
            OpError::new(
                ErrorKind::Invalid,
                format!(
                    "floor '{s}' is not a size (e.g. 10G), a share (e.g. 10%), 'off' or 'default'"
                ),
            )
        };
        match s.trim() {
            "off" => Ok(Floor::Off),
            "default" => Ok(Floor::Default),
            t if t.ends_with('%') => {
                let p: u32 = t[..t.len() - 1].trim().parse().map_err(|_| bad())?;
                if p == 0 || p > 90 {
                    return Err(OpError::new(
                        ErrorKind::Invalid,
                        format!("a floor of {p}% makes no sense; give 1% to 90%, or 'off'"),
                    ));
                }
                Ok(Floor::Percent(p))
            }
            t if t.starts_with('-') => Err(bad()),
            t => Ok(Floor::Bytes(size(t).ok_or_else(bad)?)),
        }
    }

    /// The bytes to keep free on a file system of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Floor::Default => (total / 10).min(DEFAULT_FLOOR_CAP),
            Floor::Bytes(b) => b,
            Floor::Percent(p) => total / 100 * u64::from(p),
            Floor::Off => 0,
        }
    }
}

/// Size and free space of the file system holding `dir`, in bytes (what unprivileged users may
/// still write).
pub fn host_space(dir: &Path) -> Result<(u64, u64), OpError> {
    let s = rustix::fs::statvfs(dir).map_err(|e| {
        OpError::new(
            ErrorKind::Io,
            format!(
                "cannot read the free space of {}'s file system: {e}",
                dir.display()
            ),
        )
    })?;
    Ok((s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
}

/// Where the store's file system stands against its floor.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloorStatus {
    /// The setting.
    pub floor: Floor,
    /// What it means on this file system, in bytes.
    pub floor_bytes: u64,
    /// The file system's size.
    pub total_bytes: u64,
    /// Its free space.
    pub free_bytes: u64,
}

impl FloorStatus {
    /// The status of the store in `dir`.
    pub fn of(dir: &Path) -> Result<FloorStatus, OpError> {
        FloorStatus::with(dir, super::policy::floor(dir)?)
    }

    /// The status of the store in `dir` against `floor`.
    pub fn with(dir: &Path, floor: Floor) -> Result<FloorStatus, OpError> {
        let (total, free) = host_space(dir)?;
        Ok(FloorStatus {
            floor,
            floor_bytes: floor.bytes(total),
            total_bytes: total,
            free_bytes: free,
        })
    }

    /// Whether free space is below the floor.
    pub fn below(&self) -> bool {
        self.free_bytes < self.floor_bytes
    }
}

/// Refuses a new checkpoint when the store's file system is below its floor.
pub fn check_floor(store: &Store, target: &str) -> Result<(), OpError> {
    let Some(dir) = store.dir() else {
        return Ok(());
    };
    let s = FloorStatus::of(dir)?;
    if s.below() {
        return Err(OpError::new(
            ErrorKind::NoSpace,
            format!(
                "no checkpoint of '{target}': the store's file system has {} free, under its floor of {}; every checkpoint makes later overwrites take new space, so none is taken until checkpoints are deleted (`cairn space` shows what each frees) or the floor is lowered (`cairn policy floor`)",
                cairn_engine::names::human(s.free_bytes),
                cairn_engine::names::human(s.floor_bytes)
            ),
        ));
    }
    Ok(())
}

/// Bytes the checkpoints of `volumes` hold beyond their heads: what deleting every one frees.
pub fn checkpoint_bytes(store: &Store, volumes: &[String]) -> Result<u64, OpError> {
    let mut total = 0;
    for v in volumes {
        let names: Vec<String> = store
            .list_checkpoints(v)?
            .into_iter()
            .map(|c| c.name)
            .collect();
        total += store.space_freed_by_deleting(v, &names)?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_parse_and_scale() {
        let size = |s: &str| match s {
            "10G" => Some(10 << 30),
            _ => None,
        };
        let parse = |s: &str| Floor::parse(s, size);
        assert_eq!(parse("10G").expect("size"), Floor::Bytes(10 << 30));
        assert_eq!(parse("15%").expect("share"), Floor::Percent(15));
        assert_eq!(parse("off").expect("off"), Floor::Off);
        for bad in ["0%", "95%", "ten", "-1G", "%"] {
            let e = parse(bad).expect_err(bad);
            assert_eq!(e.kind, ErrorKind::Invalid, "{bad}: {e}");
        }
        assert_eq!(
            Floor::Default.bytes(1 << 30),
            (1 << 30) / 10,
            "small disk: 10%"
        );
        assert_eq!(
            Floor::Default.bytes(4 << 40),
            10 << 30,
            "large disk: 10 GiB"
        );
        assert_eq!(Floor::Percent(20).bytes(1000), 200);
    }
}
