//! Operability: metrics, the audit log, who may call, `coffer check`, and the
//! deployment manifests.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use tonic::Code;

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_mounts_by_outcome_without_unbounded_labels() {
    let d = Daemon::start_with(Options {
        health: true,
        ..Default::default()
    });
    d.write_secret("a", "metrics-canary-value");
    let mut c = d.client().await;
    for _ in 0..3 {
        c.mount(request("- objectName: a")).await.unwrap();
    }
    mount_err(&mut c, request("- objectName: missing")).await;
    mount_err(&mut c, request("- objectName: a\n  optional: maybe")).await;
    let text = http_get(d.health.as_deref().unwrap(), "/metrics").await;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("application/openmetrics-text"));
    assert_eq!(
        metric(&text, "coffer_mounts_total{outcome=\"ok\",code=\"OK\"}"),
        3.0,
        "{text}"
    );
    assert_eq!(
        metric(
            &text,
            "coffer_mounts_total{outcome=\"error\",code=\"NotFound\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &text,
            "coffer_mounts_total{outcome=\"error\",code=\"InvalidArgument\"}"
        ),
        1.0
    );
    assert_eq!(metric(&text, "coffer_mount_duration_seconds_count"), 5.0);
    // Every metric the shipped alert rules use exists.
    let families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let rules = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("daemonset/alerts.yaml"),
    )
    .unwrap();
    let mut used = 0;
    for word in rules.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if !word.starts_with("coffer_") {
            continue;
        }
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| word.strip_suffix(s))
            .unwrap_or(word);
        assert!(
            families.contains(&base),
            "alerts.yaml uses {word}, which /metrics lacks"
        );
        used += 1;
    }
    assert!(used >= 8, "{used}");
    assert_eq!(
        metric(
            &text,
            "coffer_backend_calls_total{backend=\"file\",operation=\"fetch\",outcome=\"ok\"}"
        ),
        3.0
    );
    assert_eq!(metric(&text, "coffer_mounts_in_flight"), 0.0);
    assert!(text.contains(&format!(
        "coffer_build_info{{version=\"{}\"}} 1",
        env!("CARGO_PKG_VERSION")
    )));
    for name in [
        "coffer_cache_hits",
        "coffer_stale_serves",
        "coffer_rate_limit_waits",
        "coffer_vault_logins",
        "coffer_vault_lease_renewals",
        "coffer_singleflight_joins",
        "coffer_cache_bytes",
        "coffer_audit_dropped",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert!(!text.contains("metrics-canary"), "no value in metrics");
    assert!(!text.contains("0f6b7a0e-1111"), "no pod UID in labels");
    assert!(!text.contains("web-0"), "no pod name in labels");
}

#[tokio::test]
async fn audit_log_has_one_record_per_object_and_no_values() {
    let dir = tempfile::tempdir().unwrap();
    let audit = dir.path().join("audit.jsonl");
    let d = Daemon::start_with(Options {
        extra_args: vec!["--audit-log".into(), audit.display().to_string()],
        ..Default::default()
    });
    d.write_secret("db/pass", "audit-canary-value");
    d.write_secret("api", "audit-canary-api");
    let mut c = d.client().await;
    c.mount(request(
        "- objectName: db/pass\n- objectName: token\n  path: api",
    ))
    .await
    .unwrap();
    mount_err(&mut c, request("- objectName: nope")).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = std::fs::read_to_string(&audit).unwrap();
    assert!(!text.contains("audit-canary"), "values never audited");
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 3, "{text}");
    let ok = &records[1];
    assert_eq!(ok["audit"], "mount");
    assert_eq!(ok["pod_namespace"], "shop");
    assert_eq!(ok["pod_name"], "web-0");
    assert_eq!(ok["pod_uid"], "0f6b7a0e-1111-4222-8333-444455556666");
    assert_eq!(ok["service_account"], "web");
    assert_eq!(ok["spc"], "test-spc");
    assert_eq!(ok["backend"], "file");
    assert_eq!(ok["object"], "token");
    assert_eq!(ok["address"], "file:api");
    assert_eq!(ok["version"].as_str().unwrap().len(), 32);
    assert_eq!(ok["source"], "backend");
    assert_eq!(
        (ok["outcome"].as_str(), ok["code"].as_str()),
        (Some("ok"), Some("OK"))
    );
    assert!(ok["time"].as_str().unwrap().ends_with('Z'));
    let failed = &records[2];
    assert_eq!(
        (
            failed["object"].as_str(),
            failed["outcome"].as_str(),
            failed["code"].as_str()
        ),
        (Some("nope"), Some("error"), Some("NotFound"))
    );
    let mode = std::fs::metadata(&audit).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[tokio::test]
