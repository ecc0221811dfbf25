//! The AWS provider's SPC form, read its way: the `objects` entries
//! (`objectName` is the secret, `objectAlias` the file), `pathTranslation`,
//! `jmesPath` entries and `failoverObject`, and the SPC-level settings
//! (`region`, `failoverRegion`, `usePodIdentity`, `preferredAddressType`,
//! and coffer's `roleArn`, since coffer reads no service-account annotation).

use serde_yaml_ng::{Mapping, Value};

use crate::config::AwsArgs;
use crate::error::{shown, ObjectError};
use crate::request::MountContext;
use crate::spc::{string_field, yaml_kind, ObjectSpec};

/// SPC parameters this backend reads.
pub const PARAMETERS: &[&str] = &[
    "region",
    "failoverRegion",
    "pathTranslation",
    "usePodIdentity",
    "preferredAddressType",
    "roleArn",
];

/// Field that keeps the peer's `objectName` (the secret) once the entry's
/// `objectName` has become the file. The dot keeps it apart from any
/// field a user could mean.
pub const NAME_FIELD: &str = ".objectName";
/// Field of an entry made from one `jmesPath` item: its expression.
pub const JMES_FIELD: &str = ".jmesPath";

/// Object fields of the peer's form (after [`peer_entries`]).
pub const OBJECT_FIELDS: &[&str] = &[
    "objectType",
    "objectVersion",
    "objectVersionLabel",
    "failoverObject",
    NAME_FIELD,
    JMES_FIELD,
];

/// The fields a user writes (for suggestions and lists in messages).
pub const USER_FIELDS: &[&str] = &[
    "objectName",
    "objectType",
    "objectAlias",
    "objectVersion",
    "objectVersionLabel",
    "filePermission",
    "jmesPath",
    "failoverObject",
];

/// Audience of the token for IRSA (STS AssumeRoleWithWebIdentity).
pub const IRSA_AUDIENCE: &str = "sts.amazonaws.com";
/// Audience of the token for EKS Pod Identity.
pub const POD_IDENTITY_AUDIENCE: &str = "pods.eks.amazonaws.com";

/// `jmesPath` entries one object may have, and an expression's length and
/// bracket nesting: each is evaluated on every fetch of the object.
pub const MAX_JMES_ENTRIES: usize = 100;
const MAX_JMES_BYTES: usize = 512;
const MAX_JMES_DEPTH: usize = 32;
const MAX_JMES_NODES: usize = 128;
/// AWS names and ARNs are at most 2,048 characters.
const MAX_NAME_BYTES: usize = 2048;

/// Which store an object lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    SecretsManager,
    Ssm,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::SecretsManager => "secretsmanager",
            Kind::Ssm => "ssmparameter",
        }
    }

    pub fn service(self) -> &'static str {
        match self {
            Kind::SecretsManager => "Secrets Manager",
            Kind::Ssm => "SSM Parameter Store",
        }
    }
}

/// What to ask one region for.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub name: String,
    pub version: Option<String>,
    pub label: Option<String>,
}

impl Target {
    /// SSM's name with its selector (`name:3`, `name:label`), as
    /// GetParameters takes it and reports it missing.
    pub fn ssm_name(&self) -> String {
        match (&self.version, &self.label) {
            (Some(v), _) => format!("{}:{v}", self.name),
            (None, Some(l)) => format!("{}:{l}", self.name),
            (None, None) => self.name.clone(),
        }
    }
}

/// One object of the peer's form, checked.
#[derive(Debug, Clone)]
pub struct AwsObject {
    pub kind: Kind,
    pub primary: Target,
    /// What to ask the failover region for, when the SPC has one.
    pub failover: Option<Target>,
    /// For an entry made from a `jmesPath` item: its expression.
    pub jmes: Option<String>,
    /// A pinned version never changes.
    pub pinned: bool,
}

/// How the pod's AWS credentials are obtained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// IRSA: STS AssumeRoleWithWebIdentity with the pod's token.
    Irsa { role_arn: String },
    /// EKS Pod Identity agent with the pod's token.
    PodIdentity { address: AddressType },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressType {
    Auto,
    Ipv4,
    Ipv6,
}

