//! The Mount pipeline: request → typed context → validated objects → checked
//! paths → concurrent fetches under one deadline → decoded, versioned files.
//! All-or-nothing: any failure returns an error and no file at all.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future;
use futures::stream::{self, StreamExt};
use futures::FutureExt;
use zeroize::Zeroizing;

use crate::audit::{self, Auditor, Record};
use crate::backend::{Backend, FetchLimits, Registry};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::cache::{Cache, Source};
use crate::error::{Failure, MountError, ObjectError};
use crate::key::{Key, KeyBuilder};
use crate::limit::{Call, Limiter};
use crate::paths;
use crate::proto;
use crate::render::{self, Files};
use crate::request::MountContext;
use crate::spc::{self, ObjectSpec};
use crate::version::VersionKey;
use crate::work;

#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Deadline for the whole Mount, below kubelet's 2 minutes.
    pub timeout: Duration,
    /// Cap on the summed size of all files in one response.
    pub max_response_bytes: u64,
    /// How many objects of one Mount are fetched at once.
    pub fetch_concurrency: usize,
    /// Backend for objects when neither the SPC nor the object names one.
    pub default_backend: String,
    /// `--azure-write-cert-and-key-in-separate-files`.
    pub azure_split_cert_key: bool,
    /// Serve cached values this old when the backend is unreachable, for
    /// SPCs that set no `staleIfError` (None = off).
    pub stale_if_error: Option<Duration>,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(100),
            max_response_bytes: 4 * 1024 * 1024,
            fetch_concurrency: 16,
            default_backend: "file".into(),
            azure_split_cert_key: false,
            stale_if_error: None,
        }
    }
}

impl From<work::WorkError> for MountError {
    fn from(e: work::WorkError) -> Self {
        match e {
            work::WorkError::Busy => MountError::Busy(e.to_string()),
            work::WorkError::Failed => MountError::Request(e.to_string()),
        }
    }
}

/// SPC parameter: default `refreshInterval` of its objects.
pub const REFRESH_PARAM: &str = "refreshInterval";
/// SPC parameter: serve cached values this old when the backend is down.
pub const STALE_PARAM: &str = "staleIfError";
/// The SPC parameters a [`Plan`] is parsed from (AWS's SPC-level
/// parameters decide which objects are in AWS's form).
const PLAN_PARAMS: [&str; 12] = [
    spc::AZURE_VAULT_PARAM,
    spc::BACKEND_PARAM,
    spc::OBJECTS_PARAM,
    spc::GCP_SECRETS_PARAM,
    render::FILES_PARAM,
    render::VERSIONS_FILE_PARAM,
    spc::AWS_SPC_MARKS[0],
    spc::AWS_SPC_MARKS[1],
    spc::AWS_SPC_MARKS[2],
    spc::AWS_SPC_MARKS[3],
    spc::AWS_SPC_MARKS[4],
    spc::AWS_SPC_MARKS[5],
];
/// Version reported for an optional object that does not exist.
pub const ABSENT_VERSION: &str = "absent";
/// Parsed object lists kept for unchanged SPCs, bounded by weight so a
/// few huge distinct SPCs cannot pin memory.
const PARSED_SPCS: Bounds = Bounds {
    max_entries: 512,
    max_weight: 16 * 1024 * 1024,
    idle: Duration::from_secs(3600),
};

/// What an SPC asks for, parsed once per distinct text: the objects to
/// fetch and the files to build from them.
pub struct Plan {
    pub objects: Arc<Vec<ObjectSpec>>,
    pub files: Option<Files>,
    /// Each object's names for the response and the audit log, worked out
    /// on first use and kept with the plan: the same on every poll.
    labels: Box<[OnceLock<Labels>]>,
}

/// An object's path, ObjectVersion id and audit address.
struct Labels {
    path: Arc<str>,
    id: Arc<str>,
    address: Arc<str>,
}

impl Labels {
    fn of(backend: &dyn Backend, object: &ObjectSpec) -> Self {
        Self {
            path: object.name.as_str().into(),
            id: backend.object_id(object).into(),
            address: backend.describe(object).into(),
        }
    }
}

impl Plan {
    /// Whether the render stage has anything to do.
    fn renders(&self) -> bool {
        self.files.is_some() || self.objects.iter().any(|o| o.expand)
    }
}

