//! `shiftgate discover` against the emulator: limits it is not told are found within 10 %,
//! every user is left as found, 429s stay few, the config passes `check`, and the secret never
//! shows. Each test runs the real binary against an emulator with limits of its own.
//!
//! The limits are small on purpose: discovery ramps from 1 request/s and puts users back at
//! half the slowest limit found, so its run time grows with a limit's size, not its window.
//! Only the limit the org limits API lists per minute keeps a minute's window.

#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use shiftgate::harness::EmulatorRuntime;

const SECRET: &str = "s3cret-never-printed-7f3a";
const BUSY: &str = "31fe3bac-dea6-44b7-bed7-47f91660a1a0";
const PRESENCE: &str = "/api/v2/users/{u}/presences/{s}";
/// The users a run may touch: the two set Busy by [`prepare`] and one more. Users are put back
/// at half the slowest limit found, often 1 a second: each one costs a test that long.
const USERS: &str = "3";

/// An emulator that knows one client, accepts only the tokens it issued, lists 12 users, and
/// enforces `limits` (YAML lines).
async fn org(limits: &str) -> EmulatorRuntime {
    common::emulator(&format!(
        "clients: [{{ id: app, secret: {SECRET:?} }}]\nauth: {{ require_issued_tokens: true }}\nusers: 12\n{limits}"
    ))
    .await
}

/// YAML lines for an org with no per-token limit, no limits API, and these route limits on
/// `method` `path`: (name, limit, per).
fn route_limits(method: &str, path: &str, limits: &[(&str, &str, &str)]) -> String {
    let mut yaml = String::from("token_rate_per_minute: 0\nlimits_api: false\nroute_limits:\n");
    for (name, limit, per) in limits {
        yaml.push_str(&format!(
            "  - {{ name: {name}, method: {method}, path: \"{path}\", limit: \"{limit}\", per: {per} }}\n"
        ));
    }
    yaml
}

/// The binary with `args`, the secret in `var` (absent when `secret` is `None`).
async fn shiftgate(args: &[&str], var: &str, secret: Option<&str>) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"));
    command.args(args).env_remove(var);
    if let Some(secret) = secret {
        command.env(var, secret);
    }
    command.output().await.expect("the binary runs")
}

/// `discover`'s arguments against `emulator` with the test client, before any of a test's own.
fn discover_args(emulator: &EmulatorRuntime, var: &str) -> Vec<String> {
    let url = format!("http://{}", emulator.local_addr());
    [
        "discover",
        "--api",
        &url,
        "--login",
        &url,
        "--client-id",
        "app",
        "--client-secret-env",
        var,
    ]
    .map(str::to_string)
    .to_vec()
}

struct Outcome {
    code: i32,
    json: Value,
    stdout: String,
    stderr: String,
}

impl Outcome {
    fn of(output: &Output) -> Outcome {
        let stdout = String::from_utf8_lossy(&output.stdout).to_string();
        Outcome {
            code: output.status.code().unwrap_or(-1),
            json: serde_json::from_str(stdout.trim()).unwrap_or(Value::Null),
            stdout,
            stderr: String::from_utf8_lossy(&output.stderr).to_string(),
        }
    }

    fn limit(&self, scope: &str) -> &Value {
        self.json["limits"]
            .as_array()
            .unwrap_or_else(|| panic!("no limits in {}: {}", self.stdout, self.stderr))
            .iter()
            .find(|l| l["scope"] == scope)
            .unwrap_or_else(|| panic!("no {scope} limit in {}", self.json))
    }

    /// The `scope` limit was measured (not a lower bound) as `requests` per `window_s`, each
    /// within 10 %; returns it for further checks.
    fn assert_measured(&self, scope: &str, requests: f64, window_s: f64) -> &Value {
        let found = self.limit(scope);
        assert_eq!(found["lower_bound"], false, "{scope}: {}", self.json);
        assert!(
            within_10_percent(found["requests"].as_f64().unwrap(), requests),
            "{scope}: {found}, not {requests} requests"
        );
        assert!(
            within_10_percent(found["window_s"].as_f64().unwrap(), window_s),
            "{scope}: {found}, not a {window_s} s window"
        );
        assert!(
            within_10_percent(found["per_second"].as_f64().unwrap(), requests / window_s),
            "{scope}: {found}"
        );
        found
    }

    fn assert_lower_bound(&self, scope: &str) {
        let found = self.limit(scope);
        assert_eq!(
            found["lower_bound"], true,
            "no {scope} limit exists: {found}"
        );
    }

    fn count(&self, field: &str) -> u64 {
        self.json[field]
            .as_u64()
            .unwrap_or_else(|| panic!("no {field} in {}: {}", self.stdout, self.stderr))
    }

