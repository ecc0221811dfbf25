//! The `vault` backend's parameters, compatible with HashiCorp's
//! vault-csi-provider: SPC-level connection and auth settings, and the
//! per-object request (`secretPath`, `secretKey`, `method`, `secretArgs`).

use std::path::PathBuf;

use serde_json::Value as Json;

use crate::config::VaultArgs;
use crate::error::{shown, ObjectError};
use crate::key::KeyBuilder;
use crate::request::MountContext;
use crate::secret::Credential;
use crate::spc::ObjectSpec;

/// Object fields this backend reads.
pub const OBJECT_FIELDS: &[&str] = &["secretPath", "secretKey", "method", "secretArgs"];

/// A TLS file or directory on the node, and who chose it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum TlsPath {
    /// A daemon flag: the operator's choice, read where it points.
    Operator(PathBuf),
    /// An SPC parameter: relative to `--vault-tls-dir` and resolved beneath
    /// it, so an SPC cannot read (or probe for) other node files.
    Spc { param: String, relative: PathBuf },
}

impl TlsPath {
    /// How the path is named in messages.
    pub fn describe(&self, tls_dir: &std::path::Path) -> String {
        match self {
            TlsPath::Operator(p) => p.display().to_string(),
            TlsPath::Spc { param, relative } => {
                format!("{param} {}", tls_dir.join(relative).display())
            }
        }
    }
}

/// TLS settings; part of the HTTP client cache key.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Tls {
    pub ca_cert: Option<TlsPath>,
    pub ca_dir: Option<TlsPath>,
    pub server_name: Option<String>,
    pub client_cert: Option<TlsPath>,
    pub client_key: Option<TlsPath>,
    pub skip_verify: bool,
}

impl Tls {
    /// The key part of the client cache for these settings.
    pub fn key_fields(&self, mut key: KeyBuilder) -> KeyBuilder {
        for path in [
            &self.ca_cert,
            &self.ca_dir,
            &self.client_cert,
            &self.client_key,
        ] {
            key = match path {
                None => key.opt(None::<&str>),
                Some(TlsPath::Operator(p)) => key
                    .field("operator")
                    .field(p.as_os_str().as_encoded_bytes()),
                Some(TlsPath::Spc { relative, .. }) => key
                    .field("spc")
                    .field(relative.as_os_str().as_encoded_bytes()),
            };
        }
        key.opt(self.server_name.as_deref())
            .field([u8::from(self.skip_verify)])
    }
}

/// How coffer authenticates to Vault for this pod.
#[derive(Debug, Clone)]
pub enum Auth {
    /// Kubernetes or JWT auth: `POST auth/<mount>/login {role, jwt}` with the
    /// pod's service-account token for `audience`.
    Login {
        mount: String,
        role: String,
        audience: String,
    },
    /// AppRole with `role_id` / `secret_id` from nodePublishSecretRef.
    AppRole {
        mount: String,
        role_id: String,
        secret_id: Credential,
    },
    /// A Vault token from nodePublishSecretRef `token`.
    Token(Credential),
}

/// What the SPC's parameters and the daemon's flags say about reaching
/// Vault and logging in. It depends on the attributes alone, so it is worked
/// out once per volume, not on every rotation poll (see
/// [`crate::request::Attributes::kept`]).
#[derive(Debug)]
pub struct Connection {
    pub address: String,
    pub namespace: Option<String>,
    pub tls: Tls,
    /// The auth mount the SPC names, checked to be a plain Vault path.
    mount: Option<String>,
    /// roleName, or why there is none to use: only a login needs one.
    role: Result<String, ObjectError>,
    /// The SPC's `audience`.
    audience: Option<String>,
    /// The last caller identity worked out for this volume, by the
    /// credential it was worked out for (see `VaultBackend::caller_identity`).
    pub(super) identity: std::sync::Mutex<Option<(Caller, crate::key::Key)>>,
}

