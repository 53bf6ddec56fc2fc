//! A stand-in for the Genesys Cloud Platform API (api and login hosts on one listener), true to
//! its rate limiting, its 429 and error formats, with faults to inject and stats to read back.
//!
//! # Layout
//! - `config`: [`EmulatorConfig`] and [`Fault`], parsed strictly from YAML or JSON.
//! - `limits`: Genesys-like fixed windows (per token, per route) as pure state + `now`.
//! - `faults`: which armed fault hits a request.
//! - `stats`: [`StatsSnapshot`]: counts by route and status, a per-second timeline.
//! - `genesys`: the Genesys data served (error codes, presence definitions ...); the error body
//!   and `Retry-After` themselves are [`crate::genesys`]'s, shared with the proxy.
//! - `auth`: Basic and Bearer headers, the token request's form body.
//! - `api`: the endpoints (one file each: oauth, presence, routing status, users,
//!   `/_emulator/`; the org limits API's answers are `catalog`'s) and
//!   the order a request meets them in; no sockets.
//! - `server`: hyper glue: connections, bodies, header spelling, `reset` faults, shutdown.
//! - `clock`: the system clock, or a hand-moved one for tests.
//! - `tests/`: behaviour tests, one file per concern (limits, auth, endpoints, faults, stats, e2e).
//!
//! Emulator-only endpoints live under `/_emulator/`: `GET /_emulator/stats`,
//! `POST /_emulator/stats/reset`, `POST /_emulator/faults` (one [`Fault`] as JSON, its `start`
//! counted from the POST) and `DELETE /_emulator/faults`. They are never counted, delayed or
//! faulted.

mod api;
mod auth;
mod catalog;
mod clock;
mod config;
mod faults;
mod limits;
mod server;
mod stats;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Route limits and fault filters use the proxy's path templates (`/api/v2/users/{userId}/**`).
pub use crate::route::PathTemplate;
pub use config::{
    AuthConfig, ClientCredentials, ConfigError, EmulatorConfig, Fault, FaultKind, FaultStatus,
    Latency, LimitScope, RouteLimit, WindowLimit, DEFAULT_MAX_BODY_BYTES,
    DEFAULT_TOKEN_RATE_PER_MINUTE, DEFAULT_USERS,
};
pub use stats::{RouteLabel, SecondStats, StatsSnapshot, STATUS_RESET};

/// Where `shiftgate emulate` listens without `--listen`.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 8081);

/// A running emulator. Dropping it stops accepting; [`Emulator::shutdown`] also waits.
pub struct Emulator {
    addr: SocketAddr,
    state: Arc<api::ApiState>,
    shutdown: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Emulator {
    /// Binds (port 0 allowed) and starts serving on the current tokio runtime.
    /// An invalid config (built in code rather than parsed) is refused as `InvalidInput`.
    pub async fn start(addr: SocketAddr, config: EmulatorConfig) -> std::io::Result<Emulator> {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let header_case = server::header_case_template().await.map(Arc::new);
        let state = Arc::new(api::ApiState::new(config));
        let (shutdown, watcher) = watch::channel(false);
        let task = tokio::spawn(server::serve(listener, state.clone(), watcher, header_case));
        tracing::info!(%addr, "emulator listening");
        Ok(Emulator {
            addr,
            state,
            shutdown,
            task: Some(task),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The same data as `GET /_emulator/stats`.
    pub fn stats(&self) -> StatsSnapshot {
        self.state.snapshot()
    }

    /// The same as `POST /_emulator/stats/reset`: counts and timeline start again from now.
    pub fn reset_stats(&self) {
        self.state.reset_stats();
    }

    /// The same as `POST /_emulator/faults`: `fault.start` counts from now.
    pub fn add_fault(&self, fault: Fault) {
        self.state.add_fault(fault);
    }

    /// The same as `DELETE /_emulator/faults`, the config's faults included.
    pub fn clear_faults(&self) {
        self.state.faults.clear();
    }

    /// Stops accepting, lets open answers finish for up to a second, closes every connection.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// The CLI entry: `shiftgate emulate [--listen ADDR] [--config PATH]`.
/// Prints `shiftgate emulator listening on http://ADDR` and serves until SIGINT or SIGTERM.
pub async fn run_cli(listen: Option<SocketAddr>, config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = match config {
        Some(path) => EmulatorConfig::load(&path)?,
        None => EmulatorConfig::default(),
    };
    let addr = listen.unwrap_or(DEFAULT_LISTEN);
    let emulator = Emulator::start(addr, config)
        .await
        .with_context(|| format!("cannot start the emulator on {addr}"))?;
    {
        use std::io::Write as _;
        let mut stdout = std::io::stdout().lock();
        writeln!(
            stdout,
            "shiftgate emulator listening on http://{}",
            emulator.local_addr()
        )?;
        // Tests read this line through a pipe, where stdout is block-buffered.
        stdout.flush()?;
    }
    wait_for_signal().await?;
    emulator.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
