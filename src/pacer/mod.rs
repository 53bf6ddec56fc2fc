//! The pacer: requests wait here until every bucket of their route grants a slot at once. This
//! is the handle the proxy holds: it reads the clock, keeps the pure [`queue`] behind a lock,
//! delivers its releases as [`Grant`]s, runs the scheduler task and, in cluster mode, fetches
//! leases from the shared store.
//!
//! - [`queue`]: who is admitted and who is released, a pure function of (state, now); and the
//!   keyed budgets' tables, bounded by `max_keys` (idle keys forgotten first).
//! - `bucket`: one bucket's pacing state (GCRA, pause, the window a 429 is measured against).
//! - `lease`: cluster mode's leased slots and when to ask for more.
//!
//! # Time
//! All decisions are functions of `now` (tokio's clock: tests run with paused time). A
//! scheduler task sleeps until the next time a bucket conforms, or until woken by an arrival,
//! a cancellation, a throttle or a reload.

mod bucket;
mod lease;
pub mod queue;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::budget::Nanos;
use crate::config::BudgetSpec;
use crate::route::Priority;
use crate::shared_budget::{LeaseRequest, SlotStore};
use crate::throttle::Plan;

use lease::STORE_PROBE;
pub use lease::STORE_TIMEOUT;
use queue::{Admitted, Pass, Queue, Release};

/// Budgets are paced this much under their configured rate: 0.3 % absorbs the jitter between
/// the proxy's clock and the upstream's windows (3 ms per second, 180 ms per minute).
pub const PACING_GUARD: f64 = 0.997;

/// With replicas the jitter is that of several processes (or hosts): 1 %, 10 ms per second.
pub const CLUSTER_PACING_GUARD: f64 = 0.99;

/// Which bucket: a budget's name and, for keyed budgets, the hash of the key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BucketKey {
    pub budget: Arc<str>,
    /// `None` for a global budget.
    pub key: Option<[u8; 16]>,
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
    /// Never wait past this instant (a retry's own deadline); in cluster mode every request
    /// has one, `max_wait` after arrival. Past it the ticket answers [`Closed`].
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
    id: Option<u64>,
    rx: Option<oneshot::Receiver<Grant>>,
    /// Predicted wait at arrival.
    pub predicted: Duration,
}

impl Ticket {
    /// Waits for the slots. Cancel-safe: dropping the future (or the ticket) leaves the queue
    /// and returns any slot already taken.
    pub async fn granted(&mut self) -> Result<Grant, Closed> {
        let rx = self.rx.as_mut().ok_or(Closed)?;
        let got = rx.await;
        self.rx = None;
        got.map_err(|_| Closed)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(mut rx) = self.rx.take() {
            rx.close();
            // A grant that raced with the drop comes back through Grant's Drop.
            drop(rx.try_recv());
            if let Some(id) = self.id {
                self.pacer.cancel(id);
            }
        }
    }
}

/// The request was dropped from the queue without a grant (its deadline passed, or the pacer
/// was closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("left the queue without a slot")]
pub struct Closed;

/// What the lock guards: the queue, the clock's origin, the scheduler's plan and the store.
struct Locked {
    queue: Queue<oneshot::Sender<Grant>>,
    /// Nanosecond 0 of the queue's clock.
    epoch: Instant,
    /// The scheduler's next wake-up, when one is planned.
    wake_at: Option<Nanos>,
    scheduler_started: bool,
    store: Option<Arc<dyn SlotStore>>,
}

impl Locked {
    fn nanos(&self, t: Instant) -> Nanos {
        t.saturating_duration_since(self.epoch).as_nanos() as Nanos
    }

    fn now(&self) -> Nanos {
        self.nanos(Instant::now())
    }

    fn instant(&self, n: Nanos) -> Instant {
        self.epoch + Duration::from_nanos(n)
    }
}

