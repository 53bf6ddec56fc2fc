//! The queue's decisions, as a pure function of (state, now): whom to admit, whom to release,
//! and which leases cluster mode needs. No clock, no I/O, no tasks: [`super::Pacer`] reads the
//! clock, delivers the releases and fetches the leases.
//!
//! Invariant: a waiting request holds no slot; slots are taken from all its buckets together at
//! the moment it is released, so waiting for one budget never burns a slot of another.
//!
//! # Order
//! Every waiter has an [`OrderKey`]: retries first (they were admitted before everyone now
//! waiting), then by `arrival + level·aging` (a high request gets a head start of `aging` over a
//! normal one, which gets the same over a low one; hence FIFO within a priority, and a request
//! of a lower priority is never passed by one that arrived more than `aging` per level after it).
//!
//! # Release
//! A waiter's buckets are ordered keyed ones first (a token's bucket), global ones last. A waiter
//! can be released only when it is first in its first bucket's queue (so only these heads are
//! candidates); candidates are tried in order, each claiming the buckets it could take before it
//! was stopped, so that a later candidate may use a bucket an earlier one does not need now
//! (a token that has spent its own budget does not hold back the shared presence budget), but
//! never one that an earlier candidate is ready for.
//!
//! # Keys
//! A keyed budget (`per: token | client_ip | header:`) has one bucket per key, created on the
//! key's first request; rotating tokens or IPv6 addresses would grow the table without end, so
//! it is bounded by the budget's `max_keys`. A bucket with nobody waiting on it is *drained*;
//! each keyed budget keeps its drained buckets in a ring, least recently drained first (a
//! bucket leaves the ring lazily, by stamp, when someone waits on it again). A drained bucket
//! that is *idle* (it would grant now at full burst, unpaused, at its configured rate: see
//! [`Bucket::is_idle`]) is the same as no bucket, so it may be forgotten at any time:
//! - every admission turns the hand of its budgets by [`SWEEP_STEPS`] entries, dropping the
//!   idle buckets it meets; a bucket that is not idle for a lasting reason (paused, slowed by a
//!   429, holding) goes to the back, a bucket that is merely recently used stops the hand
//!   (those behind it were drained later still). A pass every [`SWEEP_EVERY`] turns it by up
//!   to [`SWEEP_BATCH`], so keys are forgotten while no one arrives too;
//! - a new key that finds `max_keys` buckets evicts an idle one among the first
//!   [`EVICT_SEARCH`] of the ring, else the least recently drained one, preferring one that is
//!   merely recently used over a paused one. Such a key loses its pacing state: its next
//!   request is paced like a fresh key's (at worst a burst of `burst` early, which the
//!   upstream answers with a 429 that pauses it again). Refusing the new key instead would
//!   refuse clients that did nothing wrong to protect ones that left;
//! - a bucket with requests waiting is never evicted: they hold its place. So the table holds
//!   at most `max_keys` buckets, or more only while every bucket over that has someone waiting
//!   (bounded by `queue.max_depth`); the next pass after they drain trims it back.
//!
//! Nothing here scans the whole table on a request: admission costs O(log n) plus a bounded
//! number of hand steps, and [`Queue::view`] reads per-budget tallies kept up as buckets come,
//! go, wait, pause and slow down (it visits only the buckets whose rate is lowered now).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

use crate::budget::Nanos;
use crate::config::BudgetSpec;
use crate::shared_budget::{Lease, LeaseRequest, ThrottleRequest};
use crate::throttle::Plan;

use super::bucket::{Bucket, LATE_SLACK};
use super::lease::{ClusterState, STORE_PROBE};
use super::{BucketKey, BudgetView, Demand, Rejection};

/// How often a pass turns every keyed budget's hand by up to [`SWEEP_BATCH`].
pub const SWEEP_EVERY: Nanos = 10_000_000_000;
/// Ring entries a periodic sweep visits per budget (about 50 µs under the lock).
pub const SWEEP_BATCH: usize = 1024;
/// Ring entries an admission visits per keyed budget: more than the one entry an admission
/// can add, so the ring's stale entries and idle keys go as fast as they come.
pub const SWEEP_STEPS: usize = 2;
/// Ring entries looked at for an idle bucket before a table at `max_keys` evicts a busy one.
pub const EVICT_SEARCH: usize = 16;

/// Queue order; smaller goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrderKey {
    /// 0 for a retry, 1 otherwise.
    class: u8,
    /// Arrival plus the priority's handicap, ns.
    at: u64,
    seq: u64,
}

/// A bucket and the requests waiting on it.
#[derive(Debug)]
struct Lane {
    bucket: Bucket,
    /// Everyone waiting on this bucket, in order.
    waiting: BTreeMap<OrderKey, u64>,
    /// The waiters whose first bucket this is: the first of them is a release candidate.
    firsts: BTreeMap<OrderKey, u64>,
    /// Set when its budget left the config: it drains its queue and is then dropped.
    orphan: bool,
    /// Keyed: the stamp of its live entry in its budget's ring (while drained).
    stamp: u64,
}

