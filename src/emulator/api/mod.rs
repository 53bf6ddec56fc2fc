//! The emulated Genesys API without sockets: the state it shares and the path a request takes.
//!
//! A request meets, in order: its body's size, faults, auth, limits, the endpoint itself, then
//! latency. `endpoint` names the endpoint a path is for; `oauth`, `presence`, `routing`, `users`
//! and `control` (`/_emulator/*`) answer them; `answer` builds answers with the headers every answer
//! carries; `json` reads request bodies.

mod answer;
mod control;
mod endpoint;
mod json;
mod oauth;
mod presence;
mod routing;
mod users;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Response, StatusCode};
use parking_lot::Mutex;
use rand::Rng as _;
use serde_json::Value;

use crate::emulator::auth;
use crate::emulator::catalog;
use crate::emulator::clock::Clock;
use crate::emulator::config::{EmulatorConfig, Fault};
use crate::emulator::faults::FaultSet;
use crate::emulator::limits::Limiter;
use crate::emulator::stats::{Served, Stats, StatsSnapshot, STATUS_RESET};

use answer::{fault_answer, finish, not_found, ApiAnswer};
use endpoint::ApiCall;
use json::{parse_json, to_json_bytes};

/// A request with its body already read.
pub(crate) struct ApiRequest {
    pub method: Method,
    /// The path without the query string.
    pub path: String,
    /// The query string without its `?`; empty when there is none.
    pub query: String,
    pub headers: HeaderMap,
    pub body: RequestBody,
    /// Hex SHA-256 of every body byte received; `None` when the body was not read to its end.
    pub body_sha256: Option<String>,
}

pub(crate) enum RequestBody {
    Complete(Bytes),
    /// Over `max_body_bytes`; `received` bytes were read (and dropped).
    TooLarge {
        received: u64,
    },
    /// The client broke off or sent a malformed body.
    Unreadable,
}

impl ApiRequest {
    /// For callers that hold the whole body (tests).
    #[cfg(test)]
    pub(crate) fn new(method: Method, path: &str, headers: HeaderMap, body: &[u8]) -> Self {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        ApiRequest {
            method,
            path: path.to_string(),
            query: query.to_string(),
            headers,
            body: RequestBody::Complete(Bytes::copy_from_slice(body)),
            body_sha256: Some(crate::digest::sha256_hex(body)),
        }
    }
}

/// The answer to one request, ready for the wire.
pub(crate) struct Reply {
    pub response: Response<Bytes>,
    /// Send the head and half the body, then drop the connection.
    pub reset: bool,
}

/// Everything one emulator knows. Shared by all connections; each lock in it is held for a
/// few map operations and never across an await.
pub(crate) struct ApiState {
    config: EmulatorConfig,
    pub(crate) clock: Clock,
    started: Instant,
    limiter: Limiter,
    pub(crate) faults: FaultSet,
    pub(crate) stats: Stats,
    /// Issued token -> when it expires.
    tokens: Mutex<HashMap<String, Instant>>,
    /// (user id, source) -> the presence last set.
    presences: Mutex<HashMap<(String, String), Value>>,
    /// user id -> the routing status last set.
    routing: Mutex<HashMap<String, Value>>,
    /// Answers that never change, serialized once.
    definitions: Bytes,
    namespaces: Bytes,
}

impl ApiState {
    pub(crate) fn new(config: EmulatorConfig) -> Self {
        Self::with_clock(config, Clock::System)
    }

    pub(crate) fn with_clock(config: EmulatorConfig, clock: Clock) -> Self {
        let started = clock.now();
        let faults = FaultSet::default();
        for fault in &config.faults {
            faults.arm(fault.clone(), started, started);
        }
        ApiState {
            limiter: Limiter::new(config.token_rate_per_minute, config.route_limits.clone()),
            started,
            faults,
            stats: Stats::new(started),
            tokens: Mutex::new(HashMap::new()),
            presences: Mutex::new(HashMap::new()),
            routing: Mutex::new(HashMap::new()),
            definitions: to_json_bytes(&catalog::definitions_listing()),
            namespaces: to_json_bytes(&catalog::limits_namespaces(
                config.token_rate_per_minute,
                config.max_body_bytes,
            )),
            config,
            clock,
        }
    }

    pub(crate) fn max_body_bytes(&self) -> usize {
        self.config.max_body_bytes
    }

    pub(crate) fn add_fault(&self, fault: Fault) {
        let now = self.clock.now();
        self.faults.arm(fault, now, now);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        self.stats.snapshot(self.clock.now())
    }

    pub(crate) fn reset_stats(&self) {
        self.stats.reset(self.clock.now());
    }

    /// Answers one request.
    pub(crate) async fn handle(&self, req: ApiRequest) -> Reply {
        let context_id = uuid::Uuid::new_v4().to_string();
        let answer = if req.path == "/_emulator" || req.path.starts_with("/_emulator/") {
            self.emulator_endpoint(&req, &context_id)
        } else {
            self.genesys_endpoint(&req, &context_id).await
        };
        finish(answer, &context_id, &req)
    }

