//! The `gcp` backend's parameters, compatible with Google's
//! secrets-store-csi-driver-provider-gcp: SPC-level `auth`, project and
//! Workload Identity settings, and per object `resourceName` with at most one
//! of `extractJSONKey` / `extractYAMLKey`.

use crate::config::GcpArgs;
use crate::error::{shown, ObjectError};
use crate::request::MountContext;
use crate::secret::Credential;
use crate::spc::ObjectSpec;

/// Object fields this backend reads.
pub const OBJECT_FIELDS: &[&str] = &["resourceName", "extractJSONKey", "extractYAMLKey"];

/// SPC parameters this backend reads.
pub const PARAMETERS: &[&str] = &[
    "auth",
    "gcpProject",
    "audience",
    "gcpServiceAccount",
    "gcpWorkloadIdentityProvider",
];

/// How the pod's calls to Secret Manager are authorized.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Workload Identity Federation as the pod: its service-account token for
    /// `audience` exchanged at STS for `sts_audience`, then optionally an
    /// access token of `impersonate` from IAM Credentials.
    PodAdc {
        audience: String,
        sts_audience: String,
        impersonate: Option<String>,
    },
    /// The daemon's own Application Default Credentials.
    ProviderAdc,
    /// A service-account key from nodePublishSecretRef `key.json`.
    KeyJson(Credential),
}

#[derive(Debug, Clone)]
pub struct GcpParams {
    pub auth: Auth,
}

fn param<'a>(ctx: &'a MountContext, key: &str) -> Option<&'a str> {
    ctx.parameters
        .get(key)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

impl GcpParams {
    pub fn from_context(ctx: &MountContext, defaults: &GcpArgs) -> Result<Self, ObjectError> {
        if let Some(key) = ctx
            .node_publish_secrets
            .as_ref()
            .and_then(|s| s.get("key.json"))
        {
            if !defaults.allow_node_publish_secret {
                return Err(ObjectError::FailedPrecondition(
                    "the volume's nodePublishSecretRef has key.json, but this node's coffer does not accept \
                     service-account keys (start it with --gcp-allow-node-publish-secret)"
                        .into(),
                ));
            }
            return Ok(Self {
                auth: Auth::KeyJson(key.clone()),
            });
        }
        let auth = match param(ctx, "auth").unwrap_or("pod-adc") {
            "provider-adc" if defaults.allow_provider_adc => Auth::ProviderAdc,
            "provider-adc" => {
                return Err(ObjectError::FailedPrecondition(
                    "auth: provider-adc fetches with this node's own Google identity, which every SPC on \
                     the node could then use; this node's coffer does not allow it (start it with \
                     --gcp-allow-provider-adc)"
                        .into(),
                ))
            }
            "pod-adc" => {
                let project = param(ctx, "gcpProject")
                    .map(str::to_string)
                    .or_else(|| defaults.project.clone())
                    .ok_or_else(|| {
                        ObjectError::FailedPrecondition(
                            "pod-adc needs a project: set the SPC parameter gcpProject or start coffer with --gcp-project"
                                .into(),
                        )
                    })?;
                let audience = param(ctx, "audience")
                    .map(str::to_string)
                    .unwrap_or_else(|| format!("{project}.svc.id.goog"));
                let sts_audience = match param(ctx, "gcpWorkloadIdentityProvider") {
                    Some(p) => p.to_string(),
                    None => match (&defaults.cluster_location, &defaults.cluster_name) {
                        (Some(loc), Some(name)) => format!(
                            "identitynamespace:{project}.svc.id.goog:https://container.googleapis.com/v1/projects/{project}/locations/{loc}/clusters/{name}"
                        ),
                        _ => {
                            return Err(ObjectError::FailedPrecondition(
                                "pod-adc needs the Workload Identity provider: set gcpWorkloadIdentityProvider, or start \
                                 coffer with --gcp-cluster-location and --gcp-cluster-name"
                                    .into(),
                            ))
                        }
                    },
                };
                if ctx.token_for(&audience).is_none() {
                    return Err(ObjectError::FailedPrecondition(format!(
                        "the driver passed no service-account token for audience {audience:?}: add \
                         {{audience: {audience}}} to the CSIDriver's tokenRequests"
                    )));
                }
                Auth::PodAdc {
                    audience,
                    sts_audience,
                    impersonate: param(ctx, "gcpServiceAccount").map(str::to_string),
                }
            }
            other => {
                return Err(ObjectError::Invalid(format!(
                    "auth {} is not pod-adc or provider-adc",
                    shown(other)
                )))
            }
        };
        Ok(Self { auth })
    }
}

/// Which key of the payload to extract.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extract {
    Json(String),
    Yaml(String),
}

/// What a `resourceName` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A Secret Manager secret version (`…/secrets/*/versions/*`).
    Secret,
    /// A Parameter Manager parameter version (`…/parameters/*/versions/*`),
    /// read rendered: its secret references (`__REF__`) resolved.
    Parameter,
}

