//! The client edge, end to end: the real binary in front of an upstream that answers every
//! request `200 {}`. An idle keep-alive connection is closed after `limits.client_idle_timeout`;
//! a request head trickled a byte at a time (the first on a connection, or a later one) is cut
//! off after `limits.client_header_timeout`; past `limits.max_connections` a new connection gets
//! `503 shiftgate.overloaded` and is closed while those open keep being served; and the HTTPS
//! listener serves the certificate pair in force, a new one after a reload, and keeps the old
//! one when the new files are broken.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::raw::{closed_within, read_answer};
use common::*;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use shiftgate::harness::ReservedPort;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// An upstream answering every request `200 {}`; stopped on drop.
struct Upstream {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Upstream {
    async fn start() -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async {
                        let _ = req.into_body().collect().await;
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from_static(
                            b"{}",
                        ))))
                    },
                );
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream { addr, task }
    }
}

/// One route for everything, unpaced, and `limits` as given (YAML lines under `limits:`).
fn config(limits: &str) -> ProxyConfig {
    ProxyConfig::new()
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml(&format!("limits:\n{limits}"))
}

const GET: &[u8] = b"GET /api/v2/users/me HTTP/1.1\r\nHost: proxy\r\n\r\n";

/// A request on `s` and its answer's status.
async fn status_of(s: &mut (impl AsyncRead + AsyncWrite + Unpin), request: &[u8]) -> Option<u16> {
    s.write_all(request).await.ok()?;
    read_answer(s).await.map(|a| a.status)
}

/// Writes `rest` a byte every 50 ms until the connection is closed; how long after the first
/// byte that was. Panics if it is still open after 5 s.
async fn trickle_until_closed(s: &mut TcpStream, rest: &[u8]) -> (Duration, Vec<u8>) {
    let t = Instant::now();
    let mut got = Vec::new();
    for byte in rest.iter().cycle() {
        if s.write_all(&[*byte]).await.is_err() {
            return (t.elapsed(), got);
        }
        if closed_within(s, Duration::from_millis(50), &mut got)
            .await
            .is_some()
        {
            return (t.elapsed(), got);
        }
        assert!(t.elapsed() < Duration::from_secs(5), "still open after 5 s");
    }
    unreachable!()
}

