//! The SecretProviderClass parameter model: the `objects` list and the
//! per-object settings shared by every backend (output path, mode, encoding,
//! which backend). Backend-specific fields stay raw here and are parsed by the
//! backend that owns them.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_yaml_ng::Value;

use crate::backend::aws::params as aws;
use crate::backend::azure::params as azure;
use crate::error::{shown, shown_bare, Failure, ObjectError};

/// SPC parameter holding the YAML list of objects.
pub const OBJECTS_PARAM: &str = "objects";
/// SPC parameter of Google's provider holding its list of secrets.
pub const GCP_SECRETS_PARAM: &str = "secrets";

/// Rewrites an entry of Google's `secrets` list (`resourceName`, `path` or
/// `fileName`, `mode`, `extractJSONKey`/`extractYAMLKey`) into coffer's
/// object form for the `gcp` backend. `path` wins over `fileName`.
fn from_gcp_form(entry: Value) -> Value {
    let Value::Mapping(mut map) = entry else {
        return entry;
    };
    let take = |map: &mut serde_yaml_ng::Mapping, k: &str| map.remove(Value::String(k.into()));
    let path = take(&mut map, "path");
    let file_name = take(&mut map, "fileName");
    let name = path.filter(|v| !matches!(v, Value::Null)).or(file_name);
    if let Some(name) = name {
        map.insert(Value::String("objectName".into()), name);
    }
    if let Some(mode) = take(&mut map, "mode") {
        map.insert(Value::String("filePermission".into()), mode);
    }
    map.entry(Value::String("backend".into()))
        .or_insert_with(|| Value::String("gcp".into()));
    Value::Mapping(map)
}

/// SPC parameter of the AWS provider: what replaces `/` in file names.
pub const AWS_TRANSLATION_PARAM: &str = "pathTranslation";

/// SPC parameter of the Azure provider naming the vault: an SPC with it
/// is in the Azure provider's form.
pub const AZURE_VAULT_PARAM: &str = "keyvaultName";

/// Is this entry for the `azure` backend, in the Azure provider's form?
/// Its own `backend`; else the SPC's; else whether the SPC names a vault.
fn is_azure_form(map: &serde_yaml_ng::Mapping, spc_backend: Option<&str>, azure_spc: bool) -> bool {
    match map.get(Value::String("backend".into())) {
        Some(Value::String(b)) if !b.trim().is_empty() => b.trim() == "azure",
        _ => match spc_backend {
            Some(b) => b == "azure",
            None => azure_spc && !map.contains_key(Value::String("secretPath".into())),
        },
    }
}

/// SPC parameters only the AWS provider reads: an SPC with one of them and
/// no `backend` was written for it, so its unmarked objects are AWS's
/// (and get AWS's errors, such as a missing objectType).
pub const AWS_SPC_MARKS: [&str; 6] = [
    "region",
    "failoverRegion",
    "usePodIdentity",
    "preferredAddressType",
    AWS_TRANSLATION_PARAM,
    "roleArn",
];

/// Is this entry for the `aws` backend, in the AWS provider's form? Its
/// own `backend`; else AWS's marks on it (`objectType`, an ARN); else the
/// SPC's `backend`; else (not a Vault object) AWS's marks on the SPC.
fn is_aws_form(
    map: &serde_yaml_ng::Mapping,
    spc_backend: Option<&str>,
    parameters: &BTreeMap<String, String>,
) -> bool {
    match map.get(Value::String("backend".into())) {
        Some(Value::String(b)) if !b.trim().is_empty() => return b.trim() == "aws",
        _ => {}
    }
    if aws::looks_like_peer_form(map) {
        return true;
    }
    match spc_backend {
        Some(b) => b == "aws",
        None => {
            !map.contains_key(Value::String("secretPath".into()))
                && AWS_SPC_MARKS.iter().any(|k| parameters.contains_key(*k))
        }
    }
}

/// Objects one volume may list. Each costs a fetch, a file and audit
/// records; a list of 100,000 made one Mount flood the audit queue.
pub const MAX_OBJECTS: usize = 1000;

/// SPC parameter naming the default backend of every object.
pub const BACKEND_PARAM: &str = "backend";

