//! API tokens for the HTTP API on TCP: `STORE/tokens.json` holds each token's name, rights,
//! expiry and the BLAKE3 hash of its secret, never the secret itself, which is shown once when
//! the token is made. The secret is 256 random bits, so a fast hash is as safe here as a slow
//! one is for passwords: there is nothing to guess from a dictionary.
//!
//! Tokens are managed only by the store's owner (the CLI, or the daemon's unix socket); the HTTP
//! API refuses [`TokenOp`]s, so no token can mint or revoke another.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
use crate::files::{load_json, write_atomic};

/// File name of the token list inside the store directory.
pub const TOKENS_FILE: &str = "tokens.json";

/// What every secret starts with, so a leaked one is recognisable (e.g. by secret scanners).
pub const SECRET_PREFIX: &str = "cairn_";

/// A token operation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum TokenOp {
    /// Make a token; its secret is in the reply and nowhere else.
    Create {
        /// Name, unique in the store.
        name: String,
        /// Only reading calls are allowed.
        #[serde(default)]
        read_only: bool,
        /// Seconds until it stops working; never when absent.
        #[serde(default)]
        expires_secs: Option<u64>,
    },
    /// Every token (without secrets).
    List,
    /// Revoke a token at once.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// A token as listed: everything but the secret.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Name.
    pub name: String,
    /// Only reading calls are allowed.
    pub read_only: bool,
    /// When it was made (ms since the Unix epoch).
    pub created_ms: u64,
    /// When it stops working (ms since the Unix epoch), if ever.
    pub expires_ms: Option<u64>,
}

/// What a token operation returned.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TokenReply {
    /// A new token and its secret (shown this once).
    Created {
        /// The token.
        token: TokenInfo,
        /// The secret for `Authorization: Bearer ...`.
        secret: String,
    },
    /// Every token.
    List {
        /// The tokens, by name.
        tokens: Vec<TokenInfo>,
    },
    /// The token named is revoked.
    Revoked {
        /// Its name.
        name: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct TokenFile {
    tokens: Vec<StoredToken>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredToken {
    #[serde(flatten)]
    info: TokenInfo,
    /// BLAKE3 of the secret, hex.
    hash: String,
}

fn tokens_path(store_dir: &Path) -> PathBuf {
    store_dir.join(TOKENS_FILE)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

const REMEDY: &str = "make the tokens again with `cairn token create`";

fn save(path: &Path, file: &TokenFile) -> Result<(), OpError> {
    let bytes = serde_json::to_vec_pretty(file)
        .map_err(|e| OpError::new(ErrorKind::Io, format!("cannot encode the tokens: {e}")))?;
    write_atomic(path, &bytes)?;
    use std::os::unix::fs::PermissionsExt;
    // Hashes only, but the list of names and rights is still the owner's business.
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600));
    Ok(())
}

/// Runs a token operation on the store in `store_dir`.
pub fn run(store_dir: &Path, op: TokenOp) -> Result<TokenReply, OpError> {
    let path = tokens_path(store_dir);
    let mut file: TokenFile = load_json(&path, REMEDY)?;
    match op {
        TokenOp::Create {
            name,
            read_only,
            expires_secs,
        } => {
            cairn_engine::validate_name(&name).map_err(|e| {
                OpError::new(ErrorKind::Invalid, format!("invalid token name: {e}"))
            })?;
            if file.tokens.iter().any(|t| t.info.name == name) {
                return Err(OpError::new(
                    ErrorKind::Exists,
                    format!("token '{name}' exists; revoke it first or pick another name"),
                ));
            }
            let mut raw = [0u8; 32];
            rand::Rng::fill(&mut rand::rng(), &mut raw[..]);
            let secret = format!(
                "{SECRET_PREFIX}{}",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
            );
            let created_ms = now_ms();
            let info = TokenInfo {
                name,
                read_only,
                created_ms,
                expires_ms: expires_secs.map(|s| created_ms.saturating_add(s.saturating_mul(1000))),
            };
            file.tokens.push(StoredToken {
                info: info.clone(),
                hash: blake3::hash(secret.as_bytes()).to_hex().to_string(),
            });
            save(&path, &file)?;
            Ok(TokenReply::Created {
                token: info,
                secret,
            })
        }
        TokenOp::List => {
            let mut tokens: Vec<TokenInfo> = file.tokens.into_iter().map(|t| t.info).collect();
            tokens.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(TokenReply::List { tokens })
        }
        TokenOp::Revoke { name } => {
            let before = file.tokens.len();
            file.tokens.retain(|t| t.info.name != name);
            if file.tokens.len() == before {
                return Err(OpError::new(
                    ErrorKind::NotFound,
                    format!("no token '{name}'; `cairn token list` shows them"),
                ));
            }
            save(&path, &file)?;
            Ok(TokenReply::Revoked { name })
        }
    }
}

/// Why a presented secret was refused (never carries the secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    /// No token has this secret (wrong, or revoked).
    #[error("unknown or revoked token")]
    Unknown,
    /// The token's time is up.
    #[error("token '{0}' has expired; make a new one with `cairn token create`")]
    Expired(String),
    /// The token list cannot be read.
    #[error("{0}")]
    Unreadable(String),
}

