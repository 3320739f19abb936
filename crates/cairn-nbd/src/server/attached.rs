//! What a server serves besides the store's own volumes, attached by the layers above it: images
//! read from elsewhere (a mounted backup), and volumes whose data is still arriving (a live
//! restore), whose ranges must be filled in before a request touches them.
//!
//! The server knows neither backups nor repositories: it sees two small traits, and the control
//! service, which knows both, implements them.

use std::collections::BTreeMap;
use std::sync::Arc;

use cairn_engine::sync::lock;

use super::Server;

/// A read-only image served as an export of its own name.
pub trait ImageSource: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset` (inside the image); the error says what failed.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// What the export is, for clients that list exports.
    fn description(&self) -> String;
}

/// A volume whose head is still being filled from elsewhere: every request on the head first
/// makes sure the range it touches holds its final data, so a write never lands where a later
/// fill would overwrite it, and a read never sees a range before it is filled.
pub trait Backfill: Send + Sync {
    /// Fills whatever of `offset..offset + len` is not filled yet; returns once it is.
    fn ensure(&self, offset: u64, len: u64) -> Result<(), String>;
    /// Makes every acknowledged write durable (the client's flush), together with the record of
    /// what is filled, so that after a crash no filled range is filled again over the client's
    /// writes.
    fn flush(&self) -> Result<(), String>;
    /// Whether every range is filled (the head then reads as it is, holes included).
    fn is_complete(&self) -> bool;
}

/// The attached images and backfills of a server.
#[derive(Default)]
pub(super) struct Attached {
    pub(super) images: BTreeMap<String, Arc<dyn ImageSource>>,
    pub(super) backfills: BTreeMap<String, Arc<dyn Backfill>>,
}

impl Server {
    /// Serves `image` as read-only export `name`. Export names of images contain a character
    /// volume names cannot (`:`), so they never hide a volume.
    pub fn attach_image(&self, name: &str, image: Arc<dyn ImageSource>) -> Result<(), String> {
        if !name.contains(':') {
            return Err(format!(
                "image export name '{name}' must contain ':' so that it cannot be a volume's"
            ));
        }
        let mut a = lock(&self.attached);
        if a.images.contains_key(name) {
            return Err(format!("export '{name}' is already served"));
        }
        a.images.insert(name.to_string(), image);
        Ok(())
    }

    /// Stops offering image export `name`; connections already on it keep reading until they
    /// close. Returns whether it was attached.
    pub fn detach_image(&self, name: &str) -> bool {
        lock(&self.attached).images.remove(name).is_some()
    }

    /// Image exports attached, by name.
    pub fn images(&self) -> Vec<(String, Arc<dyn ImageSource>)> {
        let a = lock(&self.attached);
        a.images
            .iter()
            .map(|(n, i)| (n.clone(), i.clone()))
            .collect()
    }

    /// Makes every request on volume `volume`'s head go through `backfill` first (connections
    /// made from now on: attach before anyone connects).
    pub fn attach_backfill(&self, volume: &str, backfill: Arc<dyn Backfill>) {
        lock(&self.attached)
            .backfills
            .insert(volume.to_string(), backfill);
    }

    /// Ends the backfill of `volume` for connections made from now on (connections that have it
    /// see it complete).
    pub fn detach_backfill(&self, volume: &str) {
        lock(&self.attached).backfills.remove(volume);
    }

    pub(super) fn image(&self, name: &str) -> Option<Arc<dyn ImageSource>> {
        lock(&self.attached).images.get(name).cloned()
    }

    pub(super) fn backfill(&self, volume: &str) -> Option<Arc<dyn Backfill>> {
        lock(&self.attached).backfills.get(volume).cloned()
    }
}
