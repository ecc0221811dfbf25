//! The daemon's flags (each also settable by environment variable) and the
//! values derived from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::backend::file::Scope;

pub const DEFAULT_SOCKET: &str = "/var/run/secrets-store-csi-providers/coffer.sock";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the health endpoints listen, or nowhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthAddr {
    Off,
    On(SocketAddr),
}

fn parse_health_addr(raw: &str) -> Result<HealthAddr, String> {
    if raw.eq_ignore_ascii_case("off") {
        return Ok(HealthAddr::Off);
    }
    if let Ok(addr) = raw.parse() {
        return Ok(HealthAddr::On(addr));
    }
    // `$(POD_IP):8080` with an IPv6 pod IP arrives without brackets.
    raw.rsplit_once(':')
        .and_then(|(ip, port)| {
            Some(SocketAddr::new(
                ip.parse::<std::net::IpAddr>().ok()?,
                port.parse().ok()?,
            ))
        })
        .map(HealthAddr::On)
        .ok_or_else(|| format!("{raw:?} is neither `off` nor an address such as 127.0.0.1:8080"))
}

fn parse_octal_mode(raw: &str) -> Result<u32, String> {
    let digits = raw.strip_prefix("0o").unwrap_or(raw);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!("{raw:?} is not an octal mode such as 0600")),
    }
}

