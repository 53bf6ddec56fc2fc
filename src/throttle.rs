//! What an upstream 429 means, decided in one place: how long the budgets it was charged to
//! pause, the single probe after the pause, what it teaches about the upstream's limit (the rate
//! in force: [`Adaptive`]), how the retry waits, when the 429 passes through instead, and the one
//! log line and counters that record it. Pure functions of their inputs, except [`record`],
//! which counts and logs; the pacer applies the bucket rules and the proxy calls the rest.
//!
//! # The rules
//! - **whose limit**: a 429 charged to a keyed budget (`per: token | client_ip | header:`) is
//!   taken as that key's unless known otherwise ([`Scope`]): the key is paused, and the shared
//!   budgets the request was charged to only hold until one request of another key has come
//!   back without a 429 (the probe), then go on. A probe that meets a 429 too shows the limit is
//!   shared: then the shared budgets pause and learn. A route without keyed budgets has only
//!   shared ones to pause ([`plan`]).
//! - **pause**: for the 429's `Retry-After`, or [`DEFAULT_PAUSE`] when it gave none, never longer
//!   than `retry.max_retry_after`; a `Retry-After` beyond it passes the 429 through to its client
//!   at once and pauses nothing shared ([`plan`]).
//! - **probe**: after a pause, one request goes first, then the rate in force: never a burst,
//!   however large the bucket's burst ([`probe_after`]).
//! - **learn**: the rate in force of a paused bucket drops to the upstream's limit when the 429
//!   reveals it (requests since its window began and the `Retry-After` left of it), else by
//!   [`Adaptive::DECREASE`] ([`Adaptive`], [`WindowLog`]).
//! - **retry delay**: a 429 on a paced route re-queues at the head of its queues: the budgets'
//!   pause already holds it back, so it does not sleep on top; any other retry sleeps the policy's
//!   delay ([`retry_wait`]).
//! - **give up**: a `Retry-After` over `retry.max_retry_after`, attempts or time used up, or a
//!   body too large to replay pass the upstream's 429 through ([`crate::retry::decide`]).

use std::collections::VecDeque;
use std::time::Duration;

use crate::budget::{Gcra, Limit, Nanos, NANOS_PER_SEC};
use crate::metrics::Metrics;
use crate::retry::Verdict;
use crate::status_page::ThrottleEvent;

/// The pause after a 429 that gave no `Retry-After`.
pub const DEFAULT_PAUSE: Duration = Duration::from_secs(1);

/// Whose limit a 429 was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The key's own (the token's `token.rate.per.minute`, a user's): other keys go on.
    Key,
    /// Shared by every key (an org or route limit): the shared budgets pause.
    Shared,
    /// Not said: found out from whether other keys still succeed.
    Unknown,
}

impl Scope {
    /// From the `limit.key` a Genesys 429 body may carry (not guaranteed: see
    /// `genesys-api-facts`): token and user limits are a key's, any other named limit is shared.
    ///
    /// ```
    /// use shiftgate::throttle::Scope;
    /// assert_eq!(Scope::from_limit_key(Some("token.rate.per.minute")), Scope::Key);
    /// assert_eq!(Scope::from_limit_key(Some("org.app.user.rate.per.minute")), Scope::Key);
    /// assert_eq!(Scope::from_limit_key(Some("presence.update.rate")), Scope::Shared);
    /// assert_eq!(Scope::from_limit_key(None), Scope::Unknown);
    /// ```
    pub fn from_limit_key(key: Option<&str>) -> Scope {
        match key {
            None => Scope::Unknown,
            Some(k) if k.contains("token.rate") || k.contains(".user.rate") => Scope::Key,
            Some(_) => Scope::Shared,
        }
    }
}

/// What a 429 does to one class of buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing.
    Go,
    /// Pause for this long, then one probe; learn the upstream's limit.
    Pause(Duration),
    /// Let one request through (the probe) and hold the rest until it comes back without a 429,
    /// for this long at most; a 429 on the probe turns this into [`Action::Pause`].
    Hold(Duration),
}

