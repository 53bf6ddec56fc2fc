//! What a request head must be before it is routed: a bounded size. Pingora accepts a head up
//! to 1 MiB; an API's proxy has no use for more than a few KiB. (Framing is Pingora's: it
//! refuses two different `Content-Length`s with 400 and, given `Content-Length` with
//! `Transfer-Encoding`, drops the length, frames by chunks and closes the connection after, as
//! RFC 9112 §6.1 and §6.3 ask of an intermediary.)

use http::{HeaderMap, Uri};

use crate::local_response::{LocalResponse, Reason};

/// The most bytes a request head may take: the request line's target and every header line.
/// An SDK sends under 2 KiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The proxy's answer to a head it will not route, if it is one.
pub fn check_head(uri: &Uri, headers: &HeaderMap) -> Option<LocalResponse> {
    // The target as it came (origin-form: its path and query; absolute-form: all of it).
    let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    let size = target
        + headers
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    (size > MAX_HEAD_BYTES).then(|| {
        let msg =
            format!("the request head takes {size} bytes, more than the {MAX_HEAD_BYTES} allowed");
        LocalResponse::new(Reason::HeaderTooLarge, msg)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, value: &str) -> Option<Reason> {
        let mut h = HeaderMap::new();
        h.insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            value.parse().unwrap(),
        );
        check_head(&"/api/v2/x".parse().unwrap(), &h).map(|a| a.reason)
    }

    #[test]
    fn a_head_over_the_bound_is_too_large_and_one_at_it_is_not() {
        assert_eq!(check("content-length", "5"), None);
        let uri_len = "/api/v2/x".len();
        let fits = "a".repeat(MAX_HEAD_BYTES - uri_len - "x-big".len() - 4);
        assert_eq!(check("x-big", &fits), None);
        assert_eq!(
            check("x-big", &format!("{fits}a")),
            Some(Reason::HeaderTooLarge)
        );
    }
}
