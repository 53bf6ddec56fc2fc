//! The state every part of a running proxy shares: the config in force (swapped whole on
//! reload), the pacer, metrics, the resolver and the lifecycle flags.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;

use crate::cluster::RedisStore;
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pacer::Pacer;
use crate::status_page::ThrottleEvent;

/// Budgets are paced this much under their configured rate: 0.3 % absorbs the jitter between
/// the proxy's clock and the upstream's windows (3 ms per second, 180 ms per minute).
pub const PACING_GUARD: f64 = 0.997;

/// With replicas the jitter is that of several processes (or hosts): 1 %, 10 ms per second.
pub const CLUSTER_PACING_GUARD: f64 = 0.99;

/// A Redis command that takes longer than this counts as Redis being unreachable.
pub const REDIS_TIMEOUT: Duration = Duration::from_millis(200);

/// How many throttle events the status page keeps.
const RECENT_THROTTLES: usize = 20;

pub struct Shared {
    pub config: ArcSwap<Config>,
    pub config_path: PathBuf,
    pub pacer: Pacer,
    pub metrics: Arc<Metrics>,
    pub resolver: Resolver,
    /// Set on SIGTERM: `/readyz` answers 503, new requests are refused.
    pub draining: AtomicBool,
    /// Set on SIGTERM and SIGQUIT: this process stops serving soon; see [`Shared::keep_alive`].
    pub stopping: AtomicBool,
    /// Requests between arrival and their logging phase.
    pub active: AtomicI64,
    pub started: Instant,
    pub recent_throttles: Mutex<VecDeque<ThrottleEvent>>,
    pub last_reload: Mutex<Option<ReloadRecord>>,
    /// Fallback time already added to its counter.
    fallback_reported: Mutex<Duration>,
}

#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    pub ok: bool,
    pub error: Option<String>,
}

impl Shared {
    pub fn new(config: Config, config_path: PathBuf) -> Arc<Shared> {
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
        let shared = Arc::new(Shared {
            config_path,
            pacer,
            metrics,
            resolver: Resolver::default(),
            draining: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            active: AtomicI64::new(0),
            started: Instant::now(),
            recent_throttles: Mutex::new(VecDeque::new()),
            last_reload: Mutex::new(None),
            fallback_reported: Mutex::new(Duration::ZERO),
            config: ArcSwap::from_pointee(config),
        });
        shared.publish_config();
        shared
    }

    /// Makes the config in force visible in metrics (label sets, configured rates).
    pub fn publish_config(&self) {
        let cfg = self.config.load();
        let routes: Vec<&str> = cfg.routes.iter().map(|r| r.name.as_str()).collect();
        let budgets: Vec<&str> = cfg.budgets.iter().map(|b| b.name.as_str()).collect();
        self.metrics.init_labels(&routes, &budgets);
        for b in &cfg.budgets {
            self.metrics
                .budget_configured_rate
                .with_label_values(&[b.name.as_str()])
                .set(b.rate.per_second);
        }
        self.refresh_rates();
    }

    /// Copies the rates in force (and the shared store's state) into their gauges.
    pub fn refresh_rates(&self) {
        if let Some((up, fallback)) = self.pacer.store_status() {
            self.metrics.cluster_redis_up.set(i64::from(up));
            let mut last = self
                .fallback_reported
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if fallback > *last {
                self.metrics
                    .cluster_fallback_seconds_total
                    .inc_by((fallback - *last).as_secs_f64());
                *last = fallback;
            }
        }
        for v in self.pacer.view() {
            self.metrics
                .budget_rate
                .with_label_values(&[v.name.as_str()])
                .set(v.rate_in_force);
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
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

    pub fn record_throttle(&self, event: ThrottleEvent) {
        let mut q = self
            .recent_throttles
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if q.len() == RECENT_THROTTLES {
            q.pop_front();
        }
        q.push_back(event);
    }
}

/// Upstream host names resolved off the blocking path (Pingora's own lookup blocks and panics
/// on failure), cached for a while, with the last good answer kept when a refresh fails.
/// (host, port) -> (addresses, when they were looked up)
type AddressCache = HashMap<(String, u16), (Vec<SocketAddr>, Instant)>;

#[derive(Default)]
pub struct Resolver {
    cache: Mutex<AddressCache>,
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("cannot resolve {host}: {source}")]
    Lookup {
        host: String,
        source: std::io::Error,
    },
    #[error("{0} resolves to no address")]
    Empty(String),
    #[error("resolving {0} timed out")]
    Timeout(String),
}

impl Resolver {
    const TTL: Duration = Duration::from_secs(30);
    const TIMEOUT: Duration = Duration::from_secs(5);

    /// The addresses of `host`: from the cache when it has any (the background refresh keeps
    /// them current), else looked up now (the first request to a name never resolved).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(host.to_string(), port))
            .map(|(a, _)| a.clone());
        match cached {
            Some(addrs) => Ok(addrs),
            None => self.refresh(host, port).await,
        }
    }

    /// Looks `host` up again when its answer is older than the TTL (or absent). A failed
    /// lookup keeps the last good addresses.
    pub async fn refresh(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        if let Ok(ip) = host.parse::<std::net::IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        let key = (host.to_string(), port);
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        if let Some((addrs, at)) = &cached {
            if at.elapsed() < Self::TTL {
                return Ok(addrs.clone());
            }
        }
        let looked_up = tokio::time::timeout(Self::TIMEOUT, tokio::net::lookup_host((host, port)))
            .await
            .map_err(|_| ResolveError::Timeout(host.to_string()))
            .and_then(|r| {
                r.map_err(|source| ResolveError::Lookup {
                    host: host.to_string(),
                    source,
                })
            })
            .map(|it| it.collect::<Vec<_>>());
        match looked_up {
            Ok(addrs) if !addrs.is_empty() => {
                self.cache
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, (addrs.clone(), Instant::now()));
                Ok(addrs)
            }
            Ok(_) => cached
                .map(|(a, _)| a)
                .ok_or_else(|| ResolveError::Empty(host.to_string())),
            Err(e) => match cached {
                Some((a, _)) => {
                    tracing::warn!(error = %e, "keeping the last addresses of {host}");
                    Ok(a)
                }
                None => Err(e),
            },
        }
    }

    /// Refreshes every upstream of `config` (the config watcher calls this off the request
    /// path); failures are logged, never fatal.
    pub async fn refresh_all(&self, config: &Config) {
        for u in &config.upstreams {
            if let Err(e) = self.refresh(&u.host, u.port).await {
                tracing::warn!(upstream = %u.name, error = %e, "upstream address unknown");
            }
        }
    }
}
