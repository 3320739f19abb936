//! Where a command's operation runs: in the daemon that owns the store, when one answers on the
//! store's control socket, or on the store opened by this process. Either way the operation is
//! the same [`Op`] run by the same [`Service`].

use std::path::Path;

use anyhow::{bail, Result};
use cairn_control::group::GroupReply;
use cairn_control::{Client, ErrorKind, Op, OpError, Reply, Service, MAX_CHECKPOINT_PAGE};
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

    /// Every checkpoint of a VM, volume or group, asked for a page at a time as the daemon
    /// hands them out: one reply with every page's checkpoints, oldest first.
    pub fn checkpoint_list(&self, target: &str) -> Result<Reply, OpError> {
        let mut whole: Option<Reply> = None;
        let mut after = None;
        loop {
            let page = self.call(Op::CheckpointList {
                volume: target.to_string(),
                after: after.take(),
                limit: Some(MAX_CHECKPOINT_PAGE),
            })?;
            let next = match whole.as_mut() {
                None => {
                    whole = Some(page);
                    take_next(whole.as_mut().expect("just set"))
                }
                Some(w) => append_page(w, page)?,
            };
            match next {
                Some(n) => after = Some(n),
                None => return Ok(whole.expect("one page at least")),
            }
        }
    }

    /// A volume's checkpoints and its head's parent.
    pub fn checkpoints(&self, volume: &str) -> Result<(Vec<CheckpointInfo>, Option<String>)> {
        match self.checkpoint_list(volume)? {
            Reply::Checkpoints {
                checkpoints,
                head_parent,
                ..
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

/// Takes the cursor out of a checkpoint list's page.
fn take_next(page: &mut Reply) -> Option<String> {
    match page {
        Reply::Checkpoints { next, .. }
        | Reply::VmCheckpoints { next, .. }
        | Reply::Group(GroupReply::Checkpoints { next, .. }) => next.take(),
        _ => None,
    }
}

/// Adds a later page's checkpoints to `whole`; the later page's cursor.
fn append_page(whole: &mut Reply, mut page: Reply) -> Result<Option<String>, OpError> {
    let next = take_next(&mut page);
    match (whole, page) {
        (Reply::Checkpoints { checkpoints: w, .. }, Reply::Checkpoints { checkpoints: p, .. }) => {
            w.extend(p)
        }
        (
            Reply::VmCheckpoints { checkpoints: w, .. },
            Reply::VmCheckpoints { checkpoints: p, .. },
        ) => w.extend(p),
        (
            Reply::Group(GroupReply::Checkpoints { checkpoints: w, .. }),
            Reply::Group(GroupReply::Checkpoints { checkpoints: p, .. }),
        ) => w.extend(p),
        (_, other) => {
            return Err(OpError::new(
                ErrorKind::Daemon,
                format!("a later page of a checkpoint list came back as another kind of answer ({other:?}): list again"),
            ))
        }
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_control::group::GroupCheckpoint;

    fn volume_page(names: &[&str], next: Option<&str>) -> Reply {
        let checkpoints = names
            .iter()
            .map(|n| CheckpointInfo {
                volume: "v".into(),
                name: (*n).into(),
                id: 0,
                size: 0,
                referenced: 0,
                parent: None,
                created_ms: 0,
                description: None,
                is_head_parent: false,
                automatic: false,
                pinned: false,
            })
            .collect();
        Reply::Checkpoints {
            checkpoints,
            head_parent: Some("a".into()),
            next: next.map(String::from),
        }
    }

    #[test]
    fn pages_are_put_together_in_order_and_their_cursors_taken() {
        let mut whole = volume_page(&["a", "b"], Some("2"));
        assert_eq!(take_next(&mut whole).as_deref(), Some("2"));
        let next = append_page(&mut whole, volume_page(&["c"], Some("3"))).expect("append");
        assert_eq!(next.as_deref(), Some("3"));
        assert_eq!(
            append_page(&mut whole, volume_page(&["d"], None)).expect("append"),
            None
        );
        match whole {
            Reply::Checkpoints {
                checkpoints,
                head_parent,
                next,
            } => {
                let names: Vec<_> = checkpoints.iter().map(|c| c.name.as_str()).collect();
                assert_eq!(names, ["a", "b", "c", "d"]);
                assert_eq!(head_parent.as_deref(), Some("a"));
                assert_eq!(next, None, "the whole list carries no cursor");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_page_of_another_kind_is_an_error() {
        let mut whole = volume_page(&["a"], Some("1"));
        take_next(&mut whole);
        let group = Reply::Group(GroupReply::Checkpoints {
            group: "g".into(),
            checkpoints: vec![GroupCheckpoint {
                name: "x".into(),
                created_ms: 0,
                description: None,
                members: Vec::new(),
            }],
            next: None,
        });
        let err = append_page(&mut whole, group).expect_err("refused");
        assert_eq!(err.kind, ErrorKind::Daemon);
    }
}
