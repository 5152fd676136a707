//! Keys, content ids and authenticated encryption.
//!
//! A datastore is either plain (ids are BLAKE3 hashes, integrity by re-hashing) or
//! encrypted: one 256-bit master key, kept in a key file outside the datastore, from
//! which BLAKE3 `derive_key` makes three independent keys: the id key (ids are keyed
//! hashes, so stored names reveal nothing about the data), the AES-256-GCM key, and a
//! fingerprint recorded in the datastore's configuration so a wrong key is refused before
//! anything is read.

use crate::error::{Error, Result};
use crate::id::{Id, hex};
use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;

const CTX_ID: &str = "holdfast 2026-11 datastore chunk id key";
const CTX_AEAD: &str = "holdfast 2026-11 datastore aes-256-gcm key";
const CTX_FINGERPRINT: &str = "holdfast 2026-11 datastore key fingerprint";

/// Length of the GCM tag appended to every encrypted payload.
pub const TAG_LEN: usize = 16;

/// How a datastore hashes and protects what it stores. Cloning is cheap (the AEAD key
/// is shared), so a backup pipeline's parameters can carry the keys.
#[derive(Clone)]
pub struct Keys {
    id_key: Option<[u8; 32]>,
    aead: Option<Arc<LessSafeKey>>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.aead.is_some() {
            "Keys(encrypted)"
        } else {
            "Keys(plain)"
        })
    }
}

impl Keys {
    /// A plain datastore: public BLAKE3 ids, no encryption.
    pub fn plain() -> Keys {
        Keys {
            id_key: None,
            aead: None,
        }
    }

    /// An encrypted datastore's keys, derived from the master key.
    pub fn from_master(master: &[u8; 32]) -> Result<Keys> {
        let aead_key = blake3::derive_key(CTX_AEAD, master);
        let unbound = UnboundKey::new(&AES_256_GCM, &aead_key)
            .map_err(|_| Error::Key("cannot set up AES-256-GCM".into()))?;
        Ok(Keys {
            id_key: Some(blake3::derive_key(CTX_ID, master)),
            aead: Some(Arc::new(LessSafeKey::new(unbound))),
        })
    }

    pub fn encrypted(&self) -> bool {
        self.aead.is_some()
    }

    /// The content id of `data`.
    pub fn id(&self, data: &[u8]) -> Id {
        match &self.id_key {
            Some(k) => Id(*blake3::keyed_hash(k, data).as_bytes()),
            None => Id(*blake3::hash(data).as_bytes()),
        }
    }

    /// Encrypts `buf` in place and appends the tag; returns the random nonce used.
    pub fn seal(&self, aad: &[u8], buf: &mut Vec<u8>) -> Result<[u8; NONCE_LEN]> {
        let (nonce, tag) = self.seal_detached(aad, buf)?;
        buf.extend_from_slice(&tag);
        Ok(nonce)
    }

    /// Encrypts `buf` in place; returns the random nonce and the tag (which belongs
    /// right after the ciphertext).
    pub fn seal_detached(
        &self,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<([u8; NONCE_LEN], [u8; TAG_LEN])> {
        let Some(key) = &self.aead else {
            return Err(Error::Invalid("seal on a plain datastore".into()));
        };
        let mut nonce = [0u8; NONCE_LEN];
        random(&mut nonce)?;
        let tag = key
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| Error::Key("AES-256-GCM encryption failed".into()))?;
        let mut t = [0u8; TAG_LEN];
        t.copy_from_slice(tag.as_ref());
        Ok((nonce, t))
    }

    /// Decrypts `buf` (ciphertext followed by the tag) in place; returns the plaintext
    /// length. A wrong key or any change to the data or `aad` fails.
    pub fn open(
        &self,
        key_name: &str,
        aad: &[u8],
        nonce: [u8; NONCE_LEN],
        buf: &mut [u8],
    ) -> Result<usize> {
        let Some(key) = &self.aead else {
            return Err(Error::corrupt(
                key_name,
                "encrypted data in a plain datastore",
            ));
        };
        let plain = key
            .open_in_place(Nonce::assume_unique_for_key(nonce), Aad::from(aad), buf)
            .map_err(|_| {
                Error::corrupt(
                    key_name,
                    "authentication tag mismatch (the data was changed, or the key is wrong)",
                )
            })?;
        Ok(plain.len())
    }
}

