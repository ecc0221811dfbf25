//! Prometheus metrics, served at `/metrics` on the health address. Labels are
//! bounded by construction: outcomes, gRPC codes, backend names, operations —
//! never a pod UID, an object name, a token or a value.

use std::sync::LazyLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MountLabels {
    pub outcome: &'static str,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    /// provider | health
    pub listener: &'static str,
    /// uid | limit | accept_error
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub backend: &'static str,
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendName {
    pub backend: &'static str,
}

/// A policy rule's name: bounded by the policy file, never by requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    // 0.5 ms … ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

pub struct Metrics {
    pub mounts: Family<MountLabels, Counter>,
    /// The `{outcome="ok",code="OK"}` series of `mounts`, resolved once.
    pub mounts_ok: Counter,
    pub mount_duration: Histogram,
    pub mounts_in_flight: Gauge,
    pub backend_calls: Family<BackendLabels, Counter>,
    pub backend_duration: Family<BackendName, Histogram>,
    pub cache_hits: Counter,
    pub cache_misses: Counter,
    pub cache_evictions: Counter,
    pub cache_bytes: Gauge,
    pub singleflight_joins: Counter,
    pub stale_serves: Counter,
    pub optional_missing: Counter,
    pub aws_failovers: Counter,
    pub policy_denials: Family<RuleLabel, Counter>,
    pub policy_reloads: Counter,
    pub policy_reload_failures: Counter,
    pub rate_limit_waits: Counter,
    pub backend_retries: Counter,
    pub vault_logins: Family<Outcome, Counter>,
    pub vault_lease_renewals: Family<Outcome, Counter>,
    pub audit_records: Counter,
    pub audit_dropped: Counter,
    pub audit_errors: Counter,
    pub refused_peers: Counter,
    pub refused_connections: Family<ConnectionLabels, Counter>,
    pub build_info: Family<VersionLabel, Gauge>,
    registry: Registry,
}

impl Metrics {
    fn new() -> Self {
        let mounts: Family<MountLabels, Counter> = Family::default();
        let mounts_ok = mounts
            .get_or_create(&MountLabels {
                outcome: "ok",
                code: "OK",
            })
            .clone();
        let mut m = Metrics {
            mounts,
            mounts_ok,
            mount_duration: latency_histogram(),
            mounts_in_flight: Gauge::default(),
            backend_calls: Family::default(),
            backend_duration: Family::new_with_constructor(latency_histogram),
            cache_hits: Counter::default(),
            cache_misses: Counter::default(),
            cache_evictions: Counter::default(),
            cache_bytes: Gauge::default(),
            singleflight_joins: Counter::default(),
            stale_serves: Counter::default(),
            optional_missing: Counter::default(),
            aws_failovers: Counter::default(),
            policy_denials: Family::default(),
            policy_reloads: Counter::default(),
            policy_reload_failures: Counter::default(),
            rate_limit_waits: Counter::default(),
            backend_retries: Counter::default(),
            vault_logins: Family::default(),
            vault_lease_renewals: Family::default(),
            audit_records: Counter::default(),
            audit_dropped: Counter::default(),
            audit_errors: Counter::default(),
            refused_peers: Counter::default(),
            refused_connections: Family::default(),
            build_info: Family::default(),
            registry: Registry::with_prefix("coffer"),
        };
        let r = &mut m.registry;
        r.register(
            "mounts",
            "Mount calls by outcome and gRPC code",
            m.mounts.clone(),
        );
        r.register(
            "mount_duration_seconds",
            "Mount latency",
            m.mount_duration.clone(),
        );
        r.register(
            "mounts_in_flight",
            "Mounts being served",
            m.mounts_in_flight.clone(),
        );
        r.register(
            "backend_calls",
            "Backend calls by backend, operation and outcome",
            m.backend_calls.clone(),
        );
        r.register(
            "backend_call_duration_seconds",
            "Backend call latency",
            m.backend_duration.clone(),
        );
        r.register(
            "cache_hits",
            "Objects served from the cache",
            m.cache_hits.clone(),
        );
        r.register(
            "cache_misses",
            "Objects that needed a backend call",
            m.cache_misses.clone(),
        );
        r.register(
            "cache_evictions",
            "Cache entries evicted (size or age)",
            m.cache_evictions.clone(),
        );
        r.register(
            "cache_bytes",
            "Bytes held by the cache",
            m.cache_bytes.clone(),
        );
        r.register(
            "singleflight_joins",
            "Fetches that joined an identical in-flight call",
            m.singleflight_joins.clone(),
        );
        r.register(
            "stale_serves",
            "Cached values served because the backend was unreachable",
            m.stale_serves.clone(),
        );
        r.register(
            "optional_missing",
            "Optional objects mounted without, since absent",
            m.optional_missing.clone(),
        );
        r.register(
            "aws_failovers",
            "AWS reads answered by the failover region because the primary was out",
            m.aws_failovers.clone(),
        );
        r.register(
            "policy_denials",
            "Objects the node policy refused, by rule (\"default\" when none matched)",
            m.policy_denials.clone(),
        );
        r.register(
            "policy_reloads",
            "Policy files loaded again (SIGHUP or a change)",
            m.policy_reloads.clone(),
        );
        r.register(
            "policy_reload_failures",
            "Policy files that could not be loaded again (the previous policy stayed)",
            m.policy_reload_failures.clone(),
        );
        r.register(
            "rate_limit_waits",
            "Backend calls that waited for the rate limit",
            m.rate_limit_waits.clone(),
        );
        r.register(
            "backend_retries",
            "Backend calls retried after an outage or throttling",
            m.backend_retries.clone(),
        );
        r.register(
            "vault_logins",
            "Vault logins by outcome",
            m.vault_logins.clone(),
        );
        r.register(
            "vault_lease_renewals",
            "Vault lease renewals by outcome",
            m.vault_lease_renewals.clone(),
        );
        r.register(
            "audit_records",
            "Audit records written",
            m.audit_records.clone(),
        );
        r.register(
            "audit_dropped",
            "Audit records dropped (sink full or failing)",
            m.audit_dropped.clone(),
        );
        r.register(
            "audit_errors",
            "Audit sink write errors",
            m.audit_errors.clone(),
        );
        r.register(
            "refused_peers",
            "Calls refused for their peer uid or authority",
            m.refused_peers.clone(),
        );
        r.register(
            "refused_connections",
            "Connections closed at accept (peer uid, connection limit) and accept errors",
            m.refused_connections.clone(),
        );
        r.register("build_info", "Build information", m.build_info.clone());
        // Series that exist from the start, so dashboards see zeros.
        for outcome in ["ok", "error"] {
            m.vault_logins.get_or_create(&Outcome { outcome }).inc_by(0);
            m.vault_lease_renewals
                .get_or_create(&Outcome { outcome })
                .inc_by(0);
        }
        for listener in ["provider", "health"] {
            for reason in ["uid", "limit", "accept_error"] {
                m.refused_connections
                    .get_or_create(&ConnectionLabels { listener, reason })
                    .inc_by(0);
            }
        }
        m.build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        m
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The process-wide metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// Records a backend call.
pub fn backend_call(backend: &'static str, operation: &'static str, ok: bool, seconds: f64) {
    let labels = BackendLabels {
        backend,
        operation,
        outcome: if ok { "ok" } else { "error" },
    };
    // Each worker keeps the handles it used: a family lookup takes a lock
    // every worker shares, and this runs for every object of every Mount.
    // The labels are static strings, so the set is small and fixed.
    BACKEND_HANDLES.with(|kept| {
        let mut kept = kept.borrow_mut();
        let (calls, duration) = kept.entry(labels).or_insert_with_key(|labels| {
            (
                METRICS.backend_calls.get_or_create(labels).clone(),
                METRICS
                    .backend_duration
                    .get_or_create(&BackendName { backend })
                    .clone(),
            )
        });
        calls.inc();
        duration.observe(seconds);
    });
}

thread_local! {
    static BACKEND_HANDLES: std::cell::RefCell<std::collections::HashMap<BackendLabels, (Counter, Histogram)>> =
        std::cell::RefCell::default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_has_the_families() {
        METRICS
            .mounts
            .get_or_create(&MountLabels {
                outcome: "ok",
                code: "OK",
            })
            .inc();
        backend_call("vault", "fetch", true, 0.01);
        let text = METRICS.encode();
        for name in [
            "coffer_mounts_total{outcome=\"ok\",code=\"OK\"}",
            "coffer_mount_duration_seconds_bucket",
            "coffer_backend_calls_total{backend=\"vault\",operation=\"fetch\",outcome=\"ok\"}",
            "coffer_cache_hits_total",
            "coffer_build_info{version=",
            "# EOF",
        ] {
            assert!(text.contains(name), "{name} missing from\n{text}");
        }
    }
}
