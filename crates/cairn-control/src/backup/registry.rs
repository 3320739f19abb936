//! The store's side of backups, kept in `STORE/backup/`: the store's own id (`store-id`, so
//! backups of its volumes are incremental to each other and not to another host's), and the
//! repositories registered by name (`repos.json`: locations and endpoints, never secrets).

use std::path::{Path, PathBuf};

use cairn_backup::{Access, Location};
use serde::{Deserialize, Serialize};

use super::RepoSpec;
use crate::error::{ErrorKind, OpError};
use crate::files::{io_err, load_json, write_atomic};

/// One registered repository.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoEntry {
    /// Its name.
    pub name: String,
    /// Where it is.
    pub location: Location,
    /// Whether it is the store's default.
    #[serde(default)]
    pub default: bool,
    /// The file holding its passphrase, for the daemon's scheduled backups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub key_file: Option<PathBuf>,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Default, Serialize, Deserialize)]
struct Registry {
    repos: Vec<RepoEntry>,
}

fn dir_of(store: &Path) -> PathBuf {
    store.join("backup")
}

fn load(store: &Path) -> Result<Registry, OpError> {
    load_json(
        &dir_of(store).join("repos.json"),
        "register the repositories again",
    )
}

fn save(store: &Path, r: &Registry) -> Result<(), OpError> {
    let json = serde_json::to_vec_pretty(r).expect("the registry serializes");
    write_atomic(&dir_of(store).join("repos.json"), &json)
}

/// The store's backup id, made on first use.
pub fn store_id(store: &Path) -> Result<String, OpError> {
    let p = dir_of(store).join("store-id");
    match std::fs::read_to_string(&p) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", &p, e)),
    }
    let id = format!("{:032x}", rand::random::<u128>());
    write_atomic(&p, id.as_bytes())?;
    Ok(id)
}

/// Registers `name`.
pub fn add(
    store: &Path,
    name: &str,
    spec: &RepoSpec,
    default: bool,
) -> Result<Vec<RepoEntry>, OpError> {
    cairn_engine::validate_name(name)?;
    let given = spec.repo.as_deref().ok_or_else(|| {
        OpError::new(
            ErrorKind::Invalid,
            "give the repository: `cairn backup repo add NAME DIR|s3://BUCKET/PREFIX`",
        )
    })?;
    let location = Location::parse(given, spec.s3_endpoint.as_deref(), &spec.cwd)?;
    let mut r = load(store)?;
    if r.repos.iter().any(|e| e.name == name) {
        return Err(OpError::new(
            ErrorKind::Exists,
            format!("a repository named '{name}' is already registered; `cairn backup repo remove {name}` first"),
        ));
    }
    let default = default || r.repos.is_empty();
    if default {
        r.repos.iter_mut().for_each(|e| e.default = false);
    }
    r.repos.push(RepoEntry {
        name: name.into(),
        location,
        default,
        key_file: spec.key_file.clone(),
    });
    save(store, &r)?;
    Ok(r.repos)
}

/// The registered repositories.
pub fn list(store: &Path) -> Result<Vec<RepoEntry>, OpError> {
    Ok(load(store)?.repos)
}

/// Forgets `name`.
pub fn remove(store: &Path, name: &str) -> Result<Vec<RepoEntry>, OpError> {
    let mut r = load(store)?;
    let before = r.repos.len();
    r.repos.retain(|e| e.name != name);
    if r.repos.len() == before {
        return Err(unknown(name));
    }
    save(store, &r)?;
    Ok(r.repos)
}

fn unknown(name: &str) -> OpError {
    OpError::new(
        ErrorKind::NotFound,
        format!("no repository named '{name}' is registered; `cairn backup repo list` shows them, or give a directory or s3:// URL"),
    )
}

/// What `spec` opens: a registered name, else a path or URL, else the store's default. Without
/// a passphrase in `spec`, a registered repository's recorded key file gives it (so the web UI
/// and API clients need not send one).
pub fn access(store: &Path, spec: &RepoSpec) -> Result<Access, OpError> {
    let reg = load(store)?;
    let entry = match spec.repo.as_deref() {
        Some(given) => reg.repos.iter().find(|e| e.name == given),
        None => match reg.repos.iter().find(|e| e.default) {
            Some(e) => Some(e),
            None => {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    "no repository given and this store has no default; pass --repo DIR|s3://BUCKET/PREFIX|NAME, or `cairn backup repo add NAME REPO`",
                ))
            }
        },
    };
    let location = match entry {
        Some(e) => e.location.clone(),
        None => Location::parse(
            spec.repo.as_deref().unwrap_or_default(),
            spec.s3_endpoint.as_deref(),
            &spec.cwd,
        )?,
    };
    let passphrase = match (&spec.passphrase, entry.and_then(|e| e.key_file.as_ref())) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                crate::files::io_err("reading the repository's recorded key file", f, e)
            })?;
            Some(cairn_backup::Secret(
                text.lines().next().unwrap_or_default().to_string(),
            ))
        }
        (None, None) => None,
    };
    Ok(Access {
        location,
        passphrase,
        s3: spec.s3.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_the_first_is_the_default() {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = |r: &str| RepoSpec {
            repo: Some(r.into()),
            cwd: "/w".into(),
            ..RepoSpec::default()
        };
        add(dir.path(), "nas", &spec("/mnt/nas/cairn"), false).expect("add");
        add(dir.path(), "off", &spec("s3://bkt/site"), false).expect("add");
        let e = add(dir.path(), "nas", &spec("x"), false).expect_err("taken");
        assert_eq!(e.kind, ErrorKind::Exists);
        let a = access(dir.path(), &RepoSpec::default()).expect("default");
        assert_eq!(a.location.to_string(), "/mnt/nas/cairn");
        assert_eq!(
            access(dir.path(), &spec("off"))
                .expect("name")
                .location
                .to_string(),
            "s3://bkt/site"
        );
        assert_eq!(
            access(dir.path(), &spec("rel"))
                .expect("path")
                .location
                .to_string(),
            "/w/rel"
        );
        remove(dir.path(), "nas").expect("remove");
        let e = access(dir.path(), &RepoSpec::default()).expect_err("no default now");
        assert!(e.message.contains("repo add"), "{e}");
        assert_eq!(
            store_id(dir.path()).expect("id"),
            store_id(dir.path()).expect("same id")
        );
    }
}