/// What a caller identity depends on beyond the volume's [`Connection`]:
/// the auth, with credentials only as fingerprints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Caller {
    Login {
        mount: String,
        role: String,
        audience: String,
    },
    AppRole {
        mount: String,
        role_id: String,
        secret_id: crate::key::Key,
    },
    Token(crate::key::Key),
}

/// A Mount's settings: its volume's [`Connection`] and the auth its
/// request's tokens and nodePublishSecretRef make.
#[derive(Debug)]
pub struct VaultParams {
    pub connection: std::sync::Arc<Connection>,
    pub auth: Auth,
    /// Who this Mount's caller is to Vault, worked out on first use.
    pub(super) identity: std::sync::OnceLock<Option<crate::key::Key>>,
}

impl std::ops::Deref for VaultParams {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

fn param<'a>(ctx: &'a MountContext, key: &str) -> Option<&'a str> {
    ctx.parameters
        .get(key)
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
}

/// The spellings of one connection setting: vault-csi-provider's `vault…`
/// and openbao-csi-provider's `bao…` and `openbao…`.
const PREFIXES: [&str; 3] = ["vault", "bao", "openbao"];

/// Every SPC parameter this backend reads, in all its spellings.
pub fn parameter_names() -> Vec<String> {
    let mut names: Vec<String> = SETTINGS
        .iter()
        .flat_map(|s| PREFIXES.iter().map(move |p| format!("{p}{s}")))
        .collect();
    names.extend(["roleName", "audience"].map(String::from));
    names
}

const SETTINGS: [&str; 11] = [
    "Address",
    "Namespace",
    "CACertPath",
    "CADirectory",
    "TLSServerName",
    "TLSClientCertPath",
    "TLSClientKeyPath",
    "SkipTLSVerify",
    "KubernetesMountPath",
    "AuthMountPath",
    "RoleName",
];

/// The connection settings an SPC gives, found in one pass over its
/// parameters (a lookup per spelling cost three allocations each, on every
/// Mount). Each is taken under whichever spelling the SPC used, with that
/// spelling for messages.
struct Given<'a> {
    found: [Option<(&'static str, &'a str)>; SETTINGS.len()],
    /// Which spellings each setting was given under, a bit per prefix.
    spellings: [u8; SETTINGS.len()],
}

impl<'a> Given<'a> {
    fn of(ctx: &'a MountContext) -> Self {
        let mut given = Given {
            found: [None; SETTINGS.len()],
            spellings: [0; SETTINGS.len()],
        };
        for (key, value) in &ctx.parameters {
            let Some((bit, prefix, suffix)) = PREFIXES
                .iter()
                .enumerate()
                .find_map(|(n, p)| key.strip_prefix(p).map(|s| (1u8 << n, *p, s)))
            else {
                continue;
            };
            let Some(i) = SETTINGS.iter().position(|s| *s == suffix) else {
                continue;
            };
            let value = value.trim();
            if value.is_empty() {
                continue;
            }
            given.spellings[i] |= bit;
            given.found[i] = Some((prefix, value));
        }
        given
    }

    /// The setting and the spelling it was given under. Two spellings of one
    /// setting are refused: which one wins would be a guess.
    fn get(&self, suffix: &'static str) -> Result<Option<(Spelling, &'a str)>, ObjectError> {
        let Some(i) = SETTINGS.iter().position(|s| *s == suffix) else {
            return Ok(None);
        };
        if self.spellings[i].count_ones() > 1 {
            let names: Vec<String> = PREFIXES
                .iter()
                .enumerate()
                .filter(|(n, _)| self.spellings[i] & (1 << n) != 0)
                .map(|(_, p)| format!("{p}{suffix}"))
                .collect();
            return Err(ObjectError::Invalid(format!(
                "set only one of {}: they are the same setting",
                names.join(" and ")
            )));
        }
        Ok(self.found[i].map(|(prefix, value)| (Spelling { prefix, suffix }, value)))
    }
}

