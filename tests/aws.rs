//! The `aws` backend through the real daemon against moto's server (a real
//! emulator of Secrets Manager, SSM Parameter Store and STS): the AWS
//! provider's SPC form, IRSA through STS, EKS Pod Identity through a
//! loopback agent, SSM batching, failover, rotation, and a mixed SPC.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use common::bao::Signer;
use common::moto::{Agent, AwsProxy, Inject, Moto};
use common::*;
use tonic::Code;

const ROLE: &str = "arn:aws:iam::123456789012:role/shop-web";
const IRSA: &str = "sts.amazonaws.com";
const POD_IDENTITY: &str = "pods.eks.amazonaws.com";

struct World {
    moto: Moto,
    proxy: AwsProxy,
    signer: Signer,
    /// Tokens minted once per (service account, pod, audience), as the
    /// kubelet reuses a pod's token until it refreshes it.
    tokens: std::sync::Mutex<BTreeMap<(String, String, String), String>>,
}

/// The uid of pod `name` (web-0 is the harness's default pod).
fn uid(name: &str) -> String {
    if name == "web-0" {
        "0f6b7a0e-1111-4222-8333-444455556666".to_string()
    } else {
        format!("0f6b7a0e-1111-4222-8333-{:0>12}", name.len())
    }
}

impl World {
    fn token(&self, sa: &str, pod: &str, aud: &str) -> String {
        let uid = uid(pod);
        self.tokens
            .lock()
            .unwrap()
            .entry((sa.into(), pod.into(), aud.into()))
            .or_insert_with(|| self.signer.pod_token("shop", sa, aud, 600, pod, &uid))
            .clone()
    }
}

async fn world() -> World {
    let moto = Moto::start().await;
    let proxy = AwsProxy::start(&moto.url).await;
    World {
        moto,
        proxy,
        signer: Signer::new(),
        tokens: Default::default(),
    }
}

