//! The `format` outputs of `files`: env, JSON, YAML and Java properties
//! files, each escaping hostile values so that a standard parser of the
//! format reads back exactly the values (python-dotenv, `json`, PyYAML,
//! jproperties in the tests).

use serde_json::Value as Json;

use crate::secret::{SecretBuf, TooLarge};

/// An output format of `files`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Env,
    Json,
    Yaml,
    Properties,
}

impl Format {
    pub const NAMES: &'static str = "env, json, yaml, properties";

    pub fn parse(raw: &str) -> Option<Format> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "env" | "dotenv" => Some(Format::Env),
            "json" => Some(Format::Json),
            "yaml" => Some(Format::Yaml),
            "properties" => Some(Format::Properties),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Env => "env",
            Format::Json => "json",
            Format::Yaml => "yaml",
            Format::Properties => "properties",
        }
    }

    /// A key this format cannot hold, said without the value.
    pub fn check_key(self, key: &str) -> Result<(), String> {
        let ok = match self {
            Format::Env => {
                let mut chars = key.chars();
                chars
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
            }
            Format::Json | Format::Yaml | Format::Properties => !key.is_empty(),
        };
        if ok {
            Ok(())
        } else if self == Format::Env {
            Err(format!(
                "key {} is not an environment variable name (letters, digits and _, not starting with a digit)",
                crate::error::shown(key)
            ))
        } else {
            Err("a key is empty".into())
        }
    }

    /// Writes `entries` (in their order) into `out`.
    pub fn write(self, entries: &[(String, Json)], out: &mut SecretBuf) -> Result<(), TooLarge> {
        match self {
            Format::Env => {
                for (k, v) in entries {
                    out.push_str(k)?;
                    out.push_str("=")?;
                    env_value(&text(v), out)?;
                    out.push_str("\n")?;
                }
            }
            Format::Json => {
                out.push_str("{")?;
                for (i, (k, v)) in entries.iter().enumerate() {
                    out.push_str(if i == 0 { "\n  " } else { ",\n  " })?;
                    json(&Json::String(k.clone()), out)?;
                    out.push_str(": ")?;
                    json(v, out)?;
                }
                out.push_str(if entries.is_empty() { "}\n" } else { "\n}\n" })?;
            }
            Format::Yaml => {
                if entries.is_empty() {
                    out.push_str("{}\n")?;
                }
                for (k, v) in entries {
                    yaml_string(k, out)?;
                    out.push_str(": ")?;
                    yaml_flow(v, out)?;
                    out.push_str("\n")?;
                }
            }
            Format::Properties => {
                for (k, v) in entries {
                    properties(k, true, out)?;
                    out.push_str("=")?;
                    properties(&text(v), false, out)?;
                    out.push_str("\n")?;
                }
            }
        }
        Ok(())
    }
}

/// A value as a line-oriented format holds it: strings raw, anything else
/// as compact JSON.
fn text(v: &Json) -> zeroize::Zeroizing<String> {
    zeroize::Zeroizing::new(super::values::value_text(v))
}

/// A dotenv value, single-quoted (no `$` expansion by shells or compose;
/// only `\` and `'` escaped, newlines kept inside the quotes). A value with
/// a carriage return is double-quoted with escapes instead: readers that
/// open the file as text turn a raw CR into a newline.
fn env_value(s: &str, out: &mut SecretBuf) -> Result<(), TooLarge> {
    let double = s.contains('\r');
    out.push_str(if double { "\"" } else { "'" })?;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let escaped = match c {
            '\\' => "\\\\",
            '\'' if !double => "\\'",
            '"' if double => "\\\"",
            '\r' if double => "\\r",
            '\n' if double => "\\n",
            '\t' if double => "\\t",
            _ => continue,
        };
        out.push_str(&s[start..i])?;
        out.push_str(escaped)?;
        start = i + c.len_utf8();
    }
    out.push_str(&s[start..])?;
    out.push_str(if double { "\"" } else { "'" })
}

fn json(v: &Json, out: &mut SecretBuf) -> Result<(), TooLarge> {
    serde_json::to_writer(&mut *out, v).map_err(|_| TooLarge { limit: 0 })
}

