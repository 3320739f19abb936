//! Import and export of disk images in every format `qemu-img` knows, by running
//! `qemu-img convert` against a Cairn NBD export. Holes stay holes both ways: on import the new
//! volume is known to read as zeros (`--target-is-zero`), on export `qemu-img` asks the export's
//! `base:allocation` block status and skips unmapped ranges.

use anyhow::{bail, Context, Result};
use cairn_control::Op;
use cairn_daemon::PrivateServer;
use cairn_engine::{Target, VolumeInfo};
use std::io::{IsTerminal, Read};
use std::path::Path;
use std::process::{Command, Stdio};

use crate::backend::Backend;
use crate::progress;

/// Formats named by file extension when `--format` is not given on export.
const BY_EXTENSION: &[(&str, &str)] = &[
    ("qcow2", "qcow2"),
    ("vhdx", "vhdx"),
    ("vmdk", "vmdk"),
    ("vdi", "vdi"),
    ("vpc", "vpc"),
    ("vhd", "vpc"),
    ("qed", "qed"),
    ("raw", "raw"),
    ("img", "raw"),
];

/// The output format for `file`: `--format` if given, else its extension. An unknown or missing
/// extension is refused rather than written raw, so `disk.qcow` never silently becomes a raw
/// image a tool then misreads.
pub fn export_format(file: &Path, format: Option<&str>) -> Result<String> {
    if let Some(f) = format {
        return Ok(f.to_string());
    }
    let ext = file
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match BY_EXTENSION.iter().find(|(e, _)| *e == ext) {
        Some((_, f)) => Ok(f.to_string()),
        None => {
            let known: Vec<String> = BY_EXTENSION.iter().map(|(e, _)| format!(".{e}")).collect();
            bail!(
                "cannot tell the image format of {} from its extension (known: {}); name the format with --format (e.g. --format raw)",
                file.display(),
                known.join(", ")
            )
        }
    }
}

fn qemu_img() -> Command {
    Command::new("qemu-img")
}

fn not_found(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        anyhow::anyhow!(
            "qemu-img is not installed; run ./scripts/setup.sh (or install Debian's qemu-utils)"
        )
    } else {
        anyhow::Error::new(e).context("cannot run qemu-img")
    }
}

/// Format and virtual size of an image, as `qemu-img info` sees it.
fn probe(file: &Path, format: Option<&str>) -> Result<(String, u64)> {
    let mut cmd = qemu_img();
    cmd.args(["info", "--output=json"]);
    if let Some(f) = format {
        cmd.args(["-f", f]);
    }
    let out = cmd.arg(file).output().map_err(not_found)?;
    if !out.status.success() {
        bail!(
            "qemu-img cannot read {}: {}",
            file.display(),
            last_line(&out.stderr)
        );
    }
    let info: serde_json::Value = serde_json::from_slice(&out.stdout)
        .context("qemu-img info printed something unexpected")?;
    let fmt = info["format"]
        .as_str()
        .context("qemu-img info gave no format")?
        .to_string();
    let size = info["virtual-size"]
        .as_u64()
        .context("qemu-img info gave no virtual size")?;
    Ok((fmt, size))
}

fn last_line(b: &[u8]) -> String {
    String::from_utf8_lossy(b)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("(no message)")
        .trim()
        .to_string()
}