    fn assert_secret_kept(&self) {
        for text in [&self.stdout, &self.stderr] {
            assert!(!text.contains(SECRET), "the secret was printed");
            assert!(!text.contains("access_token"), "a token answer was printed");
        }
    }
}

fn within_10_percent(found: f64, truth: f64) -> bool {
    (found - truth).abs() <= 0.1 * truth
}

/// Runs `discover --json` on the [`USERS`] first users of `emulator`, writing the config and
/// the report into `dir`, with `extra` arguments.
async fn discover(emulator: &EmulatorRuntime, extra: &[&str], dir: &Path) -> Outcome {
    let config = dir.join("config.yaml");
    let report = dir.join("report.html");
    let mut args = discover_args(emulator, "DISCOVER_TEST_SECRET");
    args.extend(
        [
            "--users-from-api",
            USERS,
            "--json",
            "--config",
            config.to_str().unwrap(),
            "--report",
            report.to_str().unwrap(),
        ]
        .map(str::to_string),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = Outcome::of(&shiftgate(&args, "DISCOVER_TEST_SECRET", Some(SECRET)).await);
    eprintln!(
        "found {} with {} requests, {} 429s, {} of {} users restored",
        out.json["limits"],
        out.json["requests_sent"],
        out.json["upstream_429s"],
        out.json["users_restored"],
        out.json["users_touched"]
    );
    out
}

/// An emulator with `limits`, users 0 and 1 Busy, and `discover` run on it with `extra`
/// arguments; asserts everything any run must do ([`assert_gentle_and_tidy`]).
async fn discover_on(limits: &str, extra: &[&str]) -> (EmulatorRuntime, Outcome) {
    let emulator = org(limits).await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let out = discover(&emulator, extra, dir.path()).await;
    assert_gentle_and_tidy(&emulator, &out, dir.path()).await;
    (emulator, out)
}

/// What every run must do whatever the limits: one JSON object, the secret nowhere, every
/// touched user restored and as found, 429s bounded, a config `check` accepts, a report.
async fn assert_gentle_and_tidy(emulator: &EmulatorRuntime, out: &Outcome, dir: &Path) {
    assert_eq!(out.code, 0, "stderr: {}", out.stderr);
    assert!(
        out.json.is_object(),
        "stdout is one JSON object: {}",
        out.stdout
    );
    out.assert_secret_kept();
    let touched = out.count("users_touched");
    assert!(touched > 0);
    assert_eq!(out.count("users_restored"), touched);
    let refused = out.count("upstream_429s");
    assert!(refused <= 20, "a few 429s at most: {refused}");
    assert_eq!(
        emulator.stats().status_count(429),
        refused,
        "every 429 the emulator sent is counted"
    );
    assert!(out.count("requests_sent") <= 2000);
    assert_busy_as_prepared(emulator).await;
    let config = std::fs::read_to_string(dir.join("config.yaml")).unwrap();
    assert_eq!(config, out.json["config"].as_str().unwrap());
    let check = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args([
            "check",
            "--config",
            dir.join("config.yaml").to_str().unwrap(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        check.status.success(),
        "check refused the config: {}\n{config}",
        String::from_utf8_lossy(&check.stderr)
    );
    let report = std::fs::read_to_string(dir.join("report.html")).unwrap();
    assert!(report.contains("<svg") && report.contains("Limits found"));
}

async fn mint(emulator: &EmulatorRuntime) -> String {
    // base64("app:" + SECRET), computed here rather than trusted from the code under test.
    let raw = format!("app:{SECRET}");
    let encoded = base64(raw.as_bytes());
    let answer = common::request(
        emulator.local_addr(),
        Method::POST,
        "/oauth/token",
        &[
            ("Authorization", &format!("Basic {encoded}")),
            ("Content-Type", "application/x-www-form-urlencoded"),
        ],
        "grant_type=client_credentials",
    )
    .await
    .unwrap();
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    body["access_token"].as_str().unwrap().to_string()
}

fn base64(input: &[u8]) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                A[(n >> (18 - 6 * i) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

/// A user's state at `path` (presence or routing status), read with a fresh token; or, with a
/// body, set to it (asserting 200).
async fn user_state(
    emulator: &EmulatorRuntime,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let token = mint(emulator).await;
    let auth = format!("Bearer {token}");
    let mut headers = vec![("Authorization", auth.as_str())];
    if body.is_some() {
        headers.push(("Content-Type", "application/json"));
    }
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let answer = common::request(emulator.local_addr(), method, path, &headers, body)
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{path}");
    serde_json::from_slice(&answer.body).unwrap_or(Value::Null)
}

fn presence_path(i: usize) -> String {
    format!(
        "/api/v2/users/{}/presences/purecloud",
        shiftgate::loadtest::user_id(i)
    )
}

/// Presence for users 0 and 1 set to Busy with a message before the run.
async fn prepare(emulator: &EmulatorRuntime) {
    for i in [0usize, 1] {
        let body = json!({"presenceDefinition": {"id": BUSY}, "message": format!("lunch {i}")});
        user_state(emulator, Method::PATCH, &presence_path(i), Some(body)).await;
    }
    emulator.reset_stats();
}

/// Users 0 and 1 are Busy with the message [`prepare`] gave them.
async fn assert_busy_as_prepared(emulator: &EmulatorRuntime) {
    for i in [0usize, 1] {
        let presence = user_state(emulator, Method::GET, &presence_path(i), None).await;
        assert_eq!(presence["presenceDefinition"]["id"], BUSY, "user {i}");
        assert_eq!(presence["message"], format!("lunch {i}"), "user {i}");
    }
}

/// 15 per 7 s is reached inside one token's first window, early enough that `Retry-After` pins
/// it; 10 a second is more than that token ever sends in a second, so only many tokens meet it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_token_window_and_an_org_per_second_limit_are_told_apart() {
    let limits = route_limits(
        "PATCH",
        PRESENCE,
        &[("per-token", "15/7s", "token"), ("org", "10/s", "org")],
    );
    let (_emulator, out) = discover_on(&limits, &[]).await;
    out.assert_measured("token", 15.0, 7.0);
    out.assert_measured("org", 10.0, 1.0);
    assert_eq!(
        out.json["endpoint"],
        "PATCH /api/v2/users/{userId}/presences/purecloud"
    );
}

/// The one minute-long window: Genesys's limits API lists the per-token limit per minute. The
/// request cap leaves the token's 41 requests their share and ends the org's ramp early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_per_minute_token_limit_is_measured_and_the_org_is_a_lower_bound() {
    let (_emulator, out) = discover_on(
        "token_rate_per_minute: 40\nlimit_in_429: true\n",
        &["--max-requests", "90"],
    )
    .await;
    let token = out.assert_measured("token", 40.0, 60.0);
    assert_eq!(token["source"], "both", "{token}");
    assert_eq!(token["listed"], 40, "{token}");
    assert_eq!(token["agrees"], true, "{token}");
    assert_eq!(token["key"], "token.rate.per.minute", "{token}");
    out.assert_lower_bound("org");
    assert!(out.count("requests_sent") <= 90);
}

/// [`prepare`]'s two PATCHes count in the org's first window, so its limit is measured in a
/// later one: the window is short enough for discovery to reach one within a few seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_only_limit_with_a_four_second_window_is_found_without_the_limits_api() {
    let limits = route_limits("PATCH", PRESENCE, &[("org", "30/4s", "org")]);
    let (_emulator, out) = discover_on(&limits, &[]).await;
    out.assert_measured("org", 30.0, 4.0);
    out.assert_lower_bound("token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_status_is_measured_and_every_user_put_back() {
    let path = "/api/v2/users/{u}/routingstatus";
    let limits = route_limits("PUT", path, &[("per-token", "20/4s", "token")]);
    let emulator = org(&limits).await;
    // User 0 starts IDLE: it must be IDLE again at the end.
    let user = shiftgate::loadtest::user_id(0);
    let path = format!("/api/v2/users/{user}/routingstatus");
    let idle = json!({"userId": user, "status": "IDLE"});
    user_state(&emulator, Method::PUT, &path, Some(idle)).await;
    emulator.reset_stats();
    let dir = tempfile::tempdir().unwrap();
    let out = discover(
        &emulator,
        &["--endpoint", "routing-status", "--max-requests", "80"],
        dir.path(),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    out.assert_secret_kept();
    assert_eq!(
        out.json["endpoint"],
        "PUT /api/v2/users/{userId}/routingstatus"
    );
    out.assert_measured("token", 20.0, 4.0);
    assert!(out.count("users_touched") > 0);
    assert_eq!(out.count("users_restored"), out.count("users_touched"));
    assert!(out.count("requests_sent") <= 80);
    let status = user_state(&emulator, Method::GET, &path, None).await;
    assert_eq!(status["status"], "IDLE");
    let config = out.json["config"].as_str().unwrap();
    assert!(config.contains("name: routing-status"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_the_plan_and_sends_nothing() {
    let emulator = org("").await;
    let mut args = discover_args(&emulator, "DISCOVER_TEST_SECRET");
    args.push("--dry-run".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = shiftgate(&args, "DISCOVER_TEST_SECRET", Some(SECRET)).await;
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("at most 2000 requests") && text.contains("at most 50 answers 429"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(emulator.stats().total_requests, 0, "nothing was sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_exits_1_and_a_missing_secret_variable_exits_2() {
    let emulator = org("").await;
    let mut args = discover_args(&emulator, "DISCOVER_TEST_SECRET_2");
    args.push("--json".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let wrong = shiftgate(&args, "DISCOVER_TEST_SECRET_2", Some("wrong-secret")).await;
    assert_eq!(wrong.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(stderr.contains("login refused"), "{stderr}");
    assert!(!stderr.contains("wrong-secret"));
    let missing = shiftgate(&args, "DISCOVER_TEST_SECRET_2", None).await;
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_experiment_and_still_restores_every_user() {
    // No limit at all: the experiment would ramp for a long while.
    let emulator = org("token_rate_per_minute: 0\n").await;
    prepare(&emulator).await;
    let mut args = discover_args(&emulator, "DISCOVER_TEST_SECRET");
    args.extend(["--users-from-api", USERS, "--json"].map(str::to_string));
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args(&args)
        .env("DISCOVER_TEST_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the experiment is under way: PATCHes arrive, for every user.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while emulator.stats().count("presence_patch", 200) < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the experiment never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pid = child.id().unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let out = Outcome::of(&child.wait_with_output().await.unwrap());
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(out.json["interrupted"], true, "{}", out.stdout);
    let touched = out.count("users_touched");
    assert!(touched > 0);
    assert_eq!(out.count("users_restored"), touched);
    // Users as found; the config and report are not written on this run.
    assert_busy_as_prepared(&emulator).await;
    out.assert_secret_kept();
}

/// `loadtest`'s arguments against `target` with the test client.
fn loadtest_args<'a>(target: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "loadtest",
        "--target",
        target,
        "--client-id",
        "app",
        "--client-secret-env",
        "DISCOVER_TEST_SECRET",
        "--users-from-api",
        "4",
        "--agents",
        "4",
        "--json",
    ];
    args.extend_from_slice(extra);
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_against_a_real_org_uses_its_tokens_users_and_definitions_and_restores_them() {
    let emulator = org("").await;
    prepare(&emulator).await;
    let url = format!("http://{}", emulator.local_addr());
    let output = shiftgate(
        &loadtest_args(&url, &["--loops", "3", "--tokens", "2"]),
        "DISCOVER_TEST_SECRET",
        Some(SECRET),
    )
    .await;
    let out = Outcome::of(&output);
    assert!(output.status.success(), "{}", out.stderr);
    assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET));
    assert!(
        out.stderr.contains("4 of 4 users restored"),
        "{}",
        out.stderr
    );
    let summary = &out.json;
    assert_eq!(
        summary["by_status"]["200"], 12,
        "issued tokens are accepted: {summary}"
    );
    let stats = emulator.stats();
    assert_eq!(stats.count("oauth_token", 200), 2, "two tokens minted");
    assert_eq!(
        stats.count("presence_patch", 200),
        12 + 4,
        "the run, then one restore a user"
    );
    assert_eq!(
        stats.count("presence_patch", 400),
        0,
        "real definition ids only"
    );
    assert_busy_as_prepared(&emulator).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_org_client_speaks_https_trusting_the_systems_roots() {
    // shiftgate's TLS listener in front of the emulator stands for an https API; the system's
    // roots are this test's CA through SSL_CERT_FILE, as on a machine that trusts it.
    let emulator = org("").await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let pair = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(&cert, pair.cert.pem()).unwrap();
    std::fs::write(&key, pair.key_pair.serialize_pem()).unwrap();
    let port = shiftgate::harness::ReservedPort::loopback().unwrap();
    let tls = format!(
        "tls:\n  listen: \"{}\"\n  cert: {}\n  key: {}",
        port.addr(),
        cert.display(),
        key.display()
    );
    let config = common::ProxyConfig::new()
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml(&tls);
    let _proxy = common::ProxyProcess::start(&config, emulator.local_addr()).await;
    let url = format!("https://localhost:{}", port.port());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args(loadtest_args(&url, &["--loops", "2"]))
        .env("DISCOVER_TEST_SECRET", SECRET)
        .env("SSL_CERT_FILE", &cert)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    assert!(stderr.contains("4 of 4 users restored"), "{stderr}");
    let summary: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(summary["by_status"]["200"], 8, "{summary}");
    assert_eq!(emulator.stats().count("oauth_token", 200), 1);
}
