//! AWS credentials, always as the pod: IRSA (the pod's token for
//! `sts.amazonaws.com` → STS AssumeRoleWithWebIdentity) or EKS Pod Identity
//! (the pod's token for `pods.eks.amazonaws.com` → the node's Pod Identity
//! agent). Never the node's own credentials: no default chain is built.
//! Credentials are kept per (token, role or agent) until shortly before
//! they expire, so two identities never share them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use serde_json::Value as Json;

use super::params::{AddressType, Auth, AwsParams, IRSA_AUDIENCE, POD_IDENTITY_AUDIENCE};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::config::AwsArgs;
use crate::error::{shown, ObjectError};
use crate::key::{fingerprint, Key, KeyBuilder};
use crate::request::MountContext;

const POD_IDENTITY_IPV4: &str = "http://169.254.170.23/v1/credentials";
const POD_IDENTITY_IPV6: &str = "http://[fd00:ec2::23]/v1/credentials";

/// Largest Pod Identity agent answer read (it is well under 2 KB).
const MAX_AGENT_ANSWER: usize = 64 * 1024;

/// Pod identities whose credentials are kept; an identity unused this
/// long has no pod polling with it any more.
const SLOTS: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 0,
    idle: Duration::from_secs(1800),
};

#[derive(Clone)]
struct Cached {
    credentials: Credentials,
    use_until: Instant,
}

type Slot = Arc<tokio::sync::Mutex<Option<Cached>>>;

/// Credentials plus who they stand for (for cache keys and clients).
#[derive(Clone)]
pub struct Resolved {
    pub credentials: Credentials,
    pub identity: Key,
}

pub struct Creds {
    defaults: AwsArgs,
    http: reqwest::Client,
    timeout: Duration,
    slots: BoundedMap<Slot>,
    sts: BoundedMap<aws_sdk_sts::Client>,
    /// AssumeRoleWithWebIdentity calls and agent calls made (tests, metrics).
    pub sts_calls: AtomicU64,
    pub agent_calls: AtomicU64,
}

impl Creds {
    pub fn new(defaults: AwsArgs, timeout: Duration) -> Self {
        Self {
            defaults,
            http: reqwest::Client::builder()
                .timeout(timeout)
                .connect_timeout(Duration::from_secs(2).min(timeout))
                .no_proxy()
                .build()
                .unwrap_or_default(),
            timeout,
            slots: BoundedMap::new(SLOTS),
            sts: BoundedMap::new(Bounds {
                max_entries: 64,
                max_weight: 0,
                idle: Duration::from_secs(3600),
            }),
            sts_calls: AtomicU64::new(0),
            agent_calls: AtomicU64::new(0),
        }
    }

