//! Cluster leasing, one bucket's side of it: the slots leased from the shared store, the demand
//! to lease ahead for, and when to ask for more. Pure: the pacer's handle does the asking.

use std::collections::VecDeque;
use std::time::Duration;

use crate::budget::{Limit, Nanos};
use crate::shared_budget::LeaseRequest;

use super::BucketKey;

/// "Not before a lease arrives."
pub(super) const NEVER: Nanos = u64::MAX / 4;
/// How far ahead a replica leases slots, at most.
pub(super) const LEASE_HORIZON: Nanos = 100_000_000;
/// Most slots in one lease.
const LEASE_MAX: u32 = 200;
/// How long the store may take to answer before it is considered down.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(250);
/// How often an unreachable store is tried again.
pub(super) const STORE_PROBE: Duration = Duration::from_millis(500);

/// A bucket's slots leased from the shared store (cluster mode).
#[derive(Debug)]
pub(super) struct Leases {
    pub key: String,
    /// Start times of leased, unused slots, in order.
    pub slots: VecDeque<Nanos>,
    /// Slots used in the last [`LEASE_HORIZON`]: the demand to lease ahead for, so that a
    /// request seldom waits for a round trip to the store.
    recent: VecDeque<Nanos>,
    pub fetching: bool,
    /// The store answers: slots come from it. Otherwise the bucket paces locally at its share.
    pub leasing: bool,
    /// Divides the rate while the store is unreachable (`fallback_replicas`), and for a grace
    /// period after it is back, while other replicas may still pace on their own share.
    pub divisor: f64,
    pub grace_until: Nanos,
    /// The end of the shared schedule as our last lease showed it (its last slot plus one
    /// interval), in our time: no slot we lease later starts before it.
    schedule_end: Nanos,
    /// Slots of the shared schedule per slot of ours, lately (1: we are alone), from the gaps
    /// other replicas' leases left between ours; decayed, so it follows the load.
    ours: f64,
    others: f64,
}

/// How much of the share estimate each lease keeps from before (per lease).
const SHARE_DECAY: f64 = 0.7;
/// The most replicas the share estimate assumes.
const MAX_CONTENTION: f64 = 64.0;

impl Leases {
    pub fn new(key: String, store_up: bool, fallback_replicas: u32) -> Leases {
        Leases {
            key,
            slots: VecDeque::new(),
            recent: VecDeque::new(),
            fetching: false,
            leasing: store_up,
            divisor: if store_up {
                1.0
            } else {
                f64::from(fallback_replicas)
            },
            grace_until: 0,
            schedule_end: 0,
            ours: 0.0,
            others: 0.0,
        }
    }

    /// Slots of the shared schedule per slot of ours, lately: 1 alone, about N with N replicas
    /// as busy as we are.
    pub fn contention(&self) -> f64 {
        if self.ours <= 0.0 {
            return 1.0;
        }
        ((self.ours + self.others) / self.ours).clamp(1.0, MAX_CONTENTION)
    }

    /// Learns from the slots of a lease (in our time, in order) what the shared schedule is
    /// doing: slots between the end of our previous lease (or the store's now, `base`, or the
    /// pause's end, whichever is later) and the first of this one went to other replicas.
    pub fn learn(&mut self, slots: &[Nanos], base: Nanos, paused_until: Nanos, interval: Nanos) {
        let (Some(&first), Some(&last)) = (slots.first(), slots.last()) else {
            return;
        };
        let interval = interval.max(1);
        let from = self.schedule_end.max(base).max(paused_until);
        let others = first.saturating_sub(from) / interval;
        self.ours = self.ours * SHARE_DECAY + slots.len() as f64;
        self.others = self.others * SHARE_DECAY + others as f64;
        self.schedule_end = self.schedule_end.max(last.saturating_add(interval));
    }

