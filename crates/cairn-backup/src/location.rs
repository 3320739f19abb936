//! Where a repository lives and what it takes to open it: a directory or an S3 bucket and
//! prefix, the S3 endpoint and credentials, and the passphrase. Front ends fill an [`Access`]
//! from their arguments and environment; the daemon receives it with each operation, so it acts
//! with the caller's credentials, not its own.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{BackupError, Result};

/// A repository's place.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Location {
    /// A directory on a local (or mounted) file system; always absolute.
    Local {
        /// The directory.
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        path: PathBuf,
    },
    /// A prefix in an S3 bucket.
    S3 {
        /// Bucket name.
        bucket: String,
        /// Key prefix, without leading or trailing `/` (may be empty).
        prefix: String,
        /// Endpoint URL for S3-compatible servers (Garage, MinIO, Ceph RGW); AWS when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
    },
}

impl Location {
    /// Parses `s3://BUCKET[/PREFIX]` or a directory path. Relative paths are taken from `cwd`
    /// (a daemon runs elsewhere than the command that names the path).
    pub fn parse(s: &str, endpoint: Option<&str>, cwd: &std::path::Path) -> Result<Location> {
        let bad = |why: &str| BackupError::BadLocation {
            location: s.into(),
            why: why.into(),
        };
        if let Some(rest) = s.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "-.".contains(c);
            if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
                return Err(bad(
                    "an S3 bucket name is 3 to 63 lowercase letters, digits, '-' or '.'",
                ));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|p| p == "." || p == "..") || prefix.contains("//") {
                return Err(bad("the prefix cannot contain '.', '..' or empty parts"));
            }
            let endpoint = endpoint
                .map(str::to_string)
                .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
                .filter(|e| !e.is_empty());
            if let Some(e) = &endpoint {
                if !e.starts_with("http://") && !e.starts_with("https://") {
                    return Err(bad("--s3-endpoint is a URL such as http://127.0.0.1:3900"));
                }
            }
            return Ok(Location::S3 {
                bucket: bucket.into(),
                prefix: prefix.into(),
                endpoint,
            });
        }
        if s.contains("://") {
            return Err(bad("only local directories and s3:// are supported"));
        }
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if endpoint.is_some() {
            return Err(bad("--s3-endpoint applies to s3:// repositories only"));
        }
        Ok(Location::Local { path: cwd.join(s) })
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Local { path } => write!(f, "{}", path.display()),
            Location::S3 { bucket, prefix, .. } if prefix.is_empty() => write!(f, "s3://{bucket}"),
            Location::S3 { bucket, prefix, .. } => write!(f, "s3://{bucket}/{prefix}"),
        }
    }
}

impl fmt::Debug for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A secret (a passphrase, a key file's contents, an S3 secret key) that never shows in logs or
/// debug output.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<secret>")
    }
}

/// S3 credentials and region (from the `AWS_*` variables of whoever asks), and how long to
/// retry.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Options {
    /// `AWS_ACCESS_KEY_ID`.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub secret_access_key: Option<Secret>,
    /// `AWS_SESSION_TOKEN`.
    #[serde(default)]
    pub session_token: Option<Secret>,
    /// `AWS_REGION` or `AWS_DEFAULT_REGION`.
    #[serde(default)]
    pub region: Option<String>,
    /// How long a failing request is retried before the error is reported, in seconds
    /// (`CAIRN_S3_RETRY_SECS`, default 120).
    #[serde(default)]
    pub retry_secs: Option<u64>,
}

impl S3Options {
    /// Reads the usual `AWS_*` variables.
    pub fn from_env() -> S3Options {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        S3Options {
            access_key_id: var("AWS_ACCESS_KEY_ID"),
            secret_access_key: var("AWS_SECRET_ACCESS_KEY").map(Secret),
            session_token: var("AWS_SESSION_TOKEN").map(Secret),
            region: var("AWS_REGION").or_else(|| var("AWS_DEFAULT_REGION")),
            retry_secs: var("CAIRN_S3_RETRY_SECS").and_then(|s| s.parse().ok()),
        }
    }
}

/// Everything needed to open a repository.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Access {
    /// Where it is.
    pub location: Location,
    /// The passphrase (or key file contents) of an encrypted repository.
    #[serde(default)]
    pub passphrase: Option<Secret>,
    /// For S3 locations.
    #[serde(default)]
    pub s3: S3Options,
}

impl Access {
    /// Access to `location` with the passphrase and credentials of this process's environment
    /// (`CAIRN_BACKUP_PASSPHRASE`, `AWS_*`).
    pub fn from_env(location: Location) -> Access {
        Access {
            location,
            passphrase: std::env::var("CAIRN_BACKUP_PASSPHRASE").ok().map(Secret),
            s3: S3Options::from_env(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn locations_parse_and_print() {
        let cwd = Path::new("/home/u");
        let l = Location::parse("s3://bkp/cairn/hostA/", Some("http://127.0.0.1:3900"), cwd)
            .expect("s3");
        assert_eq!(l.to_string(), "s3://bkp/cairn/hostA");
        assert_eq!(
            Location::parse("repo", None, cwd).expect("dir").to_string(),
            "/home/u/repo"
        );
        assert_eq!(
            Location::parse("/r", None, cwd).expect("abs").to_string(),
            "/r"
        );
        for bad in ["s3://A_B", "s3://x", "http://h/x", "", "s3://bkt/a/../b"] {
            let e = Location::parse(bad, None, cwd).expect_err(bad);
            assert!(e.to_string().contains("not a repository location"), "{e}");
        }
        let e = Location::parse("s3://bkt", Some("127.0.0.1:3900"), cwd).expect_err("url");
        assert!(e.to_string().contains("--s3-endpoint"), "{e}");
    }

    #[test]
    fn secrets_do_not_print() {
        let a = Access {
            location: Location::Local { path: "/r".into() },
            passphrase: Some(Secret("hunter2".into())),
            s3: S3Options::default(),
        };
        assert!(!format!("{a:?}").contains("hunter2"));
    }
}
