//! What `shiftgate discover` reads and relies on: distinct client-credentials tokens, the users
//! listing, presence read back, the org limits API and the optional `limit` of a 429 body.

use std::time::Duration;

use http::Method;

use super::*;

#[tokio::test]
async fn each_token_request_mints_a_distinct_token_that_the_api_accepts() {
    let s =
        state("clients: [{ id: app, secret: s3cret }]\nauth: { require_issued_tokens: true }\n");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        let got = call(
            &s,
            Method::POST,
            "/oauth/token",
            basic("app", "s3cret"),
            b"grant_type=client_credentials",
        )
        .await;
        assert_eq!(got.status, 200);
        tokens.push(got.json()["access_token"].as_str().unwrap().to_string());
    }
    tokens.sort();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        3,
        "every token request gets a token of its own"
    );
    for token in &tokens {
        assert_eq!(
            get(&s, "/api/v2/presence/definitions", token).await.status,
            200
        );
    }
}

#[tokio::test]
async fn users_are_listed_in_pages_with_the_load_tests_ids() {
    let s = state("users: 7\n");
    let first = get(&s, "/api/v2/users?pageSize=5&pageNumber=1", "t").await;
    assert_eq!(first.status, 200);
    let page = first.json();
    assert_eq!(page["total"], 7);
    assert_eq!(page["pageCount"], 2);
    assert_eq!(page["entities"].as_array().unwrap().len(), 5);
    assert_eq!(page["entities"][0]["id"], crate::loadtest::user_id(0));
    let second = get(&s, "/api/v2/users?pageSize=5&pageNumber=2", "t")
        .await
        .json();
    assert_eq!(second["entities"].as_array().unwrap().len(), 2);
    assert_eq!(second["entities"][1]["id"], crate::loadtest::user_id(6));
    let past = get(&s, "/api/v2/users?pageSize=5&pageNumber=3", "t")
        .await
        .json();
    assert!(past["entities"].as_array().unwrap().is_empty());
    assert_eq!(
        get(&s, "/api/v2/users?pageSize=0", "t").await.status,
        400,
        "a page size out of range is a bad request"
    );
    assert_eq!(
        get(&s, "/api/v2/users", "t").await.json()["pageSize"],
        25,
        "Genesys's default page size"
    );
}

#[tokio::test]
async fn a_users_presence_reads_back_what_the_last_patch_set() {
    let s = state("");
    let before = get(&s, PATCH_PATH, "t").await.json();
    assert_eq!(before["presenceDefinition"]["systemPresence"], "Offline");
    assert_eq!(patch_presence(&s, "t").await.status, 200);
    let after = get(&s, PATCH_PATH, "t").await.json();
    assert_eq!(after["presenceDefinition"]["id"], AVAILABLE);
    assert_eq!(after["message"], "hi");
}

#[tokio::test]
async fn the_org_limits_api_lists_namespaces_and_each_namespaces_limits() {
    let s = state("token_rate_per_minute: 120\n");
    let listing = get(&s, "/api/v2/organizations/limits/namespaces", "t").await;
    assert_eq!(listing.status, 200);
    let names: Vec<String> = listing.json()["entities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"platform.api".to_string()), "{names:?}");
    let api = get(
        &s,
        "/api/v2/organizations/limits/namespaces/platform.api",
        "t",
    )
    .await;
    assert_eq!(api.status, 200);
    let limits = api.json()["entities"].as_array().unwrap().clone();
    assert!(
        limits.contains(
            &json!({"key": "token.rate.per.minute", "namespace": "platform.api", "value": 120})
        ),
        "{limits:?}"
    );
    assert_eq!(
        get(&s, "/api/v2/organizations/limits/namespaces/nothing", "t")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn the_org_limits_api_can_be_switched_off() {
    let s = state("limits_api: false\n");
    for path in [
        "/api/v2/organizations/limits/namespaces",
        "/api/v2/organizations/limits/namespaces/platform.api",
    ] {
        let got = get(&s, path, "t").await;
        assert_eq!(got.status, 404, "{path}");
        assert_eq!(got.code(), "not.found");
    }
}

#[tokio::test]
async fn a_429_names_its_limit_only_when_switched_on() {
    let s = state("token_rate_per_minute: 1\nlimit_in_429: true\n");
    assert_eq!(patch_presence(&s, "a").await.status, 200);
    let got = patch_presence(&s, "a").await;
    assert_eq!(got.status, 429);
    let body = got.json();
    assert_eq!(
        body["limit"],
        json!({"key": "token.rate.per.minute", "namespace": "platform.api", "value": 1})
    );
    assert_eq!(body["code"], "too.many.requests.retry.after");
    let text = std::str::from_utf8(&got.body).unwrap();
    assert!(
        text.starts_with(r#"{"message":"Rate limit exceeded"#),
        "the usual fields keep their order: {text}"
    );

    let plain = state("token_rate_per_minute: 1\n");
    patch_presence(&plain, "a").await;
    let got = patch_presence(&plain, "a").await;
    assert_genesys_429(&got, 60);
}

#[tokio::test]
async fn a_route_limit_may_have_any_window_length() {
    let s = state(
        r#"
token_rate_per_minute: 0
route_limits:
  - { name: p, method: PATCH, path: "/api/v2/users/{u}/presences/{s}", limit: "2/10s", per: token }
"#,
    );
    assert_eq!(patch_presence(&s, "a").await.status, 200);
    s.clock.advance(Duration::from_secs(3));
    assert_eq!(patch_presence(&s, "a").await.status, 200);
    let refused = patch_presence(&s, "a").await;
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.retry_after(),
        Some(7),
        "the 10 s window opened 3 s ago"
    );
    assert_eq!(patch_presence(&s, "b").await.status, 200, "per token");
    s.clock.advance(Duration::from_secs(7));
    assert_eq!(patch_presence(&s, "a").await.status, 200);
}
