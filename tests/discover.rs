//! `shiftgate discover` against the emulator: limits it is not told are found within 10 %,
//! every user is left as found, 429s stay few, the config passes `check`, and the secret never
//! shows. Each test runs the real binary against an emulator with limits of its own.

#[allow(unused_imports)]
mod common;

use std::path::Path;
use std::time::Duration;

use http::Method;
use serde_json::{json, Value};
use shiftgate::harness::EmulatorRuntime;

const SECRET: &str = "s3cret-never-printed-7f3a";
const BUSY: &str = "31fe3bac-dea6-44b7-bed7-47f91660a1a0";

/// An emulator that knows one client, accepts only the tokens it issued, lists 12 users, and
/// enforces `limits` (YAML lines).
async fn org(limits: &str) -> EmulatorRuntime {
    common::emulator(&format!(
        "clients: [{{ id: app, secret: {SECRET:?} }}]\nauth: {{ require_issued_tokens: true }}\nusers: 12\n{limits}"
    ))
    .await
}

struct Outcome {
    code: i32,
    json: Value,
    stdout: String,
    stderr: String,
}

async fn discover(emulator: &EmulatorRuntime, extra: &[&str], dir: &Path) -> Outcome {
    let url = format!("http://{}", emulator.local_addr());
    let config = dir.join("config.yaml");
    let report = dir.join("report.html");
    let mut args = vec![
        "discover",
        "--api",
        &url,
        "--login",
        &url,
        "--client-id",
        "app",
        "--client-secret-env",
        "DISCOVER_TEST_SECRET",
        "--users-from-api",
        "10",
        "--json",
        "--config",
        config.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args(&args)
        .env("DISCOVER_TEST_SECRET", SECRET)
        .output()
        .await
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    let json = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    Outcome {
        code: output.status.code().unwrap_or(-1),
        json,
        stdout,
        stderr,
    }
}

fn limit<'a>(json: &'a Value, scope: &str) -> &'a Value {
    json["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["scope"] == scope)
        .unwrap_or_else(|| panic!("no {scope} limit in {json}"))
}

