//! An open-loop, constant-rate HTTP/1.1 load generator for loopback latency measurements: request
//! i is due at start + i/rate whether or not earlier ones were answered, and its latency counts
//! from that due time, so a stall in the server shows in the figures instead of slowing the load
//! (no coordinated omission).
//!
//! `constant_rate --target 127.0.0.1:PORT --rate 1000 --seconds 15 --warmup 3 --connections 64`
//! prints one JSON object. Used by `benches/e2e/compare.py --only=latency`.
//!
//! With `--target` given more than once, every target gets the whole rate from the same pacer at
//! the same moments (target k's requests offset by k / (targets × rate)), and one JSON line is
//! printed per target, in the order given. The servers are then measured through the same
//! seconds of the machine's life: a stall of the machine, or of this generator, is in all of
//! them, so the difference between two targets' figures is the servers' own.
//!
//! A pool of keep-alive connections carries one request each at a time; a request that falls due
//! while every connection is busy waits for the next free one, its latency still counted from its
//! due time. The requests are written by hand and the answers parsed just enough to find their
//! end: an HTTP client library would be part of what is measured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Mutex};

/// A request that takes longer is counted as an error and its connection reopened: the run must
/// end even if the server stops answering.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
struct Args {
    /// The server, on loopback; repeat it to measure several side by side
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Requests per second, to each target
    #[arg(long)]
    rate: f64,
    /// Measured seconds, after the warm-up
    #[arg(long, default_value_t = 15.0)]
    seconds: f64,
    /// Seconds at the same rate before measuring (connections and caches warm)
    #[arg(long, default_value_t = 3.0)]
    warmup: f64,
    /// Keep-alive connections, one request in flight on each
    #[arg(long, default_value_t = 64)]
    connections: usize,
}

/// One due request, as the pacer hands it to the connections.
struct Job {
    due: Instant,
    /// False during the warm-up: sent, but not counted.
    measured: bool,
}

/// What one connection measured.
#[derive(Default)]
struct Tally {
    /// Nanoseconds from due time to the end of a 200 answer.
    latencies: Vec<u64>,
    /// Nanoseconds from due time to the first byte written: the generator's own lateness.
    send_lags: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
    last_done: Option<Instant>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for target in &args.target {
        anyhow::ensure!(
            target.ip().is_loopback(),
            "--target must be a loopback address, not {target}"
        );
    }
    anyhow::ensure!(args.rate > 0.0, "--rate must be above 0");
    anyhow::ensure!(args.connections > 0, "--connections must be at least 1");
    // One thread is enough at these rates, and leaves the other core to the server measured.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for report in runtime.block_on(run(&args)) {
        println!("{report}");
    }
    Ok(())
}

async fn run(args: &Args) -> Vec<serde_json::Value> {
    let mut senders = Vec::with_capacity(args.target.len());
    let mut pools = Vec::with_capacity(args.target.len());
    for &target in &args.target {
        let request = format!(
            "GET /api/v2/presence/definitions HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer bench\r\n\r\n"
        );
        let request: Arc<[u8]> = request.into_bytes().into();
        let (tx, rx) = mpsc::unbounded_channel();
        let rx = Arc::new(Mutex::new(rx));
        // Connected before the clock starts, so that no measured request waits for a handshake.
        let mut workers = Vec::with_capacity(args.connections);
        for _ in 0..args.connections {
            let mut conn = Conn::new(target);
            // A failed connect is retried by the first request on it, and counted there.
            let _ = conn.connect().await;
            workers.push(tokio::spawn(work(conn, rx.clone(), request.clone())));
        }
        senders.push(tx);
        pools.push(workers);
    }

    let start = Instant::now() + Duration::from_millis(10);
    let measure_from = start + Duration::from_secs_f64(args.warmup);
    let total = ((args.warmup + args.seconds) * args.rate).round() as u64;
    let rate = args.rate;
    let pacer = std::thread::spawn(move || pace(senders, start, rate, total, measure_from));

    let mut tallies = Vec::with_capacity(pools.len());
    for workers in pools {
        tallies.push(gather(workers).await);
    }
    let sent = pacer.join().unwrap_or(0);
    args.target
        .iter()
        .zip(tallies)
        .map(|(target, all)| report(args, *target, sent, measure_from, all))
        .collect()
}