/// One object's request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcpObject {
    pub resource: String,
    pub kind: Kind,
    /// `Some(location)` for regional secrets and for parameters (`global`
    /// included).
    pub location: Option<String>,
    /// The version is a number (immutable), not `latest` or an alias.
    pub pinned: bool,
    pub extract: Option<Extract>,
}

impl GcpObject {
    pub fn from_spec(object: &ObjectSpec) -> Result<Self, ObjectError> {
        // Google's provider ignores fields it does not know; so does coffer,
        // but for near misses of its own (typos).
        object.reject_typos(OBJECT_FIELDS)?;
        let resource = object.required_str("resourceName")?.to_string();
        let parts: Vec<&str> = resource.split('/').collect();
        let bad = || {
            ObjectError::Invalid(format!(
                "resourceName {} is not projects/*/secrets/*/versions/*, \
                 projects/*/locations/*/secrets/*/versions/* or \
                 projects/*/locations/*/parameters/*/versions/*",
                shown(&resource)
            ))
        };
        fn valid(s: &&&str) -> bool {
            !s.is_empty() && !s.contains(['?', '#', ':']) && **s != "." && **s != ".."
        }
        // The location becomes part of a host name (the regional endpoint):
        // only what Google's locations are made of.
        fn location(l: &str) -> bool {
            l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        }
        let (kind, location, version) = match parts.as_slice() {
            ["projects", p, "secrets", s, "versions", v] if [p, s, v].iter().all(valid) => {
                (Kind::Secret, None, *v)
            }
            ["projects", p, "locations", l, "secrets", s, "versions", v]
                if [p, l, s, v].iter().all(valid) && location(l) =>
            {
                (Kind::Secret, Some(l.to_string()), *v)
            }
            ["projects", p, "locations", l, "parameters", n, "versions", v]
                if [p, l, n, v].iter().all(valid) && location(l) =>
            {
                (Kind::Parameter, Some(l.to_string()), *v)
            }
            _ => return Err(bad()),
        };
        let json = object
            .str_field("extractJSONKey")?
            .filter(|k| !k.is_empty());
        let yaml = object
            .str_field("extractYAMLKey")?
            .filter(|k| !k.is_empty());
        let extract = match (json, yaml) {
            (Some(_), Some(_)) => {
                return Err(ObjectError::Invalid(
                    "set at most one of extractJSONKey and extractYAMLKey".into(),
                ))
            }
            (Some(k), None) => Some(Extract::Json(k.to_string())),
            (None, Some(k)) => Some(Extract::Yaml(k.to_string())),
            (None, None) => None,
        };
        Ok(Self {
            // A parameter version's payload is fixed, but what its
            // references render to is not.
            pinned: kind == Kind::Secret && version.bytes().all(|b| b.is_ascii_digit()),
            resource,
            kind,
            location,
            extract,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn object(yaml: &str) -> Result<GcpObject, ObjectError> {
        let params = BTreeMap::from([("objects".to_string(), yaml.to_string())]);
        GcpObject::from_spec(&crate::spc::parse_objects(&params, "gcp").unwrap()[0])
    }

    #[test]
    fn parameter_versions() {
        let o = object("- objectName: a\n  resourceName: projects/p/locations/global/parameters/app/versions/v1").unwrap();
        assert_eq!(
            (o.kind, o.location.as_deref(), o.pinned),
            (Kind::Parameter, Some("global"), false)
        );
        let o = object("- objectName: a\n  resourceName: projects/p/locations/us-central1/parameters/app/versions/v1\n  extractYAMLKey: db").unwrap();
        assert_eq!(
            (o.kind, o.location.as_deref()),
            (Kind::Parameter, Some("us-central1"))
        );
        assert_eq!(o.extract, Some(Extract::Yaml("db".into())));
    }

    #[test]
    fn resource_names() {
        let o = object("- objectName: a\n  resourceName: projects/p/secrets/s/versions/3").unwrap();
        assert_eq!((o.location, o.pinned), (None, true));
        let o = object("- objectName: a\n  resourceName: projects/p/locations/europe-west3/secrets/s/versions/latest").unwrap();
        assert_eq!(
            (o.location.as_deref(), o.pinned),
            (Some("europe-west3"), false)
        );
        for bad in [
            "projects/p/secrets/s",
            "projects/p/secrets/s/versions/",
            "p/s/v",
            "projects/p/secrets/../versions/1",
            "projects/p/locations/x@evil.example/secrets/s/versions/1",
            "projects/p/locations/EU.evil/secrets/s/versions/1",
            "projects/p/parameters/n/versions/v",
            "projects/p/locations/x@y/parameters/n/versions/v",
        ] {
            assert!(
                object(&format!("- objectName: a\n  resourceName: {bad}")).is_err(),
                "{bad}"
            );
        }
        assert!(object("- objectName: a\n  resourceName: projects/p/secrets/s/versions/1\n  extractJSONKey: a\n  extractYAMLKey: b").is_err());
    }
}
