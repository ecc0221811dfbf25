//! Credentials for Secret Manager calls, always as the pod unless the SPC
//! asks for the daemon's own: Workload Identity Federation done by coffer
//! (the pod's token exchanged at STS, then optionally an access token of a
//! Google service account from IAM Credentials), cached until shortly before
//! expiry; or the daemon's ADC; or a key from nodePublishSecretRef.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use google_cloud_auth::credentials::{
    CacheableResource, Credentials, CredentialsProvider, EntityTag,
};
use google_cloud_auth::errors::CredentialsError;
use serde_json::Value as Json;

use super::params::Auth;
use crate::bounded_map::{BoundedMap, Bounds};
use crate::config::GcpArgs;
use crate::error::ObjectError;
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::Credential;

const SCOPE: &str = "https://www.googleapis.com/auth/cloud-platform";

/// An access token handed to the Google client as a bearer header.
#[derive(Clone)]
pub struct Bearer(pub Credential);

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer([REDACTED])")
    }
}

impl CredentialsProvider for Bearer {
    fn headers(
        &self,
        _extensions: http::Extensions,
    ) -> impl std::future::Future<
        Output = Result<CacheableResource<http::HeaderMap>, CredentialsError>,
    > + Send {
        let token = self.0.clone();
        async move {
            let mut value = http::HeaderValue::from_str(&format!("Bearer {}", token.expose()))
                .map_err(|_| {
                    CredentialsError::from_msg(
                        false,
                        "the access token is not a valid header value",
                    )
                })?;
            value.set_sensitive(true);
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::AUTHORIZATION, value);
            Ok(CacheableResource::New {
                entity_tag: EntityTag::new(),
                data: headers,
            })
        }
    }

    async fn universe_domain(&self) -> Option<String> {
        None
    }
}

#[derive(Clone)]
struct Cached {
    token: Credential,
    use_until: Instant,
}

/// Credentials plus the identity they stand for (the client cache key).
pub struct Resolved {
    pub credentials: Credentials,
    pub identity: Key,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Pod identities whose access tokens are kept; an identity unused this
/// long has no pod polling with it any more.
const SLOTS: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 0,
    idle: Duration::from_secs(1800),
};

/// Largest token-service answer read (they are a few KB).
const MAX_TOKEN_ANSWER: usize = 64 * 1024;

pub struct Tokens {
    http: reqwest::Client,
    slots: BoundedMap<Slot>,
    adc: tokio::sync::OnceCell<Credentials>,
    /// STS exchanges made (for tests and metrics).
    pub exchanges: std::sync::atomic::AtomicU64,
}

