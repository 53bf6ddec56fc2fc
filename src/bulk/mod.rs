//! Coalescing at run time: single updates wait in the [`Batcher`], one task per (route, token)
//! asks the pacer for a slot of the bulk route's budgets, makes the bulk call and hands each
//! update its own outcome. Invariant: every update gets exactly one [`Outcome`], its own entry
//! of the bulk answer or word to go alone through its own route; none is lost.
//!
//! - [`client`]: the bulk calls' HTTP/1.1 client (http and https).

pub mod client;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderValue;
use serde_json::Value;
use tokio::sync::{oneshot, Notify};

use crate::coalesce::Batcher;
use crate::config::{Config, Per, RouteSpec};
use crate::metrics::GaugeGuard;
use crate::pacer::{BucketKey, Demand, Rejection};
use crate::retry::{self, Attempt, Outcome as Tried, Verdict};
use crate::route::upstream_path;
use crate::state::State;
use crate::throttle::{self, RetryWait};

/// The bulk call Genesys offers for presence; used when the `into` route's path is a pattern.
pub const BULK_PRESENCE_PATH: &str = "/api/v2/users/presences/bulk";

/// One single update, as its bulk entry.
pub struct Update {
    pub user: String,
    /// `{"id", "sourceId", "presenceDefinition", "message", "primary"}`.
    pub entry: Value,
    pub authorization: Option<HeaderValue>,
}

/// How an update ends.
#[derive(Debug)]
pub enum Outcome {
    /// Its own entry of the bulk answer (`200`).
    Answered(Answered),
    /// The bulk call's last 429, once the retry policy gave up: passed through as it came.
    Throttled(Answered),
    /// Send it alone through its own route (no entry for it, a bulk 4xx, or a batch of one).
    Alone,
}

#[derive(Debug)]
pub struct Answered {
    pub status: u16,
    pub body: Bytes,
    pub content_type: Option<HeaderValue>,
    pub retry_after: Option<Duration>,
    pub correlation: Option<String>,
    /// Time its batch waited for its first slot.
    pub waited: Duration,
    pub attempts: u32,
    pub batch: usize,
}

struct Pending {
    /// Names it for its [`Busy`].
    id: u64,
    entry: Value,
    authorization: Option<HeaderValue>,
    arrived: Instant,
    tx: oneshot::Sender<Outcome>,
}

type Key = [u8; 16];

struct Lanes {
    batcher: Batcher<Key, Pending>,
    /// The (route, key)s with a task running, and how to wake it.
    drivers: HashMap<Key, Arc<Notify>>,
}

/// All coalescing routes' batches. Cheap to clone.
#[derive(Clone, Default)]
pub struct Coalescer {
    routes: Arc<Mutex<HashMap<String, Lanes>>>,
    next_id: Arc<AtomicU64>,
    client: Arc<client::Client>,
}

/// Holds an update's user busy until its request ends (answered from the batch, or sent
/// alone): that user's next update joins no batch before, so its order is kept.
pub struct Busy {
    coalescer: Coalescer,
    route: String,
    key: Key,
    user: String,
    id: u64,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut routes = self.coalescer.lock();
        if let Some(lanes) = routes.get_mut(&self.route) {
            // Still waiting: its client left before its batch did.
            if !lanes.batcher.remove(&self.key, |p| p.id == self.id) {
                lanes.batcher.done(&self.key, [self.user.as_str()]);
            }
            if let Some(n) = lanes.drivers.get(&self.key) {
                n.notify_one();
            }
        }
    }
}

impl Coalescer {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Lanes>> {
        // A poisoned lock means a panic mid-update elsewhere; the batches are still whole.
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates waiting for their batch to leave, all routes together.
    pub fn waiting(&self) -> usize {
        self.lock().values().map(|l| l.batcher.waiting()).sum()
    }

