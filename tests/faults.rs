//! Faults from the clients' side that must not grow the proxy without bound. Starts the real
//! binary on loopback in front of a minimal upstream of its own (a fixed 200 on keep-alive
//! connections: the emulator's work would only slow the test down).
//!
//! - rotating tokens: 100,000 distinct bearer tokens, one request each, through a per-token
//!   budget with `max_keys: 1000`: every request is answered 200, the budget never holds more
//!   than 1000 keys, and the process's resident memory stays flat.

mod common;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::Method;
use shiftgate::loadtest::client::AgentConnection;
use shiftgate::loadtest::Target;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use common::{get, json, send, ProxyConfig, ProxyProcess};

const TOKENS: usize = 100_000;
const CONNECTIONS: usize = 50;
const MAX_KEYS: u64 = 1000;

/// An upstream that answers every request head with `200 ok`, keeping the connection.
async fn fixed_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    // The end of a request head (the requests here have no body).
                    if line.is_empty() {
                        let answer = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}";
                        if write.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    addr
}

/// The resident set of process `pid`, in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/<pid>/status")
}

/// The per-token budget's keys, from `/status.json`.
async fn keys(proxy: &ProxyProcess) -> u64 {
    let a = get(proxy.admin(), "/status.json").await.unwrap();
    let v = json(&a);
    v["budgets"]
        .as_array()
        .and_then(|b| b.iter().find(|b| b["name"] == "per-token"))
        .and_then(|b| b["keys"].as_u64())
        .expect("per-token in /status.json")
}

/// Sends tokens `from..to` over `CONNECTIONS` keep-alive connections, one request per token;
/// asserts each is answered 200.
async fn send_tokens(addr: SocketAddr, from: usize, to: usize) {
    let mut clients = Vec::new();
    for c in 0..CONNECTIONS {
        clients.push(tokio::spawn(async move {
            let mut conn = AgentConnection::new(Target::parse(&format!("http://{addr}")).unwrap());
            for i in (from + c..to).step_by(CONNECTIONS) {
                let token = format!("Bearer rotating-{i:06}");
                let a = send(
                    &mut conn,
                    Method::GET,
                    "/api/v2/users/me",
                    &[("Authorization", &token)],
                    Bytes::new(),
                )
                .await
                .unwrap();
                assert_eq!(a.status, 200, "token {i}");
            }
        }));
    }
    for c in clients {
        c.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotating_tokens_keep_the_key_table_and_memory_bounded() {
    let upstream = fixed_upstream().await;
    let config = ProxyConfig::new()
        .budget(
            "per-token",
            &format!(r#"{{ rate: "300/min", per: token, max_keys: {MAX_KEYS} }}"#),
        )
        .route(r#"{ name: default, match: { path: "/**" }, budgets: [per-token] }"#);
    let proxy = ProxyProcess::start(&config, upstream).await;
    let pid = proxy.pid();

    // Warm up: the table fills to max_keys, connections and buffers are made.
    let started = Instant::now();
    let warm = 10_000;
    send_tokens(proxy.addr(), 0, warm).await;
    let rss_warm = vm_rss_kib(pid);
    let keys_warm = keys(&proxy).await;
    let half = (warm + TOKENS) / 2;
    send_tokens(proxy.addr(), warm, half).await;
    let rss_half = vm_rss_kib(pid);
    send_tokens(proxy.addr(), half, TOKENS).await;
    let took = started.elapsed();
    let rss_end = vm_rss_kib(pid);
    let keys_end = keys(&proxy).await;
    let growth = rss_end as i64 - rss_warm as i64;
    println!(
        "{TOKENS} tokens in {:.1} s ({:.0}/s); per-token keys {keys_warm} after {warm}, \
         {keys_end} after {TOKENS}; VmRSS {rss_warm} KiB after {warm}, {rss_half} KiB after \
         {half}, {rss_end} KiB after \
         {TOKENS} ({growth:+} KiB, {:.1} bytes per token since the warm-up)",
        took.as_secs_f64(),
        TOKENS as f64 / took.as_secs_f64(),
        growth as f64 * 1024.0 / (TOKENS - warm) as f64,
    );
    assert!(keys_warm <= MAX_KEYS && keys_end <= MAX_KEYS);
    // Unbounded, 90,000 more keys would be some 35 MiB (400 bytes each, benches/keys.rs)
    // before the hash table's growth: allow a quarter of that for allocator noise.
    assert!(
        growth < 8 * 1024,
        "VmRSS grew by {growth} KiB over {} tokens",
        TOKENS - warm
    );
}
