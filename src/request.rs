//! The driver-request model: turns the stringly-typed `MountRequest` into typed
//! values. Every error names the field that was wrong and never echoes a value,
//! because attributes carry service-account tokens.

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::bounded_map::{BoundedMap, Bounds};
use crate::key::Key;
use crate::secret::Credential;

use crate::error::{shown, ObjectError};

/// Attribute keys the driver fills in from the pod (with `podInfoOnMount`).
pub mod keys {
    pub const SPC_NAME: &str = "secretProviderClass";
    pub const POD_NAME: &str = "csi.storage.k8s.io/pod.name";
    pub const POD_NAMESPACE: &str = "csi.storage.k8s.io/pod.namespace";
    pub const POD_UID: &str = "csi.storage.k8s.io/pod.uid";
    pub const SERVICE_ACCOUNT: &str = "csi.storage.k8s.io/serviceAccount.name";
    pub const EPHEMERAL: &str = "csi.storage.k8s.io/ephemeral";
    pub const TOKENS: &str = "csi.storage.k8s.io/serviceAccount.tokens";
}

/// Default file mode when the request carries no `permission` (0644).
pub const DEFAULT_MODE: u32 = 0o644;

/// Who is asking: the pod the volume belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInfo {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub service_account: String,
}

impl PodInfo {
    /// `system:serviceaccount:<ns>:<name>`, the identity Kubernetes-bound
    /// backend roles authorize; `None` without pod info.
    pub fn service_account_id(&self) -> Option<String> {
        if self.namespace.is_empty() || self.service_account.is_empty() {
            return None;
        }
        Some(format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        ))
    }
}

/// A projected service-account token the driver obtained for one audience.
#[derive(Debug, Clone)]
pub struct ServiceAccountToken {
    pub token: Credential,
    /// RFC 3339, as the driver passes it; informational.
    pub expiration: String,
}

/// What a request's attributes say, tokens aside: the same for every Mount
/// of a volume (a rotation poll sends the same text again), so it is parsed
/// once per distinct text and shared.
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    pub pod: PodInfo,
    pub spc_name: String,
    /// SPC parameters with the pod's volume attributes over them, minus tokens.
    pub parameters: BTreeMap<String, String>,
    /// The parsed-SPC memo's key for these parameters and its input size,
    /// worked out by the Mount pipeline on first use.
    plan_key: std::sync::OnceLock<(Key, usize)>,
    /// Values a backend works out from these attributes alone (its
    /// connection settings): kept as long as the attributes are, so a
    /// rotation poll does not work them out again.
    kept: Memo,
}

impl Attributes {
    /// The plan key, made by `make` the first time it is asked for.
    pub fn plan_key(
        &self,
        make: impl FnOnce(&BTreeMap<String, String>) -> (Key, usize),
    ) -> (Key, usize) {
        *self.plan_key.get_or_init(|| make(&self.parameters))
    }

    /// Scratch space that lives as long as these attributes: one entry per
    /// backend, each derived from the attributes alone (never from tokens
    /// or nodePublishSecretRef, which change under the same attributes).
    pub fn kept(&self) -> &Memo {
        &self.kept
    }
}

/// Everything a Mount needs to know about its caller, parsed and typed. The
/// attributes' fields (`pod`, `spc_name`, `parameters`) are read through it.
#[derive(Debug, Clone)]
pub struct MountContext {
    attributes: Arc<Attributes>,
    /// audience → token.
    pub tokens: BTreeMap<String, ServiceAccountToken>,
    /// nodePublishSecretRef data; `None` when the volume has no such ref.
    pub node_publish_secrets: Option<BTreeMap<String, Credential>>,
    pub target_path: String,
    /// Mode for objects that do not set their own.
    pub default_mode: u32,
    /// Scratch space that lives exactly as long as this Mount, so a backend
    /// can make identical requests of one Mount only once.
    pub memo: Memo,
    /// When the request was known to be in (its connection's last read, or
    /// else when it was taken up): a check of node state that began after
    /// this saw every change made before the driver asked.
    pub received: std::time::Instant,
}

/// Per-Mount shared values, keyed by a backend-built [`Key`]. At most one
/// entry per object plus one per backend, and objects per Mount are capped.
///
/// Made on first use: most Mounts (local files, warm caches) never use
/// theirs. Clones share the values once the memo is in use; a clone made
/// before that starts empty.
#[derive(Default)]
pub struct Memo(std::sync::OnceLock<Arc<MemoMap>>);