/// One budget's tallies, kept up as its buckets change so that [`Queue::view`] need not visit
/// them all, and, for a keyed budget, its ring of drained buckets (see the module doc).
#[derive(Debug, Default)]
struct Tally {
    keys: usize,
    waiting: usize,
    /// The latest end of a pause of any of its buckets: pauses only ever extend, and an idle
    /// bucket's pause is over, so this is the longest pause in force (a paused bucket that a
    /// full table evicted, the last resort, leaves its pause here until it ends).
    paused_until: Nanos,
    /// Buckets whose rate may be lowered now (pruned by [`Queue::view`]).
    lowered: HashSet<Option<[u8; 16]>>,
    /// Keyed: drained buckets, least recently drained first, with their stamp; an entry whose
    /// stamp is not its bucket's is stale.
    ring: VecDeque<([u8; 16], u64)>,
}

#[derive(Debug)]
struct Waiter<W> {
    order: OrderKey,
    buckets: Vec<BucketKey>,
    arrived: Nanos,
    not_after: Option<Nanos>,
    /// What the caller delivers the release through.
    payload: W,
}

/// The outcome of an admission that was not refused.
#[derive(Debug)]
pub enum Admitted<W> {
    /// Waiting, with this id, predicted to start after this long.
    Queued { id: u64, predicted: Duration },
    /// Nothing to wait for (no known budget): go now.
    Now(W),
}

/// A waiter whose slots were all taken at `taken_at`.
#[derive(Debug)]
pub struct Release<W> {
    pub id: u64,
    pub buckets: Vec<BucketKey>,
    pub arrived: Nanos,
    pub taken_at: Nanos,
    pub payload: W,
}

/// What one pass decided.
#[derive(Debug)]
pub struct Pass<W> {
    pub released: Vec<Release<W>>,
    /// Leases to ask the shared store for (cluster mode).
    pub leases: Vec<(BucketKey, LeaseRequest)>,
    /// When to look again, if anything waits.
    pub wake: Option<Nanos>,
}

/// The queue: every bucket, every waiter, and the indexes that keep a pass cheap.
#[derive(Debug)]
pub struct Queue<W> {
    specs: HashMap<Arc<str>, BudgetSpec>,
    lanes: HashMap<BucketKey, Lane>,
    /// Per budget name (configured or not, while it has buckets).
    tallies: HashMap<Arc<str>, Tally>,
    /// Keyed budgets that may hold more than `max_keys` buckets (see [`Queue::trim`]).
    over: HashSet<Arc<str>>,
    next_stamp: u64,
    waiters: HashMap<u64, Waiter<W>>,
    /// Release candidates, in order: the head of each lane's `firsts`.
    candidates: BTreeSet<(OrderKey, u64)>,
    /// How many candidates need each bucket: a scan stops at a blocked bucket that every
    /// remaining candidate needs.
    need: HashMap<BucketKey, usize>,
    /// Buckets with requests waiting on them (where leases may be needed).
    active: HashSet<BucketKey>,
    /// Shared buckets that granted in this pass: they may want to lease ahead.
    prefetch: HashSet<BucketKey>,
    /// Retries with a deadline, by deadline.
    deadlines: BTreeSet<(Nanos, u64)>,
    /// Buckets holding for a probe's answer.
    holding: HashSet<BucketKey>,
    next_id: u64,
    max_depth: usize,
    aging: Nanos,
    last_sweep: Nanos,
    /// Pacing runs this fraction of the configured rates (a guard band against jitter).
    guard: f64,
    cluster: Option<ClusterState>,
}

fn specs_by_name(budgets: &[BudgetSpec]) -> HashMap<Arc<str>, BudgetSpec> {
    budgets
        .iter()
        .map(|b| (Arc::from(b.name.as_str()), b.clone()))
        .collect()
}

impl<W> Queue<W> {
    pub fn new(budgets: &[BudgetSpec], max_depth: usize, aging: Duration) -> Queue<W> {
        Queue {
            specs: specs_by_name(budgets),
            lanes: HashMap::new(),
            tallies: HashMap::new(),
            over: HashSet::new(),
            next_stamp: 0,
            waiters: HashMap::new(),
            candidates: BTreeSet::new(),
            need: HashMap::new(),
            active: HashSet::new(),
            prefetch: HashSet::new(),
            deadlines: BTreeSet::new(),
            holding: HashSet::new(),
            next_id: 0,
            max_depth,
            aging: aging.as_nanos() as Nanos,
            last_sweep: 0,
            guard: 1.0,
            cluster: None,
        }
    }

