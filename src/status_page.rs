//! The `/status` page: one self-contained HTML document, every config- and client-derived text escaped.
//!
//! The page is for a person watching a shift change: it refreshes itself every 2 seconds, needs
//! no external assets or scripts, and keeps stable classes and `data-` attributes so a browser
//! test (or a curl | grep) can read the numbers. `/status.json` serves the same
//! [`StatusSnapshot`] serialised.

use serde::Serialize;
use std::fmt::{self, Write};

/// Everything the status page shows, taken at one instant.
#[derive(Serialize, Clone, Debug)]
pub struct StatusSnapshot {
    pub version: String,
    pub uptime_seconds: u64,
    pub draining: bool,
    pub config_path: String,
    /// Unix time of the last reload attempt (the load at start included).
    pub last_reload_unix: Option<u64>,
    pub last_reload_ok: Option<bool>,
    /// Every error of the last reload when it failed; the old config stays in force.
    pub last_reload_error: Option<String>,
    /// Requests waiting for slots now, all routes together.
    pub queue_depth: u64,
    /// `queue.max_depth`: beyond it new requests get 429 `shiftgate.queue.full`.
    pub queue_max_depth: u64,
    pub inflight: u64,
    pub routes: Vec<RouteStatus>,
    pub budgets: Vec<BudgetStatus>,
    /// Newest first.
    pub recent_throttles: Vec<ThrottleEvent>,
}

/// One route, in config order.
#[derive(Serialize, Clone, Debug)]
pub struct RouteStatus {
    pub name: String,
    /// `None` matches any method.
    pub method: Option<String>,
    pub path: String,
    pub upstream: String,
    pub budgets: Vec<String>,
    pub priority: String,
    pub max_wait_seconds: f64,
    pub queue_depth: u64,
    pub inflight: u64,
    pub requests_total: u64,
    pub rejections_total: u64,
    /// With `coalesce`: where its updates go in bulk, and how many did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coalesce: Option<CoalesceStatus>,
}

/// A coalescing route's bulk calls.
#[derive(Serialize, Clone, Debug)]
pub struct CoalesceStatus {
    /// The bulk route.
    pub into: String,
    pub window_seconds: f64,
    pub max_batch: usize,
    /// Updates sent inside bulk calls.
    pub coalesced_total: u64,
    /// Bulk calls made.
    pub batches_total: u64,
}

/// One budget, in config order. Rates are requests per second.
#[derive(Serialize, Clone, Debug)]
pub struct BudgetStatus {
    pub name: String,
    pub per: String,
    pub burst: u32,
    pub configured_rate: f64,
    /// Below `configured_rate` while the budget backs off after upstream 429s.
    pub rate_in_force: f64,
    /// Buckets held now (one per token, client or header value; 1 for `global`).
    pub keys: u64,
    /// Seconds until the budget grants again after an upstream `Retry-After`; 0 when not paused.
    pub paused_for_seconds: f64,
    pub waiting: u64,
    pub throttles_total: u64,
}

/// An upstream 429 charged to a budget.
#[derive(Serialize, Clone, Debug)]
pub struct ThrottleEvent {
    pub unix_time: u64,
    pub budget: String,
    pub route: String,
    pub retry_after_seconds: u64,
}

