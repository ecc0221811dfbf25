//! The `sops` backend: SOPS-encrypted documents kept in Git (inline in the
//! SecretProviderClass, or a file below `--file-backend-root`), decrypted
//! on the node for the pods allowed to, straight into their volume. No
//! controller and no Kubernetes Secret: the plaintext never reaches etcd.
//!
//! - `document`: the SOPS file formats (YAML, JSON, dotenv, binary) and
//!   their `sops` metadata, within bounds;
//! - `crypt`: values (AES-256-GCM, path as additional data) and the MAC;
//! - `auth`: whose keys open the data key (per-namespace age identities,
//!   Vault transit as the pod);
//! - `params`: the object's fields.
//!
//! Nothing is cached in the node cache: each Mount decrypts (an X25519
//! exchange and an AES pass), so a pod never receives a value another pod
//! unwrapped. Only transit-unwrapped data keys are kept, per Vault identity.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::file::FileBackend;
use super::vault::VaultBackend;
use super::{Backend, FetchLimits, Fetched};
use crate::error::{shown, ObjectError};
use crate::key::KeyBuilder;
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

pub mod auth;
pub mod crypt;
pub mod document;
pub mod params;

use document::{Document, Format, Node};
use params::{SopsObject, Source, Step};

/// Inline documents up to this size are fully inspected when an SPC is
/// validated (every Mount): larger ones when they are fetched, off the
/// async workers.
const INSPECT_INLINE_BYTES: usize = 64 * 1024;

/// Document bytes one Mount may read and decrypt in all (each distinct
/// document counted once): parsing and decrypting cost ~50 times reading,
/// and a volume may name 1,000 files of 1 MiB.
const MAX_MOUNT_DOCUMENT_BYTES: usize = 8 * 1024 * 1024;

/// Where a Mount counts its document bytes.
static BUDGET: std::sync::LazyLock<crate::key::Key> =
    std::sync::LazyLock::new(|| crate::key::Key::of("sops-budget", &[]));

/// A decrypted document, shared by the objects of one Mount that name it
/// (wiped when the last one is done: `Document` wipes on drop).
struct Opened {
    doc: Document,
    size: usize,
}

pub struct SopsBackend {
    keys: auth::Keys,
    /// The file backend, for `sopsFile` (its root and scope rules).
    files: Option<Arc<FileBackend>>,
    /// `coffer check`: inspect every inline document, whatever its size.
    inspect_all: bool,
}

impl SopsBackend {
    pub fn new(
        age_key_dir: Option<PathBuf>,
        cluster_key: bool,
        vault: Arc<VaultBackend>,
        files: Option<Arc<FileBackend>>,
        key_ttl: Duration,
    ) -> Self {
        Self {
            keys: auth::Keys::new(age_key_dir, cluster_key, vault, key_ttl),
            files,
            inspect_all: false,
        }
    }

    /// Inspect inline documents of any size in `validate` (`coffer check`).
    pub fn inspect_all(mut self) -> Self {
        self.inspect_all = true;
        self
    }

    async fn document_bytes(
        &self,
        object: &ObjectSpec,
        params: &SopsObject<'_>,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<SecretBytes, ObjectError> {
        match &params.source {
            Source::Inline(text) => Ok(SecretBytes::new(text.as_bytes().to_vec())),
            Source::File(path) => {
                let files = self.files_backend()?;
                let spec = file_spec(object, path);
                let limits = FetchLimits {
                    max_bytes: limits.max_bytes.min(document::MAX_DOCUMENT_BYTES as u64),
                };
                files
                    .fetch(&spec, ctx, limits)
                    .await
                    .map(|f| f.contents)
                    .map_err(|e| match e {
                        ObjectError::NotFound(m) => {
                            ObjectError::NotFound(format!("sopsFile {}: {m}", shown(path)))
                        }
                        other => other,
                    })
            }
        }
    }

    /// Reads, checks and decrypts one document, within the Mount's budget
    /// of document bytes.
    async fn open(
        &self,
        object: &ObjectSpec,
        params: &SopsObject<'_>,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Arc<Opened>, ObjectError> {
        let bytes = self.document_bytes(object, params, ctx, limits).await?;
        let size = bytes.len();
        let spent: Arc<AtomicUsize> = ctx.memo.get_or_default(&BUDGET);
        if spent.fetch_add(size, Ordering::Relaxed) + size > MAX_MOUNT_DOCUMENT_BYTES {
            return Err(ObjectError::ResourceExhausted(format!(
                "the SOPS documents of this volume add up to more than {MAX_MOUNT_DOCUMENT_BYTES} bytes"
            )));
        }
        let format = params.format;
        let doc = match &params.source {
            // Read once already, when the Mount was validated.
            Source::Inline(text) if text.len() <= INSPECT_INLINE_BYTES => {
                Document::clone(&*inspected(ctx, text, format)?)
            }
            _ => crate::work::run(size, move || inspect(bytes.expose(), format))
                .await
                .map_err(|e| ObjectError::Unavailable(e.to_string()))??,
        };
        let data_key = self.keys.data_key(&doc.metadata, ctx).await?;
        let doc = crate::work::run(size, move || {
            let mut doc = doc;
            crypt::decrypt(&mut doc, &data_key)
                .map(|()| doc)
                .map_err(|e| ObjectError::Invalid(e.to_string()))
        })
        .await
        .map_err(|e| ObjectError::Unavailable(e.to_string()))??;
        Ok(Arc::new(Opened { doc, size }))
    }