    pub fn set_guard(&mut self, guard: f64) {
        self.guard = guard.clamp(0.5, 1.0);
    }

    /// Cluster mode: buckets lease their slots from a shared store under `prefix`.
    pub fn set_cluster(&mut self, prefix: &str, fallback_replicas: u32) {
        self.cluster = Some(ClusterState::new(prefix, fallback_replicas));
    }

    /// The budget's `Arc<str>` name as the queue knows it, for building [`BucketKey`]s.
    pub fn bucket_key(&self, budget: &str, key: Option<[u8; 16]>) -> BucketKey {
        let name = self
            .specs
            .get_key_value(budget)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(budget));
        BucketKey { budget: name, key }
    }

    /// Admission at `now`: queue the request, or refuse it if its slot cannot start within
    /// `max_wait`. Buckets of unknown budgets are ignored; a request with none goes now.
    pub fn admit(
        &mut self,
        now: Nanos,
        mut demand: Demand,
        not_after: Option<Nanos>,
        payload: W,
    ) -> Result<Admitted<W>, Rejection> {
        demand.buckets.sort();
        demand.buckets.dedup();
        let mut created = Vec::new();
        for b in &demand.buckets {
            if b.key.is_some() {
                self.sweep_keys(&b.budget, now, SWEEP_STEPS);
            }
            if self.lanes.contains_key(b) {
                continue;
            }
            let Some(spec) = self.specs.get(&b.budget) else {
                continue;
            };
            if b.key.is_some() {
                let max_keys = spec.max_keys;
                while self
                    .tallies
                    .get(&b.budget)
                    .is_some_and(|t| t.keys >= max_keys)
                {
                    if !self.evict_one(&b.budget, now) {
                        // Every bucket has someone waiting: over max_keys until they leave.
                        self.over.insert(b.budget.clone());
                        break;
                    }
                }
            }
            let spec = &self.specs[&b.budget];
            let leases = self.cluster.as_ref().map(|c| c.leases(b));
            let lane = Lane {
                bucket: Bucket::new(spec, self.guard, leases),
                waiting: BTreeMap::new(),
                firsts: BTreeMap::new(),
                orphan: false,
                stamp: 0,
            };
            self.lanes.insert(b.clone(), lane);
            self.tallies.entry(b.budget.clone()).or_default().keys += 1;
            if b.key.is_some() {
                created.push(b.clone());
            }
        }
        let admitted = self.enqueue(now, demand, not_after, payload);
        if !matches!(admitted, Ok(Admitted::Queued { .. })) {
            // No one waits on them: drained from the start.
            for b in &created {
                self.drained(b);
            }
        }
        admitted
    }

    /// Admission's second half, once every bucket of `demand` exists.
    fn enqueue(
        &mut self,
        now: Nanos,
        mut demand: Demand,
        not_after: Option<Nanos>,
        payload: W,
    ) -> Result<Admitted<W>, Rejection> {
        demand.buckets.retain(|b| self.lanes.contains_key(b));
        // Narrowest first (keyed, then the slowest): see the module doc.
        demand.buckets.sort_by(|a, b| {
            let rate = |k: &BucketKey| self.lanes[k].bucket.adaptive.configured;
            (a.key.is_none(), rate(a))
                .partial_cmp(&(b.key.is_none(), rate(b)))
                .unwrap_or(std::cmp::Ordering::Equal)
        });

        let id = self.next_id;
        self.next_id += 1;
        let level = u64::from(demand.priority.level());
        let order = OrderKey {
            class: if demand.retry { 0 } else { 1 },
            at: now + level * self.aging,
            seq: id,
        };
        let predicted = Duration::from_nanos(self.predict(now, &demand.buckets, &order) - now);
        // A retry was admitted once already: it is not counted against the depth.
        if !demand.retry && self.waiters.len() >= self.max_depth {
            // Honest hint: when the queue ahead should have drained by.
            return Err(Rejection::Full {
                depth: self.waiters.len(),
                retry_after: predicted.max(Duration::from_secs(1)),
            });
        }
        if predicted > demand.max_wait {
            return Err(Rejection::TooLong { wait: predicted });
        }
        // In cluster mode the prediction is an estimate (other replicas take slots from the
        // same schedule after it was made): the wait is bounded by a deadline instead, and a
        // request still waiting then leaves the queue (its caller answers `queue.wait`).
        let not_after = match (not_after, &self.cluster) {
            (None, Some(_)) => Some(now.saturating_add(demand.max_wait.as_nanos() as Nanos)),
            (n, _) => n,
        };
        let Some(first) = demand.buckets.first().cloned() else {
            return Ok(Admitted::Now(payload));
        };
        for b in &demand.buckets {
            let lane = self.lanes.get_mut(b).expect("inserted above");
            if lane.waiting.is_empty() {
                // Out of the ring: its entry there is stale from now.
                self.next_stamp += 1;
                lane.stamp = self.next_stamp;
            }
            lane.waiting.insert(order, id);
            self.tallies.entry(b.budget.clone()).or_default().waiting += 1;
            self.active.insert(b.clone());
        }
        self.waiters.insert(
            id,
            Waiter {
                order,
                buckets: demand.buckets,
                arrived: now,
                not_after,
                payload,
            },
        );
        self.firsts_insert(&first, order, id);
        if let Some(t) = not_after {
            self.deadlines.insert((t, id));
        }
        Ok(Admitted::Queued { id, predicted })
    }

    /// When a request arriving at `now` on `buckets` would be predicted to start (the honest
    /// `Retry-After` of a refusal).
    pub fn predicted_start(&self, now: Nanos, buckets: &[BucketKey]) -> Nanos {
        let known: Vec<BucketKey> = buckets
            .iter()
            .filter(|b| self.lanes.contains_key(*b))
            .cloned()
            .collect();
        let last = OrderKey {
            class: 1,
            at: now,
            seq: u64::MAX,
        };
        self.predict(now, &known, &last)
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.waiters.len()
    }

    /// Removes a waiter (it left); true when it was still waiting.
    pub fn cancel(&mut self, id: u64) -> bool {
        self.remove(id).is_some()
    }

    /// Removes every waiter (shutdown past its drain); returns their payloads.
    pub fn close_all(&mut self) -> Vec<W> {
        let ids: Vec<u64> = self.waiters.keys().copied().collect();
        ids.into_iter()
            .filter_map(|id| self.remove(id))
            .map(|w| w.payload)
            .collect()
    }

    /// Slots taken at `now` and not used come back.
    pub fn give_back(&mut self, buckets: &[BucketKey], now: Nanos) {
        for key in buckets {
            if let Some(l) = self.lanes.get_mut(key) {
                l.bucket.give_back(now);
            }
        }
    }

    /// An upstream 429 on a request granted at `sent` and charged to `buckets`: each keyed
    /// bucket does what `plan.keyed` says, each global one `plan.shared` (see
    /// [`crate::throttle`]). Returns the budgets whose rate was lowered and what to tell the
    /// other replicas.
    pub fn throttle(
        &mut self,
        buckets: &[BucketKey],
        retry_after: Option<Duration>,
        plan: Plan,
        sent: Nanos,
        now: Nanos,
    ) -> (Vec<String>, Vec<ThrottleRequest>) {
        let mut lowered = Vec::new();
        let mut tell = Vec::new();
        for key in buckets {
            let Some(l) = self.lanes.get_mut(key) else {
                continue;
            };
            let action = if key.key.is_some() {
                plan.keyed
            } else {
                plan.shared
            };
            let (was_lowered, t) = l
                .bucket
                .throttle(now, sent, retry_after, action, self.guard);
            if l.bucket.is_holding(now) {
                self.holding.insert(key.clone());
            }
            let tally = self.tallies.entry(key.budget.clone()).or_default();
            tally.paused_until = tally.paused_until.max(l.bucket.paused_until);
            if !l.bucket.adaptive.is_settled(now) {
                tally.lowered.insert(key.key);
            }
            if was_lowered {
                lowered.push(key.budget.to_string());
            }
            tell.extend(t);
        }
        (lowered, tell)
    }

    /// A request granted at `granted` and charged to `buckets` came back without a 429: holds
    /// that began before it end. Returns whether one did (those waiting may go now).
    pub fn answered(&mut self, buckets: &[BucketKey], granted: Nanos, now: Nanos) -> bool {
        let mut ended = false;
        for key in buckets {
            if !self.holding.contains(key) {
                continue;
            }
            let Some(l) = self.lanes.get_mut(key) else {
                self.holding.remove(key);
                continue;
            };
            ended |= l.bucket.answered(granted);
            if !l.bucket.is_holding(now) {
                self.holding.remove(key);
            }
        }
        ended
    }

    /// Whether any bucket holds for a probe's answer (else [`Queue::answered`] has nothing
    /// to do).
    pub fn is_holding(&self) -> bool {
        !self.holding.is_empty()
    }

    /// A request granted at `granted` left at `sent`. One that left well after its grant (a
    /// loaded process, a slow connect) moves its buckets' schedule as if granted then (see
    /// [`Bucket::sent_late`]), so the spacing holds on the wire and not only here: an upstream
    /// window opened by a late request must not see the requests N slots later arrive inside
    /// it.
    pub fn sent(&mut self, buckets: &[BucketKey], granted: Nanos, sent: Nanos) {
        for key in buckets {
            if let Some(l) = self.lanes.get_mut(key) {
                l.bucket.sent_late(granted, sent);
            }
        }
    }

    /// A lease for `key` arrived; the store's answer is taken to have been given at `base`.
    pub fn lease_arrived(&mut self, key: &BucketKey, lease: &Lease, base: Nanos) {
        if let Some(l) = self.lanes.get_mut(key) {
            l.bucket.apply_lease(lease, base);
            let tally = self.tallies.entry(key.budget.clone()).or_default();
            tally.paused_until = tally.paused_until.max(l.bucket.paused_until);
            if lease.adaptive.is_some() {
                tally.lowered.insert(key.key);
            }
        }
    }

    /// A lease for `key` did not arrive.
    pub fn lease_failed(&mut self, key: &BucketKey) {
        if let Some(l) = self
            .lanes
            .get_mut(key)
            .and_then(|l| l.bucket.shared.as_mut())
        {
            l.fetching = false;
        }
    }

    /// The store stopped answering at `now`: every bucket paces locally at its fallback share.
    /// Returns the fallback divisor when this is news (the store was up until now).
    pub fn store_down(&mut self, now: Nanos) -> Option<u32> {
        let c = self.cluster.as_mut().filter(|c| c.up)?;
        c.up = false;
        c.down_since = Some(now);
        let replicas = c.fallback_replicas;
        for l in self.lanes.values_mut() {
            l.bucket.store_down(now, f64::from(replicas));
        }
        Some(replicas)
    }

    /// The store answers again: buckets lease again, within their own share for a grace
    /// period (other replicas may find the store up to one probe later).
    pub fn store_up(&mut self, now: Nanos) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        c.up = true;
        if let Some(since) = c.down_since.take() {
            c.fallback_total += Duration::from_nanos(now.saturating_sub(since));
        }
        let grace = now + 2 * STORE_PROBE.as_nanos() as Nanos;
        for l in self.lanes.values_mut() {
            l.bucket.store_up(grace);
        }
    }

    /// In cluster mode: whether the store answers, and the time spent on the fallback share.
    pub fn store_status(&self, now: Nanos) -> Option<(bool, Duration)> {
        let c = self.cluster.as_ref()?;
        let current = c.down_since.map_or(Duration::ZERO, |t| {
            Duration::from_nanos(now.saturating_sub(t))
        });
        Some((c.up, c.fallback_total + current))
    }

    pub fn store_is_up(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.up)
    }

    /// New budget definitions (reload). Buckets of unchanged budgets keep their state; changed
    /// ones keep their place in time and take the new rate at once; waiters of removed budgets
    /// are still served by their old buckets.
    pub fn update(
        &mut self,
        budgets: &[BudgetSpec],
        max_depth: usize,
        aging: Duration,
        now: Nanos,
    ) {
        self.specs = specs_by_name(budgets);
        // A smaller max_keys takes effect over the next passes.
        self.over.extend(self.tallies.keys().cloned());
        self.max_depth = max_depth;
        self.aging = aging.as_nanos() as Nanos;
        for (key, l) in self.lanes.iter_mut() {
            match self.specs.get(&key.budget) {
                Some(spec) => {
                    l.orphan = false;
                    l.bucket.reconfigure(spec, self.guard, now);
                }
                None => l.orphan = true,
            }
        }
    }

    /// The rate in force and state of every configured budget, from the tallies: it visits
    /// only the buckets whose rate is lowered now (and forgets those that recovered), never
    /// every key.
    pub fn view(&mut self, now: Nanos) -> Vec<BudgetView> {
        let mut views: Vec<BudgetView> = self
            .specs
            .iter()
            .map(|(name, s)| {
                let mut v = BudgetView {
                    name: s.name.clone(),
                    configured_rate: s.rate.per_second,
                    rate_in_force: s.rate.per_second,
                    keys: 0,
                    waiting: 0,
                    paused_for: Duration::ZERO,
                };
                let Some(t) = self.tallies.get_mut(name) else {
                    return v;
                };
                v.keys = t.keys;
                v.waiting = t.waiting;
                v.paused_for = Duration::from_nanos(t.paused_until.saturating_sub(now));
                let lanes = &self.lanes;
                t.lowered.retain(|key| {
                    let k = BucketKey {
                        budget: name.clone(),
                        key: *key,
                    };
                    let Some(l) = lanes.get(&k) else {
                        return false;
                    };
                    let r = l.bucket.adaptive.rate(now);
                    // At its full rate a bucket reads exactly the configured rate (r / guard
                    // is not always that in floating point).
                    if r < l.bucket.adaptive.configured {
                        v.rate_in_force = v.rate_in_force.min(r / self.guard);
                    }
                    !l.bucket.adaptive.is_settled(now)
                });
                v
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        views
    }

    /// The rate in force of each of `buckets`, by budget name: what a 429 changed, without a
    /// [`Queue::view`] of everything.
    pub fn rates_of(&self, buckets: &[BucketKey], now: Nanos) -> Vec<(Arc<str>, f64)> {
        buckets
            .iter()
            .filter_map(|k| {
                let a = &self.lanes.get(k)?.bucket.adaptive;
                let r = a.rate(now);
                let shown = if r < a.configured {
                    r / self.guard
                } else {
                    self.specs.get(&k.budget)?.rate.per_second
                };
                Some((k.budget.clone(), shown))
            })
            .collect()
    }

    /// Buckets of `budget` kept now.
    pub fn keys(&self, budget: &str) -> usize {
        self.tallies.get(budget).map_or(0, |t| t.keys)
    }

    /// Releases every waiter that can go at `now`, and says which leases are needed and when
    /// to look again.
    pub fn pass(&mut self, now: Nanos) -> Pass<W> {
        let (released, wake) = self.release(now);
        self.trim(now);
        let mut leases = Vec::new();
        let prefetch = std::mem::take(&mut self.prefetch);
        if self.store_is_up() {
            for key in self.active.iter().chain(prefetch.difference(&self.active)) {
                let Some(l) = self.lanes.get_mut(key) else {
                    continue;
                };
                if let Some(req) = l.bucket.lease_needed(l.waiting.len(), now) {
                    leases.push((key.clone(), req));
                }
            }
        }
        Pass {
            released,
            leases,
            wake,
        }
    }

    fn remove(&mut self, id: u64) -> Option<Waiter<W>> {
        let (first, order) = {
            let w = self.waiters.get(&id)?;
            (w.buckets.first().cloned(), w.order)
        };
        if let Some(first) = first {
            self.firsts_remove(&first, &order);
        }
        let w = self.waiters.remove(&id)?;
        for b in &w.buckets {
            if let Some(l) = self.lanes.get_mut(b) {
                l.waiting.remove(&w.order);
                if let Some(t) = self.tallies.get_mut(&b.budget) {
                    t.waiting -= 1;
                }
                if l.waiting.is_empty() {
                    self.active.remove(b);
                    self.drained(b);
                }
            }
        }
        if let Some(t) = w.not_after {
            self.deadlines.remove(&(t, id));
        }
        Some(w)
    }

    fn head(&self, key: &BucketKey) -> Option<(OrderKey, u64)> {
        self.lanes[key]
            .firsts
            .first_key_value()
            .map(|(o, i)| (*o, *i))
    }

    /// Adds a waiter to a lane's `firsts`, keeping the candidate index in step.
    fn firsts_insert(&mut self, key: &BucketKey, order: OrderKey, id: u64) {
        let before = self.head(key);
        self.lanes
            .get_mut(key)
            .expect("lane exists")
            .firsts
            .insert(order, id);
        self.head_changed(key, before);
    }

    fn firsts_remove(&mut self, key: &BucketKey, order: &OrderKey) {
        if !self.lanes.contains_key(key) {
            return;
        }
        let before = self.head(key);
        self.lanes
            .get_mut(key)
            .expect("checked")
            .firsts
            .remove(order);
        self.head_changed(key, before);
    }

    fn head_changed(&mut self, key: &BucketKey, before: Option<(OrderKey, u64)>) {
        let after = self.head(key);
        if before == after {
            return;
        }
        if let Some(h) = before {
            self.candidates.remove(&h);
            for b in &self.waiters[&h.1].buckets {
                if let Some(n) = self.need.get_mut(b) {
                    *n -= 1;
                    if *n == 0 {
                        self.need.remove(b);
                    }
                }
            }
        }
        if let Some(h) = after {
            self.candidates.insert(h);
            for b in &self.waiters[&h.1].buckets {
                *self.need.entry(b.clone()).or_insert(0) += 1;
            }
        }
    }

    /// Predicted start of a request with `order` on `buckets`: each bucket's state plus one
    /// interval per request queued ahead of it there; the latest bucket decides.
    fn predict(&self, now: Nanos, buckets: &[BucketKey], order: &OrderKey) -> Nanos {
        let mut at = now;
        for key in buckets {
            let l = &self.lanes[key];
            let ahead = match l.waiting.last_key_value() {
                Some((last, _)) if last < order => l.waiting.len(),
                _ => l.waiting.range(..*order).count(),
            } as u64;
            at = at.max(l.bucket.predict(now, ahead));
        }
        at
    }

    /// One scan of the candidates in order. A candidate that cannot go claims the buckets it
    /// could take (see the module doc); one that can is released, and the scan goes on after
    /// it: releasing it changes only its own buckets, and the candidate that replaces it comes
    /// later in the order. So a pass costs one visit per candidate, however many are blocked.
    fn release(&mut self, now: Nanos) -> (Vec<Release<W>>, Option<Nanos>) {
        self.expire(now);
        let mut released = Vec::new();
        let mut wake: Option<Nanos> = self.deadlines.first().map(|(t, _)| *t);
        let mut claimed: HashSet<BucketKey> = HashSet::new();
        let mut cursor: Option<(OrderKey, u64)> = None;
        loop {
            let next = match cursor {
                None => self.candidates.first().copied(),
                Some(c) => self
                    .candidates
                    .range((Bound::Excluded(c), Bound::Unbounded))
                    .next()
                    .copied(),
            };
            let Some((order, id)) = next else { break };
            cursor = Some((order, id));
            let w = &self.waiters[&id];
            let mut mine = Vec::new();
            let mut blocked_by = None;
            for key in &w.buckets {
                if claimed.contains(key) {
                    blocked_by = Some(key);
                    break;
                }
                let b = &self.lanes[key].bucket;
                if !b.conforms(now) {
                    let at = b.ready_at(now);
                    wake = Some(wake.map_or(at, |x| x.min(at)));
                    blocked_by = Some(key);
                    break;
                }
                mine.push(key.clone());
            }
            if let Some(blocked) = blocked_by {
                // Every candidate needs this bucket (a budget shared by all routes): none of
                // the rest can go either.
                if self.need.get(blocked) == Some(&self.candidates.len()) {
                    break;
                }
                claimed.extend(mine);
                continue;
            }
            let w = self.remove(id).expect("candidate is waiting");
            // The slot is taken at the time it became free (when the waiter was already
            // there), not at the time the scheduler woke up: timer lateness must not drift the
            // schedule (1 ms late per slot is 10 % at 100/s). Lateness beyond LATE_SLACK (a
            // stalled process) is not caught up, so no burst follows a stall.
            let ready_at = w
                .buckets
                .iter()
                .map(|k| self.lanes[k].bucket.ready_at(now))
                .max()
                .unwrap_or(now);
            let taken_at = ready_at
                .max(w.arrived)
                .max(now.saturating_sub(LATE_SLACK))
                .min(now);
            for key in &w.buckets {
                let b = &mut self.lanes.get_mut(key).expect("lane of a waiter").bucket;
                b.take(taken_at, now);
                if b.shared.is_some() {
                    self.prefetch.insert(key.clone());
                }
            }
            released.push(Release {
                id,
                buckets: w.buckets,
                arrived: w.arrived,
                taken_at,
                payload: w.payload,
            });
            // The bucket that let this one go may let the next candidate go too: look again at
            // what follows with the claims of those before it still in force.
        }
        if now.saturating_sub(self.last_sweep) >= SWEEP_EVERY {
            self.sweep(now);
        }
        (released, wake)
    }

    /// Drops waiters whose deadline has passed (retries', and in cluster mode everyone's
    /// `max_wait`): their callers answer without a slot.
    fn expire(&mut self, now: Nanos) {
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id));
            self.remove(id);
        }
    }

    /// Every [`SWEEP_EVERY`]: turns every keyed budget's hand by up to [`SWEEP_BATCH`], and
    /// drops the drained global buckets of budgets that left the config.
    fn sweep(&mut self, now: Nanos) {
        self.last_sweep = now;
        let names: Vec<Arc<str>> = self.tallies.keys().cloned().collect();
        for name in names {
            self.sweep_keys(&name, now, SWEEP_BATCH);
            let global = BucketKey {
                budget: name.clone(),
                key: None,
            };
            if self
                .lanes
                .get(&global)
                .is_some_and(|l| l.orphan && l.waiting.is_empty())
            {
                self.drop_lane(&global);
            }
            if self.tallies.get(&name).is_some_and(|t| t.keys == 0)
                && !self.specs.contains_key(&name)
            {
                self.tallies.remove(&name);
            }
        }
        let lanes = &self.lanes;
        self.holding
            .retain(|k| lanes.get(k).is_some_and(|l| l.bucket.is_holding(now)));
        // Give back the table's memory once most of its keys are gone (the rehash is O(keys),
        // once per halving).
        if self.lanes.capacity() > 4 * self.lanes.len() + 64 {
            self.lanes.shrink_to(2 * self.lanes.len());
        }
    }

    /// Brings budgets that went over `max_keys` (every bucket had someone waiting, or a reload
    /// lowered it) back under it as their buckets drain, [`SWEEP_BATCH`] evictions per pass at
    /// most.
    fn trim(&mut self, now: Nanos) {
        if self.over.is_empty() {
            return;
        }
        let mut budget = SWEEP_BATCH;
        let over: Vec<Arc<str>> = self.over.iter().cloned().collect();
        for name in over {
            let max_keys = self.specs.get(&name).map_or(0, |s| s.max_keys);
            while budget > 0 && self.tallies.get(&name).is_some_and(|t| t.keys > max_keys) {
                if !self.evict_one(&name, now) {
                    break;
                }
                budget -= 1;
            }
            if self.tallies.get(&name).is_none_or(|t| t.keys <= max_keys) {
                self.over.remove(&name);
            }
        }
    }

    /// A keyed bucket has no one waiting any more: it joins the back of its budget's ring.
    fn drained(&mut self, key: &BucketKey) {
        let Some(k) = key.key else { return };
        let Some(l) = self.lanes.get_mut(key) else {
            return;
        };
        // An emptied BTreeMap keeps its root node (some 370 bytes each): most of an idle
        // key's memory, were they kept.
        l.waiting = BTreeMap::new();
        l.firsts = BTreeMap::new();
        self.next_stamp += 1;
        l.stamp = self.next_stamp;
        let t = self.tallies.entry(key.budget.clone()).or_default();
        t.ring.push_back((k, self.next_stamp));
        // Each bucket has at most one live entry: past twice that, most are stale. Compacting
        // then costs O(1) per entry pushed since the last time.
        if t.ring.len() > 2 * t.keys + 64 {
            let lanes = &self.lanes;
            let budget = &key.budget;
            t.ring
                .retain(|&(k, stamp)| live(lanes, budget, k, stamp).is_some());
            t.ring.shrink_to(2 * t.ring.len() + 64);
        }
    }

    /// Turns `budget`'s hand by up to `steps` entries: stale entries and idle buckets go, a
    /// bucket that is not idle for a lasting reason goes to the back, and one that was merely
    /// used recently stops the hand (see the module doc). Returns the buckets dropped.
    fn sweep_keys(&mut self, budget: &Arc<str>, now: Nanos, steps: usize) -> usize {
        let mut dropped = 0;
        let mut visited = 0;
        // Stale entries are not counted: each is popped once, so they cost O(1) apiece.
        while visited < steps {
            let Some(t) = self.tallies.get_mut(budget) else {
                break;
            };
            let Some((k, stamp)) = t.ring.pop_front() else {
                break;
            };
            let Some(l) = live(&self.lanes, budget, k, stamp) else {
                continue;
            };
            visited += 1;
            if l.orphan || l.bucket.is_idle(now) {
                self.drop_lane(&BucketKey {
                    budget: budget.clone(),
                    key: Some(k),
                });
                dropped += 1;
            } else if l.bucket.is_plain(now) {
                t.ring.push_front((k, stamp));
                break;
            } else {
                t.ring.push_back((k, stamp));
            }
        }
        dropped
    }

    /// Makes room for one more key of `budget`: drops an idle bucket among the first
    /// [`EVICT_SEARCH`] of its ring, else the least recently drained one that is merely busy,
    /// else the least recently drained one (paused or slowed). False when every bucket of the
    /// budget has someone waiting.
    fn evict_one(&mut self, budget: &Arc<str>, now: Nanos) -> bool {
        let Some(t) = self.tallies.get_mut(budget) else {
            return false;
        };
        let mut seen: Vec<([u8; 16], u64, bool)> = Vec::new();
        let mut idle = None;
        while seen.len() < EVICT_SEARCH {
            let Some((k, stamp)) = t.ring.pop_front() else {
                break;
            };
            let Some(l) = live(&self.lanes, budget, k, stamp) else {
                continue;
            };
            if l.orphan || l.bucket.is_idle(now) {
                idle = Some(k);
                break;
            }
            seen.push((k, stamp, l.bucket.is_plain(now)));
        }
        let victim = idle.or_else(|| {
            let i = seen.iter().position(|s| s.2).unwrap_or(0);
            (!seen.is_empty()).then(|| seen.remove(i).0)
        });
        // The others keep their places.
        for &(k, stamp, _) in seen.iter().rev() {
            t.ring.push_front((k, stamp));
        }
        let Some(k) = victim else { return false };
        self.drop_lane(&BucketKey {
            budget: budget.clone(),
            key: Some(k),
        });
        true
    }

    /// Forgets a bucket no one waits on.
    fn drop_lane(&mut self, key: &BucketKey) {
        if self.lanes.remove(key).is_none() {
            return;
        }
        self.holding.remove(key);
        self.prefetch.remove(key);
        if let Some(t) = self.tallies.get_mut(&key.budget) {
            t.keys -= 1;
            t.lowered.remove(&key.key);
        }
    }
}

/// The bucket an entry of `budget`'s ring stands for, when the entry is live (not stale).
fn live<'a>(
    lanes: &'a HashMap<BucketKey, Lane>,
    budget: &Arc<str>,
    key: [u8; 16],
    stamp: u64,
) -> Option<&'a Lane> {
    let k = BucketKey {
        budget: budget.clone(),
        key: Some(key),
    };
    lanes
        .get(&k)
        .filter(|l| l.stamp == stamp && l.waiting.is_empty())
}

#[cfg(test)]
mod key_tests;
#[cfg(test)]
mod tests;
