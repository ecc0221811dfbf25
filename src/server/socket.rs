//! The provider's Unix socket: created with a private mode, a stale one from a
//! previous run replaced, a live one or a non-socket never touched.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nix::sys::stat::{umask, Mode};
use tokio::net::UnixListener;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create socket directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("refusing to remove {path}: it is {kind}, not a socket")]
    NotASocket { path: PathBuf, kind: &'static str },
    #[error("another process is already serving on {0}; stop it first")]
    InUse(PathBuf),
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("cannot set mode {mode:o} on {path}: {source}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        source: io::Error,
    },
}

/// Removes the socket file when dropped, if the file is still the one this
/// process created (a successor may already have replaced it).
pub struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl SocketGuard {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if let Ok(meta) = std::fs::symlink_metadata(&self.path) {
            if meta.ino() == self.ino && meta.file_type().is_socket() {
                let _ = std::fs::remove_file(&self.path);
            }
        }
    }
}

/// Binds the provider socket at `path` with permissions `mode`.
pub fn bind(path: &Path, mode: u32) -> Result<(UnixListener, SocketGuard), SocketError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|source| SocketError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            // A socket someone still answers on is live: do not hijack it.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::InUse(path.to_path_buf()));
            }
            tracing::info!(socket = %path.display(), "removing stale socket from a previous run");
            std::fs::remove_file(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(meta) => {
            return Err(SocketError::NotASocket {
                path: path.to_path_buf(),
                kind: crate::nodefs::describe(meta.file_type()),
            })
        }
        Err(_) => {}
    }
    // Bind under a strict umask so the socket is never briefly wider than
    // `mode`; the chmod below then sets exactly `mode`.
    let old = umask(Mode::from_bits_truncate(0o177));
    let bound = UnixListener::bind(path);
    umask(old);
    let listener = bound.map_err(|source| SocketError::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|source| {
        SocketError::Chmod {
            path: path.to_path_buf(),
            mode,
            source,
        }
    })?;
    let ino = std::fs::symlink_metadata(path)
        .map(|m| m.ino())
        .map_err(|source| SocketError::Bind {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((
        listener,
        SocketGuard {
            path: path.to_path_buf(),
            ino,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_dir_sets_mode_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/coffer.sock");
        let sock = bind(&path, 0o600).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Live socket: a second bind must refuse rather than steal it.
        assert!(matches!(bind(&path, 0o600), Err(SocketError::InUse(_))));
        drop(sock);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn replaces_stale_socket_but_not_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("coffer.sock");
        let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(stale); // the file stays, nobody listens
        let sock = bind(&path, 0o660).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o660
        );
        drop(sock);

        std::fs::write(&path, "precious").unwrap();
        let err = bind(&path, 0o600).err().unwrap();
        assert!(err.to_string().contains("a regular file"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    }
}
