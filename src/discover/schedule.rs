//! When the n-th request of a step is due: a geometric ramp (capped) or a constant rate. Pure.
//!
//! A ramp sends at `r(t) = r0·gᵗ` requests per second, so `C(t) = r0·(gᵗ − 1)/ln g` have been
//! sent by time `t`, and the n-th request is due at `t(n) = ln(1 + n·ln g / r0) / ln g`. Once
//! `r(t)` reaches `cap` (at `t_c = ln(cap/r0)/ln g`, after `C_c = (cap − r0)/ln g` requests) it
//! stays there: `t(n) = t_c + (n − C_c)/cap`.

/// How fast a step sends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    /// From `start` requests/s, multiplied by `growth` every second, never above `cap`.
    Ramp { start: f64, growth: f64, cap: f64 },
    /// `rate` requests/s throughout.
    Constant { rate: f64 },
}

impl Schedule {
    /// Seconds from the step's start at which request `n` (from 0) is due.
    ///
    /// ```
    /// use shiftgate::discover::Schedule;
    /// let ramp = Schedule::Ramp { start: 1.0, growth: 2.0, cap: 1000.0 };
    /// // By t = 1 s, (2 − 1)/ln 2 ≈ 1.44 requests are due: request 1 comes just before 1 s.
    /// assert!(ramp.due(1) < 1.0 && ramp.due(2) > 1.0);
    /// assert_eq!(Schedule::Constant { rate: 4.0 }.due(2), 0.5);
    /// ```
    pub fn due(&self, n: usize) -> f64 {
        let n = n as f64;
        match *self {
            Schedule::Constant { rate } => n / rate,
            Schedule::Ramp { start, growth, cap } => {
                let ln_g = growth.ln();
                if ln_g <= 0.0 || cap <= start {
                    return n / start.min(cap);
                }
                let at_cap = (cap - start) / ln_g;
                if n <= at_cap {
                    (1.0 + n * ln_g / start).ln() / ln_g
                } else {
                    (cap / start).ln() / ln_g + (n - at_cap) / cap
                }
            }
        }
    }

    /// The rate in requests/s at `t` seconds from the step's start.
    pub fn rate_at(&self, t: f64) -> f64 {
        match *self {
            Schedule::Constant { rate } => rate,
            Schedule::Ramp { start, growth, cap } => (start * growth.powf(t.max(0.0))).min(cap),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ramp_sends_what_its_rate_integrates_to_and_stays_at_its_cap() {
        let ramp = Schedule::Ramp {
            start: 2.0,
            growth: 1.5,
            cap: 20.0,
        };
        // Count the requests due in each second and compare with the integral of r(t).
        let due: Vec<f64> = (0..400).map(|n| ramp.due(n)).collect();
        assert!(due.windows(2).all(|w| w[0] < w[1]), "strictly increasing");
        let in_second = |s: f64| due.iter().filter(|&&t| t >= s && t < s + 1.0).count() as f64;
        for s in 0..5 {
            let s = s as f64;
            let expected = 2.0 * (1.5f64.powf(s + 1.0) - 1.5f64.powf(s)) / 1.5f64.ln();
            assert!(
                (in_second(s) - expected).abs() <= 1.0,
                "second {s}: {} vs {expected}",
                in_second(s)
            );
        }
        assert_eq!(in_second(10.0), 20.0, "at the cap, 20 a second");
        assert_eq!(ramp.rate_at(100.0), 20.0);
    }
}
