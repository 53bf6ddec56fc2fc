//! The proxy's lifecycle, end to end with the real binary in front of the emulator: config
//! reloads (file rename, SIGHUP, `POST /-/reload`, the admin token), budget state across a
//! reload, the SIGTERM drain and the graceful binary upgrade (SIGQUIT).
//!
//! Rates are measured where they matter, at the emulator (its per-second timeline, by arrival);
//! durations against the test's clock, which is the emulator's too (same process). Run with
//! `--test-threads=1`: the timings leave slack for a shared machine, not for a second test.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::presence::{self, PATH_TEMPLATE};
use common::wait::{holds_for, poll_until, wait_until, wait_until_async, POLL};
use common::*;
use http::Method;
use shiftgate::harness::ReservedPort;
use shiftgate::loadtest;
use shiftgate::loadtest::client::Answer;

/// Every config file of a test is padded to this many bytes, so that all of them have the
/// same size once written (see [`write_unwatched`]).
const PADDED_LEN: usize = 1536;

/// A config with one global `presence` budget on the presence PATCH route and an unpaced
/// `default` route. `presence_ref` is the budget the route names (an unknown one makes the file
/// invalid); `extra` is appended as is (top-level keys).
fn config(
    rate: &str,
    burst: u32,
    presence_ref: &str,
    default_path: &str,
    extra: &str,
) -> ProxyConfig {
    ProxyConfig::new()
        .budget(
            "presence",
            &format!(r#"{{ rate: "{rate}", burst: {burst} }}"#),
        )
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            budgets: [{presence_ref}]
            max_wait: "60s"
            "#
        ))
        .route(&format!(
            r#"
            name: default
            match: {{ path: "{default_path}" }}
            "#
        ))
        .yaml("queue:\n  max_depth: 3000")
        .yaml(extra)
        .padded_to(PADDED_LEN)
}

fn presence(rate: &str) -> ProxyConfig {
    config(rate, 1, "presence", "/api/**", "")
}

/// The same file with the route naming a budget that does not exist.
fn broken(rate: &str) -> ProxyConfig {
    config(rate, 1, "absentee", "/api/**", "")
}

/// Without the file watcher: only SIGHUP or `POST /-/reload` apply a change.
const UNWATCHED: &str = "reload:\n  watch_file: false";

fn presence_unwatched(rate: &str) -> ProxyConfig {
    config(rate, 1, "presence", "/api/**", UNWATCHED)
}

fn broken_unwatched(rate: &str) -> ProxyConfig {
    config(rate, 1, "absentee", "/api/**", UNWATCHED)
}

/// Rewrites the config file in place, same size, and puts its modification time back: the file
/// watcher (which compares mtime, size, inode) cannot see the change, so only SIGHUP or
/// `POST /-/reload` can apply it.
fn write_unwatched(proxy: &ProxyProcess, config: &ProxyConfig) {
    use std::io::Write;
    let text = proxy.render(config);
    let before = std::fs::metadata(proxy.config_path()).unwrap();
    assert_eq!(
        before.len(),
        text.len() as u64,
        "the unwatched rewrite keeps the size"
    );
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(proxy.config_path())
        .unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
    drop(f);
    let after = std::fs::metadata(proxy.config_path()).unwrap();
    assert_eq!(after.modified().unwrap(), before.modified().unwrap());
}

async fn status_json(proxy: &ProxyProcess) -> serde_json::Value {
    let a = get(proxy.admin(), "/status.json")
        .await
        .expect("status.json");
    assert_eq!(a.status, 200);
    json(&a)
}

/// The configured rate of `budget` as /status.json shows it.
async fn configured_rate(proxy: &ProxyProcess, budget: &str) -> f64 {
    let s = status_json(proxy).await;
    s["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == budget)
        .unwrap_or_else(|| panic!("no budget {budget} in {s}"))["configured_rate"]
        .as_f64()
        .unwrap()
}

/// Polls every 20 ms until `budget` shows `rate`; returns how long that took.
async fn wait_for_rate(proxy: &ProxyProcess, budget: &str, rate: f64, limit: Duration) -> Duration {
    poll_until(limit, || async move {
        configured_rate(proxy, budget).await == rate
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "{budget} did not show {rate}/s within {limit:?}; log:\n{}",
            proxy.logs()
        )
    })
}

async fn reloads(proxy: &ProxyProcess, result: &str) -> f64 {
    proxy
        .metric(&format!(
            "shiftgate_config_reloads_total{{result=\"{result}\"}}"
        ))
        .await
}

