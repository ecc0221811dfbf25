//! Loopback stand-ins for Entra ID's token endpoint and Azure Key Vault's
//! REST API (api-version 7.4), for the `azure` backend's tests: no Key
//! Vault emulator installs here. They follow the documented wire format
//! (paths, JSON fields, error bodies, status codes), check the client
//! assertion (RS256 signature, audience, issuer, federated subject) or the
//! client secret, issue opaque bearer tokens, and enforce per-principal
//! access to each item. Certificates and keys come from OpenSSL.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::HeaderMap;
use axum::response::Response;
use base64::Engine as _;
use serde_json::{json, Value};

pub const TENANT: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
pub const WI_CLIENT: &str = "0c5e1a7d-5a43-4f5e-9c49-3a1d7f1e2b01";
pub const SP_CLIENT: &str = "6f1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";
pub const SP_SECRET: &str = "sp-client-secret-canary-31c7";

/// One version of a Key Vault item: its JSON body without `id`/`attributes`.
#[derive(Clone)]
pub struct Version {
    pub id: String,
    pub created: i64,
    pub enabled: bool,
    pub body: Value,
}

#[derive(Default)]
pub struct World {
    /// `secrets/name` → versions, oldest first.
    pub items: BTreeMap<String, Vec<Version>>,
    /// client id → items it may read (`secrets/name`, or `*`).
    pub access: BTreeMap<String, BTreeSet<String>>,
    /// Workload identity: client id → the subject federated with it.
    pub federated: BTreeMap<String, String>,
    /// Issued token → client id.
    pub tokens: BTreeMap<String, String>,
    /// Calls to the token endpoint, and Key Vault GETs by path.
    pub token_calls: usize,
    pub gets: Vec<String>,
    /// Answer every Key Vault call with 429 this many times.
    pub throttle: usize,
    pub next_version: u64,
}

pub struct Azure {
    pub url: String,
    pub world: Arc<Mutex<World>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct AppState {
    world: Arc<Mutex<World>>,
    jwt_key: Arc<jsonwebtoken::DecodingKey>,
    base: String,
}

impl Azure {
    pub async fn start(jwt_public_pem: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let world: Arc<Mutex<World>> = Arc::default();
        world
            .lock()
            .unwrap()
            .federated
            .insert(WI_CLIENT.into(), "system:serviceaccount:shop:web".into());
        let state = AppState {
            world: Arc::clone(&world),
            jwt_key: Arc::new(
                jsonwebtoken::DecodingKey::from_rsa_pem(jwt_public_pem.as_bytes()).unwrap(),
            ),
            base: format!("{url}/kv"),
        };
        let app = axum::Router::new()
            .route("/{tenant}/oauth2/v2.0/token", axum::routing::post(token))
            // Per-vault URLs (`--azure-keyvault-endpoint …/v/{name}`).
            .route("/v/{vault}/{collection}/{name}", axum::routing::get(item))
            .route(
                "/v/{vault}/{collection}/{name}/{version}",
                axum::routing::get(item),
            )
            .route("/kv/{collection}/{name}", axum::routing::get(item))
            .route("/kv/{collection}/{name}/", axum::routing::get(item))
            .route("/v/{vault}/{collection}/{name}/", axum::routing::get(item))
            .route(
                "/kv/{collection}/{name}/{version}",
                axum::routing::get(item),
            )
            .with_state(state);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Azure { url, world, task }
    }

    /// `--azure-keyvault-endpoint` for this stand-in.
    pub fn vault_endpoint(&self) -> String {
        format!("{}/kv", self.url)
    }

    /// Adds a version of `collection/name` and returns its version id.
    pub fn put(&self, collection: &str, name: &str, body: Value) -> String {
        let mut w = self.world.lock().unwrap();
        w.next_version += 1;
        let version = format!("{:032x}", 0xabc0_0000u64 + w.next_version);
        let created = 1_700_000_000 + w.next_version as i64;
        w.items
            .entry(format!("{collection}/{name}"))
            .or_default()
            .push(Version {
                id: version.clone(),
                created,
                enabled: true,
                body,
            });
        version
    }

