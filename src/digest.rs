//! SHA-256 digests: as lower-case hex (the emulator's `X-Emulator-Body-Sha256` echo, which
//! the load generator and the tests compare with what they sent), and truncated as bucket keys.

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

#[cfg(test)]
mod tests {
    use super::*;

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
