//! Reading node files on behalf of callers (the `file` backend, TLS files an
//! SPC names, the version key). Every such read is a way for a hostile SPC to
//! reach the node, so all of them go through here:
//! - confined: paths are resolved *beneath* a directory by the kernel
//!   (`openat2(RESOLVE_BENEATH)`), which is not racy the way check-then-open
//!   is; symlinks that stay inside work (Kubernetes volume layouts use them);
//! - opened with `O_NONBLOCK`, so a FIFO cannot hang the open;
//! - regular files only (no `/dev/zero`, no FIFO, no socket, no directory);
//! - bounded: never more than the caller's limit is read.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

/// Why a node file could not be read. Messages name the path as the caller
/// gave it, never its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeFileError {
    #[error("does not exist")]
    NotFound,
    #[error("resolves outside the allowed directory")]
    Outside,
    #[error("goes through a symlink, which this kernel cannot confine")]
    Symlink,
    #[error("is not readable by coffer")]
    Denied,
    #[error("is {0}, not a regular file")]
    NotRegular(&'static str),
    #[error("is {size} bytes; the limit is {limit}")]
    TooLarge { size: u64, limit: u64 },
    #[error("cannot be read ({0})")]
    Io(String),
}

impl NodeFileError {
    fn from_errno(errno: Errno) -> Self {
        match errno {
            Errno::ENOENT | Errno::ENOTDIR => NodeFileError::NotFound,
            Errno::EXDEV => NodeFileError::Outside,
            Errno::ELOOP => NodeFileError::Symlink,
            Errno::EACCES | Errno::EPERM => NodeFileError::Denied,
            other => NodeFileError::Io(other.desc().to_string()),
        }
    }

    fn from_io(e: &io::Error) -> Self {
        match e.raw_os_error() {
            Some(raw) => Self::from_errno(Errno::from_raw(raw)),
            None => NodeFileError::Io(e.kind().to_string()),
        }
    }
}

/// Checks, without touching the file system, that `requested` names
/// `dir` or something below it: either a relative path, or an absolute one
/// that starts with `dir`. Returns the path relative to `dir` (`.` for `dir`
/// itself). Nothing is revealed about files outside, because nothing
/// outside is looked at.
pub fn confine(dir: &Path, requested: &str) -> Option<PathBuf> {
    if requested.is_empty() || requested.contains('\0') {
        return None;
    }
    let path = Path::new(requested);
    let relative = if path.is_absolute() {
        path.strip_prefix(dir).ok()?
    } else {
        path
    };
    let mut clean = PathBuf::new();
    for c in relative.components() {
        match c {
            Component::Normal(part) => clean.push(part),
            Component::CurDir => {}
            // `..`, a second root: never.
            _ => return None,
        }
    }
    if clean.as_os_str().is_empty() {
        clean.push(".");
    }
    Some(clean)
}

/// Opens a directory the operator configured (its own path may go through
/// symlinks).
pub fn open_dir(path: &Path) -> Result<File, NodeFileError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_DIRECTORY | OFlag::O_CLOEXEC).bits())
        .open(path)
        .map_err(|e| NodeFileError::from_io(&e))
}

const OPEN_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_CLOEXEC)
    .union(OFlag::O_NOCTTY)
    .union(OFlag::O_NONBLOCK);

/// Opens `relative` beneath `dir`; the kernel refuses any resolution that
/// would leave `dir` (`..`, absolute symlinks, symlinks pointing out).
pub fn open_beneath(dir: &File, relative: &Path) -> Result<File, NodeFileError> {
    open_beneath_flags(dir, relative, OPEN_FLAGS).map_err(NodeFileError::from_errno)
}

/// Opens a directory beneath `dir` (for scoping to a subdirectory).
pub fn open_dir_beneath(dir: &File, relative: &Path) -> Result<File, NodeFileError> {
    open_beneath_flags(dir, relative, OPEN_FLAGS | OFlag::O_DIRECTORY)
        .map_err(NodeFileError::from_errno)
}

