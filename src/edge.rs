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
//!
//! Memory: each connection runs in a task of its own ([`Edge::serve`]), so Pingora's task for
//! it (accept and handshake state, 8.6 KiB) ends at once; and a paced request waits for its slot
//! here ([`Edge::admit`]; not with replicas, see [`admission::at_edge`]), holding its head and
//! its place in the queue, before Pingora builds
//! its per-request state (its request future, 14.8 KiB, and a 4 KiB header buffer). At 10,000
//! waiting requests that took the proxy from 37 KiB per waiting request to under 6 KiB
//! (`BENCHMARKS.md`).

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::{HttpPersistentSettings, HttpServerApp, ServerApp};
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

use crate::access;
use crate::admission::{self, Admitted, EdgeRequest};
use crate::config::Limits;
use crate::hygiene::MAX_HEAD_BYTES;
use crate::local_response::{LocalResponse, Reason};
use crate::metrics::{GaugeGuard, LISTENERS, NO_ROUTE_LABEL};
use crate::pacer::Demand;
use crate::state::{ActiveRequest, State};

/// `Retry-After` of `503 shiftgate.overloaded`: connections come and go within seconds.
const OVERLOADED_RETRY_AFTER: Duration = Duration::from_secs(1);

/// How long a refused connection is read (and what is read dropped) before its answer, for its
/// request's head, and after it: closing a socket with unread bytes sends a reset, which can
/// destroy the answer before the client reads it. Bounded, so refused connections cannot pile
/// up.
const REFUSED_LINGER: Duration = Duration::from_secs(1);
const REFUSED_LINGER_BYTES: usize = 64 * 1024;

/// A request head is read in steps of this much (an SDK's head is well under it).
const HEAD_READ: usize = 1024;

/// While a request waits at the edge, at most this much of what follows its head (its body) is
/// read and kept; past it the connection is no longer watched for the client leaving.
const WATCH_BYTES: usize = 64 * 1024;

/// What is written to a client is gathered up to this much and sent at the next flush. Pingora
/// (0.9.1) flushes when an answer is complete, after a 1xx head, after each chunk of a chunked
/// answer and after a head without `Content-Length`, so a small answer's head and body leave in
/// one `write(2)`, where Pingora's own write buffer (one 1,460-byte segment) sends them in two.
/// A write this large, with nothing gathered before it, goes straight out.
const WRITE_GATHER: usize = 16 * 1024;

