//! The Pingora `ProxyHttp` implementation: the only module that knows `Session`. Each hook
//! translates between the session and the plain types of `route`, `pacer` and `retry`.
//!
//! One request, in hook order:
//! - `request_filter`: the path normalised, route, body size, read a small body up front (it
//!   is replayed from Pingora's retry buffer and lets us notice a client that leaves), admission.
//! - `upstream_peer` (once per attempt): wait for the slots (or a retry's pause), raced against
//!   the client leaving; then the peer, from addresses resolved off the blocking path.
//! - `upstream_request_filter`: path rewrite (of the normalised path), Host, hop-by-hop headers.
//! - `upstream_response_filter`: a 429 pauses the budgets; a retryable status becomes a
//!   retryable error (nothing has reached the client yet), unless the policy gives up.
//! - `error_while_proxy` / `fail_to_connect`: the same policy for transport failures.
//! - `fail_to_proxy`: the contract's JSON answers. `logging`: metrics and the access line.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::access;
use crate::admission::{bucket_keys, Admitted};
use crate::bulk::{self, Busy, Coalescer, Update};
use crate::config::{Config, RouteSpec};
use crate::digest::token_key;
use crate::edge::Deadlined;
use crate::hygiene::check_head;
use crate::local_response::{LocalResponse, Reason, SHUTTING_DOWN};
use crate::metrics::{GaugeGuard, RouteMetrics, NO_ROUTE_LABEL};
use crate::pacer::{BucketKey, Closed, Demand, Grant, Ticket};
use crate::retry::{self, Attempt, GiveUp, Outcome, Verdict};
use crate::route::{
    connection_named_headers, find_route, normalize_path, upstream_path, HOP_BY_HOP,
};
use crate::state::{ActiveRequest, State};
use crate::throttle::{self, RetryWait};

/// Pingora's retry buffer holds this much of a request body; larger bodies cannot be replayed.
pub const REPLAY_BUFFER_BYTES: usize = 64 * 1024;

pub struct Proxy {
    pub state: Arc<State>,
    /// The batches of routes with `coalesce`, per token, and their senders.
    pub coalescer: Coalescer,
}

/// Per-request state. What belongs to one upstream attempt is in `AttemptState`; the gauges
/// a request holds up are guards, given back however the request ends.
pub struct Ctx {
    arrived: Instant,
    /// Counts the request as active (the shutdown waits for it) until its access line.
    active: Option<ActiveRequest>,
    /// The config this request is served under, from its first hook on.
    config: Option<Arc<Config>>,
    route: Option<usize>,
    /// The route's per-request series, once routed.
    metrics: Option<Arc<RouteMetrics>>,
    /// The normalised path and the query as it came: what the route was matched on (the path)
    /// and what is forwarded.
    target: String,
    /// The buckets it is charged to (empty: an unpaced route).
    buckets: Vec<BucketKey>,
    /// Waiting for slots: its place in the queue and in the queue-depth gauge.
    queued: Option<Queued>,
    /// Its first attempt's slots, when it waited for them at the client edge.
    edge_outcome: Option<Result<Grant, Closed>>,
    /// The attempt in flight.
    attempt: Option<AttemptState>,
    /// Set when the last attempt is to be retried: how the next attempt waits.
    pending_retry: Option<RetryWait>,
    /// Time waited for the first attempt's slots.
    waited: Duration,
    attempts: u32,
    /// Time spent in upstream attempts and the waits between them.
    upstream_time: Duration,
    /// Our own answer's reason, when the proxy answered.
    reason: Option<Reason>,
    /// Our own answer, when a hook decided it whole (`fail_to_proxy` writes it).
    local_answer: Option<LocalResponse>,
    /// The status of our answer when it went out in place of the upstream's, which broke off
    /// before any of it was sent ([`Proxy::answer_broke_off`]).
    status_instead: Option<u16>,
    /// The most body bytes any attempt has seen so far.
    body_bytes: usize,
    /// Body bytes of the attempt in progress (a retry replays the start of the body, then the
    /// rest streams on): each attempt is held to `limits.max_body_bytes`.
    attempt_body_bytes: usize,
    body_read_up_front: bool,
    /// The request declares a body (a length over 0, or chunks).
    has_body: bool,
    client_gone: bool,
    logged: bool,
    /// A coalesced update: the size of the batch that answered it.
    batch: Option<usize>,
    /// A coalesced update's user, busy until this request ends (see [`Busy`]).
    _busy: Option<Busy>,
}