impl Tokens {
    pub fn new(timeout: Duration) -> Self {
        Self {
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(5).min(timeout))
                .no_proxy()
                .build()
                .unwrap_or_default(),
            slots: BoundedMap::new(SLOTS),
            adc: tokio::sync::OnceCell::new(),
            exchanges: Default::default(),
        }
    }

    /// The credentials for `auth`, as the caller described by `ctx`.
    pub async fn resolve(
        &self,
        auth: &Auth,
        ctx: &MountContext,
        defaults: &GcpArgs,
    ) -> Result<Resolved, ObjectError> {
        match auth {
            Auth::ProviderAdc => {
                let creds = self
                    .adc
                    .get_or_try_init(|| async {
                        google_cloud_auth::credentials::Builder::default()
                            .build()
                            .map_err(|_| {
                                ObjectError::FailedPrecondition(format!(
                                    "auth: provider-adc, but the daemon has no usable Application Default Credentials ({})",
                                    adc_sources()
                                ))
                            })
                    })
                    .await?;
                Ok(Resolved {
                    credentials: creds.clone(),
                    identity: Key::of("gcp-identity", &["provider-adc"]),
                })
            }
            Auth::KeyJson(key) => {
                let json: Json = serde_json::from_str(key.expose()).map_err(|_| {
                    ObjectError::Invalid(
                        "nodePublishSecretRef key.json is not a JSON service-account key".into(),
                    )
                })?;
                let credentials =
                    google_cloud_auth::credentials::service_account::Builder::new(json)
                        .build()
                        .map_err(|_| {
                            ObjectError::Invalid(
                                "nodePublishSecretRef key.json is not a usable service-account key"
                                    .into(),
                            )
                        })?;
                Ok(Resolved {
                    credentials,
                    identity: KeyBuilder::new("gcp-identity")
                        .field("key")
                        .key(&fingerprint(key.expose()))
                        .finish(),
                })
            }
            Auth::PodAdc {
                audience,
                sts_audience,
                impersonate,
            } => {
                let jwt = ctx.token_for(audience).ok_or_else(|| {
                    ObjectError::FailedPrecondition(format!(
                        "no service-account token for audience {audience:?}"
                    ))
                })?;
                let key = KeyBuilder::new("gcp-token")
                    .key(&fingerprint(jwt.token.expose()))
                    .field(sts_audience)
                    .opt(impersonate.as_deref())
                    .finish();
                let token = self
                    .pod_token(
                        key,
                        jwt.token.expose(),
                        sts_audience,
                        impersonate.as_deref(),
                        defaults,
                    )
                    .await?;
                Ok(Resolved {
                    identity: KeyBuilder::new("gcp-identity")
                        .field("token")
                        .key(&fingerprint(token.expose()))
                        .finish(),
                    credentials: Credentials::from(Bearer(token)),
                })
            }
        }
    }

    async fn pod_token(
        &self,
        key: Key,
        jwt: &str,
        sts_audience: &str,
        impersonate: Option<&str>,
        defaults: &GcpArgs,
    ) -> Result<Credential, ObjectError> {
        let slot = self.slots.get_or_insert_with(key, Slot::default);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.use_until) {
            return Ok(c.token.clone());
        }
        let started = Instant::now();
        let (federated, ttl) = self.exchange(jwt, sts_audience, defaults).await?;
        let (token, ttl) = match impersonate {
            None => (federated, ttl),
            Some(gsa) => self.impersonate(&federated, gsa, defaults).await?,
        };
        let margin = (ttl / 10).max(Duration::from_secs(30));
        let fresh = Cached {
            token,
            use_until: started + ttl.saturating_sub(margin),
        };
        *cached = Some(fresh.clone());
        Ok(fresh.token)
    }

    /// `POST {sts}/v1/token`: the pod's JWT for a federated access token.
    async fn exchange(
        &self,
        jwt: &str,
        audience: &str,
        defaults: &GcpArgs,
    ) -> Result<(Credential, Duration), ObjectError> {
        self.exchanges
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let url = format!("{}/v1/token", defaults.sts_endpoint.trim_end_matches('/'));
        let form = [
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:access_token",
            ),
            ("scope", SCOPE),
            ("audience", audience),
            ("subject_token", jwt),
        ];
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let resp = self
            .http
            .post(&url)
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body)
            .send()
            .await
            .map_err(|e| {
                ObjectError::Unavailable(format!(
                    "cannot reach STS at {}: {}",
                    defaults.sts_endpoint,
                    cause(&e)
                ))
            })?;
        let (status, json) = read(resp).await?;
        if !status.is_success() {
            let said = json
                .get("error_description")
                .or_else(|| json.get("error").and_then(|e| e.get("message")))
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string();
            return Err(token_error(
                "STS refused to exchange the pod's token",
                status.as_u16(),
                &said,
            ));
        }
        let token = json
            .get("access_token")
            .and_then(Json::as_str)
            .unwrap_or("");
        if token.is_empty() {
            return Err(ObjectError::Unavailable(
                "STS answered without an access_token".into(),
            ));
        }
        let ttl = json
            .get("expires_in")
            .and_then(Json::as_u64)
            .unwrap_or(3600);
        Ok((Credential::new(token.to_string()), Duration::from_secs(ttl)))
    }

    /// `generateAccessToken` for `gsa`, authorized by the federated token.
    async fn impersonate(
        &self,
        federated: &Credential,
        gsa: &str,
        defaults: &GcpArgs,
    ) -> Result<(Credential, Duration), ObjectError> {
        let url = format!(
            "{}/v1/projects/-/serviceAccounts/{gsa}:generateAccessToken",
            defaults.iam_credentials_endpoint.trim_end_matches('/')
        );
        let resp = self
            .http
            .post(&url)
            .bearer_auth(federated.expose())
            .json(&serde_json::json!({ "scope": [SCOPE] }))
            .send()
            .await
            .map_err(|e| {
                ObjectError::Unavailable(format!("cannot reach IAM Credentials: {}", cause(&e)))
            })?;
        let (status, json) = read(resp).await?;
        if !status.is_success() {
            let said = json
                .get("error")
                .and_then(|e| e.get("message"))
                .and_then(Json::as_str)
                .unwrap_or("")
                .to_string();
            return Err(token_error(
                &format!("IAM Credentials refused to impersonate {gsa}"),
                status.as_u16(),
                &said,
            ));
        }
        let token = json.get("accessToken").and_then(Json::as_str).unwrap_or("");
        if token.is_empty() {
            return Err(ObjectError::Unavailable(
                "IAM Credentials answered without an accessToken".into(),
            ));
        }
        let ttl = json
            .get("expireTime")
            .and_then(Json::as_str)
            .and_then(|t| humantime::parse_rfc3339(t).ok())
            .and_then(|t| t.duration_since(SystemTime::now()).ok())
            .unwrap_or(Duration::from_secs(3600));
        Ok((Credential::new(token.to_string()), ttl))
    }
}

