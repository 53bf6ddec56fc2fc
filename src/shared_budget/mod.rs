//! Shared budget state for replicas: the [`SlotStore`] seam between the pacer and where the
//! shared state lives (Redis in production, [`MemoryStore`] in tests). A store hands out
//! leases of slots from one GCRA schedule per bucket, so replicas together never exceed a budget.
//!
//! Times cross the seam as delays from the moment the store answered, so replicas need no
//! common clock: only the store's clock orders the slots.

use std::time::Duration;

use async_trait::async_trait;

mod memory;
mod redis;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, REDIS_TIMEOUT};

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
