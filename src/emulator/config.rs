//! The emulator's configuration: parsed strictly from YAML, so every value the server sees is valid.

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::route::PathTemplate;

/// Genesys's `request.bytes.max`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 512_000;
/// Genesys's `token.rate.per.minute`.
pub const DEFAULT_TOKEN_RATE_PER_MINUTE: u32 = 300;
/// Users `GET /api/v2/users` lists unless told otherwise.
pub const DEFAULT_USERS: u32 = 100;

/// Everything `shiftgate emulate --config PATH` reads. Every key is optional; see `emulator.yaml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmulatorConfig {
    /// Requests per bearer token in a fixed 60 s window that starts at the token's first
    /// counted request (Genesys's `token.rate.per.minute`). 0 turns this limit off.
    pub token_rate_per_minute: u32,
    /// Extra fixed-window limits on some `/api/v2` routes, checked after the per-token limit.
    pub route_limits: Vec<RouteLimit>,
    /// How `/api/v2` bearer tokens are checked.
    pub auth: AuthConfig,
    /// Client credentials `POST /oauth/token` accepts; empty means any id and secret.
    pub clients: Vec<ClientCredentials>,
    /// A uniform random delay added before every answer (emulator endpoints excepted).
    pub latency: Latency,
    /// Largest request body accepted; a larger one is answered 413 (Genesys's `request.bytes.max`).
    pub max_body_bytes: usize,
    /// Faults armed at start; their `start` is relative to the emulator's start.
    pub faults: Vec<Fault>,
    /// How many users `GET /api/v2/users` lists (ids as the load test's `user_id(i)`).
    pub users: u32,
    /// Whether the org limits API (`GET /api/v2/organizations/limits/namespaces[/{name}]`)
    /// answers; false answers it 404, as an org where it is not available.
    pub limits_api: bool,
    /// Whether a 429 body names the limit it hit (`"limit": {"key", "namespace", "value"}`), as
    /// Genesys may since 2023 but does not promise. Off by default, so a 429 matches the 2021
    /// format byte for byte.
    pub limit_in_429: bool,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        EmulatorConfig {
            token_rate_per_minute: DEFAULT_TOKEN_RATE_PER_MINUTE,
            route_limits: Vec::new(),
            auth: AuthConfig::default(),
            clients: Vec::new(),
            latency: Latency::default(),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            faults: Vec::new(),
            users: DEFAULT_USERS,
            limits_api: true,
            limit_in_429: false,
        }
    }
}

impl EmulatorConfig {
    /// Parses and validates a YAML document; an empty document gives the defaults.
    pub fn from_yaml_str(s: &str) -> anyhow::Result<Self> {
        let config: EmulatorConfig = if s.trim().is_empty() {
            EmulatorConfig::default()
        } else {
            serde_yaml::from_str(s).map_err(ConfigError::Yaml)?
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads, parses and validates a YAML file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read emulator config {}", path.display()))?;
        Self::from_yaml_str(&text)
            .with_context(|| format!("invalid emulator config {}", path.display()))
    }

    /// Checks what a single field's type cannot: names unique across the list, ranges that
    /// involve two fields. Reports every problem at once.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        for (i, limit) in self.route_limits.iter().enumerate() {
            if limit.name.is_empty() {
                errors.push(format!("route_limits[{i}].name: must not be empty"));
            }
            if self.route_limits[..i].iter().any(|l| l.name == limit.name) {
                errors.push(format!(
                    "route_limits[{i}].name: duplicate route limit name {:?}",
                    limit.name
                ));
            }
            if let Some(method) = &limit.method {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                    errors.push(format!(
                        "route_limits[{i}].method: {method:?} is not an upper-case HTTP method"
                    ));
                }
            }
        }
        for (i, client) in self.clients.iter().enumerate() {
            if client.id.is_empty() {
                errors.push(format!("clients[{i}].id: must not be empty"));
            }
            if client.id.contains(':') {
                // Basic credentials split at the first colon, so such an id could never match.
                errors.push(format!("clients[{i}].id: must not contain ':'"));
            }
        }
        if self.latency.min > self.latency.max {
            errors.push(format!(
                "latency: min ({}) is greater than max ({})",
                humantime::format_duration(self.latency.min),
                humantime::format_duration(self.latency.max)
            ));
        }
        if self.max_body_bytes == 0 {
            errors.push("max_body_bytes: must be at least 1".to_string());
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(errors))
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not YAML, or a key or value of the wrong kind (the message names the key and line).
    #[error("{0}")]
    Yaml(#[source] serde_yaml::Error),
    /// Well-formed but inconsistent; one message per problem.
    #[error("{}", .0.join("\n"))]
    Invalid(Vec<String>),
}