fn open_beneath_flags(dir: &File, relative: &Path, flags: OFlag) -> Result<File, Errno> {
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match nix::fcntl::openat2(dir.as_fd(), relative, how) {
        Ok(fd) => Ok(File::from(fd)),
        // Kernels before 5.6 lack openat2: walk the path refusing every
        // symlink, which is stricter but equally safe.
        Err(Errno::ENOSYS) => open_without_symlinks(dir, relative, flags),
        Err(e) => Err(e),
    }
}

pub(crate) fn open_without_symlinks(
    dir: &File,
    relative: &Path,
    flags: OFlag,
) -> Result<File, Errno> {
    let mut current = dir.try_clone().map_err(|e| io_errno(&e))?;
    let components: Vec<_> = relative.components().collect();
    for (i, component) in components.iter().enumerate() {
        let Component::Normal(part) = component else {
            return Err(Errno::EXDEV);
        };
        let last = i + 1 == components.len();
        let extra = if last {
            OFlag::empty()
        } else {
            OFlag::O_DIRECTORY
        };
        let fd = nix::fcntl::openat(
            current.as_fd(),
            *part,
            flags | OFlag::O_NOFOLLOW | extra,
            nix::sys::stat::Mode::empty(),
        )?;
        current = File::from(fd);
    }
    Ok(current)
}

fn io_errno(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
}

/// What kind of file `kind` is, for messages.
pub fn describe(kind: std::fs::FileType) -> &'static str {
    if kind.is_dir() {
        "a directory"
    } else if kind.is_symlink() {
        "a symlink"
    } else if kind.is_file() {
        "a regular file"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

/// Reads an opened file whole if it is a regular file of at most `max`
/// bytes. A file growing between fstat and read is noticed without being
/// read whole. The buffer is zeroized on failure (it may hold a secret).
pub fn read_regular(file: &File, max: u64) -> Result<Vec<u8>, NodeFileError> {
    let meta = file.metadata().map_err(|e| NodeFileError::from_io(&e))?;
    read_regular_with(file, &meta, max)
}

/// [`read_regular`] with the file's metadata already at hand. A regular
/// file's `read` returns less than asked only at its end, so one read of
/// `size + 1` bytes both reads it whole and notices a file that grew.
pub fn read_regular_with(
    file: &File,
    meta: &std::fs::Metadata,
    max: u64,
) -> Result<Vec<u8>, NodeFileError> {
    if !meta.file_type().is_file() {
        return Err(NodeFileError::NotRegular(describe(meta.file_type())));
    }
    if meta.len() > max {
        return Err(NodeFileError::TooLarge {
            size: meta.len(),
            limit: max,
        });
    }
    let want = meta.len().saturating_add(1).min(max.saturating_add(1)) as usize;
    let mut buf = vec![0u8; want];
    let mut got = 0;
    // Normally one read; more only if a read is cut short by a signal or a
    // file system that returns less than asked before its end.
    loop {
        match (&*file).read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                got += n;
                if got == want {
                    break;
                }
                if (got as u64) == meta.len() {
                    // Short of `size + 1` exactly at the stated size: the end.
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                zeroize::Zeroize::zeroize(&mut buf);
                return Err(NodeFileError::from_io(&e));
            }
        }
    }
    buf.truncate(got);
    if got == want && (got as u64) <= max {
        // The file grew past its stated size: read the rest, bounded.
        if let Err(e) = file
            .take(max.saturating_add(1) - got as u64)
            .read_to_end(&mut buf)
        {
            zeroize::Zeroize::zeroize(&mut buf);
            return Err(NodeFileError::from_io(&e));
        }
    }
    if buf.len() as u64 > max {
        let size = buf.len() as u64;
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(NodeFileError::TooLarge { size, limit: max });
    }
    Ok(buf)
}