/// What a 429 does to the buckets it was charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The keyed buckets (`per: token | client_ip | header:`).
    pub keyed: Action,
    /// The global buckets.
    pub shared: Action,
}

/// Rules "whose limit" and "pause": what a 429 with `retry_after` does to the budgets of a
/// request charged to keyed buckets or not (`keyed`), with `max_retry_after` the longest pause.
///
/// ```
/// use std::time::Duration;
/// use shiftgate::throttle::{plan, Action, Scope};
/// let s = Duration::from_secs;
/// // one token's 429: its key pauses, the shared budget waits for one probe of another key
/// let p = plan(Some(s(20)), s(180), Scope::Unknown, true);
/// assert_eq!((p.keyed, p.shared), (Action::Pause(s(20)), Action::Hold(s(20))));
/// // a Retry-After past retry.max_retry_after pauses nothing shared, the key for 180 s at most
/// let p = plan(Some(s(3600)), s(180), Scope::Unknown, true);
/// assert_eq!((p.keyed, p.shared), (Action::Pause(s(180)), Action::Go));
/// ```
pub fn plan(
    retry_after: Option<Duration>,
    max_retry_after: Duration,
    scope: Scope,
    keyed: bool,
) -> Plan {
    let pause = retry_after.unwrap_or(DEFAULT_PAUSE).min(max_retry_after);
    let passes_through = retry_after.is_some_and(|ra| ra > max_retry_after);
    let shared = |action: Action| if passes_through { Action::Go } else { action };
    if !keyed {
        return Plan {
            keyed: Action::Go,
            shared: shared(Action::Pause(pause)),
        };
    }
    match scope {
        Scope::Key => Plan {
            keyed: Action::Pause(pause),
            shared: Action::Go,
        },
        Scope::Shared => Plan {
            keyed: Action::Go,
            shared: shared(Action::Pause(pause)),
        },
        Scope::Unknown => Plan {
            keyed: Action::Pause(pause),
            shared: shared(Action::Hold(pause)),
        },
    }
}

/// `now + d` in nanoseconds, saturating: no pause, however long, wraps around.
pub fn after(now: Nanos, d: Duration) -> Nanos {
    now.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// Rule "probe": a bucket paused until `until` grants its next slot at `until` and the one
/// after a full interval later, whatever its burst: the theoretical arrival time moves to at
/// least `until + τ`, so `earliest = tat − τ ≥ until` and nothing accumulated during the pause.
///
/// ```
/// use shiftgate::budget::{Gcra, Limit};
/// use shiftgate::throttle::probe_after;
/// let limit = Limit::new(10.0, 5); // 100 ms apart, burst 5 (τ = 400 ms)
/// let mut g = Gcra::default();
/// probe_after(&mut g, 2_000_000_000, &limit);
/// assert_eq!(g.earliest(&limit), 2_000_000_000); // the probe
/// g.take(2_000_000_000, &limit);
/// assert!(!g.conforms(2_000_000_000, &limit)); // no burst behind it
/// ```
pub fn probe_after(gcra: &mut Gcra, until: Nanos, limit: &Limit) {
    gcra.tat = gcra.tat.max(until.saturating_add(limit.tolerance));
}

/// Rule "retry delay": how the retry of an attempt waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryWait {
    /// Sleep this long, then go (re-queued for slots when the route is paced).
    Sleep(Duration),
    /// Re-queue at once at the head of the route's queues: the budgets' pause is the wait.
    Requeue,
}