    /// The pod's token for the audience its auth needs, or a refusal that
    /// names the audience the CSIDriver must request.
    fn token<'a>(ctx: &'a MountContext, audience: &str) -> Result<&'a str, ObjectError> {
        ctx.token_for(audience)
            .map(|t| t.token.expose())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                ObjectError::FailedPrecondition(format!(
                    "no service-account token for audience {audience:?}: add \
                     {{audience: {audience}}} to the CSIDriver's tokenRequests"
                ))
            })
    }

    /// The pod's credentials for this Mount's auth.
    pub async fn resolve(
        &self,
        params: &AwsParams,
        ctx: &MountContext,
    ) -> Result<Resolved, ObjectError> {
        let audience = params.audience();
        let token = Self::token(ctx, audience)?;
        let key = match &params.auth {
            Auth::Irsa { role_arn } => KeyBuilder::new("aws-irsa")
                .key(&fingerprint(token))
                .field(role_arn)
                .field(&params.region),
            Auth::PodIdentity { address } => KeyBuilder::new("aws-pod-identity")
                .key(&fingerprint(token))
                .field(match address {
                    AddressType::Auto => "auto",
                    AddressType::Ipv4 => "ipv4",
                    AddressType::Ipv6 => "ipv6",
                }),
        }
        .finish();
        let slot = self.slots.get_or_insert_with(key, Slot::default);
        let mut cached = slot.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| Instant::now() < c.use_until) {
            return Ok(Resolved {
                credentials: c.credentials.clone(),
                identity: key,
            });
        }
        let started = Instant::now();
        let credentials = match &params.auth {
            Auth::Irsa { role_arn } => self.assume_role(params, ctx, role_arn, token).await?,
            Auth::PodIdentity { address } => self.pod_identity(*address, token).await?,
        };
        if let Some(expiry) = credentials.expiry() {
            let ttl = expiry
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let margin = (ttl / 10).max(Duration::from_secs(60));
            if ttl > margin {
                *cached = Some(Cached {
                    credentials: credentials.clone(),
                    use_until: started + (ttl - margin),
                });
            }
        }
        Ok(Resolved {
            credentials,
            identity: key,
        })
    }

    fn sts_client(&self, region: &str) -> aws_sdk_sts::Client {
        regional_client!(
            aws_sdk_sts,
            self.sts,
            "aws-sts-client",
            region,
            &self.defaults.sts_endpoint,
            self.timeout
        )
    }

    /// STS AssumeRoleWithWebIdentity (an unsigned call: the token is the
    /// credential). The session name says which pod asked, as CloudTrail
    /// shows it.
    async fn assume_role(
        &self,
        params: &AwsParams,
        ctx: &MountContext,
        role_arn: &str,
        token: &str,
    ) -> Result<Credentials, ObjectError> {
        self.sts_calls.fetch_add(1, Ordering::Relaxed);
        let out = self
            .sts_client(&params.region)
            .assume_role_with_web_identity()
            .role_arn(role_arn)
            .role_session_name(session_name(ctx))
            .web_identity_token(token)
            .send()
            .await
            .map_err(|e| {
                let why = super::describe_sdk_error(&e);
                match why.class {
                    super::Class::Client => ObjectError::PermissionDenied(format!(
                        "STS refused AssumeRoleWithWebIdentity into {role_arn} for {}: {}; the \
                         role's trust policy must allow this service account through the \
                         cluster's OIDC provider (audience {IRSA_AUDIENCE})",
                        ctx.pod.service_account_id().unwrap_or_default(),
                        why.text
                    )),
                    _ => ObjectError::Unavailable(format!("STS: {}", why.text)),
                }
            })?;
        let c = out.credentials().ok_or_else(|| {
            ObjectError::Unavailable(
                "STS answered AssumeRoleWithWebIdentity without credentials".into(),
            )
        })?;
        let expiry = SystemTime::try_from(*c.expiration()).ok();
        Ok(Credentials::new(
            c.access_key_id(),
            c.secret_access_key(),
            Some(c.session_token().to_string()),
            expiry,
            "coffer-irsa",
        ))
    }

    /// The EKS Pod Identity agent: `GET` with the pod's token as the
    /// `Authorization` header; `{AccessKeyId, SecretAccessKey, Token,
    /// Expiration}` back. `auto` tries IPv4, then IPv6.
    async fn pod_identity(
        &self,
        address: AddressType,
        token: &str,
    ) -> Result<Credentials, ObjectError> {
        let endpoints: Vec<&str> = match (&self.defaults.pod_identity_endpoint, address) {
            (Some(ep), _) => vec![ep.as_str()],
            (None, AddressType::Ipv4) => vec![POD_IDENTITY_IPV4],
            (None, AddressType::Ipv6) => vec![POD_IDENTITY_IPV6],
            (None, AddressType::Auto) => vec![POD_IDENTITY_IPV4, POD_IDENTITY_IPV6],
        };
        let mut last = None;
        for endpoint in endpoints {
            match self.agent_call(endpoint, token).await {
                Ok(c) => return Ok(c),
                // Only an unreachable agent is worth the other address.
                Err(e @ ObjectError::Unavailable(_)) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            ObjectError::Unavailable("no EKS Pod Identity agent endpoint".into())
        }))
    }

    async fn agent_call(&self, endpoint: &str, token: &str) -> Result<Credentials, ObjectError> {
        self.agent_calls.fetch_add(1, Ordering::Relaxed);
        let resp = self
            .http
            .get(endpoint)
            .header(reqwest::header::AUTHORIZATION, token)
            .send()
            .await
            .map_err(|e| {
                ObjectError::Unavailable(format!(
                    "cannot reach the EKS Pod Identity agent at {endpoint}: {}",
                    crate::error::cause_chain(&e)
                ))
            })?;
        let status = resp.status();
        let body = crate::backend::read_capped(
            resp,
            MAX_AGENT_ANSWER,
            &format!("the EKS Pod Identity agent at {endpoint}"),
        )
        .await?;
        let json: Json = serde_json::from_slice(&body).unwrap_or(Json::Null);
        if !status.is_success() {
            let said = json
                .get("message")
                .and_then(Json::as_str)
                .map(|m| format!(": {}", shown(m)))
                .unwrap_or_default();
            let code = json
                .get("code")
                .and_then(Json::as_str)
                .map(|c| format!(" {}", shown(c)))
                .unwrap_or_default();
            let msg = format!(
                "the EKS Pod Identity agent refused the pod's token ({}{code}){said}; the pod's \
                 service account needs a Pod Identity association (audience {POD_IDENTITY_AUDIENCE})",
                status.as_u16()
            );
            return Err(if status.is_server_error() {
                ObjectError::Unavailable(msg)
            } else {
                ObjectError::PermissionDenied(msg)
            });
        }
        let field = |k: &str| json.get(k).and_then(Json::as_str).filter(|v| !v.is_empty());
        let (Some(id), Some(secret), Some(session)) = (
            field("AccessKeyId"),
            field("SecretAccessKey"),
            field("Token"),
        ) else {
            return Err(ObjectError::Unavailable(
                "the EKS Pod Identity agent answered without AccessKeyId, SecretAccessKey and Token"
                    .into(),
            ));
        };
        let expiry = field("Expiration").and_then(|e| humantime::parse_rfc3339_weak(e).ok());
        Ok(Credentials::new(
            id,
            secret,
            Some(session.to_string()),
            expiry,
            "coffer-pod-identity",
        ))
    }
}

/// `coffer-<namespace>-<pod>`, within STS's 64 characters of `[\w+=,.@-]`.
fn session_name(ctx: &MountContext) -> String {
    let raw = format!("coffer-{}-{}", ctx.pod.namespace, ctx.pod.name);
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if cleaned.len() < 2 {
        "coffer".into()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_sts() {
        let mut ctx = MountContext::parse("{}", "", "", "/t").unwrap();
        ctx.attributes_mut().pod.namespace = "team-a".into();
        ctx.attributes_mut().pod.name = "web-7d9f".into();
        assert_eq!(session_name(&ctx), "coffer-team-a-web-7d9f");
        ctx.attributes_mut().pod.name = "x".repeat(100);
        assert_eq!(session_name(&ctx).len(), 64);
        ctx.attributes_mut().pod.name = "a/b c".into();
        assert_eq!(session_name(&ctx), "coffer-team-a-a-b-c");
    }
}