    /// Queues `update` of `route` (which coalesces) under the token `key`, admitted on arrival
    /// as a single request would be: refused when `queue.max_depth` requests wait, or when its
    /// batch's slot is predicted later than the route's `max_wait`.
    pub fn submit(
        &self,
        state: &Arc<State>,
        cfg: &Config,
        route: &RouteSpec,
        key: Key,
        update: Update,
    ) -> Result<(oneshot::Receiver<Outcome>, Busy), Rejection> {
        let c = route.coalesce.expect("a coalescing route");
        let into = &cfg.routes[c.into];
        let buckets = bulk_buckets(state, cfg, into, key);
        let pacer = state.pacer();
        let depth = pacer.depth() + self.waiting();
        if depth >= cfg.queue.max_depth {
            return Err(Rejection::Full {
                depth,
                retry_after: pacer.predicted_wait(&buckets).max(Duration::from_secs(1)),
            });
        }
        let (tx, rx) = oneshot::channel();
        let mut routes = self.lock();
        let lanes = routes.entry(route.name.clone()).or_insert_with(|| Lanes {
            batcher: Batcher::new(c.window, c.max_batch),
            drivers: HashMap::new(),
        });
        lanes.batcher.reconfigure(c.window, c.max_batch);
        // Batches ahead of this update's, each a slot of the bulk budgets.
        let ahead = lanes.batcher.waiting_of(&key) / c.max_batch;
        let slot = pacer.predicted_wait(&buckets);
        let wait = slot * (ahead as u32 + 1) + c.window;
        if wait > route.max_wait {
            return Err(Rejection::TooLong { wait });
        }
        let now = tokio::time::Instant::now();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let pending = Pending {
            id,
            entry: update.entry,
            authorization: update.authorization,
            arrived: Instant::now(),
            tx,
        };
        lanes.batcher.push(&key, &update.user, pending, now);
        match lanes.drivers.get(&key) {
            Some(n) => n.notify_one(),
            None => {
                let notify = Arc::new(Notify::new());
                lanes.drivers.insert(key, notify.clone());
                let driver = Driver {
                    state: state.clone(),
                    coalescer: self.clone(),
                    route: route.name.clone(),
                    key,
                    notify,
                };
                tokio::spawn(driver.run());
            }
        }
        let busy = Busy {
            coalescer: self.clone(),
            route: route.name.clone(),
            key,
            user: update.user,
            id,
        };
        Ok((rx, busy))
    }
}

/// The bulk route's buckets for a batch of `key`: a token budget takes the token's bucket;
/// a budget keyed otherwise (client address, a header) counts the batch in its bucket of
/// nobody (all updates of a batch share the token, not those).
fn bulk_buckets(state: &State, cfg: &Config, into: &RouteSpec, key: Key) -> Vec<BucketKey> {
    into.budgets
        .iter()
        .map(|&i| {
            let b = &cfg.budgets[i];
            let k = match b.per {
                Per::Global => None,
                Per::Token => Some(key),
                _ => Some([0; 16]),
            };
            state.pacer().bucket_key(&b.name, k)
        })
        .collect()
}

/// The task of one (route, token): waits for a batch to be ready, for its slot, then sends it.
struct Driver {
    state: Arc<State>,
    coalescer: Coalescer,
    route: String,
    key: Key,
    notify: Arc<Notify>,
}

enum Next {
    Stop,
    Wait,
    At(tokio::time::Instant),
    Ready,
}

impl Driver {
    async fn run(self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.next() {
                Next::Stop => return,
                Next::Wait => notified.await,
                Next::At(t) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(t) => {}
                        _ = notified => {}
                    }
                }
                Next::Ready => self.send_next().await,
            }
        }
    }

    fn next(&self) -> Next {
        let mut routes = self.coalescer.lock();
        let Some(lanes) = routes.get_mut(&self.route) else {
            return Next::Stop;
        };
        match lanes.batcher.ready_at(&self.key) {
            Some(t) if t > tokio::time::Instant::now() => Next::At(t),
            Some(_) => Next::Ready,
            None if lanes.batcher.waiting_of(&self.key) > 0 => Next::Wait,
            None => {
                lanes.drivers.remove(&self.key);
                Next::Stop
            }
        }
    }

    /// Takes the open batch once a slot of the bulk budgets is granted (it fills meanwhile),
    /// and starts its bulk call.
    async fn send_next(&self) {
        let cfg = self.state.config();
        let Some((route, c)) = cfg
            .routes
            .iter()
            .find(|r| r.name == self.route)
            .and_then(|r| Some((r, r.coalesce?)))
        else {
            // Reloaded without coalescing: what waits goes alone.
            for (_, p) in self.seal() {
                let _ = p.tx.send(Outcome::Alone);
            }
            return;
        };
        let into = &cfg.routes[c.into];
        let buckets = bulk_buckets(&self.state, &cfg, into, self.key);
        let mut grant = None;
        if !buckets.is_empty() {
            let demand = Demand {
                buckets: buckets.clone(),
                priority: into.priority,
                max_wait: cfg.retry.max_elapsed.max(route.max_wait),
                retry: false,
                not_after: None,
            };
            match self.state.pacer().admit(demand) {
                Ok(mut ticket) => grant = ticket.granted().await.ok(),
                Err(e) => tracing::debug!(route = %self.route, "bulk slot refused: {e}"),
            }
            if grant.is_none() {
                for (_, p) in self.seal() {
                    let _ = p.tx.send(Outcome::Alone);
                }
                return;
            }
        }
        let batch = self.seal();
        if batch.len() < 2 {
            // Nothing to gain: the original request goes, on its own route's slots.
            for (_, p) in batch {
                let _ = p.tx.send(Outcome::Alone);
            }
            return;
        }
        let (waited, granted_at) = match grant {
            Some(g) => {
                let at = (g.waited, g.at);
                g.commit();
                at
            }
            None => (Duration::ZERO, tokio::time::Instant::now()),
        };
        let m = self.state.metrics();
        m.batch_size
            .with_label_values(&[self.route.as_str()])
            .observe(batch.len() as f64);
        m.coalesced_requests_total
            .with_label_values(&[self.route.as_str()])
            .inc_by(batch.len() as u64);
        m.queue_wait_seconds
            .with_label_values(&[into.name.as_str()])
            .observe(waited.as_secs_f64());
        let call = BulkCall {
            state: self.state.clone(),
            client: self.coalescer.client.clone(),
            into: into.name.clone(),
            buckets,
            batch: batch.into_iter().map(|(_, p)| p).collect(),
            waited,
            granted_at,
        };
        tokio::spawn(call.run());
    }

    /// The open batch, less the updates whose clients left.
    fn seal(&self) -> Vec<(String, Pending)> {
        let mut routes = self.coalescer.lock();
        let Some(lanes) = routes.get_mut(&self.route) else {
            return Vec::new();
        };
        lanes.batcher.retain(&self.key, |p| !p.tx.is_closed());
        lanes.batcher.seal(&self.key)
    }
}

