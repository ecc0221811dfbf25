//! The `vault` backend (HashiCorp Vault and OpenBao), parameter-compatible
//! with vault-csi-provider. Differences that matter to users:
//! - it logs in once per pod identity and reuses the Vault token;
//! - identical requests of one Mount are made once;
//! - leased answers are kept per pod volume and renewed across rotation
//!   polls instead of re-issuing credentials on every poll;
//! - AppRole and static-token auth from nodePublishSecretRef.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use serde_json::Value as Json;
use tokio::sync::OnceCell;

use super::{Backend, FetchLimits, Fetched};
use crate::config::VaultArgs;
use crate::error::ObjectError;
use crate::key::{Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

pub mod auth;
pub mod http;
pub mod lease;
pub mod params;

use lease::{Lease, Leases, Plan};
use params::{VaultObject, VaultParams};

/// A Vault answer shared by the objects of one Mount that asked for it.
/// Failures are not kept: a retry of the call asks Vault again.
type Shared = OnceCell<Arc<SecretBytes>>;

pub struct VaultBackend {
    defaults: VaultArgs,
    /// Where this backend keeps a volume's [`params::Connection`] with its
    /// attributes: its own, as the connection depends on its defaults.
    connection_key: Key,
    clients: http::Clients,
    tokens: auth::Tokens,
    leases: Leases,
}

impl VaultBackend {
    pub fn new(defaults: VaultArgs) -> Self {
        static BACKENDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BACKENDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            connection_key: KeyBuilder::new("vault-connection")
                .field(n.to_be_bytes())
                .finish(),
            clients: http::Clients::new(defaults.request_timeout, defaults.tls_dir.clone()),
            defaults,
            tokens: auth::Tokens::default(),
            leases: Leases::default(),
        }
    }

    /// Leases currently kept (for tests and metrics).
    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// One authenticated request; on 403 the token is replaced by one new
    /// login and the request tried once more.
    async fn call(
        &self,
        endpoint: &http::Endpoint,
        params: &VaultParams,
        ctx: &MountContext,
        req: &http::Request<'_>,
        what: &str,
        max_body: u64,
    ) -> Result<Vec<u8>, ObjectError> {
        let token = self.tokens.token(endpoint, params, ctx, None).await?;
        match http::send(endpoint, req, Some(&token), max_body).await {
            Err(http::Failure::Status { code: 403, .. })
                if !matches!(params.auth, params::Auth::Token(_)) =>
            {
                tracing::debug!(vault = %endpoint.address, "Vault refused the cached token; logging in again");
                let fresh = self
                    .tokens
                    .token(endpoint, params, ctx, Some(&token))
                    .await?;
                http::send(endpoint, req, Some(&fresh), max_body)
                    .await
                    .map_err(|f| f.into_object_error(&endpoint.address, what))
            }
            other => other.map_err(|f| f.into_object_error(&endpoint.address, what)),
        }
    }

    /// The raw answer to `object`'s request, through the lease cache.
    async fn answer(
        &self,
        params: &VaultParams,
        object: &VaultObject,
        ctx: &MountContext,
        max_body: u64,
    ) -> Result<Arc<SecretBytes>, ObjectError> {
        if params.tls.skip_verify {
            tracing::warn!(vault = %params.address, "TLS verification of Vault is disabled (vaultSkipTLSVerify)");
        }
        let endpoint = self.clients.get(&params.address, &params.tls).await?;
        let what = format!("{} {}", object.method, object.path);
        let lease_key = (!ctx.pod.uid.is_empty()).then(|| {
            object
                .request_fields(
                    KeyBuilder::new("vault-lease")
                        .field(&ctx.pod.uid)
                        .field(&ctx.target_path)
                        .field(&params.address)
                        .opt(params.namespace.as_deref()),
                )
                .finish()
        });
        let fraction = self.defaults.lease_fraction;
        if let Some(mut lease) = lease_key.as_ref().and_then(|k| self.leases.get(k)) {
            match lease.plan(Instant::now(), fraction) {
                Plan::Reuse => return Ok(lease.body),
                Plan::Renew => {
                    let body = serde_json::json!({
                        "lease_id": lease.lease_id.expose(),
                        "increment": lease.increment.as_secs(),
                    });
                    let renewed = self
                        .call(
                            &endpoint,
                            params,
                            ctx,
                            &http::Request {
                                method: reqwest::Method::PUT,
                                path: "/v1/sys/leases/renew",
                                query: &[],
                                body: Some(&body),
                                namespace: params.namespace.as_deref(),
                            },
                            "lease renewal",
                            MAX_CONTROL_BODY,
                        )
                        .await
                        .ok()
                        .and_then(|b| serde_json::from_slice::<Json>(&b).ok())
                        .and_then(|v| v.get("lease_duration").and_then(Json::as_u64));
                    crate::metrics::METRICS
                        .vault_lease_renewals
                        .get_or_create(&crate::metrics::Outcome {
                            outcome: if renewed.is_some() { "ok" } else { "error" },
                        })
                        .inc();
                    if let Some(granted) = renewed {
                        lease.renewed(Duration::from_secs(granted), Instant::now());
                        if lease.plan(Instant::now(), fraction) != Plan::Reissue {
                            let body = Arc::clone(&lease.body);
                            if let Some(k) = lease_key {
                                self.leases.put(k, lease);
                            }
                            tracing::debug!(path = %object.path, granted, "renewed Vault lease");
                            return Ok(body);
                        }
                    } else {
                        tracing::info!(path = %object.path, "Vault lease renewal failed; issuing a new secret");
                    }
                }
                Plan::Reissue => {
                    tracing::debug!(path = %object.path, "Vault lease near its end; issuing a new secret");
                }
            }
            if let Some(k) = &lease_key {
                self.leases.remove(k);
            }
        }

        let issued_at = Instant::now();
        let raw = self
            .call(
                &endpoint,
                params,
                ctx,
                &http::Request {
                    method: object.method.clone(),
                    path: &object.path,
                    query: &object.query,
                    body: object.body.as_ref(),
                    namespace: params.namespace.as_deref(),
                },
                &what,
                max_body,
            )
            .await?;
        let body = SecretBytes::new(raw);
        let parsed: Json = serde_json::from_slice(body.expose()).map_err(|_| {
            ObjectError::Invalid(format!(
                "Vault's answer to {what} is not JSON (is secretPath a Vault API path?)"
            ))
        })?;
        let lease_id = parsed.get("lease_id").and_then(Json::as_str).unwrap_or("");
        let ttl = parsed
            .get("lease_duration")
            .and_then(Json::as_u64)
            .unwrap_or(0);
        let body = Arc::new(body);
        if let (Some(key), false, true) = (lease_key, lease_id.is_empty(), ttl > 0) {
            let renewable = parsed
                .get("renewable")
                .and_then(Json::as_bool)
                .unwrap_or(false);
            let mut lease = Lease::new(
                SecretBytes::new(Vec::new()),
                lease_id.to_string(),
                renewable,
                Duration::from_secs(ttl),
                issued_at,
            );
            lease.body = Arc::clone(&body);
            self.leases.put(key, lease);
        }
        Ok(body)
    }
}

