//! The fields of a `sops` object: where the document is (`sops:` inline, or
//! `sopsFile:` below `--file-backend-root`), its `format`, and what to
//! write (`key:` one value, or the whole document; `expand` is the render
//! stage's).

use std::borrow::Cow;

use serde_yaml_ng::Value;

use super::document::Format;
use crate::error::{shown, ObjectError};
use crate::spc::ObjectSpec;

/// Fields an object of this backend may carry.
pub const FIELDS: &[&str] = &["sops", "sopsFile", "format", "key"];
/// Steps of a `key:` path.
const MAX_KEY_STEPS: usize = 32;

/// Where the document comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Source<'a> {
    /// The document's text, in the SPC.
    Inline(Cow<'a, str>),
    /// A path below the file backend's root (its scope rules apply).
    File(&'a str),
}

/// One step of a `key:` path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Key(String),
    Index(usize),
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Step::Key(k) => write!(f, "[{}]", shown(k)),
            Step::Index(i) => write!(f, "[{i}]"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct SopsObject<'a> {
    pub source: Source<'a>,
    /// `format:`, else by `sopsFile`'s name, else by the inline text.
    pub format: Format,
    /// `key:`: the one value to write.
    pub key: Option<Vec<Step>>,
}

impl<'a> SopsObject<'a> {
    pub fn from_spec(object: &'a ObjectSpec) -> Result<Self, ObjectError> {
        object.reject_unknown_fields(FIELDS)?;
        let inline = match object.fields.get("sops") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(Cow::Borrowed(s.as_str())),
            // The document written as YAML inside the object, not as a block
            // of text: the same tree.
            Some(v @ Value::Mapping(_)) => {
                Some(Cow::Owned(serde_yaml_ng::to_string(v).map_err(|_| {
                    ObjectError::Invalid("sops: the document cannot be read as YAML".into())
                })?))
            }
            Some(_) => {
                return Err(ObjectError::Invalid(
                    "sops must hold the SOPS document (a block of text `sops: |`, or a map)".into(),
                ))
            }
        };
        let file = object.str_field("sopsFile")?;
        let source = match (inline, file) {
            (Some(text), None) => Source::Inline(text),
            (None, Some(path)) if !path.trim().is_empty() => Source::File(path),
            (None, _) => {
                return Err(ObjectError::Invalid(
                    "a sops object needs the document: `sops:` (inline) or `sopsFile:` (a path below --file-backend-root)".into(),
                ))
            }
            (Some(_), Some(_)) => {
                return Err(ObjectError::Invalid(
                    "sops and sopsFile are both set; give the document one way".into(),
                ))
            }
        };
        let format = match object.str_field("format")? {
            Some(raw) => Format::parse(raw).ok_or_else(|| {
                ObjectError::Invalid(format!(
                    "format {} is not one of yaml, json, dotenv, binary",
                    shown(raw)
                ))
            })?,
            None => match &source {
                Source::Inline(text) => Format::sniff(text),
                Source::File(path) if path.ends_with(".ini") => {
                    return Err(ObjectError::Invalid(format!(
                        "sopsFile {}: coffer does not read sops' INI documents; keep the document as YAML, JSON or dotenv",
                        shown(path)
                    )))
                }
                Source::File(path) => Format::of_path(path),
            },
        };
        let key = match object.fields.get("key") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_key(v)?),
        };
        if key.is_some() && format == Format::Binary {
            return Err(ObjectError::Invalid(
                "key: a binary SOPS document is one value; it has no keys".into(),
            ));
        }
        if key.is_some() && object.expand {
            return Err(ObjectError::Invalid(
                "key and expand: choose one value (key) or every key (expand)".into(),
            ));
        }
        Ok(SopsObject {
            source,
            format,
            key,
        })
    }
}

