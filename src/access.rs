//! The access line: one per request, at `info` under the target `shiftgate::access`, as text or
//! JSON (`log.format`). Written by the proxy's last hook, and by the client edge for a client
//! that left while its request waited there. Never a token.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

/// What one access line says (see `docs/reference.md`, "Access log").
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The client's address: the socket's, or behind `trusted_proxies` X-Forwarded-For's.
    pub client: Option<IpAddr>,
    /// The socket's address and port.
    pub peer: Option<SocketAddr>,
    pub route: &'a str,
    pub method: &'a str,
    /// Normalised, without the query string.
    pub path: &'a str,
    /// 0: no answer was written (the client left).
    pub status: u16,
    /// Arrival to the end of the answer.
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wait: Duration,
    pub attempts: u32,
    pub upstream: Duration,
    pub correlation_id: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Writes `line` (when `shiftgate::access` is enabled at `info`). Every field is written
/// through `Display`, with nothing allocated for it.
pub fn log(line: &Line<'_>) {
    tracing::info!(
        target: "shiftgate::access",
        client = %OrDash(line.client),
        peer = %OrDash(line.peer),
        route = %line.route,
        method = %line.method,
        path = %line.path,
        status = line.status,
        duration_ms = millis(line.duration),
        bytes_in = line.bytes_in,
        bytes_out = line.bytes_out,
        wait_ms = millis(line.wait),
        attempts = line.attempts,
        upstream_ms = millis(line.upstream),
        correlation_id = %line.correlation_id.unwrap_or("-"),
        error = line.error,
        "request"
    );
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The value, or `-` when there is none.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
}
