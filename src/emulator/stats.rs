//! What the emulator saw: counts by route and status, a per-second timeline, peak concurrency.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// The fixed label of each kind of endpoint; stats never carry a user id or a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteLabel {
    PresencePatch,
    PresenceGet,
    PresenceBulk,
    RoutingstatusPut,
    RoutingstatusGet,
    OauthToken,
    Definitions,
    Limits,
    Users,
    NotFound,
}

impl RouteLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            RouteLabel::PresencePatch => "presence_patch",
            RouteLabel::PresenceGet => "presence_get",
            RouteLabel::PresenceBulk => "presence_bulk",
            RouteLabel::RoutingstatusPut => "routingstatus_put",
            RouteLabel::RoutingstatusGet => "routingstatus_get",
            RouteLabel::OauthToken => "oauth_token",
            RouteLabel::Definitions => "definitions",
            RouteLabel::Limits => "limits",
            RouteLabel::Users => "users",
            RouteLabel::NotFound => "not_found",
        }
    }
}

/// The status recorded for a `reset` fault: the client got no complete answer.
pub const STATUS_RESET: u16 = 0;

/// A copy of the counters, as `GET /_emulator/stats` answers it. Everything counts from the
/// emulator's start or the last reset; `/_emulator/*` requests are never counted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Requests answered (or reset) since the epoch.
    pub total_requests: u64,
    /// Route label -> status -> count. Status 0 is a `reset` fault (no complete answer).
    pub by_route: BTreeMap<String, BTreeMap<u16, u64>>,
    /// Status -> count, all routes together.
    pub by_status: BTreeMap<u16, u64>,
    /// One entry per second since the epoch, up to the last second with a request, by arrival.
    pub timeline: Vec<SecondStats>,
    /// The most requests in progress at once (arrived, not yet answered).
    pub max_concurrent: u64,
    /// Requests in progress when the snapshot was taken.
    pub in_flight: u64,
    /// Fault kind -> requests it hit.
    pub faults_injected: BTreeMap<String, u64>,
    /// Seconds since the epoch.
    pub elapsed_seconds: f64,
}

/// The requests that arrived in second `second` (counted from the epoch).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecondStats {
    pub second: u64,
    pub requests: u64,
    pub status_429: u64,
    /// Answered 2xx.
    pub ok: u64,
}

impl StatsSnapshot {
    /// Requests of `route` (a [`RouteLabel`] spelling) answered `status`.
    pub fn count(&self, route: &str, status: u16) -> u64 {
        self.by_route
            .get(route)
            .and_then(|m| m.get(&status))
            .copied()
            .unwrap_or(0)
    }

    /// Requests answered `status`, all routes together.
    pub fn status_count(&self, status: u16) -> u64 {
        self.by_status.get(&status).copied().unwrap_or(0)
    }

    /// Requests that arrived in the seconds `seconds` (e.g. `2..5`).
    pub fn requests_in(&self, seconds: Range<u64>) -> u64 {
        self.timeline
            .iter()
            .filter(|s| seconds.contains(&s.second))
            .map(|s| s.requests)
            .sum()
    }
}

/// The live counters. Requests in flight are atomics; the rest sits behind one short lock taken
/// once per answer, never across an await.
pub(crate) struct Stats {
    in_flight: AtomicU64,
    max_concurrent: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    epoch: Instant,
    total: u64,
    by_route: HashMap<(RouteLabel, u16), u64>,
    by_status: HashMap<u16, u64>,
    timeline: Vec<SecondStats>,
    faults: HashMap<&'static str, u64>,
}

impl Inner {
    fn new(epoch: Instant) -> Self {
        Inner {
            epoch,
            total: 0,
            by_route: HashMap::new(),
            by_status: HashMap::new(),
            timeline: Vec::new(),
            faults: HashMap::new(),
        }
    }
}

/// Marks one request in progress until dropped.
pub(crate) struct InFlight<'a>(&'a Stats);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Everything recorded about one answered request.
pub(crate) struct Served {
    pub arrival: Instant,
    pub route: RouteLabel,
    pub status: u16,
    /// The answering fault that hit, if any.
    pub fault: Option<&'static str>,
    /// How many `slow` faults delayed it.
    pub slow_hits: u32,
}

impl Stats {
    pub(crate) fn new(epoch: Instant) -> Self {
        Stats {
            in_flight: AtomicU64::new(0),
            max_concurrent: AtomicU64::new(0),
            inner: Mutex::new(Inner::new(epoch)),
        }
    }

