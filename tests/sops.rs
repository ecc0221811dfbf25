//! The `sops` backend end to end: documents written by the `sops` tool and
//! by `coffer seal`, decrypted by the real daemon over its socket with
//! per-namespace age identities or Vault transit (a real OpenBao) as the
//! pod; `coffer seal`'s documents read back by independent SOPS decoders.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use common::sops::*;
use common::*;
use serde_yaml_ng::Value;
use tonic::Code;

/// A daemon reading age identities from `keys`, with `more` flags.
fn daemon_with_keys(keys: &Path, more: &[&str]) -> Daemon {
    let mut extra_args = vec!["--sops-age-key-dir".to_string(), keys.display().to_string()];
    extra_args.extend(more.iter().map(|s| s.to_string()));
    Daemon::start_with(Options {
        extra_args,
        ..Default::default()
    })
}

/// The reference documents shipped with rops, made by the `sops` tool.
const REFERENCES: &[&str] = &[
    "age_example",
    "age_encrypted_regex",
    "age_encrypted_suffix",
    "age_mac_only_encrypted",
    "age_unencrypted_regex",
    "age_unencrypted_suffix",
];

struct Node {
    daemon: Daemon,
    _keys: tempfile::TempDir,
}

/// A daemon with an age key directory holding `shop`'s identities.
fn node(shop_identities: &[&str], extra: &[&str]) -> Node {
    let keys = tempfile::tempdir().unwrap();
    if !shop_identities.is_empty() {
        write_key_file(keys.path(), "shop.txt", shop_identities);
    }
    let more: Vec<&str> = ["--log-level", "trace"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let daemon = daemon_with_keys(keys.path(), &more);
    Node {
        daemon,
        _keys: keys,
    }
}

/// An SPC whose objects are given as YAML values (so documents nest
/// without hand-made indentation).
fn sops_spc(objects: Vec<Value>, extra: &[(&str, &str)]) -> SecretProviderClass {
    let text = serde_yaml_ng::to_string(&Value::Sequence(objects)).unwrap();
    let mut s = spc(&text);
    s.parameters.insert("backend".into(), "sops".into());
    for (k, v) in extra {
        s.parameters.insert(k.to_string(), v.to_string());
    }
    s
}

fn manifest_yaml(spc: &SecretProviderClass) -> String {
    let params: serde_yaml_ng::Mapping = spc
        .parameters
        .iter()
        .map(|(k, v)| (Value::from(k.as_str()), Value::from(v.as_str())))
        .collect();
    let doc = serde_yaml_ng::to_value(serde_json::json!({
        "apiVersion": "secrets-store.csi.x-k8s.io/v1",
        "kind": "SecretProviderClass",
        "metadata": {"name": spc.name, "namespace": "shop"},
        "spec": {"provider": "coffer"},
    }))
    .unwrap();
    let mut doc = doc;
    doc["spec"]
        .as_mapping_mut()
        .unwrap()
        .insert("parameters".into(), Value::Mapping(params));
    serde_yaml_ng::to_string(&doc).unwrap()
}

fn object(name: &str, fields: &[(&str, Value)]) -> Value {
    let mut m = serde_yaml_ng::Mapping::new();
    m.insert("objectName".into(), name.into());
    for (k, v) in fields {
        m.insert((*k).into(), v.clone());
    }
    Value::Mapping(m)
}

fn req_in(s: &SecretProviderClass, namespace: &str) -> proto::MountRequest {
    let mut d = driver(Path::new("/var/lib/kubelet/pods/p/volumes/v/mount"));
    d.pod.namespace = namespace.into();
    d.to_proto(s)
}

fn yaml(bytes: &[u8]) -> Value {
    serde_yaml_ng::from_slice(bytes).unwrap()
}

fn seal(args: &[&str], input: &[u8]) -> String {
    let out = run_with_input(Command::new(BIN).arg("seal").args(args), input);
    assert!(
        out.status.success(),
        "coffer seal {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn keygen(dir: &Path, namespace: &str, add: bool) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["sops", "keygen", "--dir"]).arg(dir);
    if namespace == "_cluster" {
        cmd.arg("--cluster");
    } else {
        cmd.args(["--namespace", namespace]);
    }
    if add {
        cmd.arg("--add");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "keygen: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The secret key lines of an identity file.
fn identities_in(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("AGE-SECRET-KEY-1"))
        .map(str::to_string)
        .collect()
}

/// Documents the `sops` tool wrote (suffix and regex rules, MAC over
/// encrypted values only, every value type) decrypt to their published
/// plaintext; `key:` picks one value, `expand` writes every key.
#[tokio::test]
async fn documents_written_by_sops_decrypt() {
    let (refs, key) = sops_references();
    let node = node(&[&key], &[]);
    let mut client = node.daemon.client().await;
    let read = |name: &str| std::fs::read_to_string(refs.join(format!("{name}.yaml"))).unwrap();
    // One value of a reference document, by `key` (or `expand`).
    let pick = |name: &str, doc: &str, field: &str, value: Value| {
        object(name, &[("sops", read(doc).into()), (field, value)])
    };
    let objects: Vec<Value> = REFERENCES
        .iter()
        .map(|name| object(&format!("{name}.yaml"), &[("sops", read(name).into())]))
        .chain([
            pick("hello", "age_example", "key", "hello".into()),
            pick(
                "number",
                "age_example",
                "key",
                "[\"example_number\"]".into(),
            ),
            pick(
                "dotted",
                "age_encrypted_regex",
                "key",
                "a.encrypted_1.b".into(),
            ),
            pick(
                "dotted-index",
                "age_example",
                "key",
                "example_array.0".into(),
            ),
            pick(
                "second",
                "age_example",
                "key",
                Value::Sequence(vec!["example_array".into(), 1.into()]),
            ),
            pick("nested", "age_encrypted_regex", "key", "a".into()),
            pick("env", "age_example", "expand", true.into()),
        ])
        .collect();
    let resp = client
        .mount(req_in(&sops_spc(objects, &[]), "shop"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", node.daemon.logs()))
        .into_inner();
    let files = files_of(&resp);
    for name in REFERENCES {
        let plain = std::fs::read(refs.join(format!("{name}_plaintext.yaml"))).unwrap();
        assert_eq!(
            yaml(&files[&format!("{name}.yaml")]),
            yaml(&plain),
            "{name}"
        );
    }
    assert_eq!(
        files["hello"],
        b"Welcome to SOPS! Edit this file as you please!"
    );
    assert_eq!(files["number"], b"1234.56789");
    assert_eq!(files["second"], b"example_value2");
    assert_eq!(files["dotted"], b"xxx");
    assert_eq!(files["dotted-index"], b"example_value1");
    assert_eq!(
        yaml(&files["nested"]),
        yaml(b"encrypted_1: {a: xxx, b: xxx}\nnot_encrypted: aaa\n")
    );
    assert_eq!(files["env/example_key"], b"example_value");
    assert_eq!(files["env/example_number"], b"1234.56789");
    let logs = node.daemon.logs();
    for plain in ["Welcome to SOPS", "example_value", &key] {
        assert!(!logs.contains(plain), "{plain} in trace logs");
    }
}

/// `coffer seal` writes documents that independent decoders read: npm's
/// `sops-age` (values and types), Debian's `age` (the data key) and
/// OpenSSL's AES-GCM through Python (a value at its path); and the daemon
/// decrypts them, in every format.
#[tokio::test]
async fn sealed_documents_open_everywhere() {
    let keys = tempfile::tempdir().unwrap();
    let recipient = keygen(keys.path(), "shop", false);
    assert!(recipient.starts_with("age1"), "{recipient}");
    let key_file = keys.path().join("shop.txt");
    let identity = identities_in(&key_file).remove(0);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let doc = "db:\n  user: app\n  password: \"p@ss: w0rd\\n\"\n  port: 5432\n  ratio: 0.25\n  tls: true\n  hosts: [a, b]\ncomment_unencrypted: visible\n";
    let sealed_yaml = seal(
        &["-r", &recipient, "--input-type", "yaml", "-"],
        doc.as_bytes(),
    );
    assert!(!sealed_yaml.contains("p@ss"), "{sealed_yaml}");
    assert!(sealed_yaml.contains("comment_unencrypted: visible"));
    let sealed_json = seal(
        &["-r", &recipient, "--input-type", "json", "-"],
        br#"{"api": {"token": "t0k", "n": 7}, "list": ["x", 1.5]}"#,
    );
    let sealed_env = seal(
        &["-r", &recipient, "--input-type", "dotenv", "-"],
        b"API_TOKEN=t0k\nMULTI=a\\nb\n",
    );
    let sealed_bin = seal(&["-r", &recipient], b"\x00\x01binary\xffvalue");

    // npm sops-age.
    let by_npm = decrypt_with_sops_age(&sealed_yaml, "yaml", &identity);
    assert_eq!(by_npm["db"]["password"], "p@ss: w0rd\n");
    assert_eq!(by_npm["db"]["port"], 5432);
    assert_eq!(by_npm["db"]["ratio"], 0.25);
    assert_eq!(by_npm["db"]["tls"], true);
    assert_eq!(by_npm["db"]["hosts"][1], "b");
    let by_npm = decrypt_with_sops_age(&sealed_json, "json", &identity);
    assert_eq!(by_npm["api"]["token"], "t0k");
    assert_eq!(by_npm["list"][1], 1.5);
    let by_npm = decrypt_with_sops_age(&sealed_env, "env", &identity);
    assert_eq!(by_npm["API_TOKEN"], "t0k");

    // Debian's age opens the data key; OpenSSL's AES-GCM opens a value
    // with it at its path.
    let parsed: Value = serde_yaml_ng::from_str(&sealed_yaml).unwrap();
    let enc = parsed["sops"]["age"][0]["enc"].as_str().unwrap();
    let data_key = age_decrypt(enc, &key_file);
    assert_eq!(data_key.len(), 32);
    let sealed_pw = parsed["db"]["password"].as_str().unwrap();
    assert_eq!(
        open_value_with_python(&data_key, sealed_pw, "db:password:"),
        "p@ss: w0rd\n"
    );

    // The daemon, with the identity keygen made (trace logs: nothing of
    // the values, the data key or the identity may show).
    let daemon = daemon_with_keys(keys.path(), &["--log-level", "trace"]);
    let mut client = daemon.client().await;
    let objects = vec![
        object("all.yaml", &[("sops", sealed_yaml.clone().into())]),
        object(
            "password",
            &[
                ("sops", sealed_yaml.clone().into()),
                ("key", "[\"db\"][\"password\"]".into()),
            ],
        ),
        object("api.json", &[("sops", sealed_json.into())]),
        object("app.env", &[("sops", sealed_env.clone().into())]),
        object(
            "envs",
            &[("sops", sealed_env.into()), ("expand", true.into())],
        ),
        object(
            "blob",
            &[("sops", sealed_bin.into()), ("format", "binary".into())],
        ),
    ];
    let resp = client
        .mount(req_in(&sops_spc(objects, &[]), "shop"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", daemon.logs()))
        .into_inner();
    let files = files_of(&resp);
    assert_eq!(yaml(&files["all.yaml"]), yaml(doc.as_bytes()));
    assert_eq!(files["password"], b"p@ss: w0rd\n");
    let api: serde_json::Value = serde_json::from_slice(&files["api.json"]).unwrap();
    assert_eq!(api["api"]["n"], 7);
    assert_eq!(files["app.env"], b"API_TOKEN=t0k\nMULTI=a\\nb\n");
    assert_eq!(files["envs/API_TOKEN"], b"t0k");
    assert_eq!(files["envs/MULTI"], b"a\nb");
    assert_eq!(files["blob"], b"\x00\x01binary\xffvalue");
    use base64::Engine as _;
    let logs = daemon.logs();
    let key_hex: String = data_key.iter().map(|b| format!("{b:02x}")).collect();
    for leak in [
        "p@ss".to_string(),
        "t0k".to_string(),
        key_hex.clone(),
        key_hex.to_uppercase(),
        base64::engine::general_purpose::STANDARD.encode(&data_key),
        identity.clone(),
        identity.to_lowercase(),
    ] {
        assert!(!logs.contains(&leak), "{leak} in trace logs");
    }
    assert!(
        logs.contains("TRACE") || logs.contains("trace"),
        "trace logging was on"
    );
}

/// Keys are scoped like Sealed Secrets: the same SPC in another namespace
/// does not decrypt; the cluster identity only with --sops-cluster-key;
/// key files with loose modes are ignored (logged); rotation keeps old
/// documents opening.
#[tokio::test]
async fn keys_belong_to_namespaces() {
    let keys = tempfile::tempdir().unwrap();
    let shop = keygen(keys.path(), "shop", false);
    let cluster = keygen(keys.path(), "_cluster", false);
    let for_shop = seal(
        &["-r", &shop, "--input-type", "yaml", "-"],
        b"pw: shop-secret\n",
    );
    let for_cluster = seal(
        &["-r", &cluster, "--input-type", "yaml", "-"],
        b"pw: cluster-secret\n",
    );
    let spc_of = |doc: &str| {
        sops_spc(
            vec![object("pw", &[("sops", doc.into()), ("key", "pw".into())])],
            &[],
        )
    };
    let daemon = daemon_with_keys(keys.path(), &[]);
    let mut client = daemon.client().await;
    let ok = client
        .mount(req_in(&spc_of(&for_shop), "shop"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.files[0].contents, b"shop-secret");
    // Copied into another namespace's SPC: refused, naming what was tried.
    let (code, msg) = mount_err(&mut client, req_in(&spc_of(&for_shop), "other")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(
        msg.contains(&shop) && msg.contains("namespace \"other\""),
        "{msg}"
    );
    assert!(!msg.contains("shop-secret"));
    // The cluster identity is not used without the flag.
    let (code, msg) = mount_err(&mut client, req_in(&spc_of(&for_cluster), "shop")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    drop(client);
    drop(daemon);
    let daemon = daemon_with_keys(keys.path(), &["--sops-cluster-key"]);
    let mut client = daemon.client().await;
    let ok = client
        .mount(req_in(&spc_of(&for_cluster), "other"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.files[0].contents, b"cluster-secret");

    // Rotation: a second identity; documents for either open.
    let shop2 = keygen(keys.path(), "shop", true);
    assert_ne!(shop, shop2);
    let for_shop2 = seal(
        &["-r", &shop2, "--input-type", "yaml", "-"],
        b"pw: rotated\n",
    );
    for (doc, want) in [(&for_shop, &b"shop-secret"[..]), (&for_shop2, b"rotated")] {
        let r = client
            .mount(req_in(&spc_of(doc), "shop"))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.files[0].contents, want);
    }
    // A key file others can read is ignored, with an error log.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        keys.path().join("shop.txt"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let (code, msg) = mount_err(&mut client, req_in(&spc_of(&for_shop), "shop")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    let logs = daemon.logs();
    assert!(
        logs.contains("age key file ignored") && logs.contains("0644"),
        "{logs}"
    );
}

/// Every kind of tampering is refused with an error naming the object and
/// what is wrong, and nothing is mounted.
#[tokio::test]
async fn tampered_documents_are_refused() {
    let keys = tempfile::tempdir().unwrap();
    let recipient = keygen(keys.path(), "shop", false);
    let sealed = seal(
        &["-r", &recipient, "--input-type", "yaml", "-"],
        b"a: first-value\nb: second-value\n",
    );
    let parsed: Value = serde_yaml_ng::from_str(&sealed).unwrap();
    let (a, b) = (
        parsed["a"].as_str().unwrap().to_string(),
        parsed["b"].as_str().unwrap().to_string(),
    );
    let mac = parsed["sops"]["mac"].as_str().unwrap().to_string();
    let flip = |s: &str| {
        // One byte of the ciphertext changed.
        let at = s.find("data:").unwrap() + 5;
        let mut bytes = s.as_bytes().to_vec();
        bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("flipped", sealed.replace(&a, &flip(&a)), "does not decrypt"),
        (
            "swapped",
            sealed.replace(&a, "@A@").replace(&b, &a).replace("@A@", &b),
            "moved from another path",
        ),
        ("mac", sealed.replace(&mac, &flip(&mac)), "MAC"),
        (
            "removed value",
            sealed.replace(&format!("b: {b}\n"), ""),
            "MAC does not match",
        ),
        (
            "no mac",
            sealed.replace(&format!("mac: {mac}"), "mac: ''"),
            "no MAC",
        ),
        (
            "no key group",
            {
                let mut v: Value = serde_yaml_ng::from_str(&sealed).unwrap();
                v["sops"].as_mapping_mut().unwrap().remove("age");
                serde_yaml_ng::to_string(&v).unwrap()
            },
            "no keys",
        ),
        (
            "truncated",
            sealed[..sealed.len() / 2].to_string(),
            "SOPS document",
        ),
    ];
    let daemon = daemon_with_keys(keys.path(), &[]);
    let mut client = daemon.client().await;
    for (what, doc, expect) in cases {
        let s = sops_spc(
            vec![
                object(
                    "fine",
                    &[("sops", sealed.clone().into()), ("key", "a".into())],
                ),
                object(
                    &format!("bad-{}", what.replace(' ', "-")),
                    &[("sops", doc.into())],
                ),
            ],
            &[],
        );
        let (code, msg) = mount_err(&mut client, req_in(&s, "shop")).await;
        assert_eq!(code, Code::InvalidArgument, "{what}: {msg}");
        assert!(msg.contains(expect), "{what}: {msg}");
        assert!(msg.contains("bad-"), "{what}: the object is named: {msg}");
        assert!(!msg.contains("first-value") && !msg.contains("second-value"));
    }
}

/// Vault transit as the pod, against a real OpenBao: the pod's role may
/// decrypt, another service account is refused by OpenBao, a rotated
/// transit key still opens old documents.
#[tokio::test]
async fn vault_transit_as_the_pod() {
    use common::bao::*;
    use serde_json::json;
    let bao = Bao::start().await;
    let signer = Signer::new();
    bao.ok("POST", "sys/mounts/transit", json!({"type": "transit"}))
        .await;
    bao.ok("POST", "transit/keys/sops", json!({})).await;
    bao.policy(
        "app",
        r#"path "transit/decrypt/sops" { capabilities = ["update"] }"#,
    )
    .await;
    setup_jwt(&bao, &signer, &["app"]).await;
    let uri = format!("{}/v1/transit/keys/sops", bao.addr());
    let seal_transit = |plain: &[u8]| {
        let out = run_with_input(
            Command::new(BIN)
                .args(["seal", "--vault-transit", &uri, "--input-type", "yaml", "-"])
                .env("VAULT_TOKEN", "root"),
            plain,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let old = seal_transit(b"pw: before-rotation\n");
    assert!(
        old.contains("hc_vault") && old.contains("vault:v1:"),
        "{old}"
    );
    bao.ok("POST", "transit/keys/sops/rotate", json!({})).await;
    let new = seal_transit(b"pw: after-rotation\n");
    assert!(new.contains("vault:v2:"), "{new}");

    let daemon = Daemon::start_with(Options {
        extra_args: vec!["--log-level".into(), "trace".into()],
        ..Default::default()
    });
    let mut client = daemon.client().await;
    let spc = sops_spc(
        vec![
            object("old", &[("sops", old.into()), ("key", "pw".into())]),
            object("new", &[("sops", new.into()), ("key", "pw".into())]),
        ],
        &[
            ("vaultAddress", &bao.addr()),
            ("roleName", "app"),
            ("vaultAuthMountPath", "jwt"),
        ],
    );
    let pod = |sa: &str| {
        let mut d = with_tokens(
            driver(Path::new("/var/lib/kubelet/pods/p/volumes/v/mount")),
            &[("vault", &signer.token("shop", sa, "vault", 600))],
        );
        d.pod.service_account = sa.into();
        d.to_proto(&spc)
    };
    let ok = client
        .mount(pod("web"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}\n{}", daemon.logs()))
        .into_inner();
    let files = files_of(&ok);
    assert_eq!(files["old"], b"before-rotation");
    assert_eq!(files["new"], b"after-rotation");
    // Another service account of the namespace: OpenBao refuses its login.
    let (code, msg) = mount_err(&mut client, pod("batch")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("hc_vault"), "{msg}");
    let logs = daemon.logs();
    assert!(!logs.contains("before-rotation") && !logs.contains("after-rotation"));
    assert!(
        !logs.contains("\"plaintext\""),
        "transit answers are not logged"
    );

    // A node policy that keeps pods off this Vault keeps transit documents
    // off it too, before any login.
    let policy = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        policy.path(),
        format!(
            "default: allow\nrules:\n  - name: no-transit-here\n    objects: {{backends: [sops], addresses: [{:?}]}}\n    action: deny\n",
            bao.addr()
        ),
    )
    .unwrap();
    let guarded = Daemon::start_with(Options {
        extra_args: vec!["--policy".into(), policy.path().display().to_string()],
        ..Default::default()
    });
    let mut client = guarded.client().await;
    let (code, msg) = mount_err(&mut client, pod("web")).await;
    assert_eq!(code, Code::PermissionDenied, "{msg}");
    assert!(msg.contains("no-transit-here"), "{msg}");
}

/// `sopsFile` reads the document below the file backend's root, with its
/// confinement; `coffer check` judges sops objects without decrypting.
#[tokio::test]
async fn sops_files_and_check() {
    let keys = tempfile::tempdir().unwrap();
    let recipient = keygen(keys.path(), "shop", false);
    let sealed = seal(
        &["-r", &recipient, "--input-type", "dotenv", "-"],
        b"TOKEN=from-file\n",
    );
    let node_daemon = daemon_with_keys(keys.path(), &[]);
    node_daemon.write_secret("gitops/app.env", &sealed);
    let mut client = node_daemon.client().await;
    let s = sops_spc(
        vec![object(
            "token",
            &[
                ("sopsFile", "gitops/app.env".into()),
                ("key", "TOKEN".into()),
            ],
        )],
        &[],
    );
    let r = client.mount(req_in(&s, "shop")).await.unwrap().into_inner();
    assert_eq!(r.files[0].contents, b"from-file");
    let escape = sops_spc(
        vec![object("x", &[("sopsFile", "../../etc/passwd".into())])],
        &[],
    );
    let (code, msg) = mount_err(&mut client, req_in(&escape, "shop")).await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");

    // A volume's documents are read and decrypted within a budget
    // (8 MiB in all), each distinct document once.
    let junk = "a".repeat(1_000_000);
    let mut many = Vec::new();
    for i in 0..9 {
        node_daemon.write_secret(&format!("gitops/big{i}.yaml"), &junk);
        many.push(object(
            &format!("big{i}"),
            &[("sopsFile", format!("gitops/big{i}.yaml").into())],
        ));
    }
    let (code, msg) = mount_err(&mut client, req_in(&sops_spc(many, &[]), "shop")).await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("add up to more than 8388608 bytes"), "{msg}");
    let same: Vec<Value> = (0..40)
        .map(|i| {
            object(
                &format!("t{i}"),
                &[
                    ("sopsFile", "gitops/app.env".into()),
                    ("key", "TOKEN".into()),
                ],
            )
        })
        .collect();
    let r = client
        .mount(req_in(&sops_spc(same, &[]), "shop"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.files.len(), 40);

    // coffer check: format, MAC presence, key groups.
    let dir = tempfile::tempdir().unwrap();
    let manifest = |doc: &str| {
        let spc = sops_spc(vec![object("a", &[("sops", doc.into())])], &[]);
        let path: PathBuf = dir.path().join("spc.yaml");
        std::fs::write(&path, manifest_yaml(&spc)).unwrap();
        let out = Command::new(BIN).arg("check").arg(&path).output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let (ok, out) = manifest(&sealed);
    assert!(ok, "{out}");
    let mut v: Value = serde_yaml_ng::from_str(&seal(
        &["-r", &recipient, "--input-type", "yaml", "-"],
        b"a: 1\n",
    ))
    .unwrap();
    v["sops"].as_mapping_mut().unwrap().remove("mac");
    let (ok, out) = manifest(&serde_yaml_ng::to_string(&v).unwrap());
    assert!(!ok && out.contains("no MAC"), "{out}");
    let (ok, out) = manifest("just: text\n");
    assert!(!ok && out.contains("no `sops` metadata"), "{out}");
}

/// `coffer seal --spc F --object N` puts the document into the manifest.
#[test]
fn seal_updates_an_spc_in_place() {
    let keys = tempfile::tempdir().unwrap();
    let recipient = keygen(keys.path(), "shop", false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("spc.yaml");
    std::fs::write(
        &path,
        "apiVersion: secrets-store.csi.x-k8s.io/v1\nkind: SecretProviderClass\nmetadata:\n  name: app\n  namespace: shop\nspec:\n  provider: coffer\n  parameters:\n    objects: |\n      - objectName: db\n        backend: sops\n      - objectName: other\n        backend: file\n        path: x\n",
    )
    .unwrap();
    let input = dir.path().join("db.yaml");
    std::fs::write(&input, "password: hunter2\n").unwrap();
    let out = Command::new(BIN)
        .args(["seal", "-r", &recipient, "--spc"])
        .arg(&path)
        .args(["--object", "db"])
        .arg(&input)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(!text.contains("hunter2"));
    let spc: Value = serde_yaml_ng::from_str(&text).unwrap();
    let objects: Value =
        serde_yaml_ng::from_str(spc["spec"]["parameters"]["objects"].as_str().unwrap()).unwrap();
    assert!(objects[0]["sops"]
        .as_str()
        .unwrap()
        .contains("ENC[AES256_GCM"));
    assert_eq!(objects[1]["path"], "x");
    let check = Command::new(BIN).arg("check").arg(&path).output().unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

/// Interop both ways with rops (an independent SOPS implementation that
/// checks the MAC): its documents decrypt in coffer, coffer's decrypt in
/// it, and a document with a value removed is refused by both.
#[tokio::test]
async fn rops_reads_and_writes_what_coffer_does() {
    let keys = tempfile::tempdir().unwrap();
    let recipient = keygen(keys.path(), "shop", false);
    let identity = identities_in(&keys.path().join("shop.txt")).remove(0);
    let doc = "db:\n  password: p@ss\n  port: 5432\n  ratio: 0.5\n  tls: true\nlist: [a, 1, false]\nnote_u: clear\n";
    let by_rops_yaml = run_rops(&["encrypt", "--age", &recipient, "-f", "yaml"], &[], doc).unwrap();
    let by_rops_json = run_rops(
        &[
            "encrypt",
            "--age",
            &recipient,
            "--unencrypted-suffix",
            "_u",
            "--mac-only-encrypted",
            "-f",
            "json",
        ],
        &[],
        r#"{"api": {"token": "t0k", "n": 3}, "note_u": "clear", "l": [1.5, "x"]}"#,
    )
    .unwrap();
    assert!(
        by_rops_json.contains("\"note_u\": \"clear\""),
        "{by_rops_json}"
    );
    let daemon = daemon_with_keys(keys.path(), &[]);
    let mut client = daemon.client().await;
    let objects = vec![
        object("rops.yaml", &[("sops", by_rops_yaml.into())]),
        object(
            "token",
            &[
                ("sops", by_rops_json.into()),
                ("key", "[\"api\"][\"token\"]".into()),
            ],
        ),
    ];
    let r = client
        .mount(req_in(&sops_spc(objects, &[]), "shop"))
        .await
        .unwrap_or_else(|s| panic!("{s:?}"))
        .into_inner();
    let files = files_of(&r);
    assert_eq!(yaml(&files["rops.yaml"]), yaml(doc.as_bytes()));
    assert_eq!(files["token"], b"t0k");

    // coffer's documents in rops, which recomputes and checks the MAC.
    let env = [("ROPS_AGE", identity.as_str())];
    for (format, input) in [
        ("yaml", doc),
        (
            "json",
            r#"{"a": {"b": "secret", "n": 3}, "l": [1.5, "x", true]}"#,
        ),
    ] {
        let sealed = seal(
            &["-r", &recipient, "--input-type", format, "-"],
            input.as_bytes(),
        );
        let opened = run_rops(&["decrypt", "-f", format], &env, &sealed)
            .unwrap_or_else(|e| panic!("rops refused coffer's {format}: {e}"));
        assert_eq!(yaml(opened.as_bytes()), yaml(input.as_bytes()), "{format}");
    }
    let sealed = seal(
        &[
            "-r",
            &recipient,
            "--encrypted-regex",
            "^pass",
            "--input-type",
            "yaml",
            "-",
        ],
        doc.as_bytes(),
    );
    assert!(sealed.contains("port: 5432"), "{sealed}");
    let opened = run_rops(&["decrypt", "-f", "yaml"], &env, &sealed).unwrap();
    assert_eq!(yaml(opened.as_bytes()), yaml(doc.as_bytes()));
    // A value removed: rops and coffer both refuse it.
    let cut: String = sealed
        .lines()
        .filter(|l| !l.starts_with("note_u"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(run_rops(&["decrypt", "-f", "yaml"], &env, &cut).is_err());
    let (code, msg) = mount_err(
        &mut client,
        req_in(
            &sops_spc(vec![object("cut", &[("sops", cut.into())])], &[]),
            "shop",
        ),
    )
    .await;
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("MAC does not match"), "{msg}");
}
