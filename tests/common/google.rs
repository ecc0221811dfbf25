//! Loopback stand-ins for Google's Secret Manager, Parameter Manager, STS
//! and IAM Credentials REST APIs (no installable emulator exists). They follow the documented
//! wire format — paths, JSON shapes, `{"error": {code, message, status}}` —
//! and check what the real services check: the bearer token on every call,
//! the exchanged subject token and audience, who may impersonate whom and
//! who may read which secret.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine as _;
use serde_json::{json, Value};

/// A Parameter Manager parameter.
#[derive(Default, Clone)]
pub struct Parameter {
    /// YAML, JSON or UNFORMATTED; only the first two render references.
    pub format: &'static str,
    /// version id → payload.
    pub versions: BTreeMap<String, Vec<u8>>,
    /// The parameter's own identity: rendering reads referenced secrets as
    /// this principal (Google's model), not as the caller.
    pub principal: String,
    /// Who may render it (roles/parametermanager.parameterAccessor).
    pub accessors: BTreeSet<String>,
}

#[derive(Default)]
pub struct World {
    /// "projects/p/locations/l/parameters/n" → parameter.
    pub parameters: BTreeMap<String, Parameter>,
    /// "projects/p/secrets/s" (or with locations) → versions' payloads.
    pub secrets: BTreeMap<String, Vec<Vec<u8>>>,
    /// secret name → principals allowed to access it.
    pub readers: BTreeMap<String, BTreeSet<String>>,
    /// principal → service accounts it may impersonate.
    pub impersonators: BTreeMap<String, BTreeSet<String>>,
    /// secret name → (http status, rpc status) to fail with, `times` times.
    pub failures: BTreeMap<String, (u16, &'static str, usize)>,
    /// secret names whose CRC32C is reported wrong.
    pub corrupt: BTreeSet<String>,
    /// The Workload Identity provider STS accepts.
    pub sts_audience: String,
    /// Public key (PEM) of the cluster's service-account token signer.
    pub jwt_key: String,
    /// Public keys (PEM) of service-account keys, by client email.
    pub sa_keys: BTreeMap<String, String>,
    /// access token → principal (filled by the token endpoints).
    pub tokens: BTreeMap<String, String>,
    pub issued: usize,
}

#[derive(Clone)]
pub struct Google {
    pub addr: String,
    pub world: Arc<Mutex<World>>,
    pub exchanges: Arc<AtomicUsize>,
    pub accesses: Arc<AtomicUsize>,
}

type Shared = (Arc<Mutex<World>>, Arc<AtomicUsize>, Arc<AtomicUsize>);

fn error(code: u16, status: &str, message: &str) -> (StatusCode, HeaderMap, String) {
    let body = json!({"error": {"code": code, "message": message, "status": status}}).to_string();
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/json".parse().unwrap());
    (StatusCode::from_u16(code).unwrap(), h, body)
}

fn ok(body: Value) -> (StatusCode, HeaderMap, String) {
    let mut h = HeaderMap::new();
    h.insert("content-type", "application/json".parse().unwrap());
    (StatusCode::OK, h, body.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::to_string)
}

/// Who a bearer token stands for: a token we issued, or a self-signed
/// service-account JWT verified against its key.
fn principal(world: &World, token: &str) -> Option<String> {
    if let Some(p) = world.tokens.get(token) {
        return Some(p.clone());
    }
    let header = jsonwebtoken::decode_header(token).ok()?;
    let mut v = jsonwebtoken::Validation::new(header.alg);
    v.validate_aud = false;
    for (email, pem) in &world.sa_keys {
        let key = jsonwebtoken::DecodingKey::from_rsa_pem(pem.as_bytes()).ok()?;
        if let Ok(data) = jsonwebtoken::decode::<Value>(token, &key, &v) {
            if data.claims["iss"] == email.as_str() {
                return Some(email.clone());
            }
        }
    }
    None
}

async fn access(
    State((world, _, accesses)): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, HeaderMap, String) {
    accesses.fetch_add(1, Ordering::SeqCst);
    if let Some(name) = rest.strip_suffix(":render") {
        let w = world.lock().unwrap();
        return render(&w, name, &headers);
    }
    let Some(name) = rest.strip_suffix(":access") else {
        return error(404, "NOT_FOUND", "unknown method");
    };
    let mut w = world.lock().unwrap();
    let Some(who) = bearer(&headers).and_then(|t| principal(&w, &t)) else {
        return error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    };
    let Some((secret, version)) = name.rsplit_once("/versions/") else {
        return error(400, "INVALID_ARGUMENT", "bad name");
    };
    let secret = secret.to_string();
    if let Some((code, status, times)) = w.failures.get_mut(&secret) {
        if *times > 0 {
            *times -= 1;
            let (code, status) = (*code, *status);
            return error(code, status, "injected failure");
        }
    }
    let Some(versions) = w.secrets.get(&secret) else {
        return error(
            404,
            "NOT_FOUND",
            &format!("Secret [{secret}] not found or has no versions."),
        );
    };
    if !w.readers.get(&secret).is_some_and(|r| r.contains(&who)) {
        return error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission 'secretmanager.versions.access' denied for {who}"),
        );
    }
    let n = if version == "latest" {
        versions.len()
    } else {
        version.parse().unwrap_or(0)
    };
    let Some(data) = n.checked_sub(1).and_then(|i| versions.get(i)) else {
        return error(
            404,
            "NOT_FOUND",
            &format!("Secret Version [{name}] not found."),
        );
    };
    let mut crc = crc32c::crc32c(data);
    if w.corrupt.contains(&secret) {
        crc ^= 1;
    }
    ok(json!({
        "name": format!("{secret}/versions/{n}"),
        "payload": {
            "data": base64::engine::general_purpose::STANDARD.encode(data),
            "dataCrc32c": crc.to_string(),
        }
    }))
}