/// The name a setting was given under (`vaultAddress`, `baoAddress`, …).
#[derive(Clone, Copy)]
struct Spelling {
    prefix: &'static str,
    suffix: &'static str,
}

impl std::fmt::Display for Spelling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.prefix, self.suffix)
    }
}

/// Addresses already found to be http(s) URLs with a host: every Mount of
/// an SPC names the same one, and parsing it again was a visible share of a
/// warm Mount. Exact strings only; bounded in count and length.
static GOOD_ADDRESSES: std::sync::LazyLock<std::sync::Mutex<std::collections::HashSet<String>>> =
    std::sync::LazyLock::new(Default::default);
const GOOD_ADDRESSES_KEPT: usize = 64;
const GOOD_ADDRESS_MAX_LEN: usize = 256;

fn check_address(address: &str) -> Result<(), ObjectError> {
    if GOOD_ADDRESSES.lock().is_ok_and(|set| set.contains(address)) {
        return Ok(());
    }
    let parsed = url::Url::parse(address).map_err(|_| {
        ObjectError::Invalid(format!("vaultAddress {} is not a URL", shown(address)))
    })?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(ObjectError::Invalid(format!(
            "vaultAddress {} must be an http:// or https:// URL",
            shown(address)
        )));
    }
    if address.len() <= GOOD_ADDRESS_MAX_LEN {
        if let Ok(mut set) = GOOD_ADDRESSES.lock() {
            if set.len() >= GOOD_ADDRESSES_KEPT {
                set.clear();
            }
            set.insert(address.to_string());
        }
    }
    Ok(())
}

fn parse_bool(key: &str, raw: &str) -> Result<bool, ObjectError> {
    match raw.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ObjectError::Invalid(format!(
            "{key} {} is not true or false",
            shown(raw)
        ))),
    }
}

impl Connection {
    /// The volume's settings; errors name the parameter at fault.
    pub fn from_context(ctx: &MountContext, defaults: &VaultArgs) -> Result<Self, ObjectError> {
        let given = Given::of(ctx);
        let address = given
            .get("Address")?
            .map(|(_, v)| v.to_string())
            .or_else(|| defaults.address.clone())
            .ok_or_else(|| {
                ObjectError::FailedPrecondition(
                    "no Vault address: set the SPC parameter vaultAddress or start coffer with --vault-addr"
                        .into(),
                )
            })?;
        check_address(&address)?;
        let path_or = |suffix: &'static str, default: &Option<PathBuf>| match given.get(suffix)? {
            Some((key, raw)) => match crate::nodefs::confine(&defaults.tls_dir, raw) {
                Some(relative) => Ok(Some(TlsPath::Spc {
                    param: key.to_string(),
                    relative,
                })),
                // Refused without looking: nothing is said about the file.
                None => Err(ObjectError::PermissionDenied(format!(
                    "{key} must name a file below {} (this node's --vault-tls-dir); \
                     an SPC cannot make coffer read other node paths",
                    defaults.tls_dir.display()
                ))),
            },
            None => Ok(default.clone().map(TlsPath::Operator)),
        };
        let skip_verify = match given.get("SkipTLSVerify")? {
            Some((key, raw)) => parse_bool(&key.to_string(), raw)?,
            None => defaults.skip_verify,
        };
        let tls = Tls {
            ca_cert: path_or("CACertPath", &defaults.ca_cert)?,
            ca_dir: path_or("CADirectory", &defaults.ca_path)?,
            server_name: given
                .get("TLSServerName")?
                .map(|(_, v)| v.to_string())
                .or_else(|| defaults.tls_server_name.clone()),
            client_cert: path_or("TLSClientCertPath", &defaults.client_cert)?,
            client_key: path_or("TLSClientKeyPath", &defaults.client_key)?,
            skip_verify,
        };
        if tls.client_cert.is_some() != tls.client_key.is_some() {
            return Err(ObjectError::Invalid(
                "vaultTLSClientCertPath and vaultTLSClientKeyPath must be set together".into(),
            ));
        }
        let namespace = given
            .get("Namespace")?
            .map(|(_, v)| v.to_string())
            .or_else(|| defaults.namespace.clone())
            .filter(|n| !n.is_empty());
        let k8s_mount = given.get("KubernetesMountPath")?;
        let auth_mount = given.get("AuthMountPath")?;
        if let (Some((a, _)), Some((b, _))) = (&k8s_mount, &auth_mount) {
            return Err(ObjectError::Invalid(format!("set only one of {a} and {b}")));
        }
        let mount = k8s_mount
            .or(auth_mount)
            .map(|(_, m)| m.trim_matches('/').to_string());
        // The mount becomes part of the login URL: a plain Vault path only.
        if let Some(m) = &mount {
            if m.split('/').any(|s| s.is_empty() || s == "." || s == "..")
                || m.contains(['?', '#', '%', '\\'])
                || m.chars().any(char::is_control)
            {
                return Err(ObjectError::Invalid(format!(
                    "auth mount path {} is not a Vault path such as kubernetes or auth/cluster-a",
                    shown(m)
                )));
            }
        }
        let role = match (given.get("RoleName"), param(ctx, "roleName")) {
            (Err(e), _) => Err(e),
            (Ok(Some((key, _))), Some(_)) => Err(ObjectError::Invalid(format!(
                "set only one of roleName and {key}: they are the same setting"
            ))),
            (Ok(prefixed), plain) => prefixed.map(|(_, v)| v).or(plain).map(str::to_string).ok_or_else(|| {
                ObjectError::Invalid(
                    "roleName is required for Kubernetes/JWT auth (or give nodePublishSecretRef a token or role_id)"
                        .into(),
                )
            }),
        };
        Ok(Self {
            address: address.trim_end_matches('/').to_string(),
            namespace,
            tls,
            mount,
            role,
            audience: param(ctx, "audience").map(str::to_string),
            identity: std::sync::Mutex::new(None),
        })
    }
}

