//! The answers the proxy makes itself: Genesys-shaped JSON bodies with a correlation id, and an
//! integer `Retry-After` spelled exactly so (the Java and .NET SDKs look it up case-sensitively).

use std::time::Duration;

use crate::pacer::Rejection;

/// The message of `503 shiftgate.shutting.down`.
pub const SHUTTING_DOWN: &str = "shiftgate is shutting down; try again";

/// Why the proxy answered a request itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    QueueWait,
    QueueFull,
    BodyTooLarge,
    NoRoute,
    ShuttingDown,
    UpstreamUnreachable,
    UpstreamTimeout,
    /// A path that climbs above the root or cannot be normalised otherwise, or a chunked body
    /// that breaks its framing.
    BadRequest,
    /// A request head over [`crate::hygiene::MAX_HEAD_BYTES`].
    HeaderTooLarge,
    /// `limits.max_connections` client connections are open: a new one is answered this once
    /// its request head has come (before it is parsed or routed), and closed.
    Overloaded,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::QueueWait,
        Reason::QueueFull,
        Reason::BodyTooLarge,
        Reason::NoRoute,
        Reason::ShuttingDown,
        Reason::UpstreamUnreachable,
        Reason::UpstreamTimeout,
        Reason::BadRequest,
        Reason::HeaderTooLarge,
        Reason::Overloaded,
    ];

    pub fn status(self) -> u16 {
        match self {
            Reason::QueueWait | Reason::QueueFull => 429,
            Reason::BodyTooLarge => 413,
            Reason::NoRoute => 404,
            Reason::ShuttingDown | Reason::Overloaded => 503,
            Reason::UpstreamUnreachable => 502,
            Reason::UpstreamTimeout => 504,
            Reason::BadRequest => 400,
            Reason::HeaderTooLarge => 431,
        }
    }

    /// The `code` of the JSON body.
    pub fn code(self) -> &'static str {
        match self {
            Reason::QueueWait => "shiftgate.queue.wait",
            Reason::QueueFull => "shiftgate.queue.full",
            Reason::BodyTooLarge => "shiftgate.body.too.large",
            Reason::NoRoute => "shiftgate.no.route",
            Reason::ShuttingDown => "shiftgate.shutting.down",
            Reason::UpstreamUnreachable => "shiftgate.upstream.unreachable",
            Reason::UpstreamTimeout => "shiftgate.upstream.timeout",
            Reason::BadRequest => "shiftgate.bad.request",
            Reason::HeaderTooLarge => "shiftgate.header.too.large",
            Reason::Overloaded => "shiftgate.overloaded",
        }
    }

    /// The message for a person, where it does not depend on the case.
    pub fn message(self) -> Option<&'static str> {
        match self {
            Reason::UpstreamTimeout => Some("the upstream did not answer in time"),
            Reason::ShuttingDown => Some(SHUTTING_DOWN),
            Reason::BodyTooLarge => Some("the request body is too large"),
            _ => None,
        }
    }

    /// The `reason` label of `shiftgate_rejections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Reason::QueueWait => "queue_wait",
            Reason::QueueFull => "queue_full",
            Reason::BodyTooLarge => "body_too_large",
            Reason::NoRoute => "no_route",
            Reason::ShuttingDown => "shutting_down",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::BadRequest => "bad_request",
            Reason::HeaderTooLarge => "header_too_large",
            Reason::Overloaded => "overloaded",
        }
    }
}

/// One answer the proxy makes itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    pub reason: Reason,
    pub message: String,
    /// Whole seconds, at least 1, when the client should try again.
    pub retry_after: Option<u64>,
    pub correlation_id: String,
}

impl LocalResponse {
    pub fn new(reason: Reason, message: impl Into<String>) -> LocalResponse {
        LocalResponse {
            reason,
            message: message.into(),
            retry_after: None,
            correlation_id: uuid::Uuid::new_v4().to_string(),
        }
    }

    pub fn retry_after(mut self, wait: Duration) -> LocalResponse {
        self.retry_after = Some(crate::genesys::retry_after_secs(wait));
        self
    }

