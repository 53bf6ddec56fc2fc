//! The pacer: requests wait here until every bucket of their route grants a slot at once. This
//! is the handle the proxy holds: it reads the clock, keeps the pure [`queue`] behind a lock,
//! delivers its releases as [`Grant`]s, runs the scheduler task and, in cluster mode, fetches
//! leases from the shared store.
//!
//! - [`queue`]: who is admitted and who is released, a pure function of (state, now).
//! - [`bucket`]: one bucket's pacing state (GCRA, pause, the window a 429 is measured against).
//! - [`lease`]: cluster mode's leased slots and when to ask for more.
//!
//! # Time
//! All decisions are functions of `now` (tokio's clock: tests run with paused time). A
//! scheduler task sleeps until the next time a bucket conforms, or until woken by an arrival,
//! a cancellation, a throttle or a reload.

mod bucket;
mod lease;
pub mod queue;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::budget::Nanos;
use crate::config::BudgetSpec;
use crate::route::Priority;
use crate::shared_budget::{LeaseRequest, SlotStore};

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

    /// Tells the budgets of a throttled request what the 429 means (see [`crate::throttle`]):
    /// pause them for `pause`, then one probe, and lower their rate in force, learning the
    /// upstream's limit when the 429 allows it. `granted_at` is that request's [`Grant::at`].
    /// Returns the budget names whose rate was lowered.
    pub fn throttle(
        &self,
        buckets: &[BucketKey],
        retry_after: Option<Duration>,
        pause: Duration,
        granted_at: Instant,
    ) -> Vec<String> {
        let mut st = self.lock();
        let now = st.now();
        let sent = st.nanos(granted_at);
        let (lowered, tell) = st.queue.throttle(buckets, retry_after, pause, sent, now);
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

    /// Reports when a granted request actually left (see [`Queue::sent`]).
    pub fn sent(&self, buckets: &[BucketKey], granted_at: Instant, sent_at: Instant) {
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

    /// Requests waiting now.
    pub fn depth(&self) -> usize {
        self.lock().queue.depth()
    }

    /// The rate in force and state of every configured budget.
    pub fn view(&self) -> Vec<BudgetView> {
        let st = self.lock();
        st.queue.view(st.now())
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
        drop(self);
        loop {
            let Some(state) = weak.upgrade() else { return };
            let pacer = Pacer {
                state,
                notify: notify.clone(),
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
mod tests {
    use super::*;
    use crate::config::{Per, Rate};
    use std::collections::HashMap;

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
        store: Arc<crate::shared_budget::MemoryStore>,
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
        let store = Arc::new(crate::shared_budget::MemoryStore::default());
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
        let store = Arc::new(crate::shared_budget::MemoryStore::default());
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
        let store = Arc::new(crate::shared_budget::MemoryStore::default());
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
