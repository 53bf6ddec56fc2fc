//! Requests spelled to slip past a budget, end to end: the real binary in front of an upstream
//! that records every request it receives. A path is matched and forwarded in its normal form
//! (so `//api/...` is charged to the route of `/api/...`), a path that climbs above the root is
//! refused, every spelling of one bearer token is one `per: token` bucket, and a client that
//! sends `Expect: 100-continue` hears `100 Continue` once admitted, or its final answer at once.
//! Trace context (`traceparent`, `tracestate`) reaches the upstream untouched; behind
//! `trusted_proxies` a `per: client_ip` budget keys on `X-Forwarded-For`'s right-most untrusted
//! hop, and the access line names that client, the duration and the bytes in and out.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::prom::metric_value;
use common::*;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// A presence route on a global budget, routing status on a per-token one, the rest unpaced.
fn config() -> ProxyConfig {
    ProxyConfig::new()
        .budget("presence", r#"{ rate: "100/s" }"#)
        .budget("per-token", r#"{ rate: "1/s", per: token }"#)
        .route(
            r#"{ name: presence, match: { method: PATCH, path: "/api/v2/users/{userId}/presences/{sourceId}" }, budgets: [presence] }"#,
        )
        .route(
            r#"{ name: routing-status, match: { method: PUT, path: "/api/v2/users/{userId}/routingstatus" }, budgets: [per-token] }"#,
        )
        .route(
            r#"{ name: tight, match: { method: POST, path: "/api/v2/tight/**" }, budgets: [per-token], max_wait: "500ms" }"#,
        )
        .route(r#"{ name: default, match: { path: "/**" } }"#)
}

const PRESENCE: &str = r#"{"presenceDefinition":{"id":"6a3af858-942f-489d-9700-5f9bcdcdae9b"}}"#;

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    authorization: Option<String>,
    traceparent: Option<String>,
    tracestate: Option<String>,
}

/// An upstream that answers every request `200 {}` and records it.
struct Recorder {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Recorder {
    async fn start() -> Recorder {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let record = record.clone();
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let record = record.clone();
                        async move {
                            let header = |name| {
                                req.headers()
                                    .get(name)
                                    .and_then(|v: &http::HeaderValue| v.to_str().ok())
                                    .map(str::to_string)
                            };
                            let seen = Seen {
                                method: req.method().to_string(),
                                target: req.uri().to_string(),
                                authorization: header(http::header::AUTHORIZATION),
                                traceparent: header(http::header::HeaderName::from_static(
                                    "traceparent",
                                )),
                                tracestate: header(http::header::HeaderName::from_static(
                                    "tracestate",
                                )),
                            };
                            let _ = req.into_body().collect().await;
                            record.lock().unwrap().push(seen);
                            Ok::<_, Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"{}"),
                            )))
                        }
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Recorder { addr, seen, task }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn targets(&self) -> Vec<String> {
        self.seen().into_iter().map(|s| s.target).collect()
    }
}

