//! A store served by an in-process NBD server on a unix socket (and, if asked, TCP with TLS),
//! for real clients (qemu-io, qemu-img, nbdinfo, nbdcopy, nbdsh) to talk to.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_engine::{Options, Store};
use cairn_nbd::{Server, ServerConfig};

/// A served store; dropping it shuts the server down and flushes the store.
pub struct Served {
    pub store: Arc<Store>,
    pub socket: PathBuf,
    /// The TCP address, when served on TCP.
    pub tcp: Option<SocketAddr>,
    /// Scratch space beside the store, for images and certificates.
    pub work: PathBuf,
    server: Arc<Server>,
    rt: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

impl Served {
    /// A new store with `volumes` (name, size), served on a unix socket.
    pub fn new(volumes: &[(&str, u64)]) -> Served {
        Served::with(volumes, ServerConfig::default(), false)
    }

    /// Like [`Served::new`], with `config`, and also on a loopback TCP port when `tcp`.
    pub fn with(volumes: &[(&str, u64)], config: ServerConfig, tcp: bool) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("store");
        Store::init(&path, Options::default()).expect("init");
        let store = Arc::new(Store::open(&path, Options::default()).expect("open"));
        for (name, size) in volumes {
            store.create_volume(name, *size).expect("volume");
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let server = Server::new(store.clone(), config);
        let socket = dir.path().join("nbd.sock");
        let tcp = rt.block_on(async {
            let unix = tokio::net::UnixListener::bind(&socket).expect("bind unix");
            tokio::spawn(server.clone().serve_unix(unix));
            if !tcp {
                return None;
            }
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind tcp");
            let addr = l.local_addr().expect("addr");
            tokio::spawn(server.clone().serve_tcp(l));
            Some(addr)
        });
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).expect("work dir");
        Served {
            store,
            socket,
            tcp,
            work,
            server,
            rt,
            _dir: dir,
        }
    }

    /// The URI of `export` on the unix socket.
    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Checks the store's invariants.
    pub fn fsck_clean(&self) {
        let report = self.store.fsck().expect("fsck");
        assert!(report.errors.is_empty(), "{:?}", report.errors);
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.rt.block_on(self.server.shutdown());
        let _ = self.store.flush();
    }
}

// Not every test binary runs peer tools.
#[allow(unused_imports)]
pub use cairn_test_peers::{output, run};
