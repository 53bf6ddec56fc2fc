//! What the Genesys API's answers look like, shared by the proxy's own answers and the emulator:
//! the JSON error body and the whole-second `Retry-After`.

use std::time::Duration;

use serde::Serialize;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ErrorBody<'a> {
    message: &'a str,
    code: &'a str,
    status: u16,
    context_id: &'a str,
    details: [(); 0],
    errors: [(); 0],
}

/// The error body every Genesys API answers with (field order as Genesys's, so the bytes match
/// a real answer); `contextId` equals the `ININ-Correlation-Id` header.
///
/// ```
/// use shiftgate::genesys::genesys_error_body;
/// assert_eq!(
///     genesys_error_body(404, "not.found", "Not found.", "c-1"),
///     r#"{"message":"Not found.","code":"not.found","status":404,"contextId":"c-1","details":[],"errors":[]}"#
/// );
/// ```
pub fn genesys_error_body(status: u16, code: &str, message: &str, context_id: &str) -> String {
    serde_json::to_string(&ErrorBody {
        message,
        code,
        status,
        context_id,
        details: [],
        errors: [],
    })
    .expect("plain struct serializes")
}

/// A wait as a `Retry-After` value: whole seconds, rounded up, at least 1.
///
/// ```
/// use std::time::Duration;
/// use shiftgate::genesys::retry_after_secs;
/// assert_eq!(retry_after_secs(Duration::ZERO), 1);
/// assert_eq!(retry_after_secs(Duration::from_millis(1001)), 2);
/// assert_eq!(retry_after_secs(Duration::from_secs(42)), 42);
/// ```
pub fn retry_after_secs(wait: Duration) -> u64 {
    let s = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    s.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds_and_is_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(42)), 42);
        assert_eq!(retry_after_secs(Duration::from_millis(42_001)), 43);
    }
}