async fn a_failing_audit_sink_is_counted_and_can_fail_closed() {
    for closed in [false, true] {
        let mut extra = vec!["--audit-log".to_string(), "/dev/full".to_string()];
        if closed {
            extra.push("--audit-fail-closed".into());
        }
        let d = Daemon::start_with(Options {
            extra_args: extra,
            health: true,
            ..Default::default()
        });
        d.write_secret("a", "v");
        let mut c = d.client().await;
        let _ = c.mount(request("- objectName: a")).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let second = c.mount(request("- objectName: a")).await;
        if closed {
            let status = second.expect_err("fail closed");
            assert_eq!(status.code(), Code::Unavailable);
            assert!(
                status.message().contains("audit log"),
                "{}",
                status.message()
            );
        } else {
            second.expect("fail open: served anyway");
        }
        let text = http_get(d.health.as_deref().unwrap(), "/metrics").await;
        assert!(metric(&text, "coffer_audit_errors_total") >= 1.0, "{text}");
        assert!(d.logs().contains("cannot write the audit log"));
    }
}

/// Makes a daemon's socket reachable by an unprivileged user.
fn open_up(d: &Daemon) {
    for dir in [d.dir.path(), d.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
}

fn mount_as_nobody(d: &Daemon) -> std::process::Output {
    let work = tempfile::tempdir().unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let spc = work.path().join("spc.yaml");
    std::fs::write(
        &spc,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: s}\n\
         spec:\n  provider: coffer\n  parameters:\n    backend: file\n    objects: '- objectName: a'\n",
    )
    .unwrap();
    // The build tree may sit below a directory nobody cannot enter: run a copy.
    let bin = work.path().join("coffer");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    Command::new(&bin)
        .arg("mount")
        .arg(&spc)
        .arg("--socket")
        .arg(&d.socket)
        .arg("--target")
        .arg(work.path().join("vol"))
        .uid(65534)
        .gid(65534)
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap()
}

#[tokio::test]
async fn only_allowed_peer_uids_may_call() {
    let d = Daemon::start_with(Options {
        extra_args: vec!["--socket-mode".into(), "0666".into()],
        ..Default::default()
    });
    d.write_secret("a", "v");
    open_up(&d);
    let out = mount_as_nobody(&d);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("PermissionDenied") && stderr.contains("peer uid 65534"),
        "{stderr}"
    );
    assert!(d.logs().contains("refused a call from a peer uid"));
    // Root (the driver) is served.
    d.client()
        .await
        .mount(request("- objectName: a"))
        .await
        .unwrap();

    let widened = Daemon::start_with(Options {
        extra_args: vec![
            "--socket-mode".into(),
            "0666".into(),
            "--allowed-uids".into(),
            "65534".into(),
        ],
        ..Default::default()
    });
    widened.write_secret("a", "v");
    open_up(&widened);
    let out = mount_as_nobody(&widened);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn calls_with_another_authority_are_refused() {
    use hyper_util::rt::TokioIo;
    let d = Daemon::start();
    d.write_secret("a", "v");
    let socket = d.socket.clone();
    let channel = tonic::transport::Endpoint::from_static("http://evil.example")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    let mut c = coffer::proto::csi_driver_provider_client::CsiDriverProviderClient::new(channel);
    let status = c.mount(request("- objectName: a")).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(
        status.message().contains(":authority \"evil.example\""),
        "{}",
        status.message()
    );
}

