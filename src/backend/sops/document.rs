//! SOPS documents as the `sops` tool writes them: YAML (one or more
//! documents), JSON, dotenv and binary (JSON with one `data` value), read
//! into an ordered tree plus the `sops` metadata, and written back out.
//!
//! Order matters: the document's MAC hashes the values in the order they
//! appear, so maps keep theirs. Comments carry no value and are not part of
//! the MAC; they are dropped.

use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use zeroize::Zeroize;

/// A SOPS document can be no larger than this (and no larger than
/// `--max-response-bytes`): an SPC is at most 1.5 MiB anyway.
pub const MAX_DOCUMENT_BYTES: usize = 1024 * 1024;
/// Nesting of maps and lists.
pub const MAX_DEPTH: usize = 32;
/// Values (leaves) of one document: each costs an AES-GCM open.
pub const MAX_VALUES: usize = 20_000;
/// Key groups and keys per group looked at: each key costs a decryption
/// attempt (an X25519 exchange, or a Vault call).
pub const MAX_GROUPS: usize = 8;
pub const MAX_KEYS_PER_GROUP: usize = 32;
/// Flattened metadata entries of a dotenv document.
pub const MAX_METADATA_ENTRIES: usize = 4096;
/// One wrapped data key (an armored age file of one stanza is ~400 bytes).
pub const MAX_WRAPPED_KEY_BYTES: usize = 8 * 1024;

/// The file formats of the `sops` tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Yaml,
    Json,
    Dotenv,
    /// `sops` on a file of any other kind: JSON of one `data` string.
    Binary,
}

impl Format {
    pub fn parse(raw: &str) -> Option<Format> {
        match raw.to_ascii_lowercase().as_str() {
            "yaml" | "yml" => Some(Format::Yaml),
            "json" => Some(Format::Json),
            "dotenv" | "env" => Some(Format::Dotenv),
            "binary" => Some(Format::Binary),
            _ => None,
        }
    }

    /// By file name, as the `sops` tool decides.
    pub fn of_path(path: &str) -> Format {
        let ext = path.rsplit_once('.').map(|(_, e)| e).unwrap_or("");
        match ext {
            "yaml" | "yml" => Format::Yaml,
            "json" => Format::Json,
            "env" => Format::Dotenv,
            _ => Format::Binary,
        }
    }

    /// Inline text: JSON starts with `{`, dotenv has `sops_` lines, the
    /// rest is YAML.
    pub fn sniff(text: &str) -> Format {
        let first = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with('#'));
        match first {
            Some(l) if l.starts_with('{') => Format::Json,
            _ if text.lines().any(|l| l.starts_with("sops_mac=")) => Format::Dotenv,
            _ => Format::Yaml,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Yaml => "yaml",
            Format::Json => "json",
            Format::Dotenv => "dotenv",
            Format::Binary => "binary",
        }
    }
}

/// One value of a document. Values decrypted from the document are in
/// here too, so `Debug` shows shapes, never contents, and [`Node::wipe`]
/// clears them.
#[derive(Clone, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    /// A decrypted string that is not UTF-8 (binary files), or a `bytes`
    /// value.
    Bytes(Vec<u8>),
    Map(Vec<(String, Node)>),
    List(Vec<Node>),
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Node::Map(items) => f
                .debug_map()
                .entries(items.iter().map(|(k, v)| (k, v)))
                .finish(),
            Node::List(items) => f.debug_list().entries(items).finish(),
            other => f.write_str(other.kind()),
        }
    }
}

impl Node {
    pub fn kind(&self) -> &'static str {
        match self {
            Node::Null => "null",
            Node::Bool(_) => "bool",
            Node::Int(_) => "int",
            Node::Float(_) => "float",
            Node::Str(_) => "string",
            Node::Bytes(_) => "bytes",
            Node::Map(_) => "map",
            Node::List(_) => "list",
        }
    }

    /// Clears every string and byte value in place.
    pub fn wipe(&mut self) {
        match self {
            Node::Str(s) => s.zeroize(),
            Node::Bytes(b) => b.zeroize(),
            Node::Map(items) => items.iter_mut().for_each(|(_, v)| v.wipe()),
            Node::List(items) => items.iter_mut().for_each(Node::wipe),
            _ => {}
        }
    }

    pub fn get(&self, key: &str) -> Option<&Node> {
        match self {
            Node::Map(items) => items.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Node::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A leaf as text the way SOPS prints scalars: Go's formatting of
    /// numbers, `true`/`false`.
    pub fn scalar_text(&self) -> Option<Vec<u8>> {
        Some(match self {
            Node::Str(s) => s.as_bytes().to_vec(),
            Node::Bytes(b) => b.clone(),
            Node::Int(i) => i.to_string().into_bytes(),
            Node::Float(f) => go_float(*f).into_bytes(),
            Node::Bool(b) => b.to_string().into_bytes(),
            Node::Null => Vec::new(),
            Node::Map(_) | Node::List(_) => return None,
        })
    }

    fn count(&self, depth: usize, budget: &mut usize) -> Result<(), DocumentError> {
        if depth > MAX_DEPTH {
            return Err(DocumentError::TooDeep);
        }
        *budget = budget.checked_sub(1).ok_or(DocumentError::TooManyValues)?;
        match self {
            Node::Map(items) => items
                .iter()
                .try_for_each(|(_, v)| v.count(depth + 1, budget)),
            Node::List(items) => items.iter().try_for_each(|v| v.count(depth + 1, budget)),
            _ => Ok(()),
        }
    }
}

/// Go's `strconv.FormatFloat(f, 'f', -1, 64)`: the shortest text that reads
/// back as `f`, never an exponent (Rust's `Display` is the same for finite
/// values).
pub fn go_float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else {
        f.to_string()
    }
}

