//! Keys and sealing. An encrypted repository has a random 256-bit master key, stored in its
//! config wrapped by a key derived from the passphrase with Argon2id (64 MiB, 3 passes: memory
//! hard, so a stolen config is slow to attack). From the master key come, through BLAKE3's key
//! derivation, the chunk id key (ids are keyed hashes, so they say nothing about the data) and the
//! data key. Every record and every metadata object is sealed with XChaCha20-Poly1305: a random
//! 192-bit nonce per message (no nonce state shared between hosts writing the same repository),
//! and associated data that binds it to its place (a record to its chunk id, a manifest to its
//! backup id), so objects cannot be swapped unnoticed.
//!
//! An unencrypted repository keeps its id key in the config and seals with a keyed BLAKE3
//! checksum instead of a tag: damage is still found, by anyone.

use std::ops::Range;

use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine as _;
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use serde::{Deserialize, Serialize};

/// A chunk's id: the first 128 bits of the keyed BLAKE3 hash of its plaintext.
pub type ChunkId = [u8; 16];

const NONCE: usize = 24;
const TAG: usize = 16;
/// Bytes sealing adds to a message.
pub const OVERHEAD: usize = NONCE + TAG;
const PLAIN_CHECK: usize = 16;

/// Argon2id settings, kept in the config so they can be raised later without breaking old
/// repositories.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    /// Always `argon2id`.
    pub algorithm: String,
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Passes.
    pub iterations: u32,
    /// Lanes.
    pub parallelism: u32,
    /// Random salt (base64).
    pub salt: String,
}

impl KdfParams {
    /// Fresh settings with a random salt.
    pub fn new() -> KdfParams {
        KdfParams {
            algorithm: "argon2id".into(),
            memory_kib: 64 * 1024,
            iterations: 3,
            parallelism: 1,
            salt: b64(&rand::random::<[u8; 16]>()),
        }
    }

    fn derive(&self, passphrase: &[u8]) -> Option<[u8; 32]> {
        let salt = unb64(&self.salt)?;
        let params =
            Params::new(self.memory_kib, self.iterations, self.parallelism, Some(32)).ok()?;
        let mut out = [0u8; 32];
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password_into(passphrase, &salt, &mut out)
            .ok()?;
        Some(out)
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::new()
    }
}

/// How the master key is kept in the config.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    /// Always `xchacha20poly1305`.
    pub cipher: String,
    /// The passphrase's key derivation.
    pub kdf: KdfParams,
    /// The sealed master key (base64).
    pub wrapped: String,
}

const WRAP_AAD: &[u8] = b"cairn backup master key";

impl WrappedKey {
    /// Wraps `master` under `passphrase`.
    pub fn wrap(master: &[u8; 32], passphrase: &[u8]) -> WrappedKey {
        let kdf = KdfParams::new();
        let kek = kdf.derive(passphrase).expect("fresh parameters are valid");
        let wrapped = seal_aead(
            &XChaCha20Poly1305::new(Key::from_slice(&kek)),
            WRAP_AAD,
            master,
        );
        WrappedKey {
            cipher: "xchacha20poly1305".into(),
            kdf,
            wrapped: b64(&wrapped),
        }
    }

    /// The master key, or `None` if `passphrase` is wrong (or the config is damaged).
    pub fn unwrap(&self, passphrase: &[u8]) -> Option<[u8; 32]> {
        let kek = self.kdf.derive(passphrase)?;
        let mut sealed = unb64(&self.wrapped)?;
        let plain = open_aead(
            &XChaCha20Poly1305::new(Key::from_slice(&kek)),
            WRAP_AAD,
            &mut sealed,
        )?;
        sealed[plain].try_into().ok()
    }
}

/// The keys of an open repository.
pub struct Keys {
    id_key: [u8; 32],
    cipher: Option<XChaCha20Poly1305>,
    check_key: [u8; 32],
}

impl Keys {
    /// Keys of an encrypted repository, from its master key.
    pub fn encrypted(master: &[u8; 32]) -> Keys {
        let data = blake3::derive_key("cairn backup 2026-12 data key", master);
        Keys {
            id_key: blake3::derive_key("cairn backup 2026-12 chunk id key", master),
            cipher: Some(XChaCha20Poly1305::new(Key::from_slice(&data))),
            check_key: [0; 32],
        }
    }

    /// Keys of an unencrypted repository, from the id key its config holds.
    pub fn plain(id_key: [u8; 32]) -> Keys {
        Keys {
            id_key,
            cipher: None,
            check_key: blake3::derive_key("cairn backup 2026-12 plain check key", &id_key),
        }
    }

    /// Whether data is encrypted.
    pub fn encrypted_data(&self) -> bool {
        self.cipher.is_some()
    }

