//! systemd's readiness protocol (`sd_notify`): one datagram of `KEY=value` lines to the unix
//! socket `$NOTIFY_SOCKET` names; without that variable (not under `Type=notify`, in a
//! container, in a test) every call does nothing.
//!
//! A few lines of std instead of a crate: the protocol is one `sendto`.

use std::io;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_with_a_newline_stays_one_line() {
        assert_eq!(ready_message(7, "a\nb"), "READY=1\nMAINPID=7\nSTATUS=a b\n");
    }
}