struct Queued {
    ticket: Ticket,
    _depth: GaugeGuard,
}

/// One upstream attempt, from the choice of its peer to its answer (or failure).
struct AttemptState {
    started: Instant,
    _inflight: GaugeGuard,
    /// When its slots were granted (paced routes): the pacer is told when it really left, and
    /// a 429 is measured from it.
    granted_at: Option<tokio::time::Instant>,
}

impl Ctx {
    fn route<'a>(&self, cfg: &'a Config) -> Option<&'a RouteSpec> {
        self.route.map(|i| &cfg.routes[i])
    }

    /// The route's name as a metric label (`NO_ROUTE_LABEL` before one is found).
    fn route_label(&self) -> &str {
        match (&self.config, self.route) {
            (Some(cfg), Some(i)) => &cfg.routes[i].name,
            _ => NO_ROUTE_LABEL,
        }
    }
}

impl Proxy {
    /// An answer that failed after its head was written, nearly always because the upstream
    /// cut its body. When none of it has left the client edge yet (it is gathered there until
    /// the answer is complete, `edge::WRITE_GATHER`), the client gets our `502` (or `504`) in
    /// its place; otherwise what was gathered goes out and the connection closes, so the
    /// client sees the answer cut where the upstream cut it. The status the client got (0: the
    /// cut answer).
    async fn answer_broke_off(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        reason: Option<Reason>,
        e: &Error,
    ) -> u16 {
        let mut instead = None;
        if let Some(reason) =
            reason.filter(|r| matches!(r, Reason::UpstreamUnreachable | Reason::UpstreamTimeout))
        {
            let answer = broke_off_answer(session, ctx, reason, e);
            if downstream_edge(session).is_some_and(|s| s.answer_instead(answer)) {
                instead = Some(reason);
            }
        }
        session.as_downstream_mut().shutdown().await;
        let Some(reason) = instead else {
            return 0;
        };
        self.own_answer(ctx, reason);
        ctx.status_instead = Some(reason.status());
        reason.status()
    }

    /// One of the proxy's own answers goes out for `reason`: counted, and kept for the access
    /// line.
    fn own_answer(&self, ctx: &mut Ctx, reason: Reason) {
        self.state
            .metrics()
            .rejections_total
            .with_label_values(&[ctx.route_label(), reason.label()])
            .inc();
        ctx.reason = Some(reason);
    }