/// The SPC-level settings of one Mount.
#[derive(Debug, Clone)]
pub struct AwsParams {
    pub region: String,
    pub failover_region: Option<String>,
    pub auth: Auth,
}

impl AwsParams {
    pub fn audience(&self) -> &'static str {
        match self.auth {
            Auth::Irsa { .. } => IRSA_AUDIENCE,
            Auth::PodIdentity { .. } => POD_IDENTITY_AUDIENCE,
        }
    }

    /// `node_region` is the daemon's fallback (flag, `AWS_REGION`, node label).
    pub fn from_context(
        ctx: &MountContext,
        defaults: &AwsArgs,
        node_region: Option<&str>,
    ) -> Result<Self, ObjectError> {
        let param = |k: &str| {
            ctx.parameters
                .get(k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        let region =
            match param("region").or(node_region) {
                Some(r) if valid_region(r) => r.to_string(),
                Some(r) => {
                    return Err(ObjectError::Invalid(format!(
                        "region {} is not an AWS region name such as us-east-1",
                        shown(r)
                    )))
                }
                None => return Err(ObjectError::FailedPrecondition(
                    "no AWS region: set the SPC parameter region, or the daemon's --aws-region \
                     (or AWS_REGION, or --node-label topology.kubernetes.io/region=...)"
                        .into(),
                )),
            };
        let failover_region = match param("failoverRegion") {
            None => None,
            Some(r) if !valid_region(r) => {
                return Err(ObjectError::Invalid(format!(
                    "failoverRegion {} is not an AWS region name such as us-west-2",
                    shown(r)
                )))
            }
            Some(r) if r == region => {
                return Err(ObjectError::Invalid(format!(
                    "failoverRegion {r} is the same as region: the failover region must differ"
                )))
            }
            Some(r) => Some(r.to_string()),
        };
        let pod_identity = match param("usePodIdentity") {
            None => false,
            Some(v) => crate::backend::go_bool(v).ok_or_else(|| {
                ObjectError::Invalid(format!("usePodIdentity {} is not true or false", shown(v)))
            })?,
        };
        let auth = if pod_identity {
            let address = match param("preferredAddressType").map(str::to_ascii_lowercase) {
                None => AddressType::Auto,
                Some(v) if v == "auto" => AddressType::Auto,
                Some(v) if v == "ipv4" => AddressType::Ipv4,
                Some(v) if v == "ipv6" => AddressType::Ipv6,
                Some(v) => {
                    return Err(ObjectError::Invalid(format!(
                        "preferredAddressType {} is not one of ipv4, ipv6, auto",
                        shown(&v)
                    )))
                }
            };
            Auth::PodIdentity { address }
        } else {
            let role_arn =
                match (param("roleArn"), &defaults.role_arn_template) {
                    (Some(r), _) => r.to_string(),
                    (None, Some(t)) => fill_role_template(t, ctx)?,
                    (None, None) => return Err(ObjectError::FailedPrecondition(
                        "IRSA needs an IAM role: set the SPC parameter roleArn (the AWS provider \
                         reads the service account's eks.amazonaws.com/role-arn annotation; coffer \
                         reads no Kubernetes objects), or the daemon's --aws-role-arn-template, \
                         or set usePodIdentity: \"true\""
                            .into(),
                    )),
                };
            if !valid_role_arn(&role_arn) {
                return Err(ObjectError::Invalid(format!(
                    "roleArn {} is not an IAM role ARN (arn:aws:iam::123456789012:role/name)",
                    shown(&role_arn)
                )));
            }
            Auth::Irsa { role_arn }
        };
        Ok(Self {
            region,
            failover_region,
            auth,
        })
    }
}

/// `us-east-1`, `us-gov-west-1`, `cn-north-1`, `eu-central-2`, ...
pub fn valid_region(r: &str) -> bool {
    let parts: Vec<&str> = r.split('-').collect();
    r.len() <= 32
        && parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()))
}

/// `arn:<partition>:iam::<12 digits>:role/<path/>name`.
pub fn valid_role_arn(arn: &str) -> bool {
    let Some(parsed) = Arn::parse(arn) else {
        return false;
    };
    let name_ok = parsed.resource.strip_prefix("role/").is_some_and(|n| {
        !n.is_empty()
            && n.len() <= 512
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+=,.@_-/".contains(c))
    });
    parsed.service == "iam"
        && parsed.region.is_empty()
        && parsed.account.len() == 12
        && parsed.account.chars().all(|c| c.is_ascii_digit())
        && name_ok
}

