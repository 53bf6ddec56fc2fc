//! Validation: the raw config becomes a [`Config`] with every value parsed and every name
//! resolved, or every error found, each naming its YAML path and line. One function per section;
//! those that name each other (upstreams, budgets, routes) are in `routes`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::lines::{LineIndex, YamlPath};
use super::raw::{
    RawCluster, RawConfig, RawLimits, RawLog, RawQueue, RawRetry, RawShutdown, RawTls,
};
use super::{
    parse_duration, AdminToken, ClusterSettings, Config, ConfigError, Limits, LogFormat,
    LogSettings, On5xx, QueueSettings, RetrySettings, ShutdownSettings, TlsSettings,
    MAX_ATTEMPTS_CAP, MAX_CONNECTIONS_CAP,
};
use crate::tls::CertPair;
use routes::Names;

mod routes;

/// Collects the errors of one config file while its sections are validated.
pub(super) struct Validator<'a> {
    lines: &'a LineIndex,
    errors: Vec<ConfigError>,
    /// The environment `admin_token_env` is looked up in.
    env: &'a dyn Fn(&str) -> Option<String>,
}

impl<'a> Validator<'a> {
    /// Starts from the errors already found (unknown keys).
    pub(super) fn new(
        lines: &'a LineIndex,
        errors: Vec<ConfigError>,
        env: &'a dyn Fn(&str) -> Option<String>,
    ) -> Validator<'a> {
        Validator { lines, errors, env }
    }

    /// Validates every section, or returns every error (those it started with included).
    ///
    /// Errors on one line are reported in the order found, so the order of the sections here is
    /// the order of such errors. `queue` comes before `routes`: a route's `max_wait` defaults to
    /// `queue.max_wait`.
    pub(super) fn config(mut self, raw: RawConfig) -> Result<Config, Vec<ConfigError>> {
        let (listen, admin_listen) = self.listeners(&raw);
        let tls = raw
            .tls
            .as_ref()
            .map(|t| self.tls(t, &[listen, admin_listen]));
        let admin_token = raw
            .admin_token_env
            .as_deref()
            .and_then(|name| self.admin_token(name));
        let upstreams = self.upstreams(&raw.upstreams);
        let budgets = self.budgets(&raw.budgets);
        let queue = self.queue(&raw.queue);
        let names = Names {
            upstreams: &upstreams,
            declared_upstreams: &raw.upstreams,
            budgets: &budgets,
            declared_budgets: &raw.budgets,
        };
        let routes = self.routes(&raw.routes, &names, queue.max_wait);
        let retry = self.retry(&raw.retry);
        let limits = self.limits(&raw.limits);
        let workers = self.workers(raw.workers);
        let log = self.log(&raw.log);
        let shutdown = self.shutdown(&raw.shutdown);
        let cluster = raw.cluster.as_ref().map(|c| self.cluster(c));
        let trusted_proxies = self.trusted_proxies(&raw.trusted_proxies);

        if !self.errors.is_empty() {
            return Err(self.errors);
        }
        Ok(Config {
            listen,
            admin_listen,
            admin_token,
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
            tls: tls.flatten(),
            watch_file: raw.reload.watch_file.unwrap_or(true),
            trusted_proxies,
        })
    }

    /// `trusted_proxies`: each a network (`10.0.0.0/8`, `fd00::/8`) or one address (`10.0.0.1`,
    /// taken as /32 or /128). Host bits of a network are cleared (`10.1.2.3/8` is `10.0.0.0/8`).
    fn trusted_proxies(&mut self, raw: &[String]) -> Vec<ipnet::IpNet> {
        let at = YamlPath::top("trusted_proxies");
        let mut nets = Vec::with_capacity(raw.len());
        for (i, text) in raw.iter().enumerate() {
            let s = text.trim();
            let parsed = s
                .parse::<ipnet::IpNet>()
                .map(|n| n.trunc())
                .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from));
            match parsed {
                Ok(net) => nets.push(net),
                Err(_) => self.err(
                    &at.index(i),
                    format!(
                        "invalid network \"{text}\": expected a CIDR such as 10.0.0.0/8 or \
                         fd00::/8, or one address"
                    ),
                ),
            }
        }
        nets
    }

    /// `listen` and `admin_listen`.
    fn listeners(&mut self, raw: &RawConfig) -> (SocketAddr, SocketAddr) {
        let listen = self.socket(&YamlPath::top("listen"), &raw.listen);
        let admin_at = YamlPath::top("admin_listen");
        let admin_listen = self.socket(
            &admin_at,
            raw.admin_listen
                .as_deref()
                .unwrap_or(super::DEFAULT_ADMIN_LISTEN),
        );
        if raw.admin_listen.is_some() && listen == admin_listen {
            self.err(&admin_at, "must differ from listen");
        }
        (listen, admin_listen)
    }

    /// `tls`: its address, and the certificate pair read and checked now, so that `check`, `run`
    /// and a reload all refuse a pair the listener could not serve. `None` when it has errors.
    fn tls(&mut self, raw: &RawTls, taken: &[SocketAddr]) -> Option<TlsSettings> {
        let at = YamlPath::top("tls");
        let listen_at = at.key("listen");
        let listen = self.socket(&listen_at, &raw.listen);
        if taken.contains(&listen) {
            self.err(&listen_at, "must differ from listen and admin_listen");
        }
        let (cert, key) = (PathBuf::from(&raw.cert), PathBuf::from(&raw.key));
        match CertPair::load(&cert, &key) {
            Ok(pair) => Some(TlsSettings {
                listen,
                cert,
                key,
                pair,
            }),
            Err(e) => {
                let file = if e.file() == key { "key" } else { "cert" };
                self.err(&at.key(file), e.to_string());
                None
            }
        }
    }

    /// `admin_token_env`: the variable it names must hold a token. Fail closed: a config that
    /// asks for a token but whose variable is unset or empty (a Secret not mounted, a typo in
    /// the name) is an error, never a reload endpoint without a token. A value that a header
    /// cannot carry is one too: no request could ever match it.
    fn admin_token(&mut self, name: &str) -> Option<AdminToken> {
        let at = YamlPath::top("admin_token_env");
        // The OS takes no name with `=` or NUL (and std may panic on one).
        if name.is_empty() || name.contains(['=', '\0']) {
            self.err(&at, "must name an environment variable");
            return None;
        }
        const WHY: &str = "(POST /-/reload requires its value as the token)";
        let problem = match (self.env)(name) {
            None => format!("is unset {WHY}"),
            Some(v) if v.is_empty() => format!("is empty {WHY}"),
            Some(v) if !v.bytes().all(|b| b.is_ascii_graphic()) => "holds a space, control or \
                 non-ASCII character, which a bearer token cannot (a trailing newline?)"
                .to_string(),
            Some(v) => return Some(AdminToken::new(name, &v)),
        };
        self.err(&at, format!("environment variable {name} {problem}"));
        None
    }

    fn queue(&mut self, raw: &RawQueue) -> QueueSettings {
        let at = YamlPath::top("queue");
        QueueSettings {
            max_wait: self.duration(&at.key("max_wait"), raw.max_wait.as_deref(), secs(30)),
            max_depth: self.whole(&at.key("max_depth"), raw.max_depth, 1, 10_000) as usize,
            aging: self.duration(&at.key("aging"), raw.aging.as_deref(), secs(10)),
        }
    }

    fn retry(&mut self, raw: &RawRetry) -> RetrySettings {
        let at = YamlPath::top("retry");
        let max_attempts_at = at.key("max_attempts");
        let max_attempts = self.whole(&max_attempts_at, raw.max_attempts, 1, 5);
        if max_attempts > MAX_ATTEMPTS_CAP as i64 {
            self.err(
                &max_attempts_at,
                format!("must be at most {MAX_ATTEMPTS_CAP}"),
            );
        }
        let on_5xx = match raw.on_5xx.as_deref() {
            None | Some("idempotent") => On5xx::Idempotent,
            Some("never") => On5xx::Never,
            Some("always") => On5xx::Always,
            Some(o) => {
                self.err(
                    &at.key("on_5xx"),
                    format!("invalid value \"{o}\": use idempotent, never or always"),
                );
                On5xx::Idempotent
            }
        };
        RetrySettings {
            max_attempts: max_attempts as u32,
            max_elapsed: self.duration(
                &at.key("max_elapsed"),
                raw.max_elapsed.as_deref(),
                secs(60),
            ),
            on_5xx,
            max_retry_after: self.duration(
                &at.key("max_retry_after"),
                raw.max_retry_after.as_deref(),
                secs(180),
            ),
            backoff_base: self.duration(
                &at.key("backoff_base"),
                raw.backoff_base.as_deref(),
                secs(1),
            ),
        }
    }

    fn limits(&mut self, raw: &RawLimits) -> Limits {
        let at = YamlPath::top("limits");
        Limits {
            max_body_bytes: self.whole(&at.key("max_body_bytes"), raw.max_body_bytes, 0, 512_000)
                as usize,
            connect_timeout: self.duration(
                &at.key("connect_timeout"),
                raw.connect_timeout.as_deref(),
                secs(5),
            ),
            upstream_timeout: self.duration(
                &at.key("upstream_timeout"),
                raw.upstream_timeout.as_deref(),
                secs(30),
            ),
            client_header_timeout: self.positive_duration(
                &at.key("client_header_timeout"),
                raw.client_header_timeout.as_deref(),
                secs(10),
            ),
            client_idle_timeout: self.positive_duration(
                &at.key("client_idle_timeout"),
                raw.client_idle_timeout.as_deref(),
                secs(60),
            ),
            max_connections: self.max_connections(&at.key("max_connections"), raw.max_connections),
        }
    }

    /// `limits.max_connections`: at least 1, at most [`MAX_CONNECTIONS_CAP`].
    fn max_connections(&mut self, path: &YamlPath, raw: Option<i64>) -> usize {
        let n = self.whole(path, raw, 1, 20_000);
        if n > MAX_CONNECTIONS_CAP as i64 {
            self.err(
                path,
                format!("must be at most {MAX_CONNECTIONS_CAP}, not {n}"),
            );
            return 20_000;
        }
        n as usize
    }

    /// `workers`, by default one per CPU.
    fn workers(&mut self, raw: Option<usize>) -> usize {
        match raw {
            Some(0) => {
                self.err(&YamlPath::top("workers"), "must be at least 1");
                1
            }
            Some(n) => n,
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
        }
    }

    fn log(&mut self, raw: &RawLog) -> LogSettings {
        let at = YamlPath::top("log");
        let format = match raw.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(f) => {
                self.err(
                    &at.key("format"),
                    format!("invalid format \"{f}\": use text or json"),
                );
                LogFormat::Text
            }
        };
        LogSettings { format }
    }

    fn shutdown(&mut self, raw: &RawShutdown) -> ShutdownSettings {
        let at = YamlPath::top("shutdown");
        ShutdownSettings {
            drain_timeout: self.duration(
                &at.key("drain_timeout"),
                raw.drain_timeout.as_deref(),
                secs(30),
            ),
        }
    }

    fn cluster(&mut self, raw: &RawCluster) -> ClusterSettings {
        let at = YamlPath::top("cluster");
        let url = &raw.redis_url;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            self.err(
                &at.key("redis_url"),
                format!("invalid URL \"{url}\": expected redis://host:port/db"),
            );
        }
        ClusterSettings {
            redis_url: url.clone(),
            key_prefix: raw
                .key_prefix
                .clone()
                .unwrap_or_else(|| "shiftgate:".to_string()),
            fallback_replicas: self.whole(&at.key("fallback_replicas"), raw.fallback_replicas, 1, 3)
                as u32,
        }
    }

    // -- One value each: the error is recorded and a default returned, so validation goes on.

    fn err(&mut self, path: &YamlPath, message: impl Into<String>) {
        self.errors.push(ConfigError {
            path: path.to_string(),
            line: self.lines.line(path.as_str()),
            message: message.into(),
        });
    }

    fn duration(&mut self, path: &YamlPath, raw: Option<&str>, default: Duration) -> Duration {
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

    /// A duration that must not be zero (a timer that fires at once would close every
    /// connection).
    fn positive_duration(
        &mut self,
        path: &YamlPath,
        raw: Option<&str>,
        default: Duration,
    ) -> Duration {
        let d = self.duration(path, raw, default);
        if d.is_zero() {
            self.err(path, "must be more than 0s");
            return default;
        }
        d
    }

    fn whole(&mut self, path: &YamlPath, raw: Option<i64>, min: i64, default: i64) -> i64 {
        match raw {
            None => default,
            Some(n) if n >= min => n,
            Some(n) => {
                self.err(path, format!("must be a whole number >= {min}, not {n}"));
                default
            }
        }
    }

    fn socket(&mut self, path: &YamlPath, raw: &str) -> SocketAddr {
        raw.parse().unwrap_or_else(|_| {
            self.err(
                path,
                format!("invalid address \"{raw}\": expected IP:PORT such as 0.0.0.0:8080"),
            );
            SocketAddr::from(([127, 0, 0, 1], 0))
        })
    }
}

pub(super) fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}
