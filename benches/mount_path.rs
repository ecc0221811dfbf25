//! The Mount path against its floor: the real daemon (file backend, two
//! small objects, audit log at its default) and, in the same run, a bare
//! tonic server on a Unix socket answering a MountResponse of the same size,
//! both driven by the same load generator at 1, 8 and 64 concurrent callers
//! (one HTTP/2 connection per 8 callers). Each level runs several times,
//! floor and coffer alternating; the medians are printed. Then the warm-cache Vault path (OpenBao, every
//! Mount a cache hit) at the same levels, peak RSS under the 64-caller load,
//! RSS after 10,000 and 100,000 Mounts, CPU per 1,000 warm Mounts, and last
//! the daemon's CPU per Mount of warm Vault against file, runs alternating
//! between the two daemons.
//!
//! cargo bench --bench mount_path
//! Knobs (env): MP_SECONDS (2), MP_RUNS (3), MP_VAULT (1 = include OpenBao),
//! MP_LEVELS (1,8,64: the caller counts to run), MP_DAEMON_ARGS (more
//! `coffer serve` flags, space-separated, e.g. `--worker-threads 1`),
//! MP_FLOOR_WORK_US (0: µs the floor spends busy before each answer, to
//! measure what a fixed amount of server work costs a round trip here).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::client::ProviderClient;
use coffer::proto;
use common::{bench_request, bench_spc, env_num, median};

fn levels() -> Vec<usize> {
    std::env::var("MP_LEVELS")
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 64])
}
const CALLERS_PER_CONNECTION: usize = 8;

struct Proc {
    child: Child,
    socket: PathBuf,
}