/// Runs `qemu-img convert` with `args`, drawing its `-p` percentage as a progress bar of `bytes`
/// when stderr is a terminal.
fn convert(args: &[String], bytes: u64, label: &'static str) -> Result<()> {
    let tty = std::io::stderr().is_terminal();
    let mut cmd = qemu_img();
    cmd.arg("convert");
    if tty {
        cmd.arg("-p");
    }
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().map_err(not_found)?;
    let mut stderr = child.stderr.take().context("qemu-img stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let pb = progress(bytes, label);
    if let Some(mut out) = child.stdout.take() {
        // `-p` prints "    (12.34/100%)\r" repeatedly.
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while out.read(&mut byte).unwrap_or(0) == 1 {
            if byte[0] == b'\r' || byte[0] == b'\n' {
                let s = String::from_utf8_lossy(&line);
                if let Some(p) = s
                    .trim()
                    .strip_prefix('(')
                    .and_then(|s| s.split('/').next())
                    .and_then(|s| s.parse::<f64>().ok())
                {
                    pb.set_position((bytes as f64 * p / 100.0) as u64);
                }
                line.clear();
            } else {
                line.push(byte[0]);
            }
        }
    }
    let status = child.wait().context("waiting for qemu-img")?;
    pb.finish_and_clear();
    let err = err_reader.join().unwrap_or_default();
    if !status.success() {
        bail!("qemu-img convert failed: {}", last_line(&err));
    }
    Ok(())
}

/// An NBD export to hand to `qemu-img`: the daemon's when one owns the store, else a private
/// server started for this command.
struct Endpoint {
    private: Option<PrivateServer>,
    daemon_socket: Option<std::path::PathBuf>,
}

impl Endpoint {
    fn new(backend: &Backend) -> Result<Endpoint> {
        Ok(match backend {
            Backend::Local(service) => Endpoint {
                private: Some(PrivateServer::start(service.store().clone())?),
                daemon_socket: None,
            },
            Backend::Daemon(c) => Endpoint {
                private: None,
                daemon_socket: Some(c.status()?.nbd_socket),
            },
        })
    }

    fn uri(&self, export: &str) -> String {
        match (&self.private, &self.daemon_socket) {
            (Some(p), _) => p.uri(export),
            (None, Some(s)) => format!("nbd+unix:///{export}?socket={}", s.display()),
            (None, None) => String::new(),
        }
    }

    fn stop(self) {
        if let Some(p) = self.private {
            p.stop();
        }
    }
}

/// Creates volume `name` from the image `file` (any format `qemu-img` reads; probed unless
/// given). A failed import leaves no volume behind.
pub fn import(
    backend: &Backend,
    name: &str,
    file: &Path,
    format: Option<&str>,
) -> Result<VolumeInfo> {
    if !file.exists() {
        bail!("cannot import {}: no such file", file.display());
    }
    let (fmt, size) = probe(file, format)?;
    if size == 0 {
        bail!(
            "{} is empty; a volume needs at least 512 bytes",
            file.display()
        );
    }
    backend.volume(Op::VolumeCreate {
        name: name.to_string(),
        size: size.div_ceil(512) * 512,
    })?;
    let result = (|| -> Result<()> {
        let endpoint = Endpoint::new(backend)?;
        let r = convert(
            &[
                "-n".into(),
                "--target-is-zero".into(),
                "-W".into(),
                "-f".into(),
                fmt.clone(),
                "-O".into(),
                "raw".into(),
                file.display().to_string(),
                endpoint.uri(name),
            ],
            size,
            "import",
        );
        endpoint.stop();
        r?;
        backend.done(Op::Flush)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = backend.call(Op::VolumeDelete {
            name: name.to_string(),
        });
        return Err(e.context(format!(
            "import of {} ({fmt}) into '{name}' failed; nothing was kept",
            file.display()
        )));
    }
    backend.volume(Op::VolumeInfo {
        name: name.to_string(),
    })
}

/// Writes a head or checkpoint to `file` in `format`; returns the image's virtual size.
pub fn export(backend: &Backend, t: &Target, file: &Path, format: &str) -> Result<u64> {
    let size = match &t.checkpoint {
        None => {
            backend
                .volume(Op::VolumeInfo {
                    name: t.volume.clone(),
                })?
                .size
        }
        Some(c) => backend
            .checkpoints(&t.volume)?
            .0
            .into_iter()
            .find(|x| &x.name == c)
            .map(|x| x.size)
            .ok_or_else(|| cairn_engine::Error::UnknownCheckpoint {
                volume: t.volume.clone(),
                name: c.clone(),
            })?,
    };
    let endpoint = Endpoint::new(backend)?;
    let r = convert(
        &[
            "-f".into(),
            "raw".into(),
            "-O".into(),
            format.into(),
            endpoint.uri(&t.to_string()),
            file.display().to_string(),
        ],
        size,
        "export",
    );
    endpoint.stop();
    r.with_context(|| format!("export of {t} to {} ({format}) failed", file.display()))?;
    Ok(size)
}
