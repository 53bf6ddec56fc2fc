//! config.yaml: strict parsing into raw structs, then validation into [`Config`], the only type the
//! request path sees. Every error is collected (not just the first) and names its YAML path and line.

use std::collections::{HashMap, HashSet};

use indexmap::IndexMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::route::{PathTemplate, Priority};

/// One problem in a config file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// YAML path such as `routes[2].budgets`; empty for the document itself.
    pub path: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(line) = self.line {
            write!(f, " at line {line}")?;
        }
        Ok(())
    }
}

/// All the problems of one config file; never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// The validated runtime type.

/// A validated configuration. Built only by [`Config::parse`]; every reference is resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub admin_token_env: Option<String>,
    pub upstreams: Vec<Upstream>,
    pub budgets: Vec<BudgetSpec>,
    pub routes: Vec<RouteSpec>,
    pub queue: QueueSettings,
    pub retry: RetrySettings,
    pub limits: Limits,
    pub workers: usize,
    pub log: LogSettings,
    pub shutdown: ShutdownSettings,
    pub cluster: Option<ClusterSettings>,
    /// Reload when the config file changes (SIGHUP and `POST /-/reload` always work).
    pub watch_file: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub name: String,
    /// The URL as written, for people.
    pub url: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the base URL without a trailing slash ("" for none).
    pub base_path: String,
}

impl Upstream {
    /// The Host header value the upstream expects.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        if self.port == default_port {
            self.host.clone()
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// A rate: `count` requests per `period`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

impl Rate {
    pub fn per_second(per_second: f64) -> Rate {
        Rate { per_second }
    }

    /// Time between two slots at this rate.
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }

    /// Parses `<number>/s`, `<number>/min` or `<number>/h`, number > 0.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let (num, unit) = s
            .trim()
            .split_once('/')
            .ok_or_else(|| format!("invalid rate \"{s}\": expected <number>/s, /min or /h"))?;
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("invalid rate \"{s}\": \"{}\" is not a number", num.trim()))?;
        if !(n.is_finite() && n > 0.0) {
            return Err(format!("invalid rate \"{s}\": the number must be > 0"));
        }
        let seconds = match unit.trim() {
            "s" => 1.0,
            "min" => 60.0,
            "h" => 3600.0,
            other => {
                return Err(format!(
                    "invalid rate \"{s}\": unknown unit \"{other}\" (use s, min or h)"
                ))
            }
        };
        Ok(Rate {
            per_second: n / seconds,
        })
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.per_second >= 1.0 {
            write!(f, "{}/s", trim_float(self.per_second))
        } else {
            write!(f, "{}/min", trim_float(self.per_second * 60.0))
        }
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// What a budget keeps one bucket per.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Per {
    Global,
    Token,
    ClientIp,
    Header(String),
}

