//! Prometheus metrics: every series of the contract, registered once on shiftgate's own registry.
//!
//! Names, types and labels are fixed by `contract.md` (dashboards and alerts depend on them).
//! Label values are bounded by the config: route and budget names, status codes and the fixed
//! reason lists below; never a token, user id, path or client address.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Counter, Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric shiftgate registers, with its exposition type: the contract's and the ones this
/// implementation adds (`shiftgate_max_connections`); `docs/reference.md` documents each.
pub const CONTRACT_METRICS: &[(&str, &str)] = &[
    ("shiftgate_requests_total", "counter"),
    ("shiftgate_rejections_total", "counter"),
    ("shiftgate_client_disconnects_total", "counter"),
    ("shiftgate_queue_depth", "gauge"),
    ("shiftgate_queue_wait_seconds", "histogram"),
    ("shiftgate_request_duration_seconds", "histogram"),
    ("shiftgate_upstream_duration_seconds", "histogram"),
    ("shiftgate_upstream_responses_total", "counter"),
    ("shiftgate_retries_total", "counter"),
    ("shiftgate_inflight_requests", "gauge"),
    ("shiftgate_budget_rate", "gauge"),
    ("shiftgate_budget_configured_rate", "gauge"),
    ("shiftgate_budget_throttles_total", "counter"),
    ("shiftgate_config_reloads_total", "counter"),
    (
        "shiftgate_config_last_reload_success_timestamp_seconds",
        "gauge",
    ),
    ("shiftgate_build_info", "gauge"),
    ("shiftgate_cluster_redis_up", "gauge"),
    ("shiftgate_cluster_fallback_seconds_total", "counter"),
    ("shiftgate_connections", "gauge"),
    ("shiftgate_queue_max_depth", "gauge"),
    ("shiftgate_budget_paused_seconds", "gauge"),
    ("shiftgate_coalesced_requests_total", "counter"),
    ("shiftgate_batch_size", "histogram"),
    ("shiftgate_max_connections", "gauge"),
    // The standard process metrics (the contract's `process_*`), from /proc/self on Linux.
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_start_time_seconds", "gauge"),
    ("process_threads", "gauge"),
];

/// Updates per bulk call: 1 (a batch of one goes alone) to 50 (Genesys's assumed maximum).
const BATCH_SIZE_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0];

/// The `listener` label of `shiftgate_connections`: the plain HTTP listener, the HTTPS one.
pub const LISTENERS: [&str; 2] = ["plain", "tls"];

/// The `route` label of requests that matched no route.
pub const NO_ROUTE_LABEL: &str = "none";

/// A status code as a label value, made once per code (`"200"`, `"429"`): labelling a request
/// allocates nothing. Codes past 999 (which HTTP does not have) read `"other"`.
pub fn status_label(code: u16) -> &'static str {
    static LABELS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..1000).map(|c| c.to_string()).collect());
    LABELS
        .get(usize::from(code))
        .map_or("other", String::as_str)
}

/// Every `reason` of `shiftgate_rejections_total`, one per answer the proxy makes itself
/// (`local_response::Reason::label`). `overloaded` is answered before a request is read, so it
/// is counted under the route [`NO_ROUTE_LABEL`].
pub const REJECTION_REASONS: &[&str] = &[
    "queue_wait",
    "queue_full",
    "body_too_large",
    "no_route",
    "shutting_down",
    "upstream_unreachable",
    "upstream_timeout",
    "bad_request",
    "header_too_large",
    "overloaded",
];

/// The `reason`s of `shiftgate_retries_total` created ahead of time: the retryable statuses and
/// `connect` (the upstream could not be reached).
const RETRY_REASONS: &[&str] = &["429", "502", "503", "504", "connect"];

/// The statuses created ahead of time for the per-status counters: success and throttled, the
/// two lines every shift-change dashboard compares.
const PRESET_STATUSES: &[&str] = &["200", "429"];

/// Seconds. Waits range from a free slot (about a millisecond) to `queue.max_wait` and retries
/// behind an upstream `Retry-After` (minutes), so the buckets span 1 ms to 5 min.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0,
    120.0, 300.0,
];

