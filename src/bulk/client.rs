//! The bulk calls' HTTP/1.1 client: the proxy's own requests to an upstream (Pingora's proxy
//! path serves one client request at a time, a bulk call answers many). Idle connections are
//! kept per upstream and reused; https verifies the host against the system's CA roots.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderValue, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::{Limits, Upstream};
use crate::retry::parse_retry_after;

/// Idle connections kept per upstream: a bulk call every 100 ms at 10/s needs a few.
const IDLE_PER_UPSTREAM: usize = 8;

/// Why a bulk call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nothing was sent: safe to try again.
    #[error("connect to {addr} failed: {reason}")]
    Connect { addr: SocketAddr, reason: String },
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("the upstream closed or broke the exchange: {0}")]
    Broken(String),
}

/// An upstream's answer, read whole (a bulk answer is 50 presences at most).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<Duration>,
    pub correlation: Option<String>,
    pub content_type: Option<HeaderValue>,
    pub body: Bytes,
}

#[derive(Default)]
pub struct Client {
    idle: Mutex<HashMap<String, Vec<SendRequest<Full<Bytes>>>>>,
    tls: OnceLock<tokio_rustls::TlsConnector>,
}

impl Client {
    /// `PUT path` to `upstream` at `addr`, with `body` as JSON.
    pub async fn put(
        &self,
        upstream: &Upstream,
        addr: SocketAddr,
        path: &str,
        authorization: Option<&HeaderValue>,
        body: Bytes,
        limits: &Limits,
    ) -> Result<Reply, CallError> {
        let (connect_timeout, timeout) = (limits.connect_timeout, limits.upstream_timeout);
        let pool_key = format!("{}|{addr}", upstream.url);
        let mut sender = match self.take_idle(&pool_key) {
            Some(s) => s,
            None => self.connect(upstream, addr, connect_timeout).await?,
        };
        let mut req = Request::put(path)
            .header(http::header::HOST, upstream.host_header())
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::ACCEPT, "application/json");
        if let Some(auth) = authorization {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        let req = req
            .body(Full::new(body))
            .map_err(|e| CallError::Broken(e.to_string()))?;
        let exchange = async {
            sender
                .ready()
                .await
                .map_err(|e| CallError::Broken(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| CallError::Broken(e.to_string()))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| CallError::Broken(e.to_string()))?
                .to_bytes();
            Ok::<_, CallError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CallError::TimedOut(timeout))??;
        self.give_back(pool_key, sender);
        let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok());
        Ok(Reply {
            status: parts.status.as_u16(),
            retry_after: header("retry-after")
                .and_then(|v| parse_retry_after(v, SystemTime::now())),
            correlation: header("inin-correlation-id").map(str::to_string),
            content_type: parts.headers.get(http::header::CONTENT_TYPE).cloned(),
            body,
        })
    }

    fn take_idle(&self, key: &str) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        while let Some(s) = list.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn give_back(&self, key: String, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_PER_UPSTREAM {
            list.push(sender);
        }
    }

    async fn connect(
        &self,
        upstream: &Upstream,
        addr: SocketAddr,
        timeout: Duration,
    ) -> Result<SendRequest<Full<Bytes>>, CallError> {
        let failed = |reason: String| CallError::Connect { addr, reason };
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| failed(format!("timed out after {timeout:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        if !upstream.tls {
            let (sender, conn) = http1::handshake(TokioIo::new(tcp))
                .await
                .map_err(|e| failed(e.to_string()))?;
            tokio::spawn(conn);
            return Ok(sender);
        }
        let name = rustls_pki_types::ServerName::try_from(upstream.host.clone())
            .map_err(|e| failed(e.to_string()))?;
        let tls = tokio::time::timeout(timeout, self.tls_connector().connect(name, tcp))
            .await
            .map_err(|_| failed(format!("TLS handshake timed out after {timeout:?}")))?
            .map_err(|e| failed(e.to_string()))?;
        let (sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| failed(e.to_string()))?;
        tokio::spawn(conn);
        Ok(sender)
    }

    fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        self.tls
            .get_or_init(|| {
                let mut roots = rustls::RootCertStore::empty();
                match rustls_native_certs::load_native_certs() {
                    Ok(certs) => {
                        let (_, bad) = roots.add_parsable_certificates(certs);
                        if bad > 0 {
                            tracing::debug!("{bad} system CA certificates could not be used");
                        }
                    }
                    Err(e) => tracing::error!("system CA certificates: {e}"),
                }
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .expect("ring supports the default TLS versions")
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                tokio_rustls::TlsConnector::from(Arc::new(config))
            })
            .clone()
    }
}