/// How the fetched value is turned into file bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    /// Written as fetched.
    #[default]
    Utf8,
    /// The fetched value is base64 text; the file gets the decoded bytes.
    Base64,
    /// The fetched value is hex text; the file gets the decoded bytes.
    Hex,
}

impl Encoding {
    fn parse(raw: &str) -> Option<Self> {
        match raw.to_ascii_lowercase().as_str() {
            "" | "utf-8" | "utf8" => Some(Encoding::Utf8),
            "base64" => Some(Encoding::Base64),
            "hex" => Some(Encoding::Hex),
            _ => None,
        }
    }

    /// Decodes a fetched value. Errors never include the value's bytes.
    pub fn decode(self, value: &[u8]) -> Result<Vec<u8>, ObjectError> {
        use base64::Engine as _;
        match self {
            Encoding::Utf8 => Ok(value.to_vec()),
            Encoding::Base64 => {
                let trimmed = value.trim_ascii();
                base64::engine::general_purpose::STANDARD
                    .decode(trimmed)
                    .map_err(|_| {
                        ObjectError::Invalid(
                            "encoding is base64 but the value is not valid base64".into(),
                        )
                    })
            }
            Encoding::Hex => hex::decode(value.trim_ascii()).map_err(|_| {
                ObjectError::Invalid("encoding is hex but the value is not valid hex".into())
            }),
        }
    }
}

/// One entry of the `objects` list, with the common fields resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectSpec {
    /// Position in the list, for error messages about nameless entries.
    pub index: usize,
    /// `objectName`: the output path inside the volume.
    pub name: String,
    /// Which backend serves it.
    pub backend: String,
    /// `filePermission`, if set.
    pub mode: Option<u32>,
    pub encoding: Encoding,
    /// `refreshInterval`: how long a cached value serves before it is fetched
    /// again (overrides the SPC's and the daemon's default; 0 = never cached).
    pub refresh_interval: Option<Duration>,
    /// `optional: true`: the Mount succeeds without this object when the
    /// backend says it does not exist.
    pub optional: bool,
    /// `expand: true`: the value is a map written as one file per key below
    /// the object's name (see `render`).
    pub expand: bool,
    /// `render: false`: fetched for `files` to read, written nowhere itself.
    pub render: bool,
    /// The remaining, backend-specific fields.
    pub fields: BTreeMap<String, Value>,
    /// The field that named the output path, for messages in the words of
    /// the form the SPC was written in (`objectName`, or Google's `path`).
    pub name_field: &'static str,
    /// What its backend worked out from the fields above (see
    /// [`ObjectSpec::derived`]).
    pub derived: Derived,
}

/// One value a backend derives from an object's own fields (its request,
/// its address), kept with the object: a memoised plan serves every
/// rotation poll of its SPC, which then need not redo the work per Mount.
/// A clone starts empty, so a copy whose fields are then changed never
/// carries a value worked out from the old ones; equality ignores it.
#[derive(Default)]
pub struct Derived(OnceLock<Arc<dyn Any + Send + Sync>>);

impl Clone for Derived {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl PartialEq for Derived {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl std::fmt::Debug for Derived {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.get().is_some() {
            "Derived(kept)"
        } else {
            "Derived(none)"
        })
    }
}

