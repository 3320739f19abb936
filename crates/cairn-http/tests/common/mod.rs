//! A store served on a loopback port of its own, and plain HTTP/1.1 requests to it.
#![allow(dead_code)]

use std::sync::Arc;

use cairn_control::tokens::{self, TokenOp, TokenReply};
use cairn_control::{DaemonStatus, Service};
use cairn_http::{AppState, HttpConfig};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct Api {
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    /// The store the API serves, for setting up and checking beside it.
    pub store: Arc<cairn_engine::Store>,
}

/// A store with volume `v`, served on a loopback port of its own.
pub async fn serve() -> Api {
    let dir = tempfile::tempdir().expect("tempdir");
    let opts = cairn_engine::Options::default();
    Service::init(dir.path(), opts.clone()).expect("init");
    let service = Service::open(dir.path(), opts).expect("open");
    service.store().create_volume("v", 1 << 20).expect("volume");
    let status = DaemonStatus {
        pid: std::process::id(),
        store: dir.path().to_path_buf(),
        nbd_socket: dir.path().join("nbd.sock"),
        nbd_tcp: None,
        version: "test".into(),
    };
    let config = HttpConfig {
        listen: "127.0.0.1:0".parse().expect("addr"),
        tls: None,
    };
    let server = cairn_http::bind(&config).await.expect("bind");
    let addr = server.local_addr();
    let store = service.store().clone();
    let state = AppState::new(Arc::new(service), status);
    tokio::spawn(server.serve(state, std::future::pending()));
    Api { addr, dir, store }
}

impl Api {
    pub fn token(&self, name: &str, read_only: bool, expires_secs: Option<u64>) -> String {
        let op = TokenOp::Create {
            name: name.into(),
            read_only,
            expires_secs,
        };
        match tokens::run(self.dir.path(), op).expect("token") {
            TokenReply::Created { secret, .. } => secret,
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Sends one request; returns the status and the JSON body (Null when there is none).
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> (u16, Value) {
        let mut s = tokio::net::TcpStream::connect(self.addr)
            .await
            .expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n",
            self.addr
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        if let Some(b) = body {
            req.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            ));
        }
        req.push_str("\r\n");
        req.push_str(body.unwrap_or(""));
        s.write_all(req.as_bytes()).await.expect("write");
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).await.expect("read");
        let text = String::from_utf8_lossy(&resp);
        let status: u16 = text[9..12].parse().expect("status");
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_string()
        };
        (status, serde_json::from_str(&body).unwrap_or(Value::Null))
    }
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

pub fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}