fn daemon(w: &World, extra: &[&str]) -> Daemon {
    let mut args: Vec<String> = [
        "--aws-secretsmanager-endpoint",
        &w.proxy.url,
        "--aws-ssm-endpoint",
        &w.proxy.url,
        "--aws-sts-endpoint",
        &w.proxy.url,
        "--cache-ttl",
        "0s",
        "--backend-retries",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if extra.contains(&"--cache-ttl") {
        args.drain(6..8);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Daemon::start_with(Options {
        extra_args: args,
        ..Default::default()
    })
}

fn aws_spc(params: &[(&str, &str)]) -> SecretProviderClass {
    let mut p: BTreeMap<String, String> = BTreeMap::from([
        ("region".to_string(), "us-east-1".to_string()),
        ("roleArn".to_string(), ROLE.to_string()),
    ]);
    for (k, v) in params {
        p.insert(k.to_string(), v.to_string());
    }
    SecretProviderClass {
        name: "aws-spc".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: p,
    }
}

fn pod(w: &World, spc: &SecretProviderClass, audiences: &[&str]) -> proto::MountRequest {
    let tokens: Vec<(String, String)> = audiences
        .iter()
        .map(|a| (a.to_string(), w.token("web", "web-0", a)))
        .collect();
    let refs: Vec<(&str, &str)> = tokens
        .iter()
        .map(|(a, t)| (a.as_str(), t.as_str()))
        .collect();
    with_tokens(driver(Path::new("/t")), &refs).to_proto(spc)
}

fn files(r: &proto::MountResponse) -> BTreeMap<String, (Vec<u8>, i32)> {
    r.files
        .iter()
        .map(|f| (f.path.clone(), (f.contents.clone(), f.mode)))
        .collect()
}

fn versions(r: &proto::MountResponse) -> BTreeMap<String, String> {
    r.object_version
        .iter()
        .map(|v| (v.id.clone(), v.version.clone()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_manager_in_the_aws_providers_form_as_the_pod() {
    let w = world().await;
    let m = &w.moto;
    m.secret(
        "us-east-1",
        "app/db",
        r#"{"username": "u", "password": "p@ss", "port": 5432, "nested": {"k": "v"}}"#,
    )
    .await;
    m.sm("us-east-1")
        .create_secret()
        .name("bin")
        .secret_binary(aws_smithy_types::Blob::new(vec![0u8, 1, 2, 255]))
        .send()
        .await
        .unwrap();
    let rot_arn = m.secret("us-east-1", "rot", "v1").await;
    let v1 = m
        .sm("us-east-1")
        .describe_secret()
        .secret_id("rot")
        .send()
        .await
        .unwrap()
        .version_ids_to_stages
        .unwrap()
        .into_keys()
        .next()
        .unwrap();
    let v2 = m.rotate("us-east-1", "rot", "v2").await;
    let d = daemon(&w, &[]);
    let mut c = d.client().await;
    // The AWS provider's own form; only `provider` (and coffer's roleArn) differ.
    let objects = format!(
        r#"
- objectName: "app/db"
  objectType: "secretsmanager"
  jmesPath:
    - path: username
      objectAlias: user
    - path: '"password"'
      objectAlias: pass
      filePermission: "0400"
    - path: nested.k
      objectAlias: nested-k
- objectName: "bin"
  objectType: "secretsmanager"
  filePermission: "0600"
- objectName: "rot"
  objectType: "secretsmanager"
- objectName: "rot"
  objectType: "secretsmanager"
  objectVersionLabel: "AWSPREVIOUS"
  objectAlias: rot-previous
- objectName: "rot"
  objectType: "secretsmanager"
  objectVersion: "{v1}"
  objectAlias: rot-v1
- objectName: "{rot_arn}"
  objectAlias: rot-by-arn
"#
    );
    let spc = aws_spc(&[("objects", &objects)]);
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(
        f["app_db"].0,
        br#"{"username": "u", "password": "p@ss", "port": 5432, "nested": {"k": "v"}}"#
    );
    assert_eq!(f["user"].0, b"u");
    assert_eq!(f["pass"], (b"p@ss".to_vec(), 0o400));
    assert_eq!(f["nested-k"].0, b"v");
    assert_eq!(f["bin"], (vec![0u8, 1, 2, 255], 0o600));
    assert_eq!(f["rot"].0, b"v2");
    assert_eq!(f["rot-previous"].0, b"v1");
    assert_eq!(f["rot-v1"].0, b"v1");
    assert_eq!(f["rot-by-arn"].0, b"v2");
    let v = versions(&r);
    assert_eq!(v["rot"], v2, "the version is Secrets Manager's VersionId");
    assert_eq!(v["rot-v1"], v1);
    assert_eq!(
        v["user"], v["app_db"],
        "jmesPath files carry the secret's version"
    );
    assert_eq!(
        w.proxy.calls("secretsmanager.GetSecretValue"),
        6,
        "app/db once for itself and its three jmesPath files"
    );

    // As the pod: one AssumeRoleWithWebIdentity, its keys sign the reads.
    assert_eq!(w.proxy.calls("AssumeRoleWithWebIdentity"), 1);
    let keys = w.proxy.seen.lock().unwrap().access_keys.clone();
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k != "testing"),
        "signed with STS's keys, never the node's: {keys:?}"
    );

    // Rotation: a new AWSCURRENT is a new version and new content.
    let v3 = m.rotate("us-east-1", "rot", "v3").await;
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    assert_eq!(files(&r)["rot"].0, b"v3");
    assert_eq!(files(&r)["rot-previous"].0, b"v2");
    assert_eq!(versions(&r)["rot"], v3);
    assert_eq!(
        w.proxy.calls("AssumeRoleWithWebIdentity"),
        1,
        "credentials kept until near expiry"
    );

    // pathTranslation: off keeps the directory; another character replaces `/`.
    for (translation, file) in [("False", "app/db"), ("-", "app-db")] {
        let spc = aws_spc(&[
            ("pathTranslation", translation),
            (
                "objects",
                "- objectName: app/db\n  objectType: secretsmanager\n",
            ),
        ]);
        let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
        assert!(
            files(&r).contains_key(file),
            "{translation}: {:?}",
            files(&r).keys()
        );
    }

    // jmesPath results must be strings and must exist; values never echo.
    for (path, want) in [
        ("port", "not a string"),
        ("missing", "does not point to a value"),
        ("[@,@]", "multi-select"),
    ] {
        let spc = aws_spc(&[(
            "objects",
            &format!(
                "- objectName: app/db\n  objectType: secretsmanager\n  jmesPath:\n    - {{path: '{path}', objectAlias: x}}\n"
            ),
        )]);
        let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
        assert_eq!(code, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(want) && !msg.contains("p@ss"), "{msg}");
    }

    // Not found names the object and the secret.
    let spc = aws_spc(&[(
        "objects",
        "- objectName: nope\n  objectType: secretsmanager\n",
    )]);
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(
        msg.contains("nope") && msg.contains("ResourceNotFoundException"),
        "{msg}"
    );

    // The peer's validation, before anything is fetched.
    let before = w.proxy.calls("secretsmanager.GetSecretValue");
    for (objects, want) in [
        (
            "- objectName: a\n  objectType: secretsmanager\n- objectName: a\n  objectType: secretsmanager\n",
            "more than one object",
        ),
        (
            "- objectName: a\n  objectType: secretsmanager\n  objectAlias: x\n- objectName: b\n  objectType: secretsmanager\n  objectAlias: x\n",
            "more than one object",
        ),
        (
            "- objectName: a\n  objectType: secretsmanager\n  objectAlias: ../../etc/x\n",
            "..",
        ),
        (
            "- objectName: a\n  objectType: secretsmanager\n  jmesPath:\n    - {path: u, objectAlias: ../up}\n",
            "..",
        ),
        (
            "- objectName: a\n  objectType: secretsmanager\n  filePermission: \"0999\"\n",
            "filePermission",
        ),
        ("- objectName: a\n", "objectType"),
        ("- objectName: a\n  objectType: ssm\n", "objectType"),
        (
            "- objectName: arn:aws:secretsmanager:eu-west-1:123456789012:secret:a\n",
            "region",
        ),
        (
            "- objectName: p\n  objectType: ssmparameter\n  objectVersion: \"1\"\n  objectVersionLabel: l\n",
            "both",
        ),
        (
            "- objectName: a\n  objectType: secretsmanager\n  failoverObject: {objectName: b}\n",
            "objectAlias must be set",
        ),
    ] {
        let spc = aws_spc(&[("objects", objects)]);
        let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
        assert_eq!(code, Code::InvalidArgument, "{objects}: {msg}");
        assert!(msg.contains(want), "{objects}: {msg}");
    }
    assert_eq!(w.proxy.calls("secretsmanager.GetSecretValue"), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssm_parameters_are_batched_by_ten_with_versions_and_labels() {
    let w = world().await;
    let m = &w.moto;
    let mut objects = String::new();
    for i in 0..25 {
        m.parameter(
            "us-east-1",
            &format!("/app/p{i}"),
            &format!("value-{i}"),
            i % 2 == 0,
        )
        .await;
        objects.push_str(&format!(
            "- objectName: /app/p{i}\n  objectType: ssmparameter\n"
        ));
    }
    let d = daemon(&w, &[]);
    let mut c = d.client().await;
    let spc = aws_spc(&[("objects", &objects)]);
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(f.len(), 25);
    assert_eq!(f["_app_p0"].0, b"value-0", "SecureString decrypted");
    assert_eq!(f["_app_p24"].0, b"value-24");
    assert_eq!(versions(&r)["_app_p3"], "1", "the parameter's version");
    assert_eq!(
        w.proxy.calls("AmazonSSM.GetParameters"),
        3,
        "25 parameters in batches of 10"
    );

    // Versions, labels, JSON with jmesPath.
    m.parameter("us-east-1", "/cfg", "one", false).await;
    m.parameter("us-east-1", "/cfg", "two", false).await;
    m.ssm("us-east-1")
        .label_parameter_version()
        .name("/cfg")
        .parameter_version(1)
        .labels("stable")
        .send()
        .await
        .unwrap();
    m.parameter(
        "us-east-1",
        "/json",
        r#"{"username": "su", "password": "sp"}"#,
        true,
    )
    .await;
    let spc = aws_spc(&[(
        "objects",
        "- objectName: /cfg\n  objectType: ssmparameter\n\
         - objectName: /cfg\n  objectType: ssmparameter\n  objectVersion: \"1\"\n  objectAlias: cfg-v1\n\
         - objectName: /cfg\n  objectType: ssmparameter\n  objectVersionLabel: stable\n  objectAlias: cfg-stable\n\
         - objectName: /json\n  objectType: ssmparameter\n  jmesPath:\n    - {Path: username, ObjectAlias: ssmUsername}\n\
         - objectName: arn:aws:ssm:us-east-1:123456789012:parameter/json\n  objectAlias: by-arn\n",
    )]);
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(f["_cfg"].0, b"two");
    assert_eq!(f["cfg-v1"].0, b"one");
    assert_eq!(f["cfg-stable"].0, b"one");
    assert_eq!(f["ssmUsername"].0, b"su");
    assert_eq!(f["by-arn"].0, f["_json"].0, "an SSM parameter by its ARN");
    assert_eq!(versions(&r)["_cfg"], "2");
    assert_eq!(versions(&r)["cfg-v1"], "1");

    // Missing parameters are named.
    let spc = aws_spc(&[(
        "objects",
        "- objectName: /cfg\n  objectType: ssmparameter\n- objectName: /missing/one\n  objectType: ssmparameter\n",
    )]);
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::NotFound, "{msg}");
    assert!(
        msg.contains("/missing/one") && msg.contains("InvalidParameters"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_on_outages_only() {
    let w = world().await;
    let m = &w.moto;
    m.secret("us-east-1", "fo", "from-east").await;
    let west_arn = m.secret("us-west-2", "fo-west", "from-west").await;
    m.secret("us-west-2", "fo", "same-name-west").await;
    m.parameter("us-east-1", "/fo", "ssm-east", false).await;
    m.parameter("us-west-2", "/fo", "ssm-west", false).await;
    let d = daemon(&w, &[]);
    let mut c = d.client().await;
    let objects = format!(
        "- objectName: fo\n  objectType: secretsmanager\n  objectAlias: fo\n  failoverObject:\n    objectName: \"{west_arn}\"\n\
         - objectName: fo\n  objectType: secretsmanager\n  objectAlias: same\n\
         - objectName: /fo\n  objectType: ssmparameter\n"
    );
    let spc = aws_spc(&[("failoverRegion", "us-west-2"), ("objects", &objects)]);
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    assert_eq!(files(&r)["fo"].0, b"from-east", "the primary answers first");

    // A 5xx in the primary region: the failover region answers.
    w.proxy.inject("us-east-1", Some(Inject::ServerError(503)));
    let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
    let f = files(&r);
    assert_eq!(f["fo"].0, b"from-west", "the failoverObject");
    assert_eq!(f["same"].0, b"same-name-west");
    assert_eq!(f["_fo"].0, b"ssm-west");

    // A 4xx is final: no failover.
    w.proxy.inject("us-east-1", Some(Inject::AccessDenied));
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("us-east-1") && !msg.contains("us-west-2"),
        "{msg}"
    );

    // Both regions out: both errors reported.
    w.proxy.inject("us-east-1", Some(Inject::ServerError(500)));
    w.proxy.inject("us-west-2", Some(Inject::ServerError(503)));
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(
        msg.contains("us-east-1") && msg.contains("us-west-2"),
        "{msg}"
    );

    // Throttling is retried, then reported as unavailable.
    w.proxy.inject("us-west-2", None);
    w.proxy.inject("us-east-1", Some(Inject::Throttle));
    let spc = aws_spc(&[(
        "objects",
        "- objectName: fo\n  objectType: secretsmanager\n",
    )]);
    let before = w.proxy.calls("secretsmanager.GetSecretValue");
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("throttled"), "{msg}");
    assert_eq!(
        w.proxy.calls("secretsmanager.GetSecretValue") - before,
        2,
        "tried, then retried once (--backend-retries 1)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_identity_and_what_the_pod_must_bring() {
    let w = world().await;
    w.moto.secret("us-east-1", "MySecret", "pi-value").await;
    let token = w.token("web", "web-0", POD_IDENTITY);
    let agent = Agent::start(&token).await;
    let d = daemon(&w, &["--aws-pod-identity-endpoint", &agent.url]);
    let mut c = d.client().await;
    // The AWS provider's Pod Identity example, with only the provider changed.
    let spc = SecretProviderClass {
        name: "nginx-pod-identity-deployment-aws-secrets".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: BTreeMap::from([
            ("region".into(), "us-east-1".into()),
            ("usePodIdentity".into(), "true".into()),
            (
                "objects".into(),
                "- objectName: \"MySecret\"\n  objectType: \"secretsmanager\"\n".into(),
            ),
        ]),
    };
    let req = with_tokens(driver(Path::new("/t")), &[(POD_IDENTITY, &token)]).to_proto(&spc);
    for _ in 0..2 {
        let r = c.mount(req.clone()).await.unwrap().into_inner();
        assert_eq!(files(&r)["MySecret"].0, b"pi-value");
    }
    assert_eq!(agent.calls(), 1, "credentials kept between Mounts");
    assert!(w
        .proxy
        .seen
        .lock()
        .unwrap()
        .access_keys
        .iter()
        .all(|k| k == "ASIAPODIDENTITYKEY01"));

    // Another pod's token is refused by the agent.
    let other = w.signer.token("shop", "web", POD_IDENTITY, 601);
    let req = with_tokens(driver(Path::new("/t")), &[(POD_IDENTITY, &other)]).to_proto(&spc);
    let (code, msg) = mount_err(&mut c, req).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains("Pod Identity") && !msg.contains(&other),
        "{msg}"
    );

    // Without the audience's token: the audience to add is named.
    let (code, msg) = mount_err(&mut c, pod(&w, &spc, &[IRSA])).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains(POD_IDENTITY) && msg.contains("tokenRequests"),
        "{msg}"
    );
    let irsa = aws_spc(&[(
        "objects",
        "- objectName: MySecret\n  objectType: secretsmanager\n",
    )]);
    let (code, msg) = mount_err(&mut c, pod(&w, &irsa, &[])).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains(IRSA), "{msg}");

    // IRSA without a role names where to set one.
    let mut no_role = irsa.clone();
    no_role.parameters.remove("roleArn");
    let (code, msg) = mount_err(&mut c, pod(&w, &no_role, &[IRSA])).await;
    assert_eq!(code, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("roleArn") && msg.contains("--aws-role-arn-template"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_providers_examples_check_and_mount() {
    let w = world().await;
    w.moto.secret("us-east-1", "MySecret", "example").await;
    let d = daemon(
        &w,
        &[
            "--aws-region",
            "us-east-1",
            "--aws-role-arn-template",
            "arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}",
        ],
    );
    let mut c = d.client().await;
    let dir = tempfile::tempdir().unwrap();
    for (file, manifest, audience) in [
        (
            "irsa.yaml",
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: nginx-irsa-deployment-aws-secrets\nspec:\n  provider: coffer\n  parameters:\n    objects: |\n        - objectName: \"MySecret\"\n          objectType: \"secretsmanager\"\n",
            IRSA,
        ),
        (
            "pod-identity.yaml",
            "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: nginx-pod-identity-deployment-aws-secrets\nspec:\n  provider: coffer\n  parameters:\n    objects: |\n      - objectName: \"MySecret\"\n        objectType: \"secretsmanager\"\n    usePodIdentity: \"true\"\n",
            POD_IDENTITY,
        ),
    ] {
        let path = dir.path().join(file);
        std::fs::write(&path, manifest).unwrap();
        let out = std::process::Command::new(BIN)
            .args([
                "check",
                "--aws-region",
                "us-east-1",
                "--aws-role-arn-template",
                "arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}",
            ])
            .arg(&path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{file}: {text}");
        assert!(text.contains(audience), "{file} names the audience: {text}");
        if audience == IRSA {
            let spc = SecretProviderClass::from_yaml(manifest).unwrap();
            let r = c.mount(pod(&w, &spc, &[IRSA])).await.unwrap().into_inner();
            assert_eq!(files(&r)["MySecret"].0, b"example");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_spc_mixing_aws_vault_and_file_objects() {
    let w = world().await;
    w.moto.secret("us-east-1", "mixed", "from-aws").await;
    let bao = common::bao::Bao::start().await;
    bao.policy(
        "app",
        "path \"secret/data/*\" { capabilities = [\"read\"] }",
    )
    .await;
    common::bao::setup_jwt(&bao, &w.signer, &["app"]).await;
    bao.put_kv2("mixed", serde_json::json!({"password": "from-vault"}))
        .await;
    let d = daemon(&w, &[]);
    d.write_secret("local", "from-file");
    let mut c = d.client().await;
    let spc = aws_spc(&[
        ("vaultAddress", &bao.addr()),
        ("roleName", "app"),
        ("vaultAuthMountPath", "jwt"),
        (
            "objects",
            "- objectName: mixed\n  objectType: secretsmanager\n  objectAlias: aws.txt\n\
             - objectName: vault.txt\n  backend: vault\n  secretPath: secret/data/mixed\n  secretKey: password\n\
             - objectName: file.txt\n  backend: file\n  path: local\n",
        ),
    ]);
    let r = c
        .mount(pod(&w, &spc, &[IRSA, "vault"]))
        .await
        .unwrap()
        .into_inner();
    let f = files(&r);
    assert_eq!(f["aws.txt"].0, b"from-aws");
    assert_eq!(f["vault.txt"].0, b"from-vault");
    assert_eq!(f["file.txt"].0, b"from-file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logs_hold_no_keys_tokens_or_values() {
    const VALUE: &str = "aws-leak-canary-value-5e1d";
    let w = world().await;
    w.moto.secret("us-east-1", "canary", VALUE).await;
    w.moto
        .secret(
            "us-east-1",
            "canary-json",
            &format!(r#"{{"k": "{VALUE}-json"}}"#),
        )
        .await;
    w.moto.parameter("us-east-1", "/canary", VALUE, true).await;
    let pi_token = w.token("web", "web-0", POD_IDENTITY);
    let agent = Agent::start(&pi_token).await;
    let d = daemon(
        &w,
        &[
            "--aws-pod-identity-endpoint",
            &agent.url,
            "--log-level",
            "trace",
        ],
    );
    let mut c = d.client().await;
    let objects = "- objectName: canary\n  objectType: secretsmanager\n\
                   - objectName: canary-json\n  objectType: secretsmanager\n  jmesPath:\n    - {path: k, objectAlias: k}\n\
                   - objectName: /canary\n  objectType: ssmparameter\n";
    // IRSA through moto's STS, then Pod Identity through the agent.
    let irsa = aws_spc(&[("objects", objects)]);
    let irsa_req = pod(&w, &irsa, &[IRSA]);
    let r = c.mount(irsa_req).await.unwrap().into_inner();
    assert_eq!(files(&r)["canary"].0, VALUE.as_bytes());
    let pi = aws_spc(&[("usePodIdentity", "true"), ("objects", objects)]);
    let req = with_tokens(driver(Path::new("/t")), &[(POD_IDENTITY, &pi_token)]).to_proto(&pi);
    c.mount(req).await.unwrap();
    // A failure that involves the value: a jmesPath on a non-JSON value.
    let bad = aws_spc(&[(
        "objects",
        "- objectName: canary\n  objectType: secretsmanager\n  jmesPath:\n    - {path: k, objectAlias: x}\n",
    )]);
    mount_err(&mut c, pod(&w, &bad, &[IRSA])).await;
    let logs = d.logs();
    assert!(logs.len() > 1000, "trace logging is on");
    assert!(
        !logs.lines().any(|l| l.contains(" aws_")),
        "the AWS SDK's own lines stay quiet"
    );
    let sts_keys = w.proxy.seen.lock().unwrap().access_keys.clone();
    let irsa_jwt = w.token("web", "web-0", IRSA);
    let jwt_body = irsa_jwt.split('.').nth(1).unwrap().to_string();
    for canary in [
        VALUE,
        "ASIAPODIDENTITYKEY01",
        "pod-identity-secret",
        "pod-identity-session-token",
        pi_token.split('.').nth(1).unwrap(),
        &jwt_body,
    ]
    .into_iter()
    .chain(sts_keys.iter().map(String::as_str))
    {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(canary)).collect();
        assert!(lines.is_empty(), "{canary} is in the log: {lines:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_answers_are_refused_before_they_are_read() {
    let w = world().await;
    w.moto.secret("us-east-1", "big", &"x".repeat(3000)).await;
    w.moto.secret("us-east-1", "small", "ok").await;
    let d = daemon(&w, &["--max-response-bytes", "2000"]);
    let mut c = d.client().await;
    let spc = |name: &str| {
        aws_spc(&[(
            "objects",
            &format!("- objectName: {name}\n  objectType: secretsmanager\n"),
        )])
    };
    // A value over the limit: refused by size, never mounted.
    let (code, msg) = mount_err(&mut c, pod(&w, &spc("big"), &[IRSA])).await;
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    // A server that sends megabytes: refused from its Content-Length.
    w.proxy.inject("us-east-1", Some(Inject::Huge(4 << 20)));
    let (code, msg) = mount_err(&mut c, pod(&w, &spc("small"), &[IRSA])).await;
    assert_eq!(code, Code::Unavailable, "{msg}");
    assert!(msg.contains("more than coffer reads"), "{msg}");
    assert!(
        d.rss_kib() < 64 * 1024,
        "the 4 MiB answers were not read: {} KiB",
        d.rss_kib()
    );
}

/// A pod of `sa` in namespace shop, with its own token for `aud`.
fn pod_of(
    w: &World,
    spc: &SecretProviderClass,
    sa: &str,
    name: &str,
    aud: &str,
) -> proto::MountRequest {
    let token = w.token(sa, name, aud);
    let mut drv = driver(Path::new("/t"));
    drv.pod.service_account = sa.into();
    drv.pod.name = name.into();
    drv.pod.uid = uid(name);
    with_tokens(drv, &[(aud, &token)]).to_proto(spc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_values_are_shared_only_by_identical_authorizations() {
    let w = world().await;
    w.moto.secret("us-east-1", "shared", "v").await;
    let d = daemon(&w, &["--cache-ttl", "60s"]);
    let mut c = d.client().await;
    let objects = "- objectName: shared\n  objectType: secretsmanager\n";
    let spc = aws_spc(&[("objects", objects)]);
    let calls = || w.proxy.calls("secretsmanager.GetSecretValue");
    c.mount(pod_of(&w, &spc, "web", "web-0", IRSA))
        .await
        .unwrap();
    assert_eq!(calls(), 1);
    // Another pod of the same service account and role: served from the cache.
    c.mount(pod_of(&w, &spc, "web", "web-1", IRSA))
        .await
        .unwrap();
    assert_eq!(calls(), 1);
    // Another service account (a trust policy binds service accounts).
    c.mount(pod_of(&w, &spc, "batch", "batch-0", IRSA))
        .await
        .unwrap();
    assert_eq!(calls(), 2);
    // Another role.
    let other_role = aws_spc(&[
        ("objects", objects),
        ("roleArn", "arn:aws:iam::123456789012:role/other"),
    ]);
    c.mount(pod_of(&w, &other_role, "web", "web-2", IRSA))
        .await
        .unwrap();
    assert_eq!(calls(), 3);
    // Another version label: another entry.
    let label = aws_spc(&[(
        "objects",
        "- objectName: shared\n  objectType: secretsmanager\n  objectVersionLabel: AWSCURRENT\n",
    )]);
    c.mount(pod_of(&w, &label, "web", "web-3", IRSA))
        .await
        .unwrap();
    assert_eq!(calls(), 4);
    // Pod Identity is its own authorization, even for the same service account.
    let agent = Agent::start(&w.token("web", "web-4", POD_IDENTITY)).await;
    drop(c);
    drop(d);
    let d = daemon(
        &w,
        &[
            "--cache-ttl",
            "60s",
            "--aws-pod-identity-endpoint",
            &agent.url,
        ],
    );
    let mut c = d.client().await;
    c.mount(pod_of(&w, &spc, "web", "web-0", IRSA))
        .await
        .unwrap();
    let pi = aws_spc(&[("objects", objects), ("usePodIdentity", "true")]);
    c.mount(pod_of(&w, &pi, "web", "web-4", POD_IDENTITY))
        .await
        .unwrap();
    assert_eq!(calls(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_policy_judges_aws_objects_before_any_call() {
    let w = world().await;
    w.moto.secret("eu-west-1", "eu", "eu-value").await;
    w.moto.secret("us-east-1", "us", "us-value").await;
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::write(
        &policy,
        "default: allow\nrules:\n  - name: eu-residency\n    objects: {backends: [aws], regionsNot: [\"eu-*\"]}\n    action: deny\n  - name: own-prefix\n    objects: {backends: [aws], paths: [\"{namespace}/*\"]}\n    action: allow\n  - name: no-other-prefixes\n    objects: {backends: [aws]}\n    action: deny\n",
    )
    .unwrap();
    let d = daemon(&w, &["--policy", policy.to_str().unwrap()]);
    let mut c = d.client().await;
    let us = aws_spc(&[(
        "objects",
        "- objectName: shop/db\n  objectType: secretsmanager\n",
    )]);
    let (code, msg) = mount_err(&mut c, pod(&w, &us, &[IRSA])).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("eu-residency"), "{msg}");
    let eu_other = aws_spc(&[
        ("region", "eu-west-1"),
        (
            "objects",
            "- objectName: eu\n  objectType: secretsmanager\n",
        ),
    ]);
    let (code, msg) = mount_err(&mut c, pod(&w, &eu_other, &[IRSA])).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("no-other-prefixes"), "{msg}");
    assert_eq!(
        w.proxy.calls("AssumeRoleWithWebIdentity") + w.proxy.calls("secretsmanager.GetSecretValue"),
        0,
        "refused before any login or fetch"
    );
    w.moto.secret("eu-west-1", "shop/db", "mine").await;
    let eu_own = aws_spc(&[
        ("region", "eu-west-1"),
        (
            "objects",
            "- objectName: shop/db\n  objectType: secretsmanager\n",
        ),
    ]);
    let r = c
        .mount(pod(&w, &eu_own, &[IRSA]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(files(&r)["shop_db"].0, b"mine");
}
