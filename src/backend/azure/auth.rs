//! Entra ID access tokens for Key Vault, always as the pod: workload
//! identity (the pod's token for `api://AzureADTokenExchange` as a JWT
//! client assertion) or a service principal from nodePublishSecretRef.
//! Tokens are kept per (tenant, client, pod token or client secret) until
//! shortly before they expire, never shared across identities.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::params::{Auth, AzureParams, WORKLOAD_IDENTITY_AUDIENCE};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::{shown, ObjectError};
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::Credential;

const SLOTS: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 0,
    idle: Duration::from_secs(1800),
};

/// Largest token endpoint answer read (a few KB).
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

#[derive(Clone)]
struct Cached {
    token: Credential,
    use_until: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

pub struct Tokens {
    http: reqwest::Client,
    slots: BoundedMap<Slot>,
    /// Token endpoint calls made (tests).
    pub calls: AtomicU64,
}

/// A bearer token and the identity it stands for.
pub struct Resolved {
    pub token: Credential,
    pub identity: Key,
}

impl Tokens {
    pub fn new(http: reqwest::Client) -> Self {
        Self {
            http,
            slots: BoundedMap::new(SLOTS),
            calls: AtomicU64::new(0),
        }
    }

    pub async fn resolve(
        &self,
        params: &AzureParams,
        ctx: &MountContext,
    ) -> Result<Resolved, ObjectError> {
        let (grant, credential_key): (Vec<(&str, String)>, Key) = match &params.auth {
            Auth::WorkloadIdentity { .. } => {
                let jwt = ctx
                    .token_for(WORKLOAD_IDENTITY_AUDIENCE)
                    .map(|t| t.token.expose().to_string())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| {
                        ObjectError::FailedPrecondition(format!(
                            "no service-account token for audience {WORKLOAD_IDENTITY_AUDIENCE:?}: \
                             add {{audience: {WORKLOAD_IDENTITY_AUDIENCE}}} to the CSIDriver's tokenRequests"
                        ))
                    })?;
                let key = fingerprint(&jwt);
                (
                    vec![
                        (
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string(),
                        ),
                        ("client_assertion", jwt),
                    ],
                    key,
                )
            }
            Auth::ServicePrincipal { secret, .. } => (
                vec![("client_secret", secret.expose().to_string())],
                fingerprint(secret.expose()),
            ),
        };
        let identity = KeyBuilder::new("azure-identity")
            .field(&params.authority)
            .field(&params.tenant)
            .field(params.auth.client_id())
            .field(&params.scope)
            .key(&credential_key)
            .finish();
        let slot = self.slots.get_or_insert_with(identity, Slot::default);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.use_until) {
            return Ok(Resolved {
                token: c.token.clone(),
                identity,
            });
        }
        let started = Instant::now();
        let who = ctx.pod.service_account_id().unwrap_or_default();
        let (token, ttl) = self.request(params, grant, &who).await?;
        let margin = (ttl / 10).max(Duration::from_secs(60));
        if ttl > margin {
            *cached = Some(Cached {
                token: token.clone(),
                use_until: started + (ttl - margin),
            });
        }
        Ok(Resolved { token, identity })
    }

    /// `POST {authority}/{tenant}/oauth2/v2.0/token`, client credentials.
    async fn request(
        &self,
        params: &AzureParams,
        grant: Vec<(&str, String)>,
        who: &str,
    ) -> Result<(Credential, Duration), ObjectError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let url = format!("{}/{}/oauth2/v2.0/token", params.authority, params.tenant);
        let body = zeroize::Zeroizing::new(
            url::form_urlencoded::Serializer::new(String::new())
                .append_pair("client_id", params.auth.client_id())
                .append_pair("scope", &params.scope)
                .append_pair("grant_type", "client_credentials")
                .extend_pairs(grant.iter().map(|(k, v)| (*k, v.as_str())))
                .finish(),
        );
        drop(grant);
        let resp = self
            .http
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body.as_bytes().to_vec())
            .send()
            .await
            .map_err(|e| {
                ObjectError::Unavailable(format!(
                    "cannot reach Entra ID at {}: {}",
                    params.authority,
                    crate::error::cause_chain(&e)
                ))
            })?;
        let status = resp.status();
        let raw = crate::backend::read_capped(resp, MAX_TOKEN_ANSWER, "Entra ID").await?;
        let mut json: Json = serde_json::from_slice(&raw).unwrap_or(Json::Null);
        if !status.is_success() {
            let said = json
                .get("error_description")
                .or_else(|| json.get("error"))
                .and_then(Json::as_str)
                .map(|m| format!(": {}", shown(m.lines().next().unwrap_or(""))))
                .unwrap_or_default();
            let how = match &params.auth {
                Auth::WorkloadIdentity { .. } => format!(
                    "the application {} needs a federated identity credential for the cluster's \
                     issuer with subject {who} (audience {WORKLOAD_IDENTITY_AUDIENCE})",
                    params.auth.client_id(),
                ),
                Auth::ServicePrincipal { .. } => format!(
                    "check the client id {} and secret in nodePublishSecretRef",
                    params.auth.client_id()
                ),
            };
            let msg = format!(
                "Entra ID refused a token for tenant {} ({}){said}; {how}",
                params.tenant,
                status.as_u16()
            );
            return Err(match status.as_u16() {
                429 | 500..=599 => ObjectError::Unavailable(msg),
                _ => ObjectError::PermissionDenied(msg),
            });
        }
        let token = json
            .get("access_token")
            .and_then(Json::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| Credential::new(t.to_string()))
            .ok_or_else(|| {
                ObjectError::Unavailable("Entra ID answered without an access_token".into())
            })?;
        let ttl = json
            .get("expires_in")
            .and_then(|v| {
                v.as_u64()
                    .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            })
            .unwrap_or(3600);
        crate::backend::vault::zeroize_json(&mut json);
        Ok((token, Duration::from_secs(ttl)))
    }
}
