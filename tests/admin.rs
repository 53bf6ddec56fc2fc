//! The admin listener fails closed: bodies over 4 KiB are refused (413) before a reload, a
//! client that trickles its request head (or a reload's body) is cut off and an idle one closed,
//! connections past the cap are closed at once while those open keep being served, and a reload
//! that finds the admin token's variable unset is refused and keeps the old config (and its
//! token).
//!
//! The listener runs in this process on port 0 (`admin::serve_with`), over real sockets and real
//! time, with the production limits unless a test says otherwise; raw HTTP/1.1 on the client
//! side, so that a test sends exactly the bytes it means to. Every wait is a bounded poll.
//! Run with `--test-threads=1`: the timings leave slack for a shared machine, not for a
//! second test.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use shiftgate::admin::{self, AdminLimits, MAX_BODY_BYTES, MAX_CONNECTIONS};
use shiftgate::config::Config;
use shiftgate::state::State;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use common::raw::{closed_within, read_answer, RawAnswer};

/// A config with one budget whose rate tells which file is in force.
fn config(rate: &str, extra: &str) -> String {
    format!(
        "listen: \"127.0.0.1:1\"\nadmin_listen: \"127.0.0.1:2\"\n{extra}\
         upstreams:\n  api: {{ url: \"http://127.0.0.1:9\" }}\n\
         budgets:\n  presence: {{ rate: \"{rate}\" }}\n\
         routes:\n  - name: all\n    match: {{ path: \"/**\" }}\n    budgets: [presence]\n\
         reload:\n  watch_file: false\n"
    )
}

/// An admin listener serving `state`, and the file its reloads read.
struct Admin {
    addr: SocketAddr,
    state: Arc<State>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Admin {
    /// Serves `yaml` (validated with `env` as the environment) with `limits`.
    async fn start(yaml: &str, env: &dyn Fn(&str) -> Option<String>, limits: AdminLimits) -> Admin {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let config = Config::parse_with_env(yaml, env).unwrap();
        let state = State::new(config, path.clone());
        let listener = admin::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(admin::serve_with(
            listener,
            state.clone(),
            limits,
            std::future::pending(),
        ));
        Admin {
            addr,
            state,
            path,
            _dir: dir,
        }
    }

    async fn without_token(yaml: &str, limits: AdminLimits) -> Admin {
        Admin::start(yaml, &|_: &str| None, limits).await
    }

    fn rate(&self) -> f64 {
        self.state.config().budgets[0].rate.per_second
    }

    fn reloads(&self, result: &str) -> u64 {
        self.state
            .metrics()
            .config_reloads_total
            .with_label_values(&[result])
            .get()
    }
}

/// Sends `request` on a new connection and reads the answer.
async fn exchange(addr: SocketAddr, request: &[u8]) -> Option<RawAnswer> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    read_answer(&mut s).await
}

const HEALTHZ: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: admin\r\n\r\n";

