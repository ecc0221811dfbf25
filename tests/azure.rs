//! The `azure` backend through the real daemon, against loopback
//! stand-ins of Entra ID's token endpoint and Key Vault's REST API
//! (tests/common/azure.rs), with certificates and keys made by OpenSSL and
//! outputs read back by OpenSSL.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine as _;
use coffer::manifest::SecretProviderClass;
use coffer::proto;
use coffer::secret::Credential;
use common::azure::{self as az, Azure, SP_CLIENT, SP_SECRET, TENANT, WI_CLIENT};
use common::bao::Signer;
use common::*;
use serde_json::json;
use tonic::Code;

const WI: &str = "api://AzureADTokenExchange";

fn daemon(a: &Azure, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = vec![
        "--azure-authority-host".into(),
        a.url.clone(),
        "--azure-keyvault-endpoint".into(),
        a.vault_endpoint(),
        "--cache-ttl".into(),
        "0s".into(),
        "--backend-retries".into(),
        "2".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(Options {
        extra_args: args,
        ..Default::default()
    })
}

fn spc(params: &[(&str, &str)]) -> SecretProviderClass {
    let mut p: BTreeMap<String, String> = BTreeMap::from([
        ("keyvaultName".to_string(), "kvname".to_string()),
        ("tenantID".to_string(), TENANT.to_string()),
    ]);
    for (k, v) in params {
        p.insert(k.to_string(), v.to_string());
    }
    SecretProviderClass {
        name: "azure-spc".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: p,
    }
}

/// The peer's `objects`: an `array:` of YAML strings.
fn array(objects: &[&str]) -> String {
    let mut out = String::from("array:\n");
    for o in objects {
        out.push_str("  - |\n");
        for line in o.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

fn files(r: &proto::MountResponse) -> BTreeMap<String, Vec<u8>> {
    r.files
        .iter()
        .map(|f| (f.path.clone(), f.contents.clone()))
        .collect()
}

fn versions(r: &proto::MountResponse) -> BTreeMap<String, String> {
    r.object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect()
}

fn read(dir: &Path, f: &str) -> String {
    std::fs::read_to_string(dir.join(f)).unwrap()
}

struct Fixture {
    azure: Azure,
    signer: Signer,
    /// shop/web's token, minted once as the kubelet reuses it.
    token: String,
    dir: tempfile::TempDir,
    pfx: Vec<u8>,
}

async fn fixture() -> Fixture {
    let signer = Signer::new();
    let azure = Azure::start(&signer.public_pem).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    az::make_chain(d, "rsa");
    // Shuffled on purpose: root before leaf before intermediate.
    std::fs::write(
        d.join("shuffled.pem"),
        read(d, "root.crt") + &read(d, "int.crt"),
    )
    .unwrap();
    az::openssl(
        d,
        &[
            "pkcs12",
            "-export",
            "-inkey",
            "leaf.key",
            "-in",
            "leaf.crt",
            "-certfile",
            "shuffled.pem",
            "-passout",
            "pass:",
            "-out",
            "leaf.pfx",
        ],
    );
    let pfx = std::fs::read(d.join("leaf.pfx")).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    azure.put("secrets", "secret1", json!({"value": "s3cret-value"}));
    azure.put(
        "secrets",
        "bin",
        json!({"value": b64(b"\x00\x01binary\xff")}),
    );
    let kid = format!("{}/keys/tls/1", azure.vault_endpoint());
    azure.put(
        "secrets",
        "tls-pfx",
        json!({"value": b64(&pfx), "contentType": "application/x-pkcs12", "kid": kid, "managed": true}),
    );
    azure.put(
        "secrets",
        "tls-pem",
        json!({
            "value": read(d, "leaf.p8") + &read(d, "root.crt") + &read(d, "leaf.crt") + &read(d, "int.crt"),
            "contentType": "application/x-pem-file",
            "kid": kid,
            "managed": true,
        }),
    );
    azure.put("keys", "rsa-key", json!({"key": az::jwk(d, "leaf.key")}));
    az::openssl(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ec.key",
        ],
    );
    azure.put("keys", "ec-key", json!({"key": az::jwk(d, "ec.key")}));
    azure.put(
        "certificates",
        "tls-cert",
        json!({"cer": b64(&az::cert_der(&d.join("leaf.crt"))), "x5t": "AAAA"}),
    );
    for v in ["h1", "h2", "h3"] {
        azure.put("secrets", "hist", json!({"value": v}));
    }
    azure.allow(WI_CLIENT, "*");
    Fixture {
        azure,
        token: signer.token("shop", "web", WI, 600),
        signer,
        dir,
        pfx,
    }
}

fn wi_pod(f: &Fixture, spc: &SecretProviderClass) -> proto::MountRequest {
    with_tokens(driver(Path::new("/t")), &[(WI, &f.token)]).to_proto(spc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_keys_and_certificates_as_the_azure_provider_writes_them() {
    let f = fixture().await;
    let d = f.dir.path();
    let daemon = daemon(&f.azure, &[]);
    let mut c = daemon.client().await;
    let objects = array(&[
        "objectName: secret1\nobjectType: secret\nobjectVersion: \"\"",
        "objectName: bin\nobjectType: secret\nobjectAlias: bin.raw\nobjectEncoding: base64",
        "objectName: tls-pfx\nobjectType: secret\nobjectAlias: tls.pem",
        "objectName: tls-pfx\nobjectType: secret\nobjectAlias: tls.pfx\nobjectFormat: pfx\nobjectEncoding: base64",
        "objectName: tls-pem\nobjectType: secret",
        "objectName: rsa-key\nobjectType: key",
        "objectName: ec-key\nobjectType: key\nfilePermission: \"0400\"",
        "objectName: tls-cert\nobjectType: cert",
        "objectName: hist\nobjectType: secret\nobjectVersionHistory: 3",
    ]);
    let spc = spc(&[("clientID", WI_CLIENT), ("objects", &objects)]);
    let r = c.mount(wi_pod(&f, &spc)).await.unwrap().into_inner();
    let out = files(&r);
    assert_eq!(out["secret1"], b"s3cret-value");
    assert_eq!(out["bin.raw"], b"\x00\x01binary\xff");
    // Key (PKCS#8) first, then the chain: leaf, intermediate, root.
    let chain = read(d, "leaf.crt") + &read(d, "int.crt") + &read(d, "root.crt");
    let expected = read(d, "leaf.p8") + &chain;
    assert_eq!(String::from_utf8_lossy(&out["tls.pem"]), expected);
    assert_eq!(String::from_utf8_lossy(&out["tls-pem"]), expected);
    // The PFX as stored, read back by OpenSSL.
    assert_eq!(out["tls.pfx"], f.pfx);
    std::fs::write(d.join("out.pfx"), &out["tls.pfx"]).unwrap();
    az::openssl(
        d,
        &[
            "pkcs12", "-in", "out.pfx", "-nodes", "-passin", "pass:", "-out", "back.pem",
        ],
    );
    assert!(read(d, "back.pem").contains("web.shop.svc"));
    // Public keys exactly as OpenSSL writes them.
    for (file, key) in [("rsa-key", "leaf.key"), ("ec-key", "ec.key")] {
        az::openssl(d, &["pkey", "-in", key, "-pubout", "-out", "want.pub"]);
        assert_eq!(
            String::from_utf8_lossy(&out[file]),
            read(d, "want.pub"),
            "{file}"
        );
    }
    let modes: BTreeMap<&str, i32> = r.files.iter().map(|f| (f.path.as_str(), f.mode)).collect();
    assert_eq!(modes["ec-key"], 0o400);
    assert_eq!(
        String::from_utf8_lossy(&out["tls-cert"]),
        read(d, "leaf.crt")
    );
    // objectVersionHistory: newest first.
    assert_eq!(out["hist/0"], b"h3");
    assert_eq!(out["hist/1"], b"h2");
    assert_eq!(out["hist/2"], b"h1");
    // ObjectVersions as the peer: <type>/<name>, the Key Vault version.
    let v = versions(&r);
    let stored = f.azure.world.lock().unwrap().items["secrets/secret1"][0]
        .id
        .clone();
    assert_eq!(v["secret/secret1"], stored);
    assert!(v.contains_key("key/rsa-key") && v.contains_key("cert/tls-cert"));
    assert!(v.contains_key("secret/hist/0") && v.contains_key("secret/hist/2"));
    assert_ne!(v["secret/hist/0"], v["secret/hist/1"]);
    // One token for the whole Mount, kept for the next one.
    assert_eq!(f.azure.world.lock().unwrap().token_calls, 1);
    c.mount(wi_pod(&f, &spc)).await.unwrap();
    assert_eq!(f.azure.world.lock().unwrap().token_calls, 1);

    // A new version is a rotation.
    f.azure
        .put("secrets", "secret1", json!({"value": "rotated"}));
    let r = c.mount(wi_pod(&f, &spc)).await.unwrap().into_inner();
    assert_eq!(files(&r)["secret1"], b"rotated");
    assert_ne!(versions(&r)["secret/secret1"], stored);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_and_key_in_separate_files_on_request() {
    let f = fixture().await;
    let d = f.dir.path();
    let daemon = daemon(&f.azure, &["--azure-write-cert-and-key-in-separate-files"]);
    let mut c = daemon.client().await;
    let objects = array(&[
        "objectName: tls-pfx\nobjectType: secret\nobjectAlias: tls",
        "objectName: secret1\nobjectType: secret",
    ]);
    let spc = spc(&[("clientID", WI_CLIENT), ("objects", &objects)]);
    let r = c.mount(wi_pod(&f, &spc)).await.unwrap().into_inner();
    let out = files(&r);
    let chain = read(d, "leaf.crt") + &read(d, "int.crt") + &read(d, "root.crt");
    assert_eq!(String::from_utf8_lossy(&out["tls.crt"]), chain);
    assert_eq!(String::from_utf8_lossy(&out["tls.key"]), read(d, "leaf.p8"));
    assert!(out.contains_key("tls"));
    assert!(
        !out.contains_key("secret1.crt") && !out.contains_key("secret1.key"),
        "a plain secret has no certificate files: {:?}",
        out.keys()
    );
    let gets = f.azure.world.lock().unwrap().gets.len();
    assert_eq!(gets, 2, "one GET per item for its three files");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_principals_refusals_and_throttling() {
    let f = fixture().await;
    f.azure.allow(SP_CLIENT, "secrets/secret1");
    f.azure.allow(SP_CLIENT, "secrets/nope");
    f.azure.put("secrets", "off", json!({"value": "x"}));
    f.azure
        .world
        .lock()
        .unwrap()
        .items
        .get_mut("secrets/off")
        .unwrap()[0]
        .enabled = false;
    f.azure.allow(SP_CLIENT, "secrets/off");
    let daemon = daemon(&f.azure, &[]);
    let mut c = daemon.client().await;
    let sp = |secret: &str, objects: &str| {
        let mut drv = driver(Path::new("/t"));
        drv.node_publish_secrets = Some(BTreeMap::from([
            ("ClientID".to_string(), Credential::new(SP_CLIENT.into())),
            ("clientsecret".to_string(), Credential::new(secret.into())),
        ]));
        drv.to_proto(&spc(&[("objects", objects)]))
    };
    let one = |name: &str| array(&[&format!("objectName: {name}\nobjectType: secret")]);
    let r = c
        .mount(sp(SP_SECRET, &one("secret1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(files(&r)["secret1"], b"s3cret-value");

    let cases: Vec<(proto::MountRequest, Code, &str)> = vec![
        (
            sp("wrong", &one("secret1")),
            Code::PermissionDenied,
            "Entra ID refused",
        ),
        (
            sp(SP_SECRET, &one("tls-pem")),
            Code::PermissionDenied,
            "Forbidden (403)",
        ),
        (
            sp(SP_SECRET, &one("nope")),
            Code::NotFound,
            "SecretNotFound",
        ),
        (
            sp(SP_SECRET, &one("off")),
            Code::FailedPrecondition,
            "disabled",
        ),
    ];
    for (req, code, want) in cases {
        let (got, msg) = mount_err(&mut c, req).await;
        assert_eq!(got, code, "{msg}");
        assert!(msg.contains(want), "{msg}");
        assert!(!msg.contains(SP_SECRET) && !msg.contains("s3cret"), "{msg}");
    }

    // 429 with Retry-After: retried; throttled throughout: Unavailable.
    f.azure.world.lock().unwrap().throttle = 1;
    let r = c
        .mount(sp(SP_SECRET, &one("secret1")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(files(&r)["secret1"], b"s3cret-value");
    f.azure.world.lock().unwrap().throttle = 100;
    let (code, msg) = mount_err(&mut c, sp(SP_SECRET, &one("secret1"))).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("throttled"), "{msg}");
    f.azure.world.lock().unwrap().throttle = 0;

    // Node identities are refused; workload identity needs its audience.
    for flag in ["usePodIdentity", "useVMManagedIdentity"] {
        let s = spc(&[(flag, "true"), ("objects", &one("secret1"))]);
        let (code, msg) = mount_err(&mut c, driver(Path::new("/t")).to_proto(&s)).await;
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(
            msg.contains(flag) && msg.contains("only as the pod"),
            "{msg}"
        );
    }
    let wi = spc(&[("clientID", WI_CLIENT), ("objects", &one("secret1"))]);
    let (code, msg) = mount_err(&mut c, driver(Path::new("/t")).to_proto(&wi)).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains(WI) && msg.contains("tokenRequests"), "{msg}");
    // Another service account's token matches no federated credential.
    let mut other = driver(Path::new("/t"));
    other.pod.service_account = "batch".into();
    let other =
        with_tokens(other, &[(WI, &f.signer.token("shop", "batch", WI, 600))]).to_proto(&wi);
    let (code, msg) = mount_err(&mut c, other).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("system:serviceaccount:shop:batch"), "{msg}");
    // Bad parameters, before any call.
    for (params, want) in [
        (vec![("keyvaultName", "kv")], "3-24"),
        (vec![("cloudName", "AzureMoonCloud")], "cloudName"),
        (vec![("tenantID", "")], "tenantID"),
    ] {
        let mut p = vec![("clientID", WI_CLIENT), ("objects", "")];
        let objects = one("secret1");
        p[1].1 = &objects;
        p.extend(params);
        let (code, msg) = mount_err(&mut c, wi_pod(&f, &spc(&p))).await;
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
    for (object, want) in [
        ("objectName: a\nobjectType: blob", "objectType"),
        ("objectName: a\nobjectType: key\nobjectFormat: pfx", "PFX"),
        (
            "objectName: a\nobjectType: cert\nobjectEncoding: hex",
            "objectEncoding",
        ),
        ("objectName: a\nobjectType: secret\nobjectAlias: ../x", ".."),
        ("objectName: a/b\nobjectType: secret", "item name"),
    ] {
        let s = spc(&[("clientID", WI_CLIENT), ("objects", &array(&[object]))]);
        let (code, msg) = mount_err(&mut c, wi_pod(&f, &s)).await;
        assert_eq!(code, Code::InvalidArgument, "{object}: {msg}");
        assert!(msg.contains(want), "{object}: {msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_azure_providers_examples_check_and_mount_and_mix_with_other_backends() {
    let f = fixture().await;
    let d = f.dir.path();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    // What the examples name.
    f.azure.put(
        "certificates",
        "cert1",
        json!({"cer": b64(&az::cert_der(&d.join("leaf.crt")))}),
    );
    f.azure
        .put("keys", "cert1", json!({"key": az::jwk(d, "leaf.key")}));
    let kid = format!("{}/keys/cert1/1", f.azure.vault_endpoint());
    f.azure.put(
        "secrets",
        "cert1",
        json!({"value": b64(&f.pfx), "contentType": "application/x-pkcs12", "kid": kid}),
    );
    f.azure.put(
        "secrets",
        "cert2-pfx",
        json!({"value": b64(&f.pfx), "contentType": "application/x-pkcs12", "kid": kid}),
    );
    f.azure
        .put("keys", "key1", json!({"key": az::jwk(d, "ec.key")}));
    f.azure.allow(SP_CLIENT, "*");
    let daemon = daemon(&f.azure, &[]);
    daemon.write_secret("local", "from-file");
    let mut c = daemon.client().await;
    let certs = "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: azure-certs\nspec:\n  provider: coffer\n  parameters:\n    usePodIdentity: \"false\"\n    useVMManagedIdentity: \"false\"\n    userAssignedIdentityID: \"\"\n    keyvaultName: \"kvname\"\n    objects: |\n      array:\n        - |\n          objectName: cert1\n          objectType: cert\n          objectVersion: \"\"\n        - |\n          objectName: cert1\n          objectAlias: cert1-pub-key\n          objectType: key\n          objectVersion: \"\"\n        - |\n          objectName: cert1\n          objectAlias: cert1-secret\n          objectType: secret\n          objectVersion: \"\"\n        - |\n          objectName: cert2-pfx\n          objectAlias: cert2-secret-pfx\n          objectType: secret\n          objectVersion: \"\"\n          objectFormat: pfx\n        - |\n          objectName: cert2-pfx\n          objectAlias: cert2-secret-pfx-binary\n          objectType: secret\n          objectVersion: \"\"\n          objectFormat: pfx\n          objectEncoding: base64\n    tenantId: \"tid\"\n";
    let sp_example = "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: azure-kvname\nspec:\n  provider: coffer\n  parameters:\n    usePodIdentity: \"false\"\n    keyvaultName: \"kvname\"\n    cloudName: \"\"\n    objects:  |\n      array:\n        - |\n          objectName: secret1\n          objectType: secret\n          objectVersion: \"\"\n        - |\n          objectName: key1\n          objectType: key\n          objectVersion: \"\"\n    tenantId: \"tid\"\n";
    let dir = tempfile::tempdir().unwrap();
    for (file, manifest, count) in [("certs.yaml", certs, 5), ("sp.yaml", sp_example, 2)] {
        let path = dir.path().join(file);
        std::fs::write(&path, manifest).unwrap();
        let out = std::process::Command::new(BIN)
            .arg("check")
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{file}: {text}");
        assert!(
            text.contains(&format!("ok ({count} objects")),
            "{file}: {text}"
        );
        let spc = SecretProviderClass::from_yaml(manifest).unwrap();
        let mut drv = driver(Path::new("/t"));
        drv.node_publish_secrets = Some(BTreeMap::from([
            ("clientid".to_string(), Credential::new(SP_CLIENT.into())),
            (
                "clientsecret".to_string(),
                Credential::new(SP_SECRET.into()),
            ),
        ]));
        let r = c.mount(drv.to_proto(&spc)).await.unwrap().into_inner();
        assert_eq!(r.files.len(), count, "{file}");
    }

    // One SPC with an Azure object and a file object.
    let mixed = spc(&[
        ("clientID", WI_CLIENT),
        (
            "objects",
            "- objectName: secret1\n  objectType: secret\n  objectAlias: azure.txt\n\
             - objectName: file.txt\n  backend: file\n  path: local\n",
        ),
    ]);
    let r = c.mount(wi_pod(&f, &mixed)).await.unwrap().into_inner();
    let out = files(&r);
    assert_eq!(out["azure.txt"], b"s3cret-value");
    assert_eq!(out["file.txt"], b"from-file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec_chains_legacy_pfx_and_costly_pfx() {
    let signer = Signer::new();
    let azure = Azure::start(&signer.public_pem).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    az::make_chain(d, "ec");
    std::fs::write(
        d.join("shuffled.pem"),
        read(d, "int.crt") + &read(d, "root.crt"),
    )
    .unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let kid = format!("{}/keys/x/1", azure.vault_endpoint());
    for (name, extra) in [
        ("ec-modern", vec![]),
        ("ec-legacy", vec!["-legacy"]),
        ("ec-costly", vec!["-iter", "3000000"]),
    ] {
        let mut args = vec![
            "pkcs12",
            "-export",
            "-inkey",
            "leaf.key",
            "-in",
            "leaf.crt",
            "-certfile",
            "shuffled.pem",
            "-passout",
            "pass:",
            "-out",
            "x.pfx",
        ];
        args.extend(extra);
        az::openssl(d, &args);
        let pfx = std::fs::read(d.join("x.pfx")).unwrap();
        if name == "ec-modern" {
            let rounds = coffer::backend::azure::cert::pkcs12_iterations(&pfx);
            assert!((2048..=10_000).contains(&rounds), "{rounds}");
        }
        azure.put(
            "secrets",
            name,
            json!({"value": b64(&pfx), "contentType": "application/x-pkcs12", "kid": kid}),
        );
    }
    azure.allow(WI_CLIENT, "*");
    let daemon = daemon(&azure, &[]);
    let mut c = daemon.client().await;
    let pod = |spc: &SecretProviderClass| {
        with_tokens(
            driver(Path::new("/t")),
            &[(WI, &signer.token("shop", "web", WI, 600))],
        )
        .to_proto(spc)
    };
    let objects = array(&[
        "objectName: ec-modern\nobjectType: secret",
        "objectName: ec-legacy\nobjectType: secret",
    ]);
    let r = c
        .mount(pod(&spc(&[("clientID", WI_CLIENT), ("objects", &objects)])))
        .await
        .unwrap()
        .into_inner();
    let chain = read(d, "leaf.crt") + &read(d, "int.crt") + &read(d, "root.crt");
    let expected = read(d, "leaf.p8") + &chain;
    for f in ["ec-modern", "ec-legacy"] {
        assert_eq!(String::from_utf8_lossy(&files(&r)[f]), expected, "{f}");
    }
    // A value that asks for millions of key-derivation rounds is refused
    // before any is computed.
    let costly = array(&["objectName: ec-costly\nobjectType: secret"]);
    let started = std::time::Instant::now();
    let (code, msg) = mount_err(
        &mut c,
        pod(&spc(&[("clientID", WI_CLIENT), ("objects", &costly)])),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("key-derivation rounds"), "{msg}");
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_secret_token_or_key() {
    let f = fixture().await;
    f.azure.allow(SP_CLIENT, "*");
    let daemon = daemon(&f.azure, &["--log-level", "trace"]);
    let mut c = daemon.client().await;
    let objects = array(&[
        "objectName: secret1\nobjectType: secret",
        "objectName: tls-pfx\nobjectType: secret",
    ]);
    let wi_jwt = f.signer.token("shop", "web", WI, 600);
    let req = with_tokens(driver(Path::new("/t")), &[(WI, &wi_jwt)])
        .to_proto(&spc(&[("clientID", WI_CLIENT), ("objects", &objects)]));
    c.mount(req).await.unwrap();
    let mut drv = driver(Path::new("/t"));
    drv.node_publish_secrets = Some(BTreeMap::from([
        ("clientid".to_string(), Credential::new(SP_CLIENT.into())),
        (
            "clientsecret".to_string(),
            Credential::new(SP_SECRET.into()),
        ),
    ]));
    c.mount(drv.to_proto(&spc(&[("objects", &objects)])))
        .await
        .unwrap();
    let logs = daemon.logs();
    assert!(logs.len() > 1000, "trace logging is on");
    let tokens: Vec<String> = f
        .azure
        .world
        .lock()
        .unwrap()
        .tokens
        .keys()
        .cloned()
        .collect();
    assert_eq!(tokens.len(), 2);
    let key_body: String = read(f.dir.path(), "leaf.p8")
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    for canary in [
        "s3cret-value",
        SP_SECRET,
        wi_jwt.split('.').nth(1).unwrap(),
        &key_body,
    ]
    .into_iter()
    .chain(tokens.iter().map(String::as_str))
    {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(canary)).collect();
        assert!(lines.is_empty(), "{canary} is in the log: {lines:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_values_are_shared_only_by_identical_authorizations() {
    let f = fixture().await;
    f.azure.allow(SP_CLIENT, "*");
    let daemon = daemon_cached(&f.azure);
    let mut c = daemon.client().await;
    let objects = array(&["objectName: secret1\nobjectType: secret"]);
    let wi = spc(&[("clientID", WI_CLIENT), ("objects", &objects)]);
    let gets = || f.azure.world.lock().unwrap().gets.len();
    let pod = |name: &str, uid: &str| {
        let mut drv = driver(Path::new("/t"));
        drv.pod.name = name.into();
        drv.pod.uid = uid.into();
        let token = f.signer.pod_token("shop", "web", WI, 600, name, uid);
        with_tokens(drv, &[(WI, &token)]).to_proto(&wi)
    };
    c.mount(pod("web-0", "0f6b7a0e-1111-4222-8333-444455556666"))
        .await
        .unwrap();
    assert_eq!(gets(), 1);
    // Another pod of the same service account and application: cached.
    c.mount(pod("web-1", "0f6b7a0e-1111-4222-8333-000000000001"))
        .await
        .unwrap();
    assert_eq!(gets(), 1);
    // A service principal is another authorization.
    let mut drv = driver(Path::new("/t"));
    drv.node_publish_secrets = Some(BTreeMap::from([
        ("clientid".to_string(), Credential::new(SP_CLIENT.into())),
        (
            "clientsecret".to_string(),
            Credential::new(SP_SECRET.into()),
        ),
    ]));
    c.mount(drv.to_proto(&spc(&[("objects", &objects)])))
        .await
        .unwrap();
    assert_eq!(gets(), 2);
    // Another vault's item of the same name is another item.
    f.azure
        .put("secrets", "other-kv--secret1", json!({"value": "other"}));
    let other = spc(&[
        ("clientID", WI_CLIENT),
        ("keyvaultName", "other-kv"),
        ("objects", &objects),
    ]);
    let token = f.signer.token("shop", "web", WI, 600);
    c.mount(with_tokens(driver(Path::new("/t")), &[(WI, &token)]).to_proto(&other))
        .await
        .unwrap();
    assert_eq!(gets(), 3);
}

fn daemon_cached(a: &Azure) -> Daemon {
    Daemon::start_with(Options {
        extra_args: vec![
            "--azure-authority-host".into(),
            a.url.clone(),
            "--azure-keyvault-endpoint".into(),
            format!("{}/v/{{name}}", a.url),
            "--cache-ttl".into(),
            "60s".into(),
        ],
        ..Default::default()
    })
}