type MemoMap = Mutex<HashMap<Key, Arc<dyn Any + Send + Sync>>>;

impl Clone for Memo {
    fn clone(&self) -> Self {
        let memo = Memo::default();
        if let Some(map) = self.0.get() {
            let _ = memo.0.set(Arc::clone(map));
        }
        memo
    }
}

impl Memo {
    /// The value stored under `key`, created with `Default` on first use.
    /// A key reused with another type gets a fresh value.
    pub fn get_or_default<T: Default + Send + Sync + 'static>(&self, key: &Key) -> Arc<T> {
        let Ok(mut map) = self.0.get_or_init(Arc::default).lock() else {
            return Arc::new(T::default());
        };
        if let Some(existing) = map
            .get(key)
            .and_then(|v| Arc::clone(v).downcast::<T>().ok())
        {
            return existing;
        }
        let fresh = Arc::new(T::default());
        map.insert(*key, fresh.clone());
        fresh
    }
}

impl Memo {
    /// `make()` run once per Mount under `key` and its result shared:
    /// settings every object asks for, in every phase of the Mount.
    pub fn once<T: Clone + Send + Sync + 'static>(&self, key: &Key, make: impl FnOnce() -> T) -> T {
        let slot: Arc<std::sync::OnceLock<T>> = self.get_or_default(key);
        slot.get_or_init(make).clone()
    }
}

impl Memo {
    /// `make()` run once per Mount under `key`: its answer, or its final
    /// refusal, is shared by every object that asks (one call for a batch
    /// or for a secret's several files); a retryable failure is not kept,
    /// so a retry calls again.
    pub async fn once_async<T, F, Fut>(&self, key: &Key, make: F) -> Result<T, ObjectError>
    where
        T: Clone + Send + Sync + 'static,
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<T, ObjectError>>,
    {
        type Slot<T> = tokio::sync::OnceCell<Arc<Result<T, ObjectError>>>;
        let slot: Arc<Slot<T>> = self.get_or_default(key);
        let kept = slot
            .get_or_try_init(|| async {
                match make().await {
                    Err(e) if e.is_retryable() => Err(e),
                    other => Ok(Arc::new(other)),
                }
            })
            .await?;
        (**kept).clone()
    }
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("{field} is not valid JSON (line {line}, column {column})")]
    Json {
        field: &'static str,
        line: usize,
        column: usize,
    },
    #[error("{field} must be a JSON object of strings, got {got}")]
    NotObject {
        field: &'static str,
        got: &'static str,
    },
    #[error("{field}: the value of key {} must be a string, got {got}", shown(.key))]
    NotString {
        field: &'static str,
        key: String,
        got: &'static str,
    },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl MountContext {
    /// Parses the four string fields of a `MountRequest`.
    pub fn parse(
        attributes: &str,
        secrets: &str,
        permission: &str,
        target_path: &str,
    ) -> Result<Self, RequestError> {
        Self::parse_with(None, attributes, secrets, permission, target_path)
    }

    /// [`MountContext::parse`], taking the attributes from `kept` when the
    /// same text was parsed before (and keeping them there when not).
    pub fn parse_with(
        kept: Option<&AttributesMemo>,
        attributes: &str,
        secrets: &str,
        permission: &str,
        target_path: &str,
    ) -> Result<Self, RequestError> {
        let received = std::time::Instant::now();
        let kept = kept.filter(|_| attributes.len() <= MAX_KEPT_ATTRIBUTES);
        let (attributes, tokens) = match kept.and_then(|memo| memo.get(attributes)) {
            // Only texts without tokens are kept.
            Some(found) => (found, BTreeMap::new()),
            None => {
                let mut parameters =
                    parse_string_map("attributes", attributes)?.unwrap_or_default();
                let tokens = parameters.remove(keys::TOKENS);
                let get = |k: &str| parameters.get(k).cloned().unwrap_or_default();
                let parsed = Arc::new(Attributes {
                    pod: PodInfo {
                        namespace: get(keys::POD_NAMESPACE),
                        name: get(keys::POD_NAME),
                        uid: get(keys::POD_UID),
                        service_account: get(keys::SERVICE_ACCOUNT),
                    },
                    spc_name: get(keys::SPC_NAME),
                    parameters,
                    plan_key: std::sync::OnceLock::new(),
                    kept: Memo::default(),
                });
                // A text that carries tokens changes with them and holds
                // credentials: never kept.
                if let (None, Some(memo)) = (&tokens, kept) {
                    memo.insert(attributes, Arc::clone(&parsed));
                }
                let tokens = match tokens {
                    Some(raw) => parse_tokens(Credential::new(raw))?,
                    None => BTreeMap::new(),
                };
                (parsed, tokens)
            }
        };
        let node_publish_secrets = parse_string_map("secrets", secrets)?.map(|m| {
            m.into_iter()
                .map(|(k, v)| (k, Credential::new(v)))
                .collect()
        });
        Ok(MountContext {
            attributes,
            tokens,
            node_publish_secrets,
            target_path: target_path.to_string(),
            default_mode: parse_permission(permission)?,
            memo: Memo::default(),
            received,
        })
    }

    /// The attributes to change, for tests and tools that build a request
    /// by hand (a copy when they are shared).
    pub fn attributes_mut(&mut self) -> &mut Attributes {
        let attributes = Arc::make_mut(&mut self.attributes);
        attributes.plan_key = std::sync::OnceLock::new();
        attributes.kept = Memo::default();
        attributes
    }

    /// The token the driver obtained for `audience`, if the CSIDriver asks for it.
    pub fn token_for(&self, audience: &str) -> Option<&ServiceAccountToken> {
        self.tokens.get(audience)
    }
}