/// How long ago a file must have last changed before its [`Stamp`] is
/// trusted to reveal the next change. File systems stamp changes with a
/// coarse clock (a kernel tick; whole seconds on ext4 with small inodes, two
/// on FAT): two writes within one granule can leave identical stamps, but a
/// write after this margin cannot match a stamp from before it.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// Which file a name leads to and the stamps every change to it moves
/// (a write changes size or ctime; a replacement changes the inode; a new
/// link or mode changes ctime), so a file can be known unchanged without
/// being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    nlink: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Stamp {
    pub fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            nlink: meta.nlink(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Hard links to the file.
    pub fn links(&self) -> u64 {
        self.nlink
    }

    /// Did the file last change at least `margin` ([`SETTLE`]) before `t`?
    pub fn settled_before(&self, t: std::time::SystemTime, margin: std::time::Duration) -> bool {
        let Ok(now) = t.duration_since(std::time::UNIX_EPOCH) else {
            return false;
        };
        let (sec, nsec) = self.ctime;
        let changed = i128::from(sec) * 1_000_000_000 + i128::from(nsec);
        changed + (margin.as_nanos() as i128) < now.as_nanos() as i128
    }
}

/// The [`Stamp`] of the entry `name` directly in `dir` if it is a regular
/// file: one `statx`, no path walked, no symlink followed (so it cannot
/// reach past `dir`), attributes fetched fresh from network file systems.
/// `None` for anything else (a symlink, a directory, a missing name).
pub fn stamp_entry(dir: &File, name: &str) -> Option<Stamp> {
    use std::os::fd::AsRawFd;
    if name.is_empty() || name.contains('/') {
        return None;
    }
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: statx writes at most one `struct statx` into `stx`, which is
    // plain old data; `c_name` is a valid NUL-terminated string and `dir`
    // an open descriptor for the duration of the call.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    let rc = unsafe {
        libc::statx(
            dir.as_raw_fd(),
            c_name.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW | libc::AT_STATX_FORCE_SYNC,
            libc::STATX_BASIC_STATS,
            &mut stx,
        )
    };
    let wanted = libc::STATX_TYPE
        | libc::STATX_INO
        | libc::STATX_SIZE
        | libc::STATX_NLINK
        | libc::STATX_MTIME
        | libc::STATX_CTIME;
    if rc != 0
        || stx.stx_mask & wanted != wanted
        || u32::from(stx.stx_mode) & libc::S_IFMT != libc::S_IFREG
    {
        return None;
    }
    Some(Stamp {
        dev: libc::makedev(stx.stx_dev_major, stx.stx_dev_minor),
        ino: stx.stx_ino,
        size: stx.stx_size,
        nlink: u64::from(stx.stx_nlink),
        mtime: (stx.stx_mtime.tv_sec, i64::from(stx.stx_mtime.tv_nsec)),
        ctime: (stx.stx_ctime.tv_sec, i64::from(stx.stx_ctime.tv_nsec)),
    })
}

/// [`open_beneath`] then [`read_regular`].
pub fn read_beneath(dir: &File, relative: &Path, max: u64) -> Result<Vec<u8>, NodeFileError> {
    read_regular(&open_beneath(dir, relative)?, max)
}

/// Reads a file the operator named (a flag), following its symlinks but
/// with the same kind and size rules.
pub fn read_operator_file(path: &Path, max: u64) -> Result<Vec<u8>, NodeFileError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS.bits())
        .open(path)
        .map_err(|e| NodeFileError::from_io(&e))?;
    read_regular(&file, max)
}