/// Why a document could not be read. Positions and names only: a parser's
/// own message may quote a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("is {size} bytes; SOPS documents are read up to {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("is not valid {format}{at}")]
    Syntax { format: &'static str, at: String },
    #[error("is {0}")]
    Yaml(#[from] crate::yaml::YamlError),
    #[error("nests deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("holds more than {MAX_VALUES} values")]
    TooManyValues,
    #[error("has the key {} twice", crate::error::shown(.0))]
    DuplicateKey(String),
    #[error("has a top level that is not a map")]
    NotAMap,
    #[error("has no `sops` metadata (is it encrypted with sops?)")]
    NoMetadata,
    #[error("has invalid `sops` metadata: {0}")]
    Metadata(String),
    #[error("uses YAML tags, which SOPS documents do not hold")]
    Tagged,
    #[error("{0}")]
    Other(String),
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a SOPS document value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        // Go's JSON reader takes what does not fit an int64 as a float.
        Ok(i64::try_from(v).map_or(Node::Float(v as f64), Node::Int))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Node, E> {
        Ok(Node::Float(v))
    }
    fn visit_str<E>(self, v: &str) -> Result<Node, E> {
        Ok(Node::Str(v.to_string()))
    }
    fn visit_string<E>(self, v: String) -> Result<Node, E> {
        Ok(Node::Str(v))
    }
    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = seq.next_element()? {
            items.push(v);
        }
        Ok(Node::List(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut items: Vec<(String, Node)> = Vec::new();
        // Keys seen, by hash: a scan of `items` would be quadratic in a
        // map of 100,000 keys.
        let mut seen = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            let v: Node = map.next_value()?;
            if !seen.insert(k.clone()) {
                return Err(de::Error::custom(DUPLICATE.to_string() + &k));
            }
            items.push((k, v));
        }
        Ok(Node::Map(items))
    }
    fn visit_enum<A: de::EnumAccess<'de>>(self, _: A) -> Result<Node, A::Error> {
        Err(de::Error::custom(TAGGED))
    }
}

const DUPLICATE: &str = "\u{0}duplicate:";
const TAGGED: &str = "\u{0}tagged";

impl Serialize for Node {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Node::Null => s.serialize_unit(),
            Node::Bool(b) => s.serialize_bool(*b),
            Node::Int(i) => s.serialize_i64(*i),
            // As Go's encoders print a float64: 7, not 7.0.
            Node::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => s.serialize_i64(*f as i64),
            Node::Float(f) => s.serialize_f64(*f),
            Node::Str(v) => s.serialize_str(v),
            Node::Bytes(b) => s.serialize_str(&String::from_utf8_lossy(b)),
            Node::List(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                for v in items {
                    seq.serialize_element(v)?;
                }
                seq.end()
            }
            Node::Map(items) => {
                let mut map = s.serialize_map(Some(items.len()))?;
                for (k, v) in items {
                    map.serialize_entry(k, v)?;
                }
                map.end()
            }
        }
    }
}

/// One YAML document's (or the whole file's) top-level map, in order.
pub type Branch = Vec<(String, Node)>;

/// One key that can open the document's data key.
#[derive(Clone, PartialEq)]
pub enum MasterKey {
    Age {
        recipient: String,
        enc: String,
    },
    /// A Vault (or OpenBao) transit key.
    Vault {
        address: String,
        engine_path: String,
        key_name: String,
        enc: String,
    },
    /// A kind coffer does not open (AWS/GCP KMS, Azure Key Vault, PGP,
    /// HuaweiCloud KMS): named in errors only.
    Other {
        kind: &'static str,
        name: String,
    },
}