impl std::ops::Deref for MountContext {
    type Target = Attributes;
    fn deref(&self) -> &Attributes {
        &self.attributes
    }
}

/// Attributes texts longer than this are parsed every time (the driver's
/// are well under 4 KiB; the request cap is far above).
const MAX_KEPT_ATTRIBUTES: usize = 16 * 1024;
/// A parsed text weighs about three times its bytes (keys, values, nodes),
/// what backends keep with it (settings cut from it) once more, and the
/// text itself, kept to be compared, once more.
const KEPT_WEIGHT_PER_BYTE: u64 = 5;
const KEPT_OVERHEAD: u64 = 1024;
/// One entry per volume polled on this node; the memory is the node's,
/// whoever sends the texts.
const KEPT_ATTRIBUTES: Bounds = Bounds {
    max_entries: 2048,
    max_weight: 4 << 20,
    idle: std::time::Duration::from_secs(600),
};

/// Attributes already parsed, by their exact text, so that a rotation poll
/// does not parse its volume's attributes again. Texts that carry
/// service-account tokens are never kept.
///
/// Found by a seeded fast hash of the text and then compared with the kept
/// text byte for byte: every Mount looks its text up, and a SHA-256 key
/// over a few hundred bytes cost more than the rest of the lookup.
pub struct AttributesMemo {
    kept: BoundedMap<Arc<KeptText>>,
    seed: foldhash::fast::RandomState,
}

struct KeptText {
    text: Box<str>,
    attributes: Arc<Attributes>,
}

/// [`Key::hint`]'s domain for attributes texts.
const ATTRIBUTES_HINT: u8 = 1;

impl Default for AttributesMemo {
    fn default() -> Self {
        Self {
            kept: BoundedMap::new(KEPT_ATTRIBUTES),
            seed: foldhash::fast::RandomState::default(),
        }
    }
}

impl AttributesMemo {
    fn key(&self, text: &str) -> Key {
        use std::hash::BuildHasher;
        Key::hint(ATTRIBUTES_HINT, self.seed.hash_one(text), text.len())
    }

    /// The attributes parsed from exactly `text`, if kept.
    fn get(&self, text: &str) -> Option<Arc<Attributes>> {
        self.kept
            .get(&self.key(text))
            .filter(|kept| *kept.text == *text)
            .map(|kept| Arc::clone(&kept.attributes))
    }

    /// Keeps `attributes` as parsed from `text` (in place of any text that
    /// shares its hint).
    fn insert(&self, text: &str, attributes: Arc<Attributes>) {
        let weight = KEPT_WEIGHT_PER_BYTE * text.len() as u64 + KEPT_OVERHEAD;
        let kept = Arc::new(KeptText {
            text: text.into(),
            attributes,
        });
        self.kept.insert_weighed(self.key(text), kept, weight);
    }

