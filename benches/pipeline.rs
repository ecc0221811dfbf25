//! The Mount pipeline in process, without gRPC or sockets: CPU per Mount of
//! the file backend and of the warm-cache Vault path (OpenBao, every Mount a
//! cache hit after the first), the same two 32-byte objects and pod, the
//! audit log to a file, as the daemon runs them (request parse, plan, policy,
//! fetch, audit). The socket benchmark (`mount_path`) varies by ±10% from run
//! to run on a shared 2-core machine, too much to compare two backends whose
//! difference is a few hundred nanoseconds; this one runs one caller on one
//! thread, alternates the two backends and prints medians (and the calling
//! thread's allocations per Mount, request copy included). Asserts nothing.
//!
//! cargo bench --bench pipeline
//! Knobs (env): PL_MOUNTS (20000 per run), PL_RUNS (7), PL_TRACE (set: first
//! print where each allocation of one Mount of each backend was made).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use coffer::config::ServeArgs;
use coffer::mount::Mounter;
use coffer::proto;
use common::{bench_request, bench_spc, env_num, median};

/// As the daemon: mimalloc, with this thread's allocations counted.
#[global_allocator]
static GLOBAL: Counted = Counted;

struct Counted;

thread_local! {
    static ALLOCATIONS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static TRACING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
static TRACE_ON: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
static TRACES: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

// SAFETY: forwards to mimalloc unchanged; the count is a thread-local cell.
unsafe impl std::alloc::GlobalAlloc for Counted {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        if TRACE_ON.load(std::sync::atomic::Ordering::Relaxed) {
            let _ = TRACING.try_with(|t| {
                if !t.get() {
                    t.set(true);
                    let bt = std::backtrace::Backtrace::force_capture().to_string();
                    TRACES
                        .lock()
                        .unwrap()
                        .push(format!("size {}\n{bt}", layout.size()));
                    t.set(false);
                }
            });
        }
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, size) }
    }
}

fn process_cpu() -> Duration {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .expect("process CPU clock");
    Duration::new(t.tv_sec() as u64, t.tv_nsec() as u32)
}

/// `n` Mounts one after another: (CPU, wall) per Mount, in ns.
async fn run(mounter: &Arc<Mounter>, req: &proto::MountRequest, n: usize) -> (f64, f64, f64) {
    let allocations = || ALLOCATIONS.with(|a| a.get());
    let (cpu0, wall0, a0) = (process_cpu(), Instant::now(), allocations());
    for _ in 0..n {
        let ctx = mounter.parse(req.clone()).await.expect("request");
        let response = mounter.mount(Arc::new(ctx)).await.expect("Mount");
        assert_eq!(response.files.len(), 2);
    }
    let per = |d: Duration| d.as_nanos() as f64 / n as f64;
    (
        per(process_cpu() - cpu0),
        per(wall0.elapsed()),
        (allocations() - a0) as f64 / n as f64,
    )
}

