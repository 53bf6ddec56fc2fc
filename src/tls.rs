//! The TLS listener's certificate: a PEM chain and key loaded and checked as one [`CertPair`],
//! and the [`CertResolver`] that hands every handshake the pair in force. A reload swaps the pair
//! whole (one `ArcSwap::store`), so a handshake sees the old pair or the new one, never a mix;
//! a pair that does not load is never stored.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why a certificate pair cannot be served; each names the file to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}")]
    Unreadable { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate (expected -----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path} does not hold a valid certificate chain: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path}: the private key cannot sign: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("the key in {key} does not belong to the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// The file to fix: for a key that is not the certificate's, the key.
    pub fn file(&self) -> &Path {
        match self {
            TlsError::Unreadable { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::BadCertificate { path, .. }
            | TlsError::NoKey { path }
            | TlsError::BadKey { path, .. } => path,
            TlsError::Mismatch { key, .. } => key,
        }
    }
}

/// A certificate chain and the key that signs for it, checked to belong together.
///
/// Equal when both files held the same bytes: a reload that re-reads unchanged files changes
/// nothing. Its `Debug` shows the chain's SHA-256, never the key.
#[derive(Clone)]
pub struct CertPair {
    key: Arc<CertifiedKey>,
    /// SHA-256 of the certificate file's bytes, then of both files' bytes.
    cert_digest: [u8; 32],
    digest: [u8; 32],
}

impl CertPair {
    /// Reads and checks the pair: a PEM chain (leaf first) and a PEM private key that is the
    /// leaf's.
    pub fn load(cert: &Path, key: &Path) -> Result<CertPair, TlsError> {
        let cert_pem = read(cert)?;
        let key_pem = read(key)?;
        let chain = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::BadCertificate {
                path: cert.into(),
                reason: e.to_string(),
            })?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert.into() });
        }
        let der = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| TlsError::NoKey { path: key.into() })?;
        let signer =
            rustls::crypto::ring::sign::any_supported_type(&der).map_err(|e| TlsError::BadKey {
                path: key.into(),
                reason: e.to_string(),
            })?;
        let certified = CertifiedKey::new(chain, signer);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(TlsError::Mismatch {
                    cert: cert.into(),
                    key: key.into(),
                })
            }
            // The leaf does not parse as X.509: a PEM block that is not a certificate.
            Err(e) => {
                return Err(TlsError::BadCertificate {
                    path: cert.into(),
                    reason: e.to_string(),
                })
            }
        }
        Ok(CertPair {
            key: Arc::new(certified),
            cert_digest: sha256(&cert_pem),
            digest: sha256(&[cert_pem, key_pem].concat()),
        })
    }

    /// The leaf certificate, DER-encoded (what a client sees).
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.key.cert[0]
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::Unreadable {
        path: path.into(),
        reason: e.to_string(),
    })
}

fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(data).into()
}

impl PartialEq for CertPair {
    fn eq(&self, other: &CertPair) -> bool {
        self.digest == other.digest
    }
}

impl fmt::Debug for CertPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertPair")
            .field("cert_sha256", &crate::digest::hex(&self.cert_digest))
            .finish_non_exhaustive()
    }
}

/// Serves the pair in force to every handshake, whatever the SNI; [`CertResolver::set`] swaps
/// it without touching the listener.
#[derive(Debug)]
pub struct CertResolver {
    current: ArcSwap<CertifiedKey>,
}

impl CertResolver {
    pub fn new(pair: &CertPair) -> CertResolver {
        CertResolver {
            current: ArcSwap::new(pair.key.clone()),
        }
    }

    /// Puts `pair` in force for the handshakes from now on.
    pub fn set(&self, pair: &CertPair) {
        self.current.store(pair.key.clone());
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed pair for `name`, written as `<name>.crt` and `<name>.key` in `dir`.
    fn write_pair(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let c = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
        let (cert, key) = (
            dir.join(format!("{name}.crt")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&cert, c.cert.pem()).unwrap();
        std::fs::write(&key, c.key_pair.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn a_matching_pair_loads_and_equals_itself_reread() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path(), "a");
        let pair = CertPair::load(&cert, &key).unwrap();
        assert_eq!(pair, CertPair::load(&cert, &key).unwrap());
        let (cert_b, key_b) = write_pair(dir.path(), "b");
        assert_ne!(pair, CertPair::load(&cert_b, &key_b).unwrap());
        let shown = format!("{pair:?}");
        assert!(
            shown.contains("cert_sha256") && !shown.contains("PRIVATE"),
            "{shown}"
        );
    }

    #[test]
    fn a_bad_pair_names_the_file_to_fix() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_a, key_a) = write_pair(dir.path(), "a");
        let (_, key_b) = write_pair(dir.path(), "b");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "not PEM at all\n").unwrap();
        let missing = dir.path().join("missing.key");

        let e = CertPair::load(&cert_a, &key_b).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains("b.key") && e.to_string().contains("a.crt"));
        let e = CertPair::load(&garbage, &key_a).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        assert_eq!(e.file(), garbage);
        let e = CertPair::load(&cert_a, &garbage).unwrap_err();
        assert!(matches!(e, TlsError::NoKey { .. }), "{e}");
        assert_eq!(e.file(), garbage);
        // A key where the chain should be: PEM, but no certificate in it.
        let e = CertPair::load(&key_a, &key_a).unwrap_err();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = CertPair::load(&cert_a, &missing).unwrap_err();
        assert!(e.to_string().starts_with("cannot read "), "{e}");
        assert_eq!(e.file(), missing);
    }
}
