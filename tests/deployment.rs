//! The deployment files as a cluster would get them: the Helm chart linted
//! strictly and rendered by Helm's own library (PyPI helm-python-sdk) for
//! the value sets admins use, every rendering and the plain manifests
//! validated against Kubernetes' schemas (kubernetes-validate --strict),
//! and every node path an example SPC names mounted by the deployment.

mod common;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_yaml_ng::Value;

const HELM: &str = "helm-python-sdk==0.2.2";
const VALIDATE: &str = "kubernetes-validate==1.37.0";

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn docs(text: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

/// Renders the chart for each named value set.
fn render(sets: &BTreeMap<&str, serde_json::Value>) -> (tempfile::TempDir, String) {
    let venv = common::python::venv(&[HELM, VALIDATE]);
    let out = tempfile::tempdir().unwrap();
    let mut child = Command::new(venv.join("bin/python"))
        .arg(root().join("tests/deployment/render.py"))
        .arg(root().join("daemonset/chart"))
        .arg(out.path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(sets).unwrap().as_bytes())
        .unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    (out, String::from_utf8_lossy(&result.stdout).into_owned())
}

fn validate(files: &[PathBuf]) {
    let venv = common::python::venv(&[HELM, VALIDATE]);
    for version in ["1.30", "1.34"] {
        let out = Command::new(venv.join("bin/kubernetes-validate"))
            .args(["-k", version, "--strict"])
            .args(files)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubernetes {version}: {text}");
        assert!(!text.contains("ERROR"), "{text}");
    }
}

fn daemonset(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

fn mount_paths(ds: &Value) -> Vec<String> {
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|m| m["mountPath"].as_str().unwrap().to_string())
        .collect()
}

fn args(ds: &Value) -> Vec<String> {
    ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap().to_string())
        .collect()
}

/// The example manifests, one per backend (and built files).
const EXAMPLES: [&str; 6] = [
    "vault.yaml",
    "gcp.yaml",
    "aws.yaml",
    "azure.yaml",
    "file.yaml",
    "files.yaml",
];

/// Node paths the example SPCs name (vaultCACertPath and friends).
fn example_paths() -> Vec<String> {
    let mut paths = Vec::new();
    for f in EXAMPLES {
        let text = std::fs::read_to_string(root().join("daemonset/examples").join(f)).unwrap();
        for d in docs(&text) {
            if d["kind"] != "SecretProviderClass" {
                continue;
            }
            if let Some(params) = d["spec"]["parameters"].as_mapping() {
                for (k, v) in params {
                    let k = k.as_str().unwrap_or("");
                    if k.ends_with("CertPath")
                        || k.ends_with("KeyPath")
                        || k.ends_with("CADirectory")
                    {
                        paths.push(v.as_str().unwrap().to_string());
                    }
                }
            }
        }
    }
    paths
}

fn mounted(mounts: &[String], path: &str) -> bool {
    mounts
        .iter()
        .any(|m| Path::new(path).starts_with(m) && Path::new(path) != Path::new(m))
}

