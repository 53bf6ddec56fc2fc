//! The retry policy: given how an attempt ended, retry (after how long) or pass the answer
//! through. Pure: the caller supplies the clock readings and the random draw.

use std::time::{Duration, SystemTime};

use crate::config::{On5xx, RetrySettings};

/// How one upstream attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this status and its Retry-After, if any.
    Status(u16, Option<Duration>),
    /// No connection could be made: nothing was sent.
    ConnectFailed,
    /// Sent, but no answer in time: it may have been acted on.
    TimedOut,
}

/// Everything the decision depends on.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    pub outcome: Outcome,
    /// Attempts made so far, this one included.
    pub made: u32,
    /// Since the request arrived.
    pub elapsed: Duration,
    /// GET, HEAD, PUT, DELETE, OPTIONS.
    pub idempotent: bool,
    /// The body can be sent again (it fit the replay buffer).
    pub replayable: bool,
    /// A uniform draw in [0, 1) for the jitter.
    pub jitter: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The outcome is final (a success, or not a retryable failure).
    Done,
    /// Try again after `delay`; `reason` is the metrics label ("429", "503", "connect").
    Retry {
        delay: Duration,
        reason: &'static str,
    },
    /// Retryable in principle, but not this time: pass the upstream's answer through now.
    GiveUp(GiveUp),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GiveUp {
    #[error("retry.max_attempts ({0}) reached")]
    Exhausted(u32),
    #[error("Retry-After {0:?} exceeds the longest wait worth taking")]
    RetryAfterTooLong(Duration),
    #[error("the retry would start after retry.max_elapsed")]
    Deadline,
    #[error("the body was too large to replay")]
    NotReplayable,
    #[error("retry.on_5xx does not allow re-sending this method")]
    NotIdempotent,
}

/// Longest backoff between two attempts when the upstream gives no Retry-After.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub fn decide(s: &RetrySettings, a: &Attempt) -> Verdict {
    let (reason, retry_after) = match a.outcome {
        Outcome::Status(429, ra) => ("429", ra),
        Outcome::Status(st @ 502..=504, ra) => {
            let allowed = match s.on_5xx {
                On5xx::Always => true,
                On5xx::Idempotent => a.idempotent,
                On5xx::Never => false,
            };
            if !allowed {
                return Verdict::GiveUp(GiveUp::NotIdempotent);
            }
            (status_label(st), ra)
        }
        Outcome::Status(..) => return Verdict::Done,
        Outcome::ConnectFailed => ("connect", None),
        Outcome::TimedOut => {
            if !(a.idempotent && s.on_5xx != On5xx::Never || s.on_5xx == On5xx::Always) {
                return Verdict::GiveUp(GiveUp::NotIdempotent);
            }
            ("timeout", None)
        }
    };
    if a.made >= s.max_attempts {
        return Verdict::GiveUp(GiveUp::Exhausted(s.max_attempts));
    }
    if let Some(ra) = retry_after {
        if ra > s.max_retry_after {
            return Verdict::GiveUp(GiveUp::RetryAfterTooLong(ra));
        }
    }
    // Nothing was sent on a failed connect, so there is nothing to replay.
    if a.outcome != Outcome::ConnectFailed && !a.replayable {
        return Verdict::GiveUp(GiveUp::NotReplayable);
    }
    let delay = retry_after.unwrap_or_else(|| backoff(s.backoff_base, a.made, a.jitter));
    if a.elapsed + delay > s.max_elapsed {
        return Verdict::GiveUp(GiveUp::Deadline);
    }
    Verdict::Retry { delay, reason }
}

/// Whether `retry.on_5xx: idempotent` may send a request of this method again: GET, HEAD, PUT,
/// DELETE, OPTIONS.
pub fn is_idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::PUT
            | http::Method::DELETE
            | http::Method::OPTIONS
    )
}

