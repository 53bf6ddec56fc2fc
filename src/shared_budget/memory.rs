//! An in-process [`SlotStore`] with the Redis store's semantics, for tests: it runs on tokio's
//! clock (paused-time friendly) and can be switched off to simulate an outage.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    lease_slots, Lease, LeaseRequest, SharedAdaptive, SlotStore, StoreError, ThrottleRequest,
};

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
