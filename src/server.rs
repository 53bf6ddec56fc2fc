//! Wiring of a running proxy: the Pingora server and its services (proxy, admin, config
//! watcher), signals (SIGTERM drains, SIGQUIT hands the listeners to a new process, SIGHUP
//! reloads) and the early exit once the last answer is out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::ListenerConfig;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use tokio::signal::unix::{signal, SignalKind};

use crate::bulk::Coalescer;
use crate::config::{Config, MAX_ATTEMPTS_CAP};
use crate::edge::Edge;
use crate::proxy::Proxy;
use crate::state::State;

/// How `shiftgate run` was asked to start.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub config_path: PathBuf,
    /// Take the listening sockets over from a running shiftgate (graceful upgrade).
    pub upgrade: bool,
    pub upgrade_sock: PathBuf,
    /// Written with this process's PID once it listens (after an upgrade: once it has taken the
    /// sockets over), for supervisors that track a PID file (systemd's `PIDFile=`).
    pub pid_file: Option<PathBuf>,
}

/// Raises the soft limit on open files to the hard one: every client connection and every
/// upstream connection is a file, and a process started outside its unit (by hand, or by an
/// upgrade script that does not set `LimitNOFILE`) inherits a soft limit of 1,024 that a shift
/// change passes in seconds. Returns the limit in force.
pub fn raise_open_files_limit() -> std::io::Result<libc::rlim_t> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed by reference.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        lim.rlim_cur = lim.rlim_max;
    }
    Ok(lim.rlim_cur)
}

/// Runs the proxy until it is told to stop. Never returns.
pub fn run(config: Config, opts: RunOptions) -> ! {
    match raise_open_files_limit() {
        Ok(n) => {
            tracing::info!("open files limit: {n}");
            // Each client connection is a file, and so is the upstream connection it uses:
            // past the limit accept() fails, and clients get no answer instead of 503.
            let cap = config.limits.max_connections as libc::rlim_t;
            if cap.saturating_mul(2) > n {
                tracing::warn!(
                    "limits.max_connections ({cap}) leaves too few of the {n} open files for \
                     the upstream connections; lower it or raise the limit (LimitNOFILE)"
                );
            }
        }
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    let admin_listen = config.admin_listen;
    let listen = config.listen;
    let tls = config.tls.clone();
    let workers = config.workers;
    let drain = config.shutdown.drain_timeout;
    let state = State::new(config, opts.config_path.clone());

    let conf = ServerConf {
        threads: workers,
        // SIGTERM: we drain first (see Signals), so Pingora's fixed grace period is only the
        // upper bound for a graceful upgrade; the process exits as soon as nothing is left.
        grace_period_seconds: Some(drain.as_secs() + 5),
        graceful_shutdown_timeout_seconds: Some(1),
        max_retries: MAX_ATTEMPTS_CAP,
        upgrade_sock: opts.upgrade_sock.display().to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With --upgrade this waits for the old process to send its listeners (after its SIGQUIT).
    server.bootstrap();
    // Bound only now: during an upgrade the old process still serves the admin port, and a
    // socket bound while we wait above would take its share of the connections (SO_REUSEPORT)
    // and leave them unanswered until the handover, or reset them if it never comes.
    let admin = match bind_reusable(admin_listen) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("cannot listen on admin_listen {admin_listen}: {e}");
            crate::access::flush();
            std::process::exit(1);
        }
    };

    // Pingora's HTTP app behind the edge (connection cap, head and idle timers), on both
    // listeners.
    let app = pingora::proxy::http_proxy(
        &server.configuration,
        Proxy {
            state: state.clone(),
            coalescer: Coalescer::default(),
        },
    );
    let mut proxy = Service::new("shiftgate proxy".to_string(), Edge::new(app, state.clone()));
    // Pingora's default gives every client connection a 64 KiB read buffer up front; with
    // thousands of clients waiting in the queue that is most of the memory. Requests are read
    // into Pingora's own (4 KiB, growing) header buffer anyway, so read unbuffered. Writes are
    // gathered by the edge, only while an answer is written (`edge::WRITE_GATHER`), so
    // Pingora's write buffer (1,460 bytes a connection, for its whole life) is left out too.
    let buffers = pingora::listeners::L4BufferSettings::unbuffered;
    proxy.add_listener(ListenerConfig::tcp(listen.to_string()).l4_buffer(buffers()));
    if let (Some(tls), Some(cert)) = (&tls, state.cert_resolver()) {
        // The paths are ignored: the resolver serves the pair the config loaded (and reloads).
        let mut settings = match TlsSettings::intermediate("", "") {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("tls: {e}");
                crate::access::flush();
                std::process::exit(1);
            }
        };
        settings.set_cert_resolver(cert);
        proxy.add_listener(
            ListenerConfig::tcp(tls.listen.to_string())
                .tls(settings)
                .l4_buffer(buffers()),
        );
    }
    proxy.threads = Some(workers);
    server.add_service(proxy);
    server.add_service(background_service(
        "admin",
        AdminService {
            state: state.clone(),
            listener: std::sync::Mutex::new(Some(admin)),
        },
    ));
    let mut listeners = vec![listen];
    listeners.extend(tls.as_ref().map(|t| t.listen));
    server.add_service(background_service(
        "readiness",
        Readiness {
            listeners,
            pid_file: opts.pid_file.clone(),
        },
    ));
    server.add_service(background_service(
        "config watcher",
        Watcher {
            state: state.clone(),
        },
    ));

    let phases = server.watch_execution_phase();
    let https = tls
        .map(|t| format!(", HTTPS on {}", t.listen))
        .unwrap_or_default();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        "shiftgate listening on {listen}{https}, admin on {}",
        state.config().admin_listen
    );
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            state: state.clone(),
            phases: std::sync::Mutex::new(Some(phases)),
        }),
    });
    crate::access::flush();
    std::process::exit(0)
}