/// Exponential backoff with full jitter: uniform in `[0, base·2^(made−1)]`, capped.
///
/// ```
/// use std::time::Duration;
/// use shiftgate::retry::backoff;
/// let base = Duration::from_secs(1);
/// assert_eq!(backoff(base, 1, 0.5), Duration::from_millis(500));
/// assert_eq!(backoff(base, 3, 0.5), Duration::from_secs(2));
/// assert_eq!(backoff(base, 30, 0.999), Duration::from_secs_f64(29.97));
/// ```
pub fn backoff(base: Duration, made: u32, jitter: f64) -> Duration {
    let exp = base.saturating_mul(1u32 << made.saturating_sub(1).min(20));
    exp.min(MAX_BACKOFF).mul_f64(jitter.clamp(0.0, 1.0))
}

pub fn status_label(status: u16) -> &'static str {
    match status {
        429 => "429",
        502 => "502",
        503 => "503",
        504 => "504",
        _ => "other",
    }
}

/// Parses a `Retry-After` value: whole seconds or an HTTP date.
///
/// ```
/// use std::time::{Duration, SystemTime, UNIX_EPOCH};
/// use shiftgate::retry::parse_retry_after;
/// let now = UNIX_EPOCH + Duration::from_secs(784_111_770);
/// assert_eq!(parse_retry_after("42", now), Some(Duration::from_secs(42)));
/// assert_eq!(parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT", now), Some(Duration::from_secs(7)));
/// assert_eq!(parse_retry_after("soon", now), None);
/// assert_eq!(parse_retry_after("+5", now), None);
/// ```
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    // delay-seconds is 1*DIGIT (RFC 9110 §10.2.3); `u64::from_str` alone would also take `+5`.
    if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        return v.parse::<u64>().ok().map(Duration::from_secs);
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The documented defaults.
    pub(crate) fn settings() -> RetrySettings {
        RetrySettings {
            max_attempts: 5,
            max_elapsed: Duration::from_secs(60),
            on_5xx: On5xx::Idempotent,
            max_retry_after: Duration::from_secs(180),
            backoff_base: Duration::from_secs(1),
        }
    }

    fn attempt(outcome: Outcome) -> Attempt {
        Attempt {
            outcome,
            made: 1,
            elapsed: Duration::ZERO,
            idempotent: false,
            replayable: true,
            jitter: 0.5,
        }
    }

    #[test]
    fn a_429_is_retried_whatever_the_method_after_its_retry_after() {
        let v = decide(
            &settings(),
            &attempt(Outcome::Status(429, Some(Duration::from_secs(3)))),
        );
        assert_eq!(
            v,
            Verdict::Retry {
                delay: Duration::from_secs(3),
                reason: "429"
            }
        );
    }

    #[test]
    fn a_429_without_retry_after_backs_off_with_jitter() {
        let v = decide(&settings(), &attempt(Outcome::Status(429, None)));
        assert_eq!(
            v,
            Verdict::Retry {
                delay: Duration::from_millis(500),
                reason: "429"
            }
        );
    }

    #[test]
    fn giving_up_is_decided_before_waiting() {
        let s = settings();
        let mut a = attempt(Outcome::Status(429, Some(Duration::from_secs(3))));
        a.made = 5;
        assert_eq!(decide(&s, &a), Verdict::GiveUp(GiveUp::Exhausted(5)));
        a.made = 1;
        a.elapsed = Duration::from_secs(58);
        assert_eq!(decide(&s, &a), Verdict::GiveUp(GiveUp::Deadline));
        let daily = attempt(Outcome::Status(429, Some(Duration::from_secs(3600))));
        assert!(matches!(
            decide(&s, &daily),
            Verdict::GiveUp(GiveUp::RetryAfterTooLong(_))
        ));
        let mut big = attempt(Outcome::Status(429, None));
        big.replayable = false;
        assert_eq!(decide(&s, &big), Verdict::GiveUp(GiveUp::NotReplayable));
    }

    #[test]
    fn a_5xx_is_retried_only_for_idempotent_methods_by_default() {
        let mut s = settings();
        let patch = attempt(Outcome::Status(503, None));
        assert_eq!(decide(&s, &patch), Verdict::GiveUp(GiveUp::NotIdempotent));
        let mut put = patch;
        put.idempotent = true;
        assert!(matches!(
            decide(&s, &put),
            Verdict::Retry { reason: "503", .. }
        ));
        s.on_5xx = On5xx::Always;
        assert!(matches!(
            decide(&s, &patch),
            Verdict::Retry { reason: "503", .. }
        ));
        s.on_5xx = On5xx::Never;
        assert_eq!(decide(&s, &put), Verdict::GiveUp(GiveUp::NotIdempotent));
    }

    #[test]
    fn a_failed_connect_is_always_retried_nothing_was_sent() {
        let mut a = attempt(Outcome::ConnectFailed);
        a.replayable = false;
        assert!(matches!(
            decide(&settings(), &a),
            Verdict::Retry {
                reason: "connect",
                ..
            }
        ));
    }

    #[test]
    fn other_statuses_are_final() {
        assert_eq!(
            decide(&settings(), &attempt(Outcome::Status(200, None))),
            Verdict::Done
        );
        assert_eq!(
            decide(&settings(), &attempt(Outcome::Status(500, None))),
            Verdict::Done
        );
    }

    mod parsing_retry_after {
        //! `parse_retry_after` on arbitrary input. 256 cases each (proptest's default, which,
        //! unlike `ProptestConfig::with_cases`, `PROPTEST_CASES` overrides). A long run:
        //! `PROPTEST_CASES=100000 cargo test --lib retry::tests::parsing_retry_after`.

        use std::time::UNIX_EPOCH;

        use proptest::prelude::*;

        use super::super::parse_retry_after;
        use super::*;

        /// Any instant from 1970 to 2200, to the second.
        fn instant() -> impl Strategy<Value = SystemTime> {
            (0u64..7_258_118_400).prop_map(|s| UNIX_EPOCH + Duration::from_secs(s))
        }

        /// Input that comes close to what parses: digits with signs, points and spaces around
        /// them, dates a little wrong, and anything at all.
        fn value() -> impl Strategy<Value = String> {
            prop_oneof![
                "[ \t]{0,2}[+-]?[0-9]{0,25}([.,e][0-9]{0,3})?[ \t]{0,2}",
                "(Mon|Sun), [0-9]{1,2} (Jan|Nov) [0-9]{4} [0-9]{2}:[0-9]{2}:[0-9]{2} (GMT|UTC)",
                "\\PC{0,40}",
                any::<Vec<u8>>().prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            ]
        }

        proptest! {
            #[test]
            fn whole_seconds_parse_to_exactly_that(
                secs in any::<u64>(),
                lead in "[ \t]{0,3}",
                trail in "[ \t]{0,3}",
                zeros in "0{0,3}",
                now in instant(),
            ) {
                let v = format!("{lead}{zeros}{secs}{trail}");
                prop_assert_eq!(parse_retry_after(&v, now), Some(Duration::from_secs(secs)));
            }

            #[test]
            fn a_date_is_the_time_left_until_it(at in instant(), now in instant()) {
                let v = httpdate::fmt_http_date(at);
                let left = at.duration_since(now).unwrap_or(Duration::ZERO);
                prop_assert_eq!(parse_retry_after(&v, now), Some(left));
            }

            /// Never panics; anything but whole seconds is `None` or an HTTP date.
            #[test]
            fn anything_else_is_none_or_a_date(v in value(), now in instant()) {
                let got = parse_retry_after(&v, now);
                let t = v.trim();
                let whole = !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
                if let (Some(d), false) = (got, whole) {
                    let at = httpdate::parse_http_date(t);
                    prop_assert!(at.is_ok(), "{:?} gave {:?}: not seconds, not a date", v, d);
                    prop_assert_eq!(d, at.unwrap().duration_since(now).unwrap_or(Duration::ZERO));
                }
            }
        }
    }
}
