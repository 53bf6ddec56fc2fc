//! The emulated Genesys endpoints and the order a request meets them in: body size, faults,
//! auth, limits, the endpoint itself, then latency. Knows nothing of sockets.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use parking_lot::Mutex;
use rand::Rng as _;
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::auth;
use super::clock::Clock;
use super::config::{EmulatorConfig, Fault, FaultKind};
use super::faults::FaultSet;
use super::genesys::{self, error_body};
use super::limits::Limiter;
use super::stats::{Outcome, RouteLabel, Stats, StatsSnapshot, STATUS_RESET};
use crate::genesys::retry_after_secs;

/// Genesys's `expires_in` for client-credentials tokens.
pub(crate) const TOKEN_LIFETIME_SECS: u64 = 86_399;
/// Genesys's batch limit for the bulk presence PUT.
pub(crate) const BULK_MAX: usize = 50;

pub(crate) static ININ_CORRELATION_ID: HeaderName = HeaderName::from_static("inin-correlation-id");
pub(crate) static X_EMULATOR_BODY_SHA256: HeaderName =
    HeaderName::from_static("x-emulator-body-sha256");
pub(crate) static X_EMULATOR_HOST: HeaderName = HeaderName::from_static("x-emulator-host");

/// A request with its body already read.
pub(crate) struct ApiRequest {
    pub method: Method,
    /// The path without the query string.
    pub path: String,
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
        ApiRequest {
            method,
            path: path.to_string(),
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

/// An answer before the common headers are added.
struct Answer {
    status: StatusCode,
    body: Bytes,
    json: bool,
    retry_after: Option<u64>,
    close: bool,
    reset: bool,
}

impl Answer {
    /// A JSON body already serialized.
    fn json_bytes(status: StatusCode, body: Bytes) -> Self {
        Answer {
            status,
            body,
            json: true,
            retry_after: None,
            close: false,
            reset: false,
        }
    }

    fn json(status: StatusCode, value: &impl Serialize) -> Self {
        Answer::json_bytes(status, to_json_bytes(value))
    }

    fn error(status: StatusCode, code: &str, message: &str, context_id: &str) -> Self {
        Answer::json_bytes(
            status,
            error_body(status.as_u16(), code, message, context_id),
        )
    }

    fn no_content() -> Self {
        Answer {
            json: false,
            ..Answer::json_bytes(StatusCode::NO_CONTENT, Bytes::new())
        }
    }

    /// The exact Genesys 429.
    fn too_many_requests(retry_after: u64, context_id: &str) -> Self {
        Answer {
            retry_after: Some(retry_after),
            ..Answer::error(
                StatusCode::TOO_MANY_REQUESTS,
                genesys::CODE_TOO_MANY_REQUESTS,
                &genesys::rate_limit_message(retry_after),
                context_id,
            )
        }
    }

    fn bad_request(message: &str, context_id: &str) -> Self {
        Answer::error(
            StatusCode::BAD_REQUEST,
            genesys::CODE_BAD_REQUEST,
            message,
            context_id,
        )
    }
}

/// Which endpoint a request is for, with its path parameters.
#[derive(Debug, PartialEq, Eq)]
enum Endpoint<'a> {
    OauthToken,
    PresencePatch {
        user: &'a str,
        source: &'a str,
    },
    PresenceGet {
        user: &'a str,
        source: &'a str,
    },
    PresenceBulk,
    RoutingStatusPut {
        user: &'a str,
    },
    RoutingStatusGet {
        user: &'a str,
    },
    Definitions,
    Limits,
    /// `api`: under `/api/v2`, so authentication and limits still apply.
    NotFound {
        api: bool,
    },
}

impl<'a> Endpoint<'a> {
    fn classify(method: &Method, path: &'a str) -> Self {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let api = matches!(segments.as_slice(), ["api", "v2", ..]);
        let m = method;
        match segments.as_slice() {
            ["oauth", "token"] if m == Method::POST => Endpoint::OauthToken,
            ["api", "v2", "users", "presences", "bulk"] if m == Method::PUT => {
                Endpoint::PresenceBulk
            }
            ["api", "v2", "users", user, "presences", source]
                if !user.is_empty() && !source.is_empty() =>
            {
                match *m {
                    Method::PATCH => Endpoint::PresencePatch { user, source },
                    Method::GET => Endpoint::PresenceGet { user, source },
                    _ => Endpoint::NotFound { api },
                }
            }
            ["api", "v2", "users", user, "routingstatus"] if !user.is_empty() => match *m {
                Method::PUT => Endpoint::RoutingStatusPut { user },
                Method::GET => Endpoint::RoutingStatusGet { user },
                _ => Endpoint::NotFound { api },
            },
            ["api", "v2", "presence", "definitions"] if m == Method::GET => Endpoint::Definitions,
            ["api", "v2", "organizations", "limits", "namespaces"] if m == Method::GET => {
                Endpoint::Limits
            }
            _ => Endpoint::NotFound { api },
        }
    }