#[test]
fn check_validates_spcs_like_mount_without_fetching() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(BIN)
        .arg("check")
        .args([
            "daemonset/examples/vault.yaml",
            "daemonset/examples/file.yaml",
            "daemonset/examples/gcp.yaml",
            "daemonset/examples/aws.yaml",
            "daemonset/examples/azure.yaml",
            // The node settings the GCP example relies on.
            "--gcp-cluster-location",
            "europe-west1",
            "--gcp-cluster-name",
            "c1",
        ])
        .current_dir(root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("shop-vault: ok (3 objects"), "{stdout}");
    assert!(stdout.contains("shop-gcp: ok (3 objects"), "{stdout}");
    assert!(stdout.contains("shop-aws: ok (5 objects"), "{stdout}");
    assert!(stdout.contains("shop-azure: ok (6 objects"), "{stdout}");
    assert!(
        stdout.contains("audience(s) api://AzureADTokenExchange in"),
        "{stdout}"
    );
    assert!(
        stdout.contains("audience(s) pods.eks.amazonaws.com in"),
        "{stdout}"
    );
    // The audiences the CSIDriver must request.
    assert!(
        stdout.contains("audience(s) vault in the CSIDriver's tokenRequests"),
        "{stdout}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: typos}\n\
         spec:\n  provider: coffer\n  parameters:\n    backend: vault\n    roleName: app\n    vaultAddress: https://v:8200\n\
         \x20   objects: |\n      - objectName: ../x\n        secretPath: a\n      - objectName: b\n        secertPath: a\n\
         \x20     - objectName: c\n        secretPath: a\n        encoding: rot13\n\
         \x20     - objectName: d\n        secretPath: a\n        objectAlias: left-over\n",
    )
    .unwrap();
    let out = Command::new(BIN).arg("check").arg(&bad).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(stdout.contains("object \"../x\""), "{stdout}");
    assert!(
        stdout.contains("unknown field(s) secertPath (did you mean secretPath?)"),
        "{stdout}"
    );
    assert!(stdout.contains("rot13"), "{stdout}");
    // A field vault-csi-provider would ignore passes, with a warning.
    assert!(
        stdout.contains("warning: object \"d\": field(s) objectAlias ignored by the vault backend"),
        "{stdout}"
    );

    // Judged as Mount judges: a typo of a parameter, no address, no project.
    let typo = dir.path().join("typo.yaml");
    std::fs::write(
        &typo,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: vt}\n\
         spec:\n  provider: coffer\n  paramters: {}\n  parameters:\n    vaultAdress: https://v:8200\n    roleName: app\n\
         \x20   teamOwner: shop\n    objects: |\n      - objectName: a\n        secretPath: secret/data/a\n\
         ---\napiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata: {name: g}\n\
         spec:\n  provider: coffer\n  parameters:\n    secrets: |\n      - resourceName: projects/p/secrets/s/versions/1\n        fileName: f\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("check")
        .arg(&typo)
        .env_remove("VAULT_ADDR")
        .env_remove("COFFER_GCP_PROJECT")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success());
    assert!(
        stdout.contains("parameter vaultAdress (did you mean vaultAddress?)"),
        "{stdout}"
    );
    assert!(stdout.contains("no Vault address"), "{stdout}");
    assert!(
        stdout.contains("parameter teamOwner is not read by coffer"),
        "{stdout}"
    );
    assert!(
        stdout.contains("spec.paramters (did you mean parameters?)"),
        "{stdout}"
    );
    assert!(stdout.contains("pod-adc needs a project"), "{stdout}");
    assert!(!stdout.contains("::"), "{stdout}");
    // The same SPC passes with the daemon's defaults given as flags.
    let out = Command::new(BIN)
        .arg("check")
        .arg(&typo)
        .args(["--vault-addr", "https://vault:8200", "--gcp-project", "p"])
        .args(["--gcp-cluster-location", "l", "--gcp-cluster-name", "c"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("g: ok (1 object;"), "{stdout}");
}

fn yaml_docs(path: &Path) -> Vec<serde_yaml_ng::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[test]
fn daemonset_is_hardened() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = yaml_docs(&root.join("daemonset/coffer.yaml"));
    let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
    assert_eq!(kinds, ["Namespace", "ServiceAccount", "DaemonSet"]);
    assert!(!kinds.iter().any(|k| k.contains("Role")), "no RBAC at all");
    let ds = &docs[2];
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"][0], "ALL");
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"][0]["operator"], "Exists");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert!(!ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"].is_null());
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert!(
        !c["resources"]["requests"]["memory"].is_null()
            && !c["resources"]["limits"]["memory"].is_null()
    );
    let host_paths: Vec<&str> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    assert!(host_paths.contains(&"/var/run/secrets-store-csi-providers"));
    let args: Vec<&str> = c["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert!(args.contains(&"--socket=/provider/coffer.sock"));
    // The chart is rendered and checked for real in tests/deployment.rs.
    let values = yaml_docs(&root.join("daemonset/chart/values.yaml"));
    assert_eq!(values[0]["priorityClassName"], "system-node-critical");
    assert!(!values[0]["resources"]["limits"]["memory"].is_null());
}
