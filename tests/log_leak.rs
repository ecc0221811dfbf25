//! Secrets and tokens never reach the logs, even at `trace` for every crate.

mod common;

use std::collections::BTreeMap;

use coffer::secret::Credential;
use common::*;

const SECRET_FILE: &str = "leak-canary-file-value-7f3a";
const SECRET_B64: &str = "bGVhay1jYW5hcnktZGVjb2RlZC05YzJl"; // "leak-canary-decoded-9c2e"
const SECRET_DECODED: &str = "leak-canary-decoded-9c2e";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.leak-canary-token-41d0.sig";
const NODE_SECRET: &str = "leak-canary-node-publish-b81c";
const BAD_B64: &str = "leak-canary-not-base64!!";

#[tokio::test]
async fn no_secret_or_token_bytes_in_any_log_output() {
    for format in ["text", "json"] {
        let mut d = Daemon::start_with(Options {
            extra_args: vec![
                "--log-level".into(),
                "trace".into(),
                "--log-format".into(),
                format.into(),
                "--max-response-bytes".into(),
                "400".into(),
            ],
            health: true,
            ..Default::default()
        });
        d.write_secret("plain", SECRET_FILE);
        d.write_secret("encoded", SECRET_B64);
        d.write_secret("bad", BAD_B64);
        d.write_secret("big", SECRET_FILE.repeat(20));
        let mut c = d.client().await;
        let mut drv = with_tokens(
            driver(std::path::Path::new("/t")),
            &[("vault", TOKEN), ("gcp.svc.id.goog", TOKEN)],
        );
        drv.node_publish_secrets = Some(BTreeMap::from([
            ("token".to_string(), Credential::new(NODE_SECRET.into())),
            ("key.json".to_string(), Credential::new(NODE_SECRET.into())),
        ]));
        let ok = c
            .mount(drv.to_proto(&spc(
                "- objectName: plain\n- objectName: encoded\n  encoding: base64",
            )))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.files[0].contents, SECRET_FILE.as_bytes());
        assert_eq!(ok.files[1].contents, SECRET_DECODED.as_bytes());
        // Failures that involve the values: bad encoding, oversize, and a
        // request whose token JSON is malformed.
        for objects in [
            "- objectName: bad\n  encoding: base64",
            "- objectName: big",
            "- objectName: plain\n- objectName: encoded",
        ] {
            let mut req = drv.to_proto(&spc(objects));
            if objects.starts_with("- objectName: plain") {
                let mut attrs: BTreeMap<String, String> =
                    serde_json::from_str(&req.attributes).unwrap();
                attrs.insert(
                    "csi.storage.k8s.io/serviceAccount.tokens".into(),
                    format!("{{\"vault\": {{\"token\": \"{TOKEN}\""),
                );
                req.attributes = serde_json::to_string(&attrs).unwrap();
            }
            let (_, msg) = mount_err(&mut c, req).await;
            for canary in [
                SECRET_FILE,
                SECRET_DECODED,
                TOKEN,
                NODE_SECRET,
                BAD_B64,
                "leak-canary",
            ] {
                assert!(
                    !msg.contains(canary),
                    "error message leaked {canary}: {msg}"
                );
            }
        }
        d.signal(nix::sys::signal::Signal::SIGTERM);
        d.wait_exit(std::time::Duration::from_secs(10)).await;
        let logs = d.logs();
        assert!(
            logs.contains("mount served"),
            "trace logging ran: {}",
            &logs[..logs.len().min(2000)]
        );
        assert!(
            logs.len() > 10_000,
            "trace output is substantial ({} bytes)",
            logs.len()
        );
        for canary in ["leak-canary", "bGVhay1jYW5hcnk", TOKEN] {
            assert!(!logs.contains(canary), "{format} logs contain {canary}");
        }
    }
}

/// Built files (templates, formats, expand) at `trace`: their failures and
/// successes say which file and expression, never a value.
#[tokio::test]
async fn built_files_leak_no_value_at_trace() {
    let mut d = Daemon::start_with(Options {
        extra_args: vec!["--log-level".into(), "trace".into()],
        ..Default::default()
    });
    let db = serde_json::json!({
        "user": "leak-canary-user-5d1e",
        "password": "leak-canary-password-0a9b",
        "../leak-canary-key-3c3c": "x",
    });
    d.write_secret("db.json", db.to_string());
    let mut c = d.client().await;
    let objects = "- objectName: db\n  path: db.json\n  render: false\n";
    let with_files = |files: &str| {
        let mut s = spc(objects);
        s.parameters.insert("files".into(), files.into());
        driver(std::path::Path::new("/t")).to_proto(&s)
    };
    let ok = c
        .mount(with_files(
            "- path: a\n  template: '{{ db.user }}:{{ db.password|pgpass }}'\n- path: b.env\n  format: env\n  from: {P: db.password}\n",
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.files.len(), 2);
    for files in [
        "- path: a\n  template: '{{ db.nokey }}'\n",
        "- path: a\n  template: '{{ db.password|b64decode }}'\n",
        "- path: a\n  template: '{{ db.password|int }}'\n",
        "- path: a\n  template: '{{ db.password + 1 }}'\n",
        "- path: a\n  format: env\n  fromObject: db\n",
        "- path: a\n  format: env\n  from: {P: db.nokey}\n",
    ] {
        let (_, msg) = mount_err(&mut c, with_files(files)).await;
        assert!(
            !msg.contains("leak-canary-user") && !msg.contains("leak-canary-password"),
            "{files}: {msg}"
        );
    }
    let expand = c
        .mount(
            driver(std::path::Path::new("/t"))
                .to_proto(&spc("- objectName: db\n  path: db.json\n  expand: true\n")),
        )
        .await;
    let msg = expand
        .expect_err("a key that is not a file name")
        .message()
        .to_string();
    assert!(
        msg.contains("leak-canary-key-3c3c"),
        "keys are named: {msg}"
    );
    assert!(!msg.contains("leak-canary-password"), "{msg}");
    d.signal(nix::sys::signal::Signal::SIGTERM);
    d.wait_exit(std::time::Duration::from_secs(10)).await;
    let logs = d.logs();
    for canary in ["leak-canary-user", "leak-canary-password"] {
        assert!(!logs.contains(canary), "logs contain {canary}");
    }
}
