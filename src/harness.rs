//! Starts what the demo and the tests run on: emulators, and `shiftgate run` on reserved ports.
//!
//! [`EmulatorRuntime`]: emulators on a runtime of their own thread. [`ProxyChild`]: the real
//! binary as a child process on loopback, ready once `/healthz` answers; `shiftgate demo` and
//! the integration tests (`tests/common`) both start the proxy through it.
//!
//! # Ports
//! A port number is never found by binding a socket and releasing it, which leaves the port free
//! for anyone until the child binds it. [`ReservedPort`] binds `127.0.0.1:0` with `SO_REUSEADDR`
//! and keeps the socket open without listening on it:
//! - Linux never hands a port that a socket holds to another socket that asks for port 0
//!   (ip(7): `ip_autobind_reuse`, off by default), so no other test or program gets it;
//! - a server that binds it with `SO_REUSEADDR` may still bind and listen there, since that is
//!   refused only while a socket *listens* on the address (socket(7)). Pingora's listener,
//!   shiftgate's admin listener, Redis and Prometheus all set it;
//! - a socket that does not listen takes no connections: the server is the only one that answers.
//!
//! (A program that binds that very number on purpose, with `SO_REUSEADDR`, could still take it;
//! here port numbers only ever come from reservations.)
//!
//! So the child binds its configured addresses itself, exactly as in production; both ports stay
//! the same across a graceful upgrade (the admin port must: old and new process share it). The
//! alternative, binding the listener here and handing it to a child started with `--upgrade`,
//! would make every start an upgrade that waits out Pingora's 1 s retry on the upgrade socket.

use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{HeaderMap, Method};

use crate::emulator::{Emulator, EmulatorConfig};
use crate::loadtest::client::{AgentConnection, Answer, OutgoingRequest};
use crate::loadtest::Target;