    fn files_backend(&self) -> Result<&Arc<FileBackend>, ObjectError> {
        self.files.as_ref().ok_or_else(|| {
            ObjectError::FailedPrecondition(
                "sopsFile needs the file backend on this node (--file-backend-root)".into(),
            )
        })
    }
}

/// `object` as the file backend's object for its `sopsFile`, so the file
/// backend's root, scope and confinement decide what may be read.
fn file_spec(object: &ObjectSpec, path: &str) -> ObjectSpec {
    let mut spec = object.clone();
    spec.backend = "file".into();
    spec.fields = [(
        "path".to_string(),
        serde_yaml_ng::Value::String(path.to_string()),
    )]
    .into_iter()
    .collect();
    spec
}

/// Whether the document may name Vault transit keys (a file's is not
/// known before it is read).
fn may_use_vault(params: &SopsObject<'_>) -> bool {
    match &params.source {
        Source::Inline(text) => text.contains("hc_vault"),
        Source::File(_) => true,
    }
}

/// A document's problems as an object error.
fn invalid(e: impl std::fmt::Display) -> ObjectError {
    ObjectError::Invalid(format!("the SOPS document {e}"))
}

/// Reads a document and checks what can be checked without a key: its
/// format, its metadata (a MAC, a stamp, key groups), its rules.
pub fn inspect(bytes: &[u8], format: Format) -> Result<Document, ObjectError> {
    let doc = document::parse(bytes, format).map_err(invalid)?;
    let meta = &doc.metadata;
    if meta.mac.is_empty() {
        return Err(invalid(
            "has no MAC (sops.mac): coffer never decrypts a document it cannot check",
        ));
    }
    if crypt::go_rfc3339(&meta.lastmodified).is_none() {
        return Err(invalid(format!(
            "has no valid lastmodified stamp (got {})",
            shown(&meta.lastmodified)
        )));
    }
    if meta.groups.iter().all(Vec::is_empty) {
        return Err(invalid("lists no keys (sops.age, sops.hc_vault, …)"));
    }
    crypt::Rules::of(meta).map_err(|e| ObjectError::Invalid(e.to_string()))?;
    Ok(doc)
}

/// A small inline document inspected once per Mount: validation reads it,
/// the fetch decrypts a copy of what was read.
fn inspected(ctx: &MountContext, text: &str, format: Format) -> Result<Arc<Document>, ObjectError> {
    let key = KeyBuilder::new("sops-inspected")
        .field(text.as_bytes())
        .field(format.name())
        .finish();
    ctx.memo
        .once(&key, || inspect(text.as_bytes(), format).map(Arc::new))
}

