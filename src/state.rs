//! The running proxy's state, shared by the proxy, the admin listener, reload and the signal
//! handlers: the config in force (swapped whole on reload), the pacer, metrics, the resolver and
//! the lifecycle flags. Fields are private: each change goes through one method here.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::pacer::{BucketKey, Pacer, CLUSTER_PACING_GUARD, PACING_GUARD};
use crate::resolve::Resolver;
use crate::shared_budget::{RedisStore, REDIS_TIMEOUT};
use crate::status_page::ThrottleEvent;
use crate::throttle;
use crate::tls::CertResolver;

/// How many throttle events the status page keeps.
const RECENT_THROTTLES: usize = 20;

pub struct State {
    config: ArcSwap<Config>,
    config_path: PathBuf,
    pacer: Pacer,
    metrics: Arc<Metrics>,
    resolver: Resolver,
    /// The HTTPS listener's certificate, when it was started with `tls`.
    cert: Option<Arc<CertResolver>>,
    /// Set on SIGTERM: `/readyz` answers 503, new requests are refused.
    draining: AtomicBool,
    /// Set on SIGTERM and SIGQUIT: this process stops serving soon; see [`State::keep_alive`].
    stopping: AtomicBool,
    /// Requests between arrival and the end of their answer: see [`ActiveRequest`].
    active: AtomicI64,
    started: Instant,
    recent_throttles: Mutex<VecDeque<ThrottleEvent>>,
    last_reload: Mutex<Option<ReloadRecord>>,
    /// Fallback time already added to its counter.
    fallback_reported: Mutex<Duration>,
}

#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    pub ok: bool,
    pub error: Option<String>,
}

