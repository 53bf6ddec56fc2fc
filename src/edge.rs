//! The client edge: every accepted client connection, plain or TLS, passes here on its way to
//! Pingora's HTTP handling, which bounds neither how many there are nor how long one may sit
//! idle or take to send a request head. Kept here: at most `limits.max_connections` open (past
//! it: `503 shiftgate.overloaded`, then closed), every request head complete within
//! `limits.client_header_timeout`, no keep-alive connection idle past `limits.client_idle_timeout`.
//!
//! Pingora (0.9.1) applies its downstream timeouts per read, never per head, and none at all
//! between the requests of an HTTP/1.1 keep-alive connection, so a client trickling a byte at a
//! time, or one that never sends its next request, keeps its connection forever. The timers are
//! therefore on the connection's reads ([`Deadlined`]), and the keep-alive loop that Pingora
//! runs for an `HttpServerApp` runs here instead ([`Edge::serve_http1`]), so that the point
//! between two requests, where the idle timer starts, is known exactly.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpServerApp, ServerApp};
use pingora::protocols::http::ServerSession;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::Sleep;

use crate::config::Limits;
use crate::local_response::{LocalResponse, Reason};
use crate::metrics::{GaugeGuard, LISTENERS, NO_ROUTE_LABEL};
use crate::state::State;

/// `Retry-After` of `503 shiftgate.overloaded`: connections come and go within seconds.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a refused connection is read (and what is read dropped) before its answer, for its
/// request's head, and after it: closing a socket with unread bytes sends a reset, which can
/// destroy the answer before the client reads it. Bounded, so refused connections cannot pile
/// up.
const REFUSED_LINGER: Duration = Duration::from_secs(1);
const REFUSED_LINGER_BYTES: usize = 64 * 1024;

/// At most one log line per this long about refused connections: a flood must not flood the log.
const REFUSED_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Pingora's HTTP app (`A`) behind the connection cap and the head and idle timers.
pub struct Edge<A> {
    app: Arc<A>,
    state: Arc<State>,
    /// Client connections open now, both listeners together.
    open: AtomicUsize,
    refused: Mutex<Refused>,
}

