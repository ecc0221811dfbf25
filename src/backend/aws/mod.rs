//! The `aws` backend (AWS Secrets Manager and SSM Parameter Store),
//! compatible with aws/secrets-store-csi-driver-provider-aws: its SPC form
//! (`params`), credentials as the pod only (`auth`: IRSA or EKS Pod
//! Identity), the official SDK with its retries off (coffer's `limit`
//! layer decides), SSM reads batched ten names per call across a Mount,
//! `jmesPath` files, and failover to a second region on outages.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use aws_credential_types::Credentials;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use super::{Backend, FetchLimits, Fetched};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::config::AwsArgs;
use crate::error::{shown, ObjectError};
use crate::key::{Key, KeyBuilder};
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

/// The kept SDK client of one service for `region`, built once: the
/// SDK's own retries off (coffer's limit layer decides), coffer's
/// timeouts, the flag's endpoint for every region, and any further
/// builder settings given.
macro_rules! regional_client {
    ($sdk:ident, $map:expr, $tag:literal, $region:expr, $endpoint:expr, $timeout:expr $(, $setting:ident($value:expr))*) => {{
        let key = crate::key::Key::of($tag, &[$region]);
        match $map.get(&key) {
            Some(client) => client,
            None => {
                let mut b = $sdk::config::Builder::new()
                    .behavior_version($sdk::config::BehaviorVersion::latest())
                    .region($sdk::config::Region::new($region.to_string()))
                    .retry_config($sdk::config::retry::RetryConfig::disabled())
                    .timeout_config(crate::backend::aws::timeouts($timeout))
                    $(.$setting($value))*;
                if let Some(ep) = $endpoint {
                    b = b.endpoint_url(ep.trim_end_matches('/'));
                }
                let client = $sdk::Client::from_conf(b.build());
                $map.insert(key, client.clone());
                client
            }
        }
    }};
}

pub mod auth;
pub mod params;

use params::{Auth, AwsObject, AwsParams, Kind, Target};

/// Largest value a `jmesPath` reads: JMESPath's tree costs about sixty
/// times the text, and AWS's own values are at most 64 KiB.
const MAX_JMES_INPUT: usize = 256 * 1024;

/// SSM's GetParameters takes at most ten names.
pub const SSM_BATCH: usize = 10;

/// Node label the region is taken from when neither SPC nor flag names one.
pub const REGION_LABEL: &str = "topology.kubernetes.io/region";

pub(crate) fn timeouts(t: Duration) -> aws_smithy_types::timeout::TimeoutConfig {
    aws_smithy_types::timeout::TimeoutConfig::builder()
        .operation_attempt_timeout(t)
        .connect_timeout(Duration::from_secs(2).min(t))
        .build()
}

/// Refuses an answer larger than any value coffer may mount (with room
/// for JSON's escaping) before the SDK reads it into memory: a server
/// that lies about what it sends costs a header, not its body.
#[derive(Debug)]
struct SizeGuard(u64);

impl aws_smithy_runtime_api::client::interceptors::Intercept for SizeGuard {
    fn name(&self) -> &'static str {
        "coffer-size-guard"
    }

    fn read_before_deserialization(
        &self,
        ctx: &aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextRef<'_>,
        _rc: &aws_smithy_runtime_api::client::runtime_components::RuntimeComponents,
        _cfg: &mut aws_smithy_types::config_bag::ConfigBag,
    ) -> Result<(), aws_smithy_runtime_api::box_error::BoxError> {
        let len = ctx
            .response()
            .headers()
            .get("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        match len {
            Some(n) if n > self.0 => Err(format!(
                "the answer is {n} bytes, more than coffer reads ({})",
                self.0
            )
            .into()),
            _ => Ok(()),
        }
    }
}

/// What kind of failure an AWS call met: only outages move to the
/// failover region, and only outages and throttling are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Class {
    /// AWS said no (4xx): final.
    Client,
    /// AWS asked to slow down.
    Throttled,
    /// AWS failed (5xx) or answered something unreadable.
    Server,
    /// No answer: connection refused, reset, timed out.
    Connection,
}

pub(crate) struct Described {
    pub class: Class,
    pub code: String,
    pub text: String,
}