/// A gathering buffer up to this size is kept for the connection's next answer once sent; a
/// larger one is given back.
const WRITE_KEEP: usize = 4 * 1024;

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

    /// Pingora's keep-alive loop for HTTP/1 (`impl ServerApp for HttpServerApp`, 0.9.1), with
    /// the idle timer started each time a request is done, and each request head read here
    /// first (see [`Edge::admit`]).
    async fn serve_http1(&self, mut stream: Box<Deadlined<Stream>>, shutdown: &ShutdownWatch) {
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut first = true;
        loop {
            let Some(_active) = self.admit(&mut stream).await else {
                return;
            };
            let mut session = ServerSession::new_http1(stream);
            if first {
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
            } else if let Some(settings) = settings {
                settings.apply_to_session(&mut session);
            }
            let reused = self.app.process_new_http(session, shutdown).await;
            let Some((next, next_settings)) = reused.map(|r| r.consume()) else {
                return;
            };
            let Ok(next) = next.into_any().downcast::<Deadlined<Stream>>() else {
                return;
            };
            stream = next;
            // Read now, so that a reload applies from the next request on.
            stream.between_requests(Timeouts::from(&self.state.config().limits));
            settings = next_settings;
            first = false;
        }
    }

    /// Reads the next request head, and when it is a paced request the edge can judge (see
    /// [`admission::at_edge`]), queues it and waits here for its slot, holding the head and its
    /// connection but none of Pingora's per-request state (about 20 KiB). The head, and what
    /// came after it, is then read again by Pingora from the stream; the slot goes with it
    /// ([`Deadlined::take_admitted`]). `None`: the connection is done (closed, timed out, or
    /// the client left while waiting). `Some`: hand the connection to Pingora; the guard
    /// counts a queued request as active until its answer.
    async fn admit(&self, stream: &mut Deadlined<Stream>) -> Option<Option<ActiveRequest>> {
        let cfg = self.state.config();
        if !cfg.queues_at_edge() {
            // Nothing the edge could queue: Pingora reads the head, once.
            return Some(None);
        }
        let mut head = stream.take_buffer();
        while !stream.head_complete() && head.len() <= MAX_HEAD_BYTES {
            head.reserve(HEAD_READ);
            // Closed, broken, or a head timer fired (idle: quietly; a partial head: Pingora
            // would not answer either).
            if !matches!(stream.read_buf(&mut head).await, Ok(n) if n > 0) {
                return None;
            }
        }
        let peer = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()));
        let request = if self.state.is_draining() || !stream.head_complete() {
            None
        } else {
            admission::at_edge(&cfg, self.state.pacer(), &head, peer)
        };
        let Some(request) = request else {
            stream.replay(head);
            return Some(None);
        };
        let route = &cfg.routes[request.route];
        let demand = Demand {
            buckets: request.buckets.clone(),
            priority: route.priority,
            max_wait: route.max_wait,
            retry: false,
            not_after: None,
        };
        // Refused: the proxy's first hook admits it again and answers the refusal.
        let Ok(mut ticket) = self.state.pacer().admit(demand) else {
            stream.replay(head);
            return Some(None);
        };
        let arrived = Instant::now();
        // Its head is all it keeps while it waits.
        head.shrink_to_fit();
        stream.release_write_buffer();
        let active = self.state.request_started();
        let waiting = self.state.metrics().waiting(&route.name);
        // While it waits, what the client sends (its body) is kept for Pingora, and the end of
        // the stream means it left. Past a bound nothing more is read; it waits unwatched.
        let watch_until = head.len() + cfg.limits.max_body_bytes.min(WATCH_BYTES);
        let outcome = {
            let granted = ticket.granted();
            tokio::pin!(granted);
            loop {
                tokio::select! {
                    outcome = &mut granted => break Some(outcome),
                    read = watch(stream, &mut head), if head.len() < watch_until => {
                        if !matches!(read, Ok(n) if n > 0) {
                            break None;
                        }
                    }
                }
            }
        };
        drop(waiting);
        let Some(outcome) = outcome else {
            self.client_left(&request, &route.name, peer, arrived);
            return None;
        };
        stream.replay(head);
        stream.set_admitted(Admitted {
            config: cfg.clone(),
            route: request.route,
            buckets: request.buckets,
            arrived,
            outcome,
        });
        Some(Some(active))
    }

    /// A client that left while its request waited at the edge: counted and logged as the proxy
    /// counts and logs one that leaves while queued.
    fn client_left(
        &self,
        request: &EdgeRequest,
        route: &str,
        peer: Option<std::net::IpAddr>,
        arrived: Instant,
    ) {
        self.state
            .metrics()
            .client_disconnects_total
            .with_label_values(&[route])
            .inc();
        access::log(&access::Line {
            client: peer,
            peer: None,
            route,
            method: &request.method,
            path: &request.path,
            status: 0,
            duration: arrived.elapsed(),
            bytes_in: 0,
            bytes_out: 0,
            wait: arrived.elapsed(),
            attempts: 0,
            upstream: Duration::ZERO,
            correlation_id: None,
            error: Some("ConnectionClosed"),
        });
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
    /// Hands the connection to a task of its own and returns at once: Pingora's task for a
    /// connection (its accept and TLS handshake state, 8.6 KiB in 0.9.1) then ends, instead of
    /// staying with every open connection for its whole life.
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let edge = Arc::clone(self);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { edge.serve(stream, &shutdown).await });
        None
    }

    async fn cleanup(&self) {
        self.app.http_cleanup().await;
    }
}

impl<A: HttpServerApp + Send + Sync + 'static> Edge<A> {
    /// One client connection, from its accept (and TLS handshake) to its close.
    async fn serve(self: &Arc<Self>, stream: Stream, shutdown: &ShutdownWatch) {
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
            // Boxed: its read buffer would otherwise make every connection's future larger.
            Box::pin(refuse(stream, cap)).await;
            return;
        };
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Never negotiated (the TLS listener offers no ALPN), but should it be one day:
            // served as Pingora would, counted, without the HTTP/1 timers.
            let mut reused = self.app.process_new(stream, shutdown).await;
            while let Some(stream) = reused {
                reused = self.app.process_new(stream, shutdown).await;
            }
            return;
        }
        let stream = Box::new(Deadlined::new(stream, Timeouts::from(&limits)));
        self.serve_http1(stream, shutdown).await;
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