impl ObjectSpec {
    /// `make()`'s value for this object, worked out on first use and kept
    /// with it. Only for values that depend on nothing but the object's own
    /// fields (never on the caller); one type per object (its backend's):
    /// asked for another type, it is worked out again and not kept.
    pub fn derived<T: Send + Sync + 'static>(&self, make: impl FnOnce() -> T) -> Arc<T> {
        if let Some(kept) = self.derived.0.get() {
            return match Arc::clone(kept).downcast::<T>() {
                Ok(value) => value,
                Err(_) => Arc::new(make()),
            };
        }
        let value = Arc::new(make());
        // Two Mounts may both work it out first; either copy is the same.
        let _ = self
            .derived
            .0
            .set(Arc::clone(&value) as Arc<dyn Any + Send + Sync>);
        value
    }

    /// The object's label in messages: its name, or its position.
    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("objects[{}]", self.index)
        } else {
            self.name.clone()
        }
    }

    /// A backend-specific string field; a non-string value is an error.
    pub fn str_field(&self, key: &str) -> Result<Option<&str>, ObjectError> {
        match self.fields.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err(ObjectError::Invalid(format!(
                "field {} must be a string, got {}",
                shown(key),
                yaml_kind(other)
            ))),
        }
    }

    /// A backend-specific string field that must be present and non-blank.
    pub fn required_str(&self, key: &str) -> Result<&str, ObjectError> {
        self.str_field(key)?
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| ObjectError::Invalid(format!("{key} is missing")))
    }

    /// Fails on fields that `known` does not list, so typos are caught
    /// early, suggesting the field that was probably meant.
    pub fn reject_unknown_fields(&self, known: &[&str]) -> Result<(), ObjectError> {
        let unknown = self.unknown_fields(known);
        if unknown.is_empty() {
            return Ok(());
        }
        Err(ObjectError::Invalid(format!(
            "unknown field(s) {} for backend {} (known: {})",
            unknown
                .iter()
                .map(|u| with_suggestion(u, known))
                .collect::<Vec<_>>()
                .join(", "),
            shown(&self.backend),
            known.join(", ")
        )))
    }

    /// For objects in a peer provider's form: that provider ignores fields
    /// it does not know (leftovers of a migration pass there), so only a
    /// near miss of a known field (a typo) is refused; the rest are
    /// returned by [`ObjectSpec::unknown_fields`] for a warning.
    pub fn reject_typos(&self, known: &[&str]) -> Result<(), ObjectError> {
        let typos: Vec<String> = self
            .unknown_fields(known)
            .into_iter()
            .filter(|u| suggestion(u, known).is_some())
            .map(|u| with_suggestion(u, known))
            .collect();
        if typos.is_empty() {
            return Ok(());
        }
        Err(ObjectError::Invalid(format!(
            "unknown field(s) {} for backend {} (known: {})",
            typos.join(", "),
            shown(&self.backend),
            known.join(", ")
        )))
    }

    /// For objects rewritten from a peer's form, whose fields are `known`
    /// once rewritten: a near miss of a field users write (`written`) is a
    /// typo, refused with a suggestion in the words of `provider`'s form.
    pub fn reject_peer_typos(
        &self,
        known: &[&str],
        written: &[&str],
        provider: &str,
    ) -> Result<(), ObjectError> {
        let typos: Vec<String> = self
            .unknown_fields(known)
            .into_iter()
            .filter(|u| suggestion(u, written).is_some())
            .map(|u| with_suggestion(u, written))
            .collect();
        if typos.is_empty() {
            return Ok(());
        }
        Err(ObjectError::Invalid(format!(
            "unknown field(s) {} (the {provider} provider's fields: {})",
            typos.join(", "),
            written.join(", ")
        )))
    }

    /// The other unknown fields of such an object: leftovers the peer
    /// ignores too, for a warning.
    pub fn peer_leftovers<'a>(&'a self, known: &[&str], written: &[&str]) -> Vec<&'a str> {
        self.unknown_fields(known)
            .into_iter()
            .filter(|u| suggestion(u, written).is_none())
            .collect()
    }

    /// The backend-specific fields that `known` does not list.
    pub fn unknown_fields(&self, known: &[&str]) -> Vec<&str> {
        self.fields
            .keys()
            .map(String::as_str)
            .filter(|k| !known.contains(k))
            .collect()
    }
}

/// `name`, plus "(did you mean X?)" when a known name is close.
pub fn with_suggestion(name: &str, known: &[&str]) -> String {
    match suggestion(name, known) {
        Some(s) => format!("{} (did you mean {s}?)", shown_bare(name)),
        None => shown_bare(name),
    }
}

