//! End-to-end tests of the load generator against a scripted loopback server: counts and structure, never speed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::testutil::{EchoServer, Reply};
use super::*;

fn spec(target: &str, agents: usize, loops: usize) -> LoadSpec {
    LoadSpec {
        target: target.to_string(),
        agents,
        loops,
        timeout: Duration::from_secs(10),
        ..LoadSpec::default()
    }
}

/// A port nothing listens on: bound, then released.
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn each_agent_keeps_one_connection_for_all_its_requests() {
    let server = EchoServer::start().await;
    let result = run(spec(&server.url, 3, 4), None).await.unwrap();

    assert_eq!(result.records.len(), 12, "3 agents x 4 loops");
    assert!(
        result.records.iter().all(|r| r.status == Some(200)),
        "{:?}",
        result.records
    );
    assert_eq!(
        server.connections(),
        3,
        "one keep-alive connection per agent"
    );
    assert_eq!(
        result.connections, 3,
        "the result counts the same connections"
    );

    // Every connection carried the requests of exactly one user: an agent never borrows another's.
    let mut users_by_connection: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for seen in server.seen() {
        users_by_connection
            .entry(seen.connection)
            .or_default()
            .insert(seen.path.clone());
    }
    assert_eq!(users_by_connection.len(), 3);
    assert!(
        users_by_connection.values().all(|paths| paths.len() == 1),
        "{users_by_connection:?}"
    );
}

#[tokio::test]
async fn presence_patches_arrive_as_genesys_expects_and_the_body_echo_matches() {
    let server = EchoServer::start().await;
    let result = run(
        LoadSpec {
            tokens: 2,
            ..spec(&server.url, 3, 2)
        },
        None,
    )
    .await
    .unwrap();

    for seen in server.seen() {
        assert_eq!(seen.method, http::Method::PATCH);
        assert_eq!(seen.headers["content-type"], "application/json");
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        assert_eq!(body["message"], "shift change");
        assert_eq!(body["primary"], true);
    }
    for record in &result.records {
        let user = user_id(record.agent);
        assert!(record.sent_body_sha256.is_some());
        assert_eq!(
            record.sent_body_sha256, record.body_sha256_echo,
            "the server got the bytes we hashed"
        );
        let seen_for_agent: Vec<_> = server
            .seen()
            .into_iter()
            .filter(|s| s.path == format!("/api/v2/users/{user}/presences/purecloud"))
            .collect();
        assert_eq!(
            seen_for_agent.len(),
            2,
            "each agent's user got its two requests"
        );
        let expected_token = format!("Bearer loadtest-token-{}", record.agent % 2);
        assert!(seen_for_agent
            .iter()
            .all(|s| s.headers["authorization"] == expected_token.as_str()));
    }
}

