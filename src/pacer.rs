//! The queue: requests wait here until every bucket of their route grants a slot at once.
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
//! # Time
//! All decisions are functions of `now` (tokio's clock: tests run with paused time). A
//! scheduler task sleeps until the next time a bucket conforms, or until woken by an arrival,
//! a cancellation, a throttle or a reload.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::budget::{Adaptive, Gcra, Limit, Nanos, NANOS_PER_SEC};
use crate::config::BudgetSpec;
use crate::route::Priority;
use crate::store::{LeaseRequest, SlotStore, ThrottleRequest};

/// Which bucket: a budget's name and, for keyed budgets, the hash of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub budget: Arc<str>,
    /// `None` for a global budget.
    pub key: Option<[u8; 16]>,
}

/// Queue order; smaller goes first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct OrderKey {
    /// 0 for a retry, 1 otherwise.
    class: u8,
    /// Arrival plus the priority's handicap, ns.
    at: u64,
    seq: u64,
}

/// What a request asks the pacer for.
#[derive(Debug, Clone)]
pub struct Demand {
    pub buckets: Vec<BucketKey>,
    pub priority: Priority,
    /// Longest acceptable wait, judged on arrival.
    pub max_wait: Duration,
    /// A retry goes to the head of its queues.
    pub retry: bool,
    /// For retries: never wait past this instant (the caller's own deadline).
    pub not_after: Option<Instant>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    /// Its slot would start only after `wait`, more than it may wait.
    #[error("predicted wait {wait:?} exceeds the allowed wait")]
    TooLong { wait: Duration },
    /// `max_depth` requests wait already.
    #[error("queue full ({depth} waiting)")]
    Full { depth: usize, retry_after: Duration },
}

impl Rejection {
    /// The honest Retry-After: when a slot is predicted to be free.
    pub fn retry_after(&self) -> Duration {
        match *self {
            Rejection::TooLong { wait } => wait,
            Rejection::Full { retry_after, .. } => retry_after,
        }
    }
}

/// Slots taken for one request. Dropping it without [`Grant::commit`] gives them back.
#[derive(Debug)]
pub struct Grant {
    pacer: Option<Pacer>,
    pub buckets: Vec<BucketKey>,
    /// How long the request waited for its slots.
    pub waited: Duration,
    /// When the slots were taken.
    pub at: Instant,
}

impl Grant {
    /// The request is being sent: its slots are spent.
    pub fn commit(mut self) {
        self.pacer = None;
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(p) = self.pacer.take() {
            p.give_back(&self.buckets);
        }
    }
}

/// A place in the queue. Await [`Ticket::granted`]; dropping the ticket leaves the queue.
#[derive(Debug)]
pub struct Ticket {
    pacer: Pacer,
    id: u64,
    rx: Option<oneshot::Receiver<Grant>>,
    /// Predicted wait at arrival.
    pub predicted: Duration,
}

impl Ticket {
    /// Waits for the slots. Cancel-safe: dropping the future (or the ticket) leaves the queue
    /// and returns any slot already taken.
    pub async fn granted(&mut self) -> Result<Grant, Closed> {
        let rx = self.rx.as_mut().ok_or(Closed)?;
        match rx.await {
            Ok(g) => {
                self.rx = None;
                Ok(g)
            }
            Err(_) => {
                self.rx = None;
                Err(Closed)
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            // A grant that raced with the drop comes back through Grant's Drop.
            drop(rx.try_recv());
            self.pacer.cancel(self.id);
        }
    }
}

/// The request was dropped from the queue without a grant (its deadline passed, or the pacer
/// was closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("left the queue without a slot")]
pub struct Closed;

/// A budget's state as shown to people and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    pub name: String,
    pub configured_rate: f64,
    /// The lowest rate in force among its buckets (requests/second).
    pub rate_in_force: f64,
    pub keys: usize,
    pub waiting: usize,
    /// Longest remaining pause among its buckets.
    pub paused_for: Duration,
}

struct Bucket {
    gcra: Gcra,
    burst: u32,
    adaptive: Adaptive,
    paused_until: Nanos,
    queue: BTreeMap<OrderKey, u64>,
    /// The waiters whose first bucket this is: the first of them is a release candidate.
    firsts: BTreeMap<OrderKey, u64>,
    /// Set when its budget left the config: it drains its queue and is then dropped.
    orphan: bool,
    /// Grants since the upstream's window presumably began (after an idle gap or a pause):
    /// what a 429 is measured against to learn the upstream's limit.
    epoch: VecDeque<Nanos>,
    epoch_start: Nanos,
    /// In cluster mode: slots leased from the shared store.
    shared: Option<Leases>,
}

/// A bucket's slots leased from the shared store (cluster mode).
struct Leases {
    key: String,
    /// Start times of leased, unused slots, in order.
    slots: VecDeque<Nanos>,
    /// Slots used in the last [`LEASE_HORIZON`]: the demand to lease ahead for, so that a
    /// request seldom waits for a round trip to the store.
    recent: VecDeque<Nanos>,
    fetching: bool,
    /// The store answers: slots come from it. Otherwise the bucket paces locally at its share.
    leasing: bool,
    /// Divides the rate while the store is unreachable (`fallback_replicas`), and for a grace
    /// period after it is back, while other replicas may still pace on their own share.
    divisor: f64,
    grace_until: Nanos,
}

/// "Not before a lease arrives."
const NEVER: Nanos = u64::MAX / 4;
/// How far ahead a replica leases slots, at most.
const LEASE_HORIZON: Nanos = 100_000_000;
/// Most slots in one lease.
const LEASE_MAX: u32 = 200;
/// How long the store may take to answer before it is considered down.
pub const STORE_TIMEOUT: Duration = Duration::from_millis(250);
/// How often an unreachable store is tried again.
const STORE_PROBE: Duration = Duration::from_millis(500);

/// A gap this long between two grants starts a new epoch.
const EPOCH_IDLE: Nanos = 1_000_000_000;
/// Grants remembered per epoch (a per-minute window at 100/s is 6000).
const EPOCH_CAP: usize = 20_000;

impl Bucket {
    fn new(spec: &BudgetSpec, guard: f64) -> Bucket {
        Bucket {
            gcra: Gcra::default(),
            burst: spec.burst,
            adaptive: Adaptive::new(
                spec.rate.per_second * guard,
                spec.min_rate.per_second * guard,
            ),
            paused_until: 0,
            queue: BTreeMap::new(),
            firsts: BTreeMap::new(),
            orphan: false,
            epoch: VecDeque::new(),
            epoch_start: 0,
            shared: None,
        }
    }

    /// Gives back a slot taken at `now` and not used.
    fn give_back(&mut self, now: Nanos) {
        if let Some(l) = self.shared.as_mut().filter(|l| l.leasing) {
            l.slots.push_front(now);
            return;
        }
        let limit = self.limit(now);
        self.gcra.give_back(now, &limit);
    }