/// `auth:` section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// When false any non-empty bearer token is accepted, because load tests invent tokens.
    /// When true only tokens issued by this emulator's `/oauth/token` (and not expired).
    pub require_issued_tokens: bool,
}

/// One OAuth client `POST /oauth/token` accepts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCredentials {
    pub id: String,
    pub secret: String,
}

/// `latency: { min, max }`: each answer waits a uniformly drawn time in `[min, max]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Latency {
    #[serde(with = "duration_str")]
    pub min: Duration,
    #[serde(with = "duration_str")]
    pub max: Duration,
}

/// A fixed-window limit on the `/api/v2` requests that match `method` and `path`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteLimit {
    /// Names the limit in logs; unique.
    pub name: String,
    /// Upper-case HTTP method; any method when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Literal segments, `{name}` for one segment, `**` for the rest.
    pub path: PathTemplate,
    /// `"100/s"`, `"300/min"` or `"1000/h"`.
    pub limit: WindowLimit,
    /// One window for the whole org (default) or one per bearer token.
    #[serde(default)]
    pub per: LimitScope,
}

impl RouteLimit {
    pub(crate) fn applies_to(&self, method: &str, path: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method) && self.path.matches(path)
    }
}

/// Who shares one window of a [`RouteLimit`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitScope {
    /// Every request of the org counts against one window.
    #[default]
    Org,
    /// Each bearer token has its own window.
    Token,
}

/// `count` requests per fixed window of `window`: `/s`, `/min`, `/h`, or any duration such as
/// `/10s` (real limits are per second or minute; other lengths test what measures windows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct WindowLimit {
    pub count: u32,
    pub window: Duration,
}

impl FromStr for WindowLimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad =
            || format!("invalid limit {s:?}: expected <whole number>/s, /min, /h or /<duration>");
        let (count, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        let window = match unit.trim() {
            "s" => Duration::from_secs(1),
            "min" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            other => match humantime::parse_duration(other) {
                Ok(d) if d >= Duration::from_millis(1) => d,
                _ => return Err(bad()),
            },
        };
        if count == 0 {
            return Err(format!("invalid limit {s:?}: the count must be at least 1"));
        }
        Ok(WindowLimit { count, window })
    }
}

impl TryFrom<String> for WindowLimit {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for WindowLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.window.as_millis() {
            1_000 => "s".to_string(),
            60_000 => "min".to_string(),
            3_600_000 => "h".to_string(),
            _ => humantime::format_duration(self.window).to_string(),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl From<WindowLimit> for String {
    fn from(l: WindowLimit) -> String {
        l.to_string()
    }
}

/// A fault to inject into the answers of matching requests while it is active.
///
/// In YAML or JSON it is one flat object: `{kind, start?, duration?, rate?, path?, ...}` plus the
/// keys of its kind (`status`, `retry_after`, `delay`); a key that its kind does not use is an error.
/// Faulted requests are not acted on, so they do not count against any limit (`slow` excepted:
/// it only delays a normal answer).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "FaultSpec", into = "FaultSpec")]
pub struct Fault {
    pub kind: FaultKind,
    /// When it becomes active, after the emulator's start (config) or after it was added.
    pub start: Duration,
    /// How long it stays active; `None`: until the emulator stops or faults are cleared.
    pub duration: Option<Duration>,
    /// Probability that it hits a matching request while active, 0.0..=1.0.
    pub rate: f64,
    /// Which requests it may hit; default `/api/v2/**`.
    pub path: PathTemplate,
}

/// What a [`Fault`] does to a request it hits.
#[derive(Debug, Clone, PartialEq)]
pub enum FaultKind {
    /// The exact Genesys 429; `retry_after` default: whole seconds until the outage ends.
    Outage429 { retry_after: Option<u64> },
    /// A retryable server error with a Genesys body; `Retry-After` only when given.
    Status {
        status: FaultStatus,
        retry_after: Option<u64>,
    },
    /// A 429 whose `Retry-After` (> 180 s) makes the SDKs give up, as Genesys's daily limits do.
    DailyLimit { retry_after: u64 },
    /// Waits `delay` more, then answers normally (and counts against limits).
    Slow { delay: Duration },
    /// Sends the status line, headers with a Content-Length and half the body, then closes.
    Reset,
}

impl FaultKind {
    /// The `kind` spelling, used as a stats label.
    pub fn name(&self) -> &'static str {
        match self {
            FaultKind::Outage429 { .. } => "outage_429",
            FaultKind::Status { .. } => "status",
            FaultKind::DailyLimit { .. } => "daily_limit",
            FaultKind::Slow { .. } => "slow",
            FaultKind::Reset => "reset",
        }
    }
}

/// The server errors a `status` fault may answer, each with the code Genesys uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultStatus {
    BadGateway,
    ServiceUnavailable,
    GatewayTimeout,
}

