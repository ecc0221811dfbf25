//! The Azure provider's SPC form, read its way: `objects` as an `array:` of
//! YAML strings (or coffer's list), `objectName` the vault item and
//! `objectAlias` the file, `objectType`, `objectVersion`,
//! `objectVersionHistory`, `objectFormat`, `objectEncoding`; and the SPC
//! settings (`keyvaultName`, `tenantID`, `cloudName`, `clientID`).

use serde_yaml_ng::{Mapping, Value};

use crate::config::AzureArgs;
use crate::error::{shown, ObjectError};
use crate::request::MountContext;
use crate::spc::{string_field, yaml_kind, ObjectSpec};

/// SPC parameters this backend reads.
pub const PARAMETERS: &[&str] = &[
    "keyvaultName",
    "tenantID",
    "tenantId",
    "cloudName",
    "clientID",
    "usePodIdentity",
    "useVMManagedIdentity",
    "userAssignedIdentityID",
];

/// The vault item's name once `objectName` has become the file.
pub const NAME_FIELD: &str = ".objectName";
/// For `objectVersionHistory`: which version, 0 = newest.
pub const HISTORY_FIELD: &str = ".history";
/// For the `.crt` / `.key` files of a certificate secret.
pub const PART_FIELD: &str = ".part";

pub const OBJECT_FIELDS: &[&str] = &[
    "objectType",
    "objectVersion",
    "objectVersionHistory",
    "objectFormat",
    NAME_FIELD,
    HISTORY_FIELD,
    PART_FIELD,
];

/// The fields a user writes.
pub const USER_FIELDS: &[&str] = &[
    "objectName",
    "objectAlias",
    "objectType",
    "objectVersion",
    "objectVersionHistory",
    "objectFormat",
    "objectEncoding",
    "filePermission",
];

/// Audience of the pod's token for workload identity.
pub const WORKLOAD_IDENTITY_AUDIENCE: &str = "api://AzureADTokenExchange";

/// Versions one object may ask for with `objectVersionHistory`.
pub const MAX_HISTORY: i64 = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Secret,
    Key,
    Cert,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Secret => "secret",
            Kind::Key => "key",
            Kind::Cert => "cert",
        }
    }

    /// The collection in Key Vault's REST paths.
    pub fn collection(self) -> &'static str {
        match self {
            Kind::Secret => "secrets",
            Kind::Key => "keys",
            Kind::Cert => "certificates",
        }
    }
}

/// Which file of a certificate secret an object is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// The whole: key and chain (or the PFX).
    Whole,
    /// `<alias>.crt`: the certificates.
    Certs,
    /// `<alias>.key`: the private key.
    Key,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AzureObject {
    pub kind: Kind,
    pub name: String,
    /// `None`: the latest.
    pub version: Option<String>,
    /// `Some(i)`: the i-th newest version (objectVersionHistory).
    pub history: Option<usize>,
    pub pfx: bool,
    pub part: Part,
}

/// Azure clouds: Key Vault's DNS suffix and the Entra ID login host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cloud {
    pub name: &'static str,
    pub vault_suffix: &'static str,
    pub authority: &'static str,
}

const CLOUDS: [Cloud; 3] = [
    Cloud {
        name: "AzurePublicCloud",
        vault_suffix: "vault.azure.net",
        authority: "https://login.microsoftonline.com",
    },
    Cloud {
        name: "AzureUSGovernmentCloud",
        vault_suffix: "vault.usgovcloudapi.net",
        authority: "https://login.microsoftonline.us",
    },
    Cloud {
        name: "AzureChinaCloud",
        vault_suffix: "vault.azure.cn",
        authority: "https://login.chinacloudapi.cn",
    },
];

#[derive(Debug, Clone)]
pub enum Auth {
    /// The pod's token as a client assertion for `client_id`.
    WorkloadIdentity { client_id: String },
    /// nodePublishSecretRef `clientid` / `clientsecret`.
    ServicePrincipal {
        client_id: String,
        secret: crate::secret::Credential,
    },
}

