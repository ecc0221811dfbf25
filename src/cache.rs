//! The node-wide fetch cache: backend load grows with distinct (authorization
//! identity, object) pairs instead of pods × objects × polls.
//!
//! - Keys come from `Backend::cache_key`, which folds in whom the backend
//!   would authorize: two pods share an entry only when the backend would
//!   treat them alike. Backends without a key are never cached.
//! - Concurrent identical fetches collapse into one backend call that runs
//!   as its own task: a caller that gives up (its Mount timed out, its client
//!   went away) does not cancel or poison the call for the others.
//! - Entries serve for their TTL; pinned versions until evicted. Memory is
//!   bounded by bytes with LRU eviction; values are zeroized when the last
//!   reference drops. Memory only: nothing is ever written to disk.
//! - Stale-if-error: when the backend cannot be reached, an entry no older
//!   than the caller's bound is served instead (never on a refusal).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::{BoxFuture, FutureExt, Shared};
use lru::LruCache;

use crate::backend::{Fetched, VersionMemo, VERSION_MEMO_BYTES};
use crate::error::ObjectError;
use crate::key::Key;
use crate::metrics::METRICS;
use crate::secret::SecretBytes;

/// Bookkeeping bytes charged per entry on top of its value and key.
const ENTRY_OVERHEAD: u64 = 128;

/// A cached value.
#[derive(Debug)]
pub struct Entry {
    pub contents: SecretBytes,
    pub version: Option<Arc<str>>,
    pub immutable: bool,
    pub shareable: bool,
    pub fetched_at: Instant,
    /// The version derived for this value (when the backend gave none).
    memo: Arc<VersionMemo>,
}

impl Entry {
    fn from_fetched(f: Fetched) -> Self {
        Self {
            contents: f.contents,
            version: f.version,
            immutable: f.immutable,
            shareable: f.shareable,
            fetched_at: Instant::now(),
            memo: f.memo.unwrap_or_default(),
        }
    }

    /// Hands the value over as a `Fetched`, copying the bytes (the cached
    /// copy stays for the next caller).
    pub fn to_fetched(&self) -> Fetched {
        Fetched {
            contents: self.contents.clone(),
            version: self.version.clone(),
            shareable: self.shareable,
            immutable: self.immutable,
            memo: Some(Arc::clone(&self.memo)),
        }
    }
}

/// Where a served value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A fresh cached entry; no backend call.
    Hit,
    /// This caller's backend call.
    Miss,
    /// Another caller's in-flight backend call.
    Joined,
    /// An old entry, because the backend could not be reached.
    Stale,
    /// Not cacheable: fetched for this caller alone.
    Uncached,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub joins: AtomicU64,
    pub evictions: AtomicU64,
    pub stale_serves: AtomicU64,
}

type Flight = Shared<BoxFuture<'static, Result<Arc<Entry>, ObjectError>>>;

struct State {
    lru: LruCache<Key, Arc<Entry>>,
    bytes: u64,
    inflight: HashMap<Key, Flight>,
    last_sweep: Instant,
}

pub struct Cache {
    default_ttl: Duration,
    max_bytes: u64,
    /// The longest any caller asked to keep entries (TTL or stale bound),
    /// in seconds: older entries are swept.
    retain_secs: AtomicU64,
    state: Mutex<State>,
    pub stats: Stats,
}

fn entry_size(e: &Entry) -> u64 {
    e.contents.len() as u64 + Key::SIZE + ENTRY_OVERHEAD + VERSION_MEMO_BYTES
}