    /// Texts kept now.
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_json(field: &'static str, raw: &str) -> Result<Value, RequestError> {
    serde_json::from_str(raw).map_err(|e| json_error(field, &e))
}

/// A syntax error, by position only: the text may hold secrets.
fn json_error(field: &'static str, e: &serde_json::Error) -> RequestError {
    RequestError::Json {
        field,
        line: e.line(),
        column: e.column(),
    }
}

/// Parses a JSON object of strings; `null` or an empty string mean "absent".
/// Read straight into the map, without an intermediate document: the
/// attributes arrive with every Mount.
fn parse_string_map(
    field: &'static str,
    raw: &str,
) -> Result<Option<BTreeMap<String, String>>, RequestError> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    let mut de = serde_json::Deserializer::from_str(raw);
    let shape = serde::de::DeserializeSeed::deserialize(Read { top: true }, &mut de)
        .and_then(|shape| de.end().map(|()| shape))
        .map_err(|e| json_error(field, &e))?;
    match shape {
        Shape::Null => Ok(None),
        Shape::Map(map) => Ok(Some(map)),
        Shape::NotString { key, got } => Err(RequestError::NotString { field, key, got }),
        Shape::Str(_) => Err(RequestError::NotObject {
            field,
            got: "a string",
        }),
        Shape::Other(got) => Err(RequestError::NotObject { field, got }),
    }
}

