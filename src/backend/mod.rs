//! The one trait every secret backend implements, and the registry that maps
//! the SPC's `backend` names to implementations.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::ObjectError;
use crate::key::Key;
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

pub mod aws;
pub mod azure;
pub mod file;
pub mod gcp;
pub mod sops;
pub mod vault;

/// The derived version of a value that its holder keeps unchanged (a kept
/// file, a cache entry), for one object name and encoding: worked out by
/// the first Mount served from it, not by every rotation poll. It holds an
/// HMAC and the object's name, nothing of the value.
#[derive(Debug, Default)]
pub struct VersionMemo(std::sync::OnceLock<MemoisedVersion>);

#[derive(Debug)]
struct MemoisedVersion {
    name: Box<str>,
    encoding: crate::spc::Encoding,
    version: Arc<str>,
}

/// Longer names are not memoised, so a memo adds at most this much to what
/// its holder weighs (the name, the 32-digit version, the `Arc` and the
/// allocator's headers).
pub const VERSION_MEMO_BYTES: u64 = 320;
const MEMO_NAME_BYTES: usize = 160;

impl VersionMemo {
    /// The version of the held value served as `name` with `encoding`:
    /// the memoised one when it was worked out for the same two, else
    /// `derive()` (kept if the memo is still empty).
    pub fn version(
        &self,
        name: &str,
        encoding: crate::spc::Encoding,
        derive: impl FnOnce() -> Arc<str>,
    ) -> Arc<str> {
        if let Some(m) = self.0.get() {
            if *m.name == *name && m.encoding == encoding {
                return Arc::clone(&m.version);
            }
            return derive();
        }
        let version = derive();
        if name.len() <= MEMO_NAME_BYTES {
            let _ = self.0.set(MemoisedVersion {
                name: name.into(),
                encoding,
                version: Arc::clone(&version),
            });
        }
        version
    }
}

/// What a backend returns for one object.
#[derive(Debug)]
pub struct Fetched {
    /// The value as the backend holds it (before the object's `encoding`).
    pub contents: SecretBytes,
    /// The backend's own version id, when it has one that reveals nothing
    /// about the value; `None` makes coffer derive an HMAC version.
    pub version: Option<Arc<str>>,
    /// May this answer serve other callers with the same cache key? (No for
    /// per-caller answers such as Vault leases.)
    pub shareable: bool,
    /// A pinned version that can never change: cached until evicted.
    pub immutable: bool,
    /// Where the version derived for this exact value is kept, when the
    /// backend keeps the value itself.
    pub memo: Option<Arc<VersionMemo>>,
}

impl Fetched {
    /// A shareable, mutable answer.
    pub fn new(contents: SecretBytes, version: Option<String>) -> Self {
        Self {
            contents,
            version: version.map(Into::into),
            shareable: true,
            immutable: false,
            memo: None,
        }
    }

    /// The same answer, with where its holder keeps the derived version.
    pub fn with_memo(self, memo: Arc<VersionMemo>) -> Self {
        Self {
            memo: Some(memo),
            ..self
        }
    }
}

/// Limits a backend must respect while fetching.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// Refuse values larger than this instead of reading them whole.
    pub max_bytes: u64,
}

impl FetchLimits {
    /// Refuses a value of `size` bytes over the limit.
    pub fn check(self, size: usize) -> Result<(), ObjectError> {
        if size as u64 > self.max_bytes {
            return Err(ObjectError::TooLarge {
                size: size as u64,
                limit: self.max_bytes,
            });
        }
        Ok(())
    }
}

/// Go's `strconv.ParseBool`, which the peer providers read their flags with.
pub fn go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

