//! `coffer mount`: plays the driver. Builds the MountRequest the driver would
//! build for a pod, calls the daemon, and writes the files with the driver's
//! atomic-writer layout. `--watch` repeats it like rotation does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;

use crate::atomic_writer::{self, WriteOutcome};
use crate::client::{self, ProviderClient};
use crate::config::DEFAULT_SOCKET;
use crate::manifest::{DriverRequest, ManifestError, Pod, SecretProviderClass};
use crate::proto;
use crate::secret::Credential;

#[derive(Debug, Clone, Args)]
pub struct MountArgs {
    /// SecretProviderClass manifest (YAML; the first SecretProviderClass in it is used).
    pub spc: PathBuf,
    /// The daemon's socket.
    #[arg(long, env = "COFFER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Directory to write the volume into (created if missing).
    #[arg(long)]
    pub target: PathBuf,
    /// Namespace of the pod the volume belongs to.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Name of the pod.
    #[arg(long, default_value = "coffer-cli")]
    pub pod_name: String,
    /// UID of the pod.
    #[arg(long, default_value = "00000000-0000-0000-0000-000000000000")]
    pub pod_uid: String,
    /// Service account the pod runs as.
    #[arg(long, default_value = "default")]
    pub service_account: String,
    /// A service-account token for an audience, read from FILE (repeatable).
    #[arg(long = "token", value_name = "AUDIENCE=FILE")]
    pub tokens: Vec<String>,
    /// A nodePublishSecretRef entry, its value read from FILE (repeatable).
    #[arg(long = "node-publish-secret", value_name = "KEY=FILE")]
    pub node_publish_secrets: Vec<String>,
    /// A pod volumeAttribute, overriding the SPC parameter of that name (repeatable).
    #[arg(long = "attribute", value_name = "KEY=VALUE")]
    pub attributes: Vec<String>,
    /// Default file mode (octal), sent as the driver sends it.
    #[arg(long, default_value = "0644", value_parser = parse_mode)]
    pub permission: u32,
    /// Repeat the Mount every SECONDS, as rotation does, and report changes.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
    /// Give up on one Mount after this long (kubelet's limit is 2 minutes).
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

fn parse_mode(raw: &str) -> Result<u32, String> {
    match u32::from_str_radix(raw.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{raw:?} is not an octal mode such as 0644")),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("{0}")]
    Connect(String),
    #[error("mount failed: {code:?}: {message}")]
    Mount { code: tonic::Code, message: String },
    #[error("mount timed out after {0:?}")]
    Timeout(Duration),
    #[error("the provider returned no object versions (the driver fails such a mount)")]
    NoVersions,
    #[error("writing the volume: {0}")]
    Write(#[from] atomic_writer::WriteError),
}

fn split_pair<'a>(raw: &'a str, flag: &str, what: &str) -> Result<(&'a str, &'a str), CliError> {
    raw.split_once('=')
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .ok_or_else(|| CliError::Usage(format!("--{flag} {raw:?}: expected {what}")))
}

fn read_credential(path: &Path) -> Result<Credential, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(Credential::new(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

impl MountArgs {
    /// The SPC and driver-side request this invocation describes.
    pub fn request(&self) -> Result<(SecretProviderClass, DriverRequest), CliError> {
        let text = std::fs::read_to_string(&self.spc).map_err(|source| CliError::Read {
            path: self.spc.clone(),
            source,
        })?;
        let spc = SecretProviderClass::from_yaml(&text).map_err(|source| CliError::Manifest {
            path: self.spc.clone(),
            source,
        })?;
        let mut tokens = BTreeMap::new();
        for raw in &self.tokens {
            let (aud, file) = split_pair(raw, "token", "AUDIENCE=FILE")?;
            tokens.insert(aud.to_string(), read_credential(Path::new(file))?);
        }
        let node_publish_secrets = if self.node_publish_secrets.is_empty() {
            None
        } else {
            let mut map = BTreeMap::new();
            for raw in &self.node_publish_secrets {
                let (key, file) = split_pair(raw, "node-publish-secret", "KEY=FILE")?;
                map.insert(key.to_string(), read_credential(Path::new(file))?);
            }
            Some(map)
        };
        let mut volume_attributes = BTreeMap::new();
        for raw in &self.attributes {
            let (k, v) = raw
                .split_once('=')
                .filter(|(k, _)| !k.is_empty())
                .ok_or_else(|| {
                    CliError::Usage(format!("--attribute {raw:?}: expected KEY=VALUE"))
                })?;
            volume_attributes.insert(k.to_string(), v.to_string());
        }
        let target = std::path::absolute(&self.target).unwrap_or_else(|_| self.target.clone());
        let request = DriverRequest {
            pod: Pod {
                namespace: self.namespace.clone(),
                name: self.pod_name.clone(),
                uid: self.pod_uid.clone(),
                service_account: self.service_account.clone(),
            },
            tokens,
            node_publish_secrets,
            volume_attributes,
            permission: self.permission,
            target_path: target.to_string_lossy().into_owned(),
        };
        Ok((spc, request))
    }
}

/// The result of one Mount written to disk.
#[derive(Debug, Clone)]
pub struct MountReport {
    pub versions: Vec<proto::ObjectVersion>,
    pub outcome: WriteOutcome,
}

/// Calls Mount once and writes the answer into `target` as the driver does.
pub async fn mount_once(
    client: &mut ProviderClient,
    request: proto::MountRequest,
    target: &Path,
    timeout: Duration,
) -> Result<MountReport, CliError> {
    let response = tokio::time::timeout(timeout, client.mount(request))
        .await
        .map_err(|_| CliError::Timeout(timeout))?
        .map_err(|status| CliError::Mount {
            code: status.code(),
            message: status.message().to_string(),
        })?
        .into_inner();
    if let Some(err) = response.error.as_ref().filter(|e| !e.code.is_empty()) {
        return Err(CliError::Mount {
            code: tonic::Code::Unknown,
            message: format!("provider error code {}", err.code),
        });
    }
    if response.object_version.is_empty() {
        return Err(CliError::NoVersions);
    }
    let target = target.to_path_buf();
    let files = response.files;
    let outcome = tokio::task::spawn_blocking(move || atomic_writer::write(&target, &files))
        .await
        .map_err(|e| CliError::Usage(format!("writer task failed: {e}")))??;
    Ok(MountReport {
        versions: response.object_version,
        outcome,
    })
}

/// Prints a report in the CLI's format.
pub fn print_report(
    target: &Path,
    report: &MountReport,
    previous: Option<&[proto::ObjectVersion]>,
) {
    match &report.outcome {
        WriteOutcome::Unchanged => println!(
            "unchanged: {} objects, nothing written to {}",
            report.versions.len(),
            target.display()
        ),
        WriteOutcome::Written { data_dir, previous } => {
            print!(
                "mounted {} objects into {} (..data -> {data_dir}",
                report.versions.len(),
                target.display()
            );
            match previous {
                Some(p) => println!(", replaced {p})"),
                None => println!(")"),
            }
        }
    }
    let before: BTreeMap<&str, &str> = previous
        .unwrap_or_default()
        .iter()
        .map(|v| (v.id.as_str(), v.version.as_str()))
        .collect();
    for v in &report.versions {
        let note = match before.get(v.id.as_str()) {
            None if previous.is_some() => "  (new)",
            Some(old) if *old != v.version => "  (changed)",
            _ => "",
        };
        println!("  {:<32} {}{note}", v.id, v.version);
    }
}

pub async fn run(args: MountArgs) -> Result<(), CliError> {
    let (spc, driver) = args.request()?;
    let mut client = client::connect(&args.socket)
        .await
        .map_err(|e| CliError::Connect(client::explain_connect_error(&args.socket, &e)))?;
    let mut previous: Option<Vec<proto::ObjectVersion>> = None;
    loop {
        let result = mount_once(
            &mut client,
            driver.to_proto(&spc),
            &args.target,
            args.timeout,
        )
        .await;
        match (&result, args.watch) {
            (Ok(report), _) => {
                print_report(&args.target, report, previous.as_deref());
                previous = Some(report.versions.clone());
            }
            // Like the driver during rotation: keep the old files, try again.
            (Err(e), Some(_)) if previous.is_some() => {
                eprintln!("rotation failed, keeping the previous files: {e}")
            }
            (Err(_), _) => return result.map(|_| ()),
        }
        let Some(seconds) = args.watch else {
            return Ok(());
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}
