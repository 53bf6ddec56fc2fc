//! Runs a load spec: one task and one connection per agent, started along the ramp, each making its loops in turn.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use parking_lot::Mutex;
use tokio::time::Instant;

use super::client::{AgentConnection, Answer};
use super::spec::{LoadSpec, Plan};
use super::stats::{LoadResult, RequestRecord};

/// Where a run stands; handed to the progress callback after every completed request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    pub done: usize,
    pub total: usize,
    /// Every 429 the client saw so far, those the emulated SDK retried included.
    pub client_429s: usize,
    pub transport_errors: usize,
    /// Completions in the last second.
    pub current_rps: f64,
    pub elapsed: Duration,
}

/// Called from the agents' tasks, so it must be cheap and must not block.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// What the official SDKs do with a 429 when their retry is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SdkRetry {
    After(Duration),
    GiveUp,
}

/// The Java/.NET SDK rule: wait `Retry-After` seconds, 3 s when the header is absent or not an
/// integer, and give up when it asks for more than 180 s.
pub fn sdk_retry_delay(retry_after: Option<&str>) -> SdkRetry {
    const DEFAULT: Duration = Duration::from_secs(3);
    const LIMIT_SECS: u64 = 180;
    match retry_after.map(|value| value.trim().parse::<u64>()) {
        Some(Ok(secs)) if secs > LIMIT_SECS => SdkRetry::GiveUp,
        Some(Ok(secs)) => SdkRetry::After(Duration::from_secs(secs)),
        None | Some(Err(_)) => SdkRetry::After(DEFAULT),
    }
}

/// Runs `spec` to the end. Fails only when the spec is invalid; a target that cannot be reached
/// gives records with transport errors, not an error.
pub async fn run(spec: LoadSpec, progress: Option<ProgressFn>) -> anyhow::Result<LoadResult> {
    let plan = Arc::new(spec.plan()?);
    let run_start = Instant::now();
    let tracker = Arc::new(Tracker::new(spec.total_requests(), run_start, progress));

    let mut agents = tokio::task::JoinSet::new();
    for agent in 0..spec.agents {
        let plan = Arc::clone(&plan);
        let tracker = Arc::clone(&tracker);
        let offset = ramp_offset(spec.ramp, agent, spec.agents);
        agents.spawn(async move {
            tokio::time::sleep_until(run_start + offset).await;
            run_agent(&plan, agent, run_start, &tracker).await
        });
    }

    let mut records = Vec::with_capacity(spec.total_requests());
    let mut connections = 0;
    while let Some(joined) = agents.join_next().await {
        let (agent_records, opened) = joined?;
        records.extend(agent_records);
        connections += opened;
    }
    records.sort_by_key(|r| (r.start, r.agent));
    Ok(LoadResult {
        records,
        elapsed: run_start.elapsed(),
        spec,
        connections,
    })
}