/// Control-plane answers (lease renewal) are small.
const MAX_CONTROL_BODY: u64 = 64 * 1024;

/// How much of a Vault answer is read: the value may sit inside JSON with
/// other fields and escaping, so allow some room over the file limit.
fn answer_limit(limits: FetchLimits) -> u64 {
    limits.max_bytes.saturating_mul(2).saturating_add(64 * 1024)
}

/// What one object takes from a Vault answer.
#[derive(Debug, PartialEq)]
struct Extracted {
    bytes: Vec<u8>,
    /// The KV v2 metadata version, if the answer is a KV v2 read.
    version: Option<String>,
    /// The answer carries a lease: it belongs to one pod volume.
    leased: bool,
}

/// The bytes of one object from a Vault answer, with the semantics of
/// vault-csi-provider: with a key, `data.data[key]` (KV v2) or `data[key]`,
/// a string raw and anything else as JSON; without, the whole answer.
fn extract(answer: &SecretBytes, key: Option<&str>, what: &str) -> Result<Extracted, ObjectError> {
    let mut parsed: Json = serde_json::from_slice(answer.expose())
        .map_err(|_| ObjectError::Invalid(format!("Vault's answer to {what} is not JSON")))?;
    let leased = parsed
        .get("lease_id")
        .and_then(Json::as_str)
        .is_some_and(|l| !l.is_empty())
        && parsed
            .get("lease_duration")
            .and_then(Json::as_u64)
            .unwrap_or(0)
            > 0;
    let result = extract_from(&mut parsed, key, what).map(|(bytes, version)| Extracted {
        bytes,
        version,
        leased,
    });
    zeroize_json(&mut parsed);
    result
}

