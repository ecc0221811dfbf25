//! The node-wide cache, single-flight, stale-if-error, optional objects and
//! backend protection, end to end: the real daemon over its socket, against
//! a real OpenBao counted through its audit log.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use common::bao::*;
use common::*;
use serde_json::json;
use tonic::Code;

const POLICY: &str = r#"path "secret/*" { capabilities = ["read"] }"#;

fn vault_spc(bao: &Bao, role: &str, extra: &[(&str, &str)], objects: &str) -> SecretProviderClass {
    let mut parameters = BTreeMap::from([
        ("backend".to_string(), "vault".to_string()),
        ("vaultAddress".to_string(), bao.addr()),
        ("roleName".to_string(), role.to_string()),
        ("vaultAuthMountPath".to_string(), "jwt".to_string()),
        ("objects".to_string(), objects.to_string()),
    ]);
    for (k, v) in extra {
        parameters.insert(k.to_string(), v.to_string());
    }
    SecretProviderClass {
        name: "cached".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters,
    }
}

/// The MountRequest of pod `n` running as `sa` in namespace shop.
fn pod(spc: &SecretProviderClass, signer: &Signer, sa: &str, n: usize) -> proto::MountRequest {
    let mut d = with_tokens(
        driver(Path::new(&format!(
            "/var/lib/kubelet/pods/{n}/volumes/v/mount"
        ))),
        &[(
            "vault",
            &signer.pod_token(
                "shop",
                sa,
                "vault",
                600,
                &format!("web-{n}"),
                &format!("pod-uid-{n}"),
            ),
        )],
    );
    d.pod.name = format!("web-{n}");
    d.pod.uid = format!("pod-uid-{n}");
    d.pod.service_account = sa.to_string();
    d.to_proto(spc)
}

async fn setup() -> (Bao, Signer) {
    let bao = Bao::start().await;
    let signer = Signer::new();
    bao.policy("app", POLICY).await;
    setup_jwt(&bao, &signer, &["app"]).await;
    // A second role for another service account, without read access.
    bao.ok(
        "POST",
        "auth/jwt/role/other",
        json!({"role_type": "jwt", "bound_audiences": ["vault"], "user_claim": "sub",
               "bound_subject": "system:serviceaccount:shop:other", "token_policies": ["default"]}),
    )
    .await;
    bao.put_kv2("a", json!({"password": "pw-a", "user": "u-a"}))
        .await;
    bao.put_kv2("b", json!({"key": "k-b"})).await;
    (bao, signer)
}

const OBJECTS: &str = "\
- objectName: password
  secretPath: secret/data/a
  secretKey: password
- objectName: user
  secretPath: secret/data/a
  secretKey: user
- objectName: api-key
  secretPath: secret/data/b
  secretKey: key
";