impl VaultParams {
    /// A Mount's settings, its volume's worked out afresh (for tests and tools).
    pub fn from_context(ctx: &MountContext, defaults: &VaultArgs) -> Result<Self, ObjectError> {
        let connection = std::sync::Arc::new(Connection::from_context(ctx, defaults)?);
        Self::with_auth(connection, ctx, defaults)
    }

    /// The Mount's auth on top of its volume's settings: nodePublishSecretRef
    /// `token`, else `role_id` (AppRole), else a login with the pod's token.
    pub fn with_auth(
        connection: std::sync::Arc<Connection>,
        ctx: &MountContext,
        defaults: &VaultArgs,
    ) -> Result<Self, ObjectError> {
        let auth = Self::auth(&connection, ctx, defaults)?;
        Ok(Self {
            connection,
            auth,
            identity: std::sync::OnceLock::new(),
        })
    }

    fn auth(
        connection: &Connection,
        ctx: &MountContext,
        defaults: &VaultArgs,
    ) -> Result<Auth, ObjectError> {
        let mount = connection.mount.clone();
        let secrets = ctx.node_publish_secrets.as_ref();
        let secret = |k: &str| {
            secrets
                .and_then(|s| s.get(k))
                .filter(|v| !v.expose().is_empty())
        };
        if let Some(token) = secret("token") {
            return Ok(Auth::Token(token.clone()));
        }
        if let Some(role_id) = secret("role_id") {
            return Ok(Auth::AppRole {
                mount: mount.unwrap_or_else(|| "approle".into()),
                role_id: role_id.expose().to_string(),
                secret_id: secret("secret_id")
                    .cloned()
                    .unwrap_or_else(|| Credential::new(String::new())),
            });
        }
        let role = connection.role.clone()?;
        // Without an SPC audience: the daemon's default, or else the one
        // openbao-csi-provider uses by default, if the driver passed it.
        let audience = match &connection.audience {
            Some(a) => a.clone(),
            None if ctx.token_for(&defaults.audience).is_none()
                && ctx.token_for(OPENBAO_AUDIENCE).is_some() =>
            {
                OPENBAO_AUDIENCE.to_string()
            }
            None => defaults.audience.clone(),
        };
        if ctx.token_for(&audience).is_none() {
            return Err(ObjectError::FailedPrecondition(format!(
                "the driver passed no service-account token for audience {audience:?}: add \
                 {{audience: {audience}}} to the CSIDriver's tokenRequests (Helm: tokenRequests)"
            )));
        }
        Ok(Auth::Login {
            mount: mount.unwrap_or_else(|| defaults.auth_mount.trim_matches('/').to_string()),
            role,
            audience,
        })
    }

