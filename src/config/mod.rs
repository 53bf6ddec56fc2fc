//! config.yaml, validated into [`Config`]: the request path only ever sees validated config.
//!
//! Three steps, one file each: `raw` deserializes the text strictly into the as-written shape,
//! `lines` maps every YAML path to its line, `validate` turns the raw shape into [`Config`] with
//! every reference resolved. Every error is collected (not just the first) and names its
//! YAML path and line; this file holds the validated types and the entry points.

mod lines;
mod raw;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::route::{PathTemplate, Priority};
use crate::tls::CertPair;
use lines::LineIndex;
use validate::Validator;

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

/// `admin_listen` when the config names none.
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9090";

/// A validated configuration. Built only by [`Config::parse`]; every reference is resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// The token `POST /-/reload` requires: set exactly when `admin_token_env` is.
    pub admin_token: Option<AdminToken>,
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
    /// Also serve clients over HTTPS.
    pub tls: Option<TlsSettings>,
    /// Reload when the config file changes (SIGHUP and `POST /-/reload` always work).
    pub watch_file: bool,
    /// `trusted_proxies`: networks of the proxies in front of shiftgate (an ingress, a load
    /// balancer). A request whose socket peer is in one of them comes from `X-Forwarded-For`'s
    /// right-most address outside them (see [`crate::forwarded::client_ip`]), for `per:
    /// client_ip` and the access line. Empty (the default): the socket peer, and
    /// `X-Forwarded-For` is never read.
    pub trusted_proxies: Vec<ipnet::IpNet>,
}

/// The admin token, read when the config is loaded from the variable `admin_token_env` names.
///
/// Only its SHA-256 is kept, so no `Debug`, log line or core dump shows it, and comparing
/// digests in constant time leaks neither the token's bytes nor its length.
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken {
    /// The variable it was read from, for people.
    pub env: String,
    digest: [u8; 32],
}

impl AdminToken {
    /// A token whose value is `value`, read from the variable `env`.
    pub fn new(env: impl Into<String>, value: &str) -> AdminToken {
        AdminToken {
            env: env.into(),
            digest: sha256(value.as_bytes()),
        }
    }

    /// Whether `given` is the token, in time that does not depend on where they differ.
    ///
    /// ```
    /// use shiftgate::config::AdminToken;
    ///
    /// let t = AdminToken::new("SHIFTGATE_ADMIN_TOKEN", "s3cret");
    /// assert!(t.matches(b"s3cret"));
    /// assert!(!t.matches(b"s3cre") && !t.matches(b"s3cret2") && !t.matches(b""));
    /// ```
    pub fn matches(&self, given: &[u8]) -> bool {
        let given = sha256(given);
        self.digest
            .iter()
            .zip(&given)
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdminToken")
            .field("env", &self.env)
            .finish_non_exhaustive()
    }
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
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
    /// [`Upstream::host_header`], made once: sent with every request.
    pub host_value: http::HeaderValue,
    /// The host when it is an IP address (no name to resolve), parsed once.
    pub ip: Option<std::net::IpAddr>,
}

impl Upstream {
    pub fn new(
        name: String,
        url: String,
        tls: bool,
        host: String,
        port: u16,
        base_path: String,
    ) -> Upstream {
        let mut u = Upstream {
            name,
            url,
            tls,
            port,
            base_path,
            host_value: http::HeaderValue::from_static(""),
            ip: host.parse().ok(),
            host,
        };
        // A host the URL parser accepted is always a valid header value.
        if let Ok(v) = http::HeaderValue::try_from(u.host_header()) {
            u.host_value = v;
        }
        u
    }

