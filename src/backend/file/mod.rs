//! The `file` backend: objects are files under a directory on the node
//! (development, air-gapped nodes, the demo). The daemon reads them with its
//! own authority, so the only thing standing between a pod and the node's
//! files is this module's confinement, done by `nodefs`: every open is
//! resolved *beneath* the root (or, namespace-scoped, beneath
//! `<root>/<namespace>`) by the kernel. Symlinks that stay inside work.
//!
//! A hard link inside the root to a file elsewhere is served: links are made
//! by whoever can write the root, which is the operator. Where tenants can
//! write below the root, `--file-backend-refuse-hardlinks` refuses files
//! with more than one link.
//!
//! Small files named directly beneath the directory are kept after a read
//! and served again while nothing about them changed: on local file systems
//! [`watch`] knows that without a syscall per object; elsewhere one `statx`
//! of the name (no walk, no symlink followed) must show the very same file
//! with the same stamps. Only files that last changed [`nodefs::SETTLE`]
//! before they were read are kept, so a change is seen on the next Mount
//! even where timestamps are coarse.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use super::{Backend, FetchLimits, Fetched, VersionMemo, VERSION_MEMO_BYTES};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::ObjectError;
use crate::key::{Key, KeyBuilder};
use crate::nodefs::{self, NodeFileError, Stamp};
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

mod watch;
use watch::{KeptWatches, Watch};

/// Fields an object of this backend may carry.
const FIELDS: &[&str] = &["path"];

/// Where under the root a pod's objects live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Scope {
    /// Any pod may name any file under the root.
    #[default]
    None,
    /// A pod's `path` is resolved under `<root>/<pod namespace>/`, so a pod
    /// (which can override `objects` through its volume attributes) cannot
    /// read another namespace's files.
    Namespace,
}

pub struct FileBackend {
    root: PathBuf,
    scope: Scope,
    refuse_hardlinks: bool,
    /// Open directory handles (the root, or a namespace's directory),
    /// reopened every [`DIR_REFRESH`] so a replaced directory is noticed:
    /// opening them for every object doubled the syscalls of a Mount.
    dirs: BoundedMap<Dir>,
    /// What was last read of small files, by (scope, name).
    known: BoundedMap<Arc<Known>>,
    /// Change notices for the directories and kept files (`None`: no
    /// inotify here; every kept file is checked with `statx`).
    watch: Option<Watch>,
    /// [`nodefs::SETTLE`]; shorter only in tests.
    settle: Duration,
}

/// An open directory objects are read beneath.
#[derive(Clone)]
struct Dir {
    file: Arc<std::fs::File>,
    /// On the coarse clock (ms-fine; read per object, and a precise read
    /// costs a timer access).
    opened: Duration,
    watch: Option<nix::sys::inotify::WatchDescriptor>,
}

/// What the file backend remembers of a name.
enum Known {
    /// A small regular file as read, with its stamp at the time.
    File {
        stamp: Stamp,
        bytes: SecretBytes,
        /// Its watches, when changes to it are reported.
        watched: Option<KeptWatches>,
        /// The change-event number it was read as of.
        current_as_of: u64,
        /// The version derived for these bytes.
        memo: Arc<VersionMemo>,
    },
    /// Not worth keeping until the instant given: a symlink (as in
    /// Kubernetes' volume layouts; looked at again after [`RECHECK`]) or a
    /// file that changed too recently (until it has settled).
    Uncached(Instant),
}

/// Remembered names: each at most [`INLINE_READ_BYTES`], in all at most
/// 8 MiB of values; the memory is the node's, whoever names the files.
const KNOWN: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 8 << 20,
    idle: Duration::from_secs(600),
};
/// Weight charged per remembered name beyond its bytes.
const KNOWN_OVERHEAD: u64 = 256;
/// How long a name found not worth keeping is read without asking again.
const RECHECK: Duration = Duration::from_secs(30);

/// How long an open directory handle is used before it is opened again.
const DIR_REFRESH: Duration = Duration::from_secs(2);
/// Directory handles kept (one per namespace in use).
const DIRS: Bounds = Bounds {
    max_entries: 256,
    max_weight: 0,
    idle: Duration::from_secs(60),
};