/// All of shiftgate's metric handles. Cloning a handle is cheap and shares the series, so each
/// feature may keep the handles it updates.
pub struct Metrics {
    /// The registry `/metrics` serves; not the process-wide default one, so tests and several
    /// instances in one process do not collide.
    pub registry: Registry,
    /// `shiftgate_requests_total{route,status}`: requests answered to clients, by final status.
    pub requests_total: IntCounterVec,
    /// `shiftgate_rejections_total{route,reason}`: answers the proxy made itself; `reason` is one
    /// of [`REJECTION_REASONS`].
    pub rejections_total: IntCounterVec,
    /// `shiftgate_client_disconnects_total{route}`: clients that left before their answer.
    pub client_disconnects_total: IntCounterVec,
    /// `shiftgate_queue_depth{route}`: requests waiting for slots now.
    pub queue_depth: IntGaugeVec,
    /// `shiftgate_queue_wait_seconds{route}`: time each request spent waiting for slots.
    pub queue_wait_seconds: HistogramVec,
    /// `shiftgate_request_duration_seconds{route}`: arrival to last byte of the answer.
    pub request_duration_seconds: HistogramVec,
    /// `shiftgate_upstream_duration_seconds{route}`: one upstream attempt.
    pub upstream_duration_seconds: HistogramVec,
    /// `shiftgate_upstream_responses_total{route,status}`: every upstream attempt's status.
    pub upstream_responses_total: IntCounterVec,
    /// `shiftgate_retries_total{route,reason}`: attempts after the first; `reason` is the status
    /// that caused the retry (`429`, `503`, ...) or `connect`.
    pub retries_total: IntCounterVec,
    /// `shiftgate_inflight_requests{route}`: attempts sent upstream and not yet answered.
    pub inflight_requests: IntGaugeVec,
    /// `shiftgate_budget_rate{budget}`: the rate in force now, requests/second.
    pub budget_rate: GaugeVec,
    /// `shiftgate_budget_configured_rate{budget}`: the rate in the config, requests/second.
    pub budget_configured_rate: GaugeVec,
    /// `shiftgate_budget_throttles_total{budget}`: upstream 429s charged to the budget.
    pub budget_throttles_total: IntCounterVec,
    /// `shiftgate_config_reloads_total{result}`: reload attempts; `result` is `success` or
    /// `failure`.
    pub config_reloads_total: IntCounterVec,
    /// `shiftgate_config_last_reload_success_timestamp_seconds`: Unix time of the last config
    /// load that took effect (the one at start included).
    pub config_last_reload_success_timestamp_seconds: Gauge,
    /// `shiftgate_build_info{version}`: always 1.
    pub build_info: IntGaugeVec,
    /// `shiftgate_cluster_redis_up`: 1 while the shared budget store answers, 0 while it does not.
    ///
    /// Not exported until first set: without `cluster` there is no store to report on, and a 0
    /// there would page ops (alert `ShiftgateClusterRedisDown`) for a store nobody runs. The
    /// cluster module sets it on its first attempt to reach Redis.
    pub cluster_redis_up: IntGauge,
    /// `shiftgate_cluster_fallback_seconds_total`: seconds spent on the local fallback share of
    /// each rate while Redis was unreachable.
    pub cluster_fallback_seconds_total: Counter,
    /// `shiftgate_connections{listener}`: client connections open now; `listener` is `plain` or
    /// `tls`.
    pub connections: IntGaugeVec,
    /// `shiftgate_queue_max_depth`: `queue.max_depth` in force.
    pub queue_max_depth: IntGauge,
    /// `shiftgate_budget_paused_seconds{budget}`: time left on a pause after an upstream 429
    /// (the longest among the budget's buckets; 0: none). Set on each scrape.
    pub budget_paused_seconds: GaugeVec,
    /// `shiftgate_coalesced_requests_total{route}`: single updates sent inside bulk calls.
    pub coalesced_requests_total: IntCounterVec,
    /// `shiftgate_batch_size{route}`: updates per bulk call.
    pub batch_size: HistogramVec,
    /// `shiftgate_max_connections`: `limits.max_connections` in force, so that an alert can
    /// compare `shiftgate_connections` with it.
    pub max_connections: IntGauge,
    /// Each route's per-request series, found by label once ([`Metrics::route`]).
    routes: parking_lot::RwLock<HashMap<String, Arc<RouteMetrics>>>,
}

