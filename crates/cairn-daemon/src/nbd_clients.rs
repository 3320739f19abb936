//! Applying a checkpoint changes a volume's head under whoever has it open over NBD. A client
//! with a cache or a mounted file system would go on with a view that no longer matches the disk,
//! so an apply is refused while such clients are connected, naming them, unless forced; forced,
//! it disconnects them first, so their next request fails instead of reading the rewound data.
//! A running VM's own QEMU is not such a client: the apply stops it and resumes it itself.

use std::time::Duration;

use cairn_control::{ErrorKind, OpError};
use cairn_nbd::{ClientInfo, Fence, Server};

/// How long disconnected clients get to finish the requests they have in flight.
const DISCONNECT_WAIT: Duration = Duration::from_secs(10);

/// Refuses, unless `force`, when clients other than process `exempt` are on the heads of
/// `volumes`; `what` names the checkpoint being applied.
pub(crate) fn check(
    server: &Server,
    volumes: &[String],
    exempt: Option<u32>,
    force: bool,
    what: &str,
) -> Result<(), OpError> {
    let others: Vec<ClientInfo> = server
        .head_clients(volumes)
        .into_iter()
        .filter(|c| exempt.is_none() || c.pid != exempt)
        .collect();
    if force || others.is_empty() {
        return Ok(());
    }
    Err(in_use(&others, what))
}

/// Fences the heads of `volumes` against new clients and empties them: the leftover connections
/// of process `exempt` (a VM's QEMU, stopped by now) always, and other clients when `force`
/// (else the apply is refused). The fence is held while the data changes.
pub(crate) async fn clear(
    server: &std::sync::Arc<Server>,
    volumes: &[String],
    exempt: Option<u32>,
    force: bool,
    what: &str,
) -> Result<Fence, OpError> {
    let (fence, on) = server.fence(volumes);
    let others: Vec<&ClientInfo> = on
        .iter()
        .filter(|c| exempt.is_none() || c.pid != exempt)
        .collect();
    if !force && !others.is_empty() {
        let others: Vec<ClientInfo> = others.into_iter().cloned().collect();
        return Err(in_use(&others, what));
    }
    if on.is_empty() {
        return Ok(fence);
    }
    let ids: Vec<u64> = on.iter().map(|c| c.id).collect();
    let stuck = server.disconnect(&ids, DISCONNECT_WAIT).await;
    if !stuck.is_empty() {
        return Err(OpError::new(
            ErrorKind::Busy,
            format!(
                "applying {what}: {} did not disconnect within {} s; nothing was changed; try again",
                list(&stuck),
                DISCONNECT_WAIT.as_secs()
            ),
        ));
    }
    Ok(fence)
}

fn in_use(clients: &[ClientInfo], what: &str) -> OpError {
    let mut volumes: Vec<&str> = clients.iter().map(|c| c.volume.as_str()).collect();
    volumes.dedup();
    let n = clients.len();
    let (count, them) = match n {
        1 => ("1 NBD client is".to_string(), "it"),
        _ => (format!("{n} NBD clients are"), "them"),
    };
    OpError::new(
        ErrorKind::Busy,
        format!(
            "cannot apply {what}: {count} connected to volume {} ({}), and the disk would change \
             under {them}; disconnect {them}, or add --force to disconnect {them} first",
            volumes
                .iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", "),
            list(clients)
        ),
    )
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
            format!("{} since {}", c.peer, cairn_control::names::time_str(ms))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