/// A Kubernetes namespace name: a DNS-1123 label. Anything else (`.`, `..`,
/// names with `/`) is refused before it can become a path.
pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

impl FileBackend {
    pub fn new(root: PathBuf, scope: Scope) -> Self {
        Self {
            root,
            scope,
            refuse_hardlinks: false,
            dirs: BoundedMap::new(DIRS),
            known: BoundedMap::new(KNOWN),
            watch: Watch::new(known_key),
            settle: nodefs::SETTLE,
        }
    }

    /// The directory the pod's paths resolve beneath: the root, or
    /// `<root>/<scope>` (itself resolved beneath the root).
    fn dir(&self, scope: Option<&str>, errors: &Errors) -> Result<Dir, ObjectError> {
        static ROOT: std::sync::LazyLock<Key> =
            std::sync::LazyLock::new(|| KeyBuilder::new("file-dir").opt(None::<&str>).finish());
        let key = match scope {
            None => *ROOT,
            Some(_) => KeyBuilder::new("file-dir").opt(scope).finish(),
        };
        if let Some(dir) = self.dirs.get(&key) {
            if crate::bounded_map::coarse_now().saturating_sub(dir.opened) < DIR_REFRESH {
                return Ok(dir);
            }
        }
        let root_dir = nodefs::open_dir(&self.root).map_err(|e| {
            ObjectError::Unavailable(format!(
                "cannot open the file backend root {}: {e}",
                self.root.display()
            ))
        })?;
        let dir = match scope {
            None => root_dir,
            Some(ns) => {
                nodefs::open_dir_beneath(&root_dir, Path::new(ns)).map_err(|e| match e {
                    NodeFileError::NotFound => ObjectError::NotFound(format!(
                        "{} does not exist: the file backend has no directory for namespace {ns}",
                        errors.shown()
                    )),
                    other => ObjectError::PermissionDenied(format!(
                        "the file backend directory of namespace {ns} {other}"
                    )),
                })?
            }
        };
        let dir = Dir {
            watch: self.watch.as_ref().and_then(|w| w.dir(&dir, scope)),
            file: Arc::new(dir),
            opened: crate::bounded_map::coarse_now(),
        };
        self.dirs.insert(key, dir.clone());
        Ok(dir)
    }

    /// Refuse files with more than one hard link.
    pub fn refuse_hardlinks(mut self, refuse: bool) -> Self {
        self.refuse_hardlinks = refuse;
        self
    }

    /// The directory the pod's paths resolve beneath (relative to the
    /// root) and the path inside it, checked lexically first so obvious
    /// mistakes get a clear message before the kernel is asked.
    fn locate<'a>(
        &self,
        object: &'a ObjectSpec,
        ctx: &'a MountContext,
    ) -> Result<(Option<&'a str>, &'a str), ObjectError> {
        let path = object.str_field("path")?.unwrap_or(&object.name);
        check_relative(path)?;
        match self.scope {
            Scope::None => Ok((None, path)),
            Scope::Namespace => {
                let ns = ctx.pod.namespace.as_str();
                if !is_dns1123_label(ns) {
                    return Err(ObjectError::PermissionDenied(
                        "the file backend is namespace-scoped but the request names no valid pod namespace".into(),
                    ));
                }
                Ok((Some(ns), path))
            }
        }
    }
}

fn check_relative(path: &str) -> Result<(), ObjectError> {
    let invalid = |why: &str| {
        Err(ObjectError::Invalid(format!(
            "path {} {why}",
            crate::error::shown(path)
        )))
    };
    if path.is_empty() {
        return invalid("is empty");
    }
    if path.starts_with('/') {
        return invalid("must be relative to the file backend root");
    }
    if path.contains('\0') {
        return invalid("contains a NUL byte");
    }
    if path.split('/').any(|e| e == "..") {
        return invalid("must not contain '..'");
    }
    Ok(())
}