/// How the retry the policy decided on waits: a 429 on a paced route paused its budgets for
/// every request of theirs, this one included, so sleeping the policy's delay on top of the
/// pause would wait twice.
///
/// ```
/// use std::time::Duration;
/// use shiftgate::throttle::{retry_wait, RetryWait};
/// let d = Duration::from_secs(3);
/// assert_eq!(retry_wait(429, d, true), RetryWait::Requeue);
/// assert_eq!(retry_wait(429, d, false), RetryWait::Sleep(d));
/// assert_eq!(retry_wait(503, d, true), RetryWait::Sleep(d));
/// ```
pub fn retry_wait(status: u16, delay: Duration, paced: bool) -> RetryWait {
    if status == 429 && paced {
        RetryWait::Requeue
    } else {
        RetryWait::Sleep(delay)
    }
}

/// Whether a verdict of the retry policy on a 429 passes the upstream's answer through.
pub fn passes_through(verdict: &Verdict) -> bool {
    !matches!(verdict, Verdict::Retry { .. })
}

/// A gap this long between two grants starts a new upstream window.
pub const WINDOW_IDLE: Nanos = 1_000_000_000;
/// Grant times remembered per bucket: the most recent ones (older ones are only counted). A
/// 429 comes back within seconds of its grant, which is then among the last 4096 unless the
/// bucket grants over 1,000 a second; 32 KiB at most per bucket.
pub const WINDOW_CAP: usize = 4096;
/// Capacity a new window starts with; a window that outgrew it gives the rest back.
const WINDOW_SPARE: usize = 16;

/// Rule "learn", its evidence: the grants of a bucket since the upstream's window presumably
/// began (after an idle gap of [`WINDOW_IDLE`] or a pause), what a 429 is measured against.
///
/// Bounded: it keeps the last [`WINDOW_CAP`] grant times and counts the older ones, and each
/// new window releases the memory a busy one took, so an idle bucket holds a few bytes.
#[derive(Debug, Clone, Default)]
pub struct WindowLog {
    grants: VecDeque<Nanos>,
    /// Grants of this window no longer remembered one by one (the oldest).
    forgotten: u64,
    start: Nanos,
}

impl WindowLog {
    /// Records a grant at `at`; `paused_until` is the bucket's pause (a grant after a pause opens
    /// a new window).
    pub fn record(&mut self, at: Nanos, paused_until: Nanos) {
        let fresh = match self.grants.back().copied() {
            None => true,
            Some(last) => {
                at.saturating_sub(last) >= WINDOW_IDLE
                    || (paused_until > last && at >= paused_until)
            }
        };
        if fresh {
            self.grants.clear();
            self.grants.shrink_to(WINDOW_SPARE);
            self.forgotten = 0;
            self.start = at;
        }
        if self.grants.len() == WINDOW_CAP {
            self.grants.pop_front();
            self.forgotten += 1;
        }
        self.grants.push_back(at);
    }

    /// Grant times held now, and the capacity they take (for the bound's tests).
    pub fn held(&self) -> (usize, usize) {
        (self.grants.len(), self.grants.capacity())
    }

    /// The upstream's limit as learned from a 429 of a request granted at `sent`, when the 429
    /// carried a `Retry-After` and the grants before `sent` are known (counted, at least).
    ///
    /// ```
    /// use std::time::Duration;
    /// use shiftgate::throttle::WindowLog;
    /// let mut w = WindowLog::default();
    /// for i in 0..100 { w.record(i * 6_000_000, 0) } // 100 in 0.6 s
    /// // the 101st, at 0.6 s, met a 429 with Retry-After 1: a window of 100 per second
    /// assert_eq!(w.estimate(600_000_000, Some(Duration::from_secs(1))), Some(100.0));
    /// ```
    pub fn estimate(&self, sent: Nanos, retry_after: Option<Duration>) -> Option<f64> {
        let ra = retry_after?;
        if sent < self.start {
            return None;
        }
        // Granted before the grants remembered one by one: how many came before it is lost.
        if self.forgotten > 0 && self.grants.front().is_none_or(|&g| sent < g) {
            return None;
        }
        let before = self.forgotten + self.grants.partition_point(|&g| g < sent) as u64;
        let ra_secs = ra.as_secs() + u64::from(ra.subsec_nanos() > 0);
        Adaptive::estimate(self.start, sent, before, ra_secs)
    }
}

