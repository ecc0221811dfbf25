//! End-to-end: the node policy and the token identity check, through the
//! real daemon's socket, with the file backend, a real OpenBao and the
//! loopback Google servers. A denied object is refused before any login or
//! fetch (counted at the servers), audited with its rule and counted.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use common::bao::*;
use common::google::{Google, World};
use common::*;
use serde_json::json;
use tonic::Code;

fn policy_daemon(policy: &str, extra: &[&str]) -> (Daemon, std::path::PathBuf, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    let mut args = vec![
        "--policy".to_string(),
        file.display().to_string(),
        "--cache-ttl".into(),
        "0s".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let d = Daemon::start_with(Options {
        extra_args: args,
        health: true,
        ..Default::default()
    });
    (d, file, dir)
}

fn with_params(objects: &str, params: &[(&str, &str)]) -> SecretProviderClass {
    let mut s = spc(objects);
    for (k, v) in params {
        s.parameters.insert(k.to_string(), v.to_string());
    }
    s
}

fn req_in(ns: &str, sa: &str, s: &SecretProviderClass) -> proto::MountRequest {
    let mut drv = driver(Path::new("/t"));
    drv.pod.namespace = ns.into();
    drv.pod.service_account = sa.into();
    let mut s = s.clone();
    s.namespace = Some(ns.into());
    drv.to_proto(&s)
}

const FILE_POLICY: &str = r#"
default: deny
rules:
  - name: no-files-in-prod
    when: {namespaces: ["prod-*"]}
    objects: {backends: [file]}
    action: deny
  - name: eu-residency
    when: {nodeLabels: {topology.kubernetes.io/region: "eu-*"}}
    objects: {backends: [vault, gcp], regionsNot: ["eu-*", "europe-*"]}
    action: deny
  - name: shared-for-web
    when: {serviceAccounts: [web]}
    objects: {backends: [file], paths: ["shared/*"]}
    action: allow
  - name: own-dir
    when: {namespaces: ["team-*", shop]}
    objects: {backends: [file], paths: ["{namespace}/*"]}
    action: allow
"#;

#[tokio::test]
async fn file_objects_are_allowed_or_denied_by_rule_and_denials_are_audited_and_counted() {
    let (d, _file, _dir) = policy_daemon(
        FILE_POLICY,
        &["--node-label", "topology.kubernetes.io/region=eu-west-1"],
    );
    for (path, v) in [
        ("shop/db", "shop-db"),
        ("team-a/db", "a-db"),
        ("team-b/db", "b-db"),
        ("shared/ca", "ca"),
        ("prod-x/db", "prod"),
    ] {
        d.write_secret(path, v);
    }
    let mut c = d.client().await;
    let obj = |p: &str| format!("- objectName: out\n  path: {p}\n");
    // (namespace, service account, path, expected rule or None for allowed)
    let cases: &[(&str, &str, &str, Option<&str>)] = &[
        ("shop", "app", "shop/db", None),
        ("team-a", "app", "team-a/db", None),
        ("team-a", "app", "team-b/db", Some("default")),
        ("team-a", "web", "shared/ca", None),
        ("team-a", "app", "shared/ca", Some("default")),
        ("prod-x", "web", "shared/ca", Some("no-files-in-prod")),
        ("other", "app", "other/db", Some("default")),
    ];
    for (ns, sa, path, denied) in cases {
        let req = req_in(ns, sa, &spc(&obj(path)));
        match denied {
            None => {
                let r = c.mount(req).await.unwrap().into_inner();
                assert_eq!(r.files.len(), 1, "{ns}/{sa} {path}");
            }
            Some(rule) => {
                let (code, msg) = mount_err(&mut c, req).await;
                assert_eq!(code, Code::PermissionDenied, "{ns}/{sa} {path}: {msg}");
                assert!(msg.contains("\"out\""), "{msg}");
                if *rule == "default" {
                    assert!(msg.contains("default"), "{msg}");
                } else {
                    assert!(msg.contains(&format!("rule {rule}")), "{msg}");
                }
                assert!(msg.contains("nothing was fetched"), "{msg}");
            }
        }
    }
    // Audited with the rule (the writer batches: wait for it); counted by rule.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let denial = loop {
        let logs = d.logs();
        let found = logs
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|r| r["audit"] == "mount" && r["rule"] == "no-files-in-prod");
        match found {
            Some(r) => break r,
            None if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            None => panic!("no audit record naming the rule: {logs}"),
        }
    };
    assert_eq!(denial["code"], "PermissionDenied");
    assert_eq!(denial["pod_namespace"], "prod-x");
    let metrics = http_get(d.health.as_deref().unwrap(), "/metrics").await;
    assert!(
        metrics.contains("coffer_policy_denials_total{rule=\"no-files-in-prod\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("coffer_policy_denials_total{rule=\"default\"} 3"),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_bad_policy_stops_start_up_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        "default: allow\nrules:\n  - name: a\n    action: perhaps\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["serve", "--health-addr", "off", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--policy")
        .arg(&file)
        .arg("--version-key-file")
        .arg(dir.path().join("k"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("policy.yaml") && err.contains("line 4"),
        "{err}"
    );
    assert!(
        !dir.path().join("s.sock").exists(),
        "no socket without a policy"
    );
}

#[tokio::test]
async fn reloads_apply_at_once_keep_the_old_policy_when_invalid_and_never_drop_mounts() {
    let allow =
        "default: deny\nrules:\n  - {name: files, objects: {backends: [file]}, action: allow}\n";
    let deny =
        "default: deny\nrules:\n  - {name: closed, objects: {backends: [file]}, action: deny}\n";
    let (d, file, _dir) = policy_daemon(allow, &[]);
    d.write_secret("token", "t");
    let req = request("- objectName: token\n");
    let mut c = d.client().await;
    c.mount(req.clone()).await.unwrap();
    // Mounts keep running while the file changes under them.
    let mut load = d.client().await;
    let load_req = req.clone();
    let running = tokio::spawn(async move {
        let mut codes = Vec::new();
        for _ in 0..300 {
            codes.push(match load.mount(load_req.clone()).await {
                Ok(_) => Code::Ok,
                Err(s) => s.code(),
            });
        }
        codes
    });
    std::fs::write(&file, deny).unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match c.mount(req.clone()).await {
            Err(s) if s.code() == Code::PermissionDenied => {
                assert!(s.message().contains("rule closed"), "{}", s.message());
                break;
            }
            _ if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            other => panic!("reload did not apply: {other:?}"),
        }
    }
    // An invalid file: the policy in force stays, the daemon says why.
    std::fs::write(&file, "default: sometimes\n").unwrap();
    d.signal(nix::sys::signal::Signal::SIGHUP);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (code, msg) = mount_err(&mut c, req.clone()).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("rule closed"), "{msg}");
    assert!(d.logs().contains("policy not reloaded"), "{}", d.logs());
    // A change on disk alone (no signal) is picked up too.
    std::fs::write(&file, allow).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while c.mount(req.clone()).await.is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "file change not picked up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let codes = running.await.unwrap();
    assert!(
        codes
            .iter()
            .all(|c| *c == Code::Ok || *c == Code::PermissionDenied),
        "{codes:?}"
    );
}