/// The known name `name` is most likely a misspelling of: equal but for
/// case, or within a small edit distance.
pub fn suggestion<'a>(name: &str, known: &[&'a str]) -> Option<&'a str> {
    if name.len() > 64 {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    if let Some(k) = known.iter().find(|k| k.to_ascii_lowercase() == lower) {
        return Some(k);
    }
    let limit = (name.len() / 4).clamp(1, 2);
    known
        .iter()
        .map(|k| (edit_distance(&lower, &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// Levenshtein distance with adjacent transpositions (names are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev2 = vec![0usize; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for i in 1..=a.len() {
        let mut cur = vec![i; b.len() + 1];
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            cur[j] = (prev[j] + 1).min(cur[j - 1] + 1).min(prev[j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                cur[j] = cur[j].min(prev2[j - 2] + 1);
            }
        }
        prev2 = std::mem::replace(&mut prev, cur);
    }
    prev[b.len()]
}

/// A string field of a raw `objects` entry (peer forms are rewritten
/// before [`ObjectSpec`] exists); a non-string value is an error.
pub(crate) fn string_field<'a>(
    map: &'a serde_yaml_ng::Mapping,
    key: &str,
) -> Result<Option<&'a str>, ObjectError> {
    match map.get(Value::String(key.into())) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(ObjectError::Invalid(format!(
            "{key} must be a string, got {}",
            yaml_kind(other)
        ))),
    }
}

pub(crate) fn yaml_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// Parses the `objects` parameter. Collects one failure per bad entry so the
/// user sees every problem at once; an unparsable document is one failure.
pub fn parse_objects(
    parameters: &BTreeMap<String, String>,
    default_backend: &str,
) -> Result<Vec<ObjectSpec>, Vec<Failure>> {
    parse_objects_with(
        parameters,
        &Defaults {
            backend: default_backend,
            azure_split_cert_key: false,
        },
    )
}

/// The daemon's settings that shape how an `objects` list is read.
#[derive(Debug, Clone, Copy)]
pub struct Defaults<'a> {
    /// Backend of objects that name none.
    pub backend: &'a str,
    /// `--azure-write-cert-and-key-in-separate-files`: an Azure secret also
    /// makes `<file>.crt` and `<file>.key`.
    pub azure_split_cert_key: bool,
}