#[test]
fn the_chart_renders_valid_hardened_manifests_for_every_value_set() {
    let sets: BTreeMap<&str, serde_json::Value> = BTreeMap::from([
        ("defaults", serde_json::json!({})),
        (
            "non-root",
            serde_json::json!({"nonRoot": {"enabled": true}}),
        ),
        (
            "vault",
            serde_json::json!({"vault": {"address": "https://vault.vault.svc:8200"}, "tls": {"secret": "vault-tls"}}),
        ),
        (
            "gcp",
            serde_json::json!({"gcp": {"project": "p", "clusterLocation": "europe-west1", "clusterName": "c"}}),
        ),
        (
            "aws",
            serde_json::json!({"aws": {
                "region": "us-east-1",
                "roleArnTemplate": "arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}",
                "secretsmanagerEndpoint": "https://vpce-1.secretsmanager.us-east-1.vpce.amazonaws.com",
                "stsEndpoint": "https://sts.us-east-1.amazonaws.com",
            }}),
        ),
        (
            "azure",
            serde_json::json!({"azure": {
                "keyvaultEndpoint": "https://{name}.privatelink.vaultcore.azure.net",
                "constructPemChain": false,
                "writeCertAndKeyInSeparateFiles": true,
            }}),
        ),
        (
            "file",
            serde_json::json!({"fileBackend": {"root": "/srv/secrets"}}),
        ),
        (
            "sops",
            serde_json::json!({"sops": {"ageKeySecret": "coffer-sops-age", "clusterKey": true}}),
        ),
        (
            "policy",
            serde_json::json!({
                "policy": "default: deny\nrules:\n  - {name: files, objects: {backends: [file]}, action: allow}\n",
                "nodeLabels": {"topology.kubernetes.io/region": "eu-west-1"},
            }),
        ),
        (
            "everything",
            serde_json::json!({
                "namespace": {"create": true},
                "metrics": {"serviceMonitor": {"enabled": true, "labels": {"release": "prom"}}},
                "imagePullSecrets": [{"name": "registry"}],
                "env": [{"name": "COFFER_BACKEND_QPS", "value": "20"}],
                "envFrom": [{"configMapRef": {"name": "coffer-settings"}}],
                "extraVolumes": [{"name": "extra-ca", "configMap": {"name": "extra-ca"}}],
                "extraVolumeMounts": [{"name": "extra-ca", "mountPath": "/etc/coffer/extra", "readOnly": true}],
                "podAnnotations": {"team": "platform"},
                "podLabels": {"tier": "node"},
                "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": [{"key": "pool", "operator": "In", "values": ["apps"]}]}]}}},
                "livenessProbe": {"httpGet": {"path": "/healthz", "port": "health"}, "periodSeconds": 30},
                "resources": {"limits": {"memory": "256Mi"}},
                "audit": {"log": "off"},
            }),
        ),
    ]);
    let (dir, lint) = render(&sets);
    println!("helm lint notes: {lint}");
    let files: Vec<PathBuf> = sets
        .keys()
        .map(|n| dir.path().join(format!("{n}.yaml")))
        .collect();
    validate(&files);
    let rendered: BTreeMap<&str, Vec<Value>> = sets
        .keys()
        .map(|n| {
            let text = std::fs::read_to_string(dir.path().join(format!("{n}.yaml"))).unwrap();
            (*n, docs(&text))
        })
        .collect();
    for (name, docs) in &rendered {
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert!(
            !kinds.iter().any(|k| k.contains("Role")),
            "{name}: no RBAC at all"
        );
        let ds = daemonset(docs);
        let pod = &ds["spec"]["template"]["spec"];
        let c = &pod["containers"][0];
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        assert_eq!(
            c["securityContext"]["readOnlyRootFilesystem"], true,
            "{name}"
        );
        assert_eq!(
            c["securityContext"]["allowPrivilegeEscalation"], false,
            "{name}"
        );
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault",
            "{name}"
        );
        let a = args(ds);
        assert!(
            a.contains(&"--health-addr=$(POD_IP):8080".to_string()),
            "{name}: {a:?}"
        );
        // Every node path the example SPCs name is mounted.
        let mounts = mount_paths(ds);
        for path in example_paths() {
            assert!(
                mounted(&mounts, &path),
                "{name}: {path} is not mounted ({mounts:?})"
            );
        }
    }
    let e = &rendered["everything"];
    let kinds: Vec<&str> = e.iter().filter_map(|d| d["kind"].as_str()).collect();
    for k in [
        "Namespace",
        "ServiceMonitor",
        "Service",
        "DaemonSet",
        "ServiceAccount",
    ] {
        assert!(kinds.contains(&k), "{k} in {kinds:?}");
    }
    let ns = e.iter().find(|d| d["kind"] == "Namespace").unwrap();
    assert_eq!(
        ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
    let ds = daemonset(e);
    assert_eq!(
        ds["spec"]["template"]["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    assert!(mount_paths(ds).contains(&"/etc/coffer/extra".to_string()));
    assert!(args(ds).contains(&"--audit-log=off".to_string()));
    let nr = daemonset(&rendered["non-root"]);
    assert_eq!(
        nr["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"],
        true
    );
    assert!(args(nr).contains(&"--socket-mode=0660".to_string()));
    assert!(mount_paths(daemonset(&rendered["file"])).contains(&"/srv/coffer".to_string()));
    assert!(args(daemonset(&rendered["gcp"])).contains(&"--gcp-project=p".to_string()));
    let aws = args(daemonset(&rendered["aws"]));
    for flag in [
        "--aws-region=us-east-1",
        "--aws-role-arn-template=arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}",
        "--aws-secretsmanager-endpoint=https://vpce-1.secretsmanager.us-east-1.vpce.amazonaws.com",
        "--aws-sts-endpoint=https://sts.us-east-1.amazonaws.com",
    ] {
        assert!(aws.contains(&flag.to_string()), "{flag} in {aws:?}");
    }
    assert!(!args(daemonset(&rendered["defaults"]))
        .iter()
        .any(|a| a.starts_with("--aws-") || a.starts_with("--azure-")));
    let azure = args(daemonset(&rendered["azure"]));
    for flag in [
        "--azure-keyvault-endpoint=https://{name}.privatelink.vaultcore.azure.net",
        "--azure-construct-pem-chain=false",
        "--azure-write-cert-and-key-in-separate-files",
    ] {
        assert!(azure.contains(&flag.to_string()), "{flag} in {azure:?}");
    }
    let sops = daemonset(&rendered["sops"]);
    let sa = args(sops);
    assert!(
        sa.contains(&"--sops-age-key-dir=/etc/coffer/sops-age".to_string()),
        "{sa:?}"
    );
    assert!(sa.contains(&"--sops-cluster-key".to_string()), "{sa:?}");
    assert!(mount_paths(sops).contains(&"/etc/coffer/sops-age".to_string()));
    assert!(!args(daemonset(&rendered["defaults"]))
        .iter()
        .any(|a| a.starts_with("--sops-")));
    // The policy: a ConfigMap the daemon reads, whose text is a valid policy.
    let p = &rendered["policy"];
    let pa = args(daemonset(p));
    assert!(
        pa.contains(&"--policy=/etc/coffer/policy/policy.yaml".to_string()),
        "{pa:?}"
    );
    assert!(pa.contains(&"--node-label=topology.kubernetes.io/region=eu-west-1".to_string()));
    assert!(mount_paths(daemonset(p)).contains(&"/etc/coffer/policy".to_string()));
    let cm = p
        .iter()
        .find(|d| d["kind"] == "ConfigMap")
        .expect("policy ConfigMap");
    let text = cm["data"]["policy.yaml"].as_str().unwrap();
    coffer::policy::Policy::parse(text).unwrap();
    assert!(!rendered["defaults"]
        .iter()
        .any(|d| d["kind"] == "ConfigMap"));
    // Values nothing reads are gone.
    let values = std::fs::read_to_string(root().join("daemonset/chart/values.yaml")).unwrap();
    assert!(!values.contains("driverGid"));
}

#[test]
fn plain_manifests_and_examples_are_valid_and_consistent() {
    let d = root().join("daemonset");
    validate(&[
        d.join("coffer.yaml"),
        d.join("csidriver-token-requests.yaml"),
        d.join("examples/vault.yaml"),
        d.join("examples/file.yaml"),
        d.join("examples/gcp.yaml"),
        d.join("examples/aws.yaml"),
        d.join("examples/azure.yaml"),
        d.join("examples/files.yaml"),
    ]);
    let text = std::fs::read_to_string(d.join("coffer.yaml")).unwrap();
    let docs = docs(&text);
    let ds = daemonset(&docs);
    let mounts = mount_paths(ds);
    for path in example_paths() {
        assert!(
            mounted(&mounts, &path),
            "{path} is not mounted by coffer.yaml ({mounts:?})"
        );
    }
    assert!(!text.contains("VAULT_ADDR"), "no hard-coded Vault address");
    // Each example creates what it uses: its namespace and service accounts.
    for f in EXAMPLES {
        let docs = self::docs(&std::fs::read_to_string(d.join("examples").join(f)).unwrap());
        let made: Vec<(String, String)> = docs
            .iter()
            .map(|d| {
                (
                    d["kind"].as_str().unwrap_or("").to_string(),
                    d["metadata"]["name"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect();
        assert!(
            made.contains(&("Namespace".into(), "shop".into())),
            "{f}: {made:?}"
        );
        for pod in docs.iter().filter(|d| d["kind"] == "Pod") {
            if let Some(sa) = pod["spec"]["serviceAccountName"].as_str() {
                assert!(
                    made.contains(&("ServiceAccount".into(), sa.into())),
                    "{f}: service account {sa} is not created"
                );
            }
        }
    }
}