fn extract_from(
    parsed: &mut Json,
    key: Option<&str>,
    what: &str,
) -> Result<(Vec<u8>, Option<String>), ObjectError> {
    let data = parsed.get("data");
    let kv2 = data.and_then(|d| d.get("metadata")).filter(|_| {
        data.and_then(|d| d.get("data"))
            .is_some_and(Json::is_object)
    });
    let version = kv2.and_then(kv2_version);
    let Some(key) = key else {
        // The whole answer, as vault-csi-provider writes it, minus the
        // per-request id that would make every poll look like a rotation.
        if let Some(obj) = parsed.as_object_mut() {
            obj.remove("request_id");
        }
        let bytes = serde_json::to_vec(parsed).map_err(|e| ObjectError::Internal(e.to_string()))?;
        return Ok((bytes, version));
    };
    // KV v2 answers: `data.data[key]`. Anything else: `data[key]`, and, as
    // vault-csi-provider does, `data.data[key]` when `data` holds a map
    // named `data` without the key itself (a KV v1 secret with a `data`
    // map). Where both exist, coffer takes `data[key]`; the peer would
    // take the nested one, leaving the top-level key unreachable.
    let nested = data.and_then(|d| d.get("data")).filter(|d| d.is_object());
    let found = match data {
        Some(_) if kv2.is_some() => nested.and_then(|d| d.get(key)),
        Some(d) => d.get(key).or_else(|| nested.and_then(|n| n.get(key))),
        None => None,
    };
    match found {
        Some(Json::String(s)) => Ok((s.as_bytes().to_vec(), version)),
        Some(other) => serde_json::to_vec(other)
            .map(|b| (b, version))
            .map_err(|e| ObjectError::Internal(e.to_string())),
        None => {
            let source = if kv2.is_some() { nested } else { data };
            let Some(Json::Object(fields)) = source else {
                return Err(ObjectError::NotFound(format!(
                    "Vault's answer to {what} has no data"
                )));
            };
            let mut keys: Vec<&str> = fields.keys().map(String::as_str).collect();
            keys.sort_unstable();
            keys.truncate(crate::error::LISTED_FAILURES);
            Err(ObjectError::NotFound(format!(
                "secretKey {} is not in the secret at {what} (it has: {})",
                crate::error::shown(key),
                keys.iter()
                    .map(|k| crate::error::shown_bare(k))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    }
}

/// The version of a KV v2 answer: its metadata version, plus a digest of the
/// version's creation time, because a secret deleted (metadata and all) and
/// written again starts over at version 1 with other content. Stable while
/// nothing changes, and across restarts.
fn kv2_version(metadata: &Json) -> Option<String> {
    let n = metadata.get("version").and_then(Json::as_u64)?;
    Some(match metadata.get("created_time").and_then(Json::as_str) {
        Some(created) if !created.is_empty() => {
            let digest = crate::key::Key::of("kv2-created", &[created]);
            format!("{n}-{}", digest.short_hex())
        }
        _ => n.to_string(),
    })
}

/// Scrubs the strings of a parsed answer before it is dropped.
pub(crate) fn zeroize_json(v: &mut Json) {
    match v {
        Json::String(s) => zeroize::Zeroize::zeroize(s),
        Json::Array(a) => a.iter_mut().for_each(zeroize_json),
        Json::Object(o) => o.values_mut().for_each(zeroize_json),
        _ => {}
    }
}

/// Where a Mount keeps its worked-out Vault parameters.
static PARAMS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::of("vault-params", &[]));

/// An object's Vault request as worked out from its fields, kept with the
/// object (see [`ObjectSpec::derived`]): rotation polls of a kept plan
/// need not parse it, format its address or hash its fields again.
struct Request {
    parsed: Result<VaultObject, ObjectError>,
    /// The request's part of the cache key (method, path, query, body, key).
    cache_fields: Option<Key>,
    /// The last cache key made of `cache_fields`, by the caller identity it
    /// was made for: a volume's polls all ask for the same one.
    cache_key: std::sync::Mutex<Option<(Key, Key)>>,
    /// For the audit log: `GET /v1/secret/data/db?version=2#password`.
    described: String,
}

impl Request {
    fn parsed(&self) -> Result<&VaultObject, ObjectError> {
        self.parsed.as_ref().map_err(Clone::clone)
    }
}

fn request(object: &ObjectSpec) -> Arc<Request> {
    object.derived(|| {
        let parsed = VaultObject::from_spec(object);
        let (cache_fields, described) = match &parsed {
            Ok(r) => {
                let query: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                let query = if query.is_empty() {
                    String::new()
                } else {
                    format!("?{}", query.join("&"))
                };
                let key = r.key.as_ref().map(|k| format!("#{k}")).unwrap_or_default();
                (
                    Some(
                        r.request_fields(KeyBuilder::new("vault-request-fields"))
                            .opt(r.key.as_deref())
                            .finish(),
                    ),
                    format!("{} {}{query}{key}", r.method, r.path),
                )
            }
            Err(_) => (None, object.name.clone()),
        };
        Request {
            parsed,
            cache_fields,
            cache_key: std::sync::Mutex::new(None),
            described,
        }
    })
}

impl VaultBackend {
    /// The Mount's parameters, worked out once per Mount (every object asks
    /// for them in each phase: validation, cache key, limiter, fetch), on
    /// top of its volume's connection, worked out once per volume.
    fn params(&self, ctx: &MountContext) -> Result<Arc<VaultParams>, ObjectError> {
        ctx.memo.once(&PARAMS, || {
            let connection = ctx.kept().once(&self.connection_key, || {
                params::Connection::from_context(ctx, &self.defaults).map(Arc::new)
            })?;
            VaultParams::with_auth(connection, ctx, &self.defaults).map(Arc::new)
        })
    }
}

#[async_trait]
impl Backend for VaultBackend {
    fn name(&self) -> &'static str {
        "vault"
    }

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        self.params(ctx)?;
        request(object).parsed().map(|_| ())
    }

    fn ignored_fields<'a>(&self, object: &'a ObjectSpec) -> Vec<&'a str> {
        object.unknown_fields(params::OBJECT_FIELDS)
    }

    fn parameters(&self) -> Vec<String> {
        params::parameter_names()
    }

    fn token_audience(&self, _object: &ObjectSpec, ctx: &MountContext) -> Option<String> {
        match &self.params(ctx).ok()?.auth {
            params::Auth::Login { audience, .. } => Some(audience.clone()),
            _ => None,
        }
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let params = self.params(ctx)?;
        let kept = request(object);
        let request = kept.parsed()?;
        let what = format!("{} {}", request.method, request.path);
        // Objects of this Mount asking the same thing share one answer.
        let shared: Arc<Shared> = ctx.memo.get_or_default(
            &request
                .request_fields(
                    KeyBuilder::new("vault-request")
                        .field(&params.address)
                        .opt(params.namespace.as_deref()),
                )
                .finish(),
        );
        let answer = shared
            .get_or_try_init(|| self.answer(&params, request, ctx, answer_limit(limits)))
            .await
            .cloned()?;
        let extracted = extract(&answer, request.key.as_deref(), &what)?;
        // A pinned KV v2 version never changes.
        let immutable =
            extracted.version.is_some() && request.query.iter().any(|(k, _)| k == "version");
        Ok(Fetched {
            contents: SecretBytes::new(extracted.bytes),
            version: extracted.version.map(Into::into),
            shareable: !extracted.leased,
            immutable,
            memo: None,
        })
    }

    /// Pods share cached values only when Vault would authorize them alike:
    /// same address, namespace, auth mount and role, and the same service
    /// account (Kubernetes auth roles bind service accounts); AppRole and
    /// static tokens by the credential itself.
    fn cache_key(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<Key> {
        let request = request(object);
        let fields = request.cache_fields.as_ref()?;
        let identity = self.caller_identity(ctx)?;
        let mut kept = request.cache_key.lock().ok();
        if let Some(Some((of, key))) = kept.as_deref() {
            if *of == identity {
                return Some(*key);
            }
        }
        let key = KeyBuilder::new("vault-cache")
            .key(&identity)
            .key(fields)
            .finish();
        if let Some(kept) = kept.as_deref_mut() {
            *kept = Some((identity, key));
        }
        Some(key)
    }

    /// Without `secretKey` the value is Vault's whole answer; its keys are
    /// those of the secret: `data.data` (KV v2) or `data`.
    fn data_view(&self, object: &ObjectSpec, mut value: Json) -> Json {
        if object.fields.contains_key("secretKey") {
            return value;
        }
        let Some(mut data) = value.get_mut("data").map(Json::take) else {
            return value;
        };
        zeroize_json(&mut value);
        let kv2 = data.get("metadata").is_some_and(Json::is_object)
            && data.get("data").is_some_and(Json::is_object);
        if kv2 {
            let inner = data.get_mut("data").map(Json::take).unwrap_or_default();
            zeroize_json(&mut data);
            inner
        } else {
            data
        }
    }

    fn placement(&self, object: &ObjectSpec, ctx: &MountContext) -> crate::policy::Placement {
        let params = self.params(ctx).ok();
        crate::policy::Placement {
            address: params.as_ref().map(|p| p.address.clone()),
            namespace: params.as_ref().and_then(|p| p.namespace.clone()),
            path: request(object)
                .parsed()
                .ok()
                .map(|o| o.path.trim_start_matches("/v1/").to_string()),
            region: None,
        }
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        request(object).described.clone()
    }

    fn limit_scope(&self, ctx: &MountContext) -> Option<Key> {
        let address = self
            .params(ctx)
            .map(|p| p.address.clone())
            .unwrap_or_default();
        Some(Key::of("limit-vault", &[&address]))
    }
}

