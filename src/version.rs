//! Object versions that change with the content but reveal nothing about it:
//! HMAC-SHA256 under a per-node key that survives restarts, so an unchanged
//! secret keeps its version across daemon restarts (no spurious rotations).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
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
    /// The file is there but must not be trusted or used: fix it by hand.
    #[error("version key {path} {why}")]
    Unsafe { path: PathBuf, why: String },
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
    /// Loads the key, or generates and persists one (mode 0600) on first
    /// start. The file must be a regular file (not a symlink, FIFO or
    /// device: those could hang start-up or point anywhere), not readable by
    /// other users, and not all zeros.
    pub fn load_or_create(path: &Path) -> Result<Self, VersionKeyError> {
        // Two rounds at most: another starter may create the file between
        // our failed open and our create.
        for _ in 0..2 {
            match Self::load(path) {
                Err(VersionKeyError::Read { source, .. })
                    if source.kind() == io::ErrorKind::NotFound =>
                {
                    match Self::create(path) {
                        Err(VersionKeyError::Create { source, .. })
                            if source.kind() == io::ErrorKind::AlreadyExists =>
                        {
                            continue
                        }
                        other => return other,
                    }
                }
                other => return other,
            }
        }
        Err(VersionKeyError::Unsafe {
            path: path.to_path_buf(),
            why: "keeps appearing and disappearing; is something else managing it?".into(),
        })
    }

    fn load(path: &Path) -> Result<Self, VersionKeyError> {
        let unsafe_key = |why: &str| VersionKeyError::Unsafe {
            path: path.to_path_buf(),
            why: why.to_string(),
        };
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags((nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK).bits())
            .open(path)
            .map_err(|source| match source.raw_os_error() {
                Some(code) if code == nix::errno::Errno::ELOOP as i32 => {
                    unsafe_key("is a symlink; give the key file itself")
                }
                _ => VersionKeyError::Read {
                    path: path.to_path_buf(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| VersionKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.file_type().is_file() {
            return Err(unsafe_key("is not a regular file"));
        }
        if meta.permissions().mode() & 0o007 != 0 {
            return Err(unsafe_key(
                "is accessible to other users; make it 0600 (chmod 600)",
            ));
        }
        let mut key = Zeroizing::new(Vec::with_capacity(KEY_BYTES));
        Read::by_ref(&mut &file)
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
        if key.iter().all(|b| *b == 0) {
            return Err(unsafe_key(
                "is all zeros, which is no key; delete it to generate a new one",
            ));
        }
        Ok(Self(key))
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
        linked.map(|()| key).map_err(err)
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
        String::from_utf8_lossy(&self.digits(id, content)).into_owned()
    }

    /// [`VersionKey::version`], made shared in one allocation.
    pub fn shared_version(&self, id: &str, content: &[u8]) -> std::sync::Arc<str> {
        String::from_utf8_lossy(&self.digits(id, content)).into()
    }

    fn digits(&self, id: &str, content: &[u8]) -> [u8; 32] {
        let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(&self.0) else {
            unreachable!("HMAC accepts keys of any length")
        };
        mac.update(&(id.len() as u64).to_be_bytes());
        mac.update(id.as_bytes());
        mac.update(content);
        let mut hexed = [0u8; 32];
        match hex::encode_to_slice(&mac.finalize().into_bytes()[..16], &mut hexed) {
            Ok(()) => hexed,
            Err(_) => unreachable!("16 bytes are 32 hex digits"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn unsafe_key_files_are_refused_without_hanging() {
        let dir = tempfile::tempdir().unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();
        let err = VersionKey::load_or_create(&dangling).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        let fifo = dir.path().join("fifo");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = VersionKey::load_or_create(&fifo).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let open = dir.path().join("open");
        fs::write(&open, [7u8; KEY_BYTES]).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o644)).unwrap();
        let err = VersionKey::load_or_create(&open).unwrap_err();
        assert!(err.to_string().contains("other users"), "{err}");
        let zeros = dir.path().join("zeros");
        fs::write(&zeros, [0u8; KEY_BYTES]).unwrap();
        fs::set_permissions(&zeros, fs::Permissions::from_mode(0o600)).unwrap();
        let err = VersionKey::load_or_create(&zeros).unwrap_err();
        assert!(err.to_string().contains("all zeros"), "{err}");
    }

    #[test]
    fn wrong_length_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        fs::write(&path, b"short").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let err = VersionKey::load_or_create(&path).unwrap_err();
        assert!(err.to_string().contains("holds 5 bytes"), "{err}");
    }
}
