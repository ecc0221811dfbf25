//! Leased responses (dynamic database credentials, PKI certificates issued
//! with a lease, anything with a `lease_id`) kept per pod volume, so rotation
//! polls renew them instead of issuing new credentials every two minutes.
//!
//! A pod that goes away simply stops asking: its leases are neither renewed
//! nor revoked and expire on Vault's side at the end of their TTL; the entry
//! here is dropped once it has expired.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::bounded_map::{BoundedMap, Bounds};
use crate::key::Key;
use crate::secret::{Credential, SecretBytes};

/// One leased answer and its life so far.
#[derive(Clone)]
pub struct Lease {
    pub body: Arc<SecretBytes>,
    pub lease_id: Credential,
    pub renewable: bool,
    /// The TTL asked for on renewal: the one granted at issue.
    pub increment: Duration,
    pub issued_at: Instant,
    pub renewed_at: Instant,
    pub expires_at: Instant,
    /// Vault granted less than asked on renewal: the max TTL is reached.
    pub capped: bool,
}

/// What to do with a cached lease at a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plan {
    /// Serve the cached answer, no call to Vault.
    Reuse,
    /// Extend the lease, then serve the cached answer.
    Renew,
    /// Ask Vault for a new secret; the file changes.
    Reissue,
}

impl Lease {
    pub fn new(
        body: SecretBytes,
        lease_id: String,
        renewable: bool,
        ttl: Duration,
        now: Instant,
    ) -> Self {
        Self {
            body: Arc::new(body),
            lease_id: Credential::new(lease_id),
            renewable,
            increment: ttl,
            issued_at: now,
            renewed_at: now,
            expires_at: now + ttl,
            capped: false,
        }
    }

    /// Re-issue once `fraction` of the lease's whole life is spent (its whole
    /// life is known once it cannot grow: not renewable, or capped); renew
    /// renewable leases when half of their current TTL has passed.
    pub fn plan(&self, now: Instant, fraction: f64) -> Plan {
        if now >= self.expires_at {
            return Plan::Reissue;
        }
        let life = self.expires_at.saturating_duration_since(self.issued_at);
        let final_life = !self.renewable || self.capped;
        if final_life && now >= self.issued_at + life.mul_f64(fraction) {
            return Plan::Reissue;
        }
        let ttl = self.expires_at.saturating_duration_since(self.renewed_at);
        if self.renewable && !self.capped && now >= self.renewed_at + ttl / 2 {
            return Plan::Renew;
        }
        Plan::Reuse
    }

    /// Records a successful renewal that granted `granted`.
    pub fn renewed(&mut self, granted: Duration, now: Instant) {
        self.renewed_at = now;
        self.expires_at = now + granted;
        if granted < self.increment {
            self.capped = true;
        }
    }
}

/// Leases kept: a pod volume polls every few minutes, so one unused for an
/// hour is gone; the weight bound keeps large leased answers (certificate
/// bundles) from pinning unbounded memory.
const LEASES: Bounds = Bounds {
    max_entries: 8192,
    max_weight: 64 * 1024 * 1024,
    idle: Duration::from_secs(3600),
};

/// Leases by (pod UID, target path, request).
pub struct Leases {
    map: BoundedMap<Lease>,
}

impl Default for Leases {
    fn default() -> Self {
        Self {
            map: BoundedMap::new(LEASES),
        }
    }
}

impl Leases {
    pub fn get(&self, key: &Key) -> Option<Lease> {
        self.map.get(key)
    }

    pub fn put(&self, key: Key, lease: Lease) {
        let weight = lease.body.len() as u64 + 256;
        self.map.insert_weighed(key, lease, weight);
    }

    pub fn remove(&self, key: &Key) {
        self.map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewable: bool, ttl: u64, t0: Instant) -> Lease {
        Lease::new(
            SecretBytes::new(b"{}".to_vec()),
            "id".into(),
            renewable,
            Duration::from_secs(ttl),
            t0,
        )
    }

    #[test]
    fn non_renewable_leases_are_reused_then_reissued_at_the_fraction() {
        let t0 = Instant::now();
        let l = lease(false, 90, t0);
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(l.plan(at(0), 2.0 / 3.0), Plan::Reuse);
        assert_eq!(l.plan(at(59), 2.0 / 3.0), Plan::Reuse);
        assert_eq!(l.plan(at(61), 2.0 / 3.0), Plan::Reissue);
        assert_eq!(l.plan(at(95), 2.0 / 3.0), Plan::Reissue);
    }

    #[test]
    fn renewable_leases_renew_until_capped() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut l = lease(true, 60, t0);
        assert_eq!(l.plan(at(10), 0.67), Plan::Reuse);
        assert_eq!(l.plan(at(31), 0.67), Plan::Renew);
        l.renewed(Duration::from_secs(60), at(31));
        assert!(!l.capped);
        assert_eq!(l.plan(at(50), 0.67), Plan::Reuse);
        // Max TTL 120 s: the renewal at 62 s only gets 58 s.
        l.renewed(Duration::from_secs(58), at(62));
        assert!(l.capped);
        assert_eq!(l.plan(at(70), 0.67), Plan::Reuse);
        assert_eq!(l.plan(at(81), 0.67), Plan::Reissue, "2/3 of 120 s");
    }
}
