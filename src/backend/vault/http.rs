//! HTTP to Vault: one `reqwest` client (rustls) per distinct TLS set-up,
//! reused across Mounts, and one request function that maps Vault's answers
//! to `ObjectError`s without ever including a token or a secret value.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::Value as Json;

use super::params::Tls;
use crate::error::ObjectError;
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

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    address: String,
    tls: Tls,
    /// Modification times of the TLS files, so a rotated CA or client
    /// certificate is picked up without a restart.
    stamps: Vec<Option<SystemTime>>,
}

pub struct Clients {
    timeout: Duration,
    cache: Mutex<HashMap<Key, Endpoint>>,
}

fn stamp(path: &Option<PathBuf>) -> Option<SystemTime> {
    path.as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| m.modified().ok())
}

fn read(what: &str, path: &Path) -> Result<Vec<u8>, ObjectError> {
    std::fs::read(path).map_err(|e| {
        ObjectError::FailedPrecondition(format!(
            "cannot read {what} {}: {}",
            path.display(),
            e.kind()
        ))
    })
}

impl Clients {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub async fn get(&self, address: &str, tls: &Tls) -> Result<Endpoint, ObjectError> {
        let key = Key {
            address: address.to_string(),
            tls: tls.clone(),
            stamps: vec![
                stamp(&tls.ca_cert),
                stamp(&tls.ca_dir),
                stamp(&tls.client_cert),
                stamp(&tls.client_key),
            ],
        };
        if let Some(found) = self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) {
            return Ok(found);
        }
        let endpoint = self.build(address, tls).await?;
        if let Ok(mut cache) = self.cache.lock() {
            // Old entries for the same address (rotated files) are dropped.
            cache.retain(|k, _| k.address != key.address || k.tls != key.tls);
            cache.insert(key, endpoint.clone());
        }
        Ok(endpoint)
    }

    async fn build(&self, address: &str, tls: &Tls) -> Result<Endpoint, ObjectError> {
        let mut url = url::Url::parse(address)
            .map_err(|_| ObjectError::Invalid(format!("vaultAddress {address:?} is not a URL")))?;
        let mut builder = reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(Duration::from_secs(5).min(self.timeout))
            .pool_idle_timeout(Duration::from_secs(90))
            .no_proxy();
        if url.scheme() == "https" {
            let mut roots = Vec::new();
            if let Some(path) = &tls.ca_cert {
                roots.extend(parse_certs(&read("vaultCACertPath", path)?, path)?);
            }
            if let Some(dir) = &tls.ca_dir {
                let entries = std::fs::read_dir(dir).map_err(|e| {
                    ObjectError::FailedPrecondition(format!(
                        "cannot read vaultCADirectory {}: {}",
                        dir.display(),
                        e.kind()
                    ))
                })?;
                for entry in entries.flatten() {
                    let path = entry.path();
                    if path.is_file() {
                        // Like Vault's own client: files that hold no
                        // certificate are skipped, not fatal.
                        if let Ok(certs) = parse_certs(&read("CA file", &path)?, &path) {
                            roots.extend(certs);
                        }
                    }
                }
            }
            if !roots.is_empty() {
                builder = builder.tls_certs_only(roots);
            }
            if let (Some(cert), Some(key)) = (&tls.client_cert, &tls.client_key) {
                let mut pem = read("vaultTLSClientCertPath", cert)?;
                pem.push(b'\n');
                let key_pem = zeroize::Zeroizing::new(read("vaultTLSClientKeyPath", key)?);
                pem.extend_from_slice(&key_pem);
                let identity = reqwest::Identity::from_pem(&pem).map_err(|_| {
                    ObjectError::FailedPrecondition(format!(
                        "{} and {} are not a PEM certificate and key",
                        cert.display(),
                        key.display()
                    ))
                });
                zeroize::Zeroize::zeroize(&mut pem);
                builder = builder.identity(identity?);
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
                                "cannot resolve Vault host {host:?}: {e}"
                            ))
                        })?
                        .collect();
                builder = builder.resolve_to_addrs(name, &addrs);
                url.set_host(Some(name)).map_err(|_| {
                    ObjectError::Invalid(format!("vaultTLSServerName {name:?} is not a host name"))
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

fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<reqwest::Certificate>, ObjectError> {
    reqwest::Certificate::from_pem_bundle(pem)
        .ok()
        .filter(|c| !c.is_empty())
        .ok_or_else(|| {
            ObjectError::FailedPrecondition(format!("{} holds no PEM certificate", path.display()))
        })
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
    token: &Credential,
    max_body: u64,
) -> Result<Vec<u8>, Failure> {
    let mut url = url::Url::parse(&format!("{}{}", endpoint.base, req.path))
        .map_err(|_| Failure::Transport(format!("{:?} is not a valid request path", req.path)))?;
    if !req.query.is_empty() {
        url.query_pairs_mut().extend_pairs(req.query);
    }
    let mut builder = endpoint
        .client
        .request(req.method.clone(), url)
        .header("X-Vault-Request", "true")
        .header("X-Vault-Token", token.expose());
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