impl<A: HttpServerApp + Send + Sync + 'static> Edge<A> {
    pub fn new(app: A, state: Arc<State>) -> Edge<A> {
        Edge {
            app: Arc::new(app),
            state,
            open: AtomicUsize::new(0),
            refused: Mutex::new(Refused::default()),
        }
    }

    /// A place among the connections open, or `None` when `cap` are open already.
    fn take_slot(&self, listener: &'static str, cap: usize) -> Option<Slot<'_>> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        let gauge = self
            .state
            .metrics()
            .connections
            .with_label_values(&[listener]);
        Some(Slot {
            open: &self.open,
            _gauge: GaugeGuard::new(gauge),
        })
    }

    /// Pingora's keep-alive loop for HTTP/1 (`impl ServerApp for HttpServerApp`, 0.9.1), with the
    /// idle timer started each time a request is done.
    async fn serve_http1(&self, stream: Stream, next: &NextRequest, shutdown: &ShutdownWatch) {
        let mut session = ServerSession::new_http1(stream);
        if *shutdown.borrow() {
            session.set_keepalive(None);
        } else {
            session.set_keepalive(Some(60));
        }
        session.set_keepalive_reuses_remaining(
            self.app
                .server_options()
                .and_then(|o| o.keepalive_request_limit),
        );
        let mut reused = self.app.process_new_http(session, shutdown).await;
        while let Some((stream, settings)) = reused.map(|r| r.consume()) {
            // Read now, so that a reload applies from the next request on.
            next.set(Timeouts::from(&self.state.config().limits));
            let mut session = ServerSession::new_http1(stream);
            if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            reused = self.app.process_new_http(session, shutdown).await;
        }
    }

    fn count_refused(&self, listener: &'static str, cap: usize) {
        self.state
            .metrics()
            .rejections_total
            .with_label_values(&[NO_ROUTE_LABEL, Reason::Overloaded.label()])
            .inc();
        let mut refused = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        refused.since_logged += 1;
        if refused
            .logged_at
            .is_none_or(|t| t.elapsed() >= REFUSED_LOG_INTERVAL)
        {
            tracing::warn!(
                refused = refused.since_logged,
                listener,
                "{cap} client connections open (limits.max_connections): answering new ones 503"
            );
            refused.since_logged = 0;
            refused.logged_at = Some(Instant::now());
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for Edge<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let [plain, tls] = LISTENERS;
        let listener = if stream.get_ssl_digest().is_some() {
            tls
        } else {
            plain
        };
        let limits = self.state.config().limits.clone();
        let cap = limits.max_connections;
        let Some(_slot) = self.take_slot(listener, cap) else {
            self.count_refused(listener, cap);
            refuse(stream, cap).await;
            return None;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Never negotiated (the TLS listener offers no ALPN), but should it be one day:
            // served as Pingora would, counted, without the HTTP/1 timers.
            return self.app.process_new(stream, shutdown).await;
        }
        let next = Arc::new(NextRequest::default());
        let stream = Box::new(Deadlined::new(
            stream,
            Timeouts::from(&limits),
            next.clone(),
        ));
        self.serve_http1(stream, &next, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

/// One open client connection: counted in [`Edge`]'s total and in `shiftgate_connections` until
/// dropped, however the connection ends.
struct Slot<'a> {
    open: &'a AtomicUsize,
    _gauge: GaugeGuard,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Connections refused since the last log line about them.
#[derive(Default)]
struct Refused {
    since_logged: u64,
    logged_at: Option<Instant>,
}

/// Answers a connection past the cap `503 shiftgate.overloaded`, then closes it. The answer
/// waits for the request's head (up to [`REFUSED_LINGER`], no more than
/// [`REFUSED_LINGER_BYTES`]): an HTTP client drops an answer that comes before it has sent its
/// request (hyper: "operation was canceled"). What comes after the answer is read and dropped
/// for a while, so that closing does not reset the connection under the answer.
async fn refuse(mut stream: Stream, cap: usize) {
    let answer = LocalResponse::new(
        Reason::Overloaded,
        format!("shiftgate has {cap} client connections open, its limit; try again"),
    )
    .retry_after(OVERLOADED_RETRY_AFTER);
    let mut buf = [0u8; 4096];
    let head = async {
        let (mut end, mut read) = (HeadEnd::default(), 0);
        while read < REFUSED_LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if end.feed(&buf[..n]) => return true,
                Ok(n) => read += n,
            }
        }
        true
    };
    if tokio::time::timeout(REFUSED_LINGER, head).await == Ok(false) {
        return;
    }
    let sent = async {
        stream.write_all(&answer.http1_closing()).await?;
        stream.flush().await
    };
    if sent.await.is_err() {
        return;
    }
    Shutdown::shutdown(&mut *stream).await;
    let linger = async {
        let mut read = 0;
        while read < REFUSED_LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSED_LINGER, linger).await;
}

/// The two timers of a connection, read from the config in force.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub header: Duration,
    pub idle: Duration,
}

impl From<&Limits> for Timeouts {
    fn from(l: &Limits) -> Timeouts {
        Timeouts {
            header: l.client_header_timeout,
            idle: l.client_idle_timeout,
        }
    }
}

/// Set between two requests of a connection by its keep-alive loop, taken by its stream's next
/// read: the next request starts, idle first, with these timeouts.
#[derive(Debug, Default)]
pub struct NextRequest(Mutex<Option<Timeouts>>);