impl Auth {
    pub fn client_id(&self) -> &str {
        match self {
            Auth::WorkloadIdentity { client_id } | Auth::ServicePrincipal { client_id, .. } => {
                client_id
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct AzureParams {
    pub vault_name: String,
    /// `https://<vault>.<suffix>` or the flag's URL, without a trailing `/`.
    pub vault_url: String,
    pub tenant: String,
    /// The token endpoint's host, without a trailing `/`.
    pub authority: String,
    /// `https://vault.azure.net/.default` or the cloud's.
    pub scope: String,
    pub auth: Auth,
}

impl AzureParams {
    pub fn from_context(ctx: &MountContext, defaults: &AzureArgs) -> Result<Self, ObjectError> {
        let param = |k: &str| {
            ctx.parameters
                .get(k)
                .map(|v| v.trim())
                .filter(|v| !v.is_empty())
        };
        for (flag, why) in [
            (
                "usePodIdentity",
                "AAD Pod Identity answers for the node's identity agent (NMI), not the pod",
            ),
            (
                "useVMManagedIdentity",
                "the VM's managed identity is the node's, shared by every pod on it",
            ),
        ] {
            if let Some(v) = param(flag) {
                match crate::backend::go_bool(v) {
                    Some(false) => {}
                    Some(true) => {
                        return Err(ObjectError::Invalid(format!(
                            "{flag}: coffer fetches only as the pod, and {why}; use workload \
                             identity (clientID, with the token audience {WORKLOAD_IDENTITY_AUDIENCE}) \
                             or a service principal in nodePublishSecretRef"
                        )))
                    }
                    None => {
                        return Err(ObjectError::Invalid(format!(
                            "{flag} {} is not true or false",
                            shown(v)
                        )))
                    }
                }
            }
        }
        let vault_name = param("keyvaultName")
            .ok_or_else(|| ObjectError::Invalid("keyvaultName is not set".into()))?;
        if !(3..=24).contains(&vault_name.len())
            || !vault_name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ObjectError::Invalid(format!(
                "keyvaultName {} must be 3-24 characters of [-a-zA-Z0-9]",
                shown(vault_name)
            )));
        }
        let tenant = param("tenantID")
            .or_else(|| param("tenantId"))
            .ok_or_else(|| ObjectError::Invalid("tenantID is not set".into()))?;
        if tenant.len() > 128
            || !tenant
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
        {
            return Err(ObjectError::Invalid(format!(
                "tenantID {} is not a tenant id or domain",
                shown(tenant)
            )));
        }
        let cloud = match param("cloudName") {
            None => CLOUDS[0],
            Some(c) => *CLOUDS
                .iter()
                .find(|k| k.name.eq_ignore_ascii_case(c))
                .ok_or_else(|| {
                    ObjectError::Invalid(format!(
                        "cloudName {} is not one of {}",
                        shown(c),
                        CLOUDS.map(|k| k.name).join(", ")
                    ))
                })?,
        };
        let vault_url = match &defaults.keyvault_endpoint {
            Some(url) => url.replace("{name}", vault_name),
            None => format!("https://{vault_name}.{}", cloud.vault_suffix),
        }
        .trim_end_matches('/')
        .to_string();
        let authority = defaults
            .authority_host
            .clone()
            .unwrap_or_else(|| cloud.authority.to_string())
            .trim_end_matches('/')
            .to_string();
        let auth = match param("clientID") {
            Some(client_id) => {
                check_client_id(client_id)?;
                Auth::WorkloadIdentity {
                    client_id: client_id.to_string(),
                }
            }
            None => {
                let secrets = ctx.node_publish_secrets.as_ref();
                let get = |k: &str| {
                    secrets.and_then(|s| {
                        s.iter()
                            .find(|(name, _)| name.eq_ignore_ascii_case(k))
                            .map(|(_, v)| v.clone())
                    })
                };
                match (get("clientid"), get("clientsecret")) {
                    (Some(id), Some(secret)) if !secret.expose().is_empty() => {
                        let id = id.expose().trim().to_string();
                        check_client_id(&id)?;
                        Auth::ServicePrincipal {
                            client_id: id,
                            secret,
                        }
                    }
                    _ => {
                        return Err(ObjectError::FailedPrecondition(format!(
                            "no Azure identity: set clientID (workload identity; the CSIDriver \
                             must request tokens for {WORKLOAD_IDENTITY_AUDIENCE}) or give a \
                             nodePublishSecretRef with clientid and clientsecret"
                        )))
                    }
                }
            }
        };
        Ok(Self {
            vault_name: vault_name.to_string(),
            vault_url,
            tenant: tenant.to_string(),
            authority,
            scope: format!("https://{}/.default", cloud.vault_suffix),
            auth,
        })
    }
}

fn check_client_id(id: &str) -> Result<(), ObjectError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ObjectError::Invalid(format!(
            "clientID {} is not an application (client) id",
            shown(id)
        )));
    }
    Ok(())
}