pub struct Mounter {
    backends: Registry,
    version_key: Arc<VersionKey>,
    config: MountConfig,
    cache: Arc<Cache>,
    limiter: Arc<Limiter>,
    auditor: Arc<Auditor>,
    policy: Arc<crate::policy::PolicyHandle>,
    /// Rotation polls send the same `objects` text every time: parse once.
    /// Only plans that passed validation are kept; failures never are.
    parsed: BoundedMap<Arc<Plan>>,
    /// Each volume's attributes text comes again with every poll: parse
    /// once (texts with tokens excepted).
    attributes: crate::request::AttributesMemo,
}

/// Every problem of `objects` that shows without fetching: output paths,
/// unknown backends, backend-specific fields. Shared by Mount and
/// `coffer check`, so both judge an SPC the same way.
pub fn check_objects(
    backends: &Registry,
    objects: &[ObjectSpec],
    ctx: &MountContext,
) -> Vec<Failure> {
    let mut failures = object_failures(objects, |object| {
        paths::validate_path(&object.name)
            .map_err(|e| ObjectError::Invalid(format!("{}: {e}", object.name_field)))
            .and_then(|_| render::check_object(object))
            .and_then(|_| check_for_caller(backends, object, ctx))
    });
    let outputs = render::object_outputs(objects);
    for e in paths::validate_path_set(outputs.iter().map(String::as_str)) {
        let object = match &e {
            paths::PathSetError::Duplicate(p) => p.clone(),
            paths::PathSetError::FileIsDirectory { file, .. } => file.clone(),
        };
        failures.push(Failure {
            object,
            error: ObjectError::Invalid(e.to_string()),
        });
    }
    failures
}

/// The part of [`check_objects`] that depends on who calls (a backend's
/// view of the pod: its namespace, its tokens): all that is left to check
/// of a plan whose own checks passed when it was kept.
fn check_for_caller(
    backends: &Registry,
    object: &ObjectSpec,
    ctx: &MountContext,
) -> Result<(), ObjectError> {
    backends
        .get(&object.backend)
        .and_then(|backend| backend.validate(object, ctx))
}

/// One failure per object that `check` refuses, in order.
fn object_failures(
    objects: &[ObjectSpec],
    check: impl Fn(&ObjectSpec) -> Result<(), ObjectError>,
) -> Vec<Failure> {
    objects
        .iter()
        .filter_map(|object| {
            check(object).err().map(|error| Failure {
                object: object.label(),
                error,
            })
        })
        .collect()
}

/// Warnings about `objects` that do not stop a Mount: fields a backend
/// ignores, as the peer provider whose form it reads ignores them.
pub fn object_warnings(backends: &Registry, objects: &[ObjectSpec]) -> Vec<(String, String)> {
    let mut warnings = Vec::new();
    for object in objects {
        let Ok(backend) = backends.get(&object.backend) else {
            continue;
        };
        let ignored = backend.ignored_fields(object);
        if !ignored.is_empty() {
            warnings.push((
                object.label(),
                format!(
                    "field(s) {} ignored by the {} backend, as the peer provider ignores them",
                    ignored
                        .iter()
                        .map(|f| crate::error::shown_bare(f))
                        .collect::<Vec<_>>()
                        .join(", "),
                    backend.name()
                ),
            ));
        }
    }
    warnings
}

/// The SPC-level parameters checked before any object: `refreshInterval`
/// and `staleIfError` must be durations.
pub fn check_parameters(ctx: &MountContext) -> Vec<Failure> {
    [REFRESH_PARAM, STALE_PARAM]
        .iter()
        .filter_map(|name| {
            let raw = ctx.parameters.get(*name)?.trim();
            if raw.is_empty() {
                return None;
            }
            spc::parse_duration_param(name, raw)
                .err()
                .map(|error| Failure {
                    object: format!("parameters.{name}"),
                    error,
                })
        })
        .collect()
}

/// An audit record about one object of this Mount, failed until told otherwise.
fn record<'a>(
    ctx: &'a MountContext,
    time: &'a str,
    object: &'a str,
    backend: &'a str,
    address: &'a str,
) -> Record<'a> {
    Record {
        time,
        audit: "mount",
        pod_namespace: audit::clip(&ctx.pod.namespace),
        pod_name: audit::clip(&ctx.pod.name),
        pod_uid: audit::clip(&ctx.pod.uid),
        service_account: audit::clip(&ctx.pod.service_account),
        spc: audit::clip(&ctx.spc_name),
        backend,
        object: audit::clip(object),
        address: audit::clip(address),
        version: None,
        source: "none",
        outcome: "error",
        code: "",
        rule: "",
    }
}