impl MasterKey {
    /// The key as named in messages: no key material.
    pub fn describe(&self) -> String {
        match self {
            MasterKey::Age { recipient, .. } => format!("age {recipient}"),
            MasterKey::Vault {
                address,
                engine_path,
                key_name,
                ..
            } => format!("hc_vault {address}/v1/{engine_path}/keys/{key_name}"),
            MasterKey::Other { kind, name } => format!("{kind} {name}"),
        }
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

/// The `sops` metadata of a document.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    /// One group, unless the document splits its data key with Shamir.
    pub groups: Vec<Vec<MasterKey>>,
    pub shamir_threshold: usize,
    pub lastmodified: String,
    /// `ENC[...]` of the MAC.
    pub mac: String,
    pub unencrypted_suffix: Option<String>,
    pub encrypted_suffix: Option<String>,
    pub unencrypted_regex: Option<String>,
    pub encrypted_regex: Option<String>,
    /// `unencrypted_comment_regex` / `encrypted_comment_regex`: which
    /// values are encrypted depends on comments, which coffer does not
    /// keep; such documents are read by the shape of each value.
    pub by_comments: bool,
    pub mac_only_encrypted: bool,
    pub version: String,
}

/// A document as read: its values (encrypted, or decrypted by `crypt`)
/// and its metadata.
#[derive(Clone)]
pub struct Document {
    pub format: Format,
    /// One branch per YAML document; one for the other formats.
    pub branches: Vec<Vec<(String, Node)>>,
    pub metadata: Metadata,
}

impl fmt::Debug for Document {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Document")
            .field("format", &self.format)
            .field("branches", &self.branches.len())
            .field("metadata", &self.metadata)
            .finish()
    }
}

impl Drop for Document {
    fn drop(&mut self) {
        for branch in &mut self.branches {
            branch.iter_mut().for_each(|(_, v)| v.wipe());
        }
    }
}

/// Reads a SOPS document of `format`.
pub fn parse(bytes: &[u8], format: Format) -> Result<Document, DocumentError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::TooLarge {
            size: bytes.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DocumentError::Syntax {
        format: "UTF-8 text",
        at: format!(" at byte {}", e.valid_up_to()),
    })?;
    let (branches, meta) = match format {
        Format::Yaml => parse_yaml(text)?,
        Format::Json | Format::Binary => {
            let node: Node = serde_json::from_str(text).map_err(|e| json_error(&e))?;
            let mut branch = top_map(node)?;
            let meta = take_key(&mut branch, "sops").ok_or(DocumentError::NoMetadata)?;
            (vec![branch], meta)
        }
        Format::Dotenv => parse_dotenv(text)?,
    };
    let mut budget = MAX_VALUES;
    for branch in &branches {
        for (_, v) in branch {
            v.count(1, &mut budget)?;
        }
    }
    meta.count(1, &mut budget)?;
    let metadata = metadata(&meta)?;
    if format == Format::Binary
        && !(branches.len() == 1 && branches[0].len() == 1 && branches[0][0].0 == "data")
    {
        return Err(DocumentError::Other(
            "is not a SOPS binary document (one `data` value)".into(),
        ));
    }
    Ok(Document {
        format,
        branches,
        metadata,
    })
}

fn json_error(e: &serde_json::Error) -> DocumentError {
    let msg = e.to_string();
    if let Some(k) = msg.split(DUPLICATE).nth(1) {
        return DocumentError::DuplicateKey(k.split(" at line").next().unwrap_or(k).to_string());
    }
    if msg.contains("recursion limit") {
        return DocumentError::TooDeep;
    }
    DocumentError::Syntax {
        format: "JSON",
        at: format!(" at line {}, column {}", e.line(), e.column()),
    }
}

fn yaml_error(e: &serde_yaml_ng::Error) -> DocumentError {
    let msg = e.to_string();
    if let Some(k) = msg.split(DUPLICATE).nth(1) {
        return DocumentError::DuplicateKey(k.split(" at line").next().unwrap_or(k).to_string());
    }
    if msg.contains(TAGGED) {
        return DocumentError::Tagged;
    }
    DocumentError::Syntax {
        format: "YAML",
        at: e
            .location()
            .map(|l| format!(" at line {}, column {}", l.line(), l.column()))
            .unwrap_or_default(),
    }
}

fn top_map(node: Node) -> Result<Vec<(String, Node)>, DocumentError> {
    match node {
        Node::Map(items) => Ok(items),
        _ => Err(DocumentError::NotAMap),
    }
}