/// What one object writes from a decrypted document: the document in its
/// own format, one value (`key`), or, for `expand`, its top-level map as
/// JSON (whatever the format: a dotenv document expands too).
fn output(doc: &Document, key: Option<&[Step]>, expand: bool) -> Result<Vec<u8>, ObjectError> {
    let Some(steps) = key else {
        if expand {
            let branch = doc.branches.first().map(Vec::as_slice).unwrap_or(&[]);
            return serde_json::to_vec(&document::MapRef(branch))
                .map_err(|_| invalid("cannot be written"));
        }
        return document::emit(doc).map_err(invalid);
    };
    let root = doc.branches.first().map(Vec::as_slice).unwrap_or(&[]);
    // `key: db.password` means the key of that name if the document has
    // one, else the path db → password (as yq and Helm users write it).
    let dotted: Vec<Step>;
    let steps = match steps {
        [Step::Key(k)] if k.contains('.') && !root.iter().any(|(have, _)| have == k) => {
            dotted = k
                .split('.')
                .map(|part| Step::Key(part.to_string()))
                .collect();
            &dotted[..]
        }
        other => other,
    };
    let mut at: Option<&Node> = None;
    let mut walked = String::new();
    for step in steps {
        let next = match (at, step) {
            (None, Step::Key(k)) => root.iter().find(|(have, _)| have == k).map(|(_, v)| v),
            (Some(node @ Node::Map(_)), Step::Key(k)) => node.get(k),
            (Some(Node::List(items)), Step::Index(i)) => items.get(*i),
            (Some(Node::List(items)), Step::Key(k)) => {
                k.parse::<usize>().ok().and_then(|i| items.get(i))
            }
            _ => None,
        };
        let Some(next) = next else {
            let here: Vec<String> = match at {
                None => root.iter().map(|(k, _)| k.clone()).collect(),
                Some(Node::Map(items)) => items.iter().map(|(k, _)| k.clone()).collect(),
                Some(Node::List(items)) => {
                    vec![format!("indexes 0 to {}", items.len().saturating_sub(1))]
                }
                Some(other) => vec![format!("a {}", other.kind())],
            };
            let mut here: Vec<String> = here
                .iter()
                .map(|k| crate::error::shown_bare(k).to_string())
                .collect();
            here.truncate(crate::error::LISTED_FAILURES);
            return Err(ObjectError::NotFound(format!(
                "key {walked}{step} is not in the SOPS document (there: {})",
                here.join(", ")
            )));
        };
        walked.push_str(&step.to_string());
        at = Some(next);
    }
    let Some(node) = at else {
        return document::emit(doc).map_err(invalid);
    };
    match node.scalar_text() {
        Some(bytes) => Ok(bytes),
        // A subtree: written in the document's own format.
        None => match doc.format {
            Format::Json => {
                serde_json::to_vec_pretty(node).map_err(|_| invalid("cannot be written"))
            }
            _ => serde_yaml_ng::to_string(node)
                .map(String::into_bytes)
                .map_err(|_| invalid("cannot be written")),
        },
    }
}

#[async_trait]
impl Backend for SopsBackend {
    fn name(&self) -> &'static str {
        "sops"
    }

    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError> {
        let params = SopsObject::from_spec(object)?;
        match &params.source {
            Source::Inline(text) if text.len() <= INSPECT_INLINE_BYTES => {
                inspected(ctx, text, params.format).map(drop)
            }
            Source::Inline(text) if self.inspect_all => {
                inspect(text.as_bytes(), params.format).map(drop)
            }
            Source::Inline(_) => Ok(()),
            Source::File(path) => self
                .files_backend()?
                .validate(&file_spec(object, path), ctx),
        }
    }

    /// A document with Vault transit keys logs in to Vault as the pod.
    fn token_audience(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<String> {
        let params = SopsObject::from_spec(object).ok()?;
        if !may_use_vault(&params) {
            return None;
        }
        self.keys.vault().token_audience(object, ctx)
    }

    fn describe(&self, object: &ObjectSpec) -> String {
        match SopsObject::from_spec(object) {
            Ok(p) => match p.source {
                Source::Inline(_) => format!("inline {} document", p.format.name()),
                Source::File(path) => format!("sopsFile {path}"),
            },
            Err(_) => object.name.clone(),
        }
    }

    /// The document's file, and the Vault its transit keys would be
    /// opened at (the SPC's): a policy that limits Vault addresses limits
    /// transit calls too.
    fn placement(&self, object: &ObjectSpec, ctx: &MountContext) -> crate::policy::Placement {
        let Ok(params) = SopsObject::from_spec(object) else {
            return crate::policy::Placement::default();
        };
        let vault = if may_use_vault(&params) {
            self.keys.vault().placement(object, ctx)
        } else {
            crate::policy::Placement::default()
        };
        crate::policy::Placement {
            address: vault.address,
            namespace: vault.namespace,
            path: match params.source {
                Source::File(path) => Some(path.to_string()),
                Source::Inline(_) => None,
            },
            region: None,
        }
    }

    async fn fetch(
        &self,
        object: &ObjectSpec,
        ctx: &MountContext,
        limits: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let params = SopsObject::from_spec(object)?;
        // Objects of one Mount that name the same document (several `key`s
        // of one file) share one read and one decryption.
        let doc_key = match &params.source {
            Source::Inline(text) => KeyBuilder::new("sops-doc")
                .field("inline")
                .field(text.as_bytes()),
            Source::File(path) => KeyBuilder::new("sops-doc").field("file").field(path),
        }
        .field(params.format.name())
        .finish();
        let opened: Arc<Opened> = ctx
            .memo
            .once_async(&doc_key, || self.open(object, &params, ctx, limits))
            .await?;
        let key = params.key.clone();
        let expand = object.expand;
        let size = opened.size;
        let out = crate::work::run(size, move || output(&opened.doc, key.as_deref(), expand))
            .await
            .map_err(|e| ObjectError::Unavailable(e.to_string()))??;
        limits.check(out.len())?;
        Ok(Fetched {
            contents: SecretBytes::new(out),
            version: None,
            shareable: false,
            immutable: false,
            memo: None,
        })
    }
}
