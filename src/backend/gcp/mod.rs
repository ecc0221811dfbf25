//! The `gcp` backend (Google Secret Manager), compatible with Google's
//! secrets-store-csi-driver-provider-gcp: its `secrets` list or coffer's
//! `objects`, global and regional secrets, `extractJSONKey`/`extractYAMLKey`,
//! payload CRC32C verification, and authentication as the pod (Workload
//! Identity Federation done by coffer, with optional impersonation).

use std::time::Duration;

use async_trait::async_trait;
use google_cloud_parametermanager_v1::client::ParameterManager;
use google_cloud_secretmanager_v1::client::SecretManagerService;

use super::{Backend, FetchLimits, Fetched};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::config::GcpArgs;
use crate::error::{shown, ObjectError};
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

pub mod auth;
pub mod params;

use params::{Extract, GcpObject, GcpParams, Kind};

const GLOBAL_ENDPOINT: &str = "https://secretmanager.googleapis.com";
const GLOBAL_PARAMETER_ENDPOINT: &str = "https://parametermanager.googleapis.com";

/// Adds what the user can do about a refusal or a credentials failure.
fn explain(e: ObjectError, auth: &params::Auth) -> ObjectError {
    match (e, auth) {
        (
            ObjectError::PermissionDenied(m),
            params::Auth::PodAdc {
                impersonate: None, ..
            },
        ) => ObjectError::PermissionDenied(format!(
            "{m}; the pod's own Workload Identity was refused: if a Google service account holds \
             the grant, name it in the SPC parameter gcpServiceAccount (Google's provider takes it \
             from the service account's iam.gke.io/gcp-service-account annotation; coffer reads \
             no Kubernetes objects)"
        )),
        (ObjectError::PermissionDenied(m), params::Auth::ProviderAdc) if m.starts_with("credentials") => {
            ObjectError::FailedPrecondition(format!(
                "auth: provider-adc, but the daemon has no usable Application Default Credentials ({})",
                auth::adc_sources()
            ))
        }
        (e, _) => e,
    }
}

/// Clients kept: one per (endpoint, access token) in use; an idle one
/// belongs to a token that has since been replaced.
const CLIENTS: Bounds = Bounds {
    max_entries: 256,
    max_weight: 0,
    idle: Duration::from_secs(900),
};

pub struct GcpBackend {
    defaults: GcpArgs,
    /// Per-call timeout (a half-open endpoint must not hold a call until
    /// the Mount deadline; the retry layer tries again).
    timeout: Duration,
    tokens: auth::Tokens,
    /// Clients by (endpoint, identity): building one is not free.
    clients: BoundedMap<SecretManagerService>,
    parameter_clients: BoundedMap<ParameterManager>,
}

/// Builds a Google client of either service the same way: coffer's retry
/// layer decides about retries, every attempt has a timeout.
macro_rules! google_client {
    ($client:ty, $service:literal, $endpoint:expr, $credentials:expr, $timeout:expr) => {
        <$client>::builder()
            .with_endpoint($endpoint)
            .with_credentials($credentials)
            .with_retry_policy(google_cloud_gax::retry_policy::NeverRetry)
            .with_attempt_timeout($timeout)
            .build()
            .await
            .map_err(|e| {
                ObjectError::FailedPrecondition(format!(
                    concat!("cannot set up the ", $service, " client: {}"),
                    e
                ))
            })
    };
}

impl GcpBackend {
    pub fn new(defaults: GcpArgs, timeout: Duration) -> Self {
        Self {
            defaults,
            timeout,
            tokens: auth::Tokens::new(timeout),
            clients: BoundedMap::new(CLIENTS),
            parameter_clients: BoundedMap::new(CLIENTS),
        }
    }

