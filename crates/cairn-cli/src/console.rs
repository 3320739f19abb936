//! `cairn vm console`: a VM's serial console, as its log (what the guest printed, for scripts) or
//! attached to this terminal both ways, as `virsh console` does.

use std::io::{IsTerminal, Read, Seek, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Ctrl-], the byte that ends an attached session (telnet's and virsh's escape).
const DETACH: u8 = 0x1d;

/// After the input ends (a script piped it), output is shown until the guest is quiet this long.
const QUIET: Duration = Duration::from_secs(1);

/// Prints the console's log; with `follow`, keeps printing what the guest writes.
pub(crate) fn show_log(path: &Path, follow: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut f = loop {
        match std::fs::File::open(path) {
            Ok(f) => break f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !follow => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::thread::sleep(Duration::from_millis(200))
            }
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        }
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n > 0 {
            out.write_all(&buf[..n])?;
            out.flush()?;
            continue;
        }
        if !follow {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        // A new run truncates nothing (the log is appended), but stay correct if it shrank.
        let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        if len < f.stream_position()? {
            f.seek(std::io::SeekFrom::Start(0))?;
        }
    }
}

/// How an attached session ended.
enum Ended {
    Detached,
    InputClosed,
    ConsoleClosed,
}

/// Connects this terminal to a running VM's console until Ctrl-], the end of the input, or the
/// VM closing it. The guest's output still goes to the log meanwhile (QEMU writes both).
pub(crate) fn attach(name: &str, vm_dir: &Path) -> Result<()> {
    let _lock = SessionLock::take(name, &vm_dir.join("console.lock"))?;
    let path = vm_dir.join("console.sock");
    let sock = UnixStream::connect(&path).with_context(|| {
        format!(
            "cannot connect to the console of VM '{name}' at {}: a VM started by an older Cairn has none; restart it",
            path.display()
        )
    })?;
    let raw = match std::io::stdin().is_terminal() {
        true => Some(RawMode::enter()?),
        false => None,
    };
    eprint!("cairn: attached to the console of VM '{name}'; Ctrl-] detaches\r\n");
    let (tx, ended) = mpsc::channel::<Ended>();
    let started = Instant::now();
    let last_output = Arc::new(AtomicU64::new(0));
    {
        let (mut from, tx, last) = (sock.try_clone()?, tx.clone(), last_output.clone());
        std::thread::spawn(move || {
            let mut out = std::io::stdout();
            let mut buf = [0u8; 16 << 10];
            while let Ok(n @ 1..) = from.read(&mut buf) {
                if out.write_all(&buf[..n]).and_then(|_| out.flush()).is_err() {
                    break;
                }
                last.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            let _ = tx.send(Ended::ConsoleClosed);
        });
    }
    {
        let mut to = sock.try_clone()?;
        std::thread::spawn(move || {
            let mut input = std::io::stdin();
            let mut buf = [0u8; 4096];
            loop {
                let n = match input.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let (keys, detach) = match buf[..n].iter().position(|&b| b == DETACH) {
                    Some(i) => (&buf[..i], true),
                    None => (&buf[..n], false),
                };
                if to.write_all(keys).is_err() {
                    break;
                }
                if detach {
                    let _ = tx.send(Ended::Detached);
                    return;
                }
            }
            let _ = tx.send(Ended::InputClosed);
        });
    }
    let mut how = ended.recv().unwrap_or(Ended::ConsoleClosed);
    if let Ended::InputClosed = how {
        // What the guest answers to the last input is still shown.
        loop {
            match ended.recv_timeout(Duration::from_millis(100)) {
                Ok(Ended::ConsoleClosed) => {
                    how = Ended::ConsoleClosed;
                    break;
                }
                _ => {
                    let last = Duration::from_millis(last_output.load(Ordering::Relaxed));
                    if started.elapsed().saturating_sub(last) >= QUIET {
                        break;
                    }
                }
            }
        }
    }
    let _ = sock.shutdown(std::net::Shutdown::Both);
    drop(raw);
    match how {
        Ended::Detached | Ended::InputClosed => {
            eprintln!("\ncairn: detached from the console of VM '{name}'")
        }
        Ended::ConsoleClosed => eprintln!("\ncairn: VM '{name}' closed its console (it stopped)"),
    }
    Ok(())
}

/// One attached session per VM: QEMU serves one client on the console socket and leaves a second
/// one waiting unseen, so a lock file says who has it. The lock is held while the file is open.
struct SessionLock {
    _file: std::fs::File,
}

impl SessionLock {
    fn take(name: &str, path: &Path) -> Result<SessionLock> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = match holder.trim() {
                    "" => String::new(),
                    pid => format!(" (cairn pid {pid})"),
                };
                bail!("the console of VM '{name}' is attached in another session{holder}; detach there first with Ctrl-]");
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()))
            }
        }
        f.set_len(0)?;
        write!(f, "{}", std::process::id())?;
        Ok(SessionLock { _file: f })
    }
}

/// The terminal in raw mode (every key goes to the guest as typed, Ctrl-C included) until
/// dropped, which puts back the settings it found.
struct RawMode(rustix::termios::Termios);

impl RawMode {
    fn enter() -> Result<RawMode> {
        use rustix::termios::{tcgetattr, tcsetattr, OptionalActions};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).context("cannot read the terminal's settings")?;
        let mut raw = saved.clone();
        raw.make_raw();
        tcsetattr(&stdin, OptionalActions::Now, &raw)
            .context("cannot put the terminal in raw mode")?;
        Ok(RawMode(saved))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        let _ = rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &self.0);
    }
}