/// An HTTP answer's body, read with a byte bound (a lying server cannot
/// balloon memory) into a buffer that is wiped when dropped. `who` names
/// the server in errors.
pub async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
    who: &str,
) -> Result<zeroize::Zeroizing<Vec<u8>>, ObjectError> {
    let mut body = zeroize::Zeroizing::new(Vec::new());
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(ObjectError::Unavailable(format!(
            "{who} answered more than coffer reads ({cap} bytes)"
        )));
    }
    while let Some(chunk) = resp.chunk().await.map_err(|e| {
        ObjectError::Unavailable(format!(
            "{who} broke off its answer: {}",
            crate::error::cause_chain(&e)
        ))
    })? {
        if body.len() + chunk.len() > cap {
            return Err(ObjectError::Unavailable(format!(
                "{who} answered more than coffer reads ({cap} bytes)"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// The name used in the SPC's `backend` parameter.
    fn name(&self) -> &'static str;

    /// Checks the object's backend-specific fields (and the SPC parameters it
    /// uses) before anything is fetched for the Mount.
    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError>;

    /// The SPC parameters this backend reads (for `coffer check` to tell a
    /// typo from a parameter meant for something else).
    fn parameters(&self) -> Vec<String> {
        Vec::new()
    }

    /// Fields of `object` this backend ignores (as the peer provider whose
    /// form it accepts does), for a warning: leftovers of a migration.
    fn ignored_fields<'a>(&self, _object: &'a ObjectSpec) -> Vec<&'a str> {
        Vec::new()
    }

    /// The audience of the service-account token this caller's fetches of
    /// `object` authenticate with, if any: the CSIDriver must request it
    /// (`tokenRequests`), since coffer mints no tokens.
    fn token_audience(&self, _object: &ObjectSpec, _ctx: &MountContext) -> Option<String> {
        None
    }

    /// The node-wide cache identity of `object` for this caller. Two callers
    /// get the same key only when the backend would authorize them
    /// identically; `None` means never cache.
    fn cache_key(&self, _object: &ObjectSpec, _ctx: &MountContext) -> Option<Key> {
        None
    }

    /// Where the backend holds `object`, for the audit log (a path, never a
    /// value).
    fn describe(&self, object: &ObjectSpec) -> String {
        object.name.clone()
    }

    /// The `ObjectVersion` id the driver sees for `object` (the file path
    /// unless the peer provider used something else).
    fn object_id(&self, object: &ObjectSpec) -> String {
        object.name.clone()
    }

    /// The part of a parsed value that holds the secret's keys, for
    /// `expand` and `files` (Vault: `data.data` of a KV v2 answer).
    fn data_view(&self, _object: &ObjectSpec, value: serde_json::Value) -> serde_json::Value {
        value
    }

    /// Where `object` lives for this caller, for the node policy. Empty
    /// facts match only rules that do not ask about them.
    fn placement(&self, _object: &ObjectSpec, _ctx: &MountContext) -> crate::policy::Placement {
        crate::policy::Placement::default()
    }

    /// Where this caller's calls go, for rate limits (e.g. the Vault
    /// address); `None` for local backends, which are not limited.
    fn limit_scope(&self, _ctx: &MountContext) -> Option<Key> {
        None
    }

    /// Fetches one object as the pod described by `ctx`.
    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError>;
}

/// Backends by name; one instance of each serves every Mount.
#[derive(Clone, Default)]
pub struct Registry {
    backends: BTreeMap<&'static str, Arc<dyn Backend>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, backend: Arc<dyn Backend>) {
        self.backends.insert(backend.name(), backend);
    }

    /// The names of the enabled backends.
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.backends.keys().copied()
    }

    pub fn get(&self, name: &str) -> Result<&Arc<dyn Backend>, ObjectError> {
        self.backends.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.backends.keys().copied().collect();
            ObjectError::FailedPrecondition(format!(
                "backend {} is not enabled on this node (enabled: {})",
                crate::error::shown(name),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spc::Encoding;

    #[test]
    fn a_version_memo_answers_only_for_the_name_and_encoding_it_was_filled_for() {
        let memo = VersionMemo::default();
        let derived = std::cell::Cell::new(0);
        let derive = |v: &str| {
            derived.set(derived.get() + 1);
            Arc::<str>::from(v)
        };
        assert_eq!(&*memo.version("a", Encoding::Utf8, || derive("va")), "va");
        assert_eq!(
            &*memo.version("a", Encoding::Utf8, || derive("other")),
            "va"
        );
        assert_eq!(derived.get(), 1, "kept after the first");
        // Another name or encoding derives its own and does not replace it.
        assert_eq!(&*memo.version("b", Encoding::Utf8, || derive("vb")), "vb");
        assert_eq!(&*memo.version("a", Encoding::Base64, || derive("vx")), "vx");
        assert_eq!(
            &*memo.version("a", Encoding::Utf8, || derive("other")),
            "va"
        );
        assert_eq!(derived.get(), 3);
        // A long name is not kept, so a memo stays within its weight.
        let long = "n".repeat(MEMO_NAME_BYTES + 1);
        let memo = VersionMemo::default();
        assert_eq!(&*memo.version(&long, Encoding::Utf8, || derive("v1")), "v1");
        assert_eq!(&*memo.version(&long, Encoding::Utf8, || derive("v2")), "v2");
    }
}
