//! HTTP to Vault: one `reqwest` client (rustls) per distinct TLS set-up,
//! reused across Mounts, and one request function that maps Vault's answers
//! to `ObjectError`s without ever including a token or a secret value.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value as Json;
use zeroize::Zeroizing;

use super::params::{Tls, TlsPath};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::ObjectError;
use crate::key::KeyBuilder;
use crate::nodefs::{self, NodeFileError};
use crate::secret::Credential;

/// A ready client plus the base URL to use with it (the host is replaced by
/// the TLS server name when one is set, and resolved to Vault's address).
#[derive(Clone)]
pub struct Endpoint {
    pub client: reqwest::Client,
    pub base: String,
    /// The address as configured, for messages.
    pub address: String,
}

/// Largest TLS file read (certificate bundles are tens of KB).
const MAX_TLS_FILE: u64 = 1024 * 1024;
/// Files looked at in a CA directory, and their bytes in all.
const MAX_CA_DIR_FILES: usize = 256;
const MAX_CA_DIR_BYTES: u64 = 4 * 1024 * 1024;
/// How often a cached client's TLS files are checked for rotation.
const RECHECK: Duration = Duration::from_secs(30);
/// Clients kept: one per (address, TLS set-up) in use. Each holds a TLS
/// configuration and a connection pool (~100 KB), so an SPC inventing
/// addresses must not add one forever.
const CLIENTS: Bounds = Bounds {
    max_entries: 64,
    max_weight: 0,
    idle: Duration::from_secs(600),
};

/// A cached client and the state of the TLS files it was built from.
#[derive(Clone)]
struct Built {
    endpoint: Endpoint,
    stamps: Arc<Vec<Option<SystemTime>>>,
    checked: Instant,
}

pub struct Clients {
    timeout: Duration,
    tls_dir: PathBuf,
    cache: BoundedMap<Built>,
}

/// What the TLS files hold, read off the async workers.
struct Material {
    roots: Vec<reqwest::Certificate>,
    /// Client certificate and key, PEM, zeroized when dropped.
    identity: Option<Zeroizing<Vec<u8>>>,
}

/// Reads a TLS file: the operator's where it points, an SPC's beneath the
/// TLS directory; regular files only, bounded.
fn read_tls(tls_dir: &Path, path: &TlsPath) -> Result<Vec<u8>, ObjectError> {
    let result = match path {
        TlsPath::Operator(p) => nodefs::read_operator_file(p, MAX_TLS_FILE),
        TlsPath::Spc { relative, .. } => nodefs::open_dir(tls_dir)
            .and_then(|dir| nodefs::read_beneath(&dir, relative, MAX_TLS_FILE)),
    };
    result.map_err(|e| tls_error(tls_dir, path, &e))
}

fn tls_error(tls_dir: &Path, path: &TlsPath, e: &NodeFileError) -> ObjectError {
    ObjectError::FailedPrecondition(format!("cannot use {}: it {e}", path.describe(tls_dir)))
}

/// The certificates of a CA directory (files that hold none are skipped,
/// like Vault's own client).
fn read_ca_dir(tls_dir: &Path, path: &TlsPath) -> Result<Vec<reqwest::Certificate>, ObjectError> {
    let dir = match path {
        TlsPath::Operator(p) => nodefs::open_dir(p),
        TlsPath::Spc { relative, .. } => {
            nodefs::open_dir(tls_dir).and_then(|base| nodefs::open_dir_beneath(&base, relative))
        }
    }
    .map_err(|e| tls_error(tls_dir, path, &e))?;
    let names =
        nodefs::list_dir(&dir, MAX_CA_DIR_FILES).map_err(|e| tls_error(tls_dir, path, &e))?;
    let mut roots = Vec::new();
    let mut total = 0u64;
    for name in names {
        let Ok(pem) = nodefs::read_beneath(&dir, &name, MAX_TLS_FILE) else {
            continue; // not a regular file, unreadable: skipped
        };
        total += pem.len() as u64;
        if total > MAX_CA_DIR_BYTES {
            return Err(ObjectError::FailedPrecondition(format!(
                "{} holds more than {MAX_CA_DIR_BYTES} bytes of certificates",
                path.describe(tls_dir)
            )));
        }
        if let Ok(certs) = reqwest::Certificate::from_pem_bundle(&pem) {
            roots.extend(certs);
        }
    }
    Ok(roots)
}

fn load_material(tls_dir: &Path, tls: &Tls) -> Result<Material, ObjectError> {
    let mut roots = Vec::new();
    if let Some(path) = &tls.ca_cert {
        roots.extend(parse_certs(
            &read_tls(tls_dir, path)?,
            &path.describe(tls_dir),
        )?);
    }
    if let Some(path) = &tls.ca_dir {
        roots.extend(read_ca_dir(tls_dir, path)?);
    }
    let identity = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let mut pem = Zeroizing::new(read_tls(tls_dir, cert)?);
            pem.push(b'\n');
            let key_pem = Zeroizing::new(read_tls(tls_dir, key)?);
            pem.extend_from_slice(&key_pem);
            Some(pem)
        }
        _ => None,
    };
    Ok(Material { roots, identity })
}

