//! Prometheus in the tests: the text exposition parsed (and linted by `promtool`), a real
//! Prometheus server to scrape the proxy and evaluate PromQL, and the split of an alert
//! expression at its top-level comparison.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use shiftgate::harness::ReservedPort;

use super::{get, repo_path};

// ------------------------------------------------------------------------------------------
// The Prometheus text format, parsed
// ------------------------------------------------------------------------------------------

#[derive(Debug)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

/// `# TYPE` lines (family -> type) and every sample of an exposition.
pub fn parse_exposition(text: &str) -> (BTreeMap<String, String>, Vec<Sample>) {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').expect("TYPE line has a type");
            types.insert(name.to_string(), kind.to_string());
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name_end = line.find(['{', ' ']).expect("sample has a value");
        let name = line[..name_end].to_string();
        let mut labels = Vec::new();
        let mut rest = &line[name_end..];
        if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices();
            let mut key = String::new();
            loop {
                let (i, c) = chars.next().expect("label set is closed");
                match c {
                    '}' => {
                        rest = &body[i + 1..];
                        break;
                    }
                    ',' => {}
                    '=' => {
                        assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "{line}");
                        let mut value = String::new();
                        loop {
                            match chars.next().expect("label value is closed").1 {
                                '"' => break,
                                '\\' => match chars.next().expect("escape").1 {
                                    'n' => value.push('\n'),
                                    other => value.push(other),
                                },
                                other => value.push(other),
                            }
                        }
                        labels.push((std::mem::take(&mut key), value));
                    }
                    other => key.push(other),
                }
            }
        }
        let value = rest.trim().split(' ').next().unwrap();
        let value = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v.parse().unwrap_or_else(|_| panic!("bad value in {line}")),
        };
        samples.push(Sample {
            name,
            labels,
            value,
        });
    }
    (types, samples)
}

/// The sum of the samples named `name` whose labels include every pair of `with`.
pub fn sum(samples: &[Sample], name: &str, with: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            with.iter()
                .all(|(k, v)| s.labels.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|s| s.value)
        .sum()
}

/// The value of one series in the Prometheus text, e.g.
/// `shiftgate_client_disconnects_total{route="presence"}` (labels as the exposition orders them).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l[series.len()..].trim().parse().ok())
}

// ------------------------------------------------------------------------------------------
// A real Prometheus
// ------------------------------------------------------------------------------------------

/// A Prometheus on a loopback port, killed on drop (a failed assertion included).
pub struct Prometheus {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    /// Held until Prometheus is gone (see `shiftgate::harness`).
    _port: ReservedPort,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` (job `shiftgate`) every second with the shipped
    /// alert rules, and waits until it is ready.
    pub async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = ReservedPort::loopback().unwrap();
        let addr = port.addr();
        let config = format!(
            r#"global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - "{rules}"
scrape_configs:
  - job_name: shiftgate
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"#,
            rules = repo_path("deploy/prometheus/alerts.yml").display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus must be on PATH (Debian package `prometheus`)");
        let p = Prometheus {
            child,
            addr,
            dir,
            _port: port,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if get(p.addr, "/-/ready").await.is_ok_and(|a| a.status == 200) {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus did not become ready:\n{}",
                p.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    pub async fn api(&self, path_and_query: &str) -> serde_json::Value {
        let a = get(self.addr, path_and_query)
            .await
            .expect("prometheus answers");
        let v: serde_json::Value = serde_json::from_slice(&a.body).unwrap_or_else(|e| {
            panic!(
                "{path_and_query}: not JSON ({e}): {}",
                String::from_utf8_lossy(&a.body)
            )
        });
        v
    }

    /// An instant query at `time`: `Ok(result vector)` or `Err(what Prometheus said)`.
    pub async fn query(&self, expr: &str, time: f64) -> Result<Vec<serde_json::Value>, String> {
        let v = self
            .api(&format!(
                "/api/v1/query?query={}&time={time:.3}",
                url_encode(expr)
            ))
            .await;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        if let Some(w) = v.get("warnings") {
            return Err(format!("warnings: {w}"));
        }
        match v["data"]["resultType"].as_str() {
            Some("vector") => Ok(v["data"]["result"].as_array().cloned().unwrap_or_default()),
            Some("scalar") => Ok(vec![v["data"]["result"].clone()]),
            other => Err(format!("unexpected result type {other:?}")),
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

// ------------------------------------------------------------------------------------------
// PromQL
// ------------------------------------------------------------------------------------------

/// Splits an alert expression at its top-level comparison: `(left side, operator, right side)`.
/// Comparisons inside parentheses, brackets, label matchers or strings are not top level.
pub fn split_comparison(expr: &str) -> Option<(&str, &str, &str)> {
    let b = expr.as_bytes();
    let mut depth = 0i32;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 1;
            } else if c == q {
                quote = None;
            }
        } else {
            match c {
                b'"' | b'\'' | b'`' => quote = Some(c),
                b'(' | b'[' | b'{' => depth += 1,
                b')' | b']' | b'}' => depth -= 1,
                _ if depth == 0 => {
                    for op in ["==", "!=", ">=", "<=", ">", "<"] {
                        if expr[i..].starts_with(op) {
                            let lhs = expr[..i].trim();
                            let rhs = expr[i + op.len()..].trim();
                            return Some((lhs, op, rhs));
                        }
                    }
                }
                _ => {}
            }
        }
        i += 1;
    }
    None
}
