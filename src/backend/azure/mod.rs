//! The `azure` backend (Azure Key Vault), compatible with
//! Azure/secrets-store-csi-driver-provider-azure: its SPC form (`params`),
//! tokens as the pod (`auth`: workload identity or a service principal),
//! and its output formats (`cert`: PEM chains, PKCS#12, public keys).
//!
//! Key Vault is called through its documented REST API (api-version 7.4)
//! with coffer's HTTP client: Azure's SDK refuses bearer tokens over
//! anything but HTTPS, so it could not be tested against loopback servers,
//! and these three GETs need nothing else from it.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::Value as Json;

use super::{Backend, FetchLimits, Fetched};
use crate::config::AzureArgs;
use crate::error::{shown, ObjectError};
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::{Credential, SecretBytes};
use crate::spc::ObjectSpec;

pub mod auth;
pub mod cert;
pub mod params;

use params::{Auth, AzureObject, AzureParams, Kind, Part};

const API_VERSION: &str = "7.4";
/// Pages of a versions listing followed (25 versions each).
const MAX_VERSION_PAGES: usize = 40;

/// What one GET of an item gave: the value as the peer writes it (before
/// `objectEncoding`), its version, and for certificate secrets the PEM the
/// `.crt` / `.key` files are cut from.
#[derive(Clone)]
struct Item {
    value: SecretBytes,
    version: String,
    /// Key + chain PEM of a certificate secret (for `.crt` / `.key`).
    cert_pem: Option<SecretBytes>,
}

static PARAMS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::of("azure-params", &[]));

pub struct AzureBackend {
    defaults: AzureArgs,
    http: reqwest::Client,
    tokens: auth::Tokens,
    /// Largest answer read from Key Vault.
    max_answer: usize,
    /// `coffer check`: nodePublishSecretRef is not known there, so an SPC
    /// without clientID is judged as if a service principal came with it.
    assume_service_principal: bool,
}

impl AzureBackend {
    pub fn new(defaults: AzureArgs, timeout: Duration, max_value_bytes: u64) -> Self {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap_or_default();
        Self {
            defaults,
            tokens: auth::Tokens::new(http.clone()),
            http,
            max_answer: usize::try_from(
                max_value_bytes.saturating_mul(4).saturating_add(64 * 1024),
            )
            .unwrap_or(usize::MAX),
            assume_service_principal: false,
        }
    }

    /// For `coffer check`, which has no nodePublishSecretRef to look at.
    pub fn for_check(defaults: AzureArgs) -> Self {
        Self {
            assume_service_principal: true,
            ..Self::new(defaults, Duration::from_secs(30), u64::MAX / 8)
        }
    }

