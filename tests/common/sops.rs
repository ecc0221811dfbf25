//! SOPS implementations that are not coffer's, for interop tests:
//! documents the `sops` tool wrote (published with the `rops` crate on
//! crates.io, with their test age key), the npm `sops-age` decoder under
//! Node.js, Debian's `age` (the Go reference implementation) and Python's
//! `cryptography` for AES-GCM.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{locked, run_with_input};

const ROPS_CRATE: &str = "https://static.crates.io/crates/rops/rops-0.1.7.crate";
/// The rops CLI (a SOPS implementation in Rust, not coffer's), from crates.io.
const ROPS_CLI: &str = "rops-cli@0.1.7";
pub const SOPS_AGE_NPM: &str = "sops-age@4.0.2";

/// The directory of `sops`-made reference documents and the age identity
/// that opens them.
pub fn sops_references() -> (PathBuf, String) {
    locked("sops-refs", |base| {
        let dir = base.join("rops-0.1.7");
        if !dir.join("tests/sops_references/age_example.yaml").exists() {
            let script = format!(
                "import io, sys, tarfile, urllib.request\n\
                 data = urllib.request.urlopen('{ROPS_CRATE}', timeout=120).read()\n\
                 tarfile.open(fileobj=io.BytesIO(data)).extractall(sys.argv[1])\n"
            );
            let out = Command::new("python3")
                .args(["-c", &script])
                .arg(base)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "downloading {ROPS_CRATE}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let source = std::fs::read_to_string(dir.join("src/integration/age.rs")).unwrap();
        let key = source
            .split('"')
            .find(|s| s.starts_with("AGE-SECRET-KEY-1"))
            .expect("the test age key in rops' sources")
            .to_string();
        (dir.join("tests/sops_references"), key)
    })
}

/// `node_modules` with the npm `sops-age` decoder.
pub fn sops_age_npm() -> PathBuf {
    locked("npm", |base| {
        let modules = base.join("node_modules/sops-age");
        if !modules.exists() {
            let out = Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(base)
                .arg(SOPS_AGE_NPM)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "npm install {SOPS_AGE_NPM}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        base.to_path_buf()
    })
}

/// Decrypts a SOPS document with the npm `sops-age` package; its answer as
/// JSON.
pub fn decrypt_with_sops_age(document: &str, file_type: &str, age_key: &str) -> serde_json::Value {
    let prefix = sops_age_npm();
    let script = r#"
const { decryptSops } = require(process.argv[1] + "/node_modules/sops-age");
let input = "";
process.stdin.on("data", (c) => (input += c));
process.stdin.on("end", async () => {
  try {
    const out = await decryptSops(input, { secretKey: process.argv[3], fileType: process.argv[2] });
    process.stdout.write(JSON.stringify(out));
  } catch (e) {
    process.stderr.write(String(e && e.stack || e));
    process.exit(1);
  }
});
"#;
    let out = run_with_input(
        Command::new("node")
            .args(["-e", script])
            .arg(&prefix)
            .arg(file_type)
            .arg(age_key),
        document.as_bytes(),
    );
    assert!(
        out.status.success(),
        "sops-age failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Debian's `age` (Go): decrypts an armored age file with an identity file.
pub fn age_decrypt(armored: &str, identity_file: &Path) -> Vec<u8> {
    let age =
        which("age").expect("Debian's `age` is needed (apt-get install age; .ci/run installs it)");
    let out = run_with_input(
        Command::new(age).arg("-d").arg("-i").arg(identity_file),
        armored.as_bytes(),
    );
    assert!(
        out.status.success(),
        "age -d failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Opens one `ENC[AES256_GCM,...]` value with Python's `cryptography`
/// (OpenSSL's AES-GCM) given the data key and the value's path.
pub fn open_value_with_python(data_key: &[u8], sealed: &str, aad: &str) -> String {
    let venv = super::python::venv(&["cryptography==44.0.0"]);
    let script = r#"
import base64, re, sys
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
key = bytes.fromhex(sys.argv[1])
m = re.match(r"^ENC\[AES256_GCM,data:(.+),iv:(.+),tag:(.+),type:(.+)\]$", sys.argv[2])
data, iv, tag = (base64.b64decode(m.group(i)) for i in (1, 2, 3))
sys.stdout.write(AESGCM(key).decrypt(iv, data + tag, sys.argv[3].encode()).decode())
"#;
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script, &hex(data_key), sealed, aad])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python AES-GCM: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes an identity file as the daemon wants it (0600).
pub fn write_key_file(dir: &Path, name: &str, identities: &[&str]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    let mut text = String::from("# test identities\n");
    for i in identities {
        text.push_str(i);
        text.push('\n');
    }
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The `rops` CLI, built from crates.io once (a debug build, ~2 minutes on
/// two cores) under the target directory.
pub fn rops() -> PathBuf {
    locked("rops", |base| {
        let bin = base.join("bin/rops");
        if !bin.exists() {
            let out = Command::new(env!("CARGO"))
                .args(["install", "--locked", "--debug", "--quiet", "--root"])
                .arg(base)
                .arg(ROPS_CLI)
                .env("CARGO_TARGET_DIR", base.join("build"))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "cargo install {ROPS_CLI}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let _ = std::fs::remove_dir_all(base.join("build"));
        }
        bin
    })
}

/// Runs `rops encrypt|decrypt -f FORMAT` on `input` (standard input: rops
/// refuses a path when standard input is not a terminal).
pub fn run_rops(args: &[&str], env: &[(&str, &str)], input: &str) -> Result<String, String> {
    let out = run_with_input(
        Command::new(rops())
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_BACKTRACE", "0"),
        input.as_bytes(),
    );
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}