fn reads(bao: &Bao, path: &str) -> usize {
    audited_requests(&bao.audit_path(), "read", path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_calls_follow_distinct_keys_not_pods_times_objects() {
    let (bao, signer) = setup().await;
    let d = Daemon::start();
    let spc = vault_spc(&bao, "app", &[], OBJECTS);
    let client = d.client().await;
    // Two rotation rounds of 20 pods × 3 objects, all pods at once.
    for round in 0..2 {
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..20 {
            let (mut c, req) = (client.clone(), pod(&spc, &signer, "web", n));
            tasks.spawn(async move { c.mount(req).await.map(|r| r.into_inner()) });
        }
        while let Some(r) = tasks.join_next().await {
            let resp = r.unwrap().expect("mount");
            let files: BTreeMap<_, _> = resp
                .files
                .iter()
                .map(|f| (f.path.as_str(), f.contents.as_slice()))
                .collect();
            assert_eq!(files["password"], b"pw-a", "round {round}");
            assert_eq!(files["api-key"], b"k-b");
        }
    }
    // 120 object fetches; distinct (identity, object) keys: 3, over 2 paths.
    let (a, b) = (reads(&bao, "secret/data/a"), reads(&bao, "secret/data/b"));
    assert!(a <= 2 && b == 1, "reads of a: {a}, of b: {b}");
    let logins = audited_requests(&bao.audit_path(), "update", "auth/jwt/login");
    assert!(logins <= 3, "{logins} logins for 40 Mounts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_different_service_account_never_reads_through_the_cache() {
    let (bao, signer) = setup().await;
    let d = Daemon::start();
    let mut c = d.client().await;
    let spc = vault_spc(&bao, "app", &[], OBJECTS);
    c.mount(pod(&spc, &signer, "web", 1))
        .await
        .expect("web may read");
    // Same SPC, same objects, another service account: its own role lacks
    // read access, and the cached value must not leak to it.
    let other = vault_spc(&bao, "other", &[], OBJECTS);
    let (code, msg) = mount_err(&mut c, pod(&other, &signer, "other", 2)).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    // A pod claiming role "app" with the other account's token is refused at login.
    let (code, msg) = mount_err(&mut c, pod(&spc, &signer, "other", 3)).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    // And web still reads from the cache.
    let before = reads(&bao, "secret/data/a");
    c.mount(pod(&spc, &signer, "web", 4))
        .await
        .expect("web again");
    assert_eq!(reads(&bao, "secret/data/a"), before, "served from cache");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_interval_controls_freshness() {
    let (bao, signer) = setup().await;
    let d = Daemon::start();
    let mut c = d.client().await;
    let objects = "- objectName: cached\n  secretPath: secret/data/a\n  secretKey: password\n\
                   - objectName: live\n  secretPath: secret/data/b\n  secretKey: key\n  refreshInterval: '0'\n";
    let spc = vault_spc(&bao, "app", &[], objects);
    c.mount(pod(&spc, &signer, "web", 1)).await.unwrap();
    bao.put_kv2("a", json!({"password": "pw-a2", "user": "u"}))
        .await;
    bao.put_kv2("b", json!({"key": "k-b2"})).await;
    let resp = c
        .mount(pod(&spc, &signer, "web", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.files[0].contents, b"pw-a",
        "within the 60 s default TTL"
    );
    assert_eq!(
        resp.files[1].contents, b"k-b2",
        "refreshInterval 0 always fetches"
    );
    // An SPC-level refreshInterval applies to all its objects.
    let short = vault_spc(&bao, "app", &[("refreshInterval", "1s")], objects);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = c
        .mount(pod(&short, &signer, "web", 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.files[0].contents, b"pw-a2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_if_error_rides_out_an_outage_but_never_a_refusal() {
    let (mut bao, signer) = setup().await;
    let d = Daemon::start_with(Options {
        extra_args: vec![
            "--cache-ttl".into(),
            "1s".into(),
            "--backend-retries".into(),
            "1".into(),
        ],
        ..Default::default()
    });
    let mut c = d.client().await;
    let objects = "- objectName: password\n  secretPath: secret/data/a\n  secretKey: password\n";
    let tolerant = vault_spc(&bao, "app", &[("staleIfError", "10m")], objects);
    let strict = vault_spc(&bao, "app", &[], objects);
    c.mount(pod(&tolerant, &signer, "web", 1)).await.unwrap();
    bao.stop();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = c
        .mount(pod(&tolerant, &signer, "web", 1))
        .await
        .expect("stale value served")
        .into_inner();
    assert_eq!(resp.files[0].contents, b"pw-a");
    assert!(d.logs().contains("serving a cached value (staleIfError)"));
    let (code, _) = mount_err(&mut c, pod(&strict, &signer, "web", 1)).await;
    assert_eq!(code, Code::Unavailable, "no staleIfError, no stale value");
    // Vault is back but no longer knows the role: a refusal is never masked.
    bao.spawn().await;
    let (code, msg) = mount_err(&mut c, pod(&tolerant, &signer, "web", 1)).await;
    assert_ne!(code, Code::Unavailable, "{msg}");
    assert_ne!(code, Code::Ok);
}

#[tokio::test]
async fn optional_objects_may_be_missing() {
    let d = Daemon::start();
    d.write_secret("present", "here");
    let mut c = d.client().await;
    let objects = "- objectName: present\n- objectName: maybe\n  optional: true\n";
    let resp = c.mount(request(objects)).await.unwrap().into_inner();
    assert_eq!(resp.files.len(), 1);
    let versions: BTreeMap<_, _> = resp
        .object_version
        .iter()
        .map(|v| (v.id.as_str(), v.version.as_str()))
        .collect();
    assert_eq!(versions["maybe"], "absent");
    // When it appears, its version changes like any rotation.
    d.write_secret("maybe", "now");
    let resp = c.mount(request(objects)).await.unwrap().into_inner();
    assert_eq!(resp.files.len(), 2);
    assert_ne!(resp.object_version[1].version, "absent");
    // Only "does not exist" is forgiven.
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), d.secrets.join("escape")).unwrap();
    let (code, _) = mount_err(
        &mut c,
        request("- objectName: x\n  path: escape/f\n  optional: true"),
    )
    .await;
    assert_eq!(code, Code::PermissionDenied);
    let (code, _) = mount_err(&mut c, request("- objectName: gone")).await;
    assert_eq!(code, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_wait_for_the_retry_hint_and_succeed() {
    let (bao, signer) = setup().await;
    bao.ok(
        "POST",
        "sys/quotas/config",
        json!({"enable_rate_limit_response_headers": true}),
    )
    .await;
    bao.ok(
        "POST",
        "sys/quotas/rate-limit/slow",
        json!({"rate": 1, "interval": "1s", "path": "secret/"}),
    )
    .await;
    let d = Daemon::start_with(Options {
        // Enough retries that even the shortest jitter outlasts the 1 s quota window.
        extra_args: vec![
            "--cache-ttl".into(),
            "0s".into(),
            "--backend-retries".into(),
            "6".into(),
        ],
        ..Default::default()
    });
    let mut c = d.client().await;
    let objects = "- objectName: a\n  secretPath: secret/data/a\n  secretKey: user\n\
                   - objectName: b\n  secretPath: secret/data/b\n  secretKey: key\n";
    let started = Instant::now();
    let resp = c
        .mount(pod(
            &vault_spc(&bao, "app", &[], objects),
            &signer,
            "web",
            1,
        ))
        .await;
    let resp = resp.expect("retries ride out the quota").into_inner();
    assert_eq!(resp.files.len(), 2);
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "waited: {:?}",
        started.elapsed()
    );
}
