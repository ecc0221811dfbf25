//! The one trait every secret backend implements, and the registry that maps
//! the SPC's `backend` names to implementations.

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::ObjectError;
use crate::request::MountContext;
use crate::secret::SecretBytes;
use crate::spc::ObjectSpec;

pub mod file;
pub mod vault;

/// What a backend returns for one object.
#[derive(Debug)]
pub struct Fetched {
    /// The value as the backend holds it (before the object's `encoding`).
    pub contents: SecretBytes,
    /// The backend's own version id, when it has one that reveals nothing
    /// about the value; `None` makes coffer derive an HMAC version.
    pub version: Option<String>,
}

/// Limits a backend must respect while fetching.
#[derive(Debug, Clone, Copy)]
pub struct FetchLimits {
    /// Refuse values larger than this instead of reading them whole.
    pub max_bytes: u64,
}

#[async_trait]
pub trait Backend: Send + Sync {
    /// The name used in the SPC's `backend` parameter.
    fn name(&self) -> &'static str;

    /// Checks the object's backend-specific fields (and the SPC parameters it
    /// uses) before anything is fetched for the Mount.
    fn validate(&self, object: &ObjectSpec, ctx: &MountContext) -> Result<(), ObjectError>;

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

    pub fn get(&self, name: &str) -> Result<&Arc<dyn Backend>, ObjectError> {
        self.backends.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.backends.keys().copied().collect();
            ObjectError::FailedPrecondition(format!(
                "backend {name:?} is not enabled on this node (enabled: {})",
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            ))
        })
    }
}