/// One request being served; counted in [`State::active_requests`] until dropped.
pub struct ActiveRequest(Arc<State>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

// A poisoned lock only means a panic elsewhere mid-update of a display record: keep going.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl State {
    pub fn new(config: Config, config_path: PathBuf) -> Arc<State> {
        let metrics = Arc::new(Metrics::new());
        let guard = if config.cluster.is_some() {
            CLUSTER_PACING_GUARD
        } else {
            PACING_GUARD
        };
        let mut pacer = Pacer::new(&config.budgets, config.queue.max_depth, config.queue.aging)
            .with_guard(guard);
        if let Some(c) = &config.cluster {
            match RedisStore::new(&c.redis_url, REDIS_TIMEOUT) {
                Ok(store) => {
                    pacer = pacer.with_store(Arc::new(store), &c.key_prefix, c.fallback_replicas)
                }
                // The URL was validated; a client that cannot even be built is the fallback case.
                Err(e) => tracing::error!("cluster: {e}; budgets stay local"),
            }
        }
        let state = Arc::new(State {
            config_path,
            pacer,
            metrics,
            resolver: Resolver::default(),
            cert: config
                .tls
                .as_ref()
                .map(|t| Arc::new(CertResolver::new(&t.pair))),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            active: AtomicI64::new(0),
            started: Instant::now(),
            recent_throttles: Mutex::new(VecDeque::new()),
            last_reload: Mutex::new(None),
            fallback_reported: Mutex::new(Duration::ZERO),
            config: ArcSwap::from_pointee(config),
        });
        state.publish_config();
        state
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn pacer(&self) -> &Pacer {
        &self.pacer
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn resolver(&self) -> &Resolver {
        &self.resolver
    }

    /// The HTTPS listener's certificate, when it was started with `tls`.
    pub fn cert_resolver(&self) -> Option<Arc<CertResolver>> {
        self.cert.clone()
    }

    /// Puts a new config in force: budgets first (those waiting take the new rates), the
    /// certificate pair for the handshakes from now on, then the config itself in one swap,
    /// then its metrics.
    pub fn install_config(&self, new: Config) {
        self.pacer
            .update(&new.budgets, new.queue.max_depth, new.queue.aging);
        if let (Some(cert), Some(tls)) = (&self.cert, &new.tls) {
            cert.set(&tls.pair);
        }
        self.config.store(Arc::new(new));
        self.publish_config();
    }

    pub fn record_reload(&self, record: ReloadRecord) {
        *lock(&self.last_reload) = Some(record);
    }

    pub fn last_reload(&self) -> Option<ReloadRecord> {
        lock(&self.last_reload).clone()
    }

    /// Makes the config in force visible in metrics (label sets, configured rates).
    fn publish_config(&self) {
        let cfg = self.config.load();
        let routes: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
        let budgets: Vec<&str> = cfg.budgets.iter().map(|b| b.name.as_str()).collect();
        self.metrics.init_labels(&routes, &budgets);
        self.metrics.queue_max_depth.set(cfg.queue.max_depth as i64);
        self.metrics
            .max_connections
            .set(cfg.limits.max_connections as i64);
        for b in &cfg.budgets {
            self.metrics
                .budget_configured_rate
                .with_label_values(&[b.name.as_str()])
                .set(b.rate.per_second);
        }
        self.refresh_rates();
    }

    /// Copies the rates in force, the pauses (and the shared store's state) into their gauges.
    pub fn refresh_rates(&self) {
        if let Some((up, fallback)) = self.pacer.store_status() {
            self.metrics.cluster_redis_up.set(i64::from(up));
            let mut last = lock(&self.fallback_reported);
            if fallback > *last {
                self.metrics
                    .cluster_fallback_seconds_total
                    .inc_by((fallback - *last).as_secs_f64());
                *last = fallback;
            }
        }
        // O(budgets + buckets slowed now), never every key: see `Queue::view`.
        for v in self.pacer.view() {
            self.metrics
                .budget_rate
                .with_label_values(&[v.name.as_str()])
                .set(v.rate_in_force);
            self.metrics
                .budget_paused_seconds
                .with_label_values(&[v.name.as_str()])
                .set(v.paused_for.as_secs_f64());
        }
    }

    /// An upstream 429 on a request of `route` charged to `buckets` and granted at
    /// `granted_at`: the pacer pauses, holds and learns as [`throttle::plan`] says for the
    /// config in force, and the event is counted, logged and kept for the status page.
    pub fn upstream_throttled(
        &self,
        route: &str,
        buckets: &[BucketKey],
        retry_after: Option<Duration>,
        granted_at: tokio::time::Instant,
    ) {
        let keyed = buckets.iter().any(|b| b.key.is_some());
        // A retried 429's body is never read (the retry is decided on its head), so whose
        // limit it was is found out from whether other keys still succeed.
        let plan = throttle::plan(
            retry_after,
            self.config.load().retry.max_retry_after,
            throttle::Scope::Unknown,
            keyed,
        );
        let lowered = self.pacer.throttle(buckets, retry_after, plan, granted_at);
        let mut names: Vec<&str> = buckets.iter().map(|b| &*b.budget).collect();
        names.dedup();
        let unix_time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let events = throttle::record(
            &self.metrics,
            route,
            &names,
            retry_after,
            &lowered,
            unix_time,
        );
        {
            let mut q = lock(&self.recent_throttles);
            for event in events {
                if q.len() == RECENT_THROTTLES {
                    q.pop_front();
                }
                q.push_back(event);
            }
        }
        // Only the buckets of this request: a 429 must not visit every key. A lowered rate
        // shows at once; the scrape's full refresh raises it again as it recovers.
        for (name, rate) in self.pacer.rates_of(buckets) {
            let gauge = self.metrics.budget_rate.with_label_values(&[name.as_str()]);
            if rate < gauge.get() {
                gauge.set(rate);
            }
        }
    }

    /// The latest upstream 429s, oldest first.
    pub fn recent_throttles(&self) -> Vec<ThrottleEvent> {
        lock(&self.recent_throttles).iter().cloned().collect()
    }

    /// How long this process has been running.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// SIGTERM: `/readyz` answers 503 and new requests are refused from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.stop();
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// SIGTERM or SIGQUIT: this process stops serving soon.
    pub fn stop(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether a client may keep its connection for another request after this answer; the
    /// proxy answers `Connection: close` when not. False once the process is stopping (SIGTERM
    /// drain, SIGQUIT upgrade): when Pingora shuts down it drops idle keep-alive connections at
    /// once, and a client whose next request is already on its way sees the connection close
    /// under it: a transport error it cannot tell from a lost answer, so cannot safely retry.
    /// Told to close, it opens a new connection instead, which during an upgrade the new
    /// process accepts.
    pub fn keep_alive(&self) -> bool {
        !self.stopping.load(Ordering::Relaxed)
    }

    /// A request arrived; it counts as active until the returned guard is dropped.
    pub fn request_started(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, Ordering::SeqCst);
        ActiveRequest(self.clone())
    }

    /// Requests between arrival and the end of their answer.
    pub fn active_requests(&self) -> i64 {
        self.active.load(Ordering::SeqCst)
    }
}