    /// Takes one slot at `at`.
    fn take(&mut self, at: Nanos, now: Nanos) {
        let limit = self.limit(now);
        if let Some(l) = self.shared.as_mut().filter(|l| l.leasing) {
            l.slots.pop_front();
            l.recent.push_back(at);
            while l.recent.front().is_some_and(|&t| t + LEASE_HORIZON < at) {
                l.recent.pop_front();
            }
            if l.divisor > 1.0 {
                self.gcra.take(at, &limit);
            }
            return;
        }
        let limit = self.limit(now);
        self.gcra.take(at, &limit);
        let last = self.epoch.back().copied();
        let fresh = match last {
            None => true,
            Some(last) => {
                at.saturating_sub(last) >= EPOCH_IDLE
                    || (self.paused_until > last && at >= self.paused_until)
            }
        };
        if fresh {
            self.epoch.clear();
            self.epoch_start = at;
        }
        if self.epoch.len() == EPOCH_CAP {
            self.epoch.pop_front();
        }
        self.epoch.push_back(at);
    }

    /// The upstream's limit as learned from a 429 of a request granted at `sent`.
    fn estimate(&self, sent: Nanos, retry_after: Option<Duration>) -> Option<f64> {
        let ra = retry_after?;
        // A replica sees only its own share of what went through: nothing to learn from.
        if self.shared.is_some() || sent < self.epoch_start || self.epoch.len() == EPOCH_CAP {
            return None;
        }
        let before = self.epoch.partition_point(|&g| g < sent) as u64;
        let ra_secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
        Adaptive::estimate(self.epoch_start, sent, before, ra_secs)
    }

    fn limit(&self, now: Nanos) -> Limit {
        let divisor = self.shared.as_ref().map_or(1.0, |l| l.divisor);
        Limit::new(self.adaptive.rate(now) / divisor, self.burst)
    }

    /// Earliest time this bucket can grant one slot.
    fn ready_at(&self, now: Nanos) -> Nanos {
        let local = self.gcra.earliest(&self.limit(now)).max(self.paused_until);
        match self.shared.as_ref().filter(|l| l.leasing) {
            Some(l) => {
                let slot = l
                    .slots
                    .front()
                    .copied()
                    .unwrap_or(NEVER)
                    .max(self.paused_until);
                // In the grace period after an outage, also within our own share.
                if l.divisor > 1.0 {
                    slot.max(local)
                } else {
                    slot
                }
            }
            None => local,
        }
    }

    /// The lease this bucket should ask for now, if any: only while requests wait for slots,
    /// and only as far ahead as [`LEASE_HORIZON`], so replicas take turns.
    fn lease_needed(&mut self, now: Nanos) -> Option<LeaseRequest> {
        let waiting = self.queue.len();
        // The shared schedule runs at the whole rate, whatever our local share.
        let limit = Limit::new(self.adaptive.rate(now), self.burst);
        let l = self.shared.as_mut().filter(|l| l.leasing && !l.fetching)?;
        if l.divisor > 1.0 && now >= l.grace_until {
            l.divisor = 1.0;
        }
        // Slots left unused for longer than the slack are gone: using them late would squeeze
        // the next ones.
        while l.slots.front().is_some_and(|&t| t + LATE_SLACK < now) {
            l.slots.pop_front();
        }
        while l.recent.front().is_some_and(|&t| t + LEASE_HORIZON < now) {
            l.recent.pop_front();
        }
        // Those waiting now, or as many as came in the last horizon, whichever is more; lease
        // again when a request waits without a slot, or when fewer than half of that are left
        // (not for every slot used: one lease covers many requests).
        let wanted = waiting.max(l.recent.len());
        let short = waiting > l.slots.len() || l.slots.len() * 2 < wanted;
        if !short || l.slots.back().is_some_and(|&t| t >= now + LEASE_HORIZON) {
            return None;
        }
        let per_horizon = (LEASE_HORIZON / limit.interval.max(1)).max(1) as usize;
        let count = (wanted - l.slots.len())
            .min(per_horizon)
            .min(LEASE_MAX as usize) as u32;
        l.fetching = true;
        Some(LeaseRequest {
            key: l.key.clone(),
            interval: Duration::from_nanos(limit.interval),
            tolerance: Duration::from_nanos(limit.tolerance),
            count,
        })
    }

    fn conforms(&self, now: Nanos) -> bool {
        now >= self.ready_at(now)
    }

    /// Fresh, empty, unpaused, at its configured rate: can be forgotten.
    fn is_idle(&self, now: Nanos) -> bool {
        self.queue.is_empty()
            && self
                .shared
                .as_ref()
                .is_none_or(|l| !l.fetching && l.slots.back().is_none_or(|&t| t < now))
            && self.gcra.is_idle(now)
            && self.paused_until <= now
            && self.adaptive.is_settled(now)
    }
}

struct Waiter {
    order: OrderKey,
    buckets: Vec<BucketKey>,
    tx: oneshot::Sender<Grant>,
    arrived: Instant,
    not_after: Option<Nanos>,
}

struct State {
    epoch: Instant,
    specs: HashMap<Arc<str>, BudgetSpec>,
    buckets: HashMap<BucketKey, Bucket>,
    waiters: HashMap<u64, Waiter>,
    /// Release candidates, in order: the head of each bucket's `firsts`.
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
    next_id: u64,
    max_depth: usize,
    aging: Nanos,
    /// The scheduler's next wake-up, when one is planned.
    wake_at: Option<Nanos>,
    scheduler_started: bool,
    last_sweep: Nanos,
    /// Pacing runs this fraction of the configured rates: see [`Pacer::with_guard`].
    guard: f64,
    cluster: Option<Cluster>,
}

/// Cluster mode: buckets lease their slots from a shared store.
struct Cluster {
    store: Arc<dyn SlotStore>,
    prefix: String,
    fallback_replicas: u32,
    up: bool,
    down_since: Option<Instant>,
    fallback_total: Duration,
}

impl Cluster {
    fn store_key(&self, key: &BucketKey) -> String {
        match key.key {
            None => format!("{}{}", self.prefix, key.budget),
            Some(k) => {
                let hex: String = k.iter().map(|b| format!("{b:02x}")).collect();
                format!("{}{}:{hex}", self.prefix, key.budget)
            }
        }
    }
}

/// The shared pacer. Cheap to clone.
#[derive(Clone)]
pub struct Pacer {
    state: Arc<Mutex<State>>,
    notify: Arc<Notify>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pacer")
    }
}

/// How late a release may be and still count as on time (timer granularity is 1 ms).
const LATE_SLACK: Nanos = 2_000_000;

/// How often idle keyed buckets are looked for and dropped.
const SWEEP_EVERY: Nanos = 10_000_000_000;