/// Records an upstream 429 charged to `budgets` of `route`: one counter per budget, one event
/// per budget for the status page (returned), one log line.
pub fn record(
    metrics: &Metrics,
    route: &str,
    budgets: &[&str],
    retry_after: Option<Duration>,
    lowered: &[String],
    unix_time: u64,
) -> Vec<ThrottleEvent> {
    let events = budgets
        .iter()
        .map(|name| {
            metrics
                .budget_throttles_total
                .with_label_values(&[name])
                .inc();
            ThrottleEvent {
                unix_time,
                budget: name.to_string(),
                route: route.to_string(),
                retry_after_seconds: retry_after.map_or(0, |d| d.as_secs()),
            }
        })
        .collect();
    tracing::warn!(
        route = %route,
        budgets = ?budgets,
        lowered = ?lowered,
        retry_after_s = retry_after.map(|d| d.as_secs_f64()),
        "upstream throttled (429): budgets paused"
    );
    events
}

/// How the rate in force follows upstream 429s.
///
/// A 429 lowers it once per round of requests (those sent before the decrease were paced at the
/// old rate: counting each of their 429s would collapse the rate). When the 429 says how full the
/// upstream's window was, the new rate is learned rather than guessed: see
/// [`Adaptive::estimate`]. Otherwise it is multiplied by [`Adaptive::DECREASE`]. After
/// [`Adaptive::QUIET`] without 429 it climbs back quickly to just under the lowest rate that
/// met a 429 (the ceiling), holds there while the ceiling is remembered, then creeps back to
/// the configured rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Adaptive {
    pub configured: f64,
    pub floor: f64,
    /// Rate set by the last decrease.
    lowered: f64,
    /// The lowest rate known to meet 429s (while remembered).
    ceiling: f64,
    /// When the last decrease happened; `None`: never, the rate is the configured one.
    last_decrease: Option<Nanos>,
}

impl Adaptive {
    /// Factor applied to the rate in force on a 429 that tells nothing more.
    pub const DECREASE: f64 = 0.7;
    /// An estimate below this fraction of the rate in force is not believed.
    pub const MIN_ESTIMATE: f64 = 0.4;
    /// A learned limit is used with this margin.
    pub const LEARNED_MARGIN: f64 = 0.97;
    /// Recovery stops this far under the ceiling.
    pub const UNDER_CEILING: f64 = 0.95;
    /// No recovery until this long after the last decrease.
    pub const QUIET: Nanos = 2_000_000_000;
    /// Fast recovery (up to the ceiling): this fraction of the configured rate per second.
    pub const FAST_STEP: f64 = 0.10;
    /// How long the ceiling is remembered after the last 429.
    pub const MEMORY: Nanos = 60_000_000_000;
    /// Slow recovery (past the ceiling, once forgotten): fraction of the configured rate per s.
    pub const SLOW_STEP: f64 = 0.01;
    /// Window lengths that upstream limits are counted in (Genesys: per minute; per second and
    /// per hour limits exist too).
    pub const WINDOWS: [f64; 3] = [1.0, 60.0, 3600.0];

    pub fn new(configured: f64, floor: f64) -> Adaptive {
        Adaptive {
            configured,
            floor: floor.min(configured),
            lowered: configured,
            ceiling: configured,
            last_decrease: None,
        }
    }