    /// Entra ID token requests made so far (tests).
    pub fn token_calls(&self) -> u64 {
        self.tokens.calls.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn params(&self, ctx: &MountContext) -> Result<Arc<AzureParams>, ObjectError> {
        ctx.memo.once(&PARAMS, || {
            let assumed;
            let ctx = if self.assume_service_principal && ctx.node_publish_secrets.is_none() {
                let mut c = ctx.clone();
                c.node_publish_secrets = Some(
                    [
                        ("clientid", "00000000-0000-0000-0000-000000000000"),
                        ("clientsecret", "x"),
                    ]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), Credential::new(v.to_string())))
                    .collect(),
                );
                assumed = c;
                &assumed
            } else {
                ctx
            };
            AzureParams::from_context(ctx, &self.defaults).map(Arc::new)
        })
    }

    /// GET `url` with the pod's token; the JSON answer, read within bounds.
    async fn get(&self, url: &str, token: &Credential, what: &str) -> Result<Json, ObjectError> {
        let resp = self
            .http
            .get(url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| {
                ObjectError::Unavailable(format!(
                    "cannot reach Key Vault for {what}: {}",
                    crate::error::cause_chain(&e)
                ))
            })?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let raw = super::read_capped(resp, self.max_answer, &format!("Key Vault ({what})")).await?;
        let json: Json = serde_json::from_slice(&raw).map_err(|_| {
            ObjectError::Unavailable(format!(
                "Key Vault answered {status} for {what} with something that is not JSON"
            ))
        })?;
        if (200..300).contains(&status) {
            return Ok(json);
        }
        let err = json.get("error");
        let code = err
            .and_then(|e| e.get("code"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let inner = err
            .and_then(|e| e.get("innererror"))
            .and_then(|e| e.get("code"))
            .and_then(Json::as_str)
            .unwrap_or("");
        let message = err
            .and_then(|e| e.get("message"))
            .and_then(Json::as_str)
            .map(shown)
            .unwrap_or_default();
        let msg = format!("Key Vault: {what}: {code} ({status}) {message}");
        Err(match status {
            _ if inner.contains("Disabled")
                || inner.contains("Expired")
                || code.contains("Disabled") =>
            {
                ObjectError::FailedPrecondition(format!("{msg}; the item is disabled or expired"))
            }
            401 | 403 => ObjectError::PermissionDenied(msg),
            404 => ObjectError::NotFound(msg),
            429 => ObjectError::Busy {
                message: format!("{msg}; throttled by Key Vault"),
                retry_after,
            },
            400 => ObjectError::Invalid(msg),
            _ => ObjectError::Unavailable(msg),
        })
    }

    /// The item's versions, newest first (by `created`).
    async fn versions(
        &self,
        params: &AzureParams,
        o: &AzureObject,
        token: &Credential,
    ) -> Result<Vec<String>, ObjectError> {
        let what = format!("{}/{} versions", o.kind.as_str(), o.name);
        let mut url = format!(
            "{}/{}/{}/versions?api-version={API_VERSION}&maxresults=25",
            params.vault_url,
            o.kind.collection(),
            o.name
        );
        let mut found: Vec<(i64, String)> = Vec::new();
        for _ in 0..MAX_VERSION_PAGES {
            let page = self.get(&url, token, &what).await?;
            for v in page
                .get("value")
                .and_then(Json::as_array)
                .into_iter()
                .flatten()
            {
                let id = v
                    .get("id")
                    .or_else(|| v.get("kid"))
                    .and_then(Json::as_str)
                    .unwrap_or("");
                let created = v
                    .get("attributes")
                    .and_then(|a| a.get("created"))
                    .and_then(Json::as_i64)
                    .unwrap_or(0);
                if let Some(version) = id.rsplit('/').next().filter(|s| !s.is_empty()) {
                    found.push((created, version.to_string()));
                }
            }
            match page.get("nextLink").and_then(Json::as_str) {
                // Only pages of this vault: a link elsewhere would carry the token there.
                Some(next) if next.starts_with(&format!("{}/", params.vault_url)) => {
                    url = next.to_string()
                }
                Some(next) if !next.is_empty() => {
                    return Err(ObjectError::Unavailable(format!(
                        "Key Vault's nextLink for {what} leaves the vault ({})",
                        shown(next)
                    )))
                }
                _ => break,
            }
        }
        found.sort_by_key(|v| std::cmp::Reverse(v.0));
        Ok(found.into_iter().map(|(_, v)| v).collect())
    }

    /// The version this object reads: pinned, latest, or the n-th newest
    /// from its `objectVersion` (objectVersionHistory).
    async fn resolve_version(
        &self,
        params: &AzureParams,
        o: &AzureObject,
        token: &Credential,
        ctx: &MountContext,
    ) -> Result<Option<String>, ObjectError> {
        let Some(index) = o.history else {
            return Ok(o.version.clone());
        };
        let key = KeyBuilder::new("azure-versions")
            .field(o.kind.as_str())
            .field(&o.name)
            .finish();
        let list: Arc<Vec<String>> = ctx
            .memo
            .once_async(&key, || async {
                self.versions(params, o, token).await.map(Arc::new)
            })
            .await?;
        let start = match &o.version {
            None => 0,
            Some(v) => list.iter().position(|x| x == v).ok_or_else(|| {
                ObjectError::NotFound(format!(
                    "{}/{} has no version {}",
                    o.kind.as_str(),
                    o.name,
                    shown(v)
                ))
            })?,
        };
        list.get(start + index).cloned().map(Some).ok_or_else(|| {
            ObjectError::NotFound(format!(
                "{}/{} has fewer than {} versions",
                o.kind.as_str(),
                o.name,
                start + index + 1
            ))
        })
    }

    async fn item(
        &self,
        params: &AzureParams,
        o: &AzureObject,
        version: Option<&str>,
        token: &Credential,
    ) -> Result<Item, ObjectError> {
        let what = format!("{}/{}", o.kind.as_str(), o.name);
        // `{name}/{version}`, with an empty version for the latest, as
        // Azure's SDKs (and so the Azure provider) ask for it.
        let url = format!(
            "{}/{}/{}/{}?api-version={API_VERSION}",
            params.vault_url,
            o.kind.collection(),
            o.name,
            version.unwrap_or("")
        );
        let mut json = self.get(&url, token, &what).await?;
        check_attributes(&json, &what)?;
        let id_of = |j: &Json, field: &str| {
            j.get(field)
                .and_then(Json::as_str)
                .and_then(|id| id.rsplit('/').next())
                .unwrap_or("")
                .to_string()
        };
        let item = match o.kind {
            Kind::Secret => {
                let version = id_of(&json, "id");
                let value = json
                    .get_mut("value")
                    .map(Json::take)
                    .and_then(|v| match v {
                        Json::String(s) => Some(s),
                        _ => None,
                    })
                    .ok_or_else(|| {
                        ObjectError::Unavailable(format!(
                            "Key Vault answered {what} without a value"
                        ))
                    })?;
                let value = zeroize::Zeroizing::new(value);
                let is_cert = json
                    .get("kid")
                    .and_then(Json::as_str)
                    .is_some_and(|k| !k.is_empty());
                let content_type = json.get("contentType").and_then(Json::as_str).unwrap_or("");
                if !is_cert {
                    Item {
                        value: SecretBytes::new(value.as_bytes().to_vec()),
                        version,
                        cert_pem: None,
                    }
                } else {
                    let bad = |e: String| ObjectError::Invalid(format!("{what}: {e}"));
                    let pem = match content_type {
                        "application/x-pkcs12" => {
                            let der = zeroize::Zeroizing::new(
                                base64::engine::general_purpose::STANDARD
                                    .decode(value.trim())
                                    .map_err(|_| bad("the PKCS#12 value is not base64".into()))?,
                            );
                            // Key derivation is CPU work: off the async workers.
                            let chain = self.defaults.construct_pem_chain;
                            crate::work::run(usize::MAX, move || cert::pfx_to_pem(&der, chain))
                                .await
                                .map_err(|e| ObjectError::Unavailable(e.to_string()))?
                                .map_err(bad)?
                        }
                        "application/x-pem-file" => {
                            cert::pem_secret(value.as_bytes(), self.defaults.construct_pem_chain)
                                .map_err(bad)?
                        }
                        other => {
                            return Err(bad(format!(
                                "unknown certificate content type {}",
                                shown(other)
                            )))
                        }
                    };
                    let whole = if o.pfx {
                        value.as_bytes().to_vec()
                    } else {
                        pem.to_vec()
                    };
                    Item {
                        value: SecretBytes::new(whole),
                        version,
                        cert_pem: Some(SecretBytes::new(pem.to_vec())),
                    }
                }
            }
            Kind::Key => {
                let key = json.get("key").ok_or_else(|| {
                    ObjectError::Unavailable(format!("Key Vault answered {what} without a key"))
                })?;
                let version = id_of(key, "kid");
                let pem = cert::public_key_pem(key)
                    .map_err(|e| ObjectError::Invalid(format!("{what}: {e}")))?;
                Item {
                    value: SecretBytes::new(pem.into_bytes()),
                    version,
                    cert_pem: None,
                }
            }
            Kind::Cert => {
                let version = id_of(&json, "id");
                let der = json
                    .get("cer")
                    .and_then(Json::as_str)
                    .and_then(|c| base64::engine::general_purpose::STANDARD.decode(c).ok())
                    .ok_or_else(|| {
                        ObjectError::Unavailable(format!(
                            "Key Vault answered {what} without a certificate (cer)"
                        ))
                    })?;
                let pem = pem::encode_config(
                    &pem::Pem::new("CERTIFICATE", der),
                    pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
                );
                Item {
                    value: SecretBytes::new(pem.into_bytes()),
                    version,
                    cert_pem: None,
                }
            }
        };
        crate::backend::vault::zeroize_json(&mut json);
        Ok(item)
    }
}

/// A disabled item, or one past its expiry, is refused clearly.
fn check_attributes(json: &Json, what: &str) -> Result<(), ObjectError> {
    let attrs = json.get("attributes");
    if attrs.and_then(|a| a.get("enabled")).and_then(Json::as_bool) == Some(false) {
        return Err(ObjectError::FailedPrecondition(format!(
            "Key Vault: {what} is disabled"
        )));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    if let Some(exp) = attrs.and_then(|a| a.get("exp")).and_then(Json::as_i64) {
        if exp <= now {
            return Err(ObjectError::FailedPrecondition(format!(
                "Key Vault: {what} expired"
            )));
        }
    }
    Ok(())
}

#[async_trait]
impl Backend for AzureBackend {
    fn name(&self) -> &'static str {
        "azure"
    }

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        self.params(ctx)?;
        AzureObject::from_spec(object).map(|_| ())
    }

    fn ignored_fields<'a>(&self, object: &'a ObjectSpec) -> Vec<&'a str> {
        object.peer_leftovers(params::OBJECT_FIELDS, params::USER_FIELDS)
    }

    fn parameters(&self) -> Vec<String> {
        params::PARAMETERS.iter().map(|p| p.to_string()).collect()
    }

    fn token_audience(&self, _object: &ObjectSpec, ctx: &MountContext) -> Option<String> {
        match self.params(ctx).ok()?.auth {
            Auth::WorkloadIdentity { .. } => Some(params::WORKLOAD_IDENTITY_AUDIENCE.into()),
            Auth::ServicePrincipal { .. } => None,
        }
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        AzureObject::from_spec(object)
            .map(|o| o.uid())
            .unwrap_or_else(|_| object.name.clone())
    }

    /// As the Azure provider: `<type>/<name>` (`/<n>` for a history entry).
    fn object_id(&self, object: &ObjectSpec) -> String {
        self.describe(object)
    }

    fn placement(&self, object: &ObjectSpec, ctx: &MountContext) -> crate::policy::Placement {
        let (Ok(params), Ok(o)) = (self.params(ctx), AzureObject::from_spec(object)) else {
            return crate::policy::Placement::default();
        };
        crate::policy::Placement {
            address: Some(params.vault_url.clone()),
            namespace: None,
            region: None,
            path: Some(format!("{}/{}", o.kind.collection(), o.name)),
        }
    }

    /// Shared only between callers Azure authorizes alike: the same
    /// vault, tenant and application, and the same service account
    /// (workload identity federates one) or client secret.
    fn cache_key(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<Key> {
        let params = self.params(ctx).ok()?;
        let o = AzureObject::from_spec(object).ok()?;
        let b = KeyBuilder::new("azure-cache")
            .field(&params.vault_url)
            .field(&params.authority)
            .field(&params.tenant)
            .field(params.auth.client_id());
        let b = match &params.auth {
            Auth::WorkloadIdentity { .. } => b.field("wi").field(ctx.pod.service_account_id()?),
            Auth::ServicePrincipal { secret, .. } => {
                b.field("sp").key(&fingerprint(secret.expose()))
            }
        };
        Some(
            b.field(o.kind.as_str())
                .field(&o.name)
                .opt(o.version.as_deref())
                .opt(o.history.map(|h| h.to_string()).as_deref())
                .field(if o.pfx { "pfx" } else { "pem" })
                .field(match o.part {
                    Part::Whole => "whole",
                    Part::Certs => "crt",
                    Part::Key => "key",
                })
                .finish(),
        )
    }

    fn limit_scope(&self, ctx: &MountContext) -> Option<Key> {
        let url = self.params(ctx).ok()?.vault_url.clone();
        Some(Key::of("limit-azure", &[&url]))
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let params = self.params(ctx)?;
        let o = AzureObject::from_spec(object)?;
        let token = self.tokens.resolve(&params, ctx).await?.token;
        let version = self.resolve_version(&params, &o, &token, ctx).await?;
        // The whole and its .crt / .key share one GET per Mount.
        let key = KeyBuilder::new("azure-item")
            .field(o.kind.as_str())
            .field(&o.name)
            .opt(version.as_deref())
            .field(if o.pfx { "pfx" } else { "pem" })
            .finish();
        let item = ctx
            .memo
            .once_async(&key, || self.item(&params, &o, version.as_deref(), &token))
            .await?;
        let contents = match o.part {
            Part::Whole => item.value,
            Part::Certs | Part::Key => {
                let Some(pem) = &item.cert_pem else {
                    // Not a certificate: the peer writes no .crt / .key.
                    return Err(ObjectError::NotFound(format!(
                        "{} is not a certificate secret: no {} file",
                        o.uid(),
                        if o.part == Part::Certs {
                            ".crt"
                        } else {
                            ".key"
                        }
                    )));
                };
                SecretBytes::new(
                    cert::split(pem.expose(), o.part == Part::Certs)
                        .map_err(|e| ObjectError::Invalid(format!("{}: {e}", o.uid())))?
                        .to_vec(),
                )
            }
        };
        limits.check(contents.len())?;
        Ok(Fetched {
            contents,
            version: Some(item.version).filter(|v| !v.is_empty()).map(Into::into),
            shareable: true,
            immutable: o.version.is_some() && o.history.is_none(),
            memo: None,
        })
    }
}
