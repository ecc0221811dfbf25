//! End-to-end: `coffer mount` (the driver's side) and `coffer demo`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const SPC_YAML: &str = r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: cli-spc
spec:
  provider: coffer
  parameters:
    backend: file
    objects: |
      - objectName: db/password
        filePermission: 0600
      - objectName: app.conf
"#;

fn coffer_mount(d: &Daemon, target: &std::path::Path, extra: &[&str]) -> std::process::Output {
    let spc = d.dir.path().join("spc.yaml");
    std::fs::write(&spc, SPC_YAML).unwrap();
    Command::new(BIN)
        .arg("mount")
        .arg(&spc)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--target")
        .arg(target)
        .args(extra)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[tokio::test]
async fn mount_writes_like_the_driver_and_reports_rotation() {
    let d = Daemon::start();
    d.write_secret("db/password", "pw-1");
    d.write_secret("app.conf", "debug = false\n");
    let vol = tempfile::tempdir().unwrap();
    let token = d.dir.path().join("token");
    std::fs::write(&token, "jwt-for-vault\n").unwrap();

    let out = coffer_mount(
        &d,
        vol.path(),
        &[
            "--namespace",
            "shop",
            "--token",
            &format!("vault={}", token.display()),
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mounted 2 objects into"), "{stdout}");
    assert!(stdout.contains("db/password"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(vol.path().join("db/password")).unwrap(),
        "pw-1"
    );
    assert_eq!(
        std::fs::read_link(vol.path().join("db")).unwrap().to_str(),
        Some("..data/db")
    );
    let first_data = std::fs::read_link(vol.path().join("..data")).unwrap();

    let out = coffer_mount(&d, vol.path(), &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("unchanged: 2 objects, nothing written")
    );
    assert_eq!(
        std::fs::read_link(vol.path().join("..data")).unwrap(),
        first_data
    );

    d.write_secret("db/password", "pw-2");
    let out = coffer_mount(&d, vol.path(), &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("replaced {}", first_data.display())),
        "{stdout}"
    );
    assert_eq!(
        std::fs::read_to_string(vol.path().join("db/password")).unwrap(),
        "pw-2"
    );
    assert!(!vol.path().join(&first_data).exists());
}

#[tokio::test]
async fn mount_failure_exits_non_zero_with_the_status() {
    let d = Daemon::start();
    let vol = tempfile::tempdir().unwrap();
    let out = coffer_mount(&d, &vol.path().join("v"), &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NotFound") && stderr.contains("2 of 2 objects failed"),
        "{stderr}"
    );
    assert!(
        !vol.path().join("v/..data").exists(),
        "nothing written on failure"
    );
}

#[tokio::test]
async fn watch_picks_up_rotations() {
    let d = Daemon::start();
    d.write_secret("db/password", "pw-1");
    d.write_secret("app.conf", "x");
    let vol = tempfile::tempdir().unwrap();
    let spc = d.dir.path().join("spc.yaml");
    std::fs::write(&spc, SPC_YAML).unwrap();
    let log = d.dir.path().join("watch.out");
    let mut child = Command::new(BIN)
        .arg("mount")
        .arg(&spc)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--target")
        .arg(vol.path())
        .args(["--watch", "1"])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut waited = Duration::ZERO;
    while !read().contains("mounted 2") && waited < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    d.write_secret("db/password", "pw-2");
    while !read().contains("(changed)") && waited < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let _ = child.kill();
    let _ = child.wait();
    let out = read();
    assert!(out.contains("(changed)"), "{out}");
    assert_eq!(
        std::fs::read_to_string(vol.path().join("db/password")).unwrap(),
        "pw-2"
    );
}

#[test]
fn demo_runs_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    let demo = dir.path().join("demo");
    let out = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&demo)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("mounted 4 objects"), "{stdout}");
    assert!(stdout.contains("(changed)"), "{stdout}");
    assert!(stdout.contains("unchanged: 4 objects"), "{stdout}");
    assert_eq!(
        std::fs::read_to_string(demo.join("pod-volume/db/password")).unwrap(),
        "tr0ub4dor-and-3"
    );
    assert_eq!(
        std::fs::read_to_string(demo.join("pod-volume/api-token")).unwrap(),
        "demo-api-token-v1"
    );
    // Running it again reuses its own directory; a foreign one is refused.
    assert!(Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&demo)
        .output()
        .unwrap()
        .status
        .success());
    let foreign = dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("keep"), "mine").unwrap();
    let out = Command::new(BIN)
        .args(["demo", "--dir"])
        .arg(&foreign)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        std::fs::read_to_string(foreign.join("keep")).unwrap(),
        "mine"
    );
}

#[test]
fn mount_without_a_daemon_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let spc = dir.path().join("spc.yaml");
    std::fs::write(&spc, SPC_YAML).unwrap();
    let out = Command::new(BIN)
        .arg("mount")
        .arg(&spc)
        .arg("--socket")
        .arg(dir.path().join("none.sock"))
        .arg("--target")
        .arg(dir.path().join("vol"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("nothing listens at") && stderr.contains("coffer serve --socket"),
        "{stderr}"
    );
    assert!(!stderr.contains("transport error"), "{stderr}");
}