fn main() {
    let n = env_num("PL_MOUNTS", 20_000) as usize;
    let runs = env_num("PL_RUNS", 7) as usize;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("tempdir");
        let secrets = dir.path().join("secrets");
        std::fs::create_dir_all(&secrets).expect("secrets dir");
        std::fs::write(secrets.join("db-password"), vec![b'p'; 32]).expect("write");
        std::fs::write(secrets.join("api-key"), vec![b'k'; 32]).expect("write");
        // Files younger than this are read on every Mount, as a file being
        // rewritten would be; the daemon keeps settled ones.
        let settled = Instant::now() + coffer::nodefs::SETTLE + Duration::from_millis(200);
        let bao = common::bao::Bao::start().await;
        bao.put_kv2(
            "db",
            serde_json::json!({"password": "p".repeat(32), "key": "k".repeat(32)}),
        )
        .await;

        let args = ServeArgs::from_args([
            "--socket".into(),
            dir.path().join("unused.sock").into_os_string(),
            "--file-backend-root".into(),
            secrets.into_os_string(),
            "--version-key-file".into(),
            dir.path().join("version.key").into_os_string(),
            "--audit-log".into(),
            dir.path().join("audit.log").into_os_string(),
            "--cache-ttl".into(),
            "1h".into(),
        ])
        .expect("arguments");
        let auditor = coffer::audit::Auditor::start(args.audit_log.clone(), false);
        let mounter = Arc::new(Mounter::new(
            coffer::server::backends(&args),
            coffer::version::VersionKey::random().expect("version key"),
            coffer::server::mount_config(&args),
            coffer::cache::Cache::new(args.cache_ttl, args.cache_max_bytes),
            Arc::new(coffer::limit::Limiter::new(coffer::server::limit_config(
                &args,
            ))),
            auditor,
            coffer::policy::PolicyHandle::load(None, BTreeMap::new()).expect("policy"),
        ));

        let file = bench_request(
            &bench_spc(&[
                ("backend", "file"),
                ("objects", "- objectName: db-password\n- objectName: api-key\n"),
            ]),
            0,
            None,
        );
        let vault = bench_request(
            &bench_spc(&[
                ("backend", "vault"),
                ("vaultAddress", &bao.addr()),
                (
                    "objects",
                    "- objectName: db-password\n  secretPath: secret/data/db\n  secretKey: password\n\
                     - objectName: api-key\n  secretPath: secret/data/db\n  secretKey: key\n",
                ),
            ]),
            0,
            Some(common::bao::ROOT),
        );
        tokio::time::sleep_until(settled.into()).await;
        // Warm: the Vault answers cached, both plans parsed, pages touched.
        run(&mounter, &file, n / 10).await;
        run(&mounter, &vault, n / 10).await;

        if std::env::var("PL_TRACE").is_ok() {
            TRACE_ON.store(true, std::sync::atomic::Ordering::Relaxed);
            run(&mounter, &file, 1).await;
            TRACE_ON.store(false, std::sync::atomic::Ordering::Relaxed);
            for t in TRACES.lock().unwrap().drain(..) {
                println!("=====\n{t}");
            }
            TRACE_ON.store(true, std::sync::atomic::Ordering::Relaxed);
            run(&mounter, &vault, 1).await;
            TRACE_ON.store(false, std::sync::atomic::Ordering::Relaxed);
            for t in TRACES.lock().unwrap().drain(..) {
                println!("=====V\n{t}");
            }
        }
        let (mut f, mut v) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            f.push(run(&mounter, &file, n).await);
            v.push(run(&mounter, &vault, n).await);
        }
        let cpu = |r: &[(f64, f64, f64)]| median(r.iter().map(|x| x.0).collect());
        let wall = |r: &[(f64, f64, f64)]| median(r.iter().map(|x| x.1).collect());
        let allocs = |r: &[(f64, f64, f64)]| median(r.iter().map(|x| x.2).collect());
        let ratios: Vec<f64> = f.iter().zip(&v).map(|(f, v)| v.0 / f.0).collect();
        println!(
            "Mount pipeline in process, 1 caller, {n} Mounts × {runs} runs per backend, medians \
             (2 objects of 32 bytes, audit log to a file)"
        );
        println!("backend        CPU ns/Mount  wall ns/Mount  allocations/Mount");
        println!(
            "file           {:>12.0}  {:>13.0}  {:>17.1}",
            cpu(&f),
            wall(&f),
            allocs(&f)
        );
        println!(
            "vault (warm)   {:>12.0}  {:>13.0}  {:>17.1}",
            cpu(&v),
            wall(&v),
            allocs(&v)
        );
        println!(
            "warm Vault / file CPU: median {:.3} (runs: {})",
            median(ratios.clone()),
            ratios
                .iter()
                .map(|r| format!("{r:.3}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    });
}