/// A listening socket that a new process can bind too during a graceful upgrade.
fn bind_reusable(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

struct AdminService {
    state: Arc<State>,
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
}

#[async_trait]
impl BackgroundService for AdminService {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!("admin listener: {e}");
                return;
            }
        };
        // Not stopped by Pingora's shutdown watch: /readyz must keep answering 503 while the
        // proxy drains; the process exit ends it.
        crate::admin::serve(listener, self.state.clone(), std::future::pending()).await;
    }
}

/// Tells supervisors that the proxy serves, once every client listener is listening: writes
/// `--pid-file`, then sends `READY=1` and `MAINPID=` to systemd (see [`crate::notify`]).
///
/// Pingora binds its listeners inside the proxy service's own runtime and says nothing when
/// they are up, so this polls the kernel's socket table until each address listens. Not by
/// connecting: an empty connection to the HTTPS listener is a failed handshake that Pingora
/// logs as an error. During an upgrade the sockets were handed over before any service
/// started, so they already listen.
struct Readiness {
    listeners: Vec<SocketAddr>,
    pid_file: Option<PathBuf>,
}

#[async_trait]
impl BackgroundService for Readiness {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        for &addr in &self.listeners {
            loop {
                match crate::notify::listening(addr) {
                    Ok(true) => break,
                    Ok(false) => {}
                    Err(e) => {
                        // No socket table to read (not Linux, /proc not mounted): readiness
                        // cannot be told, so say ready rather than never.
                        tracing::warn!("cannot tell whether {addr} listens: {e}");
                        break;
                    }
                }
                tokio::select! {
                    _ = shutdown.changed() => return,
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        }
        let pid = std::process::id();
        if let Some(path) = &self.pid_file {
            if let Err(e) = std::fs::write(path, format!("{pid}\n")) {
                tracing::warn!("cannot write the pid file {}: {e}", path.display());
            }
        }
        let status = format!("serving on {:?}", self.listeners);
        match crate::notify::notify(&crate::notify::ready_message(pid, &status)) {
            Ok(true) => tracing::info!("told systemd: ready, main PID {pid}"),
            Ok(false) => {}
            Err(e) => tracing::warn!("cannot notify systemd ($NOTIFY_SOCKET): {e}"),
        }
    }
}

/// Reloads on SIGHUP and when the config file changes (also when it is replaced by rename, or a
/// Kubernetes ConfigMap swaps its `..data` symlink: the path is stat'ed through the links).
struct Watcher {
    state: Arc<State>,
}

/// How often upstream names are looked up again (the cache's TTL is 30 s).
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);

/// How often the config file is looked at.
pub const WATCH_INTERVAL: Duration = Duration::from_millis(250);