/// The daemon's role template must name a role once filled in.
pub fn check_role_template(t: &str) -> Result<(), String> {
    let sample = t
        .replace("{namespace}", "ns")
        .replace("{serviceAccount}", "sa");
    if valid_role_arn(&sample) {
        Ok(())
    } else {
        Err(format!(
            "{} is not an IAM role ARN once {{namespace}} and {{serviceAccount}} are filled in",
            shown(t)
        ))
    }
}

fn fill_role_template(t: &str, ctx: &MountContext) -> Result<String, ObjectError> {
    if ctx.pod.namespace.is_empty() || ctx.pod.service_account.is_empty() {
        return Err(ObjectError::FailedPrecondition(
            "--aws-role-arn-template needs the pod's namespace and service account: the \
             CSIDriver must set podInfoOnMount: true"
                .into(),
        ));
    }
    Ok(t.replace("{namespace}", &ctx.pod.namespace)
        .replace("{serviceAccount}", &ctx.pod.service_account))
}

/// An ARN split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct Arn<'a> {
    pub partition: &'a str,
    pub service: &'a str,
    pub region: &'a str,
    pub account: &'a str,
    pub resource: &'a str,
}

impl<'a> Arn<'a> {
    /// As the AWS SDK for Go's `arn.Parse`: six `:`-separated parts, the
    /// last may hold more colons.
    pub fn parse(s: &'a str) -> Option<Self> {
        let mut parts = s.splitn(6, ':');
        if parts.next()? != "arn" {
            return None;
        }
        let (partition, service, region, account, resource) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        (!partition.is_empty() && !service.is_empty() && !resource.is_empty()).then_some(Self {
            partition,
            service,
            region,
            account,
            resource,
        })
    }
}

/// The type an ARN names, as the peer maps services.
fn arn_kind(service: &str) -> Option<Kind> {
    match service {
        "secretsmanager" => Some(Kind::SecretsManager),
        "ssm" => Some(Kind::Ssm),
        _ => None,
    }
}

fn type_kind(object_type: &str) -> Option<Kind> {
    match object_type {
        "secretsmanager" => Some(Kind::SecretsManager),
        "ssmparameter" => Some(Kind::Ssm),
        _ => None,
    }
}

const JMES_ITEM_FIELDS: &[&str] = &["path", "objectAlias", "filePermission"];
const FAILOVER_FIELDS: &[&str] = &["objectName", "objectVersion", "objectVersionLabel"];

/// The AWS provider reads its objects with Go's `encoding/json`, which
/// matches field names regardless of case (its own tests write `Path:` and
/// `ObjectAlias:`): such keys get their canonical spelling.
fn canonical_keys(map: Mapping, known: &[&str]) -> Mapping {
    let present: Vec<String> = map
        .keys()
        .filter_map(|k| k.as_str().map(str::to_string))
        .collect();
    map.into_iter()
        .map(|(k, v)| {
            let renamed = k.as_str().and_then(|name| {
                known
                    .iter()
                    .find(|c| {
                        c.eq_ignore_ascii_case(name)
                            && **c != name
                            && !present.iter().any(|p| p == *c)
                    })
                    .map(|c| Value::String(c.to_string()))
            });
            (renamed.unwrap_or(k), v)
        })
        .collect()
}

/// Does this `objects` entry (without its own `backend`) read as the AWS
/// provider's: an `objectType` of AWS's, or an AWS ARN as its name?
pub fn looks_like_peer_form(map: &Mapping) -> bool {
    let get = |k: &str| {
        map.iter().find_map(|(key, v)| match (key.as_str(), v) {
            (Some(key), Value::String(s)) if key.eq_ignore_ascii_case(k) => Some(s.as_str()),
            _ => None,
        })
    };
    if get("objectType").is_some_and(|t| type_kind(t).is_some()) {
        return true;
    }
    get("objectName")
        .and_then(Arn::parse)
        .is_some_and(|a| a.partition.starts_with("aws") && arn_kind(a.service).is_some())
}