async fn sts(
    State((world, exchanges, _)): State<Shared>,
    body: Bytes,
) -> (StatusCode, HeaderMap, String) {
    exchanges.fetch_add(1, Ordering::SeqCst);
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    let mut w = world.lock().unwrap();
    let expect = [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        (
            "requested_token_type",
            "urn:ietf:params:oauth:token-type:access_token",
        ),
        ("scope", "https://www.googleapis.com/auth/cloud-platform"),
    ];
    for (k, v) in expect {
        if form.get(k).map(String::as_str) != Some(v) {
            return error(400, "INVALID_ARGUMENT", &format!("bad {k}"));
        }
    }
    if form.get("audience") != Some(&w.sts_audience) {
        return error(
            400,
            "INVALID_ARGUMENT",
            "The audience does not match the workload identity pool provider.",
        );
    }
    let key = jsonwebtoken::DecodingKey::from_rsa_pem(w.jwt_key.as_bytes()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
    v.validate_aud = false;
    let Ok(data) = jsonwebtoken::decode::<Value>(
        form.get("subject_token").map(String::as_str).unwrap_or(""),
        &key,
        &v,
    ) else {
        let body =
            json!({"error": "invalid_grant", "error_description": "The subject token is invalid."})
                .to_string();
        return (StatusCode::BAD_REQUEST, HeaderMap::new(), body);
    };
    let sub = data.claims["sub"].as_str().unwrap_or("").to_string();
    w.issued += 1;
    let token = format!("fed-{}", w.issued);
    w.tokens.insert(token.clone(), format!("principal:{sub}"));
    ok(json!({
        "access_token": token,
        "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "token_type": "Bearer",
        "expires_in": 3600
    }))
}

async fn impersonate(
    State((world, _, _)): State<Shared>,
    Path(rest): Path<String>,
    headers: HeaderMap,
) -> (StatusCode, HeaderMap, String) {
    let Some(gsa) = rest.strip_suffix(":generateAccessToken") else {
        return error(404, "NOT_FOUND", "unknown method");
    };
    let mut w = world.lock().unwrap();
    let Some(who) = bearer(&headers).and_then(|t| w.tokens.get(&t).cloned()) else {
        return error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    };
    if !w.impersonators.get(&who).is_some_and(|s| s.contains(gsa)) {
        return error(
            403,
            "PERMISSION_DENIED",
            "Permission 'iam.serviceAccounts.getAccessToken' denied",
        );
    }
    w.issued += 1;
    let token = format!("gsa-{}", w.issued);
    w.tokens.insert(token.clone(), gsa.to_string());
    let expire = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(3600),
    );
    ok(json!({"accessToken": token, "expireTime": expire.to_string()}))
}