/// The series every proxied request of one route updates, looked up by label once per route
/// rather than six times per request (a label lookup hashes the values and takes a lock).
/// Routes come from the config, so there are as many of these as routes ever configured.
pub struct RouteMetrics {
    pub queue_wait: Histogram,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub inflight: IntGauge,
    requests: IntCounterVec,
    upstream_responses: IntCounterVec,
    /// `requests_total` and `upstream_responses_total` at `200`, nearly every answer's status.
    requests_ok: IntCounter,
    upstream_ok: IntCounter,
    route: String,
}

impl RouteMetrics {
    /// `shiftgate_requests_total{route,status}` + 1.
    pub fn count_request(&self, status: u16) {
        count(&self.requests, &self.requests_ok, &self.route, status);
    }

    /// `shiftgate_upstream_responses_total{route,status}` + 1.
    pub fn count_upstream_response(&self, status: u16) {
        count(
            &self.upstream_responses,
            &self.upstream_ok,
            &self.route,
            status,
        );
    }
}

fn count(vec: &IntCounterVec, ok: &IntCounter, route: &str, status: u16) {
    if status == 200 {
        ok.inc();
    } else {
        vec.with_label_values(&[route, status_label(status)]).inc();
    }
}

impl Metrics {
    /// Creates every metric and registers it on a fresh registry; `shiftgate_build_info` is set.
    pub fn new() -> Metrics {
        let registry = Registry::new();

        let requests_total = int_counter_vec(
            &registry,
            "shiftgate_requests_total",
            "Requests answered to clients, by route and final HTTP status.",
            &["route", "status"],
        );
        let rejections_total = int_counter_vec(
            &registry,
            "shiftgate_rejections_total",
            "Requests answered by shiftgate itself instead of the upstream, by route and reason.",
            &["route", "reason"],
        );
        let client_disconnects_total = int_counter_vec(
            &registry,
            "shiftgate_client_disconnects_total",
            "Clients that disconnected before their answer was sent, by route.",
            &["route"],
        );
        let queue_depth = int_gauge_vec(
            &registry,
            "shiftgate_queue_depth",
            "Requests waiting for budget slots now, by route.",
            &["route"],
        );
        let queue_wait_seconds = histogram_vec(
            &registry,
            "shiftgate_queue_wait_seconds",
            "Time each request spent waiting for its budget slots, in seconds, by route.",
        );
        let request_duration_seconds = histogram_vec(
            &registry,
            "shiftgate_request_duration_seconds",
            "Time from a request's arrival to the last byte of its answer, in seconds, by route.",
        );
        let upstream_duration_seconds = histogram_vec(
            &registry,
            "shiftgate_upstream_duration_seconds",
            "Duration of one upstream attempt, in seconds, by route.",
        );
        let upstream_responses_total = int_counter_vec(
            &registry,
            "shiftgate_upstream_responses_total",
            "Upstream attempts, by route and the HTTP status the upstream answered.",
            &["route", "status"],
        );
        let retries_total = int_counter_vec(
            &registry,
            "shiftgate_retries_total",
            "Upstream attempts after the first, by route and reason (the status retried, or connect).",
            &["route", "reason"],
        );
        let inflight_requests = int_gauge_vec(
            &registry,
            "shiftgate_inflight_requests",
            "Attempts sent upstream and not yet answered, by route.",
            &["route"],
        );
        let budget_rate = gauge_vec(
            &registry,
            "shiftgate_budget_rate",
            "Rate in force now, in requests per second, by budget (below the configured rate after upstream 429s).",
            &["budget"],
        );
        let budget_configured_rate = gauge_vec(
            &registry,
            "shiftgate_budget_configured_rate",
            "Rate set in the config, in requests per second, by budget.",
            &["budget"],
        );
        let budget_throttles_total = int_counter_vec(
            &registry,
            "shiftgate_budget_throttles_total",
            "Upstream 429 answers charged to the budget, by budget.",
            &["budget"],
        );
        let config_reloads_total = int_counter_vec(
            &registry,
            "shiftgate_config_reloads_total",
            "Config reload attempts, by result (success, failure).",
            &["result"],
        );
        let config_last_reload_success_timestamp_seconds = Gauge::with_opts(Opts::new(
            "shiftgate_config_last_reload_success_timestamp_seconds",
            "Unix time, in seconds, of the last config load that took effect.",
        ))
        .expect("valid metric options");
        register(
            &registry,
            config_last_reload_success_timestamp_seconds.clone(),
        );
        let build_info = int_gauge_vec(
            &registry,
            "shiftgate_build_info",
            "Always 1; the version label says which shiftgate build runs.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        let cluster_redis_up = IntGauge::with_opts(Opts::new(
            "shiftgate_cluster_redis_up",
            "1 while the shared budget store (Redis) answers, 0 while it does not; absent without cluster.",
        ))
        .expect("valid metric options");
        cluster_redis_up.set(UNSET);
        register(&registry, HiddenUntilSet(cluster_redis_up.clone()));
        let cluster_fallback_seconds_total = Counter::with_opts(Opts::new(
            "shiftgate_cluster_fallback_seconds_total",
            "Seconds spent on the local fallback share of each rate while Redis was unreachable.",
        ))
        .expect("valid metric options");
        register(&registry, cluster_fallback_seconds_total.clone());
        let connections = int_gauge_vec(
            &registry,
            "shiftgate_connections",
            "Client connections open now, by listener (plain, tls).",
            &["listener"],
        );
        for listener in LISTENERS {
            connections.with_label_values(&[listener]);
        }
        let queue_max_depth = IntGauge::with_opts(Opts::new(
            "shiftgate_queue_max_depth",
            "queue.max_depth in force: requests that may wait at once, all routes together.",
        ))
        .expect("valid metric options");
        register(&registry, queue_max_depth.clone());
        let budget_paused_seconds = gauge_vec(
            &registry,
            "shiftgate_budget_paused_seconds",
            "Seconds left on a pause after an upstream 429, by budget (the longest among its keys; 0: none).",
            &["budget"],
        );
        let coalesced_requests_total = int_counter_vec(
            &registry,
            "shiftgate_coalesced_requests_total",
            "Single updates sent inside bulk calls, by the route they came on.",
            &["route"],
        );
        let batch_size = HistogramVec::new(
            HistogramOpts::new(
                "shiftgate_batch_size",
                "Updates per bulk call, by the route the updates came on.",
            )
            .buckets(BATCH_SIZE_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric options");
        register(&registry, batch_size.clone());

        let max_connections = IntGauge::with_opts(Opts::new(
            "shiftgate_max_connections",
            "limits.max_connections in force: client connections allowed at once, both listeners together.",
        ))
        .expect("valid metric options");
        register(&registry, max_connections.clone());
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds,
        // process_max_fds, process_virtual_memory_bytes, process_start_time_seconds,
        // process_threads: read from /proc/self on each scrape (Linux only; elsewhere the
        // collector reports nothing).
        #[cfg(target_os = "linux")]
        register(
            &registry,
            prometheus::process_collector::ProcessCollector::for_self(),
        );

        Metrics {
            registry,
            requests_total,
            rejections_total,
            client_disconnects_total,
            queue_depth,
            queue_wait_seconds,
            request_duration_seconds,
            upstream_duration_seconds,
            upstream_responses_total,
            retries_total,
            inflight_requests,
            budget_rate,
            budget_configured_rate,
            budget_throttles_total,
            config_reloads_total,
            config_last_reload_success_timestamp_seconds,
            build_info,
            cluster_redis_up,
            cluster_fallback_seconds_total,
            connections,
            queue_max_depth,
            budget_paused_seconds,
            coalesced_requests_total,
            batch_size,
            max_connections,
            routes: parking_lot::RwLock::default(),
        }
    }

    /// `shiftgate_queue_depth{route}` + 1 until the guard is dropped: one request waiting for
    /// slots (at the client edge, for a bulk call, or in the proxy's queue).
    pub fn waiting(&self, route: &str) -> GaugeGuard {
        GaugeGuard::new(self.queue_depth.with_label_values(&[route]))
    }

    /// The per-request series of `route` (a configured route's name), made on first use.
    pub fn route(&self, route: &str) -> Arc<RouteMetrics> {
        if let Some(found) = self.routes.read().get(route) {
            return Arc::clone(found);
        }
        let made = Arc::new(RouteMetrics {
            queue_wait: self.queue_wait_seconds.with_label_values(&[route]),
            request_duration: self.request_duration_seconds.with_label_values(&[route]),
            upstream_duration: self.upstream_duration_seconds.with_label_values(&[route]),
            inflight: self.inflight_requests.with_label_values(&[route]),
            requests: self.requests_total.clone(),
            upstream_responses: self.upstream_responses_total.clone(),
            requests_ok: self.requests_total.with_label_values(&[route, "200"]),
            upstream_ok: self
                .upstream_responses_total
                .with_label_values(&[route, "200"]),
            route: route.to_owned(),
        });
        Arc::clone(self.routes.write().entry(route.to_owned()).or_insert(made))
    }

    /// Creates every label combination known from the config with value 0, so dashboards draw
    /// lines (and `rate()` has a starting point) before the first event.
    ///
    /// Per route: `requests_total` and `upstream_responses_total` for 200 and 429, every
    /// rejection reason, `client_disconnects_total`, `queue_depth`, `inflight_requests`, the
    /// retry reasons 429/502/503/504/connect and the three histograms. Per budget:
    /// `budget_throttles_total` and `budget_paused_seconds` (the rate gauges are set by the
    /// caller, as a 0 there would read as "paused"). Both reload results.
    ///
    /// Called at start and after each reload: names new to the config are added; series of
    /// routes and budgets that left it stay, so their counters do not appear to reset.
    ///
    /// Being called means a config took effect, so it also stamps
    /// `config_last_reload_success_timestamp_seconds`: without that, the load at start left it
    /// at 0 (the Unix epoch) until the first reload.
    pub fn init_labels(&self, routes: &[&str], budgets: &[&str]) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.config_last_reload_success_timestamp_seconds.set(now);
        for &route in routes {
            for &status in PRESET_STATUSES {
                self.requests_total.with_label_values(&[route, status]);
                self.upstream_responses_total
                    .with_label_values(&[route, status]);
            }
            for &reason in REJECTION_REASONS {
                self.rejections_total.with_label_values(&[route, reason]);
            }
            for &reason in RETRY_REASONS {
                self.retries_total.with_label_values(&[route, reason]);
            }
            self.client_disconnects_total.with_label_values(&[route]);
            self.queue_depth.with_label_values(&[route]);
            self.inflight_requests.with_label_values(&[route]);
            self.queue_wait_seconds.with_label_values(&[route]);
            self.request_duration_seconds.with_label_values(&[route]);
            self.upstream_duration_seconds.with_label_values(&[route]);
            self.coalesced_requests_total.with_label_values(&[route]);
            self.batch_size.with_label_values(&[route]);
        }
        for &budget in budgets {
            self.budget_throttles_total.with_label_values(&[budget]);
            self.budget_paused_seconds.with_label_values(&[budget]);
        }
        for result in ["success", "failure"] {
            self.config_reloads_total.with_label_values(&[result]);
        }
    }