/// A YAML double-quoted scalar: printable characters as they are, the rest
/// (controls, DEL, C1, line and paragraph separators, BOM) escaped, so YAML
/// 1.1 and 1.2 readers agree and no value is read as a bool or a number.
fn yaml_string(s: &str, out: &mut SecretBuf) -> Result<(), TooLarge> {
    out.push_str("\"")?;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        let printable = matches!(c, '\u{20}'..='\u{7e}' | '\u{a0}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..)
            && !matches!(c, '"' | '\\' | '\u{2028}' | '\u{2029}' | '\u{feff}');
        if printable {
            continue;
        }
        out.push_str(&s[start..i])?;
        let escaped = match c {
            '"' => "\\\"".to_string(),
            '\\' => "\\\\".to_string(),
            '\n' => "\\n".to_string(),
            '\t' => "\\t".to_string(),
            '\r' => "\\r".to_string(),
            c if (c as u32) <= 0xffff => format!("\\u{:04X}", c as u32),
            c => format!("\\U{:08X}", c as u32),
        };
        out.push_str(&escaped)?;
        start = i + c.len_utf8();
    }
    out.push_str(&s[start..])?;
    out.push_str("\"")
}

/// Any JSON value in YAML flow style, strings double-quoted.
fn yaml_flow(v: &Json, out: &mut SecretBuf) -> Result<(), TooLarge> {
    match v {
        Json::String(s) => yaml_string(s, out),
        Json::Array(items) => {
            out.push_str("[")?;
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ")?;
                }
                yaml_flow(item, out)?;
            }
            out.push_str("]")
        }
        Json::Object(map) => {
            out.push_str("{")?;
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ")?;
                }
                yaml_string(k, out)?;
                out.push_str(": ")?;
                yaml_flow(item, out)?;
            }
            out.push_str("}")
        }
        // null, true/false and numbers are the same words in JSON and YAML.
        other => json(other, out),
    }
}

/// Java properties escaping (as `Properties.store` does): `\`, `=`, `:`,
/// `#`, `!`, controls, spaces where they would be lost, and everything
/// outside printable ASCII as `\uXXXX` (UTF-16 units), so the file reads
/// back the same in ISO-8859-1 or UTF-8.
fn properties(s: &str, key: bool, out: &mut SecretBuf) -> Result<(), TooLarge> {
    for (i, c) in s.chars().enumerate() {
        match c {
            ' ' if key || i == 0 => out.push_str("\\ ")?,
            '\\' => out.push_str("\\\\")?,
            '\t' => out.push_str("\\t")?,
            '\n' => out.push_str("\\n")?,
            '\r' => out.push_str("\\r")?,
            '\u{c}' => out.push_str("\\f")?,
            '=' | ':' | '#' | '!' => out.push(&[b'\\', c as u8])?,
            ' '..='~' => out.push(&[c as u8])?,
            c => {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{u:04X}"))?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(f: Format, entries: &[(&str, Json)]) -> String {
        let entries: Vec<(String, Json)> = entries
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        let mut out = SecretBuf::with_limit(1 << 20);
        f.write(&entries, &mut out).unwrap();
        String::from_utf8(out.into_bytes().to_vec()).unwrap()
    }

    #[test]
    fn escapes() {
        let v = Json::String("it's a \\ $HOME \"q\"\nline2".into());
        assert_eq!(
            write(Format::Env, &[("A", v.clone())]),
            "A='it\\'s a \\\\ $HOME \"q\"\nline2'\n"
        );
        assert_eq!(
            write(
                Format::Properties,
                &[("a key", Json::String(" x=y:z#!é😀".into()))]
            ),
            "a\\ key=\\ x\\=y\\:z\\#\\!\\u00E9\\uD83D\\uDE00\n"
        );
        assert_eq!(
            write(
                Format::Yaml,
                &[("k", Json::String("yes\u{7f}\u{2028}".into()))]
            ),
            "\"k\": \"yes\\u007F\\u2028\"\n"
        );
        assert_eq!(
            write(Format::Json, &[("k", serde_json::json!({"a": 1}))]),
            "{\n  \"k\": {\"a\":1}\n}\n"
        );
        assert_eq!(
            write(Format::Env, &[("B", Json::String("a\r\n\"b\"\\".into()))]),
            "B=\"a\\r\\n\\\"b\\\"\\\\\"\n"
        );
        assert!(Format::Env.check_key("DB_PASS").is_ok());
        for bad in ["1A", "A-B", "", "A B", "É"] {
            assert!(Format::Env.check_key(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits_hold() {
        let mut out = SecretBuf::with_limit(10);
        let entries = vec![("K".to_string(), Json::String("x".repeat(20)))];
        assert!(Format::Env.write(&entries, &mut out).is_err());
    }
}
