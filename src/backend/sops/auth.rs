//! Who may open a SOPS document: the data key is unwrapped only with keys
//! that belong to the pod asking.
//!
//! - age: the identities of the pod's own namespace
//!   (`--sops-age-key-dir/<namespace>.txt`), and the cluster's
//!   (`_cluster.txt`) only with `--sops-cluster-key`. A document copied into
//!   another namespace's SPC does not open there. Key files must be regular,
//!   0600 (no group or other bits) and owned by coffer's user; anything else
//!   is ignored with an error log.
//! - Vault transit (`hc_vault`): transit decrypt called with the pod's own
//!   Vault login (the vault backend's auth and the SPC's Vault settings), so
//!   Vault's policy decides and Vault audits. The call goes to the SPC's
//!   Vault, never to an address the document names. Unwrapped keys are kept
//!   per (wrapped key, Vault identity) for `--cache-ttl`, wiped on drop.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use super::crypt::DataKey;
use super::document::{MasterKey, Metadata};
use crate::backend::vault::VaultBackend;
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::{shown, ObjectError};
use crate::key::KeyBuilder;
use crate::logging::Throttle;
use crate::request::MountContext;

/// The cluster-wide identity file; `_` cannot begin a namespace name.
pub const CLUSTER_FILE: &str = "_cluster.txt";
/// An identity file is a few lines per key.
const MAX_KEY_FILE_BYTES: u64 = 64 * 1024;
/// Identities per file (rotation keeps a few old ones).
const MAX_IDENTITIES: usize = 64;
/// Transit keys tried per document: each is a Vault call.
const MAX_TRANSIT_TRIES: usize = 4;
/// Unwrapped transit data keys kept (32 bytes each).
const UNWRAPPED: Bounds = Bounds {
    max_entries: 4096,
    max_weight: 4096 * 128,
    idle: Duration::from_secs(3600),
};

static KEY_FILE_WARNINGS: Throttle = Throttle::new(Duration::from_secs(60));

pub struct Keys {
    age_dir: Option<PathBuf>,
    cluster_key: bool,
    vault: Arc<VaultBackend>,
    unwrapped: BoundedMap<(Arc<DataKey>, Instant)>,
    ttl: Duration,
}

/// What was tried, for the refusal: key names and reasons, no material.
struct Tried(Vec<String>);

/// A Mount's age identities (with their recipients) and whose they are.
#[derive(Clone)]
struct PodIdentities {
    ids: Arc<Vec<(String, age::x25519::Identity)>>,
    whose: Arc<str>,
}

/// Where a Mount keeps its identities: one namespace per Mount.
static IDENTITIES: std::sync::LazyLock<crate::key::Key> =
    std::sync::LazyLock::new(|| crate::key::Key::of("sops-identities", &[]));

impl Keys {
    pub fn new(
        age_dir: Option<PathBuf>,
        cluster_key: bool,
        vault: Arc<VaultBackend>,
        ttl: Duration,
    ) -> Self {
        Self {
            age_dir,
            cluster_key,
            vault,
            unwrapped: BoundedMap::new(UNWRAPPED),
            ttl,
        }
    }

    pub fn vault(&self) -> &Arc<VaultBackend> {
        &self.vault
    }

    /// The document's data key, opened with a key that belongs to the pod.
    pub async fn data_key(
        &self,
        meta: &Metadata,
        ctx: &MountContext,
    ) -> Result<DataKey, ObjectError> {
        let group = match meta.groups.as_slice() {
            [] => return Err(no_keys()),
            [one] => one,
            many => {
                return Err(ObjectError::Invalid(format!(
                    "the SOPS document splits its data key over {} key groups (Shamir, threshold {}); coffer opens documents with one key group",
                    many.len(),
                    meta.shamir_threshold
                )))
            }
        };
        if group.is_empty() {
            return Err(no_keys());
        }
        let mut tried = Tried(Vec::new());
        if let Some(key) = self.open_with_age(group, ctx, &mut tried) {
            return Ok(key);
        }
        let mut outage = None;
        for key in group
            .iter()
            .filter(|k| matches!(k, MasterKey::Vault { .. }))
            .take(MAX_TRANSIT_TRIES)
        {
            match self.open_with_transit(key, ctx).await {
                Ok(k) => return Ok(k),
                Err(e) => {
                    tried.0.push(format!("{}: {}", key.describe(), e));
                    if e.is_retryable() {
                        outage = Some(e);
                    }
                }
            }
        }
        for key in group {
            if let MasterKey::Other { .. } = key {
                tried.0.push(format!(
                    "{}: not a kind coffer opens (age, hc_vault)",
                    key.describe()
                ));
            }
        }
        // Vault being down is not a refusal: retried, and stale values may
        // serve meanwhile.
        if let Some(e) = outage {
            return Err(e);
        }
        tried.0.truncate(crate::error::LISTED_FAILURES);
        Err(ObjectError::PermissionDenied(format!(
            "no key of the SOPS document opens its data key for this pod: {}",
            tried.0.join("; ")
        )))
    }