    /// The answer to a request the queue would not take: its slot would start too late, or
    /// too many wait already. `Retry-After` is when a slot is predicted to be free.
    pub fn refused(route: &str, max_wait: Duration, rejection: &Rejection) -> LocalResponse {
        let (reason, message) = match *rejection {
            Rejection::TooLong { wait } => (
                Reason::QueueWait,
                format!(
                    "route {route} is saturated: a slot would start in {:.1} s, more than the {} s allowed",
                    wait.as_secs_f64(),
                    max_wait.as_secs_f64()
                ),
            ),
            Rejection::Full { depth, .. } => (
                Reason::QueueFull,
                format!("{depth} requests are waiting already; try again later"),
            ),
        };
        LocalResponse::new(reason, message).retry_after(rejection.retry_after())
    }

    /// The JSON body.
    ///
    /// ```
    /// use shiftgate::local_response::{LocalResponse, Reason};
    /// let a = LocalResponse::new(Reason::NoRoute, "no route for GET /x");
    /// let v: serde_json::Value = serde_json::from_str(&a.body()).unwrap();
    /// assert_eq!(v["code"], "shiftgate.no.route");
    /// assert_eq!(v["status"], 404);
    /// assert_eq!(v["contextId"], a.correlation_id.as_str());
    /// assert_eq!(v["details"], serde_json::json!([]));
    /// ```
    pub fn body(&self) -> String {
        crate::genesys::genesys_error_body(
            self.reason.status(),
            self.reason.code(),
            &self.message,
            &self.correlation_id,
        )
    }

    /// The whole HTTP/1.1 answer, with `Connection: close`: for a connection that is answered
    /// without Pingora (over the cap) and closed after it.
    ///
    /// ```
    /// use std::time::Duration;
    /// use shiftgate::local_response::{LocalResponse, Reason};
    ///
    /// let a = LocalResponse::new(Reason::Overloaded, "too many").retry_after(Duration::from_secs(1));
    /// let text = String::from_utf8(a.http1_closing()).unwrap();
    /// assert!(text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"));
    /// assert!(text.contains("\r\nRetry-After: 1\r\n") && text.contains("\r\nConnection: close\r\n"));
    /// assert!(text.ends_with(&format!("\r\n\r\n{}", a.body())));
    /// ```
    pub fn http1_closing(&self) -> Vec<u8> {
        self.http1_closing_with(&[])
    }

    /// [`LocalResponse::http1_closing`] with `extra` headers besides its own.
    pub fn http1_closing_with(&self, extra: &[(&str, String)]) -> Vec<u8> {
        let status = self.reason.status();
        let phrase = http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("");
        let body = self.body();
        let mut head = format!(
            "HTTP/1.1 {status} {phrase}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in self.headers().iter().chain(extra) {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("Connection: close\r\n\r\n");
        [head.into_bytes(), body.into_bytes()].concat()
    }

    /// Headers besides Content-Type and Content-Length.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![("ININ-Correlation-Id", self.correlation_id.clone())];
        if let Some(s) = self.retry_after {
            h.push(("Retry-After", s.to_string()));
        }
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_its_own_code_and_a_rejections_label() {
        for r in Reason::ALL {
            assert!(r.code().starts_with("shiftgate."), "{r:?}");
            assert!(
                crate::metrics::REJECTION_REASONS.contains(&r.label()),
                "{r:?}: {} is not in metrics::REJECTION_REASONS",
                r.label()
            );
        }
        assert_eq!(crate::metrics::REJECTION_REASONS.len(), Reason::ALL.len());
        let bad = LocalResponse::new(Reason::BadRequest, "the path /.. climbs above the root");
        let v: serde_json::Value = serde_json::from_str(&bad.body()).unwrap();
        assert_eq!(v["status"], 400);
        assert_eq!(v["code"], "shiftgate.bad.request");
        assert_eq!(
            bad.headers(),
            [("ININ-Correlation-Id", bad.correlation_id.clone())]
        );
    }
}