/// SPC-level cache settings of one Mount.
struct Freshness {
    ttl: Duration,
    stale_if_error: Option<Duration>,
}

/// A fetched, decoded object ready to become a `File`.
struct Ready {
    path: Arc<str>,
    mode: u32,
    /// Zeroized if the Mount fails after this object was fetched.
    contents: Zeroizing<Vec<u8>>,
    version: Arc<str>,
    /// An optional object that does not exist: a version, no file.
    absent: bool,
    /// The ObjectVersion id.
    id: Arc<str>,
    /// For the audit log.
    backend: &'static str,
    address: Arc<str>,
    source: &'static str,
}

impl Mounter {
    pub fn new(
        backends: Registry,
        version_key: VersionKey,
        config: MountConfig,
        cache: Arc<Cache>,
        limiter: Arc<Limiter>,
        auditor: Arc<Auditor>,
        policy: Arc<crate::policy::PolicyHandle>,
    ) -> Self {
        Self {
            policy,
            backends,
            version_key: Arc::new(version_key),
            config,
            cache,
            limiter,
            auditor,
            parsed: BoundedMap::new(PARSED_SPCS),
            attributes: crate::request::AttributesMemo::default(),
        }
    }

    pub fn config(&self) -> &MountConfig {
        &self.config
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn limiter(&self) -> &Arc<Limiter> {
        &self.limiter
    }

    fn freshness(&self, ctx: &MountContext) -> Result<Freshness, MountError> {
        let param = |name: &str| -> Result<Option<Duration>, MountError> {
            match ctx
                .parameters
                .get(name)
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
            {
                None => Ok(None),
                Some(raw) => spc::parse_duration_param(name, raw)
                    .map(Some)
                    .map_err(|e| MountError::Request(format!("parameter {e}"))),
            }
        };
        Ok(Freshness {
            ttl: param(REFRESH_PARAM)?.unwrap_or(self.cache.default_ttl()),
            stale_if_error: param(STALE_PARAM)?
                .or(self.config.stale_if_error)
                .filter(|d| !d.is_zero()),
        })
    }

    /// The memo key of the parameters the object list is parsed from
    /// (worked out once per distinct attributes text). Presence is part of
    /// the key: `objects: ""` next to `secrets` parses differently from
    /// `secrets` alone.
    fn parsed_key(&self, ctx: &MountContext) -> (Key, usize) {
        ctx.plan_key(|parameters| {
            // One pass over the parameters rather than a map lookup per name.
            let mut texts: [Option<&str>; PLAN_PARAMS.len()] = [None; PLAN_PARAMS.len()];
            for (name, value) in parameters {
                if let Some(i) = PLAN_PARAMS.iter().position(|p| *p == name) {
                    texts[i] = Some(value);
                }
            }
            let size = texts.iter().flatten().map(|t| t.len()).sum();
            let key = texts
                .iter()
                .fold(
                    KeyBuilder::new("parsed-spc").field(&self.config.default_backend),
                    |b, t| b.opt(*t),
                )
                .finish();
            (key, size)
        })
    }

    /// The plan: from the memo, or parsed (off the async workers when it is
    /// large).
    async fn plan(&self, ctx: &MountContext) -> Result<(Arc<Plan>, bool), MountError> {
        let (key, size) = self.parsed_key(ctx);
        if let Some(found) = self.parsed.get(&key) {
            return Ok((found, true));
        }
        let parameters: std::collections::BTreeMap<String, String> = PLAN_PARAMS
            .iter()
            .filter_map(|k| ctx.parameters.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        let default_backend = self.config.default_backend.clone();
        let azure_split_cert_key = self.config.azure_split_cert_key;
        let parsed = work::run(size, move || {
            let objects = spc::parse_objects_with(
                &parameters,
                &spc::Defaults {
                    backend: &default_backend,
                    azure_split_cert_key,
                },
            );
            let files = Files::parse(&parameters);
            match (objects, files) {
                (Ok(objects), Ok(files)) => Ok(Plan {
                    labels: objects.iter().map(|_| OnceLock::new()).collect(),
                    objects: Arc::new(objects),
                    files,
                }),
                (objects, files) => {
                    let mut failures = objects.err().unwrap_or_default();
                    failures.extend(files.err().unwrap_or_default());
                    Err(failures)
                }
            }
        })
        .await
        .map_err(|e| MountError::Request(e.to_string()))?;
        let plan = parsed.map_err(|failures| MountError::Objects {
            total: failures.len().max(1),
            failures,
        })?;
        Ok((Arc::new(plan), false))
    }

    /// Keeps a validated plan for the next Mount of the same SPC.
    fn remember(&self, ctx: &MountContext, plan: &Arc<Plan>) {
        let (key, size) = self.parsed_key(ctx);
        // Measured: a parsed list weighs three to four times its text;
        // a compiled template about ten times.
        let files = plan.files.as_ref().map_or(0, |f| f.specs.len());
        // Each object's labels are cut from the text: twice it, at most.
        let weight = 12 * size as u64 + 512 * plan.objects.len() as u64 + 2048 * files as u64 + 512;
        self.parsed.insert_weighed(key, Arc::clone(plan), weight);
    }

    /// Parses only the request, so the caller can label its log span with
    /// the pod before the Mount runs. Attributes parsed for an earlier Mount
    /// of the same text are reused; a large request is parsed off the async
    /// workers.
    pub async fn parse(
        self: &Arc<Self>,
        req: proto::MountRequest,
    ) -> Result<MountContext, MountError> {
        let size = req.attributes.len() + req.secrets.len();
        let this = Arc::clone(self);
        work::run(size, move || {
            MountContext::parse_with(
                Some(&this.attributes),
                &req.attributes,
                &req.secrets,
                &req.permission,
                &req.target_path,
            )
        })
        .await
        .map_err(MountError::from)?
        .map_err(|e| MountError::Request(e.to_string()))
    }

    /// Runs a Mount for an already-parsed request and audits it. With a
    /// fail-closed audit log, nothing is returned unless its records are
    /// written.
    pub async fn mount(&self, ctx: Arc<MountContext>) -> Result<proto::MountResponse, MountError> {
        let result = self.mount_inner(&ctx).await;
        let ctx = &*ctx;
        let time = audit::Timestamp::now();
        let time = time.as_str();
        let base = |object, backend, address| record(ctx, time, object, backend, address);
        let summary;
        let audited = match &result {
            // Written straight from the objects: no list of records first.
            Ok((_, ready)) => {
                let records = ready.iter().map(|r| {
                    let mut rec = base(&r.path, r.backend, &r.address);
                    rec.version = Some(&r.version);
                    rec.source = r.source;
                    rec.outcome = "ok";
                    rec.code = "OK";
                    rec
                });
                self.auditor.record(records).await
            }
            Err(err) => {
                let mut records = Vec::new();
                let code = err.code().as_str();
                if let MountError::Policy { denials } = err {
                    for d in denials.iter().take(audit::MAX_FAILURE_RECORDS) {
                        let mut rec = base(&d.object, "", "");
                        rec.code = code;
                        rec.rule = &d.rule;
                        records.push(rec);
                    }
                }
                let objects: Vec<(&str, &'static str)> = match err {
                    MountError::Policy { .. } => Vec::new(),
                    MountError::Objects { failures, .. } => failures
                        .iter()
                        .map(|f| (f.object.as_str(), f.error.code().as_str()))
                        .collect(),
                    MountError::Deadline { outstanding, .. } => {
                        outstanding.iter().map(|o| (o.as_str(), code)).collect()
                    }
                    _ => vec![("", code)],
                };
                for (object, code) in objects.iter().take(audit::MAX_FAILURE_RECORDS) {
                    let mut rec = base(object, "", "");
                    rec.code = code;
                    records.push(rec);
                }
                if objects.len() > audit::MAX_FAILURE_RECORDS {
                    summary = format!(
                        "(and {} more objects)",
                        objects.len() - audit::MAX_FAILURE_RECORDS
                    );
                    let mut rec = base(&summary, "", "");
                    rec.code = code;
                    records.push(rec);
                }
                self.auditor.record(records.into_iter()).await
            }
        };
        match (result, audited) {
            (Ok((response, _)), Ok(())) => Ok(response),
            (Ok((mut response, _)), Err(e)) => {
                for f in &mut response.files {
                    zeroize::Zeroize::zeroize(&mut f.contents);
                }
                Err(MountError::Audit(e.to_string()))
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn mount_inner(
        &self,
        ctx: &Arc<MountContext>,
    ) -> Result<(proto::MountResponse, Vec<Ready>), MountError> {
        // Before any login or fetch: the tokens must be the pod's own, and
        // the node policy must allow every object.
        crate::request::check_token_identities(ctx).map_err(MountError::Identity)?;
        let plan = self.validate(ctx).await?;
        let denials = self.policy.check(&self.backends, &plan.objects, ctx);
        if !denials.is_empty() {
            for d in &denials {
                crate::metrics::METRICS
                    .policy_denials
                    .get_or_create(&crate::metrics::RuleLabel {
                        rule: d.rule.clone(),
                    })
                    .inc();
            }
            return Err(MountError::Policy { denials });
        }
        let freshness = self.freshness(ctx)?;
        let ready = self.fetch_all(ctx, &plan, &freshness).await?;
        let (ready, mut outputs) = if plan.renders() {
            self.render(&plan, ctx, ready).await?
        } else {
            (ready, Vec::new())
        };
        // Quick refusal before copying anything into a response.
        let total: u64 = ready
            .iter()
            .map(|r| r.contents.len() as u64)
            .chain(outputs.iter().map(|o| o.contents.len() as u64))
            .sum();
        if total > self.config.max_response_bytes {
            return Err(MountError::ResponseTooLarge {
                size: total,
                limit: self.config.max_response_bytes,
            });
        }
        let mut response = proto::MountResponse::default();
        let mut ready = ready;
        {
            // Ids must be unique in a response: a second object with the
            // same backend id (one secret, two extracted keys) gets its path.
            let ids = ready.iter().map(|r| (&*r.id, &*r.path, &*r.version)).chain(
                outputs
                    .iter()
                    .filter(|o| o.reported)
                    .map(|o| (o.path.as_str(), o.path.as_str(), o.version.as_str())),
            );
            let mut seen = std::collections::HashSet::with_capacity(ready.len());
            for (id, path, version) in ids {
                response.object_version.push(proto::ObjectVersion {
                    id: if seen.insert(id) {
                        id.to_string()
                    } else {
                        format!("{id}#{path}")
                    },
                    version: version.to_string(),
                });
            }
        }
        for (r, object) in ready.iter_mut().zip(plan.objects.iter()) {
            if r.absent || !object.render || object.expand {
                continue;
            }
            response.files.push(proto::File {
                path: r.path.to_string(),
                mode: r.mode as i32,
                contents: std::mem::take(&mut *r.contents),
            });
        }
        for out in &mut outputs {
            response.files.push(proto::File {
                path: out.path.clone(),
                mode: out.mode as i32,
                contents: std::mem::take(&mut *out.contents),
            });
        }
        // The driver's receive limit applies to the encoded message, paths
        // and versions included.
        let encoded = prost::Message::encoded_len(&response) as u64;
        if encoded > self.config.max_response_bytes {
            for f in &mut response.files {
                zeroize::Zeroize::zeroize(&mut f.contents);
            }
            return Err(MountError::ResponseTooLarge {
                size: encoded,
                limit: self.config.max_response_bytes,
            });
        }
        Ok((response, ready))
    }

    /// Everything that can be checked without fetching, for every object
    /// and file.
    async fn validate(&self, ctx: &MountContext) -> Result<Arc<Plan>, MountError> {
        let (plan, memoised) = self.plan(ctx).await?;
        let objects = &plan.objects;
        // Once per Mount: a span field recorded twice is printed twice.
        tracing::Span::current().record("objects", objects.len());
        if memoised {
            // Validated when it was kept (paths, render fields, the path
            // set); only the checks that depend on the caller remain.
            let failures = object_failures(objects, |object| {
                check_for_caller(&self.backends, object, ctx)
            });
            if failures.is_empty() {
                return Ok(plan);
            }
            return Err(MountError::Objects {
                total: objects.len(),
                failures,
            });
        }
        let mut failures = check_objects(&self.backends, objects, ctx);
        if let Some(files) = &plan.files {
            failures.extend(files.check(objects));
        }
        if failures.is_empty() {
            // Once per distinct SPC, not on every rotation poll.
            for (object, warning) in object_warnings(&self.backends, objects)
                .into_iter()
                .take(crate::error::LISTED_FAILURES)
            {
                tracing::warn!(object = %crate::error::shown(&object), "{warning}");
            }
            self.remember(ctx, &plan);
            Ok(plan)
        } else {
            Err(MountError::Objects {
                total: objects.len() + plan.files.as_ref().map_or(0, |f| f.specs.len()),
                failures,
            })
        }
    }

    /// The render stage: expanded objects, `files`, the versions file.
    /// Off the async workers when the values read are large.
    async fn render(
        &self,
        plan: &Arc<Plan>,
        ctx: &MountContext,
        ready: Vec<Ready>,
    ) -> Result<(Vec<Ready>, Vec<render::Output>), MountError> {
        let backends = plan
            .objects
            .iter()
            .map(|o| self.backends.get(&o.backend).map(Arc::clone))
            .collect::<Result<Vec<Arc<dyn Backend>>, _>>()
            .map_err(|e| MountError::Request(e.to_string()))?;
        let plan = Arc::clone(plan);
        let version_key = Arc::clone(&self.version_key);
        let default_mode = ctx.default_mode;
        let max_bytes = usize::try_from(self.config.max_response_bytes).unwrap_or(usize::MAX);
        let bytes: usize = ready.iter().map(|r| r.contents.len()).sum();
        let templated = plan.files.as_ref().is_some_and(Files::has_templates);
        let job = move || {
            let views: Vec<_> = backends
                .iter()
                .zip(plan.objects.iter())
                .map(|(backend, object)| {
                    move |value: serde_json::Value| backend.data_view(object, value)
                })
                .collect();
            let inputs: Vec<render::Input<'_>> = ready
                .iter()
                .zip(plan.objects.iter())
                .zip(&views)
                .map(|((r, object), view)| render::Input {
                    object,
                    contents: &r.contents,
                    version: &r.version,
                    absent: r.absent,
                    data_view: view,
                })
                .collect();
            let plain: Vec<(String, String)> = ready
                .iter()
                .zip(plan.objects.iter())
                .filter(|(r, o)| o.render && !o.expand && !r.absent)
                .map(|(r, _)| (r.path.to_string(), r.version.to_string()))
                .collect();
            let settings = render::Settings {
                default_mode,
                version_key: &version_key,
                max_bytes,
            };
            let built = render::build(plan.files.as_ref(), &inputs, &plain, &settings);
            drop(inputs);
            (ready, built)
        };
        // A template's cost is bounded by its fuel, not by its inputs: a
        // hostile one may burn its whole budget (tens of ms) on a few bytes,
        // so templates always render off the async workers, where they
        // cannot stall other Mounts or /healthz. Formats and `expand` are
        // linear in their inputs: inline when small, like any parse.
        let (ready, built) = if templated {
            work::run_bounded(move || {
                let (ready, built) = job();
                // A failed render is usually one that spent its budget:
                // give the megabytes it freed back at once, so a stream of
                // them cannot ratchet the heap up.
                if built.is_err() {
                    work::release_memory();
                }
                (ready, built)
            })
            .await
        } else {
            work::run(bytes, job).await
        }
        .map_err(MountError::from)?;
        let outputs = built.map_err(|failures| MountError::Objects {
            total: failures.len(),
            failures,
        })?;
        Ok((ready, outputs))
    }

    async fn fetch_all(
        &self,
        ctx: &Arc<MountContext>,
        plan: &Plan,
        freshness: &Freshness,
    ) -> Result<Vec<Ready>, MountError> {
        let objects = &plan.objects;
        let deadline = tokio::time::Instant::now() + self.config.timeout;
        // Which fetches finished, so a Mount past its deadline can name the
        // objects it was still waiting for.
        let finished: Arc<[AtomicBool]> = objects.iter().map(|_| AtomicBool::new(false)).collect();
        let limits = FetchLimits {
            max_bytes: self.config.max_response_bytes,
        };
        // Build the futures eagerly: a `map` closure over borrowed objects
        // trips the compiler's higher-ranked Send check inside tonic.
        let futures: Vec<_> = objects
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let finished = Arc::clone(&finished);
                async move {
                    let result = self
                        .fetch_one(ctx, plan, i, limits, freshness, deadline)
                        .await;
                    finished[i].store(true, Ordering::Release);
                    (i, result)
                }
            })
            .collect();
        let concurrency = self.config.fetch_concurrency.max(1);
        // The usual few objects all run at once: joined in place, without
        // the task bookkeeping a bounded stream needs.
        let fetches = if futures.len() <= concurrency {
            future::Either::Left(future::join_all(futures))
        } else {
            future::Either::Right(
                stream::iter(futures)
                    .buffer_unordered(concurrency)
                    .collect::<Vec<_>>(),
            )
        };
        let mut results = match tokio::time::timeout(self.config.timeout, fetches).await {
            Ok(results) => results,
            Err(_) => {
                return Err(MountError::Deadline {
                    timeout: self.config.timeout,
                    outstanding: finished
                        .iter()
                        .enumerate()
                        .filter(|(_, done)| !done.load(Ordering::Acquire))
                        .map(|(i, _)| objects[i].label())
                        .collect(),
                });
            }
        };
        results.sort_by_key(|(i, _)| *i);
        let mut ready = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        for (i, result) in results {
            match result {
                Ok(r) => ready.push(r),
                Err(error) => failures.push(Failure {
                    object: objects[i].label(),
                    error,
                }),
            }
        }
        if failures.is_empty() {
            Ok(ready)
        } else {
            Err(MountError::Objects {
                total: objects.len(),
                failures,
            })
        }
    }

    async fn fetch_one(
        &self,
        ctx: &Arc<MountContext>,
        plan: &Plan,
        index: usize,
        limits: FetchLimits,
        freshness: &Freshness,
        deadline: tokio::time::Instant,
    ) -> Result<Ready, ObjectError> {
        let objects = &plan.objects;
        let object = &objects[index];
        let backend = Arc::clone(self.backends.get(&object.backend)?);
        let labels = plan.labels[index].get_or_init(|| Labels::of(&*backend, object));
        let call = Call {
            backend: Arc::clone(&backend),
            objects: Arc::clone(objects),
            index,
            ctx: Arc::clone(ctx),
            limits,
            deadline,
        };
        let mut source = "backend";
        let fetched = match backend.cache_key(object, ctx) {
            Some(key) => {
                // The cache runs a miss as a task of its own: it needs an
                // owned, boxed call.
                let limiter = Arc::clone(&self.limiter);
                let fetch = move || {
                    let (limiter, call) = (Arc::clone(&limiter), call.clone());
                    async move { limiter.call(call).await }.boxed()
                };
                let ttl = object.refresh_interval.unwrap_or(freshness.ttl);
                self.cache
                    .get(&key, ttl, freshness.stale_if_error, fetch)
                    .await
                    .map(|(entry, from)| {
                        source = match from {
                            Source::Hit => "cache",
                            Source::Joined => "joined",
                            Source::Stale => "stale",
                            Source::Miss | Source::Uncached => "backend",
                        };
                        entry.to_fetched()
                    })
            }
            None => self.limiter.call(call).await,
        };
        let fetched = match fetched {
            Err(ObjectError::NotFound(why)) if object.optional => {
                crate::metrics::METRICS.optional_missing.inc();
                tracing::info!(object = %object.name, reason = %why, "optional object does not exist; mounting without it");
                return Ok(Ready {
                    path: Arc::clone(&labels.path),
                    mode: 0,
                    contents: Zeroizing::new(Vec::new()),
                    version: ABSENT_VERSION.into(),
                    absent: true,
                    id: Arc::clone(&labels.id),
                    backend: backend.name(),
                    address: Arc::clone(&labels.address),
                    source: "absent",
                });
            }
            other => other?,
        };
        let contents = Zeroizing::new(object.encoding.decode(fetched.contents.expose())?);
        if contents.len() as u64 > limits.max_bytes {
            return Err(ObjectError::TooLarge {
                size: contents.len() as u64,
                limit: limits.max_bytes,
            });
        }
        let derive = || self.version_key.shared_version(&object.name, &contents);
        let version = match (fetched.version, &fetched.memo) {
            (Some(v), _) => v,
            (None, Some(memo)) => memo.version(&object.name, object.encoding, derive),
            (None, None) => derive(),
        };
        Ok(Ready {
            path: Arc::clone(&labels.path),
            mode: object.mode.unwrap_or(ctx.default_mode),
            contents,
            version,
            absent: false,
            id: Arc::clone(&labels.id),
            backend: backend.name(),
            address: Arc::clone(&labels.address),
            source,
        })
    }
}