const CONNECTIONS_PLAIN: &str = r#"shiftgate_connections{listener="plain"}"#;
const CONNECTIONS_TLS: &str = r#"shiftgate_connections{listener="tls"}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let upstream = Upstream::start().await;
    let idle = Duration::from_millis(600);
    let proxy = ProxyProcess::start(
        &config("  client_idle_timeout: \"600ms\"\n  client_header_timeout: \"5s\""),
        upstream.addr,
    )
    .await;

    // Two requests on one connection: kept alive between them.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(status_of(&mut s, GET).await, Some(200));
    tokio::time::sleep(idle / 3).await;
    assert_eq!(status_of(&mut s, GET).await, Some(200));
    assert_eq!(proxy.metric(CONNECTIONS_PLAIN).await, 1.0);

    // Then nothing: closed once the idle timeout has passed, and no longer counted.
    let closed = closed_within(&mut s, Duration::from_secs(5), &mut Vec::new()).await;
    println!("FIGURES idle keep-alive closed after {closed:?} (client_idle_timeout {idle:?})");
    let closed = closed.expect("closed");
    assert!(closed >= idle - Duration::from_millis(50), "{closed:?}");
    assert!(closed < idle + Duration::from_secs(1), "{closed:?}");
    proxy
        .wait_for_metric(CONNECTIONS_PLAIN, Duration::from_secs(2), |v| v == 0.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_trickled_a_byte_at_a_time_is_cut_off_after_the_header_timeout() {
    let upstream = Upstream::start().await;
    let header = Duration::from_millis(600);
    let proxy = ProxyProcess::start(
        &config("  client_header_timeout: \"600ms\"\n  client_idle_timeout: \"10s\""),
        upstream.addr,
    )
    .await;

    // The first request of a connection: the time runs from the connection's start.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    let (cut, got) = trickle_until_closed(&mut s, b"GET / HTTP/1.1\r\nX-Slow: aaaa").await;
    println!(
        "FIGURES first head trickled, cut off after {cut:?} (client_header_timeout {header:?})"
    );
    assert!(cut >= header - Duration::from_millis(50), "{cut:?}");
    assert!(cut < header + Duration::from_secs(1), "{cut:?}");
    assert!(
        got.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&got)
    );

    // A later request on a kept-alive connection: idle a while (longer than the header timeout,
    // shorter than the idle one), then a trickled head, cut off that long after its first byte.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(status_of(&mut s, GET).await, Some(200));
    tokio::time::sleep(header * 2).await;
    let (cut, got) = trickle_until_closed(&mut s, b"GET / HTTP/1.1\r\nX-Slow: aaaa").await;
    println!(
        "FIGURES second head trickled, cut off after {cut:?} (client_header_timeout {header:?})"
    );
    assert!(cut >= header - Duration::from_millis(50), "{cut:?}");
    assert!(cut < header + Duration::from_secs(1), "{cut:?}");
    assert!(
        got.is_empty(),
        "answered: {}",
        String::from_utf8_lossy(&got)
    );

    // Meanwhile a head sent at once is served, on a connection opened long ago.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(status_of(&mut s, GET).await, Some(200));
    proxy
        .wait_for_metric(CONNECTIONS_PLAIN, Duration::from_secs(2), |v| v == 1.0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_a_new_connection_gets_503_overloaded_and_is_closed() {
    let upstream = Upstream::start().await;
    let proxy = ProxyProcess::start(&config("  max_connections: 3"), upstream.addr).await;
    // The start's readiness probe is no longer counted.
    proxy
        .wait_for_metric(CONNECTIONS_PLAIN, Duration::from_secs(2), |v| v == 0.0)
        .await;

    // Three keep-alive connections, each served once: all of them hold a place.
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(status_of(&mut s, GET).await, Some(200), "connection {i}");
        open.push(s);
    }
    assert_eq!(proxy.metric(CONNECTIONS_PLAIN).await, 3.0);

    // A fourth: 503 shiftgate.overloaded with Retry-After, then closed.
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    s.write_all(GET).await.unwrap();
    let a = read_answer(&mut s).await.expect("an answer");
    assert_eq!(a.status, 503, "{a:?}");
    let v: serde_json::Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(v["code"], "shiftgate.overloaded");
    assert_eq!(v["status"], 503);
    assert_eq!(a.header("ININ-Correlation-Id"), v["contextId"].as_str());
    assert_eq!(a.header("Retry-After"), Some("1"));
    assert_eq!(a.header("Connection"), Some("close"));
    assert!(
        closed_within(&mut s, Duration::from_secs(2), &mut Vec::new())
            .await
            .is_some(),
        "a connection past the cap stays open"
    );
    let refused = r#"shiftgate_rejections_total{reason="overloaded",route="none"}"#;
    assert_eq!(proxy.metric(refused).await, 1.0);

    // Those open keep being served.
    for s in &mut open {
        assert_eq!(status_of(s, GET).await, Some(200));
    }
    assert_eq!(proxy.metric(CONNECTIONS_PLAIN).await, 3.0);

    // One closes: its place is free again.
    drop(open.pop());
    proxy
        .wait_for_metric(CONNECTIONS_PLAIN, Duration::from_secs(2), |v| v == 2.0)
        .await;
    let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
    assert_eq!(status_of(&mut s, GET).await, Some(200));
    assert_eq!(proxy.metric(CONNECTIONS_PLAIN).await, 3.0);
    drop(s);
    drop(open);
    proxy
        .wait_for_metric(CONNECTIONS_PLAIN, Duration::from_secs(2), |v| v == 0.0)
        .await;
}

/// A self-signed pair for `localhost`, written to `cert` and `key`; its certificate.
fn write_pair(cert: &Path, key: &Path) -> rustls::pki_types::CertificateDer<'static> {
    let c = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(cert, c.cert.pem()).unwrap();
    std::fs::write(key, c.key_pair.serialize_pem()).unwrap();
    c.cert.der().clone()
}

