//! The pacing algorithm of one bucket: GCRA over integer nanoseconds. Pure functions of
//! (state, now): no clock, no locks, no I/O. What an upstream 429 does to a bucket (the pause
//! and the rate in force) is [`crate::throttle`]'s.
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
        self.tat = self.tat.max(now).saturating_add(limit.interval);
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
        let base = self
            .tat
            .max(now)
            .saturating_add(n.saturating_mul(limit.interval));
        base.saturating_sub(limit.tolerance).max(now)
    }

    /// Whether the bucket is back to its fresh state (full burst available).
    pub fn is_idle(&self, now: Nanos) -> bool {
        self.tat <= now
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
