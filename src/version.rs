//! Object versions that change with the content but reveal nothing about it:
//! HMAC-SHA256 under a per-node key that survives restarts, so an unchanged
//! secret keeps its version across daemon restarts (no spurious rotations).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

const KEY_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum VersionKeyError {
    #[error("cannot read version key {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot create version key {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("version key {path} holds {len} bytes; expected {KEY_BYTES} (delete it to generate a new one)")]
    BadLength { path: PathBuf, len: usize },
    #[error("cannot generate a random key: {0}")]
    Random(String),
}

/// The HMAC key. Its Debug output is redacted.
pub struct VersionKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for VersionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("VersionKey([REDACTED])")
    }
}

impl VersionKey {
    /// Loads the key, or generates and persists one (mode 0600) on first start.
    pub fn load_or_create(path: &Path) -> Result<Self, VersionKeyError> {
        match fs::File::open(path) {
            Ok(mut f) => {
                let mut key = Zeroizing::new(Vec::with_capacity(KEY_BYTES));
                Read::by_ref(&mut f)
                    .take(KEY_BYTES as u64 + 1)
                    .read_to_end(&mut key)
                    .map_err(|source| VersionKeyError::Read {
                        path: path.to_path_buf(),
                        source,
                    })?;
                if key.len() != KEY_BYTES {
                    return Err(VersionKeyError::BadLength {
                        path: path.to_path_buf(),
                        len: key.len(),
                    });
                }
                Ok(Self(key))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Self::create(path),
            Err(source) => Err(VersionKeyError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    fn create(path: &Path) -> Result<Self, VersionKeyError> {
        let err = |source| VersionKeyError::Create {
            path: path.to_path_buf(),
            source,
        };
        let key = Self::random()?;
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            fs::create_dir_all(parent).map_err(err)?;
        }
        // Write to a private temp file, then link it into place: a concurrent
        // starter either wins or reads the winner's complete key.
        let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(err)?;
        let written = f.write_all(&key.0).and_then(|_| f.sync_all());
        let linked = written.and_then(|_| fs::hard_link(&tmp, path));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(key),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Self::load_or_create(path),
            Err(e) => Err(err(e)),
        }
    }

    /// A fresh random key that is not persisted (tests, benchmarks).
    pub fn random() -> Result<Self, VersionKeyError> {
        let mut key = Zeroizing::new(vec![0u8; KEY_BYTES]);
        getrandom::fill(&mut key).map_err(|e| VersionKeyError::Random(e.to_string()))?;
        Ok(Self(key))
    }

    /// The version of `content` served as object `id`. The id is mixed in so
    /// two objects with equal values do not show equal versions.
    pub fn version(&self, id: &str, content: &[u8]) -> String {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(&(id.len() as u64).to_be_bytes());
        mac.update(id.as_bytes());
        mac.update(content);
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_is_created_once_and_stable_across_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/version.key");
        let a = VersionKey::load_or_create(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = VersionKey::load_or_create(&path).unwrap();
        assert_eq!(a.version("x", b"value"), b.version("x", b"value"));
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn versions_change_with_content_and_id_and_hide_the_value() {
        let k = VersionKey::random().unwrap();
        let v = k.version("db", b"hunter2");
        assert_eq!(v.len(), 32);
        assert_ne!(v, k.version("db", b"hunter3"));
        assert_ne!(v, k.version("db2", b"hunter2"));
        assert_eq!(v, k.version("db", b"hunter2"));
        assert!(!v.contains(&hex::encode(b"hunter2")));
        let other = VersionKey::random().unwrap();
        assert_ne!(v, other.version("db", b"hunter2"));
    }

    #[test]
    fn wrong_length_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, b"short").unwrap();
        let err = VersionKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("holds 5 bytes"), "{err}");
    }
}
