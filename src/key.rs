//! Keys for the daemon's shared maps (cache, parsed-SPC memo, limiter scopes,
//! token and client caches, per-Mount memo, leases). Several of these maps are
//! shared between tenants, and their inputs come from SPCs and pods, so a key
//! must never be forgeable by choosing field values: every key is SHA-256 over
//! a domain tag and self-delimiting (tagged, length-prefixed) fields. Two
//! different field lists cannot produce the same input bytes, and the digest
//! keeps keys small whatever the inputs weigh. The one exception,
//! [`Key::hint`], is for maps that keep and compare the whole input.

use sha2::{Digest, Sha256};

/// A fixed-size map key. Its Debug shows a short prefix only: keys may be
/// derived from credentials.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key([u8; 32]);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({}…)", hex::encode(&self.0[..4]))
    }
}

impl Key {
    /// Bytes this key occupies, for memory accounting.
    pub const SIZE: u64 = 32;

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A lookup hint, not an identity: for a map whose every entry keeps
    /// its full input and compares it on each hit, so a collision costs a
    /// miss and never a wrong answer. `hash` is a fast hash of the input
    /// under a seed the map chose at random (not SHA-256: for inputs of
    /// hundreds of bytes, read on every Mount, the digest was the larger
    /// part of the lookup).
    pub fn hint(domain: u8, hash: u64, len: usize) -> Key {
        let mut bytes = [0u8; 32];
        bytes[0] = domain;
        bytes[8..16].copy_from_slice(&hash.to_le_bytes());
        bytes[16..24].copy_from_slice(&(len as u64).to_le_bytes());
        Key(bytes)
    }

    /// The first 8 hex digits, for short tags in versions.
    pub fn short_hex(&self) -> String {
        hex::encode(&self.0[..4])
    }

    /// The key of `domain` with string `fields`, for the common case.
    pub fn of(domain: &str, fields: &[&str]) -> Key {
        fields
            .iter()
            .fold(KeyBuilder::new(domain), |b, f| b.field(f))
            .finish()
    }
}

/// A one-way fingerprint of a credential (a token, a key), so a key can
/// depend on a credential without holding it.
pub fn fingerprint(secret: &str) -> Key {
    Key::of("credential", &[secret])
}

/// Builds a [`Key`] field by field.
#[derive(Clone)]
pub struct KeyBuilder(Sha256);

/// Field tags: a present field and an absent optional field can never be
/// confused, nor can a field and the start of the next one.
const PRESENT: u8 = 1;
const ABSENT: u8 = 0;

impl KeyBuilder {
    /// Starts a key in `domain` (the map it is for), so keys of different
    /// maps never coincide even when their fields do.
    pub fn new(domain: &str) -> Self {
        KeyBuilder(Sha256::new()).field(domain)
    }

    pub fn field(mut self, value: impl AsRef<[u8]>) -> Self {
        let value = value.as_ref();
        self.0.update([PRESENT]);
        self.0.update((value.len() as u64).to_be_bytes());
        self.0.update(value);
        self
    }

    /// An optional field: `None` differs from every `Some`, including `Some("")`.
    pub fn opt(mut self, value: Option<impl AsRef<[u8]>>) -> Self {
        match value {
            Some(v) => self.field(v),
            None => {
                self.0.update([ABSENT]);
                self
            }
        }
    }

    /// A key as a field of another key (e.g. a credential's fingerprint).
    pub fn key(self, key: &Key) -> Self {
        self.field(key.0)
    }

    pub fn finish(self) -> Key {
        Key(self.0.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn separators_inside_fields_cannot_forge_keys() {
        // The shapes that collided when keys were joined with '\n' or ' '.
        let pairs: &[(&[&str], &[&str])] = &[
            (&["a\nb", "c"], &["a", "b\nc"]),
            (&["a b", "c"], &["a", "b c"]),
            (&["", "ab"], &["a", "b"]),
            (&["ab", ""], &["a", "b"]),
            (&["a"], &["a", ""]),
            (&[], &[""]),
        ];
        for (x, y) in pairs {
            assert_ne!(Key::of("d", x), Key::of("d", y), "{x:?} vs {y:?}");
        }
        assert_eq!(Key::of("d", &["a", "b"]), Key::of("d", &["a", "b"]));
        assert_ne!(Key::of("d1", &["a"]), Key::of("d2", &["a"]), "domains");
    }

    #[test]
    fn absent_differs_from_empty_and_from_a_length_prefix_lookalike() {
        let none = KeyBuilder::new("d").opt(None::<&str>).field("x").finish();
        let empty = KeyBuilder::new("d").opt(Some("")).field("x").finish();
        assert_ne!(none, empty);
        // A field whose bytes look like a tag plus a length prefix.
        let mut forged = vec![PRESENT];
        forged.extend_from_slice(&1u64.to_be_bytes());
        forged.push(b'x');
        let real = KeyBuilder::new("d").field("").field("x").finish();
        let fake = KeyBuilder::new("d").field(&forged).finish();
        assert_ne!(real, fake);
    }

    #[test]
    fn debug_shows_only_a_prefix() {
        let k = Key::of("cred", &["hunter2"]);
        let shown = format!("{k:?}");
        assert!(shown.len() < 20, "{shown}");
    }
}
