//! The two ways a result is shown: the plain-text summary table and the self-contained HTML report.

use crate::status_page::escape_html;
use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, SystemTime};

use super::charts;
use super::spec::LoadSpec;
use super::stats::{LoadResult, Percentiles, Summary};

/// Writing the HTML report failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(transparent)]
    Chart(#[from] charts::ChartError),
    #[error("writing the report to {path} failed: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// How the run was set up, in one line.
pub fn describe_spec(spec: &LoadSpec) -> String {
    let retry = match spec.sdk_retry {
        0 => "SDK retry off".to_string(),
        n => format!("SDK-style retry on 429, at most {n} per request"),
    };
    format!(
        "{} agents x {} loops, {}, ramp {}, {} token(s), think time {}, timeout {}, {}",
        spec.agents,
        spec.loops,
        spec.endpoint.label(),
        humantime::format_duration(spec.ramp),
        spec.tokens,
        humantime::format_duration(spec.think_time),
        humantime::format_duration(spec.timeout),
        retry,
    )
}

/// The label/value lines shared by the text table and the HTML report.
fn overview(summary: &Summary) -> Vec<(&'static str, String)> {
    let statuses = if summary.by_status.is_empty() {
        "none".to_string()
    } else {
        summary
            .by_status
            .iter()
            .map(|(status, count)| format!("{status}: {count}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let connections = if summary.connections > 0 {
        format!(", over {} connection(s)", summary.connections)
    } else {
        String::new()
    };
    vec![
        (
            "requests",
            format!(
                "{} of {} planned, {} answered{connections}",
                summary.requests, summary.planned, summary.answered
            ),
        ),
        (
            "completion time",
            format!("{:.3} s", summary.completion_time.as_secs_f64()),
        ),
        ("throughput", format!("{:.1} req/s", summary.throughput_rps)),
        ("answers by status", statuses),
        ("transport errors", summary.transport_errors.to_string()),
        (
            "client-visible 429s",
            format!(
                "{} ({} final, {} retried by the emulated SDK)",
                summary.client_429s, summary.final_429s, summary.sdk_retries
            ),
        ),
        ("SDK-style retries", summary.sdk_retries.to_string()),
    ]
}

/// The timing rows: label, and the percentiles or why there are none.
fn timing_rows(summary: &Summary) -> Vec<(&'static str, Result<Percentiles, &'static str>)> {
    const NO_WAIT: &str = "n/a: no answer carried X-Shiftgate-Wait-Ms";
    vec![
        ("latency", summary.latency.ok_or("n/a: no answer")),
        ("wait in shiftgate", summary.wait.ok_or(NO_WAIT)),
        ("upstream time", summary.upstream.ok_or(NO_WAIT)),
    ]
}

const TIMING_COLUMNS: [&str; 5] = ["p50", "p90", "p99", "max", "mean"];

fn timing_values(p: &Percentiles) -> [Duration; 5] {
    [p.p50, p.p90, p.p99, p.max, p.mean]
}

fn ms(duration: Duration) -> String {
    format!("{:.1}", duration.as_micros() as f64 / 1000.0)
}

/// The table printed on stdout at the end of a run.
pub fn summary_table(summary: &Summary, spec: &LoadSpec) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "shiftgate loadtest against {}", spec.target);
    let _ = writeln!(out, "  {}", describe_spec(spec));
    let _ = writeln!(out);
    for (label, value) in overview(summary) {
        let _ = writeln!(out, "{label:<22} {value}");
    }
    let _ = writeln!(out);
    let _ = write!(out, "{:<22}", "times in ms");
    for column in TIMING_COLUMNS {
        let _ = write!(out, " {column:>9}");
    }
    let _ = writeln!(out);
    for (label, row) in timing_rows(summary) {
        let _ = write!(out, "{label:<22}");
        match row {
            Ok(p) => {
                for value in timing_values(&p) {
                    let _ = write!(out, " {:>9}", ms(value));
                }
            }
            Err(why) => {
                let _ = write!(out, " {why}");
            }
        }
        let _ = writeln!(out);
    }
    if !summary.transport_error_messages.is_empty() {
        let _ = writeln!(out);
        let _ = writeln!(out, "transport errors, most frequent first:");
        for (message, count) in most_frequent(summary) {
            let _ = writeln!(out, "  {count:>7} x {message}");
        }
    }
    out
}

/// The five most frequent transport errors, so a flood of one kind does not hide another.
fn most_frequent(summary: &Summary) -> Vec<(&str, usize)> {
    let mut errors: Vec<(&str, usize)> = summary
        .transport_error_messages
        .iter()
        .map(|(message, count)| (message.as_str(), *count))
        .collect();
    errors.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    errors.truncate(5);
    errors
}

/// The report as one HTML document: no scripts, no external assets, charts as inline SVG.
pub fn html_report(result: &LoadResult) -> Result<String, ReportError> {
    let summary = result.summary();
    let spec = &result.spec;
    let run = summary.completion_time.max(result.elapsed);
    let bucket = charts::bucket_for(run);
    let throughput = charts::throughput_chart(&result.records, bucket)?;
    let latency = charts::latency_chart(&result.records, bucket)?;
    let wait = charts::wait_chart(&result.records, bucket)?;

    let mut html = String::new();
    html.push_str(concat!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n",
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n",
        "<title>shiftgate loadtest report</title>\n<style>\n",
        "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:960px;color:#222}\n",
        "table{border-collapse:collapse;margin:1em 0}\n",
        "th,td{border:1px solid #ccc;padding:.3em .7em;text-align:left}\n",
        "td.num{text-align:right;font-variant-numeric:tabular-nums}\n",
        "th{background:#f3f3f3}\nsvg{max-width:100%;height:auto;display:block;margin:1em 0}\n",
        "code{background:#f3f3f3;padding:0 .2em}\n",
        "</style>\n</head>\n<body>\n",
        "<h1>shiftgate loadtest report</h1>\n",
    ));
    let _ = writeln!(
        html,
        "<p>Target <code>{}</code>: {}.<br>Generated {}.</p>",
        escape_html(&spec.target),
        escape_html(&describe_spec(spec)),
        humantime::format_rfc3339_seconds(SystemTime::now()),
    );

    html.push_str("<h2>Summary</h2>\n<table class=\"summary\">\n");
    for (label, value) in overview(&summary) {
        let _ = writeln!(
            html,
            "<tr><th>{}</th><td>{}</td></tr>",
            escape_html(label),
            escape_html(&value)
        );
    }
    html.push_str("</table>\n<table class=\"timings\">\n<tr><th>times in ms</th>");
    for column in TIMING_COLUMNS {
        let _ = write!(html, "<th>{column}</th>");
    }
    html.push_str("</tr>\n");
    for (label, row) in timing_rows(&summary) {
        let _ = write!(html, "<tr><th>{}</th>", escape_html(label));
        match row {
            Ok(p) => {
                for value in timing_values(&p) {
                    let _ = write!(html, "<td class=\"num\">{}</td>", ms(value));
                }
            }
            Err(why) => {
                let _ = write!(html, "<td colspan=\"5\">{}</td>", escape_html(why));
            }
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table>\n");
    html.push_str(
        "<p>Percentiles are nearest-rank over answered requests. Upstream time is latency minus \
         the wait in shiftgate (<code>X-Shiftgate-Wait-Ms</code>) minus the emulated SDK's \
         Retry-After sleeps.</p>\n",
    );
    if !summary.transport_error_messages.is_empty() {
        html.push_str("<h2>Transport errors</h2>\n<table class=\"errors\">\n<tr><th>count</th><th>error</th></tr>\n");
        for (message, count) in most_frequent(&summary) {
            let _ = writeln!(
                html,
                "<tr><td class=\"num\">{count}</td><td>{}</td></tr>",
                escape_html(message)
            );
        }
        html.push_str("</table>\n");
    }

    html.push_str("<h2>Charts</h2>\n");
    for chart in [throughput, latency, wait] {
        html.push_str(&chart);
        html.push('\n');
    }
    html.push_str("</body>\n</html>\n");
    Ok(html)
}

/// Writes [`html_report`] to `path`.
pub fn write_html_report(result: &LoadResult, path: &Path) -> Result<(), ReportError> {
    let html = html_report(result)?;
    std::fs::write(path, html).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loadtest::stats::RequestRecord;

    fn record(agent: usize, start_ms: u64, latency_ms: u64, status: Option<u16>) -> RequestRecord {
        RequestRecord {
            agent,
            start: Duration::from_millis(start_ms),
            latency: Duration::from_millis(latency_ms),
            status,
            error: status
                .is_none()
                .then(|| "connect to 127.0.0.1:1 failed: <refused>".to_string()),
            wait_ms: status.map(|_| 5),
            ..RequestRecord::default()
        }
    }

    fn result() -> LoadResult {
        let mut records: Vec<RequestRecord> = (0..40)
            .map(|i| record(i % 4, i as u64 * 50, 20 + i as u64, Some(200)))
            .collect();
        records.push(record(1, 100, 30, Some(429)));
        records.push(record(2, 200, 1, None));
        LoadResult {
            records,
            elapsed: Duration::from_secs(2),
            spec: LoadSpec {
                target: "http://127.0.0.1:8080".into(),
                agents: 4,
                loops: 11,
                ..LoadSpec::default()
            },
            connections: 4,
        }
    }

    #[test]
    fn the_summary_table_names_every_figure_the_brief_asks_for() {
        let result = result();
        let table = summary_table(&result.summary(), &result.spec);
        for expected in [
            "shiftgate loadtest against http://127.0.0.1:8080",
            "4 agents x 11 loops",
            "42 of 44 planned, 41 answered, over 4 connection(s)",
            "throughput",
            "200: 40, 429: 1",
            "transport errors       1",
            "client-visible 429s    1 (1 final, 0 retried by the emulated SDK)",
            "latency",
            "wait in shiftgate",
            "upstream time",
            "1 x connect to 127.0.0.1:1 failed: <refused>",
        ] {
            assert!(table.contains(expected), "missing {expected:?} in\n{table}");
        }
    }

    #[test]
    fn without_wait_headers_the_table_says_why_wait_is_missing() {
        let summary = Summary::from_records(&[record(0, 0, 10, Some(200))], 1);
        let summary = Summary {
            wait: None,
            upstream: None,
            ..summary
        };
        let table = summary_table(&summary, &LoadSpec::default());
        assert!(
            table.contains("n/a: no answer carried X-Shiftgate-Wait-Ms"),
            "{table}"
        );
    }

    #[test]
    fn the_html_report_is_one_self_contained_document_with_table_and_charts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("report.html");
        write_html_report(&result(), &path).unwrap();
        let html = std::fs::read_to_string(&path).unwrap();

        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
        assert_eq!(
            html.matches("<svg").count(),
            3,
            "throughput, latency and wait charts"
        );
        assert_eq!(html.matches("</svg>").count(), 3);
        assert!(html.contains("<table class=\"summary\">"));
        assert!(html.contains("<td>200: 40, 429: 1</td>"));
        assert!(html.contains("<table class=\"timings\">"));
        assert!(
            html.contains("connect to 127.0.0.1:1 failed: &lt;refused&gt;"),
            "error text is escaped"
        );
        assert!(!html.contains("<script"), "no JavaScript");
        let without_target = html.replace("http://127.0.0.1:8080", "");
        assert!(
            !without_target.contains("http://") && !without_target.contains("https://"),
            "no URL but the target's"
        );
        assert!(!html.contains(" src="), "no external asset");
    }

    #[test]
    fn writing_the_report_to_a_missing_directory_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("no/such/dir/report.html");
        let error = write_html_report(&result(), &path).unwrap_err();
        assert!(
            error.to_string().contains("no/such/dir/report.html"),
            "{error}"
        );
    }

    #[test]
    fn escape_covers_the_characters_that_break_html() {
        assert_eq!(
            escape_html(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }
}
