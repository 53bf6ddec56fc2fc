//! The report's charts: line charts drawn with plotters into SVG strings, ready to inline in HTML.
//!
//! Plotters is built without its font features, so text goes into the SVG as `<text>` elements
//! that the browser renders: no font library is needed here, and the report stays self-contained.

use std::time::Duration;

use plotters::prelude::*;

use super::stats::{latency_timeline, rate_timeline, RequestRecord};

/// Drawing a chart failed; carries which chart and why.
#[derive(Debug, thiserror::Error)]
#[error("drawing the {chart:?} chart failed: {reason}")]
pub struct ChartError {
    pub chart: String,
    pub reason: String,
}

/// One line of a chart.
pub struct Series {
    pub label: &'static str,
    pub color: RGBColor,
    pub points: Vec<(f64, f64)>,
}

/// The bucket the time charts use: the smallest of a few round widths that gives at most 60 points,
/// so a 5 s run still shows a shape and a one-hour run does not turn into noise.
pub fn bucket_for(run: Duration) -> Duration {
    const WIDTHS_MS: [u64; 10] = [
        100, 200, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 300_000,
    ];
    WIDTHS_MS
        .iter()
        .map(|&ms| Duration::from_millis(ms))
        .find(|width| run.as_nanos() / width.as_nanos() < 60)
        .unwrap_or(Duration::from_secs(600))
}

/// Answers per second over time.
pub fn throughput_chart(records: &[RequestRecord], bucket: Duration) -> Result<String, ChartError> {
    let per_second = 1.0 / bucket.as_secs_f64();
    let points = rate_timeline(records.iter().filter(|r| r.status.is_some()), bucket)
        .into_iter()
        .map(|(start, count)| (start.as_secs_f64(), count as f64 * per_second))
        .collect();
    let mut series = vec![Series {
        label: "answers/s",
        color: RGBColor(31, 119, 180),
        points,
    }];
    let throttled: Vec<(f64, f64)> =
        rate_timeline(records.iter().filter(|r| r.status == Some(429)), bucket)
            .into_iter()
            .map(|(start, count)| (start.as_secs_f64(), count as f64 * per_second))
            .collect();
    if throttled.iter().any(|(_, rate)| *rate > 0.0) {
        series.push(Series {
            label: "final 429s/s",
            color: RGBColor(214, 39, 40),
            points: throttled,
        });
    }
    line_chart(
        &format!(
            "Throughput (answers per second, {} buckets)",
            humantime::format_duration(bucket)
        ),
        "requests/s",
        &series,
    )
}

/// p50 and p99 latency of the answers completed in each bucket.
pub fn latency_chart(records: &[RequestRecord], bucket: Duration) -> Result<String, ChartError> {
    let timeline = latency_timeline(records, bucket);
    let pick = |f: fn(&super::stats::Percentiles) -> Duration| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .filter_map(|b| Some((b.start.as_secs_f64(), millis(f(b.latency.as_ref()?)))))
            .collect()
    };
    line_chart(
        "Latency over time (by completion)",
        "ms",
        &[
            Series {
                label: "p50",
                color: RGBColor(31, 119, 180),
                points: pick(|p| p.p50),
            },
            Series {
                label: "p99",
                color: RGBColor(255, 127, 14),
                points: pick(|p| p.p99),
            },
        ],
    )
}

/// Mean time waiting in shiftgate against mean upstream time, per bucket. Without any
/// `X-Shiftgate-Wait-Ms` there is nothing to split, and the chart shows the mean latency alone.
pub fn wait_chart(records: &[RequestRecord], bucket: Duration) -> Result<String, ChartError> {
    let timeline = latency_timeline(records, bucket);
    let has_split = timeline.iter().any(|b| b.mean_wait.is_some());
    if !has_split {
        let points = timeline
            .iter()
            .filter_map(|b| Some((b.start.as_secs_f64(), millis(b.latency?.mean))))
            .collect();
        return line_chart(
            "Wait vs upstream: no answer carried X-Shiftgate-Wait-Ms",
            "ms",
            &[Series {
                label: "mean latency",
                color: RGBColor(44, 160, 44),
                points,
            }],
        );
    }
    let points = |f: fn(&super::stats::LatencyBucket) -> Option<Duration>| -> Vec<(f64, f64)> {
        timeline
            .iter()
            .filter_map(|b| Some((b.start.as_secs_f64(), millis(f(b)?))))
            .collect()
    };
    line_chart(
        "Time waiting in shiftgate vs upstream time (means)",
        "ms",
        &[
            Series {
                label: "wait in shiftgate",
                color: RGBColor(148, 103, 189),
                points: points(|b| b.mean_wait),
            },
            Series {
                label: "upstream",
                color: RGBColor(44, 160, 44),
                points: points(|b| b.mean_upstream),
            },
        ],
    )
}