fn within_10_percent(found: f64, truth: f64) -> bool {
    (found - truth).abs() <= 0.1 * truth
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
    eprintln!(
        "found {} with {} requests, {} 429s, {} of {} users restored",
        out.json["limits"],
        out.json["requests_sent"],
        out.json["upstream_429s"],
        out.json["users_restored"],
        out.json["users_touched"]
    );
    for text in [&out.stdout, &out.stderr] {
        assert!(!text.contains(SECRET), "the secret was printed");
        assert!(!text.contains("access_token"), "a token answer was printed");
    }
    let touched = out.json["users_touched"].as_u64().unwrap();
    assert!(touched > 0);
    assert_eq!(out.json["users_restored"].as_u64().unwrap(), touched);
    let refused = out.json["upstream_429s"].as_u64().unwrap();
    assert!(refused <= 20, "a few 429s at most: {refused}");
    let stats = emulator.stats();
    assert_eq!(
        stats.status_count(429),
        refused,
        "every 429 the emulator sent is counted"
    );
    assert!(out.json["requests_sent"].as_u64().unwrap() <= 2000);
    // Users 0 and 1 were Busy with a message: they still are.
    for i in [0usize, 1] {
        let path = format!(
            "/api/v2/users/{}/presences/purecloud",
            shiftgate::loadtest::user_id(i)
        );
        let token = mint(emulator).await;
        let answer = common::request(
            emulator.local_addr(),
            Method::GET,
            &path,
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
        .unwrap();
        let presence: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(presence["presenceDefinition"]["id"], BUSY, "user {i}");
        assert_eq!(presence["message"], format!("lunch {i}"), "user {i}");
    }
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

/// Presence for users 0 and 1 set to Busy before the run, with an issued token.
async fn prepare(emulator: &EmulatorRuntime) {
    let token = mint(emulator).await;
    for i in [0usize, 1] {
        let path = format!(
            "/api/v2/users/{}/presences/purecloud",
            shiftgate::loadtest::user_id(i)
        );
        let body = json!({"presenceDefinition": {"id": BUSY}, "message": format!("lunch {i}")});
        let answer = common::request(
            emulator.local_addr(),
            Method::PATCH,
            &path,
            &[
                ("Authorization", &format!("Bearer {token}")),
                ("Content-Type", "application/json"),
            ],
            body.to_string(),
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200);
    }
    emulator.reset_stats();
}

const PRESENCE: &str = "/api/v2/users/{u}/presences/{s}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_per_token_window_and_an_org_per_second_limit_are_told_apart() {
    let emulator = org(&format!(
        "token_rate_per_minute: 0\nlimits_api: false\nroute_limits:\n  - {{ name: per-token, method: PATCH, path: \"{PRESENCE}\", limit: \"30/10s\", per: token }}\n  - {{ name: org, method: PATCH, path: \"{PRESENCE}\", limit: \"40/s\", per: org }}\n"
    ))
    .await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let out = discover(&emulator, &[], dir.path()).await;
    assert_gentle_and_tidy(&emulator, &out, dir.path()).await;
    let token = limit(&out.json, "token");
    assert_eq!(token["lower_bound"], false, "{}", out.json);
    assert!(
        within_10_percent(token["per_second"].as_f64().unwrap(), 3.0),
        "{token}"
    );
    assert_eq!(token["window_s"], 10.0, "{token}");
    let org = limit(&out.json, "org");
    assert_eq!(org["lower_bound"], false, "{}", out.json);
    assert!(
        within_10_percent(org["per_second"].as_f64().unwrap(), 40.0),
        "{org}"
    );
    assert_eq!(org["window_s"], 1.0, "{org}");
    assert_eq!(
        out.json["endpoint"],
        "PATCH /api/v2/users/{userId}/presences/purecloud"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listed_per_minute_token_limit_is_measured_and_the_org_is_a_lower_bound() {
    let emulator = org("token_rate_per_minute: 40\nlimit_in_429: true\n").await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let out = discover(&emulator, &["--max-requests", "300"], dir.path()).await;
    assert_gentle_and_tidy(&emulator, &out, dir.path()).await;
    let token = limit(&out.json, "token");
    assert_eq!(token["lower_bound"], false, "{}", out.json);
    assert!(
        within_10_percent(token["requests"].as_f64().unwrap(), 40.0),
        "{token}"
    );
    assert!(
        within_10_percent(token["window_s"].as_f64().unwrap(), 60.0),
        "{token}"
    );
    assert_eq!(token["source"], "both", "{token}");
    assert_eq!(token["agrees"], true, "{token}");
    assert_eq!(token["key"], "token.rate.per.minute", "{token}");
    let org = limit(&out.json, "org");
    assert_eq!(org["lower_bound"], true, "no org limit exists: {org}");
    assert!(out.json["requests_sent"].as_u64().unwrap() <= 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_org_only_limit_with_a_five_second_window_is_found_without_the_limits_api() {
    let emulator = org(&format!(
        "token_rate_per_minute: 0\nlimits_api: false\nroute_limits:\n  - {{ name: org, method: PATCH, path: \"{PRESENCE}\", limit: \"100/5s\", per: org }}\n"
    ))
    .await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let out = discover(&emulator, &[], dir.path()).await;
    assert_gentle_and_tidy(&emulator, &out, dir.path()).await;
    let org = limit(&out.json, "org");
    assert_eq!(org["lower_bound"], false, "{}", out.json);
    assert!(
        within_10_percent(org["requests"].as_f64().unwrap(), 100.0),
        "{org}"
    );
    assert!(
        within_10_percent(org["window_s"].as_f64().unwrap(), 5.0),
        "{org}"
    );
    assert_eq!(limit(&out.json, "token")["lower_bound"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_prints_the_plan_and_sends_nothing() {
    let emulator = org("").await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", emulator.local_addr());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args([
            "discover",
            "--api",
            &url,
            "--login",
            &url,
            "--client-id",
            "app",
            "--client-secret-env",
            "DISCOVER_TEST_SECRET",
            "--dry-run",
        ])
        .env("DISCOVER_TEST_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        text.contains("at most 2000 requests") && text.contains("at most 50 answers 429"),
        "{text}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(emulator.stats().total_requests, 0, "nothing was sent");
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_login_exits_1_and_a_missing_secret_variable_exits_2() {
    let emulator = org("").await;
    let url = format!("http://{}", emulator.local_addr());
    let run = |secret: Option<&'static str>| {
        let url = url.clone();
        async move {
            let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"));
            command.args([
                "discover",
                "--api",
                &url,
                "--login",
                &url,
                "--client-id",
                "app",
                "--client-secret-env",
                "DISCOVER_TEST_SECRET_2",
                "--json",
            ]);
            command.env_remove("DISCOVER_TEST_SECRET_2");
            if let Some(secret) = secret {
                command.env("DISCOVER_TEST_SECRET_2", secret);
            }
            command.output().await.unwrap()
        }
    };
    let wrong = run(Some("wrong-secret")).await;
    assert_eq!(wrong.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("login refused"));
    assert!(!String::from_utf8_lossy(&wrong.stderr).contains("wrong-secret"));
    let missing = run(None).await;
    assert_eq!(missing.status.code(), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_status_is_measured_and_every_user_put_back() {
    let emulator = org(
        "token_rate_per_minute: 0\nlimits_api: false\nroute_limits:\n  - { name: per-token, method: PUT, path: \"/api/v2/users/{u}/routingstatus\", limit: \"20/4s\", per: token }\n",
    )
    .await;
    // User 0 starts IDLE: it must be IDLE again at the end.
    let token = mint(&emulator).await;
    let path = format!(
        "/api/v2/users/{}/routingstatus",
        shiftgate::loadtest::user_id(0)
    );
    let answer = common::request(
        emulator.local_addr(),
        Method::PUT,
        &path,
        &[
            ("Authorization", &format!("Bearer {token}")),
            ("Content-Type", "application/json"),
        ],
        json!({"userId": shiftgate::loadtest::user_id(0), "status": "IDLE"}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200);
    emulator.reset_stats();
    let dir = tempfile::tempdir().unwrap();
    let out = discover(
        &emulator,
        &["--endpoint", "routing-status", "--max-requests", "250"],
        dir.path(),
    )
    .await;
    assert_eq!(out.code, 0, "{}", out.stderr);
    eprintln!(
        "found {} with {} requests, {} 429s, {} of {} users restored",
        out.json["limits"],
        out.json["requests_sent"],
        out.json["upstream_429s"],
        out.json["users_restored"],
        out.json["users_touched"]
    );
    assert_eq!(
        out.json["endpoint"],
        "PUT /api/v2/users/{userId}/routingstatus"
    );
    let token_limit = limit(&out.json, "token");
    assert_eq!(token_limit["lower_bound"], false, "{}", out.json);
    assert!(
        within_10_percent(token_limit["requests"].as_f64().unwrap(), 20.0),
        "{token_limit}"
    );
    assert!(
        within_10_percent(token_limit["window_s"].as_f64().unwrap(), 4.0),
        "{token_limit}"
    );
    assert_eq!(out.json["users_restored"], out.json["users_touched"]);
    let token = mint(&emulator).await;
    let answer = common::request(
        emulator.local_addr(),
        Method::GET,
        &path,
        &[("Authorization", &format!("Bearer {token}"))],
        "",
    )
    .await
    .unwrap();
    let status: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(status["status"], "IDLE");
    let config = out.json["config"].as_str().unwrap();
    assert!(config.contains("name: routing-status"), "{config}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_stops_the_experiment_and_still_restores_every_user() {
    // No limit at all: the experiment would ramp for a long while.
    let emulator = org("token_rate_per_minute: 0\n").await;
    prepare(&emulator).await;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://{}", emulator.local_addr());
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args([
            "discover",
            "--api",
            &url,
            "--login",
            &url,
            "--client-id",
            "app",
            "--client-secret-env",
            "DISCOVER_TEST_SECRET",
            "--users-from-api",
            "10",
            "--json",
        ])
        .env("DISCOVER_TEST_SECRET", SECRET)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the experiment is under way: PATCHes arrive.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while emulator.stats().count("presence_patch", 200) < 20 {
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
    let output = child.wait_with_output().await.unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    let json: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(json["interrupted"], true);
    let touched = json["users_touched"].as_u64().unwrap();
    assert!(touched > 0);
    assert_eq!(json["users_restored"].as_u64().unwrap(), touched);
    let out = Outcome {
        code: 0,
        json,
        stdout,
        stderr,
    };
    // Users as found; the config and report are not written on this run.
    for i in [0usize, 1] {
        let path = format!(
            "/api/v2/users/{}/presences/purecloud",
            shiftgate::loadtest::user_id(i)
        );
        let token = mint(&emulator).await;
        let answer = common::request(
            emulator.local_addr(),
            Method::GET,
            &path,
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
        .unwrap();
        let presence: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(presence["presenceDefinition"]["id"], BUSY, "user {i}");
    }
    assert!(!out.stdout.contains(SECRET) && !out.stderr.contains(SECRET));
    drop(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loadtest_against_a_real_org_uses_its_tokens_users_and_definitions_and_restores_them() {
    let emulator = org("").await;
    prepare(&emulator).await;
    let url = format!("http://{}", emulator.local_addr());
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args([
            "loadtest",
            "--target",
            &url,
            "--client-id",
            "app",
            "--client-secret-env",
            "DISCOVER_TEST_SECRET",
            "--users-from-api",
            "4",
            "--agents",
            "4",
            "--loops",
            "3",
            "--tokens",
            "2",
            "--json",
        ])
        .env("DISCOVER_TEST_SECRET", SECRET)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(output.status.success(), "{stderr}");
    assert!(!stdout.contains(SECRET) && !stderr.contains(SECRET));
    assert!(stderr.contains("4 of 4 users restored"), "{stderr}");
    let summary: Value = serde_json::from_str(&stdout).unwrap();
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
    for i in [0usize, 1] {
        let token = mint(&emulator).await;
        let path = format!(
            "/api/v2/users/{}/presences/purecloud",
            shiftgate::loadtest::user_id(i)
        );
        let answer = common::request(
            emulator.local_addr(),
            Method::GET,
            &path,
            &[("Authorization", &format!("Bearer {token}"))],
            "",
        )
        .await
        .unwrap();
        let presence: Value = serde_json::from_slice(&answer.body).unwrap();
        assert_eq!(presence["presenceDefinition"]["id"], BUSY, "user {i}");
        assert_eq!(presence["message"], format!("lunch {i}"), "user {i}");
    }
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
        .args([
            "loadtest",
            "--target",
            &url,
            "--client-id",
            "app",
            "--client-secret-env",
            "DISCOVER_TEST_SECRET",
            "--users-from-api",
            "4",
            "--agents",
            "4",
            "--loops",
            "2",
            "--json",
        ])
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