/// OpenBao with JWT auth for shop/web, and a KV secret.
async fn bao_setup() -> (Bao, Signer) {
    let bao = Bao::start().await;
    let signer = Signer::new();
    bao.policy("app", r#"path "secret/data/*" { capabilities = ["read"] }"#)
        .await;
    setup_jwt(&bao, &signer, &["app"]).await;
    bao.put_kv2("shop/db", json!({"password": "pw"})).await;
    bao.put_kv2("other/db", json!({"password": "other-pw"}))
        .await;
    (bao, signer)
}

fn vault_spc(addr: &str, path: &str) -> SecretProviderClass {
    with_params(
        &format!("- objectName: db\n  secretPath: {path}\n  secretKey: password\n"),
        &[
            ("backend", "vault"),
            ("vaultAddress", addr),
            ("roleName", "app"),
            ("vaultAuthMountPath", "jwt"),
        ],
    )
}

fn vault_req(s: &SecretProviderClass, jwt: &str, attrs: &[(&str, &str)]) -> proto::MountRequest {
    let mut drv = with_tokens(driver(Path::new("/t")), &[("vault", jwt)]);
    for (k, v) in attrs {
        drv.volume_attributes.insert(k.to_string(), v.to_string());
    }
    drv.to_proto(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_addresses_paths_and_overridden_parameters_are_judged_before_any_login() {
    let (bao, signer) = bao_setup().await;
    let policy = format!(
        r#"
default: deny
rules:
  - name: own-vault-paths
    when: {{namespaces: [shop]}}
    objects:
      backends: [vault]
      addresses: ["{addr}"]
      paths: ["secret/data/{{namespace}}/*"]
      parameters: {{roleName: [app], vaultAuthMountPath: [jwt]}}
    action: allow
"#,
        addr = bao.addr()
    );
    let (d, _file, _dir) = policy_daemon(&policy, &[]);
    let jwt = signer.token("shop", "web", "vault", 600);
    let mut c = d.client().await;
    let ok = c
        .mount(vault_req(
            &vault_spc(&bao.addr(), "secret/data/shop/db"),
            &jwt,
            &[],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.files[0].contents, b"pw");
    let logins = || audited_requests(&bao.audit_path(), "update", "auth/jwt/login");
    let before = logins();
    assert!(before >= 1);
    let attacker = format!("http://127.0.0.1:{}", free_port());
    let denied = [
        // Another namespace's path.
        vault_req(&vault_spc(&bao.addr(), "secret/data/other/db"), &jwt, &[]),
        // The pod overrides the address through its volumeAttributes.
        vault_req(
            &vault_spc(&bao.addr(), "secret/data/shop/db"),
            &jwt,
            &[("vaultAddress", &attacker)],
        ),
        // … or the role.
        vault_req(
            &vault_spc(&bao.addr(), "secret/data/shop/db"),
            &jwt,
            &[("roleName", "admin")],
        ),
    ];
    for req in denied {
        let (code, msg) = mount_err(&mut c, req).await;
        assert_eq!(code, Code::PermissionDenied, "{msg}");
        assert!(msg.contains("default") && msg.contains("\"db\""), "{msg}");
    }
    assert_eq!(logins(), before, "no login for a denied object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_of_another_identity_are_refused_even_with_the_object_cached() {
    let (bao, signer) = bao_setup().await;
    let d = Daemon::start_with(Options {
        extra_args: vec!["--cache-ttl".into(), "10m".into()],
        ..Default::default()
    });
    let s = vault_spc(&bao.addr(), "secret/data/shop/db");
    let mut c = d.client().await;
    let good = signer.token("shop", "web", "vault", 600);
    c.mount(vault_req(&s, &good, &[])).await.unwrap();
    for (jwt, why) in [
        (
            signer.token("shop", "intruder", "vault", 600),
            "service account",
        ),
        (signer.token("other", "web", "vault", 600), "namespace"),
        (signer.token("shop", "web", "vault", -300), "expired"),
    ] {
        let (code, msg) = mount_err(&mut c, vault_req(&s, &jwt, &[])).await;
        assert_eq!(code, Code::PermissionDenied, "{why}: {msg}");
        assert!(
            msg.contains(why) && msg.contains("\"vault\""),
            "{why}: {msg}"
        );
        assert!(!msg.contains(&jwt[..20]));
    }
    // The right token still reads from the cache.
    c.mount(vault_req(&s, &good, &[])).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn google_regions_are_judged_by_location_before_any_exchange() {
    let signer = Signer::new();
    let project = "proj";
    let wif = format!(
        "identitynamespace:{project}.svc.id.goog:https://container.googleapis.com/v1/projects/{project}/locations/europe-west1/clusters/c1"
    );
    let mut w = World {
        sts_audience: wif,
        jwt_key: signer.public_pem.clone(),
        ..Default::default()
    };
    let pod = "principal:system:serviceaccount:shop:web";
    for (name, value) in [
        (
            "projects/proj/locations/europe-west3/secrets/eu",
            "eu-value",
        ),
        ("projects/proj/locations/us-east1/secrets/us", "us-value"),
    ] {
        w.secrets
            .insert(name.into(), vec![value.as_bytes().to_vec()]);
        w.readers
            .insert(name.into(), BTreeSet::from([pod.to_string()]));
    }
    let g = Google::start(w).await;
    let policy = "default: allow\nrules:\n  - name: eu-only\n    when: {nodeLabels: {region: \"eu-*\"}}\n    objects: {backends: [gcp], regionsNot: [\"europe-*\"]}\n    action: deny\n";
    let (d, _file, _dir) = policy_daemon(
        policy,
        &[
            "--node-label",
            "region=eu-west-1",
            "--gcp-secretmanager-endpoint",
            &g.addr,
            "--gcp-sts-endpoint",
            &g.addr,
            "--gcp-iam-credentials-endpoint",
            &g.addr,
            "--gcp-project",
            project,
            "--gcp-cluster-location",
            "europe-west1",
            "--gcp-cluster-name",
            "c1",
        ],
    );
    let audience = format!("{project}.svc.id.goog");
    let req = |resource: &str| {
        let s = SecretProviderClass {
            name: "gcp-spc".into(),
            namespace: Some("shop".into()),
            provider: "coffer".into(),
            parameters: [(
                "secrets".to_string(),
                format!("- resourceName: {resource}/versions/latest\n  path: out\n"),
            )]
            .into_iter()
            .collect(),
        };
        with_tokens(
            driver(Path::new("/t")),
            &[(&audience, &signer.token("shop", "web", &audience, 600))],
        )
        .to_proto(&s)
    };
    let mut c = d.client().await;
    let r = c
        .mount(req("projects/proj/locations/europe-west3/secrets/eu"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.files[0].contents, b"eu-value");
    let (exchanges, accesses) = (
        g.exchanges.load(std::sync::atomic::Ordering::SeqCst),
        g.accesses.load(std::sync::atomic::Ordering::SeqCst),
    );
    let (code, msg) = mount_err(&mut c, req("projects/proj/locations/us-east1/secrets/us")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("rule eu-only"), "{msg}");
    assert_eq!(
        g.exchanges.load(std::sync::atomic::Ordering::SeqCst),
        exchanges
    );
    assert_eq!(
        g.accesses.load(std::sync::atomic::Ordering::SeqCst),
        accesses
    );
}

#[tokio::test]
async fn check_prints_the_deciding_rule_per_object() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, FILE_POLICY).unwrap();
    let manifest = dir.path().join("spc.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: app\n  namespace: team-a\nspec:\n  provider: coffer\n  parameters:\n    backend: file\n    objects: |\n      - objectName: mine\n        path: team-a/db\n      - objectName: theirs\n        path: team-b/db\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .args(["check", "--default-backend", "file", "--policy"])
        .arg(&policy)
        .args([
            "--service-account",
            "app",
            "--node-label",
            "topology.kubernetes.io/region=eu-west-1",
        ])
        .arg(&manifest)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("object \"mine\": allowed by rule own-dir"),
        "{text}"
    );
    assert!(
        text.contains("object \"theirs\": denied by the default"),
        "{text}"
    );
}
