//! What `files` and `expand` read from a fetched value: its raw text, and,
//! when it is a JSON object (or a YAML mapping), its keys.

use serde_json::{Map, Value as Json};
use zeroize::Zeroize;

use crate::error::ObjectError;

/// A fetched object as `files` and `expand` see it.
pub enum View {
    /// A JSON object or YAML mapping: its keys are addressable.
    Map { raw: String, map: Map<String, Json> },
    /// Any other UTF-8 value: only the whole text.
    Text(String),
    /// Bytes that are not UTF-8: usable only as a whole file.
    Binary,
}

impl View {
    /// Reads a value. `data_view` lets the backend point at the part of its
    /// answer that holds the secret's keys (Vault: `data.data`).
    pub fn of(bytes: &[u8], data_view: impl FnOnce(Json) -> Json) -> View {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return View::Binary;
        };
        let trimmed = text.trim_start();
        let parsed = if trimmed.starts_with('{') {
            serde_json::from_str::<Json>(text).ok()
        } else if looks_like_yaml_map(trimmed) {
            crate::yaml::parse(text, &crate::yaml::REQUEST)
                .ok()
                .and_then(|v| serde_json::to_value(v).ok())
        } else {
            None
        };
        match parsed.map(data_view) {
            Some(Json::Object(map)) => View::Map {
                raw: text.to_string(),
                map,
            },
            Some(mut other) => {
                zeroize_json(&mut other);
                View::Text(text.to_string())
            }
            None => View::Text(text.to_string()),
        }
    }

    /// The keys and values of a map-valued object, for `expand` and
    /// `fromObject`; `what` names the object in the error.
    pub fn map(&self, what: &str) -> Result<&Map<String, Json>, ObjectError> {
        match self {
            View::Map { map, .. } => Ok(map),
            View::Text(_) => Err(ObjectError::Invalid(format!(
                "{what}: the value is not a JSON object or YAML mapping"
            ))),
            View::Binary => Err(ObjectError::Invalid(format!(
                "{what}: the value is not UTF-8 text"
            ))),
        }
    }

    /// The whole value as text.
    pub fn text(&self, what: &str) -> Result<&str, ObjectError> {
        match self {
            View::Map { raw, .. } | View::Text(raw) => Ok(raw),
            View::Binary => Err(ObjectError::Invalid(format!(
                "{what}: the value is not UTF-8 text"
            ))),
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        match self {
            View::Map { raw, map } => {
                raw.zeroize();
                map.values_mut().for_each(zeroize_json);
            }
            View::Text(raw) => raw.zeroize(),
            View::Binary => {}
        }
    }
}

/// A YAML mapping starts with a key and a colon on its first content
/// line; anything else (a password, a PEM block) is not tried as YAML.
fn looks_like_yaml_map(text: &str) -> bool {
    let first = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#') && *l != "---");
    first.is_some_and(|l| {
        !l.starts_with("-----")
            && (l.contains(": ") || l.ends_with(':'))
            && !l.starts_with(['"', '\'', '[', '{', '-', '|', '>'])
    })
}

/// The text of one value inside a map: strings raw, anything else as
/// compact JSON (the rule of vault-csi-provider's `secretKey`).
pub fn value_text(value: &Json) -> String {
    match value {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Wipes the strings of a parsed value before it is freed.
pub fn zeroize_json(v: &mut Json) {
    match v {
        Json::String(s) => s.zeroize(),
        Json::Array(a) => a.iter_mut().for_each(zeroize_json),
        Json::Object(o) => o.values_mut().for_each(zeroize_json),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(s: &str) -> View {
        View::of(s.as_bytes(), |j| j)
    }

    #[test]
    fn maps_text_and_binary() {
        let v = view(r#"{"user":"u","port":5432}"#);
        let View::Map { map, .. } = &v else {
            panic!("JSON object")
        };
        assert_eq!(map["port"], 5432);
        let v = view("user: u\npass: 'p: q'\n");
        let View::Map { map, raw } = &v else {
            panic!("YAML mapping")
        };
        assert_eq!(map["pass"], "p: q");
        assert_eq!(raw, "user: u\npass: 'p: q'\n");
        for text in [
            "hunter2",
            "[1, 2]",
            "\"quoted\"",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "{not json",
            "a: [unclosed",
        ] {
            assert!(
                matches!(view(text), View::Text(ref t) if t == text),
                "{text}"
            );
        }
        assert!(matches!(View::of(&[0xff, 0xfe], |j| j), View::Binary));
        let inner = View::of(br#"{"data":{"data":{"k":"v"}}}"#, |j| {
            j["data"]["data"].clone()
        });
        assert!(matches!(inner, View::Map { ref map, .. } if map["k"] == "v"));
    }
}