    /// The rate in force at `now`, requests/second.
    ///
    /// ```
    /// use shiftgate::throttle::Adaptive;
    /// let mut a = Adaptive::new(100.0, 10.0);
    /// a.throttled(0, 0, None);                                // nothing learned: × 0.7
    /// assert_eq!(a.rate(1_000_000_000), 70.0);               // lowered, still quiet
    /// assert_eq!(a.rate(3_000_000_000), 80.0);               // 1 s into recovery: +10/s
    /// assert_eq!(a.rate(10_000_000_000), 95.0);              // held under the ceiling (100)
    /// assert_eq!(a.rate(600_000_000_000), 100.0);            // ceiling forgotten: configured
    /// ```
    pub fn rate(&self, now: Nanos) -> f64 {
        let Some(at) = self.last_decrease else {
            return self.configured;
        };
        let since = now.saturating_sub(at);
        if since < Self::QUIET {
            return self.lowered;
        }
        let cap = (self.ceiling * Self::UNDER_CEILING)
            .max(self.lowered)
            .min(self.configured);
        let fast = (since - Self::QUIET) as f64 / NANOS_PER_SEC;
        let rate = (self.lowered + self.configured * Self::FAST_STEP * fast).min(cap);
        if since < Self::MEMORY {
            return rate;
        }
        let slow = (since - Self::MEMORY) as f64 / NANOS_PER_SEC;
        (rate + self.configured * Self::SLOW_STEP * slow).min(self.configured)
    }

    /// Records a 429 for a request sent at `sent_at`, with the upstream's sustainable rate if
    /// it could be estimated. Returns whether the rate was lowered.
    pub fn throttled(&mut self, now: Nanos, sent_at: Nanos, estimate: Option<f64>) -> bool {
        if self.last_decrease.is_some_and(|at| sent_at < at) {
            return false;
        }
        let current = self.rate(now);
        let remembered = self
            .last_decrease
            .is_some_and(|at| now.saturating_sub(at) < Self::MEMORY);
        let ceiling = if remembered {
            self.ceiling
        } else {
            self.configured
        };
        // An estimate far below the rate in force more likely comes from an outage than from a
        // window: do not trust it.
        let estimate = estimate.filter(|e| *e >= current * Self::MIN_ESTIMATE);
        let (lowered, ceiling) = match estimate {
            Some(limit) => (limit * Self::LEARNED_MARGIN, limit.min(ceiling)),
            None => (current * Self::DECREASE, current.min(ceiling)),
        };
        self.lowered = lowered.min(current).max(self.floor);
        self.ceiling = ceiling.max(self.floor);
        self.last_decrease = Some(now);
        true
    }

    /// The upstream's sustainable rate, from one 429: `sent` requests went through since the
    /// window began at `window_start`, and the 429 at `at` said the window ends in
    /// `retry_after` (whole seconds, rounded up). The window's length is then between
    /// `at − window_start` and that plus `retry_after`; when exactly one of
    /// [`Adaptive::WINDOWS`] fits, the limit is `sent / window`.
    ///
    /// ```
    /// use shiftgate::throttle::Adaptive;
    /// const S: u64 = 1_000_000_000;
    /// // 100 went through in the first 0.667 s of a window, Retry-After 1: a 1 s window of 100.
    /// assert_eq!(Adaptive::estimate(0, 667_000_000, 100, 1), Some(100.0));
    /// // 300 in 40 s, Retry-After 20: Genesys's 300 per minute.
    /// assert_eq!(Adaptive::estimate(0, 40 * S, 300, 20), Some(5.0));
    /// // Nothing known fits 5 s .. 7 s: no estimate.
    /// assert_eq!(Adaptive::estimate(0, 5 * S, 50, 2), None);
    /// ```
    pub fn estimate(
        window_start: Nanos,
        at: Nanos,
        sent: u64,
        retry_after_secs: u64,
    ) -> Option<f64> {
        if sent == 0 || at <= window_start {
            return None;
        }
        let elapsed = (at - window_start) as f64 / NANOS_PER_SEC;
        let longest = elapsed + retry_after_secs.max(1) as f64;
        let mut fits = Self::WINDOWS
            .iter()
            .filter(|w| **w >= elapsed && **w <= longest + 0.05);
        let window = *fits.next()?;
        if fits.next().is_some() {
            return None;
        }
        Some(sent as f64 / window)
    }

