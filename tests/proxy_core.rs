//! The core, end to end: the real binary on loopback ports in front of the emulator. Bursts are
//! smoothed into the budget, admission answers at once, clients that leave free their slots,
//! bodies arrive byte-exact, and nothing can be sent to a host that is not configured.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::presence::{self, BULK_PATH, DEFINITIONS_PATH, DEFINITION_ID, PATH_TEMPLATE};
use common::wait::wait_until_async;
use common::*;
use http::Method;
use shiftgate::digest::sha256_hex;
use shiftgate::harness::EmulatorRuntime;
use shiftgate::harness::ReservedPort;
use shiftgate::loadtest;

/// The SDK gateway's login prefix and OAuth on `login`, presence updates on a `presence` budget
/// of `budget` waiting at most `max_wait`, the rest of the API unpaced; the queue holds 3000.
fn presence_config(budget: &str, max_wait: &str) -> ProxyConfig {
    presence_config_with_depth(budget, max_wait, 3000)
}

fn presence_config_with_depth(budget: &str, max_wait: &str, max_depth: usize) -> ProxyConfig {
    ProxyConfig::new()
        .upstream("login")
        .budget("presence", &format!(r#"{{ rate: "{budget}" }}"#))
        .route(
            r#"
            name: sdk-gateway-login
            match: { path: "/login/**" }
            strip_prefix: "/login"
            upstream: login
            "#,
        )
        .route(r#"{ name: oauth, match: { path: "/oauth/**" }, upstream: login }"#)
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            upstream: api
            budgets: [presence]
            max_wait: "{max_wait}"
            "#
        ))
        .route(r#"{ name: default, match: { path: "/api/**" }, upstream: api }"#)
        .yaml(&format!(
            "queue:\n  max_depth: {max_depth}\nretry:\n  backoff_base: \"100ms\""
        ))
}

/// Presence updates the proxy has taken in so far: waiting in its queue, refused, or sent on
/// to the emulator (the only requests the emulator sees in these tests).
async fn taken_in(proxy: &ProxyProcess, emu: &EmulatorRuntime) -> f64 {
    let (_, samples) = prom::parse_exposition(&proxy.metrics().await);
    let route = [("route", "presence")];
    prom::sum(&samples, "shiftgate_queue_depth", &route)
        + prom::sum(&samples, "shiftgate_rejections_total", &route)
        + emu.stats().total_requests as f64
}

/// Waits until the proxy has taken in `n` presence updates, so that the next one arrives after
/// them.
async fn wait_taken_in(proxy: &ProxyProcess, emu: &EmulatorRuntime, n: usize) {
    wait_until_async(
        &format!("{n} presence updates taken in"),
        Duration::from_secs(5),
        || async move { taken_in(proxy, emu).await >= n as f64 },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shift_change_burst_is_smoothed_into_the_budget_without_client_429s() {
    // The emulator limits presence PATCHes to 100/s (1 s windows), like a route limit; the
    // proxy's presence budget is the same 100/s. 500 agents send 4 updates each, all at once,
    // each on its own connection.
    let emu = emulator(&presence::limited_emulator("100/s", "20ms", "40ms")).await;
    let proxy = ProxyProcess::start(&presence_config("100/s", "60s"), emu.local_addr()).await;
    // A proxy in service has warm upstream connections. A cold one opens its first few while
    // the burst starts, and a window-opening request that is late by a TCP handshake lets the
    // 101st request of a 1 s window arrive inside it. Warm a few (outside the limited route).
    warm_up(&proxy, 8).await;
    emu.reset_stats();

    let result = loadtest::run(shift_change(proxy.url(), 500, 4, 500), None)
        .await
        .unwrap();
    let summary = result.summary();
    let stats = emu.stats();
    let ideal = 2000.0 / 100.0;
    let ratio = summary.completion_time.as_secs_f64() / ideal;
    let upstream_429 = stats.status_count(429);
    let wait = summary.wait.as_ref().unwrap();
    println!(
        "FIGURES burst: completion {:.2}s ideal {ideal}s ratio {ratio:.3}; client answers {:?}; upstream 429s {upstream_429}; wait p50 {:?} p99 {:?}",
        summary.completion_time.as_secs_f64(),
        summary.by_status,
        wait.p50,
        wait.p99
    );
    assert_eq!(
        summary.by_status.get(&200),
        Some(&2000),
        "every client answer is 200: {:?}",
        summary.by_status
    );
    assert_eq!(summary.transport_errors, 0);
    assert!(upstream_429 <= 20, "upstream 429s {upstream_429} > 1 %");
    assert!(
        (0.95..=1.05).contains(&ratio),
        "completion {ratio:.3} × ideal"
    );
    // The emulator saw at most the budget in any second (plus the one allowed burst slot).
    for s in &stats.timeline {
        assert!(
            s.requests <= 101 + s.status_429,
            "second {}: {} requests",
            s.second,
            s.requests
        );
    }
}

/// Opens `n` upstream connections through the proxy (concurrent GETs on an unlimited route).
async fn warm_up(proxy: &ProxyProcess, n: usize) {
    let mut h = Vec::new();
    for _ in 0..n {
        let addr = proxy.addr();
        h.push(tokio::spawn(async move {
            get_with_token(addr, DEFINITIONS_PATH).await
        }));
    }
    for x in h {
        assert_eq!(x.await.unwrap(), 200);
    }
}

async fn get_with_token(addr: std::net::SocketAddr, path: &str) -> u16 {
    request(
        addr,
        Method::GET,
        path,
        &[("Authorization", "Bearer warm-up")],
        Bytes::new(),
    )
    .await
    .unwrap()
    .status
    .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_token_budgets_keep_each_token_to_its_rate_while_tokens_proceed_in_parallel() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let cfg = ProxyConfig::new()
        .budget("per-token", r#"{ rate: "10/s", per: token }"#)
        .route(r#"{ name: default, match: { path: "/**" }, budgets: [per-token] }"#);
    let proxy = ProxyProcess::start(&cfg, emu.local_addr()).await;
    // 3 tokens, 40 requests each: alone, each token needs ~3.9 s at 10/s; one after another
    // they would need ~12 s.
    let started = Instant::now();
    let result = loadtest::run(shift_change(proxy.url(), 30, 4, 3), None)
        .await
        .unwrap();
    let elapsed = started.elapsed();
    let summary = result.summary();
    assert_eq!(summary.by_status.get(&200), Some(&120));
    assert!(
        elapsed < Duration::from_secs(7),
        "tokens ran in parallel: {elapsed:?}"
    );
    assert!(
        elapsed > Duration::from_millis(3500),
        "each token was paced: {elapsed:?}"
    );
    // Per token, the times the requests left the proxy (arrival + wait) are >= 100 ms apart.
    let mut by_token: HashMap<usize, Vec<Duration>> = HashMap::new();
    for r in &result.records {
        let sent = r.start + Duration::from_millis(r.wait_ms.unwrap());
        by_token.entry(r.agent % 3).or_default().push(sent);
    }
    for (token, mut sent) in by_token {
        sent.sort();
        assert_eq!(sent.len(), 40);
        // 40 slots at 10/s span at least 3.9 s (1 ms of rounding per header allowed)
        let span = *sent.last().unwrap() - sent[0];
        assert!(
            span >= Duration::from_millis(3850),
            "token {token}: 40 requests in {span:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_cannot_start_within_max_wait_is_answered_at_once_with_retry_after() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence_config("1/s", "2s"), emu.local_addr()).await;
    let mut handles = Vec::new();
    for i in 0..8 {
        let addr = proxy.addr();
        handles.push(tokio::spawn(async move {
            let t = Instant::now();
            let a = request(
                addr,
                Method::PATCH,
                &presence::path("u1"),
                &[
                    ("Authorization", "Bearer t"),
                    ("Content-Type", "application/json"),
                ],
                presence::BODY,
            )
            .await
            .unwrap();
            (a, t.elapsed())
        }));
        // arrive in a known order: each once the one before is sent, waiting or refused
        wait_taken_in(&proxy, &emu, i + 1).await;
    }
    let mut ok = 0;
    let mut rejected = 0;
    for h in handles {
        let (a, took) = h.await.unwrap();
        if a.status == 200 {
            ok += 1;
        } else {
            rejected += 1;
            assert_own_answer(&a, 429, "shiftgate.queue.wait");
            // decided on arrival, not after waiting
            assert!(took < Duration::from_millis(500), "rejected after {took:?}");
            let ra: u64 = header(&a, "Retry-After")
                .expect("Retry-After")
                .parse()
                .unwrap();
            // the next free slot is ~3 s away
            assert!((2..=4).contains(&ra), "Retry-After {ra}");
            assert!(header(&a, "X-Shiftgate-Wait-Ms").is_some());
        }
    }
    // slots at 0, 1, 2 s fit within 2 s of waiting; the rest are refused
    assert_eq!((ok, rejected), (3, 5));
    assert_eq!(
        proxy
            .metric(r#"shiftgate_rejections_total{reason="queue_wait",route="presence"}"#)
            .await,
        5.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_depth_requests_are_refused_with_queue_full() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let cfg = presence_config_with_depth("1/s", "60s", 2);
    let proxy = ProxyProcess::start(&cfg, emu.local_addr()).await;
    let mut handles = Vec::new();
    for i in 0..5 {
        let addr = proxy.addr();
        handles.push(tokio::spawn(async move {
            request(
                addr,
                Method::PATCH,
                &presence::path("u1"),
                &[("Authorization", "Bearer t")],
                presence::PRIMARY_ONLY,
            )
            .await
            .unwrap()
        }));
        wait_taken_in(&proxy, &emu, i + 1).await;
    }
    let mut statuses = Vec::new();
    for h in handles {
        let a = h.await.unwrap();
        if a.status == 429 {
            assert_own_answer(&a, 429, "shiftgate.queue.full");
            assert!(header(&a, "Retry-After").unwrap().parse::<u64>().unwrap() >= 1);
        }
        statuses.push(a.status);
    }
    // one sent at once, two waiting, two refused
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        3,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        2,
        "{statuses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_waiting_is_not_sent_and_frees_its_slot() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence_config("2/s", "60s"), emu.local_addr()).await;
    let path = presence::path("u1");
    let body = presence::PRIMARY_ONLY;
    // A takes the slot at 0; the next is at 0.5 s.
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &path,
        &[("Authorization", "Bearer t")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    // Five clients queue for 0.5, 1.0, ... 2.5 s, then hang up once all five wait.
    let raw_req = format!(
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut leavers = Vec::new();
    for _ in 0..5 {
        use tokio::io::AsyncWriteExt;
        let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
        s.write_all(raw_req.as_bytes()).await.unwrap();
        leavers.push(s);
    }
    let depth = r#"shiftgate_queue_depth{route="presence"}"#;
    let disconnects = r#"shiftgate_client_disconnects_total{route="presence"}"#;
    proxy
        .wait_for_metric(depth, Duration::from_secs(5), |n| n == 5.0)
        .await;
    drop(leavers);
    // B arrives once the proxy has seen them go, well before 0.5 s: it gets the 0.5 s slot, not
    // the 3 s one.
    proxy
        .wait_for_metric(disconnects, Duration::from_secs(5), |n| n == 5.0)
        .await;
    let b = request(
        proxy.addr(),
        Method::PATCH,
        &path,
        &[("Authorization", "Bearer t")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(b.status, 200);
    let wait: u64 = header(&b, "X-Shiftgate-Wait-Ms").unwrap().parse().unwrap();
    assert!(
        wait < 500,
        "B waited {wait} ms behind clients that had left"
    );
    // Only A and B reached the emulator. Nothing is left that could still reach it: nothing in
    // flight now, and (asserted below) nothing waiting.
    proxy
        .wait_for_metric(
            r#"shiftgate_inflight_requests{route="presence"}"#,
            Duration::from_secs(5),
            |n| n == 0.0,
        )
        .await;
    assert_eq!(emu.stats().count("presence_patch", 200), 2);
    assert_eq!(proxy.metric(disconnects).await, 5.0);
    assert_eq!(proxy.metric(depth).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_arrive_byte_exact_small_large_and_chunked() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence_config("100/s", "10s"), emu.local_addr()).await;
    let auth = [
        ("Authorization", "Bearer t"),
        ("Content-Type", "application/json"),
    ];
    // Small, with non-ASCII text.
    let small = presence::body_with_message("Pause café ☕ — back at 10:15");
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &presence::path("u1"),
        &auth,
        small.clone(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(
        header(&a, "X-Emulator-Body-Sha256"),
        Some(sha256_hex(small.as_bytes()).as_str())
    );
    // Larger than the 64 KiB replay buffer: a bulk update of 50 users with long messages.
    let big = presence::bulk_body(50, |i| "x".repeat(3000 + i));
    assert!(big.len() > 64 * 1024);
    let a = request(
        proxy.addr(),
        Method::PUT,
        BULK_PATH,
        &auth,
        Bytes::from(big.clone()),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(
        header(&a, "X-Emulator-Body-Sha256"),
        Some(sha256_hex(big.as_bytes()).as_str())
    );
    // Chunked transfer encoding.
    let parts = [
        "{\"presenceDefinition\":".to_string(),
        format!("{{\"id\":\"{DEFINITION_ID}\"}}"),
        ",\"primary\":true}".to_string(),
    ];
    let mut chunked = String::new();
    for p in &parts {
        chunked.push_str(&format!("{:x}\r\n{p}\r\n", p.len()));
    }
    chunked.push_str("0\r\n\r\n");
    let raw_answer = raw(
        proxy.addr(),
        format!("PATCH /api/v2/users/u2/presences/purecloud HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{chunked}").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(raw_answer.starts_with("HTTP/1.1 200"), "{raw_answer}");
    let whole: String = parts.concat();
    assert!(
        raw_answer.to_ascii_lowercase().contains(&format!(
            "x-emulator-body-sha256: {}",
            sha256_hex(whole.as_bytes())
        )),
        "{raw_answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_open_proxy_a_foreign_host_or_absolute_uri_only_reaches_the_configured_upstream() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence_config("100/s", "10s"), emu.local_addr()).await;
    // A listener standing for "another host": nothing may ever connect to it.
    // A connection to it waits in its backlog, to be seen at the end.
    let foreign = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let foreign_addr = foreign.local_addr().unwrap();

    let absolute = format!(
        "GET http://{foreign_addr}/api/v2/presence/definitions HTTP/1.1\r\nHost: {foreign_addr}\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n"
    );
    let answer = raw(proxy.addr(), absolute.as_bytes(), Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The emulator got it, with its own Host.
    assert!(
        answer
            .to_ascii_lowercase()
            .contains(&format!("x-emulator-host: {}", emu.local_addr())),
        "{answer}"
    );
    let foreign_host = request(
        proxy.addr(),
        Method::GET,
        DEFINITIONS_PATH,
        &[
            ("Host", &foreign_addr.to_string()),
            ("Authorization", "Bearer t"),
        ],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(foreign_host.status, 200);
    assert_eq!(
        header(&foreign_host, "X-Emulator-Host"),
        Some(emu.local_addr().to_string().as_str())
    );
    let connect = raw(
        proxy.addr(),
        format!("CONNECT {foreign_addr} HTTP/1.1\r\nHost: {foreign_addr}\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        !connect.starts_with("HTTP/1.1 200"),
        "CONNECT must not tunnel: {connect}"
    );
    // That nothing happens is the point: no connection came since the start, and none comes in
    // 200 ms more.
    let touched = tokio::time::timeout(Duration::from_millis(200), foreign.accept()).await;
    assert!(touched.is_err(), "the foreign host was contacted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sdk_through_the_gateway_prefixes_gets_a_token_and_updates_presence() {
    let emu = emulator("token_rate_per_minute: 0\nauth: { require_issued_tokens: true }\n").await;
    let proxy = ProxyProcess::start(&presence_config("100/s", "10s"), emu.local_addr()).await;
    // What an official SDK sends with gateway settings (path_params_login "login").
    let basic = "Basic Y2xpZW50LWlkOmNsaWVudC1zZWNyZXQ="; // client-id:client-secret
    for token_path in ["/login/oauth/token", "/oauth/token"] {
        let a = request(
            proxy.addr(),
            Method::POST,
            token_path,
            &[
                ("Authorization", basic),
                ("Content-Type", "application/x-www-form-urlencoded"),
            ],
            "grant_type=client_credentials",
        )
        .await
        .unwrap();
        assert_eq!(
            a.status,
            200,
            "{token_path}: {}",
            String::from_utf8_lossy(&a.body)
        );
        let token = json(&a)["access_token"].as_str().unwrap().to_string();
        let bearer = format!("Bearer {token}");
        let p = request(
            proxy.addr(),
            Method::PATCH,
            &presence::path("8f2b3c1e-0000-4000-8000-000000000001"),
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            presence::BODY,
        )
        .await
        .unwrap();
        assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
        assert_eq!(header(&p, "X-Shiftgate-Attempts"), Some("1"));
    }
    assert_eq!(emu.stats().count("oauth_token", 200), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_answers_no_route_and_body_too_large_itself() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence_config("100/s", "10s"), emu.local_addr()).await;
    let a = get(proxy.addr(), "/nowhere").await.unwrap();
    assert_own_answer(&a, 404, "shiftgate.no.route");
    // Declared too large: refused before reading.
    let big = vec![b'x'; 512_001];
    let a = request(
        proxy.addr(),
        Method::PUT,
        BULK_PATH,
        &[("Authorization", "Bearer t")],
        Bytes::from(big),
    )
    .await
    .unwrap();
    assert_own_answer(&a, 413, "shiftgate.body.too.large");
    // Streamed (chunked) past the limit.
    let chunk = "y".repeat(100_000);
    let mut body = String::new();
    for _ in 0..6 {
        body.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    body.push_str("0\r\n\r\n");
    let answer = raw(
        proxy.addr(),
        format!("PUT /api/v2/users/presences/bulk HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nTransfer-Encoding: chunked\r\n\r\n{body}").as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "{}",
        &answer[..answer.len().min(300)]
    );
    assert!(answer.contains("shiftgate.body.too.large"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_slow_upstream_gets_502_or_504_as_json() {
    // Nothing listens on this port: it is reserved, and a reservation never listens.
    let dead = ReservedPort::loopback().unwrap();
    let cfg = |max_attempts: u32| {
        ProxyConfig::new()
            .route(r#"{ name: default, match: { path: "/**" } }"#)
            .yaml(&format!(
                "retry:\n  max_attempts: {max_attempts}\n  backoff_base: \"50ms\"\nlimits:\n  upstream_timeout: \"1s\""
            ))
    };
    let proxy = ProxyProcess::start(&cfg(2), dead.addr()).await;
    let a = get(proxy.addr(), DEFINITIONS_PATH).await.unwrap();
    assert_own_answer(&a, 502, "shiftgate.upstream.unreachable");
    assert_eq!(
        header(&a, "X-Shiftgate-Attempts"),
        Some("2"),
        "a failed connect is retried"
    );
    drop(proxy);

    let emu = emulator(
        "token_rate_per_minute: 0\nfaults:\n  - { kind: slow, delay: \"5s\", path: \"/api/v2/users/**\" }\n",
    )
    .await;
    let proxy = ProxyProcess::start(&cfg(1), emu.local_addr()).await;
    let t = Instant::now();
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &presence::path("u"),
        &[("Authorization", "Bearer t")],
        "{}",
    )
    .await
    .unwrap();
    assert_own_answer(&a, 504, "shiftgate.upstream.timeout");
    assert!(t.elapsed() < Duration::from_secs(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_name_that_does_not_resolve_is_a_502_and_a_log_line_not_a_panic() {
    let cfg = ProxyConfig::new()
        .api_url("http://no-such-host.invalid:8080")
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("retry:\n  max_attempts: 1");
    let proxy = ProxyProcess::start(&cfg, "127.0.0.1:9".parse().unwrap()).await;
    let a = get(proxy.addr(), DEFINITIONS_PATH).await.unwrap();
    assert_own_answer(&a, 502, "shiftgate.upstream.unreachable");
    // Still serving after it.
    let again = get(proxy.addr(), DEFINITIONS_PATH).await.unwrap();
    assert_eq!(again.status, 502);
    assert!(get(proxy.admin(), "/healthz").await.unwrap().status == 200);
    let log = proxy.logs();
    assert!(
        log.contains("no-such-host.invalid"),
        "the failure is logged: {log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_with_the_access_fields_and_no_token() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let cfg = presence_config("100/s", "10s").yaml("log:\n  format: json");
    let proxy = ProxyProcess::start_with(&cfg, emu.local_addr(), &[("RUST_LOG", "info")]).await;
    let token = "Bearer sup3r-s3cret-token";
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &presence::path("u1"),
        &[
            ("Authorization", token),
            ("Content-Type", "application/json"),
        ],
        presence::PRIMARY_ONLY,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    proxy
        .wait_for_log(Duration::from_secs(5), |l| l.contains("shiftgate::access"))
        .await;
    let log = proxy.logs();
    assert!(!log.contains("sup3r-s3cret-token"));
    let mut access = None;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        if v["target"] == "shiftgate::access" {
            access = Some(v);
        }
    }
    let v = access.expect("an access line");
    assert_eq!(v["route"], "presence");
    assert_eq!(v["method"], "PATCH");
    assert_eq!(v["status"], 200);
    assert_eq!(v["attempts"], 1);
    for field in ["wait_ms", "upstream_ms", "correlation_id"] {
        assert!(!v[field].is_null(), "{field} in {v}");
    }
    assert_eq!(
        v["correlation_id"].as_str(),
        header(&a, "ININ-Correlation-Id")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_upstream_with_an_untrusted_certificate_is_refused() {
    // A TLS server whose self-signed certificate no trusted CA vouches for: certificates are
    // verified, so the proxy must not talk to it.
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    let made = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed (the test command installs it)");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let port = ReservedPort::loopback().unwrap();
    let mut server = std::process::Command::new("openssl")
        .args(["s_server", "-quiet", "-www", "-accept"])
        .arg(port.addr().to_string())
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let tls = port.addr();
    wait_until_async("s_server listens", Duration::from_secs(10), || async move {
        tokio::net::TcpStream::connect(tls).await.is_ok()
    })
    .await;
    let cfg = ProxyConfig::new()
        .api_https()
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("retry:\n  max_attempts: 1");
    let proxy = ProxyProcess::start(&cfg, port.addr()).await;
    let a = get(proxy.addr(), DEFINITIONS_PATH).await.unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert_own_answer(&a, 502, "shiftgate.upstream.unreachable");
    let body = json(&a);
    let msg = body["message"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        msg.contains("cert") || msg.contains("tls") || msg.contains("handshake"),
        "refused for its certificate: {msg}"
    );
}
