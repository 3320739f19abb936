//! The backup crate's one error type: each variant says what failed, on which repository or
//! object, and what to do.

/// Result alias used throughout the crate.
pub type Result<T, E = BackupError> = std::result::Result<T, E>;

/// Everything that can go wrong with a backup repository.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The engine refused or failed (reading a checkpoint, writing a restored volume).
    #[error(transparent)]
    Engine(#[from] cairn_engine::Error),
    /// A repository location that cannot be parsed.
    #[error(
        "'{location}' is not a repository location: {why}; give a directory or s3://BUCKET/PREFIX"
    )]
    BadLocation {
        /// What was given.
        location: String,
        /// Why it was refused.
        why: String,
    },
    /// Nothing that looks like a Cairn repository there.
    #[error("no Cairn backup repository at {0}; run `cairn backup init {0}` first")]
    NotARepository(String),
    /// `init` where a repository already is.
    #[error("a Cairn backup repository already exists at {0}")]
    RepositoryExists(String),
    /// Written by a newer Cairn.
    #[error("repository {location} has format {found}; this Cairn reads format {supported}; upgrade Cairn")]
    NewerFormat {
        /// Repository.
        location: String,
        /// Its format.
        found: u32,
        /// The newest this build reads.
        supported: u32,
    },
    /// The repository is encrypted and no passphrase or key file was given.
    #[error("repository {0} is encrypted; set CAIRN_BACKUP_PASSPHRASE or pass --key-file FILE")]
    NeedPassphrase(String),
    /// The passphrase does not unlock the repository key.
    #[error("wrong passphrase for repository {0}: nothing was decrypted; check CAIRN_BACKUP_PASSPHRASE or --key-file")]
    WrongPassphrase(String),
    /// An object is missing.
    #[error("{what} {name} is missing from repository {location}; run `cairn backup verify` to see what it affects")]
    Missing {
        /// Repository.
        location: String,
        /// Kind of object (chunk, index, map, backup).
        what: &'static str,
        /// Its name.
        name: String,
    },
    /// An object failed its checks (authentication, hash, structure).
    #[error("{what} {name} in repository {location} is damaged ({why}); run `cairn backup verify` to see what it affects")]
    Corrupt {
        /// Repository.
        location: String,
        /// Kind of object.
        what: &'static str,
        /// Its name.
        name: String,
        /// What check failed.
        why: String,
    },
    /// No backup has this id (or prefix).
    #[error("no backup '{id}' in repository {location}; `cairn backup list` shows them")]
    UnknownBackup {
        /// Repository.
        location: String,
        /// What was asked for.
        id: String,
    },
    /// A prefix that matches more than one backup.
    #[error("backup id '{id}' is ambiguous in repository {location} (matches {matches}); give more characters")]
    AmbiguousBackup {
        /// Repository.
        location: String,
        /// What was asked for.
        id: String,
        /// How many match.
        matches: usize,
    },
    /// Local file I/O failed.
    #[error("{op} failed on {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host file system is full.
    #[error("{op} failed on {path}: the file system is full; free space on it and run the command again (nothing half-made is kept)")]
    NoSpace {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: String,
    },
    /// The object store failed after its retries.
    #[error("{op} of {key} on {location} failed: {source}; check that the S3 endpoint is reachable and the credentials are right, then run the command again")]
    Store {
        /// Repository.
        location: String,
        /// What was being done.
        op: &'static str,
        /// The object key.
        key: String,
        /// The object store's error.
        #[source]
        source: Box<object_store::Error>,
    },
    /// Another process holds what this one needs (the GC lock).
    #[error("{0}")]
    Busy(String),
    /// A request that makes no sense (bad option values, wrong kind of source).
    #[error("{0}")]
    Invalid(String),
    /// The work was cancelled before it finished; nothing half-made is kept.
    #[error("cancelled before it finished; nothing half-made is kept")]
    Cancelled,
}

impl BackupError {
    /// An I/O error on a local file, with the full-disk case told apart.
    pub fn io(op: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        let path = path.display().to_string();
        if source.raw_os_error() == Some(28) {
            return BackupError::NoSpace { op, path };
        }
        BackupError::Io { op, path, source }
    }
}
