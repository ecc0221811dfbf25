//! SecretProviderClass manifests (the YAML a cluster admin applies), and the
//! exact MountRequest the driver builds from one for a pod.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use serde_yaml_ng::Value;

use crate::proto;
use crate::request::keys;
use crate::secret::Credential;

pub const API_GROUP: &str = "secrets-store.csi.x-k8s.io";

/// Bounds of a manifest file (several SPCs, each holding documents).
const MANIFEST_LIMITS: crate::yaml::Limits = crate::yaml::Limits {
    max_bytes: 16 * 1024 * 1024,
    max_depth: 64,
    max_nodes: 1_000_000,
    max_scalar_bytes: 64 * 1024 * 1024,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretProviderClass {
    pub name: String,
    pub namespace: Option<String>,
    pub provider: String,
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("not valid YAML: {0}")]
    Yaml(String),
    #[error("no SecretProviderClass ({API_GROUP}/v1) found in the file")]
    NotFound,
    #[error("SecretProviderClass {name:?}: {reason}")]
    Invalid { name: String, reason: String },
}

impl SecretProviderClass {
    /// Parses every SecretProviderClass in a (multi-document) YAML file.
    pub fn all_from_yaml(text: &str) -> Result<Vec<Self>, ManifestError> {
        // Manifest files may come from anywhere (a pull request checked in
        // CI): bounded like request documents, with room for many SPCs.
        crate::yaml::check(text, &MANIFEST_LIMITS)
            .map_err(|e| ManifestError::Yaml(format!("the file {e}")))?;
        let mut out = Vec::new();
        for doc in serde_yaml_ng::Deserializer::from_str(text) {
            let value = <Value as serde::Deserialize>::deserialize(doc)
                .map_err(|e| ManifestError::Yaml(e.to_string()))?;
            if value.get("kind").and_then(Value::as_str) != Some("SecretProviderClass") {
                continue;
            }
            out.push(Self::from_value(&value)?);
        }
        if out.is_empty() {
            return Err(ManifestError::NotFound);
        }
        Ok(out)
    }

    /// The first SecretProviderClass in the file.
    pub fn from_yaml(text: &str) -> Result<Self, ManifestError> {
        Self::all_from_yaml(text).map(|mut v| v.remove(0))
    }

    fn from_value(value: &Value) -> Result<Self, ManifestError> {
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let invalid = |reason: String| ManifestError::Invalid {
            name: name.clone(),
            reason,
        };
        if name.is_empty() {
            return Err(invalid("metadata.name is missing".into()));
        }
        let api = value
            .get("apiVersion")
            .and_then(Value::as_str)
            .unwrap_or("");
        let ok_api = [format!("{API_GROUP}/v1"), format!("{API_GROUP}/v1alpha1")];
        if !ok_api.iter().any(|a| a == api) {
            return Err(invalid(format!("apiVersion {api:?} is not {API_GROUP}/v1")));
        }
        let namespace = value
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(Value::as_str)
            .map(str::to_string);
        let spec = value
            .get("spec")
            .ok_or_else(|| invalid("spec is missing".into()))?;
        let provider = spec
            .get("provider")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if provider.is_empty() {
            return Err(invalid("spec.provider is missing".into()));
        }
        let mut parameters = BTreeMap::new();
        match spec.get("parameters") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(map)) => {
                for (k, v) in map {
                    let Some(k) = k.as_str() else {
                        return Err(invalid("spec.parameters keys must be strings".into()));
                    };
                    let Some(v) = v.as_str() else {
                        return Err(invalid(format!(
                            "spec.parameters.{k} must be a string (quote it, as the Kubernetes API requires)"
                        )));
                    };
                    parameters.insert(k.to_string(), v.to_string());
                }
            }
            Some(_) => return Err(invalid("spec.parameters must be a mapping".into())),
        }
        Ok(Self {
            name,
            namespace,
            provider,
            parameters,
        })
    }
}

/// The pod a volume belongs to, as the driver reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

/// Everything the driver puts into a MountRequest besides the SPC.
#[derive(Debug, Clone)]
pub struct DriverRequest {
    pub pod: Pod,
    /// audience → service-account token (CSIDriver `tokenRequests`).
    pub tokens: BTreeMap<String, Credential>,
    /// nodePublishSecretRef data, or `None` when the volume has none.
    pub node_publish_secrets: Option<BTreeMap<String, Credential>>,
    /// The pod's own `volumeAttributes`; they override SPC parameters.
    pub volume_attributes: BTreeMap<String, String>,
    /// Default file mode (the driver sends it as a decimal Go FileMode).
    pub permission: u32,
    pub target_path: String,
}