    pub fn allow(&self, client: &str, item: &str) {
        self.world
            .lock()
            .unwrap()
            .access
            .entry(client.into())
            .or_default()
            .insert(item.into());
    }
}

impl Drop for Azure {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn json_response(status: u16, body: Value, headers: &[(&str, &str)]) -> Response {
    let mut r = Response::builder()
        .status(status)
        .header("content-type", "application/json; charset=utf-8");
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(Body::from(body.to_string())).unwrap()
}

fn aad_error(status: u16, error: &str, description: &str) -> Response {
    json_response(
        status,
        json!({"error": error, "error_description": description, "error_codes": [700213]}),
        &[],
    )
}

/// `POST /{tenant}/oauth2/v2.0/token` (client credentials).
async fn token(
    State(s): State<AppState>,
    UrlPath(tenant): UrlPath<String>,
    req: Request,
) -> Response {
    let body = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let form: BTreeMap<String, String> = url::form_urlencoded::parse(&body).into_owned().collect();
    s.world.lock().unwrap().token_calls += 1;
    if tenant != TENANT && tenant != "tid" {
        return aad_error(400, "invalid_request", "AADSTS90002: Tenant not found.");
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("scope").map(String::as_str) != Some("https://vault.azure.net/.default")
    {
        return aad_error(
            400,
            "invalid_request",
            "AADSTS900144: grant_type or scope is wrong.",
        );
    }
    let client = form.get("client_id").cloned().unwrap_or_default();
    let ok = match (form.get("client_assertion"), form.get("client_secret")) {
        (Some(assertion), None) => {
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                false
            } else {
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                v.set_audience(&["api://AzureADTokenExchange"]);
                v.set_issuer(&[super::bao::ISSUER]);
                match jsonwebtoken::decode::<Value>(assertion, &s.jwt_key, &v) {
                    Ok(data) => {
                        let sub = data.claims.get("sub").and_then(Value::as_str).unwrap_or("");
                        s.world
                            .lock()
                            .unwrap()
                            .federated
                            .get(&client)
                            .map(String::as_str)
                            == Some(sub)
                    }
                    Err(_) => false,
                }
            }
        }
        (None, Some(secret)) => client == SP_CLIENT && secret == SP_SECRET,
        _ => false,
    };
    if !ok {
        return aad_error(
            401,
            "invalid_client",
            "AADSTS700213: No matching federated identity record found for presented assertion subject.",
        );
    }
    let mut raw = [0u8; 16];
    getrandom::fill(&mut raw).unwrap();
    let access = format!("kv-token-{}", hex::encode(raw));
    s.world
        .lock()
        .unwrap()
        .tokens
        .insert(access.clone(), client);
    json_response(
        200,
        json!({"token_type": "Bearer", "expires_in": 3599, "ext_expires_in": 3599, "access_token": access}),
        &[],
    )
}

fn kv_error(status: u16, code: &str, message: &str, inner: Option<&str>) -> Response {
    let mut err = json!({"code": code, "message": message});
    if let Some(i) = inner {
        err["innererror"] = json!({"code": i});
    }
    json_response(status, json!({"error": err}), &[])
}

/// `GET /{collection}/{name}[/{version}]`, and `…/{name}/versions`.
async fn item(
    State(s): State<AppState>,
    UrlPath(parts): UrlPath<Vec<(String, String)>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
) -> Response {
    let query: BTreeMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let get = |k: &str| {
        parts
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let (collection, name, version) = (get("collection"), get("name"), get("version"));
    // Each vault of the per-vault URLs holds its own items.
    let name = match get("vault").as_str() {
        "" | "kvname" => name,
        vault => format!("{vault}--{name}"),
    };
    if query.get("api-version").map(String::as_str) != Some("7.4") {
        return kv_error(
            400,
            "BadParameter",
            "The api-version is missing or not supported",
            None,
        );
    }
    let mut w = s.world.lock().unwrap();
    w.gets.push(format!("{collection}/{name}/{version}"));
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let Some(client) = w.tokens.get(bearer).cloned() else {
        return Response::builder()
            .status(401)
            .header(
                "www-authenticate",
                format!("Bearer authorization=\"https://login.microsoftonline.com/{TENANT}\", resource=\"https://vault.azure.net\""),
            )
            .body(Body::from(
                json!({"error": {"code": "Unauthorized", "message": "AKV10000: Request is missing a Bearer or PoP token."}}).to_string(),
            ))
            .unwrap();
    };
    if w.throttle > 0 {
        w.throttle -= 1;
        return json_response(
            429,
            json!({"error": {"code": "Throttled", "message": "Request was not processed because too many requests were received."}}),
            &[("retry-after", "1")],
        );
    }
    let key = format!("{collection}/{name}");
    let allowed = w
        .access
        .get(&client)
        .is_some_and(|a| a.contains(&key) || a.contains("*"));
    if !allowed {
        return kv_error(
            403,
            "Forbidden",
            &format!("The user, group or application 'appid={client}' does not have {collection} get permission on key vault."),
            Some("ForbiddenByPolicy"),
        );
    }
    let Some(versions) = w.items.get(&key).cloned() else {
        let code = match collection.as_str() {
            "secrets" => "SecretNotFound",
            "keys" => "KeyNotFound",
            _ => "CertificateNotFound",
        };
        return kv_error(
            404,
            code,
            &format!("A {collection} with (name/id) {name} was not found in this key vault."),
            None,
        );
    };
    let base = format!("{}/{collection}/{name}", s.base);
    if version == "versions" {
        let value: Vec<Value> = versions
            .iter()
            .map(|v| {
                let id_field = if collection == "keys" { "kid" } else { "id" };
                json!({id_field: format!("{base}/{}", v.id), "attributes": {"enabled": v.enabled, "created": v.created, "updated": v.created}})
            })
            .collect();
        return json_response(200, json!({"value": value, "nextLink": null}), &[]);
    }
    let found = if version.is_empty() {
        versions.last()
    } else {
        versions.iter().find(|v| v.id == version)
    };
    let Some(v) = found else {
        return kv_error(
            404,
            "NotFound",
            &format!("{name} has no version {version}"),
            None,
        );
    };
    if !v.enabled {
        return kv_error(
            403,
            "Forbidden",
            "Operation get is not allowed on a disabled secret.",
            Some("SecretDisabled"),
        );
    }
    let mut body = v.body.clone();
    let attributes = json!({"enabled": true, "created": v.created, "updated": v.created, "recoveryLevel": "Recoverable+Purgeable"});
    match collection.as_str() {
        "keys" => {
            body["key"]["kid"] = json!(format!("{base}/{}", v.id));
        }
        _ => {
            body["id"] = json!(format!("{base}/{}", v.id));
        }
    }
    body["attributes"] = attributes;
    json_response(200, body, &[])
}

/// Runs openssl in `dir`, panicking with its output on failure.
pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A root CA, an intermediate and a leaf (key types by `algo`: "rsa" or
/// "ec"), with Subject/Authority Key Identifiers, in `dir`.
pub fn make_chain(dir: &Path, algo: &str) {
    let newkey = |name: &str| match algo {
        "ec" => openssl(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &format!("{name}.key"),
            ],
        ),
        _ => openssl(dir, &["genrsa", "-out", &format!("{name}.key"), "2048"]),
    };
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("leaf.ext"),
        "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\nsubjectAltName=DNS:web.shop.svc\n",
    )
    .unwrap();
    newkey("root");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/CN=coffer test root",
            "-days",
            "30",
            "-out",
            "root.crt",
        ],
    );
    for (name, issuer, ext, cn) in [
        ("int", "root", "ca.ext", "coffer test intermediate"),
        ("leaf", "int", "leaf.ext", "web.shop.svc"),
    ] {
        newkey(name);
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-key",
                &format!("{name}.key"),
                "-subj",
                &format!("/CN={cn}"),
                "-out",
                &format!("{name}.csr"),
            ],
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                &format!("{issuer}.crt"),
                "-CAkey",
                &format!("{issuer}.key"),
                "-CAcreateserial",
                "-days",
                "30",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.crt"),
            ],
        );
    }
    // The leaf's key as PKCS#8, as coffer writes it.
    openssl(
        dir,
        &[
            "pkcs8", "-topk8", "-nocrypt", "-in", "leaf.key", "-out", "leaf.p8",
        ],
    );
}