impl FaultStatus {
    pub fn from_code(status: u16) -> Option<Self> {
        match status {
            502 => Some(FaultStatus::BadGateway),
            503 => Some(FaultStatus::ServiceUnavailable),
            504 => Some(FaultStatus::GatewayTimeout),
            _ => None,
        }
    }

    pub fn status(self) -> u16 {
        match self {
            FaultStatus::BadGateway => 502,
            FaultStatus::ServiceUnavailable => 503,
            FaultStatus::GatewayTimeout => 504,
        }
    }

    /// The Genesys error `code`.
    pub fn code(self) -> &'static str {
        match self {
            FaultStatus::BadGateway => "bad.gateway",
            FaultStatus::ServiceUnavailable => "service.unavailable",
            FaultStatus::GatewayTimeout => "request.timeout",
        }
    }

    pub(crate) fn message(self) -> &'static str {
        match self {
            FaultStatus::BadGateway => {
                "The server received an invalid response from an upstream server."
            }
            FaultStatus::ServiceUnavailable => "The service is currently unavailable.",
            FaultStatus::GatewayTimeout => "The request timed out.",
        }
    }
}

impl Fault {
    /// Active from now on, for every matching request, on `/api/v2/**`.
    pub fn new(kind: FaultKind) -> Self {
        Fault {
            kind,
            start: Duration::ZERO,
            duration: None,
            rate: 1.0,
            path: default_fault_path(),
        }
    }

    pub fn starting_after(mut self, start: Duration) -> Self {
        self.start = start;
        self
    }

    pub fn lasting(mut self, duration: Duration) -> Self {
        self.duration = Some(duration);
        self
    }

    pub fn with_rate(mut self, rate: f64) -> Self {
        self.rate = rate;
        self
    }

    pub fn on_path(mut self, path: PathTemplate) -> Self {
        self.path = path;
        self
    }
}

fn default_fault_path() -> PathTemplate {
    PathTemplate::parse("/api/v2/**").expect("a valid literal template")
}

/// The flat wire form of a [`Fault`]; checked field by field when turned into one.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultSpec {
    kind: FaultKindName,
    #[serde(
        default,
        with = "opt_duration_str",
        skip_serializing_if = "Option::is_none"
    )]
    start: Option<Duration>,
    #[serde(
        default,
        with = "opt_duration_str",
        skip_serializing_if = "Option::is_none"
    )]
    duration: Option<Duration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<PathTemplate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry_after: Option<u64>,
    #[serde(
        default,
        with = "opt_duration_str",
        skip_serializing_if = "Option::is_none"
    )]
    delay: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum FaultKindName {
    #[serde(rename = "outage_429")]
    Outage429,
    #[serde(rename = "status")]
    Status,
    #[serde(rename = "daily_limit")]
    DailyLimit,
    #[serde(rename = "slow")]
    Slow,
    #[serde(rename = "reset")]
    Reset,
}

/// Above this the official SDKs stop retrying, which is what a daily limit should cause.
const SDK_RETRY_AFTER_CAP: u64 = 180;

impl TryFrom<FaultSpec> for Fault {
    type Error = String;