fn take_key(branch: &mut Vec<(String, Node)>, key: &str) -> Option<Node> {
    let at = branch.iter().position(|(k, _)| k == key)?;
    Some(branch.remove(at).1)
}

/// The bounds of a SOPS YAML document: a streaming pass measures it before
/// it is parsed (aliases, depth).
const YAML_LIMITS: crate::yaml::Limits = crate::yaml::Limits {
    max_bytes: MAX_DOCUMENT_BYTES,
    max_depth: MAX_DEPTH,
    max_nodes: MAX_VALUES as u64 * 2,
    max_scalar_bytes: 2 * MAX_DOCUMENT_BYTES as u64,
};

fn parse_yaml(text: &str) -> Result<(Vec<Branch>, Node), DocumentError> {
    crate::yaml::check(text, &YAML_LIMITS)?;
    let mut branches = Vec::new();
    let mut meta = None;
    for (i, doc) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let node = Node::deserialize(doc).map_err(|e| yaml_error(&e))?;
        if node == Node::Null {
            continue;
        }
        let mut branch = top_map(node)?;
        // As `sops` does: the first document's `sops` key is the metadata,
        // any other is dropped.
        match take_key(&mut branch, "sops") {
            Some(m) if i == 0 => meta = Some(m),
            _ => {}
        }
        branches.push(branch);
    }
    Ok((branches, meta.ok_or(DocumentError::NoMetadata)?))
}

/// dotenv: `KEY=value` lines (`\n` in a value is a newline), `#` comments;
/// the metadata is flattened into `sops_` keys.
fn parse_dotenv(text: &str) -> Result<(Vec<Branch>, Node), DocumentError> {
    let mut branch: Branch = Vec::new();
    let mut flat: Vec<(String, String)> = Vec::new();
    for (k, v) in dotenv_pairs(text)? {
        match k.strip_prefix("sops_") {
            Some(meta_key) => flat.push((meta_key.to_string(), v)),
            None => branch.push((k, Node::Str(v))),
        }
    }
    if flat.is_empty() {
        return Err(DocumentError::NoMetadata);
    }
    if flat.len() > MAX_METADATA_ENTRIES {
        return Err(DocumentError::Metadata(format!(
            "more than {MAX_METADATA_ENTRIES} sops_ entries"
        )));
    }
    Ok((vec![branch], unflatten(flat)?))
}

/// The `KEY=value` pairs of a dotenv text as sops reads them (`\n` is a
/// newline, `#` starts a comment line); a key given twice is refused.
fn dotenv_pairs(text: &str) -> Result<Vec<(String, String)>, DocumentError> {
    let mut pairs: Vec<(String, String)> = Vec::new();
    // A set, not a scan: a 1 MiB document holds ~100,000 lines.
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (n, line) in text.split('\n').enumerate() {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(DocumentError::Syntax {
                format: "dotenv",
                at: format!(" at line {} (no `=`)", n + 1),
            });
        };
        if !seen.insert(k) {
            return Err(DocumentError::DuplicateKey(k.to_string()));
        }
        pairs.push((k.to_string(), v.replace("\\n", "\n")));
    }
    Ok(pairs)
}

/// SOPS's flattening of nested metadata into one level: `a__map_b`,
/// `a__list_0`.
fn unflatten(flat: Vec<(String, String)>) -> Result<Node, DocumentError> {
    let bad = |k: &str| DocumentError::Metadata(format!("cannot place sops_{k}"));
    let mut root = Node::Map(Vec::new());
    for (key, value) in flat {
        let mut tokens: Vec<Result<String, usize>> = Vec::new();
        let mut rest = key.as_str();
        let mut current: Option<Result<String, usize>> = None;
        loop {
            let next_map = rest.find("__map_");
            let next_list = rest.find("__list_");
            let (at, is_map) = match (next_map, next_list) {
                (Some(m), Some(l)) if m < l => (Some(m), true),
                (Some(_), Some(l)) => (Some(l), false),
                (Some(m), None) => (Some(m), true),
                (None, Some(l)) => (Some(l), false),
                (None, None) => (None, false),
            };
            let piece = &rest[..at.unwrap_or(rest.len())];
            let token = match current.take() {
                None | Some(Ok(_)) => Ok(piece.to_string()),
                Some(Err(_)) => Err(piece.parse::<usize>().map_err(|_| bad(&key))?),
            };
            tokens.push(token);
            let Some(at) = at else { break };
            let sep = if is_map { "__map_" } else { "__list_" };
            current = Some(if is_map { Ok(String::new()) } else { Err(0) });
            rest = &rest[at + sep.len()..];
        }
        // Metadata lists are short (keys of a group, groups): an index
        // is a count of nodes to make, so it is bounded like one.
        if tokens.len() > MAX_DEPTH
            || tokens
                .iter()
                .any(|t| matches!(t, Err(i) if *i >= MAX_KEYS_PER_GROUP * MAX_GROUPS))
        {
            return Err(bad(&key));
        }
        place(&mut root, &tokens, Node::Str(value)).map_err(|()| bad(&key))?;
    }
    Ok(root)
}

