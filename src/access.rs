//! The access line: one per request, at `info` under the target `shiftgate::access`, as text or
//! JSON (`log.format`). Written by the proxy's last hook, and by the client edge for a client
//! that left while its request waited there. Never a token.

use std::fmt;
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
fn write_text(out: &mut Vec<u8>, l: &Line<'_>, now: SystemTime) -> std::io::Result<()> {
    write_timestamp(out, now)?;
    write!(
        out,
        "  INFO {TARGET}: request client={} peer={} route={} method={} path={}",
        OrDash(l.client),
        OrDash(l.peer),
        l.route,
        l.method,
        l.path,
    )?;
    for (key, value) in numbers(l) {
        write!(out, " {key}={value}")?;
    }
    write!(out, " correlation_id={}", l.correlation_id.unwrap_or("-"))?;
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
    write_timestamp(out, now)?;
    out.extend_from_slice(b"\",\"level\":\"INFO\",\"message\":\"request\"");
    let text = |out: &mut Vec<u8>, key: &str, value: &dyn fmt::Display| {
        write!(out, ",\"{key}\":\"")?;
        write!(JsonEscaped(out), "{value}")?;
        out.push(b'"');
        Ok::<(), std::io::Error>(())
    };
    text(out, "client", &OrDash(l.client))?;
    text(out, "peer", &OrDash(l.peer))?;
    text(out, "route", &l.route)?;
    text(out, "method", &l.method)?;
    text(out, "path", &l.path)?;
    for (key, value) in numbers(l) {
        write!(out, ",\"{key}\":{value}")?;
    }
    text(out, "correlation_id", &l.correlation_id.unwrap_or("-"))?;
    if let Some(error) = l.error {
        text(out, "error", &error)?;
    }
    writeln!(out, ",\"target\":\"{TARGET}\"}}")
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

/// RFC 3339 in UTC to the microsecond, as `tracing_subscriber`'s default timer writes it.
fn write_timestamp(out: &mut Vec<u8>, now: SystemTime) -> std::io::Result<()> {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    write!(
        out,
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        since.subsec_micros()
    )
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The value, or `-` when there is none.
struct OrDash<T>(Option<T>);

impl<T: fmt::Display> fmt::Display for OrDash<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("-"),
        }
    }
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

/// Writes what it is given as the inside of a JSON string.
struct JsonEscaped<'a>(&'a mut Vec<u8>);

impl std::io::Write for JsonEscaped<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            match b {
                b'"' => self.0.extend_from_slice(b"\\\""),
                b'\\' => self.0.extend_from_slice(b"\\\\"),
                b'\n' => self.0.extend_from_slice(b"\\n"),
                b'\r' => self.0.extend_from_slice(b"\\r"),
                b'\t' => self.0.extend_from_slice(b"\\t"),
                0..0x20 => write!(self.0, "\\u{b:04x}")?,
                _ => self.0.push(b),
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Access lines are gathered and written out together, at most [`FLUSH_EVERY`] after they were
/// logged (nginx's `access_log ... buffer= flush=`): one write per request was a tenth of the
/// proxy's cost per request. Other log lines are written at once, after any access lines
/// before them, so the log keeps its order.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Gathered lines are written out once they take this much.
pub const FLUSH_BYTES: usize = 32 * 1024;

/// Lines waiting to be written to `out`, and `out`.
pub struct Buffered<W> {
    pending: std::sync::Mutex<Vec<u8>>,
    out: std::sync::Mutex<W>,
}

impl<W: std::io::Write> Buffered<W> {
    pub const fn new(out: W) -> Buffered<W> {
        Buffered {
            pending: std::sync::Mutex::new(Vec::new()),
            out: std::sync::Mutex::new(out),
        }
    }

    /// Adds an access line; writes them all out when they take [`FLUSH_BYTES`].
    pub fn access(&self, line: &[u8]) -> std::io::Result<()> {
        let mut pending = lock(&self.pending);
        pending.extend_from_slice(line);
        if pending.len() < FLUSH_BYTES {
            return Ok(());
        }
        let mut out = lock(&self.out);
        let written = out.write_all(&pending);
        pending.clear();
        written
    }

    /// Writes another line at once, after the access lines waiting.
    pub fn other(&self, line: &[u8]) -> std::io::Result<()> {
        let mut pending = lock(&self.pending);
        let mut out = lock(&self.out);
        let written = out.write_all(&pending);
        pending.clear();
        written.and_then(|()| out.write_all(line))
    }

    /// Writes out the access lines waiting.
    pub fn flush(&self) {
        let mut pending = lock(&self.pending);
        if pending.is_empty() {
            return;
        }
        let _ = lock(&self.out).write_all(&pending);
        pending.clear();
        // Memory for a burst's lines is not kept for ever.
        pending.shrink_to(FLUSH_BYTES);
    }

    pub fn into_inner(self) -> W {
        self.out.into_inner().unwrap_or_else(|e| e.into_inner())
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

/// Writes out the access lines waiting: called before the process exits, and every
/// [`FLUSH_EVERY`] by [`start_flusher`].
pub fn flush() {
    STDERR.flush();
}

/// Starts the thread that writes waiting access lines out every [`FLUSH_EVERY`].
pub fn start_flusher() {
    let _ = std::thread::Builder::new()
        .name("access-log".into())
        .spawn(|| loop {
            std::thread::sleep(FLUSH_EVERY);
            flush();
        });
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
        assert!(lock(&b.out).is_empty(), "held");
        b.other(b"warn\n").unwrap();
        assert_eq!(&*lock(&b.out), b"a1\na2\nwarn\n", "in the order logged");
        b.access(b"a3\n").unwrap();
        b.flush();
        assert_eq!(&lock(&b.out)[11..], b"a3\n");

        let line = vec![b'x'; 1000];
        for _ in 0..FLUSH_BYTES / 1000 {
            b.access(&line).unwrap();
        }
        assert_eq!(lock(&b.out).len(), 14, "not yet");
        b.access(&line).unwrap();
        assert_eq!(
            b.into_inner().len(),
            14 + FLUSH_BYTES + 1000 - FLUSH_BYTES % 1000
        );
    }
}