impl fmt::Display for Per {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Per::Global => f.write_str("global"),
            Per::Token => f.write_str("token"),
            Per::ClientIp => f.write_str("client_ip"),
            Per::Header(h) => write!(f, "header:{h}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct BudgetSpec {
    pub name: String,
    pub rate: Rate,
    pub burst: u32,
    pub per: Per,
    /// The rate in force never goes below this after upstream 429s.
    pub min_rate: Rate,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec {
    pub name: String,
    pub method: Option<http::Method>,
    pub path: PathTemplate,
    pub strip_prefix: Option<String>,
    /// Index into [`Config::upstreams`].
    pub upstream: usize,
    /// Indexes into [`Config::budgets`].
    pub budgets: Vec<usize>,
    pub max_wait: Duration,
    pub priority: Priority,
}

#[derive(Debug, Clone, PartialEq)]
pub struct QueueSettings {
    pub max_wait: Duration,
    pub max_depth: usize,
    /// Head start per priority level: a request of a lower priority that has waited this much
    /// longer than a higher one goes first, so no priority starves.
    pub aging: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum On5xx {
    Idempotent,
    Never,
    Always,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub max_elapsed: Duration,
    pub on_5xx: On5xx,
    /// Retry-After above this is never waited out (Genesys's daily-limit case).
    pub max_retry_after: Duration,
    /// First backoff when the upstream gives no Retry-After.
    pub backoff_base: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    pub max_body_bytes: usize,
    /// Upstream timeouts.
    pub connect_timeout: Duration,
    pub upstream_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LogSettings {
    pub format: LogFormat,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownSettings {
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    pub redis_url: String,
    pub key_prefix: String,
    pub fallback_replicas: u32,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                path: String::new(),
                line: None,
                message: format!("cannot read {}: {e}", path.display()),
            }])
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text, reporting every error found.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let lines = LineIndex::build(text);
        let mut errors = Vec::new();
        let mut ignored = Vec::new();
        let de = serde_yaml::Deserializer::from_str(text);
        let raw: Result<RawConfig, _> =
            serde_ignored::deserialize(de, |path| ignored.push(format_path(&path)));
        for path in ignored {
            let (parent, key) = match path.rsplit_once('.') {
                Some((p, k)) => (p.to_string(), k.to_string()),
                None => (String::new(), path.clone()),
            };
            errors.push(ConfigError {
                line: lines.key_line(&path),
                message: format!("unknown key \"{key}\""),
                path: parent,
            });
        }
        let raw = match raw {
            Ok(raw) => raw,
            Err(e) => {
                errors.push(yaml_error(&e));
                return Err(finish(errors));
            }
        };
        let mut v = Validator {
            lines: &lines,
            errors,
        };
        let config = v.config(raw);
        if v.errors.is_empty() {
            Ok(config.expect("a config without errors is complete"))
        } else {
            Err(finish(v.errors))
        }
    }

    /// The keys that a reload cannot change in a running process.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.listen != new.listen {
            keys.push("listen");
        }
        if self.admin_listen != new.admin_listen {
            keys.push("admin_listen");
        }
        if self.workers != new.workers {
            keys.push("workers");
        }
        if self.cluster != new.cluster {
            keys.push("cluster");
        }
        if self.log != new.log {
            keys.push("log");
        }
        keys
    }

    /// A one-line summary for people (`check`, reload answers).
    pub fn summary(&self) -> String {
        format!(
            "{} routes, {} budgets, {} upstreams; listening on {}, admin on {}",
            self.routes.len(),
            self.budgets.len(),
            self.upstreams.len(),
            self.listen,
            self.admin_listen
        )
    }

    pub fn budget_index(&self, name: &str) -> Option<usize> {
        self.budgets.iter().position(|b| b.name == name)
    }
}

fn finish(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    ConfigErrors(errors)
}

fn yaml_error(e: &serde_yaml::Error) -> ConfigError {
    // serde_yaml's message already starts with the path ("routes[0].match: invalid type ...")
    // and ends with " at line L column C"; keep the line as ours.
    let msg = e.to_string();
    // Drop serde_yaml's own " at line L column C" parts: the line is reported as ours.
    let mut msg = msg.as_str().to_string();
    while let Some(i) = msg.find(" at line ") {
        let rest = &msg[i + " at line ".len()..];
        let end = rest
            .find(|c: char| {
                !(c.is_ascii_digit() || c == ' ' || c.is_ascii_alphabetic() && "column".contains(c))
            })
            .unwrap_or(rest.len());
        msg = format!("{}{}", &msg[..i], &rest[end..]);
    }
    let (path, message) = match msg.split_once(": ") {
        Some((p, m)) if !p.contains(' ') => (p.to_string(), m.to_string()),
        _ => (String::new(), format!("invalid YAML: {msg}")),
    };
    ConfigError {
        path,
        line: e.location().map(|l| l.line()),
        message,
    }
}