    async fn genesys_endpoint(&self, req: &ApiRequest, context_id: &str) -> ApiAnswer {
        let arrival = self.clock.now();
        let _in_flight = self.stats.enter();
        let endpoint = ApiCall::classify(&req.method, &req.path);
        let mut extra_delay = Duration::ZERO;
        let mut slow_hits = 0;
        let mut fault = None;

        let answer = match &req.body {
            RequestBody::TooLarge { received } => ApiAnswer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                catalog::CODE_TOO_LARGE,
                &format!(
                    "The request body of {received} bytes or more is over the limit of {} bytes.",
                    self.config.max_body_bytes
                ),
                context_id,
            ),
            RequestBody::Unreadable => {
                ApiAnswer::bad_request("The request body could not be read.", context_id)
            }
            RequestBody::Complete(body) => {
                let decision = self.faults.decide(arrival, &req.path);
                extra_delay = decision.extra_delay;
                slow_hits = decision.slow_hits;
                match decision.answer {
                    Some((kind, until)) => {
                        fault = Some(kind.name());
                        fault_answer(&kind, until, arrival, context_id)
                    }
                    None => self.act(&endpoint, req, body, arrival, context_id),
                }
            }
        };

        let delay = self.latency() + extra_delay;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        self.stats.record(&Served {
            arrival,
            route: endpoint.label(),
            status: if answer.reset {
                STATUS_RESET
            } else {
                answer.status.as_u16()
            },
            fault,
            slow_hits,
        });
        answer
    }

    fn latency(&self) -> Duration {
        let (min, max) = (self.config.latency.min, self.config.latency.max);
        if max <= min {
            return min;
        }
        let nanos = rand::rng().random_range(min.as_nanos() as u64..=max.as_nanos() as u64);
        Duration::from_nanos(nanos)
    }

    /// Authentication, limits and the endpoint: what a request that no fault hit meets.
    fn act(
        &self,
        endpoint: &ApiCall<'_>,
        req: &ApiRequest,
        body: &Bytes,
        now: Instant,
        context_id: &str,
    ) -> ApiAnswer {
        if *endpoint == ApiCall::OauthToken {
            return self.oauth_token(req, body, now, context_id);
        }
        if !endpoint.is_api() {
            return not_found(context_id);
        }
        let Some(token) = auth::bearer(&req.headers).filter(|t| self.token_accepted(t, now)) else {
            return ApiAnswer::error(
                StatusCode::UNAUTHORIZED,
                catalog::CODE_BAD_CREDENTIALS,
                catalog::MSG_BAD_CREDENTIALS,
                context_id,
            );
        };
        if let Err(throttled) = self
            .limiter
            .admit(now, token, req.method.as_str(), &req.path)
        {
            tracing::debug!(limit = %throttled.limit, retry_after = throttled.retry_after, "emulator: 429");
            if self.config.limit_in_429 {
                return ApiAnswer::too_many_requests_naming(
                    throttled.retry_after,
                    context_id,
                    &throttled.limit,
                    catalog::API_NAMESPACE,
                    throttled.value,
                );
            }
            return ApiAnswer::too_many_requests(throttled.retry_after, context_id);
        }
        match *endpoint {
            ApiCall::PresencePatch { user, source } => {
                match parse_json(body).and_then(|v| self.set_presence(user, source, &v)) {
                    Ok(presence) => ApiAnswer::json(StatusCode::OK, &presence),
                    Err(message) => ApiAnswer::bad_request(&message, context_id),
                }
            }
            ApiCall::PresenceGet { user, source } => {
                ApiAnswer::json(StatusCode::OK, &self.presence(user, source))
            }
            ApiCall::PresenceBulk => match parse_json(body).and_then(|v| self.set_bulk(&v)) {
                Ok(presences) => ApiAnswer::json(StatusCode::OK, &presences),
                Err(message) => ApiAnswer::bad_request(&message, context_id),
            },
            ApiCall::RoutingStatusPut { user } => {
                match parse_json(body).and_then(|v| self.set_routing_status(user, &v)) {
                    Ok(status) => ApiAnswer::json(StatusCode::OK, &status),
                    Err(message) => ApiAnswer::bad_request(&message, context_id),
                }
            }
            ApiCall::RoutingStatusGet { user } => {
                ApiAnswer::json(StatusCode::OK, &self.routing_status(user))
            }
            ApiCall::Definitions => ApiAnswer::json_bytes(StatusCode::OK, self.definitions.clone()),
            ApiCall::Limits if self.config.limits_api => {
                ApiAnswer::json_bytes(StatusCode::OK, self.namespaces.clone())
            }
            ApiCall::LimitsNamespace { name } if self.config.limits_api => {
                match catalog::namespace_limits(name, &self.namespaces) {
                    Some(listing) => ApiAnswer::json(StatusCode::OK, &listing),
                    None => not_found(context_id),
                }
            }
            ApiCall::Limits | ApiCall::LimitsNamespace { .. } => not_found(context_id),
            ApiCall::Users => match users::page(&req.query, self.config.users) {
                Ok(page) => ApiAnswer::json(StatusCode::OK, &page),
                Err(message) => ApiAnswer::bad_request(&message, context_id),
            },
            ApiCall::OauthToken | ApiCall::NotFound { .. } => not_found(context_id),
        }
    }
}
