//! The access line: one per request, at `info` under the target `shiftgate::access`, as text or
//! JSON (`log.format`). Written by the proxy's last hook, and by the client edge for a client
//! that left while its request waited there. Never a token.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// What one access line says (see `docs/reference.md`, "Access log").
#[derive(Debug, Clone, Copy)]
pub struct Line<'a> {
    /// The client's address: the socket's, or behind `trusted_proxies` X-Forwarded-For's.
    pub client: Option<IpAddr>,
    /// The socket's address and port.
    pub peer: Option<SocketAddr>,
    pub route: &'a str,
    pub method: &'a str,
    /// Normalised, without the query string.
    pub path: &'a str,
    /// 0: no answer was written (the client left).
    pub status: u16,
    /// Arrival to the end of the answer.
    pub duration: Duration,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub wait: Duration,
    pub attempts: u32,
    pub upstream: Duration,
    pub correlation_id: Option<&'a str>,
    pub error: Option<&'a str>,
}

/// Writes `line` when `shiftgate::access` is enabled at `info` (`RUST_LOG`), in the format
/// [`set_json`] chose, as `tracing_subscriber`'s formatter writes its other lines. Formatted here
/// into a buffer kept per thread rather than through `tracing`'s field visitors: the line was
/// the largest cost of a proxied request that shiftgate adds.
pub fn log(line: &Line<'_>) {
    if !tracing::enabled!(target: TARGET, tracing::Level::INFO) {
        return;
    }
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        let json = JSON.load(Ordering::Relaxed);
        if format(buf, line, SystemTime::now(), json).is_ok() {
            let _ = STDERR.access(buf);
        }
    });
}

/// Appends `line`, logged at `now`, to `out`: a JSON object or text, and a line feed.
pub fn format(
    out: &mut Vec<u8>,
    line: &Line<'_>,
    now: SystemTime,
    json: bool,
) -> std::io::Result<()> {
    if json {
        write_json(out, line, now)
    } else {
        write_text(out, line, now)
    }
}

static JSON: AtomicBool = AtomicBool::new(false);

/// Access lines as JSON objects (`log.format: json`) rather than text.
pub fn set_json(json: bool) {
    JSON.store(json, Ordering::Relaxed);
}

/// `2026-12-02T17:17:25.774646Z  INFO shiftgate::access: request client=... error="..."`
///
/// Written piece by piece, numbers and IPv4 addresses without `core::fmt`: the line is written
/// for every request, and `write!` was most of its cost.
fn write_text(out: &mut Vec<u8>, l: &Line<'_>, now: SystemTime) -> std::io::Result<()> {
    write_timestamp(out, now);
    out.extend_from_slice(b"  INFO ");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b": request client=");
    write_ip(out, l.client);
    out.extend_from_slice(b" peer=");
    write_socket(out, l.peer);
    for (key, value) in [("route", l.route), ("method", l.method), ("path", l.path)] {
        out.push(b' ');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
    }
    let mut digits = itoa::Buffer::new();
    for (key, value) in numbers(l) {
        out.push(b' ');
        out.extend_from_slice(key.as_bytes());
        out.push(b'=');
        out.extend_from_slice(digits.format(value).as_bytes());
    }
    out.extend_from_slice(b" correlation_id=");
    out.extend_from_slice(l.correlation_id.unwrap_or("-").as_bytes());
    if let Some(error) = l.error {
        write!(out, " error={error:?}")?;
    }
    out.push(b'\n');
    Ok(())
}

/// One object per line, the fields as `tracing_subscriber`'s JSON formatter (flattened) writes
/// them.
fn write_json(out: &mut Vec<u8>, l: &Line<'_>, now: SystemTime) -> std::io::Result<()> {
    out.extend_from_slice(b"{\"timestamp\":\"");
    write_timestamp(out, now);
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
    let key = |out: &mut Vec<u8>, key: &str| {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
    };
    // Addresses hold no character JSON escapes.
    key(out, "client");
    out.push(b'"');
    write_ip(out, l.client);
    out.push(b'"');
    key(out, "peer");
    out.push(b'"');
    write_socket(out, l.peer);
    out.push(b'"');
    for (name, value) in [("route", l.route), ("method", l.method), ("path", l.path)] {
        key(out, name);
        json_string(out, value);
    }
    let mut digits = itoa::Buffer::new();
    for (name, value) in numbers(l) {
        key(out, name);
        out.extend_from_slice(digits.format(value).as_bytes());
    }
    key(out, "correlation_id");
    json_string(out, l.correlation_id.unwrap_or("-"));
    if let Some(error) = l.error {
        key(out, "error");
        json_string(out, error);
    }
    out.extend_from_slice(b",\"target\":\"");
    out.extend_from_slice(TARGET.as_bytes());
    out.extend_from_slice(b"\"}\n");
    Ok(())
}