/// Reads what the client sends next into `buf` (for [`Edge::admit`], while it waits): a
/// presence update's body is a few dozen bytes, so `buf` grows by little.
async fn watch(stream: &mut Deadlined<Stream>, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut chunk = [0u8; 256];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
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

/// A client stream whose reads enforce the head and idle timers (see [`Phase`]), replay what
/// the edge read ahead of Pingora, and carry the edge's admission of the request to the proxy;
/// its writes are gathered until a flush ([`WRITE_GATHER`]).
pub struct Deadlined<S> {
    inner: S,
    phase: Phase,
    timer: Pin<Box<Sleep>>,
    /// The head timer of the request under way.
    header_timeout: Duration,
    /// Bytes read by the edge, served before the socket's.
    replay: Vec<u8>,
    replayed: usize,
    /// Set by the edge, taken by the proxy's first hook (which sees the stream only by `&`).
    admitted: Mutex<Option<Admitted>>,
    /// What was written and not yet sent (see [`Deadlined::poll_drain`]); `sent` of it went out.
    out: Vec<u8>,
    sent: usize,
    /// Some of the answer under way has been sent: it can no longer be replaced.
    sent_any: bool,
    /// An answer to send in place of the one under way (see [`Deadlined::answer_instead`]).
    instead: Mutex<Option<Vec<u8>>>,
}

impl<S> Deadlined<S> {
    /// A connection just accepted: its first request head is due within `timeouts.header`.
    pub fn new(inner: S, timeouts: Timeouts) -> Deadlined<S> {
        Deadlined {
            inner,
            phase: Phase::Head(HeadEnd::default()),
            timer: Box::pin(tokio::time::sleep(timeouts.header)),
            header_timeout: timeouts.header,
            replay: Vec::new(),
            replayed: 0,
            admitted: Mutex::new(None),
            out: Vec::new(),
            sent: 0,
            sent_any: false,
            instead: Mutex::new(None),
        }
    }

    /// The answer is out; the next request starts, idle first, with these timeouts.
    pub fn between_requests(&mut self, timeouts: Timeouts) {
        self.phase = Phase::Idle;
        self.sent_any = false;
        self.header_timeout = timeouts.header;
        let idle_until = tokio::time::Instant::now() + timeouts.idle;
        self.timer.as_mut().reset(idle_until);
    }

    /// The request head under way has been read whole.
    pub fn head_complete(&self) -> bool {
        self.phase == Phase::Open
    }

    /// The buffer the last replay was in, emptied, to read the next head into: a request's
    /// head is read into the same memory as the last one's.
    pub fn take_buffer(&mut self) -> Vec<u8> {
        debug_assert!(self.replayed == 0 && self.replay.is_empty());
        std::mem::take(&mut self.replay)
    }

    /// `bytes`, already read from this stream, are read again before anything new.
    pub fn replay(&mut self, bytes: Vec<u8>) {
        debug_assert!(
            self.replay.is_empty(),
            "a replay is read whole before the next"
        );
        self.replay = bytes;
        self.replayed = 0;
    }

    pub fn set_admitted(&mut self, admitted: Admitted) {
        *self.admitted.get_mut().unwrap_or_else(|e| e.into_inner()) = Some(admitted);
    }

    /// The request's admission at the edge, if it had one (once).
    pub fn take_admitted(&self) -> Option<Admitted> {
        self.admitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Puts `answer` (a whole HTTP/1 answer that closes the connection) in place of the answer
    /// under way, if none of that has been sent yet; it goes out, alone, when the connection is
    /// shut down. False when part of the answer under way has gone out already.
    pub fn answer_instead(&self, answer: Vec<u8>) -> bool {
        if self.sent_any {
            return false;
        }
        *self.instead.lock().unwrap_or_else(|e| e.into_inner()) = Some(answer);
        true
    }

    /// Gives back the gathering buffer: the connection's request is about to wait, with
    /// nothing to send until its answer.
    pub fn release_write_buffer(&mut self) {
        if self.out.is_empty() {
            self.out = Vec::new();
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

    /// Moves the phase on over bytes just read.
    fn saw(&mut self, read: &[u8]) {
        match &mut self.phase {
            Phase::Idle => {
                let mut head = HeadEnd::default();
                if head.feed(read) {
                    // Whole in one read (nearly always): no head timer to start.
                    self.phase = Phase::Open;
                    return;
                }
                let deadline = tokio::time::Instant::now() + self.header_timeout;
                self.timer.as_mut().reset(deadline);
                self.phase = Phase::Head(head);
            }
            Phase::Head(head) => {
                if head.feed(read) {
                    self.phase = Phase::Open;
                }
            }
            Phase::Open | Phase::Expired { .. } => {}
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlined<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.replayed < this.replay.len() {
            let from = this.replayed;
            let n = (this.replay.len() - from).min(buf.remaining());
            buf.put_slice(&this.replay[from..from + n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                // Kept for the next head when small; a larger one (a head over
                // `HEAD_READ`, or a body read while waiting) is given back.
                if this.replay.capacity() <= HEAD_READ {
                    this.replay.clear();
                } else {
                    this.replay = Vec::new();
                }
                this.replayed = 0;
            }
            let filled = buf.filled();
            this.saw(&filled[filled.len() - n..]);
            return Poll::Ready(Ok(()));
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
        // An error or the client's EOF (nothing read) is passed on as is.
        this.saw(&buf.filled()[before..]);
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
        let mut rest = bytes;
        while let Some((&b, after)) = rest.split_first() {
            if self.started && self.at == 0 {
                // Inside a line: nothing before its line feed can end the head.
                let Some(lf) = memchr::memchr(b'\n', rest) else {
                    return false;
                };
                self.at = 1;
                rest = &rest[lf + 1..];
                continue;
            }
            rest = after;
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

impl<S: AsyncWrite + Unpin> Deadlined<S> {
    /// Sends everything gathered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.sent_any = true;
        }
        if self.out.capacity() > WRITE_KEEP {
            self.out = Vec::new();
        } else {
            self.out.clear();
        }
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    /// Before a shutdown: the answer put in place of the one under way, if any, replaces what
    /// was gathered of that one.
    fn swap_in_instead(&mut self) {
        if let Some(answer) = self
            .instead
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            self.out = answer;
            self.sent = 0;
        }
    }

    /// A write straight to the socket, bypassing the gathering buffer.
    fn note_sent(&mut self, written: &Poll<std::io::Result<usize>>) {
        if matches!(written, Poll::Ready(Ok(n)) if *n > 0) {
            self.sent_any = true;
        }
    }
}

/// Writes are gathered (see [`WRITE_GATHER`]), as a `BufWriter` would, into a buffer that is
/// only there while an answer is being written.
impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlined<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.poll_write_vectored(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let len = bufs.iter().map(|b| b.len()).sum::<usize>();
        if this.out.len() + len > WRITE_GATHER {
            ready!(this.poll_drain(cx))?;
            if len >= WRITE_GATHER {
                let written = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
                this.note_sent(&written);
                return written;
            }
        }
        for b in bufs {
            this.out.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.swap_in_instead();
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// ---------------------------------------------------------------------------------------------
// The rest of Pingora's `IO` for a wrapped client stream: delegated as is.

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
        // What was gathered goes first; a client gone by now gets nothing either way.
        self.swap_in_instead();
        if std::future::poll_fn(|cx| self.poll_drain(cx)).await.is_ok() {
            Shutdown::shutdown(&mut *self.inner).await
        }
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

    proptest::proptest! {
        /// Skipping to each line's end finds the same end as reading byte by byte, however the
        /// head is split across reads.
        #[test]
        fn the_head_ends_where_a_byte_by_byte_reader_ends_it(
            bytes in proptest::collection::vec(
                proptest::sample::select(vec![b'a', b' ', b'\r', b'\n']), 0..40),
            cuts in proptest::collection::vec(0usize..40, 0..4),
        ) {
            let by_byte = {
                let (mut started, mut at) = (false, 0u8);
                bytes.iter().position(|&b| match (b, at) {
                    (b'\n', 1 | 2) if started => true,
                    (b'\n', _) => { at = 1; false }
                    (b'\r', 1) => { at = 2; false }
                    (b'\r', _) => { at = 0; false }
                    _ => { started = true; at = 0; false }
                })
            };
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.push(bytes.len());
            cuts.sort_unstable();
            let (mut head, mut from, mut ended_in) = (HeadEnd::default(), 0, None);
            for to in cuts {
                if ended_in.is_none() && head.feed(&bytes[from..to]) {
                    ended_in = Some((from, to));
                }
                from = to;
            }
            match (by_byte, ended_in) {
                (None, None) => {}
                (Some(at), Some((from, to))) => proptest::prop_assert!(from <= at && at < to),
                other => proptest::prop_assert!(false, "{:?}", other),
            }
        }
    }

    fn pipe() -> (Deadlined<DuplexStream>, DuplexStream) {
        let (server, client) = duplex(1024);
        (Deadlined::new(server, T), client)
    }

    /// Reads until `head` is complete (as Pingora would), then what comes of the next read.
    async fn read_some(s: &mut Deadlined<DuplexStream>) -> std::io::Result<usize> {
        let mut buf = [0u8; 256];
        s.read(&mut buf).await
    }

    /// Records each write it is given, whole.
    #[derive(Default)]
    struct Sink {
        writes: Vec<Vec<u8>>,
        shut: bool,
    }

    impl AsyncWrite for Sink {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_answers_head_and_body_leave_in_one_write_at_the_flush() {
        let mut s = Deadlined::new(Sink::default(), T);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
            .await
            .unwrap();
        s.write_all(b"{}").await.unwrap();
        assert!(s.inner.writes.is_empty(), "nothing sent before the flush");
        s.flush().await.unwrap();
        assert_eq!(
            s.inner.writes,
            vec![b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}".to_vec()]
        );

        // A large body: what was gathered goes first, the body straight after, uncopied; the
        // large buffer is not kept.
        let body = vec![b'x'; WRITE_GATHER];
        s.write_all(b"head").await.unwrap();
        s.write_all(&body).await.unwrap();
        assert_eq!(s.inner.writes[1..], [b"head".to_vec(), body]);
        s.write_all(&[b'y'; WRITE_KEEP + 1]).await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(
            s.out.capacity(),
            0,
            "a buffer over WRITE_KEEP is given back"
        );

        // Closing sends what is gathered first.
        s.write_all(b"cut here").await.unwrap();
        s.shutdown().await.unwrap();
        assert_eq!(s.inner.writes.last().unwrap(), b"cut here");
        assert!(s.inner.shut);
    }

    #[tokio::test]
    async fn an_answer_none_of_which_was_sent_is_replaced_at_the_close() {
        const INSTEAD: &[u8] = b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n";
        let mut s = Deadlined::new(Sink::default(), T);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhalf")
            .await
            .unwrap();
        assert!(s.answer_instead(INSTEAD.to_vec()));
        s.shutdown().await.unwrap();
        assert_eq!(s.inner.writes, vec![INSTEAD.to_vec()], "the 200 never left");

        // Once part of an answer is out, it is not replaced: the rest gathered goes out.
        let mut s = Deadlined::new(Sink::default(), T);
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nhalf")
            .await
            .unwrap();
        s.flush().await.unwrap();
        s.write_all(b"more").await.unwrap();
        assert!(!s.answer_instead(INSTEAD.to_vec()));
        s.shutdown().await.unwrap();
        assert_eq!(s.inner.writes.last().unwrap(), b"more");
        // The connection's next answer could be again.
        s.between_requests(T);
        assert!(s.answer_instead(INSTEAD.to_vec()));
    }

    #[tokio::test(start_paused = true)]
    async fn a_first_head_trickled_past_the_header_timeout_fails_the_read() {
        let (mut s, mut client) = pipe();
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
        let (mut s, mut client) = pipe();
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
        s.between_requests(T);
        let started = tokio::time::Instant::now();
        assert_eq!(read_some(&mut s).await.unwrap(), 0, "EOF");
        assert_eq!(started.elapsed(), T.idle);
        assert_eq!(read_some(&mut s).await.unwrap(), 0, "EOF again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_later_head_is_due_within_the_header_timeout_of_its_first_byte() {
        let (mut s, mut client) = pipe();
        client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        read_some(&mut s).await.unwrap();
        s.between_requests(T);
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

    #[tokio::test(start_paused = true)]
    async fn what_the_edge_read_is_read_again_first_and_its_head_counts_for_the_timers() {
        let (mut s, mut client) = pipe();
        let head = b"PATCH /p HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}";
        client.write_all(head).await.unwrap();
        let mut got = Vec::new();
        s.read_buf(&mut got).await.unwrap();
        assert!(s.head_complete());
        s.replay(got);
        client.write_all(b"GET").await.unwrap();
        let mut again = [0u8; 256];
        let n = s.read(&mut again).await.unwrap();
        assert_eq!(&again[..n], head, "the replay first, alone");
        assert_eq!(read_some(&mut s).await.unwrap(), 3, "then the socket");

        // A pipelined next head, read ahead by the edge and replayed: its head timer runs.
        s.between_requests(T);
        s.replay(b"GET / HT".to_vec());
        assert_eq!(read_some(&mut s).await.unwrap(), 8);
        assert!(!s.head_complete());
        let started = tokio::time::Instant::now();
        let e = read_some(&mut s).await.expect_err("the head timer fired");
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), T.header);
    }
}