fn parse_duration(raw: &str) -> Result<Duration, String> {
    humantime::parse_duration(raw).map_err(|e| format!("{raw:?}: {e} (write e.g. 100s or 2m)"))
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, env = "COFFER_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
    /// Log level (error, warn, info, debug, trace) or a tracing filter directive.
    #[arg(long, env = "COFFER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Unix socket the driver dials; its directory is created if missing.
    #[arg(long, env = "COFFER_SOCKET", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Permissions of the socket file (octal).
    #[arg(long, env = "COFFER_SOCKET_MODE", default_value = "0600", value_parser = parse_octal_mode)]
    pub socket_mode: u32,
    /// Address of the HTTP /healthz and /readyz endpoints, or `off`.
    #[arg(long, env = "COFFER_HEALTH_ADDR", default_value = "127.0.0.1:8080", value_parser = parse_health_addr)]
    pub health_addr: HealthAddr,
    /// Deadline of one Mount (kubelet gives up after 2 minutes).
    #[arg(long, env = "COFFER_MOUNT_TIMEOUT", default_value = "100s", value_parser = parse_duration)]
    pub mount_timeout: Duration,
    /// How long SIGTERM waits for in-flight Mounts before exiting.
    #[arg(long, env = "COFFER_SHUTDOWN_GRACE", default_value = "25s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,
    /// Largest total size of all files returned by one Mount (the driver's
    /// default gRPC receive limit is 4 MiB).
    #[arg(long, env = "COFFER_MAX_RESPONSE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_response_bytes: u64,
    /// How many objects of one Mount are fetched at once.
    #[arg(long, env = "COFFER_FETCH_CONCURRENCY", default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
    pub fetch_concurrency: u16,
    /// Backend of objects whose SPC names none (default: `file` when the
    /// file backend is on, else `vault`). Must be an enabled backend.
    #[arg(long, env = "COFFER_DEFAULT_BACKEND")]
    pub default_backend: Option<String>,
    /// Key for content-derived object versions; generated (0600) if absent.
    #[arg(
        long,
        env = "COFFER_VERSION_KEY_FILE",
        default_value = "/var/lib/coffer/version.key"
    )]
    pub version_key_file: PathBuf,
    /// Enables the `file` backend, serving objects from this directory.
    #[arg(long, env = "COFFER_FILE_BACKEND_ROOT")]
    pub file_backend_root: Option<PathBuf>,
    /// `namespace` resolves each pod's paths under <root>/<pod namespace>/.
    #[arg(
        long,
        env = "COFFER_FILE_BACKEND_SCOPE",
        value_enum,
        default_value = "none"
    )]
    pub file_backend_scope: Scope,
    /// Refuse files with more than one hard link (for roots tenants can
    /// write to: a hard link can point at any file of the same file system).
    #[arg(long, env = "COFFER_FILE_BACKEND_REFUSE_HARDLINKS")]
    pub file_backend_refuse_hardlinks: bool,
    /// How long a fetched value serves other Mounts with the same
    /// authorization identity (SPC/object `refreshInterval` override it;
    /// 0 disables the cache and call collapsing).
    #[arg(long, env = "COFFER_CACHE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub cache_ttl: Duration,
    /// Memory bound of the cache (values, keys, bookkeeping), LRU-evicted.
    #[arg(long, env = "COFFER_CACHE_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub cache_max_bytes: u64,
    /// When a backend is unreachable, serve cached values up to this old
    /// (SPC `staleIfError` overrides; 0 = off).
    #[arg(long, env = "COFFER_STALE_IF_ERROR", default_value = "0s", value_parser = parse_duration)]
    pub stale_if_error: Duration,
    /// Sustained backend calls per second per backend address (0 = unlimited).
    #[arg(long, env = "COFFER_BACKEND_QPS", default_value_t = 50.0)]
    pub backend_qps: f64,
    /// Backend calls allowed in a burst above the sustained rate.
    #[arg(long, env = "COFFER_BACKEND_BURST", default_value_t = 100)]
    pub backend_burst: u32,
    /// Backend calls in flight at once per backend address.
    #[arg(long, env = "COFFER_BACKEND_MAX_IN_FLIGHT", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub backend_max_in_flight: u32,
    /// Retries of a backend call that failed for want of the backend.
    #[arg(long, env = "COFFER_BACKEND_RETRIES", default_value_t = 3)]
    pub backend_retries: u32,
    /// Audit records (one JSON line per object per Mount): a file path,
    /// `stderr`, or `off`.
    #[arg(long, env = "COFFER_AUDIT_LOG", default_value = "stderr")]
    pub audit_log: crate::audit::Sink,
    /// Fail Mounts when the audit log cannot record them (default: serve and
    /// count the loss).
    #[arg(long, env = "COFFER_AUDIT_FAIL_CLOSED")]
    pub audit_fail_closed: bool,
    /// Threads that serve Mounts; each driver connection is served by one
    /// of them (default: the CPUs this process may use, which respects a
    /// cgroup CPU limit, at most 8).
    #[arg(long, env = "COFFER_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..))]
    pub worker_threads: Option<u16>,
    /// Node policy (YAML): which workloads may reach which backends,
    /// addresses, paths and regions. Reloaded on SIGHUP and on change.
    #[arg(long, env = "COFFER_POLICY")]
    pub policy: Option<PathBuf>,
    /// This node's labels for policy rules (`KEY=VALUE`, repeatable, or a
    /// comma-separated list in the variable).
    #[arg(long = "node-label", env = "COFFER_NODE_LABELS", value_delimiter = ',')]
    pub node_labels: Vec<String>,
    /// Peer uids allowed to call besides root (the driver runs as root).
    #[arg(long, env = "COFFER_ALLOWED_UIDS", value_delimiter = ',')]
    pub allowed_uids: Vec<u32>,
    #[command(flatten)]
    pub vault: VaultArgs,
    #[command(flatten)]
    pub gcp: GcpArgs,
    #[command(flatten)]
    pub aws: AwsArgs,
    #[command(flatten)]
    pub azure: AzureArgs,
    #[command(flatten)]
    pub sops: SopsArgs,
    #[command(flatten)]
    pub log: LogArgs,
}

/// Node-wide settings of the `sops` backend (SOPS documents in the SPC).
#[derive(Debug, Clone, Default, Args)]
pub struct SopsArgs {
    /// Directory of age identities, one file per namespace
    /// (`<dir>/<namespace>.txt`, 0600, owned by coffer's user): a pod's
    /// documents are opened only with its own namespace's identities.
    #[arg(
        id = "sops-age-key-dir",
        long = "sops-age-key-dir",
        env = "COFFER_SOPS_AGE_KEY_DIR"
    )]
    pub age_key_dir: Option<PathBuf>,
    /// Also try `<dir>/_cluster.txt` for every namespace.
    #[arg(
        id = "sops-cluster-key",
        long = "sops-cluster-key",
        env = "COFFER_SOPS_CLUSTER_KEY"
    )]
    pub cluster_key: bool,
}

