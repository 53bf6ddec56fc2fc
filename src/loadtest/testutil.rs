//! A tiny scriptable hyper server on 127.0.0.1:0 for the load generator's own tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::digest::sha256_hex;

/// A request as the server saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Which TCP connection (0, 1, ...) carried it.
    pub connection: usize,
    pub method: Method,
    pub path: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// What to answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    /// Held back this long before answering.
    pub delay: Duration,
    /// Ask the client to close the connection after this answer.
    pub close: bool,
}

impl Reply {
    pub fn ok() -> Self {
        Self {
            status: 200,
            headers: Vec::new(),
            delay: Duration::ZERO,
            close: false,
        }
    }

    pub fn status(status: u16) -> Self {
        Self {
            status,
            ..Self::ok()
        }
    }

    pub fn header(mut self, name: &'static str, value: impl ToString) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
}

type Behavior = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

pub struct EchoServer {
    pub url: String,
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    accept: JoinHandle<()>,
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl EchoServer {
    /// Answers 200 to everything, echoing the body's SHA-256 like the emulator does.
    pub async fn start() -> Self {
        Self::with(|_| Reply::ok()).await
    }

    /// Answers what `behavior` says; every answer also echoes `X-Emulator-Body-Sha256`.
    pub async fn with(behavior: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behavior: Behavior = Arc::new(behavior);
        let accept = tokio::spawn({
            let connections = Arc::clone(&connections);
            let seen = Arc::clone(&seen);
            async move {
                while let Ok((stream, _)) = listener.accept().await {
                    let connection = connections.fetch_add(1, Ordering::SeqCst);
                    let seen = Arc::clone(&seen);
                    let behavior = Arc::clone(&behavior);
                    tokio::spawn(async move {
                        let service = service_fn(move |request| {
                            answer(
                                request,
                                connection,
                                Arc::clone(&seen),
                                Arc::clone(&behavior),
                            )
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        Self {
            url: format!("http://{addr}"),
            addr,
            connections,
            seen,
            accept,
        }
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().clone()
    }
}

async fn answer(
    request: Request<Incoming>,
    connection: usize,
    seen: Arc<Mutex<Vec<Seen>>>,
    behavior: Behavior,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let request = Seen {
        connection,
        method: parts.method,
        path: parts.uri.to_string(),
        headers: parts.headers,
        body,
    };
    let reply = behavior(&request);
    let digest = sha256_hex(&request.body);
    seen.lock().push(request);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    let mut response = Response::builder()
        .status(reply.status)
        .header("Content-Type", "application/json")
        .header("X-Emulator-Body-Sha256", digest);
    for (name, value) in &reply.headers {
        response = response.header(*name, value);
    }
    if reply.close {
        response = response.header("Connection", "close");
    }
    Ok(response.body(Full::new(Bytes::from_static(b"{}"))).unwrap())
}
