//! The load generator's HTTP client: one keep-alive HTTP/1.1 connection per agent, reopened when the server closes it.
//! http, or https with the system's trusted roots (rustls), as a real Genesys org needs.

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

/// Why a target URL was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error(
        "target {target:?} is not a usable URL: {reason} (expected http[s]://host[:port][/base])"
    )]
    Invalid { target: String, reason: String },
}

/// Where the load goes: an `http[s]://host[:port][/base]` URL, parsed once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    original: String,
    /// https: TLS with the system's roots, the host name checked against the certificate.
    tls: bool,
    /// The host as `TcpStream::connect` wants it: an IPv6 literal without its brackets.
    connect_host: String,
    port: u16,
    /// The `Host` header: the authority exactly as the user wrote it.
    authority: HeaderValue,
    /// Empty, or `/base` without a trailing slash, so that `base + "/api/..."` is always right.
    base_path: String,
}

impl Target {
    pub fn parse(target: &str) -> Result<Self, TargetError> {
        let invalid = |reason: &str| TargetError::Invalid {
            target: target.to_string(),
            reason: reason.to_string(),
        };
        let uri: http::Uri = target
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(&e.to_string()))?;
        let tls = match uri.scheme_str() {
            Some(s) if s.eq_ignore_ascii_case("http") => false,
            Some(s) if s.eq_ignore_ascii_case("https") => true,
            Some(s) => return Err(invalid(&format!("scheme {s:?} is not http or https"))),
            None => return Err(invalid("the scheme is missing")),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| invalid("the host is missing"))?;
        if authority.as_str().contains('@') {
            return Err(invalid(
                "user info in the URL is not supported; use --header for credentials",
            ));
        }
        let host = authority.host();
        if host.is_empty() {
            return Err(invalid("the host is missing"));
        }
        if uri.query().is_some() {
            return Err(invalid(
                "a query string has no place in the target; put it in a custom --path",
            ));
        }
        let connect_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let authority_header =
            HeaderValue::from_str(authority.as_str()).map_err(|e| invalid(&e.to_string()))?;
        Ok(Self {
            original: target.to_string(),
            tls,
            connect_host,
            port,
            authority: authority_header,
            base_path: uri.path().trim_end_matches('/').to_string(),
        })
    }

    /// `host:port` as used in error messages.
    pub fn addr(&self) -> String {
        if self.connect_host.contains(':') {
            format!("[{}]:{}", self.connect_host, self.port)
        } else {
            format!("{}:{}", self.connect_host, self.port)
        }
    }

    /// The path prefix every request gets; empty when the target has none.
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    pub fn as_str(&self) -> &str {
        &self.original
    }

    /// Whether requests go over TLS (an https URL).
    pub fn is_tls(&self) -> bool {
        self.tls
    }
}

/// What a connection reads and writes: a TCP stream, or TLS over one.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// One TLS client config for the process: loading the system's roots reads files, once is enough.
fn tls_config() -> Result<Arc<rustls::ClientConfig>, String> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs()
                .map_err(|e| format!("cannot read the system's trusted roots: {e}"))?;
            let (added, _ignored) = roots.add_parsable_certificates(native);
            if added == 0 {
                return Err("the system has no trusted root certificates".to_string());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let mut config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_no_client_auth();
            // This client speaks HTTP/1.1 only.
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Ok(Arc::new(config))
        })
        .clone()
}

impl FromStr for Target {
    type Err = TargetError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.original)
    }
}

/// A failed exchange; the message names the address and the cause, so a record's `error` reads alone.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect to {addr} failed: {source}{hint}", hint = fd_hint(source))]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {reason}")]
    Tls { addr: String, reason: String },
    #[error("HTTP/1.1 handshake with {addr} failed: {source}")]
    Handshake { addr: String, source: hyper::Error },
    #[error("request to {addr} failed: {source}")]
    Request { addr: String, source: hyper::Error },
    #[error("reading the answer from {addr} failed: {source}")]
    Body { addr: String, source: hyper::Error },
    #[error("building the request failed: {0}")]
    Build(#[from] http::Error),
}