impl Pacer {
    pub fn new(budgets: &[BudgetSpec], max_depth: usize, aging: Duration) -> Pacer {
        Pacer {
            state: Arc::new(Mutex::new(State {
                // Start the epoch an hour back so that "never used" (tat 0) is long past.
                epoch: Instant::now()
                    .checked_sub(Duration::from_secs(3600))
                    .unwrap_or_else(Instant::now),
                specs: budgets
                    .iter()
                    .map(|b| (Arc::from(b.name.as_str()), b.clone()))
                    .collect(),
                buckets: HashMap::new(),
                waiters: HashMap::new(),
                candidates: BTreeSet::new(),
                need: HashMap::new(),
                active: HashSet::new(),
                prefetch: HashSet::new(),
                deadlines: BTreeSet::new(),
                next_id: 0,
                max_depth,
                aging: aging.as_nanos() as Nanos,
                wake_at: None,
                scheduler_started: false,
                last_sweep: 0,
                guard: 1.0,
                cluster: None,
            })),
            notify: Arc::new(Notify::new()),
        }
    }

    /// Paces every budget at `guard` × its rate (e.g. 0.997): a guard band so that jitter on
    /// the way to the upstream cannot push the (N+1)-th request into an upstream window that
    /// allows N. Rates shown to people stay the configured ones.
    pub fn with_guard(self, guard: f64) -> Pacer {
        self.lock().guard = guard.clamp(0.5, 1.0);
        self
    }

    /// Cluster mode: every bucket leases its slots from `store` (keys under `prefix`), and
    /// paces locally at `1 / fallback_replicas` of its rate while the store is unreachable.
    pub fn with_store(
        self,
        store: Arc<dyn SlotStore>,
        prefix: &str,
        fallback_replicas: u32,
    ) -> Pacer {
        self.lock().cluster = Some(Cluster {
            store,
            prefix: prefix.to_string(),
            fallback_replicas: fallback_replicas.max(1),
            up: true,
            down_since: None,
            fallback_total: Duration::ZERO,
        });
        self
    }

    /// In cluster mode: whether the store answers, and the total time spent on the fallback
    /// share so far.
    pub fn store_status(&self) -> Option<(bool, Duration)> {
        let st = self.lock();
        let c = st.cluster.as_ref()?;
        let current = c.down_since.map_or(Duration::ZERO, |t| t.elapsed());
        Some((c.up, c.fallback_total + current))
    }

    // A std mutex: every critical section is short and never awaits, and the lock is taken
    // from Drop impls, where an async lock cannot be.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget's `Arc<str>` name as the pacer knows it, for building [`BucketKey`]s.
    pub fn bucket_key(&self, budget: &str, key: Option<[u8; 16]>) -> BucketKey {
        let st = self.lock();
        let name = st
            .specs
            .get_key_value(budget)
            .map(|(k, _)| k.clone())
            .unwrap_or_else(|| Arc::from(budget));
        BucketKey { budget: name, key }
    }

    /// Admission: queue the request, or refuse it now if its slot cannot start within
    /// `max_wait`. A request with no buckets is granted at once.
    pub fn admit(&self, mut demand: Demand) -> Result<Ticket, Rejection> {
        let now_i = Instant::now();
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        let now = st.nanos(now_i);
        demand.buckets.sort();
        demand.buckets.dedup();
        for b in &demand.buckets {
            if !st.buckets.contains_key(b) {
                let spec = st.specs.get(&b.budget).cloned();
                let Some(spec) = spec else { continue };
                let guard = st.guard;
                let mut bucket = Bucket::new(&spec, guard);
                if let Some(c) = &st.cluster {
                    bucket.shared = Some(Leases {
                        key: c.store_key(b),
                        slots: VecDeque::new(),
                        recent: VecDeque::new(),
                        fetching: false,
                        leasing: c.up,
                        divisor: if c.up {
                            1.0
                        } else {
                            f64::from(c.fallback_replicas)
                        },
                        grace_until: 0,
                    });
                }
                st.buckets.insert(b.clone(), bucket);
            }
        }
        demand.buckets.retain(|b| st.buckets.contains_key(b));
        // Narrowest first (keyed, then the slowest): see the module doc.
        demand.buckets.sort_by(|a, b| {
            let rate = |k: &BucketKey| st.buckets[k].adaptive.configured;
            (a.key.is_none(), rate(a))
                .partial_cmp(&(b.key.is_none(), rate(b)))
                .unwrap_or(std::cmp::Ordering::Equal)
        });

        let id = st.next_id;
        st.next_id += 1;
        let level = u64::from(demand.priority.level());
        let order = OrderKey {
            class: if demand.retry { 0 } else { 1 },
            at: now + level * st.aging,
            seq: id,
        };
        let predicted_at = st.predict(now, &demand.buckets, &order);
        let predicted = Duration::from_nanos(predicted_at - now);
        if !demand.retry {
            if st.waiters.len() >= st.max_depth {
                // Honest hint: when the queue ahead should have drained by.
                return Err(Rejection::Full {
                    depth: st.waiters.len(),
                    retry_after: predicted.max(Duration::from_secs(1)),
                });
            }
            if predicted > demand.max_wait {
                return Err(Rejection::TooLong { wait: predicted });
            }
        }
        let not_after = demand.not_after.map(|t| st.nanos(t));
        for b in &demand.buckets {
            st.buckets
                .get_mut(b)
                .expect("inserted above")
                .queue
                .insert(order, id);
            st.active.insert(b.clone());
        }
        if let Some(first) = demand.buckets.first().cloned() {
            st.waiters.insert(
                id,
                Waiter {
                    order,
                    buckets: demand.buckets,
                    tx,
                    arrived: now_i,
                    not_after,
                },
            );
            st.firsts_insert(&first, order, id);
        } else {
            // Nothing to wait for.
            drop(st);
            let _ = tx.send(Grant {
                pacer: None,
                buckets: Vec::new(),
                waited: Duration::ZERO,
                at: now_i,
            });
            return Ok(Ticket {
                pacer: self.clone(),
                id,
                rx: Some(rx),
                predicted: Duration::ZERO,
            });
        }
        if let Some(t) = not_after {
            st.deadlines.insert((t, id));
        }
        let wake = st.pass(now, self);
        let start = !st.scheduler_started;
        st.scheduler_started = true;
        drop(st);
        self.reschedule(wake);
        if start {
            tokio::spawn(self.clone().run());
        }
        Ok(Ticket {
            pacer: self.clone(),
            id,
            rx: Some(rx),
            predicted,
        })
    }