/// One batch's bulk call, retried under the usual rules, and its answers handed out.
struct BulkCall {
    state: Arc<State>,
    client: Arc<client::Client>,
    into: String,
    buckets: Vec<BucketKey>,
    batch: Vec<Pending>,
    waited: Duration,
    granted_at: tokio::time::Instant,
}

impl BulkCall {
    async fn run(mut self) {
        let arrived = self
            .batch
            .iter()
            .map(|p| p.arrived)
            .min()
            .unwrap_or_else(Instant::now);
        let entries: Vec<&Value> = self.batch.iter().map(|p| &p.entry).collect();
        let body = Bytes::from(serde_json::to_vec(&entries).expect("JSON values serialize"));
        let authorization = self.batch[0].authorization.clone();
        let mut attempts = 0;
        loop {
            let cfg = self.state.config();
            let Some(into) = cfg.routes.iter().find(|r| r.name == self.into) else {
                return self.alone();
            };
            attempts += 1;
            let tried = match self.attempt(&cfg, into, &authorization, body.clone()).await {
                Ok(reply) => {
                    let status = reply.status;
                    if status != 429 {
                        self.state.pacer().answered(&self.buckets, self.granted_at);
                    } else {
                        self.state.upstream_throttled(
                            &self.into,
                            &self.buckets,
                            reply.retry_after,
                            self.granted_at,
                        );
                    }
                    if (200..300).contains(&status) {
                        return self.answer(reply, attempts);
                    }
                    if !matches!(status, 429 | 502 | 503 | 504) {
                        tracing::info!(route = %self.into, status, "bulk call refused: its updates go alone");
                        return self.alone();
                    }
                    (Tried::Status(status, reply.retry_after), Some(reply))
                }
                Err(client::CallError::Connect { .. }) => (Tried::ConnectFailed, None),
                Err(client::CallError::TimedOut(_)) => (Tried::TimedOut, None),
                Err(client::CallError::Broken(_)) => (Tried::Status(502, None), None),
            };
            let (outcome, reply) = tried;
            let verdict = retry::decide(
                &cfg.retry,
                &Attempt {
                    outcome,
                    made: attempts,
                    elapsed: arrived.elapsed(),
                    idempotent: true,
                    replayable: true,
                    jitter: rand::random::<f64>(),
                },
            );
            let Verdict::Retry { delay, reason } = verdict else {
                return match reply {
                    Some(r) if r.status == 429 => self.throttled(r, attempts),
                    _ => self.alone(),
                };
            };
            self.state
                .metrics()
                .retries_total
                .with_label_values(&[self.into.as_str(), reason])
                .inc();
            let status = match outcome {
                Tried::Status(s, _) => s,
                _ => 0,
            };
            let paced = !self.buckets.is_empty();
            if let RetryWait::Sleep(d) = throttle::retry_wait(status, delay, paced) {
                tokio::time::sleep(d).await;
            }
            if paced {
                let deadline = arrived + cfg.retry.max_elapsed;
                let demand = Demand {
                    buckets: self.buckets.clone(),
                    priority: into.priority,
                    max_wait: deadline.saturating_duration_since(Instant::now()),
                    retry: true,
                    not_after: Some(tokio::time::Instant::from_std(deadline)),
                };
                let granted = match self.state.pacer().admit(demand) {
                    Ok(mut t) => t.granted().await.ok(),
                    Err(_) => None,
                };
                let Some(g) = granted else {
                    return match reply {
                        Some(r) if r.status == 429 => self.throttled(r, attempts),
                        _ => self.alone(),
                    };
                };
                self.granted_at = g.at;
                g.commit();
            }
        }
    }

