//! End-to-end: the daemon's life cycle — socket handling, health endpoints,
//! SIGTERM draining and the Mount deadline.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use coffer::backend::{Backend, FetchLimits, Fetched, Registry};
use coffer::config::ServeArgs;
use coffer::error::ObjectError;
use coffer::request::MountContext;
use coffer::secret::SecretBytes;
use coffer::spc::ObjectSpec;
use common::*;
use nix::sys::signal::Signal;

#[tokio::test]
async fn sigterm_when_idle_exits_zero_and_removes_the_socket() {
    let mut d = Daemon::start();
    d.signal(Signal::SIGTERM);
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", d.logs());
    assert!(!d.socket.exists(), "socket removed on clean exit");
    assert!(d.logs().contains("SIGTERM received"));
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let mut d = Daemon::start();
    // A crash leaves the socket file behind.
    d.signal(Signal::SIGKILL);
    d.wait_exit(Duration::from_secs(10)).await;
    assert!(d.socket.exists(), "SIGKILL leaves a stale socket");
    d.spawn(&[]);
    d.wait_ready();
    d.write_secret("a", "v");
    let resp = d
        .client()
        .await
        .mount(request("- objectName: a"))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().files[0].contents, b"v");
    assert!(d.logs().contains("removing stale socket"));
}

#[tokio::test]
async fn non_socket_at_the_socket_path_is_never_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("coffer.sock");
    std::fs::write(&file, "not a socket").unwrap();
    let sub = dir.path().join("dir.sock");
    std::fs::create_dir(&sub).unwrap();
    for (path, kind) in [(&file, "a regular file"), (&sub, "a directory")] {
        let out = std::process::Command::new(BIN)
            .args(["serve", "--health-addr", "off", "--socket"])
            .arg(path)
            .arg("--version-key-file")
            .arg(dir.path().join("k"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("it is {kind}, not a socket")),
            "{stderr}"
        );
    }
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a socket");
    assert!(sub.is_dir());
}

#[tokio::test]
async fn a_live_socket_is_not_stolen() {
    let d = Daemon::start();
    let out = std::process::Command::new(BIN)
        .args(d.args(&[]))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already serving"));
    d.client().await; // the first daemon still answers
}