/// Node-wide settings of the `gcp` backend (Google Secret Manager).
#[derive(Debug, Clone, Args)]
pub struct GcpArgs {
    /// Project for Workload Identity when the SPC sets no `gcpProject`.
    #[arg(long = "gcp-project", env = "COFFER_GCP_PROJECT")]
    pub project: Option<String>,
    /// GKE cluster location, for the default Workload Identity provider.
    #[arg(long = "gcp-cluster-location", env = "COFFER_GCP_CLUSTER_LOCATION")]
    pub cluster_location: Option<String>,
    /// GKE cluster name, for the default Workload Identity provider.
    #[arg(long = "gcp-cluster-name", env = "COFFER_GCP_CLUSTER_NAME")]
    pub cluster_name: Option<String>,
    /// Secret Manager endpoint (regional secrets use
    /// `https://secretmanager.<location>.rep.googleapis.com` unless this is set).
    #[arg(
        long = "gcp-secretmanager-endpoint",
        env = "COFFER_GCP_SECRETMANAGER_ENDPOINT"
    )]
    pub secretmanager_endpoint: Option<String>,
    /// Parameter Manager endpoint (regional parameters use
    /// `https://parametermanager.<location>.rep.googleapis.com` unless this is set).
    #[arg(
        long = "gcp-parametermanager-endpoint",
        env = "COFFER_GCP_PARAMETERMANAGER_ENDPOINT"
    )]
    pub parametermanager_endpoint: Option<String>,
    /// Security Token Service endpoint.
    #[arg(
        long = "gcp-sts-endpoint",
        env = "COFFER_GCP_STS_ENDPOINT",
        default_value = "https://sts.googleapis.com"
    )]
    pub sts_endpoint: String,
    /// IAM Credentials endpoint (service-account impersonation).
    #[arg(
        long = "gcp-iam-credentials-endpoint",
        env = "COFFER_GCP_IAM_CREDENTIALS_ENDPOINT",
        default_value = "https://iamcredentials.googleapis.com"
    )]
    pub iam_credentials_endpoint: String,
    /// Accept service-account keys from nodePublishSecretRef `key.json`.
    #[arg(
        long = "gcp-allow-node-publish-secret",
        env = "COFFER_GCP_ALLOW_NODE_PUBLISH_SECRET"
    )]
    pub allow_node_publish_secret: bool,
    /// Let SPCs choose `auth: provider-adc`, which fetches with the daemon's
    /// own Google identity instead of the pod's (any SPC on the node could
    /// then read whatever that identity can).
    #[arg(long = "gcp-allow-provider-adc", env = "COFFER_GCP_ALLOW_PROVIDER_ADC")]
    pub allow_provider_adc: bool,
}

/// Node-wide settings of the `aws` backend (Secrets Manager, SSM Parameter
/// Store). Endpoints are used for every region when set (VPC endpoints,
/// FIPS, GovCloud, tests).
#[derive(Debug, Clone, Default, Args)]
pub struct AwsArgs {
    /// Region for SPCs that set no `region` (else `AWS_REGION`, else the
    /// `topology.kubernetes.io/region` node label given by --node-label).
    #[arg(id = "aws-region", long = "aws-region", env = "COFFER_AWS_REGION")]
    pub region: Option<String>,
    /// IAM role for IRSA when the SPC sets no `roleArn`, with `{namespace}`
    /// and `{serviceAccount}` filled in from the pod (coffer reads no
    /// service-account annotations).
    #[arg(
        id = "aws-role-arn-template",
        long = "aws-role-arn-template",
        env = "COFFER_AWS_ROLE_ARN_TEMPLATE"
    )]
    pub role_arn_template: Option<String>,
    /// Secrets Manager endpoint URL.
    #[arg(
        id = "aws-secretsmanager-endpoint",
        long = "aws-secretsmanager-endpoint",
        env = "COFFER_AWS_SECRETSMANAGER_ENDPOINT"
    )]
    pub secretsmanager_endpoint: Option<String>,
    /// SSM endpoint URL.
    #[arg(
        id = "aws-ssm-endpoint",
        long = "aws-ssm-endpoint",
        env = "COFFER_AWS_SSM_ENDPOINT"
    )]
    pub ssm_endpoint: Option<String>,
    /// STS endpoint URL (AssumeRoleWithWebIdentity).
    #[arg(
        id = "aws-sts-endpoint",
        long = "aws-sts-endpoint",
        env = "COFFER_AWS_STS_ENDPOINT"
    )]
    pub sts_endpoint: Option<String>,
    /// EKS Pod Identity agent URL (default `http://169.254.170.23/v1/credentials`,
    /// or `http://[fd00:ec2::23]/v1/credentials` by the SPC's `preferredAddressType`).
    #[arg(
        id = "aws-pod-identity-endpoint",
        long = "aws-pod-identity-endpoint",
        env = "COFFER_AWS_POD_IDENTITY_ENDPOINT"
    )]
    pub pod_identity_endpoint: Option<String>,
}