/// Modification times of the TLS files, so a rotated CA or client
/// certificate is picked up without a restart.
fn stamps(tls_dir: &Path, tls: &Tls) -> Vec<Option<SystemTime>> {
    let stamp = |path: &Option<TlsPath>| -> Option<SystemTime> {
        let file = match path.as_ref()? {
            TlsPath::Operator(p) => std::fs::File::open(p).ok()?,
            TlsPath::Spc { relative, .. } => {
                let dir = nodefs::open_dir(tls_dir).ok()?;
                nodefs::open_beneath(&dir, relative).ok()?
            }
        };
        file.metadata().ok()?.modified().ok()
    };
    [&tls.ca_cert, &tls.ca_dir, &tls.client_cert, &tls.client_key]
        .into_iter()
        .map(stamp)
        .collect()
}

fn has_files(tls: &Tls) -> bool {
    tls.ca_cert.is_some() || tls.ca_dir.is_some() || tls.client_cert.is_some()
}

impl Clients {
    pub fn new(timeout: Duration, tls_dir: PathBuf) -> Self {
        Self {
            timeout,
            tls_dir,
            cache: BoundedMap::new(CLIENTS),
        }
    }

    /// Clients kept (for tests).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// TLS file work on the blocking pool: files may sit on slow storage.
    async fn blocking<T: Send + 'static>(
        &self,
        tls: &Tls,
        job: impl FnOnce(&Path, &Tls) -> T + Send + 'static,
    ) -> Result<T, ObjectError> {
        let (dir, tls) = (self.tls_dir.clone(), tls.clone());
        tokio::task::spawn_blocking(move || job(&dir, &tls))
            .await
            .map_err(|_| ObjectError::Internal("reading TLS files failed".into()))
    }

    pub async fn get(&self, address: &str, tls: &Tls) -> Result<Endpoint, ObjectError> {
        let key = tls
            .key_fields(KeyBuilder::new("vault-client").field(address))
            .finish();
        let cached = self.cache.get(&key);
        if let Some(built) = &cached {
            if !has_files(tls) || built.checked.elapsed() < RECHECK {
                return Ok(built.endpoint.clone());
            }
        }
        let now_stamps = if has_files(tls) {
            self.blocking(tls, stamps).await?
        } else {
            Vec::new()
        };
        if let Some(built) = cached {
            if *built.stamps == now_stamps {
                self.cache.insert(
                    key,
                    Built {
                        checked: Instant::now(),
                        ..built.clone()
                    },
                );
                return Ok(built.endpoint);
            }
        }
        let endpoint = self.build(address, tls).await?;
        self.cache.insert(
            key,
            Built {
                endpoint: endpoint.clone(),
                stamps: Arc::new(now_stamps),
                checked: Instant::now(),
            },
        );
        Ok(endpoint)
    }

    async fn build(&self, address: &str, tls: &Tls) -> Result<Endpoint, ObjectError> {
        let mut url = url::Url::parse(address).map_err(|_| {
            ObjectError::Invalid(format!(
                "vaultAddress {} is not a URL",
                crate::error::shown(address)
            ))
        })?;
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(5).min(self.timeout))
            .pool_idle_timeout(Duration::from_secs(90))
            .no_proxy();
        if url.scheme() == "https" {
            let material = if has_files(tls) {
                self.blocking(tls, load_material).await??
            } else {
                Material {
                    roots: Vec::new(),
                    identity: None,
                }
            };
            if !material.roots.is_empty() {
                builder = builder.tls_certs_only(material.roots);
            }
            if let Some(pem) = &material.identity {
                let identity = reqwest::Identity::from_pem(pem).map_err(|_| {
                    ObjectError::FailedPrecondition(
                        "the Vault client certificate and key are not a PEM certificate and key"
                            .into(),
                    )
                })?;
                builder = builder.identity(identity);
            }
            if tls.skip_verify {
                builder = builder.tls_danger_accept_invalid_certs(true);
            }
            if let Some(name) = &tls.server_name {
                // Verify (and send SNI for) `name` while connecting to the
                // configured host: resolve `name` to that host's addresses.
                let host = url.host_str().unwrap_or_default().to_string();
                let port = url.port_or_known_default().unwrap_or(443);
                let addrs: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host((host.as_str(), port))
                        .await
                        .map_err(|e| {
                            ObjectError::Unavailable(format!(
                                "cannot resolve Vault host {}: {e}",
                                crate::error::shown(&host)
                            ))
                        })?
                        .collect();
                builder = builder.resolve_to_addrs(name, &addrs);
                url.set_host(Some(name)).map_err(|_| {
                    ObjectError::Invalid(format!(
                        "vaultTLSServerName {} is not a host name",
                        crate::error::shown(name)
                    ))
                })?;
            }
        }
        let client = builder.build().map_err(|e| {
            ObjectError::FailedPrecondition(format!("cannot set up the Vault client: {e}"))
        })?;
        Ok(Endpoint {
            client,
            base: url.as_str().trim_end_matches('/').to_string(),
            address: address.to_string(),
        })
    }
}