    /// The fingerprint of the credential this Mount's auth carries itself:
    /// a static token or an AppRole secret_id.
    pub(super) fn credential(&self) -> Option<crate::key::Key> {
        match &self.auth {
            Auth::Login { .. } => None,
            Auth::AppRole { secret_id, .. } => Some(crate::key::fingerprint(secret_id.expose())),
            Auth::Token(t) => Some(crate::key::fingerprint(t.expose())),
        }
    }

    /// What the caller identity depends on beyond the volume, to keep.
    pub(super) fn caller(&self, credential: Option<crate::key::Key>) -> Option<Caller> {
        Some(match (&self.auth, credential) {
            (
                Auth::Login {
                    mount,
                    role,
                    audience,
                },
                _,
            ) => Caller::Login {
                mount: mount.clone(),
                role: role.clone(),
                audience: audience.clone(),
            },
            (Auth::AppRole { mount, role_id, .. }, Some(secret_id)) => Caller::AppRole {
                mount: mount.clone(),
                role_id: role_id.clone(),
                secret_id,
            },
            (Auth::Token(_), Some(token)) => Caller::Token(token),
            _ => return None,
        })
    }
}

impl Caller {
    /// Whether `auth` with `credential` is this caller.
    pub(super) fn is(&self, auth: &Auth, credential: Option<crate::key::Key>) -> bool {
        match (self, auth) {
            (
                Caller::Login {
                    mount,
                    role,
                    audience,
                },
                Auth::Login {
                    mount: m,
                    role: r,
                    audience: a,
                },
            ) => mount == m && role == r && audience == a,
            (
                Caller::AppRole {
                    mount,
                    role_id,
                    secret_id,
                },
                Auth::AppRole {
                    mount: m,
                    role_id: r,
                    ..
                },
            ) => mount == m && role_id == r && Some(*secret_id) == credential,
            (Caller::Token(token), Auth::Token(_)) => Some(*token) == credential,
            _ => false,
        }
    }
}

/// The audience openbao-csi-provider asks tokens for when the SPC names none.
pub const OPENBAO_AUDIENCE: &str = "openbao";

/// One object's request.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultObject {
    /// `/v1/...` path without the query.
    pub path: String,
    pub query: Vec<(String, String)>,
    pub method: reqwest::Method,
    pub body: Option<Json>,
    pub key: Option<String>,
}