const THROTTLING: &[&str] = &[
    "ThrottlingException",
    "Throttling",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "ThrottledException",
    "RequestThrottledException",
    "SlowDown",
];

/// An SDK failure in words that name AWS's code and message, never a
/// request or response body.
pub(crate) fn describe_sdk_error<E>(e: &SdkError<E, HttpResponse>) -> Described
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    match e {
        SdkError::ServiceError(se) => {
            let status = se.raw().status().as_u16();
            let code = e.code().unwrap_or("").to_string();
            let message = e.message().map(shown).unwrap_or_default();
            let class = if THROTTLING.contains(&code.as_str()) || status == 429 {
                Class::Throttled
            } else if status >= 500 {
                Class::Server
            } else {
                Class::Client
            };
            let text = match (code.is_empty(), message.is_empty()) {
                (false, false) => format!("{code} ({status}): {message}"),
                (false, true) => format!("{code} ({status})"),
                (true, _) => format!("HTTP {status}"),
            };
            Described { class, code, text }
        }
        SdkError::TimeoutError(_) => Described {
            class: Class::Connection,
            code: String::new(),
            text: "timed out".into(),
        },
        SdkError::DispatchFailure(d) => Described {
            class: Class::Connection,
            code: String::new(),
            text: format!(
                "cannot connect: {}",
                d.as_connector_error()
                    .map(|c| crate::error::cause_chain(c))
                    .unwrap_or_else(|| "dispatch failure".into())
            ),
        },
        SdkError::ResponseError(_) => Described {
            class: Class::Server,
            code: String::new(),
            text: format!("an unreadable answer ({})", crate::error::cause_chain(e)),
        },
        _ => Described {
            class: Class::Client,
            code: String::new(),
            text: crate::error::cause_chain(e),
        },
    }
}

/// A failure in one region, still knowing whether it may fail over.
struct RegionError {
    class: Class,
    error: ObjectError,
}

fn region_error(d: Described, service: &str, region: &str, what: &str) -> RegionError {
    let msg = format!("{service} in {region}: {} ({what})", d.text);
    let error = match d.class {
        Class::Connection | Class::Server => ObjectError::Unavailable(msg),
        Class::Throttled => ObjectError::Unavailable(format!("{msg}; throttled by AWS")),
        Class::Client => match d.code.as_str() {
            "ResourceNotFoundException"
            | "ParameterNotFound"
            | "ParameterVersionNotFound"
            | "ParameterVersionLabelNotFound" => ObjectError::NotFound(msg),
            "AccessDeniedException"
            | "AccessDenied"
            | "UnrecognizedClientException"
            | "InvalidClientTokenId"
            | "ExpiredTokenException"
            | "ExpiredToken"
            | "InvalidSignatureException"
            | "IncompleteSignature"
            | "SignatureDoesNotMatch" => ObjectError::PermissionDenied(msg),
            "DecryptionFailure" | "InvalidKeyId" | "KMSAccessDeniedException" => {
                ObjectError::FailedPrecondition(format!(
                    "{msg}; the value could not be decrypted with its KMS key: the pod's role \
                     needs kms:Decrypt on that key"
                ))
            }
            _ => ObjectError::Invalid(msg),
        },
    };
    RegionError {
        class: d.class,
        error,
    }
}

/// One region's answer for one name.
#[derive(Clone)]
struct Answer {
    value: SecretBytes,
    version: String,
}

/// The SSM names a Mount asks for, in SPC order, deduplicated: objects are
/// batched ten names per GetParameters call in this order.
#[derive(Default)]
struct SsmPlan(Mutex<Vec<(Target, Option<Target>)>>);

static PARAMS: std::sync::LazyLock<Key> = std::sync::LazyLock::new(|| Key::of("aws-params", &[]));
static SSM_PLAN: std::sync::LazyLock<Key> =
    std::sync::LazyLock::new(|| Key::of("aws-ssm-plan", &[]));
static SSM_BATCHES: std::sync::LazyLock<Key> =
    std::sync::LazyLock::new(|| Key::of("aws-ssm-batches", &[]));