/// What one JSON value turned out to be.
enum Shape {
    Null,
    Str(String),
    Map(BTreeMap<String, String>),
    NotString { key: String, got: &'static str },
    Other(&'static str),
}

/// Reads a value as [`parse_string_map`] needs it: the top-level object
/// into a map of strings; anything else only named, and skipped without
/// recursion (so nesting costs no stack).
#[derive(Clone, Copy)]
struct Read {
    top: bool,
}

impl<'de> serde::de::DeserializeSeed<'de> for Read {
    type Value = Shape;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Shape, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Read {
    type Value = Shape;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object of strings")
    }
    fn visit_unit<E>(self) -> Result<Shape, E> {
        Ok(Shape::Null)
    }
    fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
        Ok(Shape::Other("a boolean"))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
        Ok(Shape::Other("a number"))
    }
    fn visit_str<E>(self, v: &str) -> Result<Shape, E> {
        Ok(Shape::Str(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Shape, E> {
        Ok(Shape::Str(v))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Shape, A::Error> {
        while s.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Shape::Other("an array"))
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<Shape, A::Error> {
        use serde::de::IgnoredAny;
        if !self.top {
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Shape::Other("an object"));
        }
        let mut out = BTreeMap::new();
        while let Some(key) = m.next_key::<String>()? {
            let got = match m.next_value_seed(Read { top: false })? {
                Shape::Str(v) => {
                    out.insert(key, v);
                    continue;
                }
                Shape::Null => "null",
                Shape::Other(kind) => kind,
                Shape::Map(_) | Shape::NotString { .. } => "an object",
            };
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Shape::NotString { key, got });
        }
        Ok(Shape::Map(out))
    }
}

/// Parses `{"<audience>": {"token": "...", "expirationTimestamp": "..."}}`.
fn parse_tokens(raw: Credential) -> Result<BTreeMap<String, ServiceAccountToken>, RequestError> {
    const FIELD: &str = "attributes[csi.storage.k8s.io/serviceAccount.tokens]";
    let invalid = |reason: String| RequestError::Invalid {
        field: FIELD,
        reason,
    };
    if raw.expose().trim().is_empty() {
        return Ok(BTreeMap::new());
    }
    let value = parse_json(FIELD, raw.expose())?;
    let Value::Object(map) = value else {
        return Err(invalid(format!(
            "must be a JSON object of audience to token, got {}",
            json_kind(&value)
        )));
    };
    let mut out = BTreeMap::new();
    for (audience, entry) in map {
        let Value::Object(mut entry) = entry else {
            return Err(invalid(format!(
                "entry for audience {} must be an object",
                shown(&audience)
            )));
        };
        let token = match entry.remove("token") {
            Some(Value::String(t)) if !t.is_empty() => Credential::new(t),
            _ => {
                return Err(invalid(format!(
                    "entry for audience {} has no string \"token\"",
                    shown(&audience)
                )))
            }
        };
        let expiration = match entry.remove("expirationTimestamp") {
            Some(Value::String(s)) => s,
            _ => String::new(),
        };
        out.insert(audience, ServiceAccountToken { token, expiration });
    }
    Ok(out)
}

/// Parses the driver's `permission`: JSON of a Go `os.FileMode`, i.e. a
/// decimal number such as `420` (0644), possibly quoted.
pub fn parse_permission(raw: &str) -> Result<u32, RequestError> {
    let raw = raw.trim();
    if raw.is_empty() || raw == "null" {
        return Ok(DEFAULT_MODE);
    }
    let digits = raw
        .strip_prefix('"')
        .and_then(|r| r.strip_suffix('"'))
        .unwrap_or(raw);
    let invalid = |reason: String| RequestError::Invalid {
        field: "permission",
        reason,
    };
    let mode: u32 = digits.parse().map_err(|_| {
        invalid(format!(
            "{} is not a decimal file mode such as \"420\"",
            shown(raw)
        ))
    })?;
    if mode > 0o777 {
        return Err(invalid(format!(
            "{mode} (0{mode:o}) has bits beyond 0777; only permission bits are allowed"
        )));
    }
    Ok(mode)
}

/// Tokens larger than this are not decoded (projected tokens are ~1 KB).
const MAX_DECODED_TOKEN: usize = 16 * 1024;
/// Clock skew allowed when judging a token's expiry.
const EXPIRY_SKEW_SECS: i64 = 30;

/// Defence in depth before any backend sees a token: each service-account
/// token the driver passed must be the pod's own. Its claims are decoded,
/// not verified (the backend verifies the signature); a token whose
/// `kubernetes.io` claims or `sub` name another namespace, service account
/// or pod, or that has expired, refuses the Mount, so a forged or confused
/// request fails instead of reading through another identity's cache entry.
/// Tokens that are not JWTs carry no claims to compare and are left to the
/// backend.
pub fn check_token_identities(ctx: &MountContext) -> Result<(), String> {
    use base64::Engine as _;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for (audience, token) in &ctx.tokens {
        let raw = token.token.expose();
        if raw.len() > MAX_DECODED_TOKEN {
            continue;
        }
        let mut parts = raw.split('.');
        let (Some(_), Some(payload), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let Ok(bytes) =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload.trim_end_matches('='))
        else {
            continue;
        };
        let Ok(claims) = serde_json::from_slice::<Value>(&bytes) else {
            continue;
        };
        let refuse = |why: String| {
            Err(format!(
                "the service-account token for audience {} {why}; refusing the Mount",
                shown(audience)
            ))
        };
        if let Some(exp) = claims.get("exp").and_then(Value::as_i64) {
            if exp + EXPIRY_SKEW_SECS < now {
                return refuse("has expired".into());
            }
        }
        let k8s = claims.get("kubernetes.io");
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        let mut namespace = text(k8s.and_then(|k| k.get("namespace")));
        let mut account = text(
            k8s.and_then(|k| k.get("serviceaccount"))
                .and_then(|s| s.get("name")),
        );
        if let Some(sub) = claims.get("sub").and_then(Value::as_str) {
            if let Some(rest) = sub.strip_prefix("system:serviceaccount:") {
                if let Some((ns, sa)) = rest.split_once(':') {
                    namespace.get_or_insert_with(|| ns.to_string());
                    account.get_or_insert_with(|| sa.to_string());
                    if ns != namespace.as_deref().unwrap_or(ns)
                        || sa != account.as_deref().unwrap_or(sa)
                    {
                        return refuse("has a subject that disagrees with its own claims".into());
                    }
                }
            }
        }
        let pod_uid = text(k8s.and_then(|k| k.get("pod")).and_then(|p| p.get("uid")));
        let pod = &ctx.pod;
        if let Some(ns) = namespace.filter(|ns| !pod.namespace.is_empty() && *ns != pod.namespace) {
            return refuse(format!(
                "belongs to namespace {}, not the pod's {}",
                shown(&ns),
                shown(&pod.namespace)
            ));
        }
        if let Some(sa) =
            account.filter(|sa| !pod.service_account.is_empty() && *sa != pod.service_account)
        {
            return refuse(format!(
                "belongs to service account {}, not the pod's {}",
                shown(&sa),
                shown(&pod.service_account)
            ));
        }
        if let Some(uid) = pod_uid.filter(|u| !pod.uid.is_empty() && *u != pod.uid) {
            return refuse(format!(
                "was issued for pod uid {}, not this pod's {}",
                shown(&uid),
                shown(&pod.uid)
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_identities_must_match_the_pod() {
        use base64::Engine as _;
        let jwt = |claims: serde_json::Value| {
            let e = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            format!("{}.{}.sig", e.encode(b"{}"), e.encode(claims.to_string()))
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let ctx_with = |token: &str| {
            let tokens = serde_json::json!({"vault": {"token": token, "expirationTimestamp": ""}});
            let attrs = serde_json::json!({
                "csi.storage.k8s.io/pod.namespace": "shop",
                "csi.storage.k8s.io/pod.name": "web-0",
                "csi.storage.k8s.io/pod.uid": "uid-1",
                "csi.storage.k8s.io/serviceAccount.name": "web",
                "csi.storage.k8s.io/serviceAccount.tokens": tokens.to_string(),
            });
            super::MountContext::parse(&attrs.to_string(), "null", "420", "/t").unwrap()
        };
        let claims = |ns: &str, sa: &str, uid: &str, exp: i64| {
            serde_json::json!({
                "sub": format!("system:serviceaccount:{ns}:{sa}"),
                "exp": now + exp,
                "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa}, "pod": {"uid": uid}},
            })
        };
        assert!(super::check_token_identities(&ctx_with(&jwt(claims(
            "shop", "web", "uid-1", 600
        ))))
        .is_ok());
        assert!(super::check_token_identities(&ctx_with("opaque-token")).is_ok());
        for (c, want) in [
            (claims("other", "web", "uid-1", 600), "namespace"),
            (claims("shop", "admin", "uid-1", 600), "service account"),
            (claims("shop", "web", "uid-2", 600), "pod uid"),
            (claims("shop", "web", "uid-1", -600), "expired"),
            (
                serde_json::json!({"sub": "system:serviceaccount:shop:admin"}),
                "service account",
            ),
        ] {
            let e = super::check_token_identities(&ctx_with(&jwt(c))).unwrap_err();
            assert!(e.contains(want) && e.contains("\"vault\""), "{e}");
        }
    }

    use super::*;

    const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.c2VjcmV0LXRva2Vu.sig";

    #[test]
    fn string_maps_name_what_is_wrong() {
        let ok = parse_string_map("attributes", r#"{"b":"2","a":"1","a":"3","e":"\u00e9"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            ok.into_iter().collect::<Vec<_>>(),
            [
                ("a".into(), "3".into()),
                ("b".into(), "2".into()),
                ("e".into(), "é".into())
            ]
        );
        assert_eq!(parse_string_map("attributes", "null").unwrap(), None);
        assert_eq!(parse_string_map("attributes", "  ").unwrap(), None);
        for (raw, want) in [
            (
                "[1, {}]",
                "attributes must be a JSON object of strings, got an array",
            ),
            ("true", "got a boolean"),
            ("-1.5", "got a number"),
            (r#""x""#, "got a string"),
            (
                r#"{"a":"1","k":{"n":[1]},"z":"2"}"#,
                "the value of key \"k\" must be a string, got an object",
            ),
            (r#"{"k":[1,2]}"#, "got an array"),
            (r#"{"k":null}"#, "got null"),
            (r#"{"k":7}"#, "got a number"),
        ] {
            let err = parse_string_map("attributes", raw).unwrap_err().to_string();
            assert!(err.contains(want), "{raw}: {err}");
        }
        for raw in [
            r#"{"a":"1""#,
            r#"{"a":"1"} x"#,
            r#"{"a":[1,}"#,
            "{\"a\":\"1\",}",
        ] {
            let err = parse_string_map("attributes", raw).unwrap_err();
            assert!(matches!(err, RequestError::Json { .. }), "{raw}: {err}");
        }
        // Skipped values are walked without recursion: deep nesting is one
        // clear error, not a stack overflow.
        let deep = format!("{{\"k\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            parse_string_map("attributes", &deep),
            Err(RequestError::NotString {
                got: "an array",
                ..
            })
        ));
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_string_map("attributes", &deep).is_err());
    }

    fn attrs_with_tokens() -> String {
        let tokens = serde_json::json!({
            "vault": {"token": TOKEN, "expirationTimestamp": "2026-11-27T00:00:00Z"}
        })
        .to_string();
        serde_json::json!({
            "secretProviderClass": "app-secrets",
            "csi.storage.k8s.io/pod.name": "web-0",
            "csi.storage.k8s.io/pod.namespace": "shop",
            "csi.storage.k8s.io/pod.uid": "1234-uid",
            "csi.storage.k8s.io/serviceAccount.name": "web",
            "csi.storage.k8s.io/ephemeral": "false",
            "csi.storage.k8s.io/serviceAccount.tokens": tokens,
            "objects": "- objectName: a\n",
        })
        .to_string()
    }

    #[test]
    fn parses_a_full_request() {
        let ctx =
            MountContext::parse(&attrs_with_tokens(), "null", "420", "/var/lib/kubelet/x").unwrap();
        assert_eq!(
            ctx.pod,
            PodInfo {
                namespace: "shop".into(),
                name: "web-0".into(),
                uid: "1234-uid".into(),
                service_account: "web".into()
            }
        );
        assert_eq!(ctx.spc_name, "app-secrets");
        assert_eq!(ctx.default_mode, 0o644);
        assert!(ctx.node_publish_secrets.is_none());
        assert_eq!(ctx.token_for("vault").unwrap().token.expose(), TOKEN);
        assert!(ctx.token_for("gcp").is_none());
        // The token attribute is consumed, never kept among plain parameters.
        assert!(!ctx.parameters.contains_key(keys::TOKENS));
        assert!(!format!("{ctx:?}").contains("c2VjcmV0LXRva2Vu"));
    }

    /// A poll's attributes are parsed once and shared; a text with tokens,
    /// an oversized text or a failed parse is never kept, and texts that
    /// differ in one byte are never confused.
    #[test]
    fn attributes_are_kept_per_exact_text_without_tokens() {
        let memo = AttributesMemo::default();
        let parse = |attrs: &str, secrets: &str| {
            MountContext::parse_with(Some(&memo), attrs, secrets, "420", "/t")
        };
        let plain = serde_json::json!({
            keys::POD_NAMESPACE: "shop",
            keys::POD_NAME: "web-0",
            keys::SPC_NAME: "app",
            "objects": "- objectName: a\n",
        })
        .to_string();
        let first = parse(&plain, "null").unwrap();
        let again = parse(&plain, r#"{"token":"s3cr3t"}"#).unwrap();
        assert_eq!(memo.len(), 1);
        assert!(Arc::ptr_eq(&first.attributes, &again.attributes));
        assert_eq!(again.pod.name, "web-0");
        // Node-publish secrets are the request's own, never shared.
        assert!(first.node_publish_secrets.is_none());
        assert_eq!(
            again.node_publish_secrets.unwrap()["token"].expose(),
            "s3cr3t"
        );
        // The plan key is worked out once per text.
        let made = std::sync::atomic::AtomicUsize::new(0);
        let key = |ctx: &MountContext| {
            ctx.plan_key(|_| {
                made.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (Key::of("t", &["x"]), 1)
            })
        };
        assert_eq!(key(&first), key(&parse(&plain, "").unwrap()));
        assert_eq!(made.load(std::sync::atomic::Ordering::Relaxed), 1);

        let other = plain.replace("web-0", "web-1");
        assert_eq!(parse(&other, "").unwrap().pod.name, "web-1");
        assert_eq!(memo.len(), 2);

        // Tokens: parsed every time, the text never kept.
        for _ in 0..2 {
            let ctx = parse(&attrs_with_tokens(), "").unwrap();
            assert_eq!(ctx.token_for("vault").unwrap().token.expose(), TOKEN);
        }
        assert_eq!(memo.len(), 2);
        // Nor are texts that fail or that are past the size kept.
        assert!(parse(r#"{"a": 1}"#, "").is_err());
        let big = serde_json::json!({ "x": "y".repeat(MAX_KEPT_ATTRIBUTES) }).to_string();
        assert_eq!(
            parse(&big, "").unwrap().parameters["x"].len(),
            MAX_KEPT_ATTRIBUTES
        );
        assert_eq!(memo.len(), 2);

        // A changed copy leaves the kept text as it was.
        let mut changed = parse(&plain, "").unwrap();
        changed.attributes_mut().pod.name = "edited".into();
        assert_eq!(parse(&plain, "").unwrap().pod.name, "web-0");
    }

    /// Texts that meet under one hint (as a collision of the fast hash
    /// would make them) are told apart by their bytes: a miss, never
    /// another volume's attributes.
    #[test]
    fn a_shared_hint_is_a_miss_not_another_texts_attributes() {
        let memo = AttributesMemo::default();
        let parse = |attrs: &str| MountContext::parse_with(Some(&memo), attrs, "", "420", "/t");
        let theirs = serde_json::json!({ keys::POD_NAME: "theirs" }).to_string();
        let ours = serde_json::json!({ keys::POD_NAME: "ours!!" }).to_string();
        assert_eq!(theirs.len(), ours.len());
        parse(&theirs).unwrap();
        let kept = memo.kept.get(&memo.key(&theirs)).unwrap();
        // Their entry, filed under our text's hint.
        memo.kept.insert_weighed(memo.key(&ours), kept, 1);
        assert_eq!(parse(&ours).unwrap().pod.name, "ours!!");
        assert_eq!(parse(&theirs).unwrap().pod.name, "theirs");
    }

    /// A flood of distinct texts (one pod after another, or one SPC made
    /// large) stays within the memo's entries and bytes; the newest are kept.
    #[test]
    fn a_flood_of_distinct_attributes_stays_within_bounds() {
        let memo = AttributesMemo::default();
        let big = "v".repeat(MAX_KEPT_ATTRIBUTES - 64);
        for i in 0..KEPT_ATTRIBUTES.max_entries + 500 {
            let attrs = serde_json::json!({ keys::POD_UID: i.to_string() }).to_string();
            MountContext::parse_with(Some(&memo), &attrs, "", "420", "/t").unwrap();
            assert!(memo.len() <= KEPT_ATTRIBUTES.max_entries);
        }
        assert_eq!(memo.len(), KEPT_ATTRIBUTES.max_entries);
        for i in 0..400 {
            let attrs = serde_json::json!({ keys::POD_UID: i.to_string(), "x": big }).to_string();
            MountContext::parse_with(Some(&memo), &attrs, "", "420", "/t").unwrap();
            assert!(memo.kept.weight() <= KEPT_ATTRIBUTES.max_weight);
        }
        let last = serde_json::json!({ keys::POD_UID: "399", "x": big }).to_string();
        assert!(memo.get(&last).is_some(), "the newest text is kept");
    }

    #[test]
    fn secrets_null_empty_or_object() {
        for raw in ["null", "", " null "] {
            let ctx = MountContext::parse("{}", raw, "420", "/t").unwrap();
            assert!(ctx.node_publish_secrets.is_none(), "{raw:?}");
        }
        let ctx = MountContext::parse("{}", r#"{"token":"s3cr3t"}"#, "420", "/t").unwrap();
        let secrets = ctx.node_publish_secrets.unwrap();
        assert_eq!(secrets["token"].expose(), "s3cr3t");
    }

    #[test]
    fn missing_pod_keys_are_empty_not_errors() {
        let ctx = MountContext::parse("{}", "null", "420", "/t").unwrap();
        assert_eq!(ctx.pod, PodInfo::default());
        assert!(ctx.tokens.is_empty());
    }

    #[test]
    fn malformed_json_names_the_field_without_values() {
        let err = MountContext::parse("{\"a\": ", "null", "420", "/t").unwrap_err();
        assert!(
            matches!(
                err,
                RequestError::Json {
                    field: "attributes",
                    ..
                }
            ),
            "{err}"
        );
        let err = MountContext::parse("[1]", "null", "420", "/t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "attributes must be a JSON object of strings, got an array"
        );
        let err = MountContext::parse(r#"{"x": 5}"#, "null", "420", "/t").unwrap_err();
        assert_eq!(
            err.to_string(),
            "attributes: the value of key \"x\" must be a string, got a number"
        );
        let err = MountContext::parse("{}", r#"{"k": {"v": "hush"}}"#, "420", "/t").unwrap_err();
        assert!(err.to_string().starts_with("secrets:"), "{err}");
        assert!(!err.to_string().contains("hush"));
        let err = MountContext::parse("{}", "\"str\"", "420", "/t").unwrap_err();
        assert!(err.to_string().contains("got a string"));
    }

    #[test]
    fn malformed_tokens_never_echo_the_token() {
        let attrs = serde_json::json!({ keys::TOKENS: format!("{{\"vault\": \"{TOKEN}\"}}") });
        let err = MountContext::parse(&attrs.to_string(), "null", "420", "/t").unwrap_err();
        assert!(err.to_string().contains("audience \"vault\""), "{err}");
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
        let attrs =
            serde_json::json!({ keys::TOKENS: format!("{{\"vault\": {{\"token\": \"{TOKEN}") });
        let err = MountContext::parse(&attrs.to_string(), "null", "420", "/t").unwrap_err();
        assert!(!err.to_string().contains("c2VjcmV0"), "{err}");
    }

    #[test]
    fn permission_strings() {
        assert_eq!(parse_permission("420").unwrap(), 0o644);
        assert_eq!(parse_permission("\"420\"").unwrap(), 0o644);
        assert_eq!(parse_permission("256").unwrap(), 0o400);
        assert_eq!(parse_permission("0").unwrap(), 0);
        assert_eq!(parse_permission("").unwrap(), DEFAULT_MODE);
        assert_eq!(parse_permission("null").unwrap(), DEFAULT_MODE);
        assert!(parse_permission("0644x").is_err());
        assert!(parse_permission("-1").is_err());
        assert!(parse_permission("rw-r--r--").is_err());
        let err = parse_permission("2147484096").unwrap_err();
        assert!(err.to_string().contains("beyond 0777"), "{err}");
    }
}
