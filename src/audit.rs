//! The audit log: one JSON record per object per Mount saying who (pod,
//! service account) read what (backend, object address, version served,
//! from cache or backend) and how it went. Never a value. A separate stream
//! from the logs, written by its own thread: by default Mounts never wait on
//! it, and a full or failing sink is counted and logged. With
//! `--audit-fail-closed` a Mount is answered only after its records are
//! written (accepted by the kernel), and fails otherwise; the writer tries
//! the sink again with every batch, so it recovers by itself.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::logging::Throttle;
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

/// One object of one Mount. Written by [`Record::write_json`]; the serde
/// form is the reference its output is tested against.
#[derive(Debug, Serialize)]
pub struct Record<'a> {
    pub time: &'a str,
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
    /// The policy rule that refused the object (`default` when none
    /// matched); absent otherwise.
    #[serde(skip_serializing_if = "str::is_empty")]
    pub rule: &'a str,
}

impl Record<'_> {
    /// Appends the record as one JSON object, byte for byte what serde_json
    /// writes for it: field names are constants here, so the per-field
    /// name escaping and state machine of a generic serializer are skipped
    /// (this runs for every object of every Mount).
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let fields: [(&[u8], &str); 10] = [
            (b"{\"time\":", self.time),
            (b",\"audit\":", self.audit),
            (b",\"pod_namespace\":", self.pod_namespace),
            (b",\"pod_name\":", self.pod_name),
            (b",\"pod_uid\":", self.pod_uid),
            (b",\"service_account\":", self.service_account),
            (b",\"spc\":", self.spc),
            (b",\"backend\":", self.backend),
            (b",\"object\":", self.object),
            (b",\"address\":", self.address),
        ];
        for (name, value) in fields {
            out.extend_from_slice(name);
            json_str(out, value);
        }
        out.extend_from_slice(b",\"version\":");
        match self.version {
            Some(v) => json_str(out, v),
            None => out.extend_from_slice(b"null"),
        }
        for (name, value) in [
            (&b",\"source\":"[..], self.source),
            (b",\"outcome\":", self.outcome),
            (b",\"code\":", self.code),
        ] {
            out.extend_from_slice(name);
            json_str(out, value);
        }
        if !self.rule.is_empty() {
            out.extend_from_slice(b",\"rule\":");
            json_str(out, self.rule);
        }
        out.push(b'}');
    }
}

