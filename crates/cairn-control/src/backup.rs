//! Backup operations: [`BackupOp`] in, [`Reply`] out. The repository work is `cairn-backup`'s;
//! this room resolves which repository an operation means (a name registered in the store, a
//! path, a URL, or the store's default), keeps the store's side (its id, the registry, the
//! checkpoints a backup reads, the volume a restore fills) and maps errors to their kinds.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use cairn_backup::create::create;
use cairn_backup::gc::{gc, GcReport};
use cairn_backup::prune::{prune, KeepPolicy, PruneEntry};
use cairn_backup::verify::{verify, VerifyReport};
use cairn_backup::{BackupError, Manifest, Repository, S3Options, Secret};
use cairn_engine::{Store, Target};
use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, OpError};
use crate::ops::Reply;

pub mod live;
pub mod mount;
pub(crate) mod registry;
mod restore;
pub(crate) mod vm;

pub use live::{LiveRestores, LiveStatus};
pub use mount::MountedExport;
pub use registry::RepoEntry;

/// Which repository an operation uses, and what opens it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoSpec {
    /// A registered name, a directory, or `s3://BUCKET/PREFIX`; the store's default if absent.
    #[serde(default)]
    pub repo: Option<String>,
    /// S3 endpoint for S3-compatible servers.
    #[serde(default)]
    pub s3_endpoint: Option<String>,
    /// The caller's working directory (relative paths are relative to it, not to the daemon's).
    #[serde(default)]
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub cwd: PathBuf,
    /// Passphrase or key file contents.
    #[serde(default)]
    pub passphrase: Option<Secret>,
    /// The caller's `AWS_*` credentials.
    #[serde(default)]
    pub s3: S3Options,
    /// The file the passphrase came from (absolute): registering a repository records it, so
    /// the daemon's scheduled backups can read it (the store never keeps the secret itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub key_file: Option<PathBuf>,
}

/// Where a restore writes.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RestoreTo {
    /// A new volume.
    Volume {
        /// Its name.
        name: String,
    },
    /// An image file in any format `qemu-img` writes.
    File {
        /// The file (absolute).
        #[cfg_attr(feature = "openapi", schema(value_type = String))]
        path: PathBuf,
        /// `raw`, `qcow2`, `vmdk`...
        format: String,
    },
}

/// One backup operation.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "backup", rename_all = "snake_case")]
pub enum BackupOp {
    /// Make a new repository.
    Init {
        /// Where.
        repo: RepoSpec,
        /// Encrypt (the default).
        encrypt: bool,
    },
    /// Register a repository under a name in this store.
    RepoAdd {
        /// The name later commands use with `--repo`.
        name: String,
        /// The repository (its location and endpoint are kept, never secrets).
        repo: RepoSpec,
        /// Make it the store's default.
        #[serde(default)]
        default: bool,
    },
    /// Registered repositories.
    RepoList,
    /// Forget a registered repository (its data stays).
    RepoRemove {
        /// Its name.
        name: String,
    },
    /// Back up a checkpoint.
    Create {
        /// `VOLUME@CHECKPOINT`.
        target: String,
        /// Into which repository.
        repo: RepoSpec,
    },
    /// Backups in a repository, oldest first.
    List {
        /// The repository.
        repo: RepoSpec,
        /// Only backups of this volume or VM.
        #[serde(default)]
        name: Option<String>,
    },
    /// One backup.
    Info {
        /// The repository.
        repo: RepoSpec,
        /// Backup id or a unique prefix.
        id: String,
    },
    /// Read and check a backup's chunks (or every backup's).
    Verify {
        /// The repository.
        repo: RepoSpec,
        /// Only this backup.
        #[serde(default)]
        id: Option<String>,
        /// Share of packs to read, in percent.
        #[serde(default = "hundred")]
        sample_percent: f64,
    },
    /// Remove backups a retention policy does not keep (this store's backups; of one volume or
    /// VM if `name`).
    Prune {
        /// The repository.
        repo: RepoSpec,
        /// Only backups of this volume or VM.
        #[serde(default)]
        name: Option<String>,
        /// What to keep.
        policy: KeepPolicy,
        /// Only say what would go.
        #[serde(default)]
        dry_run: bool,
    },
    /// Free the data no backup needs (two phases: condemn now, delete after the grace period).
    Gc {
        /// The repository.
        repo: RepoSpec,
        /// How long a condemnation waits at least, seconds.
        #[serde(default = "default_grace")]
        grace_secs: u64,
    },
    /// Restore a backup.
    Restore {
        /// The repository.
        repo: RepoSpec,
        /// Backup id or a unique prefix.
        id: String,
        /// Where to.
        to: RestoreTo,
        /// Make the volume (or start the VM) at once and copy the data in behind it (daemon
        /// only); run again after a daemon restart to go on.
        #[serde(default)]
        live: bool,
        /// Bytes per second a live restore copies in the background at most (clients' reads
        /// are never held back); unlimited if absent.
        #[serde(default)]
        rate_limit: Option<u64>,
    },
    /// Serve every image of a backup read-only over NBD (daemon only).
    Mount {
        /// The repository.
        repo: RepoSpec,
        /// Backup id or a unique prefix.
        id: String,
    },
    /// Stop serving a mounted backup (an id prefix) or one of its exports (daemon only).
    Unmount {
        /// Backup id prefix or export name.
        id: String,
    },
    /// Mounted backups' exports (daemon only).
    Mounts,
    /// Live restores under way (daemon only).
    Live,
}