/// Node-wide settings of the `azure` backend (Azure Key Vault).
#[derive(Debug, Clone, Args)]
pub struct AzureArgs {
    /// Entra ID login endpoint (sovereign clouds, tests); default: the
    /// SPC's `cloudName`'s.
    #[arg(
        id = "azure-authority-host",
        long = "azure-authority-host",
        env = "AZURE_AUTHORITY_HOST"
    )]
    pub authority_host: Option<String>,
    /// Key Vault URL in place of `https://<keyvaultName>.<cloud suffix>`;
    /// `{name}` stands for the vault name.
    #[arg(
        id = "azure-keyvault-endpoint",
        long = "azure-keyvault-endpoint",
        env = "COFFER_AZURE_KEYVAULT_ENDPOINT"
    )]
    pub keyvault_endpoint: Option<String>,
    /// Certificate secrets: the key followed by the chain ordered leaf,
    /// intermediates, root (as the Azure provider's flag of the same name).
    #[arg(
        id = "azure-construct-pem-chain",
        long = "azure-construct-pem-chain",
        env = "COFFER_AZURE_CONSTRUCT_PEM_CHAIN",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub construct_pem_chain: bool,
    /// Also write `<alias>.crt` and `<alias>.key` for certificate secrets.
    #[arg(
        id = "azure-write-cert-and-key-in-separate-files",
        long = "azure-write-cert-and-key-in-separate-files",
        env = "COFFER_AZURE_WRITE_CERT_AND_KEY_IN_SEPARATE_FILES"
    )]
    pub write_cert_and_key_in_separate_files: bool,
}

impl Default for AzureArgs {
    fn default() -> Self {
        Self {
            authority_host: None,
            keyvault_endpoint: None,
            construct_pem_chain: true,
            write_cert_and_key_in_separate_files: false,
        }
    }
}

impl Default for GcpArgs {
    fn default() -> Self {
        Self {
            project: None,
            cluster_location: None,
            cluster_name: None,
            secretmanager_endpoint: None,
            parametermanager_endpoint: None,
            sts_endpoint: "https://sts.googleapis.com".into(),
            iam_credentials_endpoint: "https://iamcredentials.googleapis.com".into(),
            allow_node_publish_secret: false,
            allow_provider_adc: false,
        }
    }
}

/// Parses only the `serve` flags (for embedding the server: the demo, tests,
/// benchmarks), so every default lives in one place.
#[derive(clap::Parser)]
struct ServeOnly {
    #[command(flatten)]
    serve: ServeArgs,
}