    fn open_with_age(
        &self,
        group: &[MasterKey],
        ctx: &MountContext,
        tried: &mut Tried,
    ) -> Option<DataKey> {
        let ages: Vec<(&String, &String)> = group
            .iter()
            .filter_map(|k| match k {
                MasterKey::Age { recipient, enc } => Some((recipient, enc)),
                _ => None,
            })
            .collect();
        if ages.is_empty() {
            return None;
        }
        let PodIdentities { ids, whose } = self.identities(ctx);
        let mut addressed = false;
        for (recipient, enc) in &ages {
            // Only entries addressed to one of the pod's identities: one
            // X25519 exchange each, however many entries a document lists.
            let Some((_, identity)) = ids.iter().find(|(r, _)| r == *recipient) else {
                continue;
            };
            addressed = true;
            match unwrap_age(enc, identity) {
                Ok(key) => return Some(key),
                Err(why) => tried.0.push(format!("age {recipient}: {why}")),
            }
        }
        if !addressed {
            let listed: Vec<String> = ages.iter().map(|(r, _)| shown(r)).collect();
            tried.0.push(format!(
                "age {}: {}",
                listed.join(", "),
                if ids.is_empty() {
                    format!("no age identity for {whose}")
                } else {
                    format!("not addressed to the identities of {whose}")
                }
            ));
        }
        None
    }

    /// The age identities this pod's documents may use, with their
    /// recipients, and whose they are (for messages): read once per Mount.
    fn identities(&self, ctx: &MountContext) -> PodIdentities {
        ctx.memo.once(&IDENTITIES, || {
            let (found, whose) = self.read_pod_identities(&ctx.pod.namespace);
            PodIdentities {
                ids: Arc::new(
                    found
                        .into_iter()
                        .map(|i| (i.to_public().to_string(), i))
                        .collect(),
                ),
                whose: whose.into(),
            }
        })
    }

    fn read_pod_identities(&self, namespace: &str) -> (Vec<age::x25519::Identity>, String) {
        let Some(dir) = &self.age_dir else {
            return (
                Vec::new(),
                "this node (coffer runs without --sops-age-key-dir)".into(),
            );
        };
        let mut found = Vec::new();
        let mut whose = Vec::new();
        if crate::backend::file::is_dns1123_label(namespace) {
            found.extend(read_identities(dir, &format!("{namespace}.txt")));
            whose.push(format!("namespace {}", shown(namespace)));
        } else {
            whose.push("a pod without a namespace".to_string());
        }
        if self.cluster_key {
            found.extend(read_identities(dir, CLUSTER_FILE));
            whose.push("the cluster".into());
        }
        (found, whose.join(" or "))
    }

    async fn open_with_transit(
        &self,
        key: &MasterKey,
        ctx: &MountContext,
    ) -> Result<DataKey, ObjectError> {
        let MasterKey::Vault {
            engine_path,
            key_name,
            enc,
            ..
        } = key
        else {
            return Err(no_keys());
        };
        let identity = self.vault.caller_identity(ctx);
        let cache_key = identity.filter(|_| !self.ttl.is_zero()).map(|id| {
            KeyBuilder::new("sops-transit")
                .key(&id)
                .field(engine_path)
                .field(key_name)
                .field(enc)
                .finish()
        });
        if let Some(k) = &cache_key {
            if let Some((data_key, at)) = self.unwrapped.get(k) {
                if at.elapsed() < self.ttl {
                    return Ok(Zeroizing::new(**data_key));
                }
                self.unwrapped.remove(k);
            }
        }
        let plain = self
            .vault
            .transit_decrypt(ctx, engine_path, key_name, enc)
            .await?;
        let data_key = to_data_key(&plain).ok_or_else(|| {
            ObjectError::Invalid(
                "Vault transit returned something that is not a 32-byte SOPS data key".into(),
            )
        })?;
        if let Some(k) = cache_key {
            self.unwrapped
                .insert_weighed(k, (Arc::new(data_key.clone()), Instant::now()), 128);
        }
        Ok(data_key)
    }
}