#[tokio::test]
async fn health_and_readiness_endpoints() {
    let d = Daemon::start_with(Options {
        health: true,
        ..Default::default()
    });
    let addr = d.health.clone().unwrap();
    let health = http_get(&addr, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    let ready = http_get(&addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // Take the socket away: the process lives, but it is no longer ready.
    std::fs::remove_file(&d.socket).unwrap();
    let ready = http_get(&addr, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(http_get(&addr, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn a_taken_health_port_does_not_stop_the_provider() {
    let first = Daemon::start_with(Options {
        health: true,
        ..Default::default()
    });
    let taken = first.health.clone().unwrap();
    let second = Daemon::start_with(Options {
        extra_args: vec!["--health-addr".into(), taken],
        ..Default::default()
    });
    second.write_secret("a", "still served");
    let resp = second
        .client()
        .await
        .mount(request("- objectName: a"))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().files[0].contents, b"still served");
    assert!(
        second.logs().contains("serving without health endpoints"),
        "{}",
        second.logs()
    );
}

/// A backend whose objects take `delayMs` to fetch: stands in for a slow
/// remote store in the in-process tests below.
struct SlowBackend;

#[async_trait]
impl Backend for SlowBackend {
    fn name(&self) -> &'static str {
        "slow"
    }
    fn validate(&self, object: &ObjectSpec, _: &MountContext) -> Result<(), ObjectError> {
        object.reject_unknown_fields(&["delayMs"])
    }
    async fn fetch(
        &self,
        object: &ObjectSpec,
        _: &MountContext,
        _: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        let ms: u64 = object
            .str_field("delayMs")?
            .unwrap_or("0")
            .parse()
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(Fetched::new(
            SecretBytes::new(format!("slept {ms}").into_bytes()),
            Some(format!("v{ms}")),
        ))
    }
}

fn serve_args(dir: &std::path::Path, timeout: Duration, grace: Duration) -> ServeArgs {
    ServeArgs::from_args([
        "--socket".to_string(),
        dir.join("coffer.sock").display().to_string(),
        "--health-addr".into(),
        "off".into(),
        "--mount-timeout".into(),
        format!("{}ms", timeout.as_millis()),
        "--shutdown-grace".into(),
        format!("{}ms", grace.as_millis()),
        "--default-backend".into(),
        "slow".into(),
        "--version-key-file".into(),
        dir.join("version.key").display().to_string(),
        "--audit-log".into(),
        "off".into(),
    ])
    .unwrap()
}

struct InProcess {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), coffer::server::ServeError>>,
    socket: std::path::PathBuf,
}

async fn start_in_process(args: ServeArgs) -> InProcess {
    let mut registry = Registry::new();
    registry.register(Arc::new(SlowBackend));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let socket = args.socket.clone();
    let task = tokio::spawn(async move {
        coffer::server::serve_with_backends(&args, registry, async {
            let _ = rx.await;
        })
        .await
    });
    for _ in 0..200 {
        if tokio::net::UnixStream::connect(&socket).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    InProcess {
        stop: Some(tx),
        task,
        socket,
    }
}

fn slow_request(objects: &str) -> coffer::proto::MountRequest {
    let mut spc = spc(objects);
    spc.parameters.insert("backend".into(), "slow".into());
    driver(std::path::Path::new("/t")).to_proto(&spc)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_an_in_flight_mount() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_in_process(serve_args(
        dir.path(),
        Duration::from_secs(30),
        Duration::from_secs(10),
    ))
    .await;
    let mut client = coffer::client::connect(&server.socket).await.unwrap();
    let in_flight = tokio::spawn(async move {
        client
            .mount(slow_request("- objectName: a\n  delayMs: '800'"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    // New connections are refused right away while the old Mount finishes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        coffer::client::connect(&server.socket).await.is_err(),
        "no new connections while draining"
    );
    let resp = in_flight
        .await
        .unwrap()
        .expect("in-flight mount completes")
        .into_inner();
    assert_eq!(resp.files[0].contents, b"slept 800");
    server.task.await.unwrap().unwrap();
    assert!(asked.elapsed() < Duration::from_secs(5));
    assert!(!server.socket.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_in_process(serve_args(
        dir.path(),
        Duration::from_secs(60),
        Duration::from_millis(300),
    ))
    .await;
    let mut client = coffer::client::connect(&server.socket).await.unwrap();
    let stuck = tokio::spawn(async move {
        client
            .mount(slow_request("- objectName: a\n  delayMs: '30000'"))
            .await
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let asked = Instant::now();
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap().unwrap();
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    stuck.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deadline_names_the_objects_still_outstanding() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start_in_process(serve_args(
        dir.path(),
        Duration::from_millis(400),
        Duration::from_secs(1),
    ))
    .await;
    let mut client = coffer::client::connect(&server.socket).await.unwrap();
    let started = Instant::now();
    let (code, msg) = mount_err(
        &mut client,
        slow_request(
            "- objectName: fast\n  delayMs: '1'\n- objectName: hung/one\n  delayMs: '60000'\n\
             - objectName: hung/two\n  delayMs: '60000'\n",
        ),
    )
    .await;
    assert_eq!(code, tonic::Code::DeadlineExceeded, "{msg}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        msg,
        "mount timed out after 400ms; objects still outstanding: hung/one, hung/two"
    );
    // The daemon is fine afterwards.
    let ok = client
        .mount(slow_request("- objectName: quick"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.object_version[0].version, "v0");
    server.stop.take().unwrap().send(()).unwrap();
    server.task.await.unwrap().unwrap();
}

/// A loopback stand-in for a Vault that takes `delay` to answer a read
/// (the real binary needs a slow backend to prove it drains on SIGTERM).
async fn slow_vault(delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::time::sleep(delay).await;
                let body = r#"{"request_id":"r","lease_id":"","renewable":false,"lease_duration":0,"data":{"k":"slow-value"}}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_an_in_flight_mount_in_the_real_binary() {
    let vault = slow_vault(Duration::from_millis(1500)).await;
    let mut d = Daemon::start_with(Options {
        extra_args: vec!["--cache-ttl".into(), "0s".into()],
        ..Default::default()
    });
    let mut spc = spc("- objectName: k\n  secretPath: kv/slow\n  secretKey: k");
    spc.parameters.insert("backend".into(), "vault".into());
    spc.parameters.insert("vaultAddress".into(), vault);
    let mut drv = driver(std::path::Path::new("/t"));
    drv.node_publish_secrets = Some(std::collections::BTreeMap::from([(
        "token".to_string(),
        coffer::secret::Credential::new("static-token".into()),
    )]));
    let mut client = d.client().await;
    let req = drv.to_proto(&spc);
    let in_flight = tokio::spawn(async move { client.mount(req).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    d.signal(Signal::SIGTERM);
    let resp = in_flight
        .await
        .unwrap()
        .expect("the in-flight Mount completes")
        .into_inner();
    assert_eq!(resp.files[0].contents, b"slow-value");
    let status = d.wait_exit(Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", d.logs());
    assert!(!d.socket.exists());
    assert!(d.logs().contains("draining in-flight mounts"));
}

/// Settings that cannot work stop start-up with the flag's name and why,
/// instead of a daemon that fails every Mount (or logs nothing).
#[test]
fn start_up_refuses_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut cmd = serve_command(dir.path(), "c.sock", &dir.path().join("k"));
        cmd.args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = run(&["--log-level", "verbose"], &[]);
    assert!(!ok);
    assert!(
        err.contains("\"verbose\" is not a level") && err.contains("error, warn, info"),
        "{err}"
    );
    let (ok, err) = run(&["--default-backend", "vualt"], &[]);
    assert!(!ok);
    assert!(
        err.contains("--default-backend \"vualt\"") && err.contains("did you mean vault?"),
        "{err}"
    );
    let (ok, err) = run(&["--default-backend", "file"], &[]);
    assert!(!ok, "the file backend is off without --file-backend-root");
    assert!(err.contains("not enabled on this node"), "{err}");
    // An empty variable is unset: COFFER_LOG_LEVEL="" means the default.
    let mut child = serve_command(dir.path(), "d.sock", &dir.path().join("k"))
        .env("COFFER_LOG_LEVEL", "")
        .env("COFFER_DEFAULT_BACKEND", "")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !dir.path().join("d.sock").exists() {
        assert!(std::time::Instant::now() < deadline, "did not start");
        assert!(child.try_wait().unwrap().is_none(), "exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