    /// Writes one of the proxy's own answers and counts it.
    async fn answer(&self, session: &mut Session, ctx: &mut Ctx, answer: LocalResponse) {
        self.own_answer(ctx, answer.reason);
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
        if !session.is_body_done() || !self.state.keep_alive() {
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

    /// A presence update of a coalescing route waits for its batch's answer. `Ok(true)`: it was
    /// answered (its own entry, the bulk call's last 429, or refused on arrival); `Ok(false)`:
    /// it goes alone through its own route, as any request.
    async fn coalesce(
        &self,
        session: &mut Session,
        ctx: &mut Ctx,
        cfg: &Config,
        route: &RouteSpec,
    ) -> Result<bool> {
        let Some(body) = session.as_downstream().get_retry_buffer() else {
            return Ok(false);
        };
        let Some((user, source)) = presence_target(&ctx.target) else {
            return Ok(false);
        };
        let Some(entry) = bulk_entry(user, source, &body) else {
            return Ok(false);
        };
        let authorization = session.req_header().headers.get("authorization").cloned();
        let key = token_key(authorization.as_ref().map_or(&[][..], |v| v.as_bytes()));
        let update = Update {
            user: user.to_string(),
            entry,
            authorization,
        };
        let (rx, busy) = match self.coalescer.submit(&self.state, cfg, route, key, update) {
            Ok(queued) => queued,
            Err(rejection) => {
                let a = LocalResponse::refused(&route.name, route.max_wait, &rejection);
                self.answer(session, ctx, a).await;
                return Ok(true);
            }
        };
        ctx._busy = Some(busy);
        let waiting = self.state.metrics().waiting(&route.name);
        let outcome = Self::unless_client_leaves(session, rx).await;
        drop(waiting);
        let answered = match outcome {
            None => return Err(self.client_left(ctx)),
            Some(Ok(bulk::Outcome::Answered(a) | bulk::Outcome::Throttled(a))) => a,
            Some(Ok(bulk::Outcome::Alone) | Err(_)) => return Ok(false),
        };
        ctx.waited = answered.waited;
        ctx.attempts = answered.attempts;
        ctx.batch = Some(answered.batch);
        self.observe_queue_wait(ctx, answered.waited);
        let mut resp = ResponseHeader::build(answered.status, Some(8))?;
        if let Some(ct) = &answered.content_type {
            resp.insert_header("Content-Type", ct)?;
        }
        resp.insert_header("Content-Length", answered.body.len().to_string())?;
        if let Some(id) = &answered.correlation {
            resp.insert_header("ININ-Correlation-Id", id)?;
        }
        if let Some(after) = answered.retry_after {
            resp.insert_header("Retry-After", after.as_secs().max(1).to_string())?;
        }
        add_shiftgate_headers(&mut resp, ctx);
        if !self.state.keep_alive() {
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session
            .write_response_body(Some(answered.body), true)
            .await?;
        Ok(true)
    }

    /// Reads the whole request body now (it fits the replay buffer).
    async fn read_body_up_front(session: &mut Session, ctx: &mut Ctx) -> Result<()> {
        while let Some(chunk) = session.as_downstream_mut().read_request_body().await? {
            ctx.body_bytes += chunk.len();
        }
        ctx.body_read_up_front = true;
        Ok(())
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
        ctx.queued = None;
        self.state
            .metrics()
            .client_disconnects_total
            .with_label_values(&[ctx.route_label()])
            .inc();
        Error::explain(ErrorType::ConnectionClosed, "client left while waiting")
    }

    fn enter_queue(&self, ctx: &mut Ctx, ticket: Ticket, route: &str) {
        ctx.queued = Some(Queued {
            ticket,
            _depth: self.state.metrics().waiting(route),
        });
    }

    /// Called once routed (`ctx.metrics` is set with the route).
    fn observe_queue_wait(&self, ctx: &Ctx, waited: Duration) {
        if let Some(m) = &ctx.metrics {
            m.queue_wait.observe(waited.as_secs_f64());
        }
    }

    /// Ends the attempt in flight, if any: its upstream time is counted and observed, its
    /// in-flight gauge given back. Returns when its slots were granted.
    fn end_attempt(&self, ctx: &mut Ctx) -> Option<tokio::time::Instant> {
        let attempt = ctx.attempt.take()?;
        let d = attempt.started.elapsed();
        ctx.upstream_time += d;
        // An attempt is made only once routed.
        if let Some(m) = &ctx.metrics {
            m.upstream_duration.observe(d.as_secs_f64());
        }
        attempt.granted_at
    }

    /// Applies the retry policy to an attempt's outcome. On `Retry` the next `upstream_peer`
    /// does the wait.
    fn judge(&self, session: &Session, ctx: &mut Ctx, outcome: Outcome) -> Verdict {
        let Some(cfg) = ctx.config.clone() else {
            return Verdict::Done;
        };
        let method = &session.req_header().method;
        let mut verdict = retry::decide(
            &cfg.retry,
            &Attempt {
                outcome,
                made: ctx.attempts,
                elapsed: ctx.arrived.elapsed(),
                idempotent: retry::is_idempotent(method),
                replayable: !session.as_downstream().retry_buffer_truncated(),
                jitter: rand::random::<f64>(),
            },
        );
        if let Verdict::Retry { delay, reason } = verdict {
            let status = match outcome {
                Outcome::Status(status, _) => status,
                _ => 0,
            };
            let paced = !ctx.buckets.is_empty();
            let wait = throttle::retry_wait(status, delay, paced);
            if wait == RetryWait::Requeue && !self.requeue(ctx, &cfg) {
                verdict = Verdict::GiveUp(GiveUp::Deadline);
            } else {
                ctx.pending_retry = Some(wait);
                self.state
                    .metrics()
                    .retries_total
                    .with_label_values(&[ctx.route_label(), reason])
                    .inc();
            }
        }
        if let Verdict::GiveUp(why) = verdict {
            tracing::info!(route = %ctx.route_label(), attempts = ctx.attempts, "not retrying: {why}");
        }
        verdict
    }

    /// The request's next attempt cannot start in time (its deadline passed in the queue, or
    /// a retry's slot would come after it): `429 shiftgate.queue.wait`, with the honest
    /// `Retry-After` of a request arriving now.
    fn no_slot_in_time(&self, ctx: &mut Ctx, route: &str) -> Box<Error> {
        let wait = self.state.pacer().predicted_wait(&ctx.buckets);
        let msg = format!(
            "route {route} is saturated: no slot was free in time; one is predicted in {:.1} s",
            wait.as_secs_f64()
        );
        ctx.local_answer = Some(LocalResponse::new(Reason::QueueWait, msg).retry_after(wait));
        ctx.reason = Some(Reason::QueueWait);
        Error::explain(
            ErrorType::HTTPStatus(Reason::QueueWait.status()),
            "no slot in time",
        )
    }

    /// A 429's retry takes its place in the queue now, while the upstream's 429 can still be
    /// passed through: false when its slots cannot start before its deadline
    /// (`retry.max_elapsed` after arrival). Deciding later, after waiting, would leave nothing
    /// to answer with but a 504 of our own.
    fn requeue(&self, ctx: &mut Ctx, cfg: &Config) -> bool {
        let Some(route) = ctx.route(cfg) else {
            return false;
        };
        let deadline = ctx.arrived + cfg.retry.max_elapsed;
        let demand = Demand {
            buckets: ctx.buckets.clone(),
            priority: route.priority,
            max_wait: deadline.saturating_duration_since(Instant::now()),
            retry: true,
            not_after: Some(tokio::time::Instant::from_std(deadline)),
        };
        match self.state.pacer().admit(demand) {
            Ok(ticket) => {
                self.enter_queue(ctx, ticket, &route.name);
                true
            }
            Err(rejection) => {
                tracing::debug!(route = %route.name, "retry not queued: {rejection}");
                false
            }
        }
    }
}

fn add_shiftgate_headers(resp: &mut ResponseHeader, ctx: &Ctx) {
    for (name, n) in shiftgate_headers(ctx) {
        let _ = resp.insert_header(name, number_value(n));
    }
}

/// The `X-Shiftgate-*` headers every answer to a proxied request carries, with their values.
fn shiftgate_headers(ctx: &Ctx) -> impl Iterator<Item = (&'static str, u64)> {
    let waited = u64::try_from(ctx.waited.as_millis()).unwrap_or(u64::MAX);
    let batch = ctx.batch.map(|b| u64::try_from(b).unwrap_or(u64::MAX));
    [
        ("X-Shiftgate-Wait-Ms", waited),
        ("X-Shiftgate-Attempts", ctx.attempts.into()),
    ]
    .into_iter()
    .chain(batch.map(|b| ("X-Shiftgate-Batch", b)))
}

/// `n` as a header value; a single digit (no wait, one attempt: most answers) without
/// allocating.
fn number_value(n: u64) -> http::HeaderValue {
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match usize::try_from(n).ok().and_then(|i| DIGITS.get(i)) {
        Some(digit) => http::HeaderValue::from_static(digit),
        None => http::HeaderValue::from(n),
    }
}

/// The user and source of a presence update's path (`.../users/{userId}/presences/{sourceId}`).
fn presence_target(target: &str) -> Option<(&str, &str)> {
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    let segs: Vec<&str> = path.split('/').collect();
    let i = segs.iter().rposition(|s| *s == "users")?;
    match segs[i..] {
        [_, user, "presences", source] if !user.is_empty() && !source.is_empty() => {
            Some((user, source))
        }
        _ => None,
    }
}

/// A presence PATCH body as its bulk entry: `None` when it is not a JSON object (the API
/// answers it, alone).
fn bulk_entry(user: &str, source: &str, body: &[u8]) -> Option<serde_json::Value> {
    let serde_json::Value::Object(sent) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    let mut entry = serde_json::Map::new();
    entry.insert("id".into(), user.into());
    entry.insert("sourceId".into(), source.into());
    for field in ["presenceDefinition", "message", "primary"] {
        if let Some(v) = sent.get(field) {
            entry.insert(field.into(), v.clone());
        }
    }
    Some(serde_json::Value::Object(entry))
}

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
        Ctx {
            arrived: Instant::now(),
            active: Some(self.state.request_started()),
            config: None,
            route: None,
            metrics: None,
            target: String::new(),
            buckets: Vec::new(),
            queued: None,
            edge_outcome: None,
            attempt: None,
            pending_retry: None,
            waited: Duration::ZERO,
            attempts: 0,
            upstream_time: Duration::ZERO,
            reason: None,
            local_answer: None,
            status_instead: None,
            body_bytes: 0,
            attempt_body_bytes: 0,
            body_read_up_front: false,
            has_body: false,
            client_gone: false,
            logged: false,
            batch: None,
            _busy: None,
        }
    }

    /// Phase 1 (default: nothing): path, route, size, admission. `Ok(true)` means answered here.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // Dropped on any early answer below: a slot it holds is given back.
        let admitted = edge_admission(session);
        if let Some(a) = &admitted {
            ctx.arrived = a.arrived;
        }
        let cfg = self.state.config();
        ctx.config = Some(cfg.clone());
        // New requests are refused while draining; one queued at the edge before it began is
        // served in the drain, as one queued here would be.
        if self.state.is_draining() && admitted.is_none() {
            let a = LocalResponse::new(Reason::ShuttingDown, SHUTTING_DOWN)
                .retry_after(Duration::from_secs(1));
            self.answer(session, ctx, a).await;
            return Ok(true);
        }
        let req = session.req_header();
        if let Some(refusal) = check_head(&req.uri, &req.headers) {
            self.answer(session, ctx, refusal).await;
            return Ok(true);
        }
        // One spelling per path, so `//api/...` cannot skip the budgets of `/api/...`.
        let path = match normalize_path(req.uri.path()) {
            Ok(path) => path.into_owned(),
            Err(e) => {
                let msg = format!("the path {:?} cannot be used: {e}", req.uri.path());
                self.answer(session, ctx, LocalResponse::new(Reason::BadRequest, msg))
                    .await;
                return Ok(true);
            }
        };
        let Some(route_index) = find_route(&cfg.routes, &req.method, &path) else {
            let msg = format!("no route for {} {path}", req.method);
            self.answer(session, ctx, LocalResponse::new(Reason::NoRoute, msg))
                .await;
            return Ok(true);
        };
        ctx.route = Some(route_index);
        ctx.metrics = Some(self.state.metrics().route(&cfg.routes[route_index].name));
        ctx.target = match req.uri.query() {
            Some(query) => format!("{path}?{query}"),
            None => path,
        };
        let route = &cfg.routes[route_index];

        let max = cfg.limits.max_body_bytes;
        let declared = req
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<usize>().ok());
        ctx.has_body = declared.is_some_and(|n| n > 0)
            || req.headers.contains_key(http::header::TRANSFER_ENCODING);
        if declared.is_some_and(|n| n > max) {
            let msg = format!("the request body exceeds {max} bytes");
            self.answer(session, ctx, LocalResponse::new(Reason::BodyTooLarge, msg))
                .await;
            return Ok(true);
        }
        // Read a body that fits the replay buffer now: Pingora replays it on every attempt,
        // and with the body read we can watch the connection for a client that leaves. A client
        // that sent `Expect: 100-continue` waits for our word first: it gets it once admitted
        // (or its final answer at once).
        let expects_continue = req
            .headers
            .get(http::header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
        session.as_downstream_mut().enable_retry_buffering();
        let up_front = declared.is_some_and(|n| n > 0 && n <= REPLAY_BUFFER_BYTES);
        if up_front && !expects_continue {
            Self::read_body_up_front(session, ctx).await?;
        }

        if route.coalesce.is_some()
            && ctx.body_read_up_front
            && self.coalesce(session, ctx, &cfg, route).await?
        {
            return Ok(true);
        }

        let headers = &session.req_header().headers;
        let header = |name: &str| headers.get(name).map_or(&[][..], |v| v.as_bytes());
        ctx.buckets = bucket_keys(self.state.pacer(), &cfg, route, header, || {
            client_ip(session, &cfg)
        });
        let at_edge = admitted.filter(|a| {
            Arc::ptr_eq(&a.config, &cfg) && a.route == route_index && a.buckets == ctx.buckets
        });
        if let Some(admitted) = at_edge {
            // Queued and waited at the edge already.
            ctx.edge_outcome = Some(admitted.outcome);
        } else if !ctx.buckets.is_empty() {
            let demand = Demand {
                buckets: ctx.buckets.clone(),
                priority: route.priority,
                max_wait: route.max_wait,
                retry: false,
                not_after: None,
            };
            match self.state.pacer().admit(demand) {
                Ok(ticket) => self.enter_queue(ctx, ticket, &route.name),
                Err(rejection) => {
                    let a = LocalResponse::refused(&route.name, route.max_wait, &rejection);
                    self.answer(session, ctx, a).await;
                    return Ok(true);
                }
            }
        }
        if expects_continue {
            session
                .as_downstream_mut()
                .write_continue_response()
                .await?;
            if up_front {
                Self::read_body_up_front(session, ctx).await?;
            }
        }
        Ok(false)
    }