    /// Tells the budgets of a throttled request: pause them for `pause` (the upstream's
    /// `retry_after`, or a backoff when it gave none) and lower their rate in force, learning
    /// the upstream's limit when the 429 allows it. `granted_at` is that request's
    /// [`Grant::at`]. Returns the budget names whose rate was lowered.
    pub fn throttle(
        &self,
        buckets: &[BucketKey],
        retry_after: Option<Duration>,
        pause: Duration,
        granted_at: Instant,
    ) -> Vec<String> {
        let mut st = self.lock();
        let now = st.nanos(Instant::now());
        let sent = st.nanos(granted_at);
        let until = now + pause.as_nanos() as Nanos;
        let guard = st.guard;
        let mut lowered = Vec::new();
        let mut throttles = Vec::new();
        for key in buckets {
            let Some(b) = st.buckets.get_mut(key) else {
                continue;
            };
            let estimate = b.estimate(sent, retry_after).map(|r| r * guard);
            let was_lowered = b.adaptive.throttled(now, sent, estimate);
            if was_lowered {
                lowered.push(key.budget.to_string());
            }
            if let Some(l) = b.shared.as_mut() {
                // The other replicas learn it from the store; our own leased slots inside the
                // pause are void.
                l.slots.retain(|&t| t >= until);
                throttles.push(ThrottleRequest {
                    key: l.key.clone(),
                    pause,
                    tolerance: Duration::from_nanos(b.limit(now).tolerance),
                    lowered: was_lowered.then(|| b.adaptive.state()),
                });
            }
            if until > b.paused_until {
                b.paused_until = until;
                // After the pause: one probe, then the (lowered) rate; never a burst.
                let limit = b.limit(now);
                b.gcra.tat = b.gcra.tat.max(until + limit.tolerance);
            }
        }
        let wake = st.pass(now, self);
        let store = st
            .cluster
            .as_ref()
            .filter(|c| c.up)
            .map(|c| c.store.clone());
        drop(st);
        self.reschedule(wake);
        if let (Some(store), Ok(rt)) = (store, tokio::runtime::Handle::try_current()) {
            let pacer = self.clone();
            rt.spawn(async move {
                for t in throttles {
                    match tokio::time::timeout(STORE_TIMEOUT, store.throttle(t)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => pacer.store_failed(&e.to_string()),
                        Err(_) => pacer.store_failed("timed out"),
                    }
                }
            });
        }
        lowered
    }

    /// Fetches one lease and applies it.
    async fn fetch(self, key: BucketKey, req: LeaseRequest, store: Arc<dyn SlotStore>) {
        let sent = Instant::now();
        let answer = tokio::time::timeout(STORE_TIMEOUT, store.lease(req)).await;
        let received = Instant::now();
        // The store's "now" is about half a round trip after we asked.
        let base = sent + (received - sent) / 2;
        let failure = {
            let mut st = self.lock();
            let base = st.nanos(base);
            let failure = match answer {
                Ok(Ok(lease)) => {
                    if let Some(b) = st.buckets.get_mut(&key) {
                        if let Some(a) = lease.adaptive {
                            let at = base.saturating_sub(a.ago.as_nanos() as Nanos);
                            b.adaptive.adopt(a.lowered, a.ceiling, at);
                        }
                        let paused = base + lease.paused_for.as_nanos() as Nanos;
                        if lease.paused_for > Duration::ZERO && paused > b.paused_until {
                            b.paused_until = paused;
                        }
                        let until = b.paused_until;
                        if let Some(l) = b.shared.as_mut() {
                            l.fetching = false;
                            l.slots.extend(
                                lease
                                    .slots
                                    .iter()
                                    .map(|d| base + d.as_nanos() as Nanos)
                                    .filter(|&t| t >= until),
                            );
                        }
                    }
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(_) => Some(format!("no answer within {STORE_TIMEOUT:?}")),
            };
            if let Some(l) = st.buckets.get_mut(&key).and_then(|b| b.shared.as_mut()) {
                l.fetching = false;
            }
            failure
        };
        match failure {
            Some(e) => self.store_failed(&e),
            None => {
                let mut st = self.lock();
                let now = st.nanos(Instant::now());
                let wake = st.pass(now, &self);
                drop(st);
                self.reschedule(wake);
            }
        }
    }

    /// The store did not answer: every bucket paces locally at its fallback share until it
    /// answers again. Logged once per outage.
    fn store_failed(&self, error: &str) {
        let mut st = self.lock();
        let now = st.nanos(Instant::now());
        let Some(c) = st.cluster.as_mut() else { return };
        if !c.up {
            return;
        }
        c.up = false;
        c.down_since = Some(Instant::now());
        let divisor = f64::from(c.fallback_replicas);
        tracing::warn!(
            "shared budget store unreachable ({error}): each budget falls back to 1/{} of its rate",
            c.fallback_replicas
        );
        for b in st.buckets.values_mut() {
            if let Some(l) = b.shared.as_mut() {
                // Slots already leased stay reserved in the store; start the local schedule
                // after the last of them so the two never overlap.
                let last = l.slots.back().copied().unwrap_or(now);
                l.slots.clear();
                l.leasing = false;
                l.fetching = false;
                l.divisor = divisor;
                b.gcra.tat = b.gcra.tat.max(last);
            }
        }
        let wake = st.pass(now, self);
        let store = st.cluster.as_ref().map(|c| c.store.clone());
        drop(st);
        self.reschedule(wake);
        if let (Some(store), Ok(rt)) = (store, tokio::runtime::Handle::try_current()) {
            rt.spawn(self.clone().probe(store));
        }
    }

    /// Tries the store until it answers, then goes back to sharing.
    async fn probe(self, store: Arc<dyn SlotStore>) {
        let weak = Arc::downgrade(&self.state);
        let notify = self.notify.clone();
        drop(self);
        loop {
            tokio::time::sleep(STORE_PROBE).await;
            if weak.strong_count() == 0 {
                return;
            }
            let ok = matches!(
                tokio::time::timeout(STORE_TIMEOUT, store.ping()).await,
                Ok(Ok(()))
            );
            if !ok {
                continue;
            }
            let Some(state) = weak.upgrade() else { return };
            let pacer = Pacer {
                state,
                notify: notify.clone(),
            };
            let mut st = pacer.lock();
            let now = st.nanos(Instant::now());
            if let Some(c) = st.cluster.as_mut() {
                c.up = true;
                if let Some(since) = c.down_since.take() {
                    c.fallback_total += since.elapsed();
                }
                tracing::info!("shared budget store reachable again: budgets are shared again");
            }
            for b in st.buckets.values_mut() {
                if let Some(l) = b.shared.as_mut() {
                    l.leasing = true;
                    // Other replicas may find the store up to one probe later: until they all
                    // can, stay within our own share too.
                    l.grace_until = now + 2 * STORE_PROBE.as_nanos() as Nanos;
                }
            }
            let wake = st.pass(now, &pacer);
            drop(st);
            pacer.reschedule(wake);
            return;
        }
    }

    /// Reports when a granted request actually left. A request that left later than its grant
    /// (a loaded process, a slow connect) moves its buckets' schedule as if it had been granted
    /// then, so the spacing holds on the wire and not only in the scheduler: an upstream window
    /// opened by a late request must not see the request N slots later arrive inside it.
    pub fn sent(&self, buckets: &[BucketKey], granted_at: Instant, sent_at: Instant) {
        let late = sent_at.saturating_duration_since(granted_at);
        if late.as_nanos() as Nanos <= LATE_SLACK {
            return;
        }
        let mut st = self.lock();
        let sent = st.nanos(sent_at);
        for key in buckets {
            if let Some(b) = st.buckets.get_mut(key) {
                let limit = b.limit(sent);
                b.gcra.tat = b.gcra.tat.max(sent + limit.interval);
            }
        }
    }

    /// New budget definitions (reload). Buckets of unchanged budgets keep their state; changed
    /// ones keep their place in time and take the new rate at once; waiters of removed budgets
    /// are still served by their old buckets.
    pub fn update(&self, budgets: &[BudgetSpec], max_depth: usize, aging: Duration) {
        let mut st = self.lock();
        let now = st.nanos(Instant::now());
        st.specs = budgets
            .iter()
            .map(|b| (Arc::from(b.name.as_str()), b.clone()))
            .collect();
        st.max_depth = max_depth;
        st.aging = aging.as_nanos() as Nanos;
        let specs = st.specs.clone();
        let guard = st.guard;
        for (key, b) in st.buckets.iter_mut() {
            match specs.get(&key.budget) {
                Some(spec) => {
                    b.orphan = false;
                    let old = b.limit(now);
                    b.burst = spec.burst;
                    b.adaptive.reconfigure(
                        spec.rate.per_second * guard,
                        spec.min_rate.per_second * guard,
                    );
                    let new = b.limit(now);
                    // The time still owed at the old rate is owed at the new one instead, so
                    // a slower rate cannot keep those waiting for long after a faster one came.
                    if b.gcra.tat > now && old.interval != new.interval {
                        let owed =
                            (b.gcra.tat - now) as f64 * new.interval as f64 / old.interval as f64;
                        b.gcra.tat = now + owed as Nanos;
                    }
                }
                None => b.orphan = true,
            }
        }
        let wake = st.pass(now, self);
        drop(st);
        self.reschedule(wake);
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.lock().waiters.len()
    }

    /// The rate in force and state of every configured budget.
    pub fn view(&self) -> Vec<BudgetView> {
        let st = self.lock();
        let now = st.nanos(Instant::now());
        let mut views: Vec<BudgetView> = st
            .specs
            .values()
            .map(|s| BudgetView {
                name: s.name.clone(),
                configured_rate: s.rate.per_second,
                rate_in_force: s.rate.per_second,
                keys: 0,
                waiting: 0,
                paused_for: Duration::ZERO,
            })
            .collect();
        views.sort_by(|a, b| a.name.cmp(&b.name));
        for (key, b) in &st.buckets {
            let Some(v) = views.iter_mut().find(|v| *v.name == *key.budget) else {
                continue;
            };
            v.keys += 1;
            v.waiting += b.queue.len();
            let r = b.adaptive.rate(now);
            // At its full rate a bucket reads exactly the configured rate (r / guard is not
            // always that in floating point).
            if r < b.adaptive.configured {
                v.rate_in_force = v.rate_in_force.min(r / st.guard);
            }
            let paused = Duration::from_nanos(b.paused_until.saturating_sub(now));
            v.paused_for = v.paused_for.max(paused);
        }
        views
    }

    /// Releases every waiter now with [`Closed`] (shutdown past its drain).
    pub fn close_all(&self) {
        let mut st = self.lock();
        let ids: Vec<u64> = st.waiters.keys().copied().collect();
        for id in ids {
            st.remove(id);
        }
    }

    fn cancel(&self, id: u64) {
        let mut st = self.lock();
        if st.remove(id).is_some() {
            let now = st.nanos(Instant::now());
            let wake = st.pass(now, self);
            drop(st);
            self.reschedule(wake);
        }
    }

    fn give_back(&self, buckets: &[BucketKey]) {
        let mut st = self.lock();
        let now = st.nanos(Instant::now());
        for key in buckets {
            if let Some(b) = st.buckets.get_mut(key) {
                b.give_back(now);
            }
        }
        let wake = st.pass(now, self);
        drop(st);
        self.reschedule(wake);
    }

    fn reschedule(&self, wake: Option<Nanos>) {
        let mut st = self.lock();
        let earlier = match (wake, st.wake_at) {
            (Some(w), Some(cur)) => w < cur,
            (Some(_), None) => true,
            _ => false,
        };
        if earlier {
            st.wake_at = wake;
            drop(st);
            self.notify.notify_one();
        }
    }

    /// The scheduler: releases waiters when their buckets conform. Runs while anyone holds the
    /// pacer; started by the first admission on the caller's runtime.
    async fn run(self) {
        let weak = Arc::downgrade(&self.state);
        let notify = self.notify.clone();
        drop(self);
        loop {
            let Some(state) = weak.upgrade() else { return };
            let pacer = Pacer {
                state,
                notify: notify.clone(),
            };
            let (wake, epoch) = {
                let mut st = pacer.lock();
                let now = st.nanos(Instant::now());
                let wake = st.pass(now, &pacer);
                st.wake_at = wake;
                (wake, st.epoch)
            };
            drop(pacer);
            let notified = notify.notified();
            match wake {
                Some(w) => {
                    let deadline = epoch + Duration::from_nanos(w);
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = notified => {}
                    }
                }
                // Nothing to wait for; wake on the next event. Re-check now and then so the
                // task notices when the pacer is gone.
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                        _ = notified => {}
                    }
                }
            }
        }
    }
}

