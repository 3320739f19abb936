//! The web UI end to end in a real Chromium (Debian's, driven through chromedriver): sign in
//! with a token, make a volume and a VM on the test guest, start it, take a standard checkpoint
//! with a description full of markup, apply it (the guest's counter goes back), delete a
//! checkpoint and watch the space chart change. Screenshots land in target/web-artifacts/.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::guest::{disk_counter, first_counter_after, guest, APPEND};
use common::{env, kill_left_vms, ok, Daemon, Env};
use fantoccini::{Client, ClientBuilder, Locator};

/// What a checkpoint description may hold: it must show as typed, never as markup.
const MARKUP: &str = "<img src=x onerror=\"document.title='pwned'\"><b>bold</b> & 'quotes'";

struct Browser {
    driver: Child,
    port: u16,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

fn chromedriver() -> Browser {
    let port = free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver (scripts/setup-tests.sh installs chromium-driver)");
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "chromedriver did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Browser {
        driver,
        port,
        _profile: tempfile::tempdir().expect("profile"),
    }
}

async fn open_browser(b: &Browser) -> Client {
    let mut caps = serde_json::Map::new();
    // The flags keep Chromium off the network this machine does not have (background
    // fetches, component updates, sync) and make it run headless as root.
    let args = vec![
        "--headless=new".to_string(),
        "--no-sandbox".into(),
        "--disable-gpu".into(),
        "--disable-dev-shm-usage".into(),
        "--disable-background-networking".into(),
        "--disable-component-update".into(),
        "--disable-sync".into(),
        "--disable-quic".into(),
        "--no-first-run".into(),
        "--window-size=1400,900".into(),
        format!("--user-data-dir={}", b._profile.path().display()),
    ];
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }),
    );
    let connector = hyper_util::client::legacy::connect::HttpConnector::new();
    ClientBuilder::new(connector)
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", b.port))
        .await
        .expect("WebDriver session")
}

fn artifacts() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/web-artifacts");
    std::fs::create_dir_all(&d).expect("artifacts dir");
    d
}

async fn shot(c: &Client, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(artifacts().join(format!("{name}.png")), png).expect("save screenshot");
}