/// A TLS client trusting exactly `roots`. It never resumes a session: a resumed handshake
/// presents no certificate (the client reports the one it saw first).
fn tls_client(roots: &[rustls::pki_types::CertificateDer<'static>]) -> tokio_rustls::TlsConnector {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root.clone()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A GET over HTTPS on a new connection: the certificate the proxy presented, and the status.
async fn https_get(
    client: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> (rustls::pki_types::CertificateDer<'static>, Option<u16>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = client.connect(name, tcp).await.expect("TLS handshake");
    let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    (cert, status_of(&mut tls, GET).await)
}

async fn reload(proxy: &ProxyProcess) -> (u16, String) {
    let mut s = TcpStream::connect(proxy.admin()).await.unwrap();
    s.write_all(b"POST /-/reload HTTP/1.1\r\nHost: admin\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    let a = read_answer(&mut s).await.expect("a reload answer");
    (a.status, a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_the_pair_in_force_a_reload_swaps_it_and_a_broken_one_is_refused() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    let first = write_pair(&cert, &key);
    let port = ReservedPort::loopback().unwrap();
    let tls = format!(
        "tls:\n  listen: \"{}\"\n  cert: {}\n  key: {}",
        port.addr(),
        cert.display(),
        key.display()
    );
    let proxy =
        ProxyProcess::start(&config("  max_connections: 100").yaml(&tls), upstream.addr).await;

    // HTTPS, with the first pair; plain HTTP as before.
    let second_cert_path = dir.path().join("second.crt");
    let second = write_pair(&second_cert_path, &dir.path().join("second.key"));
    let client = tls_client(&[first.clone(), second.clone()]);
    let (served, status) = https_get(&client, port.addr()).await;
    assert_eq!(status, Some(200));
    assert!(served == first, "not the first certificate");
    assert_eq!(common::get(proxy.addr(), "/x").await.unwrap().status, 200);

    // An open HTTPS connection counts under its listener.
    let tcp = TcpStream::connect(port.addr()).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut held = client.connect(name, tcp).await.unwrap();
    assert_eq!(status_of(&mut held, GET).await, Some(200));
    assert_eq!(proxy.metric(CONNECTIONS_TLS).await, 1.0);
    drop(held);
    proxy
        .wait_for_metric(CONNECTIONS_TLS, Duration::from_secs(2), |v| v == 0.0)
        .await;

    // The files replaced with the second pair, then a reload: new handshakes get it.
    std::fs::copy(&second_cert_path, &cert).unwrap();
    std::fs::copy(dir.path().join("second.key"), &key).unwrap();
    let (status, body) = reload(&proxy).await;
    assert_eq!(status, 200, "{body}");
    let (served, status) = https_get(&client, port.addr()).await;
    assert_eq!(status, Some(200));
    assert!(
        served == second,
        "not the second certificate after the reload"
    );

    // A key that is not PEM: the reload says why and the second pair stays in force.
    std::fs::write(&key, "not a key\n").unwrap();
    let (status, body) = reload(&proxy).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body.contains(&format!(
            "tls.key: {} holds no PEM private key",
            key.display()
        )),
        "{body}"
    );
    let (served, status) = https_get(&client, port.addr()).await;
    assert_eq!(status, Some(200));
    assert!(served == second, "the pair changed after a failed reload");
    proxy
        .wait_for_log(Duration::from_secs(2), |l| {
            l.contains("config reload failed") || l.contains("holds no PEM private key")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_and_check_refuse_a_broken_pair_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    write_pair(&cert, &key);
    std::fs::write(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let text = ProxyConfig::new()
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml(&format!(
            "tls:\n  listen: \"127.0.0.1:0\"\n  cert: {}\n  key: {}",
            cert.display(),
            key.display()
        ))
        .render(
            "127.0.0.1:1".parse().unwrap(),
            "127.0.0.1:2".parse().unwrap(),
            "127.0.0.1:3".parse().unwrap(),
        );
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, text).unwrap();
    for command in ["check", "run"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
            .args([command, "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{command}: {stderr}");
        let says = format!(
            "tls.cert: {} does not hold a valid certificate chain",
            cert.display()
        );
        assert!(stderr.contains(&says), "{command}: {stderr}");
    }
}
