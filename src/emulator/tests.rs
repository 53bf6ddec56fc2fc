//! Behaviour tests: the request pipeline with paused time (no sockets), then end to end over
//! loopback sockets in real time.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};
use std::time::Instant;

use super::api::{ApiRequest, State};
use super::clock::Clock;
use super::*;
use crate::digest::sha256_hex;

const PATCH_PATH: &str = "/api/v2/users/u1/presences/purecloud";
const AVAILABLE: &str = "6a3af858-942f-489d-9700-5f9bcdcdae9b";

fn state(yaml: &str) -> State {
    State::with_clock(
        EmulatorConfig::from_yaml_str(yaml).unwrap(),
        Clock::manual(),
    )
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

/// An answer, decoded for assertions.
struct Got {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    reset: bool,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| v.parse().unwrap())
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

async fn call(state: &State, method: Method, path: &str, headers: HeaderMap, body: &[u8]) -> Got {
    let reply = state
        .handle(ApiRequest::new(method, path, headers, body))
        .await;
    let (parts, body) = reply.response.into_parts();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        reset: reply.reset,
    }
}

async fn get(state: &State, path: &str, token: &str) -> Got {
    call(state, Method::GET, path, bearer(token), b"").await
}

async fn patch_presence(state: &State, token: &str) -> Got {
    let body = json!({"presenceDefinition": {"id": AVAILABLE}, "primary": true, "message": "hi"});
    call(
        state,
        Method::PATCH,
        PATCH_PATH,
        bearer(token),
        body.to_string().as_bytes(),
    )
    .await
}

fn expected_429_body(retry_after: u64, context_id: &str) -> String {
    format!(
        r#"{{"message":"Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"{context_id}","details":[],"errors":[]}}"#
    )
}

/// Every field of Genesys's 429: status, the three headers, the body byte for byte, and no
/// rate-limit headers of any vendor.
fn assert_genesys_429(got: &Got, retry_after: u64) {
    assert_eq!(got.status, 429);
    assert_eq!(got.retry_after(), Some(retry_after));
    assert_eq!(got.header("content-type"), Some("application/json"));
    let context_id = got.header("inin-correlation-id").expect("a correlation id");
    assert!(uuid::Uuid::parse_str(context_id).is_ok(), "{context_id}");
    assert_eq!(
        std::str::from_utf8(&got.body).unwrap(),
        expected_429_body(retry_after, context_id)
    );
    for name in got.headers.keys() {
        let name = name.as_str();
        assert!(
            !name.starts_with("inin-ratelimit") && !name.starts_with("x-ratelimit"),
            "unexpected header {name}"
        );
    }
}

// ---- limits ----------------------------------------------------------------------------------

#[tokio::test]
async fn the_token_window_admits_300_a_minute_from_its_first_request_then_answers_429() {
    let s = state("");
    for i in 0..300 {
        let got = get(&s, "/api/v2/presence/definitions", "tok-a").await;
        assert_eq!(got.status, 200, "request {i} is inside the limit");
    }
    s.clock.advance(Duration::from_millis(10_400));

    // 49.6 s are left in the window that opened at t0: Retry-After rounds up to 50.
    let got = get(&s, "/api/v2/presence/definitions", "tok-a").await;
    assert_genesys_429(&got, 50);

    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "tok-b")
            .await
            .status,
        200,
        "another token has a window of its own"
    );

    s.clock.advance(Duration::from_millis(49_600));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "tok-a")
            .await
            .status,
        200,
        "the window ends 60 s after its first request; the 429 did not extend it"
    );
}