/// Whole numbers once the axis is long enough for decimals to be noise.
fn axis_number(value: f64, axis_max: f64) -> String {
    if axis_max >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A line chart over seconds since the start of the run, as an `<svg>` element.
pub fn line_chart(title: &str, y_label: &str, series: &[Series]) -> Result<String, ChartError> {
    let fail = |reason: String| ChartError {
        chart: title.to_string(),
        reason,
    };
    let all_points = || series.iter().flat_map(|s| s.points.iter());
    let x_max = all_points().map(|(x, _)| *x).fold(0.0, f64::max).max(1.0);
    let y_max = all_points().map(|(_, y)| *y).fold(0.0, f64::max).max(1.0) * 1.1;

    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 320)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, 0f64..y_max)
            .map_err(|e| fail(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(y_label)
            .light_line_style(WHITE.mix(0.0))
            .x_label_formatter(&|x| axis_number(*x, x_max))
            .y_label_formatter(&|y| axis_number(*y, y_max))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for line in series {
            let color = line.color;
            chart
                .draw_series(LineSeries::new(
                    line.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?
                .label(line.label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(inline_svg(&svg))
}

/// Makes plotters' standalone SVG fit inside HTML: HTML puts `<svg>` in the SVG namespace by
/// itself (so the `xmlns` URL, the only URL plotters writes, can go), and a `viewBox` lets the
/// chart shrink with the page.
fn inline_svg(svg: &str) -> String {
    let svg = svg.replace(r#" xmlns="http://www.w3.org/2000/svg""#, "");
    svg.replacen(
        r#"<svg width="900" height="320""#,
        r#"<svg width="900" height="320" viewBox="0 0 900 320" role="img""#,
        1,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_charts_under_sixty_points() {
        assert_eq!(
            bucket_for(Duration::from_secs(2)),
            Duration::from_millis(100)
        );
        assert_eq!(
            bucket_for(Duration::from_secs(12)),
            Duration::from_millis(500)
        );
        assert_eq!(bucket_for(Duration::from_secs(59)), Duration::from_secs(1));
        assert_eq!(
            bucket_for(Duration::from_secs(3600)),
            Duration::from_secs(300)
        );
        assert_eq!(
            bucket_for(Duration::from_secs(86_400)),
            Duration::from_secs(600)
        );
    }

    #[test]
    fn a_line_chart_is_an_inline_svg_with_its_title_labels_and_no_urls() {
        let svg = line_chart(
            "Test chart",
            "req/s",
            &[Series {
                label: "answers/s",
                color: BLUE,
                points: vec![(0.0, 1.0), (1.0, 3.0), (2.0, 2.0)],
            }],
        )
        .unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(80)]);
        assert!(svg.contains("viewBox=\"0 0 900 320\""));
        assert!(svg.contains("Test chart"));
        assert!(svg.contains("answers/s"), "the legend names the series");
        assert!(svg.contains("seconds since start"));
        assert!(svg.contains("<polyline"), "the series is drawn as a line");
        assert!(!svg.contains("http://") && !svg.contains("https://"));
    }

    #[test]
    fn a_chart_with_no_points_still_draws_its_axes() {
        let svg = line_chart(
            "Empty",
            "ms",
            &[Series {
                label: "p50",
                color: BLUE,
                points: vec![],
            }],
        )
        .unwrap();
        assert!(svg.contains("Empty"));
        assert!(svg.trim_end().ends_with("</svg>"));
    }
}
