//! The Mount pipeline: request → typed context → validated objects → checked
//! paths → concurrent fetches under one deadline → decoded, versioned files.
//! All-or-nothing: any failure returns an error and no file at all.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::stream::{self, StreamExt};
use zeroize::Zeroizing;

use crate::backend::{FetchLimits, Registry};
use crate::error::{Failure, MountError, ObjectError};
use crate::paths;
use crate::proto;
use crate::request::MountContext;
use crate::spc::{self, ObjectSpec};
use crate::version::VersionKey;

#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Deadline for the whole Mount, below kubelet's 2 minutes.
    pub timeout: Duration,
    /// Cap on the summed size of all files in one response.
    pub max_response_bytes: u64,
    /// How many objects of one Mount are fetched at once.
    pub fetch_concurrency: usize,
    /// Backend for objects when neither the SPC nor the object names one.
    pub default_backend: String,
}

impl Default for MountConfig {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(100),
            max_response_bytes: 4 * 1024 * 1024,
            fetch_concurrency: 16,
            default_backend: "file".into(),
        }
    }
}

/// What a successful Mount produced, plus what the log span wants to know.
pub struct MountOutcome {
    pub response: proto::MountResponse,
    pub context: MountContext,
}

pub struct Mounter {
    backends: Registry,
    version_key: VersionKey,
    config: MountConfig,
}

/// A fetched, decoded object ready to become a `File`.
struct Ready {
    path: String,
    mode: u32,
    /// Zeroized if the Mount fails after this object was fetched.
    contents: Zeroizing<Vec<u8>>,
    version: String,
}

impl Mounter {
    pub fn new(backends: Registry, version_key: VersionKey, config: MountConfig) -> Self {
        Self {
            backends,
            version_key,
            config,
        }
    }

    pub fn config(&self) -> &MountConfig {
        &self.config
    }

    /// Parses only the request, so the caller can label its log span with
    /// the pod before the Mount runs.
    pub fn parse(req: &proto::MountRequest) -> Result<MountContext, MountError> {
        MountContext::parse(
            &req.attributes,
            &req.secrets,
            &req.permission,
            &req.target_path,
        )
        .map_err(|e| MountError::Request(e.to_string()))
    }

    /// Runs a Mount for an already-parsed request.
    pub async fn mount(&self, ctx: &MountContext) -> Result<proto::MountResponse, MountError> {
        let objects = self.validate(ctx)?;
        let ready = self.fetch_all(ctx, &objects).await?;
        // Quick refusal before copying anything into a response.
        let total: u64 = ready.iter().map(|r| r.contents.len() as u64).sum();
        if total > self.config.max_response_bytes {
            return Err(MountError::ResponseTooLarge {
                size: total,
                limit: self.config.max_response_bytes,
            });
        }
        let mut response = proto::MountResponse::default();
        for mut r in ready {
            response.object_version.push(proto::ObjectVersion {
                id: r.path.clone(),
                version: r.version,
            });
            response.files.push(proto::File {
                path: r.path,
                mode: r.mode as i32,
                contents: std::mem::take(&mut *r.contents),
            });
        }
        // The driver's receive limit applies to the encoded message, paths
        // and versions included.
        let encoded = prost::Message::encoded_len(&response) as u64;
        if encoded > self.config.max_response_bytes {
            for f in &mut response.files {
                zeroize::Zeroize::zeroize(&mut f.contents);
            }
            return Err(MountError::ResponseTooLarge {
                size: encoded,
                limit: self.config.max_response_bytes,
            });
        }
        Ok(response)
    }

    /// Everything that can be checked without fetching, for every object.
    fn validate(&self, ctx: &MountContext) -> Result<Vec<ObjectSpec>, MountError> {
        let objects = spc::parse_objects(&ctx.parameters, &self.config.default_backend).map_err(
            |failures| MountError::Objects {
                total: failures.len().max(1),
                failures,
            },
        )?;
        let mut failures = Vec::new();
        for object in &objects {
            let checked = paths::validate_path(&object.name)
                .map_err(|e| ObjectError::Invalid(format!("objectName: {e}")))
                .and_then(|_| self.backends.get(&object.backend))
                .and_then(|backend| backend.validate(object, ctx));
            if let Err(error) = checked {
                failures.push(Failure {
                    object: object.label(),
                    error,
                });
            }
        }
        for e in paths::validate_path_set(objects.iter().map(|o| o.name.as_str())) {
            let object = match &e {
                paths::PathSetError::Duplicate(p) => p.clone(),
                paths::PathSetError::FileIsDirectory { file, .. } => file.clone(),
            };
            failures.push(Failure {
                object,
                error: ObjectError::Invalid(e.to_string()),
            });
        }
        if failures.is_empty() {
            Ok(objects)
        } else {
            Err(MountError::Objects {
                total: objects.len(),
                failures,
            })
        }
    }

    async fn fetch_all(
        &self,
        ctx: &MountContext,
        objects: &[ObjectSpec],
    ) -> Result<Vec<Ready>, MountError> {
        let outstanding: Arc<Mutex<BTreeSet<usize>>> =
            Arc::new(Mutex::new((0..objects.len()).collect()));
        let limits = FetchLimits {
            max_bytes: self.config.max_response_bytes,
        };
        // Build the futures eagerly: a `map` closure over borrowed objects
        // trips the compiler's higher-ranked Send check inside tonic.
        let futures: Vec<_> = objects
            .iter()
            .enumerate()
            .map(|(i, object)| {
                let outstanding = Arc::clone(&outstanding);
                async move {
                    let result = self.fetch_one(ctx, object, limits).await;
                    if let Ok(mut set) = outstanding.lock() {
                        set.remove(&i);
                    }
                    (i, result)
                }
            })
            .collect();
        let fetches = stream::iter(futures)
            .buffer_unordered(self.config.fetch_concurrency.max(1))
            .collect::<Vec<_>>();
        let mut results = match tokio::time::timeout(self.config.timeout, fetches).await {
            Ok(results) => results,
            Err(_) => {
                let pending = outstanding.lock().map(|s| s.clone()).unwrap_or_default();
                return Err(MountError::Deadline {
                    timeout: self.config.timeout,
                    outstanding: pending.into_iter().map(|i| objects[i].label()).collect(),
                });
            }
        };
        results.sort_by_key(|(i, _)| *i);
        let mut ready = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        for (i, result) in results {
            match result {
                Ok(r) => ready.push(r),
                Err(error) => failures.push(Failure {
                    object: objects[i].label(),
                    error,
                }),
            }
        }
        if failures.is_empty() {
            Ok(ready)
        } else {
            Err(MountError::Objects {
                total: objects.len(),
                failures,
            })
        }
    }

    async fn fetch_one(
        &self,
        ctx: &MountContext,
        object: &ObjectSpec,
        limits: FetchLimits,
    ) -> Result<Ready, ObjectError> {
        let backend = self.backends.get(&object.backend)?;
        let fetched = backend.fetch(object, ctx, limits).await?;
        let contents = Zeroizing::new(object.encoding.decode(fetched.contents.expose())?);
        if contents.len() as u64 > limits.max_bytes {
            return Err(ObjectError::TooLarge {
                size: contents.len() as u64,
                limit: limits.max_bytes,
            });
        }
        let version = match fetched.version {
            Some(v) => v,
            None => self.version_key.version(&object.name, &contents),
        };
        Ok(Ready {
            path: object.name.clone(),
            mode: object.mode.unwrap_or(ctx.default_mode),
            contents,
            version,
        })
    }
}