/// Key Vault item names: 1-127 characters of `[0-9a-zA-Z-]`.
fn valid_item_name(n: &str) -> bool {
    (1..=127).contains(&n.len()) && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// An `objects` document in the Azure provider's shape: a mapping with an
/// `array:` of YAML strings, each one object. `None` if it is not that shape.
pub fn array_entries(doc: &Value) -> Option<Result<Vec<Value>, ObjectError>> {
    let Value::Mapping(m) = doc else {
        return None;
    };
    let array = m.get(Value::String("array".into()))?;
    let Value::Sequence(items) = array else {
        return Some(Err(ObjectError::Invalid(format!(
            "objects: array must be a list of YAML strings, got {}",
            yaml_kind(array)
        ))));
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let Value::String(text) = item else {
            return Some(Err(ObjectError::Invalid(format!(
                "objects: array[{i}] must be a YAML string, got {}",
                yaml_kind(item)
            ))));
        };
        match crate::yaml::parse(text, &crate::yaml::REQUEST) {
            Ok(v) => out.push(v),
            Err(e) => {
                return Some(Err(ObjectError::Invalid(format!(
                    "objects: array[{i}] {e}"
                ))))
            }
        }
    }
    Some(Ok(out))
}

/// Rewrites one entry of the Azure provider's form into coffer objects:
/// the item as its file (`objectAlias`, else `objectName`), or with
/// `objectVersionHistory: N` the files `<file>/0 … <file>/N-1` (newest
/// first; versions that do not exist are left out, as the peer does);
/// with `split`, a secret also gets `<file>.crt` and `<file>.key` when it
/// turns out to be a certificate.
pub fn peer_entries(mut map: Mapping, split: bool) -> Result<Vec<Value>, ObjectError> {
    let key = |k: &str| Value::String(k.into());
    let name = string_field(&map, "objectName")?
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    if name.is_empty() {
        return Err(ObjectError::Invalid("objectName is missing".into()));
    }
    let file = string_field(&map, "objectAlias")?
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .unwrap_or(&name)
        .to_string();
    let kind = string_field(&map, "objectType")?
        .map(str::trim)
        .unwrap_or_default()
        .to_string();
    let history = match map.remove(key("objectVersionHistory")) {
        None | Some(Value::Null) => 0,
        Some(Value::Number(n)) => n.as_i64().unwrap_or(-1),
        Some(Value::String(s)) => s.trim().parse::<i64>().unwrap_or(-1),
        Some(other) => {
            return Err(ObjectError::Invalid(format!(
                "objectVersionHistory must be a number, got {}",
                yaml_kind(&other)
            )))
        }
    };
    if !(0..=MAX_HISTORY).contains(&history) {
        return Err(ObjectError::Invalid(format!(
            "objectVersionHistory must be a number from 0 to {MAX_HISTORY}"
        )));
    }
    // The peer's objectEncoding is coffer's `encoding`, for secrets only.
    if let Some(enc) = map.remove(key("objectEncoding")) {
        if !matches!(enc, Value::Null) {
            if kind != "secret" {
                return Err(ObjectError::Invalid(
                    "objectEncoding only supported for objectType: secret".into(),
                ));
            }
            let text = match &enc {
                Value::String(t) => t.trim().to_string(),
                other => yaml_kind(other).to_string(),
            };
            if !["", "utf-8", "hex", "base64"]
                .iter()
                .any(|e| e.eq_ignore_ascii_case(&text))
            {
                return Err(ObjectError::Invalid(format!(
                    "objectEncoding {} should be utf-8, hex or base64",
                    shown(&text)
                )));
            }
            map.insert(key("encoding"), Value::String(text.to_ascii_lowercase()));
        }
    }
    map.remove(key("objectAlias"));
    map.insert(key(NAME_FIELD), Value::String(name));
    map.entry(key("backend"))
        .or_insert_with(|| Value::String("azure".into()));
    let mut out = Vec::new();
    if history > 1 {
        for i in 0..history {
            let mut e = map.clone();
            e.insert(key("objectName"), Value::String(format!("{file}/{i}")));
            e.insert(key(HISTORY_FIELD), Value::Number(i.into()));
            if i > 0 {
                e.insert(key("optional"), Value::Bool(true));
            }
            out.push(Value::Mapping(e));
        }
        return Ok(out);
    }
    map.insert(key("objectName"), Value::String(file.clone()));
    let pfx =
        string_field(&map, "objectFormat")?.is_some_and(|f| f.trim().eq_ignore_ascii_case("pfx"));
    if split && kind == "secret" && !pfx {
        for (suffix, part) in [(".crt", "crt"), (".key", "key")] {
            let mut e = map.clone();
            e.insert(key("objectName"), Value::String(format!("{file}{suffix}")));
            e.insert(key(PART_FIELD), Value::String(part.into()));
            e.insert(key("optional"), Value::Bool(true));
            e.remove(key("encoding"));
            out.push(Value::Mapping(e));
        }
    }
    out.insert(0, Value::Mapping(map));
    Ok(out)
}

impl AzureObject {
    pub fn from_spec(object: &ObjectSpec) -> Result<Self, ObjectError> {
        object.reject_peer_typos(OBJECT_FIELDS, USER_FIELDS, "Azure")?;
        let name = object
            .required_str(NAME_FIELD)
            .map_err(|_| ObjectError::Invalid("objectName (the vault item) is missing".into()))?;
        if !valid_item_name(name) {
            return Err(ObjectError::Invalid(format!(
                "objectName {} is not a Key Vault item name (1-127 of [0-9a-zA-Z-])",
                shown(name)
            )));
        }
        let kind = match object.str_field("objectType")?.map(str::trim) {
            Some("secret") => Kind::Secret,
            Some("key") => Kind::Key,
            Some("cert") => Kind::Cert,
            Some(other) => {
                return Err(ObjectError::Invalid(format!(
                    "objectType {} is not secret, key or cert",
                    shown(other)
                )))
            }
            None => {
                return Err(ObjectError::Invalid(
                    "objectType (secret, key or cert) is missing".into(),
                ))
            }
        };
        let version = object
            .str_field("objectVersion")?
            .map(str::trim)
            .filter(|v| !v.is_empty() && *v != "latest")
            .map(str::to_string);
        if let Some(v) = &version {
            if v.len() > 64 || !v.chars().all(|c| c.is_ascii_alphanumeric()) {
                return Err(ObjectError::Invalid(format!(
                    "objectVersion {} is not a Key Vault version",
                    shown(v)
                )));
            }
        }
        let pfx = match object.str_field("objectFormat")?.map(str::trim) {
            None | Some("") => false,
            Some(f) if f.eq_ignore_ascii_case("pem") => false,
            Some(f) if f.eq_ignore_ascii_case("pfx") => {
                if kind != Kind::Secret {
                    return Err(ObjectError::Invalid(
                        "PFX format only supported for objectType: secret".into(),
                    ));
                }
                true
            }
            Some(f) => {
                return Err(ObjectError::Invalid(format!(
                    "objectFormat {} should be pem or pfx",
                    shown(f)
                )))
            }
        };
        if kind != Kind::Secret && object.encoding != crate::spc::Encoding::Utf8 {
            return Err(ObjectError::Invalid(
                "objectEncoding only supported for objectType: secret".into(),
            ));
        }
        let history = match object.fields.get(HISTORY_FIELD) {
            Some(Value::Number(n)) => n.as_u64().map(|n| n as usize),
            _ => None,
        };
        let part = match object.str_field(PART_FIELD)? {
            Some("crt") => Part::Certs,
            Some("key") => Part::Key,
            _ => Part::Whole,
        };
        Ok(Self {
            kind,
            name: name.to_string(),
            version,
            history,
            pfx,
            part,
        })
    }

    /// The ObjectVersion id as the Azure provider forms it.
    pub fn uid(&self) -> String {
        match self.history {
            Some(i) => format!("{}/{}/{i}", self.kind.as_str(), self.name),
            None => format!("{}/{}", self.kind.as_str(), self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(yaml: &str, split: bool) -> Result<Vec<Value>, ObjectError> {
        let Value::Mapping(m) = serde_yaml_ng::from_str(yaml).unwrap() else {
            panic!()
        };
        peer_entries(m, split)
    }

    fn name_of(v: &Value) -> &str {
        v.get("objectName").and_then(Value::as_str).unwrap()
    }

    #[test]
    fn the_array_form_and_file_names() {
        let doc: Value = serde_yaml_ng::from_str(
            "array:\n  - |\n    objectName: secret1\n    objectType: secret\n  - |\n    objectName: key1\n    objectType: key\n    objectAlias: k\n",
        )
        .unwrap();
        let items = array_entries(&doc).unwrap().unwrap();
        assert_eq!(items.len(), 2);
        let Value::Mapping(m) = items[1].clone() else {
            panic!()
        };
        let e = peer_entries(m, false).unwrap();
        assert_eq!(name_of(&e[0]), "k");
        assert_eq!(e[0].get(NAME_FIELD).and_then(Value::as_str), Some("key1"));
        assert!(array_entries(&Value::Sequence(vec![])).is_none());
    }

    #[test]
    fn history_and_split_files() {
        let e = entries(
            "objectName: s\nobjectType: secret\nobjectVersionHistory: 3",
            false,
        )
        .unwrap();
        let names: Vec<&str> = e.iter().map(name_of).collect();
        assert_eq!(names, ["s/0", "s/1", "s/2"]);
        let e = entries("objectName: c\nobjectType: secret\nobjectAlias: tls", true).unwrap();
        let names: Vec<&str> = e.iter().map(name_of).collect();
        assert_eq!(names, ["tls", "tls.crt", "tls.key"]);
        assert!(entries(
            "objectName: s\nobjectType: key\nobjectEncoding: base64",
            false
        )
        .is_err());
        assert!(entries(
            "objectName: s\nobjectType: secret\nobjectVersionHistory: 1000",
            false
        )
        .is_err());
    }
}