/// `key:` as a top-level key (`password`; a dotted `db.password` is split
/// when the document has no such key, see `output`), a list of steps (`[db, 0]`),
/// or the `sops --extract` form (`["db"]["hosts"][0]`).
fn parse_key(v: &Value) -> Result<Vec<Step>, ObjectError> {
    let steps = match v {
        Value::String(s) if s.starts_with('[') && s.ends_with(']') => parse_extract(s)?,
        Value::String(s) if !s.is_empty() => vec![Step::Key(s.clone())],
        Value::Sequence(items) if !items.is_empty() => items
            .iter()
            .map(|i| match i {
                Value::String(s) => Ok(Step::Key(s.clone())),
                Value::Number(n) => n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Step::Index)
                    .ok_or_else(bad_key),
                _ => Err(bad_key()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err(bad_key()),
    };
    if steps.len() > MAX_KEY_STEPS {
        return Err(ObjectError::Invalid(format!(
            "key has more than {MAX_KEY_STEPS} steps"
        )));
    }
    Ok(steps)
}

fn bad_key() -> ObjectError {
    ObjectError::Invalid(
        "key must be a key name, a list of keys and list indexes, or a path like [\"db\"][\"password\"]".into(),
    )
}

/// `["a"]["b"][0]`: quoted keys (with `\"` and `\\` escapes) and indexes.
fn parse_extract(s: &str) -> Result<Vec<Step>, ObjectError> {
    let mut steps = Vec::new();
    let mut rest = s;
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[').ok_or_else(bad_key)?;
        if let Some(quoted) = inner.strip_prefix('"') {
            let mut key = String::new();
            let mut chars = quoted.char_indices();
            let end = loop {
                match chars.next() {
                    Some((_, '\\')) => match chars.next() {
                        Some((_, c)) => key.push(c),
                        None => return Err(bad_key()),
                    },
                    Some((i, '"')) => break i,
                    Some((_, c)) => key.push(c),
                    None => return Err(bad_key()),
                }
            };
            rest = quoted[end + 1..].strip_prefix(']').ok_or_else(bad_key)?;
            steps.push(Step::Key(key));
        } else {
            let close = inner.find(']').ok_or_else(bad_key)?;
            let n = inner[..close].trim().parse().map_err(|_| bad_key())?;
            steps.push(Step::Index(n));
            rest = &inner[close + 1..];
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(fields: &str) -> ObjectSpec {
        let text = format!("- objectName: out\n  backend: sops\n{fields}");
        let mut list = crate::spc::parse_objects(
            &[("objects".to_string(), text)].into_iter().collect(),
            "sops",
        )
        .unwrap();
        list.remove(0)
    }

    #[test]
    fn sources_formats_and_keys() {
        let o = spec("  sops: |\n    a: ENC[x]\n    sops: {}\n  key: a\n");
        let p = SopsObject::from_spec(&o).unwrap();
        assert!(matches!(p.source, Source::Inline(_)));
        assert_eq!(p.format, Format::Yaml);
        assert_eq!(p.key, Some(vec![Step::Key("a".into())]));
        let o = spec("  sopsFile: team/app.env\n  key: '[\"db\"][\"hosts\"][1]'\n");
        let p = SopsObject::from_spec(&o).unwrap();
        assert_eq!(
            (p.source, p.format),
            (Source::File("team/app.env"), Format::Dotenv)
        );
        assert_eq!(
            p.key.unwrap(),
            vec![
                Step::Key("db".into()),
                Step::Key("hosts".into()),
                Step::Index(1)
            ]
        );
        let o = spec("  sops:\n    a: ENC[x]\n    sops: {mac: y}\n  key: [a, 0]\n");
        let p = SopsObject::from_spec(&o).unwrap();
        assert!(matches!(p.source, Source::Inline(ref t) if t.contains("mac: y")));
        assert_eq!(p.key.unwrap(), vec![Step::Key("a".into()), Step::Index(0)]);
    }

    #[test]
    fn mistakes_are_named() {
        let err = |f: &str| SopsObject::from_spec(&spec(f)).unwrap_err().to_string();
        assert!(err("  key: a\n").contains("needs the document"));
        assert!(err("  sops: x\n  sopsFile: y\n").contains("both set"));
        assert!(err("  sops: x\n  format: toml\n").contains("not one of"));
        assert!(err("  sops: x\n  sopsfile: y\n").contains("sopsFile"));
        assert!(err("  sops: x\n  key: '[\"a\"]x]'\n").contains("key must be"));
        assert!(err("  sopsFile: x.bin\n  key: a\n").contains("binary"));
        assert!(err("  sops: x\n  key: a\n  expand: true\n").contains("choose one"));
        assert!(err("  sopsFile: app.ini\n").contains("INI"));
    }
}
