//! The pacing algorithm of one bucket: GCRA over integer nanoseconds, plus the pause and the
//! adaptive "rate in force" that upstream 429s lower. Pure functions of (state, now): no clock,
//! no locks, no I/O.
//!
//! # GCRA
//! A bucket of rate `r` and burst `b` has emission interval `T = 1/r` and tolerance
//! `τ = (b − 1)·T`. Its only state is the theoretical arrival time `tat`. A slot conforms at `now`
//! when `now ≥ tat − τ`; taking it sets `tat = max(tat, now) + T`. Hence in any window of length
//! `t` at most `b + r·t` slots are granted (`⌊t/T⌋ + b` to be exact), and a bucket idle for
//! `τ` or longer (`tat ≤ now`) is indistinguishable from a fresh one.
//!
//! ```
//! use shiftgate::budget::{Gcra, Limit};
//! let limit = Limit::new(100.0, 1); // 100/s, burst 1: one slot every 10 ms
//! let mut g = Gcra::default();
//! assert!(g.conforms(0, &limit));
//! g.take(0, &limit);
//! assert!(!g.conforms(5_000_000, &limit));       // 5 ms later: too early
//! assert_eq!(g.earliest(&limit), 10_000_000);     // next slot at 10 ms
//! ```

/// Nanoseconds since the pacer's epoch.
pub type Nanos = u64;

pub const NANOS_PER_SEC: f64 = 1e9;

/// The parameters of a bucket at its current rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limit {
    /// Emission interval `T`, in ns.
    pub interval: Nanos,
    /// Tolerance `τ = (burst − 1)·T`, in ns.
    pub tolerance: Nanos,
}

impl Limit {
    pub fn new(rate_per_second: f64, burst: u32) -> Limit {
        let interval = (NANOS_PER_SEC / rate_per_second).round().max(1.0) as Nanos;
        Limit {
            interval,
            tolerance: interval.saturating_mul(u64::from(burst.max(1)) - 1),
        }
    }
}

/// GCRA state: the theoretical arrival time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    pub tat: Nanos,
}

impl Gcra {
    /// The earliest time a slot conforms: `tat − τ`.
    pub fn earliest(&self, limit: &Limit) -> Nanos {
        self.tat.saturating_sub(limit.tolerance)
    }

    pub fn conforms(&self, now: Nanos, limit: &Limit) -> bool {
        now >= self.earliest(limit)
    }

    /// Takes one slot at `now` (the caller checked [`Gcra::conforms`]).
    pub fn take(&mut self, now: Nanos, limit: &Limit) {
        self.tat = self.tat.max(now) + limit.interval;
    }

    /// Gives back a slot taken and not used (a client left between grant and send).
    pub fn give_back(&mut self, now: Nanos, limit: &Limit) {
        self.tat = self
            .tat
            .saturating_sub(limit.interval)
            .max(now.min(self.tat));
    }

    /// Start time of the `n`-th request that would queue behind the current state
    /// (`n = 0`: the next one), if nothing else happened: `max(now, max(tat, now) + n·T − τ)`.
    pub fn predict(&self, now: Nanos, n: u64, limit: &Limit) -> Nanos {
        let base = self.tat.max(now) + n.saturating_mul(limit.interval);
        base.saturating_sub(limit.tolerance).max(now)
    }

    /// Whether the bucket is back to its fresh state (full burst available).
    pub fn is_idle(&self, now: Nanos) -> bool {
        self.tat <= now
    }
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
    /// use shiftgate::budget::Adaptive;
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
    /// use shiftgate::budget::Adaptive;
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
    use proptest::prelude::*;

    const MS: Nanos = 1_000_000;

    #[test]
    fn burst_allows_that_many_at_once_then_spacing() {
        let limit = Limit::new(10.0, 3); // T = 100 ms, τ = 200 ms
        let mut g = Gcra::default();
        for _ in 0..3 {
            assert!(g.conforms(1000 * MS, &limit));
            g.take(1000 * MS, &limit);
        }
        assert!(!g.conforms(1000 * MS, &limit));
        assert_eq!(g.earliest(&limit), 1100 * MS);
    }

    #[test]
    fn idle_bucket_is_fresh_again() {
        let limit = Limit::new(10.0, 2);
        let mut g = Gcra::default();
        g.take(0, &limit);
        g.take(0, &limit);
        assert!(!g.is_idle(100 * MS));
        assert!(g.is_idle(200 * MS));
    }

    #[test]
    fn prediction_counts_those_ahead() {
        let limit = Limit::new(100.0, 1);
        let g = Gcra { tat: 50 * MS };
        // at 20 ms: next slot at 50 ms; 3 ahead -> 80 ms
        assert_eq!(g.predict(20 * MS, 0, &limit), 50 * MS);
        assert_eq!(g.predict(20 * MS, 3, &limit), 80 * MS);
        assert_eq!(Gcra::default().predict(20 * MS, 0, &limit), 20 * MS);
    }

    #[test]
    fn give_back_restores_the_slot() {
        let limit = Limit::new(100.0, 1);
        let mut g = Gcra::default();
        g.take(0, &limit);
        g.take(0, &limit);
        g.give_back(0, &limit);
        assert_eq!(g.earliest(&limit), 10 * MS);
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

    proptest! {
        /// No window of length t ever holds more than burst + rate·t grants, whatever the
        /// arrival pattern (simulated time: requests arrive at arbitrary instants and take a
        /// slot as soon as one conforms).
        #[test]
        fn never_more_than_burst_plus_rate_times_t(
            rate in 1.0f64..2000.0,
            burst in 1u32..20,
            gaps in proptest::collection::vec(0u64..50_000_000, 1..400),
        ) {
            let limit = Limit::new(rate, burst);
            let mut g = Gcra::default();
            let mut now = 0;
            let mut grants = Vec::new();
            for gap in gaps {
                now += gap;
                // the request waits until its slot conforms
                let at = now.max(g.earliest(&limit));
                g.take(at, &limit);
                grants.push(at);
                now = at;
            }
            // every window [grants[i], grants[j]] of length t holds j-i+1 grants
            for i in 0..grants.len() {
                for j in i..grants.len() {
                    let t = (grants[j] - grants[i]) as f64 / NANOS_PER_SEC;
                    let allowed = f64::from(burst) + rate * t;
                    // integer interval rounding: allow one ns of slack per slot
                    prop_assert!(((j - i + 1) as f64) <= allowed + 1e-6 * (j - i + 1) as f64,
                        "{} grants in {t}s at {rate}/s burst {burst}", j - i + 1);
                }
            }
        }
    }
}