#[tokio::test]
async fn a_route_limit_is_shared_by_the_org_and_answers_with_its_own_window() {
    let s = state(
        r#"
route_limits:
  - { name: presence, method: PATCH, path: "/api/v2/users/{userId}/presences/{sourceId}", limit: "2/s" }
"#,
    );
    assert_eq!(patch_presence(&s, "a").await.status, 200);
    assert_eq!(patch_presence(&s, "b").await.status, 200);
    s.clock.advance(Duration::from_millis(300));
    let got = patch_presence(&s, "c").await;
    assert_genesys_429(&got, 1);
    assert_eq!(
        get(&s, PATCH_PATH, "c").await.status,
        200,
        "a GET of the same path is outside a PATCH limit"
    );
    s.clock.advance(Duration::from_millis(700));
    assert_eq!(
        patch_presence(&s, "c").await.status,
        200,
        "a new 1 s window opens with the first request after the old one ends"
    );
}

#[tokio::test]
async fn a_per_token_route_limit_counts_each_token_separately() {
    let s = state(
        r#"
route_limits:
  - { name: bulk, path: "/api/v2/users/presences/bulk", limit: "1/min", per: token }
"#,
    );
    let bulk = |token: &'static str| {
        let s = &s;
        async move {
            call(
                s,
                Method::PUT,
                "/api/v2/users/presences/bulk",
                bearer(token),
                b"[]",
            )
            .await
        }
    };
    assert_eq!(bulk("a").await.status, 200);
    assert_eq!(bulk("b").await.status, 200);
    s.clock.advance(Duration::from_secs(15));
    assert_genesys_429(&bulk("a").await, 45);
}

#[tokio::test]
async fn a_zero_token_rate_turns_the_token_limit_off() {
    let s = state("token_rate_per_minute: 0\n");
    for _ in 0..1000 {
        assert_eq!(
            get(&s, "/api/v2/presence/definitions", "t").await.status,
            200
        );
    }
}

// ---- authentication --------------------------------------------------------------------------

#[tokio::test]
async fn api_requests_without_a_bearer_token_get_a_genesys_401() {
    let s = state("");
    let got = call(
        &s,
        Method::GET,
        "/api/v2/presence/definitions",
        HeaderMap::new(),
        b"",
    )
    .await;
    assert_eq!(got.status, 401);
    assert_eq!(got.code(), "bad.credentials");
    assert_eq!(
        got.json()["contextId"].as_str(),
        got.header("inin-correlation-id"),
        "error bodies carry the correlation id"
    );
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "invented")
            .await
            .status,
        200,
        "by default any non-empty token is accepted"
    );
}

fn basic(id: &str, secret: &str) -> HeaderMap {
    // Test-only encoder, the mirror of the decoder under test.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{id}:{secret}").into_bytes();
    let mut encoded = String::new();
    for chunk in raw.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
    );
    headers
}

#[tokio::test]
async fn the_token_flow_issues_tokens_only_to_known_clients() {
    let s = state(
        r#"
clients: [{ id: app, secret: s3cret }]
auth: { require_issued_tokens: true }
"#,
    );
    let form = b"grant_type=client_credentials";
    let post = |headers: HeaderMap, body: &'static [u8]| {
        let s = &s;
        async move { call(s, Method::POST, "/oauth/token", headers, body).await }
    };

    let got = post(HeaderMap::new(), form).await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (401, "bad.credentials"),
        "no Basic header"
    );
    let got = post(basic("app", "wrong"), form).await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (401, "bad.credentials"),
        "wrong secret"
    );
    let got = post(basic("app", "s3cret"), b"grant_type=password").await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (400, "bad.request"),
        "wrong grant type"
    );

    let got = post(basic("app", "s3cret"), form).await;
    assert_eq!(got.status, 200);
    let answer = got.json();
    assert_eq!(answer["token_type"], "bearer");
    assert_eq!(answer["expires_in"], 86399);
    let token = answer["access_token"].as_str().unwrap().to_string();

    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "invented")
            .await
            .status,
        401,
        "require_issued_tokens refuses tokens the emulator did not issue"
    );
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", &token).await.status,
        200
    );
    s.clock.advance(Duration::from_secs(86_399));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", &token).await.status,
        401,
        "an issued token expires after expires_in seconds"
    );
}

