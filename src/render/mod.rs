//! The render stage of a Mount, after the fetches: objects with
//! `expand: true` become one file per key, the `files` parameter's entries
//! are built from fetched values (a template, or a format: env, JSON, YAML,
//! properties), and `versionsFile` lists every file's version. Nothing here
//! calls a backend; everything is bounded (entries, template size, fuel,
//! output bytes) and all-or-nothing like the rest of the Mount.

mod format;
mod template;
mod values;

use std::collections::{BTreeMap, BTreeSet};

use serde_yaml_ng::Value as Yaml;
use zeroize::Zeroizing;

use crate::error::{shown, Failure, ObjectError};
use crate::key::{Key, KeyBuilder};
use crate::paths;
use crate::secret::SecretBuf;
use crate::spc::{self, ObjectSpec};
use crate::version::VersionKey;

pub use format::Format;
pub use template::{FILTERS, FUEL, MAX_INPUT_BYTES, MAX_TEMPLATE_BYTES, WORK_BUDGET};
pub use values::View;

/// SPC parameter: the YAML list of files built from objects.
pub const FILES_PARAM: &str = "files";
/// SPC parameter: the name of a JSON file listing every file's version.
pub const VERSIONS_FILE_PARAM: &str = "versionsFile";
/// Entries of one `files` list.
pub const MAX_FILES: usize = 256;
/// Keys one `expand` may write.
pub const MAX_EXPANDED_KEYS: usize = 1000;
/// Entries of one `from` map.
const MAX_FROM: usize = 1000;
/// Object fields that pick one value, which `expand` cannot combine with.
const EXTRACT_FIELDS: &[&str] = &["secretKey", "extractJSONKey", "extractYAMLKey", "jmesPath"];
const FIELDS: &[&str] = &[
    "path",
    "filePermission",
    "template",
    "format",
    "from",
    "fromObject",
];

/// What one `files` entry is made of.
#[derive(Debug)]
pub enum Content {
    /// Compiled in [`Files`] under the entry's label.
    Template(template::Reads),
    Format {
        format: Format,
        source: Source,
    },
}

/// Where a format's keys and values come from.
#[derive(Debug)]
pub enum Source {
    /// Output key → `object` or `object.key`, in the SPC's order.
    From(Vec<(String, String)>),
    /// Every key of one map-valued object.
    FromObject(String),
}

/// One entry of `files`.
#[derive(Debug)]
pub struct FileSpec {
    pub index: usize,
    pub path: String,
    pub mode: Option<u32>,
    pub content: Content,
    /// The entry's definition, mixed into its version.
    digest: Key,
}

impl FileSpec {
    /// The entry's name in messages and the audit log.
    pub fn label(&self) -> String {
        format!("files[{}] ({})", self.index, self.path)
    }
}

/// The parsed `files` and `versionsFile` parameters of one SPC.
#[derive(Debug)]
pub struct Files {
    pub specs: Vec<FileSpec>,
    templates: template::Templates,
    pub versions_file: Option<String>,
}

fn failure(label: String, reason: impl Into<String>) -> Failure {
    Failure {
        object: label,
        error: ObjectError::Invalid(reason.into()),
    }
}

impl Files {
    /// Whether any entry is a template (rendering may then scan its inputs
    /// many times).
    pub fn has_templates(&self) -> bool {
        self.specs
            .iter()
            .any(|s| matches!(s.content, Content::Template(_)))
    }

