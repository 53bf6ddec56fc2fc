//! The Genesys endpoints: presence, bulk presence, routing status, definitions, limits, 404s.

use http::{HeaderValue, Method};
use serde_json::{json, Value};

use super::*;
use crate::digest::sha256_hex;

#[tokio::test]
async fn a_presence_patch_is_echoed_and_read_back() {
    let s = state("");
    let got = patch_presence(&s, "t").await;
    assert_eq!(got.status, 200);
    let presence = got.json();
    assert_eq!(presence["source"], "PURECLOUD");
    assert_eq!(presence["presenceDefinition"]["id"], AVAILABLE);
    assert_eq!(
        presence["presenceDefinition"]["systemPresence"],
        "Available"
    );
    assert_eq!(presence["message"], "hi");
    assert!(presence["modifiedDate"].as_str().unwrap().ends_with('Z'));

    let read = get(&s, PATCH_PATH, "t").await;
    assert_eq!(read.json(), presence, "GET returns what the PATCH stored");
    let other = get(&s, "/api/v2/users/u2/presences/purecloud", "t")
        .await
        .json();
    assert_eq!(
        other["presenceDefinition"]["systemPresence"], "Offline",
        "a user never set reads as Offline"
    );
}

#[tokio::test]
async fn bad_bodies_get_a_genesys_400() {
    let s = state("");
    for body in [
        &b"{not json"[..],
        b"",
        b"[1]",
        br#"{"presenceDefinition":{"id":7}}"#,
    ] {
        let got = call(&s, Method::PATCH, PATCH_PATH, bearer("t"), body).await;
        assert_eq!(got.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(got.code(), "bad.request");
    }
    let got = call(
        &s,
        Method::PUT,
        "/api/v2/users/u1/routingstatus",
        bearer("t"),
        br#"{"status":"DANCING"}"#,
    )
    .await;
    assert_eq!(got.status, 400, "an unknown routing status is refused");
}

#[tokio::test]
async fn bulk_presence_takes_1_to_50_entries() {
    let s = state("");
    let entry = |i: usize| json!({"id": format!("u{i}"), "sourceId": "PURECLOUD", "primary": true, "presenceDefinition": {"id": AVAILABLE}});
    let fifty: Vec<Value> = (0..50).map(entry).collect();
    let fifty_one: Vec<Value> = (0..51).map(entry).collect();
    let path = "/api/v2/users/presences/bulk";

    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        json!(fifty_one).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 400);
    assert_eq!(got.code(), "bad.request");
    let empty = call(&s, Method::PUT, path, bearer("t"), b"[]").await;
    assert_eq!(empty.status, 400, "an empty batch is refused");
    assert_eq!(
        get(&s, "/api/v2/users/u0/presences/purecloud", "t")
            .await
            .json()["presenceDefinition"]["systemPresence"],
        "Offline",
        "a refused batch changes nothing"
    );

    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        json!(fifty).to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    let answer = got.json();
    assert_eq!(answer.as_array().unwrap().len(), 50);
    assert_eq!(answer[49]["id"], "u49");
    assert_eq!(
        get(&s, "/api/v2/users/u49/presences/purecloud", "t")
            .await
            .json()["presenceDefinition"]["id"],
        AVAILABLE
    );
}

#[tokio::test]
async fn routing_status_defaults_to_off_queue_and_stores_a_put() {
    let s = state("");
    let path = "/api/v2/users/u7/routingstatus";
    assert_eq!(get(&s, path, "t").await.json()["status"], "OFF_QUEUE");
    let body = json!({"userId": "u7", "status": "IDLE", "startTime": "2024-05-01T08:00:00.000Z"});
    let got = call(
        &s,
        Method::PUT,
        path,
        bearer("t"),
        body.to_string().as_bytes(),
    )
    .await;
    assert_eq!(got.status, 200);
    assert_eq!(get(&s, path, "t").await.json(), body);
}

#[tokio::test]
async fn definitions_limits_and_unknown_paths() {
    let s = state("token_rate_per_minute: 120\n");
    let defs = get(&s, "/api/v2/presence/definitions", "t").await.json();
    assert_eq!(defs["entities"].as_array().unwrap().len(), 9);
    let limits = get(&s, "/api/v2/organizations/limits/namespaces", "t")
        .await
        .json();
    assert_eq!(
        limits["entities"][0]["limits"][0],
        json!({"key": "token.rate.per.minute", "value": 120}),
        "the namespace listing shows the limit in force"
    );
    for path in ["/api/v2/wfm/schedules/agents/a1", "/nothing/here"] {
        let got = get(&s, path, "t").await;
        assert_eq!(
            (got.status, got.code().as_str()),
            (404, "not.found"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn every_answer_carries_the_body_hash_host_and_correlation_id() {
    let s = state("");
    let mut headers = bearer("t");
    headers.insert(
        http::header::HOST,
        HeaderValue::from_static("api.mypurecloud.com"),
    );
    let body = br#"{"presenceDefinition":{"id":"x"}}"#;
    let got = call(&s, Method::PATCH, PATCH_PATH, headers, body).await;
    assert_eq!(
        got.header("x-emulator-body-sha256"),
        Some(sha256_hex(body).as_str())
    );
    assert_eq!(got.header("x-emulator-host"), Some("api.mypurecloud.com"));
    assert!(got.header("inin-correlation-id").is_some());
    assert_eq!(
        got.header("retry-after"),
        None,
        "only 429s and some faults carry Retry-After"
    );
}