/// The regular files directly in directory `dir` (sorted, at most
/// `max_entries` names looked at): names only, nothing is opened.
pub fn list_dir(dir: &File, max_entries: usize) -> Result<Vec<PathBuf>, NodeFileError> {
    let fd = dir.try_clone().map_err(|e| NodeFileError::from_io(&e))?;
    let mut listing = nix::dir::Dir::from_fd(fd.into()).map_err(NodeFileError::from_errno)?;
    let mut names = Vec::new();
    for entry in listing.iter().take(max_entries.saturating_add(2)) {
        let entry = entry.map_err(NodeFileError::from_errno)?;
        let name = entry.file_name().to_bytes();
        if name == b"." || name == b".." || name.starts_with(b"..") {
            // `..data` and friends: Kubernetes volume bookkeeping.
            continue;
        }
        names.push(PathBuf::from(std::ffi::OsStr::from_bytes(name)));
    }
    names.sort();
    names.truncate(max_entries);
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn confine_is_lexical_and_strict() {
        let dir = Path::new("/etc/coffer/tls");
        assert_eq!(
            confine(dir, "/etc/coffer/tls/ca.pem"),
            Some(PathBuf::from("ca.pem"))
        );
        assert_eq!(
            confine(dir, "sub/./ca.pem"),
            Some(PathBuf::from("sub/ca.pem"))
        );
        for bad in [
            "/dev/zero",
            "/etc/coffer/tlsx/ca.pem",
            "/etc/coffer/tls/../passwd",
            "../x",
            "a/../../x",
            "",
            "a\0b",
        ] {
            assert_eq!(confine(dir, bad), None, "{bad:?}");
        }
    }

    #[test]
    fn reads_only_bounded_regular_files_beneath() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("..2026")).unwrap();
        std::fs::write(d.path().join("..2026/ca.pem"), "pem").unwrap();
        symlink("..2026", d.path().join("..data")).unwrap();
        symlink("..data/ca.pem", d.path().join("ca.pem")).unwrap();
        symlink(outside.path().join("secret"), d.path().join("abs")).unwrap();
        symlink("/dev/zero", d.path().join("zero")).unwrap();
        nix::unistd::mkfifo(&d.path().join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(d.path().join("big"), vec![b'x'; 100]).unwrap();
        let dir = open_dir(d.path()).unwrap();
        let read = |p: &str| read_beneath(&dir, Path::new(p), 10);
        assert_eq!(read("ca.pem").unwrap(), b"pem", "Kubernetes volume layout");
        assert_eq!(read("abs"), Err(NodeFileError::Outside));
        assert_eq!(read("zero"), Err(NodeFileError::Outside));
        assert_eq!(read("fifo"), Err(NodeFileError::NotRegular("a FIFO")));
        assert_eq!(
            read("..2026"),
            Err(NodeFileError::NotRegular("a directory"))
        );
        assert_eq!(
            read("big"),
            Err(NodeFileError::TooLarge {
                size: 100,
                limit: 10
            })
        );
        assert_eq!(read("missing"), Err(NodeFileError::NotFound));
        assert_eq!(
            read_operator_file(Path::new("/dev/zero"), 10),
            Err(NodeFileError::NotRegular("a character device"))
        );
        let fifo = d.path().join("fifo");
        assert_eq!(
            read_operator_file(&fifo, 10),
            Err(NodeFileError::NotRegular("a FIFO")),
            "a FIFO neither blocks the open nor is read"
        );
        let names = list_dir(&dir, 100).unwrap();
        assert!(names.contains(&PathBuf::from("ca.pem")));
        assert!(!names.iter().any(|n| n.to_string_lossy().starts_with("..")));
        assert_eq!(list_dir(&dir, 2).unwrap().len(), 2);
    }

    #[test]
    fn fallback_walk_refuses_every_symlink() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/f"), "v").unwrap();
        symlink("d/f", dir.path().join("link")).unwrap();
        let root = File::open(dir.path()).unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC;
        let mut s = String::new();
        open_without_symlinks(&root, Path::new("d/f"), flags)
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "v");
        assert_eq!(
            open_without_symlinks(&root, Path::new("link"), flags).unwrap_err(),
            Errno::ELOOP
        );
    }
}
