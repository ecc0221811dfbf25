//! SOPS's value encryption: each value sealed with AES-256-GCM under the
//! document's data key, a 32-byte nonce, and its path in the tree
//! (`a:b:`) as additional data, so a value moved to another path does not
//! open; and the MAC: SHA-512 over the values in document order, sealed
//! with the `lastmodified` stamp as additional data. Decryption is all or
//! nothing: any value that does not open, or a MAC that does not match,
//! refuses the whole document.

use aes_gcm::aead::consts::U32;
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::aes::Aes256;
use aes_gcm::AesGcm;
use base64::Engine as _;
use regex::Regex;
use sha2::{Digest, Sha512};
use zeroize::Zeroizing;

use super::document::{Document, Metadata, Node};

type Cipher = AesGcm<Aes256, U32>;

const TAG_BYTES: usize = 16;
const NONCE_BYTES: usize = 32;
/// Written before the values when only encrypted values are hashed
/// (`mac_only_encrypted`), so the two MACs of one document differ.
const MAC_ONLY_ENCRYPTED_INIT: [u8; 32] = [
    0x8a, 0x3f, 0xd2, 0xad, 0x54, 0xce, 0x66, 0x52, 0x7b, 0x10, 0x34, 0xf3, 0xd1, 0x47, 0xbe, 0x0b,
    0x0b, 0x97, 0x5b, 0x3b, 0xf4, 0x4f, 0x72, 0xc6, 0xfd, 0xad, 0xec, 0x81, 0x76, 0xf2, 0x7d, 0x69,
];
/// Compiled size of a document's `*_regex` rule: Rust's regexes, like Go's
/// (RE2), run in linear time; this bounds their memory.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// The 32-byte data key, wiped when dropped.
pub type DataKey = Zeroizing<[u8; 32]>;