#[async_trait]
impl Backend for FileBackend {
    fn name(&self) -> &'static str {
        "file"
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        let path = object
            .str_field("path")
            .ok()
            .flatten()
            .unwrap_or(&object.name);
        format!("file:{path}")
    }

    /// The path below the root (below the namespace's directory when
    /// scoped); the data is on this node, so no region.
    fn placement(&self, object: &ObjectSpec, ctx: &MountContext) -> crate::policy::Placement {
        crate::policy::Placement {
            address: Some("file".into()),
            path: self.locate(object, ctx).ok().map(|(_, p)| p.to_string()),
            ..Default::default()
        }
    }

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        object.reject_unknown_fields(FIELDS)?;
        self.locate(object, ctx).map(|_| ())
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let (scope, path) = self.locate(object, ctx)?;
        let relative = Path::new(path);
        let errors = Errors::new(relative, scope.is_some());
        // Opening and checking are a few syscalls on the async task; a
        // small regular file (the usual secret) is read there too: a hop to
        // the blocking pool per object cost more than the read.
        let dir = self.dir(scope, &errors)?;
        // Only a name directly beneath the directory can be checked with one
        // syscall that walks nothing.
        let known_key = (!path.contains('/')).then(|| match scope {
            // The same for every Mount of the object: kept with it.
            None => *object.derived(|| known_key(None, path)),
            Some(_) => known_key(scope, path),
        });
        let mut keep = known_key.is_some();
        if let Some(key) = &known_key {
            match self.known.get(key).as_deref() {
                Some(Known::File {
                    stamp,
                    bytes,
                    watched,
                    current_as_of,
                    memo,
                }) if bytes.expose().len() as u64 <= limits.max_bytes => {
                    let fresh = match (&self.watch, watched) {
                        // Watched: the notices decide; a file reported
                        // changed is read again (its stamps may not show a
                        // rewrite within one clock tick).
                        (Some(w), Some(kept)) => {
                            dir.watch == Some(kept.dir)
                                && w.unchanged(key, *current_as_of, *kept, ctx.received)
                        }
                        _ => nodefs::stamp_entry(&dir.file, path).as_ref() == Some(stamp),
                    };
                    if fresh {
                        return Ok(Fetched::new(bytes.clone(), None).with_memo(Arc::clone(memo)));
                    }
                    self.known.remove(key);
                }
                Some(Known::File { .. }) => self.known.remove(key),
                Some(Known::Uncached(until)) if Instant::now() < *until => keep = false,
                _ => {}
            }
        }
        // Changes from here on are reported after this number (asked only
        // where the file can be kept on notices).
        let read_as_of = match (&self.watch, keep && dir.watch.is_some()) {
            (Some(w), true) => Some(w.mark(ctx.received)),
            _ => None,
        };
        let read_at = std::time::SystemTime::now();
        let file = nodefs::open_beneath(&dir.file, relative).map_err(|e| errors.map(e))?;
        let meta = file.metadata().map_err(|e| {
            ObjectError::Unavailable(format!("cannot stat {}: {}", errors.shown(), e.kind()))
        })?;
        if self.refuse_hardlinks && meta.is_file() && meta.nlink() > 1 {
            return Err(ObjectError::PermissionDenied(format!(
                "{} has {} hard links (--file-backend-refuse-hardlinks)",
                errors.shown(),
                meta.nlink()
            )));
        }
        let stamp = Stamp::of(&meta);
        let (contents, file) = if meta.len() <= INLINE_READ_BYTES {
            (
                nodefs::read_regular_with(&file, &meta, limits.max_bytes),
                Some(file),
            )
        } else {
            keep = false;
            let read = tokio::task::spawn_blocking(move || {
                nodefs::read_regular_with(&file, &meta, limits.max_bytes)
            })
            .await
            .map_err(|e| ObjectError::Internal(format!("file read task failed: {e}")))?;
            (read, None)
        };
        let contents = SecretBytes::new(contents.map_err(|e| errors.map(e))?);
        let mut fetched = Fetched::new(contents, None);
        if let (true, Some(key), Some(file)) = (keep, known_key, file) {
            let contents = &fetched.contents;
            // Watched before the last look at the name, so no change falls
            // between the two; only a file with no other name is, since a
            // write through another link is not reported to this directory.
            let watched = match (&self.watch, dir.watch) {
                (Some(w), Some(dir_wd)) if stamp.links() == 1 => {
                    w.file(&file, key).map(|file_wd| KeptWatches {
                        dir: dir_wd,
                        file: file_wd,
                    })
                }
                _ => None,
            };
            // Kept only if the name itself is this file (not a symlink to
            // it) and the file had settled before it was read.
            let settled = stamp.settled_before(read_at, self.settle);
            let plain = settled
                && contents.expose().len() as u64 == stamp.size()
                && nodefs::stamp_entry(&dir.file, path) == Some(stamp);
            if plain {
                let weight = contents.expose().len() as u64 + KNOWN_OVERHEAD + VERSION_MEMO_BYTES;
                let memo = Arc::new(VersionMemo::default());
                let known = Known::File {
                    stamp,
                    bytes: contents.clone(),
                    watched,
                    current_as_of: read_as_of.unwrap_or(0),
                    memo: Arc::clone(&memo),
                };
                self.known.insert_weighed(key, Arc::new(known), weight);
                fetched = fetched.with_memo(memo);
            } else {
                let wait = if settled { RECHECK } else { self.settle };
                let until = Instant::now() + wait;
                self.known
                    .insert_weighed(key, Arc::new(Known::Uncached(until)), KNOWN_OVERHEAD);
            }
        }
        Ok(fetched)
    }
}