    /// The id of a chunk with this plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        let h = blake3::keyed_hash(&self.id_key, data);
        let mut id = [0u8; 16];
        id.copy_from_slice(&h.as_bytes()[..16]);
        id
    }

    /// Seals `plain` so that only [`Keys::open`] with the same `aad` gets it back.
    pub fn seal(&self, aad: &[u8], plain: &[u8]) -> Vec<u8> {
        match &self.cipher {
            Some(c) => seal_aead(c, aad, plain),
            None => {
                let mut out = Vec::with_capacity(plain.len() + PLAIN_CHECK);
                out.extend_from_slice(plain);
                out.extend_from_slice(&self.check(aad, plain));
                out
            }
        }
    }

    /// The plaintext of a sealed message, or `None` if it was changed or sealed for another
    /// place.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let plain = self.open_in_place(aad, &mut buf)?;
        buf.truncate(plain.end);
        buf.drain(..plain.start);
        Some(buf)
    }

    /// Opens a sealed message where it lies, without a copy: on success `sealed[range]` is the
    /// plaintext (the rest of `sealed` is left as nonce and tag); `None` as for [`Keys::open`],
    /// with `sealed` then in an unspecified state.
    pub fn open_in_place(&self, aad: &[u8], sealed: &mut [u8]) -> Option<Range<usize>> {
        match &self.cipher {
            Some(c) => open_aead(c, aad, sealed),
            None => {
                let split = sealed.len().checked_sub(PLAIN_CHECK)?;
                let (plain, check) = sealed.split_at(split);
                (check == self.check(aad, plain)).then_some(0..split)
            }
        }
    }

    fn check(&self, aad: &[u8], plain: &[u8]) -> [u8; PLAIN_CHECK] {
        let mut h = blake3::Hasher::new_keyed(&self.check_key);
        h.update(&(aad.len() as u64).to_le_bytes());
        h.update(aad);
        h.update(plain);
        let mut out = [0u8; PLAIN_CHECK];
        out.copy_from_slice(&h.finalize().as_bytes()[..PLAIN_CHECK]);
        out
    }
}

fn seal_aead(c: &XChaCha20Poly1305, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce: [u8; NONCE] = rand::random();
    let mut out = Vec::with_capacity(NONCE + plain.len() + TAG);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = c
        .encrypt_in_place_detached(XNonce::from_slice(&nonce), aad, &mut out[NONCE..])
        .expect("XChaCha20-Poly1305 seals any length that fits in memory");
    out.extend_from_slice(&tag);
    out
}

fn open_aead(c: &XChaCha20Poly1305, aad: &[u8], sealed: &mut [u8]) -> Option<Range<usize>> {
    let ct_end = sealed.len().checked_sub(TAG).filter(|&e| e >= NONCE)?;
    let (head, tag) = sealed.split_at_mut(ct_end);
    let (nonce, ct) = head.split_at_mut(NONCE);
    c.decrypt_in_place_detached(XNonce::from_slice(nonce), aad, ct, Tag::from_slice(tag))
        .ok()?;
    Some(NONCE..ct_end)
}

/// Base64 (standard alphabet).
pub fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Decodes [`b64`].
pub fn unb64(s: &str) -> Option<Vec<u8>> {
    base64::engine::general_purpose::STANDARD.decode(s).ok()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealing_round_trips_and_detects_changes() {
        for keys in [Keys::encrypted(&[7; 32]), Keys::plain([9; 32])] {
            let s = keys.seal(b"here", b"hello world");
            assert_eq!(keys.open(b"here", &s).as_deref(), Some(&b"hello world"[..]));
            assert!(keys.open(b"there", &s).is_none(), "another place");
            let mut bad = s.clone();
            bad[3] ^= 1;
            assert!(keys.open(b"here", &bad).is_none(), "a flipped bit");
            assert!(keys.open(b"here", &s[..5]).is_none(), "truncated");
            let mut in_place = s.clone();
            let plain = keys.open_in_place(b"here", &mut in_place).expect("opens");
            assert_eq!(&in_place[plain], b"hello world", "opened where it lies");
            for short in 0..s.len() - b"hello world".len() {
                let mut cut = s[..short].to_vec();
                assert!(
                    keys.open_in_place(b"here", &mut cut).is_none(),
                    "{short} bytes"
                );
            }
        }
        let enc = Keys::encrypted(&[7; 32]);
        let s = enc.seal(b"", b"secret text");
        assert!(
            !s.windows(6).any(|w| w == b"secret"),
            "ciphertext hides the text"
        );
    }

    #[test]
    fn ids_depend_on_the_key() {
        let a = Keys::encrypted(&[1; 32]).chunk_id(b"block");
        let b = Keys::encrypted(&[2; 32]).chunk_id(b"block");
        assert_ne!(a, b);
        assert_eq!(a, Keys::encrypted(&[1; 32]).chunk_id(b"block"));
    }

    #[test]
    fn a_wrapped_key_opens_only_with_its_passphrase() {
        let w = WrappedKey::wrap(&[5; 32], b"correct horse");
        assert_eq!(w.unwrap(b"correct horse"), Some([5; 32]));
        assert_eq!(w.unwrap(b"wrong"), None);
    }
}