    /// STS exchanges made so far.
    pub fn exchanges(&self) -> u64 {
        self.tokens
            .exchanges
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn endpoint(&self, object: &GcpObject) -> String {
        let (flag, service, global) = match object.kind {
            Kind::Secret => (
                &self.defaults.secretmanager_endpoint,
                "secretmanager",
                GLOBAL_ENDPOINT,
            ),
            Kind::Parameter => (
                &self.defaults.parametermanager_endpoint,
                "parametermanager",
                GLOBAL_PARAMETER_ENDPOINT,
            ),
        };
        match (flag, object.location.as_deref()) {
            (Some(ep), _) => ep.trim_end_matches('/').to_string(),
            (None, None | Some("global")) => global.to_string(),
            (None, Some(loc)) => format!("https://{service}.{loc}.rep.googleapis.com"),
        }
    }

    /// Bearer identities carry their token's fingerprint: a fresh token
    /// gets a fresh client, an unchanged one reuses its client.
    fn client_key(endpoint: &str, resolved: &auth::Resolved) -> Key {
        KeyBuilder::new("gcp-client")
            .field(endpoint)
            .key(&resolved.identity)
            .finish()
    }

    async fn client(
        &self,
        endpoint: &str,
        resolved: auth::Resolved,
    ) -> Result<SecretManagerService, ObjectError> {
        let key = Self::client_key(endpoint, &resolved);
        if let Some(c) = self.clients.get(&key) {
            return Ok(c);
        }
        let client = google_client!(
            SecretManagerService,
            "Secret Manager",
            endpoint,
            resolved.credentials,
            self.timeout
        )?;
        self.clients.insert(key, client.clone());
        Ok(client)
    }

    async fn parameter_client(
        &self,
        endpoint: &str,
        resolved: auth::Resolved,
    ) -> Result<ParameterManager, ObjectError> {
        let key = Self::client_key(endpoint, &resolved);
        if let Some(c) = self.parameter_clients.get(&key) {
            return Ok(c);
        }
        let client = google_client!(
            ParameterManager,
            "Parameter Manager",
            endpoint,
            resolved.credentials,
            self.timeout
        )?;
        self.parameter_clients.insert(key, client.clone());
        Ok(client)
    }

    /// A secret version's payload, CRC32C-checked, and its resolved name.
    async fn access(
        &self,
        request: &GcpObject,
        resolved: auth::Resolved,
        limits: FetchLimits,
    ) -> Result<(bytes::Bytes, Option<String>), ObjectError> {
        let client = self.client(&self.endpoint(request), resolved).await?;
        let resp = client
            .access_secret_version()
            .set_name(request.resource.clone())
            .send()
            .await
            .map_err(|e| map_error(&e, "Secret Manager", &request.resource))?;
        let payload = resp.payload.ok_or_else(|| {
            ObjectError::NotFound(format!(
                "Secret Manager returned no payload for {}",
                request.resource
            ))
        })?;
        limits.check(payload.data.len())?;
        if let Some(expected) = payload.data_crc32c {
            if i64::from(crc32c::crc32c(&payload.data)) != expected {
                return Err(ObjectError::Unavailable(format!(
                    "the payload of {} failed its CRC32C check (corrupted in transit); nothing was mounted",
                    request.resource
                )));
            }
        }
        // The resolved version name: `latest` moving is a rotation.
        Ok((payload.data, Some(resp.name).filter(|n| !n.is_empty())))
    }

    /// A parameter version rendered (its `__REF__` secret references
    /// resolved by Parameter Manager, as Google's provider reads it). The
    /// rendered text can change under one version name when a referenced
    /// secret moves, so coffer versions it by content.
    async fn render(
        &self,
        request: &GcpObject,
        resolved: auth::Resolved,
        limits: FetchLimits,
    ) -> Result<(bytes::Bytes, Option<String>), ObjectError> {
        let client = self
            .parameter_client(&self.endpoint(request), resolved)
            .await?;
        let resp = client
            .render_parameter_version()
            .set_name(request.resource.clone())
            .send()
            .await
            .map_err(|e| map_error(&e, "Parameter Manager", &request.resource))?;
        limits.check(resp.rendered_payload.len())?;
        Ok((resp.rendered_payload, None))
    }
}

/// Maps a Secret Manager or Parameter Manager failure; messages name the
/// resource, never a value.
fn map_error(e: &google_cloud_gax::error::Error, service: &str, resource: &str) -> ObjectError {
    use google_cloud_gax::error::rpc::Code;
    if let Some(status) = e.status() {
        let msg = format!("{service}: {} ({resource})", status.message);
        return match status.code {
            Code::NotFound => ObjectError::NotFound(msg),
            Code::PermissionDenied | Code::Unauthenticated => ObjectError::PermissionDenied(msg),
            Code::ResourceExhausted => ObjectError::Throttled {
                message: msg,
                retry_after: retry_hint(e),
            },
            Code::Unavailable | Code::Internal | Code::DeadlineExceeded | Code::Aborted => {
                ObjectError::Unavailable(msg)
            }
            Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => {
                ObjectError::Invalid(msg)
            }
            _ => ObjectError::Internal(msg),
        };
    }
    match e.http_status_code() {
        Some(404) => ObjectError::NotFound(format!("{service} has no {resource}")),
        Some(401 | 403) => ObjectError::PermissionDenied(format!("{service} denied {resource}")),
        Some(429) => ObjectError::Throttled {
            message: format!("{service} rate-limited {resource}"),
            retry_after: retry_hint(e),
        },
        _ if e.is_authentication() => {
            ObjectError::PermissionDenied(format!("credentials for {resource}: {e}"))
        }
        _ => ObjectError::Unavailable(format!("cannot reach {service} for {resource}: {e}")),
    }
}

/// The server's retry hint: `google.rpc.RetryInfo` in the status details,
/// else a `Retry-After` header (seconds).
fn retry_hint(e: &google_cloud_gax::error::Error) -> Option<Duration> {
    let from_details = e.status().and_then(|s| {
        s.details.iter().find_map(|d| match d {
            google_cloud_gax::error::rpc::StatusDetails::RetryInfo(info) => {
                info.retry_delay.as_ref().map(|d| {
                    Duration::from_secs(d.seconds().max(0) as u64)
                        + Duration::from_nanos(d.nanos().max(0) as u64)
                })
            }
            _ => None,
        })
    });
    from_details.or_else(|| {
        e.http_headers()
            .and_then(|h| h.get(http::header::RETRY_AFTER))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

/// [`extract`] for `coffer::fuzzing`.
pub fn extract_for_fuzzing(payload: &[u8], key: &str, yaml: bool) -> Result<usize, String> {
    let how = if yaml {
        Extract::Yaml(key.to_string())
    } else {
        Extract::Json(key.to_string())
    };
    extract(payload, &how)
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// The value of a top-level key of a JSON or YAML payload; it must be a string.
/// The payload is already bounded in bytes; YAML is also bounded in what
/// its aliases and nesting may cost.
fn extract(data: &[u8], extract: &Extract) -> Result<Vec<u8>, ObjectError> {
    let (key, found) = match extract {
        Extract::Json(key) => {
            let doc: serde_json::Value = serde_json::from_slice(data).map_err(|_| {
                ObjectError::Invalid(format!(
                    "extractJSONKey {}: the payload is not JSON",
                    shown(key)
                ))
            })?;
            let found = match doc.get(key.as_str()) {
                None => None,
                Some(serde_json::Value::String(s)) => Some(Ok(s.as_bytes().to_vec())),
                Some(_) => Some(Err(())),
            };
            (key, found)
        }
        Extract::Yaml(key) => {
            let limits = crate::yaml::Limits {
                max_bytes: data.len(),
                max_scalar_bytes: (data.len() as u64).saturating_mul(2),
                ..crate::yaml::REQUEST
            };
            let doc = std::str::from_utf8(data)
                .ok()
                .and_then(|text| crate::yaml::parse(text, &limits).ok())
                .ok_or_else(|| {
                    ObjectError::Invalid(format!(
                        "extractYAMLKey {}: the payload is not YAML within coffer's bounds",
                        crate::error::shown(key)
                    ))
                })?;
            let found = match doc.get(key.as_str()) {
                None => None,
                Some(serde_yaml_ng::Value::String(s)) => Some(Ok(s.as_bytes().to_vec())),
                Some(_) => Some(Err(())),
            };
            (key, found)
        }
    };
    match found {
        Some(Ok(v)) => Ok(v),
        Some(Err(())) => Err(ObjectError::Invalid(format!(
            "key {} of the payload is not a string",
            shown(key)
        ))),
        None => Err(ObjectError::Invalid(format!(
            "key {} is not in the payload",
            shown(key)
        ))),
    }
}

/// Where a Mount keeps its worked-out Google parameters.
static PARAMS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::of("gcp-params", &[]));

impl GcpBackend {
    /// The Mount's parameters, worked out once per Mount: every object asks
    /// for them in each phase (validation, cache key, fetch).
    fn params(&self, ctx: &MountContext) -> Result<std::sync::Arc<GcpParams>, ObjectError> {
        ctx.memo.once(&PARAMS, || {
            GcpParams::from_context(ctx, &self.defaults).map(std::sync::Arc::new)
        })
    }
}

#[async_trait]
impl Backend for GcpBackend {
    fn name(&self) -> &'static str {
        "gcp"
    }

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        self.params(ctx)?;
        GcpObject::from_spec(object).map(|_| ())
    }

    fn ignored_fields<'a>(&self, object: &'a ObjectSpec) -> Vec<&'a str> {
        object.unknown_fields(params::OBJECT_FIELDS)
    }

