//! A repository under a prefix of an S3 bucket, through the `object_store` crate. Requests that
//! fail for a transient reason (connection refused or reset, 5xx, throttling) are retried with
//! exponential backoff for up to [`crate::S3Options::retry_secs`] (default 120) before the error
//! reaches the user. Conditional PUT is switched off: Garage ignores `If-None-Match` and would let two
//! "create only" writes both succeed, so nothing in the repository relies on it (every object
//! has a name no other writer can choose).

use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3Builder, S3ConditionalPut};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, PutPayload, RetryConfig};

use super::{Backend, ObjectInfo};
use crate::error::{BackupError, Result};
use crate::location::{Access, Location};

/// Longest range one GET asks for; a longer one is split.
const GET_PART: u64 = super::READ_PART;
/// GETs of one `get_ranges` call in flight at once.
const PARALLEL_GETS: usize = 8;

/// `r` in consecutive pieces of at most `part` bytes (none for an empty range).
fn split_range(r: Range<u64>, part: u64) -> impl Iterator<Item = Range<u64>> {
    let n = (r.end - r.start).div_ceil(part);
    (0..n).map(move |k| {
        let from = r.start + k * part;
        from..(from + part).min(r.end)
    })
}

/// A bucket prefix holding a repository.
pub struct S3Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    location: Location,
    // Requests run on a runtime of their own: callers are synchronous (the engine and the
    // backup pipeline are), whether or not they run inside the daemon's runtime.
    runtime: tokio::runtime::Runtime,
}

impl S3Bucket {
    /// Connects lazily to the bucket `access` names.
    pub fn new(access: &Access) -> Result<S3Bucket> {
        let Location::S3 {
            bucket,
            prefix,
            endpoint,
        } = &access.location
        else {
            return Err(BackupError::Invalid("not an S3 location".into()));
        };
        let retry_secs = access.s3.retry_secs.unwrap_or(120);
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(access.s3.region.as_deref().unwrap_or("us-east-1"))
            .with_conditional_put(S3ConditionalPut::Disabled)
            .with_retry(RetryConfig {
                backoff: BackoffConfig::default(),
                max_retries: 10,
                retry_timeout: Duration::from_secs(retry_secs),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_connect_timeout(Duration::from_secs(5))
                    .with_timeout(Duration::from_secs(120))
                    .with_allow_http(true),
            );
        if let Some(e) = endpoint {
            b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
        }
        if let Some(k) = &access.s3.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &access.s3.secret_access_key {
            b = b.with_secret_access_key(&s.0);
        }
        if let Some(t) = &access.s3.session_token {
            b = b.with_token(&t.0);
        }
        let store = b.build().map_err(|e| BackupError::BadLocation {
            location: access.location.to_string(),
            why: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("cairn-s3")
            .enable_all()
            .build()
            .map_err(|e| BackupError::io("start", std::path::Path::new("S3 client runtime"), e))?;
        Ok(S3Bucket {
            store: Arc::new(store),
            prefix: prefix.clone(),
            location: access.location.clone(),
            runtime,
        })
    }

    fn key(&self, key: &str) -> Path {
        match self.prefix.is_empty() {
            true => Path::from(key),
            false => Path::from(format!("{}/{key}", self.prefix)),
        }
    }

    fn err(&self, op: &'static str, key: &str, source: object_store::Error) -> BackupError {
        BackupError::Store {
            location: self.location.to_string(),
            op,
            key: key.into(),
            source: Box::new(source),
        }
    }
}

impl Backend for S3Bucket {
    fn location(&self) -> &Location {
        &self.location
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        let path = self.key(key);
        self.runtime
            .block_on(self.store.put(&path, PutPayload::from(data)))
            .map(|_| ())
            .map_err(|e| self.err("PUT", key, e))
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.key(key);
        let r = self.runtime.block_on(async {
            let got = self.store.get(&path).await?;
            got.bytes().await
        });
        match r {
            Ok(b) => Ok(Some(b.to_vec())),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("GET", key, e)),
        }
    }

    fn get_ranges(&self, key: &str, ranges: &[Range<u64>]) -> Result<Vec<Vec<u8>>> {
        let path = self.key(key);
        // Long ranges go as several GETs at once: one stream from one server is bound by its
        // latency, not the network (a restore from Garage on loopback ran at 247 MiB/s with
        // whole-range GETs, at 46% of the two cores).
        let parts: Vec<(usize, Range<u64>)> = ranges
            .iter()
            .enumerate()
            .flat_map(|(i, r)| split_range(r.clone(), GET_PART).map(move |p| (i, p)))
            .collect();
        let fetched: std::result::Result<Vec<_>, _> = self.runtime.block_on(
            futures::stream::iter(
                parts
                    .iter()
                    .map(|(_, r)| self.store.get_range(&path, r.clone())),
            )
            .buffered(PARALLEL_GETS)
            .try_collect(),
        );
        let fetched = fetched.map_err(|e| self.err("GET", key, e))?;
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); ranges.len()];
        for ((i, _), bytes) in parts.iter().zip(fetched) {
            match out[*i].is_empty() {
                // The reply's own buffer, when nothing else holds it (no copy).
                true => out[*i] = Vec::from(bytes),
                false => out[*i].extend_from_slice(&bytes),
            }
        }
        Ok(out)
    }

    fn list(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        // object_store lists whole path segments: list the prefix's directory, then filter.
        let (dir, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let dir_path = self.key(dir);
        let root_len = match self.prefix.is_empty() {
            true => 0,
            false => self.prefix.len() + 1,
        };
        let listed: Vec<object_store::ObjectMeta> = self
            .runtime
            .block_on(self.store.list(Some(&dir_path)).try_collect())
            .map_err(|e| self.err("LIST", prefix, e))?;
        let mut out: Vec<ObjectInfo> = listed
            .into_iter()
            .filter_map(|m| {
                let full = m.location.to_string();
                let key = full.get(root_len..)?.to_string();
                key.starts_with(prefix).then(|| ObjectInfo {
                    key,
                    size: m.size,
                    modified_ms: u64::try_from(m.last_modified.timestamp_millis()).unwrap_or(0),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.key(key);
        match self.runtime.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("DELETE", key, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_range;

    #[test]
    fn ranges_split_into_consecutive_parts() {
        let parts = |r, p| split_range(r, p).collect::<Vec<_>>();
        assert_eq!(parts(10..35, 10), vec![10..20, 20..30, 30..35]);
        assert_eq!(parts(0..20, 10), vec![0..10, 10..20]);
        assert_eq!(parts(5..6, 10), vec![5..6]);
        assert!(parts(7..7, 10).is_empty());
    }
}