    fn try_from(spec: FaultSpec) -> Result<Self, Self::Error> {
        let mut errors = Vec::new();
        let kind_name = match spec.kind {
            FaultKindName::Outage429 => "outage_429",
            FaultKindName::Status => "status",
            FaultKindName::DailyLimit => "daily_limit",
            FaultKindName::Slow => "slow",
            FaultKindName::Reset => "reset",
        };
        let mut unused = |key: &str, present: bool, allowed: &[FaultKindName]| {
            if present && !allowed.contains(&spec.kind) {
                errors.push(format!("`{key}` does not apply to kind {kind_name}"));
            }
        };
        use FaultKindName as K;
        unused("status", spec.status.is_some(), &[K::Status]);
        unused("delay", spec.delay.is_some(), &[K::Slow]);
        unused(
            "retry_after",
            spec.retry_after.is_some(),
            &[K::Outage429, K::Status, K::DailyLimit],
        );
        if let Some(rate) = spec.rate {
            if !(0.0..=1.0).contains(&rate) {
                errors.push(format!("rate {rate} is outside 0.0..=1.0"));
            }
        }
        if spec.duration == Some(Duration::ZERO) {
            errors.push("duration must be more than 0".to_string());
        }
        if spec.retry_after == Some(0) {
            errors.push("retry_after must be at least 1 second".to_string());
        }
        let kind = match spec.kind {
            K::Outage429 => {
                if spec.duration.is_none() && spec.retry_after.is_none() {
                    errors.push(
                        "outage_429 needs a duration or a retry_after (Retry-After is derived from the end)"
                            .to_string(),
                    );
                }
                FaultKind::Outage429 {
                    retry_after: spec.retry_after,
                }
            }
            K::Status => {
                let status = match spec.status {
                    None => {
                        errors.push("kind status needs `status`: 502, 503 or 504".to_string());
                        FaultStatus::ServiceUnavailable
                    }
                    Some(code) => FaultStatus::from_code(code).unwrap_or_else(|| {
                        errors.push(format!("status {code} is not one of 502, 503, 504"));
                        FaultStatus::ServiceUnavailable
                    }),
                };
                FaultKind::Status {
                    status,
                    retry_after: spec.retry_after,
                }
            }
            K::DailyLimit => {
                let retry_after = spec.retry_after.unwrap_or(3600);
                if retry_after <= SDK_RETRY_AFTER_CAP {
                    errors.push(format!(
                        "daily_limit retry_after must be over {SDK_RETRY_AFTER_CAP} s, got {retry_after}"
                    ));
                }
                FaultKind::DailyLimit { retry_after }
            }
            K::Slow => match spec.delay {
                Some(delay) => FaultKind::Slow { delay },
                None => {
                    errors.push("kind slow needs `delay`, e.g. \"5s\"".to_string());
                    FaultKind::Slow {
                        delay: Duration::ZERO,
                    }
                }
            },
            K::Reset => FaultKind::Reset,
        };
        if !errors.is_empty() {
            return Err(format!("invalid fault: {}", errors.join("; ")));
        }
        Ok(Fault {
            kind,
            start: spec.start.unwrap_or(Duration::ZERO),
            duration: spec.duration,
            rate: spec.rate.unwrap_or(1.0),
            path: spec.path.unwrap_or_else(default_fault_path),
        })
    }
}

impl From<Fault> for FaultSpec {
    fn from(f: Fault) -> Self {
        let mut spec = FaultSpec {
            kind: FaultKindName::Reset,
            start: (f.start != Duration::ZERO).then_some(f.start),
            duration: f.duration,
            rate: (f.rate != 1.0).then_some(f.rate),
            path: (f.path != default_fault_path()).then_some(f.path),
            status: None,
            retry_after: None,
            delay: None,
        };
        match f.kind {
            FaultKind::Outage429 { retry_after } => {
                spec.kind = FaultKindName::Outage429;
                spec.retry_after = retry_after;
            }
            FaultKind::Status {
                status,
                retry_after,
            } => {
                spec.kind = FaultKindName::Status;
                spec.status = Some(status.status());
                spec.retry_after = retry_after;
            }
            FaultKind::DailyLimit { retry_after } => {
                spec.kind = FaultKindName::DailyLimit;
                spec.retry_after = Some(retry_after);
            }
            FaultKind::Slow { delay } => {
                spec.kind = FaultKindName::Slow;
                spec.delay = Some(delay);
            }
            FaultKind::Reset => {}
        }
        spec
    }
}

/// Durations as humantime strings (`"500ms"`, `"5s"`, `"2m"`), the spelling the proxy's config uses.
mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); use e.g. \"500ms\", \"5s\", \"2m\""
            ))
        })
    }
}

