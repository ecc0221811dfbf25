//! A map for per-key state whose keys callers can multiply (one entry per
//! Vault address, per pod identity, per lease, per limiter scope): bounded
//! by entries and by weight (bytes), least recently used first out, and
//! entries idle longer than a limit dropped. Without this, every distinct
//! address or identity an SPC names would cost memory forever.

use std::sync::Mutex;
use std::time::Duration;

use lru::LruCache;

use crate::key::Key;

struct Slot<V> {
    value: V,
    weight: u64,
    touched: Duration,
}

/// A clock for idle limits of minutes: the kernel's last tick
/// (`CLOCK_MONOTONIC_COARSE`, a few ms fine), read without the timer
/// access a precise clock costs. Every lookup notes the time, and lookups
/// run several times per Mount.
pub(crate) fn coarse_now() -> Duration {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(Duration::from)
        .unwrap_or_default()
}

struct Inner<V> {
    lru: LruCache<Key, Slot<V>>,
    weight: u64,
}

pub struct BoundedMap<V> {
    inner: Mutex<Inner<V>>,
    max_entries: usize,
    max_weight: u64,
    idle: Duration,
}

/// Bounds of a [`BoundedMap`].
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_entries: usize,
    /// Summed weight of the entries (0 = entries only).
    pub max_weight: u64,
    /// Entries not used for this long are dropped.
    pub idle: Duration,
}

impl<V: Clone> BoundedMap<V> {
    pub fn new(bounds: Bounds) -> Self {
        Self {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                weight: 0,
            }),
            max_entries: bounds.max_entries.max(1),
            max_weight: bounds.max_weight,
            idle: bounds.idle,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        match self.inner.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The value under `key`, marking it used.
    pub fn get(&self, key: &Key) -> Option<V> {
        let now = coarse_now();
        let mut inner = self.lock();
        let slot = inner.lru.get_mut(key)?;
        slot.touched = now;
        Some(slot.value.clone())
    }

    /// The value under `key`, or `make()` stored there (weight 0).
    pub fn get_or_insert_with(&self, key: Key, make: impl FnOnce() -> V) -> V {
        if let Some(v) = self.get(&key) {
            return v;
        }
        let value = make();
        self.insert_weighed(key, value.clone(), 0);
        value
    }

    pub fn insert(&self, key: Key, value: V) {
        self.insert_weighed(key, value, 0);
    }

    /// Stores `value` under `key`, charging `weight` against the weight
    /// bound; a value heavier than the whole bound is not stored.
    pub fn insert_weighed(&self, key: Key, value: V, weight: u64) {
        if self.max_weight > 0 && weight > self.max_weight {
            self.remove(&key);
            return;
        }
        let now = coarse_now();
        let mut inner = self.lock();
        if let Some(old) = inner.lru.put(
            key,
            Slot {
                value,
                weight,
                touched: now,
            },
        ) {
            inner.weight = inner.weight.saturating_sub(old.weight);
        }
        inner.weight += weight;
        self.shrink(&mut inner, now);
    }

    fn shrink(&self, inner: &mut Inner<V>, now: Duration) {
        loop {
            let over = inner.lru.len() > self.max_entries
                || (self.max_weight > 0 && inner.weight > self.max_weight);
            let idle = inner
                .lru
                .peek_lru()
                .is_some_and(|(_, s)| now.saturating_sub(s.touched) > self.idle);
            if !over && !idle {
                return;
            }
            match inner.lru.pop_lru() {
                Some((_, old)) => inner.weight = inner.weight.saturating_sub(old.weight),
                None => return,
            }
        }
    }

    pub fn remove(&self, key: &Key) {
        let mut inner = self.lock();
        if let Some(old) = inner.lru.pop(key) {
            inner.weight = inner.weight.saturating_sub(old.weight);
        }
    }

    /// Drops entries `keep` says no to, and idle ones.
    pub fn retain(&self, mut keep: impl FnMut(&V) -> bool) {
        let mut inner = self.lock();
        let doomed: Vec<Key> = inner
            .lru
            .iter()
            .filter(|(_, s)| !keep(&s.value))
            .map(|(k, _)| *k)
            .collect();
        for k in doomed {
            if let Some(old) = inner.lru.pop(&k) {
                inner.weight = inner.weight.saturating_sub(old.weight);
            }
        }
        self.shrink(&mut inner, coarse_now());
    }

    pub fn len(&self) -> usize {
        self.lock().lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Summed weight of the entries.
    pub fn weight(&self) -> u64 {
        self.lock().weight
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(i: usize) -> Key {
        Key::of("t", &[&i.to_string()])
    }

    #[test]
    fn bounded_by_entries_and_weight_lru_first() {
        let m = BoundedMap::new(Bounds {
            max_entries: 3,
            max_weight: 100,
            idle: Duration::from_secs(60),
        });
        for i in 0..3 {
            m.insert_weighed(k(i), i, 10);
        }
        assert_eq!(m.get(&k(0)), Some(0)); // 0 is now recent
        m.insert_weighed(k(3), 3, 10);
        assert_eq!((m.len(), m.get(&k(1))), (3, None), "1 was least recent");
        m.insert_weighed(k(4), 4, 90);
        assert!(m.weight() <= 100 && m.get(&k(4)) == Some(4));
        m.insert_weighed(k(5), 5, 101);
        assert_eq!(m.get(&k(5)), None, "heavier than the bound: not kept");
        for i in 0..10_000 {
            m.insert(k(100 + i), i);
        }
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn idle_entries_expire() {
        let m = BoundedMap::new(Bounds {
            max_entries: 100,
            max_weight: 0,
            idle: Duration::from_millis(30),
        });
        m.insert(k(1), 1);
        std::thread::sleep(Duration::from_millis(50));
        m.insert(k(2), 2);
        assert_eq!((m.get(&k(1)), m.get(&k(2))), (None, Some(2)));
        assert_eq!(m.get_or_insert_with(k(3), || 3), 3);
        assert_eq!(m.get_or_insert_with(k(3), || 4), 3);
        m.retain(|v| *v != 3);
        assert_eq!(m.get(&k(3)), None);
    }
}
