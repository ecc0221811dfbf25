//! The audit log: one JSON record per object per Mount saying who (pod,
//! service account) read what (backend, object address, version served,
//! from cache or backend) and how it went. Never a value. A separate stream
//! from the logs, written by its own task so Mounts never wait on it; a full
//! or failing sink is counted and logged, and `--audit-fail-closed` makes
//! Mounts fail instead of going unrecorded.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::METRICS;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    Off,
    Stderr,
    File(PathBuf),
}

impl std::str::FromStr for Sink {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "off" => Sink::Off,
            "stderr" => Sink::Stderr,
            "" => return Err("empty audit sink: use a path, stderr or off".into()),
            path => Sink::File(PathBuf::from(path)),
        })
    }
}

/// One object of one Mount.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: String,
    pub audit: &'static str,
    pub pod_namespace: &'a str,
    pub pod_name: &'a str,
    pub pod_uid: &'a str,
    pub service_account: &'a str,
    pub spc: &'a str,
    pub backend: &'a str,
    pub object: &'a str,
    /// Where the backend holds it (path, never a value).
    pub address: &'a str,
    pub version: Option<&'a str>,
    /// backend | cache | joined | stale | absent | none
    pub source: &'a str,
    pub outcome: &'a str,
    pub code: &'a str,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the audit log cannot take records ({0}); refusing to serve unrecorded (--audit-fail-closed)"
)]
pub struct AuditUnavailable(pub &'static str);

pub struct Auditor {
    tx: Option<mpsc::Sender<String>>,
    fail_closed: bool,
    healthy: Arc<AtomicBool>,
    /// The writer has written everything it took from the queue.
    idle: Arc<AtomicBool>,
}

/// Records queued at most; at the batching pause below this absorbs
/// ~50,000 records per second without drops.
const CAPACITY: usize = 65536;
/// The writer collects records for this long between writes: one write and
/// one wake-up per batch instead of per record keeps auditing off the
/// Mount path's CPU budget. It is also the longest a record waits.
const BATCH_PAUSE: Duration = Duration::from_millis(25);

impl Auditor {
    /// Starts the writer task for `sink` (needs a tokio runtime).
    pub fn start(sink: Sink, fail_closed: bool) -> Arc<Self> {
        let healthy = Arc::new(AtomicBool::new(true));
        let idle = Arc::new(AtomicBool::new(true));
        let tx = match sink {
            Sink::Off => None,
            sink => {
                let (tx, rx) = mpsc::channel(CAPACITY);
                let (h, i) = (Arc::clone(&healthy), Arc::clone(&idle));
                std::thread::Builder::new()
                    .name("coffer-audit".into())
                    .spawn(move || writer(sink, rx, h, i))
                    .ok()
                    .map(|_| tx)
            }
        };
        Arc::new(Self {
            tx,
            fail_closed,
            healthy,
            idle,
        })
    }

    pub fn disabled() -> Arc<Self> {
        Self::start(Sink::Off, false)
    }

    /// May Mounts proceed? (Only ever false when failing closed.)
    pub fn check(&self) -> Result<(), AuditUnavailable> {
        if self.fail_closed && self.tx.is_some() && !self.healthy.load(Ordering::Relaxed) {
            return Err(AuditUnavailable("the sink is failing"));
        }
        Ok(())
    }

    /// Waits (up to `limit`) until every queued record has been written;
    /// called at shutdown so the last Mounts are on record.
    pub async fn flush(&self, limit: Duration) {
        let Some(tx) = &self.tx else {
            return;
        };
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if tx.capacity() == tx.max_capacity() && self.idle.load(Ordering::Acquire) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Queues a record without waiting.
    pub fn record(&self, record: &Record<'_>) -> Result<(), AuditUnavailable> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(_) => return Ok(()),
        };
        match tx.try_send(line) {
            Ok(()) => Ok(()),
            Err(_) => {
                METRICS.audit_dropped.inc();
                tracing::warn!("audit record dropped: the audit sink is full or gone");
                if self.fail_closed {
                    Err(AuditUnavailable("the sink is full"))
                } else {
                    Ok(())
                }
            }
        }
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// The writer thread: blocking writes, flushed whenever the queue drains.
fn writer(
    sink: Sink,
    mut rx: mpsc::Receiver<String>,
    healthy: Arc<AtomicBool>,
    idle: Arc<AtomicBool>,
) {
    let mut last_warning: Option<Instant> = None;
    let mut report = |e: &std::io::Error| {
        METRICS.audit_errors.inc();
        healthy.store(false, Ordering::Relaxed);
        if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
            last_warning = Some(Instant::now());
            tracing::error!(error = %e, "cannot write the audit log");
        }
    };
    let open = |path: &PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
    };
    let mut file = match &sink {
        Sink::File(p) => match open(p) {
            Ok(f) => Some(f),
            Err(e) => {
                report(&e);
                None
            }
        },
        _ => None,
    };
    while let Some(line) = rx.blocking_recv() {
        idle.store(false, Ordering::Release);
        let mut batch = line;
        batch.push('\n');
        while let Ok(more) = rx.try_recv() {
            batch.push_str(&more);
            batch.push('\n');
            if batch.len() > 1 << 20 {
                break;
            }
        }
        let written = match &sink {
            Sink::Stderr => std::io::stderr().lock().write_all(batch.as_bytes()),
            Sink::File(p) => {
                if file.is_none() {
                    file = open(p).map_err(|e| report(&e)).ok();
                }
                match file.as_mut() {
                    Some(f) => f.write_all(batch.as_bytes()).and_then(|_| f.flush()),
                    None => Err(std::io::Error::other("audit log not open")),
                }
            }
            Sink::Off => Ok(()),
        };
        let lines = batch.matches('\n').count() as u64;
        match written {
            Ok(()) => {
                METRICS.audit_records.inc_by(lines);
                healthy.store(true, Ordering::Relaxed);
            }
            Err(e) => {
                METRICS.audit_dropped.inc_by(lines);
                report(&e);
                // Reopen next time (rotated or replaced file).
                file = None;
            }
        }
        idle.store(true, Ordering::Release);
        std::thread::sleep(BATCH_PAUSE);
    }
}