/// [`parse_objects`] with all of the daemon's settings.
pub fn parse_objects_with(
    parameters: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> Result<Vec<ObjectSpec>, Vec<Failure>> {
    let (objects, failures) = parse_objects_partial_with(parameters, defaults);
    if failures.is_empty() {
        Ok(objects)
    } else {
        Err(failures)
    }
}

/// Like [`parse_objects`], but also returns the entries that did parse, so
/// `coffer check` can judge them further.
pub fn parse_objects_partial(
    parameters: &BTreeMap<String, String>,
    default_backend: &str,
) -> (Vec<ObjectSpec>, Vec<Failure>) {
    parse_objects_partial_with(
        parameters,
        &Defaults {
            backend: default_backend,
            azure_split_cert_key: false,
        },
    )
}

/// [`parse_objects_partial`] with all of the daemon's settings.
pub fn parse_objects_partial_with(
    parameters: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> (Vec<ObjectSpec>, Vec<Failure>) {
    match parse_all(parameters, defaults) {
        Ok(pair) => pair,
        Err(failures) => (Vec::new(), failures),
    }
}

fn parse_all(
    parameters: &BTreeMap<String, String>,
    defaults: &Defaults,
) -> Result<(Vec<ObjectSpec>, Vec<Failure>), Vec<Failure>> {
    let default_backend = defaults.backend;
    // Google's provider lists objects under `secrets` in its own shape.
    let gcp_form =
        !parameters.contains_key(OBJECTS_PARAM) && parameters.contains_key(GCP_SECRETS_PARAM);
    let param_name = if gcp_form {
        GCP_SECRETS_PARAM
    } else {
        OBJECTS_PARAM
    };
    let doc_failure = |reason: String| {
        vec![Failure {
            object: param_name.to_string(),
            error: ObjectError::Invalid(reason),
        }]
    };
    let Some(raw) = parameters
        .get(OBJECTS_PARAM)
        .or_else(|| parameters.get(GCP_SECRETS_PARAM))
    else {
        return Err(doc_failure(
            "the SecretProviderClass has no \"objects\" parameter".into(),
        ));
    };
    let spc_backend = parameters
        .get(BACKEND_PARAM)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty());
    let doc: Value = crate::yaml::parse(raw, &crate::yaml::REQUEST)
        .map_err(|e| doc_failure(format!("the document {e}")))?;
    // The Azure provider's shape: `array:` of YAML strings.
    let azure_spc = !gcp_form && parameters.contains_key(AZURE_VAULT_PARAM);
    let doc = match azure::array_entries(&doc) {
        Some(Ok(entries)) if !gcp_form => Value::Sequence(entries),
        Some(Err(e)) if !gcp_form => return Err(doc_failure(e.to_string())),
        _ => doc,
    };
    let entries = match doc {
        Value::Sequence(entries) => entries,
        Value::Null => return Err(doc_failure("the objects list is empty".into())),
        other => {
            return Err(doc_failure(format!(
                "must be a YAML list of objects, got {}",
                yaml_kind(&other)
            )))
        }
    };
    if entries.is_empty() {
        return Err(doc_failure("the objects list is empty".into()));
    }
    if entries.len() > MAX_OBJECTS {
        return Err(doc_failure(format!(
            "lists {} objects; one volume may have at most {MAX_OBJECTS}",
            entries.len()
        )));
    }
    let mut objects = Vec::with_capacity(entries.len());
    let mut failures = Vec::new();
    let translate = aws::path_translation(parameters.get(AWS_TRANSLATION_PARAM).map(|s| s.trim()));
    for (index, entry) in entries.into_iter().enumerate() {
        let entry = if gcp_form {
            from_gcp_form(entry)
        } else {
            entry
        };
        // The AWS provider's entries name the secret in objectName and the
        // file in objectAlias; one entry may make several files (jmesPath).
        let entries = match entry {
            Value::Mapping(map) if !gcp_form => {
                let label = match map.get(Value::String("objectName".into())) {
                    Some(Value::String(n)) if !n.is_empty() => n.clone(),
                    _ => format!("{param_name}[{index}]"),
                };
                let rewritten = if is_azure_form(&map, spc_backend, azure_spc) {
                    azure::peer_entries(map, defaults.azure_split_cert_key)
                } else if is_aws_form(&map, spc_backend, parameters) {
                    translate.clone().and_then(|t| aws::peer_entries(map, t))
                } else {
                    Ok(vec![Value::Mapping(map)])
                };
                match rewritten {
                    Ok(entries) => entries,
                    Err(error) => {
                        failures.push(Failure {
                            object: label,
                            error,
                        });
                        continue;
                    }
                }
            }
            other => vec![other],
        };
        for entry in entries {
            match parse_object(index, entry, spc_backend, default_backend, param_name) {
                Ok(o) => objects.push(o),
                Err((object, error)) => failures.push(Failure { object, error }),
            }
        }
    }
    if objects.len() > MAX_OBJECTS {
        return Err(doc_failure(format!(
            "makes {} objects (with jmesPath entries); one volume may have at most {MAX_OBJECTS}",
            objects.len()
        )));
    }
    Ok((objects, failures))
}

fn parse_object(
    index: usize,
    entry: Value,
    spc_backend: Option<&str>,
    default_backend: &str,
    list: &'static str,
) -> Result<ObjectSpec, (String, ObjectError)> {
    let position = format!("{list}[{index}]");
    let google = list == GCP_SECRETS_PARAM;
    let Value::Mapping(map) = entry else {
        return Err((
            position,
            ObjectError::Invalid(format!("must be a mapping, got {}", yaml_kind(&entry))),
        ));
    };
    let mut fields = BTreeMap::new();
    for (k, v) in map {
        match k {
            Value::String(k) => {
                fields.insert(k, v);
            }
            other => {
                return Err((
                    position,
                    ObjectError::Invalid(format!(
                        "keys must be strings, got {}",
                        yaml_kind(&other)
                    )),
                ))
            }
        }
    }
    let take_string =
        |fields: &mut BTreeMap<String, Value>, key: &str, label: &str| match fields.remove(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(other) => Err((
                label.to_string(),
                ObjectError::Invalid(format!("{key} must be a string, got {}", yaml_kind(&other))),
            )),
        };
    let name = take_string(&mut fields, "objectName", &position)?.unwrap_or_default();
    if name.is_empty() {
        let what = if google {
            "fileName or path is missing"
        } else {
            "objectName is missing"
        };
        return Err((position, ObjectError::Invalid(what.into())));
    }
    let label = name.clone();
    // The object's own backend, else the SPC's, else — for an SPC moved
    // from vault-csi-provider by changing only its provider — `vault` when
    // the object has a `secretPath`, else the daemon's default.
    let backend = take_string(&mut fields, "backend", &label)?
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .or_else(|| spc_backend.map(str::to_string))
        .unwrap_or_else(|| {
            if fields.contains_key("secretPath") {
                "vault".to_string()
            } else {
                default_backend.to_string()
            }
        });
    let encoding = match take_string(&mut fields, "encoding", &label)? {
        None => Encoding::default(),
        Some(raw) => Encoding::parse(&raw).ok_or_else(|| {
            (
                label.clone(),
                ObjectError::Invalid(format!(
                    "encoding {} is not one of utf-8, base64, hex",
                    shown(&raw)
                )),
            )
        })?,
    };
    let mode = match fields.remove("filePermission") {
        None | Some(Value::Null) => None,
        Some(v) => Some(parse_mode(&v).map_err(|e| (label.clone(), e))?),
    };
    let refresh_interval = match take_string(&mut fields, "refreshInterval", &label)? {
        None => None,
        Some(raw) => {
            Some(parse_duration_param("refreshInterval", &raw).map_err(|e| (label.clone(), e))?)
        }
    };
    let flag =
        |fields: &mut BTreeMap<String, Value>, key: &str, default: bool| match fields.remove(key) {
            None | Some(Value::Null) => Ok(default),
            Some(Value::Bool(b)) => Ok(b),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Some(other) => Err((
                label.clone(),
                ObjectError::Invalid(format!(
                    "{key} must be true or false, got {}",
                    yaml_kind(&other)
                )),
            )),
        };
    let optional = flag(&mut fields, "optional", false)?;
    let expand = flag(&mut fields, "expand", false)?;
    let render = flag(&mut fields, "render", true)?;
    Ok(ObjectSpec {
        index,
        name_field: if google { "path" } else { "objectName" },
        name,
        backend,
        mode,
        encoding,
        refresh_interval,
        optional,
        expand,
        render,
        fields,
        derived: Derived::default(),
    })
}

/// Parses a duration parameter such as `30s`, `10m` or `0`.
pub fn parse_duration_param(name: &str, raw: &str) -> Result<Duration, ObjectError> {
    let raw = raw.trim();
    if raw == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(raw).map_err(|_| {
        ObjectError::Invalid(format!(
            "{name} {} is not a duration such as 30s or 10m",
            shown(raw)
        ))
    })
}

/// Parses a file mode with Go yaml.v3 semantics: a plain number is decimal
/// unless written with a leading `0` (octal, `0640`), `0o`, `0x` or `0b`.
/// The YAML parser hands `0640` over as text, so both arrive here the same way.
pub fn parse_mode(value: &Value) -> Result<u32, ObjectError> {
    let parsed = match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => parse_go_int(s.trim()),
        _ => None,
    };
    let shown = match value {
        Value::Number(n) => n.to_string(),
        Value::String(s) => shown(s),
        other => yaml_kind(other).to_string(),
    };
    match parsed {
        Some(m) if m <= 0o777 => Ok(m as u32),
        Some(m) => Err(ObjectError::Invalid(format!(
            "filePermission {shown} is 0{m:o}, beyond 0777"
        ))),
        None => Err(ObjectError::Invalid(format!(
            "filePermission {shown} is not a file mode (write it as octal like 0640, or decimal like 416)"
        ))),
    }
}