#[tokio::test]
async fn any_client_gets_a_token_when_none_are_configured() {
    let s = state("");
    let got = call(
        &s,
        Method::POST,
        "/oauth/token",
        basic("anyone", "anything"),
        b"grant_type=client_credentials",
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.json()["access_token"].as_str().unwrap().len() > 20);
}

// ---- endpoints -------------------------------------------------------------------------------

#[tokio::test]
async fn a_presence_patch_is_echoed_and_read_back() {
    let s = state("");
    let got = patch_presence(&s, "t").await;
    assert_eq!(got.status, 200);
    let presence = got.json();
    assert_eq!(presence["source"], "PURECLOUD");
    assert_eq!(presence["presenceDefinition"]["id"], AVAILABLE);
    assert_eq!(
        presence["presenceDefinition"]["systemPresence"],
        "Available"
    );
    assert_eq!(presence["message"], "hi");
    assert!(presence["modifiedDate"].as_str().unwrap().ends_with('Z'));

    let read = get(&s, PATCH_PATH, "t").await;
    assert_eq!(read.json(), presence, "GET returns what the PATCH stored");
    let other = get(&s, "/api/v2/users/u2/presences/purecloud", "t")
        .await
        .json();
    assert_eq!(
        other["presenceDefinition"]["systemPresence"], "Offline",
        "a user never set reads as Offline"
    );
}