fn hundred() -> f64 {
    100.0
}

/// GC's default grace period: an hour, far beyond the clock skew between hosts (live writers
/// are protected by their sessions, not by the grace period).
pub const DEFAULT_GRACE_SECS: u64 = 3600;

fn default_grace() -> u64 {
    DEFAULT_GRACE_SECS
}

/// A backup as commands show it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupInfo {
    /// The repository.
    pub repository: String,
    /// The manifest (its `id` is the backup's).
    #[serde(flatten)]
    pub manifest: Manifest,
}

/// What a restore made.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReport {
    /// The backup.
    pub id: String,
    /// The new volume or file.
    pub to: String,
    /// Its size in bytes (all disks and the memory state, for a VM).
    pub size: u64,
    /// What to do next, if anything (a restored VM resumes with `checkpoint apply`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// What `init` made.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    /// Where.
    pub location: String,
    /// Repository id.
    pub id: String,
    /// Whether data is encrypted.
    pub encrypted: bool,
}

/// Reply payloads of backup operations.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum BackupReply {
    /// A repository made.
    Repo(RepoInfo),
    /// Registered repositories.
    Repos(Vec<RepoEntry>),
    /// One backup.
    Backup(Box<BackupInfo>),
    /// Backups, and what is wrong with the manifests that would not open.
    Backups {
        /// The backups, oldest first.
        backups: Vec<BackupInfo>,
        /// One message per damaged manifest.
        #[serde(default)]
        damaged: Vec<String>,
    },
    /// What verify found.
    Verify(VerifyReport),
    /// What a restore made.
    Restored(RestoreReport),
    /// What a prune kept and removed.
    Pruned(Vec<PruneEntry>),
    /// What a GC did.
    Gc(GcReport),
    /// NBD exports serving backups.
    Mounted(Vec<MountedExport>),
    /// Live restores under way.
    Live(Vec<LiveStatus>),
    /// Nothing to report.
    Done,
}

/// The store side a backup operation needs: the checkpoints backups are reading (so they are
/// not deleted or renamed under them) and the volumes restores are filling.
#[derive(Debug, Default, Clone)]
pub struct BackupGuards {
    busy: Arc<Mutex<BTreeMap<(String, String), usize>>>,
}

/// Held while a backup reads a checkpoint.
struct Pin {
    guards: BackupGuards,
    key: (String, String),
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut b = self.guards.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = b.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                b.remove(&self.key);
            }
        }
    }
}