    /// The state other replicas need: (lowered, ceiling).
    pub fn state(&self) -> (f64, f64) {
        (self.lowered, self.ceiling)
    }

    /// Takes over another replica's decrease made at `at`, when it is newer than our own.
    pub fn adopt(&mut self, lowered: f64, ceiling: f64, at: Nanos) {
        if self.last_decrease.is_some_and(|own| own >= at) {
            return;
        }
        self.lowered = lowered.clamp(self.floor, self.configured);
        self.ceiling = ceiling.clamp(self.floor, self.configured);
        self.last_decrease = Some(at);
    }

    /// A new configured rate (reload). The learned reduction is kept as a fraction.
    pub fn reconfigure(&mut self, configured: f64, floor: f64) {
        if self.configured != configured {
            let ratio = configured / self.configured;
            self.lowered *= ratio;
            self.ceiling *= ratio;
        }
        self.configured = configured;
        self.floor = floor.min(configured);
        self.lowered = self.lowered.clamp(self.floor, self.configured);
        self.ceiling = self.ceiling.clamp(self.floor, self.configured);
    }

    /// Whether the rate is back to the configured one for good.
    pub fn is_settled(&self, now: Nanos) -> bool {
        self.rate(now) >= self.configured
    }
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::tests::settings;
    use crate::retry::{decide, Attempt, GiveUp, Outcome};

    const MS: Nanos = 1_000_000;
    const S: Nanos = 1_000_000_000;

    #[test]
    fn pause_is_the_retry_after_or_one_second_capped_by_max_retry_after() {
        let s = Duration::from_secs;
        let p = plan(Some(s(20)), s(180), Scope::Shared, false);
        assert_eq!(p.shared, Action::Pause(s(20)));
        let p = plan(None, s(180), Scope::Unknown, false);
        assert_eq!(p.shared, Action::Pause(DEFAULT_PAUSE));
        // exactly the cap is still waited out
        let p = plan(Some(s(180)), s(180), Scope::Unknown, false);
        assert_eq!(p.shared, Action::Pause(s(180)));
    }

    #[test]
    fn a_retry_after_past_the_cap_pauses_nothing_shared() {
        let s = Duration::from_secs;
        for scope in [Scope::Key, Scope::Shared, Scope::Unknown] {
            for keyed in [false, true] {
                let p = plan(Some(s(3600)), s(180), scope, keyed);
                assert_eq!(p.shared, Action::Go, "{scope:?} keyed={keyed}");
                assert!(matches!(p.keyed, Action::Go | Action::Pause(_)));
                if let Action::Pause(d) = p.keyed {
                    assert_eq!(d, s(180), "never longer than the cap");
                }
            }
        }
    }

    #[test]
    fn whose_limit_decides_what_pauses() {
        let s = Duration::from_secs;
        let key = plan(Some(s(5)), s(180), Scope::Key, true);
        assert_eq!((key.keyed, key.shared), (Action::Pause(s(5)), Action::Go));
        let shared = plan(Some(s(5)), s(180), Scope::Shared, true);
        assert_eq!(
            (shared.keyed, shared.shared),
            (Action::Go, Action::Pause(s(5)))
        );
        let unknown = plan(Some(s(5)), s(180), Scope::Unknown, true);
        assert_eq!(
            (unknown.keyed, unknown.shared),
            (Action::Pause(s(5)), Action::Hold(s(5)))
        );
        assert_eq!(
            Scope::from_limit_key(Some("client.credentials.token.rate.per.minute")),
            Scope::Key
        );
        assert_eq!(
            Scope::from_limit_key(Some("org.user.rate.per.minute")),
            Scope::Key
        );
    }

    #[test]
    fn pause_arithmetic_saturates() {
        assert_eq!(after(u64::MAX - 5, Duration::from_secs(1)), u64::MAX);
        assert_eq!(after(10, Duration::MAX), u64::MAX);
        assert_eq!(after(10, Duration::from_nanos(5)), 15);
    }