/// The fields that decide what Vault lets this caller do: address,
/// namespace, and the login (auth mount, role, audience and service
/// account; AppRole and static tokens by the credential itself).
fn identity_fields(
    key: KeyBuilder,
    params: &VaultParams,
    credential: Option<Key>,
    ctx: &MountContext,
) -> Option<KeyBuilder> {
    let key = key.field(&params.address).opt(params.namespace.as_deref());
    Some(match &params.auth {
        params::Auth::Login {
            mount,
            role,
            audience,
        } => key
            .field("login")
            .field(mount)
            .field(role)
            .field(audience)
            .field(ctx.pod.service_account_id()?),
        params::Auth::AppRole { mount, role_id, .. } => key
            .field("approle")
            .field(mount)
            .field(role_id)
            .key(&credential?),
        params::Auth::Token(_) => key.field("token").key(&credential?),
    })
}

/// Transit answers are a few hundred bytes.
const MAX_TRANSIT_BODY: u64 = 64 * 1024;

impl VaultBackend {
    /// Who this caller is to Vault (see [`identity_fields`]), for caches
    /// of answers made with the caller's login; `None` when the SPC's Vault
    /// settings are incomplete or the pod has no service account.
    pub fn caller_identity(&self, ctx: &MountContext) -> Option<Key> {
        let params = self.params(ctx).ok()?;
        // Once per Mount, and hashed once per volume and credential: the
        // volume keeps its last identity with what it was made of.
        *params.identity.get_or_init(|| {
            let credential = params.credential();
            let mut kept = params.connection.identity.lock().ok();
            if let Some(Some((caller, key))) = kept.as_deref() {
                if caller.is(&params.auth, credential) {
                    return Some(*key);
                }
            }
            let key = identity_fields(KeyBuilder::new("vault-identity"), &params, credential, ctx)?
                .finish();
            if let (Some(kept), Some(caller)) = (kept.as_deref_mut(), params.caller(credential)) {
                *kept = Some((caller, key));
            }
            Some(key)
        })
    }