impl BackupGuards {
    pub(crate) fn pin(&self, volume: &str, checkpoint: &str) -> impl Drop {
        let key = (volume.to_string(), checkpoint.to_string());
        *self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default() += 1;
        Pin {
            guards: self.clone(),
            key,
        }
    }

    /// Marks `partial` as being filled by a restore; refused while another restore fills it.
    fn claim_restore(&self, partial: &str) -> Result<impl Drop, OpError> {
        let busy = self
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&(partial.to_string(), String::new()));
        if busy {
            return Err(OpError::new(
                ErrorKind::Busy,
                format!("another restore is filling '{partial}'; wait for it, or restore to another name"),
            ));
        }
        Ok(self.pin(partial, ""))
    }

    /// Refuses to delete or rename checkpoint `checkpoint` of `volume` (any, if `None`) while a
    /// backup reads it.
    pub fn check_free(&self, volume: &str, checkpoint: Option<&str>) -> Result<(), OpError> {
        let b = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        let hit = b
            .keys()
            .find(|(v, c)| v == volume && checkpoint.is_none_or(|n| n == c));
        match hit {
            Some((v, c)) => Err(OpError::new(
                ErrorKind::Busy,
                format!("checkpoint '{v}@{c}' is being backed up; try again when the backup ends"),
            )),
            None => Ok(()),
        }
    }
}

impl ErrorKind {
    /// The kind of a backup error.
    pub fn of_backup(e: &BackupError) -> ErrorKind {
        use BackupError as B;
        match e {
            B::Engine(e) => ErrorKind::of_engine(e),
            B::NotARepository(_) | B::UnknownBackup { .. } => ErrorKind::NotFound,
            B::RepositoryExists(_) => ErrorKind::Exists,
            B::BadLocation { .. }
            | B::AmbiguousBackup { .. }
            | B::Invalid(_)
            | B::NewerFormat { .. } => ErrorKind::Invalid,
            B::NeedPassphrase(_) | B::WrongPassphrase(_) => ErrorKind::Auth,
            B::Missing { .. } | B::Corrupt { .. } => ErrorKind::Corrupt,
            B::Io { .. } => ErrorKind::Io,
            B::Busy(_) => ErrorKind::Busy,
            B::NoSpace { .. } => ErrorKind::NoSpace,
            B::Store { .. } => ErrorKind::Remote,
            B::Cancelled => ErrorKind::Cancelled,
        }
    }
}

impl From<BackupError> for OpError {
    fn from(e: BackupError) -> OpError {
        OpError::new(ErrorKind::of_backup(&e), e.to_string())
    }
}