    /// Start of the request `ahead` places behind those waiting for slots, from what the
    /// shared schedule showed: our leased slots first, then slots after the schedule's end at
    /// our share of the rate. An estimate (others lease after it is made), not a bound.
    pub fn predict(&self, now: Nanos, ahead: u64, interval: Nanos) -> Nanos {
        let leased = self.slots.iter().filter(|&&t| t >= now).count() as u64;
        if ahead < leased {
            return self
                .slots
                .iter()
                .filter(|&&t| t >= now)
                .nth(ahead as usize)
                .copied()
                .unwrap_or(now);
        }
        let beyond = (ahead - leased) as f64;
        let per_slot = interval as f64 * self.contention();
        let from = now
            .max(self.schedule_end)
            .max(self.slots.back().map_or(0, |&t| t.saturating_add(interval)));
        from.saturating_add((beyond * per_slot) as Nanos)
    }

    /// One leased slot was used, at `at`.
    pub fn used(&mut self, at: Nanos) {
        self.slots.pop_front();
        self.recent.push_back(at);
        self.forget_before(at);
    }

    fn forget_before(&mut self, now: Nanos) {
        while self
            .recent
            .front()
            .is_some_and(|&t| t + LEASE_HORIZON < now)
        {
            self.recent.pop_front();
        }
    }

    /// The lease to ask for now, if any: only while requests wait for slots, and only as far
    /// ahead as [`LEASE_HORIZON`], so replicas take turns. `limit` is the whole rate (the
    /// shared schedule runs at it, whatever our local share); slots starting before
    /// `stale_before` are gone (using them late would squeeze the next ones).
    pub fn needed(
        &mut self,
        waiting: usize,
        limit: Limit,
        now: Nanos,
        stale_before: Nanos,
    ) -> Option<LeaseRequest> {
        if !self.leasing || self.fetching {
            return None;
        }
        if self.divisor > 1.0 && now >= self.grace_until {
            self.divisor = 1.0;
        }
        while self.slots.front().is_some_and(|&t| t < stale_before) {
            self.slots.pop_front();
        }
        self.forget_before(now);
        // Those waiting now, or as many as came in the last horizon, whichever is more; lease
        // again when a request waits without a slot, or when fewer than half of that are left
        // (not for every slot used: one lease covers many requests).
        let wanted = waiting.max(self.recent.len());
        let short = waiting > self.slots.len() || self.slots.len() * 2 < wanted;
        if !short || self.slots.back().is_some_and(|&t| t >= now + LEASE_HORIZON) {
            return None;
        }
        let per_horizon = (LEASE_HORIZON / limit.interval.max(1)).max(1) as usize;
        let count = (wanted - self.slots.len())
            .min(per_horizon)
            .min(LEASE_MAX as usize) as u32;
        self.fetching = true;
        Some(LeaseRequest {
            key: self.key.clone(),
            interval: Duration::from_nanos(limit.interval),
            tolerance: Duration::from_nanos(limit.tolerance),
            count,
        })
    }
}

/// Cluster mode as the queue sees it: where bucket keys live in the store, the fallback share,
/// and whether the store answers.
#[derive(Debug)]
pub(super) struct ClusterState {
    pub prefix: String,
    pub fallback_replicas: u32,
    pub up: bool,
    /// Since when the store has not answered.
    pub down_since: Option<Nanos>,
    /// Time spent on the fallback share in past outages.
    pub fallback_total: Duration,
}

impl ClusterState {
    pub fn new(prefix: &str, fallback_replicas: u32) -> ClusterState {
        ClusterState {
            prefix: prefix.to_string(),
            fallback_replicas: fallback_replicas.max(1),
            up: true,
            down_since: None,
            fallback_total: Duration::ZERO,
        }
    }

    /// The store key of a bucket: prefix, budget, and the key's hash in hex.
    pub fn store_key(&self, key: &BucketKey) -> String {
        match key.key {
            None => format!("{}{}", self.prefix, key.budget),
            Some(k) => format!("{}{}:{}", self.prefix, key.budget, crate::digest::hex(&k)),
        }
    }

    pub fn leases(&self, key: &BucketKey) -> Leases {
        Leases::new(self.store_key(key), self.up, self.fallback_replicas)
    }
}