fn parse_certs(pem: &[u8], shown: &str) -> Result<Vec<reqwest::Certificate>, ObjectError> {
    reqwest::Certificate::from_pem_bundle(pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| ObjectError::FailedPrecondition(format!("{shown} holds no PEM certificate")))
}

/// A failed HTTP exchange, kept apart from `ObjectError` so the caller can
/// tell a 403 (re-login once) from everything else.
#[derive(Debug)]
pub enum Failure {
    Status {
        code: u16,
        errors: String,
        retry_after: Option<Duration>,
    },
    Transport(String),
    /// The answer was larger than allowed.
    TooLarge(u64),
}

impl Failure {
    /// Maps a failure of a request to `what` (a path, never a value).
    pub fn into_object_error(self, address: &str, what: &str) -> ObjectError {
        match self {
            Failure::Transport(e) => {
                ObjectError::Unavailable(format!("cannot reach Vault at {address}: {e}"))
            }
            Failure::TooLarge(limit) => ObjectError::TooLarge {
                size: limit.saturating_add(1),
                limit,
            },
            Failure::Status {
                code,
                errors,
                retry_after,
            } => {
                let said = if errors.is_empty() {
                    String::new()
                } else {
                    format!(": {errors}")
                };
                match code {
                    400 => ObjectError::Invalid(format!("Vault rejected {what} (400){said}")),
                    401 | 403 => {
                        ObjectError::PermissionDenied(format!("Vault denied {what} ({code}){said}"))
                    }
                    404 => {
                        ObjectError::NotFound(format!("Vault has nothing at {what} (404){said}"))
                    }
                    429 => ObjectError::Throttled {
                        message: format!("Vault rate-limited {what} (429){said}"),
                        retry_after,
                    },
                    500..=599 | 412 => {
                        ObjectError::Unavailable(format!("Vault failed on {what} ({code}){said}"))
                    }
                    _ => ObjectError::Internal(format!("Vault answered {what} with {code}{said}")),
                }
            }
        }
    }
}

/// Describes a transport error without the URL's query (it carries nothing
/// secret here, but stays short) and with the cause chain.
fn transport(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_string()
    } else {
        format!("{kind} ({cause})")
    }
}

/// Vault's `{"errors": [...]}`, shortened; never the request.
fn errors_of(body: &[u8]) -> String {
    let joined = serde_json::from_slice::<Json>(body)
        .ok()
        .and_then(|v| v.get("errors").cloned())
        .and_then(|e| e.as_array().cloned())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(str::to_string))
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    let mut short: String = joined.chars().take(300).collect();
    if short.len() < joined.len() {
        short.push('…');
    }
    short
}

pub struct Request<'a> {
    pub method: reqwest::Method,
    pub path: &'a str,
    pub query: &'a [(String, String)],
    pub body: Option<&'a Json>,
    pub namespace: Option<&'a str>,
}

/// Sends one request; returns the raw body of a 2xx answer, refusing to
/// read more than `max_body` bytes of it (a lying server cannot balloon us).
pub async fn send(
    endpoint: &Endpoint,
    req: &Request<'_>,
    token: Option<&Credential>,
    max_body: u64,
) -> Result<Vec<u8>, Failure> {
    let mut url = url::Url::parse(&format!("{}{}", endpoint.base, req.path)).map_err(|_| {
        Failure::Transport(format!(
            "{} is not a valid request path",
            crate::error::shown(req.path)
        ))
    })?;
    if !req.query.is_empty() {
        url.query_pairs_mut().extend_pairs(req.query);
    }
    let mut builder = endpoint
        .client
        .request(req.method.clone(), url)
        .header("X-Vault-Request", "true");
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(token.expose()).map_err(|_| {
            Failure::Transport("the Vault token is not a valid header value".into())
        })?;
        value.set_sensitive(true);
        builder = builder.header("X-Vault-Token", value);
    }
    if let Some(ns) = req.namespace {
        builder = builder.header("X-Vault-Namespace", ns);
    }
    if let Some(body) = req.body {
        builder = builder.json(body);
    }
    let mut response = builder
        .send()
        .await
        .map_err(|e| Failure::Transport(transport(&e)))?;
    let status = response.status();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    if response.content_length().is_some_and(|n| n > max_body) {
        return Err(Failure::TooLarge(max_body));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| Failure::Transport(transport(&e)))?
    {
        if (body.len() + chunk.len()) as u64 > max_body {
            zeroize::Zeroize::zeroize(&mut body);
            return Err(Failure::TooLarge(max_body));
        }
        body.extend_from_slice(&chunk);
    }
    if status.is_success() {
        Ok(body)
    } else {
        Err(Failure::Status {
            code: status.as_u16(),
            errors: errors_of(&body),
            retry_after,
        })
    }
}
