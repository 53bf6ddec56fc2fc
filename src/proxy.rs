//! The Pingora `ProxyHttp` implementation: the only module that knows `Session`. Each hook
//! translates between the session and the plain types of `route`, `pacer` and `retry`.
//!
//! One request, in hook order:
//! - `request_filter`: route, body size, read a small body up front (it is replayed from
//!   Pingora's retry buffer and lets us notice a client that leaves), admission.
//! - `upstream_peer` (once per attempt): wait for the slots (or a retry's pause), raced against
//!   the client leaving; then the peer, from addresses resolved off the blocking path.
//! - `upstream_request_filter`: path rewrite, Host, hop-by-hop headers.
//! - `upstream_response_filter`: a 429 pauses the budgets; a retryable status becomes a
//!   retryable error (nothing has reached the client yet), unless the policy gives up.
//! - `error_while_proxy` / `fail_to_connect`: the same policy for transport failures.
//! - `fail_to_proxy`: the contract's JSON answers. `logging`: metrics and the access line.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};
use sha2::{Digest, Sha256};

use crate::answers::{Answer, Reason};
use crate::config::{Config, Per, RouteSpec};
use crate::pacer::{secs_f64, BucketKey, Demand, Rejection, Ticket};
use crate::retry::{self, Attempt, Outcome, Verdict};
use crate::route::{find_route, upstream_path};
use crate::shared::Shared;
use crate::status_page::ThrottleEvent;

/// Pingora's retry buffer holds this much of a request body; larger bodies cannot be replayed.
pub const REPLAY_BUFFER_BYTES: usize = 64 * 1024;

/// Label for requests that matched no route.
pub const NO_ROUTE_LABEL: &str = "none";

pub struct Proxy {
    pub shared: Arc<Shared>,
}

/// Per-request state.
pub struct Ctx {
    arrived: Instant,
    config: Option<Arc<Config>>,
    route: Option<usize>,
    buckets: Vec<BucketKey>,
    ticket: Option<Ticket>,
    /// The route's queue-depth gauge is raised for this request.
    queued: bool,
    /// An attempt is in flight (the in-flight gauge is raised).
    inflight: bool,
    waited: Duration,
    attempts: u32,
    attempt_started: Option<Instant>,
    sent_at: Option<tokio::time::Instant>,
    /// When this attempt's slots were granted (paced routes), until it is reported sent.
    granted_at: Option<tokio::time::Instant>,
    /// When this attempt's slots were granted.
    grant_time: Option<tokio::time::Instant>,
    upstream_time: Duration,
    /// Set when the last attempt is to be retried: how long to wait first and whether the
    /// budgets' pause already covers that wait.
    pending_retry: Option<PendingRetry>,
    /// Our own answer's reason, when the proxy answered.
    reason: Option<Reason>,
    body_bytes: usize,
    body_read_up_front: bool,
    client_gone: bool,
    counted: bool,
}

#[derive(Debug, Clone, Copy)]
struct PendingRetry {
    delay: Duration,
    paced: bool,
}

impl Ctx {
    fn route<'a>(&self, cfg: &'a Config) -> Option<&'a RouteSpec> {
        self.route.map(|i| &cfg.routes[i])
    }
}

impl Proxy {
    fn route_label(&self, ctx: &Ctx) -> String {
        match (&ctx.config, ctx.route) {
            (Some(cfg), Some(i)) => cfg.routes[i].name.clone(),
            _ => NO_ROUTE_LABEL.to_string(),
        }
    }