impl ServeArgs {
    /// Checks the values that clap's types cannot: each error names the
    /// flag and says why, so a daemon that would fail every Mount never
    /// starts.
    pub fn validate(&self) -> Result<(), String> {
        let url = |flag: &str, value: &str| -> Result<(), String> {
            match url::Url::parse(value) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some() => Ok(()),
                _ => Err(format!(
                    "{flag} {}: not an http:// or https:// URL",
                    crate::error::shown(value)
                )),
            }
        };
        if let Some(a) = &self.vault.address {
            url("--vault-addr", a)?;
        }
        for (flag, value) in [
            (
                "--gcp-secretmanager-endpoint",
                &self.gcp.secretmanager_endpoint,
            ),
            (
                "--gcp-parametermanager-endpoint",
                &self.gcp.parametermanager_endpoint,
            ),
        ] {
            if let Some(v) = value {
                url(flag, v)?;
            }
        }
        url("--gcp-sts-endpoint", &self.gcp.sts_endpoint)?;
        for (flag, value) in [
            (
                "--aws-secretsmanager-endpoint",
                &self.aws.secretsmanager_endpoint,
            ),
            ("--aws-ssm-endpoint", &self.aws.ssm_endpoint),
            ("--aws-sts-endpoint", &self.aws.sts_endpoint),
            (
                "--aws-pod-identity-endpoint",
                &self.aws.pod_identity_endpoint,
            ),
        ] {
            if let Some(v) = value {
                url(flag, v)?;
            }
        }
        for (flag, value) in [
            ("--azure-authority-host", &self.azure.authority_host),
            (
                "--azure-keyvault-endpoint",
                &self
                    .azure
                    .keyvault_endpoint
                    .as_ref()
                    .map(|u| u.replace("{name}", "vault")),
            ),
        ] {
            if let Some(v) = value {
                url(flag, v)?;
            }
        }
        if let Some(r) = &self.aws.region {
            if !crate::backend::aws::params::valid_region(r) {
                return Err(format!(
                    "--aws-region {}: not an AWS region name such as us-east-1",
                    crate::error::shown(r)
                ));
            }
        }
        if let Some(t) = &self.aws.role_arn_template {
            crate::backend::aws::params::check_role_template(t)
                .map_err(|e| format!("--aws-role-arn-template: {e}"))?;
        }
        url(
            "--gcp-iam-credentials-endpoint",
            &self.gcp.iam_credentials_endpoint,
        )?;
        if !self.vault.tls_dir.is_absolute() {
            return Err(format!(
                "--vault-tls-dir {}: must be an absolute path",
                self.vault.tls_dir.display()
            ));
        }
        if !self.backend_qps.is_finite() || self.backend_qps < 0.0 {
            return Err(format!(
                "--backend-qps {}: must be a number of calls per second, 0 or more",
                self.backend_qps
            ));
        }
        if self.max_response_bytes == 0 {
            return Err("--max-response-bytes 0: no Mount could return anything".into());
        }
        if self.mount_timeout.is_zero() {
            return Err("--mount-timeout 0s: every Mount would time out".into());
        }
        if self.vault.request_timeout.is_zero() {
            return Err("--vault-request-timeout 0s: every backend call would time out".into());
        }
        if let Some(dir) = &self.sops.age_key_dir {
            if !dir.is_dir() {
                return Err(format!(
                    "--sops-age-key-dir {}: not a directory",
                    dir.display()
                ));
            }
        }
        if self.sops.cluster_key && self.sops.age_key_dir.is_none() {
            return Err(
                "--sops-cluster-key needs --sops-age-key-dir (where _cluster.txt is)".into(),
            );
        }
        if let Some(root) = &self.file_backend_root {
            if !root.is_dir() {
                return Err(format!(
                    "--file-backend-root {}: not a directory",
                    root.display()
                ));
            }
        }
        for (flag, name) in [
            ("--gcp-project", &self.gcp.project),
            ("--gcp-cluster-location", &self.gcp.cluster_location),
            ("--gcp-cluster-name", &self.gcp.cluster_name),
        ] {
            if let Some(v) = name {
                if v.trim().is_empty() || v.contains(['/', ' ', '\n']) {
                    return Err(format!(
                        "{flag} {}: not a Google name",
                        crate::error::shown(v)
                    ));
                }
            }
        }
        Ok(())
    }

    /// The backend of objects whose SPC names none.
    pub fn default_backend(&self) -> String {
        match &self.default_backend {
            Some(b) => b.clone(),
            None if self.file_backend_root.is_some() => "file".into(),
            None => "vault".into(),
        }
    }

    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsString::from("coffer"))
            .chain(args.into_iter().map(Into::into));
        ServeOnly::try_parse_from(argv).map(|s| s.serve)
    }
}

fn parse_fraction(raw: &str) -> Result<f64, String> {
    match raw.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{raw:?} is not a fraction in (0, 1], such as 0.67")),
    }
}

