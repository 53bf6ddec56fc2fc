//! The real `shiftgate` binary in front of an upstream, started through the library's harness
//! ([`shiftgate::harness::ProxyChild`], as `shiftgate demo` starts it); here every failure is a
//! panic that shows the proxy's log.

use std::net::SocketAddr;
use std::ops::{Deref, DerefMut};
use std::process::Child;
use std::time::Duration;

use shiftgate::harness::{ProxyChild, ProxyOptions};

use super::config::ProxyConfig;
use super::prom::metric_value;
use super::wait::poll_until;

/// The tests' log level: shiftgate's own at info (reloads, warnings), but no access lines.
const RUST_LOG: &str =
    "info,pingora=warn,pingora_core=warn,pingora_proxy=warn,shiftgate::access=warn";

/// A running `shiftgate run` on reserved loopback ports, killed on drop. Derefs to the
/// harness's [`ProxyChild`] (`addr()`, `admin()`, `url()`, `logs()`, `wait_exit()` ...).
pub struct ProxyProcess {
    child: ProxyChild,
    upstream: SocketAddr,
}

impl Deref for ProxyProcess {
    type Target = ProxyChild;
    fn deref(&self) -> &ProxyChild {
        &self.child
    }
}

impl DerefMut for ProxyProcess {
    fn deref_mut(&mut self) -> &mut ProxyChild {
        &mut self.child
    }
}

/// A test that fails with the proxy still in scope shows how the proxy ended, if it has, and
/// the end of its log: a client's transport error alone cannot tell a crash from a closed
/// connection.
impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let ended = match self.child.exit_status() {
                Some(status) => format!("exited: {status}"),
                None => "still running".to_string(),
            };
            eprintln!(
                "--- the proxy ({ended}), the last 80 lines of its log ---\n{}\n---",
                self.child.log_tail(80)
            );
        }
    }
}

impl ProxyProcess {
    /// Starts the proxy on `config`, its upstreams at `upstream` (host:port), and waits until
    /// `/healthz` answers.
    pub async fn start(config: &ProxyConfig, upstream: SocketAddr) -> ProxyProcess {
        Self::start_with(config, upstream, &[]).await
    }

    /// The same, with more environment for the process (`RUST_LOG` among it overrides the
    /// tests' level).
    pub async fn start_with(
        config: &ProxyConfig,
        upstream: SocketAddr,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let mut options = ProxyOptions::new(env!("CARGO_BIN_EXE_shiftgate"));
        options.rust_log = RUST_LOG.into();
        options.env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        options.dir_prefix = "shiftgate-test".into();
        let child = ProxyChild::start(options, |listen, admin| {
            Ok(config.render(listen, admin, upstream))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        ProxyProcess { child, upstream }
    }

    /// `config` as this proxy's file would say it: its ports, its upstream.
    pub fn render(&self, config: &ProxyConfig) -> String {
        config.render(self.addr(), self.admin(), self.upstream)
    }

    /// Replaces the config file by rename (as editors and ConfigMaps do) with `config`.
    pub fn replace_config(&self, config: &ProxyConfig) {
        self.replace_config_text(&self.render(config));
    }

    /// Replaces the config file by rename with `text` as it is.
    pub fn replace_config_text(&self, text: &str) {
        self.child.replace_config(text).expect("config replaced");
    }

    /// Starts the new process of a graceful upgrade: it waits for the listening sockets, which
    /// this one hands over on SIGQUIT.
    pub fn spawn_upgrade(&self) -> Child {
        self.child.spawn(true).expect("the new process starts")
    }

    pub fn signal(&self, signal: &str) {
        self.child
            .signal(signal)
            .unwrap_or_else(|e| panic!("{e:#}"));
    }

    pub async fn metrics(&self) -> String {
        self.child
            .metrics()
            .await
            .unwrap_or_else(|e| panic!("{e:#}; log:\n{}", self.logs()))
    }

    /// The value of one series, e.g. `shiftgate_client_disconnects_total{route="presence"}`;
    /// 0 if it is not there.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Polls `series` until `condition` holds for its value; the value. Panics with the log
    /// after `limit`.
    pub async fn wait_for_metric(
        &self,
        series: &str,
        limit: Duration,
        condition: impl Fn(f64) -> bool,
    ) -> f64 {
        let last = &std::cell::Cell::new(0.0);
        let condition = &condition;
        let waited = poll_until(limit, || async move {
            last.set(self.metric(series).await);
            condition(last.get())
        })
        .await;
        assert!(
            waited.is_some(),
            "{series} still {} after {limit:?}; log:\n{}",
            last.get(),
            self.logs()
        );
        last.get()
    }

    /// Polls the log until a line `matches`; panics with the log after `limit`.
    pub async fn wait_for_log(&self, limit: Duration, matches: impl Fn(&str) -> bool) {
        let matches = &matches;
        let found = poll_until(limit, || async move { self.logs().lines().any(matches) }).await;
        assert!(
            found.is_some(),
            "no such line in the log within {limit:?}:\n{}",
            self.logs()
        );
    }
}