/// `GET /v1/{name=projects/*/locations/*/parameters/*/versions/*}:render`:
/// the payload and, for JSON and YAML parameters, the payload with every
/// `__REF__("//secretmanager.googleapis.com/<secret version>")` replaced by
/// that secret's value, read as the parameter's principal.
fn render(w: &World, name: &str, headers: &HeaderMap) -> (StatusCode, HeaderMap, String) {
    let Some(who) = bearer(headers).and_then(|t| principal(w, &t)) else {
        return error(
            401,
            "UNAUTHENTICATED",
            "Request had invalid authentication credentials.",
        );
    };
    let Some((parameter, version)) = name.rsplit_once("/versions/") else {
        return error(400, "INVALID_ARGUMENT", "bad name");
    };
    let Some(p) = w.parameters.get(parameter) else {
        return error(
            404,
            "NOT_FOUND",
            &format!("Parameter [{parameter}] not found."),
        );
    };
    if !p.accessors.contains(&who) {
        return error(
            403,
            "PERMISSION_DENIED",
            &format!("Permission 'parametermanager.parameterVersions.render' denied for {who}"),
        );
    }
    let Some(payload) = p.versions.get(version) else {
        return error(
            404,
            "NOT_FOUND",
            &format!("Parameter Version [{name}] not found."),
        );
    };
    let text = String::from_utf8_lossy(payload).into_owned();
    let rendered = match p.format {
        "UNFORMATTED" => Ok(text),
        // In JSON the reference sits in a string, its quotes escaped:
        // substitute in the decoded strings.
        "JSON" => match serde_json::from_str::<Value>(&text) {
            Err(_) => Err(Box::new(error(
                400,
                "INVALID_ARGUMENT",
                "the JSON payload does not parse",
            ))),
            Ok(mut doc) => substitute_json(w, &p.principal, &mut doc).map(|()| doc.to_string()),
        },
        _ => substitute(w, &p.principal, &text),
    };
    let rendered = match rendered {
        Ok(r) => r,
        Err(e) => return *e,
    };
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    ok(json!({
        "parameterVersion": name,
        "payload": {"data": b64(payload)},
        "renderedPayload": b64(rendered.as_bytes()),
    }))
}

type Answer = Box<(StatusCode, HeaderMap, String)>;

fn substitute_json(w: &World, principal: &str, v: &mut Value) -> Result<(), Answer> {
    match v {
        Value::String(s) => *s = substitute(w, principal, s)?,
        Value::Array(a) => a
            .iter_mut()
            .try_for_each(|x| substitute_json(w, principal, x))?,
        Value::Object(o) => o
            .values_mut()
            .try_for_each(|x| substitute_json(w, principal, x))?,
        _ => {}
    }
    Ok(())
}

/// Replaces each `__REF__("//secretmanager.googleapis.com/<version>")` in
/// `text` by the secret's value, read as `principal`.
fn substitute(w: &World, principal: &str, text: &str) -> Result<String, Answer> {
    const REF: &str = "__REF__(\"//secretmanager.googleapis.com/";
    let mut rendered = text.to_string();
    while let Some(start) = rendered.find(REF) {
        let rest = &rendered[start + REF.len()..];
        let Some(end) = rest.find("\")") else {
            return Err(Box::new(error(
                400,
                "INVALID_ARGUMENT",
                "malformed secret reference",
            )));
        };
        let reference = rest[..end].to_string();
        let Some((secret, v)) = reference.rsplit_once("/versions/") else {
            return Err(Box::new(error(
                400,
                "INVALID_ARGUMENT",
                "malformed secret reference",
            )));
        };
        if !w.readers.get(secret).is_some_and(|r| r.contains(principal)) {
            return Err(Box::new(error(
                403,
                "PERMISSION_DENIED",
                &format!(
                    "Permission 'secretmanager.versions.access' denied on {secret} for the parameter's principal"
                ),
            )));
        }
        let Some(versions) = w.secrets.get(secret) else {
            return Err(Box::new(error(
                404,
                "NOT_FOUND",
                &format!("Secret [{secret}] not found."),
            )));
        };
        let n = if v == "latest" {
            versions.len()
        } else {
            v.parse().unwrap_or(0)
        };
        let Some(value) = n.checked_sub(1).and_then(|i| versions.get(i)) else {
            return Err(Box::new(error(
                404,
                "NOT_FOUND",
                &format!("Secret Version [{reference}] not found."),
            )));
        };
        let value = String::from_utf8_lossy(value).into_owned();
        rendered.replace_range(start..start + REF.len() + end + 2, &value);
    }
    Ok(rendered)
}

impl Google {
    pub async fn start(world: World) -> Self {
        let world = Arc::new(Mutex::new(world));
        let exchanges = Arc::new(AtomicUsize::new(0));
        let accesses = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/v1/token", post(sts))
            .route("/v1/projects/-/serviceAccounts/{*rest}", post(impersonate))
            .route("/v1/{*rest}", get(access))
            .with_state((world.clone(), exchanges.clone(), accesses.clone()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Google {
            addr,
            world,
            exchanges,
            accesses,
        }
    }
}