/// Node-wide defaults of the `vault` backend; SPC parameters win over them.
/// The environment names are Vault's own, so an existing set-up carries over.
#[derive(Debug, Clone, Args)]
pub struct VaultArgs {
    /// Vault address used when the SPC sets no `vaultAddress`.
    #[arg(long = "vault-addr", env = "VAULT_ADDR")]
    pub address: Option<String>,
    /// Vault namespace used when the SPC sets no `vaultNamespace`.
    #[arg(long = "vault-namespace", env = "VAULT_NAMESPACE")]
    pub namespace: Option<String>,
    /// CA bundle (PEM) trusted for Vault's TLS certificate.
    #[arg(long = "vault-cacert", env = "VAULT_CACERT")]
    pub ca_cert: Option<PathBuf>,
    /// Directory of CA certificates (PEM) trusted for Vault's TLS certificate.
    #[arg(long = "vault-capath", env = "VAULT_CAPATH")]
    pub ca_path: Option<PathBuf>,
    /// Name to verify Vault's certificate against (and send as SNI).
    #[arg(long = "vault-tls-server-name", env = "VAULT_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
    /// The directory SPCs may name TLS files in (vaultCACertPath,
    /// vaultCADirectory, vaultTLSClientCertPath/KeyPath are resolved beneath
    /// it; other paths are refused). The daemon's own --vault-* flags are not
    /// limited to it.
    #[arg(
        long = "vault-tls-dir",
        env = "COFFER_VAULT_TLS_DIR",
        default_value = "/etc/coffer/tls"
    )]
    pub tls_dir: PathBuf,
    /// Client certificate (PEM) presented to Vault.
    #[arg(long = "vault-client-cert", env = "VAULT_CLIENT_CERT")]
    pub client_cert: Option<PathBuf>,
    /// Key (PEM) of the client certificate.
    #[arg(long = "vault-client-key", env = "VAULT_CLIENT_KEY")]
    pub client_key: Option<PathBuf>,
    /// Skip verifying Vault's certificate (insecure; warned on every use).
    #[arg(long = "vault-skip-verify", env = "VAULT_SKIP_VERIFY", num_args = 0..=1, default_missing_value = "true", default_value = "false", action = clap::ArgAction::Set)]
    pub skip_verify: bool,
    /// Auth mount used when the SPC names none.
    #[arg(
        long = "vault-auth-mount",
        env = "COFFER_VAULT_AUTH_MOUNT",
        default_value = "kubernetes"
    )]
    pub auth_mount: String,
    /// Service-account token audience used when the SPC sets no `audience`.
    #[arg(
        long = "vault-audience",
        env = "COFFER_VAULT_AUDIENCE",
        default_value = "vault"
    )]
    pub audience: String,
    /// Re-issue a leased secret once this fraction of its lifetime is spent.
    #[arg(long = "vault-lease-renew-fraction", env = "COFFER_VAULT_LEASE_RENEW_FRACTION", default_value = "0.67", value_parser = parse_fraction)]
    pub lease_fraction: f64,
    /// Timeout of one HTTP request to Vault.
    #[arg(long = "vault-request-timeout", env = "COFFER_VAULT_REQUEST_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl Default for VaultArgs {
    fn default() -> Self {
        Self {
            address: None,
            namespace: None,
            ca_cert: None,
            ca_path: None,
            tls_server_name: None,
            tls_dir: PathBuf::from("/etc/coffer/tls"),
            client_cert: None,
            client_key: None,
            skip_verify: false,
            auth_mount: "kubernetes".into(),
            audience: "vault".into(),
            lease_fraction: 0.67,
            request_timeout: Duration::from_secs(30),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_parsers() {
        assert_eq!(parse_health_addr("off").unwrap(), HealthAddr::Off);
        assert!(matches!(
            parse_health_addr("127.0.0.1:0").unwrap(),
            HealthAddr::On(_)
        ));
        assert!(parse_health_addr("localhost").is_err());
        assert_eq!(
            parse_health_addr("fd00::1:8080").unwrap(),
            HealthAddr::On("[fd00::1]:8080".parse().unwrap())
        );
        assert!(parse_health_addr(":8080").is_err());
        assert_eq!(parse_octal_mode("0600").unwrap(), 0o600);
        assert_eq!(parse_octal_mode("660").unwrap(), 0o660);
        assert!(parse_octal_mode("0999").is_err());
        assert_eq!(parse_duration("100s").unwrap(), Duration::from_secs(100));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn serve_flags_are_validated() {
        let ok = ServeArgs::from_args(["--vault-addr", "https://vault:8200"]).unwrap();
        assert!(ok.validate().is_ok());
        for (args, flag) in [
            (vec!["--vault-addr", "vault:8200"], "--vault-addr"),
            (vec!["--gcp-sts-endpoint", "sts"], "--gcp-sts-endpoint"),
            (vec!["--vault-tls-dir", "tls"], "--vault-tls-dir"),
            (vec!["--backend-qps", "NaN"], "--backend-qps"),
            (vec!["--max-response-bytes", "0"], "--max-response-bytes"),
            (
                vec!["--file-backend-root", "/nonexistent/dir"],
                "--file-backend-root",
            ),
            (vec!["--gcp-project", "a b"], "--gcp-project"),
        ] {
            let e = ServeArgs::from_args(args).unwrap().validate().unwrap_err();
            assert!(e.starts_with(flag), "{e}");
        }
    }
}