/// `(name, DER)` of a PEM file's first certificate.
pub fn cert_der(path: &Path) -> Vec<u8> {
    let text = std::fs::read_to_string(path).unwrap();
    pem::parse(text).unwrap().contents().to_vec()
}

/// A JWK for the public key of a PEM private key file (RSA or EC P-256).
pub fn jwk(dir: &Path, key_file: &str) -> Value {
    openssl(
        dir,
        &[
            "pkey", "-in", key_file, "-pubout", "-outform", "DER", "-out", "pub.der",
        ],
    );
    let der = std::fs::read(dir.join("pub.der")).unwrap();
    use x509_parser::prelude::FromDer;
    let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&der).unwrap();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    match spki.parsed().unwrap() {
        x509_parser::public_key::PublicKey::RSA(rsa) => {
            json!({"kty": "RSA", "n": b64(rsa.modulus), "e": b64(rsa.exponent), "key_ops": ["verify"]})
        }
        x509_parser::public_key::PublicKey::EC(point) => {
            let data = point.data();
            let half = (data.len() - 1) / 2;
            json!({"kty": "EC", "crv": "P-256", "x": b64(&data[1..1 + half]), "y": b64(&data[1 + half..])})
        }
        other => panic!("unexpected key {other:?}"),
    }
}