fn place(at: &mut Node, path: &[Result<String, usize>], value: Node) -> Result<(), ()> {
    let Some((first, rest)) = path.split_first() else {
        return if *at == Node::Null {
            *at = value;
            Ok(())
        } else {
            Err(())
        };
    };
    if *at == Node::Null {
        *at = match first {
            Ok(_) => Node::Map(Vec::new()),
            Err(_) => Node::List(Vec::new()),
        };
    }
    let child = match (at, first) {
        (Node::Map(items), Ok(k)) => {
            if let Some(i) = items.iter().position(|(have, _)| have == k) {
                &mut items[i].1
            } else {
                items.push((k.clone(), Node::Null));
                &mut items.last_mut().ok_or(())?.1
            }
        }
        (Node::List(items), Err(i)) => {
            if items.len() <= *i {
                items.resize(*i + 1, Node::Null);
            }
            &mut items[*i]
        }
        _ => return Err(()),
    };
    place(child, rest, value)
}

fn metadata(meta: &Node) -> Result<Metadata, DocumentError> {
    let Node::Map(_) = meta else {
        return Err(DocumentError::Metadata("`sops` is not a map".into()));
    };
    let text = |k: &str| -> Result<Option<String>, DocumentError> {
        match meta.get(k) {
            None | Some(Node::Null) => Ok(None),
            Some(Node::Str(s)) => Ok(Some(s.clone())),
            // YAML may read a bare timestamp or number as something else.
            Some(n @ (Node::Int(_) | Node::Float(_) | Node::Bool(_))) => {
                Ok(n.scalar_text().and_then(|b| String::from_utf8(b).ok()))
            }
            Some(other) => Err(DocumentError::Metadata(format!(
                "{k} is a {}, not text",
                other.kind()
            ))),
        }
    };
    let flag = |k: &str| match meta.get(k) {
        Some(Node::Bool(b)) => *b,
        Some(Node::Str(s)) => crate::backend::go_bool(s).unwrap_or(false),
        _ => false,
    };
    let mut groups = Vec::new();
    match meta.get("key_groups") {
        Some(Node::List(list)) if !list.is_empty() => {
            for g in list {
                groups.push(group_keys(g)?);
            }
        }
        _ => groups.push(group_keys(meta)?),
    }
    if groups.len() > MAX_GROUPS {
        return Err(DocumentError::Metadata(format!(
            "{} key groups; coffer reads at most {MAX_GROUPS}",
            groups.len()
        )));
    }
    let shamir_threshold = match meta.get("shamir_threshold") {
        Some(Node::Int(i)) => usize::try_from(*i).unwrap_or(0),
        Some(Node::Str(s)) => s.trim().parse().unwrap_or(0),
        _ => 0,
    };
    let lastmodified = text("lastmodified")?.unwrap_or_default();
    let mac = text("mac")?.unwrap_or_default();
    Ok(Metadata {
        groups,
        shamir_threshold,
        lastmodified,
        mac,
        unencrypted_suffix: text("unencrypted_suffix")?.filter(|s| !s.is_empty()),
        encrypted_suffix: text("encrypted_suffix")?.filter(|s| !s.is_empty()),
        unencrypted_regex: text("unencrypted_regex")?.filter(|s| !s.is_empty()),
        encrypted_regex: text("encrypted_regex")?.filter(|s| !s.is_empty()),
        by_comments: ["unencrypted_comment_regex", "encrypted_comment_regex"]
            .iter()
            .any(|k| matches!(meta.get(k), Some(Node::Str(s)) if !s.is_empty())),
        mac_only_encrypted: flag("mac_only_encrypted"),
        version: text("version")?.unwrap_or_default(),
    })
}

