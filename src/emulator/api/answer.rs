//! Answers: Genesys-shaped [`ApiAnswer`]s, what a fault answers, the headers every answer carries.

use std::time::Instant;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Response, StatusCode};
use serde::Serialize;
use serde_json::json;

use super::json::to_json_bytes;
use super::{ApiRequest, Reply};
use crate::emulator::catalog::{self, error_body};
use crate::emulator::config::FaultKind;
use crate::genesys::retry_after_secs;

pub(crate) static ININ_CORRELATION_ID: HeaderName = HeaderName::from_static("inin-correlation-id");
pub(crate) static X_EMULATOR_BODY_SHA256: HeaderName =
    HeaderName::from_static("x-emulator-body-sha256");
pub(crate) static X_EMULATOR_HOST: HeaderName = HeaderName::from_static("x-emulator-host");

/// An answer before the common headers are added.
pub(super) struct ApiAnswer {
    pub(super) status: StatusCode,
    pub(super) body: Bytes,
    pub(super) json: bool,
    pub(super) retry_after: Option<u64>,
    pub(super) close: bool,
    pub(super) reset: bool,
}

impl ApiAnswer {
    /// A JSON body already serialized.
    pub(super) fn json_bytes(status: StatusCode, body: Bytes) -> Self {
        ApiAnswer {
            status,
            body,
            json: true,
            retry_after: None,
            close: false,
            reset: false,
        }
    }

    pub(super) fn json(status: StatusCode, value: &impl Serialize) -> Self {
        ApiAnswer::json_bytes(status, to_json_bytes(value))
    }

    pub(super) fn error(status: StatusCode, code: &str, message: &str, context_id: &str) -> Self {
        ApiAnswer::json_bytes(
            status,
            error_body(status.as_u16(), code, message, context_id),
        )
    }

    pub(super) fn no_content() -> Self {
        ApiAnswer {
            json: false,
            ..ApiAnswer::json_bytes(StatusCode::NO_CONTENT, Bytes::new())
        }
    }

    /// The exact Genesys 429.
    pub(super) fn too_many_requests(retry_after: u64, context_id: &str) -> Self {
        ApiAnswer {
            retry_after: Some(retry_after),
            ..ApiAnswer::error(
                StatusCode::TOO_MANY_REQUESTS,
                catalog::CODE_TOO_MANY_REQUESTS,
                &catalog::rate_limit_message(retry_after),
                context_id,
            )
        }
    }

    /// The Genesys 429 whose body also names the limit hit, as Genesys may since 2023:
    /// `"limit": {"key", "namespace", "value"}` after the usual fields.
    pub(super) fn too_many_requests_naming(
        retry_after: u64,
        context_id: &str,
        key: &str,
        namespace: &str,
        value: u32,
    ) -> Self {
        let mut answer = ApiAnswer::too_many_requests(retry_after, context_id);
        let limit = json!({ "key": key, "namespace": namespace, "value": value });
        // The usual body's fields keep their order; the limit goes last.
        let mut body = answer.body.to_vec();
        body.pop();
        body.extend_from_slice(format!(",\"limit\":{limit}}}").as_bytes());
        answer.body = Bytes::from(body);
        answer
    }

    pub(super) fn bad_request(message: &str, context_id: &str) -> Self {
        ApiAnswer::error(
            StatusCode::BAD_REQUEST,
            catalog::CODE_BAD_REQUEST,
            message,
            context_id,
        )
    }
}

pub(super) fn not_found(context_id: &str) -> ApiAnswer {
    ApiAnswer::error(
        StatusCode::NOT_FOUND,
        catalog::CODE_NOT_FOUND,
        catalog::MSG_NOT_FOUND,
        context_id,
    )
}

pub(super) fn fault_answer(
    kind: &FaultKind,
    until: Option<Instant>,
    now: Instant,
    context_id: &str,
) -> ApiAnswer {
    match *kind {
        FaultKind::Outage429 { retry_after } => {
            let retry_after = retry_after
                .or_else(|| until.map(|u| retry_after_secs(u.saturating_duration_since(now))))
                .unwrap_or(1);
            ApiAnswer::too_many_requests(retry_after, context_id)
        }
        FaultKind::DailyLimit { retry_after } => {
            ApiAnswer::too_many_requests(retry_after, context_id)
        }
        FaultKind::Status {
            status,
            retry_after,
        } => ApiAnswer {
            retry_after,
            ..ApiAnswer::error(
                StatusCode::from_u16(status.status()).expect("502..504 are valid"),
                status.code(),
                status.message(),
                context_id,
            )
        },
        // A success status, so a client that trusts the status line over the body is caught.
        FaultKind::Reset => ApiAnswer {
            reset: true,
            close: true,
            ..ApiAnswer::json(
                StatusCode::OK,
                &json!({
                    "emulator": "reset fault: this answer is cut short and never arrives whole",
                    "contextId": context_id,
                }),
            )
        },
        // Slow faults only delay; decide() never returns one as the answer.
        FaultKind::Slow { .. } => not_found(context_id),
    }
}

/// Adds what every answer carries and builds the response.
pub(super) fn finish(answer: ApiAnswer, context_id: &str, req: &ApiRequest) -> Reply {
    let mut response = Response::new(answer.body);
    *response.status_mut() = answer.status;
    let headers = response.headers_mut();
    // Insertion order is wire order: Genesys's own answers start with the correlation id.
    headers.insert(
        ININ_CORRELATION_ID.clone(),
        HeaderValue::from_str(context_id).expect("a uuid is a valid header value"),
    );
    if let Some(secs) = answer.retry_after {
        headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if answer.json {
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    if let Some(sha) = &req.body_sha256 {
        if let Ok(value) = HeaderValue::from_str(sha) {
            headers.insert(X_EMULATOR_BODY_SHA256.clone(), value);
        }
    }
    if let Some(host) = req.headers.get(http::header::HOST) {
        headers.insert(X_EMULATOR_HOST.clone(), host.clone());
    }
    // A body not read to its end leaves the connection in an unknown state.
    if answer.close || req.body_sha256.is_none() {
        headers.insert(http::header::CONNECTION, HeaderValue::from_static("close"));
    }
    Reply {
        response,
        reset: answer.reset,
    }
}
