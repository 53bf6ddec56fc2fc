//! What discovery prints and writes: the summary for a person, the `--json` object, the
//! config.yaml built from the limits found, and the HTML report.

use std::fmt::Write as _;

use serde::Serialize;

use super::estimate::{FoundLimit, Scope};
use super::experiment::Sample;
use super::Endpoint;
use crate::loadtest::charts::{line_chart, Series};
use crate::loadtest::Percentiles;

/// Budgets are set this far below the limits found, so clock skew and the proxy's own
/// rounding never tip a shift start into 429s.
pub const GUARD_BAND: f64 = 0.9;

/// A limit the org limits API lists.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Listed {
    pub namespace: String,
    pub key: String,
    pub value: u64,
}

/// The `--json` object: the contract's fields first, then what this implementation adds.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub endpoint: &'static str,
    pub limits: Vec<FoundLimit>,
    pub requests_sent: usize,
    pub upstream_429s: usize,
    pub latency_ms: Latency,
    pub users_touched: usize,
    pub users_restored: usize,
    pub config: String,
    /// Everything the org limits API listed (empty when it is not available).
    pub listed: Vec<Listed>,
    /// How the scopes were told apart, in words.
    pub notes: Vec<String>,
    /// Stopped by Ctrl-C before the experiment ended.
    pub interrupted: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    pub p50: f64,
    pub p99: f64,
}