/// Checks secrets against the store's token list, re-reading it when it changes on disk, so
/// a `cairn token revoke` takes effect on the next request.
pub struct TokenChecker {
    path: PathBuf,
    cache: Mutex<Option<(SystemTime, TokenFile)>>,
}

impl TokenChecker {
    /// A checker for the store in `store_dir`.
    pub fn new(store_dir: &Path) -> TokenChecker {
        TokenChecker {
            path: tokens_path(store_dir),
            cache: Mutex::new(None),
        }
    }

    /// The token `secret` belongs to, if it is valid now.
    pub fn check(&self, secret: &str) -> Result<TokenInfo, TokenRefusal> {
        let modified = match std::fs::metadata(&self.path) {
            Ok(m) => m.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(TokenRefusal::Unknown)
            }
            Err(e) => return Err(TokenRefusal::Unreadable(e.to_string())),
        };
        let mut cache = cairn_engine::sync::lock(&self.cache);
        if cache.as_ref().is_none_or(|(t, _)| *t != modified) {
            let file: TokenFile =
                load_json(&self.path, REMEDY).map_err(|e| TokenRefusal::Unreadable(e.message))?;
            *cache = Some((modified, file));
        }
        let Some((_, file)) = cache.as_ref() else {
            return Err(TokenRefusal::Unknown);
        };
        let presented = blake3::hash(secret.as_bytes());
        // blake3::Hash compares in constant time.
        let found = file
            .tokens
            .iter()
            .find(|t| blake3::Hash::from_hex(&t.hash).is_ok_and(|h| h == presented));
        match found {
            None => Err(TokenRefusal::Unknown),
            Some(t) if t.info.expires_ms.is_some_and(|e| e <= now_ms()) => {
                Err(TokenRefusal::Expired(t.info.name.clone()))
            }
            Some(t) => Ok(t.info.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn create(dir: &Path, name: &str, read_only: bool, expires: Option<u64>) -> String {
        match run(
            dir,
            TokenOp::Create {
                name: name.into(),
                read_only,
                expires_secs: expires,
            },
        ) {
            Ok(TokenReply::Created { secret, .. }) => secret,
            other => panic!("create: {other:?}"),
        }
    }

    #[test]
    fn secrets_check_until_revoked_and_are_never_stored() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = create(dir.path(), "ci", false, None);
        let b = create(dir.path(), "viewer", true, None);
        assert!(a.starts_with(SECRET_PREFIX) && a.len() > 40 && a != b);
        let stored = std::fs::read_to_string(dir.path().join(TOKENS_FILE)).expect("read");
        assert!(
            !stored.contains(&a[SECRET_PREFIX.len()..]),
            "secret on disk"
        );
        let checker = TokenChecker::new(dir.path());
        assert_eq!(checker.check(&a).expect("a").name, "ci");
        assert!(checker.check(&b).expect("b").read_only);
        assert_eq!(checker.check("cairn_wrong"), Err(TokenRefusal::Unknown));
        run(dir.path(), TokenOp::Revoke { name: "ci".into() }).expect("revoke");
        // The file changed, so the checker reads it again (mtime granularity is ns on ext4;
        // the length changed too, but the checker looks at mtime only).
        std::thread::sleep(std::time::Duration::from_millis(10));
        let f = std::fs::File::options()
            .append(true)
            .open(dir.path().join(TOKENS_FILE))
            .expect("open");
        f.set_modified(SystemTime::now()).expect("touch");
        assert_eq!(checker.check(&a), Err(TokenRefusal::Unknown));
        assert!(checker.check(&b).is_ok());
    }

    #[test]
    fn expired_tokens_and_duplicate_names_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = create(dir.path(), "short", false, Some(0));
        let checker = TokenChecker::new(dir.path());
        assert_eq!(
            checker.check(&s),
            Err(TokenRefusal::Expired("short".into()))
        );
        let dup = run(
            dir.path(),
            TokenOp::Create {
                name: "short".into(),
                read_only: false,
                expires_secs: None,
            },
        );
        assert_eq!(dup.expect_err("dup").kind, ErrorKind::Exists);
        let gone = run(
            dir.path(),
            TokenOp::Revoke {
                name: "nope".into(),
            },
        );
        assert_eq!(gone.expect_err("unknown").kind, ErrorKind::NotFound);
    }
}