    /// The Host header value the upstream expects: an IPv6 address in brackets, the port
    /// when it is not the scheme's.
    pub fn host_header(&self) -> String {
        let default_port = if self.tls { 443 } else { 80 };
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == default_port {
            host
        } else {
            format!("{host}:{}", self.port)
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
        let per_second = n / seconds;
        if !(MIN_RATE_PER_SECOND..=MAX_RATE_PER_SECOND).contains(&per_second) {
            return Err(format!(
                "invalid rate \"{s}\": at least 1 a day (0.0417/h) and at most {MAX_RATE_PER_SECOND}/s"
            ));
        }
        Ok(Rate { per_second })
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
    /// Keyed budgets: the most keys (buckets) kept at once; idle keys are evicted first (see
    /// [`crate::pacer::queue`]). Unused by a global budget.
    pub max_keys: usize,
}

/// `max_keys` when the config names none.
pub const DEFAULT_MAX_KEYS: usize = 100_000;
/// The largest `max_keys` accepted: at well under 1 KiB per idle key, 10 million keys is
/// already gigabytes.
pub const MAX_KEYS_CAP: i64 = 10_000_000;

/// A budget's `min_rate` when its config names none, as a share of its `rate`.
const DEFAULT_MIN_RATE_SHARE: f64 = 0.1;

impl BudgetSpec {
    /// A budget with the `min_rate` that validation gives one whose config names none: a tenth
    /// of `rate`.
    ///
    /// ```
    /// use shiftgate::config::{BudgetSpec, Per, Rate};
    ///
    /// let b = BudgetSpec::new("presence", Rate::per_second(100.0), 1, Per::Global);
    /// assert_eq!(b.min_rate, Rate::per_second(10.0));
    /// ```
    pub fn new(name: impl Into<String>, rate: Rate, burst: u32, per: Per) -> BudgetSpec {
        BudgetSpec {
            name: name.into(),
            rate,
            burst,
            per,
            min_rate: Rate::per_second(rate.per_second * DEFAULT_MIN_RATE_SHARE),
            max_keys: DEFAULT_MAX_KEYS,
        }
    }
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
    /// Send its single updates as bulk calls through another route.
    pub coalesce: Option<Coalesce>,
}

/// `routes[].coalesce`: single presence updates sent as bulk calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Coalesce {
    /// Index into [`Config::routes`] of the bulk route (`PUT`): its upstream and budgets carry
    /// the bulk calls.
    pub into: usize,
    /// The longest the first update of a batch waits for more.
    pub window: Duration,
    /// Updates per bulk call, 1 ..= [`MAX_BATCH`].
    pub max_batch: usize,
}

/// Genesys's bulk presence call is assumed to take at most 50 entries (undocumented; the bulk
/// GETs say "limit 50").
pub const MAX_BATCH: usize = 50;
/// `coalesce.window`'s default: long enough to gather a burst's updates, short next to the
/// 200 ms an update takes upstream.
pub const DEFAULT_COALESCE_WINDOW: Duration = Duration::from_millis(10);

impl crate::route::Matches for RouteSpec {
    fn method(&self) -> Option<&http::Method> {
        self.method.as_ref()
    }

    fn path(&self) -> &PathTemplate {
        &self.path
    }
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

/// Upper bound of `retry.max_attempts`: Pingora's retry loop is sized once at start (the server
/// sets its `max_retries` to this), so no config, reloaded or not, may ask for more.
pub const MAX_ATTEMPTS_CAP: usize = 50;

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
    /// A request head (of any request on a connection) not complete this long after it began
    /// (for the first, after the connection was accepted): the connection is closed.
    pub client_header_timeout: Duration,
    /// A keep-alive connection with no request for this long is closed.
    pub client_idle_timeout: Duration,
    /// Client connections open at once, both listeners together; past it a new one is answered
    /// `503 shiftgate.overloaded` and closed.
    pub max_connections: usize,
}

/// Upper bound of `limits.max_connections`: far above any open-files limit, so a typo (an extra
/// zero or three) is caught rather than silently meaning "no cap".
pub const MAX_CONNECTIONS_CAP: usize = 10_000_000;

/// `tls`: the HTTPS listener and the certificate it serves.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsSettings {
    pub listen: SocketAddr,
    /// The files, as written (relative to the working directory), re-read on every reload.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Their contents, loaded and checked when the config was.
    pub pair: CertPair,
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

/// What a stop adds to the drain and the upstream timeout before the process exits for certain:
/// the last answers' writes and the runtimes' shutdown (1 s).
pub const STOP_MARGIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq)]
pub struct ClusterSettings {
    pub redis_url: String,
    pub key_prefix: String,
    pub fallback_replicas: u32,
}