/// Go's `strconv.ParseUint(s, 0, 64)` with an optional leading `+`.
fn parse_go_int(s: &str) -> Option<u64> {
    let s = s.strip_prefix('+').unwrap_or(s);
    let lower = s.to_ascii_lowercase();
    let (digits, radix) = if let Some(rest) = lower.strip_prefix("0x") {
        (rest, 16)
    } else if let Some(rest) = lower.strip_prefix("0o") {
        (rest, 8)
    } else if let Some(rest) = lower.strip_prefix("0b") {
        (rest, 2)
    } else if lower.len() > 1 && lower.starts_with('0') {
        (&lower[1..], 8)
    } else {
        (lower.as_str(), 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(objects: &str) -> BTreeMap<String, String> {
        BTreeMap::from([(OBJECTS_PARAM.to_string(), objects.to_string())])
    }

    fn mode_of(yaml: &str) -> Result<u32, ObjectError> {
        let v: Value = serde_yaml_ng::from_str(yaml).unwrap();
        parse_mode(&v)
    }

    #[test]
    fn yaml_v3_mode_semantics() {
        assert_eq!(mode_of("0640").unwrap(), 0o640);
        assert_eq!(mode_of("0624").unwrap(), 0o624);
        assert_eq!(mode_of("0o640").unwrap(), 0o640);
        assert_eq!(mode_of("420").unwrap(), 420);
        assert_eq!(mode_of("'0640'").unwrap(), 0o640);
        assert_eq!(mode_of("\"0400\"").unwrap(), 0o400);
        assert_eq!(mode_of("0x1a4").unwrap(), 0o644);
        assert_eq!(mode_of("0").unwrap(), 0);
        assert_eq!(mode_of("0000").unwrap(), 0);
        assert!(mode_of("0648").is_err());
        assert!(mode_of("rw").is_err());
        assert!(mode_of("true").is_err());
        assert!(mode_of("-1").is_err());
        assert!(mode_of("01777")
            .unwrap_err()
            .to_string()
            .contains("beyond 0777"));
        assert!(mode_of("512").is_err());
    }

    #[test]
    fn parses_objects_with_defaults_and_overrides() {
        let mut p = params(
            "- objectName: db/password\n  path: db/pass\n  filePermission: 0600\n\
             - objectName: cert\n  backend: vault\n  encoding: base64\n  secretPath: pki/x\n",
        );
        p.insert(BACKEND_PARAM.into(), "file".into());
        let objects = parse_objects(&p, "other").unwrap();
        assert_eq!(objects.len(), 2);
        assert_eq!(objects[0].name, "db/password");
        assert_eq!(objects[0].backend, "file");
        assert_eq!(objects[0].mode, Some(0o600));
        assert_eq!(objects[0].encoding, Encoding::Utf8);
        assert_eq!(objects[0].str_field("path").unwrap(), Some("db/pass"));
        assert_eq!(objects[1].backend, "vault");
        assert_eq!(objects[1].mode, None);
        assert_eq!(objects[1].encoding, Encoding::Base64);
        assert_eq!(objects[1].str_field("secretPath").unwrap(), Some("pki/x"));
        assert_eq!(
            parse_objects(&params("- objectName: a"), "dflt").unwrap()[0].backend,
            "dflt"
        );
    }

    #[test]
    fn collects_every_bad_entry() {
        let failures = parse_objects(
            &params(
                "- objectName: ok\n- path: nameless\n- objectName: b\n  encoding: rot13\n\
                 - objectName: c\n  filePermission: 0999\n- just-a-string\n- objectName: [1]\n",
            ),
            "file",
        )
        .unwrap_err();
        let labels: Vec<&str> = failures.iter().map(|f| f.object.as_str()).collect();
        assert_eq!(labels, ["objects[1]", "b", "c", "objects[4]", "objects[5]"]);
        assert!(failures[1].error.to_string().contains("rot13"));
        assert!(failures[3].error.to_string().contains("must be a mapping"));
    }

    #[test]
    fn bad_documents() {
        let missing = parse_objects(&BTreeMap::new(), "file").unwrap_err();
        assert!(missing[0]
            .error
            .to_string()
            .contains("no \"objects\" parameter"));
        let bad = parse_objects(
            &params("- objectName: [unclosed\n  password: hunter2"),
            "file",
        )
        .unwrap_err();
        let msg = bad[0].error.to_string();
        assert!(msg.contains("not valid YAML at line"), "{msg}");
        assert!(!msg.contains("hunter2"));
        let empty = parse_objects(&params(""), "file").unwrap_err();
        assert!(empty[0].error.to_string().contains("empty"));
        let map = parse_objects(&params("a: b"), "file").unwrap_err();
        assert!(map[0].error.to_string().contains("must be a YAML list"));
    }

    #[test]
    fn encodings_decode_without_echoing_values() {
        assert_eq!(Encoding::Base64.decode(b"aGk=\n").unwrap(), b"hi");
        assert_eq!(Encoding::Hex.decode(b"6869").unwrap(), b"hi");
        assert_eq!(Encoding::Utf8.decode(b"hi\n").unwrap(), b"hi\n");
        let e = Encoding::Base64
            .decode(b"s3cr3t!!")
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t") && !e.contains('!'), "{e}");
        let e = Encoding::Hex.decode(b"zz-secret").unwrap_err().to_string();
        assert!(!e.contains("secret") && !e.contains('z'), "{e}");
    }

    #[test]
    fn google_lists_are_reported_in_googles_words() {
        let p = BTreeMap::from([(
            GCP_SECRETS_PARAM.to_string(),
            "- resourceName: projects/p/secrets/s/versions/1\n  path: ok\n\
             - resourceName: projects/p/secrets/s/versions/1\n"
                .to_string(),
        )]);
        let failures = parse_objects(&p, "file").unwrap_err();
        assert_eq!(failures[0].object, "secrets[1]");
        assert!(failures[0]
            .error
            .to_string()
            .contains("fileName or path is missing"));
        let p = BTreeMap::from([(
            GCP_SECRETS_PARAM.to_string(),
            "- resourceName: projects/p/secrets/s/versions/1\n  path: my/invalid/../path/x\n"
                .to_string(),
        )]);
        let o = parse_objects(&p, "file").unwrap();
        assert_eq!(o[0].name_field, "path");
        let e = crate::paths::validate_path(&o[0].name)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid path"), "{e}");
    }

    #[test]
    fn derived_values_are_kept_per_object_and_not_copied() {
        let o = &parse_objects(&params("- objectName: a\n  secretPath: x"), "vault").unwrap()[0];
        let calls = std::cell::Cell::new(0);
        let make = || {
            calls.set(calls.get() + 1);
            o.name.clone()
        };
        assert_eq!(*o.derived(make), "a");
        assert_eq!(*o.derived(make), "a");
        assert_eq!(calls.get(), 1, "worked out once");
        // Asked for another type: worked out, not kept over the first.
        assert_eq!(*o.derived(|| 7u32), 7);
        assert_eq!(*o.derived(make), "a");
        // A copy (whose fields may then change) starts empty; equality and
        // the copy ignore the slot.
        let mut copy = o.clone();
        assert_eq!(&copy, o);
        copy.name = "b".into();
        assert_eq!(*copy.derived(|| copy.name.clone()), "b");
        assert_eq!(format!("{:?}", o.derived), "Derived(kept)");
    }

    #[test]
    fn typos_get_a_suggestion_and_peer_leftovers_pass() {
        let known = ["secretPath", "secretKey", "method", "secretArgs"];
        assert_eq!(suggestion("secertPath", &known), Some("secretPath"));
        assert_eq!(suggestion("secretpath", &known), Some("secretPath"));
        assert_eq!(suggestion("secretKye", &known), Some("secretKey"));
        assert_eq!(suggestion("objectAlias", &known), None);
        assert_eq!(suggestion("mthd", &known), None);
        let o = &parse_objects(
            &params("- objectName: a\n  secertPath: x\n  objectAlias: y"),
            "vault",
        )
        .unwrap()[0];
        let e = o.reject_typos(&known).unwrap_err().to_string();
        assert!(e.contains("secertPath (did you mean secretPath?)"), "{e}");
        assert!(!e.contains("objectAlias"), "{e}");
        assert_eq!(o.unknown_fields(&known), ["objectAlias", "secertPath"]);
    }

    #[test]
    fn unknown_fields_are_reported() {
        let o = &parse_objects(&params("- objectName: a\n  pth: x"), "file").unwrap()[0];
        let e = o.reject_unknown_fields(&["path"]).unwrap_err().to_string();
        assert!(e.contains("unknown field(s) pth"), "{e}");
    }
}