/// Why a document did not decrypt. Names paths and kinds, never values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptError {
    #[error("the value at {0} is not a SOPS-encrypted value (ENC[AES256_GCM,...])")]
    NotEncrypted(String),
    #[error("the value at {0} does not decrypt: it was altered, moved from another path, or sealed with another data key")]
    Tampered(String),
    #[error("the value at {0} has an unknown type {1}")]
    UnknownType(String, String),
    #[error("the value at {0} decrypts to something that is not a {1}")]
    BadTyped(String, &'static str),
    #[error("the document has no MAC (sops.mac), so it cannot be checked")]
    NoMac,
    #[error("the document's lastmodified stamp {0} is not an RFC 3339 time")]
    BadStamp(String),
    #[error("the document's MAC does not open: it or its lastmodified stamp was altered")]
    MacTampered,
    #[error("the document's MAC does not match its values: a value was added, removed, reordered or altered")]
    MacMismatch,
    #[error("the document's {0} rule is not a usable regular expression")]
    BadRegex(&'static str),
}

/// Which values of a document are encrypted: SOPS's suffix and regex
/// rules, tested against every key on a value's path.
pub struct Rules {
    unencrypted_suffix: Option<String>,
    encrypted_suffix: Option<String>,
    unencrypted_regex: Option<Regex>,
    encrypted_regex: Option<Regex>,
    /// Comment rules: decided by whether the value is an `ENC[...]` text.
    by_shape: bool,
    mac_only_encrypted: bool,
}

impl Rules {
    pub fn of(meta: &Metadata) -> Result<Rules, CryptError> {
        let compile = |raw: &Option<String>, name| {
            raw.as_deref()
                .map(|r| {
                    regex::RegexBuilder::new(r)
                        .size_limit(REGEX_SIZE_LIMIT)
                        .build()
                        .map_err(|_| CryptError::BadRegex(name))
                })
                .transpose()
        };
        Ok(Rules {
            unencrypted_suffix: meta.unencrypted_suffix.clone(),
            encrypted_suffix: meta.encrypted_suffix.clone(),
            unencrypted_regex: compile(&meta.unencrypted_regex, "unencrypted_regex")?,
            encrypted_regex: compile(&meta.encrypted_regex, "encrypted_regex")?,
            by_shape: meta.by_comments,
            mac_only_encrypted: meta.mac_only_encrypted,
        })
    }

    /// SOPS's `shouldBeEncrypted`, rule by rule in its order.
    fn encrypted(&self, path: &[&str], value: &Node) -> bool {
        if self.by_shape {
            return matches!(value, Node::Str(s) if s.is_empty() || s.starts_with("ENC[AES256_GCM,"));
        }
        let mut encrypted = true;
        if let Some(suffix) = &self.unencrypted_suffix {
            if path.iter().any(|p| p.ends_with(suffix.as_str())) {
                encrypted = false;
            }
        }
        if let Some(suffix) = &self.encrypted_suffix {
            encrypted = path.iter().any(|p| p.ends_with(suffix.as_str()));
        }
        if let Some(re) = &self.unencrypted_regex {
            if path.iter().any(|p| re.is_match(p)) {
                encrypted = false;
            }
        }
        if let Some(re) = &self.encrypted_regex {
            encrypted = path.iter().any(|p| re.is_match(p));
        }
        encrypted
    }
}

/// Decrypts every value of `doc` in place with `key` and checks its MAC.
/// On any failure the values decrypted so far are wiped.
pub fn decrypt(doc: &mut Document, key: &DataKey) -> Result<(), CryptError> {
    let result = decrypt_inner(doc, key);
    if result.is_err() {
        for branch in &mut doc.branches {
            branch.iter_mut().for_each(|(_, v)| v.wipe());
        }
    }
    result
}

fn decrypt_inner(doc: &mut Document, key: &DataKey) -> Result<(), CryptError> {
    if doc.metadata.mac.is_empty() {
        return Err(CryptError::NoMac);
    }
    let stamp = go_rfc3339(&doc.metadata.lastmodified)
        .ok_or_else(|| CryptError::BadStamp(crate::error::shown(&doc.metadata.lastmodified)))?;
    let rules = Rules::of(&doc.metadata)?;
    let cipher = Cipher::new(key.as_slice().into());
    let mut hash = Sha512::new();
    if rules.mac_only_encrypted {
        hash.update(MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut path = Vec::new();
    for branch in &mut doc.branches {
        for (k, v) in branch.iter_mut() {
            path.push(k.clone());
            walk(v, &mut path, &mut |node, path| {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let encrypted = rules.encrypted(&refs, node);
                if encrypted {
                    let aad = aad(&refs);
                    let Node::Str(sealed) = &*node else {
                        return Err(CryptError::NotEncrypted(shown_path(&refs)));
                    };
                    let opened = open_value(&cipher, sealed, &aad, &refs)?;
                    node.wipe();
                    *node = opened;
                }
                if !rules.mac_only_encrypted || encrypted {
                    if let Some(bytes) = mac_bytes(node) {
                        hash.update(&*bytes);
                    }
                }
                Ok(())
            })?;
            path.pop();
        }
    }
    let computed = Zeroizing::new(hex::encode_upper(hash.finalize()));
    let stored = match open_value(&cipher, &doc.metadata.mac, &stamp, &[]) {
        Ok(Node::Str(s)) => Zeroizing::new(s),
        _ => return Err(CryptError::MacTampered),
    };
    if computed.as_bytes() != stored.as_bytes() {
        return Err(CryptError::MacMismatch);
    }
    Ok(())
}

/// Encrypts every value of `branches` in place with `key` (the rules of
/// `meta`) and returns the sealed MAC for `meta.mac`.
pub fn encrypt(
    branches: &mut [Vec<(String, Node)>],
    meta: &Metadata,
    key: &DataKey,
) -> Result<String, CryptError> {
    let rules = Rules::of(meta)?;
    let cipher = Cipher::new(key.as_slice().into());
    let mut hash = Sha512::new();
    if rules.mac_only_encrypted {
        hash.update(MAC_ONLY_ENCRYPTED_INIT);
    }
    let mut path = Vec::new();
    for branch in branches.iter_mut() {
        for (k, v) in branch.iter_mut() {
            path.push(k.clone());
            walk(v, &mut path, &mut |node, path| {
                let refs: Vec<&str> = path.iter().map(String::as_str).collect();
                let encrypted = !rules.by_shape && rules.encrypted(&refs, node);
                if !rules.mac_only_encrypted || encrypted {
                    if let Some(bytes) = mac_bytes(node) {
                        hash.update(&*bytes);
                    }
                }
                if encrypted {
                    let sealed = seal_value(&cipher, node, &aad(&refs));
                    node.wipe();
                    *node = Node::Str(sealed);
                }
                Ok(())
            })?;
            path.pop();
        }
    }
    let mac = hex::encode_upper(hash.finalize());
    let stamp = go_rfc3339(&meta.lastmodified)
        .ok_or_else(|| CryptError::BadStamp(crate::error::shown(&meta.lastmodified)))?;
    Ok(seal_value(&cipher, &Node::Str(mac), &stamp))
}

/// What [`walk`] does with each leaf and its path.
type Leaf<'a> = dyn FnMut(&mut Node, &[String]) -> Result<(), CryptError> + 'a;

/// Visits the leaves (not nulls) of `node` with their key path; list items
/// share their list's path, as in SOPS.
fn walk(node: &mut Node, path: &mut Vec<String>, leaf: &mut Leaf<'_>) -> Result<(), CryptError> {
    match node {
        Node::Null => Ok(()),
        Node::Map(items) => {
            for (k, v) in items.iter_mut() {
                path.push(k.clone());
                walk(v, path, leaf)?;
                path.pop();
            }
            Ok(())
        }
        Node::List(items) => items.iter_mut().try_for_each(|v| walk(v, path, leaf)),
        _ => leaf(node, path),
    }
}

fn aad(path: &[&str]) -> String {
    let mut s = path.join(":");
    s.push(':');
    s
}

fn shown_path(path: &[&str]) -> String {
    crate::error::shown(&path.join("."))
}

/// SOPS's `ToBytes` of a value for the MAC: Go's number formatting and
/// Python's `True`/`False`.
fn mac_bytes(node: &Node) -> Option<Zeroizing<Vec<u8>>> {
    Some(Zeroizing::new(match node {
        Node::Bool(true) => b"True".to_vec(),
        Node::Bool(false) => b"False".to_vec(),
        Node::Null | Node::Map(_) | Node::List(_) => return None,
        other => other.scalar_text()?,
    }))
}

/// Opens one `ENC[AES256_GCM,data:…,iv:…,tag:…,type:…]` value.
fn open_value(cipher: &Cipher, sealed: &str, aad: &str, path: &[&str]) -> Result<Node, CryptError> {
    if sealed.is_empty() {
        // SOPS writes an empty value as an empty text, unsealed.
        return Ok(Node::Str(String::new()));
    }
    let where_ = || shown_path(path);
    let parts = parse_sealed(sealed).ok_or_else(|| CryptError::NotEncrypted(where_()))?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (Ok(mut data), Ok(iv), Ok(tag)) = (
        b64.decode(parts.data),
        b64.decode(parts.iv),
        b64.decode(parts.tag),
    ) else {
        return Err(CryptError::NotEncrypted(where_()));
    };
    if iv.len() != NONCE_BYTES || tag.len() != TAG_BYTES {
        return Err(CryptError::NotEncrypted(where_()));
    }
    data.extend_from_slice(&tag);
    let plain = Zeroizing::new(
        cipher
            .decrypt(
                iv.as_slice().into(),
                Payload {
                    msg: &data,
                    aad: aad.as_bytes(),
                },
            )
            .map_err(|_| CryptError::Tampered(where_()))?,
    );
    let text = || std::str::from_utf8(&plain).ok();
    let bad = |kind| CryptError::BadTyped(where_(), kind);
    Ok(match parts.kind {
        "str" => match text() {
            Some(s) => Node::Str(s.to_string()),
            None => Node::Bytes(plain.to_vec()),
        },
        "bytes" => Node::Bytes(plain.to_vec()),
        "int" => Node::Int(
            text()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("int"))?,
        ),
        "float" => Node::Float(
            text()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| bad("float"))?,
        ),
        "bool" => Node::Bool(
            text()
                .and_then(crate::backend::go_bool)
                .ok_or_else(|| bad("bool"))?,
        ),
        // A YAML timestamp, kept as the text it was sealed as.
        "time" => Node::Str(text().ok_or_else(|| bad("time"))?.to_string()),
        "comment" => Node::Null,
        other => {
            return Err(CryptError::UnknownType(
                where_(),
                crate::error::shown(other),
            ))
        }
    })
}

struct Sealed<'a> {
    data: &'a str,
    iv: &'a str,
    tag: &'a str,
    kind: &'a str,
}

