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
    /// The daemon's --vault-addr, if SPCs rely on it.
    #[arg(long = "vault-addr", env = "VAULT_ADDR")]
    pub vault_addr: Option<String>,
    /// The daemon's --vault-tls-dir (TLS files SPCs name must be below it).
    #[arg(
        long = "vault-tls-dir",
        env = "COFFER_VAULT_TLS_DIR",
        default_value = "/etc/coffer/tls"
    )]
    pub vault_tls_dir: PathBuf,
    /// The daemon allows `auth: provider-adc` (--gcp-allow-provider-adc).
    #[arg(long = "gcp-allow-provider-adc", env = "COFFER_GCP_ALLOW_PROVIDER_ADC")]
    pub gcp_allow_provider_adc: bool,
    /// The daemon's --gcp-project, if SPCs rely on it.
    #[arg(long = "gcp-project", env = "COFFER_GCP_PROJECT")]
    pub gcp_project: Option<String>,
}

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
}

fn registry(args: &CheckArgs) -> Registry {
    let mut r = Registry::new();
    r.register(Arc::new(FileBackend::new("/".into(), Scope::None)));
    r.register(Arc::new(VaultBackend::new(VaultArgs {
        // Only the parameters are judged: a placeholder stands in for the
        // daemon's default address when none is given.
        address: Some(
            args.vault_addr
                .clone()
                .unwrap_or_else(|| "https://vault.invalid:8200".into()),
        ),
        tls_dir: args.vault_tls_dir.clone(),
        ..VaultArgs::default()
    })));
    r.register(Arc::new(GcpBackend::new(
        GcpArgs {
            project: Some(
                args.gcp_project
                    .clone()
                    .unwrap_or_else(|| "placeholder-project".into()),
            ),
            cluster_location: Some("placeholder".into()),
            cluster_name: Some("placeholder".into()),
            allow_node_publish_secret: true,
            allow_provider_adc: args.gcp_allow_provider_adc,
            ..GcpArgs::default()
        },
        std::time::Duration::from_secs(30),
    )));
    r
}

/// The context Mount would see for a pod using `spc`, with a placeholder
/// token for the audiences it names (tokens come from the driver at run time).
fn context(spc: &SecretProviderClass) -> Result<MountContext, String> {
    let mut tokens = BTreeMap::new();
    let project = spc
        .parameters
        .get("gcpProject")
        .cloned()
        .unwrap_or_else(|| "placeholder-project".into());
    let audiences = [
        spc.parameters.get("audience").cloned(),
        Some("vault".to_string()),
        Some(format!("{project}.svc.id.goog")),
    ];
    for audience in audiences.into_iter().flatten() {
        tokens.insert(audience, Credential::new("placeholder".into()));
    }
    let req = DriverRequest {
        pod: Pod {
            namespace: spc.namespace.clone().unwrap_or_else(|| "default".into()),
            name: "check".into(),
            uid: "check".into(),
            service_account: "default".into(),
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
    let mut findings = Vec::new();
    for file in &args.files {
        let spcs = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|text| SecretProviderClass::all_from_yaml(&text).map_err(|e| e.to_string()));
        let spcs = match spcs {
            Ok(s) => s,
            Err(problem) => {
                findings.push(Finding {
                    file: file.clone(),
                    spc: String::new(),
                    objects: 0,
                    problems: vec![problem],
                    warnings: Vec::new(),
                    audiences: Default::default(),
                });
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
            match context(&spc_doc) {
                Err(e) => problems.push(e),
                Ok(ctx) => {
                    let show = |f: &Failure| f.to_string();
                    problems.extend(check_parameters(&ctx).iter().map(show));
                    let (list, failures) =
                        spc::parse_objects_partial(&ctx.parameters, &args.default_backend);
                    objects = list.len() + failures.len();
                    problems.extend(failures.iter().map(show));
                    problems.extend(check_objects(&registry, &list, &ctx).iter().map(show));
                    warnings.extend(object_warnings(&registry, &list).into_iter().map(
                        |(object, w)| format!("object {}: {w}", crate::error::shown(&object)),
                    ));
                    for object in &list {
                        if let Ok(backend) = registry.get(&object.backend) {
                            audiences.extend(backend.token_audience(object, &ctx));
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
            format!(" {}", f.spc)
        };
        for w in &f.warnings {
            println!("{}:{name}: warning: {w}", f.file.display());
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
            println!(
                "{}:{name}: ok ({} objects{tokens})",
                f.file.display(),
                f.objects
            );
        } else {
            clean = false;
            for p in &f.problems {
                println!("{}:{name}: {p}", f.file.display());
            }
        }
    }
    clean
}
