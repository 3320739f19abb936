//! `cairn token ...`: bearer tokens for the HTTP API (`cairn serve --http`). The secret is
//! printed once; the store keeps only its hash.

use anyhow::{bail, Result};
use cairn_control::tokens::{TokenInfo, TokenOp, TokenReply};
use cairn_control::{Op, Reply};
use clap::Subcommand;

use crate::backend::Backend;
use crate::output::outln;
use crate::units::parse_duration;
use crate::{print_json, time_str};

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Make a token and print its secret (shown this once; the store keeps only a hash).
    Create {
        /// The token's name (e.g. who or what uses it).
        name: String,
        /// Only reading calls (GET) are allowed.
        #[arg(long)]
        read_only: bool,
        /// It stops working after this long: 30d, 12h, 2w...
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// Every token: name, rights, made, expires (never the secret).
    List,
    /// Revoke a token; requests with it fail from the next one on.
    Revoke {
        /// The token's name.
        name: String,
    },
}

pub fn run(store: &Backend, cmd: TokenCmd, json: bool) -> Result<()> {
    let op = match cmd {
        TokenCmd::Create {
            name,
            read_only,
            expires,
        } => TokenOp::Create {
            name,
            read_only,
            expires_secs: expires.as_deref().map(parse_duration).transpose()?,
        },
        TokenCmd::List => TokenOp::List,
        TokenCmd::Revoke { name } => TokenOp::Revoke { name },
    };
    let Reply::Token(reply) = store.call(Op::Token(op))? else {
        bail!("unexpected reply");
    };
    if json {
        return print_json(&reply);
    }
    match reply {
        TokenReply::Created { token, secret } => {
            outln!("{secret}");
            eprintln!(
                "token '{}' made ({}); this secret is not shown again: send it as `Authorization: Bearer <secret>`",
                token.name,
                rights(&token)
            );
        }
        TokenReply::List { tokens } => {
            if tokens.is_empty() {
                outln!("no tokens; `cairn token create NAME` makes one");
            }
            for t in &tokens {
                outln!(
                    "{:<20} {:<10} made {}  {}",
                    t.name,
                    if t.read_only {
                        "read-only"
                    } else {
                        "read-write"
                    },
                    time_str(t.created_ms),
                    t.expires_ms
                        .map(|e| format!("expires {}", time_str(e)))
                        .unwrap_or_else(|| "never expires".into())
                );
            }
        }
        TokenReply::Revoked { name } => outln!("revoked token '{name}'"),
    }
    Ok(())
}

fn rights(t: &TokenInfo) -> String {
    let r = if t.read_only {
        "read-only"
    } else {
        "read-write"
    };
    match t.expires_ms {
        Some(e) => format!("{r}, expires {}", time_str(e)),
        None => format!("{r}, never expires"),
    }
}