impl Latency {
    pub fn of(samples: &[Sample]) -> Latency {
        let values = samples
            .iter()
            .map(|s| std::time::Duration::from_secs_f64(s.latency_ms / 1000.0))
            .collect();
        match Percentiles::of(values) {
            Some(p) => Latency {
                p50: round1(p.p50.as_secs_f64() * 1000.0),
                p99: round1(p.p99.as_secs_f64() * 1000.0),
            },
            None => Latency::default(),
        }
    }
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// A rate as config.yaml spells it, `<n>/s` from 1 a second on, else `<n>/min`.
pub fn rate_text(per_second: f64) -> String {
    let (n, unit) = if per_second >= 1.0 {
        (per_second, "s")
    } else {
        (per_second * 60.0, "min")
    };
    let text = format!("{n:.3}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text}/{unit}")
}

/// A complete config.yaml: the proxy in front of `api` and `login`, a per-token budget and the
/// endpoint's shared budget at [`GUARD_BAND`] of the limits found, the usual routes.
pub fn config_yaml(
    api: &str,
    login: &str,
    endpoint: Endpoint,
    token: Option<&FoundLimit>,
    org: Option<&FoundLimit>,
) -> String {
    let mut y = String::new();
    let describe = |l: &FoundLimit| {
        format!(
            "{} per {} s{}",
            l.requests,
            l.window_s,
            if l.lower_bound {
                " at least (not reached)"
            } else {
                ""
            }
        )
    };
    let _ = writeln!(
        y,
        "# Written by `shiftgate discover` for {}.",
        endpoint.describe()
    );
    if let Some(t) = token {
        let _ = writeln!(y, "# Per token: {}.", describe(t));
    }
    if let Some(o) = org {
        let _ = writeln!(y, "# Shared by the org: {}.", describe(o));
    }
    let _ = writeln!(
        y,
        "# Budgets are {:.0} % of those rates.",
        GUARD_BAND * 100.0
    );
    y.push_str("listen: \"0.0.0.0:8080\"\nadmin_listen: \"127.0.0.1:9090\"\n\n");
    let _ = writeln!(
        y,
        "upstreams:\n  api:   {{ url: {} }}\n  login: {{ url: {} }}\n",
        yaml_string(api),
        yaml_string(login)
    );
    let name = endpoint.route_name();
    let token_budget = token.map(|t| rate_text(t.per_second * GUARD_BAND));
    let org_budget = org.map(|o| rate_text(o.per_second * GUARD_BAND));
    let mut budgets_of_route = Vec::new();
    let mut default_budgets = Vec::new();
    if token_budget.is_some() || org_budget.is_some() {
        y.push_str("budgets:\n");
        if let Some(rate) = &token_budget {
            let _ = writeln!(
                y,
                "  per-token: {{ rate: \"{rate}\", per: token, max_keys: 100000 }}"
            );
        }
        if let Some(rate) = &org_budget {
            let _ = writeln!(y, "  {name}: {{ rate: \"{rate}\", burst: 1 }}");
            budgets_of_route.push(name);
        }
        if token_budget.is_some() {
            budgets_of_route.push("per-token");
            default_budgets.push("per-token");
        }
        y.push('\n');
    }
    y.push_str(
        "routes:\n  - name: sdk-gateway-login\n    match: { path: \"/login/**\" }\n    strip_prefix: \"/login\"\n    upstream: login\n  - name: oauth\n    match: { path: \"/oauth/**\" }\n    upstream: login\n",
    );
    let _ = writeln!(
        y,
        "  - name: {name}\n    match: {}\n    upstream: api",
        endpoint.route_match()
    );
    if !budgets_of_route.is_empty() {
        let _ = writeln!(y, "    budgets: [{}]", budgets_of_route.join(", "));
    }
    y.push_str("    max_wait: \"20s\"\n    priority: high\n");
    y.push_str("  - name: default\n    match: { path: \"/**\" }\n    upstream: api\n");
    if !default_budgets.is_empty() {
        let _ = writeln!(y, "    budgets: [{}]", default_budgets.join(", "));
    }
    y.push_str("\nqueue:\n  max_wait: \"30s\"\n  max_depth: 10000\n\nretry:\n  max_attempts: 5\n  max_elapsed: \"60s\"\n  on_5xx: idempotent\n");
    y
}

/// A double-quoted YAML scalar.
fn yaml_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// The summary a person reads.
pub fn summary(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "shiftgate discover: {}", report.endpoint);
    for l in &report.limits {
        let scope = match l.scope {
            Scope::Token => "per token",
            Scope::Org => "org-wide ",
        };
        let _ = write!(
            out,
            "  {scope}: {}{} requests per {} s ({:.2}/s)",
            if l.lower_bound { "at least " } else { "" },
            l.requests,
            l.window_s,
            l.per_second
        );
        if let Some(key) = &l.key {
            let _ = write!(out, " [{key}]");
        }
        let _ = write!(out, " — {}", l.source);
        if let (Some(listed), Some(window), Some(agrees)) = (l.listed, l.listed_window_s, l.agrees)
        {
            let _ = write!(
                out,
                ", listed {listed} per {window} s: {}",
                if agrees { "agrees" } else { "differs" }
            );
        }
        out.push('\n');
    }
    for note in &report.notes {
        let _ = writeln!(out, "  note: {note}");
    }
    let _ = writeln!(
        out,
        "  requests sent: {}, upstream 429s: {}, latency p50 {} ms, p99 {} ms",
        report.requests_sent, report.upstream_429s, report.latency_ms.p50, report.latency_ms.p99
    );
    let _ = writeln!(
        out,
        "  users touched: {}, restored: {}{}",
        report.users_touched,
        report.users_restored,
        if report.interrupted {
            " (interrupted)"
        } else {
            ""
        }
    );
    out
}