/// Thousands of agents need thousands of sockets; the usual 1024 default runs out first, and
/// "Too many open files" alone does not say what to do about it.
fn fd_hint(error: &std::io::Error) -> &'static str {
    const EMFILE: i32 = 24;
    if error.raw_os_error() == Some(EMFILE) {
        " (one socket per agent: raise the open-file limit, e.g. `ulimit -n 65536`)"
    } else {
        ""
    }
}

/// One request, ready to be sent as often as the SDK emulation needs.
#[derive(Debug, Clone)]
pub struct OutgoingRequest {
    pub method: Method,
    /// Origin-form, the target's base path included.
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An answer, its body read to the end so that the connection can carry the next request.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// The connection's driver task; aborting it closes the socket at once instead of when the peer
/// gets around to it, which matters after a timeout left a request half-done.
struct DriverTask(JoinHandle<()>);

impl Drop for DriverTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct Open {
    sender: http1::SendRequest<Full<Bytes>>,
    _driver: DriverTask,
}

/// One agent's connection, like a JMeter thread's: opened lazily, reused while the server keeps
/// it alive, opened again when the server closes it.
pub struct AgentConnection {
    target: Target,
    open: Option<Open>,
    opened: usize,
}

impl AgentConnection {
    pub fn new(target: Target) -> Self {
        Self {
            target,
            open: None,
            opened: 0,
        }
    }

    /// How many TCP connections this agent has opened so far.
    pub fn connections_opened(&self) -> usize {
        self.opened
    }

    /// Drops the connection; the next request opens a fresh one. Called after a timeout or a
    /// transport error, since HTTP/1.1 cannot reuse a connection whose exchange was cut short.
    pub fn reset(&mut self) {
        self.open = None;
    }

    pub async fn send(&mut self, request: &OutgoingRequest) -> Result<Answer, ClientError> {
        let reused = self.ensure_open().await?;
        let http_request = self.build(request)?;
        let sender = &mut self.open.as_mut().expect("ensure_open opened it").sender;
        let response = match sender.try_send_request(http_request).await {
            Ok(response) => response,
            Err(mut failed) => match failed.take_message() {
                // The request never left: the server closed the idle connection between our
                // readiness check and the send. Any client would resend it on a new connection.
                Some(unsent) if reused => {
                    self.reset();
                    self.ensure_open().await?;
                    let sender = &mut self.open.as_mut().expect("just opened").sender;
                    match sender.send_request(unsent).await {
                        Ok(response) => response,
                        Err(source) => return Err(self.fail_request(source)),
                    }
                }
                _ => return Err(self.fail_request(failed.into_error())),
            },
        };
        let (parts, body) = response.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(source) => {
                self.reset();
                return Err(ClientError::Body {
                    addr: self.target.addr(),
                    source,
                });
            }
        };
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    fn fail_request(&mut self, source: hyper::Error) -> ClientError {
        self.reset();
        ClientError::Request {
            addr: self.target.addr(),
            source,
        }
    }

    fn build(&self, request: &OutgoingRequest) -> Result<Request<Full<Bytes>>, ClientError> {
        let mut built = Request::builder()
            .method(request.method.clone())
            .uri(request.path_and_query.as_str())
            .body(Full::new(request.body.clone()))?;
        let headers = built.headers_mut();
        // The low-level connection API adds no Host; an extra `Host` header still wins below.
        headers.insert(http::header::HOST, self.target.authority.clone());
        headers.extend(request.headers.clone());
        Ok(built)
    }