async fn send_as(
    addr: SocketAddr,
    method: Method,
    path: &str,
    authorization: &str,
    body: &'static str,
) -> shiftgate::loadtest::client::Answer {
    request(
        addr,
        method,
        path,
        &[
            ("Authorization", authorization),
            ("Content-Type", "application/json"),
        ],
        Bytes::from_static(body.as_bytes()),
    )
    .await
    .unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn wait_ms(a: &shiftgate::loadtest::client::Answer) -> u64 {
    header(a, "X-Shiftgate-Wait-Ms").unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_spelled_otherwise_is_charged_to_its_route_and_forwarded_normalised() {
    let upstream = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(), upstream.addr).await;

    // Before normalising, each of these matched `default` and skipped the presence budget.
    let spellings = [
        "//api/v2/users/u/presences/purecloud",
        "/api/v2//users/u/presences/purecloud/",
        "/api/v2/./users/x/../u/presences/purecloud",
        "/api/v2/users/%75/presences/%70ure%63loud",
    ];
    for path in spellings {
        let a = send_as(proxy.addr(), Method::PATCH, path, "Bearer a", PRESENCE).await;
        assert_eq!(a.status, 200, "{path}");
        assert!(header(&a, "X-Shiftgate-Wait-Ms").is_some());
    }
    // The query string is forwarded as it came, escapes and all.
    let a = send_as(
        proxy.addr(),
        Method::PATCH,
        "//api/v2/users/u/presences/purecloud?note=a%2Fb//c",
        "Bearer a",
        PRESENCE,
    )
    .await;
    assert_eq!(a.status, 200);

    let normal = "/api/v2/users/u/presences/purecloud";
    let mut want: Vec<String> = spellings.iter().map(|_| normal.to_string()).collect();
    want.push(format!("{normal}?note=a%2Fb//c"));
    assert_eq!(upstream.targets(), want, "what the upstream received");

    let presence = r#"shiftgate_requests_total{route="presence",status="200"}"#;
    // Counted once the answer is written: the client may read it first.
    proxy
        .wait_for_metric(presence, std::time::Duration::from_secs(5), |v| v >= 5.0)
        .await;
    let m = proxy.metrics().await;
    let default = r#"shiftgate_requests_total{route="default",status="200"}"#;
    assert_eq!(metric_value(&m, presence), Some(5.0), "charged to presence");
    assert_eq!(
        metric_value(&m, default),
        Some(0.0),
        "none took the default route"
    );
    let waited = r#"shiftgate_queue_wait_seconds_count{route="presence"}"#;
    assert_eq!(metric_value(&m, waited), Some(5.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_climbs_above_the_root_is_refused_with_400() {
    let upstream = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(), upstream.addr).await;

    for path in [
        "/api/../../x",
        "/api/%2e%2e/%2E%2E/x",
        "/..",
        "/api/v2/users/%zz/presences/purecloud",
    ] {
        let a = get(proxy.addr(), path).await.unwrap();
        let v = assert_own_answer(&a, 400, "shiftgate.bad.request");
        let msg = v["message"].as_str().unwrap();
        assert!(msg.contains("cannot be used"), "{path}: {msg}");
    }
    // A dot segment that stays inside the root is fine.
    let a = get(proxy.addr(), "/api/v2/../v2/users").await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(upstream.targets(), ["/api/v2/users"], "only that one left");

    let refused = r#"shiftgate_rejections_total{reason="bad_request",route="none"}"#;
    assert_eq!(proxy.metric(refused).await, 4.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_bearer_token_is_one_token_bucket() {
    let upstream = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(), upstream.addr).await;
    let put = |auth: &'static str| {
        let addr = proxy.addr();
        async move {
            send_as(
                addr,
                Method::PUT,
                "/api/v2/users/u/routingstatus",
                auth,
                r#"{"status":"IDLE"}"#,
            )
            .await
        }
    };

    // The per-token budget is 1/s: the first request of a token goes at once...
    let first = put("Bearer x").await;
    assert_eq!(first.status, 200);
    assert!(wait_ms(&first) < 300, "first waited {}", wait_ms(&first));
    // ...the same token spelled otherwise waits for the next slot, about a second later, while
    // another token goes at once.
    let (same, other) = tokio::join!(put("bearer  x"), put("Bearer y"));
    assert_eq!((same.status.as_u16(), other.status.as_u16()), (200, 200));
    assert!(
        (800..=1500).contains(&wait_ms(&same)),
        "`bearer  x` waited {} ms: not the bucket of `Bearer x`",
        wait_ms(&same)
    );
    assert!(
        wait_ms(&other) < 300,
        "`Bearer y` waited {}",
        wait_ms(&other)
    );
    let third = put("BEARER x").await;
    assert!(
        (800..=1500).contains(&wait_ms(&third)),
        "`BEARER x` waited {} ms",
        wait_ms(&third)
    );

    // The header itself is forwarded as the client wrote it.
    let mut sent: Vec<String> = upstream
        .seen()
        .into_iter()
        .filter_map(|s| s.authorization)
        .collect();
    sent.sort();
    assert_eq!(sent, ["BEARER x", "Bearer x", "Bearer y", "bearer  x"]);
}

/// Sends a request head with `Expect: 100-continue` and a body of `body.len()` bytes, and reads
/// what comes back within a second: the interim `100 Continue`, or a final answer.
async fn expect_continue(
    addr: std::net::SocketAddr,
    head: &str,
    body: &str,
) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{head}\r\nHost: shiftgate\r\nAuthorization: Bearer expects\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&got).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_hears_continue_once_admitted_or_its_final_answer_at_once() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(), upstream.addr).await;

    // Admitted: `100 Continue` before the body is sent, then the upstream's answer.
    let (mut s, interim) = expect_continue(
        proxy.addr(),
        "PATCH /api/v2/users/u/presences/purecloud HTTP/1.1",
        PRESENCE,
    )
    .await;
    assert!(
        interim.starts_with("HTTP/1.1 100"),
        "before the body: {interim:?}"
    );
    s.write_all(PRESENCE.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&rest).contains("\r\n\r\n{}") {
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("the final answer")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&rest));
        rest.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&rest).contains("HTTP/1.1 200"));
    assert_eq!(upstream.seen().last().unwrap().method, "PATCH");

    // Not admitted: the token's one slot a second is taken, and this route waits 500 ms at most;
    // the 429 comes at once, with no `100 Continue` first and no body read.
    let a = send_as(
        proxy.addr(),
        Method::POST,
        "/api/v2/tight/x",
        "Bearer expects",
        "{}",
    )
    .await;
    assert_eq!(a.status, 200);
    let (_s, answer) = expect_continue(proxy.addr(), "POST /api/v2/tight/y HTTP/1.1", "{}").await;
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer:?}");
    assert!(answer.contains("Retry-After:"), "{answer:?}");
}