    /// Reads `files` and `versionsFile`; `None` when the SPC has neither
    /// (the usual case costs nothing). Collects one failure per bad entry.
    pub fn parse(parameters: &BTreeMap<String, String>) -> Result<Option<Files>, Vec<Failure>> {
        let raw = parameters.get(FILES_PARAM).filter(|s| !s.trim().is_empty());
        let versions_file = parameters
            .get(VERSIONS_FILE_PARAM)
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty());
        if raw.is_none() && versions_file.is_none() {
            return Ok(None);
        }
        let mut files = Files {
            specs: Vec::new(),
            templates: template::Templates::new(),
            versions_file,
        };
        let Some(raw) = raw else {
            return Ok(Some(files));
        };
        let doc_failure = |reason: String| vec![failure(FILES_PARAM.to_string(), reason)];
        let doc = crate::yaml::parse(raw, &crate::yaml::REQUEST)
            .map_err(|e| doc_failure(format!("the document {e}")))?;
        let entries = match doc {
            Yaml::Sequence(entries) => entries,
            Yaml::Null => Vec::new(),
            other => {
                return Err(doc_failure(format!(
                    "must be a YAML list of files, got {}",
                    spc::yaml_kind(&other)
                )))
            }
        };
        if entries.len() > MAX_FILES {
            return Err(doc_failure(format!(
                "lists {} files; one volume may have at most {MAX_FILES}",
                entries.len()
            )));
        }
        let mut failures = Vec::new();
        for (index, entry) in entries.into_iter().enumerate() {
            match files.parse_entry(index, entry) {
                Ok(spec) => files.specs.push(spec),
                Err(f) => failures.push(f),
            }
        }
        if failures.is_empty() {
            Ok(Some(files))
        } else {
            Err(failures)
        }
    }

    fn parse_entry(&mut self, index: usize, entry: Yaml) -> Result<FileSpec, Failure> {
        let position = format!("files[{index}]");
        let Yaml::Mapping(map) = entry else {
            return Err(failure(
                position,
                format!("must be a mapping, got {}", spc::yaml_kind(&entry)),
            ));
        };
        let mut fields = BTreeMap::new();
        for (k, v) in map {
            let Yaml::String(k) = k else {
                return Err(failure(position, "keys must be strings"));
            };
            fields.insert(k, v);
        }
        let unknown: Vec<String> = fields
            .keys()
            .filter(|k| !FIELDS.contains(&k.as_str()))
            .map(|k| spc::with_suggestion(k, FIELDS))
            .collect();
        if !unknown.is_empty() {
            return Err(failure(
                position,
                format!(
                    "unknown field(s) {} (known: {})",
                    unknown.join(", "),
                    FIELDS.join(", ")
                ),
            ));
        }
        let string = |fields: &mut BTreeMap<String, Yaml>, key: &str| match fields.remove(key) {
            None | Some(Yaml::Null) => Ok(None),
            Some(Yaml::String(s)) => Ok(Some(s)),
            Some(other) => Err(format!(
                "{key} must be a string, got {}",
                spc::yaml_kind(&other)
            )),
        };
        let path = string(&mut fields, "path")
            .map_err(|e| failure(position.clone(), e))?
            .filter(|p| !p.is_empty())
            .ok_or_else(|| failure(position.clone(), "path is missing"))?;
        let label = format!("files[{index}] ({path})");
        let fail = |e: String| failure(label.clone(), e);
        let mode = match fields.remove("filePermission") {
            None | Some(Yaml::Null) => None,
            Some(v) => Some(spc::parse_mode(&v).map_err(|e| fail(e.to_string()))?),
        };
        let template = string(&mut fields, "template").map_err(fail)?;
        let format = string(&mut fields, "format").map_err(fail)?;
        let from_object = string(&mut fields, "fromObject").map_err(fail)?;
        let from =
            match fields.remove("from") {
                None | Some(Yaml::Null) => None,
                Some(Yaml::Mapping(m)) => {
                    if m.len() > MAX_FROM {
                        return Err(fail(format!(
                            "from has {} keys; at most {MAX_FROM}",
                            m.len()
                        )));
                    }
                    let mut pairs = Vec::with_capacity(m.len());
                    for (k, v) in m {
                        match (k, v) {
                            (Yaml::String(k), Yaml::String(v)) if !v.trim().is_empty() => {
                                pairs.push((k, v.trim().to_string()))
                            }
                            _ => return Err(fail(
                                "from must map output keys to object names (object or object.key)"
                                    .into(),
                            )),
                        }
                    }
                    Some(pairs)
                }
                Some(other) => {
                    return Err(fail(format!(
                        "from must be a mapping, got {}",
                        spc::yaml_kind(&other)
                    )))
                }
            };
        let mut digest = KeyBuilder::new("file-spec")
            .field(&path)
            .opt(mode.map(|m| m.to_string()));
        let content = match (template, format) {
            (Some(_), Some(_)) => {
                return Err(fail("template and format exclude each other".into()))
            }
            (None, None) => return Err(fail("one of template or format is needed".into())),
            (Some(source), None) => {
                if from.is_some() || from_object.is_some() {
                    return Err(fail(
                        "from and fromObject go with format, not template".into(),
                    ));
                }
                digest = digest.field("template").field(&source);
                let reads = self.templates.add(&label, &source).map_err(fail)?;
                Content::Template(reads)
            }
            (None, Some(raw)) => {
                let format = Format::parse(&raw).ok_or_else(|| {
                    fail(format!(
                        "format {} is not one of {}",
                        shown(&raw),
                        Format::NAMES
                    ))
                })?;
                digest = digest.field(format.name());
                let source = match (from, from_object) {
                    (Some(_), Some(_)) => {
                        return Err(fail("from and fromObject exclude each other".into()))
                    }
                    (None, None) => {
                        return Err(fail(format!(
                            "format {} needs from or fromObject",
                            format.name()
                        )))
                    }
                    (Some(pairs), None) => {
                        for (k, v) in &pairs {
                            format.check_key(k).map_err(fail)?;
                            digest = digest.field(k).field(v);
                        }
                        Source::From(pairs)
                    }
                    (None, Some(object)) => {
                        digest = digest.field("fromObject").field(&object);
                        Source::FromObject(object)
                    }
                };
                Content::Format { format, source }
            }
        };
        Ok(FileSpec {
            index,
            path,
            mode,
            content,
            digest: digest.finish(),
        })
    }

    /// The objects one entry reads, as indices into the object list; an
    /// error names a reference that is not an object of the SPC.
    fn inputs(&self, spec: &FileSpec, names: &Names<'_>) -> Result<Vec<usize>, String> {
        let mut found = BTreeSet::new();
        match &spec.content {
            Content::Template(reads) if reads.any => found.extend(0..names.len),
            Content::Template(reads) => {
                for name in reads.names.iter().filter(|n| *n != template::OBJECTS_VAR) {
                    found.insert(names.get(name).ok_or_else(|| {
                        format!(
                            "the template reads {}, which is not an object of this SPC (objects whose names are not identifiers are read as objects[\"name\"])",
                            shown(name)
                        )
                    })?);
                }
                for name in &reads.by_key {
                    found.insert(names.get(name).ok_or_else(|| {
                        format!(
                            "the template reads objects[{}], which is not an object of this SPC",
                            shown(name)
                        )
                    })?);
                }
            }
            Content::Format { source, .. } => {
                let refs: Vec<&str> = match source {
                    Source::From(pairs) => pairs.iter().map(|(_, r)| r.as_str()).collect(),
                    Source::FromObject(o) => vec![o.as_str()],
                };
                for r in refs {
                    let (i, key) = names
                        .resolve(r)
                        .ok_or_else(|| format!("{} names no object of this SPC", shown(r)))?;
                    if key.is_some() && matches!(source, Source::FromObject(_)) {
                        return Err(format!(
                            "fromObject {} names no object of this SPC",
                            shown(r)
                        ));
                    }
                    found.insert(i);
                }
            }
        }
        Ok(found.into_iter().collect())
    }

    /// Every problem that shows without fetching: references to objects,
    /// output paths, and collisions with objects and other files.
    pub fn check(&self, objects: &[ObjectSpec]) -> Vec<Failure> {
        let mut failures = Vec::new();
        let names = Names::new(objects.iter().map(|o| o.name.as_str()));
        for spec in &self.specs {
            let checked = paths::validate_path(&spec.path)
                .map_err(|e| format!("path: {e}"))
                .and_then(|_| self.inputs(spec, &names).map(|_| ()));
            if let Err(e) = checked {
                failures.push(failure(spec.label(), e));
            }
        }
        if let Some(v) = &self.versions_file {
            if let Err(e) = paths::validate_path(v) {
                failures.push(failure(
                    format!("parameters.{VERSIONS_FILE_PARAM}"),
                    e.to_string(),
                ));
            }
        }
        let object_paths = object_outputs(objects);
        let own: Vec<String> = self
            .specs
            .iter()
            .map(|s| s.path.clone())
            .chain(self.versions_file.clone())
            .collect();
        let before: BTreeSet<String> =
            paths::validate_path_set(object_paths.iter().map(String::as_str))
                .iter()
                .map(ToString::to_string)
                .collect();
        for e in paths::validate_path_set(object_paths.iter().chain(own.iter()).map(String::as_str))
        {
            if !before.contains(&e.to_string()) {
                failures.push(failure(FILES_PARAM.to_string(), e.to_string()));
            }
        }
        failures
    }
}