/// Clients kept: one per (service, region) in use.
const CLIENTS: Bounds = Bounds {
    max_entries: 64,
    max_weight: 0,
    idle: Duration::from_secs(3600),
};

pub struct AwsBackend {
    defaults: AwsArgs,
    /// The region for SPCs without one: flag, `AWS_REGION`, node label.
    node_region: Option<String>,
    timeout: Duration,
    /// Largest answer read from AWS (see [`SizeGuard`]).
    max_answer: u64,
    creds: auth::Creds,
    sm: BoundedMap<aws_sdk_secretsmanager::Client>,
    ssm: BoundedMap<aws_sdk_ssm::Client>,
    /// GetParameters calls made (tests count batching with it).
    pub ssm_calls: std::sync::atomic::AtomicU64,
}

impl AwsBackend {
    pub fn new(
        defaults: AwsArgs,
        node_labels: &[String],
        timeout: Duration,
        max_value_bytes: u64,
    ) -> Self {
        let label = node_labels.iter().find_map(|l| {
            l.split_once('=')
                .filter(|(k, _)| k.trim() == REGION_LABEL)
                .map(|(_, v)| v.trim().to_string())
        });
        let node_region = defaults
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .filter(|r| !r.trim().is_empty())
            .or(label);
        Self {
            creds: auth::Creds::new(defaults.clone(), timeout),
            defaults,
            node_region,
            timeout,
            max_answer: max_value_bytes.saturating_mul(4).saturating_add(64 * 1024),
            sm: BoundedMap::new(CLIENTS),
            ssm: BoundedMap::new(CLIENTS),
            ssm_calls: Default::default(),
        }
    }

    fn params(&self, ctx: &MountContext) -> Result<Arc<AwsParams>, ObjectError> {
        ctx.memo.once(&PARAMS, || {
            AwsParams::from_context(ctx, &self.defaults, self.node_region.as_deref()).map(Arc::new)
        })
    }

    fn sm_client(&self, region: &str) -> aws_sdk_secretsmanager::Client {
        regional_client!(
            aws_sdk_secretsmanager,
            self.sm,
            "aws-sm-client",
            region,
            &self.defaults.secretsmanager_endpoint,
            self.timeout,
            identity_cache(aws_sdk_secretsmanager::config::IdentityCache::no_cache()),
            interceptor(SizeGuard(self.max_answer))
        )
    }

    fn ssm_client(&self, region: &str) -> aws_sdk_ssm::Client {
        regional_client!(
            aws_sdk_ssm,
            self.ssm,
            "aws-ssm-client",
            region,
            &self.defaults.ssm_endpoint,
            self.timeout,
            identity_cache(aws_sdk_ssm::config::IdentityCache::no_cache()),
            interceptor(SizeGuard(self.max_answer))
        )
    }

    fn endpoint_host(&self, kind: Kind, region: &str) -> String {
        let (flag, service) = match kind {
            Kind::SecretsManager => (&self.defaults.secretsmanager_endpoint, "secretsmanager"),
            Kind::Ssm => (&self.defaults.ssm_endpoint, "ssm"),
        };
        match flag {
            Some(ep) => ep.trim_end_matches('/').to_string(),
            None => format!("{service}.{region}.amazonaws.com"),
        }
    }

    /// Secrets Manager GetSecretValue in one region.
    async fn get_secret(
        &self,
        region: &str,
        target: &Target,
        creds: &Credentials,
        limits: FetchLimits,
    ) -> Result<Answer, RegionError> {
        let mut req = self
            .sm_client(region)
            .get_secret_value()
            .secret_id(&target.name);
        if let Some(v) = &target.version {
            req = req.version_id(v);
        }
        if let Some(l) = &target.label {
            req = req.version_stage(l);
        }
        let what = format!("secret {}", shown(&target.name));
        let mut out = req
            .customize()
            .config_override(
                aws_sdk_secretsmanager::config::Builder::default()
                    .credentials_provider(creds.clone()),
            )
            .send()
            .await
            .map_err(|e| region_error(describe_sdk_error(&e), "Secrets Manager", region, &what))?;
        let value = match (out.secret_string.take(), out.secret_binary.take()) {
            (Some(s), _) => s.into_bytes(),
            (None, Some(b)) => b.into_inner(),
            (None, None) => {
                return Err(RegionError {
                    class: Class::Client,
                    error: ObjectError::NotFound(format!(
                    "Secrets Manager in {region}: {what} has neither SecretString nor SecretBinary"
                )),
                })
            }
        };
        let value = SecretBytes::new(value);
        limits.check(value.len()).map_err(|error| RegionError {
            class: Class::Client,
            error,
        })?;
        let version = out.version_id.take().unwrap_or_default();
        Ok(Answer { value, version })
    }

