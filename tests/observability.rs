//! What ops see, checked with the tools ops use: a live `/metrics` scrape through `promtool`, the
//! alert rules through `promtool check/test rules`, every dashboard and alert expression through
//! a real Prometheus scraping a loaded proxy, the status page in a real (headless) Chromium, and
//! the admin endpoints; and no secret (a bearer token, the admin token) in anything served or
//! logged. Missing tools (promtool, prometheus, chromium, python3) fail the tests, never skip them.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::html::{elements, Element};
use common::presence::{self, PATH_TEMPLATE};
use common::prom::{metric_value, parse_exposition, split_comparison, sum, Prometheus};
use common::*;
use http::Method;
use shiftgate::emulator::{Fault, FaultKind};
use shiftgate::harness::promtool_check_metrics;
use shiftgate::loadtest::client::AgentConnection;
use shiftgate::loadtest::{user_id, Target};
use shiftgate::metrics::{CONTRACT_METRICS, REJECTION_REASONS};

/// Metrics exported only with `cluster` configured (a 0 there would page ops for a store nobody
/// runs, see `Metrics::cluster_redis_up`); this test configures no `cluster`, so they are absent. For
/// expressions on them the test stands in `up` (with the labels the real series would have after
/// a scrape: `job`, `instance`), so an empty answer still means a broken expression.
const ABSENT_WITHOUT_CLUSTER: &[(&str, &str)] = &[("shiftgate_cluster_redis_up", "up")];

/// The standard process metrics the dashboard draws. Where the binary does not register a process
/// collector (a build without it), panels on them are evaluated with `up` stood in, like
/// [`ABSENT_WITHOUT_CLUSTER`]; with one, the real series must answer.
const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
];

/// Routes of [`config`], in order; `none` is the label of requests that matched no route.
const ROUTES: &[&str] = &["oauth", "presence", "default"];
const BUDGETS: &[&str] = &["presence", "per-token"];