    fn parameters(&self) -> Vec<String> {
        params::PARAMETERS.iter().map(|p| p.to_string()).collect()
    }

    fn token_audience(&self, _object: &ObjectSpec, ctx: &MountContext) -> Option<String> {
        match &self.params(ctx).ok()?.auth {
            params::Auth::PodAdc { audience, .. } => Some(audience.clone()),
            _ => None,
        }
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        object
            .str_field("resourceName")
            .ok()
            .flatten()
            .unwrap_or(&object.name)
            .to_string()
    }

    /// The project as `projects/<p>`, the resource name as the path, and
    /// the location of a regional secret (`global` otherwise) as the region.
    fn placement(&self, object: &ObjectSpec, _ctx: &MountContext) -> crate::policy::Placement {
        let Ok(o) = params::GcpObject::from_spec(object) else {
            return crate::policy::Placement::default();
        };
        let project = o
            .resource
            .split('/')
            .nth(1)
            .map(|p| format!("projects/{p}"));
        crate::policy::Placement {
            address: project,
            namespace: None,
            region: Some(o.location.clone().unwrap_or_else(|| "global".into())),
            path: Some(o.resource),
        }
    }

    /// As Google's provider: the object's id is its resourceName.
    fn object_id(&self, object: &ObjectSpec) -> String {
        self.describe(object)
    }

