//! SHA-256 digests: as lower-case hex (the emulator's `X-Emulator-Body-Sha256` echo, which
//! the load generator and the tests compare with what they sent), and truncated as bucket keys;
//! a `per: token` key is one per credential, however its `Authorization` header is spelled.

use std::borrow::Cow;
use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

/// `bytes` as lower-case hex, two digits per byte.
///
/// ```
/// assert_eq!(shiftgate::digest::hex(&[0x00, 0x0f, 0xab, 0xff]), "000fabff");
/// assert_eq!(shiftgate::digest::hex(&[]), "");
/// ```
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            // Writing to a String cannot fail.
            let _ = write!(s, "{b:02x}");
            s
        })
}

/// The SHA-256 of `data` as 64 lower-case hex digits.
///
/// ```
/// use shiftgate::digest::sha256_hex;
/// assert_eq!(
///     sha256_hex(b"abc"),
///     "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
/// );
/// ```
pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

/// A bucket key from a secret such as a bearer token: SHA-256, truncated to 16 bytes. Only the
/// hash is kept; it is the same on every replica (cluster mode shares buckets by it).
pub fn key_hash(value: &[u8]) -> [u8; 16] {
    let digest = Sha256::digest(value);
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The bucket key of `per: token`: the hash of [`credential`].
pub fn token_key(authorization: &[u8]) -> [u8; 16] {
    key_hash(&credential(authorization))
}

/// What a `per: token` key is made from: the `Authorization` header's credential, so that every
/// spelling of one credential is one bucket. The scheme is matched case-insensitively and white
/// space around the value and between scheme and credential is ignored: `Bearer x`, `bearer  x`
/// and `\tBEARER\tx ` are all `Bearer x`. The credential itself is kept byte for byte (tokens
/// are case-sensitive).
///
/// The scheme is written with its first letter upper-case and the rest lower-case, the spelling
/// the SDKs send, so `Bearer x` keeps the key it had before spellings were merged: replicas of
/// a cluster that are upgraded one by one keep sharing that token's bucket.
///
/// Distinct credentials never share a key: a header with no space inside is taken whole (no
/// scheme to fold; `abc` and `ABC` stay two keys) and contains no space, while every other key
/// is `scheme SP credential` with no space in the scheme. No header at all is the empty key,
/// one bucket for every request without a credential.
///
/// ```
/// use shiftgate::digest::credential;
/// assert_eq!(&*credential(b"bearer  x"), b"Bearer x");
/// assert_eq!(&*credential(b" BEARER\tx "), b"Bearer x");
/// assert_ne!(credential(b"Bearer x"), credential(b"Bearer X"));
/// ```
pub fn credential(authorization: &[u8]) -> Cow<'_, [u8]> {
    let value = trim_space(authorization);
    let Some(end) = value.iter().position(|&b| is_space(b)) else {
        return Cow::Borrowed(value);
    };
    let (scheme, rest) = value.split_at(end);
    let token = trim_space(rest);
    let title = |(i, &b): (usize, &u8)| {
        if i == 0 {
            b.to_ascii_uppercase()
        } else {
            b.to_ascii_lowercase()
        }
    };
    let folded = rest.len() == token.len() + 1
        && rest[0] == b' '
        && scheme.iter().enumerate().all(|(i, b)| title((i, b)) == *b);
    if folded {
        // `Bearer x` as the SDKs send it: nothing to copy.
        return Cow::Borrowed(value);
    }
    let mut key = Vec::with_capacity(scheme.len() + 1 + token.len());
    key.extend(scheme.iter().enumerate().map(title));
    key.push(b' ');
    key.extend_from_slice(token);
    Cow::Owned(key)
}