/// The paths objects write, as `check_objects` sees them before any fetch:
/// `render: false` writes nothing, `expand: true` writes below its name.
pub fn object_outputs(objects: &[ObjectSpec]) -> Vec<String> {
    objects
        .iter()
        .filter(|o| o.render)
        .map(|o| {
            if o.expand {
                format!("{}/*", o.name)
            } else {
                o.name.clone()
            }
        })
        .collect()
}

/// Problems of `expand` and `render` on one object.
pub fn check_object(object: &ObjectSpec) -> Result<(), ObjectError> {
    if object.expand {
        if let Some(f) = EXTRACT_FIELDS
            .iter()
            .find(|f| object.fields.contains_key(**f))
        {
            return Err(ObjectError::Invalid(format!(
                "expand writes every key of the value; it cannot be combined with {f}"
            )));
        }
        if !object.render {
            return Err(ObjectError::Invalid(
                "expand writes files and render: false writes none; choose one".into(),
            ));
        }
    }
    Ok(())
}

/// Object names, for resolving references of `files`.
struct Names<'a> {
    index: std::collections::HashMap<&'a str, usize>,
    len: usize,
}

impl<'a> Names<'a> {
    fn new(names: impl Iterator<Item = &'a str>) -> Self {
        let mut index = std::collections::HashMap::new();
        let mut len = 0;
        for (i, name) in names.enumerate() {
            index.entry(name).or_insert(i);
            len = i + 1;
        }
        Self { index, len }
    }