/// Emulators on a one-thread runtime of their own, stopped on drop. They stand for a remote API,
/// so when they see a request must not depend on how busy the caller's runtime is. Derefs to the
/// first of them (often the only one).
pub struct EmulatorRuntime {
    emulators: Vec<Emulator>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl EmulatorRuntime {
    /// Starts `count` (at least one) emulators with `config`, each on `127.0.0.1:0`.
    pub fn start(config: EmulatorConfig, count: usize) -> anyhow::Result<EmulatorRuntime> {
        if count == 0 {
            bail!("no emulator to start");
        }
        // Built on a plain thread: a runtime cannot be created or blocked on from inside another.
        std::thread::spawn(move || -> anyhow::Result<EmulatorRuntime> {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("emulator")
                .enable_all()
                .build()
                .context("cannot start the emulator's runtime")?;
            let mut emulators = Vec::new();
            for _ in 0..count {
                let emulator = runtime
                    .block_on(Emulator::start(
                        SocketAddr::from(([127, 0, 0, 1], 0)),
                        config.clone(),
                    ))
                    .context("cannot start the emulator")?;
                emulators.push(emulator);
            }
            Ok(EmulatorRuntime {
                emulators,
                runtime: Some(runtime),
            })
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the emulator's thread panicked"))?
    }

    /// The `i`th emulator, in start order.
    pub fn get(&self, i: usize) -> &Emulator {
        &self.emulators[i]
    }
}

impl Deref for EmulatorRuntime {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        &self.emulators[0]
    }
}

impl Drop for EmulatorRuntime {
    fn drop(&mut self) {
        // Dropping an emulator stops its listener; the runtime is then let go without blocking,
        // since this may run inside the caller's own runtime.
        self.emulators.clear();
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// A loopback port held for a server this process starts (see the module doc): bound with
/// `SO_REUSEADDR`, never listening, released on drop.
#[derive(Debug)]
pub struct ReservedPort {
    _socket: socket2::Socket,
    addr: SocketAddr,
}

impl ReservedPort {
    /// Reserves a free port on 127.0.0.1.
    pub fn loopback() -> std::io::Result<ReservedPort> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
        let addr = socket
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("not an IP address"))?;
        Ok(ReservedPort {
            _socket: socket,
            addr,
        })
    }

    /// `127.0.0.1:port`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

/// How [`ProxyChild`] runs `shiftgate run`.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    /// The `shiftgate` binary.
    pub exe: PathBuf,
    /// The child's `RUST_LOG`.
    pub rust_log: String,
    /// More environment for the child, and for the process of an upgrade.
    pub env: Vec<(String, String)>,
    /// The child's config, log, pid file and upgrade socket go into a new directory of this name
    /// (plus this process's id, a count and a time stamp) in the system's temporary directory.
    pub dir_prefix: String,
    /// How long it may take until `/healthz` answers and the proxy port accepts connections.
    pub ready_within: Duration,
}

impl ProxyOptions {
    /// `exe`, logging at info (Pingora's own at warn), ready within 20 s.
    pub fn new(exe: impl Into<PathBuf>) -> ProxyOptions {
        ProxyOptions {
            exe: exe.into(),
            rust_log: "info,pingora=warn,pingora_core=warn,pingora_proxy=warn".into(),
            env: Vec::new(),
            dir_prefix: "shiftgate".into(),
            ready_within: Duration::from_secs(20),
        }
    }
}

/// `shiftgate run` as a child process on reserved loopback ports, with its config, log (its
/// stderr), pid file and upgrade socket in a directory of its own. Killed, and the directory
/// removed, on drop.
pub struct ProxyChild {
    child: Option<Child>,
    options: ProxyOptions,
    listen: ReservedPort,
    admin: ReservedPort,
    dir: PathBuf,
    config_path: PathBuf,
    log_path: PathBuf,
}

impl ProxyChild {
    /// Reserves the proxy and admin ports, writes the config `config(listen, admin)` returns,
    /// starts the child on it and waits until it is ready (see [`ProxyChild::wait_ready`]).
    pub async fn start(
        options: ProxyOptions,
        config: impl FnOnce(SocketAddr, SocketAddr) -> anyhow::Result<String>,
    ) -> anyhow::Result<ProxyChild> {
        let listen = ReservedPort::loopback().context("no free loopback port")?;
        let admin = ReservedPort::loopback().context("no free loopback port")?;
        let text = config(listen.addr(), admin.addr())?;
        let dir = unique_dir(&options.dir_prefix)?;
        let mut proxy = ProxyChild {
            child: None,
            config_path: dir.join("config.yaml"),
            log_path: dir.join("shiftgate.log"),
            dir,
            options,
            listen,
            admin,
        };
        std::fs::write(&proxy.config_path, text)
            .with_context(|| format!("cannot write {}", proxy.config_path.display()))?;
        proxy.child = Some(proxy.spawn(false)?);
        proxy.wait_ready().await?;
        Ok(proxy)
    }

    /// Starts another `shiftgate run` on the same config, ports and upgrade socket; with
    /// `upgrade`, one that takes the listening sockets over from this one once it gets SIGQUIT.
    /// Its log goes to the same file.
    pub fn spawn(&self, upgrade: bool) -> anyhow::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .with_context(|| format!("cannot open {}", self.log_path.display()))?;
        let mut cmd = Command::new(&self.options.exe);
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade-sock")
            .arg(self.upgrade_sock())
            .arg("--pid-file")
            .arg(self.dir.join("shiftgate.pid"))
            .env("RUST_LOG", &self.options.rust_log)
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if upgrade {
            cmd.arg("--upgrade");
        }
        cmd.spawn()
            .with_context(|| format!("cannot start {}", self.options.exe.display()))
    }

    /// Waits until `/healthz` answers 200 and the proxy port accepts a connection; fails with the
    /// log's tail if the child exits first or `ready_within` passes.
    pub async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.options.ready_within;
        loop {
            if let Some(status) = self.child_mut().try_wait()? {
                bail!(
                    "`shiftgate run` exited ({status}) before it was ready; its log:\n{}",
                    self.log_tail(30)
                );
            }
            let healthy = matches!(get(self.admin(), "/healthz").await, Ok(a) if a.status == 200);
            if healthy && probe(self.addr()).await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "`shiftgate run` did not answer /healthz on {} within {:?}; its log:\n{}",
                    self.admin(),
                    self.options.ready_within,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where clients connect (the config's `listen`).
    pub fn addr(&self) -> SocketAddr {
        self.listen.addr()
    }

    /// The config's `admin_listen`.
    pub fn admin(&self) -> SocketAddr {
        self.admin.addr()
    }

    /// `http://` and [`ProxyChild::addr`].
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn exe(&self) -> &Path {
        &self.options.exe
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The socket through which an upgrade hands the listeners over.
    pub fn upgrade_sock(&self) -> PathBuf {
        self.dir.join("upgrade.sock")
    }

    /// The process this handle stands for (after an upgrade, the new one).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("a child process").id()
    }

    /// Makes `new` (e.g. the process of an upgrade) the process this handle stands for, kills on
    /// drop and signals; returns the one it was.
    pub fn replace_child(&mut self, new: Child) -> Option<Child> {
        self.child.replace(new)
    }

    fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("a child process")
    }

    /// Sends a signal by name (`HUP`, `TERM`, `QUIT`, ...).
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .context("cannot run kill")?;
        if !status.success() {
            bail!("kill -{signal} {} failed ({status})", self.pid());
        }
        Ok(())
    }

    /// Everything the child (and any process of an upgrade) has logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.logs();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A scrape of `/metrics`.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        let a = get(self.admin(), "/metrics").await?;
        if a.status != 200 {
            bail!("GET /metrics answered {}", a.status);
        }
        Ok(String::from_utf8(a.body.to_vec())?)
    }