impl State {
    fn nanos(&self, t: Instant) -> Nanos {
        t.saturating_duration_since(self.epoch).as_nanos() as Nanos
    }

    fn remove(&mut self, id: u64) -> Option<Waiter> {
        let (first, order) = {
            let w = self.waiters.get(&id)?;
            (w.buckets.first().cloned(), w.order)
        };
        if let Some(first) = first {
            self.firsts_remove(&first, &order);
        }
        let w = self.waiters.remove(&id)?;
        for b in &w.buckets {
            if let Some(bucket) = self.buckets.get_mut(b) {
                bucket.queue.remove(&w.order);
                if bucket.queue.is_empty() {
                    self.active.remove(b);
                }
            }
        }
        if let Some(t) = w.not_after {
            self.deadlines.remove(&(t, id));
        }
        Some(w)
    }

    fn head(&self, key: &BucketKey) -> Option<(OrderKey, u64)> {
        self.buckets[key]
            .firsts
            .first_key_value()
            .map(|(o, i)| (*o, *i))
    }

    /// Adds a waiter to a bucket's `firsts`, keeping the candidate index in step.
    fn firsts_insert(&mut self, key: &BucketKey, order: OrderKey, id: u64) {
        let before = self.head(key);
        self.buckets
            .get_mut(key)
            .expect("bucket exists")
            .firsts
            .insert(order, id);
        self.head_changed(key, before);
    }