impl Proc {
    fn wait_ready(mut self) -> Self {
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(Instant::now() < deadline, "did not start");
            assert!(self.child.try_wait().unwrap().is_none(), "exited");
            std::thread::sleep(Duration::from_millis(20));
        }
        self
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn floor(dir: &Path, template: &proto::MountResponse) -> Proc {
    let socket = dir.join("floor.sock");
    let child = Command::new(std::env::current_exe().unwrap())
        .env("MP_ROLE", "floor")
        .env("MP_SOCKET", &socket)
        .env(
            "MP_TEMPLATE",
            hex::encode(prost::Message::encode_to_vec(template)),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    Proc { child, socket }.wait_ready()
}

fn coffer(dir: &Path, name: &str, extra: &[&str]) -> Proc {
    let socket = dir.join(format!("{name}.sock"));
    // The audit log at its default (stderr), which goes to a file as a
    // container runtime's log would.
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let child = Command::new(common::BIN)
        // Everything else at its default (log level info, audit to stderr).
        .args(["serve", "--health-addr", "off", "--socket"])
        .arg(&socket)
        .arg("--file-backend-root")
        .arg(dir.join("secrets"))
        .arg("--version-key-file")
        .arg(dir.join(format!("{name}.key")))
        .args(extra)
        .args(
            std::env::var("MP_DAEMON_ARGS")
                .unwrap_or_default()
                .split_whitespace(),
        )
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc { child, socket }.wait_ready()
}

/// `callers` concurrent callers for `secs`: Mounts/s and p50 latency.
async fn level(
    socket: &Path,
    reqs: &Arc<Vec<proto::MountRequest>>,
    callers: usize,
    secs: f64,
) -> (f64, Duration) {
    let connections = callers.div_ceil(CALLERS_PER_CONNECTION);
    let mut clients: Vec<ProviderClient> = Vec::new();
    for _ in 0..connections {
        clients.push(coffer::client::connect(socket).await.unwrap());
    }
    common::drive(&clients, reqs, callers, secs).await
}

/// Context switches of every thread of `pid` so far: each is a hand-off
/// (or a wake-up) the Mount path paid for.
fn switches(pid: i32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .map(|t| {
            std::fs::read_to_string(t.path().join("status"))
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// One level's medians: Mounts/s, p50, server CPU µs per Mount and server
/// context switches per Mount.
#[derive(Clone, Copy)]
struct Figures {
    rate: f64,
    p50: Duration,
    cpu_us: f64,
    /// The load generator's own CPU per Mount (this process): what the
    /// server's answers cost the caller.
    client_us: f64,
    switches: f64,
}

/// One caller count's medians, the floor's and coffer's, from runs that
/// alternate between the two so a slow moment of the machine falls on both.
struct Paired {
    floor: Figures,
    it: Figures,
    rate_ratio: f64,
    p50_ratio: f64,
}

async fn run(
    socket: &Path,
    pid: i32,
    reqs: &Arc<Vec<proto::MountRequest>>,
    callers: usize,
    secs: f64,
) -> Figures {
    let me = std::process::id() as i32;
    let (cpu0, own0, sw0) = (common::cpu_secs(pid), common::cpu_secs(me), switches(pid));
    let (rate, p50) = level(socket, reqs, callers, secs).await;
    let n = rate * secs;
    Figures {
        rate,
        p50,
        cpu_us: (common::cpu_secs(pid) - cpu0) * 1e6 / n,
        client_us: (common::cpu_secs(me) - own0) * 1e6 / n,
        switches: (switches(pid) - sw0) as f64 / n,
    }
}

async fn measure(
    floor: &Proc,
    it: &Proc,
    reqs: &Arc<Vec<proto::MountRequest>>,
    runs: usize,
    secs: f64,
) -> Vec<Paired> {
    // Warm-up: connections, caches, allocator.
    let _ = level(&floor.socket, reqs, 8, 0.5).await;
    let _ = level(&it.socket, reqs, 8, 0.5).await;
    let mut out = Vec::new();
    for callers in levels() {
        let (mut f, mut c) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(run(&floor.socket, floor.pid(), reqs, callers, secs).await);
            c.push(run(&it.socket, it.pid(), reqs, callers, secs).await);
        }
        let pick = |v: &[Figures], get: fn(&Figures) -> f64| median(v.iter().map(get).collect());
        let both = |get: fn(&Figures) -> f64| -> f64 {
            median(f.iter().zip(&c).map(|(f, c)| get(c) / get(f)).collect())
        };
        let figures = |v: &[Figures]| Figures {
            rate: pick(v, |x| x.rate),
            p50: Duration::from_secs_f64(pick(v, |x| x.p50.as_secs_f64())),
            cpu_us: pick(v, |x| x.cpu_us),
            client_us: pick(v, |x| x.client_us),
            switches: pick(v, |x| x.switches),
        };
        out.push(Paired {
            floor: figures(&f),
            it: figures(&c),
            rate_ratio: both(|x| x.rate),
            p50_ratio: both(|x| x.p50.as_secs_f64()),
        });
    }
    out
}

fn table(label: &str, rows: &[Paired]) {
    println!("\n[{label}]");
    println!(
        "{:>7} {:>9} {:>9} {:>6} {:>10} {:>10} {:>6} {:>14} {:>14} {:>14}",
        "callers",
        "floor/s",
        "coffer/s",
        "ratio",
        "floor p50",
        "coffer p50",
        "ratio",
        "CPU µs/Mount",
        "client CPU µs",
        "switches/Mount"
    );
    for (row, callers) in rows.iter().zip(levels()) {
        let (f, c) = (row.floor, row.it);
        println!(
            "{callers:>7} {:>9.0} {:>9.0} {:>6.2} {:>10.1?} {:>10.1?} {:>6.2} {:>6.1} → {:>5.1} {:>6.1} → {:>5.1} {:>6.2} → {:>5.2}",
            f.rate, c.rate, row.rate_ratio, f.p50, c.p50, row.p50_ratio, f.cpu_us, c.cpu_us, f.client_us, c.client_us, f.switches, c.switches,
        );
    }
    println!("(ratios: medians of the per-run ratios of alternating floor and coffer runs)");
}

/// Warm Vault against file: daemon CPU per Mount, runs alternating between
/// the two daemons (each sent its own requests), so that a slow moment of
/// the shared machine falls on both; the floor's table cannot say this, as
/// its two sections run minutes apart.
async fn versus(
    file: (&Proc, &Arc<Vec<proto::MountRequest>>),
    vault: (&Proc, &Arc<Vec<proto::MountRequest>>),
    runs: usize,
    secs: f64,
) {
    println!("\n[warm Vault against file, alternating runs]");
    println!(
        "{:>7} {:>9} {:>9} {:>20} {:>6}",
        "callers", "file/s", "Vault/s", "CPU µs/Mount", "ratio"
    );
    for callers in levels() {
        let (mut f, mut v) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(run(&file.0.socket, file.0.pid(), file.1, callers, secs).await);
            v.push(run(&vault.0.socket, vault.0.pid(), vault.1, callers, secs).await);
        }
        let pick = |r: &[Figures], get: fn(&Figures) -> f64| median(r.iter().map(get).collect());
        let ratio = median(f.iter().zip(&v).map(|(f, v)| v.cpu_us / f.cpu_us).collect());
        println!(
            "{callers:>7} {:>9.0} {:>9.0} {:>9.1} → {:>8.1} {:>6.2}",
            pick(&f, |x| x.rate),
            pick(&v, |x| x.rate),
            pick(&f, |x| x.cpu_us),
            pick(&v, |x| x.cpu_us),
            ratio
        );
    }
    println!("(ratio: median of the per-run ratios of Vault's CPU per Mount to file's)");
}

/// Mounts `n` times as fast as 8 callers can; returns CPU seconds used by
/// `pid` meanwhile.
async fn mounts(socket: &Path, reqs: &Arc<Vec<proto::MountRequest>>, n: usize, pid: i32) -> f64 {
    let cpu0 = common::cpu_secs(pid);
    let mut c = coffer::client::connect(socket).await.unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..8 {
        let mut c = c.clone();
        let reqs = Arc::clone(reqs);
        tasks.spawn(async move {
            for i in (t..n).step_by(8) {
                c.mount(reqs[i % reqs.len()].clone()).await.unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let _ = c.version(proto::VersionRequest::default()).await;
    common::cpu_secs(pid) - cpu0
}

fn main() {
    if std::env::var("MP_ROLE").as_deref() == Ok("floor") {
        let socket = PathBuf::from(std::env::var("MP_SOCKET").unwrap());
        let bytes = hex::decode(std::env::var("MP_TEMPLATE").unwrap()).unwrap();
        let template: proto::MountResponse = prost::Message::decode(bytes.as_slice()).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let work = Duration::from_micros(env_num("MP_FLOOR_WORK_US", 0));
        rt.block_on(common::serve_fixed_answer_after(&socket, template, work));
        return;
    }
    let secs = env_num("MP_SECONDS", 2) as f64;
    let runs = env_num("MP_RUNS", 3) as usize;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
        std::fs::write(dir.path().join("secrets/db-password"), vec![b'p'; 32]).unwrap();
        std::fs::write(dir.path().join("secrets/api-key"), vec![b'k'; 32]).unwrap();
        let file_spc = bench_spc(&[
            ("backend", "file"),
            ("objects", "- objectName: db-password\n- objectName: api-key\n"),
        ]);
        let reqs: Arc<Vec<proto::MountRequest>> =
            Arc::new((0..64).map(|n| bench_request(&file_spc, n, None)).collect());
        // The floor answers what coffer answers, byte for byte in size.
        let daemon = coffer(dir.path(), "coffer", &[]);
        let mut c = coffer::client::connect(&daemon.socket).await.unwrap();
        let template = c.mount(reqs[0].clone()).await.unwrap().into_inner();
        let floor = floor(dir.path(), &template);
        println!(
            "file backend, 2 objects of 32 bytes, audit log to stderr (a file); response {} bytes; {secs} s × {runs} runs per level, medians",
            prost::Message::encoded_len(&template)
        );
        let work = env_num("MP_FLOOR_WORK_US", 0);
        if work > 0 {
            println!("the floor is busy {work} µs before each answer (MP_FLOOR_WORK_US)");
        }
        let rows = measure(&floor, &daemon, &reqs, runs, secs).await;
        table("file backend vs floor", &rows);
        let peak = common::proc_status(daemon.pid(), "VmHWM:");
        println!(
            "daemon peak RSS (VmHWM) after the 64-caller runs: {:.1} MiB (now: heap and stacks {:.1} MiB, mapped files {:.1} MiB)",
            peak as f64 / 1024.0,
            common::proc_status(daemon.pid(), "RssAnon:") as f64 / 1024.0,
            common::proc_status(daemon.pid(), "RssFile:") as f64 / 1024.0,
        );
        let n10 = 10_000;
        let cpu10 = mounts(&daemon.socket, &reqs, n10, daemon.pid()).await;
        let rss10 = common::proc_status(daemon.pid(), "VmRSS:");
        let cpu100 = mounts(&daemon.socket, &reqs, 90_000, daemon.pid()).await;
        let rss100 = common::proc_status(daemon.pid(), "VmRSS:");
        println!(
            "RSS after 10,000 more Mounts {:.2} MiB, after 100,000 {:.2} MiB ({:+.2} MiB); CPU per 1,000 Mounts {:.3} s",
            rss10 as f64 / 1024.0,
            rss100 as f64 / 1024.0,
            (rss100 as f64 - rss10 as f64) / 1024.0,
            (cpu10 + cpu100) / 100.0
        );

        if env_num("MP_VAULT", 1) == 1 {
            let bao = common::bao::Bao::start().await;
            bao.put_kv2("db", serde_json::json!({"password": "p".repeat(32), "key": "k".repeat(32)}))
                .await;
            let vault_spc = bench_spc(&[
                ("backend", "vault"),
                ("vaultAddress", &bao.addr()),
                (
                    "objects",
                    "- objectName: db-password\n  secretPath: secret/data/db\n  secretKey: password\n\
                     - objectName: api-key\n  secretPath: secret/data/db\n  secretKey: key\n",
                ),
            ]);
            let vreqs: Arc<Vec<proto::MountRequest>> = Arc::new(
                (0..64)
                    .map(|n| bench_request(&vault_spc, n, Some(common::bao::ROOT)))
                    .collect(),
            );
            let vd = coffer(dir.path(), "vault", &["--cache-ttl", "1h"]);
            let rows = measure(&floor, &vd, &vreqs, runs, secs).await;
            table("Vault (OpenBao), warm cache hits, vs the same floor", &rows);
            let cpu = mounts(&vd.socket, &vreqs, 10_000, vd.pid()).await;
            println!("CPU per 1,000 warm Vault Mounts {:.3} s", cpu / 10.0);
            drop(floor);
            versus((&daemon, &reqs), (&vd, &vreqs), runs, secs).await;
        }
    });
}
