//! Requests spelled to slip past a budget, end to end: the real binary in front of an upstream
//! that records every request it receives. A path is matched and forwarded in its normal form
//! (so `//api/...` is charged to the route of `/api/...`), a path that climbs above the root is
//! refused, and every spelling of one bearer token is one `per: token` bucket.

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
        .route(r#"{ name: default, match: { path: "/**" } }"#)
}

const PRESENCE: &str = r#"{"presenceDefinition":{"id":"6a3af858-942f-489d-9700-5f9bcdcdae9b"}}"#;

/// One request as the upstream received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    target: String,
    authorization: Option<String>,
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

    let m = proxy.metrics().await;
    let presence = r#"shiftgate_requests_total{route="presence",status="200"}"#;
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
