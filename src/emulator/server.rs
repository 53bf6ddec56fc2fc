//! The HTTP/1.1 side: accepting connections, reading bodies, writing answers (cut short for a
//! `reset` fault) with Genesys's header spelling, and stopping.

use std::convert::Infallible;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderValue, Request, Response};
use http_body_util::{BodyExt as _, Empty};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Sleep;

use super::api::{ApiRequest, ApiState, RequestBody};
use crate::digest::hex;

/// How long open connections may finish their answers after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// A body over the limit is still read (and hashed) up to this much more, so the connection can
/// be kept; beyond it the emulator stops reading and closes.
const DRAIN_LIMIT: u64 = 16 * 1024 * 1024;
/// A `reset` fault waits this long after the partial body so it is flushed before the close.
const RESET_PAUSE: Duration = Duration::from_millis(20);

/// Header spellings Genesys uses that title case would get wrong (`Inin-Correlation-Id`).
///
/// hyper writes a response's header names from a private map it puts into a request's
/// extensions when `preserve_header_case` is on, and offers no other way to set them. So one
/// template request with the wanted spellings is parsed once, and its extensions are attached
/// to every response. Without the template, title case still spells `Retry-After` right.
const HEADER_CASE_TEMPLATE: &[u8] = b"GET / HTTP/1.1\r\n\
Host: emulator\r\n\
ININ-Correlation-Id: x\r\n\
Retry-After: 1\r\n\
Content-Type: x\r\n\
X-Emulator-Body-Sha256: x\r\n\
X-Emulator-Host: x\r\n\
Connection: close\r\n\r\n";

pub(crate) async fn header_case_template() -> Option<Extensions> {
    let (mut client, server) = tokio::io::duplex(4096);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = parking_lot::Mutex::new(Some(tx));
    let service = service_fn(move |req: Request<Incoming>| {
        if let Some(tx) = tx.lock().take() {
            let _ = tx.send(req.extensions().clone());
        }
        async { Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new())) }
    });
    let connection = tokio::spawn(
        http1::Builder::new()
            .preserve_header_case(true)
            .serve_connection(TokioIo::new(server), service),
    );
    client.write_all(HEADER_CASE_TEMPLATE).await.ok()?;
    let extensions = tokio::time::timeout(Duration::from_secs(2), rx)
        .await
        .ok()?
        .ok();
    connection.abort();
    if extensions.is_none() {
        tracing::warn!("emulator: header spelling template failed; using title case");
    }
    extensions
}

/// Accepts until `shutdown` turns true, then lets open connections finish for a moment.
pub(crate) async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
    header_case: Option<Arc<Extensions>>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(
                        stream,
                        state.clone(),
                        header_case.clone(),
                        shutdown.clone(),
                    ));
                }
                Err(e) => {
                    // Usually out of file descriptors: wait instead of spinning.
                    tracing::warn!(error = %e, "emulator: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        connections.shutdown().await;
    }
}

/// Resolves once shutdown began (or the emulator is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // The guard wait_for returns is not Send; drop it here, before any later await.
    let _ = shutdown.wait_for(|&stop| stop).await;
}

async fn serve_connection(
    stream: TcpStream,
    state: Arc<ApiState>,
    header_case: Option<Arc<Extensions>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req: Request<Incoming>| {
        let state = state.clone();
        let header_case = header_case.clone();
        async move { Ok::<_, Infallible>(respond(&state, req, header_case.as_deref()).await) }
    });
    let connection = http1::Builder::new()
        .title_case_headers(true)
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "emulator: connection ended with an error");
            }
        }
        _ = stopped(&mut shutdown) => {
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}

async fn respond(
    state: &ApiState,
    req: Request<Incoming>,
    header_case: Option<&Extensions>,
) -> Response<EmuBody> {
    let (parts, body) = req.into_parts();
    let (body, body_sha256) = read_body(body, state.max_body_bytes()).await;
    let request = ApiRequest {
        path: parts.uri.path().to_string(),
        query: parts.uri.query().unwrap_or_default().to_string(),
        method: parts.method,
        headers: parts.headers,
        body,
        body_sha256,
    };
    let reply = state.handle(request).await;
    let (mut parts, bytes) = reply.response.into_parts();
    if let Some(extensions) = header_case {
        parts.extensions = extensions.clone();
    }
    let body = if reply.reset {
        let total = bytes.len() as u64;
        parts
            .headers
            .insert(http::header::CONTENT_LENGTH, HeaderValue::from(total));
        EmuBody::Cut {
            part: Some(bytes.slice(..bytes.len() / 2)),
            pause: Box::pin(tokio::time::sleep(RESET_PAUSE)),
            total,
        }
    } else {
        EmuBody::Full(Some(bytes))
    };
    Response::from_parts(parts, body)
}

/// Reads the whole body, hashing every byte and keeping at most `max` of them.
async fn read_body(mut body: Incoming, max: usize) -> (RequestBody, Option<String>) {
    let max = max as u64;
    let mut hasher = Sha256::new();
    let mut received: u64 = 0;
    // Most bodies arrive in one frame; keep it as is rather than copying it.
    let mut first: Option<Bytes> = None;
    let mut joined: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (RequestBody::Unreadable, None);
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        received += data.len() as u64;
        hasher.update(&data);
        if received > max {
            first = None;
            joined = Vec::new();
            if received > max + DRAIN_LIMIT {
                return (RequestBody::TooLarge { received }, None);
            }
            continue;
        }
        match first.take() {
            None if joined.is_empty() => first = Some(data),
            earlier => {
                if let Some(earlier) = earlier {
                    joined.extend_from_slice(&earlier);
                }
                joined.extend_from_slice(&data);
            }
        }
    }
    let sha = Some(hex(&hasher.finalize()));
    if received > max {
        return (RequestBody::TooLarge { received }, sha);
    }
    let bytes = first.unwrap_or_else(|| Bytes::from(joined));
    (RequestBody::Complete(bytes), sha)
}

/// A response body: whole, or (for a `reset` fault) announced whole but cut after `part`.
pub(crate) enum EmuBody {
    Full(Option<Bytes>),
    Cut {
        part: Option<Bytes>,
        pause: Pin<Box<Sleep>>,
        total: u64,
    },
}

impl Body for EmuBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            EmuBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            EmuBody::Cut { part, pause, .. } => {
                if let Some(part) = part.take() {
                    return Poll::Ready(Some(Ok(Frame::data(part))));
                }
                // Pending here lets hyper flush the head and the partial body first.
                ready!(pause.as_mut().poll(cx));
                Poll::Ready(Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionReset,
                    "emulator reset fault: connection dropped mid-response",
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, EmuBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            EmuBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            EmuBody::Full(None) => SizeHint::with_exact(0),
            EmuBody::Cut { total, .. } => SizeHint::with_exact(*total),
        }
    }
}