    /// Replaces the config file by rename, as editors and Kubernetes ConfigMaps do.
    pub fn replace_config(&self, text: &str) -> std::io::Result<()> {
        let tmp = self.dir.join("config.yaml.new");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.config_path)
    }

    /// Waits up to `limit` for the process to exit, polling; its exit code, `None` if it still
    /// runs (or was killed by a signal).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.exit_status() {
                return status.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// How the process ended, if it has (without waiting).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child_mut().try_wait().ok().flatten()
    }

    /// Kills the process now.
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `addr` accepts a connection. The probe sends nothing and closes its side, then
/// waits (up to a second) for the server to close its own: by then the server is done with the
/// connection, so the probe is not still counted among the connections open (`limits.
/// max_connections`) when the caller's first connections arrive.
async fn probe(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let _ = s.shutdown().await;
    let mut buf = [0u8; 256];
    let closed = async { while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_secs(1), closed).await;
    true
}

/// A new directory `{prefix}-{pid}-{n}-{nanos}` in the system's temporary directory (`n` counts
/// the ones this process made).
fn unique_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    static MADE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    let name = format!("{prefix}-{}-{n}-{nanos}", std::process::id());
    let dir = std::env::temp_dir().join(name);
    std::fs::create_dir(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// One GET on a fresh connection, answered within 5 s.
async fn get(addr: SocketAddr, path: &str) -> anyhow::Result<Answer> {
    let mut connection = AgentConnection::new(Target::parse(&format!("http://{addr}"))?);
    let request = OutgoingRequest {
        method: Method::GET,
        path_and_query: path.to_string(),
        headers: HeaderMap::new(),
        body: Bytes::new(),
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), connection.send(&request))
        .await
        .with_context(|| format!("GET {path} on {addr}: no answer within 5 s"))??;
    Ok(answer)
}

/// Runs `promtool check metrics` on `text` and panics unless it passes with no lint finding at
/// all: the metrics unit test and the live-scrape test share it. promtool is the reference
/// parser; a missing promtool fails rather than skips, so a green run means the text was checked.
pub fn promtool_check_metrics(text: &str) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool must be on PATH (Debian package `prometheus`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{said}\non:\n{text}"
    );
    // promtool exits 0 on lint findings too; there must be none.
    assert!(said.trim().is_empty(), "promtool lint findings:\n{said}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reserved_port_is_not_handed_out_again_and_a_server_can_listen_on_it() {
        let reserved = ReservedPort::loopback().unwrap();
        // Nothing answers there yet: the reservation does not listen.
        assert!(std::net::TcpStream::connect(reserved.addr()).is_err());
        // Port 0 never yields it while it is held.
        let others: Vec<std::net::TcpListener> = (0..200)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
            .collect();
        assert!(others
            .iter()
            .all(|l| l.local_addr().unwrap().port() != reserved.port()));
        // A server that sets SO_REUSEADDR (as Pingora, Redis and Prometheus do) binds it and is
        // the one that answers.
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&reserved.addr().into()).unwrap();
        socket.listen(8).unwrap();
        let server: std::net::TcpListener = socket.into();
        let _client = std::net::TcpStream::connect(reserved.addr()).unwrap();
        server.accept().unwrap();
    }
}
