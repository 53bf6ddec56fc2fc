//! SHA-256 digests as the project writes them: lower-case hex.

use sha2::{Digest, Sha256};

/// Bytes as lower-case hex.
///
/// ```
/// assert_eq!(shiftgate::digest::hex(&[0x0a, 0xff]), "0aff");
/// ```
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// SHA-256 of `data`, in lower-case hex.
///
/// ```
/// assert_eq!(
///     shiftgate::digest::sha256_hex(b"abc"),
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
