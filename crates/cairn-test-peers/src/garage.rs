//! A Garage cluster: `n` nodes with replication `n` (Garage's own dev-cluster recipe), a bucket
//! and a key.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running cluster; every node is killed on drop.
pub struct Garage {
    /// The nodes, in start order.
    pub nodes: Vec<Node>,
    /// The access key's id.
    pub key_id: String,
    /// Its secret.
    pub secret: String,
    /// The bucket made for the tests.
    pub bucket: String,
}

/// One node.
pub struct Node {
    /// Its config file.
    pub config: PathBuf,
    /// Its S3 port on 127.0.0.1.
    pub s3_port: u16,
    /// Its process, until killed.
    pub child: Option<Child>,
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}

impl Node {
    /// Kills the node (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn binary() -> PathBuf {
    crate::cargo_bin("garage")
}

fn run(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(binary())
        .arg("-c")
        .arg(config)
        .args(args)
        .output()
        .expect("garage runs (scripts/setup-tests.sh installs it)")
}

/// `garage -c CONFIG args`; must succeed; returns stdout.
pub fn garage(config: &Path, args: &[&str]) -> String {
    let out = run(config, args);
    assert!(
        out.status.success(),
        "garage {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Retries a garage command until it succeeds (the cluster settles after joins and layout).
fn garage_eventually(config: &Path, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = run(config, args);
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        assert!(
            Instant::now() < deadline,
            "garage {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

impl Garage {
    /// Starts `n` nodes in `dir`, joins them, lays them out and makes bucket `cairn-test`.
    pub fn start(dir: &Path, n: usize) -> Garage {
        let rpc_secret: String = (0..32u32)
            .map(|i| format!("{:02x}", (i * 37 + 11) % 256))
            .collect();
        let mut nodes = Vec::new();
        for i in 0..n {
            let d = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&d).expect("node dir");
            let (rpc, s3, admin) = (crate::free_port(), crate::free_port(), crate::free_port());
            let config = d.join("garage.toml");
            let text = format!(
                "metadata_dir = \"{m}\"\ndata_dir = \"{da}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = {n}\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{rpc_secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n\
                 [admin]\napi_bind_addr = \"127.0.0.1:{admin}\"\n",
                m = d.join("meta").display(),
                da = d.join("data").display(),
            );
            std::fs::write(&config, text).expect("config");
            let log = std::fs::File::create(d.join("log")).expect("log");
            let child = Command::new(binary())
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("garage server");
            crate::wait_port(rpc, "garage");
            nodes.push(Node {
                config,
                s3_port: s3,
                child: Some(child),
            });
        }
        let ids: Vec<String> = nodes
            .iter()
            .map(|nd| {
                garage_eventually(&nd.config, &["node", "id", "-q"])
                    .trim()
                    .to_string()
            })
            .collect();
        let c = nodes[0].config.clone();
        for id in &ids[1..] {
            garage_eventually(&c, &["node", "connect", id]);
        }
        for id in &ids {
            garage_eventually(
                &c,
                &["layout", "assign", "-z", "dc1", "-c", "1G", &id[..16]],
            );
        }
        garage(&c, &["layout", "apply", "--version", "1"]);
        garage_eventually(&c, &["bucket", "create", "cairn-test"]);
        let key = garage_eventually(&c, &["key", "create", "cairn-test-key"]);
        let field = |name: &str| {
            key.lines()
                .find_map(|l| {
                    let l = l.trim();
                    l.strip_prefix(name)
                        .map(|v| v.trim().trim_start_matches(':').trim().to_string())
                })
                .unwrap_or_else(|| panic!("no '{name}' in: {key}"))
        };
        let key_id = field("Key ID");
        let secret = field("Secret key");
        garage_eventually(
            &c,
            &[
                "bucket",
                "allow",
                "--read",
                "--write",
                "--owner",
                "cairn-test",
                "--key",
                "cairn-test-key",
            ],
        );
        for nd in &nodes {
            crate::wait_port(nd.s3_port, "garage");
        }
        Garage {
            nodes,
            key_id,
            secret,
            bucket: "cairn-test".into(),
        }
    }
}
