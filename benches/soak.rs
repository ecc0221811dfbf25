//! Soak: the real daemon under churn for a long time, RSS sampled, its
//! slope printed. 500 simulated pods (50 namespaces × 10) poll their
//! volumes like rotation does, secrets change underneath them, pods are
//! replaced (new UIDs), and hostile requests are mixed in: alias bombs,
//! deep nesting, ever-new Vault addresses, ever-new large SPCs, forbidden
//! node paths, bad objects. After warm-up the RSS slope must be flat:
//! under 0.1 MiB per hour.
//!
//! Warm-up is the first half of the run: under this churn the bounded maps
//! (limiter scopes, Vault clients, the parsed-SPC memo) and the allocator's
//! arenas take about 12 minutes to reach their ceilings (measured: slope
//! +10.8 MiB/h counted from minute 6, +0.02 from minute 15). RSS moves by
//! ±1.5 MiB with the hostile requests in flight, so the slope is fitted to
//! a sample every few seconds and printed with its standard error; the run
//! fails only on growth that is significant (slope − 2σ above 0.1 MiB/h).
//!
//! cargo bench --bench soak
//! Knobs (env): SOAK_MINUTES (30), SOAK_SAMPLE_SECS (5), SOAK_CLIENTS (8).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::manifest::SecretProviderClass;
use coffer::proto;
use coffer::secret::Credential;
use common::{driver, env_num, Daemon, Options};

const NAMESPACES: usize = 50;
const PODS_PER_NAMESPACE: usize = 10;

fn pod_request(ns: usize, pod: usize, generation: u64) -> proto::MountRequest {
    let mut d = driver(Path::new(&format!(
        "/var/lib/kubelet/pods/{ns}-{pod}-{generation}/volumes/kubernetes.io~csi/v/mount"
    )));
    d.pod.namespace = format!("ns{ns}");
    d.pod.name = format!("app-{pod}");
    d.pod.uid = format!("uid-{ns}-{pod}-{generation}");
    d.to_proto(&SecretProviderClass {
        name: "app".into(),
        namespace: Some(format!("ns{ns}")),
        provider: "coffer".into(),
        parameters: BTreeMap::from([
            ("backend".to_string(), "file".to_string()),
            (
                "objects".to_string(),
                "- objectName: db/password\n- objectName: api-key\n  filePermission: 0400\n\
                 - objectName: config.json\n"
                    .to_string(),
            ),
        ]),
    })
}

/// The n-th hostile request: a different one each time, so nothing it
/// leaves behind can hide in a cache of identical inputs.
fn hostile(n: u64) -> proto::MountRequest {
    let mut params: BTreeMap<String, String> = BTreeMap::new();
    let mut d = driver(Path::new("/t"));
    d.pod.namespace = "evil".into();
    d.pod.uid = format!("evil-{n}");
    match n % 6 {
        0 => {
            let mut doc = format!("- &a [{}]\n", vec!["x"; 3000].join(","));
            for i in 0..(4000 + n % 97) {
                doc.push_str(if i % 2 == 0 { "- *a\n" } else { "- *a \n" });
            }
            params.insert("objects".into(), doc);
        }
        1 => {
            params.insert("objects".into(), "[".repeat(200_000 + (n % 1000) as usize));
        }
        2 => {
            d.node_publish_secrets = Some(BTreeMap::from([(
                "token".to_string(),
                Credential::new("t".into()),
            )]));
            params.insert("backend".into(), "vault".into());
            params.insert("vaultAddress".into(), format!("http://127.0.0.1:1/a{n}"));
            params.insert(
                "objects".into(),
                "- objectName: v\n  secretPath: secret/data/x".into(),
            );
        }
        3 => {
            let objects: String = (0..500)
                .map(|i| format!("- objectName: s{n}-{i}\n  optional: true\n"))
                .collect();
            params.insert("backend".into(), "file".into());
            params.insert("objects".into(), objects);
        }
        4 => {
            d.node_publish_secrets = Some(BTreeMap::from([(
                "token".to_string(),
                Credential::new("t".into()),
            )]));
            params.insert("backend".into(), "vault".into());
            params.insert("vaultAddress".into(), "https://127.0.0.1:1".into());
            params.insert("vaultCACertPath".into(), format!("/dev/zero{n}"));
            params.insert(
                "objects".into(),
                "- objectName: v\n  secretPath: secret/data/x".into(),
            );
        }
        _ => {
            let objects: String = (0..1000)
                .map(|i| format!("- objectName: bad{n}-{i}\n  encoding: rot13\n"))
                .collect();
            params.insert("objects".into(), objects);
        }
    }
    d.to_proto(&SecretProviderClass {
        name: format!("evil-{n}"),
        namespace: Some("evil".into()),
        provider: "coffer".into(),
        parameters: params,
    })
}