#[tokio::test]
async fn bad_bodies_get_a_genesys_400() {
    let s = state("");
    for body in [
        &b"{not json"[..],
        b"",
        b"[1]",
        br#"{"presenceDefinition":{"id":7}}"#,
    ] {
        let got = call(&s, Method::PATCH, PATCH_PATH, bearer("t"), body).await;
        assert_eq!(got.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(got.code(), "bad.request");
    }
    let got = call(
        &s,
        Method::PUT,
        "/api/v2/users/u1/routingstatus",
        bearer("t"),
        br#"{"status":"DANCING"}"#,
    )
    .await;
    assert_eq!(got.status, 400, "an unknown routing status is refused");
}

#[tokio::test]
async fn bulk_presence_takes_at_most_50_entries() {
    let s = state("");
    let entry = |i: usize| json!({"id": format!("u{i}"), "sourceId": "PURECLOUD", "primary": true, "presenceDefinition": {"id": AVAILABLE}});
    let fifty: Vec<Value> = (0..50).map(entry).collect();
    let fifty_one: Vec<Value> = (0..51).map(entry).collect();
    let path = "/api/v2/users/presences/bulk";

    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        json!(fifty_one).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(got.code(), "bad.request");
    assert_eq!(
        get(&s, "/api/v2/users/u0/presences/purecloud", "t")
            .await
            .json()["presenceDefinition"]["systemPresence"],
        "Offline",
        "a refused batch changes nothing"
    );

    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        json!(fifty).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    let answer = got.json();
    assert_eq!(answer.as_array().unwrap().len(), 50);
    assert_eq!(answer[49]["id"], "u49");
    assert_eq!(
        get(&s, "/api/v2/users/u49/presences/purecloud", "t")
            .await
            .json()["presenceDefinition"]["id"],
        AVAILABLE
    );
}

#[tokio::test]
async fn routing_status_defaults_to_off_queue_and_stores_a_put() {
    let s = state("");
    let path = "/api/v2/users/u7/routingstatus";
    assert_eq!(get(&s, path, "t").await.json()["status"], "OFF_QUEUE");
    let body = json!({"userId": "u7", "status": "IDLE", "startTime": "2024-05-01T08:00:00.000Z"});
    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(get(&s, path, "t").await.json(), body);
}

#[tokio::test]
async fn definitions_limits_and_unknown_paths() {
    let s = state("token_rate_per_minute: 120\n");
    let defs = get(&s, "/api/v2/presence/definitions", "t").await.json();
    assert_eq!(defs["entities"].as_array().unwrap().len(), 9);
    let limits = get(&s, "/api/v2/organizations/limits/namespaces", "t")
        .await
        .json();
    assert_eq!(
        limits["entities"][0]["limits"][0],
        json!({"key": "token.rate.per.minute", "value": 120}),
        "the namespace listing shows the limit in force"
    );
    for path in ["/api/v2/wfm/schedules/agents/a1", "/nothing/here"] {
        let got = get(&s, path, "t").await;
        assert_eq!(
            (got.status, got.code().as_str()),
            (404, "not.found"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn every_answer_carries_the_body_hash_host_and_correlation_id() {
    let s = state("");
    let mut headers = bearer("t");
    headers.insert(
        http::header::HOST,
        HeaderValue::from_static("api.mypurecloud.com"),
    );
    let body = br#"{"presenceDefinition":{"id":"x"}}"#;
    let got = call(&s, Method::PATCH, PATCH_PATH, headers, body).await;
    assert_eq!(
        got.header("x-emulator-body-sha256"),
        Some(sha256_hex(body).as_str())
    );
    assert_eq!(got.header("x-emulator-host"), Some("api.mypurecloud.com"));
    assert!(got.header("inin-correlation-id").is_some());
    assert_eq!(
        got.header("retry-after"),
        None,
        "only 429s and some faults carry Retry-After"
    );
}

// ---- faults ----------------------------------------------------------------------------------

#[tokio::test]
async fn an_outage_answers_429_until_it_ends_and_faulted_requests_do_not_count() {
    let s = state(
        r#"
token_rate_per_minute: 1
faults: [{ kind: outage_429, start: "5s", duration: "3s" }]
"#,
    );
    s.clock.advance(Duration::from_millis(5500));
    // 2.5 s left in the outage: Retry-After rounds up to 3.
    assert_genesys_429(&get(&s, "/api/v2/presence/definitions", "t").await, 3);
    s.clock.advance(Duration::from_millis(2500));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "t").await.status,
        200,
        "the outage is over, and its 429 did not use the token's single request"
    );
}

#[tokio::test]
async fn status_faults_answer_their_genesys_code_with_retry_after_only_when_given() {
    let s = state("");
    s.add_fault(
        serde_json::from_str(r#"{"kind":"status","status":503,"retry_after":2,"duration":"1s"}"#)
            .unwrap(),
    );
    let got = get(&s, "/api/v2/presence/definitions", "t").await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (503, "service.unavailable")
    );
    assert_eq!(got.retry_after(), Some(2));

    s.clock.advance(Duration::from_secs(1));
    for (status, code) in [(504, "request.timeout"), (502, "bad.gateway")] {
        s.faults.clear();
        s.add_fault(Fault::new(FaultKind::Status {
            status: FaultStatus::from_code(status).unwrap(),
            retry_after: None,
        }));
        let got = get(&s, "/api/v2/presence/definitions", "t").await;
        assert_eq!((got.status, got.code().as_str()), (status, code));
        assert_eq!(got.retry_after(), None);
    }
}

#[tokio::test]
async fn a_daily_limit_fault_is_a_429_the_sdks_will_not_retry() {
    let s = state("");
    s.add_fault(Fault::new(FaultKind::DailyLimit { retry_after: 3600 }));
    let got = get(&s, "/api/v2/presence/definitions", "t").await;
    assert_genesys_429(&got, 3600);
    assert!(got.retry_after().unwrap() > 180);
}

#[tokio::test]
async fn a_slow_fault_adds_its_delay_to_the_latency() {
    let s = state(r#"latency: { min: "20ms", max: "40ms" }"#);
    s.add_fault(Fault::new(FaultKind::Slow {
        delay: Duration::from_millis(300),
    }));
    let before = Instant::now();
    assert_eq!(
        patch_presence(&s, "t").await.status,
        200,
        "slow still answers normally"
    );
    let took = before.elapsed();
    assert!(
        took >= Duration::from_millis(320) && took < Duration::from_secs(3),
        "300 ms of fault plus 20..40 ms of latency, took {took:?}"
    );
    assert_eq!(s.snapshot().faults_injected.get("slow"), Some(&1));
}

#[tokio::test]
async fn a_reset_fault_marks_the_answer_to_be_cut_and_counts_it_as_status_0() {
    let s = state("");
    s.add_fault(Fault::new(FaultKind::Reset).on_path(PathTemplate::parse("/oauth/token").unwrap()));
    let got = call(
        &s,
        Method::POST,
        "/oauth/token",
        basic("a", "b"),
        b"grant_type=client_credentials",
    )
    .await;
    assert!(got.reset);
    assert_eq!(got.header("connection"), Some("close"));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "t").await.status,
        200,
        "the fault's path filter keeps it off the API"
    );
    assert_eq!(s.snapshot().count("oauth_token", STATUS_RESET), 1);
}

#[tokio::test]
async fn emulator_endpoints_add_and_clear_faults() {
    let s = state("");
    let got = call(
        &s,
        Method::POST,
        "/_emulator/faults",
        HeaderMap::new(),
        br#"{"kind":"outage_429","retry_after":7}"#,
    )
    .await;
    assert_eq!(got.status, 200);
    assert_genesys_429(&get(&s, "/api/v2/presence/definitions", "t").await, 7);
    let got = call(
        &s,
        Method::POST,
        "/_emulator/faults",
        HeaderMap::new(),
        br#"{"kind":"boom"}"#,
    )
    .await;
    assert_eq!((got.status, got.code().as_str()), (400, "bad.request"));
    let got = call(
        &s,
        Method::DELETE,
        "/_emulator/faults",
        HeaderMap::new(),
        b"",
    )
    .await;
    assert_eq!(got.status, 204);
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "t").await.status,
        200
    );
}

