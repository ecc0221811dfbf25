//! The driver's side of a Mount: writes `MountResponse.files` into a volume
//! directory the way the Secrets Store CSI Driver does, with the Kubernetes
//! atomic-writer layout. Used by `coffer mount`, the demo and the tests, so
//! what coffer returns is proven writable exactly as the driver would.
//!
//! Layout: `..<timestamp>.<random>/` holds the files, `..data` is a symlink to
//! it, and each top-level user path is a symlink into `..data`. A new version
//! is swapped in by renaming a `..data_tmp` symlink over `..data`, so readers
//! see either the old or the new set, never a mix.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::paths;
use crate::proto;

const DATA: &str = "..data";
const DATA_TMP: &str = "..data_tmp";

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("invalid file path {path:?}: {reason}")]
    Path { path: String, reason: String },
    #[error("file mode {mode} of {path:?} is not a permission mode")]
    Mode { path: String, mode: i32 },
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// Every file already had these bytes and mode; nothing was touched.
    Unchanged,
    /// A new data directory was swapped in.
    Written {
        data_dir: String,
        previous: Option<String>,
    },
}

/// Writes `files` into `target` atomically. `files` must be the complete set.
pub fn write(target: &Path, files: &[proto::File]) -> Result<WriteOutcome, WriteError> {
    for f in files {
        paths::validate_path(&f.path).map_err(|e| WriteError::Path {
            path: f.path.clone(),
            reason: e.to_string(),
        })?;
        if !(0..=0o7777).contains(&f.mode) {
            return Err(WriteError::Mode {
                path: f.path.clone(),
                mode: f.mode,
            });
        }
    }
    if let Some(e) = paths::validate_path_set(files.iter().map(|f| f.path.as_str()))
        .into_iter()
        .next()
    {
        return Err(WriteError::Path {
            path: String::new(),
            reason: e.to_string(),
        });
    }
    fs::create_dir_all(target).map_err(io_err("create target directory", target))?;
    let data_link = target.join(DATA);
    let previous = fs::read_link(&data_link)
        .ok()
        .map(|p| p.to_string_lossy().into_owned());
    if let Some(prev) = &previous {
        if unchanged(&target.join(prev), files) {
            return Ok(WriteOutcome::Unchanged);
        }
    }

    let data_dir = new_data_dir(target)?;
    let data_path = target.join(&data_dir);
    let written = write_files(&data_path, files).and_then(|()| {
        let tmp = target.join(DATA_TMP);
        let _ = fs::remove_file(&tmp);
        symlink(&data_dir, &tmp).map_err(io_err("create symlink", &tmp))?;
        fs::rename(&tmp, &data_link).map_err(io_err("swap in", &data_link))
    });
    if let Err(e) = written {
        let _ = fs::remove_dir_all(&data_path);
        return Err(e);
    }

    let new_top: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.path.split('/').next())
        .collect();
    for top in &new_top {
        let link = target.join(top);
        let want = Path::new(DATA).join(top);
        if fs::read_link(&link).ok().as_deref() == Some(want.as_path()) {
            continue;
        }
        let _ = fs::remove_file(&link);
        symlink(&want, &link).map_err(io_err("create symlink", &link))?;
    }
    // Top-level links of the previous version that the new one no longer has.
    if let Ok(entries) = fs::read_dir(target) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("..") || new_top.contains(name.as_str()) {
                continue;
            }
            let is_our_link = fs::read_link(entry.path())
                .map(|t| t.starts_with(DATA))
                .unwrap_or(false);
            if is_our_link {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
    if let Some(prev) = &previous {
        if prev.starts_with("..") && !prev.contains('/') && *prev != data_dir {
            let _ = fs::remove_dir_all(target.join(prev));
        }
    }
    Ok(WriteOutcome::Written { data_dir, previous })
}

/// True when `dir` holds exactly `files` with the same bytes and modes.
fn unchanged(dir: &Path, files: &[proto::File]) -> bool {
    for f in files {
        let path = dir.join(&f.path);
        let same_mode = fs::symlink_metadata(&path)
            .map(|m| m.is_file() && m.permissions().mode() & 0o7777 == f.mode as u32)
            .unwrap_or(false);
        if !same_mode || fs::read(&path).map(|c| c != f.contents).unwrap_or(true) {
            return false;
        }
    }
    let want: BTreeSet<PathBuf> = files.iter().map(|f| PathBuf::from(&f.path)).collect();
    let mut have = BTreeSet::new();
    list_files(dir, Path::new(""), &mut have);
    have == want
}