/// `pathTranslation`: `None` keeps `/` (the peer's "False"), else the
/// character that replaces it (default `_`).
pub fn path_translation(raw: Option<&str>) -> Result<Option<char>, ObjectError> {
    match raw {
        None | Some("") => Ok(Some('_')),
        Some(v) if v.eq_ignore_ascii_case("false") => Ok(None),
        Some(v) if v.len() == 1 => Ok(v.chars().next()),
        Some(v) => Err(ObjectError::Invalid(format!(
            "pathTranslation {} must be \"False\" or a single character",
            shown(v)
        ))),
    }
}

/// The file the peer writes an object to: its alias, else its name; `/`
/// translated, or a leading `/` dropped when translation is off.
fn file_name(name: &str, alias: Option<&str>, translate: Option<char>) -> String {
    let f = alias.filter(|a| !a.is_empty()).unwrap_or(name);
    match translate {
        Some(c) => f.replace('/', c.encode_utf8(&mut [0; 4])),
        None => f.trim_start_matches('/').to_string(),
    }
}

/// Rewrites one entry of the peer's form into coffer's object form: the
/// object itself (`objectName` = its file, the secret's name kept in
/// [`NAME_FIELD`]) and one object per `jmesPath` item (its alias as the
/// file, its expression in [`JMES_FIELD`]). The peer's checks that need the
/// entry as written (a failover object needs an alias, each `jmesPath`
/// item a path and an alias) are made here.
pub fn peer_entries(map: Mapping, translate: Option<char>) -> Result<Vec<Value>, ObjectError> {
    let key = |k: &str| Value::String(k.into());
    let mut map = canonical_keys(map, USER_FIELDS);
    if let Some(Value::Mapping(f)) = map.get_mut(key("failoverObject")) {
        *f = canonical_keys(std::mem::take(f), FAILOVER_FIELDS);
    }
    let name = string_field(&map, "objectName")?
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(ObjectError::Invalid("objectName is missing".into()));
    }
    let alias = string_field(&map, "objectAlias")?.map(str::to_string);
    let has_failover_name = match map.get(key("failoverObject")) {
        Some(Value::Mapping(f)) => string_field(f, "objectName")?.is_some_and(|n| !n.is_empty()),
        _ => false,
    };
    if has_failover_name && alias.as_deref().unwrap_or("").is_empty() {
        return Err(ObjectError::Invalid(format!(
            "objectAlias must be set for an object with a failoverObject ({})",
            shown(&name)
        )));
    }
    let file = file_name(&name, alias.as_deref(), translate);
    let jmes = map.remove(key("jmesPath"));
    map.remove(key("objectAlias"));
    map.insert(key("objectName"), Value::String(file));
    map.insert(key(NAME_FIELD), Value::String(name.clone()));
    map.entry(key("backend"))
        .or_insert_with(|| Value::String("aws".into()));
    let items = match jmes {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items,
        Some(other) => {
            return Err(ObjectError::Invalid(format!(
                "jmesPath must be a list of {{path, objectAlias}}, got {}",
                yaml_kind(&other)
            )))
        }
    };
    if items.len() > MAX_JMES_ENTRIES {
        return Err(ObjectError::Invalid(format!(
            "jmesPath lists {} entries; at most {MAX_JMES_ENTRIES}",
            items.len()
        )));
    }
    let mut out = Vec::with_capacity(1 + items.len());
    for (i, item) in items.into_iter().enumerate() {
        let Value::Mapping(item) = item else {
            return Err(ObjectError::Invalid(format!(
                "jmesPath[{i}] must be a mapping with path and objectAlias"
            )));
        };
        let item = canonical_keys(item, JMES_ITEM_FIELDS);
        let path = string_field(&item, "path")?.unwrap_or_default();
        if path.is_empty() {
            return Err(ObjectError::Invalid(format!(
                "jmesPath[{i}]: path must be specified"
            )));
        }
        let item_alias = string_field(&item, "objectAlias")?.unwrap_or_default();
        if item_alias.is_empty() {
            return Err(ObjectError::Invalid(format!(
                "jmesPath[{i}] ({}): objectAlias must be specified",
                shown(path)
            )));
        }
        let mut entry = map.clone();
        entry.insert(
            key("objectName"),
            Value::String(file_name(&name, Some(item_alias), translate)),
        );
        entry.insert(key(JMES_FIELD), Value::String(path.to_string()));
        if let Some(mode) = item.get(key("filePermission")) {
            if !matches!(mode, Value::Null) {
                entry.insert(key("filePermission"), mode.clone());
            }
        }
        out.push(Value::Mapping(entry));
    }
    out.insert(0, Value::Mapping(map));
    Ok(out)
}