/// A reload whose body is `len` bytes of `x`, sent with its length.
fn reload_request(len: usize) -> Vec<u8> {
    let mut r = format!("POST /-/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: {len}\r\n\r\n")
        .into_bytes();
    r.resize(r.len() + len, b'x');
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_body_over_4_kib_gets_413_and_the_config_is_not_reloaded() {
    let admin = Admin::without_token(&config("2/s", ""), AdminLimits::default()).await;
    // The file now says 7/s: any reload that went through would show.
    std::fs::write(&admin.path, config("7/s", "")).unwrap();

    // Declared too large: refused before a byte of the body is read (none is sent).
    let mut s = TcpStream::connect(admin.addr).await.unwrap();
    let head = format!(
        "POST /-/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: {}\r\n\r\n",
        MAX_BODY_BYTES + 1
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let a = read_answer(&mut s).await.expect("an answer");
    assert_eq!(a.status, 413, "{a:?}");
    assert!(a.head.contains("connection: close"), "{a:?}");
    assert!(a.body.contains("at most 4096 bytes"), "{a:?}");

    // Too large while streaming: chunked, no length up front. The whole request goes in one
    // write, so the listener has it all when it answers (no reset from unread bytes).
    let mut chunked =
        b"POST /-/reload HTTP/1.1\r\nHost: admin\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..5 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.resize(chunked.len() + 0x400, b'x');
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let a = exchange(admin.addr, &chunked).await.expect("an answer");
    assert_eq!(a.status, 413, "{a:?}");

    assert_eq!(admin.rate(), 2.0, "the old config stays in force");
    assert_eq!(admin.reloads("success"), 0);
    assert_eq!(admin.reloads("failure"), 0);

    // Up to the limit a body is read (and ignored): the reload goes through.
    let a = exchange(admin.addr, &reload_request(MAX_BODY_BYTES))
        .await
        .expect("an answer");
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(admin.rate(), 7.0);
    assert_eq!(admin.reloads("success"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_its_request_head_or_a_reload_body_is_cut_off() {
    let timeout = Duration::from_millis(400);
    let limits = AdminLimits {
        read_timeout: timeout,
        ..AdminLimits::default()
    };
    let admin = Admin::without_token(&config("2/s", ""), limits).await;

    // A head, one byte every 50 ms, never finished.
    let mut s = TcpStream::connect(admin.addr).await.unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nX-Slow: ")
        .await
        .unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    let cut_after = loop {
        if s.write_all(b"a").await.is_err() {
            break t.elapsed();
        }
        if let Some(d) = closed_within(&mut s, Duration::from_millis(50), &mut got).await {
            break t.elapsed().max(d);
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "still open after 5 s of trickling"
        );
    };
    println!("FIGURES trickled head cut off after {cut_after:?} (timeout {timeout:?})");
    assert!(
        cut_after >= timeout - Duration::from_millis(50),
        "{cut_after:?}"
    );
    assert!(
        !String::from_utf8_lossy(&got).contains(" 200 "),
        "answered: {got:?}"
    );

    // Meanwhile a client that sends its head at once is served; kept idle afterwards, its
    // connection is closed after the same time (the timer runs while a head is awaited).
    let mut s = TcpStream::connect(admin.addr).await.unwrap();
    s.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(&mut s).await.map(|a| a.status), Some(200));
    let idle = closed_within(&mut s, Duration::from_secs(5), &mut Vec::new()).await;
    println!("FIGURES idle keep-alive closed after {idle:?}");
    assert!(
        idle.is_some_and(|d| d >= timeout - Duration::from_millis(50)),
        "{idle:?}"
    );

    // A reload whose body stalls: 408 once the time is up, and no reload.
    std::fs::write(&admin.path, config("7/s", "")).unwrap();
    let mut s = TcpStream::connect(admin.addr).await.unwrap();
    let request = reload_request(100);
    s.write_all(&request[..request.len() - 90]).await.unwrap();
    let t = Instant::now();
    let a = read_answer(&mut s).await.expect("an answer");
    assert_eq!(a.status, 408, "{a:?}");
    assert!(t.elapsed() >= timeout - Duration::from_millis(50));
    assert_eq!(admin.rate(), 2.0);
    assert_eq!(admin.reloads("success") + admin.reloads("failure"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_connection_cap_new_connections_are_closed_and_healthz_recovers() {
    let admin = Admin::without_token(&config("2/s", ""), AdminLimits::default()).await;

    // MAX_CONNECTIONS keep-alive connections, each served once: all of them hold a slot.
    let mut open = Vec::new();
    for i in 0..MAX_CONNECTIONS {
        let mut s = TcpStream::connect(admin.addr).await.unwrap();
        s.write_all(HEALTHZ).await.unwrap();
        let a = read_answer(&mut s).await;
        assert_eq!(a.map(|a| a.status), Some(200), "connection {i}");
        open.push(s);
    }

    // One more: accepted and closed at once, unanswered.
    for _ in 0..3 {
        let mut s = TcpStream::connect(admin.addr).await.unwrap();
        let mut got = Vec::new();
        let closed = closed_within(&mut s, Duration::from_secs(2), &mut got).await;
        assert!(closed.is_some(), "a connection past the cap stays open");
        assert!(
            got.is_empty(),
            "answered: {}",
            String::from_utf8_lossy(&got)
        );
    }

    // Those open keep being served.
    let s = &mut open[MAX_CONNECTIONS - 1];
    s.write_all(HEALTHZ).await.unwrap();
    assert_eq!(read_answer(s).await.map(|a| a.status), Some(200));

    // Once they close, new connections are served again.
    drop(open);
    let t = Instant::now();
    loop {
        if exchange(admin.addr, HEALTHZ)
            .await
            .is_some_and(|a| a.status == 200)
        {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "/healthz did not recover within 5 s of the connections closing"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "FIGURES /healthz answered {:?} after the connections closed",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_finds_the_token_variable_unset_is_refused_and_keeps_the_old_config() {
    // No process sets this variable; the running config got its token from the test's lookup.
    let var = "SHIFTGATE_TEST_ADMIN_TOKEN_NEVER_SET";
    assert!(std::env::var_os(var).is_none());
    let token_cfg = |rate: &str| config(rate, &format!("admin_token_env: {var}\n"));
    let env = |name: &str| (name == var).then(|| "s3cret".to_string());
    let admin = Admin::start(&token_cfg("2/s"), &env, AdminLimits::default()).await;

    // The reload reads the process's environment, where the variable is unset.
    std::fs::write(&admin.path, token_cfg("7/s")).unwrap();
    let reload = |auth: &str| {
        format!("POST /-/reload HTTP/1.1\r\nHost: admin\r\n{auth}Content-Length: 0\r\n\r\n")
    };
    let a = exchange(
        admin.addr,
        reload("Authorization: Bearer s3cret\r\n").as_bytes(),
    )
    .await
    .expect("an answer");
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body.contains(&format!(
            "admin_token_env: environment variable {var} is unset"
        )),
        "{a:?}"
    );
    assert_eq!(admin.rate(), 2.0, "the old config stays in force");
    assert_eq!(admin.reloads("failure"), 1);

    // And with it the old token: no token, no reload.
    let a = exchange(admin.addr, reload("").as_bytes())
        .await
        .expect("an answer");
    assert_eq!(a.status, 401, "{a:?}");
    assert_eq!(admin.reloads("failure"), 1);
}