#[tokio::test]
async fn routing_status_puts_name_the_same_user_in_path_and_body() {
    let server = EchoServer::start().await;
    let result = run(
        LoadSpec {
            endpoint: Endpoint::RoutingStatusPut,
            ..spec(&server.url, 2, 1)
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(result.summary().by_status, BTreeMap::from([(200, 2)]));
    for seen in server.seen() {
        assert_eq!(seen.method, http::Method::PUT);
        let body: serde_json::Value = serde_json::from_slice(&seen.body).unwrap();
        let user = body["userId"].as_str().unwrap();
        assert_eq!(seen.path, format!("/api/v2/users/{user}/routingstatus"));
        assert_eq!(body["status"], "IDLE");
        assert!(humantime::parse_rfc3339(body["startTime"].as_str().unwrap()).is_ok());
    }
}

#[tokio::test]
async fn a_custom_endpoint_goes_under_the_targets_base_path_with_extra_headers() {
    let server = EchoServer::start().await;
    let target = format!("{}/gateway/", server.url);
    let custom = LoadSpec {
        endpoint: Endpoint::Custom {
            method: http::Method::GET,
            path: "/api/v2/users/{userId}?n={n}".into(),
            body: None,
        },
        extra_headers: vec![("X-Run".into(), "shift-42".into())],
        ..spec(&target, 1, 2)
    };
    let result = run(custom, None).await.unwrap();
    assert_eq!(result.summary().answered, 2);
    let paths: Vec<String> = server.seen().iter().map(|s| s.path.clone()).collect();
    let user = user_id(0);
    assert_eq!(
        paths,
        [
            format!("/gateway/api/v2/users/{user}?n=0"),
            format!("/gateway/api/v2/users/{user}?n=1")
        ]
    );
    assert!(server
        .seen()
        .iter()
        .all(|s| s.headers["x-run"] == "shift-42" && s.body.is_empty()));
    assert!(result.records.iter().all(|r| r.sent_body_sha256.is_none()));
}

#[tokio::test]
async fn an_agent_reconnects_when_the_server_closes_its_connection() {
    let server = EchoServer::with(|_| Reply {
        close: true,
        ..Reply::ok()
    })
    .await;
    let result = run(spec(&server.url, 2, 3), None).await.unwrap();

    assert_eq!(
        result.summary().by_status,
        BTreeMap::from([(200, 6)]),
        "no request lost to a closed connection"
    );
    assert_eq!(
        server.connections(),
        6,
        "a new connection for every request after Connection: close"
    );
    assert_eq!(result.connections, 6);
}

#[tokio::test]
async fn shiftgate_headers_are_recorded_and_split_latency_into_wait_and_upstream() {
    let server = EchoServer::with(|_| {
        Reply::ok()
            .header("X-Shiftgate-Wait-Ms", 0)
            .header("X-Shiftgate-Attempts", 2)
    })
    .await;
    let result = run(spec(&server.url, 2, 2), None).await.unwrap();

    assert!(result
        .records
        .iter()
        .all(|r| r.wait_ms == Some(0) && r.attempts == Some(2)));
    let summary = result.summary();
    assert_eq!(summary.wait.unwrap().count, 4);
    assert_eq!(summary.wait.unwrap().max, Duration::ZERO);
    assert_eq!(summary.upstream.unwrap().count, 4);
    assert_eq!(
        summary.upstream.unwrap().max,
        summary.latency.unwrap().max,
        "with no wait, all the time is upstream"
    );
}

#[tokio::test]
async fn the_sdk_emulation_retries_429s_and_resends_the_same_body() {
    // The first two requests for each user are throttled, then everything passes.
    let per_user: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let server = EchoServer::with({
        let per_user = Arc::clone(&per_user);
        move |seen| {
            let mut counts = per_user.lock();
            let count = counts.entry(seen.path.clone()).or_insert(0);
            *count += 1;
            let reply = if *count <= 2 {
                Reply::status(429)
                    .header("Retry-After", 0)
                    .header("X-Shiftgate-Wait-Ms", 5)
            } else {
                Reply::ok().header("X-Shiftgate-Wait-Ms", 7)
            };
            reply.header("X-Shiftgate-Attempts", 1)
        }
    })
    .await;
    let result = run(
        LoadSpec {
            sdk_retry: 3,
            ..spec(&server.url, 2, 2)
        },
        None,
    )
    .await
    .unwrap();

    let summary = result.summary();
    assert_eq!(
        summary.by_status,
        BTreeMap::from([(200, 4)]),
        "every request got through in the end"
    );
    assert_eq!(
        summary.sdk_retries, 4,
        "two retries for each agent's first request"
    );
    assert_eq!(summary.client_429s, 4);
    assert_eq!(summary.final_429s, 0);
    assert_eq!(server.seen().len(), 8, "4 requests + 4 retries");
    for agent in 0..2 {
        let first = result.records.iter().find(|r| r.agent == agent).unwrap();
        assert_eq!(first.client_retries, 2);
        assert_eq!(
            first.wait_ms,
            Some(5 + 5 + 7),
            "shiftgate's wait is summed over the SDK's attempts"
        );
        assert_eq!(first.attempts, Some(3));
        assert_eq!(
            first.sent_body_sha256, first.body_sha256_echo,
            "the retry carried the same bytes"
        );
    }
    let user = user_id(0);
    let bodies: BTreeSet<_> = server
        .seen()
        .into_iter()
        .filter(|s| s.path.contains(&user))
        .take(3)
        .map(|s| s.body)
        .collect();
    assert_eq!(
        bodies.len(),
        1,
        "the first request and its two retries are byte-identical"
    );
}

#[tokio::test]
async fn the_sdk_emulation_stops_after_its_retry_budget() {
    let server = EchoServer::with(|_| Reply::status(429).header("Retry-After", 0)).await;
    let result = run(
        LoadSpec {
            sdk_retry: 2,
            ..spec(&server.url, 1, 2)
        },
        None,
    )
    .await
    .unwrap();

    let summary = result.summary();
    assert_eq!(summary.final_429s, 2);
    assert_eq!(summary.sdk_retries, 4);
    assert_eq!(
        summary.client_429s, 6,
        "each request saw its 429 three times"
    );
    assert_eq!(server.seen().len(), 6);
    assert!(result
        .records
        .iter()
        .all(|r| r.client_retries == 2 && r.retry_after == Some(0)));
}

#[tokio::test]
async fn the_sdk_emulation_gives_up_when_retry_after_exceeds_180_seconds() {
    let server = EchoServer::with(|_| Reply::status(429).header("Retry-After", 181)).await;
    let result = run(
        LoadSpec {
            sdk_retry: 5,
            ..spec(&server.url, 1, 1)
        },
        None,
    )
    .await
    .unwrap();

    let record = &result.records[0];
    assert_eq!(record.status, Some(429));
    assert_eq!(
        record.client_retries, 0,
        "an SDK does not wait three minutes"
    );
    assert_eq!(record.retry_after, Some(181));
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn without_sdk_retry_a_429_is_final() {
    let server = EchoServer::with(|_| Reply::status(429).header("Retry-After", 1)).await;
    let result = run(spec(&server.url, 2, 1), None).await.unwrap();
    let summary = result.summary();
    assert_eq!(
        (summary.final_429s, summary.client_429s, summary.sdk_retries),
        (2, 2, 0)
    );
    assert_eq!(server.seen().len(), 2);
}

#[tokio::test]
async fn an_unreachable_target_gives_transport_errors_that_name_the_address() {
    let port = closed_port().await;
    let result = run(spec(&format!("http://127.0.0.1:{port}"), 2, 2), None)
        .await
        .unwrap();

    let summary = result.summary();
    assert_eq!(summary.transport_errors, 4);
    assert_eq!(summary.answered, 0);
    assert_eq!(result.connections, 0);
    for record in &result.records {
        assert_eq!(record.status, None);
        let error = record.error.as_deref().unwrap();
        assert!(
            error.starts_with(&format!("connect to 127.0.0.1:{port} failed: ")),
            "{error}"
        );
    }
}

#[tokio::test]
async fn a_request_without_an_answer_times_out_and_the_agent_moves_on() {
    let server = EchoServer::with(|_| Reply {
        delay: Duration::from_secs(30),
        ..Reply::ok()
    })
    .await;
    let slow = LoadSpec {
        timeout: Duration::from_millis(200),
        ..spec(&server.url, 1, 2)
    };
    let result = run(slow, None).await.unwrap();

    assert_eq!(result.records.len(), 2);
    for record in &result.records {
        assert_eq!(record.status, None);
        let expected = format!("no answer from {} within 200ms", server.addr);
        assert_eq!(record.error.as_deref(), Some(expected.as_str()));
        assert!(record.latency >= Duration::from_millis(200));
    }
    assert_eq!(
        server.connections(),
        2,
        "the cut-short connection was not reused"
    );
}

#[tokio::test]
async fn agents_start_along_the_ramp_and_pause_for_the_think_time() {
    let server = EchoServer::start().await;
    let ramped = LoadSpec {
        ramp: Duration::from_millis(300),
        think_time: Duration::from_millis(50),
        ..spec(&server.url, 3, 2)
    };
    let result = run(ramped, None).await.unwrap();

    for agent in 0..3 {
        let starts: Vec<Duration> = result
            .records
            .iter()
            .filter(|r| r.agent == agent)
            .map(|r| r.start)
            .collect();
        assert_eq!(starts.len(), 2);
        // Lower bounds only: a loaded machine may start later, never earlier.
        assert!(
            starts[0] >= Duration::from_millis(100) * agent as u32,
            "agent {agent} started at {starts:?}"
        );
        assert!(
            starts[1] - starts[0] >= Duration::from_millis(50),
            "agent {agent} did not think: {starts:?}"
        );
    }
    assert!(
        result.records.windows(2).all(|w| w[0].start <= w[1].start),
        "records are sorted by start"
    );
}

#[tokio::test]
async fn progress_reports_every_completion_up_to_the_total() {
    let server = EchoServer::with(|seen| {
        if seen.path.contains(&user_id(1)) {
            Reply::status(429)
        } else {
            Reply::ok()
        }
    })
    .await;
    let reports: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let callback: ProgressFn = {
        let reports = Arc::clone(&reports);
        Arc::new(move |p| reports.lock().push(p))
    };
    run(spec(&server.url, 2, 3), Some(callback)).await.unwrap();

    let reports = reports.lock();
    let done: Vec<usize> = reports.iter().map(|p| p.done).collect();
    assert_eq!(
        done,
        (1..=6).collect::<Vec<_>>(),
        "one report per completion, in order"
    );
    let last = reports.last().unwrap();
    assert_eq!(
        (last.total, last.client_429s, last.transport_errors),
        (6, 3, 0)
    );
    assert!(last.current_rps >= 1.0);
}

#[tokio::test]
async fn an_invalid_spec_fails_before_any_request() {
    let error = run(
        LoadSpec {
            target: "ftp://127.0.0.1:1".into(),
            ..LoadSpec::default()
        },
        None,
    )
    .await
    .unwrap_err();
    assert!(error.to_string().contains("ftp"), "{error}");
}

fn cli_args(target: &str, extra: &[&str]) -> LoadtestArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadtestArgs,
    }
    let argv = [
        "loadtest", "--target", target, "--agents", "2", "--loops", "3",
    ];
    Cli::try_parse_from(argv.iter().chain(extra)).unwrap().args
}

#[tokio::test]
async fn the_cli_prints_only_json_with_json_and_writes_the_report() {
    let server = EchoServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let report_path = dir.path().join("run.html");
    let args = cli_args(
        &server.url,
        &["--json", "--report", report_path.to_str().unwrap()],
    );
    let mut stdout = Vec::new();
    execute(&args, false, &mut stdout).await.unwrap();

    let summary: serde_json::Value =
        serde_json::from_slice(&stdout).expect("stdout is one JSON document");
    assert_eq!(summary["by_status"]["200"], 6);
    assert_eq!(summary["planned"], 6);
    assert_eq!(summary["connections"], 2);
    let html = std::fs::read_to_string(&report_path).unwrap();
    assert!(html.contains("<svg") && html.contains("<table class=\"summary\">"));
    assert!(html.contains(&server.url), "the report names its target");
}

#[tokio::test]
async fn the_cli_prints_the_summary_table_by_default() {
    let server = EchoServer::start().await;
    let mut stdout = Vec::new();
    execute(&cli_args(&server.url, &[]), false, &mut stdout)
        .await
        .unwrap();
    let table = String::from_utf8(stdout).unwrap();
    assert!(table.contains("answers by status      200: 6"), "{table}");
    assert!(
        table.contains("6 of 6 planned, 6 answered, over 2 connection(s)"),
        "{table}"
    );
}

#[tokio::test]
async fn the_cli_fails_with_exit_code_1_when_nothing_was_answered() {
    let port = closed_port().await;
    let args = cli_args(&format!("http://127.0.0.1:{port}"), &["--json"]);
    let mut stdout = Vec::new();
    let error = execute(&args, false, &mut stdout).await.unwrap_err();

    assert_eq!(exit_code(&error), 1);
    assert!(
        error
            .to_string()
            .contains(&format!("connect to 127.0.0.1:{port} failed")),
        "{error}"
    );
    let summary: serde_json::Value = serde_json::from_slice(&stdout).unwrap();
    assert_eq!(
        summary["transport_errors"], 6,
        "the summary is still printed"
    );
}
