//! Authentication: bearer tokens on API requests and the client-credentials token flow.

use std::time::Duration;

use http::{HeaderMap, Method};

use super::*;

#[tokio::test]
async fn api_requests_without_a_bearer_token_get_a_genesys_401() {
    let s = state("");
    let got = call(
        &s,
        Method::GET,
        "/api/v2/presence/definitions",
        HeaderMap::new(),
        b"",
    )
    .await;
    assert_eq!(got.status, 401);
    assert_eq!(got.code(), "bad.credentials");
    assert_eq!(
        got.json()["contextId"].as_str(),
        got.header("inin-correlation-id"),
        "error bodies carry the correlation id"
    );
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "invented")
            .await
            .status,
        200,
        "by default any non-empty token is accepted"
    );
}

#[tokio::test]
async fn the_token_flow_issues_tokens_only_to_known_clients() {
    let s = state(
        r#"
clients: [{ id: app, secret: s3cret }]
auth: { require_issued_tokens: true }
"#,
    );
    let form = b"grant_type=client_credentials";
    let post = |headers: HeaderMap, body: &'static [u8]| {
        let s = &s;
        async move { call(s, Method::POST, "/oauth/token", headers, body).await }
    };

    let got = post(HeaderMap::new(), form).await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (401, "bad.credentials"),
        "no Basic header"
    );
    let got = post(basic("app", "wrong"), form).await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (401, "bad.credentials"),
        "wrong secret"
    );
    let got = post(basic("app", "s3cret"), b"grant_type=password").await;
    assert_eq!(
        (got.status, got.code().as_str()),
        (400, "bad.request"),
        "wrong grant type"
    );

    let got = post(basic("app", "s3cret"), form).await;
    assert_eq!(got.status, 200);
    let answer = got.json();
    assert_eq!(answer["token_type"], "bearer");
    assert_eq!(answer["expires_in"], 86399);
    let token = answer["access_token"].as_str().unwrap().to_string();

    assert_eq!(
        get(&s, "/api/v2/presence/definitions", "invented")
            .await
            .status,
        401,
        "require_issued_tokens refuses tokens the emulator did not issue"
    );
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", &token).await.status,
        200
    );
    s.clock.advance(Duration::from_secs(86_399));
    assert_eq!(
        get(&s, "/api/v2/presence/definitions", &token).await.status,
        401,
        "an issued token expires after expires_in seconds"
    );
}

#[tokio::test]
async fn any_client_gets_a_token_when_none_are_configured() {
    let s = state("");
    let got = call(
        &s,
        Method::POST,
        "/oauth/token",
        basic("anyone", "anything"),
        b"grant_type=client_credentials",
    )
    .await;
    assert_eq!(got.status, 200);
    assert!(got.json()["access_token"].as_str().unwrap().len() > 20);
}