mod opt_duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration_str::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(Deserialize)]
        struct Wrapped(#[serde(with = "super::duration_str")] Duration);
        Ok(Option::<Wrapped>::deserialize(d)?.map(|w| w.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_document_gives_the_genesys_defaults() {
        let config = EmulatorConfig::from_yaml_str("").unwrap();
        assert_eq!(config.token_rate_per_minute, 300);
        assert_eq!(config.max_body_bytes, 512_000);
        assert!(!config.auth.require_issued_tokens);
        assert!(config.route_limits.is_empty() && config.faults.is_empty());
    }

    #[test]
    fn the_shipped_example_parses_and_uses_every_key() {
        let text = include_str!("emulator.yaml");
        let config = EmulatorConfig::from_yaml_str(text).unwrap();
        assert_eq!(config.route_limits.len(), 2);
        assert_eq!(config.route_limits[1].per, LimitScope::Token);
        assert_eq!(config.clients.len(), 1);
        assert_eq!(config.users, 100);
        assert!(config.limits_api && !config.limit_in_429);
        assert_eq!(config.latency.max, Duration::from_millis(40));
        let kinds: Vec<&str> = config.faults.iter().map(|f| f.kind.name()).collect();
        assert_eq!(
            kinds,
            ["outage_429", "status", "daily_limit", "slow", "reset"],
            "the example shows each fault kind once"
        );
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = EmulatorConfig::from_yaml_str("token_rate: 5\n").unwrap_err();
        assert!(
            err.to_string().contains("unknown field `token_rate`"),
            "{err}"
        );
        let err = EmulatorConfig::from_yaml_str("auth: { require_tokens: true }\n").unwrap_err();
        assert!(err.to_string().contains("require_tokens"), "{err}");
    }

    #[test]
    fn limits_parse_per_second_minute_and_hour() {
        assert_eq!(
            "100/s".parse::<WindowLimit>().unwrap(),
            WindowLimit {
                count: 100,
                window: Duration::from_secs(1)
            }
        );
        assert_eq!(
            "300/min".parse::<WindowLimit>().unwrap().window,
            Duration::from_secs(60)
        );
        assert_eq!(
            "5/h".parse::<WindowLimit>().unwrap().window,
            Duration::from_secs(3600)
        );
        assert_eq!(
            "20/10s".parse::<WindowLimit>().unwrap(),
            WindowLimit {
                count: 20,
                window: Duration::from_secs(10)
            },
            "any duration is a window"
        );
        assert_eq!(
            "20/10s".parse::<WindowLimit>().unwrap().to_string(),
            "20/10s"
        );
        assert_eq!("5/min".parse::<WindowLimit>().unwrap().to_string(), "5/min");
        for bad in ["0/s", "10/day", "x/s", "10", "1.5/s", "3/0s"] {
            assert!(bad.parse::<WindowLimit>().is_err(), "{bad} must be refused");
        }
    }

    #[test]
    fn every_cross_field_error_is_reported_at_once() {
        let yaml = r#"
route_limits:
  - { name: a, path: "/api/v2/**", limit: "1/s" }
  - { name: a, method: patch, path: "/api/v2/**", limit: "1/s" }
latency: { min: "50ms", max: "10ms" }
"#;
        let err = EmulatorConfig::from_yaml_str(yaml).unwrap_err().to_string();
        assert!(err.contains("route_limits[1].name: duplicate"), "{err}");
        assert!(err.contains("route_limits[1].method"), "{err}");
        assert!(
            err.contains("latency: min (50ms) is greater than max (10ms)"),
            "{err}"
        );
    }

    #[test]
    fn a_fault_refuses_keys_its_kind_does_not_use() {
        let err = serde_json::from_str::<Fault>(r#"{"kind":"reset","delay":"1s"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`delay` does not apply to kind reset"),
            "{err}"
        );
        let err = serde_json::from_str::<Fault>(r#"{"kind":"status","status":500}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("status 500 is not one of 502, 503, 504"),
            "{err}"
        );
        let err = serde_json::from_str::<Fault>(r#"{"kind":"daily_limit","retry_after":60}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("over 180"), "{err}");
        let err = serde_json::from_str::<Fault>(r#"{"kind":"outage_429"}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs a duration or a retry_after"), "{err}");
    }

    #[test]
    fn a_fault_round_trips_through_json() {
        let fault = Fault::new(FaultKind::Status {
            status: FaultStatus::GatewayTimeout,
            retry_after: Some(2),
        })
        .starting_after(Duration::from_secs(1))
        .lasting(Duration::from_millis(1500))
        .with_rate(0.5);
        let json = serde_json::to_string(&fault).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"status","start":"1s","duration":"1s 500ms","rate":0.5,"status":504,"retry_after":2}"#
        );
        assert_eq!(serde_json::from_str::<Fault>(&json).unwrap(), fault);
    }
}