#[async_trait]
impl BackgroundService for Watcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!("cannot watch SIGHUP: {e}");
                None
            }
        };
        let path = self.state.config_path().to_path_buf();
        // Only a version of the file two polls in a row agree on is loaded (see Settle).
        let mut settle = crate::reload::Settle::new(crate::reload::file_version(&path));
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        // Upstream names are resolved here, off the request path, and kept fresh.
        let mut resolve = tokio::time::interval(RESOLVE_INTERVAL);
        loop {
            let trigger = tokio::select! {
                _ = shutdown.changed() => return,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => "SIGHUP",
                _ = resolve.tick() => {
                    // Its own task: a slow DNS server must not hold up a reload.
                    let state = self.state.clone();
                    tokio::spawn(async move {
                        let config = state.config();
                        state.resolver().refresh_all(&config).await;
                    });
                    continue;
                }
                _ = tick.tick() => {
                    if !self.state.config().watch_file {
                        continue;
                    }
                    let now = crate::reload::file_version(&path);
                    if !settle.poll(now) {
                        continue;
                    }
                    "file change"
                }
            };
            let state = self.state.clone();
            let _ =
                tokio::task::spawn_blocking(move || crate::reload::reload(&state, trigger)).await;
        }
    }
}

/// Pingora's shutdown signals, with a drain before a graceful stop.
struct Signals {
    state: Arc<State>,
    phases:
        std::sync::Mutex<Option<tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>>>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut quit = signal(SignalKind::quit()).expect("SIGQUIT handler");
        let kind = tokio::select! {
            _ = term.recv() => {
                let _ = crate::notify::notify(crate::notify::STOPPING);
                exit_by(self.state.config().stop_timeout());
                drain(&self.state).await;
                ShutdownSignal::GracefulTerminate
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: stopping now");
                return ShutdownSignal::FastShutdown;
            }
            _ = quit.recv() => {
                // Pingora now sends the listeners, keeps accepting for 5 s alongside the new
                // process, then stops and drops idle connections: until then every answer
                // says `Connection: close`, so clients move to the new process between
                // requests, never in the middle of one.
                self.state.stop();
                tracing::info!("SIGQUIT: handing the listening sockets to the new process");
                ShutdownSignal::GracefulUpgrade
            }
        };
        // Pingora now closes the listeners, then sleeps its grace period: exit as soon as the
        // last request in progress has its answer instead.
        if let Some(phases) = self.phases.lock().ok().and_then(|mut p| p.take()) {
            exit_when_idle(self.state.clone(), phases);
        }
        kind
    }
}

/// SIGTERM: `/readyz` turns 503 and new requests are refused at once; requests already waiting
/// keep being paced and sent for up to `shutdown.drain_timeout`; what still waits then is
/// answered 503 `shiftgate.shutting.down`.
async fn drain(state: &Arc<State>) {
    state.start_draining();
    let timeout = state.config().shutdown.drain_timeout;
    tracing::info!(
        waiting = state.pacer().depth(),
        "SIGTERM: draining for up to {timeout:?}"
    );
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && state.pacer().depth() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let left = state.pacer().depth();
    if left > 0 {
        tracing::warn!(
            left,
            "drain timeout: answering those still waiting with 503"
        );
        state.pacer().close_all();
    }
    // Let the answers in progress finish (bounded: an upstream may be slow).
    let until = Instant::now() + Duration::from_secs(5).min(timeout + Duration::from_secs(1));
    while Instant::now() < until && state.active_requests() > 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The stop's hard bound (see [`crate::config::Config::stop_timeout`]): an upstream that
/// trickles its answer, or an attempt sent at the drain's end, cannot keep the process past what
/// its supervisor waits before SIGKILL. Pingora's own grace period would come later.
fn exit_by(limit: Duration) {
    std::thread::spawn(move || {
        std::thread::sleep(limit);
        tracing::warn!(
            "stop: still answering after {limit:?} (shutdown.drain_timeout + limits.upstream_timeout + 5 s); exiting now"
        );
        crate::access::flush();
        std::process::exit(0);
    });
}

fn exit_when_idle(
    state: Arc<State>,
    mut phases: tokio::sync::broadcast::Receiver<pingora::server::ExecutionPhase>,
) {
    std::thread::spawn(move || {
        // Wait for the listeners to close (after the upgrade handoff, too).
        loop {
            match phases.blocking_recv() {
                Ok(pingora::server::ExecutionPhase::ShutdownGracePeriod) => break,
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
        while state.active_requests() > 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::info!("all answers sent; exiting");
        crate::access::flush();
        std::process::exit(0);
    });
}