/// The key a small file directly beneath a directory is kept under.
fn known_key(scope: Option<&str>, name: &str) -> Key {
    KeyBuilder::new("file-known")
        .opt(scope)
        .field(name)
        .finish()
}

/// Files up to this size are read on the async task.
const INLINE_READ_BYTES: u64 = 64 * 1024;

/// Maps node-file errors to what the pod is told, naming its path (built
/// only when there is an error to tell).
struct Errors<'a> {
    relative: &'a Path,
    below: &'static str,
}

impl<'a> Errors<'a> {
    fn new(relative: &'a Path, scoped: bool) -> Self {
        Self {
            relative,
            below: if scoped {
                "the pod's namespace directory"
            } else {
                "the file backend root"
            },
        }
    }

    fn shown(&self) -> String {
        crate::error::shown(&self.relative.to_string_lossy())
    }

    fn map(&self, e: NodeFileError) -> ObjectError {
        let (shown, below) = (self.shown(), self.below);
        match e {
            NodeFileError::NotFound => {
                ObjectError::NotFound(format!("{shown} does not exist under {below}"))
            }
            NodeFileError::Outside => {
                ObjectError::PermissionDenied(format!("{shown} resolves outside {below}"))
            }
            NodeFileError::Symlink | NodeFileError::Denied => {
                ObjectError::PermissionDenied(format!("{shown} {e}"))
            }
            NodeFileError::NotRegular(kind) => ObjectError::Invalid(format!("{shown} is {kind}")),
            NodeFileError::TooLarge { size, limit } => ObjectError::TooLarge { size, limit },
            NodeFileError::Io(_) => ObjectError::Unavailable(format!("{shown} {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::os::unix::fs::symlink;

    fn ctx(namespace: &str) -> MountContext {
        let attrs = serde_json::json!({ "csi.storage.k8s.io/pod.namespace": namespace });
        MountContext::parse(&attrs.to_string(), "null", "420", "/t").unwrap()
    }

    fn object(name: &str, path: Option<&str>) -> ObjectSpec {
        let mut fields = BTreeMap::new();
        if let Some(p) = path {
            fields.insert("path".to_string(), serde_yaml_ng::Value::String(p.into()));
        }
        ObjectSpec {
            index: 0,
            name_field: "objectName",
            name: name.into(),
            backend: "file".into(),
            mode: None,
            encoding: Default::default(),
            refresh_interval: None,
            optional: false,
            expand: false,
            render: true,
            fields,
            derived: Default::default(),
        }
    }

    const LIMITS: FetchLimits = FetchLimits { max_bytes: 1024 };

    async fn fetch(b: &FileBackend, o: &ObjectSpec, ns: &str) -> Result<Vec<u8>, ObjectError> {
        let c = ctx(ns);
        b.validate(o, &c)?;
        Ok(b.fetch(o, &c, LIMITS).await?.contents.expose().to_vec())
    }

    #[tokio::test]
    async fn confinement_and_file_kinds() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-secret"), "host").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("db")).unwrap();
        std::fs::write(root.join("db/pass"), "p4ss").unwrap();
        symlink("db/pass", root.join("inner-link")).unwrap();
        symlink(outside.path().join("host-secret"), root.join("abs-escape")).unwrap();
        symlink("../../../../../../etc/passwd", root.join("rel-escape")).unwrap();
        symlink(outside.path(), root.join("dir-escape")).unwrap();
        nix::unistd::mkfifo(&root.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        std::fs::write(root.join("big"), vec![b'x'; 2048]).unwrap();
        let b = FileBackend::new(root.to_path_buf(), Scope::None);

        assert_eq!(
            fetch(&b, &object("db/pass", None), "").await.unwrap(),
            b"p4ss"
        );
        assert_eq!(
            fetch(&b, &object("x", Some("db/pass")), "").await.unwrap(),
            b"p4ss"
        );
        assert_eq!(
            fetch(&b, &object("x", Some("inner-link")), "")
                .await
                .unwrap(),
            b"p4ss"
        );
        for escape in ["abs-escape", "rel-escape", "dir-escape/host-secret"] {
            let err = fetch(&b, &object("x", Some(escape)), "").await.unwrap_err();
            assert!(
                matches!(err, ObjectError::PermissionDenied(_)),
                "{escape}: {err}"
            );
        }
        let err = fetch(&b, &object("x", Some("../etc/passwd")), "")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::Invalid(_)), "{err}");
        let err = fetch(&b, &object("x", Some("/etc/passwd")), "")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::Invalid(_)), "{err}");
        let err = fetch(&b, &object("x", Some("missing")), "")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::NotFound(_)), "{err}");
        let err = fetch(&b, &object("x", Some("db")), "").await.unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        let err = fetch(&b, &object("x", Some("fifo")), "").await.unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        let err = fetch(&b, &object("x", Some("big")), "").await.unwrap_err();
        assert_eq!(
            err,
            ObjectError::TooLarge {
                size: 2048,
                limit: 1024
            }
        );
        let err = fetch(&b, &object("x", Some("pth")), "").await;
        assert!(err.is_err());
        let mut typo = object("x", None);
        typo.fields
            .insert("pth".into(), serde_yaml_ng::Value::String("a".into()));
        assert!(b
            .validate(&typo, &ctx(""))
            .unwrap_err()
            .to_string()
            .contains("pth"));
    }

    /// A remembered file is served only while the name is still that very
    /// file: every way of changing it is seen on the next fetch, and the
    /// confinement and kind checks still apply.
    #[tokio::test]
    async fn remembered_files_are_checked_on_every_fetch() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host-secret"), "host").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut b = FileBackend::new(root.to_path_buf(), Scope::None).refuse_hardlinks(true);
        // Files written just now count as settled (a tick of slack is what
        // SETTLE covers in production; here nothing is rewritten in place
        // within one tick).
        b.settle = Duration::ZERO;
        let name = |n: &str| object(n, None);
        let remembered = |b: &FileBackend| {
            b.known
                .get(
                    &KeyBuilder::new("file-known")
                        .opt(None::<&str>)
                        .field("s")
                        .finish(),
                )
                .is_some_and(|k| matches!(*k, Known::File { .. }))
        };
        let write = |content: &str| {
            let tmp = root.join("s.tmp");
            std::fs::write(&tmp, content).unwrap();
            std::fs::rename(&tmp, root.join("s")).unwrap();
        };

        write("one");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"one");
        assert!(remembered(&b));
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"one");
        // Replaced by rename (a new inode, as editors and atomic writers do).
        write("two");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"two");
        // Grown past the caller's limit.
        write(&"x".repeat(2000));
        assert!(matches!(
            fetch(&b, &name("s"), "").await,
            Err(ObjectError::TooLarge { .. })
        ));
        write("three");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"three");
        assert!(remembered(&b));
        // Replaced by a symlink out of the root, by a FIFO, by a directory.
        std::fs::remove_file(root.join("s")).unwrap();
        symlink(outside.path().join("host-secret"), root.join("s")).unwrap();
        let err = fetch(&b, &name("s"), "").await.unwrap_err();
        assert!(matches!(err, ObjectError::PermissionDenied(_)), "{err}");
        std::fs::remove_file(root.join("s")).unwrap();
        write("four");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"four");
        std::fs::remove_file(root.join("s")).unwrap();
        nix::unistd::mkfifo(&root.join("s"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let err = fetch(&b, &name("s"), "").await.unwrap_err();
        assert!(err.to_string().contains("a FIFO"), "{err}");
        std::fs::remove_file(root.join("s")).unwrap();
        std::fs::create_dir(root.join("s")).unwrap();
        let err = fetch(&b, &name("s"), "").await.unwrap_err();
        assert!(err.to_string().contains("a directory"), "{err}");
        std::fs::remove_dir(root.join("s")).unwrap();
        // Deleted.
        write("five");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"five");
        std::fs::remove_file(root.join("s")).unwrap();
        assert!(matches!(
            fetch(&b, &name("s"), "").await,
            Err(ObjectError::NotFound(_))
        ));
        // A second hard link made after it was remembered.
        write("six");
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"six");
        std::fs::hard_link(root.join("s"), root.join("s-link")).unwrap();
        let err = fetch(&b, &name("s"), "").await.unwrap_err();
        assert!(err.to_string().contains("hard links"), "{err}");
        std::fs::remove_file(root.join("s-link")).unwrap();
        // Made unreadable.
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"six");
        std::fs::set_permissions(root.join("s"), std::fs::Permissions::from_mode(0o000)).unwrap();
        if nix::unistd::geteuid().is_root() {
            assert_eq!(fetch(&b, &name("s"), "").await.unwrap(), b"six");
        } else {
            assert!(fetch(&b, &name("s"), "").await.is_err());
        }
    }

    /// On a watched file system a kept file is served on change notices
    /// (no syscall per object), and every change is still seen at once:
    /// an in-place rewrite of the same size, a write through a hard link
    /// made elsewhere after the file was kept, a rename over it.
    #[tokio::test]
    async fn watched_files_are_served_on_notices_and_changes_seen() {
        let dir = tempfile::tempdir().unwrap();
        let elsewhere = tempfile::tempdir_in(dir.path().parent().unwrap()).unwrap();
        let root = dir.path();
        let mut b = FileBackend::new(root.to_path_buf(), Scope::None);
        b.settle = Duration::ZERO;
        let watched = |b: &FileBackend| {
            b.known.get(&known_key(None, "s")).is_some_and(|k| {
                matches!(
                    *k,
                    Known::File {
                        watched: Some(_),
                        ..
                    }
                )
            })
        };
        let name = object("s", None);
        std::fs::write(root.join("s"), "one").unwrap();
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"one");
        let local = watch::local_file_system(&std::fs::File::open(root).unwrap());
        if b.watch.is_none() || !local {
            // No inotify, or a file system changed behind the kernel's back:
            // the statx checks of the test above apply.
            return;
        }
        assert!(watched(&b));
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"one");
        assert!(watched(&b));
        // Same size, same inode, at once.
        std::fs::write(root.join("s"), "two").unwrap();
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"two");
        assert!(watched(&b));
        // A second name outside the root, made after the file was kept.
        let link = elsewhere.path().join("l");
        std::fs::hard_link(root.join("s"), &link).unwrap();
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"two");
        std::fs::write(&link, "six").unwrap();
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"six");
        // With two names it is checked with statx, not kept on notices.
        assert!(!watched(&b));
        std::fs::remove_file(&link).unwrap();
        std::fs::write(root.join("t"), "ten").unwrap();
        std::fs::rename(root.join("t"), root.join("s")).unwrap();
        assert_eq!(fetch(&b, &name, "").await.unwrap(), b"ten");
        assert!(watched(&b));
        std::fs::remove_file(root.join("s")).unwrap();
        assert!(matches!(
            fetch(&b, &name, "").await,
            Err(ObjectError::NotFound(_))
        ));
    }

    /// Names that are symlinks (Kubernetes' `key -> ..data/key`) and files
    /// that changed moments before they were read are read every time.
    #[tokio::test]
    async fn symlinked_and_unsettled_names_are_not_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2026_01")).unwrap();
        std::fs::write(root.join("..2026_01/key"), "v1").unwrap();
        symlink("..2026_01", root.join("..data")).unwrap();
        symlink("..data/key", root.join("key")).unwrap();
        std::fs::write(root.join("fresh"), "f1").unwrap();
        let mut b = FileBackend::new(root.to_path_buf(), Scope::None);
        b.settle = Duration::from_secs(3600);
        let plain = |b: &FileBackend, n: &str| {
            b.known
                .get(
                    &KeyBuilder::new("file-known")
                        .opt(None::<&str>)
                        .field(n)
                        .finish(),
                )
                .is_some_and(|k| matches!(*k, Known::File { .. }))
        };
        assert_eq!(fetch(&b, &object("key", None), "").await.unwrap(), b"v1");
        assert_eq!(fetch(&b, &object("fresh", None), "").await.unwrap(), b"f1");
        assert!(!plain(&b, "key") && !plain(&b, "fresh"));
        // The atomic writer's swap: a new dated directory, ..data relinked.
        std::fs::create_dir(root.join("..2026_02")).unwrap();
        std::fs::write(root.join("..2026_02/key"), "v2").unwrap();
        symlink("..2026_02", root.join("..data.tmp")).unwrap();
        std::fs::rename(root.join("..data.tmp"), root.join("..data")).unwrap();
        assert_eq!(fetch(&b, &object("key", None), "").await.unwrap(), b"v2");
        // Rewritten in place, same size, within the same clock tick.
        std::fs::write(root.join("fresh"), "f2").unwrap();
        assert_eq!(fetch(&b, &object("fresh", None), "").await.unwrap(), b"f2");
    }

    #[tokio::test]
    async fn namespace_scope_confines_pods_to_their_namespace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("shop")).unwrap();
        std::fs::create_dir_all(dir.path().join("bank")).unwrap();
        std::fs::write(dir.path().join("shop/key"), "shop-key").unwrap();
        std::fs::write(dir.path().join("bank/key"), "bank-key").unwrap();
        let b = FileBackend::new(dir.path().to_path_buf(), Scope::Namespace);
        assert_eq!(
            fetch(&b, &object("key", None), "shop").await.unwrap(),
            b"shop-key"
        );
        assert_eq!(
            fetch(&b, &object("key", None), "bank").await.unwrap(),
            b"bank-key"
        );
        let err = fetch(&b, &object("x", Some("../bank/key")), "shop")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::Invalid(_)));
        let err = fetch(&b, &object("key", None), "").await.unwrap_err();
        assert!(matches!(err, ObjectError::PermissionDenied(_)), "{err}");
        for bad_ns in ["..", ".", "a/b", "Shop", "-x", &"a".repeat(64)] {
            let err = fetch(&b, &object("key", None), bad_ns).await.unwrap_err();
            assert!(
                matches!(err, ObjectError::PermissionDenied(_)),
                "{bad_ns}: {err}"
            );
        }
        // A symlink in one namespace's directory (which a tenant's sync tool
        // may write) cannot reach another namespace: resolution is beneath
        // <root>/<namespace>, not beneath the root.
        symlink("../bank/key", dir.path().join("shop/steal")).unwrap();
        symlink("bank", dir.path().join("shop/bank-dir")).unwrap();
        symlink("../bank", dir.path().join("shop/up")).unwrap();
        for escape in ["steal", "up/key"] {
            let err = fetch(&b, &object("x", Some(escape)), "shop")
                .await
                .unwrap_err();
            assert!(
                matches!(err, ObjectError::PermissionDenied(_)),
                "{escape}: {err}"
            );
        }
        let err = fetch(&b, &object("x", Some("bank-dir/key")), "shop")
            .await
            .unwrap_err();
        assert!(matches!(err, ObjectError::NotFound(_)), "{err}");
        let err = fetch(&b, &object("key", None), "nobody").await.unwrap_err();
        assert!(matches!(err, ObjectError::NotFound(_)), "{err}");
    }

    #[tokio::test]
    async fn hard_links_can_be_refused() {
        let outside = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("host"), "host").unwrap();
        if std::fs::hard_link(outside.path().join("host"), dir.path().join("link")).is_err() {
            return; // different file systems: nothing to test
        }
        let lenient = FileBackend::new(dir.path().to_path_buf(), Scope::None);
        assert_eq!(
            fetch(&lenient, &object("link", None), "").await.unwrap(),
            b"host"
        );
        let strict = FileBackend::new(dir.path().to_path_buf(), Scope::None).refuse_hardlinks(true);
        let err = fetch(&strict, &object("link", None), "").await.unwrap_err();
        assert!(err.to_string().contains("2 hard links"), "{err}");
    }
}
