//! The `gcp` backend through the real daemon, against loopback servers that
//! follow Secret Manager's, STS's and IAM Credentials' REST surface.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::atomic::Ordering;

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use coffer::secret::Credential;
use common::bao::Signer;
use common::google::{Google, World};
use common::*;
use tonic::Code;

const PROJECT: &str = "proj";
const POD: &str = "principal:system:serviceaccount:shop:web";
const GSA: &str = "reader@proj.iam.gserviceaccount.com";

fn wif() -> String {
    format!(
        "identitynamespace:{PROJECT}.svc.id.goog:https://container.googleapis.com/v1/projects/{PROJECT}/locations/europe-west1/clusters/c1"
    )
}

async fn google(signer: &Signer) -> Google {
    let mut w = World {
        sts_audience: wif(),
        jwt_key: signer.public_pem.clone(),
        ..Default::default()
    };
    let secrets: [(&str, Vec<&str>); 6] = [
        ("projects/proj/secrets/db", vec!["pw-1", "pw-2"]),
        (
            "projects/proj/locations/europe-west3/secrets/regional",
            vec!["eu-value"],
        ),
        (
            "projects/proj/secrets/json",
            vec![r#"{"user": "u", "port": 5432}"#],
        ),
        ("projects/proj/secrets/yaml", vec!["user: y\nlist: [1]\n"]),
        ("projects/proj/secrets/gsa-only", vec!["via-gsa"]),
        ("projects/proj/secrets/flaky", vec!["eventually"]),
    ];
    for (name, versions) in secrets {
        w.secrets.insert(
            name.into(),
            versions.iter().map(|v| v.as_bytes().to_vec()).collect(),
        );
        let reader = if name.ends_with("gsa-only") { GSA } else { POD };
        w.readers
            .insert(name.into(), BTreeSet::from([reader.to_string()]));
    }
    w.impersonators
        .insert(POD.into(), BTreeSet::from([GSA.to_string()]));
    Google::start(w).await
}

fn daemon(g: &Google, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = [
        "--gcp-secretmanager-endpoint",
        &g.addr,
        "--gcp-sts-endpoint",
        &g.addr,
        "--gcp-iam-credentials-endpoint",
        &g.addr,
        "--gcp-project",
        PROJECT,
        "--gcp-cluster-location",
        "europe-west1",
        "--gcp-cluster-name",
        "c1",
        "--cache-ttl",
        "0s",
        "--backend-retries",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if extra.contains(&"--gcp-secretmanager-endpoint") {
        args.drain(0..2);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(Options {
        extra_args: args,
        ..Default::default()
    })
}

fn gcp_spc(params: &[(&str, &str)]) -> SecretProviderClass {
    SecretProviderClass {
        name: "gcp-spc".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn pod(spc: &SecretProviderClass, signer: &Signer) -> proto::MountRequest {
    with_tokens(
        driver(Path::new("/t")),
        &[(
            &format!("{PROJECT}.svc.id.goog"),
            &signer.token("shop", "web", &format!("{PROJECT}.svc.id.goog"), 600),
        )],
    )
    .to_proto(spc)
}

fn files(r: &proto::MountResponse) -> BTreeMap<String, (Vec<u8>, i32)> {
    r.files
        .iter()
        .map(|f| (f.path.clone(), (f.contents.clone(), f.mode)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcp_provider_format_global_regional_pinned_latest_and_keys() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let d = daemon(&g, &[]);
    let mut c = d.client().await;
    // Google's provider's own format: `secrets`, `path` or `fileName`, `mode`.
    let spc = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/secrets/db/versions/latest\n  path: db/password\n  mode: 0600\n\
         - resourceName: projects/proj/secrets/db/versions/1\n  fileName: db-v1\n\
         - resourceName: projects/proj/locations/europe-west3/secrets/regional/versions/latest\n  fileName: regional\n\
         - resourceName: projects/proj/secrets/json/versions/1\n  fileName: user\n  extractJSONKey: user\n\
         - resourceName: projects/proj/secrets/yaml/versions/latest\n  fileName: yuser\n  extractYAMLKey: user\n",
    )]);
    let r = c.mount(pod(&spc, &signer)).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(f["db/password"], (b"pw-2".to_vec(), 0o600));
    assert_eq!(f["db-v1"].0, b"pw-1");
    assert_eq!(f["regional"].0, b"eu-value");
    assert_eq!(f["user"].0, b"u");
    assert_eq!(f["yuser"].0, b"y");
    let versions: BTreeMap<_, _> = r
        .object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect();
    assert_eq!(
        versions["projects/proj/secrets/db/versions/latest"], "projects/proj/secrets/db/versions/2",
        "the resolved version name"
    );
    assert_eq!(
        versions["projects/proj/secrets/db/versions/1"],
        "projects/proj/secrets/db/versions/1"
    );

    // A new version under `latest` is a rotation; the pinned one stays.
    g.world
        .lock()
        .unwrap()
        .secrets
        .get_mut("projects/proj/secrets/db")
        .unwrap()
        .push(b"pw-3".to_vec());
    let r = c.mount(pod(&spc, &signer)).await.unwrap().into_inner();
    assert_eq!(files(&r)["db/password"].0, b"pw-3");
    let versions: BTreeMap<_, _> = r
        .object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect();
    assert_eq!(
        versions["projects/proj/secrets/db/versions/latest"],
        "projects/proj/secrets/db/versions/3"
    );
    assert_eq!(
        versions["projects/proj/secrets/db/versions/1"],
        "projects/proj/secrets/db/versions/1"
    );

    // One secret, two keys: the ids stay unique.
    let twice = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/secrets/yaml/versions/1\n  fileName: a\n  extractYAMLKey: user\n\
         - resourceName: projects/proj/secrets/yaml/versions/1\n  fileName: b\n",
    )]);
    let r = c.mount(pod(&twice, &signer)).await.unwrap().into_inner();
    let ids: Vec<&str> = r.object_version.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "projects/proj/secrets/yaml/versions/1",
            "projects/proj/secrets/yaml/versions/1#b"
        ]
    );

    // coffer's own `objects` form works for this backend too.
    let own = gcp_spc(&[
        ("backend", "gcp"),
        (
            "objects",
            "- objectName: p\n  resourceName: projects/proj/secrets/db/versions/1\n",
        ),
    ]);
    assert_eq!(
        files(&c.mount(pod(&own, &signer)).await.unwrap().into_inner())["p"].0,
        b"pw-1"
    );

    for (extract, want) in [
        ("extractJSONKey: port", "not a string"),
        ("extractJSONKey: nope", "not in the payload"),
        ("extractYAMLKey: list", "not a string"),
    ] {
        let secret = if extract.starts_with("extractYAML") {
            "yaml"
        } else {
            "json"
        };
        let bad = gcp_spc(&[("secrets", &format!("- resourceName: projects/proj/secrets/{secret}/versions/1\n  fileName: x\n  {extract}\n"))]);
        let (code, msg) = mount_err(&mut c, pod(&bad, &signer)).await;
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains("object \"x\"") && msg.contains(want), "{msg}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_mapped_and_corruption_never_mounts() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let d = daemon(&g, &[]);
    let mut c = d.client().await;
    let one = |res: &str| {
        gcp_spc(&[(
            "secrets",
            &format!("- resourceName: {res}\n  fileName: f\n"),
        )])
    };
    let (code, _) = mount_err(
        &mut c,
        pod(&one("projects/proj/secrets/none/versions/1"), &signer),
    )
    .await;
    assert_eq!(code, Code::NotFound);
    let (code, msg) = mount_err(
        &mut c,
        pod(&one("projects/proj/secrets/gsa-only/versions/1"), &signer),
    )
    .await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");

    g.world
        .lock()
        .unwrap()
        .corrupt
        .insert("projects/proj/secrets/db".into());
    let two = gcp_spc(&[("secrets", "- resourceName: projects/proj/secrets/json/versions/1\n  fileName: ok\n- resourceName: projects/proj/secrets/db/versions/1\n  fileName: f\n")]);
    let (_, msg) = mount_err(&mut c, pod(&two, &signer)).await;
    assert!(
        msg.contains("CRC32C") && msg.contains("object \"f\""),
        "{msg}"
    );
    g.world.lock().unwrap().corrupt.clear();

    // Throttling and unavailability are retried inside the Mount deadline...
    g.world.lock().unwrap().failures.insert(
        "projects/proj/secrets/flaky".into(),
        (429, "RESOURCE_EXHAUSTED", 1),
    );
    let r = c
        .mount(pod(&one("projects/proj/secrets/flaky/versions/1"), &signer))
        .await
        .unwrap();
    assert_eq!(files(&r.into_inner())["f"].0, b"eventually");
    g.world.lock().unwrap().failures.insert(
        "projects/proj/secrets/flaky".into(),
        (503, "UNAVAILABLE", 1),
    );
    c.mount(pod(&one("projects/proj/secrets/flaky/versions/1"), &signer))
        .await
        .unwrap();
    // ...and reported when they last.
    g.world.lock().unwrap().failures.insert(
        "projects/proj/secrets/flaky".into(),
        (503, "UNAVAILABLE", 100),
    );
    let (code, _) = mount_err(
        &mut c,
        pod(&one("projects/proj/secrets/flaky/versions/1"), &signer),
    )
    .await;
    assert_eq!(code, Code::Unavailable);
    g.world.lock().unwrap().failures.insert(
        "projects/proj/secrets/flaky".into(),
        (429, "RESOURCE_EXHAUSTED", 100),
    );
    let (code, _) = mount_err(
        &mut c,
        pod(&one("projects/proj/secrets/flaky/versions/1"), &signer),
    )
    .await;
    assert_eq!(code, Code::ResourceExhausted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impersonation_chain_and_token_reuse() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let d = daemon(&g, &[]);
    let mut c = d.client().await;
    let spc = gcp_spc(&[
        ("gcpServiceAccount", GSA),
        (
            "secrets",
            "- resourceName: projects/proj/secrets/gsa-only/versions/1\n  fileName: g\n",
        ),
    ]);
    // The kubelet hands the same token until it rotates it.
    let req = pod(&spc, &signer);
    for _ in 0..3 {
        let r = c.mount(req.clone()).await.unwrap().into_inner();
        assert_eq!(files(&r)["g"].0, b"via-gsa");
    }
    assert_eq!(
        g.exchanges.load(Ordering::SeqCst),
        1,
        "one STS exchange for three Mounts"
    );
    assert_eq!(
        g.accesses.load(Ordering::SeqCst),
        3,
        "the object cache is off: three reads"
    );
    // Without impersonation the pod itself may not read it.
    let direct = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/secrets/gsa-only/versions/1\n  fileName: g\n",
    )]);
    let (code, _) = mount_err(&mut c, pod(&direct, &signer)).await;
    assert_eq!(code, Code::PermissionDenied);
    // A token for the wrong audience / no token: FailedPrecondition naming it.
    let (code, msg) = mount_err(&mut c, driver(Path::new("/t")).to_proto(&direct)).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("proj.svc.id.goog") && msg.contains("tokenRequests"),
        "{msg}"
    );
    // A foreign signer's token is refused by STS.
    let other = Signer::new();
    let (code, _) = mount_err(&mut c, pod(&direct, &other)).await;
    assert_eq!(code, Code::PermissionDenied);
}

