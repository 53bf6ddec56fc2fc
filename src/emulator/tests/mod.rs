//! Behaviour tests of the emulator, one file per concern, and the helpers they share.
//!
//! All but `e2e` drive the request pipeline without sockets on a hand-moved clock; `e2e` runs
//! the server over loopback sockets in real time.

mod auth;
mod discovery;
mod e2e;
mod endpoints;
mod faults;
mod limits;
mod stats;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde_json::{json, Value};

use super::api::{ApiRequest, ApiState};
use super::clock::Clock;
use super::*;

const PATCH_PATH: &str = "/api/v2/users/u1/presences/purecloud";
const AVAILABLE: &str = "6a3af858-942f-489d-9700-5f9bcdcdae9b";

fn state(yaml: &str) -> ApiState {
    ApiState::with_clock(
        EmulatorConfig::from_yaml_str(yaml).unwrap(),
        Clock::manual(),
    )
}

fn bearer(token: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
    );
    headers
}

/// An answer, decoded for assertions.
struct Got {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
    reset: bool,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn retry_after(&self) -> Option<u64> {
        self.header("retry-after").map(|v| v.parse().unwrap())
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or_default().to_string()
    }
}

async fn call(
    state: &ApiState,
    method: Method,
    path: &str,
    headers: HeaderMap,
    body: &[u8],
) -> Got {
    let reply = state
        .handle(ApiRequest::new(method, path, headers, body))
        .await;
    let (parts, body) = reply.response.into_parts();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
        reset: reply.reset,
    }
}

async fn get(state: &ApiState, path: &str, token: &str) -> Got {
    call(state, Method::GET, path, bearer(token), b"").await
}

async fn patch_presence(state: &ApiState, token: &str) -> Got {
    let body = json!({"presenceDefinition": {"id": AVAILABLE}, "primary": true, "message": "hi"});
    call(
        state,
        Method::PATCH,
        PATCH_PATH,
        bearer(token),
        body.to_string().as_bytes(),
    )
    .await
}

fn expected_429_body(retry_after: u64, context_id: &str) -> String {
    format!(
        r#"{{"message":"Rate limit exceeded the maximum. Retry the request in [{retry_after}] seconds","code":"too.many.requests.retry.after","status":429,"contextId":"{context_id}","details":[],"errors":[]}}"#
    )
}

/// Every field of Genesys's 429: status, the three headers, the body byte for byte, and no
/// rate-limit headers of any vendor.
fn assert_genesys_429(got: &Got, retry_after: u64) {
    assert_eq!(got.status, 429);
    assert_eq!(got.retry_after(), Some(retry_after));
    assert_eq!(got.header("content-type"), Some("application/json"));
    let context_id = got.header("inin-correlation-id").expect("a correlation id");
    assert!(uuid::Uuid::parse_str(context_id).is_ok(), "{context_id}");
    assert_eq!(
        std::str::from_utf8(&got.body).unwrap(),
        expected_429_body(retry_after, context_id)
    );
    for name in got.headers.keys() {
        let name = name.as_str();
        assert!(
            !name.starts_with("inin-ratelimit") && !name.starts_with("x-ratelimit"),
            "unexpected header {name}"
        );
    }
}

fn basic(id: &str, secret: &str) -> HeaderMap {
    // Test-only encoder, the mirror of the decoder under test.
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{id}:{secret}").into_bytes();
    let mut encoded = String::new();
    for chunk in raw.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                encoded.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                encoded.push('=');
            }
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
    );
    headers
}