/// The master keys of one group (or of the metadata's top level).
fn group_keys(group: &Node) -> Result<Vec<MasterKey>, DocumentError> {
    let mut keys = Vec::new();
    let entries = |kind: &str| -> Vec<&Node> {
        match group.get(kind) {
            Some(Node::List(l)) => l.iter().collect(),
            _ => Vec::new(),
        }
    };
    let field = |e: &Node, k: &str| e.get(k).and_then(Node::as_str).unwrap_or("").to_string();
    let wrapped = |e: &Node| -> Result<String, DocumentError> {
        let enc = field(e, "enc");
        if enc.len() > MAX_WRAPPED_KEY_BYTES {
            return Err(DocumentError::Metadata(format!(
                "a wrapped data key is {} bytes; coffer reads up to {MAX_WRAPPED_KEY_BYTES}",
                enc.len()
            )));
        }
        Ok(enc)
    };
    for e in entries("age") {
        keys.push(MasterKey::Age {
            recipient: field(e, "recipient"),
            enc: wrapped(e)?,
        });
    }
    for e in entries("hc_vault") {
        keys.push(MasterKey::Vault {
            address: field(e, "vault_address"),
            engine_path: field(e, "engine_path"),
            key_name: field(e, "key_name"),
            enc: wrapped(e)?,
        });
    }
    for (kind, name_field) in [
        ("kms", "arn"),
        ("gcp_kms", "resource_id"),
        ("azure_kv", "vault_url"),
        ("pgp", "fp"),
        ("hckms", "key_id"),
    ] {
        for e in entries(kind) {
            keys.push(MasterKey::Other {
                kind,
                name: crate::error::shown_bare(&field(e, name_field)).to_string(),
            });
        }
    }
    if keys.len() > MAX_KEYS_PER_GROUP {
        return Err(DocumentError::Metadata(format!(
            "{} keys in one group; coffer reads at most {MAX_KEYS_PER_GROUP}",
            keys.len()
        )));
    }
    Ok(keys)
}

/// Writes a decrypted document in its own format.
pub fn emit(doc: &Document) -> Result<Vec<u8>, DocumentError> {
    let failed =
        |e: &dyn std::error::Error| DocumentError::Other(format!("cannot be written: {e}"));
    match doc.format {
        Format::Yaml => {
            let mut out = Vec::new();
            for (i, branch) in doc.branches.iter().enumerate() {
                if i > 0 {
                    out.extend_from_slice(b"---\n");
                }
                let text = serde_yaml_ng::to_string(&MapRef(branch)).map_err(|e| failed(&e))?;
                out.extend_from_slice(text.as_bytes());
            }
            Ok(out)
        }
        Format::Json => {
            let branch = doc.branches.first().map(Vec::as_slice).unwrap_or(&[]);
            let mut out = serde_json::to_vec_pretty(&MapRef(branch)).map_err(|e| failed(&e))?;
            out.push(b'\n');
            Ok(out)
        }
        Format::Dotenv => {
            let mut out = Vec::new();
            for (k, v) in doc.branches.first().map(Vec::as_slice).unwrap_or(&[]) {
                let Some(text) = v.scalar_text() else {
                    return Err(DocumentError::Other(format!(
                        "cannot be written as dotenv: {} is a {}",
                        crate::error::shown(k),
                        v.kind()
                    )));
                };
                out.extend_from_slice(k.as_bytes());
                out.push(b'=');
                for &b in &text {
                    if b == b'\n' {
                        out.extend_from_slice(b"\\n");
                    } else {
                        out.push(b);
                    }
                }
                out.push(b'\n');
            }
            Ok(out)
        }
        Format::Binary => match doc.branches.first().and_then(|b| b.first()) {
            Some((_, v)) => v.scalar_text().ok_or_else(|| {
                DocumentError::Other("the binary document's data is not a value".into())
            }),
            None => Err(DocumentError::Other(
                "the binary document has no data".into(),
            )),
        },
    }
}

/// A map given by reference, serialized in order.
pub struct MapRef<'a>(pub &'a [(String, Node)]);

impl Serialize for MapRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// Reads a plain (not yet encrypted) document for `coffer seal`: the same
/// formats and bounds; a binary input is any bytes.
pub fn parse_plain(
    bytes: &[u8],
    format: Format,
) -> Result<Vec<Vec<(String, Node)>>, DocumentError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(DocumentError::TooLarge {
            size: bytes.len(),
            limit: MAX_DOCUMENT_BYTES,
        });
    }
    if format == Format::Binary {
        let data = match std::str::from_utf8(bytes) {
            Ok(s) => Node::Str(s.to_string()),
            Err(_) => Node::Bytes(bytes.to_vec()),
        };
        return Ok(vec![vec![("data".to_string(), data)]]);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DocumentError::Syntax {
        format: "UTF-8 text",
        at: format!(" at byte {}", e.valid_up_to()),
    })?;
    let branches = match format {
        Format::Yaml => {
            crate::yaml::check(text, &YAML_LIMITS)?;
            let mut out = Vec::new();
            for doc in serde_yaml_ng::Deserializer::from_str(text) {
                match Node::deserialize(doc).map_err(|e| yaml_error(&e))? {
                    Node::Null => {}
                    node => out.push(top_map(node)?),
                }
            }
            out
        }
        Format::Json => {
            vec![top_map(
                serde_json::from_str(text).map_err(|e| json_error(&e))?,
            )?]
        }
        Format::Dotenv => vec![dotenv_pairs(text)?
            .into_iter()
            .map(|(k, v)| (k, Node::Str(v)))
            .collect()],
        Format::Binary => unreachable!("handled above"),
    };
    let mut budget = MAX_VALUES;
    for branch in &branches {
        if branch
            .iter()
            .any(|(k, _)| k == "sops" || (format == Format::Dotenv && k.starts_with("sops_")))
        {
            return Err(DocumentError::Other(
                "already has `sops` metadata (is it encrypted already?)".into(),
            ));
        }
        for (_, v) in branch {
            v.count(1, &mut budget)?;
        }
    }
    Ok(branches)
}

