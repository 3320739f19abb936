//! Applying a checkpoint changes a volume's head under whoever has it open over NBD. A client
//! with a cache or a mounted file system would go on with a view that no longer matches the disk,
//! so an apply is refused while such clients are connected, naming them, unless forced; forced,
//! it disconnects them first, so their next request fails instead of reading the rewound data.
//! A running VM's own QEMU is not such a client: the apply stops it and resumes it itself.

use std::sync::Arc;
use std::time::Duration;

use cairn_nbd::{ClientInfo, Fence, Server};
use cairn_vm::checkpoint::DiskUsers;
use cairn_vm::VmError;

/// How long disconnected clients get to finish the requests they have in flight.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// The NBD clients of the heads an apply of `what` (`TARGET@CHECKPOINT`) rewinds.
pub(crate) struct NbdUsers {
    pub(crate) server: Arc<Server>,
    pub(crate) force: bool,
    pub(crate) what: String,
}

impl DiskUsers for NbdUsers {
    type Fence = Fence;

    fn check(&self, volumes: &[String], exempt: Option<u32>) -> Result<(), VmError> {
        let others = others(self.server.head_clients(volumes), exempt);
        if self.force || others.is_empty() {
            return Ok(());
        }
        Err(in_use(&others, &self.what))
    }

    async fn clear(&self, volumes: &[String], exempt: Option<u32>) -> Result<Fence, VmError> {
        let (fence, on) = self.server.fence(volumes);
        let others = others(on.clone(), exempt);
        if !self.force && !others.is_empty() {
            return Err(in_use(&others, &self.what));
        }
        if on.is_empty() {
            return Ok(fence);
        }
        let ids: Vec<u64> = on.iter().map(|c| c.id).collect();
        let stuck = self.server.disconnect(&ids, DISCONNECT_WAIT).await;
        if !stuck.is_empty() {
            return Err(VmError::InUse(format!(
                "applying {}: {} did not disconnect within {} s; nothing was changed; try again",
                self.what,
                list(&stuck),
                DISCONNECT_WAIT.as_secs()
            )));
        }
        Ok(fence)
    }
}

/// The clients not of process `exempt` (a VM's QEMU).
fn others(clients: Vec<ClientInfo>, exempt: Option<u32>) -> Vec<ClientInfo> {
    clients
        .into_iter()
        .filter(|c| exempt.is_none() || c.pid != exempt)
        .collect()
}

fn in_use(clients: &[ClientInfo], what: &str) -> VmError {
    let mut volumes: Vec<&str> = clients.iter().map(|c| c.volume.as_str()).collect();
    volumes.dedup();
    let n = clients.len();
    let (count, them) = match n {
        1 => ("1 NBD client is".to_string(), "it"),
        _ => (format!("{n} NBD clients are"), "them"),
    };
    VmError::InUse(format!(
        "cannot apply {what}: {count} connected to volume {} ({}), and the disk would change \
         under {them}; disconnect {them}, or add --force to disconnect {them} first",
        volumes
            .iter()
            .map(|v| format!("'{v}'"))
            .collect::<Vec<_>>()
            .join(", "),
        list(clients)
    ))
}

/// `PEER since TIME` for each client.
fn list(clients: &[ClientInfo]) -> String {
    clients
        .iter()
        .map(|c| {
            let ms = c
                .since
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            format!("{} since {}", c.peer, crate::names::time_str(ms))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