/// Least-squares slope of (seconds, KiB) and its standard error, in MiB
/// per hour.
fn slope(samples: &[(f64, u64)]) -> (f64, f64) {
    let n = samples.len() as f64;
    if n < 3.0 {
        return (0.0, 0.0);
    }
    let mx = samples.iter().map(|s| s.0).sum::<f64>() / n;
    let my = samples.iter().map(|s| s.1 as f64).sum::<f64>() / n;
    let num: f64 = samples.iter().map(|s| (s.0 - mx) * (s.1 as f64 - my)).sum();
    let den: f64 = samples.iter().map(|s| (s.0 - mx).powi(2)).sum();
    if den == 0.0 {
        return (0.0, 0.0);
    }
    let b = num / den;
    let a = my - b * mx;
    let residual: f64 = samples
        .iter()
        .map(|s| (s.1 as f64 - a - b * s.0).powi(2))
        .sum();
    let se = (residual / (n - 2.0) / den).sqrt();
    let per_hour = 3600.0 / 1024.0;
    (b * per_hour, se * per_hour)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let minutes = env_num("SOAK_MINUTES", 30);
    let sample = Duration::from_secs(env_num("SOAK_SAMPLE_SECS", 5));
    let clients = env_num("SOAK_CLIENTS", 8) as usize;
    let d = Daemon::start_with(Options {
        extra_args: vec![
            "--file-backend-scope".into(),
            "namespace".into(),
            "--backend-retries".into(),
            "0".into(),
            "--audit-log".into(),
            "/dev/null".into(),
            "--log-level".into(),
            "error".into(),
        ],
        ..Default::default()
    });
    for ns in 0..NAMESPACES {
        d.write_secret(&format!("ns{ns}/db/password"), format!("pw-{ns}-0"));
        d.write_secret(&format!("ns{ns}/api-key"), format!("key-{ns}"));
        d.write_secret(&format!("ns{ns}/config.json"), "{\"a\": 1}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let (mounts, hostile_sent, failures) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for k in 0..clients {
        let mut c = d.client().await;
        let (stop, mounts, hostile_sent, failures) = (
            stop.clone(),
            mounts.clone(),
            hostile_sent.clone(),
            failures.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut i = k as u64;
            while !stop.load(Ordering::Relaxed) {
                i += clients as u64;
                if i.is_multiple_of(50) {
                    let _ = c.mount(hostile(i / 50)).await;
                    hostile_sent.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let pod = (i as usize) % (NAMESPACES * PODS_PER_NAMESPACE);
                // Pods are replaced now and then: a new UID and path.
                let generation = i / 20_000;
                let req = pod_request(
                    pod / PODS_PER_NAMESPACE,
                    pod % PODS_PER_NAMESPACE,
                    generation,
                );
                match c.mount(req).await {
                    Ok(r) if r.get_ref().files.len() == 3 => {
                        mounts.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    // Rotation underneath: one namespace's password changes every second.
    let rot = {
        let (stop, secrets) = (stop.clone(), d.secrets.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let ns = n as usize % NAMESPACES;
                let _ = std::fs::write(
                    secrets.join(format!("ns{ns}/db/password")),
                    format!("pw-{ns}-{n}"),
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let started = Instant::now();
    let total = Duration::from_secs(minutes * 60);
    let mut samples: Vec<(f64, u64)> = Vec::new();
    println!(
        "{:>8} {:>10} {:>10} {:>8} {:>8}",
        "minute", "RSS KiB", "mounts", "hostile", "failed"
    );
    let mut printed = 0u64;
    while started.elapsed() < total {
        tokio::time::sleep(sample.min(total.saturating_sub(started.elapsed()))).await;
        let t = started.elapsed().as_secs_f64();
        let rss = d.rss_kib();
        samples.push((t, rss));
        if (t / 60.0) as u64 > printed || started.elapsed() >= total {
            printed = (t / 60.0) as u64;
            println!(
                "{:>8.1} {:>10} {:>10} {:>8} {:>8}",
                t / 60.0,
                rss,
                mounts.load(Ordering::Relaxed),
                hostile_sent.load(Ordering::Relaxed),
                failures.load(Ordering::Relaxed)
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    rot.abort();
    // Warm-up: the first half of the run (see the top of this file).
    let settled: Vec<(f64, u64)> = samples.iter().copied().skip(samples.len() / 2).collect();
    let (s, err) = slope(&settled);
    let peak = samples.iter().map(|s| s.1).max().unwrap_or(0);
    println!(
        "{} Mounts served, {} hostile requests, {} failed; peak RSS {peak} KiB; \
         slope after warm-up {s:+.3} ± {err:.3} MiB/hour over {} samples",
        mounts.load(Ordering::Relaxed),
        hostile_sent.load(Ordering::Relaxed),
        failures.load(Ordering::Relaxed),
        settled.len()
    );
    let failed = failures.load(Ordering::Relaxed);
    // Stop the daemon before exiting (process::exit runs no destructors).
    drop(d);
    assert_eq!(failed, 0, "normal Mounts failed");
    if minutes >= 30 && s - 2.0 * err > 0.1 {
        eprintln!("RSS grows: {s:+.3} ± {err:.3} MiB/hour");
        std::process::exit(1);
    }
}