    /// SSM GetParameters (decrypted) for up to ten names in one region.
    async fn get_parameters(
        &self,
        region: &str,
        targets: &[Target],
        creds: &Credentials,
        limits: FetchLimits,
    ) -> Result<Vec<Result<Answer, ObjectError>>, RegionError> {
        self.ssm_calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let names: Vec<String> = targets.iter().map(Target::ssm_name).collect();
        let what = if names.len() == 1 {
            format!("parameter {}", shown(&names[0]))
        } else {
            format!("{} parameters", names.len())
        };
        let mut out = self
            .ssm_client(region)
            .get_parameters()
            .set_names(Some(names.clone()))
            .with_decryption(true)
            .customize()
            .config_override(
                aws_sdk_ssm::config::Builder::default().credentials_provider(creds.clone()),
            )
            .send()
            .await
            .map_err(|e| region_error(describe_sdk_error(&e), "SSM", region, &what))?;
        let invalid = out.invalid_parameters.take().unwrap_or_default();
        let mut found = out.parameters.take().unwrap_or_default();
        let answers = targets
            .iter()
            .zip(&names)
            .map(|(t, requested)| {
                if invalid.iter().any(|i| i == requested || i == &t.name) {
                    return Err(ObjectError::NotFound(format!(
                        "SSM in {region}: no parameter {} (GetParameters listed it in InvalidParameters)",
                        shown(requested)
                    )));
                }
                let pos = found.iter().position(|p| ssm_matches(p, t)).ok_or_else(|| {
                    ObjectError::NotFound(format!(
                        "SSM in {region}: GetParameters did not return {}",
                        shown(requested)
                    ))
                })?;
                // Several objects may ask for the same name: keep it.
                let p = &mut found[pos];
                let value = SecretBytes::new(p.value.clone().unwrap_or_default().into_bytes());
                limits.check(value.len())?;
                Ok(Answer {
                    value,
                    version: p.version.to_string(),
                })
            })
            .collect();
        for p in &mut found {
            if let Some(v) = p.value.as_mut() {
                zeroize::Zeroize::zeroize(v);
            }
        }
        Ok(answers)
    }