/// The shared pacer. Cheap to clone.
#[derive(Clone)]
pub struct Pacer {
    state: Arc<Mutex<Locked>>,
    notify: Arc<Notify>,
    /// Some bucket holds for a probe's answer: only then does [`Pacer::answered`] lock.
    holding: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pacer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pacer")
    }
}

impl Pacer {
    pub fn new(budgets: &[BudgetSpec], max_depth: usize, aging: Duration) -> Pacer {
        Pacer {
            state: Arc::new(Mutex::new(Locked {
                queue: Queue::new(budgets, max_depth, aging),
                // Start the epoch an hour back so that "never used" (tat 0) is long past.
                epoch: Instant::now()
                    .checked_sub(Duration::from_secs(3600))
                    .unwrap_or_else(Instant::now),
                wake_at: None,
                scheduler_started: false,
                store: None,
            })),
            notify: Arc::new(Notify::new()),
            holding: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Paces every budget at `guard` × its rate (e.g. 0.997): a guard band so that jitter on
    /// the way to the upstream cannot push the (N+1)-th request into an upstream window that
    /// allows N. Rates shown to people stay the configured ones.
    pub fn with_guard(self, guard: f64) -> Pacer {
        self.lock().queue.set_guard(guard);
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
        {
            let mut st = self.lock();
            st.queue.set_cluster(prefix, fallback_replicas);
            st.store = Some(store);
        }
        self
    }

    /// In cluster mode: whether the store answers, and the total time spent on the fallback
    /// share so far.
    pub fn store_status(&self) -> Option<(bool, Duration)> {
        let st = self.lock();
        st.queue.store_status(st.now())
    }

    // A std mutex: every critical section is short and never awaits, and the lock is taken
    // from Drop impls, where an async lock cannot be.
    fn lock(&self) -> MutexGuard<'_, Locked> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget's `Arc<str>` name as the pacer knows it, for building [`BucketKey`]s.
    pub fn bucket_key(&self, budget: &str, key: Option<[u8; 16]>) -> BucketKey {
        self.lock().queue.bucket_key(budget, key)
    }

    /// Admission: queue the request, or refuse it now if its slot cannot start within
    /// `max_wait`. A request with no buckets is granted at once.
    pub fn admit(&self, demand: Demand) -> Result<Ticket, Rejection> {
        let now_i = Instant::now();
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        let now = st.nanos(now_i);
        let not_after = demand.not_after.map(|t| st.nanos(t));
        let mut ticket = Ticket {
            pacer: self.clone(),
            id: None,
            rx: Some(rx),
            predicted: Duration::ZERO,
        };
        match st.queue.admit(now, demand, not_after, tx)? {
            Admitted::Now(tx) => {
                drop(st);
                let _ = tx.send(Grant {
                    pacer: None,
                    buckets: Vec::new(),
                    waited: Duration::ZERO,
                    at: now_i,
                });
            }
            Admitted::Queued { id, predicted } => {
                ticket.id = Some(id);
                ticket.predicted = predicted;
                let start = !st.scheduler_started;
                st.scheduler_started = true;
                self.pass(st);
                if start {
                    tokio::spawn(self.clone().run());
                }
            }
        }
        Ok(ticket)
    }

    /// Tells the budgets of a throttled request what the 429 means, as `plan` says (see
    /// [`crate::throttle`]): pause them, then one probe, lowering their rate in force and
    /// learning the upstream's limit when the 429 allows it; or hold them for one probe's
    /// answer. `granted_at` is that request's [`Grant::at`]. Returns the budget names whose rate
    /// was lowered.
    pub fn throttle(
        &self,
        buckets: &[BucketKey],
        retry_after: Option<Duration>,
        plan: Plan,
        granted_at: Instant,
    ) -> Vec<String> {
        let mut st = self.lock();
        let now = st.now();
        let sent = st.nanos(granted_at);
        let (lowered, tell) = st.queue.throttle(buckets, retry_after, plan, sent, now);
        self.holding.store(st.queue.is_holding(), Ordering::Relaxed);
        // The other replicas learn it from the store.
        let store = st
            .store
            .clone()
            .filter(|_| st.queue.store_is_up() && !tell.is_empty());
        self.pass(st);
        if let (Some(store), Ok(rt)) = (store, tokio::runtime::Handle::try_current()) {
            let pacer = self.clone();
            rt.spawn(async move {
                for t in tell {
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

    /// A request granted at `granted_at` and charged to `buckets` came back without a 429:
    /// budgets holding for a probe's answer go on. Costs nothing while none holds.
    pub fn answered(&self, buckets: &[BucketKey], granted_at: Instant) {
        if !self.holding.load(Ordering::Relaxed) {
            return;
        }
        let mut st = self.lock();
        let (granted, now) = (st.nanos(granted_at), st.now());
        let ended = st.queue.answered(buckets, granted, now);
        self.holding.store(st.queue.is_holding(), Ordering::Relaxed);
        if ended {
            self.pass(st);
        }
    }

    /// Reports when a granted request actually left (see [`Queue::sent`]).
    pub fn sent(&self, buckets: &[BucketKey], granted_at: Instant, sent_at: Instant) {
        // Most requests leave on time: no lock for them (this runs once per request).
        let late = sent_at.saturating_duration_since(granted_at);
        if late <= Duration::from_nanos(bucket::LATE_SLACK) {
            return;
        }
        let mut st = self.lock();
        let (granted, sent) = (st.nanos(granted_at), st.nanos(sent_at));
        st.queue.sent(buckets, granted, sent);
    }

    /// New budget definitions (reload): see [`Queue::update`].
    pub fn update(&self, budgets: &[BudgetSpec], max_depth: usize, aging: Duration) {
        let mut st = self.lock();
        let now = st.now();
        st.queue.update(budgets, max_depth, aging, now);
        self.pass(st);
    }

    /// How long a request on `buckets` arriving now would be predicted to wait.
    pub fn predicted_wait(&self, buckets: &[BucketKey]) -> Duration {
        let st = self.lock();
        let now = st.now();
        Duration::from_nanos(st.queue.predicted_start(now, buckets).saturating_sub(now))
    }

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.lock().queue.depth()
    }

    /// The rate in force and state of every configured budget.
    /// Costs O(budgets + buckets slowed by a 429 now), not O(keys): see [`Queue::view`].
    pub fn view(&self) -> Vec<BudgetView> {
        let mut st = self.lock();
        let now = st.now();
        st.queue.view(now)
    }

    /// The rate in force of each of `buckets` (what a 429 on them changed), by budget name.
    pub fn rates_of(&self, buckets: &[BucketKey]) -> Vec<(String, f64)> {
        let st = self.lock();
        st.queue
            .rates_of(buckets, st.now())
            .into_iter()
            .map(|(name, r)| (name.to_string(), r))
            .collect()
    }

    /// Releases every waiter now with [`Closed`] (shutdown past its drain).
    pub fn close_all(&self) {
        let closed = self.lock().queue.close_all();
        drop(closed);
    }

    fn cancel(&self, id: u64) {
        let mut st = self.lock();
        if st.queue.cancel(id) {
            self.pass(st);
        }
    }

    fn give_back(&self, buckets: &[BucketKey]) {
        let mut st = self.lock();
        let now = st.now();
        st.queue.give_back(buckets, now);
        self.pass(st);
    }

    /// Runs a pass of the queue at now, plans the scheduler's next wake-up (waking it when that
    /// is earlier than planned) and acts on the pass outside the lock.
    fn pass(&self, mut st: MutexGuard<'_, Locked>) {
        let now = st.now();
        let pass = st.queue.pass(now);
        let earlier = pass
            .wake
            .is_some_and(|w| st.wake_at.is_none_or(|cur| w < cur));
        if earlier {
            st.wake_at = pass.wake;
        }
        self.act(st, pass);
        if earlier {
            self.notify.notify_one();
        }
    }

    /// Delivers a pass's releases and asks for its leases, after releasing the lock.
    fn act(&self, st: MutexGuard<'_, Locked>, pass: Pass<oneshot::Sender<Grant>>) {
        let grants: Vec<_> = pass
            .released
            .into_iter()
            .map(|r| self.grant(&st, r))
            .collect();
        let store = st.store.clone();
        drop(st);
        for (tx, grant) in grants {
            // A client that left just now drops the grant, which gives its slots back.
            let _ = tx.send(grant);
        }
        if let (Some(store), Ok(rt)) = (store, tokio::runtime::Handle::try_current()) {
            for (key, req) in pass.leases {
                rt.spawn(self.clone().fetch(key, req, store.clone()));
            }
        }
    }

    fn grant(
        &self,
        st: &Locked,
        r: Release<oneshot::Sender<Grant>>,
    ) -> (oneshot::Sender<Grant>, Grant) {
        let at = st.instant(r.taken_at);
        let arrived = st.instant(r.arrived);
        let grant = Grant {
            pacer: Some(self.clone()),
            buckets: r.buckets,
            waited: at.saturating_duration_since(arrived),
            at,
        };
        (r.payload, grant)
    }

    /// Fetches one lease and applies it.
    async fn fetch(self, key: BucketKey, req: LeaseRequest, store: Arc<dyn SlotStore>) {
        let sent = Instant::now();
        let answer = tokio::time::timeout(STORE_TIMEOUT, store.lease(req)).await;
        let received = Instant::now();
        let mut st = self.lock();
        match answer {
            Ok(Ok(lease)) => {
                // The store's "now" is about half a round trip after we asked.
                let base = st.nanos(sent + (received - sent) / 2);
                st.queue.lease_arrived(&key, &lease, base);
                self.pass(st);
            }
            failed => {
                st.queue.lease_failed(&key);
                drop(st);
                let error = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {STORE_TIMEOUT:?}"),
                };
                self.store_failed(&error);
            }
        }
    }

    /// The store did not answer: every bucket paces locally at its fallback share until it
    /// answers again. Logged once per outage.
    fn store_failed(&self, error: &str) {
        let mut st = self.lock();
        let now = st.now();
        let Some(replicas) = st.queue.store_down(now) else {
            return;
        };
        tracing::warn!(
            "shared budget store unreachable ({error}): each budget falls back to 1/{replicas} of its rate"
        );
        let store = st.store.clone();
        self.pass(st);
        if let (Some(store), Ok(rt)) = (store, tokio::runtime::Handle::try_current()) {
            rt.spawn(self.clone().probe(store));
        }
    }

    /// Tries the store until it answers, then goes back to sharing.
    async fn probe(self, store: Arc<dyn SlotStore>) {
        let weak = Arc::downgrade(&self.state);
        let notify = self.notify.clone();
        let holding = self.holding.clone();
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
                holding: holding.clone(),
            };
            let mut st = pacer.lock();
            let now = st.now();
            st.queue.store_up(now);
            tracing::info!("shared budget store reachable again: budgets are shared again");
            pacer.pass(st);
            return;
        }
    }

    /// The scheduler: releases waiters when their buckets conform. Runs while anyone holds the
    /// pacer; started by the first admission on the caller's runtime.
    async fn run(self) {
        let weak = Arc::downgrade(&self.state);
        let notify = self.notify.clone();
        let holding = self.holding.clone();
        drop(self);
        loop {
            let Some(state) = weak.upgrade() else { return };
            let pacer = Pacer {
                state,
                notify: notify.clone(),
                holding: holding.clone(),
            };
            let (wake, epoch) = {
                let mut st = pacer.lock();
                let now = st.now();
                let pass = st.queue.pass(now);
                st.wake_at = pass.wake;
                let planned = (pass.wake, st.epoch);
                pacer.act(st, pass);
                planned
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
#[cfg(test)]
mod tests;