impl Config {
    /// Whether the client edge can queue any request under this config (see
    /// `admission::at_edge`): some route is paced without coalescing, and there are no
    /// replicas (the shared budget's leases count on a grant being used at once; the proxy's
    /// hook admits those, right before the upstream call).
    pub fn queues_at_edge(&self) -> bool {
        self.cluster.is_none()
            && self
                .routes
                .iter()
                .any(|r| !r.budgets.is_empty() && r.coalesce.is_none())
    }

    /// The longest a stop takes, SIGTERM to exit: `shutdown.drain_timeout` (requests already
    /// waiting are still paced and sent), then `limits.upstream_timeout` (an attempt sent at the
    /// drain's end gets its answer), then [`STOP_MARGIN`]. The process exits then, whatever is
    /// still in flight. Whatever stops it must wait longer before SIGKILL: systemd's
    /// `TimeoutStopSec`, Kubernetes's `terminationGracePeriodSeconds` (with preStop on top).
    ///
    /// ```
    /// let c = shiftgate::config::Config::parse(
    ///     "listen: \"127.0.0.1:1\"\nupstreams: { api: { url: \"http://127.0.0.1:2\" } }\nroutes: [{ name: all, match: { path: \"/**\" } }]\n",
    /// ).unwrap();
    /// assert_eq!(c.stop_timeout(), std::time::Duration::from_secs(30 + 30 + 5));
    /// ```
    pub fn stop_timeout(&self) -> Duration {
        self.shutdown
            .drain_timeout
            .saturating_add(self.limits.upstream_timeout)
            .saturating_add(STOP_MARGIN)
    }

    /// Reads and validates a config file; `admin_token_env` is looked up in the process's
    /// environment.
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