/// Polls until the reload counter of `result` reaches `n`.
async fn wait_for_reloads(proxy: &ProxyProcess, result: &str, n: f64, limit: Duration) {
    proxy
        .wait_for_metric(
            &format!("shiftgate_config_reloads_total{{result=\"{result}\"}}"),
            limit,
            |count| count >= n,
        )
        .await;
}

async fn post_reload(proxy: &ProxyProcess, token: Option<&str>) -> Answer {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    request(
        proxy.admin(),
        Method::POST,
        "/-/reload",
        &headers,
        Bytes::new(),
    )
    .await
    .expect("reload answer")
}

/// The proxy's log without colour escapes.
fn plain_logs(proxy: &ProxyProcess) -> String {
    let logs = proxy.logs();
    let mut out = String::new();
    let mut chars = logs.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Waits up to 5 s for a log line that `matches` (the log is written after the reload took
/// effect).
async fn wait_for_log(proxy: &ProxyProcess, matches: impl Fn(&str) -> bool) {
    let matches = &matches;
    let found = poll_until(Duration::from_secs(5), || async move {
        plain_logs(proxy).lines().any(matches)
    })
    .await;
    assert!(found.is_some(), "not in the log:\n{}", plain_logs(proxy));
}

fn body_text(a: &Answer) -> String {
    String::from_utf8_lossy(&a.body).into_owned()
}

/// One presence PATCH on a connection of its own.
async fn patch(addr: SocketAddr, user: usize) -> Result<Answer, String> {
    request(
        addr,
        Method::PATCH,
        &presence::path(&format!("u{user}")),
        &[
            ("Authorization", "Bearer t"),
            ("Content-Type", "application/json"),
        ],
        presence::BODY,
    )
    .await
    .map_err(|e| e.to_string())
}

/// Requests the emulator saw in each whole second `[s, s+1)` with `from <= s` and
/// `s + 1 <= to` (seconds since its epoch).
fn full_seconds(
    timeline: &[shiftgate::emulator::SecondStats],
    from: f64,
    to: f64,
) -> Vec<(u64, u64)> {
    timeline
        .iter()
        .filter(|s| s.second as f64 >= from && (s.second + 1) as f64 <= to)
        .map(|s| (s.second, s.requests))
        .collect()
}

fn mean(seconds: &[(u64, u64)]) -> f64 {
    seconds.iter().map(|s| s.1 as f64).sum::<f64>() / seconds.len().max(1) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_config_changes_the_rate_under_load_and_a_broken_one_changes_nothing() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&presence("20/s"), emu.local_addr()).await;
    emu.reset_stats();

    // 40 agents on their own connections loop presence PATCHes: ~3 s at 20/s (60 requests),
    // then ~6 s at 100/s once the new file is in.
    let agents = 40;
    let loops = 17;
    let run = tokio::spawn(loadtest::run(
        shift_change(proxy.url(), agents, loops, agents),
        None,
    ));

    // The rename once the emulator has seen two whole seconds at 20/s after the first.
    wait_until("two whole seconds at 20/s", Duration::from_secs(20), || {
        let stats = emu.stats();
        full_seconds(&stats.timeline, 1.0, stats.elapsed_seconds).len() >= 2
    })
    .await;
    let renamed_at = emu.stats().elapsed_seconds;
    proxy.replace_config(&presence("100/s"));
    let latency = wait_for_rate(&proxy, "presence", 100.0, Duration::from_secs(5)).await;

    // A broken file once the new rate shows at the emulator for a whole second: refused,
    // counted, the 100/s stays.
    wait_until("a whole second at 100/s", Duration::from_secs(20), || {
        let stats = emu.stats();
        full_seconds(&stats.timeline, renamed_at + 0.5, stats.elapsed_seconds)
            .iter()
            .any(|&(_, n)| n >= 85)
    })
    .await;
    let failures = reloads(&proxy, "failure").await;
    let broken_at = emu.stats().elapsed_seconds;
    proxy.replace_config(&broken("20/s"));
    let t = Instant::now();
    wait_for_reloads(&proxy, "failure", failures + 1.0, Duration::from_secs(5)).await;
    let refused_after = t.elapsed();
    let s = status_json(&proxy).await;
    assert_eq!(s["last_reload_ok"], false, "{s}");
    let err = s["last_reload_error"].as_str().unwrap_or_default();
    assert!(err.contains(r#"unknown budget "absentee""#), "{err}");
    assert_eq!(configured_rate(&proxy, "presence").await, 100.0);

    let result = run.await.unwrap().unwrap();
    let summary = result.summary();
    let stats = emu.stats();
    let total = agents * loops;

    let before = full_seconds(&stats.timeline, 1.0, renamed_at);
    let last_second = stats.timeline.last().map_or(0, |s| s.second) as f64;
    // Every whole second that starts 0.5 s or more after the rename (the first of them ends
    // at most 2.5 s after it; /status.json gives the exact delay); the last second with
    // requests is partial: the load ended in it.
    let after = full_seconds(&stats.timeline, renamed_at + 0.5, last_second);
    let after_broken = full_seconds(&stats.timeline, broken_at, last_second);
    let first_fast = stats
        .timeline
        .iter()
        .find(|s| s.second as f64 >= renamed_at.floor() && s.requests >= 90)
        .map(|s| s.second as f64 - renamed_at);
    println!(
        "FIGURES reload: status.json showed 100/s {} ms after the rename (polled every 20 ms); \
         first second at >= 90/s starts {:.2} s after it; broken file counted as a failure after {} ms; \
         upstream rate before {:.1}/s {:?}, from rename+0.5s {:.1}/s {:?}, after the broken file {:.1}/s; \
         client answers {:?}, transport errors {}",
        latency.as_millis(),
        first_fast.unwrap_or(f64::NAN),
        refused_after.as_millis(),
        mean(&before),
        before,
        mean(&after),
        after,
        mean(&after_broken),
        summary.by_status,
        summary.transport_errors
    );

    assert_eq!(
        summary.by_status.get(&200),
        Some(&total),
        "every client request answered 200: {:?} {:?}",
        summary.by_status,
        summary.transport_error_messages
    );
    assert_eq!(summary.transport_errors, 0);
    assert_eq!(
        stats.total_requests, total as u64,
        "each request reached the upstream once"
    );
    assert!(
        latency < Duration::from_millis(1500),
        "reload latency {latency:?}"
    );
    assert!(!before.is_empty(), "a whole second at 20/s: {before:?}");
    for &(second, n) in &before {
        assert!(
            (16..=22).contains(&n),
            "second {second}: {n} requests at 20/s"
        );
    }
    assert!(after.len() >= 4, "whole seconds at 100/s: {after:?}");
    for &(second, n) in &after {
        assert!(
            (85..=102).contains(&n),
            "second {second}: {n} requests at 100/s"
        );
    }
    assert!(after_broken.len() >= 2, "{after_broken:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_and_post_reload_apply_a_new_rate_and_refuse_a_broken_file() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let mut proxy = ProxyProcess::start(&presence_unwatched("2/s"), emu.local_addr()).await;
    assert_eq!(configured_rate(&proxy, "presence").await, 2.0);

    // SIGHUP: the file changed in a way the watcher cannot see; only the signal applies it.
    write_unwatched(&proxy, &presence_unwatched("90/s"));
    // That nothing happens is the point here: for 600 ms (two and more looks of a watcher,
    // every 250 ms, were it on) the rate stays.
    let p = &proxy;
    holds_for(
        "the watcher did not see the unwatched rewrite",
        Duration::from_millis(600),
        || async move { configured_rate(p, "presence").await == 2.0 },
    )
    .await;
    proxy.signal("HUP");
    wait_for_rate(&proxy, "presence", 90.0, Duration::from_secs(5)).await;
    wait_for_log(&proxy, |l| {
        l.contains("config reloaded") && l.contains(r#"trigger="SIGHUP" changed=true"#)
    })
    .await;
    // In force, not only shown: 10 requests at once pass in well under the 4.5 s 2/s needs.
    let t = Instant::now();
    let burst: Vec<_> = (0..10)
        .map(|i| tokio::spawn(patch(proxy.addr(), i)))
        .collect();
    for h in burst {
        assert_eq!(h.await.unwrap().unwrap().status, 200);
    }
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    // SIGHUP with a broken file: refused, counted, logged with its error, 90/s stays.
    let failures = reloads(&proxy, "failure").await;
    write_unwatched(&proxy, &broken_unwatched("2/s"));
    proxy.signal("HUP");
    wait_for_reloads(&proxy, "failure", failures + 1.0, Duration::from_secs(5)).await;
    assert_eq!(configured_rate(&proxy, "presence").await, 90.0);
    wait_for_log(&proxy, |l| {
        l.contains(r#"routes[0].budgets[0]: unknown budget "absentee" at line 11"#)
    })
    .await;

    // POST /-/reload: the same, answered synchronously.
    write_unwatched(&proxy, &presence_unwatched("5/s"));
    let a = post_reload(&proxy, None).await;
    assert_eq!(a.status, 200, "{}", body_text(&a));
    assert!(body_text(&a).starts_with("reloaded: "), "{}", body_text(&a));
    assert_eq!(configured_rate(&proxy, "presence").await, 5.0);
    assert_eq!(
        proxy
            .metric(r#"shiftgate_budget_configured_rate{budget="presence"}"#)
            .await,
        5.0
    );

    let failures = reloads(&proxy, "failure").await;
    write_unwatched(&proxy, &broken_unwatched("90/s"));
    let a = post_reload(&proxy, None).await;
    let body = body_text(&a);
    assert_eq!(a.status, 400, "{body}");
    assert!(body.contains("old one stays in force"), "{body}");
    assert!(
        body.contains(r#"routes[0].budgets[0]: unknown budget "absentee" at line 11"#),
        "{body}"
    );
    assert_eq!(reloads(&proxy, "failure").await, failures + 1.0);
    assert_eq!(configured_rate(&proxy, "presence").await, 5.0);
    let s = status_json(&proxy).await;
    assert_eq!(s["last_reload_ok"], false);

    // Still serving, at the old config's rate.
    assert_eq!(patch(proxy.addr(), 1).await.unwrap().status, 200);
    assert_eq!(proxy.wait_exit(Duration::ZERO), None, "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_reload_needs_the_admin_token_when_one_is_configured() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let upstream = emu.local_addr();
    let token_cfg = |rate: &str| {
        config(
            rate,
            1,
            "presence",
            "/api/**",
            "admin_token_env: SHIFTGATE_ADMIN_TOKEN\nreload:\n  watch_file: false",
        )
    };
    let proxy = ProxyProcess::start_with(
        &token_cfg("2/s"),
        upstream,
        &[("SHIFTGATE_ADMIN_TOKEN", "s3cret")],
    )
    .await;
    // The file stays as it is while unauthorized requests try: a reload (by any trigger)
    // would show in the counters.
    let successes = reloads(&proxy, "success").await;
    let failures = reloads(&proxy, "failure").await;

    for token in [None, Some("wrong"), Some("s3cre"), Some("s3cret2")] {
        let a = post_reload(&proxy, token).await;
        assert_eq!(a.status, 401, "token {token:?}: {}", body_text(&a));
    }
    // A token sent some other way than as a bearer does not count either.
    let a = request(
        proxy.admin(),
        Method::POST,
        "/-/reload",
        &[("Authorization", "s3cret")],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 401);
    assert_eq!(
        configured_rate(&proxy, "presence").await,
        2.0,
        "nothing changed"
    );
    assert_eq!(reloads(&proxy, "success").await, successes);
    assert_eq!(reloads(&proxy, "failure").await, failures);

    // The watcher is off (`watch_file: false`) and cannot see this rewrite anyway: only the
    // POST below can reload.
    write_unwatched(&proxy, &token_cfg("7/s"));
    let before_post = reloads(&proxy, "success").await;
    let a = post_reload(&proxy, Some("s3cret")).await;
    assert_eq!(a.status, 200, "{}", body_text(&a));
    assert_eq!(configured_rate(&proxy, "presence").await, 7.0);
    assert_eq!(reloads(&proxy, "success").await, before_post + 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unchanged_budget_keeps_its_state_across_a_reload_and_nothing_is_sent_twice() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let upstream = emu.local_addr();
    let proxy = ProxyProcess::start(
        &config("2/s", 1, "presence", "/api/**", "workers: 2"),
        upstream,
    )
    .await;
    emu.reset_stats();

    // 6 requests wait on 2/s, burst 1: grants at 0, 0.5, 1.0 ... 2.5 s.
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..6 {
        let addr = proxy.addr();
        let tx = tx.clone();
        tokio::spawn(async move {
            let a = patch(addr, i).await;
            let _ = tx.send((t0.elapsed(), a));
        });
    }
    drop(tx);
    let mut answers = Vec::new();
    // Reload right after the second grant: a budget rebuilt by the reload would grant the
    // third request at once instead of 500 ms after the second.
    for _ in 0..2 {
        answers.push(rx.recv().await.unwrap());
    }
    proxy.replace_config(&config("2/s", 1, "presence", "/api/v2/**", "workers: 2"));
    let a = post_reload(&proxy, None).await;
    let reloaded_at = t0.elapsed();
    assert_eq!(a.status, 200, "{}", body_text(&a));
    let s = status_json(&proxy).await;
    assert_eq!(
        s["routes"][1]["path"], "/api/v2/**",
        "the route change applied"
    );
    while let Some(x) = rx.recv().await {
        answers.push(x);
    }
    let times: Vec<Duration> = answers
        .iter()
        .map(|(t, a)| {
            assert_eq!(a.as_ref().unwrap().status, 200);
            *t
        })
        .collect();
    let gaps: Vec<u128> = times
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    println!(
        "FIGURES budget-state: reload at {} ms, answers at {:?} ms, gaps {gaps:?} ms",
        reloaded_at.as_millis(),
        times.iter().map(|t| t.as_millis()).collect::<Vec<_>>()
    );
    // 500 ms nominal; a fresh bucket would answer the third within a few ms of the reload.
    for (i, g) in gaps.iter().enumerate() {
        assert!(*g >= 400, "gap {i}: {g} ms between grants at 2/s: {gaps:?}");
    }

    // Keys that need a restart are reported; the rest (the new rate) still applies.
    // Addresses nothing listens on (reservations never listen).
    let other_listen = ReservedPort::loopback().unwrap();
    let other_admin = ReservedPort::loopback().unwrap();
    let restart_cfg = config("4/s", 1, "presence", "/api/v2/**", "workers: 3").render(
        other_listen.addr(),
        other_admin.addr(),
        upstream,
    );
    proxy.replace_config_text(&restart_cfg);
    let a = post_reload(&proxy, None).await;
    let body = body_text(&a);
    assert_eq!(a.status, 200, "{body}");
    assert!(
        body.contains("needs a restart to take effect: listen, admin_listen, workers"),
        "{body}"
    );
    assert!(
        body.contains(&format!("listening on {}", proxy.addr())),
        "{body}"
    );
    assert_eq!(configured_rate(&proxy, "presence").await, 4.0);
    assert_eq!(patch(proxy.addr(), 9).await.unwrap().status, 200);
    assert!(
        tokio::net::TcpStream::connect(other_listen.addr())
            .await
            .is_err(),
        "the new listen address is not served before a restart"
    );

    // Every client request reached the upstream exactly once.
    let stats = emu.stats();
    assert_eq!(stats.total_requests, 7, "{:?}", stats.by_route);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_queue_for_drain_timeout_then_answers_503_and_exits() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let mut proxy = ProxyProcess::start(
        &config(
            "10/s",
            1,
            "presence",
            "/api/**",
            "shutdown: { drain_timeout: \"3s\" }",
        ),
        emu.local_addr(),
    )
    .await;

    // 101 requests: one is sent at once, 100 wait.
    let n = 101;
    let t0 = Instant::now();
    let mut handles = Vec::new();
    for i in 0..n {
        let addr = proxy.addr();
        handles.push(tokio::spawn(async move {
            let a = patch(addr, i).await;
            (t0.elapsed(), a)
        }));
    }
    let t = Instant::now();
    loop {
        let s = status_json(&proxy).await;
        if s["queue_depth"].as_u64().unwrap() + emu.stats().total_requests >= n as u64 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "{s}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let waiting = status_json(&proxy).await["queue_depth"].as_u64().unwrap();
    let (code, out) = health(proxy.config_path());
    assert_eq!(code, Some(0), "shiftgate health while serving: {out}");

    proxy.signal("TERM");
    let signalled = t0.elapsed();
    let r = get(proxy.admin(), "/readyz").await.expect("readyz answers");
    let readyz_after = t0.elapsed() - signalled;
    let readyz_status = r.status.as_u16();
    // Poll a little longer: it must not come back.
    let mut readyz_503 = readyz_status == 503;
    if !readyz_503 {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(10)).await;
            if get(proxy.admin(), "/readyz").await.unwrap().status == 503 {
                readyz_503 = true;
                break;
            }
        }
    }

    // New requests during the drain (it has begun once /readyz says 503) are refused at once.
    let admin = proxy.admin();
    wait_until_async(
        "/readyz answers 503",
        Duration::from_secs(5),
        || async move { get(admin, "/readyz").await.is_ok_and(|a| a.status == 503) },
    )
    .await;
    // The container health check says "not ready" while it drains.
    let (code, out) = health(proxy.config_path());
    assert_eq!(code, Some(1), "shiftgate health while draining: {out}");
    assert!(out.contains("answered 503"), "{out}");
    for i in 0..3 {
        let t = Instant::now();
        let a = patch(proxy.addr(), 1000 + i).await.expect("an answer");
        let took = t.elapsed();
        assert_own_answer(&a, 503, "shiftgate.shutting.down");
        assert!(header(&a, "Retry-After").unwrap().parse::<u64>().unwrap() >= 1);
        assert!(took < Duration::from_millis(500), "refused after {took:?}");
        assert_eq!(header(&a, "Connection"), Some("close"));
    }

    let mut ok_after_signal = 0;
    let mut ok_before_signal = 0;
    let mut refused = 0;
    let mut errors = Vec::new();
    let mut last_answer = Duration::ZERO;
    for h in handles {
        let (at, a) = h.await.unwrap();
        last_answer = last_answer.max(at);
        match a {
            Ok(a) if a.status == 200 => {
                if at > signalled {
                    // The process stops soon: no keep-alive client should send its next
                    // request into this connection (50 ms for the signal to be handled).
                    if at > signalled + Duration::from_millis(50) {
                        assert_eq!(
                            header(&a, "Connection"),
                            Some("close"),
                            "answered {at:?}, signalled {signalled:?}"
                        );
                    }
                    ok_after_signal += 1;
                } else {
                    ok_before_signal += 1;
                }
            }
            Ok(a) => {
                assert_own_answer(&a, 503, "shiftgate.shutting.down");
                let ra: u64 = header(&a, "Retry-After")
                    .expect("Retry-After")
                    .parse()
                    .unwrap();
                assert!(ra >= 1);
                assert_eq!(header(&a, "Connection"), Some("close"));
                assert!(
                    at >= signalled + Duration::from_millis(2900),
                    "503 only once the drain timed out: at {at:?}"
                );
                refused += 1;
            }
            Err(e) => errors.push(e),
        }
    }
    let code = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(15)));
    let exited = t0.elapsed();
    println!(
        "FIGURES drain: {waiting} waiting at SIGTERM; /readyz {readyz_status} {} ms after the signal; \
         200 after the signal {ok_after_signal} (before {ok_before_signal}), 503 {refused}, \
         unanswered {}; last answer {:.2} s after the signal; exit {} ms after the last answer (code {code:?})",
        readyz_after.as_millis(),
        errors.len(),
        (last_answer - signalled).as_secs_f64(),
        exited.saturating_sub(last_answer).as_millis(),
    );
    assert!(readyz_503, "/readyz turned 503 at once");
    assert!(errors.is_empty(), "unanswered: {errors:?}");
    assert_eq!(ok_before_signal + ok_after_signal + refused, n);
    // 3 s at 10/s
    assert!(
        (25..=35).contains(&ok_after_signal),
        "{ok_after_signal} answered 200 during the drain"
    );
    assert_eq!(code, Some(0), "exited cleanly; log:\n{}", proxy.logs());
    let (code, out) = health(proxy.config_path());
    assert_eq!(code, Some(1), "shiftgate health once it has exited: {out}");
    assert!(out.contains("not ready"), "{out}");
    assert!(
        exited - last_answer < Duration::from_secs(2),
        "exit {:?} after the last answer",
        exited - last_answer
    );
    assert_eq!(
        emu.stats().total_requests as usize,
        ok_before_signal + ok_after_signal,
        "no 503'd request was sent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_upgrade_under_load_loses_no_request() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let mut proxy = ProxyProcess::start(&presence("100/s"), emu.local_addr()).await;
    emu.reset_stats();

    // 20 agents through 100/s for ~11 s: the old process serves ~3 s, both ~5 s, the new ~3 s.
    let agents = 20;
    let loops = 55;
    let t0 = Instant::now();
    let run = tokio::spawn(loadtest::run(
        shift_change(proxy.url(), agents, loops, agents),
        None,
    ));

    // 2 s into the run (200 requests at 100/s), the new process first: it listens on the
    // upgrade socket for the old one's fds.
    wait_until(
        "200 requests through the old process",
        Duration::from_secs(20),
        || emu.stats().total_requests >= 200,
    )
    .await;
    let new = proxy.spawn_upgrade();
    // Meanwhile the admin port keeps answering at once: while the new process starts, and for
    // 1 s once it waits for the sockets (its upgrade socket is there), when it must not hold
    // admin connections it cannot serve yet. That nothing goes unanswered is the point.
    let upgrade_sock = proxy.upgrade_sock();
    let spawned = Instant::now();
    let mut waiting_since: Option<Instant> = None;
    let mut slowest_admin = Duration::ZERO;
    while waiting_since.is_none_or(|t| t.elapsed() < Duration::from_secs(1)) {
        let t = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(5), get(proxy.admin(), "/healthz")).await;
        assert!(matches!(a, Ok(Ok(ref a)) if a.status == 200), "{a:?}");
        slowest_admin = slowest_admin.max(t.elapsed());
        if waiting_since.is_none() && upgrade_sock.exists() {
            waiting_since = Some(Instant::now());
        }
        assert!(
            spawned.elapsed() < Duration::from_secs(20),
            "the new process opened no upgrade socket; log:\n{}",
            proxy.logs()
        );
        tokio::time::sleep(POLL).await;
    }
    proxy.signal("QUIT");
    let quit_at = t0.elapsed();

    let old = proxy.replace_child(new).expect("old process");
    let mut old = OldProcess(Some(old));
    let old_exit = tokio::task::spawn_blocking(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        let child = old.0.as_mut().unwrap();
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                return (Some(st.code()), t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        (None, t0.elapsed())
    });

    let result = run.await.unwrap().unwrap();
    let summary = result.summary();
    let (old_code, old_exited) = old_exit.await.unwrap();
    let load_ended = t0.elapsed();
    println!(
        "FIGURES upgrade: errors={} answers {:?} messages {:?}; SIGQUIT at {:.2} s, old exited at {:.2} s ({:?}), load ended at {:.2} s; connections opened {}; slowest /healthz before the handover {} ms",
        summary.transport_errors,
        summary.by_status,
        summary.transport_error_messages,
        quit_at.as_secs_f64(),
        old_exited.as_secs_f64(),
        old_code,
        load_ended.as_secs_f64(),
        summary.connections,
        slowest_admin.as_millis()
    );
    assert_eq!(
        summary.transport_errors,
        0,
        "{:?}; log:\n{}",
        summary.transport_error_messages,
        proxy.logs()
    );
    assert_eq!(summary.by_status.get(&200), Some(&(agents * loops)));
    assert_eq!(
        old_code,
        Some(Some(0)),
        "the old process exited; log:\n{}",
        proxy.logs()
    );
    assert!(
        old_exited < load_ended,
        "the old process left while the load ran"
    );
    // The new one serves afterwards, on the same ports.
    assert_eq!(patch(proxy.addr(), 1).await.unwrap().status, 200);
    assert_eq!(get(proxy.admin(), "/readyz").await.unwrap().status, 200);
    assert_eq!(
        proxy.wait_exit(Duration::ZERO),
        None,
        "the new process runs"
    );
    assert_eq!(
        emu.stats().total_requests as usize,
        agents * loops + 1,
        "each request reached the upstream once"
    );
}

/// The old process of an upgrade, killed if the test fails before it exits.
struct OldProcess(Option<std::process::Child>);

impl Drop for OldProcess {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An upstream that answers 200 and then trickles its body, one chunk every 300 ms, for as
/// long as the connection lasts: no read ever times out, so the answer never ends.
fn trickling_upstream() -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(k) => head.extend_from_slice(&buf[..k]),
                    }
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                while conn.write_all(b"1\r\na\r\n").is_ok() {
                    std::thread::sleep(Duration::from_millis(300));
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_exits_within_drain_plus_upstream_timeout_even_with_an_answer_in_flight() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = trickling_upstream();
    let drain = Duration::from_secs(3);
    let upstream_timeout = Duration::from_secs(1);
    let mut proxy = ProxyProcess::start(
        &config(
            "10/s",
            1,
            "presence",
            "/api/**",
            "shutdown: { drain_timeout: \"3s\" }\nlimits: { upstream_timeout: \"1s\" }",
        ),
        upstream,
    )
    .await;
    // One request whose answer never ends: read it slowly, in the background.
    let mut client = tokio::net::TcpStream::connect(proxy.addr()).await.unwrap();
    client
        .write_all(b"GET /api/v2/slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = client.read(&mut first).await.unwrap();
    assert!(
        first[..n].starts_with(b"HTTP/1.1 200"),
        "the answer has begun"
    );
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 1024];
        while matches!(client.read(&mut buf).await, Ok(k) if k > 0) {}
    });

    let t0 = Instant::now();
    proxy.signal("TERM");
    let code = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(30)));
    let took = t0.elapsed();
    reader.abort();
    // The stop rule: drain_timeout + upstream_timeout + 5 s (Config::stop_timeout).
    let bound = drain + upstream_timeout + shiftgate::config::STOP_MARGIN;
    println!(
        "FIGURES stop: exited {:.2} s after SIGTERM with an answer in flight (bound {bound:?}; code {code:?})",
        took.as_secs_f64()
    );
    assert_eq!(code, Some(0), "exited; log:\n{}", proxy.logs());
    assert!(
        took <= bound + Duration::from_millis(700),
        "exited {took:?} after SIGTERM, bound {bound:?}"
    );
    assert!(
        took >= drain + upstream_timeout,
        "the answer in flight had its time: {took:?}"
    );
}

/// `shiftgate health --config PATH`: its exit code and what it printed (stdout and stderr).
fn health(config: &Path) -> (Option<i32>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .arg("health")
        .arg("--config")
        .arg(config)
        .output()
        .expect("shiftgate health runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// One datagram from a fake `$NOTIFY_SOCKET`, as text.
fn notification(sock: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the socket's read timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// systemd's `Type=notify`, with a fake `$NOTIFY_SOCKET`: the proxy sends `READY=1` and
/// `MAINPID=<its pid>` once its port accepts connections, and has written `--pid-file` by then;
/// `shiftgate health` exits 0. After a graceful upgrade the new process sends `READY=1` with
/// `MAINPID=<the new pid>` (how systemd follows the upgrade) and rewrites the pid file. SIGTERM
/// sends `STOPPING=1`; once the process is gone, `shiftgate health` exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_socket_hears_ready_once_listening_and_mainpid_after_an_upgrade() {
    use shiftgate::harness::{ProxyChild, ProxyOptions};
    use std::os::unix::net::UnixDatagram;

    let emu = emulator("token_rate_per_minute: 0\n").await;
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut options = ProxyOptions::new(env!("CARGO_BIN_EXE_shiftgate"));
    options.env = vec![("NOTIFY_SOCKET".to_string(), sock_path.display().to_string())];
    let upstream = emu.local_addr();
    let config = presence("100/s");
    // The first message is awaited before the proxy is known to listen: at the moment it
    // arrives, the port must accept a connection.
    let (tx, rx) = std::sync::mpsc::channel();
    let first_sock = sock.try_clone().unwrap();
    let mut proxy = ProxyChild::start(options, move |listen, admin| {
        std::thread::spawn(move || {
            let message = notification(&first_sock);
            let accepts = std::net::TcpStream::connect(listen).is_ok();
            let _ = tx.send((message, accepts));
        });
        Ok(config.render(listen, admin, upstream))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let (ready, accepts) = rx.recv_timeout(Duration::from_secs(20)).expect("READY=1");
    let pid_file = proxy.config_path().with_file_name("shiftgate.pid");
    let old_pid = proxy.pid();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");
    assert!(
        ready.lines().any(|l| l == format!("MAINPID={old_pid}")),
        "{ready:?}"
    );
    assert!(
        accepts,
        "the proxy port accepts connections once READY=1 is sent"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        old_pid.to_string()
    );
    let (code, out) = health(proxy.config_path());
    assert_eq!(code, Some(0), "shiftgate health while serving: {out}");

    // The upgrade: the new process waits on the upgrade socket, SIGQUIT hands the sockets over.
    let new = proxy.spawn(true).unwrap();
    let new_pid = new.id();
    wait_until(
        "the new process waits on the upgrade socket",
        Duration::from_secs(20),
        || proxy.upgrade_sock().exists(),
    )
    .await;
    proxy.signal("QUIT").unwrap();
    let old = proxy.replace_child(new).expect("old process");
    let mut old = OldProcess(Some(old));
    let handover = tokio::task::block_in_place(|| notification(&sock));
    println!("FIGURES notify: at start {ready:?}; after the upgrade {handover:?}");
    assert!(handover.lines().any(|l| l == "READY=1"), "{handover:?}");
    assert!(
        handover.lines().any(|l| l == format!("MAINPID={new_pid}")),
        "the new process names itself the main one: {handover:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).unwrap().trim(),
        new_pid.to_string()
    );

    proxy.signal("TERM").unwrap();
    let stopping = tokio::task::block_in_place(|| notification(&sock));
    assert!(stopping.lines().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let code = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(15)));
    assert_eq!(code, Some(0), "log:\n{}", proxy.logs());
    // The old process holds the admin port too until it has finished (SO_REUSEPORT).
    let old_exit = tokio::task::block_in_place(|| {
        let child = old.0.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    });
    assert!(
        old_exit.is_some(),
        "the old process exits after the handover"
    );
    let (code, out) = health(proxy.config_path());
    assert_eq!(code, Some(1), "shiftgate health with no proxy: {out}");
    assert!(out.contains("not ready"), "{out}");
}
