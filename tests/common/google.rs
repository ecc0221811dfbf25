//! Loopback stand-ins for Google's Secret Manager, STS and IAM Credentials
//! REST APIs (no installable emulator exists). They follow the documented
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

#[derive(Default)]
pub struct World {
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
