//! `coffer check`: pre-flight validation of SecretProviderClass manifests,
//! judged exactly as Mount judges them (object list, paths, modes,
//! encodings, every backend's parameters), without fetching anything. Users
//! of the peers only learn of a typo from a FailedMount event on a stuck pod.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;

use crate::backend::file::{FileBackend, Scope};
use crate::backend::gcp::GcpBackend;
use crate::backend::vault::VaultBackend;
use crate::backend::Registry;
use crate::config::{GcpArgs, VaultArgs};
use crate::error::Failure;
use crate::manifest::{DriverRequest, Pod, SecretProviderClass};
use crate::mount::{check_objects, check_parameters, object_warnings};
use crate::policy::PolicyHandle;
use crate::request::MountContext;
use crate::secret::Credential;
use crate::spc;

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// SecretProviderClass manifests (YAML, several documents allowed).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The daemon's --default-backend (default: vault, as a daemon without
    /// the file backend).
    #[arg(long, env = "COFFER_DEFAULT_BACKEND", default_value = "vault")]
    pub default_backend: String,
    /// The daemon's own Vault settings (same flags and variables as
    /// `coffer serve`): SPCs that rely on them are judged with them.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// The daemon's own Google settings, likewise.
    #[command(flatten)]
    pub gcp: GcpArgs,
    /// The daemon's own AWS settings, likewise.
    #[command(flatten)]
    pub aws: crate::config::AwsArgs,
    /// The daemon's own Azure settings, likewise.
    #[command(flatten)]
    pub azure: crate::config::AzureArgs,
    /// A node policy: print which rule decides each object (denied
    /// objects are problems).
    #[arg(long, env = "COFFER_POLICY")]
    pub policy: Option<PathBuf>,
    /// The pod's namespace for the policy (default: the SPC's).
    #[arg(long = "namespace")]
    pub pod_namespace: Option<String>,
    /// The pod's service account for the policy.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// The node's labels for the policy (`KEY=VALUE`, repeatable).
    #[arg(long = "node-label", value_delimiter = ',')]
    pub node_labels: Vec<String>,
}

/// The policy named by `--policy`, with `--node-label`s.
fn load_policy(args: &CheckArgs) -> Result<Option<Arc<PolicyHandle>>, String> {
    let Some(path) = &args.policy else {
        return Ok(None);
    };
    let labels = crate::policy::parse_node_labels(&args.node_labels)?;
    PolicyHandle::load(Some(path.clone()), labels)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// The keys of a SecretProviderClass `spec`.
const SPEC_KEYS: &[&str] = &["provider", "parameters", "secretObjects"];

/// Problems found in one SPC.
#[derive(Debug)]
pub struct Finding {
    pub file: PathBuf,
    pub spc: String,
    pub objects: usize,
    pub problems: Vec<String>,
    /// Things Mount accepts but the user should know (ignored fields).
    pub warnings: Vec<String>,
    /// Service-account token audiences the driver must pass (CSIDriver
    /// `tokenRequests`).
    pub audiences: std::collections::BTreeSet<String>,
    /// Which policy rule decides each object (with `--policy`).
    pub decisions: Vec<String>,
}

impl Finding {
    /// A file that could not be judged at all.
    fn unreadable(file: PathBuf, problem: String) -> Self {
        Finding {
            file,
            spc: String::new(),
            objects: 0,
            problems: vec![problem],
            warnings: Vec::new(),
            audiences: Default::default(),
            decisions: Vec::new(),
        }
    }
}

/// The backends as the daemon described by the flags would have them.
/// The file backend is judged by its rules only (no root is opened).
fn registry(args: &CheckArgs) -> Registry {
    let mut r = Registry::new();
    let files = Arc::new(FileBackend::new("/".into(), Scope::None));
    r.register(files.clone());
    let vault = Arc::new(VaultBackend::new(args.vault.clone()));
    r.register(vault.clone());
    r.register(Arc::new(
        crate::backend::sops::SopsBackend::new(
            None,
            false,
            vault,
            Some(files),
            std::time::Duration::ZERO,
        )
        .inspect_all(),
    ));
    r.register(Arc::new(GcpBackend::new(
        GcpArgs {
            // key.json arrives in nodePublishSecretRef, which check has not
            // got: whether the node accepts one is not judged here.
            allow_node_publish_secret: true,
            ..args.gcp.clone()
        },
        std::time::Duration::from_secs(30),
    )));
    r.register(Arc::new(crate::backend::aws::AwsBackend::new(
        args.aws.clone(),
        &args.node_labels,
        std::time::Duration::from_secs(30),
        u64::MAX / 8,
    )));
    r.register(Arc::new(crate::backend::azure::AzureBackend::for_check(
        args.azure.clone(),
    )));
    r
}

/// SPC parameters coffer reads (others are ignored, as the peers ignore
/// them; near misses of these are typos).
fn known_parameters(registry: &Registry) -> Vec<String> {
    let mut known: Vec<String> = [
        spc::OBJECTS_PARAM,
        spc::GCP_SECRETS_PARAM,
        spc::BACKEND_PARAM,
        crate::mount::REFRESH_PARAM,
        crate::mount::STALE_PARAM,
        crate::render::FILES_PARAM,
        crate::render::VERSIONS_FILE_PARAM,
    ]
    .map(String::from)
    .to_vec();
    for name in registry.names() {
        if let Ok(b) = registry.get(name) {
            known.extend(b.parameters());
        }
    }
    known.sort();
    known.dedup();
    known
}

/// Keys of each SPC's `spec`, by name, read from the raw documents.
fn spec_keys(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let Ok(v) = <serde_yaml_ng::Value as serde::Deserialize>::deserialize(doc) else {
            continue;
        };
        let name = v["metadata"]["name"].as_str().unwrap_or("").to_string();
        if let Some(spec) = v["spec"].as_mapping() {
            out.insert(
                name,
                spec.keys()
                    .filter_map(|k| k.as_str().map(String::from))
                    .collect(),
            );
        }
    }
    out
}