/// The daemon's HTTP address, from its log line.
fn http_url(d: &Daemon) -> String {
    let t = Instant::now();
    loop {
        let log = d.log();
        if let Some(l) = log.lines().find(|l| l.contains("HTTP API and web UI on ")) {
            let url = l
                .split("on ")
                .nth(1)
                .unwrap_or("")
                .split(' ')
                .next()
                .unwrap_or("");
            return url.trim_end_matches('/').to_string();
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no HTTP line: {log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn wait_css(c: &Client, css: &str) -> fantoccini::elements::Element {
    c.wait()
        .at_most(Duration::from_secs(30))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css} never appeared: {e}"))
}

/// Clicks the enabled button labelled `text` under `scope`, finding it again if the page redrew
/// it between finding and clicking.
async fn press(c: &Client, scope: &str, text: &str) {
    let xp = format!("{scope}//button[normalize-space(text())='{text}' and not(@disabled)]");
    let t = Instant::now();
    loop {
        let found = c
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::XPath(&xp))
            .await
            .unwrap_or_else(|e| panic!("no button '{text}': {e}"));
        match found.click().await {
            Ok(()) => return,
            Err(e) if t.elapsed() < Duration::from_secs(10) => {
                eprintln!("clicking '{text}' again: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("cannot click '{text}': {e}"),
        }
    }
}

/// Fills the open dialog's field labelled `label`.
async fn fill(c: &Client, label: &str, value: &str) {
    let xp = format!(
        "//dialog[@open]//label[normalize-space(text())='{label}']/following-sibling::*[1]"
    );
    let f = c
        .find(Locator::XPath(&xp))
        .await
        .unwrap_or_else(|e| panic!("field {label}: {e}"));
    f.clear().await.expect("clear");
    f.send_keys(value).await.expect("type");
}

/// Confirms the open dialog and waits for it to close.
async fn confirm(c: &Client) {
    c.find(Locator::Id("dialog-ok"))
        .await
        .expect("ok")
        .click()
        .await
        .expect("click ok");
    let t = Instant::now();
    while c.find(Locator::Css("dialog[open]")).await.is_ok() {
        let err = match c.find(Locator::Id("dialog-error")).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        assert!(err.is_empty(), "the dialog refused: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "the dialog never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn open_tab(c: &Client, id: &str) {
    c.find(Locator::Id(id))
        .await
        .expect("tab")
        .click()
        .await
        .expect("click tab");
}

/// The names of the bars in the space chart, once it is drawn.
async fn chart(c: &Client) -> Vec<String> {
    open_tab(c, "tab-space").await;
    wait_css(c, ".chart .bar-row").await;
    let mut names = Vec::new();
    for r in c
        .find_all(Locator::Css(".chart .bar-row"))
        .await
        .expect("rows")
    {
        names.push(r.attr("data-name").await.ok().flatten().unwrap_or_default());
    }
    names
}

fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    std::thread::spawn(f).join().expect("helper thread")
}

#[test]
fn the_ui_runs_a_vm_through_checkpoint_apply_and_delete() {
    let mut e = env();
    e.daemon = Some(Daemon::start_with(&e, &["--http", "0"]));
    let url = http_url(e.daemon.as_ref().expect("daemon"));
    let token = ok(&e, &["token", "create", "ui-test"]).trim().to_string();
    let browser = chromedriver();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let e = std::sync::Arc::new(e);
    rt.block_on(drive(e.clone(), &browser, &url, &token));
    kill_left_vms(&e.store);
}

async fn drive(e: std::sync::Arc<Env>, browser: &Browser, url: &str, token: &str) {
    let c = open_browser(browser).await;
    c.goto(&format!("{url}/")).await.expect("open the UI");
    wait_css(&c, "#token")
        .await
        .send_keys(token)
        .await
        .expect("token");
    press(&c, "//form[@id='login-form']", "Sign in").await;
    wait_css(&c, "#new-volume").await;
    shot(&c, "01-signed-in").await;

    // A volume and a VM on the test guest, made in the UI.
    c.find(Locator::Id("new-volume"))
        .await
        .expect("new volume")
        .click()
        .await
        .expect("click");
    fill(&c, "Name", "web-disk").await;
    fill(&c, "Size (e.g. 64M, 10G)", "64M").await;
    confirm(&c).await;
    let (kernel, initrd) = guest();
    c.find(Locator::Id("new-vm"))
        .await
        .expect("new vm")
        .click()
        .await
        .expect("click");
    fill(&c, "Name", "web").await;
    fill(&c, "Disks (existing volumes, comma-separated)", "web-disk").await;
    fill(
        &c,
        "Kernel (path on the host)",
        &kernel.display().to_string(),
    )
    .await;
    fill(
        &c,
        "Initramfs (path on the host)",
        &initrd.display().to_string(),
    )
    .await;
    fill(&c, "Kernel command line", APPEND).await;
    confirm(&c).await;
    wait_css(&c, "button.target[data-name='web']")
        .await
        .click()
        .await
        .expect("open VM");
    press(&c, "//div[@class='buttons']", "Start").await;
    // The guest counts on its console; the UI's console tab shows it.
    open_tab(&c, "tab-console").await;
    let t = Instant::now();
    loop {
        let text = wait_css(&c, "pre.console")
            .await
            .text()
            .await
            .unwrap_or_default();
        if text.matches("cairn-counter").count() >= 3 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(90),
            "the console never showed the counter: {text}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    shot(&c, "02-console").await;

    // A standard checkpoint, described with markup.
    open_tab(&c, "tab-checkpoints").await;
    press(&c, "//div[@class='tab-body']", "Create").await;
    fill(&c, "Name (a timestamp when empty)", "before").await;
    fill(&c, "Description", MARKUP).await;
    confirm(&c).await;
    let row = wait_css(&c, ".row[data-name='before']").await;
    let desc = row
        .find(Locator::Css(".desc"))
        .await
        .expect("description")
        .text()
        .await
        .expect("text");
    assert_eq!(desc, MARKUP, "the description is not shown as typed");
    assert!(
        row.find(Locator::Css("b, img")).await.is_err(),
        "markup in a description became elements"
    );
    assert_ne!(c.title().await.expect("title"), "pwned");
    let kind = row
        .find(Locator::Css(".badge"))
        .await
        .expect("kind")
        .text()
        .await
        .expect("text");
    assert_eq!(kind, "standard");
    shot(&c, "03-checkpoint").await;

    // Let the guest count on, then apply: it goes back to the checkpoint's count.
    let e2 = e.clone();
    let at_checkpoint = blocking(move || disk_counter(&e2, "web-disk@before"));
    let t = Instant::now();
    loop {
        let e2 = e.clone();
        if blocking(move || disk_counter(&e2, "web-disk")) >= at_checkpoint + 4 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest stopped counting"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let e2 = e.clone();
    let counted = blocking(move || disk_counter(&e2, "web-disk"));
    row.click().await.expect("pick the checkpoint");
    press(&c, "//div[@class='tab-body']", "Apply").await;
    let warning = wait_css(&c, "dialog[open] #dialog-body p")
        .await
        .text()
        .await
        .expect("text");
    assert!(warning.contains("replaces the current state"), "{warning}");
    shot(&c, "04-apply-dialog").await;
    confirm(&c).await;
    // The dialog closes once the apply returned; what the guest prints from here on is the
    // resumed guest's.
    let e2 = e.clone();
    let before_len = blocking(move || ok(&e2, &["vm", "console", "web"]).len());
    let e2 = e.clone();
    let resumed = blocking(move || first_counter_after(&e2, "web", before_len));
    assert!(
        resumed >= at_checkpoint && resumed < counted,
        "after the apply the guest counted {resumed} (checkpoint {at_checkpoint}, before the apply {counted})"
    );
    shot(&c, "05-applied").await;

    // A second checkpoint, then delete it: its bar leaves the space chart.
    press(&c, "//div[@class='tab-body']", "Create").await;
    fill(&c, "Name (a timestamp when empty)", "later").await;
    confirm(&c).await;
    wait_css(&c, ".row[data-name='later']").await;
    let bars = chart(&c).await;
    assert!(
        bars.contains(&"later".to_string()) && bars.contains(&"before".to_string()),
        "{bars:?}"
    );
    shot(&c, "06-space-before-delete").await;
    open_tab(&c, "tab-checkpoints").await;
    wait_css(&c, ".row[data-name='later']")
        .await
        .click()
        .await
        .expect("pick");
    press(&c, "//div[@class='tab-body']", "Delete").await;
    let frees = wait_css(&c, "dialog[open] #dialog-body p")
        .await
        .text()
        .await
        .expect("text");
    assert!(
        frees.contains("frees") && frees.contains("(exact)"),
        "{frees}"
    );
    confirm(&c).await;
    let t = Instant::now();
    while c
        .find(Locator::Css(".row[data-name='later']"))
        .await
        .is_ok()
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the deleted row stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = chart(&c).await;
    assert!(!after.contains(&"later".to_string()), "{after:?}");
    assert_eq!(
        after.len() + 1,
        bars.len(),
        "before {bars:?}, after {after:?}"
    );
    shot(&c, "07-space-after-delete").await;
    let e2 = e.clone();
    let names = blocking(move || common::checkpoint_names(&e2, "web"));
    assert!(
        names.contains(&"before".to_string()) && !names.contains(&"later".to_string()),
        "{names:?}"
    );
    let _ = c.close().await;
}

/// The port of the daemon's HTTP line (whatever address it names).
fn http_port(d: &Daemon) -> u16 {
    http_url(d)
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port in the HTTP line")
}

#[test]
fn off_loopback_the_api_needs_tls_and_serves_https() {
    let mut e = env();
    // Plain HTTP on every interface is refused before anything is served.
    let out = common::cairn(&e, &["serve", "--http", "0.0.0.0:0"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-cert") && err.contains("in the clear"),
        "{err}"
    );

    let (srv, cli) = cairn_test_peers::tls::make_certs(&e.work);
    let cert = srv.join("server-cert.pem").display().to_string();
    let key = srv.join("server-key.pem").display().to_string();
    let d = Daemon::start_with(
        &e,
        &[
            "--http",
            "0.0.0.0:0",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    );
    assert!(http_url(&d).starts_with("https://"), "{}", http_url(&d));
    let port = http_port(&d);
    e.daemon = Some(d);
    let token = ok(&e, &["token", "create", "remote"]).trim().to_string();
    let url = format!("https://127.0.0.1:{port}/api/v1/volumes");
    let ca = cli.join("ca-cert.pem").display().to_string();
    let auth = format!("Authorization: Bearer {token}");
    let body = common::run(
        "curl",
        &["-sS", "--fail", "--cacert", &ca, "-H", &auth, &url],
    );
    assert_eq!(body.trim(), "[]");
    // Plain HTTP to the TLS port gets nothing.
    let plain = common::output(
        "curl",
        &[
            "-sS",
            "--max-time",
            "5",
            "-H",
            &auth,
            &format!("http://127.0.0.1:{port}/api/v1/volumes"),
        ],
    );
    assert!(!plain.status.success(), "plain HTTP was answered");
    // The UI's page comes over HTTPS too, with its content security policy.
    let head = common::run(
        "curl",
        &[
            "-sS",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "--cacert",
            &ca,
            &format!("https://127.0.0.1:{port}/"),
        ],
    );
    assert!(
        head.to_ascii_lowercase()
            .contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
}

/// Creates `n` checkpoints of `volume` in a chain from inside the page (the API, one by one).
async fn many_checkpoints(c: &Client, volume: &str, n: usize) {
    let script = r#"
        const [volume, n, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
        (async () => {
          const h = { Authorization: 'Bearer ' + sessionStorage.getItem('cairn-token'), 'Content-Type': 'application/json' };
          for (let i = 0; i < n; i++) {
            const name = 'c' + String(i).padStart(5, '0');
            const r = await fetch('/api/v1/targets/' + volume + '/checkpoints', { method: 'POST', headers: h, body: JSON.stringify({ name }) });
            if (!r.ok) return done('failed at ' + name + ': ' + (await r.text()));
          }
          done('ok');
        })();"#;
    c.update_timeouts(fantoccini::wd::TimeoutConfiguration::new(
        Some(Duration::from_secs(300)),
        Some(Duration::from_secs(300)),
        Some(Duration::ZERO),
    ))
    .await
    .expect("script timeout");
    let r = c
        .execute_async(
            script,
            vec![serde_json::json!(volume), serde_json::json!(n)],
        )
        .await
        .expect("create checkpoints");
    assert_eq!(r, serde_json::json!("ok"));
}

/// How many checkpoints volume `name` has, asked from the page with its token.
async fn checkpoint_count(c: &Client, name: &str) -> usize {
    let js = format!("return fetch('/api/v1/volumes/{name}', {{headers: {{Authorization: 'Bearer ' + sessionStorage.getItem('cairn-token')}}}}).then(r => r.json()).then(v => v.checkpoints)");
    let n = c.execute(&js, vec![]).await.expect("count");
    n.as_u64().expect("a count") as usize
}

/// A tree row's indentation.
async fn padding(c: &Client, name: &str) -> String {
    let css = format!(".tree .row[data-name='{name}']");
    wait_css(c, &css)
        .await
        .css_value("padding-left")
        .await
        .expect("padding")
}

#[test]
fn the_ui_stays_usable_with_many_checkpoints_and_shows_policies_and_backups() {
    let mut e = env();
    e.daemon = Some(Daemon::start_with(&e, &["--http", "0"]));
    let url = http_url(e.daemon.as_ref().expect("daemon"));
    ok(&e, &["volume", "create", "big", "--size", "16M"]);
    ok(
        &e,
        &[
            "volume",
            "write",
            "big",
            "--offset",
            "0",
            "--pattern",
            "0x5a",
            "--length",
            "1M",
        ],
    );
    ok(&e, &["checkpoint", "create", "big@base"]);
    let repo = e.work.join("repo").display().to_string();
    ok(&e, &["backup", "init", &repo, "--no-encryption"]);
    ok(&e, &["backup", "repo", "add", "local", &repo]);
    ok(&e, &["backup", "create", "big@base"]);
    let token = ok(&e, &["token", "create", "ui-test"]).trim().to_string();
    let browser = chromedriver();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let c = open_browser(&browser).await;
        c.goto(&format!("{url}/")).await.expect("open the UI");
        wait_css(&c, "#token").await.send_keys(&token).await.expect("token");
        press(&c, "//form[@id='login-form']", "Sign in").await;
        wait_css(&c, "#new-volume").await;
        const N: usize = 1500;
        many_checkpoints(&c, "big", N).await;

        // The page by its address; the tree holds only the rows in view.
        c.goto(&format!("{url}/#volume/big")).await.expect("open big");
        wait_css(&c, ".tree .row[data-name='base']").await;
        let in_dom = c.find_all(Locator::Css(".tree .row")).await.expect("rows").len();
        assert!(in_dom < 100, "{in_dom} rows in the DOM for {N} checkpoints");
        let first_pad = padding(&c, "base").await;
        c.execute("const t = document.querySelector('.tree'); t.scrollTop = t.scrollHeight;", vec![])
            .await
            .expect("scroll");
        let last = format!("c{:05}", N - 1);
        // A chain stays in one column: the last checkpoint is not 1,500 steps to the right.
        assert_eq!(padding(&c, &last).await, first_pad);
        shot(&c, "11-many-checkpoints-bottom").await;
        // Keyboard: the arrow keys move the current row.
        wait_css(&c, &format!(".tree .row[data-name='{last}']")).await.click().await.expect("pick");
        let tree = c.find(Locator::Css(".tree")).await.expect("tree");
        tree.send_keys("\u{E013}").await.expect("arrow up");
        let before = format!("c{:05}", N - 2);
        wait_css(&c, &format!(".tree .row.current[data-name='{before}']")).await;

        // A policy edited with the prune preview, then saved.
        c.find(Locator::Css("nav [data-page='policies']")).await.expect("nav").click().await.expect("policies");
        press(&c, "//section[@id='page']", "New policy…").await;
        fill(&c, "VM, volume or \"default\"", "big").await;
        fill(&c, "Keep last", "10").await;
        c.find(Locator::XPath("//dialog[@open]//label[normalize-space(text())='Also prune checkpoints taken by name']/following-sibling::input"))
            .await
            .expect("checkbox")
            .click()
            .await
            .expect("tick");
        press(&c, "//dialog[@open]", "Preview what would be pruned").await;
        let t = Instant::now();
        let preview = loop {
            let text = wait_css(&c, "dialog[open] .preview").await.text().await.unwrap_or_default();
            if text.contains("would go") {
                break text;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "no preview: {text}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let total = N + 1;
        assert!(
            preview.contains(&format!("{} of {total} checkpoints would go", total - 10)),
            "{preview}"
        );
        shot(&c, "12-policy-preview").await;
        // Previewing deleted nothing.
        assert_eq!(checkpoint_count(&c, "big").await, total);
        confirm(&c).await;
        let row = wait_css(&c, "#page table tbody tr").await.text().await.expect("text");
        assert!(row.starts_with("big") && row.contains("last 10"), "{row}");

        // The daemon's scheduler applies the saved policy at once; the events page shows it.
        c.find(Locator::Css("nav [data-page='events']")).await.expect("nav").click().await.expect("events");
        let pruned = wait_css(&c, "ol.events li[data-kind='pruned']").await.text().await.expect("text");
        assert!(pruned.contains("big"), "{pruned}");
        shot(&c, "13-events").await;
        assert_eq!(checkpoint_count(&c, "big").await, 10);

        // The backup, listed and verified from the UI.
        c.find(Locator::Css("nav [data-page='backups']")).await.expect("nav").click().await.expect("backups");
        press(&c, "//section[@id='page']", "List backups").await;
        let row = wait_css(&c, "#page table tbody tr").await;
        let text = row.text().await.expect("text");
        assert!(text.contains("big@base"), "{text}");
        press(&c, "//section[@id='page']//tbody", "Verify").await;
        let t = Instant::now();
        loop {
            let s = c.find(Locator::Id("status")).await.expect("status").text().await.unwrap_or_default();
            if s.starts_with("Verified 1 backup") {
                break;
            }
            assert!(!s.contains("failed") && !s.contains("Damage"), "{s}");
            assert!(t.elapsed() < Duration::from_secs(60), "no verify result: {s}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        shot(&c, "14-backups").await;
        let _ = c.close().await;
    });
}
