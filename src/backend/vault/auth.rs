//! Logging in to Vault as the pod, and reusing the resulting Vault token
//! across Mounts until shortly before it expires. Logins are plain
//! `POST /v1/auth/<mount>/login` requests through coffer's own HTTP client
//! (TLS settings apply) with the answer read under a byte bound: vaultrs
//! reads whole bodies, and the address comes from an SPC.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;

use super::http::{self, Endpoint};
use super::params::{Auth, VaultParams};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::{shown, ObjectError};
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::Credential;

/// Largest login answer read: a token and its metadata are a few KB. The
/// address an SPC names may be anyone's server.
const MAX_LOGIN_ANSWER: u64 = 64 * 1024;

/// A Vault token and when to stop using it.
#[derive(Clone)]
struct Cached {
    token: Credential,
    use_until: Instant,
}

/// Identities kept: a token unused this long is given up (the next Mount
/// logs in again), and an address or role an SPC invents cannot grow the
/// map without bound.
const SLOTS: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 0,
    idle: Duration::from_secs(1800),
};

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Tokens by auth identity; one login at a time per identity.
pub struct Tokens {
    slots: BoundedMap<Slot>,
}

impl Default for Tokens {
    fn default() -> Self {
        Self {
            slots: BoundedMap::new(SLOTS),
        }
    }
}

/// The cache key: exactly the credential Vault would see. For a login that
/// is the pod's service-account JWT itself, so a token is reused only by the
/// pod holding that JWT (JWT roles may bind claims of the pod), until the
/// kubelet rotates it; then one new login.
fn identity(params: &VaultParams, ctx: &MountContext) -> Option<Key> {
    let base = KeyBuilder::new("vault-token")
        .field(&params.address)
        .opt(params.namespace.as_deref());
    match &params.auth {
        Auth::Token(_) => None,
        Auth::Login {
            mount,
            role,
            audience,
        } => {
            let jwt = ctx
                .token_for(audience)
                .map(|t| t.token.expose())
                .unwrap_or("");
            Some(
                base.field("login")
                    .field(mount)
                    .field(role)
                    .field(audience)
                    .key(&fingerprint(jwt))
                    .finish(),
            )
        }
        Auth::AppRole {
            mount,
            role_id,
            secret_id,
        } => Some(
            base.field("approle")
                .field(mount)
                .field(role_id)
                .key(&fingerprint(secret_id.expose()))
                .finish(),
        ),
    }
}

/// How long a token of `ttl` is used: until 90% of it, and at least 10 s
/// before the end. A TTL of 0 (no expiry) is re-checked hourly.
fn usable_for(ttl: Duration) -> Duration {
    if ttl.is_zero() {
        return Duration::from_secs(3600);
    }
    let margin = (ttl / 10).max(Duration::from_secs(10));
    ttl.saturating_sub(margin)
}

impl Tokens {
    fn slot(&self, key: Key) -> Slot {
        self.slots.get_or_insert_with(key, Slot::default)
    }

    /// Cached identities (for tests and metrics).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A usable token: the cached one, or a fresh login. `stale` is a token
    /// Vault just refused; it is dropped and replaced by a new login.
    pub async fn token(
        &self,
        endpoint: &Endpoint,
        params: &VaultParams,
        ctx: &MountContext,
        stale: Option<&Credential>,
    ) -> Result<Credential, ObjectError> {
        if let Auth::Token(t) = &params.auth {
            return Ok(t.clone());
        }
        let Some(key) = identity(params, ctx) else {
            return Err(ObjectError::Internal("no auth identity".into()));
        };
        let slot = self.slot(key);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref() {
            let refused = stale.is_some_and(|s| s.expose() == c.token.expose());
            if !refused && Instant::now() < c.use_until {
                return Ok(c.token.clone());
            }
        }
        *cached = None;
        let started = Instant::now();
        let fresh = login(endpoint, params, ctx).await;
        crate::metrics::METRICS
            .vault_logins
            .get_or_create(&crate::metrics::Outcome {
                outcome: if fresh.is_ok() { "ok" } else { "error" },
            })
            .inc();
        let fresh = fresh?;
        tracing::debug!(
            vault = %endpoint.address,
            method = match params.auth { Auth::AppRole { .. } => "approle", _ => "login" },
            ms = started.elapsed().as_millis() as u64,
            "logged in to Vault"
        );
        *cached = Some(fresh.clone());
        Ok(fresh.token)
    }
}