/// W3C trace context passes through as the client sent it: `traceparent` and `tracestate`
/// reach the upstream byte for byte, on a paced route and an unpaced one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_upstream_untouched() {
    let upstream = Recorder::start().await;
    let proxy = ProxyProcess::start(&config(), upstream.addr).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let tracestate = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7";
    for (method, path) in [
        (Method::PATCH, "/api/v2/users/u1/presences/purecloud"),
        (Method::GET, "/api/v2/users/me"),
    ] {
        let a = request(
            proxy.addr(),
            method,
            path,
            &[
                ("traceparent", traceparent),
                ("tracestate", tracestate),
                ("Content-Type", "application/json"),
            ],
            Bytes::from_static(PRESENCE.as_bytes()),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200, "{path}");
    }
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2);
    for s in seen {
        assert_eq!(s.traceparent.as_deref(), Some(traceparent), "{s:?}");
        assert_eq!(s.tracestate.as_deref(), Some(tracestate), "{s:?}");
    }
}

/// The access line's `client=` field, for each request to `path`.
fn access_clients(logs: &str, path: &str) -> Vec<String> {
    logs.lines()
        .filter(|l| l.contains("shiftgate::access") && l.contains(&format!("path={path}")))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("client="))
                .map(str::to_string)
        })
        .collect()
}

/// `per: client_ip` behind an ingress. Without `trusted_proxies` every request from the
/// ingress (here 127.0.0.1) is one client, whatever `X-Forwarded-For` says. With
/// `trusted_proxies: ["127.0.0.0/8"]` the client is the header's right-most untrusted hop: two
/// clients go at once, the same client waits for its next slot (1/s), and an address a client
/// prepends to its own header changes nothing. The access line names the client, the socket
/// peer, the duration and the body bytes in and out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_client_ip_behind_trusted_proxies_keys_on_the_forwarded_client() {
    let upstream = Recorder::start().await;
    let base = ProxyConfig::new()
        .budget("per-client", r#"{ rate: "1/s", per: client_ip }"#)
        .route(r#"{ name: paced, match: { path: "/api/**" }, budgets: [per-client] }"#);
    let put = |addr: SocketAddr, xff: &'static str| async move {
        let a = request(
            addr,
            Method::PUT,
            "/api/v2/x",
            &[
                ("X-Forwarded-For", xff),
                ("Content-Type", "application/json"),
            ],
            Bytes::from_static(b"{\"a\":1}"),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 200);
        wait_ms(&a)
    };

    // No trusted proxies: one bucket for everything that comes through 127.0.0.1.
    let proxy = ProxyProcess::start(&base, upstream.addr).await;
    assert!(put(proxy.addr(), "203.0.113.7").await < 300);
    let other = put(proxy.addr(), "203.0.113.8").await;
    assert!(
        (700..=1500).contains(&other),
        "without trusted_proxies the header is ignored: the second client waited {other} ms"
    );
    drop(proxy);

    let trusted = base
        .clone()
        .yaml(r#"trusted_proxies: ["127.0.0.0/8", "10.0.0.0/8"]"#);
    let proxy = ProxyProcess::start_with(
        &trusted,
        upstream.addr,
        &[("RUST_LOG", "warn,shiftgate::access=info")],
    )
    .await;
    let addr = proxy.addr();
    assert!(put(addr, "203.0.113.7").await < 300, "first client at once");
    // A second client goes at once; the first one again (its ingress hop 10.0.0.5 appended
    // after it, and a forged address before it) waits for its own next slot.
    let (second, again) = tokio::join!(
        put(addr, "203.0.113.8"),
        put(addr, "198.51.100.1, 203.0.113.7, 10.0.0.5")
    );
    assert!(second < 300, "another client waited {second} ms");
    assert!(
        (700..=1500).contains(&again),
        "the same client, whatever it prepends, waited {again} ms"
    );

    let logs = poll_logs(&proxy, 3).await;
    let mut clients = access_clients(&logs, "/api/v2/x");
    clients.sort();
    assert_eq!(clients, ["203.0.113.7", "203.0.113.7", "203.0.113.8"]);
    let line = logs
        .lines()
        .find(|l| l.contains("shiftgate::access") && l.contains("path=/api/v2/x"))
        .unwrap();
    for field in [
        "peer=127.0.0.1:",
        "duration_ms=",
        "bytes_in=7 ",
        "bytes_out=2 ",
    ] {
        assert!(line.contains(field), "{field} in the access line: {line}");
    }
    println!("access line: {line}");
}

/// The proxy's log once it holds at least `n` access lines (they are written after the answer).
async fn poll_logs(proxy: &ProxyProcess, n: usize) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let logs = proxy.logs();
        let lines = logs
            .lines()
            .filter(|l| l.contains("shiftgate::access"))
            .count();
        if lines >= n || std::time::Instant::now() > deadline {
            return logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