    /// Parses and validates config text, reporting every error found; `admin_token_env` is
    /// looked up in the process's environment.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        Config::parse_with_env(text, &process_env)
    }

    /// [`Config::parse`] with the environment given as a lookup (`None`: the variable is
    /// unset), so that a test does not depend on the environment of the process it runs in.
    pub fn parse_with_env(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let lines = LineIndex::build(text);
        let (raw, errors) = raw::parse(text, &lines).map_err(finish)?;
        Validator::new(&lines, errors, env)
            .config(raw)
            .map_err(finish)
    }

    /// The keys that a reload cannot change in a running process, among those that differ in
    /// `new`.
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        RESTART_ONLY
            .iter()
            .filter(|k| (k.differs)(self, new))
            .map(|k| k.key)
            .collect()
    }

    /// Sets every key a reload cannot change back to its value in `running`, so that the config
    /// stored after a reload states what is in force.
    pub fn keep_restart_only(&mut self, running: &Config) {
        for k in &RESTART_ONLY {
            (k.keep)(self, running);
        }
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

/// A key whose new value a reload cannot apply: the listeners are bound, the worker threads
/// started, the cluster store and the log writer set up once, at start.
struct RestartOnly {
    key: &'static str,
    differs: fn(&Config, &Config) -> bool,
    /// Sets the first config's value to the second's.
    keep: fn(&mut Config, &Config),
}

/// The keys a reload cannot change, listed once: [`Config::restart_needed`] names those that
/// changed, [`Config::keep_restart_only`] carries their running values over.
const RESTART_ONLY: [RestartOnly; 6] = [
    RestartOnly {
        key: "listen",
        differs: |a, b| a.listen != b.listen,
        keep: |new, running| new.listen = running.listen,
    },
    RestartOnly {
        key: "admin_listen",
        differs: |a, b| a.admin_listen != b.admin_listen,
        keep: |new, running| new.admin_listen = running.admin_listen,
    },
    RestartOnly {
        key: "workers",
        differs: |a, b| a.workers != b.workers,
        keep: |new, running| new.workers = running.workers,
    },
    RestartOnly {
        key: "cluster",
        differs: |a, b| a.cluster != b.cluster,
        keep: |new, running| new.cluster = running.cluster.clone(),
    },
    RestartOnly {
        key: "log",
        differs: |a, b| a.log != b.log,
        keep: |new, running| new.log = running.log.clone(),
    },
    // The HTTPS listener is bound once; its certificate pair reloads (when both configs have
    // one). Without a listener there is nothing to serve a pair on; with one, a config that
    // drops `tls` keeps it serving the old pair until the restart.
    RestartOnly {
        key: "tls.listen",
        differs: |a, b| a.tls.as_ref().map(|t| t.listen) != b.tls.as_ref().map(|t| t.listen),
        keep: |new, running| match (&mut new.tls, &running.tls) {
            (Some(new), Some(running)) => new.listen = running.listen,
            (new, running) => *new = running.clone(),
        },
    },
];

/// A variable of the process's environment. A value that is not UTF-8 is kept, its bad bytes
/// replaced, so that validation says what is wrong with it instead of calling it unset.
fn process_env(name: &str) -> Option<String> {
    std::env::var_os(name).map(|v| v.to_string_lossy().into_owned())
}

/// The errors in line order; those without a line last, equal lines in the order found.
fn finish(mut errors: Vec<ConfigError>) -> ConfigErrors {
    errors.sort_by_key(|e| e.line.unwrap_or(usize::MAX));
    ConfigErrors(errors)
}

/// The longest duration any key takes: waits and timeouts of a request path, where a day is
/// already far past any use (and longer ones would overflow the clock arithmetic).
pub const MAX_DURATION: Duration = Duration::from_secs(86_400);

/// The slowest rate a budget takes: one a day.
pub const MIN_RATE_PER_SECOND: f64 = 1.0 / 86_400.0;

/// The fastest rate a budget takes (1 µs apart).
pub const MAX_RATE_PER_SECOND: f64 = 1_000_000.0;

/// Parses `500ms`, `30s`, `2m`, `1h` (and combinations humantime accepts), at most
/// [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s.trim())
        .map_err(|_| format!("invalid duration \"{s}\": use e.g. 500ms, 30s, 2m or 1h"))?;
    if d > MAX_DURATION {
        return Err(format!("invalid duration \"{s}\": at most 24h"));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::validate::secs;
    use super::*;

    /// The smallest valid config; the line index tests read it too.
    pub(super) const MINIMAL: &str = "listen: \"127.0.0.1:8080\"\nupstreams:\n  api: { url: \"http://127.0.0.1:9000\" }\nroutes:\n  - name: all\n    match: { path: \"/**\" }\n";

    #[test]
    fn the_host_header_keeps_an_ipv6_address_in_brackets() {
        let host = |url: &str| {
            let c = Config::parse(&MINIMAL.replace("http://127.0.0.1:9000", url)).unwrap();
            c.upstreams[0].host_header()
        };
        assert_eq!(host("http://[::1]:9000"), "[::1]:9000");
        assert_eq!(host("https://[2001:db8::1]"), "[2001:db8::1]");
        assert_eq!(host("http://127.0.0.1:9000"), "127.0.0.1:9000");
        assert_eq!(host("https://api.mypurecloud.com"), "api.mypurecloud.com");
    }

    #[test]
    fn coalesce_names_the_bulk_route_and_takes_its_defaults() {
        let yaml = format!(
            "{MINIMAL}    coalesce: {{ into: bulk }}\n  - name: bulk\n    match: {{ method: PUT, path: \"/bulk\" }}\n"
        )
        .replacen("path: \"/**\"", "method: PATCH, path: \"/**\"", 1);
        let c = Config::parse(&yaml).unwrap();
        assert_eq!(
            c.routes[0].coalesce,
            Some(Coalesce {
                into: 1,
                window: DEFAULT_COALESCE_WINDOW,
                max_batch: MAX_BATCH,
            })
        );
        assert_eq!(c.routes[1].coalesce, None);
    }

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
        assert_eq!(c.limits.client_header_timeout, secs(10));
        assert_eq!(c.limits.client_idle_timeout, secs(60));
        assert_eq!(c.limits.max_connections, 20_000);
        assert!(c.tls.is_none());
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
    fn max_keys_defaults_to_100000_and_is_read_for_keyed_budgets() {
        let text = format!(
            "{MINIMAL}budgets:\n  a: {{ rate: \"5/s\", per: token }}\n  b: {{ rate: \"5/s\", per: \"header:X-User\", max_keys: 1000 }}\n"
        );
        let c = Config::parse(&text).unwrap();
        assert_eq!(c.budgets[0].max_keys, DEFAULT_MAX_KEYS);
        assert_eq!(DEFAULT_MAX_KEYS, 100_000);
        assert_eq!(c.budgets[1].max_keys, 1000);
        // a reload applies it (the pacer trims to a smaller one): no restart needed
        let mut new = c.clone();
        new.budgets[1].max_keys = 10;
        assert!(c.restart_needed(&new).is_empty());
    }

    #[test]
    fn a_reload_names_the_restart_only_keys_it_changed_and_keeps_their_running_values() {
        let running = Config::parse(MINIMAL).unwrap();
        let mut new = running.clone();
        new.listen = "127.0.0.1:8081".parse().unwrap();
        new.admin_listen = "127.0.0.1:9091".parse().unwrap();
        new.workers = running.workers + 1;
        new.cluster = Some(ClusterSettings {
            redis_url: "redis://127.0.0.1:6379/0".into(),
            key_prefix: "shiftgate:".into(),
            fallback_replicas: 3,
        });
        new.log.format = LogFormat::Json;
        new.queue.max_depth = 3;
        new.limits.max_connections = 7;
        new.limits.client_idle_timeout = secs(5);
        assert_eq!(
            running.restart_needed(&new),
            ["listen", "admin_listen", "workers", "cluster", "log"]
        );
        new.keep_restart_only(&running);
        assert!(running.restart_needed(&new).is_empty());
        // The rest applies.
        assert_eq!(new.queue.max_depth, 3);
        assert_eq!(new.limits.max_connections, 7);
        assert_eq!(new.limits.client_idle_timeout, secs(5));
    }

    /// `tls` with a fresh self-signed pair in `dir`, listening on `listen`.
    fn with_tls(dir: &Path, name: &str, listen: &str) -> String {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        format!(
            "{MINIMAL}tls:\n  listen: \"{listen}\"\n  cert: {}\n  key: {}\n",
            cert.display(),
            key.display()
        )
    }

    #[test]
    fn tls_loads_its_pair_and_only_its_listen_needs_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let running = Config::parse(&with_tls(dir.path(), "a", "127.0.0.1:8443")).unwrap();
        let tls = running.tls.as_ref().unwrap();
        assert_eq!(tls.listen, "127.0.0.1:8443".parse().unwrap());
        assert!(tls.cert.ends_with("a.crt") && tls.key.ends_with("a.key"));

        // A new pair reloads; a new address needs a restart and keeps the old one.
        let mut new = Config::parse(&with_tls(dir.path(), "b", "127.0.0.1:9443")).unwrap();
        assert_eq!(running.restart_needed(&new), ["tls.listen"]);
        let new_pair = new.tls.as_ref().unwrap().pair.clone();
        new.keep_restart_only(&running);
        assert_eq!(new.tls.as_ref().unwrap().listen, tls.listen);
        assert_eq!(new.tls.as_ref().unwrap().pair, new_pair);
        assert_ne!(new_pair, tls.pair);

        // Added or dropped: a restart; meanwhile what runs stays as it is.
        let plain = Config::parse(MINIMAL).unwrap();
        let mut added = running.clone();
        assert_eq!(plain.restart_needed(&added), ["tls.listen"]);
        added.keep_restart_only(&plain);
        assert!(added.tls.is_none());
        let mut dropped = plain.clone();
        assert_eq!(running.restart_needed(&dropped), ["tls.listen"]);
        dropped.keep_restart_only(&running);
        assert_eq!(dropped.tls, running.tls);
    }

    #[test]
    fn a_bad_tls_pair_or_address_is_an_error_naming_the_key_and_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let good = with_tls(dir.path(), "a", "127.0.0.1:8443");
        let key = dir.path().join("a.key");
        let cert = dir.path().join("a.crt");

        let errors = |text: &str| Config::parse(text).unwrap_err().0;
        std::fs::write(&key, "garbage\n").unwrap();
        let e = errors(&good);
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].path, "tls.key");
        assert_eq!(e[0].line, Some(10));
        assert_eq!(
            e[0].message,
            format!(
                "{} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)",
                key.display()
            )
        );

        // A key of another pair.
        let other = with_tls(dir.path(), "b", "127.0.0.1:8443");
        let mismatched = other.replace("b.crt", "a.crt");
        std::fs::write(&cert, std::fs::read(dir.path().join("a.crt")).unwrap()).unwrap();
        let e = errors(&mismatched);
        assert_eq!(e[0].path, "tls.key", "{e:?}");
        assert!(
            e[0].message.contains("does not belong to the certificate"),
            "{e:?}"
        );

        // An unreadable chain, and a listener on the plain port.
        let e = errors(
            &good
                .replace("a.crt", "missing.crt")
                .replace("127.0.0.1:8443", "127.0.0.1:8080"),
        );
        let shown: Vec<String> = e.iter().map(|e| e.to_string()).collect();
        assert_eq!(shown.len(), 2, "{shown:?}");
        assert_eq!(
            shown[0],
            "tls.listen: must differ from listen and admin_listen at line 8"
        );
        assert!(
            shown[1].starts_with(&format!(
                "tls.cert: cannot read {}: ",
                dir.path().join("missing.crt").display()
            )) && shown[1].ends_with(" at line 9"),
            "{shown:?}"
        );
        let e = errors(&format!("{MINIMAL}tls:\n  listen: \"127.0.0.1:8443\"\n"));
        assert!(e[0].message.contains("missing field `cert`"), "{e:?}");
    }

    #[test]
    fn the_client_limits_are_bounded_and_their_errors_name_path_and_line() {
        let parse = |limits: &str| Config::parse(&format!("{MINIMAL}limits:\n{limits}"));
        let c = parse("  client_header_timeout: \"500ms\"\n  client_idle_timeout: \"2m\"\n  max_connections: 3\n").unwrap();
        assert_eq!(c.limits.client_header_timeout, Duration::from_millis(500));
        assert_eq!(c.limits.client_idle_timeout, secs(120));
        assert_eq!(c.limits.max_connections, 3);

        let errors = |limits: &str| -> Vec<String> {
            parse(limits)
                .unwrap_err()
                .0
                .iter()
                .map(|e| e.to_string())
                .collect()
        };
        assert_eq!(
            errors("  client_header_timeout: \"0s\"\n  client_idle_timeout: \"25h\"\n  max_connections: 0\n"),
            [
                "limits.client_header_timeout: must be more than 0s at line 8",
                "limits.client_idle_timeout: invalid duration \"25h\": at most 24h at line 9",
                "limits.max_connections: must be a whole number >= 1, not 0 at line 10",
            ]
        );
        assert_eq!(
            errors("  max_connections: 10000001\n"),
            ["limits.max_connections: must be at most 10000000, not 10000001 at line 8"]
        );
    }

    #[test]
    fn the_admin_token_is_read_from_the_variable_admin_token_env_names_and_never_shown() {
        let text = format!("{MINIMAL}admin_token_env: ADMIN_T\n");
        let env = |name: &str| (name == "ADMIN_T").then(|| "s3cret".to_string());
        let c = Config::parse_with_env(&text, &env).unwrap();
        let token = c.admin_token.as_ref().expect("a token");
        assert_eq!(token.env, "ADMIN_T");
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cret\n"));
        assert!(!format!("{c:?}").contains("s3cret"), "{c:?}");
        // Without admin_token_env no variable is looked at, and there is no token.
        let c = Config::parse_with_env(MINIMAL, &|_: &str| panic!("looked up")).unwrap();
        assert!(c.admin_token.is_none());
        // Unset, empty or not sendable: an error (fixtures in tests/config_errors.rs).
        for value in [None, Some(""), Some("s3cret\n"), Some("s3 cret")] {
            let env = |_: &str| value.map(str::to_string);
            let e = Config::parse_with_env(&text, &env).unwrap_err().0;
            assert_eq!(e.len(), 1, "{value:?}: {e:?}");
            assert_eq!(e[0].path, "admin_token_env");
            assert!(e[0].message.contains("ADMIN_T"), "{e:?}");
        }
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

    mod never_panics {
        //! The loader answers every input with a config or its errors, never a panic. Cases
        //! are modest in CI; a long run: `PROPTEST_CASES=100000 cargo test --lib never_panics`.
        use super::*;
        use proptest::prelude::*;

        /// A scalar as a hostile file might hold one: numbers huge, tiny, negative or not
        /// numbers at all, durations and rates with any unit, odd strings.
        fn scalar() -> impl Strategy<Value = String> {
            prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                any::<f64>().prop_map(|f| format!("{f}")),
                (
                    any::<u64>(),
                    prop_oneof![
                        Just("ms"),
                        Just("s"),
                        Just("m"),
                        Just("h"),
                        Just("d"),
                        Just("y")
                    ]
                )
                    .prop_map(|(n, u)| format!("\"{n}{u}\"")),
                (
                    any::<f64>(),
                    prop_oneof![Just("/s"), Just("/min"), Just("/h"), Just("/x"), Just("")]
                )
                    .prop_map(|(n, u)| format!("\"{n}{u}\"")),
                "[ -~]{0,12}".prop_map(|t| format!("{t:?}")),
                Just("~".to_string()),
                Just("[]".to_string()),
                Just("{}".to_string()),
            ]
        }

        /// The minimal config with one key set to a hostile scalar.
        fn config_with_one_hostile_value() -> impl Strategy<Value = String> {
            let keys = prop_oneof![
                Just("queue:\n  max_wait: "),
                Just("queue:\n  max_depth: "),
                Just("queue:\n  aging: "),
                Just("retry:\n  max_attempts: "),
                Just("retry:\n  max_elapsed: "),
                Just("retry:\n  max_retry_after: "),
                Just("retry:\n  backoff_base: "),
                Just("limits:\n  max_body_bytes: "),
                Just("limits:\n  upstream_timeout: "),
                Just("limits:\n  connect_timeout: "),
                Just("limits:\n  client_header_timeout: "),
                Just("limits:\n  client_idle_timeout: "),
                Just("limits:\n  max_connections: "),
                Just("shutdown:\n  drain_timeout: "),
                Just("workers: "),
                Just("budgets:\n  b: { per: token, rate: "),
                Just("budgets:\n  b: { rate: \"1/s\", burst: "),
                Just("budgets:\n  b: { rate: \"1/s\", min_rate: "),
                Just("cluster:\n  redis_url: \"redis://127.0.0.1/0\"\n  fallback_replicas: "),
            ];
            (keys, scalar()).prop_map(|(key, value)| {
                let close = if key.contains('{') { " }" } else { "" };
                format!("{MINIMAL}{key}{value}{close}\n")
            })
        }

        proptest! {
            #[test]
            fn a_hostile_value_is_an_error_or_a_config(text in config_with_one_hostile_value()) {
                let _ = Config::parse(&text);
            }

            #[test]
            fn arbitrary_text_is_an_error_or_a_config(text in "[ -~\n]{0,200}") {
                let _ = Config::parse(&text);
                let _ = Config::parse(&format!("{MINIMAL}{text}"));
            }
        }
    }
}
