//! Load benchmark: the real daemon (this binary re-executed as a child
//! process, serving over its Unix socket with the production server code)
//! driven by N concurrent simulated pods × M objects, against an in-process
//! backend with configurable latency and against a real OpenBao dev server;
//! cache on and off; and the floor: a bare tonic server on a Unix socket
//! answering a fixed MountResponse of the same size. Prints figures; asserts
//! nothing.
//!
//! cargo bench --bench load
//! Knobs (env): BENCH_PODS (200), BENCH_OBJECTS (5), BENCH_LATENCY_MS (2),
//! BENCH_SECONDS (3), BENCH_MOUNTS (10000).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use coffer::backend::{Backend, FetchLimits, Fetched};
use coffer::client::ProviderClient;
use coffer::error::ObjectError;
use coffer::key::Key;
use coffer::manifest::{DriverRequest, Pod, SecretProviderClass};
use coffer::proto;
use coffer::request::MountContext;
use coffer::secret::SecretBytes;
use coffer::spc::ObjectSpec;
use common::env_num;

/// A backend that answers after a fixed latency, counting its calls.
/// Pods of one service account share cache keys, as a real backend's
/// authorization would let them.
struct LatencyBackend {
    latency: Duration,
    value: Vec<u8>,
    calls: Arc<AtomicU64>,
}

#[async_trait]
impl Backend for LatencyBackend {
    fn name(&self) -> &'static str {
        "latency"
    }
    fn validate(&self, object: &ObjectSpec, _: &MountContext) -> Result<(), ObjectError> {
        object.reject_unknown_fields(&[])
    }
    fn cache_key(&self, object: &ObjectSpec, ctx: &MountContext) -> Option<Key> {
        Some(Key::of(
            "latency",
            &[&ctx.pod.namespace, &ctx.pod.service_account, &object.name],
        ))
    }
    fn limit_scope(&self, _: &MountContext) -> Option<Key> {
        Some(Key::of("latency", &[]))
    }
    async fn fetch(
        &self,
        _: &ObjectSpec,
        _: &MountContext,
        _: FetchLimits,
    ) -> Result<Fetched, ObjectError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
        Ok(Fetched::new(
            SecretBytes::new(self.value.clone()),
            Some("v1".into()),
        ))
    }
}