    fn get(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// `object` or `object.key`: the longest object name the reference
    /// equals or starts with followed by a dot; the rest is a top-level key.
    fn resolve<'r>(&self, reference: &'r str) -> Option<(usize, Option<&'r str>)> {
        if let Some(i) = self.get(reference) {
            return Some((i, None));
        }
        reference
            .rmatch_indices('.')
            .filter(|(at, _)| *at + 1 < reference.len())
            .find_map(|(at, _)| {
                self.get(&reference[..at])
                    .map(|i| (i, Some(&reference[at + 1..])))
            })
    }
}

/// One fetched object as the render stage gets it.
pub struct Input<'a> {
    pub object: &'a ObjectSpec,
    /// The value after the object's `encoding`; empty when absent.
    pub contents: &'a [u8],
    pub version: &'a str,
    /// An optional object that does not exist.
    pub absent: bool,
    /// The backend's view of its answer (Vault: the secret's data).
    pub data_view: &'a (dyn Fn(serde_json::Value) -> serde_json::Value + Sync),
}

/// A file the render stage produced.
pub struct Output {
    pub path: String,
    pub mode: u32,
    pub contents: Zeroizing<Vec<u8>>,
    pub version: String,
    /// Reported as its own ObjectVersion (id = path): entries of `files`
    /// and the versions file. Expanded keys are covered by their object's.
    pub reported: bool,
}

/// Fixed settings of one render.
pub struct Settings<'a> {
    pub default_mode: u32,
    pub version_key: &'a VersionKey,
    /// Bytes any one file may have (the response limit).
    pub max_bytes: usize,
}