impl AwsObject {
    pub fn from_spec(object: &ObjectSpec, params: &AwsParams) -> Result<Self, ObjectError> {
        object.reject_peer_typos(OBJECT_FIELDS, USER_FIELDS, "AWS")?;
        let name = object.required_str(NAME_FIELD).map_err(|_| {
            ObjectError::Invalid("objectName (the secret's name or ARN) is missing".into())
        })?;
        let object_type = object.str_field("objectType")?.filter(|t| !t.is_empty());
        let kind = check_name(name, object_type, &params.region)?;
        let nonempty = |k: &str| -> Result<Option<String>, ObjectError> {
            Ok(object
                .str_field(k)?
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_string))
        };
        let primary = Target {
            name: name.to_string(),
            version: nonempty("objectVersion")?,
            label: nonempty("objectVersionLabel")?,
        };
        check_target(kind, &primary)?;
        let failover_fields = match object.fields.get("failoverObject") {
            None | Some(Value::Null) => None,
            Some(Value::Mapping(m)) => Some(m),
            Some(other) => {
                return Err(ObjectError::Invalid(format!(
                    "failoverObject must be a mapping, got {}",
                    yaml_kind(other)
                )))
            }
        };
        let failover = match (&params.failover_region, failover_fields) {
            (None, Some(f)) if string_field(f, "objectName")?.is_some_and(|n| !n.is_empty()) => {
                return Err(ObjectError::Invalid(format!(
                    "failoverObject of {} needs the SPC parameter failoverRegion",
                    shown(name)
                )))
            }
            (None, _) => None,
            (Some(region), f) => {
                let get = |k: &str| -> Result<Option<String>, ObjectError> {
                    Ok(match f {
                        Some(f) => string_field(f, k)?
                            .map(str::trim)
                            .filter(|v| !v.is_empty())
                            .map(str::to_string),
                        None => None,
                    })
                };
                let target = match get("objectName")? {
                    None => primary.clone(),
                    Some(fname) => {
                        let fkind = check_name(&fname, object_type, region)?;
                        if fkind != kind {
                            return Err(ObjectError::Invalid(format!(
                                "failoverObject {} is not of the same type as {}",
                                shown(&fname),
                                shown(name)
                            )));
                        }
                        let version = get("objectVersion")?;
                        if version != primary.version {
                            return Err(ObjectError::Invalid(format!(
                                "object versions must match between primary and failover regions: {}",
                                shown(name)
                            )));
                        }
                        Target {
                            name: fname,
                            version: version.or_else(|| primary.version.clone()),
                            label: get("objectVersionLabel")?.or_else(|| primary.label.clone()),
                        }
                    }
                };
                check_target(kind, &target)?;
                Some(target)
            }
        };
        let jmes = match object.str_field(JMES_FIELD)? {
            None => None,
            Some(expr) => {
                check_jmes(expr)?;
                Some(expr.to_string())
            }
        };
        let pinned = primary.version.is_some();
        Ok(Self {
            kind,
            primary,
            failover,
            jmes,
            pinned,
        })
    }
}