/// A service-account key JSON whose public half the fake knows.
fn sa_key(g: &Google, email: &str) -> String {
    let signer = Signer::new();
    g.world
        .lock()
        .unwrap()
        .sa_keys
        .insert(email.into(), signer.public_pem.clone());
    serde_json::json!({
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "k1",
        "private_key": String::from_utf8(signer.private_pem.clone()).unwrap(),
        "client_email": email,
        "client_id": "1",
        "token_uri": format!("{}/token", g.addr),
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_json_and_provider_adc_are_opt_in() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let node_sa = "node@proj.iam.gserviceaccount.com";
    let key = sa_key(&g, node_sa);
    g.world
        .lock()
        .unwrap()
        .readers
        .get_mut("projects/proj/secrets/db")
        .unwrap()
        .insert(node_sa.into());
    let spc = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/secrets/db/versions/1\n  fileName: f\n",
    )]);
    let mut with_key = driver(Path::new("/t"));
    with_key.node_publish_secrets = Some(BTreeMap::from([(
        "key.json".to_string(),
        Credential::new(key.clone()),
    )]));

    let strict = daemon(&g, &[]);
    let (code, msg) = mount_err(&mut strict.client().await, with_key.to_proto(&spc)).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("--gcp-allow-node-publish-secret"), "{msg}");

    let open = daemon(&g, &["--gcp-allow-node-publish-secret"]);
    let r = open
        .client()
        .await
        .mount(with_key.to_proto(&spc))
        .await
        .expect("key.json accepted")
        .into_inner();
    assert_eq!(files(&r)["f"].0, b"pw-1");
    assert!(!open.logs().contains("PRIVATE KEY"));

    // provider-adc: the daemon's own credentials (ADC from its environment),
    // only where the operator opted in.
    let provider = gcp_spc(&[
        ("auth", "provider-adc"),
        (
            "secrets",
            "- resourceName: projects/proj/secrets/db/versions/1\n  fileName: f\n",
        ),
    ]);
    let (code, msg) = mount_err(
        &mut strict.client().await,
        driver(Path::new("/t")).to_proto(&provider),
    )
    .await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("--gcp-allow-provider-adc"), "{msg}");
    let key_file = strict.dir.path().join("adc.json");
    std::fs::write(&key_file, &key).unwrap();
    let adc = Daemon::start_with(Options {
        extra_args: vec![
            "--gcp-secretmanager-endpoint".into(),
            g.addr.clone(),
            "--cache-ttl".into(),
            "0s".into(),
            "--gcp-allow-provider-adc".into(),
        ],
        env: vec![(
            "GOOGLE_APPLICATION_CREDENTIALS".into(),
            key_file.display().to_string(),
        )],
        ..Default::default()
    });
    let r = adc
        .client()
        .await
        .mount(driver(Path::new("/t")).to_proto(&provider))
        .await
        .expect("provider-adc")
        .into_inner();
    assert_eq!(files(&r)["f"].0, b"pw-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_volume_mixes_gcp_and_vault_objects() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let bao = common::bao::Bao::start().await;
    bao.policy("app", "path \"secret/*\" { capabilities = [\"read\"] }")
        .await;
    common::bao::setup_jwt(&bao, &signer, &["app"]).await;
    bao.put_kv2("app", serde_json::json!({"password": "from-vault"}))
        .await;
    let d = daemon(&g, &["--log-level", "trace"]);
    let spc = gcp_spc(&[
        ("vaultAddress", &bao.addr()),
        ("roleName", "app"),
        ("vaultAuthMountPath", "jwt"),
        (
            "objects",
            "- objectName: gcp/db\n  backend: gcp\n  resourceName: projects/proj/secrets/db/versions/latest\n\
             - objectName: vault/db\n  backend: vault\n  secretPath: secret/data/app\n  secretKey: password\n",
        ),
    ]);
    let gcp_aud = format!("{PROJECT}.svc.id.goog");
    let gcp_jwt = signer.token("shop", "web", &gcp_aud, 600);
    let req = with_tokens(
        driver(Path::new("/t")),
        &[
            (&gcp_aud, &gcp_jwt),
            ("vault", &signer.token("shop", "web", "vault", 600)),
        ],
    )
    .to_proto(&spc);
    let r = d.client().await.mount(req).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(f["gcp/db"].0, b"pw-2");
    assert_eq!(f["vault/db"].0, b"from-vault");
    let logs = d.logs();
    assert!(
        !logs.contains("fed-") && !logs.contains("gsa-"),
        "access tokens in logs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_manager_faults_end_the_mount_cleanly() {
    use common::proxy::{Fault, Proxy};
    let signer = Signer::new();
    let g = google(&signer).await;
    let upstream = g.addr.trim_start_matches("http://").parse().unwrap();
    let proxy = Proxy::start(upstream).await;
    // Token exchange goes straight to the fake; Secret Manager through the
    // proxy.
    let d = daemon(
        &g,
        &[
            "--gcp-secretmanager-endpoint",
            &proxy.url(),
            "--mount-timeout",
            "4s",
            "--vault-request-timeout",
            "1500ms",
        ],
    );
    let mut c = d.client().await;
    let spc = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/secrets/db/versions/1\n  fileName: f\n",
    )]);
    for (fault, ok) in [
        (Fault::Pass, true),
        (Fault::Reset, false),
        (Fault::HalfOpen, false),
        (Fault::Truncate(60), false),
        (Fault::Garbage, false),
        (Fault::Pass, true),
    ] {
        proxy.set(fault);
        let started = std::time::Instant::now();
        let result = c.mount(pod(&spc, &signer)).await;
        let took = started.elapsed();
        println!(
            "{fault:?}: {:?} in {took:?}",
            result.as_ref().map(|_| ()).map_err(|s| s.code())
        );
        assert!(
            took < std::time::Duration::from_secs(5),
            "{fault:?}: {took:?}"
        );
        match result {
            Ok(r) => {
                assert!(ok, "{fault:?} mounted");
                assert_eq!(files(r.get_ref())["f"].0, b"pw-1");
            }
            Err(s) => {
                assert!(!ok, "{fault:?}: {}", s.message());
                assert!(
                    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded),
                    "{fault:?}: {:?} {}",
                    s.code(),
                    s.message()
                );
                assert!(
                    s.message().contains("object \"f\"") || s.message().contains("outstanding: f"),
                    "{}",
                    s.message()
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameter_manager_versions_render_like_googles_provider() {
    use common::google::Parameter;
    let signer = Signer::new();
    let g = google(&signer).await;
    let reader = BTreeSet::from([POD.to_string()]);
    {
        let mut w = g.world.lock().unwrap();
        // The parameters' principal may read db; nobody's may read gsa-only.
        let principal = "parameter-principal@proj.iam".to_string();
        w.readers
            .get_mut("projects/proj/secrets/db")
            .unwrap()
            .insert(principal.clone());
        let mut add = |name: &str, format: &'static str, payload: &str| {
            w.parameters.insert(
                name.into(),
                Parameter {
                    format,
                    versions: BTreeMap::from([("v1".to_string(), payload.as_bytes().to_vec())]),
                    principal: principal.clone(),
                    accessors: reader.clone(),
                },
            );
        };
        add(
            "projects/proj/locations/global/parameters/app",
            "YAML",
            "db:\n  host: db.internal\n  password: __REF__(\"//secretmanager.googleapis.com/projects/proj/secrets/db/versions/latest\")\nport: \"5432\"\n",
        );
        add(
            "projects/proj/locations/us-central1/parameters/json",
            "JSON",
            "{\"user\": \"svc\", \"password\": \"__REF__(\\\"//secretmanager.googleapis.com/projects/proj/secrets/db/versions/1\\\")\"}",
        );
        add(
            "projects/proj/locations/global/parameters/plain",
            "UNFORMATTED",
            "kept as is: __REF__(\"//secretmanager.googleapis.com/projects/proj/secrets/db/versions/1\")",
        );
        add(
            "projects/proj/locations/global/parameters/forbidden-ref",
            "YAML",
            "x: __REF__(\"//secretmanager.googleapis.com/projects/proj/secrets/gsa-only/versions/1\")\n",
        );
        let mut locked = Parameter {
            format: "YAML",
            versions: BTreeMap::from([("v1".to_string(), b"a: b\n".to_vec())]),
            principal: principal.clone(),
            accessors: BTreeSet::new(),
        };
        locked.accessors.insert("someone-else".into());
        w.parameters.insert(
            "projects/proj/locations/global/parameters/locked".into(),
            locked,
        );
    }
    let d = daemon(&g, &["--gcp-parametermanager-endpoint", &g.addr]);
    let mut c = d.client().await;
    // Google's app-parameters example shape, global and regional.
    let spc = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/locations/global/parameters/app/versions/v1\n  fileName: app.yaml\n\
         - resourceName: projects/proj/locations/global/parameters/app/versions/v1\n  fileName: port\n  extractYAMLKey: port\n\
         - resourceName: projects/proj/locations/us-central1/parameters/json/versions/v1\n  fileName: user\n  extractJSONKey: user\n\
         - resourceName: projects/proj/locations/us-central1/parameters/json/versions/v1\n  fileName: password\n  extractJSONKey: password\n\
         - resourceName: projects/proj/locations/global/parameters/plain/versions/v1\n  fileName: plain\n",
    )]);
    let r = c
        .mount(pod(&spc, &signer))
        .await
        .expect("parameters")
        .into_inner();
    let f = files(&r);
    assert_eq!(
        String::from_utf8_lossy(&f["app.yaml"].0),
        "db:\n  host: db.internal\n  password: pw-2\nport: \"5432\"\n",
        "references rendered"
    );
    assert_eq!(f["port"].0, b"5432");
    assert_eq!(f["user"].0, b"svc");
    assert_eq!(f["password"].0, b"pw-1");
    assert!(
        String::from_utf8_lossy(&f["plain"].0).contains("__REF__"),
        "unformatted: as is"
    );
    let ids: BTreeSet<&str> = r.object_version.iter().map(|v| v.id.as_str()).collect();
    assert!(ids.contains("projects/proj/locations/global/parameters/app/versions/v1"));
    // A referenced secret moving is a rotation of the rendered file.
    let before = r.object_version.clone();
    g.world
        .lock()
        .unwrap()
        .secrets
        .get_mut("projects/proj/secrets/db")
        .unwrap()
        .push(b"pw-3".to_vec());
    let again = c.mount(pod(&spc, &signer)).await.unwrap().into_inner();
    assert!(String::from_utf8_lossy(&files(&again)["app.yaml"].0).contains("pw-3"));
    assert_ne!(again.object_version[0].version, before[0].version);
    assert_eq!(
        again.object_version[2].version, before[2].version,
        "json pins db v1"
    );
    // Refusals: a reference the parameter's principal may not read, and a
    // parameter the pod may not render.
    for (resource, want) in [
        (
            "projects/proj/locations/global/parameters/forbidden-ref/versions/v1",
            "secretmanager.versions.access",
        ),
        (
            "projects/proj/locations/global/parameters/locked/versions/v1",
            "gcpServiceAccount",
        ),
    ] {
        let spc = gcp_spc(&[(
            "secrets",
            &format!("- resourceName: {resource}\n  fileName: x\n"),
        )]);
        let (code, msg) = mount_err(&mut c, pod(&spc, &signer)).await;
        assert_eq!(code, Code::PermissionDenied, "{msg}");
        assert!(msg.contains(want), "{msg}");
    }
    let missing = gcp_spc(&[(
        "secrets",
        "- resourceName: projects/proj/locations/global/parameters/app/versions/v9\n  fileName: x\n",
    )]);
    let (code, _) = mount_err(&mut c, pod(&missing, &signer)).await;
    assert_eq!(code, Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_adc_without_credentials_says_so_plainly() {
    let signer = Signer::new();
    let g = google(&signer).await;
    let home = tempfile::tempdir().unwrap();
    let d = Daemon::start_with(Options {
        extra_args: vec![
            "--gcp-secretmanager-endpoint".into(),
            g.addr.clone(),
            "--gcp-allow-provider-adc".into(),
            "--backend-retries".into(),
            "0".into(),
        ],
        env: vec![
            (
                "GOOGLE_APPLICATION_CREDENTIALS".into(),
                "/nonexistent/adc.json".into(),
            ),
            ("HOME".into(), home.path().display().to_string()),
        ],
        ..Default::default()
    });
    let spc = gcp_spc(&[
        ("auth", "provider-adc"),
        (
            "secrets",
            "- resourceName: projects/proj/secrets/db/versions/1\n  fileName: f\n",
        ),
    ]);
    let (code, msg) = mount_err(
        &mut d.client().await,
        driver(Path::new("/t")).to_proto(&spc),
    )
    .await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("no usable Application Default Credentials"),
        "{msg}"
    );
    assert!(
        msg.contains("/nonexistent/adc.json, which is not a readable file"),
        "{msg}"
    );
    assert!(!msg.contains("might succeed"), "{msg}");
}