/// Builds the expanded and rendered files, and the versions file. `plain`
/// lists the files the objects write themselves (path, version), for the
/// versions file. Failures name the object or file, never a value.
pub fn build(
    files: Option<&Files>,
    inputs: &[Input<'_>],
    plain: &[(String, String)],
    settings: &Settings<'_>,
) -> Result<Vec<Output>, Vec<Failure>> {
    let needs_view: Vec<bool> = inputs
        .iter()
        .map(|i| !i.absent && i.object.expand)
        .collect();
    let mut read_by_files = vec![false; inputs.len()];
    let names = Names::new(inputs.iter().map(|i| i.object.name.as_str()));
    let specs_inputs: Vec<Vec<usize>> = match files {
        Some(f) => {
            let mut all = Vec::with_capacity(f.specs.len());
            for spec in &f.specs {
                let used = f
                    .inputs(spec, &names)
                    .map_err(|e| vec![failure(spec.label(), e)])?;
                for &i in &used {
                    read_by_files[i] = true;
                }
                all.push(used);
            }
            all
        }
        None => Vec::new(),
    };
    let views: Vec<Option<View>> = inputs
        .iter()
        .enumerate()
        .map(|(i, input)| {
            (!input.absent && (needs_view[i] || read_by_files[i]))
                .then(|| View::of(input.contents, input.data_view))
        })
        .collect();
    let mut outputs = Vec::new();
    let mut failures = Vec::new();
    // expand: one file per top-level key.
    for (i, input) in inputs.iter().enumerate() {
        if !needs_view[i] {
            continue;
        }
        let Some(view) = &views[i] else { continue };
        match expand(input, view, settings) {
            Ok(mut files) => outputs.append(&mut files),
            Err(e) => failures.push(Failure {
                object: input.object.label(),
                error: e,
            }),
        }
    }
    if let Some(f) = files {
        let root = f
            .specs
            .iter()
            .any(|s| matches!(s.content, Content::Template(_)))
            .then(|| template_root(inputs, &views));
        let read = Read {
            inputs,
            views: &views,
            names: &names,
            root: root.as_ref(),
        };
        for (spec, used) in f.specs.iter().zip(&specs_inputs) {
            match render_one(f, spec, used, &read, settings) {
                Ok(out) => outputs.push(out),
                Err(e) => failures.push(failure(spec.label(), e)),
            }
        }
    }
    if !failures.is_empty() {
        return Err(failures);
    }
    if let Some(path) = files.and_then(|f| f.versions_file.as_ref()) {
        let mut listed: BTreeMap<&str, &str> = plain
            .iter()
            .map(|(p, v)| (p.as_str(), v.as_str()))
            .collect();
        listed.extend(
            outputs
                .iter()
                .map(|o| (o.path.as_str(), o.version.as_str())),
        );
        let mut body = serde_json::to_vec_pretty(&listed).unwrap_or_default();
        body.push(b'\n');
        let version = settings.version_key.version(path, &body);
        outputs.push(Output {
            path: path.clone(),
            mode: settings.default_mode,
            contents: Zeroizing::new(body),
            version,
            reported: true,
        });
    }
    // Paths written by expansion are known only now: check them all.
    let mut all: Vec<&str> = plain.iter().map(|(p, _)| p.as_str()).collect();
    all.extend(outputs.iter().map(|o| o.path.as_str()));
    let clashes = paths::validate_path_set(all);
    if !clashes.is_empty() {
        return Err(clashes
            .into_iter()
            .map(|e| failure(FILES_PARAM.to_string(), e.to_string()))
            .collect());
    }
    Ok(outputs)
}

fn expand(
    input: &Input<'_>,
    view: &View,
    settings: &Settings<'_>,
) -> Result<Vec<Output>, ObjectError> {
    let map = view.map("expand")?;
    if map.len() > MAX_EXPANDED_KEYS {
        return Err(ObjectError::Invalid(format!(
            "expand: the value has {} keys; at most {MAX_EXPANDED_KEYS} are written",
            map.len()
        )));
    }
    let mode = input.object.mode.unwrap_or(settings.default_mode);
    map.iter()
        .map(|(key, value)| {
            if key.contains('/') || paths::validate_path(key).is_err() {
                return Err(ObjectError::Invalid(format!(
                    "expand: key {} is not a valid file name",
                    shown(key)
                )));
            }
            let path = format!("{}/{key}", input.object.name);
            paths::validate_path(&path)
                .map_err(|e| ObjectError::Invalid(format!("expand: key {}: {e}", shown(key))))?;
            let contents = Zeroizing::new(values::value_text(value).into_bytes());
            let version = settings.version_key.version(&path, &contents);
            Ok(Output {
                path,
                mode,
                contents,
                version,
                reported: false,
            })
        })
        .collect()
}

/// The variables templates see: each present object under its name, and
/// all of them under `objects`.
fn template_root(inputs: &[Input<'_>], views: &[Option<View>]) -> minijinja::Value {
    let mut all = BTreeMap::new();
    for (input, view) in inputs.iter().zip(views) {
        let value = match view {
            Some(View::Map { raw, map }) => {
                minijinja::Value::from_object(template::MapValue::new(raw, map))
            }
            Some(View::Text(t)) => minijinja::Value::from(t.as_str()),
            Some(View::Binary) | None => continue,
        };
        all.insert(input.object.name.clone(), value);
    }
    let mut root = all.clone();
    root.insert(
        template::OBJECTS_VAR.to_string(),
        minijinja::Value::from(all),
    );
    minijinja::Value::from(root)
}

/// What every entry of one render reads.
struct Read<'a, 'b> {
    inputs: &'a [Input<'b>],
    views: &'a [Option<View>],
    names: &'a Names<'b>,
    root: Option<&'a minijinja::Value>,
}

fn render_one(
    files: &Files,
    spec: &FileSpec,
    used: &[usize],
    read: &Read<'_, '_>,
    settings: &Settings<'_>,
) -> Result<Output, String> {
    let Read {
        inputs,
        views,
        names,
        root,
    } = *read;
    let contents = match &spec.content {
        Content::Template(_) => {
            for &i in used {
                let name = &inputs[i].object.name;
                if matches!(views[i], Some(View::Binary)) {
                    return Err(format!(
                        "the template reads {}, whose value is not UTF-8 text",
                        shown(name)
                    ));
                }
                if inputs[i].contents.len() > MAX_INPUT_BYTES {
                    return Err(format!(
                        "the template reads {}, which has {} bytes; templates read values of at most {MAX_INPUT_BYTES}",
                        shown(name),
                        inputs[i].contents.len()
                    ));
                }
            }
            let root = root.cloned().unwrap_or_default();
            files
                .templates
                .render(&spec.label(), root, settings.max_bytes)?
                .into_bytes()
        }
        Content::Format { format, source } => {
            let view_of = |i: usize| -> Result<&View, String> {
                views[i].as_ref().ok_or_else(|| {
                    format!(
                        "object {} is optional and does not exist",
                        shown(&inputs[i].object.name)
                    )
                })
            };
            let unknown = |r: &str| format!("{} names no object of this SPC", shown(r));
            let mut entries: Vec<(String, serde_json::Value)> = Vec::new();
            match source {
                Source::From(pairs) => {
                    for (key, reference) in pairs {
                        let (i, sub) =
                            names.resolve(reference).ok_or_else(|| unknown(reference))?;
                        let name = inputs[i].object.name.as_str();
                        let view = view_of(i)?;
                        let value = match sub {
                            None => serde_json::Value::String(
                                view.text(name).map_err(|e| e.to_string())?.to_string(),
                            ),
                            Some(k) => view
                                .map(name)
                                .map_err(|e| e.to_string())?
                                .get(k)
                                .cloned()
                                .ok_or_else(|| {
                                format!("object {} has no key {}", shown(name), shown(k))
                            })?,
                        };
                        entries.push((key.clone(), value));
                    }
                }
                Source::FromObject(name) => {
                    let i = names.get(name).ok_or_else(|| unknown(name))?;
                    let map = view_of(i)?.map(name).map_err(|e| e.to_string())?;
                    for (k, v) in map {
                        format.check_key(k)?;
                        entries.push((k.clone(), v.clone()));
                    }
                }
            }
            let mut out = SecretBuf::with_limit(settings.max_bytes);
            let written = format.write(&entries, &mut out);
            entries
                .iter_mut()
                .for_each(|(_, v)| values::zeroize_json(v));
            written.map_err(|_| format!("the file would exceed {} bytes", settings.max_bytes))?;
            out.into_bytes()
        }
    };
    // The version moves exactly when the entry or one of its inputs does.
    let mut digest = KeyBuilder::new("file-version").key(&spec.digest);
    for &i in used {
        digest = digest
            .field(&inputs[i].object.name)
            .field(inputs[i].version);
    }
    let version = settings
        .version_key
        .version(&spec.path, digest.finish().as_bytes());
    Ok(Output {
        path: spec.path.clone(),
        mode: spec.mode.unwrap_or(settings.default_mode),
        contents,
        version,
        reported: true,
    })
}
