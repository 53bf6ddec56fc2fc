//! The admin listener: /metrics, /healthz, /readyz, /status, /status.json and POST /-/reload.
//! Plain hyper on its own task, so it keeps answering while the proxy drains. It fails closed:
//! a bounded number of connections, a bounded time to send a request head, bodies of at most
//! [`MAX_BODY_BYTES`], and the admin token (when the config asks for one) on every reload.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::state::{ReloadRecord, State};
use crate::status_page::{self, BudgetStatus, CoalesceStatus, RouteStatus, StatusSnapshot};

type Body = Full<Bytes>;

/// The largest request body the admin listener reads. No endpoint needs one (`POST /-/reload`
/// ignores its body); a few KiB leave room for clients that send a small JSON object anyway.
pub const MAX_BODY_BYTES: usize = 4096;

/// Admin connections open at once. Prometheus, the kubelet's probes and a person with curl use
/// a handful; 64 leave room for several scrapers and probes while bounding what a flood of
/// connections can take (a task and read buffers each).
pub const MAX_CONNECTIONS: usize = 64;

/// How long a client may take to send a request head, and the body of a reload. A probe or a
/// scrape sends its head in one packet; 10 s is generous for a slow network and short enough
/// that a client trickling bytes cannot hold one of the [`MAX_CONNECTIONS`] for long. hyper
/// runs this timer while it waits for a head, so an idle keep-alive connection is closed after
/// it too (Prometheus, scraping every 15 s, simply opens a new one).
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one log line per this long about refused connections: a flood must not flood the log.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The admin listener's bounds; [`AdminLimits::default`] is what `shiftgate run` uses, tests
/// shorten them.
#[derive(Debug, Clone, Copy)]
pub struct AdminLimits {
    /// Connections open at once; past it a new connection is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Time to send a request head (and a reload's body), see [`READ_TIMEOUT`].
    pub read_timeout: Duration,
}

impl Default for AdminLimits {
    fn default() -> AdminLimits {
        AdminLimits {
            max_connections: MAX_CONNECTIONS,
            read_timeout: READ_TIMEOUT,
        }
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves, with the default limits.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    serve_with(listener, state, AdminLimits::default(), shutdown).await
}

/// Serves the admin endpoints on `listener` until `shutdown` resolves.
pub async fn serve_with(
    listener: TcpListener,
    state: Arc<State>,
    limits: AdminLimits,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut refused = Refused::default();
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Accepted and closed at once rather than left in the backlog: the client learns now,
        // and the connections already open (a probe among them) keep being served.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            drop(stream);
            refused.count(limits.max_connections);
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state, limits.read_timeout).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.read_timeout)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            drop(slot);
        });
    }
}

/// Connections refused since the last log line about them.
#[derive(Default)]
struct Refused {
    since_logged: u64,
    logged_at: Option<Instant>,
}

impl Refused {
    fn count(&mut self, max: usize) {
        self.since_logged += 1;
        if self
            .logged_at
            .is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL)
        {
            tracing::warn!(
                refused = self.since_logged,
                "admin listener: {max} connections open, closing new ones"
            );
            self.since_logged = 0;
            self.logged_at = Some(Instant::now());
        }
    }
}

/// Binds the admin address (port 0 allowed).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

fn text(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", content_type)
        .body(Full::new(body.into()))
        .expect("valid response")
}

/// An answer after which the connection is closed: the rest of the request is not read.
fn closing(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = text(status, "text/plain", body);
    r.headers_mut().insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("close"),
    );
    r
}

fn too_large() -> Response<Body> {
    closing(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the admin endpoints take bodies of at most {MAX_BODY_BYTES} bytes\n"),
    )
}

async fn handle(
    req: Request<Incoming>,
    state: &Arc<State>,
    read_timeout: Duration,
) -> Response<Body> {
    // Refused before anything is read. A body sent without a length (chunked) is bounded
    // where it is read, in `reload`; no other endpoint reads one.
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => text(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") => {
            if state.is_draining() {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
            } else {
                text(StatusCode::OK, "text/plain", "ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            refresh_gauges(state);
            text(
                StatusCode::OK,
                &state.metrics().content_type(),
                state.metrics().encode(),
            )
        }
        (&Method::GET, "/status") => text(
            StatusCode::OK,
            "text/html; charset=utf-8",
            status_page::render_html(&snapshot(state)),
        ),
        (&Method::GET, "/status.json") => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&snapshot(state)).expect("serializable"),
        ),
        (&Method::POST, "/-/reload") => reload(req, state, read_timeout).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/status" | "/status.json" | "/-/reload") => {
            text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

async fn reload(
    req: Request<Incoming>,
    state: &Arc<State>,
    read_timeout: Duration,
) -> Response<Body> {
    // Validation guarantees that a config naming admin_token_env carries its token: there is
    // no "variable unset, so no check" case here.
    if let Some(token) = &state.config().admin_token {
        let given = req
            .headers()
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| token.matches(g.as_bytes())) {
            return text(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                "a valid admin token is required: Authorization: Bearer <token>\n",
            );
        }
    }
    // The body is not used; read it (at most MAX_BODY_BYTES, in bounded time) so the
    // connection stays usable.
    let body = Limited::new(req.into_body(), MAX_BODY_BYTES).collect();
    match tokio::time::timeout(read_timeout, body).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
        Ok(Err(e)) => {
            return closing(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}\n"),
            )
        }
        Err(_) => {
            return closing(
                StatusCode::REQUEST_TIMEOUT,
                format!("the request body did not arrive within {read_timeout:?}\n"),
            )
        }
    }
    let state2 = state.clone();
    let result =
        tokio::task::spawn_blocking(move || crate::reload::reload(&state2, "POST /-/reload")).await;
    match result {
        Ok(Ok(r)) => {
            let mut body = format!("reloaded: {}\n", r.summary);
            if !r.restart_needed.is_empty() {
                body.push_str(&format!(
                    "needs a restart to take effect: {}\n",
                    r.restart_needed.join(", ")
                ));
            }
            text(StatusCode::OK, "text/plain", body)
        }
        Ok(Err(errors)) => text(
            StatusCode::BAD_REQUEST,
            "text/plain",
            format!("config not reloaded, the old one stays in force:\n{errors}\n"),
        ),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("reload failed: {e}\n"),
        ),
    }
}

