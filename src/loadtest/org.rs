//! A real org as discovery and the load test speak to it: client-credentials tokens and API
//! calls over the keep-alive client, with a pool of connections shared by calls in flight.
//!
//! Secrets stay inside [`Secret`] and [`Token`], whose `Debug` shows nothing: neither can reach a
//! log line or an error message by accident.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::Value;
use tokio::sync::{Mutex, Semaphore};

use super::client::{AgentConnection, ClientError, OutgoingRequest};
use super::Target;

/// The OAuth client's secret, as read from the environment.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(secret: String) -> Secret {
        Secret(secret)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// An access token; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(Arc<str>);

impl Token {
    /// The `Authorization` value, marked sensitive so that no header dump shows it.
    pub fn bearer(&self) -> HeaderValue {
        let mut value = HeaderValue::from_str(&format!("Bearer {}", self.0))
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer invalid"));
        value.set_sensitive(true);
        value
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(..)")
    }
}

/// Why the org could not be used.
#[derive(Debug, thiserror::Error)]
pub enum OrgError {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("login refused: POST /oauth/token answered {status} ({code})")]
    LoginRefused { status: u16, code: String },
    #[error("{what} answered {status}: {message}")]
    Unexpected {
        what: String,
        status: u16,
        message: String,
    },
    #[error("{what} answered something that is not the expected JSON")]
    BadJson { what: String },
}

/// One answer of the API, its body parsed when it is JSON.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: StatusCode,
    /// `Retry-After` in whole seconds, when present and a number.
    pub retry_after: Option<u64>,
    pub body: Value,
    pub latency: Duration,
}

impl Reply {
    /// The `limit.key` a 429 body may carry.
    pub fn limit_key(&self) -> Option<String> {
        self.body["limit"]["key"].as_str().map(str::to_string)
    }
}

/// Connections to the API host shared by every request in flight, and to the login host.
pub struct Org {
    api: Target,
    login: Target,
    client_id: String,
    secret: Secret,
    idle: Mutex<Vec<AgentConnection>>,
    login_conn: Mutex<AgentConnection>,
    in_flight: Semaphore,
}

/// At most this many requests in flight: a production org sees a handful of agents, not a flood.
pub const MAX_IN_FLIGHT: usize = 32;

impl Org {
    pub fn new(api: Target, login: Target, client_id: String, secret: Secret) -> Org {
        Org {
            login_conn: Mutex::new(AgentConnection::new(login.clone())),
            api,
            login,
            client_id,
            secret,
            idle: Mutex::new(Vec::new()),
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    /// A fresh access token by client credentials (HTTP Basic, `grant_type=client_credentials`).
    pub async fn mint(&self) -> Result<Token, OrgError> {
        let credentials = base64(format!("{}:{}", self.client_id, self.secret.0).as_bytes());
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {credentials}")).expect("base64 is a header"),
        );
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        let request = OutgoingRequest {
            method: Method::POST,
            path_and_query: format!("{}/oauth/token", self.login.base_path()),
            headers,
            body: Bytes::from_static(b"grant_type=client_credentials"),
        };
        let answer = self.login_conn.lock().await.send(&request).await?;
        let body: Value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
        if answer.status != StatusCode::OK {
            return Err(OrgError::LoginRefused {
                status: answer.status.as_u16(),
                code: body["code"]
                    .as_str()
                    .or(body["error"].as_str())
                    .unwrap_or("no code")
                    .to_string(),
            });
        }
        match body["access_token"].as_str() {
            Some(token) if !token.is_empty() => Ok(Token(token.into())),
            _ => Err(OrgError::BadJson {
                what: "POST /oauth/token".into(),
            }),
        }
    }

    /// One API call with `token`; `path` is from `/api/v2`, the query included.
    pub async fn call(
        &self,
        token: &Token,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Reply, OrgError> {
        let mut headers = HeaderMap::new();
        let mut bearer = HeaderValue::from_str(&format!("Bearer {}", token.0)).map_err(|_| {
            OrgError::BadJson {
                what: "POST /oauth/token (the token)".into(),
            }
        })?;
        bearer.set_sensitive(true);
        headers.insert(http::header::AUTHORIZATION, bearer);
        let body = match body {
            Some(value) => {
                headers.insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                Bytes::from(serde_json::to_vec(value).expect("JSON values serialize"))
            }
            None => Bytes::new(),
        };
        let request = OutgoingRequest {
            method,
            path_and_query: format!("{}{path}", self.api.base_path()),
            headers,
            body,
        };
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let conn = self.idle.lock().await.pop();
        let mut conn = conn.unwrap_or_else(|| AgentConnection::new(self.api.clone()));
        let started = Instant::now();
        let answer = conn.send(&request).await;
        let latency = started.elapsed();
        let answer = answer?;
        self.idle.lock().await.push(conn);
        let retry_after = answer
            .headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        Ok(Reply {
            status: answer.status,
            retry_after,
            body: serde_json::from_slice(&answer.body).unwrap_or(Value::Null),
            latency,
        })
    }
}

/// Standard base64 with padding, for the Basic header: the only base64 discovery writes.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_pads_as_the_basic_scheme_expects() {
        assert_eq!(base64(b"id:secret"), "aWQ6c2VjcmV0");
        assert_eq!(base64(b"a"), "YQ==");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b""), "");
    }

    #[test]
    fn secrets_and_tokens_never_show_in_debug_output() {
        let secret = Secret::new("hunter2".into());
        let token = Token("tok-123".into());
        let shown = format!("{secret:?} {token:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("tok-123"),
            "{shown}"
        );
    }
}