    fn firsts_remove(&mut self, key: &BucketKey, order: &OrderKey) {
        if !self.buckets.contains_key(key) {
            return;
        }
        let before = self.head(key);
        self.buckets
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
            let b = &self.buckets[key];
            let ahead = match b.queue.last_key_value() {
                Some((last, _)) if last < order => b.queue.len(),
                _ => b.queue.range(..*order).count(),
            } as u64;
            let limit = b.limit(now);
            let start = b.gcra.predict(now, ahead, &limit).max(b.paused_until);
            at = at.max(start);
        }
        at
    }

    /// Releases every waiter that can go at `now`; returns when to look again. In cluster mode,
    /// also asks for the leases that buckets with waiters need.
    fn pass(&mut self, now: Nanos, pacer: &Pacer) -> Option<Nanos> {
        let wake = self.release(now, pacer);
        if let Some(store) = self
            .cluster
            .as_ref()
            .filter(|c| c.up)
            .map(|c| c.store.clone())
        {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                let prefetch = std::mem::take(&mut self.prefetch);
                for key in self.active.iter().chain(prefetch.difference(&self.active)) {
                    let Some(b) = self.buckets.get_mut(key) else {
                        continue;
                    };
                    if let Some(req) = b.lease_needed(now) {
                        rt.spawn(pacer.clone().fetch(key.clone(), req, store.clone()));
                    }
                }
            }
        }
        wake
    }

    /// One scan of the candidates in order. A candidate that cannot go claims the buckets it
    /// could take (see the module doc); one that can is released, and the scan goes on after
    /// it: releasing it changes only its own buckets, and the candidate that replaces it comes
    /// later in the order. So a pass costs one visit per candidate, however many are blocked.
    fn release(&mut self, now: Nanos, pacer: &Pacer) -> Option<Nanos> {
        self.expire(now);
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
            let mut ready = true;
            let mut mine = Vec::new();
            let mut blocked_by = None;
            for key in &w.buckets {
                if claimed.contains(key) {
                    blocked_by = Some(key);
                    ready = false;
                    break;
                }
                let b = &self.buckets[key];
                if !b.conforms(now) {
                    let at = b.ready_at(now);
                    wake = Some(wake.map_or(at, |x| x.min(at)));
                    blocked_by = Some(key);
                    ready = false;
                    break;
                }
                mine.push(key.clone());
            }
            if !ready {
                // Every candidate needs this bucket (a budget shared by all routes): none of
                // the rest can go either.
                if blocked_by.is_some_and(|k| self.need.get(k) == Some(&self.candidates.len())) {
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
            let arrived = self.nanos(w.arrived);
            let ready_at = w
                .buckets
                .iter()
                .map(|k| self.buckets[k].ready_at(now))
                .max()
                .unwrap_or(now);
            let taken_at = ready_at
                .max(arrived)
                .max(now.saturating_sub(LATE_SLACK))
                .min(now);
            for key in &w.buckets {
                let b = self.buckets.get_mut(key).expect("bucket of a waiter");
                b.take(taken_at, now);
                if b.shared.is_some() {
                    self.prefetch.insert(key.clone());
                }
            }
            let at = self.epoch + Duration::from_nanos(taken_at);
            let grant = Grant {
                pacer: Some(pacer.clone()),
                buckets: w.buckets,
                waited: at.saturating_duration_since(w.arrived),
                at,
            };
            if let Err(mut g) = w.tx.send(grant) {
                // The client left just now: give its slots back without re-locking.
                g.pacer = None;
                for key in &g.buckets {
                    if let Some(b) = self.buckets.get_mut(key) {
                        b.give_back(now);
                    }
                }
            }
            // The bucket that let this one go may let the next candidate go too: look again at
            // what follows with the claims of those before it still in force.
        }
        if now.saturating_sub(self.last_sweep) >= SWEEP_EVERY {
            self.sweep(now);
        }
        wake
    }

    /// Drops retries whose own deadline has passed (their caller gives up on them).
    fn expire(&mut self, now: Nanos) {
        while let Some(&(t, id)) = self.deadlines.first() {
            if t > now {
                break;
            }
            self.deadlines.remove(&(t, id));
            self.remove(id);
        }
    }

    /// Forgets buckets that are back to their fresh state, so memory stays bounded with many
    /// tokens.
    fn sweep(&mut self, now: Nanos) {
        self.last_sweep = now;
        self.buckets
            .retain(|_, b| !(b.is_idle(now) || (b.orphan && b.queue.is_empty())));
    }
}