fn refresh_gauges(state: &State) {
    state.refresh_rates();
}

/// The state of the proxy as people see it.
pub fn snapshot(state: &State) -> StatusSnapshot {
    let cfg = state.config();
    let m = state.metrics();
    let views = state.pacer().view();
    let counter = |v: &prometheus::IntCounterVec, route: &str| -> u64 {
        // Sum over the second label of a (route, x) counter.
        use prometheus::core::Collector;
        v.collect()
            .iter()
            .flat_map(|mf| mf.get_metric().iter())
            .filter(|m| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == "route" && l.value() == route)
            })
            .map(|m| m.get_counter().value() as u64)
            .sum()
    };
    let routes = cfg
        .routes
        .iter()
        .map(|r| RouteStatus {
            name: r.name.clone(),
            method: r.method.as_ref().map(|m| m.to_string()),
            path: r.path.to_string(),
            upstream: cfg.upstreams[r.upstream].name.clone(),
            budgets: r
                .budgets
                .iter()
                .map(|&i| cfg.budgets[i].name.clone())
                .collect(),
            priority: r.priority.to_string(),
            max_wait_seconds: r.max_wait.as_secs_f64(),
            queue_depth: m
                .queue_depth
                .with_label_values(&[r.name.as_str()])
                .get()
                .max(0) as u64,
            inflight: m
                .inflight_requests
                .with_label_values(&[r.name.as_str()])
                .get()
                .max(0) as u64,
            requests_total: counter(&m.requests_total, &r.name),
            rejections_total: counter(&m.rejections_total, &r.name),
            coalesce: r.coalesce.map(|c| CoalesceStatus {
                into: cfg.routes[c.into].name.clone(),
                window_seconds: c.window.as_secs_f64(),
                max_batch: c.max_batch,
                coalesced_total: m
                    .coalesced_requests_total
                    .with_label_values(&[r.name.as_str()])
                    .get(),
                batches_total: m
                    .batch_size
                    .with_label_values(&[r.name.as_str()])
                    .get_sample_count(),
            }),
        })
        .collect::<Vec<_>>();
    let budgets = cfg
        .budgets
        .iter()
        .map(|b| {
            let v = views.iter().find(|v| v.name == b.name);
            BudgetStatus {
                name: b.name.clone(),
                per: b.per.to_string(),
                burst: b.burst,
                configured_rate: b.rate.per_second,
                rate_in_force: v.map_or(b.rate.per_second, |v| v.rate_in_force),
                keys: v.map_or(0, |v| v.keys as u64),
                paused_for_seconds: v.map_or(0.0, |v| v.paused_for.as_secs_f64()),
                waiting: v.map_or(0, |v| v.waiting as u64),
                throttles_total: m
                    .budget_throttles_total
                    .with_label_values(&[b.name.as_str()])
                    .get(),
            }
        })
        .collect();
    // Before the first reload, the config in force is the one loaded (successfully) at start.
    let last = state.last_reload().or_else(|| {
        Some(ReloadRecord {
            at: SystemTime::now().checked_sub(state.uptime())?,
            ok: true,
            error: None,
        })
    });
    let inflight: u64 = routes.iter().map(|r| r.inflight).sum();
    StatusSnapshot {
        version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_seconds: state.uptime().as_secs(),
        draining: state.is_draining(),
        config_path: state.config_path().display().to_string(),
        last_reload_unix: last
            .as_ref()
            .and_then(|r| r.at.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs()),
        last_reload_ok: last.as_ref().map(|r| r.ok),
        last_reload_error: last.and_then(|r| r.error),
        queue_depth: state.pacer().depth() as u64,
        queue_max_depth: cfg.queue.max_depth as u64,
        inflight,
        routes,
        budgets,
        recent_throttles: state.recent_throttles().into_iter().rev().collect(),
    }
}
