//! Shared budget state for replicas: the [`SlotStore`] seam between the pacer and where the
//! shared state lives (Redis in production, [`MemoryStore`] in tests). A store hands out leases
//! of slots from one GCRA schedule per bucket, so replicas together never exceed a budget.
//!
//! Times cross the seam as delays from the moment the store answered, so replicas need no
//! common clock: only the store's clock orders the slots.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

/// Ask for `count` slots of a bucket.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseRequest {
    /// The bucket's store key (prefix, budget, key hash).
    pub key: String,
    /// The interval `T` at the rate in force.
    pub interval: Duration,
    /// The burst tolerance `τ`.
    pub tolerance: Duration,
    pub count: u32,
}

/// The rate-in-force state shared by all replicas after a 429.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SharedAdaptive {
    pub lowered: f64,
    pub ceiling: f64,
    /// How long ago the decrease happened.
    pub ago: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// Slot start times, as delays from the store's answer, in order.
    pub slots: Vec<Duration>,
    /// What is left of the bucket's pause.
    pub paused_for: Duration,
    pub adaptive: Option<SharedAdaptive>,
}

/// A 429 seen by one replica, for all of them.
#[derive(Debug, Clone, PartialEq)]
pub struct ThrottleRequest {
    pub key: String,
    pub pause: Duration,
    pub tolerance: Duration,
    /// The new rate in force, when this replica lowered it.
    pub lowered: Option<(f64, f64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("shared budget store: {0}")]
    Unavailable(String),
    #[error("shared budget store did not answer within {0:?}")]
    Timeout(Duration),
}

#[async_trait]
pub trait SlotStore: Send + Sync + 'static {
    async fn lease(&self, req: LeaseRequest) -> Result<Lease, StoreError>;
    async fn throttle(&self, req: ThrottleRequest) -> Result<(), StoreError>;
    /// Cheap health check, used while the store is considered down.
    async fn ping(&self) -> Result<(), StoreError>;
}

#[derive(Debug, Default, Clone, Copy)]
struct MemBucket {
    /// Nanoseconds since the store's epoch.
    tat: u64,
    paused_until: u64,
    adaptive: Option<(f64, f64, u64)>,
}

/// An in-process store with the same semantics as the Redis one, for tests (paused time
/// friendly: it uses tokio's clock). It can be switched off to simulate an outage.
pub struct MemoryStore {
    epoch: Instant,
    buckets: Mutex<HashMap<String, MemBucket>>,
    down: std::sync::atomic::AtomicBool,
    calls: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore {
            epoch: Instant::now(),
            buckets: Mutex::new(HashMap::new()),
            down: std::sync::atomic::AtomicBool::new(false),
            calls: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl MemoryStore {
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// Lease and throttle calls answered so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check(&self) -> Result<u64, StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable("switched off".into()));
        }
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(Instant::now().duration_since(self.epoch).as_nanos() as u64 + 3_600_000_000_000)
    }
}

/// The lease arithmetic, shared by [`MemoryStore`] and documented for the Redis script:
/// each slot starts at `max(now, tat − τ, paused_until)` and moves `tat` to
/// `max(tat, start) + T`. Returns the slot starts.
pub fn lease_slots(
    tat: &mut u64,
    paused_until: u64,
    now: u64,
    interval: u64,
    tolerance: u64,
    count: u32,
) -> Vec<u64> {
    (0..count)
        .map(|_| {
            let start = now.max(tat.saturating_sub(tolerance)).max(paused_until);
            *tat = (*tat).max(start) + interval;
            start
        })
        .collect()
}

#[async_trait]
impl SlotStore for MemoryStore {
    async fn lease(&self, req: LeaseRequest) -> Result<Lease, StoreError> {
        let now = self.check()?;
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(req.key).or_default();
        let slots = lease_slots(
            &mut b.tat,
            b.paused_until,
            now,
            req.interval.as_nanos() as u64,
            req.tolerance.as_nanos() as u64,
            req.count,
        );
        Ok(Lease {
            slots: slots
                .into_iter()
                .map(|s| Duration::from_nanos(s - now))
                .collect(),
            paused_for: Duration::from_nanos(b.paused_until.saturating_sub(now)),
            adaptive: b.adaptive.map(|(lowered, ceiling, at)| SharedAdaptive {
                lowered,
                ceiling,
                ago: Duration::from_nanos(now.saturating_sub(at)),
            }),
        })
    }

    async fn throttle(&self, req: ThrottleRequest) -> Result<(), StoreError> {
        let now = self.check()?;
        let mut map = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let b = map.entry(req.key).or_default();
        let until = now + req.pause.as_nanos() as u64;
        if until > b.paused_until {
            b.paused_until = until;
            b.tat = b.tat.max(until + req.tolerance.as_nanos() as u64);
        }
        if let Some((lowered, ceiling)) = req.lowered {
            b.adaptive = Some((lowered, ceiling, now));
        }
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.check().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lease_slots_follow_the_gcra_and_the_pause() {
        let mut tat = 0;
        // 10 ms interval, burst 2 (τ = 10 ms), at t = 100 ms: two at once, then spaced
        let s = lease_slots(&mut tat, 0, 100, 10, 10, 4);
        assert_eq!(s, vec![100, 100, 110, 120]);
        // paused until 500: nothing before it
        let s = lease_slots(&mut tat, 500, 130, 10, 10, 2);
        assert_eq!(s, vec![500, 500]);
    }
}