impl DriverRequest {
    /// Builds the request exactly as the driver does: SPC parameters, then
    /// the volume context (pod info, tokens, the pod's attributes) over them.
    pub fn to_proto(&self, spc: &SecretProviderClass) -> proto::MountRequest {
        let mut attributes: BTreeMap<String, String> = spc.parameters.clone();
        let mut context = self.volume_attributes.clone();
        context.insert(keys::SPC_NAME.into(), spc.name.clone());
        context.insert(keys::POD_NAME.into(), self.pod.name.clone());
        context.insert(keys::POD_NAMESPACE.into(), self.pod.namespace.clone());
        context.insert(keys::POD_UID.into(), self.pod.uid.clone());
        context.insert(
            keys::SERVICE_ACCOUNT.into(),
            self.pod.service_account.clone(),
        );
        context
            .entry(keys::EPHEMERAL.into())
            .or_insert_with(|| "false".into());
        if !self.tokens.is_empty() {
            let expiry =
                humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(3600))
                    .to_string();
            let tokens: serde_json::Map<String, serde_json::Value> = self
                .tokens
                .iter()
                .map(|(aud, t)| {
                    (
                        aud.clone(),
                        serde_json::json!({"token": t.expose(), "expirationTimestamp": expiry}),
                    )
                })
                .collect();
            context.insert(
                keys::TOKENS.into(),
                serde_json::Value::Object(tokens).to_string(),
            );
        }
        attributes.extend(context);
        let secrets = match &self.node_publish_secrets {
            None => "null".to_string(),
            Some(map) => {
                let obj: serde_json::Map<String, serde_json::Value> = map
                    .iter()
                    .map(|(k, v)| (k.clone(), serde_json::Value::String(v.expose().to_string())))
                    .collect();
                serde_json::Value::Object(obj).to_string()
            }
        };
        proto::MountRequest {
            attributes: serde_json::to_string(&attributes).unwrap_or_else(|_| "{}".into()),
            secrets,
            target_path: self.target_path.clone(),
            permission: self.permission.to_string(),
            current_object_version: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::request::MountContext;

    const SPC: &str = r#"
apiVersion: v1
kind: ServiceAccount
metadata: {name: ignored}
---
apiVersion: secrets-store.csi.x-k8s.io/v1
kind: SecretProviderClass
metadata:
  name: app
  namespace: shop
spec:
  provider: coffer
  parameters:
    backend: file
    objects: |
      - objectName: a
"#;

    #[test]
    fn parses_manifest_and_builds_the_driver_request() {
        let spc = SecretProviderClass::from_yaml(SPC).unwrap();
        assert_eq!(spc.name, "app");
        assert_eq!(spc.provider, "coffer");
        assert_eq!(spc.parameters["backend"], "file");
        let req = DriverRequest {
            pod: Pod {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "uid-1".into(),
                service_account: "web".into(),
            },
            tokens: BTreeMap::from([("vault".to_string(), Credential::new("jwt".into()))]),
            node_publish_secrets: None,
            volume_attributes: BTreeMap::from([("backend".to_string(), "override".to_string())]),
            permission: 0o640,
            target_path: "/t".into(),
        }
        .to_proto(&spc);
        assert_eq!(req.permission, "416");
        assert_eq!(req.secrets, "null");
        let ctx =
            MountContext::parse(&req.attributes, &req.secrets, &req.permission, "/t").unwrap();
        assert_eq!(ctx.parameters["backend"], "override", "pod attributes win");
        assert_eq!(ctx.spc_name, "app");
        assert_eq!(ctx.pod.uid, "uid-1");
        assert_eq!(ctx.token_for("vault").unwrap().token.expose(), "jwt");
        assert_eq!(ctx.default_mode, 0o640);
    }

    #[test]
    fn rejects_bad_manifests() {
        assert_eq!(
            SecretProviderClass::from_yaml("kind: Pod").unwrap_err(),
            ManifestError::NotFound
        );
        let unquoted = SPC.replace("backend: file", "skip: true");
        let err = SecretProviderClass::from_yaml(&unquoted).unwrap_err();
        assert!(
            err.to_string()
                .contains("spec.parameters.skip must be a string"),
            "{err}"
        );
        let bad_api = SPC.replace("csi.x-k8s.io/v1", "csi.x-k8s.io/v9");
        assert!(SecretProviderClass::from_yaml(&bad_api).is_err());
    }
}