fn format_path(path: &serde_ignored::Path) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", format_path(parent)),
        P::Map { parent, key } => {
            let p = format_path(parent);
            if p.is_empty() {
                key.clone()
            } else {
                format!("{p}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            format_path(parent)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Line numbers: serde_yaml gives none for values that parse fine but are wrong, so the text is
// walked once more with a marked event parser to map each YAML path to its line.

struct LineIndex {
    /// path -> (line of the key, line of the value)
    lines: HashMap<String, (usize, usize)>,
}

impl LineIndex {
    fn build(text: &str) -> LineIndex {
        let mut rx = LineCollector::default();
        let mut parser = yaml_rust2::parser::Parser::new_from_str(text);
        // A broken document yields a partial index; serde_yaml reports the syntax error.
        let _ = parser.load(&mut rx, false);
        LineIndex { lines: rx.lines }
    }

    /// Line of the value at `path` (or of its key for a map entry).
    fn line(&self, path: &str) -> Option<usize> {
        self.lines.get(path).map(|&(_, v)| v)
    }

    fn key_line(&self, path: &str) -> Option<usize> {
        self.lines.get(path).map(|&(k, _)| k)
    }
}

enum Frame {
    Map {
        path: String,
        pending_key: Option<(String, usize)>,
    },
    Seq {
        path: String,
        next: usize,
    },
}

#[derive(Default)]
struct LineCollector {
    stack: Vec<Frame>,
    lines: HashMap<String, (usize, usize)>,
}

impl LineCollector {
    /// Called for a node starting at `line`: returns the node's path, or None when it is a map key.
    fn node_path(&mut self, scalar: Option<&str>, line: usize) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                self.lines.insert(p.clone(), (line, line));
                Some(p)
            }
            Some(Frame::Map { path, pending_key }) => match pending_key.take() {
                None => {
                    *pending_key = Some((scalar.unwrap_or("").to_string(), line));
                    None
                }
                Some((key, key_line)) => {
                    let p = if path.is_empty() {
                        key
                    } else {
                        format!("{path}.{key}")
                    };
                    self.lines.insert(p.clone(), (key_line, line));
                    Some(p)
                }
            },
        }
    }
}

