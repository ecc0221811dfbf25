//! End-to-end: the real `coffer serve` binary driven over its Unix socket.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;

use coffer::atomic_writer::{self, WriteOutcome};
use coffer::proto;
use common::*;

#[tokio::test]
async fn version_answers_the_driver() {
    let d = Daemon::start();
    let mut c = d.client().await;
    let v = c
        .version(proto::VersionRequest {
            version: "v1alpha1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(v.version, "v1alpha1");
    assert_eq!(v.runtime_name, "coffer");
    assert_eq!(v.runtime_version, env!("CARGO_PKG_VERSION"));
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket is private by default");
}

const OBJECTS: &str = "\
- objectName: db/username
- objectName: db/password
  filePermission: 0600
- objectName: tls/ca/root.pem
  path: certs/root.pem
  filePermission: 0444
- objectName: api-token
  path: api.b64
  encoding: base64
- objectName: raw.bin
  path: key.hex
  encoding: hex
";

fn seed(d: &Daemon) {
    d.write_secret("db/username", "app");
    d.write_secret("db/password", "s3cret-pw");
    d.write_secret(
        "certs/root.pem",
        "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
    );
    d.write_secret("api.b64", "dG9rZW4tdmFsdWU=");
    d.write_secret("key.hex", "00ff10");
}

#[tokio::test]
async fn multi_object_mount_with_nested_paths_and_mixed_modes() {
    let d = Daemon::start();
    seed(&d);
    let mut c = d.client().await;
    let mut driver = driver(std::path::Path::new("/t"));
    driver.permission = 0o640;
    let resp = c
        .mount(driver.to_proto(&spc(OBJECTS)))
        .await
        .unwrap()
        .into_inner();
    assert!(resp.error.is_none());
    let files: BTreeMap<&str, (i32, &[u8])> = resp
        .files
        .iter()
        .map(|f| (f.path.as_str(), (f.mode, f.contents.as_slice())))
        .collect();
    assert_eq!(files.len(), 5);
    assert_eq!(
        files["db/username"],
        (0o640, &b"app"[..]),
        "request permission is the default"
    );
    assert_eq!(files["db/password"], (0o600, &b"s3cret-pw"[..]));
    assert_eq!(files["tls/ca/root.pem"].0, 0o444);
    assert_eq!(files["api-token"], (0o640, &b"token-value"[..]));
    assert_eq!(files["raw.bin"], (0o640, &[0u8, 0xff, 0x10][..]));
    let ids: Vec<&str> = resp.object_version.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "db/username",
            "db/password",
            "tls/ca/root.pem",
            "api-token",
            "raw.bin"
        ]
    );
    for v in &resp.object_version {
        assert_eq!(v.version.len(), 32, "HMAC version for {}", v.id);
        assert!(!v.version.contains("s3cret"));
    }

    // And the driver's writer accepts exactly this response.
    let vol = tempfile::tempdir().unwrap();
    atomic_writer::write(vol.path(), &resp.files).unwrap();
    assert_eq!(
        std::fs::read(vol.path().join("tls/ca/root.pem")).unwrap(),
        files["tls/ca/root.pem"].1
    );
    let mode = std::fs::metadata(vol.path().join("db/password"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn rotation_changes_version_and_swaps_data_dir() {
    let d = Daemon::start();
    seed(&d);
    let mut c = d.client().await;
    let vol = tempfile::tempdir().unwrap();
    let req = || driver(vol.path()).to_proto(&spc(OBJECTS));

    let r1 = c.mount(req()).await.unwrap().into_inner();
    let WriteOutcome::Written { data_dir: dir1, .. } =
        atomic_writer::write(vol.path(), &r1.files).unwrap()
    else {
        panic!("first write")
    };

    // Unchanged: same versions, the writer touches nothing.
    let r2 = c.mount(req()).await.unwrap().into_inner();
    assert_eq!(r1.object_version, r2.object_version);
    assert_eq!(
        atomic_writer::write(vol.path(), &r2.files).unwrap(),
        WriteOutcome::Unchanged
    );

    d.write_secret("db/password", "rotated-pw");
    let r3 = c.mount(req()).await.unwrap().into_inner();
    let changed: Vec<&str> = r1
        .object_version
        .iter()
        .zip(&r3.object_version)
        .filter(|(a, b)| a.version != b.version)
        .map(|(a, _)| a.id.as_str())
        .collect();
    assert_eq!(changed, ["db/password"]);
    let WriteOutcome::Written {
        data_dir: dir3,
        previous,
    } = atomic_writer::write(vol.path(), &r3.files).unwrap()
    else {
        panic!("changed content must be written")
    };
    assert_eq!(previous.as_deref(), Some(dir1.as_str()));
    assert_ne!(dir1, dir3);
    assert!(!vol.path().join(&dir1).exists(), "old data dir removed");
    assert_eq!(
        std::fs::read_link(vol.path().join("..data"))
            .unwrap()
            .to_str(),
        Some(dir3.as_str())
    );
    assert_eq!(
        std::fs::read_to_string(vol.path().join("db/password")).unwrap(),
        "rotated-pw"
    );
}

#[tokio::test]
async fn versions_survive_a_restart() {
    let mut d = Daemon::start();
    seed(&d);
    let r1 = d
        .client()
        .await
        .mount(request(OBJECTS))
        .await
        .unwrap()
        .into_inner();
    d.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d
        .wait_exit(std::time::Duration::from_secs(10))
        .await
        .success());
    d.spawn(&[]);
    d.wait_ready();
    let r2 = d
        .client()
        .await
        .mount(request(OBJECTS))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r1.object_version, r2.object_version,
        "no spurious rotation after a restart"
    );
}

#[tokio::test]
async fn bad_input_gets_the_right_code_and_the_daemon_keeps_serving() {
    let d = Daemon::start_with(Options {
        extra_args: vec!["--max-response-bytes".into(), "1000".into()],
        ..Default::default()
    });
    d.write_secret("ok", "fine");
    d.write_secret("big", vec![b'x'; 1500]);
    d.write_secret("half1", vec![b'x'; 600]);
    d.write_secret("half2", vec![b'x'; 600]);
    d.write_secret("not-b64", "this is not base64 at all!");
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host"), "host-secret").unwrap();
    std::os::unix::fs::symlink(outside.path().join("host"), d.secrets.join("escape")).unwrap();
    std::os::unix::fs::symlink(
        "../../../../../../../../etc/hostname",
        d.secrets.join("escape-rel"),
    )
    .unwrap();
    let mut c = d.client().await;

    let mut bad_json = request("- objectName: ok");
    bad_json.attributes = "{\"objects\": ".into();
    let mut not_object = request("- objectName: ok");
    not_object.attributes = "[\"objects\"]".into();
    let mut bad_secrets = request("- objectName: ok");
    bad_secrets.secrets = "{\"token\": 5}".into();
    let mut bad_perm = request("- objectName: ok");
    bad_perm.permission = "rw-r--r--".into();

    use tonic::Code::*;
    let cases: Vec<(&str, proto::MountRequest, tonic::Code, &str)> = vec![
        (
            "bad attributes JSON",
            bad_json,
            InvalidArgument,
            "attributes is not valid JSON",
        ),
        (
            "attributes not an object",
            not_object,
            InvalidArgument,
            "attributes must be a JSON object",
        ),
        (
            "bad secrets",
            bad_secrets,
            InvalidArgument,
            "secrets: the value of key \"token\"",
        ),
        ("bad permission", bad_perm, InvalidArgument, "permission"),
        (
            "bad YAML",
            request("- objectName: [ok"),
            InvalidArgument,
            "not valid YAML",
        ),
        (
            "not a list",
            request("objectName: ok"),
            InvalidArgument,
            "must be a YAML list",
        ),
        (
            "traversal objectName",
            request("- objectName: ../../etc/passwd\n  path: ok"),
            InvalidArgument,
            "'..'",
        ),
        (
            "absolute objectName",
            request("- objectName: /etc/passwd\n  path: ok"),
            InvalidArgument,
            "absolute",
        ),
        (
            "reserved objectName",
            request("- objectName: ..data\n  path: ok"),
            InvalidArgument,
            "must not start with '..'",
        ),
        (
            "traversal path",
            request("- objectName: x\n  path: ../../etc/passwd"),
            InvalidArgument,
            "must not contain '..'",
        ),
        (
            "escaping symlink",
            request("- objectName: x\n  path: escape"),
            PermissionDenied,
            "outside the file backend root",
        ),
        (
            "escaping relative symlink",
            request("- objectName: x\n  path: escape-rel"),
            PermissionDenied,
            "outside",
        ),
        (
            "duplicate paths",
            request("- objectName: x\n  path: ok\n- objectName: x\n  path: ok"),
            InvalidArgument,
            "more than one object",
        ),
        (
            "file is a directory",
            request("- objectName: a\n  path: ok\n- objectName: a/b\n  path: ok"),
            InvalidArgument,
            "also the directory",
        ),
        (
            "missing file",
            request("- objectName: nope"),
            NotFound,
            "does not exist",
        ),
        (
            "oversize object",
            request("- objectName: big"),
            ResourceExhausted,
            "1500 bytes",
        ),
        (
            "oversize response",
            request("- objectName: half1\n- objectName: half2"),
            ResourceExhausted,
            "1200 bytes",
        ),
        (
            "bad encoding data",
            request("- objectName: not-b64\n  encoding: base64"),
            InvalidArgument,
            "not valid base64",
        ),
        (
            "unknown backend",
            request("- objectName: ok\n  backend: hsm"),
            FailedPrecondition,
            "not enabled",
        ),
        (
            "typo field",
            request("- objectName: ok\n  pth: ok"),
            InvalidArgument,
            "unknown field(s) pth",
        ),
        (
            "bad mode",
            request("- objectName: ok\n  filePermission: 0999"),
            InvalidArgument,
            "filePermission",
        ),
    ];
    for (name, req, want_code, want_msg) in cases {
        let (code, msg) = mount_err(&mut c, req).await;
        assert_eq!(code, want_code, "{name}: {msg}");
        assert!(msg.contains(want_msg), "{name}: {msg:?} lacks {want_msg:?}");
        assert!(
            !msg.contains("host-secret") && !msg.contains("xxxxxxxx"),
            "{name} leaked: {msg}"
        );
        // The daemon keeps serving after each one.
        let ok = c
            .mount(request("- objectName: ok"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.files[0].contents, b"fine", "after {name}");
    }

    // One Mount with several bad objects lists each of them; nothing is returned.
    let (code, msg) = mount_err(
        &mut c,
        request("- objectName: ok\n- objectName: nope1\n- objectName: nope2"),
    )
    .await;
    assert_eq!(code, NotFound);
    assert!(
        msg.starts_with("2 of 3 objects failed, nothing was mounted"),
        "{msg}"
    );
    assert!(
        msg.contains("\"nope1\"") && msg.contains("\"nope2\""),
        "{msg}"
    );
}

#[tokio::test]
async fn two_hundred_concurrent_mounts_are_all_correct() {
    let d = Daemon::start();
    for i in 0..20 {
        d.write_secret(&format!("s/{i}"), format!("value-{i}"));
    }
    let mut tasks = tokio::task::JoinSet::new();
    // 10 connections, 20 concurrent calls each, every call a different object set.
    for conn in 0..10 {
        let client = d.client().await;
        for k in 0..20 {
            let mut client = client.clone();
            tasks.spawn(async move {
                let a = (conn + k) % 20;
                let b = (conn * 7 + k * 3 + 1) % 20;
                let b = if a == b { (b + 1) % 20 } else { b };
                let objects = format!(
                    "- objectName: x/{a}\n  path: s/{a}\n- objectName: y/{b}\n  path: s/{b}\n"
                );
                let resp = client.mount(request(&objects)).await.unwrap().into_inner();
                assert_eq!(resp.files.len(), 2);
                assert_eq!(resp.files[0].path, format!("x/{a}"));
                assert_eq!(resp.files[0].contents, format!("value-{a}").into_bytes());
                assert_eq!(resp.files[1].contents, format!("value-{b}").into_bytes());
                assert_eq!(resp.object_version.len(), 2);
            });
        }
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
        done += 1;
    }
    assert_eq!(done, 200);
}

#[tokio::test]
async fn the_cap_counts_the_encoded_response_not_just_contents() {
    let d = Daemon::start_with(Options {
        extra_args: vec!["--max-response-bytes".into(), "1000".into()],
        ..Default::default()
    });
    // 990 content bytes fit the content cap but not with paths and versions.
    d.write_secret("a", vec![b'x'; 990]);
    let mut c = d.client().await;
    let (code, msg) = mount_err(&mut c, request("- objectName: a")).await;
    assert_eq!(code, tonic::Code::ResourceExhausted);
    assert!(msg.contains("mount response would be"), "{msg}");
    d.write_secret("a", vec![b'x'; 900]);
    let resp = c
        .mount(request("- objectName: a"))
        .await
        .unwrap()
        .into_inner();
    assert!(prost::Message::encoded_len(&resp) <= 1000);
}

/// The file backend keeps small settled files and checks them with one
/// `statx` per Mount: a file rewritten in place (same size, same inode,
/// twice within one clock tick) must still be served new on the very next
/// Mount, and so must a file replaced by a symlink out of the root be
/// refused.
#[tokio::test]
async fn settled_files_rewritten_in_place_are_served_new_at_once() {
    let d = Daemon::start();
    d.write_secret("token", "aaaa");
    d.write_secret("other", "oooo");
    // Older than the settle margin, so the daemon keeps what it reads.
    std::thread::sleep(coffer::nodefs::SETTLE + std::time::Duration::from_millis(300));
    let mut c = d.client().await;
    let objects = "- objectName: token\n- objectName: other\n";
    let contents = |r: &proto::MountResponse| -> Vec<String> {
        r.files
            .iter()
            .map(|f| String::from_utf8_lossy(&f.contents).into_owned())
            .collect()
    };
    for _ in 0..3 {
        let r = c.mount(request(objects)).await.unwrap().into_inner();
        assert_eq!(contents(&r), ["aaaa", "oooo"]);
    }
    for value in ["bbbb", "cccc", "dddd"] {
        // In place: the same inode, the same size, moments apart.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.secrets.join("token"))
            .unwrap();
        std::io::Write::write_all(&mut f, value.as_bytes()).unwrap();
        drop(f);
        let r = c.mount(request(objects)).await.unwrap().into_inner();
        assert_eq!(contents(&r), [value, "oooo"]);
    }
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("host"), "host").unwrap();
    std::fs::remove_file(d.secrets.join("other")).unwrap();
    std::os::unix::fs::symlink(outside.path().join("host"), d.secrets.join("other")).unwrap();
    let status = c.mount(request(objects)).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(!status.message().contains("host"), "{}", status.message());
}

/// A kept file's version is worked out once and kept with it: it must be
/// the version the same bytes get when they are not kept, stay apart per
/// object name and encoding, and change with the content.
#[tokio::test]
async fn kept_file_versions_match_unkept_ones_per_name_and_encoding() {
    let d = Daemon::start();
    d.write_secret("v", "aGVsbG8="); // base64 of "hello"
    let mut c = d.client().await;
    let plain = "- objectName: v\n";
    let renamed = "- objectName: w\n  path: v\n";
    let decoded = "- objectName: v\n  encoding: base64\n";
    let served = |r: proto::MountResponse| {
        (
            r.object_version[0].version.clone(),
            String::from_utf8_lossy(&r.files[0].contents).into_owned(),
        )
    };
    // Not settled yet: read and versioned on every Mount, nothing kept.
    let mut unkept = Vec::new();
    for objects in [plain, renamed, decoded] {
        unkept.push(served(
            c.mount(request(objects)).await.unwrap().into_inner(),
        ));
    }
    assert_eq!(unkept[2].1, "hello");
    assert_ne!(unkept[0].0, unkept[1].0, "the name is part of the version");
    assert_ne!(unkept[0].0, unkept[2].0, "the decoded bytes are versioned");
    std::thread::sleep(coffer::nodefs::SETTLE + std::time::Duration::from_millis(300));
    // Kept now: the first Mount fills the memo, the others read it or (for
    // another name or encoding) work their own out.
    for _ in 0..3 {
        for (i, objects) in [plain, renamed, decoded].into_iter().enumerate() {
            let got = served(c.mount(request(objects)).await.unwrap().into_inner());
            assert_eq!(got, unkept[i], "{objects}");
        }
    }
    d.write_secret("v", "aGk=");
    let changed = served(c.mount(request(decoded)).await.unwrap().into_inner());
    assert_eq!(changed.1, "hi");
    assert_ne!(changed.0, unkept[2].0);
    let changed = served(c.mount(request(plain)).await.unwrap().into_inner());
    assert_ne!(changed.0, unkept[0].0);
}

/// A kept file (small, named directly under the root, settled) served
/// on change notices by the real daemon: every change on disk is in the
/// very next Mount, however it is made.
#[tokio::test]
async fn kept_files_are_served_new_on_the_next_mount() {
    let d = Daemon::start();
    d.write_secret("top", "value-1");
    // Kept only once it last changed more than 3 s before a read.
    tokio::time::sleep(std::time::Duration::from_millis(3200)).await;
    let mut c = d.client().await;
    let vol = tempfile::tempdir().unwrap();
    let req = || driver(vol.path()).to_proto(&spc("- objectName: top\n"));
    let contents = |r: &coffer::proto::MountResponse| r.files[0].contents.clone();
    for _ in 0..3 {
        let r = c.mount(req()).await.unwrap().into_inner();
        assert_eq!(contents(&r), b"value-1");
    }
    // In place, same size: one clock tick may not show it; the notice does.
    d.write_secret("top", "value-2");
    let r = c.mount(req()).await.unwrap().into_inner();
    assert_eq!(contents(&r), b"value-2");
    // Renamed over.
    d.write_secret("top.new", "value-3");
    std::fs::rename(d.secrets.join("top.new"), d.secrets.join("top")).unwrap();
    let r = c.mount(req()).await.unwrap().into_inner();
    assert_eq!(contents(&r), b"value-3");
    // Removed.
    std::fs::remove_file(d.secrets.join("top")).unwrap();
    let status = c.mount(req()).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
}