    /// `call` in the primary region, then — only when that region is out —
    /// in the failover region with the failover object(s).
    async fn in_regions<R, T, F, Fut>(
        &self,
        params: &AwsParams,
        primary: &R,
        failover: Option<&R>,
        call: F,
    ) -> Result<T, ObjectError>
    where
        R: Clone,
        F: Fn(String, R) -> Fut,
        Fut: std::future::Future<Output = Result<T, RegionError>>,
    {
        let first = match call(params.region.clone(), primary.clone()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let (Some(region), Some(target), Class::Server | Class::Connection) =
            (&params.failover_region, failover, first.class)
        else {
            return Err(first.error);
        };
        match call(region.clone(), target.clone()).await {
            Ok(v) => {
                crate::metrics::METRICS.aws_failovers.inc();
                Ok(v)
            }
            Err(second) => Err(ObjectError::Unavailable(format!(
                "both regions failed: {}; failover region: {}",
                first.error, second.error
            ))),
        }
    }

    async fn secret(
        &self,
        params: &AwsParams,
        o: &AwsObject,
        creds: &Credentials,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Answer, ObjectError> {
        let key = request_key("aws-sm", &o.primary, o.failover.as_ref());
        ctx.memo
            .once_async(&key, || {
                self.in_regions(params, &o.primary, o.failover.as_ref(), |region, target| {
                    let creds = creds.clone();
                    async move { self.get_secret(&region, &target, &creds, limits).await }
                })
            })
            .await
    }

    /// This object's parameter from its batch's one GetParameters call.
    async fn parameter(
        &self,
        params: &AwsParams,
        o: &AwsObject,
        creds: &Credentials,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Answer, ObjectError> {
        let me = (o.primary.clone(), o.failover.clone());
        // The Mount's batches, worked out once (validation has noted every
        // SSM object by the time the first one is fetched).
        let planned = ctx.memo.once(&SSM_BATCHES, || {
            let plan: Arc<SsmPlan> = ctx.memo.get_or_default(&SSM_PLAN);
            let all = plan.0.lock().map(|l| l.clone()).unwrap_or_default();
            let batches = ssm_batches(&all);
            Arc::new((all, batches))
        });
        let (all, batches) = &*planned;
        let (batch, at) = match all.iter().position(|e| *e == me) {
            Some(pos) => {
                let b = batches
                    .iter()
                    .find(|b| b.contains(&pos))
                    .cloned()
                    .unwrap_or_else(|| vec![pos]);
                let at = b.iter().position(|i| *i == pos).unwrap_or(0);
                (
                    b.into_iter().map(|i| all[i].clone()).collect::<Vec<_>>(),
                    at,
                )
            }
            None => (vec![me], 0),
        };
        let key = batch
            .iter()
            .fold(KeyBuilder::new("aws-ssm-batch"), |b, (p, f)| {
                b.key(&request_key("t", p, f.as_ref()))
            })
            .finish();
        let primaries: Vec<Target> = batch.iter().map(|(p, _)| p.clone()).collect();
        // A failover batch asks each object's failover target (its own
        // name where it has no failover object).
        let failovers: Option<Vec<Target>> = batch
            .iter()
            .map(|(_, f)| f.clone())
            .collect::<Option<Vec<_>>>();
        let answers: Arc<Vec<Result<Answer, ObjectError>>> = ctx
            .memo
            .once_async(&key, || async {
                self.in_regions(params, &primaries, failovers.as_ref(), |region, targets| {
                    let creds = creds.clone();
                    async move { self.get_parameters(&region, &targets, &creds, limits).await }
                })
                .await
                .map(Arc::new)
            })
            .await?;
        answers
            .get(at)
            .cloned()
            .unwrap_or_else(|| Err(ObjectError::Internal("SSM batch answer is short".into())))
    }
}

fn request_key(tag: &str, primary: &Target, failover: Option<&Target>) -> Key {
    let b = KeyBuilder::new(tag)
        .field(&primary.name)
        .opt(primary.version.as_deref())
        .opt(primary.label.as_deref());
    match failover {
        None => b.opt(None::<&str>),
        Some(f) => b
            .field(&f.name)
            .opt(f.version.as_deref())
            .opt(f.label.as_deref()),
    }
    .finish()
}

/// The Mount's SSM requests in GetParameters calls: SPC order, at most
/// ten per call, and a name at most once per call (answers carry the
/// name, and not every server says which selector each answers).
fn ssm_batches(all: &[(Target, Option<Target>)]) -> Vec<Vec<usize>> {
    let mut batches: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    for (i, (t, f)) in all.iter().enumerate() {
        let clash = current.iter().any(|&j| {
            let (tj, fj) = &all[j];
            tj.name == t.name || matches!((f, fj), (Some(a), Some(b)) if a.name == b.name)
        });
        if current.len() == SSM_BATCH || clash {
            batches.push(std::mem::take(&mut current));
        }
        current.push(i);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Does a returned parameter answer this request? By name or ARN (a name
/// is asked once per call) and, when asked for, the version.
fn ssm_matches(p: &aws_sdk_ssm::types::Parameter, t: &Target) -> bool {
    let named =
        p.name.as_deref() == Some(t.name.as_str()) || p.arn.as_deref() == Some(t.name.as_str());
    named
        && t.version
            .as_ref()
            .is_none_or(|v| p.version.to_string() == *v)
}

/// [`jmes_extract`] for `coffer::fuzzing`.
pub fn jmes_for_fuzzing(value: &[u8], expr: &str) -> Result<usize, String> {
    jmes_extract(value, expr, "fuzz")
        .map(|v| v.len())
        .map_err(|e| e.to_string())
}

/// A `jmesPath` item's value: the expression on the secret's JSON; the
/// result must be a string (as the AWS provider requires).
fn jmes_extract(value: &[u8], expr: &str, name: &str) -> Result<Vec<u8>, ObjectError> {
    let compiled = params::check_jmes(expr)?;
    if value.len() > MAX_JMES_INPUT {
        return Err(ObjectError::Invalid(format!(
            "jmesPath {}: the value of {} is {} bytes; jmesPath reads values up to {MAX_JMES_INPUT} \
             bytes (AWS's own limit is 64 KiB)",
            shown(expr),
            shown(name),
            value.len()
        )));
    }
    let not_json = || {
        ObjectError::Invalid(format!(
            "jmesPath {}: the value of {} is not JSON",
            shown(expr),
            shown(name)
        ))
    };
    // Straight into JMESPath's own values: no second copy of the tree.
    let text = std::str::from_utf8(value).map_err(|_| not_json())?;
    let data = jmespath::Variable::from_json(text).map_err(|_| not_json())?;
    let result = compiled.search(data);
    let result = result.map_err(|_| {
        ObjectError::Invalid(format!(
            "jmesPath {}: cannot be evaluated on the value of {} (a function met a value of the wrong type)",
            shown(expr),
            shown(name)
        ))
    })?;
    match &*result {
        jmespath::Variable::String(s) => Ok(s.as_bytes().to_vec()),
        jmespath::Variable::Null => Err(ObjectError::Invalid(format!(
            "jmesPath {} does not point to a value in {}",
            shown(expr),
            shown(name)
        ))),
        other => Err(ObjectError::Invalid(format!(
            "jmesPath {} in {} points to {}, not a string",
            shown(expr),
            shown(name),
            match other {
                jmespath::Variable::Bool(_) => "a boolean",
                jmespath::Variable::Number(_) => "a number",
                jmespath::Variable::Array(_) => "a list",
                jmespath::Variable::Object(_) => "an object",
                _ => "something else",
            }
        ))),
    }
}

#[async_trait]
impl Backend for AwsBackend {
    fn name(&self) -> &'static str {
        "aws"
    }

    /// Also notes the Mount's SSM names in order, for batching.
    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        let params = self.params(ctx)?;
        let o = AwsObject::from_spec(object, &params)?;
        if o.kind == Kind::Ssm {
            let plan: Arc<SsmPlan> = ctx.memo.get_or_default(&SSM_PLAN);
            let entry = (o.primary, o.failover);
            let mut list = plan.0.lock().unwrap_or_else(|p| p.into_inner());
            if !list.contains(&entry) {
                list.push(entry);
            }
        }
        Ok(())
    }

    /// Leftovers the AWS provider ignores too; near misses of its fields
    /// are refused as typos instead (see `AwsObject::from_spec`).
    fn ignored_fields<'a>(&self, object: &'a ObjectSpec) -> Vec<&'a str> {
        object.peer_leftovers(params::OBJECT_FIELDS, params::USER_FIELDS)
    }

    fn parameters(&self) -> Vec<String> {
        params::PARAMETERS.iter().map(|p| p.to_string()).collect()
    }

    fn token_audience(&self, _object: &ObjectSpec, ctx: &MountContext) -> Option<String> {
        Some(self.params(ctx).ok()?.audience().to_string())
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        let name = object
            .str_field(params::NAME_FIELD)
            .ok()
            .flatten()
            .unwrap_or(&object.name);
        match object.str_field(params::JMES_FIELD).ok().flatten() {
            Some(j) => format!("{name} jmesPath {j}"),
            None => name.to_string(),
        }
    }

    /// The service endpoint, the region, and the secret's name.
    fn placement(&self, object: &ObjectSpec, ctx: &MountContext) -> crate::policy::Placement {
        let Ok(params) = self.params(ctx) else {
            return crate::policy::Placement::default();
        };
        let Ok(o) = AwsObject::from_spec(object, &params) else {
            return crate::policy::Placement::default();
        };
        crate::policy::Placement {
            address: Some(self.endpoint_host(o.kind, &params.region)),
            namespace: None,
            region: Some(params.region.clone()),
            path: Some(o.primary.name),
        }
    }

    /// Two pods share a value only when AWS would authorize them alike:
    /// the same role (IRSA) or Pod Identity association, which both bind
    /// a service account, and the same regions and request.
    fn cache_key(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<Key> {
        let params = self.params(ctx).ok()?;
        let o = AwsObject::from_spec(object, &params).ok()?;
        let b = KeyBuilder::new("aws-cache");
        let b = match &params.auth {
            Auth::Irsa { role_arn } => b.field("irsa").field(role_arn),
            Auth::PodIdentity { .. } => b.field("pod-identity").field(""),
        };
        Some(
            b.field(ctx.pod.service_account_id()?)
                .field(&params.region)
                .opt(params.failover_region.as_deref())
                .field(o.kind.as_str())
                .key(&request_key("r", &o.primary, o.failover.as_ref()))
                .opt(o.jmes.as_deref())
                .finish(),
        )
    }

    fn limit_scope(&self, ctx: &MountContext) -> Option<Key> {
        let region = self.params(ctx).ok()?.region.clone();
        Some(Key::of("limit-aws", &[&region]))
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let params = self.params(ctx)?;
        let o = AwsObject::from_spec(object, &params)?;
        let creds = self.creds.resolve(&params, ctx).await?.credentials;
        let answer = match o.kind {
            Kind::SecretsManager => self.secret(&params, &o, &creds, ctx, limits).await?,
            Kind::Ssm => self.parameter(&params, &o, &creds, ctx, limits).await?,
        };
        let contents = match &o.jmes {
            None => answer.value,
            Some(expr) => {
                // Inline when small (AWS's values are), else off the async workers.
                let (value, expr, name) = (answer.value, expr.clone(), o.primary.name.clone());
                let extracted = crate::work::run(value.len(), move || {
                    jmes_extract(value.expose(), &expr, &name)
                })
                .await
                .map_err(|e| ObjectError::Unavailable(e.to_string()))??;
                SecretBytes::new(extracted)
            }
        };
        Ok(Fetched {
            contents,
            version: Some(answer.version)
                .filter(|v| !v.is_empty())
                .map(Into::into),
            shareable: true,
            immutable: o.pinned,
            memo: None,
        })
    }
}

impl AwsBackend {
    /// STS and Pod Identity agent calls made so far (for tests).
    pub fn credential_calls(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.creds.sts_calls.load(Relaxed),
            self.creds.agent_calls.load(Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssm_batches_hold_ten_distinct_names() {
        let t = |n: &str, v: Option<&str>| {
            (
                Target {
                    name: n.into(),
                    version: v.map(str::to_string),
                    label: None,
                },
                None,
            )
        };
        let all: Vec<_> = (0..25).map(|i| t(&format!("/p{i}"), None)).collect();
        let sizes: Vec<usize> = ssm_batches(&all).iter().map(Vec::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
        let all = vec![
            t("/a", None),
            t("/b", None),
            t("/a", Some("1")),
            t("/c", None),
        ];
        assert_eq!(ssm_batches(&all), [vec![0, 1], vec![2, 3]]);
    }

    #[test]
    fn jmes_results_must_be_strings() {
        let v = br#"{"username": "u", "port": 5432, "nested": {"k": "v"}, "list": ["a"]}"#;
        assert_eq!(jmes_extract(v, "username", "s").unwrap(), b"u");
        assert_eq!(jmes_extract(v, "nested.k", "s").unwrap(), b"v");
        assert_eq!(jmes_extract(v, "list[0]", "s").unwrap(), b"a");
        let e = jmes_extract(v, "port", "s").unwrap_err().to_string();
        assert!(e.contains("a number, not a string"), "{e}");
        let e = jmes_extract(v, "missing", "s").unwrap_err().to_string();
        assert!(e.contains("does not point to a value"), "{e}");
        let e = jmes_extract(b"hunter2", "a", "s").unwrap_err().to_string();
        assert!(e.contains("not JSON") && !e.contains("hunter2"), "{e}");
    }
}
