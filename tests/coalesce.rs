//! Coalescing single presence updates into bulk calls: the real binary against the emulator
//! (and, for a bulk answer that leaves a user out, a stub API). Agents keep sending single
//! PATCHes; each gets its own answer, and each user ends on its agent's last update.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use shiftgate::loadtest::client::{AgentConnection, Answer};
use shiftgate::loadtest::Target;

const TOKEN: &str = "Bearer shift-change";

/// One token's budget of 300/min and the bulk route's 10/s (Genesys's token limit and the
/// emulator's bulk limit), the single updates coalesced into the bulk route.
fn proxy_config(window: &str) -> ProxyConfig {
    ProxyConfig::new()
        .budget("per-token", r#"{ rate: "300/min", per: token }"#)
        .budget("presence-bulk", r#"{ rate: "10/s", per: token }"#)
        .route(&format!(
            r#"{{ name: presence, match: {{ method: PATCH, path: "{}" }}, budgets: [per-token], max_wait: "60s", coalesce: {{ into: presence-bulk, window: "{window}", max_batch: 50 }} }}"#,
            presence::PATH_TEMPLATE
        ))
        .route(&format!(
            r#"{{ name: presence-bulk, match: {{ method: PUT, path: "{}" }}, budgets: [presence-bulk, per-token] }}"#,
            presence::BULK_PATH
        ))
}

/// Genesys's 300/min per token, and the bulk call limited to 10/s per token.
fn emulator_config(extra: &str) -> String {
    format!(
        "token_rate_per_minute: 300\nlatency: {{ min: \"20ms\", max: \"60ms\" }}\nroute_limits:\n  - {{ name: bulk, method: PUT, path: \"{}\", limit: \"10/s\", per: token }}\n{extra}",
        presence::BULK_PATH
    )
}

fn message(agent: usize, update: usize) -> String {
    format!("agent-{agent}-update-{update}")
}

async fn patch(conn: &mut AgentConnection, user: &str, body: String) -> Answer {
    send(
        conn,
        Method::PATCH,
        &presence::path(user),
        &[
            ("Authorization", TOKEN),
            ("Content-Type", "application/json"),
        ],
        body,
    )
    .await
    .expect("an answer")
}

fn connection(proxy: &ProxyProcess) -> AgentConnection {
    AgentConnection::new(Target::parse(&format!("http://{}", proxy.addr())).unwrap())
}

/// `agents` agents at once, `updates` each, one after the other: every answer is the agent's
/// own. Returns the time to the last answer and each update's time to answer.
async fn shift_change(
    proxy: &ProxyProcess,
    agents: usize,
    updates: usize,
) -> (Duration, Vec<Duration>) {
    let started = Instant::now();
    let runs: Vec<_> = (0..agents)
        .map(|a| {
            let mut conn = connection(proxy);
            tokio::spawn(async move {
                let user = format!("user-{a}");
                let mut took = Vec::new();
                for u in 0..updates {
                    let t = Instant::now();
                    let got = patch(
                        &mut conn,
                        &user,
                        presence::body_with_message(&message(a, u)),
                    )
                    .await;
                    took.push(t.elapsed());
                    assert_eq!(got.status, 200, "{user} update {u}: {:?}", got.body);
                    let body = json(&got);
                    assert_eq!(body["id"], user.as_str(), "its own entry");
                    assert_eq!(body["message"], message(a, u).as_str(), "its own update");
                    assert!(
                        header(&got, "X-Shiftgate-Batch").is_some(),
                        "answered from a batch"
                    );
                    assert!(header(&got, "ININ-Correlation-Id").is_some());
                    assert!(header(&got, "X-Shiftgate-Wait-Ms").is_some());
                    assert_eq!(header(&got, "X-Shiftgate-Attempts"), Some("1"));
                }
                took
            })
        })
        .collect();
    let mut took = Vec::new();
    for r in runs {
        took.extend(r.await.expect("the agent finished"));
    }
    (started.elapsed(), took)
}

/// What the API holds for `user` now (read with a token of its own, off the shift's limit).
async fn stored_message(api: SocketAddr, user: &str) -> String {
    let auth = format!("Bearer check-{user}");
    let got = request(
        api,
        Method::GET,
        &presence::path(user),
        &[("Authorization", auth.as_str())],
        Bytes::new(),
    )
    .await
    .expect("an answer");
    assert_eq!(got.status, 200);
    json(&got)["message"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_500_agent_shift_change_under_one_token_goes_in_bulk_calls() {
    let emu = emulator(&emulator_config("")).await;
    let proxy = ProxyProcess::start(&proxy_config("10ms"), emu.local_addr()).await;
    let (agents, updates) = (500, 10);
    let (took, times) = shift_change(&proxy, agents, updates).await;

    // 5,000 updates in bulk calls of 50: 100 calls, at the binding rate of the token's
    // 300/min (5/s; the bulk route allows 10/s).
    let calls = (agents * updates).div_ceil(50) as f64;
    let ideal = Duration::from_secs_f64(calls / 5.0);
    let bulk_calls = proxy
        .metric(r#"shiftgate_upstream_responses_total{route="presence-bulk",status="200"}"#)
        .await;
    let coalesced = proxy
        .metric(r#"shiftgate_coalesced_requests_total{route="presence"}"#)
        .await;
    let throttled = proxy
        .metric(r#"shiftgate_upstream_responses_total{route="presence-bulk",status="429"}"#)
        .await;
    let mut sorted = times.clone();
    sorted.sort();
    let p = |q: f64| sorted[((sorted.len() - 1) as f64 * q) as usize];
    println!(
        "FIGURES coalesce: {} updates in {took:?} (ideal {ideal:?}, {bulk_calls} bulk calls, {coalesced} coalesced, {throttled} upstream 429s), p50 {:?} p99 {:?}",
        agents * updates,
        p(0.5),
        p(0.99)
    );
    assert_eq!(
        coalesced,
        (agents * updates) as f64,
        "every update in a bulk call"
    );
    assert_eq!(throttled, 0.0, "no upstream 429");
    assert!(
        took <= ideal.mul_f64(1.2),
        "took {took:?}, more than 1.2 × {ideal:?}"
    );
    let metrics = proxy.metrics().await;
    assert!(metrics.contains(r#"shiftgate_batch_size_count{route="presence"}"#));

    for a in 0..agents {
        let user = format!("user-{a}");
        assert_eq!(
            stored_message(emu.local_addr(), &user).await,
            message(a, updates - 1),
            "{user} ends on its last update"
        );
    }
}

/// Updates at once for `users`, each with its body; the answers in the same order.
async fn at_once(proxy: &ProxyProcess, updates: Vec<(String, String)>) -> Vec<Answer> {
    let runs: Vec<_> = updates
        .into_iter()
        .map(|(user, body)| {
            let mut conn = connection(proxy);
            tokio::spawn(async move { patch(&mut conn, &user, body).await })
        })
        .collect();
    let mut answers = Vec::new();
    for r in runs {
        answers.push(r.await.unwrap());
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_400_sends_each_update_alone_and_each_client_gets_its_own_answer() {
    let emu = emulator(&emulator_config("")).await;
    // A long window: all four join one batch.
    let proxy = ProxyProcess::start(&proxy_config("300ms"), emu.local_addr()).await;
    let mut updates: Vec<(String, String)> = (0..3)
        .map(|i| (format!("good-{i}"), presence::body_with_message("fine")))
        .collect();
    // An entry the API refuses: the whole bulk call is answered 400.
    updates.push(("bad".into(), r#"{"presenceDefinition":{"id":""}}"#.into()));
    let answers = at_once(&proxy, updates).await;
    for a in &answers[..3] {
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert!(header(a, "X-Shiftgate-Batch").is_none(), "sent alone");
        assert_eq!(json(a)["message"], "fine");
    }
    assert_eq!(answers[3].status, 400, "its own refusal");
    assert_eq!(
        proxy
            .metric(r#"shiftgate_upstream_responses_total{route="presence-bulk",status="400"}"#)
            .await,
        1.0
    );
    for i in 0..3 {
        assert_eq!(
            stored_message(emu.local_addr(), &format!("good-{i}")).await,
            "fine"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_429_retries_the_batch() {
    // The bulk call is throttled for its first second.
    let emu = emulator(&emulator_config(&format!(
        "faults:\n  - {{ kind: outage_429, duration: \"1s\", retry_after: 1, path: \"{}\" }}\n",
        presence::BULK_PATH
    )))
    .await;
    let proxy = ProxyProcess::start(&proxy_config("50ms"), emu.local_addr()).await;
    let updates = (0..5)
        .map(|i| {
            (
                format!("user-{i}"),
                presence::body_with_message("after the 429"),
            )
        })
        .collect();
    let answers = at_once(&proxy, updates).await;
    for (i, a) in answers.iter().enumerate() {
        assert_eq!(a.status, 200, "{:?}", a.body);
        assert_eq!(json(a)["id"], format!("user-{i}").as_str());
        assert_eq!(header(a, "X-Shiftgate-Batch"), Some("5"));
        let attempts: u32 = header(a, "X-Shiftgate-Attempts").unwrap().parse().unwrap();
        assert!(attempts >= 2, "retried: {attempts} attempts");
    }
    assert!(
        proxy
            .metric(r#"shiftgate_retries_total{reason="429",route="presence-bulk"}"#)
            .await
            >= 1.0
    );
}

/// A stand-in API whose bulk answer leaves out the user `ghost`; a single PATCH is answered
/// `{"id", "via": "alone"}`.
async fn stub_api() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let method = req.method().clone();
                        let path = req.uri().path().to_string();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let answer = if method == Method::PUT {
                            let entries: Vec<serde_json::Value> =
                                serde_json::from_slice(&body).unwrap();
                            let kept: Vec<serde_json::Value> = entries
                            .into_iter()
                            .filter(|e| e["id"] != "ghost")
                            .map(|e| serde_json::json!({"id": e["id"], "message": e["message"], "via": "bulk"}))
                            .collect();
                            serde_json::Value::from(kept)
                        } else {
                            let user = path.split('/').nth(4).unwrap_or_default().to_string();
                            serde_json::json!({"id": user, "via": "alone"})
                        };
                        Ok::<_, std::convert::Infallible>(
                            http::Response::builder()
                                .header("Content-Type", "application/json")
                                .header("ININ-Correlation-Id", "stub")
                                .body(Full::new(Bytes::from(answer.to_string())))
                                .unwrap(),
                        )
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_missing_from_the_bulk_answer_goes_alone() {
    let api = stub_api().await;
    let proxy = ProxyProcess::start(&proxy_config("300ms"), api).await;
    let updates = ["user-1", "ghost", "user-2"]
        .into_iter()
        .map(|u| (u.to_string(), presence::body_with_message(u)))
        .collect();
    let answers = at_once(&proxy, updates).await;
    assert_eq!(json(&answers[0])["via"], "bulk");
    assert_eq!(json(&answers[0])["id"], "user-1");
    assert_eq!(header(&answers[0], "X-Shiftgate-Batch"), Some("3"));
    assert_eq!(json(&answers[2])["id"], "user-2");
    let ghost = &answers[1];
    assert_eq!(ghost.status, 200);
    assert_eq!(json(ghost)["via"], "alone", "its own route's answer");
    assert_eq!(json(ghost)["id"], "ghost");
    assert!(header(ghost, "X-Shiftgate-Batch").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_one_goes_as_the_original_request() {
    let api = stub_api().await;
    let proxy = ProxyProcess::start(&proxy_config("10ms"), api).await;
    let mut conn = connection(&proxy);
    let got = patch(&mut conn, "solo", presence::BODY.to_string()).await;
    assert_eq!(got.status, 200);
    assert_eq!(json(&got)["via"], "alone");
    assert!(header(&got, "X-Shiftgate-Batch").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_whose_client_left_is_not_sent_and_frees_its_user() {
    let api = stub_api().await;
    let proxy = ProxyProcess::start(&proxy_config("1500ms"), api).await;
    // The first update of user-x: its client leaves while the batch waits.
    let body = presence::body_with_message("left");
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        presence::path("user-x"),
        body.len()
    );
    raw(proxy.addr(), head.as_bytes(), Duration::from_millis(100)).await;
    proxy
        .wait_for_metric(
            r#"shiftgate_client_disconnects_total{route="presence"}"#,
            Duration::from_secs(5),
            |v| v >= 1.0,
        )
        .await;
    // Its next update, and another user's, join the same batch.
    let updates = [("user-x", "stayed"), ("user-y", "other")]
        .into_iter()
        .map(|(u, m)| (u.to_string(), presence::body_with_message(m)))
        .collect();
    let answers = at_once(&proxy, updates).await;
    assert_eq!(json(&answers[0])["message"], "stayed");
    assert_eq!(json(&answers[0])["via"], "bulk");
    assert_eq!(header(&answers[0], "X-Shiftgate-Batch"), Some("2"));
    assert_eq!(json(&answers[1])["message"], "other");
}