// ---- stats -----------------------------------------------------------------------------------

#[tokio::test]
async fn the_timeline_counts_requests_429s_and_successes_per_second() {
    let s = state("token_rate_per_minute: 2\n");
    get(&s, "/api/v2/presence/definitions", "t").await; // second 0: 200
    get(&s, "/api/v2/presence/definitions", "t").await; // second 0: 200
    s.clock.advance(Duration::from_millis(1200));
    get(&s, "/api/v2/presence/definitions", "t").await; // second 1: 429
    s.clock.advance(Duration::from_secs(2));
    get(&s, "/api/v2/nowhere", "u").await; // second 3: 404
    call(&s, Method::GET, "/_emulator/stats", HeaderMap::new(), b"").await; // not counted

    let snap = s.snapshot();
    assert_eq!(snap.total_requests, 4);
    let rows: Vec<(u64, u64, u64, u64)> = snap
        .timeline
        .iter()
        .map(|r| (r.second, r.requests, r.status_429, r.ok))
        .collect();
    assert_eq!(
        rows,
        [(0, 2, 0, 2), (1, 1, 1, 0), (2, 0, 0, 0), (3, 1, 0, 0)]
    );
    assert_eq!(snap.count("definitions", 200), 2);
    assert_eq!(snap.count("definitions", 429), 1);
    assert_eq!(snap.count("not_found", 404), 1);
    assert_eq!(snap.requests_in(0..2), 3);

    let got = call(
        &s,
        Method::POST,
        "/_emulator/stats/reset",
        HeaderMap::new(),
        b"",
    )
    .await;
    assert_eq!(got.status, 204);
    assert_eq!(s.snapshot().total_requests, 0);
}