impl VaultObject {
    pub fn from_spec(object: &ObjectSpec) -> Result<Self, ObjectError> {
        // vault-csi-provider ignores fields it does not know; so does coffer,
        // but for near misses of its own (typos).
        object.reject_typos(OBJECT_FIELDS)?;
        let raw = object.required_str("secretPath")?;
        let (path, query) = raw.split_once('?').unwrap_or((raw, ""));
        let path = path.trim_start_matches('/');
        let path = path.strip_prefix("v1/").unwrap_or(path);
        if path.is_empty() || path.split('/').any(|e| e == ".." || e == ".") {
            return Err(ObjectError::Invalid(format!(
                "secretPath {} must be a Vault API path such as secret/data/app",
                shown(raw)
            )));
        }
        let mut query: Vec<(String, String)> = url::form_urlencoded::parse(query.as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let method = match object
            .str_field("method")?
            .map(str::to_ascii_uppercase)
            .as_deref()
        {
            None | Some("") | Some("GET") => reqwest::Method::GET,
            Some("PUT") => reqwest::Method::PUT,
            Some("POST") => reqwest::Method::POST,
            // Vault's LIST verb, sent the way Vault's own clients do when a
            // proxy may not know it: GET with list=true.
            Some("LIST") => {
                if !query.iter().any(|(k, _)| k == "list") {
                    query.push(("list".into(), "true".into()));
                }
                reqwest::Method::GET
            }
            Some(other) => {
                return Err(ObjectError::Invalid(format!(
                    "method {} is not GET, LIST, PUT or POST",
                    shown(other)
                )))
            }
        };
        let body = match object.fields.get("secretArgs") {
            None | Some(serde_yaml_ng::Value::Null) => None,
            Some(serde_yaml_ng::Value::String(s)) => Some(
                serde_json::from_str::<Json>(s)
                    .ok()
                    .filter(Json::is_object)
                    .ok_or_else(|| {
                        ObjectError::Invalid("secretArgs must be a mapping or a JSON object".into())
                    })?,
            ),
            Some(v @ serde_yaml_ng::Value::Mapping(_)) => {
                Some(serde_json::to_value(v).map_err(|_| {
                    ObjectError::Invalid("secretArgs cannot be expressed as JSON".into())
                })?)
            }
            Some(_) => {
                return Err(ObjectError::Invalid(
                    "secretArgs must be a mapping or a JSON object".into(),
                ))
            }
        };
        if body.is_some() && method == reqwest::Method::GET {
            return Err(ObjectError::Invalid(
                "secretArgs needs method PUT or POST (GET sends no body)".into(),
            ));
        }
        Ok(Self {
            path: format!("/v1/{path}"),
            query,
            method,
            body,
            key: object
                .str_field("secretKey")?
                .filter(|k| !k.is_empty())
                .map(str::to_string),
        })
    }

    /// Adds what identifies the request (not the key extracted from its
    /// answer) to a key, so objects reading different keys of one secret
    /// share one request. Query pairs keep their order and repeats: Vault
    /// sees them that way.
    pub fn request_fields(&self, mut key: KeyBuilder) -> KeyBuilder {
        key = key
            .field(self.method.as_str())
            .field(&self.path)
            .field(self.query.len().to_be_bytes());
        for (k, v) in &self.query {
            key = key.field(k).field(v);
        }
        key.opt(self.body.as_ref().map(Json::to_string))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spc::parse_objects;
    use std::collections::BTreeMap;

    fn object(yaml: &str) -> Result<VaultObject, ObjectError> {
        let params = BTreeMap::from([("objects".to_string(), yaml.to_string())]);
        VaultObject::from_spec(&parse_objects(&params, "vault").unwrap()[0])
    }

    fn ctx(params: serde_json::Value, secrets: &str) -> MountContext {
        MountContext::parse(&params.to_string(), secrets, "420", "/t").unwrap()
    }

    #[test]
    fn secret_paths_are_normalised() {
        let o = object("- objectName: a\n  secretPath: secret/data/app?version=3").unwrap();
        assert_eq!(o.path, "/v1/secret/data/app");
        assert_eq!(o.query, vec![("version".to_string(), "3".to_string())]);
        assert_eq!(o.method, reqwest::Method::GET);
        assert_eq!(
            object("- objectName: a\n  secretPath: /v1/kv/x")
                .unwrap()
                .path,
            "/v1/kv/x"
        );
        assert_eq!(
            object("- objectName: a\n  secretPath: v1/kv/x")
                .unwrap()
                .path,
            "/v1/kv/x"
        );
        assert!(object("- objectName: a\n  secretPath: kv/../sys/x").is_err());
        assert!(object("- objectName: a")
            .unwrap_err()
            .to_string()
            .contains("secretPath is missing"));
    }

    #[test]
    fn methods_and_args() {
        let o = object(
            "- objectName: c\n  secretPath: pki/issue/web\n  method: put\n  secretArgs:\n    common_name: a.example\n    ttl: 1h",
        )
        .unwrap();
        assert_eq!(o.method, reqwest::Method::PUT);
        assert_eq!(o.body.unwrap()["common_name"], "a.example");
        let o =
            object("- objectName: c\n  secretPath: x\n  method: POST\n  secretArgs: '{\"a\": 1}'")
                .unwrap();
        assert_eq!(o.body.unwrap()["a"], 1);
        assert!(object("- objectName: c\n  secretPath: x\n  method: DELETE").is_err());
        assert!(
            object("- objectName: c\n  secretPath: x\n  secretArgs: {a: 1}").is_err(),
            "GET with a body"
        );
        assert!(
            object("- objectName: c\n  secretPath: x\n  method: PUT\n  secretArgs: [1]").is_err()
        );
    }

    #[test]
    fn openbao_provider_spellings_are_synonyms_and_never_both() {
        let defaults = VaultArgs::default();
        let tokens = serde_json::json!({"openbao": {"token": "jwt"}}).to_string();
        let c = ctx(
            serde_json::json!({
                "baoAddress": "https://bao.example:8200",
                "openbaoNamespace": "team",
                "baoRoleName": "kv-role",
                "baoAuthMountPath": "jwt",
                "baoSkipTLSVerify": "true",
                "csi.storage.k8s.io/serviceAccount.tokens": tokens,
            }),
            "null",
        );
        let p = VaultParams::from_context(&c, &defaults).unwrap();
        assert_eq!(p.address, "https://bao.example:8200");
        assert_eq!(p.namespace.as_deref(), Some("team"));
        assert!(p.tls.skip_verify);
        assert!(
            matches!(p.auth, Auth::Login { ref mount, ref role, ref audience } if mount == "jwt" && role == "kv-role" && audience == "openbao"),
            "{:?}",
            p.auth
        );
        for (a, b) in [
            ("vaultAddress", "baoAddress"),
            ("baoNamespace", "openbaoNamespace"),
            ("roleName", "baoRoleName"),
            ("vaultCACertPath", "baoCACertPath"),
        ] {
            let c = ctx(
                serde_json::json!({a: "x", b: "y", "vaultAddress": "https://v:1", "roleName": "r",
                    "csi.storage.k8s.io/serviceAccount.tokens": tokens}),
                "null",
            );
            let err = VaultParams::from_context(&c, &defaults)
                .unwrap_err()
                .to_string();
            assert!(err.contains("set only one of"), "{a}/{b}: {err}");
        }
        // All the spellings given are named, in the peers' order; an empty
        // one counts as not given.
        let c = ctx(
            serde_json::json!({"openbaoAddress": "https://o:1", "vaultAddress": "https://v:1",
                "baoAddress": "https://b:1", "vaultNamespace": " ", "baoNamespace": "team",
                "roleName": "r", "csi.storage.k8s.io/serviceAccount.tokens": tokens}),
            "null",
        );
        let err = VaultParams::from_context(&c, &defaults)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("set only one of vaultAddress and baoAddress and openbaoAddress: they are the same setting"),
            "{err}"
        );
        let c = ctx(
            serde_json::json!({"vaultAddress": "https://v:1", "vaultNamespace": " ",
                "baoNamespace": "team", "roleName": "r",
                "csi.storage.k8s.io/serviceAccount.tokens": tokens}),
            "null",
        );
        let p = VaultParams::from_context(&c, &defaults).unwrap();
        assert_eq!(p.namespace.as_deref(), Some("team"));
    }

    #[test]
    fn address_checks_are_kept_bounded_and_never_pass_a_bad_one() {
        for n in 0..(GOOD_ADDRESSES_KEPT * 2) {
            let good = format!("https://vault-{n}.example:8200");
            check_address(&good).unwrap();
            check_address(&good).unwrap();
            assert!(GOOD_ADDRESSES.lock().unwrap().len() <= GOOD_ADDRESSES_KEPT);
        }
        let long = format!("https://{}.example", "a".repeat(GOOD_ADDRESS_MAX_LEN));
        check_address(&long).unwrap();
        assert!(!GOOD_ADDRESSES.lock().unwrap().contains(&long));
        for bad in ["vault:8200", "ftp://vault", "https://", "not a url"] {
            for _ in 0..2 {
                let e = check_address(bad).unwrap_err().to_string();
                assert!(e.contains("vaultAddress"), "{bad}: {e}");
            }
        }
    }

    #[test]
    fn auth_selection_and_defaults() {
        let defaults = VaultArgs {
            address: Some("http://vault:8200".into()),
            ..VaultArgs::default()
        };
        let tokens = serde_json::json!({"vault": {"token": "jwt"}}).to_string();
        let c = ctx(
            serde_json::json!({"roleName": "app", "csi.storage.k8s.io/serviceAccount.tokens": tokens}),
            "null",
        );
        let p = VaultParams::from_context(&c, &defaults).unwrap();
        assert_eq!(p.address, "http://vault:8200");
        assert!(
            matches!(p.auth, Auth::Login { ref mount, ref role, ref audience } if mount == "kubernetes" && role == "app" && audience == "vault")
        );

        let c = ctx(
            serde_json::json!({"roleName": "app", "audience": "other"}),
            "null",
        );
        let err = VaultParams::from_context(&c, &defaults).unwrap_err();
        assert!(
            matches!(err, ObjectError::FailedPrecondition(ref m) if m.contains("\"other\"") && m.contains("tokenRequests")),
            "{err}"
        );

        let c = ctx(
            serde_json::json!({"vaultAuthMountPath": "ar"}),
            r#"{"role_id": "r", "secret_id": "s"}"#,
        );
        assert!(
            matches!(VaultParams::from_context(&c, &defaults).unwrap().auth, Auth::AppRole { ref mount, .. } if mount == "ar")
        );
        let c = ctx(serde_json::json!({}), r#"{"token": "hvs.x"}"#);
        assert!(matches!(
            VaultParams::from_context(&c, &defaults).unwrap().auth,
            Auth::Token(_)
        ));

        let c = ctx(
            serde_json::json!({"vaultKubernetesMountPath": "a", "vaultAuthMountPath": "b"}),
            "null",
        );
        assert!(VaultParams::from_context(&c, &defaults)
            .unwrap_err()
            .to_string()
            .contains("only one"));
        for bad in ["../sys", "a/../b", "x?y", "a//b", "%2e%2e"] {
            let c = ctx(
                serde_json::json!({"roleName": "r", "vaultAuthMountPath": bad,
                    "csi.storage.k8s.io/serviceAccount.tokens": tokens}),
                "null",
            );
            let err = VaultParams::from_context(&c, &defaults).unwrap_err();
            assert!(err.to_string().contains("auth mount path"), "{bad}: {err}");
        }
        let c = ctx(serde_json::json!({}), r#"{"token": "t"}"#);
        assert!(VaultParams::from_context(&c, &VaultArgs::default())
            .unwrap_err()
            .to_string()
            .contains("no Vault address"));
        let c = ctx(
            serde_json::json!({"vaultAddress": "vault:8200"}),
            r#"{"token": "t"}"#,
        );
        assert!(VaultParams::from_context(&c, &defaults).is_err());
        let c = ctx(
            serde_json::json!({"vaultSkipTLSVerify": "maybe"}),
            r#"{"token": "t"}"#,
        );
        assert!(VaultParams::from_context(&c, &defaults).is_err());
        let c = ctx(
            serde_json::json!({"vaultAddress": "https://other:8200/", "vaultNamespace": "team"}),
            r#"{"token": "t"}"#,
        );
        let p = VaultParams::from_context(&c, &defaults).unwrap();
        assert_eq!(
            (p.address.as_str(), p.namespace.as_deref()),
            ("https://other:8200", Some("team"))
        );
    }
}