    fn cache_key(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<Key> {
        let params = self.params(ctx).ok()?;
        let request = GcpObject::from_spec(object).ok()?;
        let key = KeyBuilder::new("gcp-cache");
        let key = match &params.auth {
            params::Auth::PodAdc {
                sts_audience,
                impersonate,
                ..
            } => key
                .field("pod")
                .field(ctx.pod.service_account_id()?)
                .field(sts_audience)
                .opt(impersonate.as_deref()),
            params::Auth::ProviderAdc => key.field("provider-adc"),
            params::Auth::KeyJson(k) => key.field("key").key(&fingerprint(k.expose())),
        };
        let key = key.field(&request.resource);
        Some(
            match &request.extract {
                None => key.opt(None::<&str>),
                Some(Extract::Json(k)) => key.field("json").field(k),
                Some(Extract::Yaml(k)) => key.field("yaml").field(k),
            }
            .finish(),
        )
    }

    fn limit_scope(&self, _ctx: &MountContext) -> Option<Key> {
        Some(Key::of("limit-gcp", &[]))
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let params = self.params(ctx)?;
        let request = GcpObject::from_spec(object)?;
        let resolved = self
            .tokens
            .resolve(&params.auth, ctx, &self.defaults)
            .await?;
        let (data, version) = match request.kind {
            Kind::Secret => self.access(&request, resolved, limits).await,
            Kind::Parameter => self.render(&request, resolved, limits).await,
        }
        .map_err(|e| explain(e, &params.auth))?;
        let contents = match &request.extract {
            None => data.to_vec(),
            Some(x) => extract(&data, x)?,
        };
        Ok(Fetched {
            contents: SecretBytes::new(contents),
            version: version.map(Into::into),
            shareable: true,
            immutable: request.pinned,
            memo: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regional_secrets_go_to_their_regional_endpoint() {
        let object = |r: &str| GcpObject {
            resource: r.into(),
            kind: Kind::Secret,
            location: r
                .split('/')
                .nth(3)
                .filter(|_| r.contains("/locations/"))
                .map(str::to_string),
            pinned: false,
            extract: None,
        };
        let b = GcpBackend::new(GcpArgs::default(), Duration::from_secs(1));
        assert_eq!(
            b.endpoint(&object("projects/p/secrets/s/versions/1")),
            GLOBAL_ENDPOINT
        );
        assert_eq!(
            b.endpoint(&object(
                "projects/p/locations/me-central2/secrets/s/versions/1"
            )),
            "https://secretmanager.me-central2.rep.googleapis.com"
        );
        let pinned = GcpBackend::new(
            GcpArgs {
                secretmanager_endpoint: Some("https://private.example/".into()),
                ..GcpArgs::default()
            },
            Duration::from_secs(1),
        );
        assert_eq!(
            pinned.endpoint(&object("projects/p/locations/x/secrets/s/versions/1")),
            "https://private.example"
        );
    }

    #[test]
    fn extract_keys() {
        let json = br#"{"user": "u", "port": 5432}"#;
        assert_eq!(extract(json, &Extract::Json("user".into())).unwrap(), b"u");
        assert!(extract(json, &Extract::Json("port".into()))
            .unwrap_err()
            .to_string()
            .contains("not a string"));
        assert!(extract(json, &Extract::Json("nope".into()))
            .unwrap_err()
            .to_string()
            .contains("not in the payload"));
        let yaml = b"user: u\nnested: {a: 1}\n";
        assert_eq!(extract(yaml, &Extract::Yaml("user".into())).unwrap(), b"u");
        assert!(extract(yaml, &Extract::Yaml("nested".into())).is_err());
        assert!(extract(b"not json", &Extract::Json("a".into())).is_err());
    }
}