    /// Counts the body while it streams (bodies not read up front) against the limit, on every
    /// attempt: a retry gets the replayed start of the body here, then the rest as it streams.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.body_read_up_front {
            return Ok(());
        }
        if let Some(b) = body {
            ctx.attempt_body_bytes += b.len();
            ctx.body_bytes = ctx.body_bytes.max(ctx.attempt_body_bytes);
            let max = ctx
                .config
                .as_ref()
                .map_or(usize::MAX, |c| c.limits.max_body_bytes);
            if ctx.attempt_body_bytes > max {
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

        if let Some(wait) = ctx.pending_retry.take() {
            let started = Instant::now();
            if let RetryWait::Sleep(delay) = wait {
                let sleep = tokio::time::sleep(delay);
                if Self::unless_client_leaves(session, sleep).await.is_none() {
                    return Err(self.client_left(ctx));
                }
            }
            // A 429's retry is queued already (see `requeue`); others queue now.
            if !ctx.buckets.is_empty() && ctx.queued.is_none() {
                let deadline = ctx.arrived + cfg.retry.max_elapsed;
                let not_after = tokio::time::Instant::from_std(deadline);
                let demand = Demand {
                    buckets: ctx.buckets.clone(),
                    priority: route.priority,
                    max_wait: deadline.saturating_duration_since(Instant::now()),
                    retry: true,
                    not_after: Some(not_after),
                };
                match self.state.pacer().admit(demand) {
                    Ok(t) => self.enter_queue(ctx, t, &route.name),
                    Err(_) => return Err(self.no_slot_in_time(ctx, &route.name)),
                }
            }
            // The time a retry waits is not queue wait; it is part of the upstream's answer.
            ctx.upstream_time += started.elapsed();
        }

        let mut granted_at = None;
        let waited = match (ctx.edge_outcome.take(), ctx.queued.take()) {
            (Some(outcome), _) => Some(Some(outcome)),
            (None, Some(mut queued)) => {
                Some(Self::unless_client_leaves(session, queued.ticket.granted()).await)
            }
            (None, None) => None,
        };
        if let Some(waited) = waited {
            match waited {
                None => return Err(self.client_left(ctx)),
                Some(Err(_closed)) => {
                    // Dropped from the queue: shutdown past its drain, or its deadline came
                    // before a slot (a retry's, or in cluster mode `max_wait`, when the shared
                    // budget gave others the slots admission counted on): then an honest
                    // `429 shiftgate.queue.wait`, never a later start.
                    if !self.state.is_draining() {
                        return Err(self.no_slot_in_time(ctx, &route.name));
                    }
                    ctx.reason = Some(Reason::ShuttingDown);
                    return Error::e_explain(
                        ErrorType::HTTPStatus(Reason::ShuttingDown.status()),
                        "left the queue without a slot",
                    );
                }
                Some(Ok(grant)) => {
                    if ctx.attempts == 0 {
                        ctx.waited = grant.waited;
                        self.observe_queue_wait(ctx, grant.waited);
                    }
                    granted_at = Some(grant.at);
                    grant.commit();
                }
            }
        } else if ctx.attempts == 0 && !ctx.buckets.is_empty() {
            // unreachable by construction: a paced route always holds a ticket here
            return Error::e_explain(ErrorType::InternalError, "paced request without a ticket");
        }
        if ctx.attempts == 0 && ctx.buckets.is_empty() {
            self.observe_queue_wait(ctx, Duration::ZERO);
        }

        let upstream = &cfg.upstreams[route.upstream];
        let addr = match upstream.ip {
            Some(ip) => std::net::SocketAddr::new(ip, upstream.port),
            None => match self
                .state
                .resolver()
                .resolve(&upstream.host, upstream.port)
                .await
            {
                // Spread attempts over the addresses; a retry after a failed connect takes
                // the next.
                Ok(addrs) => addrs[(ctx.attempts as usize) % addrs.len()],
                Err(e) => {
                    tracing::error!(upstream = %upstream.name, error = %e, "upstream address unknown");
                    ctx.reason = Some(Reason::UpstreamUnreachable);
                    return Error::e_explain(ErrorType::ConnectError, e.to_string());
                }
            },
        };
        ctx.attempts += 1;
        ctx.attempt_body_bytes = 0;
        let inflight = match &ctx.metrics {
            Some(m) => m.inflight.clone(),
            None => (self.state.metrics().inflight_requests).with_label_values(&[&route.name]),
        };
        ctx.attempt = Some(AttemptState {
            started: Instant::now(),
            _inflight: GaugeGuard::new(inflight),
            granted_at,
        });

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
        // Without a body there is nothing to time: Pingora copies the head into its write
        // buffer under this timer (and flushes it without one), so it would only cost a timer
        // per request.
        if ctx.has_body {
            opts.write_timeout = Some(cfg.limits.upstream_timeout);
        }
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
        let granted = ctx.attempt.as_ref().and_then(|a| a.granted_at);
        if let Some(granted) = granted {
            let now = tokio::time::Instant::now();
            self.state.pacer().sent(&ctx.buckets, granted, now);
        }
        Ok(())
    }

    /// Path rewrite, Host, and connection-level headers (default: forward as received).
    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let cfg = ctx.config.clone().expect("set in request_filter");
        let route = ctx.route(&cfg).expect("routed");
        let upstream = &cfg.upstreams[route.upstream];
        let path = upstream_path(
            &ctx.target,
            route.strip_prefix.as_deref(),
            &upstream.base_path,
        );
        // Origin-form only: whatever the client's target said, only the configured upstream is
        // ever reached. Left as it came when that is what it says already.
        let unchanged = upstream_request.uri.scheme().is_none()
            && upstream_request
                .uri
                .path_and_query()
                .is_some_and(|pq| pq.as_str() == path);
        if !unchanged {
            let uri: http::Uri = path
                .parse()
                .map_err(|e| Error::because(ErrorType::InvalidHTTPHeader, "rewritten path", e))?;
            upstream_request.set_uri(uri);
        }
        let named = connection_named_headers(
            upstream_request
                .headers
                .get_all(http::header::CONNECTION)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        // One pass over the few headers a request has, rather than a lookup per name.
        let hop_by_hop =
            (upstream_request.headers.keys()).any(|name| HOP_BY_HOP.contains(&name.as_str()));
        if hop_by_hop {
            for h in HOP_BY_HOP {
                upstream_request.remove_header(*h);
            }
        }
        for h in &named {
            upstream_request.remove_header(h.as_str());
        }
        // Answered here (`100 Continue` once admitted): the body is on its way already.
        upstream_request.remove_header("expect");
        // Removed first: an insert into a full header map grows it (both of Pingora's maps,
        // four allocations), even when the name is there already.
        upstream_request.remove_header(&http::header::HOST);
        upstream_request.insert_header(http::header::HOST, upstream.host_value.clone())?;
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
        let granted_at = self.end_attempt(ctx);
        let route = ctx.route_label();
        if let Some(m) = &ctx.metrics {
            m.count_upstream_response(status);
        }
        if status != 429 && !ctx.buckets.is_empty() {
            if let Some(granted_at) = granted_at {
                self.state.pacer().answered(&ctx.buckets, granted_at);
            }
        }
        if !matches!(status, 429 | 502 | 503 | 504) {
            return Ok(());
        }
        let retry_after = upstream_response
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
        if status == 429 && !ctx.buckets.is_empty() {
            let granted_at = granted_at.unwrap_or_else(tokio::time::Instant::now);
            self.state
                .upstream_throttled(route, &ctx.buckets, retry_after, granted_at);
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
        if !self.state.keep_alive() {
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
        ctx.queued = None;
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
            // A chunked body that breaks its own framing: RFC 9112 wants a 400 and a close.
            ErrorType::Custom("InvalidChunk") => Some(Reason::BadRequest),
            _ => None,
        });
        let can_write = !ctx.client_gone && session.response_written().is_none();
        // The connection is not reused after a failure: say so in the answer.
        session.set_keepalive(None);
        let code = match reason {
            Some(reason) if can_write && ctx.local_answer.is_some() => {
                let a = ctx.local_answer.take().expect("checked");
                self.answer(session, ctx, a).await;
                reason.status()
            }
            Some(reason) if can_write => {
                let msg = match reason {
                    Reason::UpstreamUnreachable => {
                        format!("the upstream could not be reached: {}", e.etype().as_str())
                    }
                    Reason::BadRequest => "the request body's chunked encoding is broken".into(),
                    _ => reason
                        .message()
                        .map_or_else(|| e.to_string(), str::to_string),
                };
                let mut a = LocalResponse::new(reason, msg);
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
            _ if !ctx.client_gone && session.response_written().is_some() => {
                self.answer_broke_off(session, ctx, reason, e).await
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
        if ctx.logged {
            return;
        }
        ctx.logged = true;
        ctx.active = None;
        self.end_attempt(ctx);
        ctx.queued = None;
        let route = ctx.route_label();
        let status = ctx
            .status_instead
            .unwrap_or_else(|| session.response_written().map_or(0, |r| r.status.as_u16()));
        let m = self.state.metrics();
        if status > 0 && !ctx.client_gone {
            let took = ctx.arrived.elapsed().as_secs_f64();
            match &ctx.metrics {
                Some(rm) => {
                    rm.count_request(status);
                    rm.request_duration.observe(took);
                }
                None => {
                    m.requests_total
                        .with_label_values(&[route, crate::metrics::status_label(status)])
                        .inc();
                    m.request_duration_seconds
                        .with_label_values(&[route])
                        .observe(took);
                }
            }
        } else if !ctx.client_gone && ctx.route.is_some() {
            // Pingora saw the client go during the answer.
            m.client_disconnects_total.with_label_values(&[route]).inc();
        }
        let correlation = session
            .response_written()
            .and_then(|r| r.headers.get("inin-correlation-id"))
            .and_then(|v| v.to_str().ok());
        let cfg = ctx.config.clone().unwrap_or_else(|| self.state.config());
        let req = session.req_header();
        access::log(&access::Line {
            client: client_ip(session, &cfg),
            peer: session.client_addr().and_then(|a| a.as_inet()).copied(),
            route,
            method: req.method.as_str(),
            path: req.uri.path(),
            status,
            duration: ctx.arrived.elapsed(),
            bytes_in: session.body_bytes_read() as u64,
            bytes_out: session.body_bytes_sent() as u64,
            wait: ctx.waited,
            attempts: ctx.attempts,
            upstream: ctx.upstream_time,
            correlation_id: correlation,
            error: e.map(|e| e.etype().as_str()),
        });
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

/// The client's stream as the client edge wrapped it (see [`crate::edge`]).
fn downstream_edge(session: &Session) -> Option<&Deadlined<pingora::protocols::Stream>> {
    session.as_downstream().stream()?.as_any().downcast_ref()
}

/// Our answer in place of one that broke off (see [`Proxy::answer_broke_off`]), whole, with
/// the upstream's correlation id (as the access line has it: Genesys support can trace it) and
/// the `X-Shiftgate-*` headers.
fn broke_off_answer(session: &Session, ctx: &Ctx, reason: Reason, e: &Error) -> Vec<u8> {
    let mut answer = LocalResponse::new(
        reason,
        format!("the upstream's answer broke off: {}", e.etype().as_str()),
    );
    if let Some(id) = session
        .response_written()
        .and_then(|h| h.headers.get("inin-correlation-id"))
        .and_then(|v| v.to_str().ok())
    {
        answer.correlation_id = id.to_string();
    }
    let headers: Vec<_> = shiftgate_headers(ctx)
        .map(|(name, n)| (name, n.to_string()))
        .collect();
    answer.http1_closing_with(&headers)
}

/// The request's admission at the client edge, when it waited there (see [`crate::edge`]).
fn edge_admission(session: &Session) -> Option<Admitted> {
    downstream_edge(session)?.take_admitted()
}

/// The client's address (see [`crate::forwarded::client_ip`]): the socket peer, or behind
/// `trusted_proxies`, `X-Forwarded-For`'s right-most untrusted hop. `None` for a peer that is not
/// an IP socket.
fn client_ip(session: &Session, cfg: &Config) -> Option<std::net::IpAddr> {
    let peer = session.client_addr()?.as_inet()?.ip();
    if cfg.trusted_proxies.is_empty() {
        return Some(peer);
    }
    let xff = session
        .req_header()
        .headers
        .get_all("x-forwarded-for")
        .into_iter()
        .filter_map(|v| v.to_str().ok());
    Some(crate::forwarded::client_ip(peer, xff, &cfg.trusted_proxies))
}