fn list_files(dir: &Path, prefix: &Path, out: &mut BTreeSet<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let rel = prefix.join(entry.file_name());
        match entry.file_type() {
            Ok(t) if t.is_dir() => list_files(&entry.path(), &rel, out),
            _ => {
                out.insert(rel);
            }
        }
    }
}

/// Creates `..YYYY_MM_DD_HH_MM_SS.<random>` as the driver does.
fn new_data_dir(target: &Path) -> Result<String, WriteError> {
    let stamp: String = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .trim_end_matches('Z')
        .chars()
        .map(|c| if c.is_ascii_digit() { c } else { '_' })
        .collect();
    loop {
        let mut rnd = [0u8; 5];
        getrandom::fill(&mut rnd).map_err(|e| WriteError::Io {
            action: "generate a directory name in",
            path: target.to_path_buf(),
            source: io::Error::other(e.to_string()),
        })?;
        let name = format!(
            "..{stamp}.{}",
            u64::from_le_bytes([rnd[0], rnd[1], rnd[2], rnd[3], rnd[4], 0, 0, 0])
        );
        let path = target.join(&name);
        match fs::create_dir(&path) {
            Ok(()) => {
                fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
                    .map_err(io_err("set mode of", &path))?;
                return Ok(name);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("create", &path)(e)),
        }
    }
}

fn write_files(dir: &Path, files: &[proto::File]) -> Result<(), WriteError> {
    for f in files {
        let path = dir.join(&f.path);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
        }
        fs::write(&path, &f.contents).map_err(io_err("write", &path))?;
        // chmod, like the driver: the umask does not matter.
        fs::set_permissions(&path, fs::Permissions::from_mode(f.mode as u32))
            .map_err(io_err("set mode of", &path))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, mode: i32, contents: &str) -> proto::File {
        proto::File {
            path: path.into(),
            mode,
            contents: contents.as_bytes().to_vec(),
        }
    }

    #[test]
    fn writes_swaps_and_skips_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path();
        let v1 = vec![
            file("a", 0o644, "one"),
            file("nested/b", 0o600, "two"),
            file("gone", 0o644, "x"),
        ];
        let WriteOutcome::Written {
            data_dir: d1,
            previous: None,
        } = write(t, &v1).unwrap()
        else {
            panic!("first write must write")
        };
        assert!(d1.starts_with("..") && d1.len() > 22, "{d1}");
        assert_eq!(fs::read_link(t.join("..data")).unwrap(), Path::new(&d1));
        assert_eq!(
            fs::read_link(t.join("nested")).unwrap(),
            Path::new("..data/nested")
        );
        assert_eq!(fs::read_to_string(t.join("nested/b")).unwrap(), "two");
        let mode = fs::metadata(t.join("nested/b"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(write(t, &v1).unwrap(), WriteOutcome::Unchanged);

        let v2 = vec![file("a", 0o644, "ONE"), file("nested/b", 0o600, "two")];
        let WriteOutcome::Written {
            data_dir: d2,
            previous: Some(p),
        } = write(t, &v2).unwrap()
        else {
            panic!("changed content must write")
        };
        assert_eq!(p, d1);
        assert!(!t.join(&d1).exists(), "old data dir must be removed");
        assert!(!t.join("gone").exists() && fs::symlink_metadata(t.join("gone")).is_err());
        assert_eq!(fs::read_to_string(t.join("a")).unwrap(), "ONE");
        assert_eq!(fs::read_link(t.join("..data")).unwrap(), Path::new(&d2));

        // A mode change alone is a change.
        let v3 = vec![file("a", 0o400, "ONE"), file("nested/b", 0o600, "two")];
        assert!(matches!(
            write(t, &v3).unwrap(),
            WriteOutcome::Written { .. }
        ));
    }

    #[test]
    fn refuses_bad_payloads_before_touching_disk() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("vol");
        assert!(write(&target, &[file("../x", 0o644, "")]).is_err());
        assert!(write(&target, &[file("a", 0o644, ""), file("a/b", 0o644, "")]).is_err());
        assert!(write(&target, &[file("a", -1, "")]).is_err());
        assert!(!target.exists());
    }
}