/// Seconds as a float, for metrics.
pub fn secs_f64(d: Duration) -> f64 {
    d.as_nanos() as f64 / NANOS_PER_SEC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Per, Rate};

    fn spec(name: &str, rate: f64, burst: u32, per: Per) -> BudgetSpec {
        BudgetSpec {
            name: name.into(),
            rate: Rate::per_second(rate),
            burst,
            per,
            min_rate: Rate::per_second(rate / 10.0),
        }
    }

    /// A pacer with one budget: `depth` waiters at most, `aging_s` seconds of aging.
    fn one_budget(
        name: &str,
        rate: f64,
        burst: u32,
        per: Per,
        depth: usize,
        aging_s: u64,
    ) -> Pacer {
        Pacer::new(
            &[spec(name, rate, burst, per)],
            depth,
            Duration::from_secs(aging_s),
        )
    }

    fn demand(p: &Pacer, buckets: &[(&str, Option<u8>)], priority: Priority) -> Demand {
        Demand {
            buckets: buckets
                .iter()
                .map(|(b, k)| p.bucket_key(b, k.map(|k| [k; 16])))
                .collect(),
            priority,
            max_wait: Duration::from_secs(3600),
            retry: false,
            not_after: None,
        }
    }

    /// Spawns a waiter that reports (label, grant time since `t0`) when released.
    fn spawn_waiter(
        mut ticket: Ticket,
        label: usize,
        t0: Instant,
        out: tokio::sync::mpsc::UnboundedSender<(usize, Duration)>,
    ) {
        tokio::spawn(async move {
            if let Ok(g) = ticket.granted().await {
                out.send((label, g.at - t0)).unwrap();
                g.commit();
            }
        });
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_released_at_the_configured_rate_in_fifo_order() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..20 {
            let t = p
                .admit(demand(&p, &[("g", None)], Priority::Normal))
                .unwrap();
            spawn_waiter(t, i, t0, tx.clone());
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            got.push(x);
        }
        assert_eq!(got.len(), 20);
        for (i, (label, at)) in got.iter().enumerate() {
            assert_eq!(*label, i, "FIFO");
            // one every 100 ms, the first at once
            assert_eq!(at.as_millis(), 100 * i as u128);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_for_one_budget_does_not_burn_a_slot_of_another() {
        // "slow" allows 1/s, "fast" 100/s. A request needs both; it waits on slow. Meanwhile
        // requests that need only fast must keep fast's full rate.
        let p = Pacer::new(
            &[
                spec("slow", 1.0, 1, Per::Global),
                spec("fast", 100.0, 1, Per::Global),
            ],
            1000,
            Duration::from_secs(10),
        );
        let t0 = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // first takes slow's only slot for the next second
        let mut first = p
            .admit(demand(&p, &[("slow", None)], Priority::Normal))
            .unwrap();
        first.granted().await.unwrap().commit();
        let both = p
            .admit(demand(
                &p,
                &[("fast", None), ("slow", None)],
                Priority::Normal,
            ))
            .unwrap();
        spawn_waiter(both, 999, t0, tx.clone());
        for i in 0..50 {
            let t = p
                .admit(demand(&p, &[("fast", None)], Priority::Normal))
                .unwrap();
            spawn_waiter(t, i, t0, tx.clone());
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            got.push(x);
        }
        let fast_only: Vec<_> = got.iter().filter(|(l, _)| *l != 999).collect();
        // 50 fast-only requests in 490 ms: fast was never held by the waiter on slow.
        assert_eq!(fast_only.len(), 50);
        assert_eq!(fast_only.last().unwrap().1.as_millis(), 490);
        // The stacked request went when slow allowed it (1 s), taking one fast slot then.
        let stacked = got.iter().find(|(l, _)| *l == 999).unwrap();
        assert_eq!(stacked.1.as_millis(), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn an_exhausted_token_does_not_hold_back_the_shared_budget() {
        let p = Pacer::new(
            &[
                spec("shared", 100.0, 1, Per::Global),
                spec("tok", 1.0, 1, Per::Token),
            ],
            1000,
            Duration::from_secs(10),
        );
        let t0 = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // token 1 sends 3: the 2nd and 3rd wait 1 s and 2 s on its own bucket.
        for i in 0..3 {
            let t = p
                .admit(demand(
                    &p,
                    &[("shared", None), ("tok", Some(1))],
                    Priority::Normal,
                ))
                .unwrap();
            spawn_waiter(t, i, t0, tx.clone());
        }
        // tokens 2..=11 send one each and must not wait behind token 1.
        for k in 2..12u8 {
            let t = p
                .admit(demand(
                    &p,
                    &[("shared", None), ("tok", Some(k))],
                    Priority::Normal,
                ))
                .unwrap();
            spawn_waiter(t, 100 + k as usize, t0, tx.clone());
        }
        drop(tx);
        let mut got = HashMap::new();
        while let Some((l, at)) = rx.recv().await {
            got.insert(l, at.as_millis());
        }
        assert_eq!(got[&0], 0);
        assert_eq!(got[&1], 1000);
        assert_eq!(got[&2], 2000);
        let others: Vec<u128> = (2..12).map(|k| got[&(100 + k)]).collect();
        // released at the shared budget's pace right away: 10, 20, ..., 100 ms
        assert_eq!(others, (1..=10).map(|i| i * 10).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn priority_goes_first_and_aging_prevents_starvation() {
        // 1/s, aging 1 s per level: a low request is 2 s behind a high one of the same arrival.
        let p = one_budget("g", 1.0, 1, Per::Global, 1000, 1);
        let t0 = Instant::now();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // hold the bucket until 1 s so that all of these queue
        p.admit(demand(&p, &[("g", None)], Priority::Normal))
            .unwrap()
            .granted()
            .await
            .unwrap()
            .commit();
        for (label, prio) in [
            (0, Priority::Low),
            (1, Priority::Normal),
            (2, Priority::High),
        ] {
            spawn_waiter(
                p.admit(demand(&p, &[("g", None)], prio)).unwrap(),
                label,
                t0,
                tx.clone(),
            );
        }
        // A high one at 1.5 s still passes the low one (1.5 < 0 + 2) ...
        tokio::time::sleep_until(t0 + Duration::from_millis(1500)).await;
        spawn_waiter(
            p.admit(demand(&p, &[("g", None)], Priority::High)).unwrap(),
            10,
            t0,
            tx.clone(),
        );
        // ... but those at 2.5 s do not: the low one has aged past them.
        tokio::time::sleep_until(t0 + Duration::from_millis(2500)).await;
        for label in [11, 12] {
            spawn_waiter(
                p.admit(demand(&p, &[("g", None)], Priority::High)).unwrap(),
                label,
                t0,
                tx.clone(),
            );
        }
        drop(tx);
        let mut got = Vec::new();
        while let Some((l, at)) = rx.recv().await {
            got.push((l, at.as_millis()));
        }
        assert_eq!(
            got,
            vec![
                (2, 1000),
                (1, 2000),
                (10, 3000),
                (0, 4000),
                (11, 5000),
                (12, 6000)
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn admission_predicts_the_wait_and_refuses_what_cannot_start_in_time() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let mut d = demand(&p, &[("g", None)], Priority::Normal);
        d.max_wait = Duration::from_millis(450);
        let mut tickets = Vec::new();
        for i in 0..5 {
            let t = p.admit(d.clone()).unwrap();
            assert_eq!(t.predicted, Duration::from_millis(100 * i));
            tickets.push(t);
        }
        // the 6th would start at 500 ms > 450 ms
        match p.admit(d.clone()) {
            Err(Rejection::TooLong { wait }) => assert_eq!(wait, Duration::from_millis(500)),
            other => panic!("expected a rejection, got {other:?}"),
        }
        assert_eq!(p.depth(), 4, "the first went at once");
    }

    #[tokio::test(start_paused = true)]
    async fn the_queue_has_a_maximum_depth() {
        let p = one_budget("g", 1.0, 1, Per::Global, 3, 10);
        let d = demand(&p, &[("g", None)], Priority::Normal);
        let _t: Vec<Ticket> = (0..4).map(|_| p.admit(d.clone()).unwrap()).collect();
        assert_eq!(p.depth(), 3);
        assert!(matches!(p.admit(d), Err(Rejection::Full { depth: 3, .. })));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_and_its_slot_goes_to_the_next() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        p.admit(d.clone())
            .unwrap()
            .granted()
            .await
            .unwrap()
            .commit();
        let leaving = p.admit(d.clone()).unwrap();
        let mut staying = p.admit(d.clone()).unwrap();
        assert_eq!(p.depth(), 2);
        drop(leaving);
        assert_eq!(p.depth(), 1);
        let g = staying.granted().await.unwrap();
        assert_eq!(
            (g.at - t0).as_millis(),
            100,
            "took the slot the leaver would have had"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_grant_dropped_unused_gives_its_slot_back() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
        drop(g); // not committed: never sent
        let g2 = p.admit(d).unwrap().granted().await.unwrap();
        assert_eq!((g2.at - t0).as_millis(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_pauses_the_bucket_for_everyone_then_one_probe_then_the_lower_rate() {
        let p = one_budget("g", 10.0, 5, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
        let buckets = g.buckets.clone();
        g.commit();
        let lowered = p.throttle(
            &buckets,
            Some(Duration::from_secs(2)),
            Duration::from_secs(2),
            t0,
        );
        assert_eq!(lowered, vec!["g".to_string()]);
        // nothing could be learned from one request: × 0.7
        assert_eq!(p.view()[0].rate_in_force, 7.0);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
        }
        drop(tx);
        let mut at = Vec::new();
        while let Some((_, t)) = rx.recv().await {
            at.push(t.as_millis());
        }
        // nothing during the pause, no burst after it (burst is 5): the probe at 2 s, then
        // about 1/7 s apart (the rate starts to recover 2 s after the decrease, and the
        // burst tolerance shrinks with the interval, so a little more)
        assert_eq!(at[0], 2000);
        for w in at.windows(2) {
            assert!((130..=160).contains(&(w[1] - w[0])), "{at:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_left_late_moves_the_schedule_with_it() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
        // granted at 0, but it only left at 250 ms
        p.sent(&g.buckets, g.at, t0 + Duration::from_millis(250));
        g.commit();
        let next = p.admit(d).unwrap().granted().await.unwrap();
        assert_eq!(
            (next.at - t0).as_millis(),
            350,
            "one interval after it really left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_retry_goes_to_the_head_of_the_queue() {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        p.admit(d.clone())
            .unwrap()
            .granted()
            .await
            .unwrap()
            .commit();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..3 {
            spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
        }
        let mut r = d.clone();
        r.retry = true;
        spawn_waiter(p.admit(r).unwrap(), 99, t0, tx.clone());
        drop(tx);
        let first = rx.recv().await.unwrap();
        assert_eq!(first, (99, Duration::from_millis(100)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_applies_new_rates_to_those_already_waiting() {
        let p = one_budget("g", 1.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        p.admit(d.clone())
            .unwrap()
            .granted()
            .await
            .unwrap()
            .commit();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..5 {
            spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
        }
        drop(tx);
        tokio::time::sleep(Duration::from_millis(10)).await;
        p.update(
            &[spec("g", 100.0, 1, Per::Global)],
            1000,
            Duration::from_secs(10),
        );
        let mut at = Vec::new();
        while let Some((_, t)) = rx.recv().await {
            at.push(t.as_millis());
        }
        // the 990 ms still owed at 1/s became 9.9 ms at 100/s (released at 19.9 ms); then 10 ms apart
        assert_eq!(at, vec![19, 29, 39, 49, 59]);
    }

    /// Three replicas' pacers sharing one store; `waiters[i]` requests queue on replica i at
    /// once. Returns every grant time (since start) with its replica.
    async fn run_replicas(
        store: Arc<crate::store::MemoryStore>,
        budget: BudgetSpec,
        waiters: [usize; 3],
        during: impl FnOnce(Vec<Pacer>) -> tokio::task::JoinHandle<()>,
    ) -> Vec<(usize, Duration)> {
        let t0 = Instant::now();
        let pacers: Vec<Pacer> = (0..3)
            .map(|_| {
                Pacer::new(
                    std::slice::from_ref(&budget),
                    10_000,
                    Duration::from_secs(10),
                )
                .with_store(store.clone(), "test:", 3)
            })
            .collect();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for (i, p) in pacers.iter().enumerate() {
            for _ in 0..waiters[i] {
                let t = p
                    .admit(demand(p, &[(budget.name.as_str(), None)], Priority::Normal))
                    .unwrap();
                spawn_waiter(t, i, t0, tx.clone());
            }
        }
        drop(tx);
        let side = during(pacers.clone());
        let mut got = Vec::new();
        while let Some(x) = rx.recv().await {
            got.push(x);
        }
        side.abort();
        got.sort_by_key(|(_, at)| *at);
        got
    }

    fn max_in_window(grants: &[(usize, Duration)], window: Duration) -> usize {
        (0..grants.len())
            .map(|i| {
                grants[i..]
                    .iter()
                    .take_while(|(_, t)| *t < grants[i].1 + window)
                    .count()
            })
            .max()
            .unwrap_or(0)
    }

    #[tokio::test(start_paused = true)]
    async fn replicas_sharing_a_store_stay_within_the_budget_together() {
        let store = Arc::new(crate::store::MemoryStore::default());
        // 60/s shared; load split 60/30/10 % over three replicas
        let grants = run_replicas(
            store.clone(),
            spec("g", 60.0, 1, Per::Global),
            [180, 90, 30],
            |_| tokio::spawn(async {}),
        )
        .await;
        assert_eq!(grants.len(), 300);
        assert!(max_in_window(&grants, Duration::from_secs(1)) <= 61);
        let done = grants.last().unwrap().1;
        // ideal: 300 / 60 = 5 s
        assert!(done <= Duration::from_millis(5_500), "{done:?}");
        // leases, not a store call per request
        assert!(
            store.calls() < 150,
            "{} store calls for 300 requests",
            store.calls()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_the_store_each_replica_keeps_its_share_and_shares_again_when_it_is_back() {
        let store = Arc::new(crate::store::MemoryStore::default());
        let s2 = store.clone();
        let grants = run_replicas(
            store.clone(),
            spec("g", 30.0, 1, Per::Global),
            [60, 60, 60],
            move |pacers| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    s2.set_down(true);
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    assert_eq!(pacers[0].store_status().map(|s| s.0), Some(false));
                    s2.set_down(false);
                })
            },
        )
        .await;
        assert_eq!(grants.len(), 180, "nothing failed because of the store");
        // While down (1.5 s .. 3 s): each replica at 10/s, together 30/s.
        let during: Vec<_> = grants
            .iter()
            .filter(|(_, t)| *t >= Duration::from_millis(1500) && *t < Duration::from_millis(3000))
            .collect();
        for r in 0..3 {
            let n = during.iter().filter(|(i, _)| *i == r).count();
            assert!(
                (13..=17).contains(&n),
                "replica {r}: {n} grants in 1.5 s at 10/s"
            );
        }
        assert!(max_in_window(&grants, Duration::from_secs(1)) <= 33);
    }

    #[tokio::test(start_paused = true)]
    async fn a_throttle_seen_by_one_replica_pauses_the_others() {
        let store = Arc::new(crate::store::MemoryStore::default());
        let grants = run_replicas(
            store.clone(),
            spec("g", 50.0, 1, Per::Global),
            [50, 50, 50],
            |pacers| {
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let key = pacers[0].bucket_key("g", None);
                    pacers[0].throttle(
                        &[key],
                        Some(Duration::from_secs(2)),
                        Duration::from_secs(2),
                        Instant::now(),
                    );
                })
            },
        )
        .await;
        // From 1 s to 3 s, only slots leased before the throttle (at most one horizon's worth
        // per replica) may still be used.
        let paused: Vec<_> = grants
            .iter()
            .filter(|(_, t)| *t > Duration::from_millis(1000) && *t < Duration::from_millis(3000))
            .collect();
        assert!(
            paused.len() <= 6,
            "{} grants during the pause: {paused:?}",
            paused.len()
        );
        assert_eq!(grants.len(), 150);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_keyed_buckets_are_forgotten() {
        let p = one_budget("tok", 100.0, 1, Per::Token, 1000, 10);
        for k in 0..200u8 {
            let d = demand(&p, &[("tok", Some(k))], Priority::Normal);
            p.admit(d).unwrap().granted().await.unwrap().commit();
        }
        assert_eq!(p.view()[0].keys, 200);
        tokio::time::sleep(Duration::from_secs(11)).await;
        // any pass after the sweep interval drops them
        let d = demand(&p, &[("tok", Some(0))], Priority::Normal);
        p.admit(d).unwrap().granted().await.unwrap().commit();
        assert!(p.view()[0].keys <= 1);
    }
}
