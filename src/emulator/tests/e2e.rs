//! End to end: the server over loopback sockets in real time, bytes on the wire checked.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::{handshake, SendRequest};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::*;
use crate::digest::sha256_hex;

async fn start(yaml: &str) -> Emulator {
    let config = EmulatorConfig::from_yaml_str(yaml).unwrap();
    Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .unwrap()
}

async fn connect(emulator: &Emulator) -> SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(emulator.local_addr()).await.unwrap();
    let (sender, connection) = handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

fn request(
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> http::Request<Full<Bytes>> {
    let mut builder = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.example.test");
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder.body(Full::new(Bytes::from(body))).unwrap()
}

/// Sends raw bytes on a fresh connection and reads until the server closes it.
async fn raw_exchange(emulator: &Emulator, request: &str) -> String {
    let mut stream = TcpStream::connect(emulator.local_addr()).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 8192];
    // A reset fault may end the stream with an error rather than EOF; keep what came.
    while let Ok(n @ 1..) = stream.read(&mut buf).await {
        answer.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(answer).unwrap()
}

#[tokio::test]
async fn the_429_on_the_wire_has_genesys_header_spelling_and_body() {
    let emulator = start("").await;
    emulator.add_fault(Fault::new(FaultKind::Outage429 {
        retry_after: Some(42),
    }));
    let answer = raw_exchange(
        &emulator,
        "GET /api/v2/presence/definitions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nConnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    let lines: Vec<&str> = head.lines().collect();
    assert_eq!(lines[0], "HTTP/1.1 429 Too Many Requests");
    assert!(lines.contains(&"Retry-After: 42"), "{head}");
    assert!(lines.contains(&"Content-Type: application/json"), "{head}");
    let correlation = lines
        .iter()
        .find_map(|l| l.strip_prefix("ININ-Correlation-Id: "))
        .unwrap_or_else(|| panic!("ININ-Correlation-Id spelled as Genesys does: {head}"));
    assert_eq!(body, expected_429_body(42, correlation));
    assert!(!head.to_ascii_lowercase().contains("ratelimit"), "{head}");
    emulator.shutdown().await;
}

#[tokio::test]
async fn bodies_arrive_byte_exact_on_a_kept_alive_connection() {
    let emulator = start("").await;
    let mut client = connect(&emulator).await;
    // Not valid UTF-8 and larger than one read buffer: the hash proves every byte arrived.
    let body: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    for _ in 0..3 {
        let answer = client
            .send_request(request(
                "PATCH",
                PATCH_PATH,
                &[("authorization", "Bearer t")],
                body.clone(),
            ))
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "not JSON");
        assert_eq!(
            answer.headers()["x-emulator-body-sha256"],
            sha256_hex(&body).as_str()
        );
        assert_eq!(answer.headers()["x-emulator-host"], "api.example.test");
        answer.into_body().collect().await.unwrap();
    }
    assert_eq!(
        emulator.stats().total_requests,
        3,
        "three requests, one connection"
    );
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_body_over_the_limit_gets_413_and_is_still_hashed() {
    let emulator = start("max_body_bytes: 1000\n").await;
    let mut client = connect(&emulator).await;
    let body = vec![b'x'; 1001];
    let answer = client
        .send_request(request(
            "PUT",
            "/api/v2/users/presences/bulk",
            &[("authorization", "Bearer t")],
            body.clone(),
        ))
        .await
        .unwrap();
    assert_eq!(answer.status(), 413);
    assert_eq!(
        answer.headers()["x-emulator-body-sha256"],
        sha256_hex(&body).as_str()
    );
    let bytes = answer.into_body().collect().await.unwrap().to_bytes();
    let json: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["code"], "request.entity.too.large");
    emulator.shutdown().await;
}

#[tokio::test]
async fn a_reset_fault_sends_the_head_and_part_of_the_body_then_closes() {
    let emulator = start("").await;
    let added = raw_exchange(
        &emulator,
        "POST /_emulator/faults HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 16\r\nConnection: close\r\n\r\n{\"kind\":\"reset\"}",
    )
    .await;
    assert!(added.starts_with("HTTP/1.1 200 OK"), "{added}");

    let answer = raw_exchange(
        &emulator,
        "GET /api/v2/presence/definitions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n\r\n",
    )
    .await;
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .expect("a Content-Length")
        .parse()
        .unwrap();
    assert!(
        !body.is_empty() && body.len() < length,
        "{} of {length} body bytes before the close",
        body.len()
    );

    // The same through a client: it sees the head, then a broken body.
    let mut client = connect(&emulator).await;
    let answer = client
        .send_request(request(
            "GET",
            "/api/v2/presence/definitions",
            &[("authorization", "Bearer t")],
            Vec::new(),
        ))
        .await
        .unwrap();
    assert!(answer.into_body().collect().await.is_err());
    emulator.shutdown().await;
}

#[tokio::test]
async fn stats_are_served_and_reset_over_http() {
    let emulator = start("").await;
    let mut client = connect(&emulator).await;
    for _ in 0..2 {
        let answer = client
            .send_request(request(
                "GET",
                "/api/v2/presence/definitions",
                &[("authorization", "Bearer t")],
                Vec::new(),
            ))
            .await
            .unwrap();
        answer.into_body().collect().await.unwrap();
    }
    let answer = client
        .send_request(request("GET", "/_emulator/stats", &[], Vec::new()))
        .await
        .unwrap();
    let bytes = answer.into_body().collect().await.unwrap().to_bytes();
    let snap: StatsSnapshot = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(snap.count("definitions", 200), 2);
    assert_eq!(snap.timeline[0].requests, 2);
    assert_eq!(snap.total_requests, emulator.stats().total_requests);

    emulator.reset_stats();
    assert_eq!(emulator.stats().total_requests, 0);
    emulator.shutdown().await;
}

#[tokio::test]
async fn shutdown_closes_the_port_and_idle_kept_alive_connections() {
    let emulator = start("").await;
    let addr = emulator.local_addr();
    let mut idle = connect(&emulator).await;
    let answer = idle
        .send_request(request(
            "GET",
            "/api/v2/presence/definitions",
            &[("authorization", "Bearer t")],
            Vec::new(),
        ))
        .await
        .unwrap();
    answer.into_body().collect().await.unwrap();

    emulator.shutdown().await;
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "nothing listens any more"
    );
    let again = idle
        .send_request(request(
            "GET",
            "/api/v2/presence/definitions",
            &[("authorization", "Bearer t")],
            Vec::new(),
        ))
        .await;
    assert!(again.is_err(), "the kept-alive connection was closed too");
}

#[tokio::test]
async fn start_refuses_an_invalid_config_built_in_code() {
    let config = EmulatorConfig {
        max_body_bytes: 0,
        ..EmulatorConfig::default()
    };
    let err = Emulator::start("127.0.0.1:0".parse().unwrap(), config)
        .await
        .err()
        .expect("refused");
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("max_body_bytes"), "{err}");
}

#[tokio::test]
async fn run_cli_reports_a_config_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.yaml");
    let err = run_cli(Some("127.0.0.1:0".parse().unwrap()), Some(missing.clone()))
        .await
        .unwrap_err();
    assert!(format!("{err:#}").contains("missing.yaml"), "{err:#}");

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "latency: { min: fast }\n").unwrap();
    let err = run_cli(None, Some(bad)).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("invalid duration \"fast\""),
        "{err:#}"
    );
}