    async fn attempt(
        &self,
        cfg: &Config,
        into: &RouteSpec,
        authorization: &Option<HeaderValue>,
        body: Bytes,
    ) -> Result<client::Reply, client::CallError> {
        let upstream = &cfg.upstreams[into.upstream];
        let template = into.path.as_str();
        let path = if template.contains(['{', '*']) {
            BULK_PRESENCE_PATH
        } else {
            template
        };
        let path = upstream_path(path, into.strip_prefix.as_deref(), &upstream.base_path);
        let m = self.state.metrics();
        let addrs = self
            .state
            .resolver()
            .resolve(&upstream.host, upstream.port)
            .await
            .map_err(|e| client::CallError::Connect {
                addr: ([0, 0, 0, 0], upstream.port).into(),
                reason: e.to_string(),
            })?;
        let addr = addrs[rand::random_range(0..addrs.len())];
        let _inflight =
            GaugeGuard::new(m.inflight_requests.with_label_values(&[into.name.as_str()]));
        let started = Instant::now();
        let reply = self
            .client
            .put(
                upstream,
                addr,
                &path,
                authorization.as_ref(),
                body,
                &cfg.limits,
            )
            .await;
        m.upstream_duration_seconds
            .with_label_values(&[into.name.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if let Ok(r) = &reply {
            m.upstream_responses_total
                .with_label_values(&[into.name.as_str(), crate::metrics::status_label(r.status)])
                .inc();
        }
        reply
    }

    /// Each update its own entry (matched by user id); one without an entry goes alone.
    fn answer(self, reply: client::Reply, attempts: u32) {
        let entries: Vec<Value> = serde_json::from_slice(&reply.body).unwrap_or_default();
        let size = self.batch.len();
        for p in self.batch {
            let id = p.entry.get("id").and_then(Value::as_str);
            let own = entries
                .iter()
                .find(|e| e.get("id").and_then(Value::as_str) == id);
            let outcome = match own {
                Some(e) => Outcome::Answered(Answered {
                    status: 200,
                    body: Bytes::from(serde_json::to_vec(e).expect("JSON values serialize")),
                    content_type: Some(HeaderValue::from_static("application/json")),
                    retry_after: None,
                    correlation: reply.correlation.clone(),
                    waited: self.waited,
                    attempts,
                    batch: size,
                }),
                None => Outcome::Alone,
            };
            let _ = p.tx.send(outcome);
        }
    }

    fn throttled(self, reply: client::Reply, attempts: u32) {
        let size = self.batch.len();
        for p in self.batch {
            let _ = p.tx.send(Outcome::Throttled(Answered {
                status: reply.status,
                body: reply.body.clone(),
                content_type: reply.content_type.clone(),
                retry_after: reply.retry_after,
                correlation: reply.correlation.clone(),
                waited: self.waited,
                attempts,
                batch: size,
            }));
        }
    }

    fn alone(self) {
        for p in self.batch {
            let _ = p.tx.send(Outcome::Alone);
        }
    }
}