    #[test]
    fn probe_one_request_after_the_pause_then_the_rate() {
        let limit = Limit::new(10.0, 5);
        let mut g = Gcra::default();
        probe_after(&mut g, 2 * S, &limit);
        assert!(!g.conforms(2 * S - 1, &limit), "nothing during the pause");
        assert!(g.conforms(2 * S, &limit));
        g.take(2 * S, &limit);
        assert_eq!(
            g.earliest(&limit),
            2 * S + 100 * MS,
            "then one interval apart"
        );
        // a schedule already later than the pause is kept
        let mut late = Gcra { tat: 10 * S };
        probe_after(&mut late, 2 * S, &limit);
        assert_eq!(late.tat, 10 * S);
        // saturates instead of wrapping
        probe_after(&mut g, u64::MAX, &limit);
        assert_eq!(g.tat, u64::MAX);
    }

    #[test]
    fn learn_the_window_from_the_grants_before_the_429() {
        let mut w = WindowLog::default();
        // 300 grants over 40 s, then a 429 with Retry-After 20: 300 per minute.
        for i in 0..300 {
            w.record(i * 133 * MS, 0);
        }
        assert_eq!(w.estimate(40 * S, Some(Duration::from_secs(20))), Some(5.0));
        // nothing to learn without a Retry-After
        assert_eq!(w.estimate(40 * S, None), None);
        // a request granted before the window began tells nothing
        let mut w2 = WindowLog::default();
        w2.record(5 * S, 0);
        assert_eq!(w2.estimate(S, Some(Duration::from_secs(1))), None);
    }

    #[test]
    fn the_window_log_is_bounded_and_gives_memory_back() {
        let mut w = WindowLog::default();
        // 30,000 grants at 1 kHz: one window, the last WINDOW_CAP remembered, the rest counted
        for i in 0..30_000 {
            w.record(i * MS, 0);
        }
        let (len, cap) = w.held();
        assert_eq!(len, WINDOW_CAP);
        assert!(cap < 2 * WINDOW_CAP, "capacity {cap}");
        // a 429 on the last grant still counts all 29,999 before it: 1,000 a second... over a
        // 30 s span, which fits the per-minute window: 29,999 / 60
        let est = w.estimate(29_999 * MS, Some(Duration::from_secs(31)));
        assert_eq!(est, Some(29_999.0 / 60.0));
        // one granted before those remembered: nothing to learn
        assert_eq!(w.estimate(MS, Some(Duration::from_secs(31))), None);
        // a new window after an idle gap releases what the busy one took
        w.record(40 * S, 0);
        let (len, cap) = w.held();
        assert_eq!(len, 1);
        assert!(cap <= 2 * WINDOW_SPARE, "capacity {cap}");
    }

    #[test]
    fn learn_a_new_window_after_an_idle_gap_or_a_pause() {
        let mut w = WindowLog::default();
        w.record(0, 0);
        w.record(100 * MS, 0);
        w.record(100 * MS + WINDOW_IDLE, 0); // idle gap: a new window
        assert_eq!(w.start, 100 * MS + WINDOW_IDLE);
        assert_eq!(w.grants.len(), 1);
        let t = w.start;
        w.record(t + 10 * MS, t + 5 * MS); // first grant after a pause ending at t+5ms
        assert_eq!(w.start, t + 10 * MS);
    }

    #[test]
    fn retry_delay_a_paced_429_requeues_everything_else_sleeps() {
        let d = Duration::from_millis(1500);
        assert_eq!(retry_wait(429, d, true), RetryWait::Requeue);
        assert_eq!(retry_wait(429, d, false), RetryWait::Sleep(d));
        assert_eq!(retry_wait(502, d, true), RetryWait::Sleep(d));
        assert_eq!(retry_wait(504, d, false), RetryWait::Sleep(d));
    }