    /// Every registered series in the Prometheus text exposition format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        TextEncoder::new()
            .encode_utf8(&self.registry.gather(), &mut out)
            .expect(
                "the text encoder only fails on invalid metric families, which `new` cannot build",
            );
        out
    }

    /// The `Content-Type` of [`Metrics::encode`]'s output, for the `/metrics` answer.
    pub fn content_type(&self) -> String {
        TextEncoder::new().format_type().to_owned()
    }
}

/// Holds a gauge one higher until dropped: a request's place in `shiftgate_queue_depth` or
/// `shiftgate_inflight_requests` is given back however the request ends.
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The value that keeps `shiftgate_cluster_redis_up` out of the exposition; never a real state.
const UNSET: i64 = -1;

/// Exports the gauge only once it holds a real value (not [`UNSET`]), so a metric that only
/// means something with an optional feature is absent rather than a misleading 0.
struct HiddenUntilSet(IntGauge);

impl Collector for HiddenUntilSet {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if self.0.get() == UNSET {
            Vec::new()
        } else {
            self.0.collect()
        }
    }
}

// The constructors below panic only on an invalid name, help or label set, which are constants
// here: a panic is a programming error caught by the first test run, never a runtime condition.

fn register(registry: &Registry, collector: impl Collector + 'static) {
    registry
        .register(Box::new(collector))
        .expect("each metric name is registered once");
}

