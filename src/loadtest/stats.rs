//! What a load test measured: one record per request, and the summary and timelines computed from them.
//!
//! Percentiles are **nearest-rank**: for `n` sorted values the p-th percentile is the value at
//! rank `ceil(p / 100 * n)` (1-based), so it is always a value that was measured, and the same
//! records always give the same numbers.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Serialize, Serializer};

use super::spec::LoadSpec;

/// One logical request of one agent: from its first send to its final answer, the SDK-style
/// retries in between included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestRecord {
    pub agent: usize,
    /// When the first attempt started, since the start of the run.
    pub start: Duration,
    /// First send to final answer (or failure), Retry-After sleeps included.
    pub latency: Duration,
    /// The final status; `None` for a transport error (refused, reset, timed out).
    pub status: Option<u16>,
    pub error: Option<String>,
    /// `X-Shiftgate-Wait-Ms`: time spent waiting for slots in shiftgate, summed over the
    /// emulated SDK's attempts (without SDK retry: the answer's header as is).
    pub wait_ms: Option<u64>,
    /// `X-Shiftgate-Attempts`: upstream attempts shiftgate made, summed like `wait_ms`.
    pub attempts: Option<u32>,
    /// `Retry-After` of the final answer, when it was a whole number of seconds.
    pub retry_after: Option<u64>,
    /// Retries the emulated SDK made after a 429 (each one follows a 429 the client saw).
    pub client_retries: u32,
    /// Time the emulated SDK slept on `Retry-After` before retrying.
    pub client_wait: Duration,
    /// `X-Emulator-Body-Sha256` of the final answer: the digest of the body the upstream received.
    pub body_sha256_echo: Option<String>,
    /// Digest of the body sent, to compare with the echo.
    pub sent_body_sha256: Option<String>,
}

impl RequestRecord {
    /// When the final answer (or failure) came, since the start of the run.
    pub fn completed_at(&self) -> Duration {
        self.start + self.latency
    }

    /// Time not spent waiting: in shiftgate's slot queue (`wait_ms`) or in the client's
    /// Retry-After sleeps. `None` when the answer did not say how long it waited.
    pub fn upstream_time(&self) -> Option<Duration> {
        let wait = Duration::from_millis(self.wait_ms?);
        Some(
            self.latency
                .saturating_sub(wait)
                .saturating_sub(self.client_wait),
        )
    }
}

/// The outcome of [`run`](super::run).
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Sorted by start time.
    pub records: Vec<RequestRecord>,
    /// Wall time of the whole run, ramp included.
    pub elapsed: Duration,
    pub spec: LoadSpec,
    /// TCP connections opened, all agents together: `agents` when the target keeps them alive.
    pub connections: usize,
}

impl LoadResult {
    pub fn summary(&self) -> Summary {
        let mut summary = Summary::from_records(&self.records, self.spec.total_requests());
        summary.connections = self.connections;
        summary
    }
}

/// Nearest-rank percentiles of a set of durations. In JSON each is a number of milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    pub count: usize,
    #[serde(rename = "p50_ms", serialize_with = "as_millis")]
    pub p50: Duration,
    #[serde(rename = "p90_ms", serialize_with = "as_millis")]
    pub p90: Duration,
    #[serde(rename = "p99_ms", serialize_with = "as_millis")]
    pub p99: Duration,
    #[serde(rename = "max_ms", serialize_with = "as_millis")]
    pub max: Duration,
    #[serde(rename = "mean_ms", serialize_with = "as_millis")]
    pub mean: Duration,
}

impl Percentiles {
    /// `None` for no values: a percentile of nothing is not zero.
    pub fn of(mut values: Vec<Duration>) -> Option<Self> {
        if values.is_empty() {
            return None;
        }
        values.sort_unstable();
        let total: u128 = values.iter().map(Duration::as_nanos).sum();
        let mean = total / values.len() as u128;
        Some(Self {
            count: values.len(),
            p50: nearest_rank(&values, 50),
            p90: nearest_rank(&values, 90),
            p99: nearest_rank(&values, 99),
            max: *values.last().expect("not empty"),
            mean: Duration::from_nanos(u64::try_from(mean).unwrap_or(u64::MAX)),
        })
    }
}

/// The value at rank `ceil(percent / 100 * n)` of `sorted` (1-based, at least 1).
pub fn nearest_rank<T: Copy>(sorted: &[T], percent: u32) -> T {
    assert!(!sorted.is_empty(), "no percentile of an empty set");
    let n = sorted.len();
    // Integer ceiling: exact where a float product (0.29 * 100) would round the wrong way.
    let rank = (percent as usize * n).div_ceil(100).clamp(1, n);
    sorted[rank - 1]
}