    /// Transit decrypt as the pod (SOPS `hc_vault` keys): the SPC's Vault,
    /// the pod's login, `POST /v1/<engine>/decrypt/<key>`. Returns the
    /// plaintext bytes (base64-decoded), wiped on drop.
    pub async fn transit_decrypt(
        &self,
        ctx: &MountContext,
        engine_path: &str,
        key_name: &str,
        ciphertext: &str,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, ObjectError> {
        use base64::Engine as _;
        let engine = engine_path.trim_matches('/');
        let safe = |s: &str, slash: bool| {
            !s.is_empty()
                && s.len() <= 256
                && s.split('/')
                    .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
                && s.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') || (slash && c == '/')
                })
        };
        if !safe(engine, true) || !safe(key_name, false) {
            return Err(ObjectError::Invalid(format!(
                "transit key {}/keys/{} is not a Vault path",
                crate::error::shown(engine_path),
                crate::error::shown(key_name)
            )));
        }
        let params = self.params(ctx)?;
        let endpoint = self.clients.get(&params.address, &params.tls).await?;
        let path = format!("/v1/{engine}/decrypt/{key_name}");
        let body = serde_json::json!({ "ciphertext": ciphertext });
        let raw = zeroize::Zeroizing::new(
            self.call(
                &endpoint,
                &params,
                ctx,
                &http::Request {
                    method: reqwest::Method::POST,
                    path: &path,
                    query: &[],
                    body: Some(&body),
                    namespace: params.namespace.as_deref(),
                },
                &format!("transit decrypt with {engine}/keys/{key_name}"),
                MAX_TRANSIT_BODY,
            )
            .await?,
        );
        let mut parsed: Json = serde_json::from_slice(&raw).map_err(|_| {
            ObjectError::Invalid(format!("Vault's transit answer from {path} is not JSON"))
        })?;
        let plain = parsed
            .pointer("/data/plaintext")
            .and_then(Json::as_str)
            .map(|p| base64::engine::general_purpose::STANDARD.decode(p));
        zeroize_json(&mut parsed);
        match plain {
            Some(Ok(bytes)) => Ok(zeroize::Zeroizing::new(bytes)),
            _ => Err(ObjectError::Invalid(format!(
                "Vault's transit answer from {path} has no base64 data.plaintext"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::AttributesMemo;

    /// A volume's rotation polls share their parsed attributes, and with
    /// them the Vault connection worked out for the first; the caller
    /// identity and cache keys must still follow each poll's own
    /// credential, and settings errors must stay the same on every poll.
    #[test]
    fn kept_connection_follows_each_polls_credential() {
        let backend = VaultBackend::new(VaultArgs::default());
        let memo = AttributesMemo::default();
        let attributes = serde_json::json!({
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/pod.name": "p",
            "csi.storage.k8s.io/serviceAccount.name": "sa",
            "vaultAddress": "http://127.0.0.1:8200/",
            "vaultNamespace": "team",
            "objects": "- objectName: a\n  secretPath: secret/data/a\n  secretKey: k\n",
        })
        .to_string();
        let poll = |secrets: &str| {
            MountContext::parse_with(Some(&memo), &attributes, secrets, "420", "/t").unwrap()
        };
        let objects = crate::spc::parse_objects(&poll("").parameters, "vault").unwrap();
        let object = &objects[0];
        let keys = |secrets: &str| {
            let ctx = poll(secrets);
            backend.validate(object, &ctx).unwrap();
            let params = backend.params(&ctx).unwrap();
            assert_eq!(
                (params.address.as_str(), params.namespace.as_deref()),
                ("http://127.0.0.1:8200", Some("team"))
            );
            (
                backend.caller_identity(&ctx).unwrap(),
                backend.cache_key(object, &ctx).unwrap(),
            )
        };
        let a = keys(r#"{"token":"token-a"}"#);
        let b = keys(r#"{"token":"token-b"}"#);
        assert_ne!(a.0, b.0, "another token is another caller");
        assert_ne!(a.1, b.1);
        assert_eq!(keys(r#"{"token":"token-a"}"#), a, "and back");
        let approle = keys(r#"{"role_id":"r","secret_id":"s1"}"#);
        assert_ne!(approle.0, a.0);
        assert_ne!(keys(r#"{"role_id":"r","secret_id":"s2"}"#).0, approle.0);
        assert_eq!(keys(r#"{"role_id":"r","secret_id":"s1"}"#), approle);
        // One parsed attributes for all of them.
        assert_eq!(memo.len(), 1);

        // Without a credential the SPC needs a roleName, on every poll.
        for _ in 0..2 {
            let err = backend.validate(object, &poll("")).unwrap_err();
            assert!(err.to_string().contains("roleName is required"), "{err}");
        }
        // A volume with a login: the identity is the pod's service account.
        let login = serde_json::json!({
            "csi.storage.k8s.io/pod.namespace": "ns",
            "csi.storage.k8s.io/serviceAccount.name": "sa",
            "vaultAddress": "http://127.0.0.1:8200",
            "roleName": "app",
            "objects": "- objectName: a\n  secretPath: secret/data/a\n",
        });
        let with_sa = |sa: &str| {
            let mut attrs = login.clone();
            attrs["csi.storage.k8s.io/serviceAccount.name"] = sa.into();
            attrs["csi.storage.k8s.io/serviceAccount.tokens"] =
                r#"{"vault":{"token":"jwt","expirationTimestamp":"2030-01-01T00:00:00Z"}}"#.into();
            let ctx =
                MountContext::parse_with(Some(&memo), &attrs.to_string(), "", "420", "/t").unwrap();
            backend.caller_identity(&ctx).unwrap()
        };
        assert_eq!(with_sa("sa"), with_sa("sa"));
        assert_ne!(with_sa("sa"), with_sa("other"));
        // A token in the request wins over the login, under the same text.
        let ctx = MountContext::parse_with(
            Some(&memo),
            &login.to_string(),
            r#"{"token":"token-a"}"#,
            "420",
            "/t",
        )
        .unwrap();
        assert!(matches!(
            backend.params(&ctx).unwrap().auth,
            params::Auth::Token(_)
        ));
    }

    fn answer(json: Json) -> SecretBytes {
        SecretBytes::new(serde_json::to_vec(&json).unwrap())
    }

    #[test]
    fn extraction_follows_vault_csi_provider() {
        let kv2 = answer(serde_json::json!({
            "request_id": "r1",
            "data": {"data": {"password": "pw", "cfg": {"a": 1}}, "metadata": {"version": 3}}
        }));
        let pw = extract(&kv2, Some("password"), "x").unwrap();
        assert_eq!(
            (pw.bytes, pw.version, pw.leased),
            (b"pw".to_vec(), Some("3".into()), false)
        );
        assert_eq!(
            extract(&kv2, Some("cfg"), "x").unwrap().bytes,
            br#"{"a":1}"#.to_vec()
        );
        let err = extract(&kv2, Some("nope"), "GET /v1/secret/data/app").unwrap_err();
        assert!(
            matches!(err, ObjectError::NotFound(ref m) if m.contains("it has: cfg, password")),
            "{err}"
        );
        let whole = extract(&kv2, None, "x").unwrap();
        assert_eq!(whole.version.as_deref(), Some("3"));
        let whole: Json = serde_json::from_slice(&whole.bytes).unwrap();
        assert!(whole.get("request_id").is_none());
        assert_eq!(whole["data"]["data"]["password"], "pw");

        let kv1 = answer(serde_json::json!({"data": {"password": "pw1", "data": "plain"}}));
        let pw1 = extract(&kv1, Some("password"), "x").unwrap();
        assert_eq!((pw1.bytes, pw1.version), (b"pw1".to_vec(), None));
        assert_eq!(
            extract(&kv1, Some("data"), "x").unwrap().bytes,
            b"plain".to_vec()
        );
        let leased = answer(
            serde_json::json!({"lease_id": "db/creds/x/1", "lease_duration": 60, "data": {"u": "a"}}),
        );
        assert!(extract(&leased, Some("u"), "x").unwrap().leased);
        let empty = answer(serde_json::json!({"data": null}));
        assert!(matches!(
            extract(&empty, Some("k"), "x"),
            Err(ObjectError::NotFound(_))
        ));
    }
}