/// A proxy in front of the emulator: `presence` paced by a global and a per-token budget,
/// `default` paced per token, `oauth` unpaced.
fn config(presence_rate: &str, presence_max_wait: &str) -> ProxyConfig {
    ProxyConfig::new()
        .upstream("login")
        .budget("presence", &format!(r#"{{ rate: "{presence_rate}" }}"#))
        .budget("per-token", r#"{ rate: "10/s", per: token }"#)
        .route(r#"{ name: oauth, match: { path: "/oauth/**" }, upstream: login }"#)
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            upstream: api
            budgets: [presence, per-token]
            max_wait: "{presence_max_wait}"
            "#
        ))
        .route(
            r#"
            name: default
            match: { path: "/api/**" }
            upstream: api
            budgets: [per-token]
            "#,
        )
        .yaml("retry:\n  backoff_base: \"100ms\"")
}

/// Genesys's 429 on every presence PATCH, `Retry-After: 1`, from `start` for `duration`.
fn presence_outage(start: Duration, duration: Duration) -> Fault {
    Fault::new(FaultKind::Outage429 {
        retry_after: Some(1),
    })
    .on_path(shiftgate::emulator::PathTemplate::parse(PATH_TEMPLATE).unwrap())
    .starting_after(start)
    .lasting(duration)
}

async fn patch_presence(conn: &mut AgentConnection, user: &str, token: &str) -> u16 {
    patch_presence_answer(conn, user, token).await.0
}

/// A presence PATCH: the status (0 on a transport error) and the `Retry-After` seconds, if any.
async fn patch_presence_answer(
    conn: &mut AgentConnection,
    user: &str,
    token: &str,
) -> (u16, Option<u64>) {
    match send(
        conn,
        Method::PATCH,
        &presence::path(user),
        &[
            ("Authorization", token),
            ("Content-Type", "application/json"),
        ],
        presence::BODY,
    )
    .await
    {
        Ok(a) => (
            a.status.as_u16(),
            header(&a, "Retry-After").and_then(|v| v.parse().ok()),
        ),
        Err(_) => (0, None),
    }
}

fn connection(addr: SocketAddr) -> AgentConnection {
    AgentConnection::new(Target::parse(&format!("http://{addr}")).unwrap())
}

/// The tokens of a load: distinctive, so finding one anywhere is certain to be a leak.
fn tokens(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| format!("Bearer obs-secret-{i}-{}", uuid::Uuid::new_v4().simple()))
        .collect()
}

/// Budgets are listed by name (the config keeps them in a map), routes in config order.
fn sorted<T: Ord>(mut v: Vec<T>) -> Vec<T> {
    v.sort();
    v
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

// ------------------------------------------------------------------------------------------
// 1. A live scrape after throttling and retries
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_scrape_after_upstream_429s_passes_promtool_with_bounded_labels_and_moved_counters()
{
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"5ms\", max: \"10ms\" }\n").await;
    let started_at = unix_now();
    let proxy = ProxyProcess::start(&config("20/s", "60s"), emu.local_addr()).await;

    // 12 agents with 4 tokens send 5 presence PATCHes each; Genesys answers 429 (Retry-After 1)
    // to every one of them for 2 s from 300 ms on, so requests are throttled and retried.
    let tokens = tokens(4);
    let users: Vec<String> = (0..12).map(user_id).collect();
    emu.reset_stats();
    emu.add_fault(presence_outage(
        Duration::from_millis(300),
        Duration::from_secs(2),
    ));
    let mut agents = Vec::new();
    for (i, user) in users.iter().enumerate() {
        let (addr, user, token) = (proxy.addr(), user.clone(), tokens[i % 4].clone());
        agents.push(tokio::spawn(async move {
            let mut conn = connection(addr);
            let mut statuses = Vec::new();
            for _ in 0..5 {
                statuses.push(patch_presence(&mut conn, &user, &token).await);
            }
            statuses
        }));
    }
    let mut client_200 = 0;
    for a in agents {
        client_200 += a.await.unwrap().iter().filter(|&&s| s == 200).count();
    }
    // Paths with user ids on the other routes, and one that matches no route.
    let a = request(
        proxy.addr(),
        Method::GET,
        &format!("/api/v2/users/{}/routingstatus", users[0]),
        &[("Authorization", &tokens[0])],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 200);
    let a = request(
        proxy.addr(),
        Method::GET,
        &format!("/nowhere/{}", users[1]),
        &[("Authorization", &tokens[1])],
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(a.status, 404);

    let text = proxy.metrics().await;

    // promtool, the reference parser and linter, accepts the live exposition as it is.
    promtool_check_metrics(&text);

    // Every metric of the contract with its type; the Redis gauge only exists with `cluster`.
    let (types, samples) = parse_exposition(&text);
    println!("metric families in the scrape:");
    for (name, kind) in &types {
        println!("  {name} ({kind})");
    }
    for (name, kind) in CONTRACT_METRICS {
        if ABSENT_WITHOUT_CLUSTER.iter().any(|(n, _)| n == name) {
            assert!(
                !types.contains_key(*name),
                "{name} is exported without cluster"
            );
            continue;
        }
        assert_eq!(
            types.get(*name).map(String::as_str),
            Some(*kind),
            "{name} missing or of the wrong type"
        );
    }
    let extra: Vec<&String> = types
        .keys()
        .filter(|n| !CONTRACT_METRICS.iter().any(|(c, _)| c == n))
        .collect();
    assert!(extra.is_empty(), "metrics outside the contract: {extra:?}");

    // Labels are bounded by the config: every value is a configured name or from a fixed set,
    // and none holds a token, a user id, a path or an address.
    let mut secrets: Vec<String> = tokens.clone();
    secrets.extend(
        tokens
            .iter()
            .map(|t| t.trim_start_matches("Bearer ").to_string()),
    );
    secrets.extend(users.iter().cloned());
    secrets.push("127.0.0.1".into());
    let allowed_retry = ["429", "502", "503", "504", "connect"];
    for s in &samples {
        for (k, v) in &s.labels {
            let where_ = format!("{}{{{k}={v:?}}}", s.name);
            assert!(!v.contains('/'), "a path in a label: {where_}");
            for secret in &secrets {
                assert!(
                    !v.contains(secret.as_str()),
                    "a secret in a label: {where_}"
                );
            }
            let ok = match k.as_str() {
                "route" => ROUTES.contains(&v.as_str()) || v == "none",
                "budget" => BUDGETS.contains(&v.as_str()),
                "status" => v.len() == 3 && v.bytes().all(|b| b.is_ascii_digit()),
                "reason" if s.name == "shiftgate_retries_total" => {
                    allowed_retry.contains(&v.as_str())
                }
                "reason" => REJECTION_REASONS.contains(&v.as_str()),
                "result" => v == "success" || v == "failure",
                "listener" => shiftgate::metrics::LISTENERS.contains(&v.as_str()),
                "version" => v == env!("CARGO_PKG_VERSION"),
                "le" => v == "+Inf" || v.parse::<f64>().is_ok(),
                _ => false,
            };
            assert!(ok, "unexpected label {where_}");
        }
    }

    // The counters moved, and agree with each other and with what the emulator saw.
    let stats = emu.stats();
    let emu_429 = stats.count("presence_patch", 429) as f64;
    let emu_200 = stats.count("presence_patch", 200) as f64;
    let p = [("route", "presence")];
    let up_429 = sum(
        &samples,
        "shiftgate_upstream_responses_total",
        &[("route", "presence"), ("status", "429")],
    );
    let up_200 = sum(
        &samples,
        "shiftgate_upstream_responses_total",
        &[("route", "presence"), ("status", "200")],
    );
    let retries_429 = sum(
        &samples,
        "shiftgate_retries_total",
        &[("route", "presence"), ("reason", "429")],
    );
    let throttles = sum(
        &samples,
        "shiftgate_budget_throttles_total",
        &[("budget", "presence")],
    );
    let throttles_token = sum(
        &samples,
        "shiftgate_budget_throttles_total",
        &[("budget", "per-token")],
    );
    println!(
        "upstream 429s {up_429} (emulator {emu_429}), 200s {up_200} (emulator {emu_200}), \
         retries(429) {retries_429}, throttles presence {throttles} per-token {throttles_token}, \
         client 200s {client_200}"
    );
    assert!(up_429 > 0.0, "no upstream 429 counted");
    assert_eq!(up_429, emu_429, "upstream 429s: proxy and emulator agree");
    assert_eq!(up_200, emu_200, "upstream 200s: proxy and emulator agree");
    assert!(retries_429 > 0.0, "no retry after a 429 counted");
    assert_eq!(
        throttles, up_429,
        "each upstream 429 is charged to presence"
    );
    assert_eq!(
        throttles_token, up_429,
        "and to per-token (the route names both)"
    );
    // Every request is answered once; every attempt after the first is a counted retry.
    let answered = sum(&samples, "shiftgate_requests_total", &p);
    let retries = sum(&samples, "shiftgate_retries_total", &p);
    let attempts = sum(&samples, "shiftgate_upstream_responses_total", &p);
    assert_eq!(answered, 60.0, "every presence PATCH answered and counted");
    assert_eq!(
        sum(
            &samples,
            "shiftgate_requests_total",
            &[("route", "presence"), ("status", "200")]
        ),
        client_200 as f64
    );
    assert_eq!(
        attempts,
        answered + retries,
        "attempts = requests + retries"
    );
    assert_eq!(
        sum(&samples, "shiftgate_upstream_duration_seconds_count", &p),
        attempts
    );
    assert_eq!(
        sum(&samples, "shiftgate_queue_wait_seconds_count", &p),
        60.0
    );
    assert_eq!(
        sum(&samples, "shiftgate_request_duration_seconds_count", &p),
        60.0
    );
    assert_eq!(
        sum(
            &samples,
            "shiftgate_rejections_total",
            &[("route", "none"), ("reason", "no_route")]
        ),
        1.0
    );
    // Nothing waits or is in flight once every answer is in.
    assert_eq!(sum(&samples, "shiftgate_queue_depth", &[]), 0.0);
    assert_eq!(sum(&samples, "shiftgate_inflight_requests", &[]), 0.0);
    // Rates: the configured ones, and the one in force lowered by the 429s.
    assert_eq!(
        sum(
            &samples,
            "shiftgate_budget_configured_rate",
            &[("budget", "presence")]
        ),
        20.0
    );
    let in_force = sum(&samples, "shiftgate_budget_rate", &[("budget", "presence")]);
    assert!(
        in_force > 0.0 && in_force < 20.0,
        "rate in force {in_force} after 429s"
    );
    // The queue's bound in force (the default), and the pauses: each 429 paused presence for
    // its Retry-After of 1 s at most, so what is left of a pause is between 0 and 1 s.
    assert_eq!(sum(&samples, "shiftgate_queue_max_depth", &[]), 10_000.0);
    assert_eq!(sum(&samples, "shiftgate_max_connections", &[]), 20_000.0);
    for budget in BUDGETS {
        let paused = sum(
            &samples,
            "shiftgate_budget_paused_seconds",
            &[("budget", *budget)],
        );
        assert!(
            (0.0..=1.0).contains(&paused),
            "{budget} paused for {paused} s"
        );
    }
    // The config loaded at start took effect at start (not at the Unix epoch).
    let loaded = sum(
        &samples,
        "shiftgate_config_last_reload_success_timestamp_seconds",
        &[],
    );
    assert!(
        loaded >= started_at.floor() && loaded <= unix_now(),
        "last successful load at {loaded}, the proxy started at {started_at}"
    );
    assert_eq!(
        sum(
            &samples,
            "shiftgate_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1.0
    );
}

// ------------------------------------------------------------------------------------------
// 2. Alert rules
// ------------------------------------------------------------------------------------------

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let dir = repo_path("deploy/prometheus");
    for args in [
        &["check", "rules", "alerts.yml"][..],
        &["test", "rules", "alerts_test.yml"][..],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(&dir)
            .output()
            .expect("promtool must be on PATH (Debian package `prometheus`)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("promtool {}:\n{said}", args.join(" "));
        assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
        assert!(said.contains("SUCCESS"), "{said}");
        assert!(!said.contains("FAILED"), "{said}");
    }
}

// ------------------------------------------------------------------------------------------
// 3. Every dashboard and alert expression, evaluated by a real Prometheus
// ------------------------------------------------------------------------------------------

/// Runs one of the deploy scripts that print an expression per line as JSON.
fn script_lines(script: &str) -> Vec<serde_json::Value> {
    let out = Command::new("python3")
        .arg(repo_path(script))
        .output()
        .expect("python3 must be on PATH");
    assert!(
        out.status.success(),
        "{script} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{script}: {e}: {l}")))
        .collect();
    assert!(!lines.is_empty(), "{script} printed no expression");
    lines
}

/// Sends presence PATCHes on `agents` connections (one request at a time each) until `until`;
/// returns the statuses the clients got. Like an SDK, an agent answered 429 waits `Retry-After`
/// before its next request.
async fn load_until(
    addr: SocketAddr,
    agents: usize,
    tokens: &[String],
    until: Instant,
) -> BTreeMap<u16, usize> {
    let mut handles = Vec::new();
    for i in 0..agents {
        let (user, token) = (user_id(i), tokens[i % tokens.len()].clone());
        handles.push(tokio::spawn(async move {
            let mut conn = connection(addr);
            let mut statuses = Vec::new();
            while Instant::now() < until {
                let (status, retry_after) = patch_presence_answer(&mut conn, &user, &token).await;
                statuses.push(status);
                if status == 429 {
                    let wait = Duration::from_secs(retry_after.unwrap_or(1).clamp(1, 3));
                    tokio::time::sleep(wait.min(until.saturating_duration_since(Instant::now())))
                        .await;
                }
            }
            statuses
        }));
    }
    let mut by_status = BTreeMap::new();
    for h in handles {
        for s in h.await.unwrap() {
            *by_status.entry(s).or_insert(0) += 1;
        }
    }
    by_status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_evaluates_every_dashboard_and_alert_expression_on_a_loaded_proxy() {
    let t0 = Instant::now();
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"5ms\", max: \"15ms\" }\n").await;
    // presence: 20/s, at most 2 s of wait; 30 agents keep about 30 requests queued, so some
    // wait and, while Genesys throttles, some are refused with queue_wait (client 429s).
    let proxy = ProxyProcess::start(&config("20/s", "2s"), emu.local_addr()).await;
    let prom = Prometheus::start(proxy.admin()).await;
    println!("prometheus ready after {:?}", t0.elapsed());

    // 20 s of load with three short Genesys outages, the last near the end, so the budget's
    // rate in force is still below its configured rate when the expressions are evaluated
    // ("Budgets backing off" counts such budgets; the test checks this precondition below).
    let load = Duration::from_secs(20);
    for (start, len) in [(3_000, 1_000), (10_000, 1_000), (17_000, 1_500)] {
        emu.add_fault(presence_outage(
            Duration::from_millis(start),
            Duration::from_millis(len),
        ));
    }
    let by_status = load_until(proxy.addr(), 30, &tokens(6), Instant::now() + load).await;
    println!("load done after {:?}: {by_status:?}", t0.elapsed());
    assert!(
        by_status.get(&200).is_some_and(|&n| n > 100),
        "{by_status:?}"
    );

    // Preconditions of the setup (not of the dashboard): the budget backs off right now.
    let status = json(&get(proxy.admin(), "/status.json").await.unwrap());
    let presence = status["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "presence")
        .expect("the presence budget in /status.json");
    assert!(
        presence["rate_in_force"].as_f64() < presence["configured_rate"].as_f64(),
        "the presence budget is not backing off: {presence}"
    );
    // Wait for a scrape after that check, then evaluate everything at one instant.
    let checked = unix_now();
    let deadline = Instant::now() + Duration::from_secs(10);
    let at = loop {
        let r = prom
            .query(
                r#"timestamp(shiftgate_build_info{job="shiftgate"})"#,
                unix_now(),
            )
            .await
            .unwrap();
        let last = r
            .first()
            .and_then(|s| s["value"][1].as_str())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        if last > checked {
            break unix_now();
        }
        assert!(Instant::now() < deadline, "no scrape since {checked}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // Prometheus scrapes the proxy and has loaded and evaluated every alert rule.
    let targets = prom.api("/api/v1/targets").await;
    let active = targets["data"]["activeTargets"].as_array().unwrap();
    assert_eq!(active.len(), 1, "{targets}");
    assert_eq!(active[0]["health"], "up", "{}", active[0]);
    let rules = prom.api("/api/v1/rules").await;
    let loaded: Vec<&serde_json::Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    let alerts = script_lines("deploy/prometheus/list_alert_exprs.py");
    assert_eq!(loaded.len(), alerts.len(), "rules loaded: {rules}");
    for r in &loaded {
        assert_eq!(r["health"], "ok", "rule {} unhealthy: {r}", r["name"]);
    }

    let mut failures = Vec::new();
    let registers_process = shiftgate::metrics::Metrics::new()
        .registry
        .gather()
        .iter()
        .any(|f| f.name().starts_with("process_"));
    let stand_in = |expr: &str| -> Option<String> {
        let mut names: Vec<(&str, &str)> = ABSENT_WITHOUT_CLUSTER.to_vec();
        if !registers_process {
            names.extend(PROCESS_METRICS.iter().map(|n| (*n, "up")));
        }
        let replaced = names
            .iter()
            .fold(expr.to_string(), |e, (name, with)| e.replace(name, with));
        (replaced != expr).then_some(replaced)
    };

    // Every dashboard expression returns at least one series.
    println!("dashboard expressions at {at:.3}:");
    for line in script_lines("deploy/grafana/check_dashboard.py") {
        let expr = line["expr"].as_str().unwrap();
        // An annotation marks events (a new version, a reload): it evaluates, and may rightly
        // find none at this instant.
        if let Some(annotation) = line["annotation"].as_str() {
            match prom.query(expr, at).await {
                Ok(s) => println!(
                    "  ok ({} series) annotation {annotation:?}: {expr}",
                    s.len()
                ),
                Err(e) => failures.push(format!("annotation {annotation:?}: {expr}: {e}")),
            }
            continue;
        }
        let panel = line["panel"].as_str().unwrap();
        let result = prom.query(expr, at).await;
        let what = format!("panel {panel:?}: {expr}");
        match (result, stand_in(expr)) {
            (Ok(s), Some(replaced)) if s.is_empty() => expect_series(
                &mut failures,
                format!("{what} [as {replaced}]"),
                prom.query(&replaced, at).await,
            ),
            (result, _) => expect_series(&mut failures, what, result),
        }
    }
    // Every alert expression evaluates; its left-hand side returns at least one series (the
    // comparison itself may rightly return none on a healthy proxy).
    println!("alert expressions at {at:.3}:");
    for line in &alerts {
        let (alert, expr) = (
            line["alert"].as_str().unwrap(),
            line["expr"].as_str().unwrap(),
        );
        let result = prom.query(expr, at).await;
        if let Err(e) = &result {
            failures.push(format!("alert {alert}: {expr}: {e}"));
        }
        // `absent(...)` has no threshold: with the proxy scraped it must return nothing.
        if expr.trim_start().starts_with("absent(") {
            match result {
                Ok(s) if s.is_empty() => println!("  ok (absent) alert {alert}: {expr}"),
                Ok(s) => failures.push(format!(
                    "alert {alert}: {expr} fires on a live proxy: {s:?}"
                )),
                Err(_) => {}
            }
            continue;
        }
        let Some((lhs, op, rhs)) = split_comparison(expr) else {
            failures.push(format!("alert {alert}: no top-level comparison in {expr}"));
            continue;
        };
        assert!(
            rhs.parse::<f64>().is_ok(),
            "alert {alert}: `{op} {rhs}` is not a threshold"
        );
        let what = format!("alert {alert} left-hand side: {lhs}");
        match (prom.query(lhs, at).await, stand_in(lhs)) {
            (Ok(s), Some(replaced)) if s.is_empty() => expect_series(
                &mut failures,
                format!("{what} [as {replaced}]"),
                prom.query(&replaced, at).await,
            ),
            (result, _) => expect_series(&mut failures, what, result),
        }
    }
    assert!(
        failures.is_empty(),
        "expressions that failed:\n{}\nprometheus log:\n{}",
        failures.join("\n"),
        prom.logs()
    );
    drop(prom);
    println!("prometheus test took {:?}", t0.elapsed());
}

/// Records a failure unless `result` holds at least one series.
fn expect_series(
    failures: &mut Vec<String>,
    what: String,
    result: Result<Vec<serde_json::Value>, String>,
) {
    match result {
        Ok(series) if series.is_empty() => failures.push(format!("{what}: no series")),
        Ok(series) => println!("  ok ({} series) {what}", series.len()),
        Err(e) => failures.push(format!("{what}: {e}")),
    }
}

#[test]
fn split_comparison_finds_only_the_top_level_operator() {
    assert_eq!(
        split_comparison(r#"sum by (job) (rate(x{status="429",a!="b"}[5m])) > 0.5"#),
        Some((
            r#"sum by (job) (rate(x{status="429",a!="b"}[5m]))"#,
            ">",
            "0.5"
        ))
    );
    assert_eq!(
        split_comparison(r#"up{job="shiftgate"} == 0"#),
        Some((r#"up{job="shiftgate"}"#, "==", "0"))
    );
    assert_eq!(
        split_comparison("histogram_quantile(0.99,\n  sum(a > 1)\n) >= 10"),
        Some(("histogram_quantile(0.99,\n  sum(a > 1)\n)", ">=", "10"))
    );
    assert_eq!(split_comparison(r#"rate(x{le=~"<1"}[1m])"#), None);
}

// ------------------------------------------------------------------------------------------
// 4. The status page in a real browser
// ------------------------------------------------------------------------------------------

/// Runs headless Chromium with a fresh profile; returns its stdout.
async fn chromium(args: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new("/usr/bin/chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(args)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .kill_on_drop(true);
    let child = cmd
        .spawn()
        .expect("chromium must be installed at /usr/bin/chromium (Debian package `chromium`)");
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("chromium finished within 60 s")
        .unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_in_a_real_browser_shows_routes_waiting_requests_and_rates() {
    let t0 = Instant::now();
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&config("2/s", "60s"), emu.local_addr()).await;

    // 30 clients send presence PATCHes against a 2/s budget, each again as soon as it is
    // answered: about 29 wait at any time, however long the browser takes to start.
    let tokens = tokens(30);
    let mut waiting = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let (addr, token) = (proxy.addr(), token.clone());
        waiting.push(tokio::spawn(async move {
            let mut conn = connection(addr);
            loop {
                patch_presence(&mut conn, &user_id(i), &token).await;
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = json(&get(proxy.admin(), "/status.json").await.unwrap());
        if s["queue_depth"].as_u64().unwrap() >= 25 {
            break;
        }
        assert!(Instant::now() < deadline, "requests did not queue: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("http://{}/status", proxy.admin());
    let browser = Instant::now();
    let dom = chromium(&["--dump-dom".into(), url.clone()]).await;
    println!("chromium --dump-dom took {:?}", browser.elapsed());

    // Every configured route has its row; the route under load shows its waiting requests.
    let rows = elements(&dom, "tr");
    let route_rows: Vec<&Element> = rows.iter().filter(|r| r.has_class("route")).collect();
    let names: Vec<&str> = route_rows
        .iter()
        .filter_map(|r| r.attr("data-route"))
        .collect();
    assert_eq!(names, ROUTES, "route rows in config order:\n{dom}");
    for row in &route_rows {
        let cells = elements(row.inner, "td");
        let depth = cells
            .iter()
            .find(|c| c.has_class("queue-depth"))
            .expect("td.queue-depth")
            .text();
        let depth: u64 = depth.parse().unwrap_or_else(|_| panic!("depth {depth:?}"));
        let route = row.attr("data-route").unwrap();
        println!("  route {route}: {depth} waiting");
        if route == "presence" {
            assert!(depth > 0, "the loaded route shows no waiting request");
        } else {
            assert_eq!(depth, 0, "route {route}");
        }
    }
    // Every budget shows the rate in force, in requests per second.
    let budget_rows: Vec<&Element> = rows.iter().filter(|r| r.has_class("budget")).collect();
    let names: Vec<&str> = budget_rows
        .iter()
        .filter_map(|r| r.attr("data-budget"))
        .collect();
    assert_eq!(sorted(names), sorted(BUDGETS.to_vec()), "a row per budget");
    for row in &budget_rows {
        let cells = elements(row.inner, "td");
        let rate = cells
            .iter()
            .find(|c| c.has_class("rate-in-force"))
            .expect("td.rate-in-force")
            .text();
        println!("  budget {}: {rate}", row.attr("data-budget").unwrap());
        let per_second = rate.split("/s").next().unwrap();
        assert!(
            per_second.parse::<f64>().is_ok_and(|r| r > 0.0),
            "rate in force {rate:?}"
        );
    }

    // The header says the config loaded at start is in force (not "never").
    let card = dom
        .split_once("id=\"last-reload\"")
        .and_then(|(_, rest)| rest.split_once("</time>"))
        .map(|(card, _)| card)
        .unwrap_or_else(|| panic!("no last reload time in:\n{dom}"));
    assert!(card.contains(">ok</span>"), "last reload: {card}");

    // A screenshot for people to look at, kept under target/ (ignored by git).
    let out_dir = repo_path("target/test-output");
    std::fs::create_dir_all(&out_dir).unwrap();
    let png = out_dir.join("status.png");
    let _ = std::fs::remove_file(&png);
    let shot = Instant::now();
    chromium(&[
        format!("--screenshot={}", png.display()),
        "--window-size=1280,1000".into(),
        url,
    ])
    .await;
    println!(
        "chromium --screenshot took {:?}; saved {}",
        shot.elapsed(),
        png.display()
    );
    assert_png(&png, 1280, 1000);

    for w in waiting {
        w.abort();
    }
    println!("browser test took {:?}", t0.elapsed());
}

/// The file is a PNG of the given size (its IHDR chunk).
fn assert_png(path: &Path, width: u32, height: u32) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((w, h), (width, height));
}

// ------------------------------------------------------------------------------------------
// 5. Admin endpoints, and no secret in anything served or logged
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer_and_no_token_shows_in_pages_metrics_or_log() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let admin_token = format!("obs-admin-{}", uuid::Uuid::new_v4().simple());
    // Everything of shiftgate's own at debug, access lines included: the most a log can hold.
    // The reload needs a token: the config names its variable (and the proxy would refuse to
    // start without it set).
    let proxy = ProxyProcess::start_with(
        &config("20/s", "60s").yaml("admin_token_env: SHIFTGATE_ADMIN_TOKEN"),
        emu.local_addr(),
        &[
            ("SHIFTGATE_ADMIN_TOKEN", admin_token.as_str()),
            (
                "RUST_LOG",
                "info,shiftgate=debug,shiftgate::access=info,pingora=info",
            ),
        ],
    )
    .await;
    let admin = proxy.admin();

    // Liveness and readiness.
    for (path, body) in [("/healthz", "ok\n"), ("/readyz", "ready\n")] {
        let a = get(admin, path).await.unwrap();
        assert_eq!(a.status, 200, "{path}");
        assert_eq!(a.body, body, "{path}");
    }
    // Paths that are not admin endpoints are 404; a known one with the wrong method is 405.
    for path in [
        "/",
        "/nope",
        "/metrics/",
        "/status/",
        "/status.html",
        "/healthz/x",
        "/api/v2/users/me",
        "/-/reload/now",
    ] {
        assert_eq!(get(admin, path).await.unwrap().status, 404, "GET {path}");
    }
    assert_eq!(get(admin, "/-/reload").await.unwrap().status, 405);

    // Traffic carrying the token: paced, unpaced, throttled by Genesys (the warning path),
    // matching no route, and reloads with and without the admin token.
    let token = tokens(1).remove(0);
    let user = user_id(7);
    emu.add_fault(presence_outage(Duration::ZERO, Duration::from_millis(500)));
    let mut conn = connection(proxy.addr());
    assert_eq!(patch_presence(&mut conn, &user, &token).await, 200);
    for (path, status) in [
        (format!("/api/v2/users/{user}/routingstatus"), 200),
        ("/oauth/nothing-here".to_string(), 404),
        (format!("/elsewhere/{user}"), 404),
    ] {
        let a = request(
            proxy.addr(),
            Method::GET,
            &path,
            &[("Authorization", &token)],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(a.status, status, "GET {path}");
    }
    let reload = |auth: Option<String>| async move {
        let headers: Vec<(&str, String)> = auth.into_iter().map(|v| ("Authorization", v)).collect();
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        request(admin, Method::POST, "/-/reload", &headers, Bytes::new())
            .await
            .unwrap()
            .status
    };
    // Before any reload, the status shows the config loaded at start as the last good one.
    let before = json(&get(admin, "/status.json").await.unwrap());
    assert_eq!(before["last_reload_ok"], true, "{before}");
    let loaded_at = before["last_reload_unix"].as_u64().expect("a time") as f64;
    assert!(
        (unix_now() - loaded_at).abs() < 30.0,
        "loaded at {loaded_at}"
    );

    assert_eq!(reload(None).await, 401);
    assert_eq!(reload(Some(token.clone())).await, 401);
    assert_eq!(reload(Some(format!("Bearer {admin_token}"))).await, 200);

    // /status.json parses and lists every route and budget of the config, in order.
    let status = json(&get(admin, "/status.json").await.unwrap());
    let names = |key: &str| -> Vec<String> {
        status[key]
            .as_array()
            .unwrap_or_else(|| panic!("no {key} in {status}"))
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("routes"), ROUTES);
    assert_eq!(sorted(names("budgets")), sorted(BUDGETS.to_vec()));
    assert_eq!(status["routes"][1]["requests_total"], 1);
    let presence = status["budgets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "presence")
        .unwrap();
    assert_eq!(presence["throttles_total"], 1, "{presence}");
    assert_eq!(status["last_reload_ok"], true);

    // No secret anywhere: the token (with or without "Bearer "), the admin token, and the
    // Authorization header itself.
    let status_html = get(admin, "/status").await.unwrap();
    assert_eq!(status_html.status, 200);
    let served = [
        (
            "/status",
            String::from_utf8(status_html.body.to_vec()).unwrap(),
        ),
        ("/status.json", status.to_string()),
        ("/metrics", proxy.metrics().await),
    ];
    let log = proxy.logs();
    // The log is not trivially clean: it holds the access lines and the 429 warning.
    assert!(log.contains("upstream throttled (429)"), "log:\n{log}");
    assert!(
        log.contains("routingstatus"),
        "no access line in the log:\n{log}"
    );
    let bare = token.trim_start_matches("Bearer ");
    for (what, text) in served.iter().chain([&("the log", log)]) {
        for secret in [token.as_str(), bare, admin_token.as_str()] {
            assert!(
                !text.contains(secret),
                "{what} contains a secret {secret:?}"
            );
        }
        assert!(
            !text.to_ascii_lowercase().contains("authorization:"),
            "{what} shows an Authorization header"
        );
    }
}

/// A budget nothing has slowed reads exactly its configured rate, whatever the rate: in
/// `/status.json`, on the status page (no "below the configured rate" marker) and in
/// `shiftgate_budget_rate` (the dashboard's "Budgets backing off" compares it with
/// `shiftgate_budget_configured_rate`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untouched_budget_reads_exactly_its_configured_rate() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    // Rates where rate × 0.997 / 0.997 is not rate in floating point, among plain ones.
    let rates = ["100/min", "25/min", "895/s", "375/h", "10/s", "300/min"];
    let mut cfg = ProxyConfig::new();
    for (i, rate) in rates.iter().enumerate() {
        cfg = cfg
            .budget(&format!("b{i}"), &format!(r#"{{ rate: "{rate}" }}"#))
            .route(&format!(
                r#"{{ name: r{i}, match: {{ path: "/api/v2/r{i}/**" }}, budgets: [b{i}] }}"#
            ));
    }
    let proxy = ProxyProcess::start(&cfg, emu.local_addr()).await;
    // One request per budget, so each holds a bucket (the emulator's 404 is fine).
    for i in 0..rates.len() {
        let a = request(
            proxy.addr(),
            Method::GET,
            &format!("/api/v2/r{i}/x"),
            &[("Authorization", "Bearer t")],
            Bytes::new(),
        )
        .await
        .unwrap();
        assert_eq!(
            header(&a, "X-Shiftgate-Attempts"),
            Some("1"),
            "sent upstream"
        );
    }
    let status = json(&get(proxy.admin(), "/status.json").await.unwrap());
    let metrics = proxy.metrics().await;
    let page =
        String::from_utf8(get(proxy.admin(), "/status").await.unwrap().body.to_vec()).unwrap();
    let mut wrong = Vec::new();
    for (i, b) in status["budgets"].as_array().unwrap().iter().enumerate() {
        let (configured, in_force) = (b["configured_rate"].as_f64(), b["rate_in_force"].as_f64());
        assert_eq!(b["keys"], 1, "{b}");
        if in_force != configured {
            wrong.push(format!(
                "{} ({}): status.json rate_in_force {in_force:?} != configured {configured:?}",
                b["name"], rates[i]
            ));
        }
        let series = |n: &str| metric_value(&metrics, &format!("{n}{{budget=\"b{i}\"}}"));
        if series("shiftgate_budget_rate") != series("shiftgate_budget_configured_rate") {
            wrong.push(format!(
                "b{i} ({}): shiftgate_budget_rate {:?} != configured {:?}",
                rates[i],
                series("shiftgate_budget_rate"),
                series("shiftgate_budget_configured_rate")
            ));
        }
    }
    if page.contains("class=\"marker\"") {
        wrong.push("the status page marks a budget as below its configured rate".into());
    }
    assert!(
        wrong.is_empty(),
        "untouched budgets read as backing off:\n{}",
        wrong.join("\n")
    );
}

/// The standard process metrics describe the proxy's own process: resident memory, open file
/// descriptors (within the limit, and about what /proc says), threads, CPU time and start time,
/// on the proxy's registry (the scrape of `/metrics`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_metrics_describe_the_proxy_process() {
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let proxy = ProxyProcess::start(&config("100/s", "10s"), emu.local_addr()).await;
    let text = proxy.metrics().await;
    promtool_check_metrics(&text);
    let (types, _) = parse_exposition(&text);
    let value = |name: &str| -> f64 {
        metric_value(&text, name).unwrap_or_else(|| panic!("{name} missing:\n{text}"))
    };
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ] {
        assert!(types.contains_key(name), "{name} in the scrape");
    }
    let rss = value("process_resident_memory_bytes");
    let fds = value("process_open_fds");
    let max_fds = value("process_max_fds");
    let threads = value("process_threads");
    let started = value("process_start_time_seconds");
    let fds_in_proc = std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
        .unwrap()
        .count() as f64;
    println!(
        "FIGURES process: rss {:.1} MiB, open fds {fds} (/proc: {fds_in_proc}) of {max_fds}, \
         threads {threads}, cpu {} s, started {:.0} s ago",
        rss / 1048576.0,
        value("process_cpu_seconds_total"),
        unix_now() - started
    );
    assert!(rss > 1_000_000.0, "resident memory {rss}");
    assert!(fds > 5.0 && fds <= max_fds, "open fds {fds} of {max_fds}");
    assert!(
        (fds - fds_in_proc).abs() <= 5.0,
        "open fds {fds}, /proc says {fds_in_proc}: the proxy's process, not another"
    );
    assert!(threads >= 2.0, "threads {threads}");
    let age = unix_now() - started;
    assert!((0.0..120.0).contains(&age), "started {age} s ago");
}
