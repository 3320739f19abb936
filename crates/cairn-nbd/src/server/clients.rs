//! Who is connected to which export, so that an operation that changes a volume's head under its
//! clients (applying a checkpoint) can name them, refuse, or disconnect them first; and fences that
//! keep new clients of a head out while such an operation runs.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use super::*;

/// One connected client, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Connection number, unique for the server's life.
    pub id: u64,
    /// The export it negotiated (`NAME` or `NAME@CHECKPOINT`).
    pub export: String,
    /// The volume behind the export.
    pub volume: String,
    /// Whether it is on the volume's head (which an apply changes) rather than a checkpoint.
    pub head: bool,
    /// Where it connects from: a TCP address, or a unix-socket peer with its process.
    pub peer: String,
    /// The peer's process id, for unix-socket clients (from `SO_PEERCRED`).
    pub pid: Option<u32>,
    /// When it finished negotiating.
    pub since: SystemTime,
}

/// Connected clients and fenced volumes, under one lock so that a fence and a late registration
/// cannot pass each other.
#[derive(Default)]
pub(super) struct Registry {
    next: u64,
    live: HashMap<u64, (ClientInfo, watch::Sender<bool>)>,
    fenced: HashMap<String, usize>,
}

/// A registered connection: dropping it takes the client off the list.
pub(super) struct Registration {
    server: Arc<Server>,
    id: u64,
    /// Turns true when the server is told to disconnect this client.
    pub(super) kicked: watch::Receiver<bool>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.server.registry().live.remove(&self.id);
        self.server.clients_changed.notify_waiters();
    }
}

/// While held, new clients of the fenced volumes' heads are refused (see [`Server::fence`]).
pub struct Fence {
    server: Arc<Server>,
    volumes: Vec<String>,
}

impl Drop for Fence {
    fn drop(&mut self) {
        let mut reg = self.server.registry();
        for v in &self.volumes {
            if let Some(n) = reg.fenced.get_mut(v) {
                *n -= 1;
                if *n == 0 {
                    reg.fenced.remove(v);
                }
            }
        }
    }
}

impl Server {
    pub(super) fn registry(&self) -> std::sync::MutexGuard<'_, Registry> {
        cairn_engine::sync::lock(&self.clients)
    }

    /// Every client that finished negotiating and is still connected, oldest first.
    pub fn clients(&self) -> Vec<ClientInfo> {
        let mut all: Vec<ClientInfo> = self
            .registry()
            .live
            .values()
            .map(|(c, _)| c.clone())
            .collect();
        all.sort_by_key(|c| c.id);
        all
    }

    /// Clients on the head of any of `volumes`.
    pub fn head_clients(&self, volumes: &[String]) -> Vec<ClientInfo> {
        let mut found: Vec<ClientInfo> = self
            .clients()
            .into_iter()
            .filter(|c| c.head && volumes.contains(&c.volume))
            .collect();
        found.sort_by_key(|c| c.id);
        found
    }

    /// Refuses new clients of the heads of `volumes` until the fence is dropped, and returns the
    /// clients already on them at that moment; nobody can join between the two.
    pub fn fence(self: &Arc<Self>, volumes: &[String]) -> (Fence, Vec<ClientInfo>) {
        let mut reg = self.registry();
        for v in volumes {
            *reg.fenced.entry(v.clone()).or_default() += 1;
        }
        let mut on: Vec<ClientInfo> = reg
            .live
            .values()
            .filter(|(c, _)| c.head && volumes.contains(&c.volume))
            .map(|(c, _)| c.clone())
            .collect();
        drop(reg);
        on.sort_by_key(|c| c.id);
        let fence = Fence {
            server: self.clone(),
            volumes: volumes.to_vec(),
        };
        (fence, on)
    }

    pub(super) fn is_fenced(&self, volume: &str) -> bool {
        self.registry().fenced.contains_key(volume)
    }

    /// Disconnects the clients `ids`: each stops reading requests, finishes the ones in flight,
    /// and closes, so its next request fails rather than seeing a changed disk. Returns the ones
    /// still connected after `timeout` (a client whose request is stuck in the engine).
    pub async fn disconnect(&self, ids: &[u64], timeout: Duration) -> Vec<ClientInfo> {
        let deadline = tokio::time::Instant::now() + timeout;
        for (c, kick) in self.registry().live.values() {
            if ids.contains(&c.id) {
                info!(
                    "nbd: {}: disconnecting from '{}' on request",
                    c.peer, c.export
                );
                let _ = kick.send(true);
            }
        }
        loop {
            let changed = self.clients_changed.notified();
            let left: Vec<ClientInfo> = self
                .clients()
                .into_iter()
                .filter(|c| ids.contains(&c.id))
                .collect();
            if left.is_empty() || tokio::time::Instant::now() >= deadline {
                return left;
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }

    /// Adds a negotiated client to the list, unless its head is fenced (then `None`: the
    /// connection closes).
    pub(super) fn register(
        self: &Arc<Self>,
        export: &Export,
        peer: &str,
        pid: Option<u32>,
    ) -> Option<Registration> {
        let mut reg = self.registry();
        let head = export.target.checkpoint.is_none();
        if head && reg.fenced.contains_key(&export.target.volume) {
            return None;
        }
        reg.next += 1;
        let id = reg.next;
        let (kick, kicked) = watch::channel(false);
        let info = ClientInfo {
            id,
            export: export.name.clone(),
            volume: export.target.volume.clone(),
            head,
            peer: peer.to_string(),
            pid,
            since: SystemTime::now(),
        };
        reg.live.insert(id, (info, kick));
        Some(Registration {
            server: self.clone(),
            id,
            kicked,
        })
    }
}

/// How a unix-socket peer is named in logs and messages: its pid and program.
pub(super) fn unix_peer(pid: Option<i32>) -> (String, Option<u32>) {
    match pid.and_then(|p| u32::try_from(p).ok()).filter(|&p| p > 0) {
        Some(pid) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_default();
            let name = if comm.is_empty() {
                format!("unix client pid {pid}")
            } else {
                format!("unix client pid {pid} ({comm})")
            };
            (name, Some(pid))
        }
        None => ("unix client".into(), None),
    }
}
