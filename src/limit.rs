//! Protecting backends: every backend call goes through a tower stack of
//! retry (jittered exponential backoff, honouring the backend's retry hint,
//! never past the Mount deadline) over a per-address token bucket and a
//! per-address bound on in-flight calls.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::time::Instant;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::retry::{Policy, RetryLayer};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::backend::{Backend, FetchLimits, Fetched};
use crate::bounded_map::{BoundedMap, Bounds};
use crate::error::ObjectError;
use crate::key::Key;
use crate::request::MountContext;
use crate::spc::ObjectSpec;

#[derive(Debug, Clone, Copy)]
pub struct LimitConfig {
    /// Sustained calls per second per backend address (0 = unlimited).
    pub qps: f64,
    /// Calls allowed at once above the sustained rate.
    pub burst: u32,
    /// Calls in flight at once per backend address.
    pub max_in_flight: usize,
    /// Retries of a failed call (unreachable, 5xx, throttled).
    pub retries: u32,
    /// First backoff; doubled each retry, with ±50% jitter.
    pub backoff: Duration,
}

impl Default for LimitConfig {
    fn default() -> Self {
        Self {
            qps: 50.0,
            burst: 100,
            max_in_flight: 32,
            retries: 3,
            backoff: Duration::from_millis(200),
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    /// Backend calls made (including retries).
    pub calls: AtomicU64,
    /// Calls that had to wait for the token bucket.
    pub rate_limit_waits: AtomicU64,
    pub retries: AtomicU64,
}

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl Bucket {
    /// Takes a token, returning how long to wait before the call may go.
    fn take(&mut self, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate)
        }
    }
}

/// Per-address limits, shared by every Mount.
struct Scope {
    bucket: Mutex<Bucket>,
    in_flight: Arc<Semaphore>,
}

/// Scopes kept: one per backend address in use. A scope idle this long has
/// a full bucket and no calls, so forgetting it changes nothing.
const SCOPES: Bounds = Bounds {
    max_entries: 1024,
    max_weight: 0,
    idle: Duration::from_secs(600),
};

pub struct Limiter {
    config: LimitConfig,
    scopes: BoundedMap<Arc<Scope>>,
    pub stats: Arc<Stats>,
}

/// One backend call, cloneable so it can be retried.
#[derive(Clone)]
pub struct Call {
    pub backend: Arc<dyn Backend>,
    /// The Mount's object list (shared, not copied per call) and which
    /// object this call fetches.
    pub objects: Arc<Vec<ObjectSpec>>,
    pub index: usize,
    pub ctx: Arc<MountContext>,
    pub limits: FetchLimits,
    /// The Mount's deadline: no retry sleeps past it.
    pub deadline: Instant,
}

impl Call {
    pub fn object(&self) -> &ObjectSpec {
        &self.objects[self.index]
    }
}

impl Limiter {
    pub fn new(config: LimitConfig) -> Self {
        Self {
            config,
            scopes: BoundedMap::new(SCOPES),
            stats: Arc::new(Stats::default()),
        }
    }

    fn scope(&self, key: Key) -> Arc<Scope> {
        self.scopes.get_or_insert_with(key, || {
            let burst = f64::from(self.config.burst.max(1));
            Arc::new(Scope {
                bucket: Mutex::new(Bucket {
                    rate: self.config.qps,
                    burst,
                    tokens: burst,
                    updated: Instant::now(),
                }),
                in_flight: Arc::new(Semaphore::new(self.config.max_in_flight.max(1))),
            })
        })
    }

    /// Scopes currently kept (for tests).
    pub fn scopes(&self) -> usize {
        self.scopes.len()
    }

    /// Makes the call through retry → token bucket → in-flight bound.
    pub async fn call(&self, call: Call) -> Result<Fetched, ObjectError> {
        let stats = Arc::clone(&self.stats);
        let Some(scope) = call.backend.limit_scope(&call.ctx) else {
            // Local backends: no bucket, no bound, no retries.
            return timed(&stats, &call).await;
        };
        let scope = self.scope(scope);
        let fetch = tower::service_fn(move |c: Call| {
            let stats = Arc::clone(&stats);
            async move { timed(&stats, &c).await }
        });
        let service = ServiceBuilder::new()
            .layer(RetryLayer::new(Backoff {
                attempt: 0,
                config: self.config,
                stats: Arc::clone(&self.stats),
            }))
            .layer(BucketLayer {
                scope: Arc::clone(&scope),
                stats: Arc::clone(&self.stats),
            })
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::clone(
                &scope.in_flight,
            )))
            .service(fetch);
        service.oneshot(call).await
    }
}

/// One backend call, counted and timed.
async fn timed(stats: &Stats, c: &Call) -> Result<Fetched, ObjectError> {
    stats.calls.fetch_add(1, Ordering::Relaxed);
    let started = std::time::Instant::now();
    let result = c.backend.fetch(c.object(), &c.ctx, c.limits).await;
    crate::metrics::backend_call(
        c.backend.name(),
        "fetch",
        result.is_ok(),
        started.elapsed().as_secs_f64(),
    );
    result
}

/// Waits for a token of the scope's bucket before each call.
#[derive(Clone)]
struct BucketLayer {
    scope: Arc<Scope>,
    stats: Arc<Stats>,
}

