//! AWS for the `aws` backend's tests: moto's server (a real emulator of
//! Secrets Manager, SSM and STS, from PyPI) on a free loopback port, the
//! official SDK to seed it, a counting proxy in front of it (calls by
//! operation, the access keys used, injected 5xx/4xx per region) and a
//! loopback EKS Pod Identity agent that checks the pod's token.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;

pub const MOTO: &str = "moto[server]==5.2.5";

pub struct Moto {
    pub url: String,
    child: Child,
}

impl Moto {
    pub async fn start() -> Self {
        let venv = super::python::venv(&[MOTO]);
        let port = super::free_port();
        let log = std::env::temp_dir().join(format!("coffer-moto-{port}.log"));
        let mut child = Command::new(venv.join("bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ))
            .spawn()
            .expect("moto_server");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        for _ in 0..300 {
            if http
                .get(format!("{url}/moto-api/"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                return Moto { url, child };
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "moto_server did not start: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn creds() -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new("testing", "testing", None, None, "test")
    }

    pub fn sm(&self, region: &str) -> aws_sdk_secretsmanager::Client {
        use aws_sdk_secretsmanager::config;
        aws_sdk_secretsmanager::Client::from_conf(
            config::Builder::new()
                .behavior_version(config::BehaviorVersion::latest())
                .region(config::Region::new(region.to_string()))
                .credentials_provider(Self::creds())
                .endpoint_url(&self.url)
                .build(),
        )
    }

    pub fn ssm(&self, region: &str) -> aws_sdk_ssm::Client {
        use aws_sdk_ssm::config;
        aws_sdk_ssm::Client::from_conf(
            config::Builder::new()
                .behavior_version(config::BehaviorVersion::latest())
                .region(config::Region::new(region.to_string()))
                .credentials_provider(Self::creds())
                .endpoint_url(&self.url)
                .build(),
        )
    }

    /// Creates a string secret and returns its ARN.
    pub async fn secret(&self, region: &str, name: &str, value: &str) -> String {
        self.sm(region)
            .create_secret()
            .name(name)
            .secret_string(value)
            .send()
            .await
            .unwrap()
            .arn
            .unwrap()
    }

    /// A new AWSCURRENT version; returns its VersionId.
    pub async fn rotate(&self, region: &str, name: &str, value: &str) -> String {
        self.sm(region)
            .put_secret_value()
            .secret_id(name)
            .secret_string(value)
            .send()
            .await
            .unwrap()
            .version_id
            .unwrap()
    }

    pub async fn parameter(&self, region: &str, name: &str, value: &str, secure: bool) -> i64 {
        use aws_sdk_ssm::types::ParameterType;
        self.ssm(region)
            .put_parameter()
            .name(name)
            .value(value)
            .overwrite(true)
            .r#type(if secure {
                ParameterType::SecureString
            } else {
                ParameterType::String
            })
            .send()
            .await
            .unwrap()
            .version
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to calls signed for one region.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Inject {
    /// `500 InternalServiceError` / `503`.
    ServerError(u16),
    /// `400 AccessDeniedException`.
    AccessDenied,
    /// `400 ThrottlingException`.
    Throttle,
    /// `200` with a GetSecretValue answer this many bytes long.
    Huge(usize),
}

#[derive(Default)]
pub struct Seen {
    /// Operation (`X-Amz-Target`, or the query protocol's `Action`) → calls.
    pub calls: BTreeMap<String, usize>,
    /// Access key ids that signed calls.
    pub access_keys: Vec<String>,
    /// Region → fault.
    pub inject: BTreeMap<String, Inject>,
}

/// An HTTP proxy in front of moto that counts and injects.
pub struct AwsProxy {
    pub url: String,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct ProxyState {
    upstream: String,
    http: reqwest::Client,
    seen: Arc<Mutex<Seen>>,
}

impl AwsProxy {
    pub async fn start(upstream: &str) -> Self {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let state = ProxyState {
            upstream: upstream.to_string(),
            http: reqwest::Client::new(),
            seen: Arc::clone(&seen),
        };
        let app = axum::Router::new().fallback(forward).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        AwsProxy { url, seen, task }
    }

    pub fn calls(&self, op: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .calls
            .get(op)
            .copied()
            .unwrap_or(0)
    }

    pub fn inject(&self, region: &str, fault: Option<Inject>) {
        let mut s = self.seen.lock().unwrap();
        match fault {
            Some(f) => s.inject.insert(region.to_string(), f),
            None => s.inject.remove(region),
        };
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `Credential=AKID/date/REGION/service/aws4_request` of a SigV4 header.
fn signed_scope(auth: &str) -> Option<(String, String)> {
    let cred = auth.split("Credential=").nth(1)?;
    let mut parts = cred.split('/');
    let key = parts.next()?.to_string();
    let _date = parts.next()?;
    let region = parts.next()?.to_string();
    Some((key, region))
}

async fn forward(State(s): State<ProxyState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, 16 << 20)
        .await
        .unwrap_or_default();
    let op = parts
        .headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| {
            url::form_urlencoded::parse(&body)
                .find(|(k, _)| k == "Action")
                .map(|(_, v)| v.to_string())
        })
        .unwrap_or_else(|| "other".into());
    let scope = parts
        .headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(signed_scope);
    let fault = {
        let mut seen = s.seen.lock().unwrap();
        *seen.calls.entry(op).or_default() += 1;
        if let Some((key, _)) = &scope {
            seen.access_keys.push(key.clone());
        }
        scope
            .as_ref()
            .and_then(|(_, region)| seen.inject.get(region).copied())
    };
    if let Some(Inject::Huge(n)) = fault {
        let body = format!(
            r#"{{"Name":"x","VersionId":"v","SecretString":"{}"}}"#,
            "a".repeat(n)
        );
        return Response::builder()
            .status(200)
            .header("content-type", "application/x-amz-json-1.1")
            .body(Body::from(body))
            .unwrap();
    }
    if let Some(fault) = fault {
        let (status, code) = match fault {
            Inject::Huge(_) => unreachable!(),
            Inject::ServerError(status) => (status, "InternalServiceError"),
            Inject::AccessDenied => (400, "AccessDeniedException"),
            Inject::Throttle => (400, "ThrottlingException"),
        };
        return Response::builder()
            .status(status)
            .header("content-type", "application/x-amz-json-1.1")
            .header("x-amzn-errortype", code)
            .body(Body::from(format!(
                r#"{{"__type":"{code}","message":"injected by the test proxy"}}"#
            )))
            .unwrap();
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut up = s
        .http
        .request(parts.method.clone(), format!("{}{path}", s.upstream));
    for (k, v) in &parts.headers {
        if k != "host" && k != "content-length" {
            up = up.header(k, v);
        }
    }
    let resp = up.body(body).send().await.unwrap();
    let mut out = Response::builder().status(resp.status().as_u16());
    for (k, v) in resp.headers() {
        if k != "content-length" && k != "transfer-encoding" && k != "connection" {
            out = out.header(k, v);
        }
    }
    out.body(Body::from(resp.bytes().await.unwrap_or_default()))
        .unwrap()
}

/// A loopback EKS Pod Identity agent: `GET /v1/credentials` with the pod's
/// token as `Authorization`; answers credentials for the expected token
/// only, as the agent does after its EKS Auth call.
pub struct Agent {
    pub url: String,
    pub calls: Arc<Mutex<usize>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct AgentState {
    token: String,
    calls: Arc<Mutex<usize>>,
}

impl Agent {
    pub async fn start(expected_token: &str) -> Self {
        let calls: Arc<Mutex<usize>> = Arc::default();
        let state = AgentState {
            token: expected_token.to_string(),
            calls: Arc::clone(&calls),
        };
        let app = axum::Router::new()
            .route("/v1/credentials", axum::routing::get(agent))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1/credentials", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Agent { url, calls, task }
    }

    pub fn calls(&self) -> usize {
        *self.calls.lock().unwrap()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn agent(State(s): State<AgentState>, headers: axum::http::HeaderMap) -> Response {
    *s.calls.lock().unwrap() += 1;
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if given != s.token {
        return Response::builder()
            .status(400)
            .header("content-type", "application/json")
            .body(Body::from(
                r#"{"code":"InvalidTokenException","message":"Service account token cannot be empty or is invalid"}"#,
            ))
            .unwrap();
    }
    let expiration = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + Duration::from_secs(6 * 3600),
    );
    Response::builder()
        .status(200)
        .header("content-type", "application/json")
        .body(Body::from(format!(
            r#"{{"AccessKeyId":"ASIAPODIDENTITYKEY01","SecretAccessKey":"pod-identity-secret","Token":"pod-identity-session-token","AccountId":"123456789012","Expiration":"{expiration}"}}"#
        )))
        .unwrap()
}
