//! What the emulator counts: the per-second timeline, counts by route and status, peak concurrency.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, Method};

use super::*;

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
