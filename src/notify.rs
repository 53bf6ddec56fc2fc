//! systemd's readiness protocol (`sd_notify`): one datagram of `KEY=value` lines to the unix
//! socket `$NOTIFY_SOCKET` names; without that variable (not under `Type=notify`, in a
//! container, in a test) every call does nothing.
//!
//! A few lines of std instead of a crate: the protocol is one `sendto`. Also here: whether a
//! listener is up yet, read from the kernel's socket table, which is what "ready" waits for.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::net::UnixDatagram;

/// The variable systemd sets for a `Type=notify` service.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// What `run` sends once every client listener accepts connections: ready, and which process is
/// the service's main one. After a graceful upgrade that is the new process, and `MAINPID=`
/// is how systemd learns it (the unit needs `NotifyAccess=all`: the new process is not yet
/// the main one when it speaks).
///
/// ```
/// assert_eq!(
///     shiftgate::notify::ready_message(42, "listening on 0.0.0.0:8080"),
///     "READY=1\nMAINPID=42\nSTATUS=listening on 0.0.0.0:8080\n"
/// );
/// ```
pub fn ready_message(pid: u32, status: &str) -> String {
    // STATUS is one line: a newline would start another (unknown) key.
    let status = status.replace('\n', " ");
    format!("READY=1\nMAINPID={pid}\nSTATUS={status}\n")
}

/// What SIGTERM sends: the service is stopping (systemd shows "deactivating" during the drain).
pub const STOPPING: &str = "STOPPING=1\nSTATUS=draining\n";

/// Sends `message` to `$NOTIFY_SOCKET`: `Ok(false)` when the variable is unset or empty, `Ok(true)`
/// once sent. A name starting with `@` is an abstract socket (Linux).
pub fn notify(message: &str) -> io::Result<bool> {
    let Some(target) = std::env::var_os(NOTIFY_SOCKET).filter(|t| !t.is_empty()) else {
        return Ok(false);
    };
    let socket = UnixDatagram::unbound()?;
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(target.as_os_str());
    match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
            socket.send_to_addr(message.as_bytes(), &addr)?;
        }
        _ => {
            socket.send_to(message.as_bytes(), &target)?;
        }
    }
    Ok(true)
}

/// Whether a TCP socket listens on exactly `addr` in this network namespace, from
/// `/proc/net/tcp` (IPv4) or `/proc/net/tcp6` (IPv6). An error when the table cannot be read.
pub fn listening(addr: SocketAddr) -> io::Result<bool> {
    let table = match addr {
        SocketAddr::V4(_) => "/proc/net/tcp",
        SocketAddr::V6(_) => "/proc/net/tcp6",
    };
    Ok(listens_in(&std::fs::read_to_string(table)?, addr))
}

/// Whether `table` (the text of `/proc/net/tcp` or `/proc/net/tcp6`) has a socket in state
/// LISTEN (`0A`) on exactly `addr`. Addresses there are hex in host byte order, one 32-bit word
/// at a time: `0100007F:1F90` is 127.0.0.1:8080 on a little-endian machine.
///
/// ```
/// use shiftgate::notify::listens_in;
///
/// let table = "  sl  local_address rem_address   st tx_queue rx_queue\n   \
///     0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000\n";
/// if cfg!(target_endian = "little") {
///     assert!(listens_in(table, "127.0.0.1:8080".parse().unwrap()));
///     assert!(!listens_in(table, "127.0.0.1:8081".parse().unwrap()));
///     assert!(!listens_in(table, "0.0.0.0:8080".parse().unwrap()));
/// }
/// ```
pub fn listens_in(table: &str, addr: SocketAddr) -> bool {
    table.lines().skip(1).any(|line| {
        let mut fields = line.split_whitespace();
        let (Some(_), Some(local), Some(_), Some(state)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return false;
        };
        state == "0A" && parse_local(local) == Some(addr)
    })
}

/// `ADDR:PORT` of the socket table, both hex.
fn parse_local(local: &str) -> Option<SocketAddr> {
    let (ip, port) = local.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut bytes = Vec::with_capacity(16);
    for word in ip.as_bytes().chunks(8) {
        let word = u32::from_str_radix(std::str::from_utf8(word).ok()?, 16).ok()?;
        bytes.extend_from_slice(&word.to_ne_bytes());
    }
    let ip: IpAddr = match bytes.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?),
        16 => IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_with_a_newline_stays_one_line() {
        assert_eq!(ready_message(7, "a\nb"), "READY=1\nMAINPID=7\nSTATUS=a b\n");
    }

    /// The real table: a socket this test binds shows as listening, on IPv4 and IPv6, and
    /// stops showing once closed.
    #[test]
    fn a_bound_listener_is_in_the_kernels_table() {
        for local in ["127.0.0.1:0", "[::1]:0"] {
            let Ok(listener) = std::net::TcpListener::bind(local) else {
                continue; // no IPv6 on this machine
            };
            let addr = listener.local_addr().unwrap();
            assert!(listening(addr).unwrap(), "{addr}");
            drop(listener);
            assert!(!listening(addr).unwrap(), "{addr} after close");
        }
    }
}