/// One target's connections' tallies, as one.
async fn gather(workers: Vec<tokio::task::JoinHandle<Tally>>) -> Tally {
    let mut all = Tally::default();
    for worker in workers {
        match worker.await {
            Ok(t) => {
                all.latencies.extend(t.latencies);
                all.send_lags.extend(t.send_lags);
                all.errors += t.errors;
                all.first_error = all.first_error.or(t.first_error);
                all.last_done = all.last_done.max(t.last_done);
            }
            Err(e) => {
                all.errors += 1;
                all.first_error.get_or_insert_with(|| e.to_string());
            }
        }
    }
    all
}

/// One target's figures.
fn report(
    args: &Args,
    target: SocketAddr,
    sent: u64,
    measure_from: Instant,
    mut all: Tally,
) -> serde_json::Value {
    if let Some(e) = &all.first_error {
        eprintln!(
            "constant_rate: {target}: {} errors, the first: {e}",
            all.errors
        );
    }
    all.latencies.sort_unstable();
    all.send_lags.sort_unstable();
    let elapsed = all.last_done.map_or(0.0, |t| {
        t.saturating_duration_since(measure_from).as_secs_f64()
    });
    let ok = all.latencies.len();
    let ms = |sorted: &[u64], p: f64| percentile(sorted, p) as f64 / 1e6;
    serde_json::json!({
        "target": target.to_string(),
        "rate": args.rate,
        "seconds": args.seconds,
        "connections": args.connections,
        "sent": sent,
        "ok": ok,
        "errors": all.errors,
        "achieved_rate": if elapsed > 0.0 { ok as f64 / elapsed } else { 0.0 },
        "p50_ms": ms(&all.latencies, 50.0),
        "p90_ms": ms(&all.latencies, 90.0),
        "p99_ms": ms(&all.latencies, 99.0),
        "p99_9_ms": ms(&all.latencies, 99.9),
        "max_ms": ms(&all.latencies, 100.0),
        "send_lag_p99_ms": ms(&all.send_lags, 99.0),
    })
}

/// Hands out request i to target k at start + (i + k / targets) / rate from a thread of its own:
/// tokio's timer has 1 ms granularity, as coarse as the latencies measured (at 5,000/s one is
/// due every 200 µs). Returns how many measured requests each target was handed.
fn pace(
    targets: Vec<mpsc::UnboundedSender<Job>>,
    start: Instant,
    rate: f64,
    total: u64,
    measure_from: Instant,
) -> u64 {
    // Linux lets a sleep overrun by 50 µs by default (timer slack); 1 ns asks for it on time.
    // SAFETY: PR_SET_TIMERSLACK takes an integer and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong);
    }
    let n = targets.len() as f64;
    let mut measured = 0;
    for i in 0..total {
        for (k, tx) in targets.iter().enumerate() {
            let due = start + Duration::from_secs_f64((i as f64 + k as f64 / n) / rate);
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            // Measured from the same request index on for every target.
            let job = Job {
                due,
                measured: start + Duration::from_secs_f64(i as f64 / rate) >= measure_from,
            };
            measured += u64::from(job.measured && k == 0);
            if tx.send(job).is_err() {
                return measured;
            }
        }
    }
    measured
}

/// One connection's loop: takes the next due request, sends it, waits for the whole answer.
async fn work(
    mut conn: Conn,
    jobs: Arc<Mutex<mpsc::UnboundedReceiver<Job>>>,
    request: Arc<[u8]>,
) -> Tally {
    let mut tally = Tally::default();
    loop {
        // Holding the lock while waiting is what makes the connections take turns: the others
        // queue on the lock, first come first served.
        let Some(job) = jobs.lock().await.recv().await else {
            return tally;
        };
        let sent_at = Instant::now();
        let result = tokio::time::timeout(ANSWER_TIMEOUT, conn.exchange(&request)).await;
        let done = Instant::now();
        let result = match result {
            Ok(Ok(200)) => Ok(()),
            Ok(Ok(status)) => Err(format!("status {status}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {ANSWER_TIMEOUT:?}")),
        };
        if result.is_err() {
            // An exchange cut short leaves the connection in an unknown state.
            conn.stream = None;
        }
        if !job.measured {
            continue;
        }
        tally.last_done = Some(done);
        match result {
            Ok(()) => {
                tally.latencies.push(nanos(done - job.due));
                tally
                    .send_lags
                    .push(nanos(sent_at.saturating_duration_since(job.due)));
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error.get_or_insert(e);
            }
        }
    }
}