impl NextRequest {
    pub fn set(&self, timeouts: Timeouts) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(timeouts);
    }

    fn take(&self) -> Option<Timeouts> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Where a connection is, as far as its reads go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests, no byte of the next one yet: closed (as if by the client) when the
    /// timer fires.
    Idle,
    /// A request head has begun (for the first request: the connection was accepted) and must
    /// end before the timer fires.
    Head(HeadEnd),
    /// The head is complete: body, waiting for the answer, the answer. Pingora's timeouts apply.
    Open,
    /// A timer fired: every read from now on fails the same way.
    Expired { idle: bool },
}

/// A client stream whose reads enforce the head and idle timers; see [`Phase`].
pub struct Deadlined<S> {
    inner: S,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    next: Arc<NextRequest>,
    /// The head timer of the request under way.
    header_timeout: Duration,
}

impl<S> Deadlined<S> {
    /// A connection just accepted: its first request head is due within `timeouts.header`.
    pub fn new(inner: S, timeouts: Timeouts, next: Arc<NextRequest>) -> Deadlined<S> {
        Deadlined {
            inner,
            phase: Phase::Head(HeadEnd::default()),
            timer: Box::pin(tokio::time::sleep(timeouts.header)),
            next,
            header_timeout: timeouts.header,
        }
    }

    fn expired_error(&self) -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!(
                "request head not complete within {:?} (limits.client_header_timeout)",
                self.header_timeout
            ),
        )
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if let Some(t) = this.next.take() {
            this.phase = Phase::Idle;
            this.header_timeout = t.header;
            this.timer
                .as_mut()
                .reset(tokio::time::Instant::now() + t.idle);
        }
        match this.phase {
            // EOF: Pingora takes it for a client that closed its idle connection, quietly.
            Phase::Expired { idle: true } => return Poll::Ready(Ok(())),
            Phase::Expired { idle: false } => return Poll::Ready(Err(this.expired_error())),
            Phase::Open => return Pin::new(&mut this.inner).poll_read(cx, buf),
            Phase::Idle | Phase::Head(_) => {}
        }
        // The timer first: a client trickling its head has a byte ready at nearly every read.
        if this.timer.as_mut().poll(cx).is_ready() {
            let idle = this.phase == Phase::Idle;
            this.phase = Phase::Expired { idle };
            return if idle {
                Poll::Ready(Ok(()))
            } else {
                Poll::Ready(Err(this.expired_error()))
            };
        }
        let before = buf.filled().len();
        let result = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        let read = &buf.filled()[before..];
        if read.is_empty() {
            // An error or the client's EOF: passed on as is.
            return Poll::Ready(result);
        }
        match &mut this.phase {
            Phase::Idle => {
                let mut head = HeadEnd::default();
                let done = head.feed(read);
                let deadline = tokio::time::Instant::now() + this.header_timeout;
                this.timer.as_mut().reset(deadline);
                this.phase = if done { Phase::Open } else { Phase::Head(head) };
            }
            Phase::Head(head) => {
                if head.feed(read) {
                    this.phase = Phase::Open;
                }
            }
            Phase::Open | Phase::Expired { .. } => {}
        }
        Poll::Ready(result)
    }
}

/// Finds the empty line that ends a request head, across reads: a line feed, then an optional
/// carriage return, then a line feed (httparse takes bare line feeds too). Empty lines before
/// the request line (RFC 9112 §2.2 lets a server skip them) do not end anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeadEnd {
    /// A byte other than CR or LF was seen: the request line has begun.
    started: bool,
    /// 0: inside a line, 1: just after a LF, 2: after LF CR.
    at: u8,
}