/// The line's numeric fields, in its order: the text and the JSON line write the same ones.
fn numbers(l: &Line<'_>) -> [(&'static str, u64); 7] {
    [
        ("status", u64::from(l.status)),
        ("duration_ms", millis(l.duration)),
        ("bytes_in", l.bytes_in),
        ("bytes_out", l.bytes_out),
        ("wait_ms", millis(l.wait)),
        ("attempts", u64::from(l.attempts)),
        ("upstream_ms", millis(l.upstream)),
    ]
}

/// An address as `Display` writes it, or `-`; IPv4 without `core::fmt`.
fn write_ip(out: &mut Vec<u8>, ip: Option<IpAddr>) {
    match ip {
        None => out.push(b'-'),
        Some(IpAddr::V4(v4)) => write_ipv4(out, v4),
        Some(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

/// A socket address as `Display` writes it, or `-`.
fn write_socket(out: &mut Vec<u8>, addr: Option<SocketAddr>) {
    match addr {
        None => out.push(b'-'),
        Some(SocketAddr::V4(v4)) => {
            write_ipv4(out, *v4.ip());
            out.push(b':');
            out.extend_from_slice(itoa::Buffer::new().format(v4.port()).as_bytes());
        }
        Some(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn write_ipv4(out: &mut Vec<u8>, ip: std::net::Ipv4Addr) {
    let mut digits = itoa::Buffer::new();
    for (i, octet) in ip.octets().into_iter().enumerate() {
        if i > 0 {
            out.push(b'.');
        }
        out.extend_from_slice(digits.format(octet).as_bytes());
    }
}

/// RFC 3339 in UTC to the microsecond, as `tracing_subscriber`'s default timer writes it. The
/// part up to the second is kept per thread and made again only when the second changes.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) {
    thread_local! {
        /// The second last written, and its `YYYY-MM-DDTHH:MM:SS.`.
        static SECOND: std::cell::Cell<(u64, [u8; 20])> = const { std::cell::Cell::new((u64::MAX, [0; 20])) };
    }
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (cached, mut prefix) = SECOND.get();
    if cached != secs {
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let s = secs % 86_400;
        let write_prefix = |w: &mut dyn Write| {
            write!(
                w,
                "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.",
                s / 3600,
                s / 60 % 60,
                s % 60,
            )
        };
        let mut text = std::io::Cursor::new(&mut prefix[..]);
        if write_prefix(&mut text).is_err() || text.position() != 20 {
            // A year past 9999: written out in full, not kept.
            let _ = write_prefix(out);
            write_micros(out, since.subsec_micros());
            return;
        }
        SECOND.set((secs, prefix));
    }
    out.extend_from_slice(&prefix);
    write_micros(out, since.subsec_micros());
}

/// Six digits and the zone: `012345Z`.
fn write_micros(out: &mut Vec<u8>, micros: u32) {
    let mut digits = [b'0'; 7];
    let mut rest = micros;
    for d in digits[..6].iter_mut().rev() {
        *d = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    digits[6] = b'Z';
    out.extend_from_slice(&digits);
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
pub(crate) fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `value` as a JSON string, quotes included.
fn json_string(out: &mut Vec<u8>, value: &str) {
    out.push(b'"');
    for &b in value.as_bytes() {
        match b {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..0x20 => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(b >> 4)]);
                out.push(HEX[usize::from(b & 0xf)]);
            }
            _ => out.push(b),
        }
    }
    out.push(b'"');
}

/// Access lines are gathered and written out together, at most [`FLUSH_EVERY`] after they were
/// logged (nginx's `access_log ... buffer= flush=`): one write per request was a tenth of the
/// proxy's cost per request. Other log lines are written at once, after any access lines
/// before them, so the log keeps its order.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Gathered lines are written out once they take this much.
pub const FLUSH_BYTES: usize = 32 * 1024;
/// With a flusher thread ([`Buffered::spawn_flusher`]), the thread that logs a line writes it
/// itself only past this much: the flusher is behind (a slow log reader), and lines are held,
/// not dropped, so the log's reader slows the proxy rather than lose lines.
pub const MAX_PENDING: usize = 1024 * 1024;

/// Lines waiting to be written to `out`, and `out`. Lock order: `out`, then `pending`.
pub struct Buffered<W> {
    pending: std::sync::Mutex<Vec<u8>>,
    out: std::sync::Mutex<Out<W>>,
    /// Signalled when `pending` reaches [`FLUSH_BYTES`].
    full: std::sync::Condvar,
    /// A flusher thread writes the lines: the request path only gathers them.
    flusher: AtomicBool,
}

struct Out<W> {
    w: W,
    /// The last batch's buffer, reused for the next.
    spare: Vec<u8>,
}

impl<W: std::io::Write> Buffered<W> {
    pub const fn new(w: W) -> Buffered<W> {
        Buffered {
            pending: std::sync::Mutex::new(Vec::new()),
            out: std::sync::Mutex::new(Out {
                w,
                spare: Vec::new(),
            }),
            full: std::sync::Condvar::new(),
            flusher: AtomicBool::new(false),
        }
    }

    /// Adds an access line. At [`FLUSH_BYTES`] the flusher thread is woken to write them, or,
    /// without one, they are written here.
    pub fn access(&self, line: &[u8]) -> std::io::Result<()> {
        let mut pending = lock(&self.pending);
        let before = pending.len();
        pending.extend_from_slice(line);
        let len = pending.len();
        drop(pending);
        if !self.flusher.load(Ordering::Relaxed) {
            if len >= FLUSH_BYTES {
                return self.write_pending();
            }
        } else if len >= MAX_PENDING {
            return self.write_pending();
        } else if len >= FLUSH_BYTES && before < FLUSH_BYTES {
            self.full.notify_one();
        }
        Ok(())
    }

    /// Writes another line at once, after the access lines waiting.
    pub fn other(&self, line: &[u8]) -> std::io::Result<()> {
        let mut out = lock(&self.out);
        let written = Self::write_batch(&mut out, &self.pending);
        written.and_then(|()| out.w.write_all(line))
    }

    /// Writes out the access lines waiting.
    pub fn flush(&self) {
        let _ = self.write_pending();
    }

    fn write_pending(&self) -> std::io::Result<()> {
        Self::write_batch(&mut lock(&self.out), &self.pending)
    }

    /// Takes the lines waiting (the lock on `pending` is held only to swap buffers) and writes
    /// them, holding `out`, so that nothing logged later is written before them.
    fn write_batch(out: &mut Out<W>, pending: &std::sync::Mutex<Vec<u8>>) -> std::io::Result<()> {
        std::mem::swap(&mut *lock(pending), &mut out.spare);
        if out.spare.is_empty() {
            return Ok(());
        }
        let written = out.w.write_all(&out.spare);
        out.spare.clear();
        // Memory for a burst's lines is not kept for ever.
        out.spare.shrink_to(FLUSH_BYTES);
        written
    }

    /// Starts the thread that writes the lines gathered: every [`FLUSH_EVERY`], and as soon as
    /// they take [`FLUSH_BYTES`].
    pub fn spawn_flusher(&'static self)
    where
        W: Send,
    {
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || loop {
                let pending = lock(&self.pending);
                if pending.len() < FLUSH_BYTES {
                    drop(self.full.wait_timeout(pending, FLUSH_EVERY));
                } else {
                    drop(pending);
                }
                self.flush();
            });
        self.flusher.store(started.is_ok(), Ordering::Relaxed);
    }

    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner()).w
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves at worst a partial line.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The process's log output: stderr, access lines gathered (see [`Buffered`]).
pub static STDERR: Buffered<Stderr> = Buffered::new(Stderr);

/// The process's stderr, as a value a static can hold.
pub struct Stderr;

impl std::io::Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Writes out the access lines waiting: called before the process exits.
pub fn flush() {
    STDERR.flush();
}

/// Starts the thread that writes access lines out (see [`Buffered::spawn_flusher`]).
pub fn start_flusher() {
    STDERR.spawn_flusher();
}

/// `tracing_subscriber`'s writer for [`STDERR`]: one per log event, knowing whether it is an
/// access line.
pub struct LogWriter {
    access: bool,
}

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.access {
            STDERR.access(buf)?;
        } else {
            STDERR.other(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hands out a [`LogWriter`] per event (`tracing_subscriber::fmt().with_writer(MakeLogWriter)`).
pub struct MakeLogWriter;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeLogWriter {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        LogWriter { access: false }
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> LogWriter {
        LogWriter {
            access: meta.target() == TARGET,
        }
    }
}

/// The access lines' log target.
pub const TARGET: &str = "shiftgate::access";

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: Line<'static> = Line {
        client: Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
        peer: None,
        route: "presence",
        method: "PATCH",
        path: "/api/v2/users/u\"1/presences/PURECLOUD",
        status: 200,
        duration: Duration::from_millis(1234),
        bytes_in: 40,
        bytes_out: 312,
        wait: Duration::from_millis(1200),
        attempts: 2,
        upstream: Duration::from_millis(30),
        correlation_id: Some("c-1"),
        error: Some("ConnectionClosed"),
    };

    fn at(secs: u64, micros: u32) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
    }

    #[test]
    fn a_text_line_reads_as_the_log_formatter_writes_its_lines() {
        let mut out = Vec::new();
        write_text(&mut out, &LINE, at(1_796_232_645, 774_646)).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "2026-12-02T17:30:45.774646Z  INFO shiftgate::access: request client=127.0.0.1 \
             peer=- route=presence method=PATCH path=/api/v2/users/u\"1/presences/PURECLOUD \
             status=200 duration_ms=1234 bytes_in=40 bytes_out=312 wait_ms=1200 attempts=2 \
             upstream_ms=30 correlation_id=c-1 error=\"ConnectionClosed\"\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let mut out = Vec::new();
        write_json(&mut out, &LINE, at(951_782_400, 5)).unwrap();
        assert_eq!(out.last(), Some(&b'\n'));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["timestamp"], "2000-02-29T00:00:00.000005Z");
        assert_eq!(v["target"], TARGET);
        assert_eq!(v["path"], LINE.path, "escaped and read back");
        assert_eq!(v["status"], 200);
        assert_eq!(v["wait_ms"], 1200);
        assert_eq!(v["peer"], "-");
        assert_eq!(v["error"], "ConnectionClosed");
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys.len(), 18, "{keys:?}");
    }

    #[test]
    fn addresses_and_timestamps_read_as_display_writes_them() {
        let peer: SocketAddr = "10.1.2.3:45678".parse().unwrap();
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let line = Line {
            client: Some(v6),
            peer: Some(peer),
            error: None,
            correlation_id: None,
            ..LINE
        };
        let mut out = Vec::new();
        write_text(&mut out, &line, at(1_796_232_645, 5)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("2026-12-02T17:30:45.000005Z "), "{text}");
        assert!(
            text.contains(" client=2001:db8::1 peer=10.1.2.3:45678 "),
            "{text}"
        );
        assert!(text.ends_with(" correlation_id=-\n"), "{text}");

        // The second kept per thread is not reused for another second.
        for (secs, micros, want) in [
            (1_796_232_646, 0, "2026-12-02T17:30:46.000000Z"),
            (1_796_232_646, 999_999, "2026-12-02T17:30:46.999999Z"),
            (951_782_400, 1, "2000-02-29T00:00:00.000001Z"),
        ] {
            let mut out = Vec::new();
            write_timestamp(&mut out, at(secs, micros));
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn json_strings_escape_what_json_requires() {
        let mut out = Vec::new();
        json_string(&mut out, "a\"b\\c\n\u{1}é");
        assert_eq!(
            String::from_utf8(out.clone()).unwrap(),
            r#""a\"b\\c\n\u0001é""#
        );
        let back: String = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, "a\"b\\c\n\u{1}é");
    }

    #[test]
    fn days_are_dated_as_the_calendar_does() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(civil_from_days(20_789), (2026, 12, 2));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn access_lines_wait_for_a_flush_or_a_full_buffer_and_other_lines_keep_the_order() {
        let b = Buffered::new(Vec::new());
        b.access(b"a1\n").unwrap();
        b.access(b"a2\n").unwrap();
        assert!(lock(&b.out).w.is_empty(), "held");
        b.other(b"warn\n").unwrap();
        assert_eq!(&*lock(&b.out).w, b"a1\na2\nwarn\n", "in the order logged");
        b.access(b"a3\n").unwrap();
        b.flush();
        assert_eq!(&lock(&b.out).w[11..], b"a3\n");

        let line = vec![b'x'; 1000];
        for _ in 0..FLUSH_BYTES / 1000 {
            b.access(&line).unwrap();
        }
        assert_eq!(lock(&b.out).w.len(), 14, "not yet");
        b.access(&line).unwrap();
        assert_eq!(
            b.into_inner().len(),
            14 + FLUSH_BYTES + 1000 - FLUSH_BYTES % 1000
        );
    }

    /// A writer the test can read while the flusher thread writes to it.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            lock(&self.0).extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn the_flusher_thread_writes_the_lines_in_the_order_logged() {
        let seen = Shared::default();
        let b: &'static Buffered<Shared> = Box::leak(Box::new(Buffered::new(seen.clone())));
        b.spawn_flusher();
        let line = vec![b'x'; 99];
        let mut want = Vec::new();
        for i in 0..2 * FLUSH_BYTES / 100 {
            if i % 300 == 0 {
                b.other(b"warn\n").unwrap();
                want.extend_from_slice(b"warn\n");
            }
            b.access(&[&line[..], b"\n"].concat()).unwrap();
            want.extend_from_slice(&line);
            want.push(b'\n');
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while lock(&seen.0).len() < want.len() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(*lock(&seen.0) == want, "every line, once, in order");
    }
}