/// The optional white space of HTTP (RFC 9110 §5.6.3): space and horizontal tab.
fn is_space(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

fn trim_space(mut s: &[u8]) -> &[u8] {
    while let [first, rest @ ..] = s {
        if !is_space(*first) {
            break;
        }
        s = rest;
    }
    while let [rest @ .., last] = s {
        if !is_space(*last) {
            break;
        }
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_spelling_of_a_scheme_is_one_key() {
        for spelled in [
            &b"Bearer x"[..],
            b"bearer x",
            b"BEARER x",
            b"bEaReR x",
            b"Bearer  x",
            b"bearer  x",
            b" Bearer x",
            b"Bearer x ",
            b"\tBearer\t\tx\t",
        ] {
            assert_eq!(
                &*credential(spelled),
                b"Bearer x",
                "{}",
                String::from_utf8_lossy(spelled)
            );
            assert_eq!(token_key(spelled), key_hash(b"Bearer x"));
        }
        assert_eq!(&*credential(b"basic dTpw"), b"Basic dTpw");
    }

    #[test]
    fn the_credential_is_kept_byte_for_byte() {
        assert_ne!(token_key(b"Bearer x"), token_key(b"Bearer X"));
        assert_ne!(token_key(b"Bearer x"), token_key(b"Basic x"));
        assert_ne!(token_key(b"Bearer x"), token_key(b"x"));
        // Space inside a credential (a Digest header's parameters) is part of it.
        assert_ne!(
            credential(b"Digest a=1, b=2"),
            credential(b"Digest a=1,  b=2")
        );
        // Without a scheme nothing is folded.
        assert_eq!(&*credential(b" AbC "), b"AbC");
        assert_ne!(token_key(b"abc"), token_key(b"ABC"));
    }

    #[test]
    fn no_header_is_the_empty_key_and_the_usual_spelling_is_not_copied() {
        assert_eq!(&*credential(b""), b"");
        assert_eq!(&*credential(b" \t "), b"");
        assert!(matches!(credential(b"Bearer abc.def"), Cow::Borrowed(_)));
        assert!(matches!(credential(b"bearer abc.def"), Cow::Owned(_)));
    }

    /// An auth scheme (RFC 9110 token) and a credential (a bearer token's characters, or
    /// anything without white space at its ends).
    fn scheme() -> impl Strategy<Value = String> {
        "[A-Za-z][A-Za-z0-9!#$%&'*+.^_`|~-]{0,11}"
    }
    fn token() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            "[A-Za-z0-9._~+/-]{1,40}=*".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 1..40)
                .prop_filter("no white space at the ends", |t| {
                    !is_space(t[0]) && !is_space(t[t.len() - 1])
                }),
        ]
    }
    fn space(min: usize) -> impl Strategy<Value = Vec<u8>> {
        prop::collection::vec(prop::sample::select(vec![b' ', b'\t']), min..4)
    }

    fn header(lead: &[u8], scheme: &[u8], sep: &[u8], token: &[u8], trail: &[u8]) -> Vec<u8> {
        [lead, scheme, sep, token, trail].concat()
    }

    // 256 cases each (proptest's default, which, unlike `ProptestConfig::with_cases`,
    // `PROPTEST_CASES` overrides). A long run: `PROPTEST_CASES=100000 cargo test --lib digest`.
    proptest! {
        #[test]
        fn any_casing_and_spacing_of_the_scheme_gives_one_key(
            scheme in scheme(),
            upper in prop::collection::vec(any::<bool>(), 12),
            token in token(),
            (lead, sep, trail) in (space(0), space(1), space(0)),
        ) {
            let recased: Vec<u8> = scheme
                .bytes()
                .zip(&upper)
                .map(|(b, &up)| if up { b.to_ascii_uppercase() } else { b.to_ascii_lowercase() })
                .collect();
            let plain = header(b"", scheme.as_bytes(), b" ", &token, b"");
            let spelled = header(&lead, &recased, &sep, &token, &trail);
            prop_assert_eq!(credential(&spelled), credential(&plain));
            prop_assert_eq!(token_key(&spelled), token_key(&plain));
        }

        #[test]
        fn different_credentials_give_different_keys(
            (s1, s2) in (scheme(), scheme()),
            (t1, t2) in (token(), token()),
            (sep1, sep2) in (space(1), space(1)),
        ) {
            prop_assume!(!s1.eq_ignore_ascii_case(&s2) || t1 != t2);
            let h1 = header(b"", s1.as_bytes(), &sep1, &t1, b"");
            let h2 = header(b"", s2.as_bytes(), &sep2, &t2, b"");
            prop_assert_ne!(credential(&h1), credential(&h2));
            prop_assert_ne!(token_key(&h1), token_key(&h2));
            // A header without a scheme is not confused with one that has one.
            prop_assert_ne!(credential(&t1), credential(&h1));
        }
    }

    #[test]
    fn sha256_hex_is_lower_case_hex() {
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