fn no_keys() -> ObjectError {
    ObjectError::Invalid("the SOPS document lists no keys (sops.age, sops.hc_vault, …)".into())
}

fn to_data_key(bytes: &[u8]) -> Option<DataKey> {
    let arr: [u8; 32] = bytes.try_into().ok()?;
    Some(Zeroizing::new(arr))
}

/// Opens an armored age file holding a data key with one identity.
fn unwrap_age(enc: &str, identity: &age::x25519::Identity) -> Result<DataKey, String> {
    let reader = age::armor::ArmoredReader::new(enc.as_bytes());
    let decryptor = age::Decryptor::new(reader)
        .map_err(|_| "the wrapped data key is not an age file".to_string())?;
    let mut plain = decryptor
        .decrypt(std::iter::once(identity as &dyn age::Identity))
        .map_err(|_| {
            "the wrapped data key does not open with this namespace's identity".to_string()
        })?;
    let mut out = Zeroizing::new(Vec::with_capacity(33));
    (&mut plain)
        .take(33)
        .read_to_end(&mut out)
        .map_err(|_| "the wrapped data key was altered".to_string())?;
    to_data_key(&out).ok_or_else(|| "the wrapped data key is not 32 bytes".to_string())
}

/// The identities in `dir/name`, if the file may be trusted: a regular
/// file (no symlink out of the directory), 0600 and owned by coffer's
/// user. Problems are logged (throttled) and the file ignored.
fn read_identities(dir: &Path, name: &str) -> Vec<age::x25519::Identity> {
    let path = dir.join(name);
    let complain = |why: &str| {
        if let Some(left_out) = KEY_FILE_WARNINGS.allow() {
            tracing::error!(file = %path.display(), left_out, "age key file ignored: {why}");
        }
    };
    let opened =
        crate::nodefs::open_dir(dir).and_then(|d| crate::nodefs::open_beneath(&d, Path::new(name)));
    let file = match opened {
        Ok(f) => f,
        Err(crate::nodefs::NodeFileError::NotFound) => return Vec::new(),
        Err(e) => {
            complain(&e.to_string());
            return Vec::new();
        }
    };
    let Ok(meta) = file.metadata() else {
        complain("cannot stat it");
        return Vec::new();
    };
    if !meta.is_file() {
        complain("not a regular file");
        return Vec::new();
    }
    if meta.mode() & 0o077 != 0 {
        complain(&format!(
            "its mode is 0{:o}; it must be 0600 (or 0400)",
            meta.mode() & 0o777
        ));
        return Vec::new();
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        complain("it is not owned by coffer's user");
        return Vec::new();
    }
    let text = match crate::nodefs::read_regular_with(&file, &meta, MAX_KEY_FILE_BYTES) {
        Ok(bytes) => Zeroizing::new(bytes),
        Err(e) => {
            complain(&e.to_string());
            return Vec::new();
        }
    };
    let Ok(text) = std::str::from_utf8(&text) else {
        complain("not UTF-8 text");
        return Vec::new();
    };
    let mut ids = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match age::x25519::Identity::from_str(line) {
            Ok(id) if ids.len() < MAX_IDENTITIES => ids.push(id),
            Ok(_) => {
                complain(&format!("more than {MAX_IDENTITIES} identities"));
                return Vec::new();
            }
            Err(_) => {
                complain(&format!(
                    "line {} is not an age identity (AGE-SECRET-KEY-1…)",
                    n + 1
                ));
                return Vec::new();
            }
        }
    }
    ids
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn key_files_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let id = age::x25519::Identity::generate();
        let line = id.to_string();
        let write = |name: &str, text: &str, mode: u32| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        use secrecy::ExposeSecret;
        write(
            "good.txt",
            &format!("# created\n{}\n", line.expose_secret()),
            0o600,
        );
        write("loose.txt", &format!("{}\n", line.expose_secret()), 0o644);
        write("junk.txt", "not a key\n", 0o600);
        std::os::unix::fs::symlink("good.txt", dir.path().join("link.txt")).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", dir.path().join("out.txt")).unwrap();
        assert_eq!(read_identities(dir.path(), "good.txt").len(), 1);
        assert!(read_identities(dir.path(), "loose.txt").is_empty());
        assert!(read_identities(dir.path(), "junk.txt").is_empty());
        assert!(read_identities(dir.path(), "missing.txt").is_empty());
        // A symlink inside the directory is followed (it stays beneath it).
        assert_eq!(read_identities(dir.path(), "link.txt").len(), 1);
        assert!(read_identities(dir.path(), "out.txt").is_empty());
    }
}