fn parse_sealed(s: &str) -> Option<Sealed<'_>> {
    let inner = s.strip_prefix("ENC[AES256_GCM,")?.strip_suffix(']')?;
    let mut it = inner.split(',');
    let data = it.next()?.strip_prefix("data:")?;
    let iv = it.next()?.strip_prefix("iv:")?;
    let tag = it.next()?.strip_prefix("tag:")?;
    let kind = it.next()?.strip_prefix("type:")?;
    it.next().is_none().then_some(Sealed {
        data,
        iv,
        tag,
        kind,
    })
}

/// Seals one value as SOPS does (a fresh 32-byte nonce each time).
fn seal_value(cipher: &Cipher, node: &Node, aad: &str) -> String {
    let (plain, kind): (Zeroizing<Vec<u8>>, &str) = match node {
        Node::Str(s) if s.is_empty() => return String::new(),
        Node::Str(s) => (Zeroizing::new(s.as_bytes().to_vec()), "str"),
        Node::Bytes(b) => (Zeroizing::new(b.clone()), "str"),
        Node::Int(i) => (Zeroizing::new(i.to_string().into_bytes()), "int"),
        Node::Float(f) => (
            Zeroizing::new(super::document::go_float(*f).into_bytes()),
            "float",
        ),
        Node::Bool(b) => (
            Zeroizing::new(if *b {
                b"True".to_vec()
            } else {
                b"False".to_vec()
            }),
            "bool",
        ),
        Node::Null | Node::Map(_) | Node::List(_) => return String::new(),
    };
    let mut iv = [0u8; NONCE_BYTES];
    // The OS random source failing is not something to seal around.
    if getrandom::fill(&mut iv).is_err() {
        std::process::abort();
    }
    let mut out = cipher
        .encrypt(
            iv.as_slice().into(),
            Payload {
                msg: &plain,
                aad: aad.as_bytes(),
            },
        )
        .unwrap_or_default();
    let tag = out.split_off(out.len().saturating_sub(TAG_BYTES));
    let b64 = base64::engine::general_purpose::STANDARD;
    format!(
        "ENC[AES256_GCM,data:{},iv:{},tag:{},type:{kind}]",
        b64.encode(&out),
        b64.encode(iv),
        b64.encode(tag)
    )
}

