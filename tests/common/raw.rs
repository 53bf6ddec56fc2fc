//! One HTTP/1.1 answer read off a raw stream, for the tests that write their requests by hand
//! (the admin listener's limits, the client edge's timers and cap).

use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;

/// An answer as read off the wire.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// Lower-cased.
    pub head: String,
    pub body: String,
}

impl RawAnswer {
    pub fn header(&self, name: &str) -> Option<&str> {
        let prefix = format!("{}:", name.to_ascii_lowercase());
        self.head
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .map(str::trim)
    }
}

/// Reads one answer: the head, then `Content-Length` bytes of body. `None` when the connection
/// closes (or fails) first, or after 5 s.
pub async fn read_answer(s: &mut (impl AsyncRead + Unpin)) -> Option<RawAnswer> {
    let mut buf = Vec::new();
    let read = async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                if buf.len() >= end + 4 + len {
                    let status = head.split(' ').nth(1)?.parse().ok()?;
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    return Some(RawAnswer { status, head, body });
                }
            }
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

/// Waits until the peer closes `s` (or resets it); how long that took, `None` when it is still
/// open after `limit`. Bytes it sends first are appended to `got`.
pub async fn closed_within(
    s: &mut TcpStream,
    limit: Duration,
    got: &mut Vec<u8>,
) -> Option<Duration> {
    let t = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        let left = limit.checked_sub(t.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}