async fn login(
    endpoint: &Endpoint,
    params: &VaultParams,
    ctx: &MountContext,
) -> Result<Cached, ObjectError> {
    let started = Instant::now();
    let (mount, mut body, what) = match &params.auth {
        Auth::Login {
            mount,
            role,
            audience,
        } => {
            let jwt = ctx.token_for(audience).ok_or_else(|| {
                ObjectError::FailedPrecondition(format!(
                    "no service-account token for audience {}",
                    shown(audience)
                ))
            })?;
            (
                mount,
                serde_json::json!({"role": role, "jwt": jwt.token.expose()}),
                format!("login as role {} at auth/{mount}", shown(role)),
            )
        }
        Auth::AppRole {
            mount,
            role_id,
            secret_id,
        } => (
            mount,
            serde_json::json!({"role_id": role_id, "secret_id": secret_id.expose()}),
            format!("AppRole login at auth/{mount}"),
        ),
        Auth::Token(_) => return Err(ObjectError::Internal("static tokens need no login".into())),
    };
    let path = format!("/v1/auth/{mount}/login");
    let answer = http::send(
        endpoint,
        &http::Request {
            method: reqwest::Method::POST,
            path: &path,
            query: &[],
            body: Some(&body),
            namespace: params.namespace.as_deref(),
        },
        None,
        MAX_LOGIN_ANSWER,
    )
    .await;
    super::zeroize_json(&mut body);
    let mut answer =
        zeroize::Zeroizing::new(answer.map_err(|f| login_error(f, &endpoint.address, &what))?);
    let mut parsed: Json = serde_json::from_slice(&answer).map_err(|_| {
        ObjectError::Unavailable(format!("Vault's answer to the {what} is not JSON"))
    })?;
    zeroize::Zeroize::zeroize(&mut *answer);
    let auth = parsed.get("auth");
    let token = auth
        .and_then(|a| a.get("client_token"))
        .and_then(Json::as_str)
        .filter(|t| !t.is_empty())
        .map(|t| Credential::new(t.to_string()));
    let ttl = auth
        .and_then(|a| a.get("lease_duration"))
        .and_then(Json::as_u64)
        .unwrap_or(0);
    super::zeroize_json(&mut parsed);
    let token = token.ok_or_else(|| {
        ObjectError::Unavailable(format!(
            "Vault's answer to the {what} holds no client token"
        ))
    })?;
    Ok(Cached {
        token,
        use_until: started + usable_for(Duration::from_secs(ttl)),
    })
}

/// Login failures: a refusal (400/401/403) is a permission problem of the
/// pod's identity; anything else says Vault could not be asked.
fn login_error(f: http::Failure, address: &str, what: &str) -> ObjectError {
    match f {
        http::Failure::Status {
            code,
            errors,
            retry_after,
        } => match code {
            400 | 401 | 403 => ObjectError::PermissionDenied(format!(
                "Vault refused the {what} ({code}): {errors}"
            )),
            429 => ObjectError::Throttled {
                message: format!("Vault rate-limited the {what}: {errors}"),
                retry_after,
            },
            404 => ObjectError::FailedPrecondition(format!(
                "Vault has no auth method for the {what} (404): {errors}"
            )),
            _ => ObjectError::Unavailable(format!("Vault failed the {what} ({code}): {errors}")),
        },
        http::Failure::Transport(cause) => ObjectError::Unavailable(format!(
            "cannot reach Vault at {address} for the {what}: {cause}"
        )),
        http::Failure::TooLarge(limit) => ObjectError::Unavailable(format!(
            "Vault's answer to the {what} exceeded {limit} bytes"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_used_until_shortly_before_expiry() {
        assert_eq!(
            usable_for(Duration::from_secs(3600)),
            Duration::from_secs(3240)
        );
        assert_eq!(usable_for(Duration::from_secs(60)), Duration::from_secs(50));
        assert_eq!(usable_for(Duration::from_secs(5)), Duration::ZERO);
        assert_eq!(usable_for(Duration::ZERO), Duration::from_secs(3600));
    }
}