/// `lastmodified` as Go's `time.Format(time.RFC3339)` prints it after
/// reading it: whole seconds, `Z` for UTC. That text is the MAC's
/// additional data.
pub fn go_rfc3339(raw: &str) -> Option<String> {
    let b = raw.as_bytes();
    let digits =
        |r: std::ops::Range<usize>| b.get(r).is_some_and(|s| s.iter().all(u8::is_ascii_digit));
    let shape = b.len() >= 20
        && digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && (b[10] == b'T' || b[10] == b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    if !shape {
        return None;
    }
    let mut rest = &raw[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let zone = match rest {
        "Z" | "z" | "+00:00" | "-00:00" => "Z".to_string(),
        z if z.len() == 6
            && (z.starts_with('+') || z.starts_with('-'))
            && z.as_bytes()[3] == b':'
            && z[1..3]
                .bytes()
                .chain(z[4..6].bytes())
                .all(|c| c.is_ascii_digit()) =>
        {
            z.to_string()
        }
        _ => return None,
    };
    Some(format!("{}T{}{zone}", &raw[..10], &raw[11..19]))
}

/// A new random data key.
pub fn new_data_key() -> DataKey {
    let mut key = Zeroizing::new([0u8; 32]);
    if getrandom::fill(key.as_mut_slice()).is_err() {
        std::process::abort();
    }
    key
}

#[cfg(test)]
mod tests {
    use super::super::document::{parse, Format};
    use super::*;

    fn doc_with(values: &str, extra_meta: &str) -> (Document, DataKey) {
        let key = new_data_key();
        let text = format!(
            "{values}sops:\n  lastmodified: \"2024-05-01T10:00:00Z\"\n  mac: x\n{extra_meta}"
        );
        let mut doc = parse(text.as_bytes(), Format::Yaml).unwrap();
        let mac = encrypt(&mut doc.branches, &doc.metadata, &key).unwrap();
        doc.metadata.mac = mac;
        (doc, key)
    }

    #[test]
    fn round_trip_keeps_types_and_honours_rules() {
        let (mut doc, key) = doc_with(
            "a: s3cret\nn: 42\nf: 1.5\nb: true\nl: [x, null, '']\nm: {k_unencrypted: plain, deep: {v: 1}}\n",
            "  unencrypted_suffix: _unencrypted\n",
        );
        let sealed = emit_yaml(&doc);
        assert!(!sealed.contains("s3cret"));
        assert!(sealed.contains("k_unencrypted: plain"));
        assert!(sealed.contains("type:int"));
        decrypt(&mut doc, &key).unwrap();
        assert_eq!(
            emit_yaml(&doc),
            "a: s3cret\nn: 42\nf: 1.5\nb: true\nl:\n- x\n- null\n- ''\nm:\n  k_unencrypted: plain\n  deep:\n    v: 1\n"
        );
    }

    fn emit_yaml(doc: &Document) -> String {
        String::from_utf8(super::super::document::emit(doc).unwrap()).unwrap()
    }

    /// Each kind of tampering is refused, and nothing decrypted survives.
    #[test]
    fn tampering_is_refused() {
        let (doc, key) = doc_with("a: one\nb: two\n", "");
        let sealed = emit_yaml(&doc);
        let mac = doc.metadata.mac.clone();
        let reparse = |text: &str| {
            let full =
                format!("{text}sops:\n  lastmodified: \"2024-05-01T10:00:00Z\"\n  mac: {mac}\n");
            parse(full.as_bytes(), Format::Yaml).unwrap()
        };
        // Swapped values: each opens only at its own path.
        let (a, b) = (
            doc.branches[0][0].1.as_str().unwrap(),
            doc.branches[0][1].1.as_str().unwrap(),
        );
        let mut swapped = reparse(&format!("a: {b}\nb: {a}\n"));
        assert_eq!(
            decrypt(&mut swapped, &key),
            Err(CryptError::Tampered("\"a\"".into()))
        );
        // A flipped ciphertext byte.
        let flipped = sealed.replacen("data:", "data:A", 1);
        let mut flipped = reparse(&flipped);
        assert!(matches!(
            decrypt(&mut flipped, &key),
            Err(CryptError::Tampered(_) | CryptError::NotEncrypted(_))
        ));
        // A removed value: the MAC no longer matches.
        let mut removed = reparse(
            sealed
                .lines()
                .next()
                .map(|l| format!("{l}\n"))
                .as_deref()
                .unwrap(),
        );
        assert_eq!(decrypt(&mut removed, &key), Err(CryptError::MacMismatch));
        // An edited MAC or stamp.
        let mut doc2 = reparse(&sealed);
        doc2.metadata.mac = doc2.metadata.mac.replacen("data:", "data:B", 1);
        assert_eq!(decrypt(&mut doc2, &key), Err(CryptError::MacTampered));
        let mut doc3 = reparse(&sealed);
        doc3.metadata.lastmodified = "2024-05-01T10:00:01Z".into();
        assert_eq!(decrypt(&mut doc3, &key), Err(CryptError::MacTampered));
        let mut doc4 = reparse(&sealed);
        doc4.metadata.mac.clear();
        assert_eq!(decrypt(&mut doc4, &key), Err(CryptError::NoMac));
        // Another data key.
        let mut doc5 = reparse(&sealed);
        assert!(matches!(
            decrypt(&mut doc5, &new_data_key()),
            Err(CryptError::Tampered(_))
        ));
        // A plain value where an encrypted one belongs.
        let mut plain = reparse(&format!("a: one\nb: {b}\n"));
        assert!(matches!(
            decrypt(&mut plain, &key),
            Err(CryptError::NotEncrypted(_))
        ));
    }

    #[test]
    fn stamps_follow_go() {
        assert_eq!(
            go_rfc3339("2023-12-25T10:31:01Z").as_deref(),
            Some("2023-12-25T10:31:01Z")
        );
        assert_eq!(
            go_rfc3339("2023-12-25T10:31:01.123+00:00").as_deref(),
            Some("2023-12-25T10:31:01Z")
        );
        assert_eq!(
            go_rfc3339("2023-12-25T10:31:01+02:00").as_deref(),
            Some("2023-12-25T10:31:01+02:00")
        );
        assert_eq!(go_rfc3339("yesterday"), None);
    }
}