fn int_counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric options");
    register(registry, vec.clone());
    vec
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric options");
    register(registry, vec.clone());
    vec
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    let vec = GaugeVec::new(Opts::new(name, help), labels).expect("valid metric options");
    register(registry, vec.clone());
    vec
}

/// A histogram labelled by `route`, with [`DURATION_BUCKETS`].
fn histogram_vec(registry: &Registry, name: &str, help: &str) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    let vec = HistogramVec::new(opts, &["route"]).expect("valid metric options");
    register(registry, vec.clone());
    vec
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registry as the proxy has it after start with the example config's names, plus the
    /// values that only the running proxy sets (rates, Redis state).
    fn populated() -> Metrics {
        let m = Metrics::new();
        m.init_labels(
            &["sdk-gateway-login", "oauth", "presence", "default"],
            &["per-token", "presence"],
        );
        m.budget_rate.with_label_values(&["presence"]).set(100.0);
        m.budget_configured_rate
            .with_label_values(&["presence"])
            .set(100.0);
        m.cluster_redis_up.set(1);
        m
    }

    /// The value of the one sample line that starts with `series` followed by a space.
    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(str::to_owned)
    }

    #[test]
    fn every_contract_metric_is_exposed_with_its_type_and_help() {
        let text = populated().encode();
        for (name, kind) in CONTRACT_METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "missing `# TYPE {name} {kind}` in:\n{text}"
            );
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "missing help for {name}"
            );
        }
        let families = text.lines().filter(|l| l.starts_with("# TYPE ")).count();
        assert_eq!(
            families,
            CONTRACT_METRICS.len(),
            "a metric outside the contract:\n{text}"
        );
    }

    #[test]
    fn init_labels_creates_zero_series_for_every_configured_name() {
        let text = populated().encode();
        for route in ["sdk-gateway-login", "oauth", "presence", "default"] {
            for status in ["200", "429"] {
                let labels = format!("{{route=\"{route}\",status=\"{status}\"}}");
                for name in [
                    "shiftgate_requests_total",
                    "shiftgate_upstream_responses_total",
                ] {
                    assert_eq!(
                        sample(&text, &format!("{name}{labels}")).as_deref(),
                        Some("0")
                    );
                }
            }
            for reason in REJECTION_REASONS {
                let s =
                    format!("shiftgate_rejections_total{{reason=\"{reason}\",route=\"{route}\"}}");
                assert_eq!(sample(&text, &s).as_deref(), Some("0"), "{s}");
            }
            for reason in RETRY_REASONS {
                let s = format!("shiftgate_retries_total{{reason=\"{reason}\",route=\"{route}\"}}");
                assert_eq!(sample(&text, &s).as_deref(), Some("0"), "{s}");
            }
            for name in [
                "shiftgate_client_disconnects_total",
                "shiftgate_queue_depth",
                "shiftgate_inflight_requests",
                "shiftgate_queue_wait_seconds_count",
                "shiftgate_request_duration_seconds_count",
                "shiftgate_upstream_duration_seconds_count",
            ] {
                let s = format!("{name}{{route=\"{route}\"}}");
                assert_eq!(sample(&text, &s).as_deref(), Some("0"), "{s}");
            }
            let inf =
                format!("shiftgate_queue_wait_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}}");
            assert_eq!(sample(&text, &inf).as_deref(), Some("0"), "{inf}");
        }
        for budget in ["per-token", "presence"] {
            let s = format!("shiftgate_budget_throttles_total{{budget=\"{budget}\"}}");
            assert_eq!(sample(&text, &s).as_deref(), Some("0"), "{s}");
        }
        for result in ["success", "failure"] {
            let s = format!("shiftgate_config_reloads_total{{result=\"{result}\"}}");
            assert_eq!(sample(&text, &s).as_deref(), Some("0"), "{s}");
        }
    }

    #[test]
    fn init_labels_stamps_the_time_the_config_took_effect() {
        let m = Metrics::new();
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        m.init_labels(&["r"], &[]);
        let stamped = m.config_last_reload_success_timestamp_seconds.get();
        assert!(stamped >= before.as_secs() as f64, "{stamped}");
    }

    #[test]
    fn build_info_carries_the_crate_version() {
        let text = Metrics::new().encode();
        let s = format!(
            "shiftgate_build_info{{version=\"{}\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(sample(&text, &s).as_deref(), Some("1"));
    }

    #[test]
    fn buckets_span_a_millisecond_to_minutes() {
        let m = Metrics::new();
        m.queue_wait_seconds
            .with_label_values(&["presence"])
            .observe(42.0);
        let text = m.encode();
        for le in ["0.001", "1", "30", "60", "300", "+Inf"] {
            let s =
                format!("shiftgate_queue_wait_seconds_bucket{{route=\"presence\",le=\"{le}\"}}");
            assert!(sample(&text, &s).is_some(), "no bucket {le}");
        }
        let s = "shiftgate_queue_wait_seconds_bucket{route=\"presence\",le=\"30\"}";
        assert_eq!(sample(&text, s).as_deref(), Some("0"));
        let s = "shiftgate_queue_wait_seconds_bucket{route=\"presence\",le=\"60\"}";
        assert_eq!(sample(&text, s).as_deref(), Some("1"));
    }

    #[test]
    fn reload_adds_new_names_and_keeps_old_series() {
        let m = Metrics::new();
        m.init_labels(&["old"], &["b1"]);
        m.requests_total.with_label_values(&["old", "200"]).inc();
        m.init_labels(&["new"], &["b2"]);
        let text = m.encode();
        let s = "shiftgate_requests_total{route=\"old\",status=\"200\"}";
        assert_eq!(sample(&text, s).as_deref(), Some("1"));
        let s = "shiftgate_requests_total{route=\"new\",status=\"429\"}";
        assert_eq!(sample(&text, s).as_deref(), Some("0"));
        let s = "shiftgate_budget_throttles_total{budget=\"b2\"}";
        assert_eq!(sample(&text, s).as_deref(), Some("0"));
    }

    #[test]
    fn redis_up_is_absent_until_the_cluster_module_sets_it() {
        let m = Metrics::new();
        assert!(!m.encode().contains("shiftgate_cluster_redis_up"));
        m.cluster_redis_up.set(0);
        let text = m.encode();
        assert_eq!(
            sample(&text, "shiftgate_cluster_redis_up").as_deref(),
            Some("0")
        );
        let s = "shiftgate_cluster_fallback_seconds_total";
        assert_eq!(sample(&text, s).as_deref(), Some("0"));
    }

    #[test]
    fn two_instances_do_not_share_a_registry() {
        let a = Metrics::new();
        let b = Metrics::default();
        a.init_labels(&["only-a"], &[]);
        assert!(!b.encode().contains("only-a"));
    }

    /// promtool is the reference parser; a missing promtool fails the test rather than skip it,
    /// so a green run always means the exposition was checked.
    #[test]
    fn promtool_accepts_the_exposition() {
        let m = populated();
        m.requests_total
            .with_label_values(&["presence", "200"])
            .inc_by(3);
        m.config_last_reload_success_timestamp_seconds
            .set(1_700_000_000.0);
        m.cluster_fallback_seconds_total.inc_by(1.5);
        let text = m.encode();

        crate::harness::promtool_check_metrics(&text);
    }
}