/// A JSON string: copied as is when nothing in it needs escaping (the
/// usual name or path), else escaped by serde_json itself.
fn json_str(out: &mut Vec<u8>, s: &str) {
    // No early exit: the compiler turns this into vector compares, where
    // a byte-at-a-time `all` was a visible share of each Mount's audit.
    let plain = !s.bytes().fold(false, |bad, b| {
        bad | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if plain {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, s).is_err() {
        // Writing to a Vec cannot fail; keep the record valid JSON anyway.
        out.extend_from_slice(b"\"\"");
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the audit log cannot take records ({0}); refusing to serve unrecorded (--audit-fail-closed)"
)]
pub struct AuditUnavailable(pub &'static str);

/// The records of one Mount, written together; in fail-closed mode the
/// Mount waits for `ack`.
struct Batch {
    lines: Vec<u8>,
    records: u64,
    ack: Option<oneshot::Sender<bool>>,
}

pub struct Auditor {
    tx: Option<mpsc::Sender<Batch>>,
    fail_closed: bool,
    /// Bytes queued and not yet written: the queue is bounded by bytes, not
    /// by Mounts, since one Mount may carry up to a thousand records.
    queued: Arc<AtomicUsize>,
    /// The writer has written everything it took from the queue.
    idle: Arc<AtomicBool>,
    /// The writer thread, woken early when much is queued.
    writer: Option<std::thread::Thread>,
}

/// Mounts queued at most.
const CAPACITY: usize = 8192;
/// Bytes queued at most (about 40,000 records).
const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Records of one failed Mount written one by one; the rest are summarised
/// in one record, so a list of 1,000 bad objects costs 51 lines, not 1,000.
pub const MAX_FAILURE_RECORDS: usize = 50;
/// In fail-open mode the writer collects records for this long between
/// writes: one write and one wake-up per batch keeps auditing off the Mount
/// path's CPU budget. It is also the longest a record waits. In fail-closed
/// mode Mounts wait for their records, so the writer does not pause.
const BATCH_PAUSE: Duration = Duration::from_millis(25);
/// Queued bytes that end the pause early: at tens of thousands of Mounts a
/// second a full pause held megabytes of records, a visible share of the
/// daemon's RSS; a bounded batch keeps the memory flat whatever the rate.
const WAKE_BYTES: usize = 128 * 1024;
/// Buffers handed to one `writev` (the kernel's IOV_MAX).
const MAX_IOVECS: usize = 1024;
/// A record's usual encoded size, to size each Mount's buffer once.
const RECORD_BYTES: usize = 448;
/// How long a fail-closed Mount waits for its records to be written.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

static DROP_WARNINGS: Throttle = Throttle::new(Duration::from_secs(10));

impl Auditor {
    /// Starts the writer thread for `sink`.
    pub fn start(sink: Sink, fail_closed: bool) -> Arc<Self> {
        let idle = Arc::new(AtomicBool::new(true));
        let queued = Arc::new(AtomicUsize::new(0));
        let (tx, writer) = match sink {
            Sink::Off => (None, None),
            sink => {
                let (tx, rx) = mpsc::channel(CAPACITY);
                let (i, q) = (Arc::clone(&idle), Arc::clone(&queued));
                let pause = if fail_closed {
                    Duration::ZERO
                } else {
                    BATCH_PAUSE
                };
                match std::thread::Builder::new()
                    .name("coffer-audit".into())
                    .spawn(move || writer(sink, rx, i, q, pause))
                {
                    Ok(handle) => (Some(tx), Some(handle.thread().clone())),
                    Err(_) => (None, None),
                }
            }
        };
        Arc::new(Self {
            tx,
            fail_closed,
            queued,
            idle,
            writer,
        })
    }

    pub fn disabled() -> Arc<Self> {
        Self::start(Sink::Off, false)
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed && self.tx.is_some()
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

    /// Records one Mount. Fail-open: queued without waiting, dropped (and
    /// counted) when the queue is full. Fail-closed: returns once the
    /// records are written (accepted by the kernel), or an error.
    pub async fn record<'r>(
        &self,
        records: impl ExactSizeIterator<Item = Record<'r>>,
    ) -> Result<(), AuditUnavailable> {
        let Some(tx) = &self.tx else {
            return Ok(());
        };
        let count = records.len() as u64;
        let mut lines = Vec::with_capacity(records.len() * RECORD_BYTES);
        for r in records {
            r.write_json(&mut lines);
            lines.push(b'\n');
        }
        let size = lines.len();
        let before = self.queued.fetch_add(size, Ordering::AcqRel);
        if before + size > MAX_QUEUED_BYTES {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return self.lost(count, "the sink is full");
        }
        let (ack, done) = if self.fail_closed {
            let (a, d) = oneshot::channel();
            (Some(a), Some(d))
        } else {
            (None, None)
        };
        let batch = Batch {
            lines,
            records: count,
            ack,
        };
        if tx.try_send(batch).is_err() {
            self.queued.fetch_sub(size, Ordering::AcqRel);
            return self.lost(count, "the sink is full");
        }
        // Once per crossing, not per record: the writer drains everything.
        if before < WAKE_BYTES && before + size >= WAKE_BYTES {
            if let Some(writer) = &self.writer {
                writer.unpark();
            }
        }
        let Some(done) = done else {
            return Ok(());
        };
        match tokio::time::timeout(ACK_TIMEOUT, done).await {
            Ok(Ok(true)) => Ok(()),
            Ok(Ok(false)) => Err(AuditUnavailable("the sink is failing")),
            Ok(Err(_)) => Err(AuditUnavailable("the audit writer is gone")),
            Err(_) => Err(AuditUnavailable("the sink is too slow")),
        }
    }

    fn lost(&self, count: u64, why: &'static str) -> Result<(), AuditUnavailable> {
        METRICS.audit_dropped.inc_by(count);
        if let Some(suppressed) = DROP_WARNINGS.allow() {
            tracing::warn!(records = count, suppressed, "audit records dropped: {why}");
        }
        if self.fail_closed {
            Err(AuditUnavailable(why))
        } else {
            Ok(())
        }
    }
}

/// Longest field in a record: object names and addresses come from the SPC
/// and could otherwise make one record as large as the SPC itself.
const MAX_FIELD: usize = 512;

/// `s` cut to [`MAX_FIELD`] bytes on a character boundary.
pub fn clip(s: &str) -> &str {
    if s.len() <= MAX_FIELD {
        return s;
    }
    let mut end = MAX_FIELD;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The audit time of a record: RFC 3339 UTC to the millisecond, formatted at
/// most once per millisecond per thread (every Mount stamps its records).
#[derive(Debug, Clone, Copy)]
pub struct Timestamp {
    text: [u8; TIMESTAMP_BYTES],
    len: u8,
}

/// `2026-11-28T02:35:00.123Z` is 24 bytes.
const TIMESTAMP_BYTES: usize = 24;
/// 10000-01-01T00:00:00Z.
const LAST_FORMATTABLE_SECS: u64 = 253_402_300_800;

impl Timestamp {
    pub fn now() -> Self {
        thread_local! {
            static LAST: std::cell::Cell<Option<(u128, Timestamp)>> = const { std::cell::Cell::new(None) };
        }
        // A clock set before 1970 is stamped 1970 (the formatter would panic).
        let now = SystemTime::now().max(SystemTime::UNIX_EPOCH);
        let millis = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        LAST.with(|last| match last.get() {
            Some((at, stamp)) if at == millis => stamp,
            _ => {
                let stamp = Self::format(now);
                last.set(Some((millis, stamp)));
                stamp
            }
        })
    }

    fn format(t: SystemTime) -> Self {
        let mut text = [0u8; TIMESTAMP_BYTES];
        // The formatter refuses years after 9999 (and `write!` would panic
        // on its refusal): such a time is left empty, still valid JSON.
        let in_range = t
            .duration_since(SystemTime::UNIX_EPOCH)
            .is_ok_and(|d| d.as_secs() < LAST_FORMATTABLE_SECS);
        let mut rest = &mut text[..];
        let written = in_range && write!(rest, "{}", humantime::format_rfc3339_millis(t)).is_ok();
        let len = if written {
            TIMESTAMP_BYTES - rest.len()
        } else {
            0
        };
        Self {
            text,
            len: len as u8,
        }
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.text[..usize::from(self.len)]).unwrap_or("")
    }
}

/// Where the writer writes.
enum Out {
    Stderr,
    File {
        path: PathBuf,
        file: Option<std::fs::File>,
    },
}

impl Out {
    /// Writes `bytes` whole, or not at all: after a failed write (a full
    /// disk) the file is cut back to where it was, so no half record is
    /// left for a reader to trip on.
    fn write(&mut self, bytes: &[Vec<u8>]) -> std::io::Result<()> {
        match self {
            Out::Stderr => write_all_vectored(&mut std::io::stderr().lock(), bytes),
            Out::File { path, file } => {
                if file.is_none() {
                    *file = Some(open(path)?);
                }
                let Some(f) = file.as_mut() else {
                    return Err(std::io::Error::other("audit log not open"));
                };
                let before = f.metadata().map(|m| m.len()).ok();
                let written = write_all_vectored(f, bytes).and_then(|_| f.flush());
                if written.is_err() {
                    if let Some(len) = before {
                        let _ = f.set_len(len);
                    }
                    // Reopen next time (rotated, replaced or unmounted file).
                    *file = None;
                }
                written
            }
        }
    }
}

/// Writes every buffer, in order, with as few `writev` calls as the kernel
/// allows: one batch is many Mounts' records, written without copying them
/// into one buffer first.
fn write_all_vectored(out: &mut impl Write, buffers: &[Vec<u8>]) -> std::io::Result<()> {
    for chunk in buffers.chunks(MAX_IOVECS) {
        let mut slices: Vec<std::io::IoSlice<'_>> = chunk
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| std::io::IoSlice::new(b))
            .collect();
        let mut rest = &mut slices[..];
        while !rest.is_empty() {
            match out.write_vectored(rest) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => std::io::IoSlice::advance_slices(&mut rest, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The writer thread: blocking writes, one per batch of Mounts; every
/// Mount waiting in fail-closed mode learns whether its records landed.
/// It recovers by itself: each batch tries the sink again.
fn writer(
    sink: Sink,
    mut rx: mpsc::Receiver<Batch>,
    idle: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
    pause: Duration,
) {
    let mut last_error: Option<Instant> = None;
    let mut failing = false;
    let mut out = match sink {
        Sink::File(path) => Out::File { path, file: None },
        _ => Out::Stderr,
    };
    let mut buffers: Vec<Vec<u8>> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        idle.store(false, Ordering::Release);
        let mut size = first.lines.len();
        let mut records = first.records;
        let mut acks: Vec<oneshot::Sender<bool>> = first.ack.into_iter().collect();
        buffers.push(first.lines);
        while size < 1 << 20 {
            let Ok(more) = rx.try_recv() else { break };
            size += more.lines.len();
            records += more.records;
            acks.extend(more.ack);
            buffers.push(more.lines);
        }
        let written = out.write(&buffers);
        buffers.clear();
        if buffers.capacity() > MAX_IOVECS {
            buffers.shrink_to(MAX_IOVECS);
        }
        queued.fetch_sub(size, Ordering::AcqRel);
        let ok = written.is_ok();
        for ack in acks {
            let _ = ack.send(ok);
        }
        match written {
            Ok(()) => {
                METRICS.audit_records.inc_by(records);
                if failing {
                    failing = false;
                    tracing::info!("the audit log is writable again");
                }
            }
            Err(e) => {
                METRICS.audit_dropped.inc_by(records);
                METRICS.audit_errors.inc();
                failing = true;
                if last_error.is_none_or(|t| t.elapsed() > Duration::from_secs(30)) {
                    last_error = Some(Instant::now());
                    tracing::error!(error = %e, "cannot write the audit log");
                }
            }
        }
        idle.store(true, Ordering::Release);
        if !pause.is_zero() && queued.load(Ordering::Acquire) < WAKE_BYTES {
            // Woken early by a Mount that queued past WAKE_BYTES.
            std::thread::park_timeout(pause);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that takes at most `step` bytes per call, as a pipe or a
    /// nearly full disk may.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
        calls: usize,
    }

    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.write_vectored(&[std::io::IoSlice::new(buf)])
        }
        fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
            self.calls += 1;
            let mut left = self.step;
            for b in bufs {
                let n = b.len().min(left);
                self.out.extend_from_slice(&b[..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
            Ok(self.step - left)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_writes_are_whole_and_in_order_across_short_writes() {
        let buffers: Vec<Vec<u8>> = (0..3000)
            .map(|i| format!("record {i}\n").into_bytes())
            .chain([Vec::new()])
            .collect();
        let want: Vec<u8> = buffers.concat();
        for step in [1, 7, 4096, usize::MAX / 2] {
            let mut sink = Trickle {
                out: Vec::new(),
                step,
                calls: 0,
            };
            write_all_vectored(&mut sink, &buffers).unwrap();
            assert_eq!(sink.out, want, "step {step}");
            if step > want.len() {
                // One call per IOV_MAX buffers, no more.
                assert_eq!(sink.calls, buffers.len().div_ceil(MAX_IOVECS));
            }
        }
    }

    #[test]
    fn a_sink_that_takes_nothing_is_an_error_not_a_spin() {
        let mut sink = Trickle {
            out: Vec::new(),
            step: 0,
            calls: 0,
        };
        let err = write_all_vectored(&mut sink, &[b"x".to_vec()]).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WriteZero);
    }

    fn record(object: &str) -> Record<'_> {
        Record {
            time: "2026-11-27T00:00:00.000Z",
            audit: "mount",
            pod_namespace: "ns",
            pod_name: "pod",
            pod_uid: "uid",
            service_account: "sa",
            spc: "spc",
            backend: "file",
            object,
            address: "file:x",
            version: Some("v"),
            source: "backend",
            outcome: "ok",
            code: "OK",
            rule: "",
        }
    }

    #[test]
    fn timestamps_are_rfc3339_millis_and_follow_the_clock() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_833_300_123);
        assert_eq!(Timestamp::format(t).as_str(), "2026-11-28T02:35:00.123Z");
        let last = SystemTime::UNIX_EPOCH + Duration::from_millis(253_402_300_799_999);
        assert_eq!(Timestamp::format(last).as_str(), "9999-12-31T23:59:59.999Z");
        let beyond = SystemTime::UNIX_EPOCH + Duration::from_secs(253_402_300_800);
        assert_eq!(Timestamp::format(beyond).as_str(), "");
        let a = Timestamp::now();
        let parsed = humantime::parse_rfc3339(a.as_str()).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap();
        assert!(skew < Duration::from_secs(1), "{skew:?}");
        std::thread::sleep(Duration::from_millis(3));
        assert!(Timestamp::now().as_str() > a.as_str());
    }

    #[test]
    fn hand_written_records_are_what_serde_writes() {
        let hostile = "q\"b\\s\u{0}\u{1f}\n\t\u{7f}é😀</script>";
        let mut cases = vec![record("db-password"), record(hostile)];
        let mut r = record("x");
        r.version = None;
        r.rule = "deny-prod";
        r.address = hostile;
        r.pod_name = "";
        cases.push(r);
        for r in &cases {
            let mut mine = Vec::new();
            r.write_json(&mut mine);
            assert_eq!(
                String::from_utf8(mine).unwrap(),
                serde_json::to_string(r).unwrap()
            );
        }
    }

    #[tokio::test]
    async fn a_burst_past_the_wake_threshold_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let auditor = Auditor::start(Sink::File(path.clone()), false);
        // Let the writer take its first pause with nothing queued.
        auditor.record([record("first")].into_iter()).await.unwrap();
        auditor.flush(Duration::from_secs(5)).await;
        let name = "o".repeat(400);
        let burst = 2 * WAKE_BYTES / 450 + 1;
        for _ in 0..burst {
            auditor.record([record(&name)].into_iter()).await.unwrap();
        }
        auditor.flush(Duration::from_secs(5)).await;
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), burst + 1);
        for line in &lines[1..] {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["object"], name.as_str());
        }
    }
}