    fn label(&self) -> RouteLabel {
        match self {
            Endpoint::OauthToken => RouteLabel::OauthToken,
            Endpoint::PresencePatch { .. } => RouteLabel::PresencePatch,
            Endpoint::PresenceGet { .. } => RouteLabel::PresenceGet,
            Endpoint::PresenceBulk => RouteLabel::PresenceBulk,
            Endpoint::RoutingStatusPut { .. } => RouteLabel::RoutingstatusPut,
            Endpoint::RoutingStatusGet { .. } => RouteLabel::RoutingstatusGet,
            Endpoint::Definitions => RouteLabel::Definitions,
            Endpoint::Limits => RouteLabel::Limits,
            Endpoint::NotFound { .. } => RouteLabel::NotFound,
        }
    }

    fn is_api(&self) -> bool {
        !matches!(
            self,
            Endpoint::OauthToken | Endpoint::NotFound { api: false }
        )
    }
}

/// Everything one emulator knows. Shared by all connections; each lock in it is held for a
/// few map operations and never across an await.
pub(crate) struct State {
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

impl State {
    pub(crate) fn new(config: EmulatorConfig) -> Self {
        Self::with_clock(config, Clock::System)
    }

    pub(crate) fn with_clock(config: EmulatorConfig, clock: Clock) -> Self {
        let started = clock.now();
        let faults = FaultSet::default();
        for fault in &config.faults {
            faults.arm(fault.clone(), started, started);
        }
        State {
            limiter: Limiter::new(config.token_rate_per_minute, config.route_limits.clone()),
            started,
            faults,
            stats: Stats::new(started),
            tokens: Mutex::new(HashMap::new()),
            presences: Mutex::new(HashMap::new()),
            routing: Mutex::new(HashMap::new()),
            definitions: to_json_bytes(&genesys::definitions_listing()),
            namespaces: to_json_bytes(&genesys::limits_namespaces(
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

    async fn genesys_endpoint(&self, req: &ApiRequest, context_id: &str) -> Answer {
        let arrival = self.clock.now();
        let _in_flight = self.stats.enter();
        let endpoint = Endpoint::classify(&req.method, &req.path);
        let mut extra_delay = Duration::ZERO;
        let mut slow_hits = 0;
        let mut fault = None;

        let answer = match &req.body {
            RequestBody::TooLarge { received } => Answer::error(
                StatusCode::PAYLOAD_TOO_LARGE,
                genesys::CODE_TOO_LARGE,
                &format!(
                    "The request body of {received} bytes or more is over the limit of {} bytes.",
                    self.config.max_body_bytes
                ),
                context_id,
            ),
            RequestBody::Unreadable => {
                Answer::bad_request("The request body could not be read.", context_id)
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
        self.stats.record(&Outcome {
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
        endpoint: &Endpoint<'_>,
        req: &ApiRequest,
        body: &Bytes,
        now: Instant,
        context_id: &str,
    ) -> Answer {
        if *endpoint == Endpoint::OauthToken {
            return self.oauth_token(req, body, now, context_id);
        }
        if !endpoint.is_api() {
            return not_found(context_id);
        }
        let Some(token) = auth::bearer(&req.headers).filter(|t| self.token_accepted(t, now)) else {
            return Answer::error(
                StatusCode::UNAUTHORIZED,
                genesys::CODE_BAD_CREDENTIALS,
                genesys::MSG_BAD_CREDENTIALS,
                context_id,
            );
        };
        if let Err(throttled) = self
            .limiter
            .admit(now, token, req.method.as_str(), &req.path)
        {
            tracing::debug!(limit = %throttled.limit, retry_after = throttled.retry_after, "emulator: 429");
            return Answer::too_many_requests(throttled.retry_after, context_id);
        }
        match *endpoint {
            Endpoint::PresencePatch { user, source } => {
                match parse_json(body).and_then(|v| self.set_presence(user, source, &v)) {
                    Ok(presence) => Answer::json(StatusCode::OK, &presence),
                    Err(message) => Answer::bad_request(&message, context_id),
                }
            }
            Endpoint::PresenceGet { user, source } => {
                Answer::json(StatusCode::OK, &self.presence(user, source))
            }
            Endpoint::PresenceBulk => match parse_json(body).and_then(|v| self.set_bulk(&v)) {
                Ok(presences) => Answer::json(StatusCode::OK, &presences),
                Err(message) => Answer::bad_request(&message, context_id),
            },
            Endpoint::RoutingStatusPut { user } => {
                match parse_json(body).and_then(|v| self.set_routing_status(user, &v)) {
                    Ok(status) => Answer::json(StatusCode::OK, &status),
                    Err(message) => Answer::bad_request(&message, context_id),
                }
            }
            Endpoint::RoutingStatusGet { user } => {
                let stored = self.routing.lock().get(user).cloned();
                let status =
                    stored.unwrap_or_else(|| json!({ "userId": user, "status": "OFF_QUEUE" }));
                Answer::json(StatusCode::OK, &status)
            }
            Endpoint::Definitions => Answer::json_bytes(StatusCode::OK, self.definitions.clone()),
            Endpoint::Limits => Answer::json_bytes(StatusCode::OK, self.namespaces.clone()),
            Endpoint::OauthToken | Endpoint::NotFound { .. } => not_found(context_id),
        }
    }

    fn token_accepted(&self, token: &str, now: Instant) -> bool {
        if !self.config.auth.require_issued_tokens {
            return true;
        }
        self.tokens
            .lock()
            .get(token)
            .is_some_and(|&expires| now < expires)
    }

    fn oauth_token(
        &self,
        req: &ApiRequest,
        body: &Bytes,
        now: Instant,
        context_id: &str,
    ) -> Answer {
        let known = |(id, secret): &(String, String)| {
            self.config.clients.is_empty()
                || self
                    .config
                    .clients
                    .iter()
                    .any(|c| &c.id == id && &c.secret == secret)
        };
        if !auth::basic(&req.headers).is_some_and(|c| known(&c)) {
            return Answer::error(
                StatusCode::UNAUTHORIZED,
                genesys::CODE_BAD_CREDENTIALS,
                genesys::MSG_BAD_CREDENTIALS,
                context_id,
            );
        }
        match auth::form_value(body, "grant_type").as_deref() {
            Some("client_credentials") => {}
            other => {
                return Answer::bad_request(
                    &format!(
                        "Unsupported grant_type {:?}: only client_credentials is supported.",
                        other.unwrap_or_default()
                    ),
                    context_id,
                )
            }
        }
        let token = auth::new_token();
        self.tokens.lock().insert(
            token.clone(),
            now + Duration::from_secs(TOKEN_LIFETIME_SECS),
        );
        Answer::json(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": TOKEN_LIFETIME_SECS,
            }),
        )
    }

    fn presence(&self, user: &str, source_id: &str) -> Value {
        let source = genesys::presence_source(source_id);
        let key = (user.to_string(), source.to_ascii_lowercase());
        if let Some(stored) = self.presences.lock().get(&key) {
            return stored.clone();
        }
        let started = SystemTime::now() - self.clock.since(self.started);
        presence_json(
            user,
            &source,
            definition_json(genesys::OFFLINE_ID, None),
            true,
            None,
            started,
        )
    }

    /// Applies one PATCH body (`presenceDefinition`, `primary`, `message`, all optional).
    fn set_presence(&self, user: &str, source_id: &str, body: &Value) -> Result<Value, String> {
        let obj = body
            .as_object()
            .ok_or("The presence body must be a JSON object.")?;
        let definition = match obj.get("presenceDefinition") {
            None | Some(Value::Null) => None,
            Some(def) => Some(checked_definition(def)?),
        };
        let primary = optional_bool(obj, "primary")?;
        let message = optional_str(obj, "message")?;
        Ok(self.store_presence(user, source_id, definition, primary, message))
    }

    fn store_presence(
        &self,
        user: &str,
        source_id: &str,
        definition: Option<Value>,
        primary: Option<bool>,
        message: Option<String>,
    ) -> Value {
        let source = genesys::presence_source(source_id);
        let key = (user.to_string(), source.to_ascii_lowercase());
        let mut presences = self.presences.lock();
        let previous = presences.get(&key);
        // A PATCH changes only what it names, as the real endpoint does.
        let definition = definition.unwrap_or_else(|| {
            previous
                .map(|p| p["presenceDefinition"].clone())
                .unwrap_or_else(|| definition_json(genesys::OFFLINE_ID, None))
        });
        let primary = primary
            .or_else(|| previous.and_then(|p| p["primary"].as_bool()))
            .unwrap_or(true);
        let message =
            message.or_else(|| previous.and_then(|p| p["message"].as_str().map(str::to_string)));
        let presence = presence_json(
            user,
            &source,
            definition,
            primary,
            message,
            SystemTime::now(),
        );
        presences.insert(key, presence.clone());
        presence
    }

    /// Validates the whole batch before applying any of it, so a 400 changes nothing.
    fn set_bulk(&self, body: &Value) -> Result<Value, String> {
        let entries = body
            .as_array()
            .ok_or("The bulk presence body must be a JSON array.")?;
        if entries.len() > BULK_MAX {
            return Err(format!(
                "At most {BULK_MAX} presences can be set in one request, got {}.",
                entries.len()
            ));
        }
        let mut updates = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let obj = entry
                .as_object()
                .ok_or_else(|| format!("Entry {i} must be a JSON object."))?;
            let user = obj
                .get("id")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or_else(|| format!("Entry {i} needs a user \"id\"."))?;
            let source = optional_str(obj, "sourceId")?.unwrap_or_else(|| "PURECLOUD".into());
            let definition = match obj.get("presenceDefinition") {
                None | Some(Value::Null) => None,
                Some(def) => Some(checked_definition(def).map_err(|e| format!("Entry {i}: {e}"))?),
            };
            let primary = optional_bool(obj, "primary")?;
            let message = optional_str(obj, "message")?;
            updates.push((user, source, definition, primary, message));
        }
        let presences: Vec<Value> = updates
            .into_iter()
            .map(|(user, source, definition, primary, message)| {
                let mut p = self.store_presence(user, &source, definition, primary, message);
                p["id"] = Value::from(user);
                p
            })
            .collect();
        Ok(Value::Array(presences))
    }

    fn set_routing_status(&self, user: &str, body: &Value) -> Result<Value, String> {
        let obj = body
            .as_object()
            .ok_or("The routing status body must be a JSON object.")?;
        let status = obj
            .get("status")
            .and_then(Value::as_str)
            .filter(|s| genesys::ROUTING_STATUSES.contains(s))
            .ok_or_else(|| {
                format!(
                    "\"status\" must be one of {}.",
                    genesys::ROUTING_STATUSES.join(", ")
                )
            })?;
        let start_time =
            optional_str(obj, "startTime")?.unwrap_or_else(|| rfc3339(SystemTime::now()));
        let value = json!({ "userId": user, "status": status, "startTime": start_time });
        self.routing.lock().insert(user.to_string(), value.clone());
        Ok(value)
    }

    /// `/_emulator/*`: not Genesys, never counted, never delayed or faulted.
    fn emulator_endpoint(&self, req: &ApiRequest, context_id: &str) -> Answer {
        let body = match &req.body {
            RequestBody::Complete(body) => body,
            RequestBody::TooLarge { .. } => {
                return Answer::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    genesys::CODE_TOO_LARGE,
                    "The request body is over the limit.",
                    context_id,
                )
            }
            RequestBody::Unreadable => {
                return Answer::bad_request("The request body could not be read.", context_id)
            }
        };
        match (&req.method, req.path.as_str()) {
            (&Method::GET, "/_emulator/stats") => Answer::json(StatusCode::OK, &self.snapshot()),
            (&Method::POST, "/_emulator/stats/reset") => {
                self.reset_stats();
                Answer::no_content()
            }
            (&Method::POST, "/_emulator/faults") => match serde_json::from_slice::<Fault>(body) {
                Ok(fault) => {
                    tracing::info!(kind = fault.kind.name(), "emulator: fault added");
                    let answer = Answer::json(StatusCode::OK, &fault);
                    self.add_fault(fault);
                    answer
                }
                Err(e) => Answer::bad_request(&e.to_string(), context_id),
            },
            (&Method::DELETE, "/_emulator/faults") => {
                self.faults.clear();
                Answer::no_content()
            }
            _ => not_found(context_id),
        }
    }
}

fn not_found(context_id: &str) -> Answer {
    Answer::error(
        StatusCode::NOT_FOUND,
        genesys::CODE_NOT_FOUND,
        genesys::MSG_NOT_FOUND,
        context_id,
    )
}

fn fault_answer(
    kind: &FaultKind,
    until: Option<Instant>,
    now: Instant,
    context_id: &str,
) -> Answer {
    match *kind {
        FaultKind::Outage429 { retry_after } => {
            let retry_after = retry_after
                .or_else(|| until.map(|u| retry_after_secs(u.saturating_duration_since(now))))
                .unwrap_or(1);
            Answer::too_many_requests(retry_after, context_id)
        }
        FaultKind::DailyLimit { retry_after } => Answer::too_many_requests(retry_after, context_id),
        FaultKind::Status {
            status,
            retry_after,
        } => Answer {
            retry_after,
            ..Answer::error(
                StatusCode::from_u16(status.status()).expect("502..504 are valid"),
                status.code(),
                status.message(),
                context_id,
            )
        },
        // A success status, so a client that trusts the status line over the body is caught.
        FaultKind::Reset => Answer {
            reset: true,
            close: true,
            ..Answer::json(
                StatusCode::OK,
                &json!({
                    "emulator": "reset fault: this answer is cut short and never arrives whole",
                    "contextId": context_id,
                }),
            )
        },
        // Slow faults only delay; decide() never returns one as the answer.
        FaultKind::Slow { .. } => not_found(context_id),
    }
}

/// Adds what every answer carries and builds the response.
fn finish(answer: Answer, context_id: &str, req: &ApiRequest) -> Reply {
    let mut response = Response::new(answer.body);
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    // Insertion order is wire order: Genesys's own answers start with the correlation id.
    headers.insert(
        ININ_CORRELATION_ID.clone(),
        HeaderValue::from_str(context_id).expect("a uuid is a valid header value"),
    );
    if let Some(secs) = answer.retry_after {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if answer.json {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(sha) = &req.body_sha256 {
        if let Ok(value) = HeaderValue::from_str(sha) {
            headers.insert(X_EMULATOR_BODY_SHA256.clone(), value);
        }
    }
    if let Some(host) = req.headers.get(http::header::HOST) {
        headers.insert(X_EMULATOR_HOST.clone(), host.clone());
    }
    // A body not read to its end leaves the connection in an unknown state.
    if answer.close || req.body_sha256.is_none() {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Reply {
        response,
        reset: answer.reset,
    }
}

fn to_json_bytes(value: &impl Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).expect("JSON values serialize"))
}

fn parse_json(body: &Bytes) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("The request body is not valid JSON: {e}."))
}

fn optional_bool(obj: &Map<String, Value>, key: &str) -> Result<Option<bool>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("\"{key}\" must be true or false.")),
    }
}

fn optional_str(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, String> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(format!("\"{key}\" must be a string.")),
    }
}

/// The definition as sent, completed with what Genesys adds for a known id.
fn checked_definition(def: &Value) -> Result<Value, String> {
    let id = def
        .get("id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or("\"presenceDefinition\" must be an object with a string \"id\".")?;
    Ok(definition_json(id, def.as_object()))
}

fn definition_json(id: &str, sent: Option<&Map<String, Value>>) -> Value {
    let mut def = sent.cloned().unwrap_or_default();
    def.insert("id".into(), Value::from(id));
    if let Some(name) = genesys::system_presence(id) {
        def.entry("systemPresence").or_insert(Value::from(name));
    }
    def.entry("selfUri")
        .or_insert_with(|| Value::from(format!("/api/v2/presence/definitions/{id}")));
    Value::Object(def)
}

fn presence_json(
    user: &str,
    source: &str,
    definition: Value,
    primary: bool,
    message: Option<String>,
    modified: SystemTime,
) -> Value {
    let mut presence = json!({
        "source": source,
        "primary": primary,
        "presenceDefinition": definition,
        "modifiedDate": rfc3339(modified),
        "selfUri": format!("/api/v2/users/{user}/presences/{}", source.to_ascii_lowercase()),
    });
    if let Some(message) = message {
        presence["message"] = Value::from(message);
    }
    presence
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_their_endpoint_and_label() {
        let cases = [
            (Method::POST, "/oauth/token", RouteLabel::OauthToken),
            (Method::GET, "/oauth/token", RouteLabel::NotFound),
            (
                Method::PATCH,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::PresencePatch,
            ),
            (
                Method::GET,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::PresenceGet,
            ),
            (
                Method::DELETE,
                "/api/v2/users/u1/presences/purecloud",
                RouteLabel::NotFound,
            ),
            (
                Method::PUT,
                "/api/v2/users/presences/bulk",
                RouteLabel::PresenceBulk,
            ),
            (
                Method::PUT,
                "/api/v2/users/u1/routingstatus",
                RouteLabel::RoutingstatusPut,
            ),
            (
                Method::GET,
                "/api/v2/users/u1/routingstatus",
                RouteLabel::RoutingstatusGet,
            ),
            (
                Method::GET,
                "/api/v2/presence/definitions",
                RouteLabel::Definitions,
            ),
            (
                Method::GET,
                "/api/v2/organizations/limits/namespaces",
                RouteLabel::Limits,
            ),
            (
                Method::PUT,
                "/api/v2/wfm/schedules/agents/a1",
                RouteLabel::NotFound,
            ),
            (Method::GET, "/", RouteLabel::NotFound),
        ];
        for (method, path, label) in cases {
            assert_eq!(
                Endpoint::classify(&method, path).label(),
                label,
                "{method} {path}"
            );
        }
        assert_eq!(
            Endpoint::classify(&Method::PATCH, "/api/v2/users/u1/presences/purecloud"),
            Endpoint::PresencePatch {
                user: "u1",
                source: "purecloud"
            }
        );
        assert!(Endpoint::classify(&Method::GET, "/api/v2/nothing").is_api());
        assert!(!Endpoint::classify(&Method::GET, "/nothing").is_api());
    }
}
