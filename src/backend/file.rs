//! The `file` backend: objects are files under a directory on the node
//! (development, air-gapped nodes, the demo). The daemon reads them with its
//! own authority, so the only thing standing between a pod and the node's
//! files is this module's confinement: every open is resolved *beneath* the
//! root by the kernel (`openat2(RESOLVE_BENEATH)`), which is not racy the way
//! a check-then-open would be. Symlinks that stay inside the root work.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};

use super::{Backend, FetchLimits, Fetched};
use crate::error::ObjectError;
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

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
}

impl FileBackend {
    pub fn new(root: PathBuf, scope: Scope) -> Self {
        Self { root, scope }
    }

    /// The object's path relative to the root, checked lexically first so
    /// obvious mistakes get a clear message before the kernel is asked.
    fn relative_path(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
    ) -> Result<PathBuf, ObjectError> {
        let path = object.str_field("path")?.unwrap_or(&object.name);
        check_relative(path)?;
        match self.scope {
            Scope::None => Ok(PathBuf::from(path)),
            Scope::Namespace => {
                let ns = &ctx.pod.namespace;
                if ns.is_empty() || check_relative(ns).is_err() || ns.contains('/') {
                    return Err(ObjectError::PermissionDenied(
                        "the file backend is namespace-scoped but the request names no valid pod namespace".into(),
                    ));
                }
                Ok(Path::new(ns).join(path))
            }
        }
    }
}

fn check_relative(path: &str) -> Result<(), ObjectError> {
    let invalid = |why: &str| Err(ObjectError::Invalid(format!("path {path:?} {why}")));
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

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        object.reject_unknown_fields(FIELDS)?;
        self.relative_path(object, ctx).map(|_| ())
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let relative = self.relative_path(object, ctx)?;
        let root = self.root.clone();
        let contents =
            tokio::task::spawn_blocking(move || read_beneath(&root, &relative, limits.max_bytes))
                .await
                .map_err(|e| ObjectError::Internal(format!("file read task failed: {e}")))??;
        Ok(Fetched::new(contents, None))
    }
}

/// Opens `relative` beneath `root` and reads it whole, refusing anything that
/// is not a regular file (a FIFO would hang the Mount) or is over `max_bytes`.
fn read_beneath(root: &Path, relative: &Path, max_bytes: u64) -> Result<SecretBytes, ObjectError> {
    let shown = relative.display().to_string();
    let root_dir = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_directory())
        .open(root)
        .map_err(|e| {
            ObjectError::Unavailable(format!(
                "cannot open the file backend root {}: {}",
                root.display(),
                e.kind()
            ))
        })?;
    let file = open_beneath(&root_dir, relative).map_err(|errno| match errno {
        Errno::ENOENT | Errno::ENOTDIR => ObjectError::NotFound(format!(
            "{shown:?} does not exist under the file backend root"
        )),
        Errno::EXDEV => ObjectError::PermissionDenied(format!(
            "{shown:?} resolves outside the file backend root"
        )),
        Errno::ELOOP => ObjectError::PermissionDenied(format!(
            "{shown:?} goes through a symlink, which this kernel cannot confine to the root"
        )),
        Errno::EACCES | Errno::EPERM => {
            ObjectError::PermissionDenied(format!("{shown:?} is not readable by coffer"))
        }
        other => ObjectError::Unavailable(format!("cannot open {shown:?}: {}", other.desc())),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| ObjectError::Unavailable(format!("cannot stat {shown:?}: {}", e.kind())))?;
    let kind = meta.file_type();
    if !kind.is_file() {
        let what = if kind.is_dir() {
            "a directory"
        } else if kind.is_fifo() {
            "a FIFO"
        } else if kind.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(ObjectError::Invalid(format!("{shown:?} is {what}")));
    }
    if meta.len() > max_bytes {
        return Err(ObjectError::TooLarge {
            size: meta.len(),
            limit: max_bytes,
        });
    }
    // The file may grow between fstat and read: read at most one byte past
    // the limit to notice without reading it all.
    let mut buf = Vec::with_capacity(meta.len() as usize);
    let read = (&file).take(max_bytes + 1).read_to_end(&mut buf);
    if let Err(e) = read {
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(ObjectError::Unavailable(format!(
            "cannot read {shown:?}: {}",
            e.kind()
        )));
    }
    if buf.len() as u64 > max_bytes {
        let size = buf.len() as u64;
        zeroize::Zeroize::zeroize(&mut buf);
        return Err(ObjectError::TooLarge {
            size,
            limit: max_bytes,
        });
    }
    Ok(SecretBytes::new(buf))
}

fn libc_o_directory() -> i32 {
    OFlag::O_DIRECTORY.bits()
}

fn open_beneath(root: &File, relative: &Path) -> Result<File, Errno> {
    let flags = OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK;
    let how = OpenHow::new()
        .flags(flags)
        .resolve(ResolveFlag::RESOLVE_BENEATH | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    match nix::fcntl::openat2(root.as_fd(), relative, how) {
        Ok(fd) => Ok(File::from(fd)),
        // Kernels before 5.6 lack openat2: walk the path refusing every
        // symlink, which is stricter but equally safe.
        Err(Errno::ENOSYS) => open_without_symlinks(root, relative, flags),
        Err(e) => Err(e),
    }
}

fn open_without_symlinks(root: &File, relative: &Path, flags: OFlag) -> Result<File, Errno> {
    let mut dir = root.try_clone().map_err(|e| io_errno(&e))?;
    let components: Vec<_> = relative.components().collect();
    for (i, component) in components.iter().enumerate() {
        let last = i + 1 == components.len();
        let extra = if last {
            OFlag::empty()
        } else {
            OFlag::O_DIRECTORY
        };
        let fd = nix::fcntl::openat(
            dir.as_fd(),
            component.as_os_str(),
            flags | OFlag::O_NOFOLLOW | extra,
            nix::sys::stat::Mode::empty(),
        )?;
        dir = File::from(fd);
    }
    Ok(dir)
}

fn io_errno(e: &io::Error) -> Errno {
    e.raw_os_error().map(Errno::from_raw).unwrap_or(Errno::EIO)
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
            name: name.into(),
            backend: "file".into(),
            mode: None,
            encoding: Default::default(),
            refresh_interval: None,
            optional: false,
            fields,
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

    #[tokio::test]
    async fn fallback_walk_refuses_every_symlink() {
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
        let err = fetch(&b, &object("key", None), "..").await.unwrap_err();
        assert!(matches!(err, ObjectError::PermissionDenied(_)), "{err}");
    }
}
