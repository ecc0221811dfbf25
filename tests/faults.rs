//! Fault injection between coffer and a real OpenBao: a loopback proxy adds
//! latency, resets, half-open connections, slow-drip and truncated answers
//! and garbage. Throughout, the daemon answers Version within 100 ms, every
//! Mount ends within its deadline with a clear error or a whole answer, and
//! nothing partial is ever returned.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use coffer::secret::Credential;
use common::bao::{Bao, ROOT};
use common::proxy::{Fault, Proxy};
use common::*;
use serde_json::json;
use tonic::Code;

const MOUNT_TIMEOUT: Duration = Duration::from_secs(4);

fn spc(vault: &str) -> SecretProviderClass {
    SecretProviderClass {
        name: "faulty".into(),
        namespace: Some("shop".into()),
        provider: "coffer".into(),
        parameters: BTreeMap::from([
            ("vaultAddress".to_string(), vault.to_string()),
            (
                "objects".to_string(),
                "- objectName: pw\n  secretPath: secret/data/app\n  secretKey: password\n\
                 - objectName: local\n  backend: file\n"
                    .to_string(),
            ),
        ]),
    }
}

fn request(vault: &str) -> proto::MountRequest {
    let mut d = driver(Path::new("/t"));
    d.node_publish_secrets = Some(BTreeMap::from([(
        "token".to_string(),
        Credential::new(ROOT.into()),
    )]));
    d.to_proto(&spc(vault))
}

/// Calls Version every 20 ms and remembers the slowest answer.
async fn version_watch(d: &Daemon) -> (Arc<AtomicBool>, tokio::task::JoinHandle<(Duration, u32)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let mut c = d.client().await;
    let task = tokio::spawn(async move {
        let (mut worst, mut n) = (Duration::ZERO, 0);
        while !flag.load(Ordering::Relaxed) {
            let t = Instant::now();
            let answered = tokio::time::timeout(
                Duration::from_secs(5),
                c.version(proto::VersionRequest {
                    version: "v1alpha1".into(),
                }),
            )
            .await;
            assert!(
                matches!(answered, Ok(Ok(_))),
                "Version failed: {answered:?}"
            );
            worst = worst.max(t.elapsed());
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (worst, n)
    });
    (stop, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_faults_end_every_mount_cleanly_and_never_stall_the_daemon() {
    let bao = Bao::start().await;
    bao.put_kv2("app", json!({"password": "through-the-proxy"}))
        .await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", bao.port).parse().unwrap()).await;
    let d = Daemon::start_with(Options {
        extra_args: vec![
            "--mount-timeout".into(),
            "4s".into(),
            "--vault-request-timeout".into(),
            "1500ms".into(),
            "--cache-ttl".into(),
            "0s".into(),
            "--backend-retries".into(),
            "2".into(),
        ],
        ..Default::default()
    });
    d.write_secret("local", "on-disk");
    let (stop, watch) = version_watch(&d).await;
    let mut c = d.client().await;

    let cases: [(Fault, Option<Code>); 8] = [
        (Fault::Pass, None),
        (Fault::Latency(Duration::from_millis(300)), None),
        (Fault::Reset, Some(Code::Unavailable)),
        (Fault::HalfOpen, Some(Code::Unavailable)),
        (
            Fault::SlowDrip(Duration::from_millis(100)),
            Some(Code::Unavailable),
        ),
        (Fault::Truncate(40), Some(Code::Unavailable)),
        (Fault::Truncate(200), Some(Code::Unavailable)),
        (Fault::Garbage, Some(Code::Unavailable)),
    ];
    for (fault, want) in cases {
        proxy.set(fault);
        let started = Instant::now();
        let result = tokio::time::timeout(
            MOUNT_TIMEOUT + Duration::from_secs(3),
            c.mount(request(&proxy.url())),
        )
        .await
        .unwrap_or_else(|_| panic!("{fault:?}: the Mount outlived its deadline"));
        let took = started.elapsed();
        println!(
            "{fault:?}: {:?} in {took:?}",
            result.as_ref().map(|_| "ok").map_err(|s| s.code())
        );
        assert!(
            took < MOUNT_TIMEOUT + Duration::from_secs(1),
            "{fault:?}: {took:?}"
        );
        match (result, want) {
            (Ok(r), None) => {
                let files: BTreeMap<&str, &[u8]> = r
                    .get_ref()
                    .files
                    .iter()
                    .map(|f| (f.path.as_str(), f.contents.as_slice()))
                    .collect();
                assert_eq!(files["pw"], b"through-the-proxy");
                assert_eq!(files["local"], b"on-disk");
            }
            (Err(s), Some(code)) => {
                // Deadline-bound faults may end as DeadlineExceeded instead.
                assert!(
                    s.code() == code || s.code() == Code::DeadlineExceeded,
                    "{fault:?}: {:?} {}",
                    s.code(),
                    s.message()
                );
                assert!(
                    s.message().contains("object \"pw\"") || s.message().contains("pw"),
                    "{fault:?}: the message names the object: {}",
                    s.message()
                );
                assert!(!s.message().contains("through-the-proxy"));
            }
            (other, want) => panic!("{fault:?}: wanted {want:?}, got {other:?}"),
        }
    }
    // And back to health: the same daemon serves normally again.
    proxy.set(Fault::Pass);
    let r = c.mount(request(&proxy.url())).await.expect("recovered");
    assert_eq!(r.get_ref().files.len(), 2);

    stop.store(true, Ordering::Relaxed);
    let (worst, n) = watch.await.unwrap();
    println!("Version: {n} calls, slowest {worst:?}");
    assert!(n > 50);
    assert!(worst < Duration::from_millis(100), "Version took {worst:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_mounts_against_a_half_open_backend_all_end_by_their_deadline() {
    let bao = Bao::start().await;
    let proxy = Proxy::start(format!("127.0.0.1:{}", bao.port).parse().unwrap()).await;
    proxy.set(Fault::HalfOpen);
    let d = Daemon::start_with(Options {
        extra_args: vec![
            "--mount-timeout".into(),
            "3s".into(),
            "--cache-ttl".into(),
            "0s".into(),
        ],
        ..Default::default()
    });
    d.write_secret("local", "on-disk");
    let (stop, watch) = version_watch(&d).await;
    let started = Instant::now();
    let mut calls = Vec::new();
    for _ in 0..40 {
        let mut c = d.client().await;
        let url = proxy.url();
        calls.push(tokio::spawn(async move { c.mount(request(&url)).await }));
    }
    for call in calls {
        let status = call.await.unwrap().expect_err("nothing can be fetched");
        assert!(
            matches!(status.code(), Code::DeadlineExceeded | Code::Unavailable),
            "{:?}: {}",
            status.code(),
            status.message()
        );
    }
    let took = started.elapsed();
    println!("40 Mounts against a half-open Vault ended in {took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    stop.store(true, Ordering::Relaxed);
    let (worst, _) = watch.await.unwrap();
    assert!(worst < Duration::from_millis(100), "Version took {worst:?}");
}