/// Child role: the daemon, with the latency backend added.
async fn run_daemon(args: Vec<String>) {
    let serve = coffer::config::ServeArgs::from_args(args).unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let mut registry = coffer::server::backends(&serve);
    registry.register(Arc::new(LatencyBackend {
        latency: Duration::from_millis(env_num("BENCH_LATENCY_MS", 2)),
        value: vec![b's'; 64],
        calls: calls.clone(),
    }));
    let count_file = PathBuf::from(std::env::var("BENCH_COUNT_FILE").unwrap());
    tokio::spawn(async move {
        loop {
            let _ = std::fs::write(&count_file, calls.load(Ordering::Relaxed).to_string());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
    coffer::server::serve_with_backends(&serve, registry, async move {
        term.recv().await;
    })
    .await
    .unwrap();
}

/// Child role: the floor, a bare tonic server with a fixed answer.
async fn run_floor(socket: PathBuf, objects: usize) {
    let mut resp = proto::MountResponse::default();
    for i in 0..objects {
        resp.files.push(proto::File {
            path: format!("obj-{i}"),
            mode: 0o644,
            contents: vec![b's'; 64],
        });
        resp.object_version.push(proto::ObjectVersion {
            id: format!("obj-{i}"),
            version: "v1".into(),
        });
    }
    common::serve_fixed_answer(&socket, resp).await;
}

struct ChildProc {
    child: Child,
    socket: PathBuf,
    count_file: PathBuf,
}

impl ChildProc {
    fn spawn(role: &str, dir: &Path, name: &str, daemon_args: &[String]) -> Self {
        let socket = dir.join(format!("{name}.sock"));
        let count_file = dir.join(format!("{name}.calls"));
        let child = Command::new(std::env::current_exe().unwrap())
            .env("BENCH_ROLE", role)
            .env("BENCH_SOCKET", &socket)
            .env("BENCH_COUNT_FILE", &count_file)
            .env("BENCH_DAEMON_ARGS", daemon_args.join("\u{1f}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "{name} did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        ChildProc {
            child,
            socket,
            count_file,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn calls(&self) -> u64 {
        std::thread::sleep(Duration::from_millis(60));
        std::fs::read_to_string(&self.count_file)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks / hz
}

fn spc(backend: &str, objects: usize, extra: &[(&str, String)]) -> SecretProviderClass {
    let list: String = (0..objects)
        .map(|i| format!("- objectName: obj-{i}\n"))
        .collect();
    let mut parameters = BTreeMap::from([
        ("backend".to_string(), backend.to_string()),
        ("objects".to_string(), list),
    ]);
    for (k, v) in extra {
        parameters.insert(k.to_string(), v.clone());
    }
    SecretProviderClass {
        name: "bench".into(),
        namespace: None,
        provider: "coffer".into(),
        parameters,
    }
}

/// Pod `n`: ten pods per service account.
fn pod_request(
    spc: &SecretProviderClass,
    n: usize,
    tokens: &[(&str, String)],
) -> proto::MountRequest {
    DriverRequest {
        pod: Pod {
            namespace: "bench".into(),
            name: format!("pod-{n}"),
            uid: format!("uid-{n}"),
            service_account: format!("sa-{}", n / 10),
        },
        tokens: tokens
            .iter()
            .map(|(a, t)| (a.to_string(), coffer::secret::Credential::new(t.clone())))
            .collect(),
        node_publish_secrets: None,
        volume_attributes: BTreeMap::new(),
        permission: 0o644,
        target_path: format!("/var/lib/kubelet/pods/uid-{n}/volumes/v/mount"),
    }
    .to_proto(spc)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p) as usize]
}

/// Sequential Mounts: latency at concurrency 1.
async fn latency_c1(
    client: &mut ProviderClient,
    reqs: &[proto::MountRequest],
    n: usize,
) -> (Duration, Duration) {
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        client.mount(reqs[i % reqs.len()].clone()).await.unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    (pct(&samples, 0.5), pct(&samples, 0.99))
}

/// `conc` pods mounting in a loop for `secs`: Mounts/s and latencies.
async fn throughput(
    socket: &Path,
    reqs: Arc<Vec<proto::MountRequest>>,
    conc: usize,
    secs: u64,
) -> (f64, Duration, Duration) {
    let clients: Vec<ProviderClient> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(coffer::client::connect(socket).await.unwrap());
        }
        v
    };
    let stop = Instant::now() + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..conc {
        let mut c = clients[t % clients.len()].clone();
        let reqs = Arc::clone(&reqs);
        tasks.spawn(async move {
            let mut lat = Vec::new();
            let mut i = t;
            while Instant::now() < stop {
                let s = Instant::now();
                c.mount(reqs[i % reqs.len()].clone()).await.unwrap();
                lat.push(s.elapsed());
                i += conc;
            }
            lat
        });
    }
    let started = Instant::now();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r.unwrap());
    }
    let rate = all.len() as f64 / started.elapsed().as_secs_f64();
    all.sort();
    (rate, pct(&all, 0.5), pct(&all, 0.99))
}

/// One rotation round: every pod mounts once, all at once.
async fn round(socket: &Path, reqs: &[proto::MountRequest]) {
    let client = coffer::client::connect(socket).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for r in reqs {
        let (mut c, r) = (client.clone(), r.clone());
        tasks.spawn(async move { c.mount(r).await.unwrap() });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
}

struct Floor {
    rate: f64,
    p50_c1: Duration,
}

async fn measure_latency_backend(dir: &Path, label: &str, cache: bool, floor: &Floor) {
    let pods = env_num("BENCH_PODS", 200) as usize;
    let objects = env_num("BENCH_OBJECTS", 5) as usize;
    let secs = env_num("BENCH_SECONDS", 3);
    let mut args: Vec<String> = [
        "--health-addr",
        "off",
        "--backend-qps",
        "0",
        "--backend-max-in-flight",
        "1000",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--version-key-file".into(),
        dir.join(format!("{label}.key")).display().to_string(),
    ]);
    if !cache {
        args.extend(["--cache-ttl".into(), "0s".into()]);
    }
    let mut child_args = args.clone();
    child_args.extend([
        "--socket".into(),
        dir.join(format!("{label}.sock")).display().to_string(),
    ]);
    let daemon = ChildProc::spawn("daemon", dir, label, &child_args);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = status_kib(daemon.pid(), "VmRSS:");
    let spc = spc("latency", objects, &[]);
    let reqs: Vec<proto::MountRequest> = (0..pods).map(|n| pod_request(&spc, n, &[])).collect();

    let before = daemon.calls();
    round(&daemon.socket, &reqs).await;
    let cold = daemon.calls() - before;
    let before = daemon.calls();
    round(&daemon.socket, &reqs).await;
    let warm = daemon.calls() - before;

    let mut client = coffer::client::connect(&daemon.socket).await.unwrap();
    let (p50, p99) = latency_c1(&mut client, &reqs, 2000).await;
    let (rate, tp50, tp99) = throughput(&daemon.socket, Arc::new(reqs.clone()), 64, secs).await;

    let mounts = env_num("BENCH_MOUNTS", 10_000) as usize;
    let rss_warm = status_kib(daemon.pid(), "VmRSS:");
    let cpu0 = cpu_seconds(daemon.pid());
    let reqs = Arc::new(reqs);
    let per_task = mounts / 16;
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..16 {
        let mut c = client.clone();
        let reqs = Arc::clone(&reqs);
        tasks.spawn(async move {
            for i in 0..per_task {
                c.mount(reqs[(t * per_task + i) % reqs.len()].clone())
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let cpu = cpu_seconds(daemon.pid()) - cpu0;
    let rss_after = status_kib(daemon.pid(), "VmRSS:");
    let peak = status_kib(daemon.pid(), "VmHWM:");
    println!("\n[{label}] latency backend {} ms, {pods} pods × {objects} objects ({} service accounts), cache {}",
        env_num("BENCH_LATENCY_MS", 2), pods.div_ceil(10), if cache { "on" } else { "off" });
    println!("  backend calls per rotation round: cold {cold}, warm {warm} (pods × objects = {}, distinct keys = {})",
        pods * objects, pods.div_ceil(10) * objects);
    println!(
        "  concurrency 1: p50 {p50:.1?} p99 {p99:.1?}  ({:.2}x floor p50)",
        p50.as_secs_f64() / floor.p50_c1.as_secs_f64()
    );
    println!(
        "  concurrency 64: {rate:.0} Mounts/s ({:.2}x floor), p50 {tp50:.1?} p99 {tp99:.1?}",
        rate / floor.rate
    );
    println!("  daemon RSS: idle {:.1} MiB, after warm-up {:.1} MiB, after {mounts} more mounts {:.1} MiB, peak {:.1} MiB",
        idle_rss as f64 / 1024.0, rss_warm as f64 / 1024.0, rss_after as f64 / 1024.0, peak as f64 / 1024.0);
    println!(
        "  daemon CPU: {:.3} s per 1,000 mounts",
        cpu / (mounts as f64 / 1000.0)
    );
}

async fn measure_openbao(dir: &Path) {
    let bao = common::bao::Bao::start().await;
    let signer = common::bao::Signer::new();
    bao.policy("app", "path \"secret/*\" { capabilities = [\"read\"] }")
        .await;
    common::bao::setup_jwt(&bao, &signer, &["app"]).await;
    // The role binds one service account: all bench pods run as it.
    let objects = 3;
    for i in 0..objects {
        bao.put_kv2(&format!("obj-{i}"), serde_json::json!({"v": "value"}))
            .await;
    }
    let pods = 50;
    let list: String = (0..objects)
        .map(|i| {
            format!("- objectName: obj-{i}\n  secretPath: secret/data/obj-{i}\n  secretKey: v\n")
        })
        .collect();
    let spc = SecretProviderClass {
        name: "bench".into(),
        namespace: None,
        provider: "coffer".into(),
        parameters: BTreeMap::from([
            ("backend".to_string(), "vault".to_string()),
            ("vaultAddress".to_string(), bao.addr()),
            ("roleName".to_string(), "app".to_string()),
            ("vaultAuthMountPath".to_string(), "jwt".to_string()),
            ("objects".to_string(), list),
        ]),
    };
    let jwt = signer.token("shop", "web", "vault", 3600);
    let reqs: Vec<proto::MountRequest> = (0..pods)
        .map(|n| {
            let mut r = pod_request(&spc, n, &[("vault", jwt.clone())]);
            let mut attrs: BTreeMap<String, String> = serde_json::from_str(&r.attributes).unwrap();
            attrs.insert("csi.storage.k8s.io/pod.namespace".into(), "shop".into());
            attrs.insert(
                "csi.storage.k8s.io/serviceAccount.name".into(),
                "web".into(),
            );
            r.attributes = serde_json::to_string(&attrs).unwrap();
            r
        })
        .collect();
    for cache in [true, false] {
        let label = if cache { "bao-cache" } else { "bao-nocache" };
        let mut args: Vec<String> = vec![
            "--health-addr".into(),
            "off".into(),
            "--socket".into(),
            dir.join(format!("{label}.sock")).display().to_string(),
            "--version-key-file".into(),
            dir.join(format!("{label}.key")).display().to_string(),
            "--backend-qps".into(),
            "0".into(),
        ];
        if !cache {
            args.extend(["--cache-ttl".into(), "0s".into()]);
        }
        let daemon = ChildProc::spawn("daemon", dir, label, &args);
        let audit = bao.audit_path();
        let count = || {
            common::bao::audited_requests(&audit, "read", "secret/data/obj-0")
                + common::bao::audited_requests(&audit, "read", "secret/data/obj-1")
                + common::bao::audited_requests(&audit, "read", "secret/data/obj-2")
        };
        round(&daemon.socket, &reqs).await;
        let before = count();
        let t = Instant::now();
        round(&daemon.socket, &reqs).await;
        let elapsed = t.elapsed();
        let warm = count() - before;
        let mut client = coffer::client::connect(&daemon.socket).await.unwrap();
        let (p50, p99) = latency_c1(&mut client, &reqs, 500).await;
        let (rate, _, _) = throughput(&daemon.socket, Arc::new(reqs.clone()), 32, 2).await;
        println!("\n[{label}] OpenBao, {pods} pods × {objects} KV v2 objects, one service account, cache {}",
            if cache { "on" } else { "off" });
        println!("  Vault reads per rotation round: {warm} (pods × objects = {}); round took {elapsed:.1?}", pods * objects);
        println!(
            "  concurrency 1: p50 {p50:.1?} p99 {p99:.1?}; concurrency 32: {rate:.0} Mounts/s"
        );
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    match std::env::var("BENCH_ROLE").as_deref() {
        Ok("daemon") => {
            let args: Vec<String> = std::env::var("BENCH_DAEMON_ARGS")
                .unwrap_or_default()
                .split('\u{1f}')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            return rt.block_on(run_daemon(args));
        }
        Ok("floor") => {
            let socket = PathBuf::from(std::env::var("BENCH_SOCKET").unwrap());
            return rt.block_on(run_floor(socket, env_num("BENCH_OBJECTS", 5) as usize));
        }
        _ => {}
    }
    // `cargo bench` passes --bench; nothing else to parse.
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pods = env_num("BENCH_PODS", 200) as usize;
        let objects = env_num("BENCH_OBJECTS", 5) as usize;
        let floor_proc = ChildProc::spawn("floor", dir.path(), "floor", &[]);
        let spc = spc("latency", objects, &[]);
        let reqs: Vec<proto::MountRequest> = (0..pods).map(|n| pod_request(&spc, n, &[])).collect();
        let mut client = coffer::client::connect(&floor_proc.socket).await.unwrap();
        latency_c1(&mut client, &reqs, 200).await;
        let (p50, p99) = latency_c1(&mut client, &reqs, 2000).await;
        let (rate, tp50, tp99) = throughput(
            &floor_proc.socket,
            Arc::new(reqs),
            64,
            env_num("BENCH_SECONDS", 3),
        )
        .await;
        drop(floor_proc);
        println!("[floor] bare tonic server, fixed {objects}-file MountResponse");
        println!("  concurrency 1: p50 {p50:.1?} p99 {p99:.1?}");
        println!("  concurrency 64: {rate:.0} Mounts/s, p50 {tp50:.1?} p99 {tp99:.1?}");
        let floor = Floor { rate, p50_c1: p50 };
        measure_latency_backend(dir.path(), "cache-on", true, &floor).await;
        measure_latency_backend(dir.path(), "cache-off", false, &floor).await;
        measure_openbao(dir.path()).await;
    });
}