impl yaml_rust2::parser::MarkedEventReceiver for LineCollector {
    fn on_event(&mut self, ev: yaml_rust2::parser::Event, mark: yaml_rust2::scanner::Marker) {
        use yaml_rust2::parser::Event;
        let line = mark.line();
        match ev {
            Event::Scalar(value, ..) => {
                self.node_path(Some(&value), line);
            }
            Event::Alias(_) => {
                self.node_path(None, line);
            }
            Event::MappingStart(..) => {
                let path = self.node_path(None, line).unwrap_or_default();
                self.stack.push(Frame::Map {
                    path,
                    pending_key: None,
                });
            }
            Event::SequenceStart(..) => {
                let path = self.node_path(None, line).unwrap_or_default();
                self.stack.push(Frame::Seq { path, next: 0 });
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The raw, as-written shape. Strings where a value needs its own parsing, so that a bad rate or
// duration becomes one collected error instead of stopping the parse.

#[derive(Deserialize)]
struct RawConfig {
    listen: String,
    #[serde(default)]
    admin_listen: Option<String>,
    #[serde(default)]
    admin_token_env: Option<String>,
    upstreams: IndexMap<String, RawUpstream>,
    #[serde(default)]
    budgets: IndexMap<String, RawBudget>,
    routes: Vec<RawRoute>,
    #[serde(default)]
    queue: RawQueue,
    #[serde(default)]
    retry: RawRetry,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    workers: Option<usize>,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    shutdown: RawShutdown,
    #[serde(default)]
    cluster: Option<RawCluster>,
    #[serde(default)]
    reload: RawReload,
}

#[derive(Deserialize, Default)]
struct RawReload {
    watch_file: Option<bool>,
}

#[derive(Deserialize)]
struct RawUpstream {
    url: String,
}

#[derive(Deserialize)]
struct RawBudget {
    rate: String,
    #[serde(default)]
    burst: Option<i64>,
    #[serde(default)]
    per: Option<String>,
    #[serde(default)]
    min_rate: Option<String>,
}

#[derive(Deserialize)]
struct RawRoute {
    name: String,
    #[serde(rename = "match")]
    matcher: RawMatch,
    #[serde(default)]
    strip_prefix: Option<String>,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    budgets: Vec<String>,
    #[serde(default)]
    max_wait: Option<String>,
    #[serde(default)]
    priority: Option<String>,
}

#[derive(Deserialize)]
struct RawMatch {
    #[serde(default)]
    method: Option<String>,
    path: String,
}

#[derive(Deserialize, Default)]
struct RawQueue {
    max_wait: Option<String>,
    max_depth: Option<i64>,
    aging: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawRetry {
    max_attempts: Option<i64>,
    max_elapsed: Option<String>,
    on_5xx: Option<String>,
    max_retry_after: Option<String>,
    backoff_base: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawLimits {
    max_body_bytes: Option<i64>,
    connect_timeout: Option<String>,
    upstream_timeout: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawLog {
    format: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawShutdown {
    drain_timeout: Option<String>,
}

#[derive(Deserialize)]
struct RawCluster {
    redis_url: String,
    #[serde(default)]
    key_prefix: Option<String>,
    #[serde(default)]
    fallback_replicas: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Validation.

struct Validator<'a> {
    lines: &'a LineIndex,
    errors: Vec<ConfigError>,
}

impl Validator<'_> {
    fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &str, raw: Option<&str>, default: Duration) -> Duration {
        match raw {
            None => default,
            Some(s) => match parse_duration(s) {
                Ok(d) => d,
                Err(m) => {
                    self.err(path, m);
                    default
                }
            },
        }
    }

    fn whole(&mut self, path: &str, raw: Option<i64>, min: i64, default: i64) -> i64 {
        match raw {
            None => default,
            Some(n) if n >= min => n,
            Some(n) => {
                self.err(path, format!("must be a whole number >= {min}, not {n}"));
                default
            }
        }
    }

    fn socket(&mut self, path: &str, raw: &str) -> SocketAddr {
        raw.parse().unwrap_or_else(|_| {
            self.err(
                path,
                format!("invalid address \"{raw}\": expected IP:PORT such as 0.0.0.0:8080"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }

    fn config(&mut self, raw: RawConfig) -> Option<Config> {
        let listen = self.socket("listen", &raw.listen);
        let admin_listen = self.socket(
            "admin_listen",
            raw.admin_listen.as_deref().unwrap_or("127.0.0.1:9090"),
        );
        if raw.admin_listen.is_some() && listen == admin_listen {
            self.err("admin_listen", "must differ from listen");
        }
        if let Some(env) = &raw.admin_token_env {
            if env.is_empty() {
                self.err("admin_token_env", "must name an environment variable");
            }
        }

        let mut upstreams = Vec::new();
        if raw.upstreams.is_empty() {
            self.err("upstreams", "at least one upstream is required");
        }
        for (name, u) in &raw.upstreams {
            let path = format!("upstreams.{name}.url");
            match parse_upstream_url(&u.url) {
                Ok((tls, host, port, base_path)) => upstreams.push(Upstream {
                    name: name.clone(),
                    url: u.url.clone(),
                    tls,
                    host,
                    port,
                    base_path,
                }),
                Err(m) => self.err(&path, m),
            }
        }

        let mut budgets = Vec::new();
        for (name, b) in &raw.budgets {
            let base = format!("budgets.{name}");
            let rate = match Rate::parse(&b.rate) {
                Ok(r) => Some(r),
                Err(m) => {
                    self.err(&format!("{base}.rate"), m);
                    None
                }
            };
            let burst = self.whole(&format!("{base}.burst"), b.burst, 1, 1);
            let per = match b.per.as_deref() {
                None | Some("global") => Per::Global,
                Some("token") => Per::Token,
                Some("client_ip") => Per::ClientIp,
                Some(p) => match p.strip_prefix("header:") {
                    Some(h) if http::HeaderName::from_bytes(h.trim().as_bytes()).is_ok() => {
                        Per::Header(h.trim().to_ascii_lowercase())
                    }
                    _ => {
                        self.err(
                            &format!("{base}.per"),
                            format!(
                                "invalid per \"{p}\": use global, token, client_ip or header:<Name>"
                            ),
                        );
                        Per::Global
                    }
                },
            };
            let min_rate = match (&b.min_rate, rate) {
                (Some(s), Some(rate)) => match Rate::parse(s) {
                    Ok(m) if m.per_second <= rate.per_second => Some(m),
                    Ok(_) => {
                        self.err(&format!("{base}.min_rate"), "must not exceed rate");
                        None
                    }
                    Err(m) => {
                        self.err(&format!("{base}.min_rate"), m);
                        None
                    }
                },
                (None, Some(rate)) => Some(Rate::per_second(rate.per_second * 0.1)),
                _ => None,
            };
            if let (Some(rate), Some(min_rate)) = (rate, min_rate) {
                budgets.push(BudgetSpec {
                    name: name.clone(),
                    rate,
                    burst: burst as u32,
                    per,
                    min_rate,
                });
            }
        }

        let queue_max_wait =
            self.duration("queue.max_wait", raw.queue.max_wait.as_deref(), secs(30));
        let queue = QueueSettings {
            max_wait: queue_max_wait,
            max_depth: self.whole("queue.max_depth", raw.queue.max_depth, 1, 10_000) as usize,
            aging: self.duration("queue.aging", raw.queue.aging.as_deref(), secs(10)),
        };

        let mut routes: Vec<RouteSpec> = Vec::new();
        let mut seen = HashSet::new();
        if raw.routes.is_empty() {
            self.err("routes", "at least one route is required");
        }
        for (i, r) in raw.routes.iter().enumerate() {
            let base = format!("routes[{i}]");
            if r.name.is_empty() {
                self.err(&format!("{base}.name"), "must not be empty");
            } else if !seen.insert(r.name.clone()) {
                self.err(
                    &format!("{base}.name"),
                    format!("duplicate route name \"{}\"", r.name),
                );
            }
            let method = r.matcher.method.as_deref().and_then(|m| {
                let upper = m.to_ascii_uppercase();
                match http::Method::from_bytes(upper.as_bytes()) {
                    Ok(m) => Some(m),
                    Err(_) => {
                        self.err(
                            &format!("{base}.match.method"),
                            format!("invalid method \"{m}\""),
                        );
                        None
                    }
                }
            });
            let path = match PathTemplate::parse(&r.matcher.path) {
                Ok(p) => Some(p),
                Err(m) => {
                    self.err(&format!("{base}.match.path"), m);
                    None
                }
            };
            if let Some(prefix) = &r.strip_prefix {
                if !prefix.starts_with('/') || prefix.len() < 2 || prefix.ends_with('/') {
                    self.err(
                        &format!("{base}.strip_prefix"),
                        format!(
                            "invalid prefix \"{prefix}\": must start with / and not end with /"
                        ),
                    );
                }
            }
            let upstream = match &r.upstream {
                Some(name) => match upstreams.iter().position(|u| &u.name == name) {
                    Some(i) => Some(i),
                    None => {
                        if raw.upstreams.contains_key(name) {
                            None // its own error is already reported
                        } else {
                            self.err(
                                &format!("{base}.upstream"),
                                format!("unknown upstream \"{name}\""),
                            );
                            None
                        }
                    }
                },
                None if raw.upstreams.len() == 1 => {
                    if upstreams.len() == 1 {
                        Some(0)
                    } else {
                        None
                    }
                }
                None => {
                    self.err(
                        &base,
                        "upstream is required when more than one upstream is declared",
                    );
                    None
                }
            };
            let mut route_budgets = Vec::new();
            for (j, name) in r.budgets.iter().enumerate() {
                let p = format!("{base}.budgets[{j}]");
                match budgets.iter().position(|b| &b.name == name) {
                    Some(k) if route_budgets.contains(&k) => {
                        self.err(&p, format!("budget \"{name}\" named twice"))
                    }
                    Some(k) => route_budgets.push(k),
                    None if raw.budgets.contains_key(name) => {}
                    None => self.err(&p, format!("unknown budget \"{name}\"")),
                }
            }
            let max_wait = self.duration(
                &format!("{base}.max_wait"),
                r.max_wait.as_deref(),
                queue_max_wait,
            );
            let priority = match r.priority.as_deref() {
                None | Some("normal") => Priority::Normal,
                Some("high") => Priority::High,
                Some("low") => Priority::Low,
                Some(p) => {
                    self.err(
                        &format!("{base}.priority"),
                        format!("invalid priority \"{p}\": use high, normal or low"),
                    );
                    Priority::Normal
                }
            };
            if let (Some(path), Some(upstream)) = (path, upstream) {
                routes.push(RouteSpec {
                    name: r.name.clone(),
                    method,
                    path,
                    strip_prefix: r.strip_prefix.clone(),
                    upstream,
                    budgets: route_budgets,
                    max_wait,
                    priority,
                });
            }
        }

        let max_attempts = self.whole("retry.max_attempts", raw.retry.max_attempts, 1, 5);
        if max_attempts > crate::server::MAX_ATTEMPTS_CAP as i64 {
            self.err(
                "retry.max_attempts",
                format!("must be at most {}", crate::server::MAX_ATTEMPTS_CAP),
            );
        }
        let max_attempts = max_attempts as u32;
        let on_5xx = match raw.retry.on_5xx.as_deref() {
            None | Some("idempotent") => On5xx::Idempotent,
            Some("never") => On5xx::Never,
            Some("always") => On5xx::Always,
            Some(o) => {
                self.err(
                    "retry.on_5xx",
                    format!("invalid value \"{o}\": use idempotent, never or always"),
                );
                On5xx::Idempotent
            }
        };
        let retry = RetrySettings {
            max_attempts,
            max_elapsed: self.duration(
                "retry.max_elapsed",
                raw.retry.max_elapsed.as_deref(),
                secs(60),
            ),
            on_5xx,
            max_retry_after: self.duration(
                "retry.max_retry_after",
                raw.retry.max_retry_after.as_deref(),
                secs(180),
            ),
            backoff_base: self.duration(
                "retry.backoff_base",
                raw.retry.backoff_base.as_deref(),
                secs(1),
            ),
        };

        let limits = Limits {
            max_body_bytes: self.whole(
                "limits.max_body_bytes",
                raw.limits.max_body_bytes,
                0,
                512_000,
            ) as usize,
            connect_timeout: self.duration(
                "limits.connect_timeout",
                raw.limits.connect_timeout.as_deref(),
                secs(5),
            ),
            upstream_timeout: self.duration(
                "limits.upstream_timeout",
                raw.limits.upstream_timeout.as_deref(),
                secs(30),
            ),
        };

        let workers = match raw.workers {
            Some(0) => {
                self.err("workers", "must be at least 1");
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        };

        let log = LogSettings {
            format: match raw.log.format.as_deref() {
                None | Some("text") => LogFormat::Text,
                Some("json") => LogFormat::Json,
                Some(f) => {
                    self.err(
                        "log.format",
                        format!("invalid format \"{f}\": use text or json"),
                    );
                    LogFormat::Text
                }
            },
        };
        let shutdown = ShutdownSettings {
            drain_timeout: self.duration(
                "shutdown.drain_timeout",
                raw.shutdown.drain_timeout.as_deref(),
                secs(30),
            ),
        };

        let cluster = raw.cluster.as_ref().map(|c| {
            if !(c.redis_url.starts_with("redis://") || c.redis_url.starts_with("rediss://")) {
                self.err(
                    "cluster.redis_url",
                    format!(
                        "invalid URL \"{}\": expected redis://host:port/db",
                        c.redis_url
                    ),
                );
            }
            ClusterSettings {
                redis_url: c.redis_url.clone(),
                key_prefix: c
                    .key_prefix
                    .clone()
                    .unwrap_or_else(|| "shiftgate:".to_string()),
                fallback_replicas: self.whole(
                    "cluster.fallback_replicas",
                    c.fallback_replicas,
                    1,
                    3,
                ) as u32,
            }
        });

        if !self.errors.is_empty() {
            return None;
        }
        Some(Config {
            listen,
            admin_listen,
            admin_token_env: raw.admin_token_env,
            upstreams,
            budgets,
            routes,
            queue,
            retry,
            limits,
            workers,
            log,
            shutdown,
            cluster,
            watch_file: raw.reload.watch_file.unwrap_or(true),
        })
    }
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Parses `500ms`, `30s`, `2m`, `1h` (and combinations humantime accepts).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|_| format!("invalid duration \"{s}\": use e.g. 500ms, 30s, 2m or 1h"))
}

/// Splits an upstream base URL into (tls, host, port, base path).
fn parse_upstream_url(url: &str) -> Result<(bool, String, u16, String), String> {
    let uri: http::Uri = url.parse().map_err(|_| format!("invalid URL \"{url}\""))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => {
            return Err(format!(
                "invalid URL \"{url}\": the scheme must be http or https"
            ))
        }
    };
    let host = uri
        .host()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| format!("invalid URL \"{url}\": no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if uri.query().is_some() {
        return Err(format!("invalid URL \"{url}\": a query is not allowed"));
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_string();
    Ok((tls, host, port, base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "listen: \"127.0.0.1:8080\"\nupstreams:\n  api: { url: \"http://127.0.0.1:9000\" }\nroutes:\n  - name: all\n    match: { path: \"/**\" }\n";

    #[test]
    fn minimal_config_gets_the_documented_defaults() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.queue.max_wait, secs(30));
        assert_eq!(c.queue.max_depth, 10_000);
        assert_eq!(c.retry.max_attempts, 5);
        assert_eq!(c.retry.max_elapsed, secs(60));
        assert_eq!(c.retry.on_5xx, On5xx::Idempotent);
        assert_eq!(c.limits.max_body_bytes, 512_000);
        assert_eq!(c.shutdown.drain_timeout, secs(30));
        assert_eq!(c.log.format, LogFormat::Text);
        assert!(c.cluster.is_none());
        assert!(c.budgets.is_empty());
        // A single upstream may be left out of a route.
        assert_eq!(c.routes[0].upstream, 0);
        assert!(c.routes[0].budgets.is_empty());
        assert!(c.watch_file);
        let off = Config::parse(&format!("{MINIMAL}reload:\n  watch_file: false\n")).unwrap();
        assert!(!off.watch_file);
    }

    #[test]
    fn rates_parse_in_each_unit() {
        assert_eq!(Rate::parse("100/s").unwrap().per_second, 100.0);
        assert_eq!(Rate::parse("300/min").unwrap().per_second, 5.0);
        assert_eq!(Rate::parse("3600/h").unwrap().per_second, 1.0);
        assert!(Rate::parse("0/s").is_err());
        assert!(Rate::parse("-1/s").is_err());
        assert!(Rate::parse("10/day").is_err());
        assert!(Rate::parse("ten/s").is_err());
    }

    #[test]
    fn upstream_urls_split_into_parts() {
        assert_eq!(
            parse_upstream_url("https://api.mypurecloud.com").unwrap(),
            (true, "api.mypurecloud.com".into(), 443, "".into())
        );
        assert_eq!(
            parse_upstream_url("http://127.0.0.1:81/base/").unwrap(),
            (false, "127.0.0.1".into(), 81, "/base".into())
        );
        assert!(parse_upstream_url("ftp://x").is_err());
    }

    #[test]
    fn line_index_maps_paths_to_lines() {
        let idx = LineIndex::build(MINIMAL);
        assert_eq!(idx.line("listen"), Some(1));
        assert_eq!(idx.line("upstreams.api.url"), Some(3));
        assert_eq!(idx.line("routes[0]"), Some(5));
        assert_eq!(idx.line("routes[0].match.path"), Some(6));
    }
}
