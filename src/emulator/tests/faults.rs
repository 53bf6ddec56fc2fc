//! Injected faults: outages, error statuses, daily limits, slow answers, resets, `/_emulator/faults`.

use std::time::{Duration, Instant};

use http::{HeaderMap, Method};

use super::*;

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
