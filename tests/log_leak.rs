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