    fn attempt_429(retry_after: Option<Duration>, made: u32) -> Attempt {
        Attempt {
            outcome: Outcome::Status(429, retry_after),
            made,
            elapsed: Duration::ZERO,
            idempotent: false,
            replayable: true,
            jitter: 0.5,
        }
    }

    #[test]
    fn give_up_passes_the_429_through() {
        let s = settings();
        // a Retry-After beyond retry.max_retry_after is not waited out
        let v = decide(&s, &attempt_429(Some(Duration::from_secs(3600)), 1));
        assert_eq!(
            v,
            Verdict::GiveUp(GiveUp::RetryAfterTooLong(Duration::from_secs(3600)))
        );
        assert!(passes_through(&v));
        // attempts used up
        let v = decide(&s, &attempt_429(Some(Duration::from_secs(1)), 5));
        assert!(passes_through(&v));
        // within bounds: retried (a POST/PATCH too: the 429 was not acted on)
        let v = decide(&s, &attempt_429(Some(Duration::from_secs(2)), 1));
        assert!(!passes_through(&v));
    }

    #[test]
    fn record_counts_each_budget_once_and_returns_its_event() {
        let m = Metrics::new();
        let events = record(
            &m,
            "presence",
            &["presence", "per-token"],
            Some(Duration::from_secs(7)),
            &[],
            1_700_000_000,
        );
        assert_eq!(events.len(), 2);
        assert_eq!(events[1].budget, "per-token");
        assert_eq!(events[0].retry_after_seconds, 7);
        for b in ["presence", "per-token"] {
            assert_eq!(m.budget_throttles_total.with_label_values(&[b]).get(), 1);
        }
    }

    #[test]
    fn adaptive_decreases_once_per_round_and_never_below_the_floor() {
        let mut a = Adaptive::new(100.0, 50.0);
        assert!(a.throttled(10 * MS, 5 * MS, None));
        // A request sent before that decrease: same round, ignored.
        assert!(!a.throttled(12 * MS, 8 * MS, None));
        assert_eq!(a.rate(12 * MS), 70.0);
        for i in 0..20 {
            a.throttled((20 + i) * MS, (20 + i) * MS, None);
        }
        assert_eq!(a.rate(40 * MS), 50.0);
    }

    #[test]
    fn a_learned_limit_is_used_with_its_margin_and_held() {
        let mut a = Adaptive::new(150.0, 15.0);
        assert!(a.throttled(0, 0, Some(100.0)));
        assert_eq!(a.rate(MS), 97.0);
        // no climb back past the learned limit while it is remembered
        assert_eq!(a.rate(30_000 * MS), 97.0);
        // then slowly back towards the configured rate
        assert!(a.rate(70_000 * MS) > 97.0);
        assert_eq!(a.rate(200_000 * MS), 150.0);
    }

    #[test]
    fn an_implausibly_low_estimate_is_not_believed() {
        let mut a = Adaptive::new(100.0, 10.0);
        a.throttled(0, 0, Some(20.0)); // 20 % of the rate: an outage, not a window
        assert_eq!(a.rate(MS), 70.0);
    }

    #[test]
    fn a_ceiling_is_lowered_by_each_429_that_reaches_it() {
        let mut a = Adaptive::new(100.0, 10.0);
        a.throttled(0, 0, None); // ceiling 100, rate 70
        let plateau = a.rate(10_000 * MS);
        assert_eq!(plateau, 95.0);
        a.throttled(10_000 * MS, 10_000 * MS, None); // met a 429 at 95: ceiling 95
        assert_eq!(a.rate(30_000 * MS), 95.0 * 0.95);
    }

    #[test]
    fn reconfigure_keeps_the_learned_fraction() {
        let mut a = Adaptive::new(100.0, 10.0);
        a.throttled(0, 0, None);
        a.reconfigure(200.0, 20.0);
        assert_eq!(a.rate(0), 140.0);
    }
}
