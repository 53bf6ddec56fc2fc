//! `shiftgate health`: asks a running proxy's admin listener for `/readyz` and turns the answer
//! into an exit code (0: 200, serving; 1: anything else, draining or absent), so a container's
//! `HEALTHCHECK` needs no curl or wget in the image.
//!
//! The config is read only for `admin_listen`, without validating the rest: a config file being
//! edited, or one whose `admin_token_env` is not set in the probe's environment, must not make
//! a serving proxy look unhealthy.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::config::DEFAULT_ADMIN_LISTEN;

/// How long the probe may take, connect and answer together: below Docker's default
/// `HEALTHCHECK --timeout` (30 s) and the image's (3 s).
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the probe says "not ready".
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: admin_listen: {message}")]
    Config { path: String, message: String },
    #[error("GET http://{addr}/readyz: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("GET http://{addr}/readyz answered {status} (draining, or not yet serving)")]
    NotReady { addr: SocketAddr, status: u16 },
}

/// The address to probe for the config text: its `admin_listen` (default
/// [`DEFAULT_ADMIN_LISTEN`]), with an unspecified address (`0.0.0.0`, `[::]`) replaced by the
/// loopback address of its family.
///
/// ```
/// use shiftgate::health::admin_address;
///
/// assert_eq!(admin_address("listen: x\n").unwrap(), "127.0.0.1:9090".parse().unwrap());
/// assert_eq!(
///     admin_address("admin_listen: \"0.0.0.0:9191\"\n").unwrap(),
///     "127.0.0.1:9191".parse().unwrap()
/// );
/// assert_eq!(
///     admin_address("admin_listen: \"[::]:9191\"\n").unwrap(),
///     "[::1]:9191".parse().unwrap()
/// );
/// assert!(admin_address("admin_listen: nowhere\n").is_err());
/// ```
pub fn admin_address(config_text: &str) -> Result<SocketAddr, String> {
    let doc: serde_yaml::Value =
        serde_yaml::from_str(config_text).map_err(|e| format!("invalid YAML: {e}"))?;
    let written = match doc.get("admin_listen") {
        None | Some(serde_yaml::Value::Null) => DEFAULT_ADMIN_LISTEN,
        Some(v) => v
            .as_str()
            .ok_or("must be a string such as \"127.0.0.1:9090\"")?,
    };
    let addr: SocketAddr = written
        .parse()
        .map_err(|_| format!("\"{written}\" is not an address such as 127.0.0.1:9090"))?;
    Ok(match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::from((Ipv4Addr::LOCALHOST, addr.port()))
        }
        ip if ip.is_unspecified() => SocketAddr::from((Ipv6Addr::LOCALHOST, addr.port())),
        _ => addr,
    })
}

/// `GET /readyz` on `addr`: the answer's status.
pub fn readyz_status(addr: SocketAddr, timeout: Duration) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(
        format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )?;
    // The status line is all that is needed: "HTTP/1.1 200 OK".
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .filter(|_| line.starts_with("HTTP/1."))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })
}

/// The whole command: `Ok(addr)` when `/readyz` on the config's admin listener answers 200.
pub fn check(config_path: &Path) -> Result<SocketAddr, HealthError> {
    let path = config_path.display().to_string();
    let text = std::fs::read_to_string(config_path).map_err(|source| HealthError::Read {
        path: path.clone(),
        source,
    })?;
    let addr = admin_address(&text).map_err(|message| HealthError::Config { path, message })?;
    match readyz_status(addr, TIMEOUT) {
        Ok(200) => Ok(addr),
        Ok(status) => Err(HealthError::NotReady { addr, status }),
        Err(source) => Err(HealthError::Unreachable { addr, source }),
    }
}