    /// Makes sure a usable connection exists; returns whether it is one reused from before.
    async fn ensure_open(&mut self) -> Result<bool, ClientError> {
        if let Some(open) = self.open.as_mut() {
            // `ready` fails once the server has closed the connection (Connection: close, idle
            // timeout), which is exactly when a new one is due.
            if !open.sender.is_closed() && open.sender.ready().await.is_ok() {
                return Ok(true);
            }
            self.open = None;
        }
        let addr = self.target.addr();
        let stream = TcpStream::connect((self.target.connect_host.as_str(), self.target.port))
            .await
            .map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        // Requests are small and latency is what we measure: Nagle would only add delay.
        let _ = stream.set_nodelay(true);
        let stream: Box<dyn Io> = if self.target.tls {
            let tls_error = |reason: String| ClientError::Tls {
                addr: addr.clone(),
                reason,
            };
            let config = tls_config().map_err(tls_error)?;
            let name = rustls_pki_types::ServerName::try_from(self.target.connect_host.clone())
                .map_err(|e| tls_error(e.to_string()))?;
            let connector = tokio_rustls::TlsConnector::from(config);
            Box::new(
                connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| tls_error(e.to_string()))?,
            )
        } else {
            Box::new(stream)
        };
        let (sender, connection) =
            http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|source| ClientError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
        let driver = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%addr, %error, "load test connection ended with an error");
            }
        });
        self.open = Some(Open {
            sender,
            _driver: DriverTask(driver),
        });
        self.opened += 1;
        Ok(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_target_keeps_its_host_port_and_base_path() {
        let target = Target::parse("http://127.0.0.1:8080/gateway/").unwrap();
        assert_eq!(target.addr(), "127.0.0.1:8080");
        assert_eq!(
            target.base_path(),
            "/gateway",
            "the trailing slash is dropped"
        );
        assert_eq!(target.authority, "127.0.0.1:8080");
        assert_eq!(target.to_string(), "http://127.0.0.1:8080/gateway/");
    }

    #[test]
    fn a_target_without_a_port_means_port_80_and_no_base() {
        let target: Target = "http://localhost".parse().unwrap();
        assert_eq!(target.addr(), "localhost:80");
        assert_eq!(target.base_path(), "");
        assert_eq!(target.authority, "localhost");
    }

    #[test]
    fn an_ipv6_literal_is_connected_to_without_brackets_but_sent_with_them() {
        let target = Target::parse("http://[::1]:9000").unwrap();
        assert_eq!(target.connect_host, "::1");
        assert_eq!(target.addr(), "[::1]:9000");
        assert_eq!(target.authority, "[::1]:9000");
    }

    #[test]
    fn an_https_target_means_tls_on_port_443() {
        let target = Target::parse("https://api.mypurecloud.com").unwrap();
        assert!(target.is_tls());
        assert_eq!(target.addr(), "api.mypurecloud.com:443");
        assert!(!Target::parse("http://localhost").unwrap().is_tls());
    }

    #[test]
    fn running_out_of_file_descriptors_says_how_to_fix_it() {
        let error = ClientError::Connect {
            addr: "127.0.0.1:8080".into(),
            source: std::io::Error::from_raw_os_error(24),
        };
        let message = error.to_string();
        assert!(
            message.starts_with("connect to 127.0.0.1:8080 failed: "),
            "{message}"
        );
        assert!(message.contains("ulimit -n"), "{message}");
        let refused = ClientError::Connect {
            addr: "127.0.0.1:1".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert!(!refused.to_string().contains("ulimit"));
    }

    #[test]
    fn targets_without_a_scheme_or_with_another_scheme_are_refused_by_name() {
        for bad in [
            "127.0.0.1:8080",
            "ftp://127.0.0.1/",
            "/just/a/path",
            "http://u:p@127.0.0.1/",
        ] {
            match Target::parse(bad) {
                Err(TargetError::Invalid { target, .. }) => assert_eq!(target, bad),
                other => panic!("{bad:?} should be invalid, got {other:?}"),
            }
        }
    }
}