    /// Writes one of the proxy's own answers and counts it.
    async fn answer(&self, session: &mut Session, ctx: &mut Ctx, answer: Answer) {
        let route = self.route_label(ctx);
        self.shared
            .metrics
            .rejections_total
            .with_label_values(&[route.as_str(), answer.reason.label()])
            .inc();
        ctx.reason = Some(answer.reason);
        let body = answer.body();
        let mut resp = match ResponseHeader::build(answer.reason.status(), Some(8)) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "cannot build an answer");
                return;
            }
        };
        let _ = resp.insert_header("Content-Type", "application/json");
        let _ = resp.insert_header("Content-Length", body.len().to_string());
        for (name, value) in answer.headers() {
            let _ = resp.insert_header(name, value);
        }
        add_shiftgate_headers(&mut resp, ctx);
        // A body we did not read would be taken for the next request on this connection.
        if !session.is_body_done() || !self.shared.keep_alive() {
            session.set_keepalive(None);
        }
        if let Err(e) = session.write_response_header(Box::new(resp), false).await {
            tracing::debug!(error = %e, "client left before the answer");
            return;
        }
        if let Err(e) = session
            .write_response_body(Some(Bytes::from(body)), true)
            .await
        {
            tracing::debug!(error = %e, "client left during the answer");
        }
    }

    /// The buckets a request of `route` is charged to.
    fn buckets(&self, session: &Session, cfg: &Config, route: &RouteSpec) -> Vec<BucketKey> {
        route
            .budgets
            .iter()
            .map(|&i| {
                let b = &cfg.budgets[i];
                let key = match &b.per {
                    Per::Global => None,
                    Per::Token => Some(key_hash(
                        session
                            .req_header()
                            .headers
                            .get(http::header::AUTHORIZATION)
                            .map(|v| v.as_bytes())
                            .unwrap_or_default(),
                    )),
                    Per::ClientIp => {
                        let ip = session
                            .client_addr()
                            .and_then(|a| a.as_inet())
                            .map(|a| a.ip().to_string())
                            .unwrap_or_default();
                        Some(key_hash(ip.as_bytes()))
                    }
                    Per::Header(h) => Some(key_hash(
                        session
                            .req_header()
                            .headers
                            .get(h.as_str())
                            .map(|v| v.as_bytes())
                            .unwrap_or_default(),
                    )),
                };
                self.shared.pacer.bucket_key(&b.name, key)
            })
            .collect()
    }

    /// Waits for `fut`, unless the client goes away first (then `None`). Only possible once the
    /// request body has been read: before that, watching the socket would eat the body.
    async fn unless_client_leaves<F: std::future::Future>(
        session: &mut Session,
        fut: F,
    ) -> Option<F::Output> {
        if session.is_body_done() {
            tokio::select! {
                r = fut => Some(r),
                _ = session.as_downstream_mut().read_body_or_idle(true) => None,
            }
        } else {
            Some(fut.await)
        }
    }

    fn client_left(&self, ctx: &mut Ctx) -> Box<Error> {
        ctx.client_gone = true;
        ctx.ticket = None;
        self.leave_queue(ctx);
        self.shared
            .metrics
            .client_disconnects_total
            .with_label_values(&[self.route_label(ctx).as_str()])
            .inc();
        Error::explain(ErrorType::ConnectionClosed, "client left while waiting")
    }

    fn enter_queue(&self, ctx: &mut Ctx, ticket: Ticket, route: &str) {
        ctx.ticket = Some(ticket);
        ctx.queued = true;
        self.shared
            .metrics
            .queue_depth
            .with_label_values(&[route])
            .inc();
    }

    fn leave_queue(&self, ctx: &mut Ctx) {
        if ctx.queued {
            ctx.queued = false;
            self.shared
                .metrics
                .queue_depth
                .with_label_values(&[self.route_label(ctx).as_str()])
                .dec();
        }
    }

    fn end_attempt(&self, ctx: &mut Ctx) {
        if ctx.inflight {
            ctx.inflight = false;
            let route = self.route_label(ctx);
            self.shared
                .metrics
                .inflight_requests
                .with_label_values(&[route.as_str()])
                .dec();
            if let Some(start) = ctx.attempt_started.take() {
                let d = start.elapsed();
                ctx.upstream_time += d;
                self.shared
                    .metrics
                    .upstream_duration_seconds
                    .with_label_values(&[route.as_str()])
                    .observe(secs_f64(d));
            }
        }
    }

    /// Applies the retry policy to an attempt's outcome. On `Retry` the next `upstream_peer`
    /// does the wait.
    fn judge(&self, session: &Session, ctx: &mut Ctx, outcome: Outcome) -> Verdict {
        let Some(cfg) = ctx.config.clone() else {
            return Verdict::Done;
        };
        let method = &session.req_header().method;
        let verdict = retry::decide(
            &cfg.retry,
            &Attempt {
                outcome,
                made: ctx.attempts,
                elapsed: ctx.arrived.elapsed(),
                idempotent: is_idempotent(method),
                replayable: !session.as_downstream().retry_buffer_truncated(),
                jitter: rand::random::<f64>(),
            },
        );
        if let Verdict::Retry { delay, reason } = verdict {
            let paced = matches!(outcome, Outcome::Status(429, _)) && !ctx.buckets.is_empty();
            ctx.pending_retry = Some(PendingRetry { delay, paced });
            self.shared
                .metrics
                .retries_total
                .with_label_values(&[self.route_label(ctx).as_str(), reason])
                .inc();
        }
        if let Verdict::GiveUp(why) = verdict {
            tracing::info!(route = %self.route_label(ctx), attempts = ctx.attempts, "not retrying: {why}");
        }
        verdict
    }

    /// An upstream 429: pause and slow the budgets it was charged to, log and count it once.
    fn throttled(&self, ctx: &Ctx, retry_after: Option<Duration>) {
        let route = self.route_label(ctx);
        let pause = retry_after.unwrap_or(Duration::from_secs(1));
        let granted_at = ctx
            .grant_time
            .or(ctx.sent_at)
            .unwrap_or_else(tokio::time::Instant::now);
        let lowered = self
            .shared
            .pacer
            .throttle(&ctx.buckets, retry_after, pause, granted_at);
        let mut names: Vec<&str> = ctx.buckets.iter().map(|b| &*b.budget).collect();
        names.dedup();
        for name in &names {
            self.shared
                .metrics
                .budget_throttles_total
                .with_label_values(&[name])
                .inc();
            self.shared.record_throttle(ThrottleEvent {
                unix_time: unix_now(),
                budget: name.to_string(),
                route: route.clone(),
                retry_after_seconds: retry_after.map_or(0, |d| d.as_secs()),
            });
        }
        self.shared.refresh_rates();
        tracing::warn!(
            route = %route,
            budgets = ?names,
            lowered = ?lowered,
            retry_after_s = retry_after.map(|d| d.as_secs_f64()),
            "upstream throttled (429): budgets paused"
        );
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A bucket key from a secret such as a bearer token: SHA-256, truncated. Only the hash is kept;
/// it is the same on every replica (cluster mode shares buckets by it).
pub fn key_hash(value: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(value);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn is_idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
    )
}