/// The context Mount would see for a pod using `spc`, with a placeholder
/// token for the audiences it names (tokens come from the driver at run time).
fn context(spc: &SecretProviderClass, args: &CheckArgs) -> Result<MountContext, String> {
    let mut tokens = BTreeMap::new();
    let project = spc
        .parameters
        .get("gcpProject")
        .cloned()
        .or_else(|| args.gcp.project.clone())
        .unwrap_or_default();
    let audiences = [
        spc.parameters.get("audience").cloned(),
        Some(args.vault.audience.clone()),
        Some(format!("{project}.svc.id.goog")),
    ];
    for audience in audiences.into_iter().flatten() {
        tokens.insert(audience, Credential::new("placeholder".into()));
    }
    let req = DriverRequest {
        pod: Pod {
            namespace: args
                .pod_namespace
                .clone()
                .or_else(|| spc.namespace.clone())
                .unwrap_or_else(|| "default".into()),
            name: "check".into(),
            uid: "check".into(),
            service_account: args.service_account.clone(),
        },
        tokens,
        node_publish_secrets: None,
        volume_attributes: BTreeMap::new(),
        permission: 0o644,
        target_path: "/check".into(),
    }
    .to_proto(spc);
    MountContext::parse(
        &req.attributes,
        &req.secrets,
        &req.permission,
        &req.target_path,
    )
    .map_err(|e| e.to_string())
}

