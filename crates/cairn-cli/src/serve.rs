//! `cairn serve`: the daemon in the foreground, with its log on stderr.

use anyhow::{bail, Context, Result};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use crate::store_options;

#[derive(Args)]
pub struct ServeArgs {
    /// Also serve NBD on TCP: ADDR:PORT, or just PORT for loopback (127.0.0.1).
    #[arg(long, value_name = "ADDR:PORT")]
    nbd_listen: Option<String>,
    /// Also serve the HTTP API and the web UI on TCP: ADDR:PORT, or just PORT for loopback.
    /// Off loopback it needs --tls-cert/--tls-key; every API call needs a token
    /// (`cairn token create`).
    #[arg(long, value_name = "ADDR:PORT")]
    http: Option<String>,
    /// PEM certificate (chain): TCP clients must then use TLS (NBD_OPT_STARTTLS for NBD,
    /// HTTPS for --http).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// What becomes of running VMs when the daemon stops (SIGTERM, SIGINT): `leave` them
    /// running for the next `cairn serve`, which reattaches them (their disk I/O waits up to
    /// 60 s for it), or `stop` them (ACPI power-off, hard after 10 s).
    #[arg(long, value_enum, default_value = "leave")]
    vms_on_exit: VmsOnExit,
    /// Do not run lifecycle policies (scheduled checkpoints, retention, the floor's reclaim of
    /// automatic checkpoints) while this daemon runs; the policies stay set, and `cairn prune`
    /// still applies retention when asked.
    #[arg(long)]
    no_lifecycle: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum VmsOnExit {
    Leave,
    Stop,
}

/// `PORT` alone means loopback: exposing disks to the network must be asked for explicitly.
fn parse_listen(flag: &str, s: &str) -> Result<std::net::SocketAddr> {
    if let Ok(port) = s.trim_start_matches(':').parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    s.parse().with_context(|| {
        format!("invalid {flag} '{s}': give ADDR:PORT (e.g. 127.0.0.1:10809) or a port")
    })
}

pub fn run(dir: &Path, args: ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only on a terminal: a log file or journal gets plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CAIRN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let nbd_listen = args
        .nbd_listen
        .as_deref()
        .map(|s| parse_listen("--nbd-listen", s))
        .transpose()?;
    let http_listen = args
        .http
        .as_deref()
        .map(|s| parse_listen("--http", s))
        .transpose()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(c), Some(k)) => {
            if nbd_listen.is_none() && http_listen.is_none() {
                bail!("--tls-cert/--tls-key secure the TCP listeners; add --nbd-listen ADDR:PORT or --http ADDR:PORT");
            }
            Some(cairn_nbd::tls::server_config(c, k)?)
        }
        _ => None,
    };
    let http = http_listen.map(|listen| cairn_http::HttpConfig {
        listen,
        tls: tls.clone(),
    });
    let config = cairn_daemon::DaemonConfig {
        store_dir: dir.to_path_buf(),
        options: store_options(),
        nbd_listen,
        http,
        lifecycle: !args.no_lifecycle,
        nbd: cairn_nbd::ServerConfig {
            tls: tls.filter(|_| nbd_listen.is_some()),
            ..Default::default()
        },
        stop_vms_on_exit: matches!(args.vms_on_exit, VmsOnExit::Stop),
    };
    cairn_daemon::run(config, |l| {
        eprintln!(
            "cairn: serving {} over NBD on {}{}",
            dir.display(),
            l.nbd_socket.display(),
            l.nbd_tcp
                .map(|a| format!(" and nbd://{a}"))
                .unwrap_or_default()
        );
        if let Some(url) = &l.http {
            eprintln!("cairn: HTTP API and web UI on {url}/ (tokens: `cairn token create NAME`)");
        }
    })?;
    Ok(())
}
