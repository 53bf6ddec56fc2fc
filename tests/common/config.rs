//! The proxy's config.yaml, written in one place: the header the harness fills in (`listen`,
//! `admin_listen` and the upstreams, all on loopback) and what a test adds (budgets, routes,
//! other top-level keys). A test never writes the header itself.

use std::net::SocketAddr;

/// A config to render once the ports are known: see [`ProxyConfig::render`].
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    upstreams: Vec<(String, Upstream)>,
    budgets: Vec<String>,
    routes: Vec<String>,
    rest: Vec<String>,
    padded_to: Option<usize>,
}

#[derive(Debug, Clone)]
enum Upstream {
    /// The address the proxy is started against, over this scheme.
    Given(&'static str),
    /// A URL of its own.
    Url(String),
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyConfig {
    /// One upstream, `api`, at the address the proxy is started against (as a rule the
    /// emulator); no budget, no route yet.
    pub fn new() -> Self {
        ProxyConfig {
            upstreams: vec![("api".into(), Upstream::Given("http"))],
            budgets: Vec::new(),
            routes: Vec::new(),
            rest: Vec::new(),
            padded_to: None,
        }
    }

    /// Another upstream at that same address, e.g. `login` (Genesys's login host).
    pub fn upstream(mut self, name: &str) -> Self {
        self.upstreams.push((name.into(), Upstream::Given("http")));
        self
    }

    /// `api` over TLS.
    pub fn api_https(mut self) -> Self {
        self.upstreams[0].1 = Upstream::Given("https");
        self
    }

    /// `api` at a URL of its own (a name the proxy must resolve, say).
    pub fn api_url(mut self, url: &str) -> Self {
        self.upstreams[0].1 = Upstream::Url(url.into());
        self
    }

    /// A budget under `budgets:`, e.g. `.budget("presence", r#"{ rate: "100/s" }"#)`.
    pub fn budget(mut self, name: &str, spec: &str) -> Self {
        self.budgets.push(format!("  {name}: {spec}\n"));
        self
    }

    /// The next route under `routes:`: one YAML mapping, in flow style or in block style (its
    /// lines indented alike).
    pub fn route(mut self, mapping: &str) -> Self {
        let mut item = String::new();
        for (i, line) in dedent(mapping).lines().enumerate() {
            let indent = if i == 0 { "  - " } else { "    " };
            item.push_str(indent);
            item.push_str(line);
            item.push('\n');
        }
        self.routes.push(item);
        self
    }

    /// More top-level YAML (`queue:`, `retry:` ...), as is once dedented.
    pub fn yaml(mut self, text: &str) -> Self {
        let text = dedent(text);
        if !text.is_empty() {
            self.rest.push(text + "\n");
        }
        self
    }

    /// Pads the rendered file with a trailing comment to exactly `len` bytes (so that files of
    /// one test can have the same size).
    pub fn padded_to(mut self, len: usize) -> Self {
        self.padded_to = Some(len);
        self
    }

    /// The file, with the proxy on `listen` and `admin` and the upstreams at `upstream`. Its
    /// first line is a comment, so the YAML starts on line 2.
    pub fn render(&self, listen: SocketAddr, admin: SocketAddr, upstream: SocketAddr) -> String {
        let mut text = format!("# Written by the test harness.\nlisten: \"{listen}\"\n");
        text.push_str(&format!("admin_listen: \"{admin}\"\nupstreams:\n"));
        for (name, to) in &self.upstreams {
            let url = match to {
                Upstream::Given(scheme) => format!("{scheme}://{upstream}"),
                Upstream::Url(url) => url.clone(),
            };
            text.push_str(&format!("  {name}: {{ url: \"{url}\" }}\n"));
        }
        if !self.budgets.is_empty() {
            text.push_str("budgets:\n");
            text.extend(self.budgets.iter().map(String::as_str));
        }
        if !self.routes.is_empty() {
            text.push_str("routes:\n");
            text.extend(self.routes.iter().map(String::as_str));
        }
        text.extend(self.rest.iter().map(String::as_str));
        if let Some(len) = self.padded_to {
            assert!(
                text.len() + 3 <= len,
                "config too long to pad to {len}: {text}"
            );
            text.push('#');
            while text.len() < len - 1 {
                text.push(' ');
            }
            text.push('\n');
        }
        text
    }
}

/// `text` without its leading and trailing blank lines and without the indentation all its
/// lines share.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let first = lines.iter().position(|l| !l.trim().is_empty());
    let last = lines.iter().rposition(|l| !l.trim().is_empty());
    let (Some(first), Some(last)) = (first, last) else {
        return String::new();
    };
    let lines = &lines[first..=last];
    let indent = lines
        .iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap_or(0);
    lines
        .iter()
        .map(|l| l.get(indent..).unwrap_or("").trim_end())
        .collect::<Vec<_>>()
        .join("\n")
}