impl Cache {
    /// A cache whose entries serve for `default_ttl`, holding at most
    /// `max_bytes`. Either being zero disables caching and collapsing.
    pub fn new(default_ttl: Duration, max_bytes: u64) -> Arc<Self> {
        Arc::new(Self {
            default_ttl,
            max_bytes,
            retain_secs: AtomicU64::new(default_ttl.as_secs()),
            state: Mutex::new(State {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashMap::new(),
                last_sweep: Instant::now(),
            }),
            stats: Stats::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        !self.default_ttl.is_zero() && self.max_bytes > 0
    }

    pub fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    /// Bytes held now (values, keys and bookkeeping).
    pub fn bytes(&self) -> u64 {
        self.lock().bytes
    }

    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Serves `key` from the cache, an in-flight call, or `fetch`.
    /// `ttl` zero bypasses the cache for this call.
    pub async fn get(
        self: &Arc<Self>,
        key: &Key,
        ttl: Duration,
        stale_if_error: Option<Duration>,
        fetch: impl Fn() -> BoxFuture<'static, Result<Fetched, ObjectError>>,
    ) -> Result<(Arc<Entry>, Source), ObjectError> {
        if !self.enabled() || ttl.is_zero() {
            let fetched = fetch().await?;
            return Ok((Arc::new(Entry::from_fetched(fetched)), Source::Uncached));
        }
        let keep = ttl.max(stale_if_error.unwrap_or_default()).as_secs();
        self.retain_secs.fetch_max(keep, Ordering::Relaxed);
        let (flight, joined) = {
            let mut state = self.lock();
            if let Some(e) = state.lru.get(key) {
                if e.immutable || e.fetched_at.elapsed() < ttl {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    METRICS.cache_hits.inc();
                    return Ok((Arc::clone(e), Source::Hit));
                }
            }
            if let Some(f) = state.inflight.get(key) {
                self.stats.joins.fetch_add(1, Ordering::Relaxed);
                METRICS.singleflight_joins.inc();
                (f.clone(), true)
            } else {
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                METRICS.cache_misses.inc();
                let flight = self.launch(*key, fetch());
                state.inflight.insert(*key, flight.clone());
                (flight, false)
            }
        };
        match flight.await {
            // A per-caller answer (a Vault lease) is not for the joiners:
            // they fetch their own.
            Ok(e) if joined && !e.shareable => {
                let fetched = fetch().await?;
                Ok((Arc::new(Entry::from_fetched(fetched)), Source::Uncached))
            }
            Ok(e) => Ok((e, if joined { Source::Joined } else { Source::Miss })),
            Err(err) => match stale_if_error {
                Some(bound) if err.is_outage() => {
                    let stale = self.lock().lru.peek(key).cloned();
                    match stale.filter(|e| e.fetched_at.elapsed() <= bound) {
                        Some(e) => {
                            self.stats.stale_serves.fetch_add(1, Ordering::Relaxed);
                            METRICS.stale_serves.inc();
                            tracing::warn!(
                                age_s = e.fetched_at.elapsed().as_secs(),
                                error = %err,
                                "backend unreachable: serving a cached value (staleIfError)"
                            );
                            Ok((e, Source::Stale))
                        }
                        None => Err(err),
                    }
                }
                _ => Err(err),
            },
        }
    }

    /// Runs the backend call as its own task and stores its answer.
    fn launch(
        self: &Arc<Self>,
        key: Key,
        fetch: BoxFuture<'static, Result<Fetched, ObjectError>>,
    ) -> Flight {
        let cache = Arc::clone(self);
        let task = tokio::spawn(async move {
            let result = fetch.await.map(|f| Arc::new(Entry::from_fetched(f)));
            cache.complete(&key, &result);
            result
        });
        async move {
            task.await
                .unwrap_or_else(|e| Err(ObjectError::Internal(format!("fetch task failed: {e}"))))
        }
        .boxed()
        .shared()
    }

    fn complete(&self, key: &Key, result: &Result<Arc<Entry>, ObjectError>) {
        let mut state = self.lock();
        state.inflight.remove(key);
        let Ok(entry) = result else {
            return;
        };
        if !entry.shareable {
            return;
        }
        let size = entry_size(entry);
        if size > self.max_bytes {
            return;
        }
        if let Some(old) = state.lru.put(*key, Arc::clone(entry)) {
            state.bytes = state.bytes.saturating_sub(entry_size(&old));
        }
        state.bytes += size;
        while state.bytes > self.max_bytes {
            let Some((_, old)) = state.lru.pop_lru() else {
                break;
            };
            state.bytes = state.bytes.saturating_sub(entry_size(&old));
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            METRICS.cache_evictions.inc();
        }
        if state.last_sweep.elapsed() > Duration::from_secs(30) {
            state.last_sweep = Instant::now();
            let retain = Duration::from_secs(self.retain_secs.load(Ordering::Relaxed));
            let expired: Vec<Key> = state
                .lru
                .iter()
                .filter(|(_, e)| !e.immutable && e.fetched_at.elapsed() > retain)
                .map(|(k, _)| *k)
                .collect();
            for k in expired {
                if let Some(old) = state.lru.pop(&k) {
                    state.bytes = state.bytes.saturating_sub(entry_size(&old));
                    self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                    METRICS.cache_evictions.inc();
                }
            }
        }
        METRICS
            .cache_bytes
            .set(i64::try_from(state.bytes).unwrap_or(i64::MAX));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn k(name: &str) -> Key {
        Key::of("test", &[name])
    }

    fn counting_fetch(
        calls: Arc<AtomicUsize>,
        value: &'static str,
        delay_ms: u64,
        outcome: fn() -> Result<(), ObjectError>,
    ) -> impl Fn() -> BoxFuture<'static, Result<Fetched, ObjectError>> {
        move || {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                outcome()?;
                Ok(Fetched::new(
                    SecretBytes::new(value.as_bytes().to_vec()),
                    None,
                ))
            }
            .boxed()
        }
    }

    fn ok() -> Result<(), ObjectError> {
        Ok(())
    }
    fn down() -> Result<(), ObjectError> {
        Err(ObjectError::Unavailable("connection refused".into()))
    }
    fn denied() -> Result<(), ObjectError> {
        Err(ObjectError::PermissionDenied("revoked".into()))
    }

    #[tokio::test]
    async fn hits_within_ttl_and_refetches_after() {
        let cache = Cache::new(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let f = counting_fetch(calls.clone(), "v", 0, ok);
        let (_, s1) = cache
            .get(&k("k"), Duration::from_millis(200), None, &f)
            .await
            .unwrap();
        let (e, s2) = cache
            .get(&k("k"), Duration::from_millis(200), None, &f)
            .await
            .unwrap();
        assert_eq!((s1, s2), (Source::Miss, Source::Hit));
        assert_eq!(e.contents.expose(), b"v");
        tokio::time::sleep(Duration::from_millis(250)).await;
        let (_, s3) = cache
            .get(&k("k"), Duration::from_millis(200), None, &f)
            .await
            .unwrap();
        assert_eq!(s3, Source::Miss);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // TTL zero bypasses.
        let (_, s4) = cache.get(&k("k"), Duration::ZERO, None, &f).await.unwrap();
        assert_eq!(s4, Source::Uncached);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_collapse_and_survive_a_cancelled_leader() {
        let cache = Cache::new(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let f = Arc::new(counting_fetch(calls.clone(), "shared", 200, ok));
        // The leader gives up almost at once.
        let leader = {
            let (cache, f) = (cache.clone(), f.clone());
            tokio::spawn(async move {
                cache
                    .get(&k("k"), Duration::from_secs(60), None, &*f)
                    .await
                    .map(|r| r.1)
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut joiners = Vec::new();
        for _ in 0..20 {
            let (cache, f) = (cache.clone(), f.clone());
            joiners.push(tokio::spawn(async move {
                cache
                    .get(&k("k"), Duration::from_secs(60), None, &*f)
                    .await
                    .map(|r| r.1)
            }));
        }
        leader.abort();
        for j in joiners {
            assert_eq!(j.await.unwrap().unwrap(), Source::Joined);
        }
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "one backend call for 21 callers"
        );
        assert_eq!(cache.stats.joins.load(Ordering::SeqCst), 20);
    }

    #[tokio::test]
    async fn stale_if_error_serves_old_values_only_for_outages() {
        let cache = Cache::new(Duration::from_secs(60), 1 << 20);
        let calls = Arc::new(AtomicUsize::new(0));
        let ttl = Duration::from_millis(10);
        cache
            .get(
                &k("k"),
                ttl,
                None,
                &counting_fetch(calls.clone(), "old", 0, ok),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (e, s) = cache
            .get(
                &k("k"),
                ttl,
                Some(Duration::from_secs(600)),
                &counting_fetch(calls.clone(), "x", 0, down),
            )
            .await
            .unwrap();
        assert_eq!((s, e.contents.expose()), (Source::Stale, &b"old"[..]));
        assert_eq!(cache.stats.stale_serves.load(Ordering::SeqCst), 1);
        let err = cache
            .get(
                &k("k"),
                ttl,
                Some(Duration::from_secs(600)),
                &counting_fetch(calls.clone(), "x", 0, denied),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(err, ObjectError::PermissionDenied(_)),
            "a refusal is never masked"
        );
        let err = cache
            .get(
                &k("k"),
                ttl,
                None,
                &counting_fetch(calls.clone(), "x", 0, down),
            )
            .await;
        assert!(err.is_err(), "not opted in");
        let err = cache
            .get(
                &k("k"),
                ttl,
                Some(Duration::from_millis(1)),
                &counting_fetch(calls, "x", 0, down),
            )
            .await;
        assert!(err.is_err(), "older than the bound");
    }

    #[tokio::test]
    async fn bytes_are_bounded_with_lru_eviction() {
        let cache = Cache::new(
            Duration::from_secs(60),
            3 * (100 + Key::SIZE + ENTRY_OVERHEAD + VERSION_MEMO_BYTES),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let value: &'static str = Box::leak("x".repeat(100).into_boxed_str());
        let f = counting_fetch(calls.clone(), value, 0, ok);
        for name in ["k1", "k2", "k3"] {
            cache
                .get(&k(name), Duration::from_secs(60), None, &f)
                .await
                .unwrap();
        }
        cache
            .get(&k("k1"), Duration::from_secs(60), None, &f)
            .await
            .unwrap(); // k1 is now recent
        cache
            .get(&k("k4"), Duration::from_secs(60), None, &f)
            .await
            .unwrap(); // evicts k2
        assert_eq!(cache.len(), 3);
        assert!(cache.bytes() <= 3 * (100 + Key::SIZE + ENTRY_OVERHEAD + VERSION_MEMO_BYTES));
        assert_eq!(cache.stats.evictions.load(Ordering::SeqCst), 1);
        let (_, s) = cache
            .get(&k("k2"), Duration::from_secs(60), None, &f)
            .await
            .unwrap();
        assert_eq!(s, Source::Miss);
        let (_, s) = cache
            .get(&k("k1"), Duration::from_secs(60), None, &f)
            .await
            .unwrap();
        assert_eq!(s, Source::Hit);
    }
}
