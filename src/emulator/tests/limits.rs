//! The token window and route limits: who is counted, when a window opens, the 429 they answer.

use std::time::Duration;

use http::Method;

use super::*;

#[tokio::test]
async fn the_token_window_admits_300_a_minute_from_its_first_request_then_answers_429() {
    let s = state("");
    for i in 0..300 {
        let got = get(&s, "/api/v2/presence/definitions", "tok-a").await;
        assert_eq!(got.status, 200, "request {i} is inside the limit");
    }
    s.clock.advance(Duration::from_millis(10_400));

    // 49.6 s are left in the window that opened at t0: Retry-After rounds up to 50.
    let got = get(&s, "/api/v2/presence/definitions", "tok-a").await;
    assert_genesys_429(&got, 50);

    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "tok-b")
            .await
            .status,
        200,
        "another token has a window of its own"
    );

    s.clock.advance(Duration::from_millis(49_600));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "tok-a")
            .await
            .status,
        200,
        "the window ends 60 s after its first request; the 429 did not extend it"
    );
}

#[tokio::test]
async fn a_route_limit_is_shared_by_the_org_and_answers_with_its_own_window() {
    let s = state(
        r#"
route_limits:
  - { name: presence, method: PATCH, path: "/api/v2/users/{userId}/presences/{sourceId}", limit: "2/s" }
"#,
    );
    assert_eq!(patch_presence(&s, "a").await.status, 200);
    assert_eq!(patch_presence(&s, "b").await.status, 200);
    s.clock.advance(Duration::from_millis(300));
    let got = patch_presence(&s, "c").await;
    assert_genesys_429(&got, 1);
    assert_eq!(
        get(&s, PATCH_PATH, "c").await.status,
        200,
        "a GET of the same path is outside a PATCH limit"
    );
    s.clock.advance(Duration::from_millis(700));
    assert_eq!(
        patch_presence(&s, "c").await.status,
        200,
        "a new 1 s window opens with the first request after the old one ends"
    );
}

#[tokio::test]
async fn a_per_token_route_limit_counts_each_token_separately() {
    let s = state(
        r#"
route_limits:
  - { name: bulk, path: "/api/v2/users/presences/bulk", limit: "1/min", per: token }
"#,
    );
    let bulk = |token: &'static str| {
        let s = &s;
        async move {
            call(
                s,
                Method::PUT,
                "/api/v2/users/presences/bulk",
                bearer(token),
                br#"[{"id":"u1","primary":true}]"#,
            )
            .await
        }
    };
    assert_eq!(bulk("a").await.status, 200);
    assert_eq!(bulk("b").await.status, 200);
    s.clock.advance(Duration::from_secs(15));
    assert_genesys_429(&bulk("a").await, 45);
}

#[tokio::test]
async fn a_zero_token_rate_turns_the_token_limit_off() {
    let s = state("token_rate_per_minute: 0\n");
    for _ in 0..1000 {
        assert_eq!(
            get(&s, "/api/v2/presence/definitions", "t").await.status,
            200
        );
    }
}