impl<S> Layer<S> for BucketLayer {
    type Service = BucketService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BucketService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
struct BucketService<S> {
    inner: S,
    layer: BucketLayer,
}

impl<S> Service<Call> for BucketService<S>
where
    S: Service<Call, Response = Fetched, Error = ObjectError> + Clone + Send + 'static,
    S::Future: Send,
{
    type Response = Fetched;
    type Error = ObjectError;
    type Future = Pin<Box<dyn Future<Output = Result<Fetched, ObjectError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ObjectError>> {
        // Readiness is decided per call (the inner limit is taken in `call`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let inner = self.inner.clone();
        let layer = self.layer.clone();
        Box::pin(async move {
            let wait = match layer.scope.bucket.lock() {
                Ok(mut b) => b.take(Instant::now()),
                Err(_) => Duration::ZERO,
            };
            if !wait.is_zero() {
                layer.stats.rate_limit_waits.fetch_add(1, Ordering::Relaxed);
                crate::metrics::METRICS.rate_limit_waits.inc();
                tokio::time::sleep(wait).await;
            }
            inner.oneshot(call).await
        })
    }
}

/// Jittered exponential backoff that honours a retry hint.
#[derive(Clone)]
struct Backoff {
    attempt: u32,
    config: LimitConfig,
    stats: Arc<Stats>,
}

fn jitter(d: Duration) -> Duration {
    let mut b = [0u8; 2];
    let r = if getrandom::fill(&mut b).is_ok() {
        f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
    } else {
        0.5
    };
    d.mul_f64(0.5 + r)
}

impl Policy<Call, Fetched, ObjectError> for Backoff {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        call: &mut Call,
        result: &mut Result<Fetched, ObjectError>,
    ) -> Option<Self::Future> {
        let err = result.as_ref().err()?;
        if !err.is_retryable() || self.attempt >= self.config.retries {
            return None;
        }
        let backoff = jitter(self.config.backoff * 2u32.saturating_pow(self.attempt));
        let hint = match err {
            ObjectError::Throttled { retry_after, .. } | ObjectError::Busy { retry_after, .. } => {
                retry_after.unwrap_or_default()
            }
            _ => Duration::ZERO,
        };
        let wait = backoff.max(hint);
        // Leave the deadline's error to the caller rather than sleep into it.
        if Instant::now() + wait >= call.deadline {
            return None;
        }
        self.attempt += 1;
        self.stats.retries.fetch_add(1, Ordering::Relaxed);
        crate::metrics::METRICS.backend_retries.inc();
        Some(tokio::time::sleep(wait))
    }

    fn clone_request(&mut self, call: &Call) -> Option<Call> {
        Some(call.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_allows_burst_then_paces() {
        let t0 = Instant::now();
        let mut b = Bucket {
            rate: 10.0,
            burst: 3.0,
            tokens: 3.0,
            updated: t0,
        };
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        assert_eq!(b.take(t0), Duration::ZERO);
        let w = b.take(t0);
        assert!((w.as_secs_f64() - 0.1).abs() < 1e-6, "{w:?}");
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.take(later), Duration::ZERO, "refilled, capped at burst");
    }

    fn call(deadline_in: Duration) -> Call {
        let objects = std::collections::BTreeMap::from([(
            "objects".to_string(),
            "- objectName: a".to_string(),
        )]);
        let object = crate::spc::parse_objects(&objects, "file")
            .unwrap()
            .remove(0);
        Call {
            backend: Arc::new(crate::backend::file::FileBackend::new(
                "/nonexistent".into(),
                Default::default(),
            )),
            objects: Arc::new(vec![object]),
            index: 0,
            ctx: Arc::new(MountContext::parse("{}", "null", "420", "/t").unwrap()),
            limits: FetchLimits { max_bytes: 1 },
            deadline: Instant::now() + deadline_in,
        }
    }

    #[tokio::test]
    async fn backoff_honours_hints_deadlines_and_error_kinds() {
        let mut policy = Backoff {
            attempt: 0,
            config: LimitConfig::default(),
            stats: Arc::new(Stats::default()),
        };
        let mut c = call(Duration::from_secs(60));
        let mut throttled: Result<Fetched, ObjectError> = Err(ObjectError::Throttled {
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(3)),
        });
        let sleep = policy.retry(&mut c, &mut throttled).expect("retried");
        assert!(
            sleep.deadline() >= Instant::now() + Duration::from_millis(2900),
            "hint honoured"
        );
        let mut refused: Result<Fetched, ObjectError> =
            Err(ObjectError::PermissionDenied("no".into()));
        assert!(
            policy.retry(&mut c, &mut refused).is_none(),
            "refusals are final"
        );
        let mut near = call(Duration::from_millis(100));
        assert!(
            policy.retry(&mut near, &mut throttled).is_none(),
            "never sleeps past the deadline"
        );
        let mut down: Result<Fetched, ObjectError> =
            Err(ObjectError::Unavailable("refused".into()));
        assert!(policy.retry(&mut c, &mut down).is_some());
        assert!(policy.retry(&mut c, &mut down).is_some());
        assert!(
            policy.retry(&mut c, &mut down).is_none(),
            "three retries at most"
        );
    }

    #[test]
    fn jitter_stays_within_half_to_one_and_a_half() {
        for _ in 0..100 {
            let j = jitter(Duration::from_millis(100));
            assert!(
                j >= Duration::from_millis(50) && j <= Duration::from_millis(150),
                "{j:?}"
            );
        }
    }
}
