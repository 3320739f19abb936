//! Where a command's operation runs: in the daemon that owns the store, when one answers on the
//! store's control socket, or on the store opened by this process. Either way the operation is
//! the same [`Op`] run by the same [`Service`].

use std::path::Path;

use anyhow::{bail, Result};
use cairn_control::{Client, Op, OpError, Reply, Service};
use cairn_engine::{CheckpointInfo, Extent, VolumeInfo};

/// The store or daemon commands talk to.
pub enum Backend {
    /// This process opened the store.
    Local(Service),
    /// A daemon owns the store.
    Daemon(Client),
}

impl Backend {
    /// The daemon of `dir` if one runs, else the store opened here.
    pub fn open(dir: &Path) -> Result<Backend> {
        if let Some(c) = Client::find(dir) {
            return Ok(Backend::Daemon(c));
        }
        Ok(Backend::Local(Service::open(dir, crate::store_options())?))
    }

    /// Runs `op`.
    pub fn call(&self, op: Op) -> Result<Reply, OpError> {
        self.call_with_progress(op, &mut |_| {})
    }

    /// Runs `op`, passing on the progress it reports (bytes done).
    pub fn call_with_progress(
        &self,
        op: Op,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Reply, OpError> {
        match self {
            Backend::Local(service) => service.run_here(op, progress),
            Backend::Daemon(c) => c.call_with_progress(&op, progress),
        }
    }

    pub fn volume(&self, op: Op) -> Result<VolumeInfo> {
        match self.call(op)? {
            Reply::Volume(v) => Ok(v),
            other => unexpected(other),
        }
    }

    /// A volume's checkpoints and its head's parent.
    pub fn checkpoints(&self, volume: &str) -> Result<(Vec<CheckpointInfo>, Option<String>)> {
        match self.call(Op::CheckpointList {
            volume: volume.to_string(),
        })? {
            Reply::Checkpoints {
                checkpoints,
                head_parent,
            } => Ok((checkpoints, head_parent)),
            Reply::VmCheckpoints { .. } => {
                bail!("'{volume}' is a VM; name one of its disks (VOLUME@CHECKPOINT)")
            }
            other => unexpected(other),
        }
    }

    pub fn extents(&self, op: Op) -> Result<Vec<Extent>> {
        match self.call(op)? {
            Reply::Extents(e) => Ok(e),
            other => unexpected(other),
        }
    }

    pub fn bytes(&self, op: Op) -> Result<Vec<u8>> {
        match self.call(op)? {
            Reply::Bytes(b) => Ok(b),
            other => unexpected(other),
        }
    }

    pub fn done(&self, op: Op) -> Result<()> {
        match self.call(op)? {
            Reply::Done => Ok(()),
            other => unexpected(other),
        }
    }
}

fn unexpected<T>(r: Reply) -> Result<T> {
    bail!("the store answered with an unexpected reply: {r:?}")
}