/// Agent `i` of `n` starts at `ramp * i / n`, as JMeter spreads its threads.
fn ramp_offset(ramp: Duration, agent: usize, agents: usize) -> Duration {
    let nanos = ramp.as_nanos() * agent as u128 / agents.max(1) as u128;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

async fn run_agent(
    plan: &Plan,
    agent: usize,
    run_start: Instant,
    tracker: &Tracker,
) -> (Vec<RequestRecord>, usize) {
    let spec = &plan.spec;
    let mut connection = AgentConnection::new(plan.target.clone());
    let mut records = Vec::with_capacity(spec.loops);
    for n in 0..spec.loops {
        if n > 0 && !spec.think_time.is_zero() {
            tokio::time::sleep(spec.think_time).await;
        }
        let record = one_request(plan, &mut connection, agent, n, run_start).await;
        tracker.completed(&record);
        records.push(record);
    }
    (records, connection.connections_opened())
}

/// One logical request, SDK-style retries included.
async fn one_request(
    plan: &Plan,
    connection: &mut AgentConnection,
    agent: usize,
    n: usize,
    run_start: Instant,
) -> RequestRecord {
    let spec = &plan.spec;
    // Built once: a retry resends the very same bytes, as an SDK would.
    let prepared = plan.request(agent, n, SystemTime::now());
    let started = Instant::now();
    let mut record = RequestRecord {
        agent,
        start: started - run_start,
        sent_body_sha256: prepared.body_sha256.clone(),
        ..RequestRecord::default()
    };
    loop {
        let outcome = tokio::time::timeout(spec.timeout, connection.send(&prepared.request)).await;
        let answer = match outcome {
            Ok(Ok(answer)) => answer,
            Ok(Err(error)) => {
                fill_from_answer(&mut record, None);
                record.error = Some(error.to_string());
                break;
            }
            Err(_elapsed) => {
                // The exchange was cut mid-way; HTTP/1.1 cannot reuse that connection.
                connection.reset();
                fill_from_answer(&mut record, None);
                record.error = Some(format!(
                    "no answer from {} within {}",
                    plan.target.addr(),
                    humantime::format_duration(spec.timeout)
                ));
                break;
            }
        };
        let retry = answer.status == http::StatusCode::TOO_MANY_REQUESTS
            && record.client_retries < spec.sdk_retry;
        let retry_after = header_str(&answer.headers, "Retry-After").map(str::to_owned);
        fill_from_answer(&mut record, Some(&answer));
        if retry {
            if let SdkRetry::After(pause) = sdk_retry_delay(retry_after.as_deref()) {
                tokio::time::sleep(pause).await;
                record.client_wait += pause;
                record.client_retries += 1;
                continue;
            }
        }
        break;
    }
    record.latency = started.elapsed();
    record
}

/// Sets what the final answer says; `None` (a failed retry) clears what an earlier 429 had set.
fn fill_from_answer(record: &mut RequestRecord, answer: Option<&Answer>) {
    let Some(answer) = answer else {
        record.status = None;
        record.wait_ms = None;
        record.attempts = None;
        record.retry_after = None;
        record.body_sha256_echo = None;
        return;
    };
    let headers = &answer.headers;
    record.status = Some(answer.status.as_u16());
    // Summed over the SDK's attempts: the time a retried request spent queued in shiftgate before
    // its 429 is wait too, and would otherwise be counted as upstream time.
    let wait: Option<u64> =
        header_str(headers, "X-Shiftgate-Wait-Ms").and_then(|v| v.trim().parse().ok());
    let attempts: Option<u32> =
        header_str(headers, "X-Shiftgate-Attempts").and_then(|v| v.trim().parse().ok());
    record.wait_ms = sum(record.wait_ms, wait);
    record.attempts = sum(record.attempts, attempts);
    record.retry_after = header_str(headers, "Retry-After").and_then(|v| v.trim().parse().ok());
    record.body_sha256_echo = header_str(headers, "X-Emulator-Body-Sha256").map(str::to_owned);
}

/// `None` only when neither attempt said anything.
fn sum<T: std::ops::Add<Output = T>>(so_far: Option<T>, this_attempt: Option<T>) -> Option<T> {
    match (so_far, this_attempt) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

/// Counters shared by the agents, kept under one lock because every completion updates several
/// of them together and the callback must see a consistent snapshot.
struct Tracker {
    total: usize,
    run_start: Instant,
    callback: Option<ProgressFn>,
    state: Mutex<TrackerState>,
}

#[derive(Default)]
struct TrackerState {
    done: usize,
    client_429s: usize,
    transport_errors: usize,
    /// Completion instants of the last second, for the current rate.
    recent: VecDeque<Instant>,
}

impl Tracker {
    fn new(total: usize, run_start: Instant, callback: Option<ProgressFn>) -> Self {
        Self {
            total,
            run_start,
            callback,
            state: Mutex::new(TrackerState::default()),
        }
    }

    fn completed(&self, record: &RequestRecord) {
        let Some(callback) = &self.callback else {
            return;
        };
        let now = Instant::now();
        let snapshot = {
            let mut state = self.state.lock();
            state.done += 1;
            state.client_429s += record.client_retries as usize;
            match record.status {
                Some(429) => state.client_429s += 1,
                None => state.transport_errors += 1,
                Some(_) => {}
            }
            state.recent.push_back(now);
            while state
                .recent
                .front()
                .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(1))
            {
                state.recent.pop_front();
            }
            Progress {
                done: state.done,
                total: self.total,
                client_429s: state.client_429s,
                transport_errors: state.transport_errors,
                current_rps: state.recent.len() as f64,
                elapsed: now - self.run_start,
            }
        };
        // Outside the lock: the callback may draw, and the agents should not queue behind it.
        callback(snapshot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sdk_waits_retry_after_seconds_and_gives_up_above_180() {
        assert_eq!(
            sdk_retry_delay(Some("5")),
            SdkRetry::After(Duration::from_secs(5))
        );
        assert_eq!(sdk_retry_delay(Some("0")), SdkRetry::After(Duration::ZERO));
        assert_eq!(
            sdk_retry_delay(Some("180")),
            SdkRetry::After(Duration::from_secs(180))
        );
        assert_eq!(sdk_retry_delay(Some("181")), SdkRetry::GiveUp);
    }

    #[test]
    fn the_sdk_waits_three_seconds_when_retry_after_is_absent_or_not_an_integer() {
        let three = SdkRetry::After(Duration::from_secs(3));
        assert_eq!(sdk_retry_delay(None), three);
        assert_eq!(sdk_retry_delay(Some("soon")), three);
        assert_eq!(sdk_retry_delay(Some("1.5")), three);
        assert_eq!(
            sdk_retry_delay(Some("Wed, 21 Oct 2015 07:28:00 GMT")),
            three
        );
    }

    #[test]
    fn agents_are_spread_evenly_over_the_ramp() {
        let ramp = Duration::from_secs(10);
        let offsets: Vec<_> = (0..4).map(|agent| ramp_offset(ramp, agent, 4)).collect();
        assert_eq!(
            offsets,
            [0, 2500, 5000, 7500].map(Duration::from_millis),
            "the first agent starts at once, the last one ramp/agents before the ramp ends"
        );
        assert_eq!(ramp_offset(Duration::ZERO, 3, 4), Duration::ZERO);
    }
}
