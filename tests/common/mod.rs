//! The integration tests' harness. The emulator and the real `shiftgate` binary start through
//! the library's [`shiftgate::harness`], as `shiftgate demo` starts them; only loopback
//! addresses are used, and ports are reserved, never probed.
//!
//! # Layout
//! - [`config`]: [`ProxyConfig`], the one place a proxy's config.yaml is written.
//! - [`proxy`]: [`ProxyProcess`], the binary as a child process: logs, signals, an upgrade's new
//!   process, metrics, config replaced by rename.
//! - [`raw`]: [`raw::read_answer`], one answer read off a raw stream.
//! - [`redis`]: [`redis::Redis`], a real redis-server on a reserved port.
//! - [`presence`]: the presence API's paths, bodies and definition id; a presence-limited
//!   emulator.
//! - [`prom`]: the Prometheus text format parsed, `promtool`, a real Prometheus, PromQL split.
//! - [`html`]: a scanner for the DOM a browser dumps.
//! - [`wait`]: waits on a condition with a deadline (no fixed sleeps).
//! - here: HTTP requests on fresh connections and checks of the proxy's own answers.
#![allow(dead_code)]

pub mod config;
pub mod html;
pub mod presence;
pub mod prom;
pub mod proxy;
pub mod raw;
pub mod redis;
pub mod wait;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use shiftgate::emulator::EmulatorConfig;
use shiftgate::harness::EmulatorRuntime;
use shiftgate::loadtest::client::{AgentConnection, Answer, ClientError, OutgoingRequest};
use shiftgate::loadtest::{Endpoint, LoadSpec, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// Not every test file uses both.
#[allow(unused_imports)]
pub use config::ProxyConfig;
#[allow(unused_imports)]
pub use proxy::ProxyProcess;

/// One emulator on a runtime of its own (one thread): it stands for a remote API, so its arrival
/// times must not depend on how busy the test's load generator is.
pub async fn emulator(yaml: &str) -> EmulatorRuntime {
    let config = EmulatorConfig::from_yaml_str(yaml).expect("emulator config");
    EmulatorRuntime::start(config, 1).expect("the emulator starts")
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, ClientError> {
    let mut conn = AgentConnection::new(Target::parse(&format!("http://{addr}")).unwrap());
    send(&mut conn, method, path, headers, body).await
}

pub async fn send(
    conn: &mut AgentConnection,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, ClientError> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    conn.send(&OutgoingRequest {
        method,
        path_and_query: path.to_string(),
        headers: h,
        body: body.into(),
    })
    .await
}

pub async fn get(addr: SocketAddr, path: &str) -> Result<Answer, ClientError> {
    request(addr, Method::GET, path, &[], Bytes::new()).await
}

/// Writes raw bytes on a new connection and reads the answer until the connection closes or
/// `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&a.body)))
}

/// Asserts one of the proxy's own answers: status, code, Genesys-shaped body, correlation id.
pub fn assert_own_answer(a: &Answer, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(
        a.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&a.body)
    );
    let v = json(a);
    assert_eq!(v["code"], code);
    assert_eq!(v["status"], status);
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(v["details"], serde_json::json!([]));
    assert_eq!(v["errors"], serde_json::json!([]));
    assert_eq!(
        header(a, "ININ-Correlation-Id"),
        v["contextId"].as_str(),
        "correlation id header equals contextId"
    );
    v
}

pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A shift change of presence updates, all agents at once, each on its own connection:
/// `loops` updates per agent, agents spread over `tokens` bearer tokens.
pub fn shift_change(target: String, agents: usize, loops: usize, tokens: usize) -> LoadSpec {
    LoadSpec {
        target,
        agents,
        loops,
        tokens,
        ramp: Duration::ZERO,
        endpoint: Endpoint::PresencePatch,
        timeout: Duration::from_secs(120),
        ..LoadSpec::default()
    }
}