/// Everything the summary table, `--json` and the report show.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// agents × loops
    pub planned: usize,
    /// Requests made (records).
    pub requests: usize,
    /// Requests that got an answer, of any status.
    pub answered: usize,
    /// From the start of the run to the last answer or failure.
    #[serde(rename = "completion_time_ms", serialize_with = "as_millis")]
    pub completion_time: Duration,
    /// `answered / completion_time`.
    pub throughput_rps: f64,
    /// Final answers by status.
    pub by_status: BTreeMap<u16, usize>,
    /// Requests that got no answer.
    pub transport_errors: usize,
    /// Distinct transport error messages and how often each occurred.
    pub transport_error_messages: BTreeMap<String, usize>,
    /// Every 429 the client saw, those the emulated SDK retried included.
    pub client_429s: usize,
    /// Requests whose final answer was a 429.
    pub final_429s: usize,
    /// SDK-style retries made after a 429.
    pub sdk_retries: u64,
    /// Of answered requests (a timeout's duration is not a latency).
    pub latency: Option<Percentiles>,
    /// `X-Shiftgate-Wait-Ms`, of the answers that carried it.
    pub wait: Option<Percentiles>,
    /// Latency minus wait minus SDK sleeps, of the answers that carried `X-Shiftgate-Wait-Ms`.
    pub upstream: Option<Percentiles>,
    /// TCP connections opened (0 when the summary was computed from records alone).
    pub connections: usize,
}

impl Summary {
    /// The summary of `records` out of `planned` requests; a pure function of its input.
    pub fn from_records(records: &[RequestRecord], planned: usize) -> Self {
        let mut by_status = BTreeMap::new();
        let mut transport_error_messages = BTreeMap::new();
        let mut latencies = Vec::with_capacity(records.len());
        let mut waits = Vec::new();
        let mut upstreams = Vec::new();
        let mut sdk_retries = 0u64;
        let mut completion_time = Duration::ZERO;
        for record in records {
            completion_time = completion_time.max(record.completed_at());
            sdk_retries += u64::from(record.client_retries);
            match record.status {
                Some(status) => {
                    *by_status.entry(status).or_insert(0) += 1;
                    latencies.push(record.latency);
                    if let (Some(wait), Some(upstream)) = (record.wait_ms, record.upstream_time()) {
                        waits.push(Duration::from_millis(wait));
                        upstreams.push(upstream);
                    }
                }
                None => {
                    let message = record
                        .error
                        .clone()
                        .unwrap_or_else(|| "unknown error".into());
                    *transport_error_messages.entry(message).or_insert(0) += 1;
                }
            }
        }
        let answered = latencies.len();
        let final_429s = by_status.get(&429).copied().unwrap_or(0);
        let throughput_rps = if completion_time.is_zero() {
            0.0
        } else {
            answered as f64 / completion_time.as_secs_f64()
        };
        Self {
            planned,
            requests: records.len(),
            answered,
            completion_time,
            throughput_rps,
            by_status,
            transport_errors: records.len() - answered,
            transport_error_messages,
            client_429s: final_429s + usize::try_from(sdk_retries).unwrap_or(usize::MAX),
            final_429s,
            sdk_retries,
            latency: Percentiles::of(latencies),
            wait: Percentiles::of(waits),
            upstream: Percentiles::of(upstreams),
            connections: 0,
        }
    }
}

/// Completions per bucket: `(bucket start, records that completed in [start, start + bucket))`,
/// from time 0 to the last completion, empty buckets included so the series has no gaps. Every
/// record passed counts, whatever its outcome; filter first to count, say, only 200s.
pub fn rate_timeline<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
    bucket: Duration,
) -> Vec<(Duration, usize)> {
    bucketed(records, bucket)
        .into_iter()
        .map(|(start, members)| (start, members.len()))
        .collect()
}

/// One bucket of [`latency_timeline`]: the answered requests that completed in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LatencyBucket {
    pub start: Duration,
    pub latency: Option<Percentiles>,
    /// Mean `X-Shiftgate-Wait-Ms` of the answers that carried it.
    pub mean_wait: Option<Duration>,
    /// Mean upstream time of the same answers.
    pub mean_upstream: Option<Duration>,
}

/// Latency percentiles and the wait/upstream split per bucket of completion time, answered
/// requests only, empty buckets included.
pub fn latency_timeline<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
    bucket: Duration,
) -> Vec<LatencyBucket> {
    let answered = records.into_iter().filter(|r| r.status.is_some());
    bucketed(answered, bucket)
        .into_iter()
        .map(|(start, members)| {
            let split: Vec<(Duration, Duration)> = members
                .iter()
                .filter_map(|r| Some((Duration::from_millis(r.wait_ms?), r.upstream_time()?)))
                .collect();
            LatencyBucket {
                start,
                latency: Percentiles::of(members.iter().map(|r| r.latency).collect()),
                mean_wait: mean(split.iter().map(|(wait, _)| *wait)),
                mean_upstream: mean(split.iter().map(|(_, upstream)| *upstream)),
            }
        })
        .collect()
}