fn add_shiftgate_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    let _ = resp.insert_header("X-Shiftgate-Wait-Ms", ctx.waited.as_millis().to_string());
    let _ = resp.insert_header("X-Shiftgate-Attempts", ctx.attempts.to_string());
}

/// Request headers that belong to one connection, never forwarded.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "upgrade",
];

/// Our own marker error for "retry this attempt".
fn retry_error(status: u16) -> Box<Error> {
    let mut e = Error::explain(
        ErrorType::HTTPStatus(status),
        "retrying a retryable upstream answer",
    );
    e.set_retry(true);
    e
}

#[async_trait]
impl ProxyHttp for Proxy {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        self.shared.active.fetch_add(1, Ordering::SeqCst);
        Ctx {
            arrived: Instant::now(),
            config: None,
            route: None,
            buckets: Vec::new(),
            ticket: None,
            queued: false,
            inflight: false,
            waited: Duration::ZERO,
            attempts: 0,
            attempt_started: None,
            sent_at: None,
            granted_at: None,
            grant_time: None,
            upstream_time: Duration::ZERO,
            pending_retry: None,
            reason: None,
            body_bytes: 0,
            body_read_up_front: false,
            client_gone: false,
            counted: false,
        }
    }

    /// Phase 1 (default: nothing): route, size, admission. `Ok(true)` means answered here.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        let cfg = self.shared.config.load_full();
        ctx.config = Some(cfg.clone());
        if self.shared.is_draining() {
            let a = Answer::new(
                Reason::ShuttingDown,
                "shiftgate is shutting down; try again",
            )
            .retry_after(Duration::from_secs(1));
            self.answer(session, ctx, a).await;
            return Ok(true);
        }
        let req = session.req_header();
        let Some(route_index) = find_route(&cfg.routes, &req.method, req.uri.path()) else {
            let msg = format!("no route for {} {}", req.method, req.uri.path());
            self.answer(session, ctx, Answer::new(Reason::NoRoute, msg))
                .await;
            return Ok(true);
        };
        ctx.route = Some(route_index);
        let route = &cfg.routes[route_index];

        let max = cfg.limits.max_body_bytes;
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        if declared.is_some_and(|n| n > max) {
            let msg = format!("the request body exceeds {max} bytes");
            self.answer(session, ctx, Answer::new(Reason::BodyTooLarge, msg))
                .await;
            return Ok(true);
        }
        // Read a body that fits the replay buffer now: Pingora replays it on every attempt,
        // and with the body read we can watch the connection for a client that leaves.
        session.as_downstream_mut().enable_retry_buffering();
        if declared.is_some_and(|n| n > 0 && n <= REPLAY_BUFFER_BYTES) {
            while let Some(chunk) = session.as_downstream_mut().read_request_body().await? {
                ctx.body_bytes += chunk.len();
            }
            ctx.body_read_up_front = true;
        }

        ctx.buckets = self.buckets(session, &cfg, route);
        if ctx.buckets.is_empty() {
            return Ok(false);
        }
        let demand = Demand {
            buckets: ctx.buckets.clone(),
            priority: route.priority,
            max_wait: route.max_wait,
            retry: false,
            not_after: None,
        };
        match self.shared.pacer.admit(demand) {
            Ok(ticket) => {
                self.enter_queue(ctx, ticket, &route.name);
                Ok(false)
            }
            Err(rejection) => {
                let (reason, msg) = match rejection {
                    Rejection::TooLong { wait } => (
                        Reason::QueueWait,
                        format!(
                            "route {} is saturated: a slot would start in {:.1} s, more than the {} s allowed",
                            route.name,
                            wait.as_secs_f64(),
                            route.max_wait.as_secs_f64()
                        ),
                    ),
                    Rejection::Full { depth, .. } => (
                        Reason::QueueFull,
                        format!("{depth} requests are waiting already; try again later"),
                    ),
                };
                let a = Answer::new(reason, msg).retry_after(rejection.retry_after());
                self.answer(session, ctx, a).await;
                Ok(true)
            }
        }
    }

    /// Counts the body while it streams (bodies not read up front) against the limit.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.body_read_up_front || ctx.attempts > 1 {
            return Ok(());
        }
        if let Some(b) = body {
            ctx.body_bytes += b.len();
            let max = ctx
                .config
                .as_ref()
                .map_or(usize::MAX, |c| c.limits.max_body_bytes);
            if ctx.body_bytes > max {
                ctx.reason = Some(Reason::BodyTooLarge);
                return Error::e_explain(ErrorType::HTTPStatus(413), "request body too large");
            }
        }
        Ok(())
    }

    /// Once per attempt: the wait for slots (or for a retry), then where to send it.
    async fn upstream_peer(&self, session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let cfg = ctx.config.clone().expect("set in request_filter");
        let route = ctx.route(&cfg).expect("routed in request_filter");

        if let Some(retry) = ctx.pending_retry.take() {
            let started = Instant::now();
            if !retry.paced {
                let sleep = tokio::time::sleep(retry.delay);
                if Self::unless_client_leaves(session, sleep).await.is_none() {
                    return Err(self.client_left(ctx));
                }
            }
            if !ctx.buckets.is_empty() {
                let not_after = tokio::time::Instant::from_std(ctx.arrived + cfg.retry.max_elapsed);
                let demand = Demand {
                    buckets: ctx.buckets.clone(),
                    priority: route.priority,
                    max_wait: cfg.retry.max_elapsed,
                    retry: true,
                    not_after: Some(not_after),
                };
                match self.shared.pacer.admit(demand) {
                    Ok(t) => self.enter_queue(ctx, t, &route.name),
                    Err(e) => {
                        return Error::e_explain(
                            ErrorType::InternalError,
                            format!("retry not admitted: {e}"),
                        )
                    }
                }
            }
            // The time a retry waits is not queue wait; it is part of the upstream's answer.
            ctx.upstream_time += started.elapsed();
        }

        if let Some(mut ticket) = ctx.ticket.take() {
            let waited = Self::unless_client_leaves(session, ticket.granted()).await;
            self.leave_queue(ctx);
            match waited {
                None => {
                    drop(ticket);
                    return Err(self.client_left(ctx));
                }
                Some(Err(_closed)) => {
                    // Dropped from the queue: shutdown past its drain, or a retry past its
                    // deadline.
                    let reason = if self.shared.is_draining() {
                        Reason::ShuttingDown
                    } else {
                        Reason::UpstreamTimeout
                    };
                    ctx.reason = Some(reason);
                    return Error::e_explain(
                        ErrorType::HTTPStatus(reason.status()),
                        "left the queue without a slot",
                    );
                }
                Some(Ok(grant)) => {
                    if ctx.attempts == 0 {
                        ctx.waited = grant.waited;
                        self.shared
                            .metrics
                            .queue_wait_seconds
                            .with_label_values(&[route.name.as_str()])
                            .observe(secs_f64(grant.waited));
                    }
                    ctx.sent_at = Some(grant.at);
                    ctx.granted_at = Some(grant.at);
                    ctx.grant_time = Some(grant.at);
                    grant.commit();
                }
            }
        } else if ctx.attempts == 0 && !ctx.buckets.is_empty() {
            // unreachable by construction: a paced route always holds a ticket here
            return Error::e_explain(ErrorType::InternalError, "paced request without a ticket");
        }
        if ctx.sent_at.is_none() || ctx.buckets.is_empty() {
            ctx.sent_at = Some(tokio::time::Instant::now());
        }
        if ctx.attempts == 0 && ctx.buckets.is_empty() {
            self.shared
                .metrics
                .queue_wait_seconds
                .with_label_values(&[route.name.as_str()])
                .observe(0.0);
        }

        let upstream = &cfg.upstreams[route.upstream];
        let addrs = match self
            .shared
            .resolver
            .resolve(&upstream.host, upstream.port)
            .await
        {
            Ok(a) => a,
            Err(e) => {
                tracing::error!(upstream = %upstream.name, error = %e, "upstream address unknown");
                ctx.reason = Some(Reason::UpstreamUnreachable);
                return Error::e_explain(ErrorType::ConnectError, e.to_string());
            }
        };
        // Spread attempts over the addresses; a retry after a failed connect takes the next.
        let addr = addrs[(ctx.attempts as usize) % addrs.len()];
        ctx.attempts += 1;
        ctx.attempt_started = Some(Instant::now());
        ctx.inflight = true;
        self.shared
            .metrics
            .inflight_requests
            .with_label_values(&[route.name.as_str()])
            .inc();

        let sni = if upstream.tls {
            upstream.host.clone()
        } else {
            String::new()
        };
        let mut peer = HttpPeer::new(addr, upstream.tls, sni);
        let opts = &mut peer.options;
        opts.connection_timeout = Some(cfg.limits.connect_timeout);
        opts.total_connection_timeout = Some(cfg.limits.connect_timeout * 2);
        opts.read_timeout = Some(cfg.limits.upstream_timeout);
        opts.write_timeout = Some(cfg.limits.upstream_timeout);
        // Below common upstream keep-alive timeouts, so a pooled connection is not stale.
        opts.idle_timeout = Some(Duration::from_secs(50));
        Ok(Box::new(peer))
    }

    /// The request leaves now (default: nothing): tell the pacer when, so a late departure
    /// moves the schedule instead of squeezing the next requests closer.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let now = tokio::time::Instant::now();
        if let Some(granted) = ctx.granted_at.take() {
            self.shared.pacer.sent(&ctx.buckets, granted, now);
        }
        ctx.sent_at = Some(now);
        Ok(())
    }

    /// Path rewrite, Host, and connection-level headers (default: forward as received).
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let cfg = ctx.config.clone().expect("set in request_filter");
        let route = ctx.route(&cfg).expect("routed");
        let upstream = &cfg.upstreams[route.upstream];
        let target = session
            .req_header()
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str());
        let path = upstream_path(target, route.strip_prefix.as_deref(), &upstream.base_path);
        let uri: http::Uri = path
            .parse()
            .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "rewritten path", e))?;
        // Origin-form only: whatever the client's target said, only the configured upstream is
        // ever reached.
        upstream_request.set_uri(uri);
        // Headers named in Connection are hop-by-hop too.
        let named: Vec<String> = upstream_request
            .headers
            .get_all(http::header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
            .filter(|s| !s.is_empty())
            .collect();
        for h in HOP_BY_HOP
            .iter()
            .copied()
            .chain(named.iter().map(String::as_str))
        {
            upstream_request.remove_header(h);
        }
        upstream_request.insert_header("Host", upstream.host_header())?;
        Ok(())
    }

    /// Decides on retryable answers before anything reaches the client (default: pass).
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let status = upstream_response.status.as_u16();
        if upstream_response.status.is_informational() {
            return Ok(());
        }
        self.end_attempt(ctx);
        let route = self.route_label(ctx);
        self.shared
            .metrics
            .upstream_responses_total
            .with_label_values(&[route.as_str(), status.to_string().as_str()])
            .inc();
        if !matches!(status, 429 | 502 | 503 | 504) {
            return Ok(());
        }
        let retry_after = upstream_response
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
        if status == 429 && !ctx.buckets.is_empty() {
            self.throttled(ctx, retry_after);
        }
        match self.judge(session, ctx, Outcome::Status(status, retry_after)) {
            Verdict::Retry { .. } => Err(retry_error(status)),
            _ => Ok(()),
        }
    }

    /// Adds the wait and attempt counts to every proxied answer (default: nothing).
    async fn response_filter(
        &self,
        session: &mut Session,
        upstream_response: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // Stopping: tell the client to reconnect (to the new process, after an upgrade)
        // between requests rather than have an idle keep-alive connection cut under it.
        if !self.shared.keep_alive() {
            session.set_keepalive(None);
        }
        add_shiftgate_headers(upstream_response, ctx);
        Ok(())
    }

    /// Errors after connecting. Default: no retry for non-idempotent methods. Ours: our own
    /// retry marker retries whatever the method (the policy already decided); other failures go
    /// through the policy.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut Ctx,
        _client_reused: bool,
    ) -> Box<Error> {
        let mut e = e.more_context(format!("Peer: {peer}"));
        if ctx.pending_retry.is_some() {
            let whole = !session.as_downstream().retry_buffer_truncated();
            e.set_retry(whole);
            if !whole {
                ctx.pending_retry = None;
            }
            return e;
        }
        self.end_attempt(ctx);
        if e.esource() != &ErrorSource::Upstream || session.response_written().is_some() {
            e.set_retry(false);
            return e;
        }
        let outcome = match e.etype() {
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Outcome::TimedOut,
            // the upstream closed or reset without an answer: it may have acted on it
            _ => Outcome::Status(502, None),
        };
        let retry = matches!(self.judge(session, ctx, outcome), Verdict::Retry { .. });
        e.set_retry(retry);
        e
    }

    /// A connection could not be made: nothing was sent, so it is always retried while the
    /// policy's limits allow.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        self.end_attempt(ctx);
        let retry = matches!(
            self.judge(session, ctx, Outcome::ConnectFailed),
            Verdict::Retry { .. }
        );
        e.set_retry(retry);
        if !retry {
            ctx.reason = Some(Reason::UpstreamUnreachable);
        }
        e
    }

    /// The final error: our JSON answer (default: a bare status page).
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        self.end_attempt(ctx);
        self.leave_queue(ctx);
        let reason = ctx.reason.or(match e.etype() {
            ErrorType::HTTPStatus(413) => Some(Reason::BodyTooLarge),
            ErrorType::ReadTimedout | ErrorType::WriteTimedout => Some(Reason::UpstreamTimeout),
            ErrorType::ConnectTimedout
            | ErrorType::ConnectRefused
            | ErrorType::ConnectNoRoute
            | ErrorType::ConnectError
            | ErrorType::ConnectProxyFailure
            | ErrorType::TLSHandshakeFailure
            | ErrorType::TLSHandshakeTimedout
            | ErrorType::InvalidCert
            | ErrorType::HandshakeError => Some(Reason::UpstreamUnreachable),
            _ if e.esource() == &ErrorSource::Upstream => Some(Reason::UpstreamUnreachable),
            _ => None,
        });
        let can_write = !ctx.client_gone && session.response_written().is_none();
        // The connection is not reused after a failure: say so in the answer.
        session.set_keepalive(None);
        let code = match reason {
            Some(reason) if can_write => {
                let msg = match reason {
                    Reason::UpstreamTimeout => "the upstream did not answer in time".to_string(),
                    Reason::UpstreamUnreachable => {
                        format!("the upstream could not be reached: {}", e.etype().as_str())
                    }
                    Reason::ShuttingDown => "shiftgate is shutting down; try again".to_string(),
                    Reason::BodyTooLarge => "the request body is too large".to_string(),
                    _ => e.to_string(),
                };
                let mut a = Answer::new(reason, msg);
                if reason == Reason::ShuttingDown {
                    a = a.retry_after(Duration::from_secs(1));
                }
                self.answer(session, ctx, a).await;
                reason.status()
            }
            _ if can_write && e.esource() != &ErrorSource::Downstream => {
                let _ = session.respond_error(500).await;
                500
            }
            _ => 0,
        };
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Metrics and the access line (default: nothing).
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if ctx.counted {
            return;
        }
        ctx.counted = true;
        self.shared.active.fetch_sub(1, Ordering::SeqCst);
        self.end_attempt(ctx);
        self.leave_queue(ctx);
        let route = self.route_label(ctx);
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let m = &self.shared.metrics;
        if status > 0 && !ctx.client_gone {
            m.requests_total
                .with_label_values(&[route.as_str(), status.to_string().as_str()])
                .inc();
            m.request_duration_seconds
                .with_label_values(&[route.as_str()])
                .observe(secs_f64(ctx.arrived.elapsed()));
        } else if !ctx.client_gone && ctx.route.is_some() {
            // Pingora saw the client go during the answer.
            m.client_disconnects_total
                .with_label_values(&[route.as_str()])
                .inc();
        }
        let correlation = session
            .response_written()
            .and_then(|r| r.headers.get("inin-correlation-id"))
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string();
        let req = session.req_header();
        tracing::info!(
            target: "shiftgate::access",
            route = %route,
            method = %req.method,
            path = %req.uri.path(),
            status,
            wait_ms = ctx.waited.as_millis() as u64,
            attempts = ctx.attempts,
            upstream_ms = ctx.upstream_time.as_millis() as u64,
            correlation_id = %correlation,
            error = e.map(|e| e.etype().as_str()),
            "request"
        );
    }

    /// Retries are counted and logged by the policy; Pingora's own warning would repeat them.
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        ctx: &Ctx,
        _error: &Error,
        _context: pingora::proxy::ProxyWarnLogContext,
    ) -> bool {
        ctx.pending_retry.is_some()
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _error: &Error) -> bool {
        // Our own answers and clients that left are logged once, on the access line.
        ctx.reason.is_some() || ctx.client_gone
    }
}