/// The `sops` metadata as written into a document, in the order the
/// `sops` tool writes it.
pub fn metadata_node(meta: &Metadata) -> Node {
    let mut items: Vec<(String, Node)> = Vec::new();
    let s = |v: &str| Node::Str(v.to_string());
    let keys = meta.groups.first().map(Vec::as_slice).unwrap_or(&[]);
    let ages: Vec<Node> = keys
        .iter()
        .filter_map(|k| match k {
            MasterKey::Age { recipient, enc } => Some(Node::Map(vec![
                ("recipient".into(), s(recipient)),
                ("enc".into(), s(enc)),
            ])),
            _ => None,
        })
        .collect();
    let vaults: Vec<Node> = keys
        .iter()
        .filter_map(|k| match k {
            MasterKey::Vault {
                address,
                engine_path,
                key_name,
                enc,
            } => Some(Node::Map(vec![
                ("vault_address".into(), s(address)),
                ("engine_path".into(), s(engine_path)),
                ("key_name".into(), s(key_name)),
                ("created_at".into(), s(&meta.lastmodified)),
                ("enc".into(), s(enc)),
            ])),
            _ => None,
        })
        .collect();
    if !vaults.is_empty() {
        items.push(("hc_vault".into(), Node::List(vaults)));
    }
    if !ages.is_empty() {
        items.push(("age".into(), Node::List(ages)));
    }
    items.push(("lastmodified".into(), s(&meta.lastmodified)));
    items.push(("mac".into(), s(&meta.mac)));
    for (k, v) in [
        ("unencrypted_suffix", &meta.unencrypted_suffix),
        ("encrypted_suffix", &meta.encrypted_suffix),
        ("unencrypted_regex", &meta.unencrypted_regex),
        ("encrypted_regex", &meta.encrypted_regex),
    ] {
        if let Some(v) = v {
            items.push((k.into(), s(v)));
        }
    }
    if meta.mac_only_encrypted {
        items.push(("mac_only_encrypted".into(), Node::Bool(true)));
    }
    items.push(("version".into(), s(&meta.version)));
    Node::Map(items)
}

/// Writes an encrypted document (values sealed, metadata given) in
/// `format`, as the `sops` tool would.
pub fn emit_encrypted(
    branches: &[Branch],
    meta: &Metadata,
    format: Format,
) -> Result<Vec<u8>, DocumentError> {
    let meta_node = metadata_node(meta);
    let mut branches = branches.to_vec();
    if branches.is_empty() {
        branches.push(Vec::new());
    }
    // The metadata goes into the first document: under `sops`, or
    // flattened into `sops_` keys in dotenv.
    if format == Format::Dotenv {
        flatten("sops_", &meta_node, &mut branches[0]);
    } else {
        branches[0].push(("sops".to_string(), meta_node));
    }
    let doc = Document {
        // An encrypted binary document is JSON of `data` and `sops`.
        format: if format == Format::Binary {
            Format::Json
        } else {
            format
        },
        branches,
        metadata: Metadata::default(),
    };
    emit(&doc)
}