/// A keep-alive connection and the bytes read from it that are not yet consumed.
struct Conn {
    target: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

/// How the body of an answer ends.
enum Body {
    Length(usize),
    Chunked,
    /// Neither length nor chunked: the body runs to the end of the connection.
    UntilClose,
}

impl Conn {
    fn new(target: SocketAddr) -> Self {
        Self {
            target,
            stream: None,
            buf: Vec::with_capacity(16 * 1024),
        }
    }

    async fn connect(&mut self) -> std::io::Result<()> {
        let stream = TcpStream::connect(self.target).await?;
        // Without it, Nagle holds a small request back until the previous answer's ACK.
        stream.set_nodelay(true)?;
        self.stream = Some(stream);
        self.buf.clear();
        Ok(())
    }

    /// Sends the request and reads the whole answer; returns its status.
    async fn exchange(&mut self, request: &[u8]) -> std::io::Result<u16> {
        if self.stream.is_none() {
            self.connect().await?;
        }
        self.stream_mut()?.write_all(request).await?;
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let (status, body, close) = parse_head(&self.buf[..head_end])?;
        self.buf.drain(..head_end);
        match body {
            Body::Length(n) => self.skip(n).await?,
            Body::Chunked => loop {
                let line = self.line().await?;
                let size = line.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).map_err(|_| invalid("chunk size"))?;
                if size == 0 {
                    // Trailers, if any, up to the empty line.
                    while !self.line().await?.is_empty() {}
                    break;
                }
                self.skip(size + 2).await?;
            },
            Body::UntilClose => {
                while self.fill().await.is_ok() {
                    self.buf.clear();
                }
            }
        }
        if close || matches!(body, Body::UntilClose) {
            self.stream = None;
        }
        Ok(status)
    }

    fn stream_mut(&mut self) -> std::io::Result<&mut TcpStream> {
        Ok(self
            .stream
            .as_mut()
            .ok_or(std::io::ErrorKind::NotConnected)?)
    }

    /// Reads at least one more byte into the buffer.
    async fn fill(&mut self) -> std::io::Result<()> {
        self.buf.reserve(8 * 1024);
        let stream = self
            .stream
            .as_mut()
            .ok_or(std::io::ErrorKind::NotConnected)?;
        match stream.read_buf(&mut self.buf).await? {
            0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => Ok(()),
        }
    }

    /// Consumes `n` bytes.
    async fn skip(&mut self, mut n: usize) -> std::io::Result<()> {
        loop {
            let take = n.min(self.buf.len());
            self.buf.drain(..take);
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// Consumes one CRLF-terminated line and returns it without the CRLF.
    async fn line(&mut self) -> std::io::Result<String> {
        loop {
            if let Some(i) = find(&self.buf, b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }
}

/// The status, how the body ends, and whether the server closes the connection after it.
fn parse_head(head: &[u8]) -> std::io::Result<(u16, Body, bool)> {
    let head = std::str::from_utf8(head).map_err(|_| invalid("answer head"))?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| {
            l.strip_prefix("HTTP/1.1 ")
                .or_else(|| l.strip_prefix("HTTP/1.0 "))
        })
        .and_then(|l| l.get(..3))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid("status line"))?;
    let (mut length, mut chunked) = (None, false);
    let mut close = head.starts_with("HTTP/1.0");
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse().map_err(|_| invalid("Content-Length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("connection") {
            close = value.eq_ignore_ascii_case("close");
        }
    }
    // Chunked wins over a Content-Length (RFC 9112 §6.3).
    let mut body = match (chunked, length) {
        (true, _) => Body::Chunked,
        (false, Some(n)) => Body::Length(n),
        (false, None) => Body::UntilClose,
    };
    // 1xx, 204 and 304 have no body whatever the headers say.
    if status < 200 || status == 204 || status == 304 {
        body = Body::Length(0);
    }
    Ok((status, body, close))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("unreadable {what}"),
    )
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Nearest-rank percentile of sorted values; 0 when there are none.
fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}
