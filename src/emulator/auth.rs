//! Credentials on the wire: `Authorization` headers, the token request's form body, new tokens.

use http::HeaderMap;
use rand::distr::{Alphanumeric, SampleString as _};

/// The bearer token of an `Authorization: Bearer <token>` header, if non-empty.
pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The `(id, secret)` of an `Authorization: Basic base64(id:secret)` header.
pub(crate) fn basic(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(encoded.trim())?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    (!id.is_empty()).then(|| (id.to_string(), secret.to_string()))
}

/// Standard-alphabet base64, padding optional. Written here because a Basic header is the only
/// base64 the emulator reads, and it is not worth a dependency.
fn base64_decode(input: &str) -> Option<Vec<u8>> {
    fn sextet(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let data = input.trim_end_matches('=').as_bytes();
    if input.len() - data.len() > 2 || data.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(data.len() * 3 / 4);
    for chunk in data.chunks(4) {
        let mut acc = 0u32;
        for &c in chunk {
            acc = (acc << 6) | sextet(c)?;
        }
        // A short final chunk holds 2 or 3 sextets: 1 or 2 bytes, left-aligned.
        acc <<= 6 * (4 - chunk.len() as u32);
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

/// The value of `key` in an `application/x-www-form-urlencoded` body.
pub(crate) fn form_value(body: &[u8], key: &str) -> Option<String> {
    let body = std::str::from_utf8(body).ok()?;
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(k)? == key)
            .then(|| percent_decode(v))
            .flatten()
    })
}

fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let hi = (bytes.next()? as char).to_digit(16)?;
                let lo = (bytes.next()? as char).to_digit(16)?;
                out.push((hi * 16 + lo) as u8);
            }
            _ => out.push(b),
        }
    }
    String::from_utf8(out).ok()
}

/// A fresh access token, about as long as Genesys's.
pub(crate) fn new_token() -> String {
    Alphanumeric.sample_string(&mut rand::rng(), 86)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn auth(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn base64_decodes_with_and_without_padding() {
        assert_eq!(base64_decode("aWQ6c2VjcmV0").unwrap(), b"id:secret");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
        assert_eq!(base64_decode("YWI").unwrap(), b"ab");
        assert_eq!(base64_decode("").unwrap(), b"");
        assert!(
            base64_decode("Y").is_none(),
            "one sextet cannot hold a byte"
        );
        assert!(base64_decode("a*bc").is_none());
    }

    #[test]
    fn basic_credentials_split_at_the_first_colon() {
        // base64("client:se:cret")
        assert_eq!(
            basic(&auth("Basic Y2xpZW50OnNlOmNyZXQ=")),
            Some(("client".into(), "se:cret".into()))
        );
        assert_eq!(basic(&auth("Bearer Y2xpZW50OnNlY3JldA==")), None);
        assert_eq!(basic(&auth("Basic !!!")), None);
        assert_eq!(basic(&HeaderMap::new()), None);
    }

    #[test]
    fn bearer_needs_a_non_empty_token() {
        assert_eq!(bearer(&auth("Bearer abc")), Some("abc"));
        assert_eq!(bearer(&auth("bearer abc")), Some("abc"));
        assert_eq!(bearer(&auth("Bearer ")), None);
        assert_eq!(bearer(&auth("Basic abc")), None);
    }

    #[test]
    fn form_values_are_percent_decoded() {
        assert_eq!(
            form_value(b"a=1&grant_type=client_credentials", "grant_type").as_deref(),
            Some("client_credentials")
        );
        assert_eq!(
            form_value(b"grant%5Ftype=x+y%21", "grant_type").as_deref(),
            Some("x y!")
        );
        assert_eq!(form_value(b"grant_type=%zz", "grant_type"), None);
        assert_eq!(form_value(b"", "grant_type"), None);
    }

    #[test]
    fn new_tokens_differ() {
        let (a, b) = (new_token(), new_token());
        assert_eq!(a.len(), 86);
        assert_ne!(a, b);
    }
}