/// Fills `buf` from the operating system's random source.
pub fn random(buf: &mut [u8]) -> Result<()> {
    aws_lc_rs::rand::fill(buf).map_err(|_| Error::Invalid("no random numbers available".into()))
}

/// Random lower-case hex of `n` bytes.
pub fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    random(&mut b)?;
    Ok(hex(&b))
}

/// The fingerprint recorded in the datastore's configuration for a master key.
pub fn fingerprint(master: &[u8; 32]) -> String {
    hex(&blake3::derive_key(CTX_FINGERPRINT, master)[..16])
}

/// The key file: JSON, mode 0600, written once by `datastore create --encrypt`.
#[derive(serde::Serialize, serde::Deserialize)]
struct KeyFile {
    format: String,
    datastore: String,
    key: String,
}

const KEY_FORMAT: &str = "holdfast-datastore-key-v1";

/// Writes a new key file for datastore `datastore_id`; refuses to overwrite one.
pub fn write_key_file(path: &Path, datastore_id: &str, master: &[u8; 32]) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let body = serde_json::to_vec_pretty(&KeyFile {
        format: KEY_FORMAT.into(),
        datastore: datastore_id.into(),
        key: hex(master),
    })
    .map_err(|e| Error::Invalid(format!("key file: {e}")))?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::io(path, "create key file", e))?;
    f.write_all(&body)
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_all())
        .map_err(|e| Error::io(path, "write key file", e))?;
    vdisk::copy::fsync_parent(path)?;
    Ok(())
}

/// A warning when the key file at `path` can be read by its group or by others (mode
/// bits 0o077): anyone who can read it can decrypt every recovery point. `None` when
/// its mode is private, or when it cannot be examined (reading it reports that).
pub fn key_file_exposure(path: &Path) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then(|| {
        format!(
            "key file {} has mode {mode:04o}: its group or others can read it, and with it decrypt every recovery point; chmod 600 it",
            path.display()
        )
    })
}

/// Reads a key file and returns the master key.
pub fn read_key_file(path: &Path) -> Result<[u8; 32]> {
    let body = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Key(format!(
                "{}: key file not found; this datastore is encrypted and needs its key (--key-file)",
                path.display()
            ))
        } else {
            Error::io(path, "read key file", e)
        }
    })?;
    let kf: KeyFile = serde_json::from_slice(&body)
        .map_err(|e| Error::Key(format!("{}: not a holdfast key file: {e}", path.display())))?;
    if kf.format != KEY_FORMAT {
        return Err(Error::Key(format!(
            "{}: unknown key file format {:?}",
            path.display(),
            kf.format
        )));
    }
    let id = Id::from_hex(&kf.key).ok_or_else(|| {
        Error::Key(format!(
            "{}: field \"key\" is not 64 hex digits",
            path.display()
        ))
    })?;
    Ok(id.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let k = Keys::from_master(&[7; 32]).unwrap();
        let mut buf = b"hello world".to_vec();
        let nonce = k.seal(b"aad", &mut buf).unwrap();
        assert_eq!(buf.len(), 11 + TAG_LEN);
        let mut copy = buf.clone();
        let n = k.open("t", b"aad", nonce, &mut copy).unwrap();
        assert_eq!(&copy[..n], b"hello world");
        let mut bad = buf.clone();
        bad[0] ^= 1;
        assert!(k.open("t", b"aad", nonce, &mut bad).is_err());
        let mut copy = buf.clone();
        assert!(k.open("t", b"other", nonce, &mut copy).is_err());
        let other = Keys::from_master(&[8; 32]).unwrap();
        let mut copy = buf;
        assert!(other.open("t", b"aad", nonce, &mut copy).is_err());
    }

    #[test]
    fn keyed_ids_differ_from_plain() {
        let p = Keys::plain();
        let k = Keys::from_master(&[1; 32]).unwrap();
        assert_ne!(p.id(b"abc"), k.id(b"abc"));
        assert_eq!(p.id(b"abc").0, *blake3::hash(b"abc").as_bytes());
    }
}