/// The peer's `validateObjectName`: a full ARN or an `objectType`; the
/// ARN's region is the one asked; ARN and type agree.
fn check_name(name: &str, object_type: Option<&str>, region: &str) -> Result<Kind, ObjectError> {
    if name.len() > MAX_NAME_BYTES || name.contains(['\0', '\n', '\r']) {
        return Err(ObjectError::Invalid(format!(
            "objectName {} is not an AWS secret or parameter name",
            shown(name)
        )));
    }
    let typed = match object_type {
        None => None,
        Some(t) => Some(type_kind(t).ok_or_else(|| {
            ObjectError::Invalid(format!(
                "objectType {} is not secretsmanager or ssmparameter",
                shown(t)
            ))
        })?),
    };
    if !name.starts_with("arn:") {
        return typed.ok_or_else(|| {
            ObjectError::Invalid(format!(
                "objectType (secretsmanager or ssmparameter) must be set when objectName {} is not a full ARN",
                shown(name)
            ))
        });
    }
    let arn = Arn::parse(name).ok_or_else(|| {
        ObjectError::Invalid(format!("objectName {} is not a valid ARN", shown(name)))
    })?;
    if arn.region != region {
        return Err(ObjectError::Invalid(format!(
            "the ARN's region must be the region asked ({region}): {}",
            shown(name)
        )));
    }
    let by_arn = arn_kind(arn.service).ok_or_else(|| {
        ObjectError::Invalid(format!(
            "the ARN names service {}, not secretsmanager or ssm",
            shown(arn.service)
        ))
    })?;
    match typed {
        Some(t) if t != by_arn => Err(ObjectError::Invalid(format!(
            "objectType {} does not match the ARN {}",
            t.as_str(),
            shown(name)
        ))),
        _ => Ok(by_arn),
    }
}

fn check_target(kind: Kind, t: &Target) -> Result<(), ObjectError> {
    if kind == Kind::Ssm && t.version.is_some() && t.label.is_some() {
        return Err(ObjectError::Invalid(format!(
            "SSM parameters cannot set both objectVersion and objectVersionLabel: {}",
            shown(&t.name)
        )));
    }
    if kind == Kind::Ssm {
        if let Some(v) = &t.version {
            if v.parse::<u64>().is_err() {
                return Err(ObjectError::Invalid(format!(
                    "objectVersion {} of SSM parameter {} is not a version number",
                    shown(v),
                    shown(&t.name)
                )));
            }
        }
    }
    for (field, v) in [
        ("objectVersion", &t.version),
        ("objectVersionLabel", &t.label),
    ] {
        if let Some(v) = v {
            if v.len() > 256 || v.contains(['\0', '\n', ':']) {
                return Err(ObjectError::Invalid(format!(
                    "{field} {} is not a version id or label",
                    shown(v)
                )));
            }
        }
    }
    Ok(())
}

