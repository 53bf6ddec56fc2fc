//! Test harness: the real `shiftgate` binary on free loopback ports, an in-process emulator,
//! and small HTTP helpers. Only loopback addresses are ever used.
#![allow(dead_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use shiftgate::emulator::{Emulator, EmulatorConfig};
use shiftgate::loadtest::client::{AgentConnection, Answer, OutgoingRequest};
use shiftgate::loadtest::{Endpoint, LoadSpec, Target};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The emulator on a runtime of its own (one thread): it stands for a remote API, so its
/// arrival times must not depend on how busy the test's load generator is.
pub struct EmuHandle {
    emu: Option<Emulator>,
    rt: Option<tokio::runtime::Runtime>,
}

impl std::ops::Deref for EmuHandle {
    type Target = Emulator;
    fn deref(&self) -> &Emulator {
        self.emu.as_ref().unwrap()
    }
}

impl Drop for EmuHandle {
    fn drop(&mut self) {
        drop(self.emu.take());
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

pub async fn emulator(yaml: &str) -> EmuHandle {
    let cfg = EmulatorConfig::from_yaml_str(yaml).expect("emulator config");
    let (emu, rt) = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let emu = rt
            .block_on(Emulator::start("127.0.0.1:0".parse().unwrap(), cfg))
            .expect("emulator starts");
        (emu, rt)
    })
    .join()
    .unwrap();
    EmuHandle {
        emu: Some(emu),
        rt: Some(rt),
    }
}

/// A running `shiftgate run`, killed on drop. Its stderr goes to a file in `dir`.
pub struct ProxyProcess {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
}

impl ProxyProcess {
    /// Starts the proxy on `yaml`, where `@LISTEN@`, `@ADMIN@` are replaced by free loopback
    /// addresses and `@EMU@` by `upstream` (host:port). Waits until `/healthz` answers.
    pub async fn start(yaml: &str, upstream: SocketAddr) -> ProxyProcess {
        Self::start_with(yaml, upstream, &[]).await
    }

    pub async fn start_with(
        yaml: &str,
        upstream: SocketAddr,
        env: &[(&str, &str)],
    ) -> ProxyProcess {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let text = yaml
            .replace("@LISTEN@", &addr.to_string())
            .replace("@ADMIN@", &admin.to_string())
            .replace("@EMU@", &upstream.to_string());
        let config_path = dir.path().join("config.yaml");
        std::fs::write(&config_path, text).unwrap();
        let mut p = ProxyProcess {
            child: None,
            addr,
            admin,
            log_path: dir.path().join("shiftgate.log"),
            config_path,
            dir,
        };
        p.child = Some(p.spawn(false, env));
        p.wait_healthy().await;
        p
    }

    /// Starts the binary on this config and ports (again, for an upgrade).
    pub fn spawn(&mut self, upgrade: bool, env: &[(&str, &str)]) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_shiftgate"));
        cmd.arg("run")
            .arg("--config")
            .arg(&self.config_path)
            .arg("--upgrade-sock")
            .arg(self.dir.path().join("upgrade.sock"))
            .arg("--pid-file")
            .arg(self.dir.path().join("shiftgate.pid"))
            .env(
                "RUST_LOG",
                "info,pingora=warn,pingora_core=warn,pingora_proxy=warn,shiftgate::access=warn",
            )
            .stdout(Stdio::null())
            .stderr(log);
        if upgrade {
            cmd.arg("--upgrade");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.spawn().expect("shiftgate starts")
    }

    pub async fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(a) = get(self.admin, "/healthz").await {
                if a.status == 200 && tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "shiftgate did not become healthy; log:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log_path) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    pub async fn metrics(&self) -> String {
        let a = get(self.admin, "/metrics").await.expect("metrics answer");
        assert_eq!(a.status, 200);
        String::from_utf8(a.body.to_vec()).unwrap()
    }

    /// The value of one series in the Prometheus text, e.g.
    /// `shiftgate_client_disconnects_total{route="presence"}`.
    pub async fn metric(&self, series: &str) -> f64 {
        metric_value(&self.metrics().await, series).unwrap_or(0.0)
    }

    /// Replaces the config file by rename (as editors and ConfigMaps do).
    pub fn replace_config(&self, yaml: &str, upstream: SocketAddr) {
        let text = yaml
            .replace("@LISTEN@", &self.addr.to_string())
            .replace("@ADMIN@", &self.admin.to_string())
            .replace("@EMU@", &upstream.to_string());
        let tmp = self.dir.path().join("config.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    /// Waits for the process to exit, up to `limit`; returns its exit code.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<i32> {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

/// One request on a fresh connection.
pub async fn request(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, shiftgate::loadtest::client::ClientError> {
    let mut conn = AgentConnection::new(Target::parse(&format!("http://{addr}")).unwrap());
    send(&mut conn, method, path, headers, body).await
}

pub async fn send(
    conn: &mut AgentConnection,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Answer, shiftgate::loadtest::client::ClientError> {
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    conn.send(&OutgoingRequest {
        method,
        path_and_query: path.to_string(),
        headers: h,
        body: body.into(),
    })
    .await
}

pub async fn get(
    addr: SocketAddr,
    path: &str,
) -> Result<Answer, shiftgate::loadtest::client::ClientError> {
    request(addr, Method::GET, path, &[], Bytes::new()).await
}

/// Writes raw bytes on a new connection and reads the answer until the connection closes or
/// `wait` passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

pub fn header<'a>(a: &'a Answer, name: &str) -> Option<&'a str> {
    a.headers.get(name).and_then(|v| v.to_str().ok())
}

pub fn json(a: &Answer) -> serde_json::Value {
    serde_json::from_slice(&a.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&a.body)))
}

/// Asserts one of the proxy's own answers: status, code, Genesys-shaped body, correlation id.
pub fn assert_own_answer(a: &Answer, status: u16, code: &str) -> serde_json::Value {
    assert_eq!(
        a.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&a.body)
    );
    let v = json(a);
    assert_eq!(v["code"], code);
    assert_eq!(v["status"], status);
    assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
    assert_eq!(v["details"], serde_json::json!([]));
    assert_eq!(v["errors"], serde_json::json!([]));
    assert_eq!(
        header(a, "ININ-Correlation-Id"),
        v["contextId"].as_str(),
        "correlation id header equals contextId"
    );
    v
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn repo_path(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(p)
}

/// A shift change of presence updates, all agents at once, each on its own connection:
/// `loops` updates per agent, agents spread over `tokens` bearer tokens.
pub fn shift_change(target: String, agents: usize, loops: usize, tokens: usize) -> LoadSpec {
    LoadSpec {
        target,
        agents,
        loops,
        tokens,
        ramp: Duration::ZERO,
        endpoint: Endpoint::PresencePatch,
        timeout: Duration::from_secs(120),
        ..LoadSpec::default()
    }
}

/// Emulator config: presence PATCHes limited to `limit` (e.g. "100/s") for the whole org, in
/// windows that open at the first request; answers take `min`..`max`.
pub fn presence_limited(limit: &str, min: &str, max: &str) -> String {
    format!(
        "token_rate_per_minute: 0\nlatency: {{ min: \"{min}\", max: \"{max}\" }}\nroute_limits:\n  - {{ name: presence, method: PATCH, path: \"/api/v2/users/{{userId}}/presences/{{sourceId}}\", limit: \"{limit}\" }}\n"
    )
}
