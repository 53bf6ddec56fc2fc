//! Upstream 429s absorbed: retried transparently after Retry-After, the budget paused and its
//! rate learned; and given up honestly (at once, with the upstream's own answer) when a retry
//! cannot succeed in time.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::presence::{self, BULK_PATH, PATH_TEMPLATE};
use common::wait::wait_until;
use common::*;
use http::Method;
use shiftgate::digest::sha256_hex;
use shiftgate::loadtest;

/// Presence updates, single and bulk, on one `presence` budget of `budget`; routing status and
/// the rest unpaced; `extra` top-level keys.
fn config(budget: &str, extra: &str) -> ProxyConfig {
    ProxyConfig::new()
        .budget("presence", &format!(r#"{{ rate: "{budget}" }}"#))
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            budgets: [presence]
            max_wait: "60s"
            "#
        ))
        .route(&format!(
            r#"
            name: bulk
            match: {{ method: PUT, path: "{BULK_PATH}" }}
            budgets: [presence]
            max_wait: "60s"
            "#
        ))
        .route(r#"{ name: routing, match: { path: "/api/v2/users/{userId}/routingstatus" } }"#)
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("queue:\n  max_depth: 5000")
        .yaml(extra)
}

/// One presence PATCH on a fresh connection, and how long its answer took.
async fn patch_presence(
    addr: std::net::SocketAddr,
) -> (shiftgate::loadtest::client::Answer, Duration) {
    let t = Instant::now();
    let a = request(
        addr,
        Method::PATCH,
        &presence::path("u1"),
        &[("Authorization", "Bearer t")],
        presence::BODY,
    )
    .await
    .unwrap();
    (a, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_50_percent_too_high_learns_the_real_limit_and_clients_see_no_429() {
    let emu = emulator(&presence::limited_emulator("100/s", "20ms", "40ms")).await;
    let proxy = ProxyProcess::start(&config("150/s", ""), emu.local_addr()).await;
    let result = loadtest::run(shift_change(proxy.url(), 200, 10, 200), None)
        .await
        .unwrap();
    let summary = result.summary();
    let stats = emu.stats();
    let ideal = 2000.0 / 100.0;
    let ratio = summary.completion_time.as_secs_f64() / ideal;
    let learned = proxy
        .metric(r#"shiftgate_budget_rate{budget="presence"}"#)
        .await;
    let upstream_429 = stats.status_count(429);
    println!(
        "FIGURES over-budget: completion {:.2}s ratio {ratio:.3}; client answers {:?}; upstream 429s {upstream_429}; learned rate {learned:.1}/s; retries {}",
        summary.completion_time.as_secs_f64(),
        summary.by_status,
        proxy.metric(r#"shiftgate_retries_total{reason="429",route="presence"}"#).await,
    );
    assert_eq!(
        summary.by_status.get(&200),
        Some(&2000),
        "{:?}",
        summary.by_status
    );
    assert_eq!(summary.client_429s, 0);
    assert!(
        upstream_429 > 0,
        "the budget was too high: the upstream must have throttled"
    );
    assert!(ratio <= 1.15, "completion {ratio:.3} × ideal");
    // Every upstream 429 was charged to the budget and retried.
    assert_eq!(
        proxy
            .metric(r#"shiftgate_budget_throttles_total{budget="presence"}"#)
            .await,
        upstream_429 as f64
    );
    assert!(learned < 150.0, "the rate in force went down: {learned}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_outage_pauses_the_budget_instead_of_letting_every_waiter_probe() {
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"10ms\", max: \"20ms\" }\n").await;
    let proxy = ProxyProcess::start(&config("50/s", ""), emu.local_addr()).await;
    let target = proxy.url();
    let load = tokio::spawn(loadtest::run(shift_change(target, 100, 6, 100), None));
    // 2 s into the run (100 requests at 50/s sent), a 3 s outage answering 429 with
    // Retry-After: 3.
    wait_until(
        "100 requests through the proxy",
        Duration::from_secs(20),
        || emu.stats().total_requests >= 100,
    )
    .await;
    let outage: shiftgate::emulator::Fault = serde_json::from_value(
        serde_json::json!({"kind": "outage_429", "duration": "3s", "retry_after": 3}),
    )
    .unwrap();
    let outage_started = emu.stats().elapsed_seconds;
    emu.add_fault(outage);
    let result = load.await.unwrap().unwrap();
    let summary = result.summary();
    let stats = emu.stats();
    // Requests that reached the emulator while the outage lasted: the 429s it answered.
    let during = stats.status_count(429);
    println!(
        "FIGURES outage: upstream requests during the 3 s outage {during}; client answers {:?}; outage began at emulator second {outage_started:.1}",
        summary.by_status
    );
    assert_eq!(
        summary.by_status.get(&200),
        Some(&600),
        "{:?}",
        summary.by_status
    );
    assert_eq!(summary.client_429s, 0);
    // One budget: the requests in flight when the outage began, plus a probe after each
    // Retry-After; never one per waiting request (there were ~100 waiting).
    assert!(during >= 1);
    assert!(during <= 6, "{during} upstream requests during the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_retries_are_used_up_or_cannot_finish_in_time_the_upstream_429_passes_at_once() {
    // A daily-limit 429 (Retry-After 3600 > 180): given up at once, the upstream's own answer.
    let emu = emulator(&format!(
        "token_rate_per_minute: 0\nfaults:\n  - {{ kind: daily_limit, retry_after: 3600, path: \"{PATH_TEMPLATE}\" }}\n",
    ))
    .await;
    let proxy = ProxyProcess::start(&config("100/s", ""), emu.local_addr()).await;
    let (a, took) = patch_presence(proxy.addr()).await;
    assert!(
        took < Duration::from_millis(500),
        "no waiting for a hopeless retry"
    );
    assert_eq!(a.status, 429);
    assert_eq!(header(&a, "Retry-After"), Some("3600"));
    let v = json(&a);
    assert_eq!(
        v["code"], "too.many.requests.retry.after",
        "the upstream's own body"
    );
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("1"));
    drop(proxy);
    drop(emu);

    // An outage longer than max_elapsed allows: the first 429 (Retry-After 5) would make the
    // retry start after max_elapsed (3 s), so it is passed through at once.
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: outage_429, duration: \"30s\", retry_after: 5 }\n").await;
    let proxy = ProxyProcess::start(
        &config("100/s", "retry:\n  max_elapsed: \"3s\"\n"),
        emu.local_addr(),
    )
    .await;
    let (a, took) = patch_presence(proxy.addr()).await;
    assert!(took < Duration::from_millis(500));
    assert_eq!(a.status, 429);
    assert_eq!(header(&a, "Retry-After"), Some("5"));
    assert_eq!(json(&a)["code"], "too.many.requests.retry.after");
    drop(proxy);
    drop(emu);

    // Attempts used up: 3 attempts, Retry-After 1 each, then the third 429 goes to the client.
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: outage_429, duration: \"60s\", retry_after: 1 }\n").await;
    let proxy = ProxyProcess::start(
        &config("100/s", "retry:\n  max_attempts: 3\n"),
        emu.local_addr(),
    )
    .await;
    let (a, took) = patch_presence(proxy.addr()).await;
    assert_eq!(a.status, 429);
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("3"));
    assert_eq!(header(&a, "Retry-After"), Some("1"));
    assert_eq!(json(&a)["code"], "too.many.requests.retry.after");
    // two waits of Retry-After 1 s, then the last 429 at once
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert_eq!(emu.stats().status_count(429), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_bodies_are_byte_exact_and_non_idempotent_requests_are_not_resent_after_a_503() {
    // The first attempt of every request meets a 429 with Retry-After 1; the retry succeeds.
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: outage_429, duration: \"1s\", retry_after: 1 }\n").await;
    let proxy = ProxyProcess::start(&config("100/s", ""), emu.local_addr()).await;
    let body = presence::body_with_message("Réunion d'équipe — 10 min");
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &presence::path("u1"),
        &[
            ("Authorization", "Bearer t"),
            ("Content-Type", "application/json"),
        ],
        body.clone(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("2"));
    assert_eq!(
        header(&a, "X-Emulator-Body-Sha256"),
        Some(sha256_hex(body.as_bytes()).as_str())
    );
    drop(proxy);
    drop(emu);

    // 503 on every request: a PATCH is not re-sent (default on_5xx: idempotent), a PUT is.
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: status, status: 503, path: \"/api/v2/users/**\" }\n").await;
    let proxy = ProxyProcess::start(
        &config(
            "100/s",
            "retry:\n  max_attempts: 3\n  backoff_base: \"50ms\"\n",
        ),
        emu.local_addr(),
    )
    .await;
    let a = request(
        proxy.addr(),
        Method::PATCH,
        &presence::path("u1"),
        &[("Authorization", "Bearer t")],
        body,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("1"));
    assert_eq!(
        json(&a)["code"],
        "service.unavailable",
        "the upstream's own answer"
    );
    let put_body = r#"{"userId":"u1","status":"IDLE"}"#;
    let a = request(
        proxy.addr(),
        Method::PUT,
        "/api/v2/users/u1/routingstatus",
        &[("Authorization", "Bearer t")],
        put_body,
    )
    .await
    .unwrap();
    assert_eq!(a.status, 503);
    assert_eq!(
        header(&a, "X-Shiftgate-Attempts"),
        Some("3"),
        "an idempotent PUT is retried"
    );
    assert_eq!(emu.stats().status_count(503), 4);
    drop(proxy);
    drop(emu);

    // A body larger than the 64 KiB replay buffer cannot be re-sent: the upstream's 429 passes.
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: outage_429, duration: \"60s\", retry_after: 1 }\n").await;
    let proxy = ProxyProcess::start(&config("100/s", ""), emu.local_addr()).await;
    let big = presence::bulk_body(30, |_| "z".repeat(3000));
    assert!(big.len() > 64 * 1024);
    let t = Instant::now();
    let a = request(
        proxy.addr(),
        Method::PUT,
        BULK_PATH,
        &[("Authorization", "Bearer t")],
        Bytes::from(big),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 429);
    assert_eq!(header(&a, "Retry-After"), Some("1"));
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("1"));
    assert!(t.elapsed() < Duration::from_millis(900));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_whose_slot_comes_after_its_deadline_passes_the_upstream_429_not_a_504() {
    // 20/min: the first request takes the slot of the next 3 s. Its 429 says Retry-After 1,
    // which max_elapsed (2 s) would allow, but the budget has no slot before 3 s: no attempt
    // can start in time, so the upstream's 429 goes to the client at once (it used to wait
    // until the deadline and answer 504 of its own).
    let emu = emulator("token_rate_per_minute: 0\nfaults:\n  - { kind: outage_429, duration: \"60s\", retry_after: 1 }\n").await;
    let proxy = ProxyProcess::start(
        &config("20/min", "retry:\n  max_elapsed: \"2s\"\n"),
        emu.local_addr(),
    )
    .await;
    let (a, took) = patch_presence(proxy.addr()).await;
    assert_eq!(a.status, 429, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(header(&a, "Retry-After"), Some("1"));
    assert_eq!(
        json(&a)["code"],
        "too.many.requests.retry.after",
        "the upstream's own body"
    );
    assert_eq!(header(&a, "X-Shiftgate-Attempts"), Some("1"));
    assert!(took < Duration::from_millis(500), "{took:?}");
    assert_eq!(
        proxy
            .metric(r#"shiftgate_rejections_total{reason="upstream_timeout",route="presence"}"#)
            .await,
        0.0
    );
}

/// A raw upstream: the first connection gets a 429 (Retry-After: 0) as soon as its head is in,
/// before the body; later ones are read to the end and answered 200 with the body's length in
/// `X-Body-Bytes`.
fn early_429_upstream() -> std::net::SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 65536];
                let head_end = loop {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                if n == 0 {
                    let _ = conn.write_all(
                        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 0\r\nContent-Length: 0\r\n\r\n",
                    );
                    // Drain what follows so the proxy's writes do not fail first.
                    conn.set_read_timeout(Some(Duration::from_secs(2))).ok();
                    while matches!(conn.read(&mut chunk), Ok(k) if k > 0) {}
                    return;
                }
                // Chunked body: read to the terminating zero-length chunk.
                conn.set_read_timeout(Some(Duration::from_secs(5))).ok();
                while !buf[head_end..].ends_with(b"0\r\n\r\n") {
                    match conn.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(k) => buf.extend_from_slice(&chunk[..k]),
                    }
                }
                let body = buf.len() - head_end;
                let _ = conn.write_all(
                    format!("HTTP/1.1 200 OK\r\nX-Body-Bytes: {body}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                        .as_bytes(),
                );
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_body_limit_holds_on_a_retry_too() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = early_429_upstream();
    let cfg = ProxyConfig::new()
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("limits:\n  max_body_bytes: 5000");
    let proxy = ProxyProcess::start(&cfg, upstream).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    // A streamed body (no Content-Length): 1,000 bytes, then, once the first attempt met its
    // 429 and the retry replayed them, 20,000 more: four times the limit.
    s.write_all(
        b"POST /api/v2/things HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    let chunk = |n: usize| format!("{n:x}\r\n{}\r\n", "a".repeat(n));
    s.write_all(chunk(1000).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..10 {
        if s.write_all(chunk(2000).as_bytes()).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 413"),
        "the second attempt is held to the limit too: {answer}"
    );
    assert!(answer.contains("shiftgate.body.too.large"), "{answer}");
    assert!(answer.contains("X-Shiftgate-Attempts: 2"), "{answer}");
}