/// Runs a backup operation on `store`; `progress` hears millionths of the work done.
pub fn run(
    store: &Store,
    guards: &BackupGuards,
    op: BackupOp,
    progress: &mut dyn cairn_backup::Progress,
) -> Result<Reply, OpError> {
    let dir = store
        .dir()
        .ok_or_else(|| OpError::new(ErrorKind::Invalid, "backups need a store in a directory"))?;
    let reply = match op {
        BackupOp::Init { repo, encrypt } => {
            let access = registry::access(dir, &repo)?;
            let r = Repository::init(&access, encrypt)?;
            BackupReply::Repo(RepoInfo {
                location: r.location().to_string(),
                id: r.config().id.clone(),
                encrypted: r.keys().encrypted_data(),
            })
        }
        BackupOp::RepoAdd {
            name,
            repo,
            default,
        } => BackupReply::Repos(registry::add(dir, &name, &repo, default)?),
        BackupOp::RepoList => BackupReply::Repos(registry::list(dir)?),
        BackupOp::RepoRemove { name } => BackupReply::Repos(registry::remove(dir, &name)?),
        BackupOp::Create { target, repo } => {
            let t = Target::parse(&target)?;
            let Some(checkpoint) = &t.checkpoint else {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("back up a checkpoint, not a head: give VOLUME@CHECKPOINT (e.g. `cairn checkpoint create {target}@now` first)"),
                ));
            };
            let store_id = registry::store_id(dir)?;
            let src = vm::source(store, &store_id, &t.volume, checkpoint)?;
            // Every volume it reads (and the VM checkpoint) is pinned before the repository is
            // even opened.
            let _pins: Vec<_> = src
                .volumes
                .iter()
                .chain(std::iter::once(&src.name))
                .map(|v| guards.pin(v, checkpoint))
                .collect();
            for v in &src.volumes {
                store.checkpoint_info(v, checkpoint)?;
            }
            let r = open(dir, &repo)?;
            let m = create(&r, &src, progress)?;
            BackupReply::Backup(Box::new(info(&r, m)))
        }
        BackupOp::List { repo, name } => {
            let r = open(dir, &repo)?;
            let (list, damaged) = r.backups_lenient()?;
            let backups = list
                .into_iter()
                .filter(|m| name.as_ref().is_none_or(|n| &m.name == n))
                .map(|m| info(&r, m))
                .collect();
            let damaged = damaged.into_iter().map(|(_, e)| e.to_string()).collect();
            BackupReply::Backups { backups, damaged }
        }
        BackupOp::Info { repo, id } => {
            let r = open(dir, &repo)?;
            let m = r.manifest(&id)?;
            BackupReply::Backup(Box::new(info(&r, m)))
        }
        BackupOp::Verify {
            repo,
            id,
            sample_percent,
        } => {
            if !(sample_percent > 0.0 && sample_percent <= 100.0) {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    format!("--sample {sample_percent} is not a percentage in (0, 100]"),
                ));
            }
            let r = open(dir, &repo)?;
            BackupReply::Verify(verify(&r, id.as_deref(), sample_percent, progress)?)
        }
        BackupOp::Prune {
            repo,
            name,
            policy,
            dry_run,
        } => {
            if policy.is_empty() {
                return Err(OpError::new(
                    ErrorKind::Invalid,
                    "give at least one --keep-last/-hourly/-daily/-weekly/-monthly/-yearly (with none, everything is kept)",
                ));
            }
            let r = open(dir, &repo)?;
            let store_id = registry::store_id(dir)?;
            let wanted =
                |m: &Manifest| m.store == store_id && name.as_ref().is_none_or(|n| &m.name == n);
            BackupReply::Pruned(prune(&r, &wanted, &policy, dry_run)?)
        }
        BackupOp::Gc { repo, grace_secs } => {
            let r = open(dir, &repo)?;
            BackupReply::Gc(gc(&r, grace_secs.saturating_mul(1000), progress)?)
        }
        BackupOp::Restore {
            repo,
            id,
            to,
            live: false,
            ..
        } => {
            let r = open(dir, &repo)?;
            let m = r.manifest(&id)?;
            BackupReply::Restored(restore::restore_to(store, guards, &r, &m, to, progress)?)
        }
        BackupOp::Restore { live: true, .. }
        | BackupOp::Mount { .. }
        | BackupOp::Unmount { .. }
        | BackupOp::Mounts
        | BackupOp::Live => return Err(needs_daemon()),
    };
    Ok(Reply::Backup(reply))
}

/// What serving a backup (mount, live restore) says without a daemon to serve it.
pub(crate) fn needs_daemon() -> OpError {
    OpError::new(
        ErrorKind::State,
        "serving a backup (mount, live restore) needs the daemon: start `cairn serve` on this store first",
    )
}

/// Opens the repository `repo` means.
pub(crate) fn open(dir: &std::path::Path, repo: &RepoSpec) -> Result<Repository, OpError> {
    Ok(Repository::open(&registry::access(dir, repo)?)?)
}

fn info(r: &Repository, m: Manifest) -> BackupInfo {
    BackupInfo {
        repository: r.location().to_string(),
        manifest: m,
    }
}