/// SOPS's flattening of metadata into dotenv keys.
fn flatten(prefix: &str, node: &Node, out: &mut Vec<(String, Node)>) {
    match node {
        Node::Map(items) => {
            for (k, v) in items {
                let p = format!("{prefix}{k}");
                match v {
                    Node::Map(_) => flatten(&format!("{p}__map_"), v, out),
                    Node::List(_) => flatten(&format!("{p}__list_"), v, out),
                    leaf => out.push((p, leaf.clone())),
                }
            }
        }
        Node::List(items) => {
            for (i, v) in items.iter().enumerate() {
                let p = format!("{prefix}{i}");
                match v {
                    Node::Map(_) => flatten(&format!("{p}__map_"), v, out),
                    Node::List(_) => flatten(&format!("{p}__list_"), v, out),
                    leaf => out.push((p, leaf.clone())),
                }
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const META: &str = "sops:\n  age:\n  - recipient: age1x\n    enc: |\n      -----BEGIN AGE ENCRYPTED FILE-----\n      abc\n      -----END AGE ENCRYPTED FILE-----\n  lastmodified: \"2024-01-01T00:00:00Z\"\n  mac: ENC[AES256_GCM,data:x,iv:y,tag:z,type:str]\n  unencrypted_suffix: _unencrypted\n  version: 3.9.0\n";

    #[test]
    fn yaml_keeps_order_and_metadata() {
        let text = format!("b: 1\na: [x, {{c: true}}]\nz: 1.5\n{META}");
        let doc = parse(text.as_bytes(), Format::Yaml).unwrap();
        let keys: Vec<&str> = doc.branches[0].iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["b", "a", "z"]);
        assert_eq!(doc.metadata.lastmodified, "2024-01-01T00:00:00Z");
        assert_eq!(
            doc.metadata.unencrypted_suffix.as_deref(),
            Some("_unencrypted")
        );
        assert!(
            matches!(&doc.metadata.groups[0][0], MasterKey::Age { recipient, enc } if recipient == "age1x" && enc.contains("abc"))
        );
        assert_eq!(
            format!("{:?}", doc.branches[0][1].1),
            "[string, {\"c\": bool}]"
        );
    }

    #[test]
    fn hostile_documents_are_refused_by_name() {
        let dup = format!("a: 1\na: 2\n{META}");
        assert_eq!(
            parse(dup.as_bytes(), Format::Yaml).unwrap_err(),
            DocumentError::DuplicateKey("a".into())
        );
        assert_eq!(
            parse(b"a: 1\n", Format::Yaml).unwrap_err(),
            DocumentError::NoMetadata
        );
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            parse(
                format!("{{\"a\": {deep}, \"sops\": {{}}}}").as_bytes(),
                Format::Json
            ),
            Err(DocumentError::TooDeep)
        ));
        let json_dup = br#"{"a": 1, "a": 2, "sops": {}}"#;
        assert_eq!(
            parse(json_dup, Format::Json).unwrap_err(),
            DocumentError::DuplicateKey("a".into())
        );
        let big = vec![b'a'; MAX_DOCUMENT_BYTES + 1];
        assert!(matches!(
            parse(&big, Format::Yaml),
            Err(DocumentError::TooLarge { .. })
        ));
        let tagged = format!("a: !custom x\n{META}");
        assert!(parse(tagged.as_bytes(), Format::Yaml).is_err());
    }

    #[test]
    fn dotenv_metadata_is_unflattened() {
        let text = "A=ENC[x]\n#comment\nB=two\\nlines\nsops_age__list_0__map_recipient=age1x\nsops_age__list_0__map_enc=-----BEGIN AGE ENCRYPTED FILE-----\\nabc\\n-----END AGE ENCRYPTED FILE-----\\n\nsops_lastmodified=2024-01-01T00:00:00Z\nsops_mac=ENC[m]\nsops_mac_only_encrypted=true\nsops_version=3.9.0\n";
        assert_eq!(Format::sniff(text), Format::Dotenv);
        let doc = parse(text.as_bytes(), Format::Dotenv).unwrap();
        assert_eq!(doc.branches[0].len(), 2);
        assert_eq!(doc.branches[0][1].1, Node::Str("two\nlines".into()));
        assert!(doc.metadata.mac_only_encrypted);
        assert!(
            matches!(&doc.metadata.groups[0][0], MasterKey::Age { enc, .. } if enc.starts_with("-----BEGIN AGE ENCRYPTED FILE-----\nabc\n"))
        );
        assert_eq!(emit(&doc).unwrap(), b"A=ENC[x]\nB=two\\nlines\n");
    }

    #[test]
    fn formats_by_name_and_by_content() {
        assert_eq!(Format::of_path("a/b.enc.yaml"), Format::Yaml);
        assert_eq!(Format::of_path("x.env"), Format::Dotenv);
        assert_eq!(Format::of_path("cert.pem"), Format::Binary);
        assert_eq!(Format::sniff("  {\"a\": 1}"), Format::Json);
        assert_eq!(Format::sniff("# c\na: 1"), Format::Yaml);
        assert_eq!(go_float(1234.56789), "1234.56789");
        assert_eq!(go_float(1e21), "1000000000000000000000");
        assert_eq!(go_float(f64::INFINITY), "+Inf");
    }
}