/// The HTML report: rate sent against answers and 429s over time, latency, the limits found.
pub fn html_report(report: &Report, samples: &[Sample]) -> Result<String, String> {
    let end = samples.iter().map(|s| s.at).fold(0.0, f64::max);
    let bucket = if end > 120.0 { 5.0 } else { 1.0 };
    let buckets = (end / bucket).floor() as usize + 1;
    let mut sent = vec![0.0; buckets];
    let mut ok = vec![0.0; buckets];
    let mut refused = vec![0.0; buckets];
    let mut latency: Vec<Vec<f64>> = vec![Vec::new(); buckets];
    for s in samples {
        let i = (s.at / bucket) as usize;
        sent[i] += 1.0 / bucket;
        if (200..300).contains(&s.status) {
            ok[i] += 1.0 / bucket;
        }
        if s.status == 429 {
            refused[i] += 1.0 / bucket;
        }
        latency[i].push(s.latency_ms);
    }
    let points = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, y)| (i as f64 * bucket, *y))
            .collect()
    };
    let p50: Vec<(f64, f64)> = latency
        .iter_mut()
        .enumerate()
        .filter(|(_, v)| !v.is_empty())
        .map(|(i, v)| {
            v.sort_by(f64::total_cmp);
            (i as f64 * bucket, v[v.len() / 2])
        })
        .collect();
    let rates = line_chart(
        "Requests per second: sent, answered, refused (429)",
        "requests/s",
        &[
            Series {
                label: "sent",
                color: plotters::style::RGBColor(60, 60, 200),
                points: points(&sent),
            },
            Series {
                label: "answered 2xx",
                color: plotters::style::RGBColor(40, 150, 60),
                points: points(&ok),
            },
            Series {
                label: "429",
                color: plotters::style::RGBColor(210, 50, 40),
                points: points(&refused),
            },
        ],
    )
    .map_err(|e| e.to_string())?;
    let latency_chart = line_chart(
        "Latency (median of each second)",
        "ms",
        &[Series {
            label: "p50",
            color: plotters::style::RGBColor(120, 60, 160),
            points: p50,
        }],
    )
    .map_err(|e| e.to_string())?;
    let mut rows = String::new();
    for l in &report.limits {
        let _ = write!(
            rows,
            "<tr><td>{:?}</td><td>{}{}</td><td>{}</td><td>{:.2}</td><td>{}</td><td>{}</td></tr>",
            l.scope,
            if l.lower_bound { "≥ " } else { "" },
            l.requests,
            l.window_s,
            l.per_second,
            l.source,
            escape(l.key.as_deref().unwrap_or("")),
        );
    }
    Ok(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>shiftgate discover</title>\
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}pre{{background:#f4f4f4;padding:1em}}</style></head><body>\
<h1>shiftgate discover: {}</h1>\
<h2>Limits found</h2><table><tr><th>scope</th><th>requests</th><th>window (s)</th><th>per second</th><th>source</th><th>key</th></tr>{rows}</table>\
<p>{} requests sent, {} answered 429; {} users touched, {} restored.</p>\
{rates}{latency_chart}<h2>config.yaml</h2><pre>{}</pre></body></html>",
        escape(report.endpoint),
        report.requests_sent,
        report.upstream_429s,
        report.users_touched,
        report.users_restored,
        escape(&report.config),
    ))
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discover::WindowFit;

    fn limit(scope: Scope, requests: u32, window_s: f64) -> FoundLimit {
        FoundLimit::measured(
            scope,
            WindowFit {
                requests,
                window_s,
                opened_at: 0.0,
                ambiguous: false,
            },
        )
    }

    #[test]
    fn rates_are_spelled_as_the_config_wants_them() {
        assert_eq!(rate_text(90.0), "90/s");
        assert_eq!(rate_text(4.5), "4.5/s");
        assert_eq!(rate_text(0.5), "30/min");
    }

    #[test]
    fn the_written_config_is_one_check_accepts_with_budgets_under_the_limits() {
        for endpoint in [Endpoint::Presence, Endpoint::RoutingStatus] {
            let token = limit(Scope::Token, 300, 60.0);
            let org = limit(Scope::Org, 100, 1.0);
            let text = config_yaml(
                "https://api.mypurecloud.com",
                "https://login.mypurecloud.com",
                endpoint,
                Some(&token),
                Some(&org),
            );
            let config =
                crate::config::Config::parse(&text).unwrap_or_else(|e| panic!("{e:?}\n{text}"));
            let summary = config.summary();
            assert!(text.contains("rate: \"4.5/s\", per: token"), "{text}");
            assert!(text.contains("rate: \"90/s\", burst: 1"), "{text}");
            assert!(!summary.is_empty());
        }
        let only_token = config_yaml(
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
            Endpoint::Presence,
            Some(&limit(Scope::Token, 20, 10.0)),
            None,
        );
        crate::config::Config::parse(&only_token).unwrap();
        let nothing = config_yaml(
            "http://127.0.0.1:1",
            "http://127.0.0.1:1",
            Endpoint::Presence,
            None,
            None,
        );
        crate::config::Config::parse(&nothing).unwrap();
    }
}