#[tokio::test]
async fn max_concurrent_counts_requests_waiting_on_latency_together() {
    let s = Arc::new(state(r#"latency: { min: "100ms", max: "100ms" }"#));
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..5 {
        let s = s.clone();
        tasks.spawn(async move {
            get(&s, "/api/v2/presence/definitions", &format!("t{i}"))
                .await
                .status
        });
    }
    while let Some(status) = tasks.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    let snap = s.snapshot();
    assert_eq!(snap.max_concurrent, 5);
    assert_eq!(snap.in_flight, 0);
}

// ---- end to end, over loopback sockets in real time ------------------------------------------

mod e2e {
    use super::*;
    use http_body_util::{BodyExt as _, Full};
    use hyper::client::conn::http1::{handshake, SendRequest};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    async fn start(yaml: &str) -> Emulator {
        let config = EmulatorConfig::from_yaml_str(yaml).unwrap();
        Emulator::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .unwrap()
    }

    async fn connect(emulator: &Emulator) -> SendRequest<Full<Bytes>> {
        let stream = TcpStream::connect(emulator.local_addr()).await.unwrap();
        let (sender, connection) = handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        sender
    }

    fn request(
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> http::Request<Full<Bytes>> {
        let mut builder = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "api.example.test");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        builder.body(Full::new(Bytes::from(body))).unwrap()
    }

    /// Sends raw bytes on a fresh connection and reads until the server closes it.
    async fn raw_exchange(emulator: &Emulator, request: &str) -> String {
        let mut stream = TcpStream::connect(emulator.local_addr()).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 8192];
        // A reset fault may end the stream with an error rather than EOF; keep what came.
        while let Ok(n @ 1..) = stream.read(&mut buf).await {
            answer.extend_from_slice(&buf[..n]);
        }
        String::from_utf8(answer).unwrap()
    }

    #[tokio::test]
    async fn the_429_on_the_wire_has_genesys_header_spelling_and_body() {
        let emulator = start("").await;
        emulator.add_fault(Fault::new(FaultKind::Outage429 {
            retry_after: Some(42),
        }));
        let answer = raw_exchange(
            &emulator,
            "GET /api/v2/presence/definitions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        let lines: Vec<&str> = head.lines().collect();
        assert_eq!(lines[0], "HTTP/1.1 429 Too Many Requests");
        assert!(lines.contains(&"Retry-After: 42"), "{head}");
        assert!(lines.contains(&"Content-Type: application/json"), "{head}");
        let correlation = lines
            .iter()
            .find_map(|l| l.strip_prefix("ININ-Correlation-Id: "))
            .unwrap_or_else(|| panic!("ININ-Correlation-Id spelled as Genesys does: {head}"));
        assert_eq!(body, expected_429_body(42, correlation));
        assert!(!head.to_ascii_lowercase().contains("ratelimit"), "{head}");
        emulator.shutdown().await;
    }

    #[tokio::test]
    async fn bodies_arrive_byte_exact_on_a_kept_alive_connection() {
        let emulator = start("").await;
        let mut client = connect(&emulator).await;
        // Not valid UTF-8 and larger than one read buffer: the hash proves every byte arrived.
        let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..3 {
            let answer = client
                .send_request(request(
                    "PATCH",
                    PATCH_PATH,
                    &[("authorization", "Bearer t")],
                    body.clone(),
                ))
                .await
                .unwrap();
            assert_eq!(answer.status(), 400, "not JSON");
            assert_eq!(
                answer.headers()["x-emulator-body-sha256"],
                sha256_hex(&body).as_str()
            );
            assert_eq!(answer.headers()["x-emulator-host"], "api.example.test");
            answer.into_body().collect().await.unwrap();
        }
        assert_eq!(
            emulator.stats().total_requests,
            3,
            "three requests, one connection"
        );
        emulator.shutdown().await;
    }

    #[tokio::test]
    async fn a_body_over_the_limit_gets_413_and_is_still_hashed() {
        let emulator = start("max_body_bytes: 1000\n").await;
        let mut client = connect(&emulator).await;
        let body = vec![b'x'; 1001];
        let answer = client
            .send_request(request(
                "PUT",
                "/api/v2/users/presences/bulk",
                &[("authorization", "Bearer t")],
                body.clone(),
            ))
            .await
            .unwrap();
        assert_eq!(answer.status(), 413);
        assert_eq!(
            answer.headers()["x-emulator-body-sha256"],
            sha256_hex(&body).as_str()
        );
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["code"], "request.entity.too.large");
        emulator.shutdown().await;
    }

    #[tokio::test]
    async fn a_reset_fault_sends_the_head_and_part_of_the_body_then_closes() {
        let emulator = start("").await;
        let added = raw_exchange(
            &emulator,
            "POST /_emulator/faults HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{\"kind\":\"reset\"}",
        )
        .await;
        assert!(added.starts_with("HTTP/1.1 200 OK"), "{added}");

        let answer = raw_exchange(
            &emulator,
            "GET /api/v2/presence/definitions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
        )
        .await;
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .expect("a Content-Length")
            .parse()
            .unwrap();
        assert!(
            !body.is_empty() && body.len() < length,
            "{} of {length} body bytes before the close",
            body.len()
        );

        // The same through a client: it sees the head, then a broken body.
        let mut client = connect(&emulator).await;
        let answer = client
            .send_request(request(
                "GET",
                "/api/v2/presence/definitions",
                &[("authorization", "Bearer t")],
                Vec::new(),
            ))
            .await
            .unwrap();
        assert!(answer.into_body().collect().await.is_err());
        emulator.shutdown().await;
    }

    #[tokio::test]
    async fn stats_are_served_and_reset_over_http() {
        let emulator = start("").await;
        let mut client = connect(&emulator).await;
        for _ in 0..2 {
            let answer = client
                .send_request(request(
                    "GET",
                    "/api/v2/presence/definitions",
                    &[("authorization", "Bearer t")],
                    Vec::new(),
                ))
                .await
                .unwrap();
            answer.into_body().collect().await.unwrap();
        }
        let answer = client
            .send_request(request("GET", "/_emulator/stats", &[], Vec::new()))
            .await
            .unwrap();
        let bytes = answer.into_body().collect().await.unwrap().to_bytes();
        let snap: StatsSnapshot = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(snap.count("definitions", 200), 2);
        assert_eq!(snap.timeline[0].requests, 2);
        assert_eq!(snap.total_requests, emulator.stats().total_requests);

        emulator.reset_stats();
        assert_eq!(emulator.stats().total_requests, 0);
        emulator.shutdown().await;
    }

    #[tokio::test]
    async fn shutdown_closes_the_port_and_idle_kept_alive_connections() {
        let emulator = start("").await;
        let addr = emulator.local_addr();
        let mut idle = connect(&emulator).await;
        let answer = idle
            .send_request(request(
                "GET",
                "/api/v2/presence/definitions",
                &[("authorization", "Bearer t")],
                Vec::new(),
            ))
            .await
            .unwrap();
        answer.into_body().collect().await.unwrap();

        emulator.shutdown().await;
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "nothing listens any more"
        );
        let again = idle
            .send_request(request(
                "GET",
                "/api/v2/presence/definitions",
                &[("authorization", "Bearer t")],
                Vec::new(),
            ))
            .await;
        assert!(again.is_err(), "the kept-alive connection was closed too");
    }

    #[tokio::test]
    async fn start_refuses_an_invalid_config_built_in_code() {
        let config = EmulatorConfig {
            max_body_bytes: 0,
            ..EmulatorConfig::default()
        };
        let err = Emulator::start("127.0.0.1:0".parse().unwrap(), config)
            .await
            .err()
            .expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("max_body_bytes"), "{err}");
    }

    #[tokio::test]
    async fn run_cli_reports_a_config_file_it_cannot_use() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let err = run_cli(Some("127.0.0.1:0".parse().unwrap()), Some(missing.clone()))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("missing.yaml"), "{err:#}");

        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "latency: { min: fast }\n").unwrap();
        let err = run_cli(None, Some(bad)).await.unwrap_err();
        assert!(
            format!("{err:#}").contains("invalid duration \"fast\""),
            "{err:#}"
        );
    }
}