fn bucketed<'a>(
    records: impl IntoIterator<Item = &'a RequestRecord>,
    bucket: Duration,
) -> Vec<(Duration, Vec<&'a RequestRecord>)> {
    assert!(
        !bucket.is_zero(),
        "a timeline needs a bucket longer than zero"
    );
    let width = bucket.as_nanos();
    let mut buckets: Vec<(Duration, Vec<&RequestRecord>)> = Vec::new();
    for record in records {
        let index = usize::try_from(record.completed_at().as_nanos() / width).unwrap_or(usize::MAX);
        while buckets.len() <= index {
            let start = bucket * u32::try_from(buckets.len()).unwrap_or(u32::MAX);
            buckets.push((start, Vec::new()));
        }
        buckets[index].1.push(record);
    }
    buckets
}

fn mean(values: impl Iterator<Item = Duration>) -> Option<Duration> {
    let (count, total) = values.fold((0u128, 0u128), |(c, t), d| (c + 1, t + d.as_nanos()));
    (count > 0).then(|| Duration::from_nanos(u64::try_from(total / count).unwrap_or(u64::MAX)))
}

/// Durations in JSON are milliseconds, fractional below a millisecond.
fn as_millis<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_micros() as f64 / 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn answered(start: u64, latency: u64, status: u16) -> RequestRecord {
        RequestRecord {
            start: ms(start),
            latency: ms(latency),
            status: Some(status),
            ..RequestRecord::default()
        }
    }

    fn failed(start: u64, latency: u64, error: &str) -> RequestRecord {
        RequestRecord {
            start: ms(start),
            latency: ms(latency),
            error: Some(error.into()),
            ..RequestRecord::default()
        }
    }

    #[test]
    fn nearest_rank_of_one_to_a_hundred_is_the_percent_itself() {
        let values: Vec<u32> = (1..=100).collect();
        assert_eq!(nearest_rank(&values, 50), 50);
        assert_eq!(nearest_rank(&values, 90), 90);
        assert_eq!(nearest_rank(&values, 99), 99);
        assert_eq!(nearest_rank(&values, 100), 100);
        assert_eq!(nearest_rank(&values, 0), 1, "rank is at least 1");
    }

    #[test]
    fn nearest_rank_rounds_the_rank_up_on_small_sets() {
        // n = 3: p50 -> rank ceil(1.5) = 2, p90 -> ceil(2.7) = 3, p99 -> ceil(2.97) = 3.
        let values = [10, 20, 30];
        assert_eq!(nearest_rank(&values, 50), 20);
        assert_eq!(nearest_rank(&values, 90), 30);
        assert_eq!(nearest_rank(&values, 99), 30);
        // n = 4: p50 -> rank exactly 2, no rounding.
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), 2);
        // A single value is every percentile.
        assert_eq!(nearest_rank(&[7], 1), 7);
    }

    #[test]
    fn percentiles_sort_their_input_and_report_max_and_mean() {
        let latencies = vec![ms(40), ms(10), ms(30), ms(20)];
        let p = Percentiles::of(latencies).unwrap();
        assert_eq!(p.count, 4);
        assert_eq!(p.p50, ms(20));
        assert_eq!(p.p90, ms(40));
        assert_eq!(p.p99, ms(40));
        assert_eq!(p.max, ms(40));
        assert_eq!(p.mean, ms(25));
        assert_eq!(Percentiles::of(Vec::new()), None);
    }

    #[test]
    fn a_summary_of_known_records_has_known_counts_throughput_and_percentiles() {
        // 200 answered requests with latencies 1..=200 ms (statuses 200 except every 10th, a 429),
        // all completed by 1000 ms, plus two transport errors.
        let mut records: Vec<RequestRecord> = (1..=200u64)
            .map(|i| answered(1000 - i, i, if i % 10 == 0 { 429 } else { 200 }))
            .collect();
        records.push(failed(0, 5, "connect to 127.0.0.1:1 failed: refused"));
        records.push(failed(10, 5, "connect to 127.0.0.1:1 failed: refused"));
        records[0].client_retries = 2; // a request that saw two 429s before its 200

        let summary = Summary::from_records(&records, 250);
        assert_eq!(summary.planned, 250);
        assert_eq!(summary.requests, 202);
        assert_eq!(summary.answered, 200);
        assert_eq!(summary.by_status, BTreeMap::from([(200, 180), (429, 20)]));
        assert_eq!(summary.transport_errors, 2);
        assert_eq!(
            summary.transport_error_messages,
            BTreeMap::from([("connect to 127.0.0.1:1 failed: refused".to_string(), 2)])
        );
        assert_eq!(summary.final_429s, 20);
        assert_eq!(summary.sdk_retries, 2);
        assert_eq!(
            summary.client_429s, 22,
            "final 429s plus the 429s that were retried"
        );
        assert_eq!(summary.completion_time, ms(1000));
        assert_eq!(
            summary.throughput_rps, 200.0,
            "200 answers in exactly one second"
        );

        let latency = summary.latency.unwrap();
        assert_eq!(latency.count, 200, "transport errors have no latency");
        assert_eq!(latency.p50, ms(100));
        assert_eq!(latency.p90, ms(180));
        assert_eq!(latency.p99, ms(198));
        assert_eq!(latency.max, ms(200));
        assert_eq!(summary.wait, None, "no answer carried X-Shiftgate-Wait-Ms");
        assert_eq!(summary.upstream, None);
    }

    #[test]
    fn upstream_time_is_latency_minus_shiftgate_wait_minus_sdk_sleep() {
        let records = vec![
            RequestRecord {
                wait_ms: Some(70),
                ..answered(0, 100, 200)
            },
            RequestRecord {
                wait_ms: Some(0),
                ..answered(0, 40, 200)
            },
            RequestRecord {
                wait_ms: Some(500),
                client_wait: ms(1000),
                client_retries: 1,
                ..answered(0, 1600, 200)
            },
            // No header: counted in latency, left out of the wait/upstream split.
            answered(0, 900, 200),
        ];
        let summary = Summary::from_records(&records, 4);
        let wait = summary.wait.unwrap();
        assert_eq!((wait.count, wait.p50, wait.max), (3, ms(70), ms(500)));
        let upstream = summary.upstream.unwrap();
        assert_eq!(upstream.count, 3);
        assert_eq!(upstream.p50, ms(40), "upstream times are 30, 40 and 100 ms");
        assert_eq!(upstream.max, ms(100));
        assert_eq!(summary.latency.unwrap().max, ms(1600));
    }

    #[test]
    fn a_summary_of_nothing_is_zeros_not_a_panic() {
        let summary = Summary::from_records(&[], 10);
        assert_eq!(summary.requests, 0);
        assert_eq!(summary.throughput_rps, 0.0);
        assert_eq!(summary.latency, None);
    }

    #[test]
    fn the_summary_serializes_durations_as_milliseconds() {
        let summary = Summary::from_records(&[answered(0, 1500, 200)], 1);
        let json = serde_json::to_value(&summary).unwrap();
        assert_eq!(json["completion_time_ms"], 1500.0);
        assert_eq!(json["latency"]["p99_ms"], 1500.0);
        assert_eq!(json["by_status"]["200"], 1);
        assert_eq!(json["throughput_rps"], 1.0 / 1.5);
    }

    #[test]
    fn rate_timeline_counts_completions_per_bucket_with_empty_buckets_kept() {
        let records = vec![
            answered(0, 100, 200),     // completes at 0.1 s
            answered(500, 400, 200),   // 0.9 s
            answered(900, 100, 200),   // exactly 1.0 s: the second bucket
            failed(2900, 50, "reset"), // 2.95 s
        ];
        assert_eq!(
            rate_timeline(&records, Duration::from_secs(1)),
            vec![
                (Duration::ZERO, 2),
                (Duration::from_secs(1), 1),
                (Duration::from_secs(2), 1),
            ]
        );
        let only_answers = rate_timeline(records.iter().filter(|r| r.status.is_some()), ms(500));
        assert_eq!(only_answers, vec![(ms(0), 1), (ms(500), 1), (ms(1000), 1)]);
        assert!(rate_timeline(&[], Duration::from_secs(1)).is_empty());
    }

    #[test]
    fn latency_timeline_gives_percentiles_and_the_wait_split_per_bucket() {
        let records = vec![
            RequestRecord {
                wait_ms: Some(10),
                ..answered(0, 30, 200)
            },
            RequestRecord {
                wait_ms: Some(30),
                ..answered(0, 50, 200)
            },
            failed(0, 100, "reset"),
            answered(2000, 100, 200),
        ];
        let timeline = latency_timeline(&records, Duration::from_secs(1));
        assert_eq!(timeline.len(), 3);
        let first = timeline[0];
        assert_eq!(
            first.latency.unwrap().count,
            2,
            "the transport error is not a latency"
        );
        assert_eq!(first.latency.unwrap().p50, ms(30));
        assert_eq!(first.mean_wait, Some(ms(20)));
        assert_eq!(first.mean_upstream, Some(ms(20)));
        assert_eq!(
            timeline[1].latency, None,
            "nothing completed in the second second"
        );
        assert_eq!(timeline[2].latency.unwrap().max, ms(100));
        assert_eq!(timeline[2].mean_wait, None);
    }
}