/// Escapes text for HTML element content and for attribute values in double or single quotes.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body{font:14px/1.4 system-ui,-apple-system,'Segoe UI',sans-serif;margin:1.5em;color:#1d1d1f;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .3em}h2{font-size:1.1em;margin:1.6em 0 .4em}
.summary{display:flex;flex-wrap:wrap;gap:.6em;margin:.4em 0}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.4em .8em}
.card b{display:block;font-size:.75em;color:#666;font-weight:normal;text-transform:uppercase}
.ok{color:#1a7f37}.bad{color:#b3261e;font-weight:bold}.warn{color:#9a6700;font-weight:bold}
.error{background:#fdecea;border:1px solid #b3261e;padding:.5em .8em;white-space:pre-wrap;border-radius:6px}
table{border-collapse:collapse;background:#fff;border:1px solid #ddd}
th,td{padding:.3em .7em;border-bottom:1px solid #eee;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600}
th.num{text-align:right}
td.max-wait,td.queue-depth,td.inflight,td.requests,td.rejections,td.configured-rate,td.rate-in-force,
td.burst,td.keys,td.paused,td.waiting,td.throttles,td.retry-after{text-align:right;font-variant-numeric:tabular-nums}
.marker{color:#b3261e;font-weight:bold;background:#fdecea;padding:0 .3em;border-radius:3px}
code{font-size:.95em}.muted{color:#888}
td.name,td.budgets,td.time{white-space:nowrap}
";

/// Renders the whole page. Pure: the same snapshot always gives the same document.
pub fn render_html(s: &StatusSnapshot) -> String {
    let mut h = String::with_capacity(8192);
    write_page(&mut h, s).expect("writing to a String cannot fail");
    h
}

fn write_page(h: &mut String, s: &StatusSnapshot) -> fmt::Result {
    writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta http-equiv=\"refresh\" content=\"2\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>shiftgate {}{}</title>\n<style>{STYLE}</style>\n</head>\n<body>",
        escape_html(&s.version),
        if s.draining { " (draining)" } else { "" }
    )?;
    write_header(h, s)?;
    write_routes(h, &s.routes)?;
    write_coalescing(h, &s.routes)?;
    write_budgets(h, &s.budgets)?;
    write_throttles(h, &s.recent_throttles)?;
    h.push_str("</body>\n</html>\n");
    Ok(())
}

fn write_header(h: &mut String, s: &StatusSnapshot) -> fmt::Result {
    writeln!(
        h,
        "<header>\n<h1>shiftgate <span id=\"version\">{}</span></h1>\n<div class=\"summary\">",
        escape_html(&s.version)
    )?;
    let state = if s.draining {
        "<span id=\"state\" class=\"bad\" data-draining=\"true\">draining</span>"
    } else {
        "<span id=\"state\" class=\"ok\" data-draining=\"false\">serving</span>"
    };
    writeln!(h, "<div class=\"card\"><b>state</b>{state}</div>")?;
    writeln!(
        h,
        "<div class=\"card\"><b>uptime</b><span id=\"uptime\" data-seconds=\"{0}\">{1}</span></div>",
        s.uptime_seconds,
        human_duration(s.uptime_seconds)
    )?;
    // The queue is shared by all routes; near max_depth new arrivals get 429 queue.full.
    let queue_class = if s.queue_max_depth > 0 && s.queue_depth * 10 >= s.queue_max_depth * 8 {
        "bad"
    } else if s.queue_depth > 0 {
        "warn"
    } else {
        "ok"
    };
    writeln!(
        h,
        "<div class=\"card\"><b>waiting / max</b><span id=\"queue-depth\" class=\"{queue_class}\">{}</span> / <span id=\"queue-max-depth\">{}</span></div>",
        s.queue_depth, s.queue_max_depth
    )?;
    writeln!(
        h,
        "<div class=\"card\"><b>in flight upstream</b><span id=\"inflight\">{}</span></div>",
        s.inflight
    )?;
    let reload = match (s.last_reload_unix, s.last_reload_ok) {
        (None, _) => "<span class=\"muted\">never</span>".to_owned(),
        (Some(t), ok) => {
            let (class, word) = match ok {
                Some(true) => ("ok", "ok"),
                Some(false) => ("bad", "FAILED"),
                None => ("muted", "unknown"),
            };
            format!(
                "<span class=\"{class}\">{word}</span> at {}",
                time_element(t)
            )
        }
    };
    writeln!(
        h,
        "<div class=\"card\"><b>last reload</b><span id=\"last-reload\">{reload}</span></div>"
    )?;
    writeln!(
        h,
        "<div class=\"card\"><b>config</b><code id=\"config-path\">{}</code></div>\n</div>",
        escape_html(&s.config_path)
    )?;
    if let Some(err) = &s.last_reload_error {
        writeln!(
            h,
            "<div id=\"last-reload-error\" class=\"error\"><b>Last reload failed; the previous config is still in force.</b>\n{}</div>",
            escape_html(err)
        )?;
    }
    h.push_str("</header>\n");
    Ok(())
}

/// Only when a route coalesces: its bulk route, settings and how full its batches are.
fn write_coalescing(h: &mut String, routes: &[RouteStatus]) -> fmt::Result {
    let coalescing: Vec<(&RouteStatus, &CoalesceStatus)> = routes
        .iter()
        .filter_map(|r| Some((r, r.coalesce.as_ref()?)))
        .collect();
    if coalescing.is_empty() {
        return Ok(());
    }
    h.push_str(
        "<h2>Coalescing</h2>\n<table id=\"coalescing\">\n<thead><tr><th>route</th><th>into</th>\
         <th class=\"num\">window</th><th class=\"num\">max batch</th><th class=\"num\">updates in bulk calls</th>\
         <th class=\"num\">bulk calls</th><th class=\"num\">mean batch</th></tr></thead>\n<tbody>\n",
    );
    for (r, c) in coalescing {
        let mean = if c.batches_total == 0 {
            "–".to_string()
        } else {
            format!("{:.1}", c.coalesced_total as f64 / c.batches_total as f64)
        };
        writeln!(
            h,
            "<tr class=\"coalesce\" data-route=\"{name}\"><td class=\"name\">{name}</td>\
             <td class=\"into\">{into}</td><td class=\"window\">{window}</td>\
             <td class=\"max-batch\">{max_batch}</td><td class=\"coalesced\">{coalesced}</td>\
             <td class=\"batches\">{batches}</td><td class=\"mean-batch\">{mean}</td></tr>",
            name = escape_html(&r.name),
            into = escape_html(&c.into),
            window = seconds(c.window_seconds),
            max_batch = c.max_batch,
            coalesced = c.coalesced_total,
            batches = c.batches_total,
        )?;
    }
    h.push_str("</tbody>\n</table>\n");
    Ok(())
}

fn write_routes(h: &mut String, routes: &[RouteStatus]) -> fmt::Result {
    h.push_str(
        "<h2>Routes</h2>\n<table id=\"routes\">\n<thead><tr><th>route</th><th>match</th><th>upstream</th>\
         <th>budgets</th><th>priority</th><th class=\"num\">max wait</th><th class=\"num\">waiting now</th>\
         <th class=\"num\">in flight</th><th class=\"num\">requests</th><th class=\"num\">rejections</th></tr></thead>\n<tbody>\n",
    );
    if routes.is_empty() {
        h.push_str("<tr><td colspan=\"10\" class=\"muted\">no routes</td></tr>\n");
    }
    for r in routes {
        let name = escape_html(&r.name);
        let method = r.method.as_deref().map(escape_html);
        let method = method.as_deref().unwrap_or("any");
        let budgets = if r.budgets.is_empty() {
            "<span class=\"muted\">unpaced</span>".to_owned()
        } else {
            r.budgets
                .iter()
                .map(|b| escape_html(b))
                .collect::<Vec<_>>()
                .join(", ")
        };
        writeln!(
            h,
            "<tr class=\"route\" data-route=\"{name}\">\
             <td class=\"name\">{name}</td>\
             <td class=\"match\"><code>{method} {path}</code></td>\
             <td class=\"upstream\">{upstream}</td>\
             <td class=\"budgets\">{budgets}</td>\
             <td class=\"priority\">{priority}</td>\
             <td class=\"max-wait\">{max_wait}</td>\
             <td class=\"queue-depth\">{depth}</td>\
             <td class=\"inflight\">{inflight}</td>\
             <td class=\"requests\">{requests}</td>\
             <td class=\"rejections\">{rejections}</td></tr>",
            path = escape_html(&r.path),
            upstream = escape_html(&r.upstream),
            priority = escape_html(&r.priority),
            max_wait = seconds(r.max_wait_seconds),
            depth = r.queue_depth,
            inflight = r.inflight,
            requests = r.requests_total,
            rejections = if r.rejections_total > 0 {
                format!("<span class=\"bad\">{}</span>", r.rejections_total)
            } else {
                "0".to_owned()
            },
        )?;
    }
    h.push_str("</tbody>\n</table>\n");
    Ok(())
}

fn write_budgets(h: &mut String, budgets: &[BudgetStatus]) -> fmt::Result {
    h.push_str(
        "<h2>Budgets</h2>\n<table id=\"budgets\">\n<thead><tr><th>budget</th><th>per</th>\
         <th class=\"num\">configured rate</th><th class=\"num\">rate in force</th><th class=\"num\">burst</th>\
         <th class=\"num\">keys</th><th class=\"num\">paused for</th><th class=\"num\">waiting</th>\
         <th class=\"num\">upstream 429s</th></tr></thead>\n<tbody>\n",
    );
    if budgets.is_empty() {
        h.push_str(
            "<tr><td colspan=\"9\" class=\"muted\">no budgets: every route is unpaced</td></tr>\n",
        );
    }
    for b in budgets {
        let name = escape_html(&b.name);
        // Backing off after upstream 429s: the one thing on this table ops must not miss.
        let below = b.rate_in_force < b.configured_rate;
        let marker = if below {
            let pct = if b.configured_rate > 0.0 {
                (b.rate_in_force / b.configured_rate * 100.0).round()
            } else {
                0.0
            };
            format!(" <span class=\"marker\" title=\"below the configured rate after upstream 429s\">&#9660; {pct}%</span>")
        } else {
            String::new()
        };
        let paused = if b.paused_for_seconds > 0.0 {
            format!(
                "<span class=\"bad\">{}</span>",
                seconds(b.paused_for_seconds)
            )
        } else {
            "<span class=\"muted\">no</span>".to_owned()
        };
        writeln!(
            h,
            "<tr class=\"budget\" data-budget=\"{name}\">\
             <td class=\"name\">{name}</td>\
             <td class=\"per\">{per}</td>\
             <td class=\"configured-rate\">{configured_text}</td>\
             <td class=\"rate-in-force\">{force_text}{marker}</td>\
             <td class=\"burst\">{burst}</td>\
             <td class=\"keys\">{keys}</td>\
             <td class=\"paused\">{paused}</td>\
             <td class=\"waiting\">{waiting}</td>\
             <td class=\"throttles\">{throttles}</td></tr>",
            per = escape_html(&b.per),
            configured_text = rate(b.configured_rate),
            force_text = rate(b.rate_in_force),
            burst = b.burst,
            keys = b.keys,
            waiting = b.waiting,
            throttles = b.throttles_total,
        )?;
    }
    h.push_str("</tbody>\n</table>\n");
    Ok(())
}

fn write_throttles(h: &mut String, events: &[ThrottleEvent]) -> fmt::Result {
    h.push_str("<h2>Recent upstream 429s</h2>\n");
    if events.is_empty() {
        h.push_str("<p id=\"throttles-none\" class=\"muted\">none</p>\n");
        return Ok(());
    }
    h.push_str(
        "<table id=\"throttles\">\n<thead><tr><th>time (UTC)</th><th>budget</th><th>route</th>\
         <th class=\"num\">Retry-After</th></tr></thead>\n<tbody>\n",
    );
    for e in events {
        writeln!(
            h,
            "<tr class=\"throttle\"><td class=\"time\">{t}</td>\
             <td class=\"throttle-budget\">{}</td><td class=\"throttle-route\">{}</td>\
             <td class=\"retry-after\">{} s</td></tr>",
            escape_html(&e.budget),
            escape_html(&e.route),
            e.retry_after_seconds,
            t = time_element(e.unix_time),
        )?;
    }
    h.push_str("</tbody>\n</table>\n");
    Ok(())
}

/// A number with at most three decimals and no trailing zeros: `5`, `0.5`, `0.028`.
fn short_number(x: f64) -> String {
    let s = format!("{x:.3}");
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        &s
    };
    if s == "-0" {
        "0".to_owned()
    } else {
        s.to_owned()
    }
}

fn seconds(x: f64) -> String {
    format!("{} s", short_number(x))
}

/// Requests per second, with the per-minute figure Genesys states its limits in.
fn rate(per_second: f64) -> String {
    format!(
        "{}/s <span class=\"muted\">({}/min)</span>",
        short_number(per_second),
        short_number(per_second * 60.0)
    )
}

/// `3d 4h`, `2h 5m`, `7m 30s`, `42s`: the two largest units are enough at a glance.
fn human_duration(total: u64) -> String {
    let (d, h, m, s) = (
        total / 86_400,
        total / 3600 % 24,
        total / 60 % 60,
        total % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// `<time datetime="2023-11-14T22:13:20Z">2023-11-14 22:13:20 UTC</time>`.
fn time_element(unix: u64) -> String {
    let iso = utc_datetime(unix);
    let shown = iso.replace('T', " ").replace('Z', " UTC");
    format!("<time datetime=\"{iso}\">{shown}</time>")
}

/// `YYYY-MM-DDTHH:MM:SSZ` for a Unix time, without a date library.
fn utc_datetime(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let secs = unix % 86_400;
    let (year, month, day) = crate::access::civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> StatusSnapshot {
        StatusSnapshot {
            version: "0.1.0".into(),
            uptime_seconds: 3725,
            draining: false,
            config_path: "/etc/shiftgate/config.yaml".into(),
            last_reload_unix: Some(1_700_000_000),
            last_reload_ok: Some(true),
            last_reload_error: None,
            queue_depth: 7,
            queue_max_depth: 10_000,
            inflight: 3,
            routes: vec![
                RouteStatus {
                    name: "presence".into(),
                    method: Some("PATCH".into()),
                    path: "/api/v2/users/{userId}/presences/{sourceId}".into(),
                    upstream: "api".into(),
                    budgets: vec!["presence".into(), "per-token".into()],
                    priority: "high".into(),
                    max_wait_seconds: 20.0,
                    queue_depth: 7,
                    inflight: 3,
                    requests_total: 1234,
                    rejections_total: 5,
                    coalesce: Some(CoalesceStatus {
                        into: "presence-bulk".into(),
                        window_seconds: 0.01,
                        max_batch: 50,
                        coalesced_total: 1000,
                        batches_total: 20,
                    }),
                },
                RouteStatus {
                    name: "default".into(),
                    method: None,
                    path: "/**".into(),
                    upstream: "api".into(),
                    budgets: vec![],
                    priority: "normal".into(),
                    max_wait_seconds: 30.0,
                    queue_depth: 0,
                    inflight: 0,
                    requests_total: 0,
                    rejections_total: 0,
                    coalesce: None,
                },
            ],
            budgets: vec![
                BudgetStatus {
                    name: "presence".into(),
                    per: "global".into(),
                    burst: 1,
                    configured_rate: 100.0,
                    rate_in_force: 62.5,
                    keys: 1,
                    paused_for_seconds: 12.0,
                    waiting: 7,
                    throttles_total: 4,
                },
                BudgetStatus {
                    name: "per-token".into(),
                    per: "token".into(),
                    burst: 1,
                    configured_rate: 5.0,
                    rate_in_force: 5.0,
                    keys: 12,
                    paused_for_seconds: 0.0,
                    waiting: 0,
                    throttles_total: 0,
                },
            ],
            recent_throttles: vec![ThrottleEvent {
                unix_time: 1_700_000_100,
                budget: "presence".into(),
                route: "presence".into(),
                retry_after_seconds: 42,
            }],
        }
    }

    /// The `<tr ...>` element of the row that opens with `open`, up to its `</tr>`.
    fn row<'a>(html: &'a str, open: &str) -> &'a str {
        let start = html
            .find(open)
            .unwrap_or_else(|| panic!("no {open} in:\n{html}"));
        let len = html[start..].find("</tr>").expect("row is closed");
        &html[start..start + len]
    }

    #[test]
    fn escape_html_replaces_the_five_special_characters() {
        assert_eq!(
            escape_html(r#"<a href="x" onclick='y'>&amp;</a>"#),
            "&lt;a href=&quot;x&quot; onclick=&#39;y&#39;&gt;&amp;amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn escape_html_leaves_plain_and_non_ascii_text_alone() {
        assert_eq!(
            escape_html("presence-route_1 /api/v2/{userId}"),
            "presence-route_1 /api/v2/{userId}"
        );
        assert_eq!(escape_html("Zürich ▼ 東京"), "Zürich ▼ 東京");
        assert_eq!(escape_html(""), "");
    }

    #[test]
    fn page_refreshes_itself_and_needs_nothing_external() {
        let html = render_html(&snapshot());
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("<meta http-equiv=\"refresh\" content=\"2\">"));
        assert!(html.contains("<style>"));
        for external in ["<script", "<link", "src=", "http://", "https://"] {
            assert!(!html.contains(external), "page references {external}");
        }
    }

    #[test]
    fn a_coalescing_route_shows_its_bulk_route_and_mean_batch() {
        let html = render_html(&snapshot());
        let presence = row(&html, "<tr class=\"coalesce\" data-route=\"presence\">");
        assert!(presence.contains("<td class=\"into\">presence-bulk</td>"));
        assert!(presence.contains("<td class=\"coalesced\">1000</td>"));
        assert!(presence.contains("<td class=\"mean-batch\">50.0</td>"));
        assert!(!html
            .contains("data-route=\"default\"><td class=\"name\">default</td><td class=\"into\">"));
        let json = serde_json::to_value(snapshot()).unwrap();
        assert_eq!(json["routes"][0]["coalesce"]["into"], "presence-bulk");
        assert!(json["routes"][1].get("coalesce").is_none());
    }

    #[test]
    fn each_route_row_has_its_name_and_queue_depth() {
        let html = render_html(&snapshot());
        let presence = row(&html, "<tr class=\"route\" data-route=\"presence\">");
        assert!(
            presence.contains("<td class=\"queue-depth\">7</td>"),
            "{presence}"
        );
        assert!(presence.contains("<code>PATCH /api/v2/users/{userId}/presences/{sourceId}</code>"));
        assert!(presence.contains("presence, per-token"));
        assert!(presence.contains("<td class=\"max-wait\">20 s</td>"));
        assert!(presence.contains("<td class=\"requests\">1234</td>"));
        assert!(presence.contains("<td class=\"rejections\"><span class=\"bad\">5</span></td>"));
        let default = row(&html, "<tr class=\"route\" data-route=\"default\">");
        assert!(default.contains("<td class=\"queue-depth\">0</td>"));
        assert!(default.contains("<code>any /**</code>"));
        assert!(default.contains("unpaced"));
    }

    #[test]
    fn a_budget_below_its_configured_rate_is_marked() {
        let html = render_html(&snapshot());
        let presence = row(&html, "<tr class=\"budget\" data-budget=\"presence\">");
        assert!(
            presence.contains("<td class=\"rate-in-force\">62.5/s"),
            "{presence}"
        );
        assert!(presence.contains("&#9660; 63%"), "{presence}");
        assert!(presence.contains("<td class=\"configured-rate\">100/s"));
        assert!(presence.contains("12 s"), "pause shown: {presence}");
        let token = row(&html, "<tr class=\"budget\" data-budget=\"per-token\">");
        assert!(token.contains("<td class=\"rate-in-force\">5/s"), "{token}");
        assert!(token.contains("(300/min)"));
        assert!(!token.contains("marker"));
    }

    #[test]
    fn header_shows_version_uptime_state_and_last_reload() {
        let mut s = snapshot();
        let html = render_html(&s);
        assert!(html.contains("<span id=\"version\">0.1.0</span>"));
        assert!(html.contains("data-seconds=\"3725\">1h 2m</span>"));
        assert!(html.contains("data-draining=\"false\">serving</span>"));
        assert!(html.contains(
            "ok</span> at <time datetime=\"2023-11-14T22:13:20Z\">2023-11-14 22:13:20 UTC</time>"
        ));
        assert!(html.contains("<span id=\"queue-depth\" class=\"warn\">7</span>"));

        s.draining = true;
        s.last_reload_ok = Some(false);
        s.last_reload_error = Some("routes[2].budgets: unknown budget \"paid\" at line 31".into());
        let html = render_html(&s);
        assert!(html.contains("data-draining=\"true\">draining</span>"));
        assert!(html.contains("FAILED"));
        assert!(html.contains("unknown budget &quot;paid&quot; at line 31"));
    }

    #[test]
    fn recent_throttles_are_listed_and_none_is_said() {
        let mut s = snapshot();
        let html = render_html(&s);
        assert!(html.contains("<td class=\"retry-after\">42 s</td>"));
        assert!(html.contains("2023-11-14 22:15:00 UTC"));
        s.recent_throttles.clear();
        let html = render_html(&s);
        assert!(html.contains("id=\"throttles-none\""));
    }

    #[test]
    fn config_text_cannot_inject_markup() {
        let mut s = snapshot();
        s.routes[0].name = "<script>alert(1)</script>".into();
        s.routes[0].path = "/x\"><img src=x>".into();
        s.budgets[0].name = "b\" onmouseover=\"x".into();
        s.config_path = "<b>".into();
        let html = render_html(&s);
        assert!(!html.contains("<script>"));
        assert!(!html.contains("<img"));
        assert!(html
            .contains("<tr class=\"route\" data-route=\"&lt;script&gt;alert(1)&lt;/script&gt;\">"));
        assert!(html.contains("<tr class=\"budget\" data-budget=\"b&quot; onmouseover=&quot;x\">"));
    }

    #[test]
    fn snapshot_serialises_to_json_with_every_field() {
        let v = serde_json::to_value(snapshot()).expect("serialises");
        assert_eq!(v["routes"][0]["name"], "presence");
        assert_eq!(v["routes"][1]["method"], serde_json::Value::Null);
        assert_eq!(v["budgets"][0]["rate_in_force"], 62.5);
        assert_eq!(v["recent_throttles"][0]["retry_after_seconds"], 42);
        assert_eq!(v["queue_max_depth"], 10_000);
    }

    #[test]
    fn helpers_format_for_people() {
        assert_eq!(human_duration(0), "0s");
        assert_eq!(human_duration(450), "7m 30s");
        assert_eq!(human_duration(90_061), "1d 1h");
        assert_eq!(utc_datetime(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_datetime(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(short_number(100.0 / 3600.0), "0.028");
        assert_eq!(short_number(0.5), "0.5");
        assert_eq!(short_number(300.0), "300");
    }
}
