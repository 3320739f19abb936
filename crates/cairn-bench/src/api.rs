//! `cairn bench --api`: the HTTP API and the web UI on a store whose volume has 10,000
//! checkpoints. Each reading call is timed from the request's first byte to the answer's last,
//! one at a time on a kept-alive connection, after a warm-up, for a fixed time; the table gives
//! p50 and p99. Then the UI's first paint in Debian's Chromium (headless, through chromedriver):
//! from navigation start to the first rows of that volume's checkpoint tree, over fresh loads.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_control::tokens::{self, TokenOp, TokenReply};
use cairn_control::{DaemonStatus, Service};
use serde_json::{json, Value};

use crate::http::Conn;
use crate::{median, Settings};

/// Checkpoints on the measured volume.
const CHECKPOINTS: usize = 10_000;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A store with volume `v` holding [`CHECKPOINTS`] checkpoints (a 4 KiB write before each tenth,
/// so they hold different data) and 20 small volumes beside it.
fn build_store(dir: &std::path::Path, settings: &Settings) -> Result<Service> {
    Service::init(dir, settings.options.clone())?;
    let svc = Service::open(dir, settings.options.clone())?;
    let s = svc.store();
    s.create_volume("v", 256 << 20)?;
    let t = Instant::now();
    for i in 0..CHECKPOINTS {
        if i % 10 == 0 {
            let block = (i as u64 * 7919) % ((256 << 20) / 4096);
            s.write("v", block * 4096, &[(i % 251) as u8; 4096])?;
        }
        s.create_checkpoint_unflushed("v", &format!("cp-{i:05}"), Some("bench"))?;
    }
    s.flush()?;
    eprintln!(
        "bench: {CHECKPOINTS} checkpoints made in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    for i in 0..20 {
        s.create_volume(&format!("small-{i:02}"), 16 << 20)?;
    }
    Ok(svc)
}

/// What a CLI command without a daemon pays before its work: opening the store (10,000
/// checkpoints) and one volume's info, warm (after one untimed open), over repeated opens.
fn open_times(store_dir: &std::path::Path, settings: &Settings) -> Result<String> {
    let once = || -> Result<f64> {
        let t = Instant::now();
        let svc = Service::open(store_dir, settings.options.clone())?;
        svc.store().volume_info("v")?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        drop(svc);
        Ok(ms)
    };
    once()?;
    let n = if settings.quick { 5 } else { 31 };
    let mut times = (0..n).map(|_| once()).collect::<Result<Vec<_>>>()?;
    times.sort_by(|a, b| a.total_cmp(b));
    let p50 = percentile(&times, 0.5);
    Ok(format!(
        "Opening the store with {CHECKPOINTS} checkpoints and reading one volume's info, as a CLI command without a daemon does, warm, {n} opens: p50 {p50:.1} ms, slowest {:.1} ms (goal < 50 ms: {}).\n\n",
        times[n - 1],
        if p50 < 50.0 { "met" } else { "**not met**" }
    ))
}

/// Runs the API and UI benchmark; returns its Markdown report.
pub fn run(dir: &std::path::Path, settings: &Settings) -> Result<String> {
    let store_dir = dir.join("store");
    drop(build_store(&store_dir, settings)?);
    let open_report = open_times(&store_dir, settings)?;
    let svc = Service::open(&store_dir, settings.options.clone())?;
    let secret = match tokens::run(
        &store_dir,
        TokenOp::Create {
            name: "bench".into(),
            read_only: true,
            expires_secs: None,
        },
    )? {
        TokenReply::Created { secret, .. } => secret,
        other => bail!("unexpected token reply {other:?}"),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let status = DaemonStatus {
        pid: std::process::id(),
        store: store_dir.clone(),
        nbd_socket: store_dir.join("nbd.sock"),
        nbd_tcp: None,
        version: env!("CARGO_PKG_VERSION").into(),
    };
    let server = rt.block_on(cairn_http::bind(&cairn_http::HttpConfig {
        listen: "127.0.0.1:0".parse()?,
        tls: None,
    }))?;
    let addr = server.local_addr();
    let state = cairn_http::AppState::new(Arc::new(svc), status);
    rt.spawn(server.serve(state, std::future::pending()));

    let auth = format!("Bearer {secret}");
    let (warm, each) = match settings.quick {
        true => (Duration::from_millis(200), Duration::from_secs(1)),
        false => (Duration::from_secs(2), Duration::from_secs(10)),
    };
    let mut conn = Conn::open(addr)?;
    let list = "/api/v1/targets/v/checkpoints";
    let cursors = page_cursors(&mut conn, list, &auth)?;
    let last_page = format!(
        "{list}?after={}",
        cursors.last().context("the list has one page only")?
    );
    let calls: [(&str, &str, Option<Value>); 10] = [
        ("daemon status", "/api/v1/status", None),
        ("volume list (21)", "/api/v1/volumes", None),
        ("one volume", "/api/v1/volumes/v", None),
        ("policies", "/api/v1/policies", None),
        ("events", "/api/v1/events?limit=100", None),
        (
            "what deleting one frees",
            "/api/v1/targets/v/space/freed?checkpoints=cp-05000",
            None,
        ),
        (
            "change between two",
            "/api/v1/targets/v/diff?from=cp-00001&to=cp-09999",
            None,
        ),
        ("checkpoint list, first page (1,000)", list, None),
        ("checkpoint list, last page (1,000)", &last_page, None),
        (
            "op: volume info",
            "/api/v1/ops",
            Some(json!({"op": "volume_info", "name": "v"})),
        ),
    ];
    let mut out = format!(
        "HTTP API on loopback, read-only token, one kept-alive connection; volume `v` has {CHECKPOINTS} checkpoints; {} s per call after {} ms of warm-up\n\n\
         | call | requests | p50 ms | p99 ms | answer bytes | p99 < 5 ms |\n|---|---|---|---|---|---|\n",
        each.as_secs(),
        warm.as_millis()
    );
    for (label, path, body) in &calls {
        let body = body.as_ref().map(|b| b.to_string().into_bytes());
        let method = if body.is_some() { "POST" } else { "GET" };
        let send = |conn: &mut Conn| -> Result<usize> {
            let (st, b) = conn.call(method, path, &[("Authorization", &auth)], body.as_deref())?;
            if st != 200 {
                bail!("{path}: {st} {}", String::from_utf8_lossy(&b));
            }
            Ok(b.len())
        };
        let t = Instant::now();
        while t.elapsed() < warm {
            send(&mut conn)?;
        }
        let mut times = Vec::new();
        let mut bytes = 0;
        let t = Instant::now();
        while t.elapsed() < each {
            let s = Instant::now();
            bytes = send(&mut conn)?;
            times.push(s.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        let p99 = percentile(&times, 0.99);
        out.push_str(&format!(
            "| {label} | {} | {:.2} | {:.2} | {bytes} | {} |\n",
            times.len(),
            percentile(&times, 0.5),
            p99,
            if p99 < 5.0 { "yes" } else { "**no**" }
        ));
    }
    let mut wholes = Vec::new();
    let t = Instant::now();
    while t.elapsed() < each {
        let s = Instant::now();
        page_cursors(&mut conn, list, &auth)?;
        wholes.push(s.elapsed().as_secs_f64() * 1000.0);
    }
    wholes.sort_by(|a, b| a.total_cmp(b));
    out.push_str(&format!(
        "\nThe whole list of {CHECKPOINTS} in {} pages, one after another as the UI loads it: p50 {:.2} ms, p99 {:.2} ms over {} loads.\n\n",
        cursors.len() + 1,
        percentile(&wholes, 0.5),
        percentile(&wholes, 0.99),
        wholes.len()
    ));
    out.push_str(&open_report);
    out.push_str(&first_paint(addr, &secret, settings.quick)?);
    drop(rt);
    Ok(out)
}

/// Walks a checkpoint list page by page; the cursors that start the pages after the first.
fn page_cursors(conn: &mut Conn, list: &str, auth: &str) -> Result<Vec<String>> {
    let mut cursors: Vec<String> = Vec::new();
    loop {
        let path = match cursors.last() {
            None => list.to_string(),
            Some(c) => format!("{list}?after={c}"),
        };
        let (st, b) = conn.call("GET", &path, &[("Authorization", auth)], None)?;
        if st != 200 {
            bail!("{path}: {st} {}", String::from_utf8_lossy(&b));
        }
        // Only the cursor is wanted, so the 200 kB answer is searched, not parsed: a quote
        // inside a JSON string is escaped, so `"next":"` occurs only as the field itself.
        const KEY: &[u8] = b"\"next\":\"";
        let Some(at) = b.windows(KEY.len()).position(|w| w == KEY) else {
            return Ok(cursors);
        };
        let rest = &b[at + KEY.len()..];
        let end = rest
            .iter()
            .position(|&c| c == b'"')
            .context("a cursor without its end")?;
        cursors.push(String::from_utf8_lossy(&rest[..end]).into_owned());
    }
}

/// chromedriver on a free port; killed on drop.
struct Driver {
    child: Child,
    addr: SocketAddr,
    profile: std::path::PathBuf,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

fn webdriver(conn: &mut Conn, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
    let b = body.map(|v| v.to_string().into_bytes());
    let (st, out) = conn.call(method, path, &[], b.as_deref())?;
    let v: Value = serde_json::from_slice(&out).unwrap_or(Value::Null);
    if st != 200 {
        bail!("WebDriver {method} {path}: {st} {v}");
    }
    Ok(v["value"].clone())
}

/// The UI's first paint: median and slowest over fresh loads of the volume's page.
fn first_paint(api: SocketAddr, secret: &str, quick: bool) -> Result<String> {
    if which("chromedriver").is_none() || which("chromium").is_none() {
        return Ok("UI first paint: not measured (chromium and chromium-driver are not installed; scripts/setup-tests.sh installs them)\n".into());
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let profile = std::env::temp_dir().join(format!("cairn-bench-chromium-{}", std::process::id()));
    let driver = Driver {
        child: Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("chromedriver")?,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        profile,
    };
    let t = Instant::now();
    let mut conn = loop {
        match Conn::open(driver.addr) {
            Ok(c) => break c,
            Err(_) if t.elapsed() < Duration::from_secs(20) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => return Err(e),
        }
    };
    let caps = json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
        "binary": "/usr/bin/chromium",
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--no-first-run", "--window-size=1400,900",
                 format!("--user-data-dir={}", driver.profile.display())]}}}});
    let session = webdriver(&mut conn, "POST", "/session", Some(caps))?;
    let id = session["sessionId"]
        .as_str()
        .context("no WebDriver session id")?
        .to_string();
    let base = format!("http://{api}/");
    webdriver(
        &mut conn,
        "POST",
        &format!("/session/{id}/url"),
        Some(json!({"url": base})),
    )?;
    let script = |s: &str| json!({"script": s, "args": []});
    webdriver(
        &mut conn,
        "POST",
        &format!("/session/{id}/execute/sync"),
        Some(script(&format!(
            "sessionStorage.setItem('cairn-token', '{secret}')"
        ))),
    )?;
    let loads = if quick { 3 } else { 11 };
    let mut times = Vec::new();
    for _ in 0..loads {
        // A new document each time (about:blank between), so nothing is carried over.
        webdriver(
            &mut conn,
            "POST",
            &format!("/session/{id}/url"),
            Some(json!({"url": "about:blank"})),
        )?;
        webdriver(
            &mut conn,
            "POST",
            &format!("/session/{id}/url"),
            Some(json!({"url": format!("{base}#volume/v")})),
        )?;
        let t = Instant::now();
        let painted = loop {
            let v = webdriver(
                &mut conn,
                "POST",
                &format!("/session/{id}/execute/sync"),
                Some(script(
                    "return window.cairnTreePaintMs === undefined ? null : window.cairnTreePaintMs",
                )),
            )?;
            if let Some(ms) = v.as_f64() {
                break ms;
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the checkpoint tree never painted");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        times.push(painted);
    }
    let _ = webdriver(&mut conn, "DELETE", &format!("/session/{id}"), None);
    let worst = times.iter().copied().fold(0.0, f64::max);
    let med = median(times);
    Ok(format!(
        "UI first paint in Chromium (headless), navigation start to the first rows of the {CHECKPOINTS}-checkpoint tree, {loads} fresh loads: median {med:.0} ms, slowest {worst:.0} ms (goal < 1000 ms: {})\n",
        if worst < 1000.0 { "met" } else { "**not met**" }
    ))
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(program))
            .find(|f| f.is_file())
    })
}