/// Where Application Default Credentials were looked for, for messages.
pub fn adc_sources() -> String {
    let env = match std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS") {
        None => "GOOGLE_APPLICATION_CREDENTIALS is unset".to_string(),
        Some(p) if std::path::Path::new(&p).is_file() => format!(
            "GOOGLE_APPLICATION_CREDENTIALS names {}, which did not give a token",
            std::path::Path::new(&p).display()
        ),
        Some(p) => format!(
            "GOOGLE_APPLICATION_CREDENTIALS names {}, which is not a readable file",
            std::path::Path::new(&p).display()
        ),
    };
    let home = std::env::var_os("HOME").map(|h| {
        std::path::Path::new(&h).join(".config/gcloud/application_default_credentials.json")
    });
    let file = match home {
        Some(f) if f.is_file() => format!("{} exists but did not give a token", f.display()),
        Some(f) => format!("no {}", f.display()),
        None => "no HOME for gcloud's credentials file".to_string(),
    };
    format!("{env}; {file}; and the GCE metadata server gave no token")
}

/// A token service's answer, read with a byte bound (a lying server cannot
/// balloon memory) and zeroized after parsing.
async fn read(mut resp: reqwest::Response) -> Result<(reqwest::StatusCode, Json), ObjectError> {
    let status = resp.status();
    let mut body = zeroize::Zeroizing::new(Vec::new());
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| ObjectError::Unavailable(format!("reading a token answer: {}", cause(&e))))?
    {
        if body.len() + chunk.len() > MAX_TOKEN_ANSWER {
            return Err(ObjectError::Unavailable(format!(
                "a token answer exceeded {MAX_TOKEN_ANSWER} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok((status, serde_json::from_slice(&body).unwrap_or(Json::Null)))
}

fn token_error(what: &str, code: u16, said: &str) -> ObjectError {
    let msg = if said.is_empty() {
        format!("{what} ({code})")
    } else {
        format!("{what} ({code}): {said}")
    };
    match code {
        400 | 401 | 403 => ObjectError::PermissionDenied(msg),
        429 => ObjectError::Throttled {
            message: msg,
            retry_after: None,
        },
        _ => ObjectError::Unavailable(msg),
    }
}

fn cause(e: &reqwest::Error) -> String {
    crate::error::cause_chain(e)
}