/// A `jmesPath` expression within coffer's bounds: short, shallow, and
/// without multi-select lists or hashes (the only way an expression can
/// copy its input over and over: `[@,@][]` repeated doubles it each time).
/// Whatever else JMESPath does costs at most its nodes times the input.
pub fn check_jmes(expr: &str) -> Result<jmespath::Expression<'static>, ObjectError> {
    let bad = |why: String| ObjectError::Invalid(format!("jmesPath {}: {why}", shown(expr)));
    if expr.len() > MAX_JMES_BYTES {
        return Err(bad(format!("longer than {MAX_JMES_BYTES} bytes")));
    }
    let mut depth = 0usize;
    for c in expr.chars() {
        match c {
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_JMES_DEPTH {
                    return Err(bad(format!("nested deeper than {MAX_JMES_DEPTH}")));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    let compiled = jmespath::compile(expr).map_err(|e| bad(format!("{}", e.reason)))?;
    let mut count = Count::default();
    walk(compiled.as_ast(), &mut count).map_err(bad)?;
    Ok(compiled)
}

/// Functions whose output may outgrow their input (`to_string` escapes
/// each quote, six bytes for a control character): nested, they would
/// multiply it, so an expression may call at most two.
const GROWING_FUNCTIONS: [&str; 3] = ["to_string", "join", "merge"];
const MAX_GROWING_CALLS: usize = 2;

#[derive(Default)]
struct Count {
    nodes: usize,
    growing: usize,
}

fn walk(ast: &jmespath::ast::Ast, count: &mut Count) -> Result<(), String> {
    use jmespath::ast::Ast;
    count.nodes += 1;
    if count.nodes > MAX_JMES_NODES {
        return Err(format!("more than {MAX_JMES_NODES} parts"));
    }
    if let Ast::Function { name, .. } = ast {
        if GROWING_FUNCTIONS.contains(&name.as_str()) {
            count.growing += 1;
            if count.growing > MAX_GROWING_CALLS {
                return Err(format!(
                    "more than {MAX_GROWING_CALLS} calls of {}",
                    GROWING_FUNCTIONS.join(", ")
                ));
            }
        }
    }
    let nodes = count;
    match ast {
        Ast::MultiList { .. } | Ast::MultiHash { .. } => Err(
            "multi-select lists and hashes are not allowed (the result must be one string)".into(),
        ),
        Ast::Identity { .. }
        | Ast::Field { .. }
        | Ast::Index { .. }
        | Ast::Literal { .. }
        | Ast::Slice { .. } => Ok(()),
        Ast::Expref { ast, .. } => walk(ast, nodes),
        Ast::Flatten { node, .. } | Ast::Not { node, .. } | Ast::ObjectValues { node, .. } => {
            walk(node, nodes)
        }
        Ast::Function { args, .. } => args.iter().try_for_each(|a| walk(a, nodes)),
        Ast::Comparison { lhs, rhs, .. }
        | Ast::Projection { lhs, rhs, .. }
        | Ast::And { lhs, rhs, .. }
        | Ast::Or { lhs, rhs, .. }
        | Ast::Subexpr { lhs, rhs, .. } => {
            walk(lhs, nodes)?;
            walk(rhs, nodes)
        }
        Ast::Condition {
            predicate, then, ..
        } => {
            walk(predicate, nodes)?;
            walk(then, nodes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn ctx(params: &[(&str, &str)]) -> MountContext {
        let mut attrs: BTreeMap<String, String> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        attrs.insert("csi.storage.k8s.io/pod.namespace".into(), "ns".into());
        attrs.insert("csi.storage.k8s.io/serviceAccount.name".into(), "sa".into());
        MountContext::parse(&serde_json::to_string(&attrs).unwrap(), "", "", "/t").unwrap()
    }

    fn entries(yaml: &str, translate: Option<char>) -> Result<Vec<Value>, ObjectError> {
        let Value::Mapping(m) = serde_yaml_ng::from_str(yaml).unwrap() else {
            panic!()
        };
        peer_entries(m, translate)
    }

    fn name_of(v: &Value) -> &str {
        v.get("objectName").and_then(Value::as_str).unwrap()
    }

    #[test]
    fn file_names_follow_the_peer() {
        let e = entries(
            "objectName: /app/db/pass\nobjectType: ssmparameter",
            Some('_'),
        )
        .unwrap();
        assert_eq!(name_of(&e[0]), "_app_db_pass");
        assert_eq!(
            e[0].get(NAME_FIELD).and_then(Value::as_str),
            Some("/app/db/pass")
        );
        let e = entries("objectName: /app/db/pass\nobjectType: ssmparameter", None).unwrap();
        assert_eq!(name_of(&e[0]), "app/db/pass");
        let e = entries(
            "objectName: a/b\nobjectType: secretsmanager\nobjectAlias: x/y",
            Some('-'),
        )
        .unwrap();
        assert_eq!(name_of(&e[0]), "x-y");
        assert_eq!(path_translation(Some("False")).unwrap(), None);
        assert_eq!(path_translation(None).unwrap(), Some('_'));
        assert_eq!(path_translation(Some("+")).unwrap(), Some('+'));
        assert!(path_translation(Some("ab")).is_err());
    }

    #[test]
    fn jmes_entries_become_objects() {
        let e = entries(
            "objectName: db\nobjectType: secretsmanager\nfilePermission: \"0600\"\njmesPath:\n\
             - {path: username, objectAlias: user}\n- {path: password, objectAlias: pass, filePermission: \"0400\"}",
            Some('_'),
        )
        .unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(name_of(&e[1]), "user");
        assert_eq!(
            e[1].get(JMES_FIELD).and_then(Value::as_str),
            Some("username")
        );
        assert_eq!(
            e[1].get("filePermission").and_then(Value::as_str),
            Some("0600")
        );
        assert_eq!(
            e[2].get("filePermission").and_then(Value::as_str),
            Some("0400")
        );
        assert!(e[0].get("jmesPath").is_none());
        // The peer's own test SPC writes Path / ObjectAlias.
        let e = entries(
            "ObjectName: j\nobjectType: ssmparameter\njmesPath:\n- {Path: username, ObjectAlias: u}",
            Some('_'),
        )
        .unwrap();
        assert_eq!(name_of(&e[0]), "j");
        assert_eq!(name_of(&e[1]), "u");
        assert_eq!(
            e[1].get(JMES_FIELD).and_then(Value::as_str),
            Some("username")
        );
        let err = entries(
            "objectName: db\nobjectType: secretsmanager\njmesPath:\n- {path: a}",
            Some('_'),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("objectAlias must be specified"),
            "{err}"
        );
        let err = entries(
            "objectName: db\nobjectType: secretsmanager\nfailoverObject: {objectName: db2}",
            Some('_'),
        )
        .unwrap_err();
        assert!(err.to_string().contains("objectAlias must be set"), "{err}");
    }

    #[test]
    fn names_types_and_regions() {
        assert_eq!(
            check_name("s", Some("secretsmanager"), "us-east-1").unwrap(),
            Kind::SecretsManager
        );
        assert_eq!(
            check_name(
                "arn:aws:ssm:us-east-1:123456789012:parameter/p",
                None,
                "us-east-1"
            )
            .unwrap(),
            Kind::Ssm
        );
        let e = |n: &str, t: Option<&str>| check_name(n, t, "us-east-1").unwrap_err().to_string();
        assert!(e("s", None).contains("must be set"));
        assert!(e("s", Some("ssm")).contains("not secretsmanager or ssmparameter"));
        assert!(e("arn:aws:secretsmanager:eu-west-1:1:secret:s", None).contains("region"));
        assert!(e("arn:aws:s3:us-east-1:1:bucket", None).contains("service"));
        assert!(e(
            "arn:aws:secretsmanager:us-east-1:1:secret:s",
            Some("ssmparameter")
        )
        .contains("does not match"));
    }

    #[test]
    fn spc_settings() {
        let p = AwsParams::from_context(
            &ctx(&[("roleArn", "arn:aws:iam::123456789012:role/app")]),
            &AwsArgs::default(),
            Some("us-east-1"),
        )
        .unwrap();
        assert_eq!(p.region, "us-east-1");
        assert_eq!(p.audience(), IRSA_AUDIENCE);
        let e = AwsParams::from_context(&ctx(&[]), &AwsArgs::default(), Some("us-east-1"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("roleArn") && e.contains("--aws-role-arn-template"),
            "{e}"
        );
        let t = AwsArgs {
            role_arn_template: Some(
                "arn:aws:iam::123456789012:role/{namespace}-{serviceAccount}".into(),
            ),
            ..AwsArgs::default()
        };
        let p = AwsParams::from_context(&ctx(&[]), &t, Some("us-east-1")).unwrap();
        assert_eq!(
            p.auth,
            Auth::Irsa {
                role_arn: "arn:aws:iam::123456789012:role/ns-sa".into()
            }
        );
        let p = AwsParams::from_context(
            &ctx(&[("usePodIdentity", "true"), ("preferredAddressType", "ipv6")]),
            &AwsArgs::default(),
            Some("us-east-1"),
        )
        .unwrap();
        assert_eq!(
            p.auth,
            Auth::PodIdentity {
                address: AddressType::Ipv6
            }
        );
        let e = AwsParams::from_context(
            &ctx(&[("failoverRegion", "us-east-1"), ("usePodIdentity", "1")]),
            &AwsArgs::default(),
            Some("us-east-1"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("must differ"));
        assert!(
            AwsParams::from_context(&ctx(&[]), &AwsArgs::default(), None)
                .unwrap_err()
                .to_string()
                .contains("--aws-region")
        );
        assert!(check_role_template("arn:aws:iam::123456789012:role/{namespace}").is_ok());
        assert!(check_role_template("role/{namespace}").is_err());
    }

    #[test]
    fn jmes_bounds() {
        assert!(check_jmes("username").is_ok());
        assert!(check_jmes("a.b[0].\"my-key\"").is_ok());
        assert!(check_jmes("[?name=='db'].value | [0]").is_ok());
        assert!(check_jmes("[@,@][]").is_err());
        assert!(check_jmes("{a: a}").is_err());
        assert!(check_jmes(&"(".repeat(40)).is_err());
        assert!(check_jmes(&"a.".repeat(300)).is_err());
        assert!(check_jmes("a[").is_err());
        assert!(check_jmes("to_string(to_string(@))").is_ok());
        assert!(check_jmes("to_string(to_string(to_string(@)))").is_err());
    }
}