    pub(crate) fn enter(&self) -> InFlight<'_> {
        let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        self.max_concurrent.fetch_max(now, Ordering::Relaxed);
        InFlight(self)
    }

    pub(crate) fn record(&self, outcome: &Served) {
        let mut inner = self.inner.lock();
        // A request that arrived before a reset belongs to the period that was wiped.
        let Some(since) = outcome.arrival.checked_duration_since(inner.epoch) else {
            return;
        };
        inner.total += 1;
        *inner
            .by_route
            .entry((outcome.route, outcome.status))
            .or_default() += 1;
        *inner.by_status.entry(outcome.status).or_default() += 1;
        if let Some(fault) = outcome.fault {
            *inner.faults.entry(fault).or_default() += 1;
        }
        if outcome.slow_hits > 0 {
            *inner.faults.entry("slow").or_default() += u64::from(outcome.slow_hits);
        }
        let second = since.as_secs();
        let len = inner.timeline.len() as u64;
        if second >= len {
            inner
                .timeline
                .extend((len..=second).map(|second| SecondStats {
                    second,
                    ..SecondStats::default()
                }));
        }
        let slot = &mut inner.timeline[second as usize];
        slot.requests += 1;
        if outcome.status == 429 {
            slot.status_429 += 1;
        }
        if (200..300).contains(&outcome.status) {
            slot.ok += 1;
        }
    }

    pub(crate) fn reset(&self, now: Instant) {
        let mut inner = self.inner.lock();
        *inner = Inner::new(now);
        self.max_concurrent
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self, now: Instant) -> StatsSnapshot {
        let inner = self.inner.lock();
        let mut by_route: BTreeMap<String, BTreeMap<u16, u64>> = BTreeMap::new();
        for (&(route, status), &n) in &inner.by_route {
            by_route
                .entry(route.as_str().to_string())
                .or_default()
                .insert(status, n);
        }
        StatsSnapshot {
            total_requests: inner.total,
            by_route,
            by_status: inner.by_status.iter().map(|(&s, &n)| (s, n)).collect(),
            timeline: inner.timeline.clone(),
            max_concurrent: self.max_concurrent.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            faults_injected: inner
                .faults
                .iter()
                .map(|(&k, &n)| (k.to_string(), n))
                .collect(),
            elapsed_seconds: now.saturating_duration_since(inner.epoch).as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn outcome(arrival: Instant, status: u16) -> Served {
        Served {
            arrival,
            route: RouteLabel::PresencePatch,
            status,
            fault: None,
            slow_hits: 0,
        }
    }

    #[test]
    fn the_timeline_has_one_dense_entry_per_second_by_arrival() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        stats.record(&outcome(t0, 200));
        stats.record(&outcome(t0 + Duration::from_millis(2500), 429));
        stats.record(&outcome(t0 + Duration::from_millis(2999), 200));
        let snap = stats.snapshot(t0 + Duration::from_secs(3));
        let seconds: Vec<(u64, u64, u64, u64)> = snap
            .timeline
            .iter()
            .map(|s| (s.second, s.requests, s.status_429, s.ok))
            .collect();
        assert_eq!(seconds, [(0, 1, 0, 1), (1, 0, 0, 0), (2, 2, 1, 1)]);
        assert_eq!(snap.requests_in(1..3), 2);
        assert_eq!(snap.count("presence_patch", 429), 1);
        assert_eq!(snap.status_count(200), 2);
    }

    #[test]
    fn reset_forgets_everything_and_ignores_requests_from_before() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        let guard = stats.enter();
        stats.record(&Served {
            slow_hits: 1,
            ..outcome(t0, 200)
        });
        stats.reset(t0 + Duration::from_secs(5));
        stats.record(&outcome(t0 + Duration::from_secs(1), 200));
        let snap = stats.snapshot(t0 + Duration::from_secs(6));
        assert_eq!(snap.total_requests, 0);
        assert!(snap.timeline.is_empty() && snap.faults_injected.is_empty());
        assert_eq!(
            snap.max_concurrent, 1,
            "the request still in flight is the new peak"
        );
        drop(guard);
        assert_eq!(stats.snapshot(t0).in_flight, 0);
    }

    #[test]
    fn a_snapshot_survives_a_json_round_trip() {
        let t0 = Instant::now();
        let stats = Stats::new(t0);
        stats.record(&Served {
            fault: Some("reset"),
            ..outcome(t0, 200)
        });
        let snap = stats.snapshot(t0);
        let json = serde_json::to_string(&snap).unwrap();
        assert!(
            json.contains(r#""by_route":{"presence_patch":{"200":1}}"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<StatsSnapshot>(&json).unwrap(), snap);
    }
}