pub fn check(args: &CheckArgs) -> Vec<Finding> {
    let registry = registry(args);
    let policy = match load_policy(args) {
        Ok(p) => p,
        Err(problem) => {
            return vec![Finding::unreadable(
                args.policy.clone().unwrap_or_default(),
                problem,
            )]
        }
    };
    let known = known_parameters(&registry);
    let known: Vec<&str> = known.iter().map(String::as_str).collect();
    let mut findings = Vec::new();
    for file in &args.files {
        let text = std::fs::read_to_string(file).map_err(|e| format!("cannot read: {e}"));
        let keys = text.as_deref().map(spec_keys).unwrap_or_default();
        let spcs = text
            .and_then(|text| SecretProviderClass::all_from_yaml(&text).map_err(|e| e.to_string()));
        let spcs = match spcs {
            Ok(s) => s,
            Err(problem) => {
                findings.push(Finding::unreadable(file.clone(), problem));
                continue;
            }
        };
        for spc_doc in spcs {
            let mut problems = Vec::new();
            if spc_doc.provider != "coffer" {
                problems.push(format!(
                    "spec.provider is {:?}: the driver will not send it to coffer",
                    spc_doc.provider
                ));
            }
            let mut objects = 0;
            let mut warnings = Vec::new();
            let mut audiences = std::collections::BTreeSet::new();
            let mut decisions = Vec::new();
            for key in keys.get(&spc_doc.name).into_iter().flatten() {
                if !SPEC_KEYS.contains(&key.as_str()) {
                    let shown = spc::with_suggestion(key, SPEC_KEYS);
                    warnings.push(format!("spec.{shown} is not a SecretProviderClass field"));
                }
            }
            for name in spc_doc.parameters.keys() {
                if known.contains(&name.as_str()) {
                    continue;
                }
                match spc::suggestion(name, &known) {
                    Some(_) => problems.push(format!(
                        "parameter {}: coffer reads no such parameter",
                        spc::with_suggestion(name, &known)
                    )),
                    None => warnings.push(format!(
                        "parameter {} is not read by coffer (ignored)",
                        crate::error::shown_bare(name)
                    )),
                }
            }
            match context(&spc_doc, args) {
                Err(e) => problems.push(e),
                Ok(ctx) => {
                    let show = |f: &Failure| f.to_string();
                    problems.extend(check_parameters(&ctx).iter().map(show));
                    let (list, failures) = spc::parse_objects_partial_with(
                        &ctx.parameters,
                        &spc::Defaults {
                            backend: &args.default_backend,
                            azure_split_cert_key: args.azure.write_cert_and_key_in_separate_files,
                        },
                    );
                    objects = list.len() + failures.len();
                    problems.extend(failures.iter().map(show));
                    problems.extend(check_objects(&registry, &list, &ctx).iter().map(show));
                    match crate::render::Files::parse(&ctx.parameters) {
                        Ok(Some(files)) if failures.is_empty() => {
                            problems.extend(files.check(&list).iter().map(show));
                        }
                        Ok(_) => {}
                        Err(bad) => problems.extend(bad.iter().map(show)),
                    }
                    warnings.extend(object_warnings(&registry, &list).into_iter().map(
                        |(object, w)| format!("object {}: {w}", crate::error::shown(&object)),
                    ));
                    for object in &list {
                        if let Ok(backend) = registry.get(&object.backend) {
                            audiences.extend(backend.token_audience(object, &ctx));
                        }
                    }
                    if let Some(handle) = &policy {
                        let decided = handle.decisions(&registry, &list, &ctx);
                        for (object, (action, rule)) in list.iter().zip(&decided) {
                            decisions.push(format!(
                                "object {}: {} by {}",
                                crate::error::shown(&object.label()),
                                if *action == crate::policy::Action::Allow {
                                    "allowed"
                                } else {
                                    "denied"
                                },
                                rule.as_deref()
                                    .map_or("the default".to_string(), |r| format!("rule {r}"))
                            ));
                        }
                        let denied = crate::policy::denials(&list, &decided);
                        if !denied.is_empty() {
                            problems.push(
                                crate::error::MountError::Policy { denials: denied }.to_string(),
                            );
                        }
                    }
                }
            }
            findings.push(Finding {
                file: file.clone(),
                spc: spc_doc.name,
                objects,
                problems,
                warnings,
                audiences,
                decisions,
            });
        }
    }
    findings
}

/// Prints the findings; returns true when there is no problem.
pub fn run(args: CheckArgs) -> bool {
    let findings = check(&args);
    let mut clean = true;
    for f in &findings {
        let name = if f.spc.is_empty() {
            String::new()
        } else {
            format!(" {}:", f.spc)
        };
        for w in &f.warnings {
            println!("{}:{name} warning: {w}", f.file.display());
        }
        for d in &f.decisions {
            println!("{}:{name} policy: {d}", f.file.display());
        }
        if f.problems.is_empty() {
            let tokens = if f.audiences.is_empty() {
                String::new()
            } else {
                format!(
                    "; needs service-account tokens for audience(s) {} in the CSIDriver's tokenRequests",
                    f.audiences.iter().cloned().collect::<Vec<_>>().join(", ")
                )
            };
            let plural = if f.objects == 1 { "object" } else { "objects" };
            println!(
                "{}:{name} ok ({} {plural}{tokens})",
                f.file.display(),
                f.objects
            );
        } else {
            clean = false;
            for p in &f.problems {
                println!("{}:{name} {p}", f.file.display());
            }
        }
    }
    clean
}