impl HeadEnd {
    /// Feeds the next bytes read; true once the head is complete (bytes after it are body).
    ///
    /// ```
    /// use shiftgate::edge::HeadEnd;
    ///
    /// let mut h = HeadEnd::default();
    /// assert!(!h.feed(b"\r\n\r\nGET / HTTP/1.1\r\nHost: a\r"));
    /// assert!(!h.feed(b"\n"));
    /// assert!(h.feed(b"\r\n{\"body\":1}"));
    /// assert!(HeadEnd::default().feed(b"GET / HTTP/1.1\nHost: a\n\n"));
    /// ```
    pub fn feed(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match (b, self.at) {
                (b'\n', 1 | 2) if self.started => return true,
                (b'\n', _) => self.at = 1,
                (b'\r', 1) => self.at = 2,
                (b'\r', _) => self.at = 0,
                _ => {
                    self.started = true;
                    self.at = 0;
                }
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// The rest of Pingora's `IO` for a wrapped client stream: delegated as is.

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S> fmt::Debug for Deadlined<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deadlined")
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl Shutdown for Deadlined<Stream> {
    async fn shutdown(&mut self) {
        Shutdown::shutdown(&mut *self.inner).await
    }
}

impl UniqueID for Deadlined<Stream> {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Deadlined<Stream> {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Deadlined<Stream> {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Deadlined<Stream> {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Deadlined<Stream> {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Deadlined<Stream> {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    //! The timers on paused time, over an in-memory pipe.
    use super::*;
    use tokio::io::{duplex, DuplexStream};

    const T: Timeouts = Timeouts {
        header: Duration::from_secs(10),
        idle: Duration::from_secs(60),
    };

    fn pipe() -> (Deadlined<DuplexStream>, DuplexStream, Arc<NextRequest>) {
        let (server, client) = duplex(1024);
        let next = Arc::new(NextRequest::default());
        (Deadlined::new(server, T, next.clone()), client, next)
    }

    /// Reads until `head` is complete (as Pingora would), then what comes of the next read.
    async fn read_some(s: &mut Deadlined<DuplexStream>) -> std::io::Result<usize> {
        let mut buf = [0u8; 256];
        s.read(&mut buf).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_trickled_past_the_header_timeout_fails_the_read() {
        let (mut s, mut client, _) = pipe();
        let started = tokio::time::Instant::now();
        client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read_some(&mut s).await.unwrap(), 16);
        let mut failed = None;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let _ = client.write_all(b"X").await;
            if let Err(e) = read_some(&mut s).await {
                failed = Some(e);
                break;
            }
        }
        let e = failed.expect("the read failed");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            e.to_string().contains("limits.client_header_timeout"),
            "{e}"
        );
        assert_eq!(started.elapsed(), T.header);
    }

    #[tokio::test(start_paused = true)]
    async fn a_complete_head_stops_the_timer_and_an_idle_connection_reads_eof() {
        let (mut s, mut client, next) = pipe();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        read_some(&mut s).await.unwrap();
        // The body comes long after the header timeout: not the head's business.
        tokio::time::sleep(T.header * 3).await;
        client.write_all(b"{}").await.unwrap();
        assert_eq!(read_some(&mut s).await.unwrap(), 2);

        // The answer is out; the next request is awaited, idle.
        next.set(T);
        let started = tokio::time::Instant::now();
        assert_eq!(read_some(&mut s).await.unwrap(), 0, "EOF");
        assert_eq!(started.elapsed(), T.idle);
        assert_eq!(read_some(&mut s).await.unwrap(), 0, "EOF again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_is_due_within_the_header_timeout_of_its_first_byte() {
        let (mut s, mut client, next) = pipe();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_some(&mut s).await.unwrap();
        next.set(T);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            loop {
                match read_some(&mut s).await {
                    Ok(0) => return (got, None),
                    Ok(n) => got.push(n),
                    Err(e) => return (got, Some((e, tokio::time::Instant::now()))),
                }
            }
        });
        // Idle for most of the idle timeout, then a trickle.
        tokio::time::sleep(T.idle - Duration::from_secs(1)).await;
        let first_byte = tokio::time::Instant::now();
        for _ in 0..30 {
            if client.write_all(b"G").await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let (_, failed) = reader.await.unwrap();
        let (e, at) = failed.expect("the read failed");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(at - first_byte, T.header);
    }
}
