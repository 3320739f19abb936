//! Everything the CLI prints on stdout goes through here, so that a reader that goes away (`cairn
//! diff A B --json | head`) ends the command quietly, as it ends every Unix tool, instead of a
//! panic in `println!`. The process keeps ignoring SIGPIPE (Rust's default) because a write to the
//! daemon's socket must fail as an error the user sees, not kill the CLI silently.

use serde::Serialize;
use std::fmt;
use std::io::Write;

/// The exit status of a process ended by SIGPIPE under a shell (128 + 13), so `set -o pipefail`
/// sees this command as it sees `cat` or `yes` cut short by `head`.
pub const BROKEN_PIPE_STATUS: i32 = 141;

/// Prints one line on stdout; a closed stdout ends the process quietly.
pub fn line(args: fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.write_all(b"\n")) {
        end_if_broken_pipe(&e);
        // Any other failure to print (a full disk behind a redirect) is an error of its own.
        eprintln!("cairn: error: cannot write to standard output: {e}");
        std::process::exit(1);
    }
}

/// Ends the process quietly when `e` says the reader of stdout is gone.
pub fn end_if_broken_pipe(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(BROKEN_PIPE_STATUS);
    }
}

/// Whether an error, or anything it was caused by, is a closed stdout.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` that ends the process quietly when stdout's reader is gone.
macro_rules! outln {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Prints a failure as `{"error": {"kind": ..., "message": ...}}` on stdout, for `--json`.
pub fn json_error(kind: &str, message: &str) {
    let v = serde_json::json!({ "error": { "kind": kind, "message": message } });
    line(format_args!("{v:#}"));
}

/// The kind of a failure, as the daemon's API names it (`not_found`, `exists`, `invalid`...):
/// from the typed error the failure carries, else `invalid` (the CLI's own checks of its
/// arguments), or `io` for a host I/O error.
pub fn error_kind(e: &anyhow::Error) -> &'static str {
    use cairn_control::ErrorKind;
    let kind = e.chain().find_map(|c| {
        if let Some(op) = c.downcast_ref::<cairn_control::OpError>() {
            Some(op.kind)
        } else if let Some(engine) = c.downcast_ref::<cairn_engine::Error>() {
            Some(ErrorKind::of_engine(engine))
        } else if let Some(b) = c.downcast_ref::<cairn_backup::BackupError>() {
            Some(ErrorKind::of_backup(b))
        } else if let Some(vm) = c.downcast_ref::<cairn_vm::VmError>() {
            Some(ErrorKind::of_vm(vm))
        } else {
            c.downcast_ref::<std::io::Error>().map(|_| ErrorKind::Io)
        }
    });
    kind.map_or("invalid", ErrorKind::name)
}

/// Prints a value as pretty JSON, for `--json`.
pub(crate) fn print_json<T: Serialize>(v: &T) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}
