//! What a run of answers says about a fixed-window limit. Pure: times in seconds, no clock.
//!
//! The model is Genesys's as far as it is known: a window opens at the first request counted
//! after the previous one ended, admits `N` requests until it ends `W` later, and refused
//! requests count nowhere. A 429 sent at `t` with `Retry-After: R` (whole seconds, rounded up)
//! says the window holding `t` ends in `(t + R − 1, t + R]`. For each admitted request `s` that
//! might have opened that window, `W` lies in `(t + R − 1 − s, t + R − s]`; a length there
//! holds when the chain of windows it implies over the admitted requests really opens a window
//! at `s`, and no earlier window admitted more than that one; the middle of the lengths that
//! hold is that candidate's. The shortest candidate is taken: with `R = 1` any window ending within the second fits, and the shortest
//! is the one a whole-second `Retry-After` can still tell apart. Window lengths of 1.5 s and more
//! are rounded to whole seconds, as Genesys's are; the error is then at most ½ s either way.

use serde::Serialize;

/// One request of a step: when it was sent (seconds from any fixed origin), whether admitted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shot {
    pub at: f64,
    pub admitted: bool,
}

/// The first 429 of a step: sent at `at`, answered with `Retry-After: retry_after`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refusal {
    pub at: f64,
    pub retry_after: u64,
}

/// A fixed window that explains the answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowFit {
    /// Requests the window admitted.
    pub requests: u32,
    /// Its length, whole seconds from 1.5 s on.
    pub window_s: f64,
    /// When the window opened (same origin as the shots).
    pub opened_at: f64,
    /// More than one window length explains the answers (a short `Retry-After`): the shortest
    /// was taken; a run into a fresh window tells them apart.
    pub ambiguous: bool,
}

impl WindowFit {
    pub fn per_second(&self) -> f64 {
        f64::from(self.requests) / self.window_s
    }
}

/// The window the answers imply, or `None` when nothing was admitted before the refusal.
///
/// ```
/// use shiftgate::discover::{fit_window, Refusal, Shot};
/// // 20 requests at 4/s from t = 0 all admitted, the 21st (t = 5 s) refused with Retry-After 5:
/// // a 10 s window that opened at t = 0 and admits 20.
/// let shots: Vec<Shot> = (0..20).map(|i| Shot { at: i as f64 / 4.0, admitted: true }).collect();
/// let fit = fit_window(&shots, Refusal { at: 5.0, retry_after: 5 }).unwrap();
/// assert_eq!((fit.requests, fit.window_s), (20, 10.0));
/// ```
pub fn fit_window(shots: &[Shot], refusal: Refusal) -> Option<WindowFit> {
    let mut admitted: Vec<f64> = shots.iter().filter(|s| s.admitted).map(|s| s.at).collect();
    admitted.sort_by(f64::total_cmp);
    let before: Vec<f64> = admitted
        .iter()
        .copied()
        .filter(|&t| t <= refusal.at)
        .collect();
    // (window, opened at, admitted) for each request that may have opened the refusing window.
    let mut fits: Vec<(f64, f64, u32)> = Vec::new();
    let end_at = refusal.at + refusal.retry_after as f64;
    for &start in &before {
        let (lo, hi) = (end_at - 1.0 - start, end_at - start);
        if hi <= 0.0 {
            continue;
        }
        // The window's end is somewhere in that second; keep the lengths the chain allows.
        let held: Vec<(f64, u32)> = (1..=STEPS_PER_SECOND)
            .map(|i| lo + f64::from(i) / f64::from(STEPS_PER_SECOND))
            .filter(|&w| w > 0.0)
            .filter_map(|w| chain_holds(&admitted, &before, start, w).map(|c| (w, c)))
            .collect();
        if let (Some(first), Some(last)) = (held.first(), held.last()) {
            let window = (first.0 + last.0) / 2.0 - 0.5 / f64::from(STEPS_PER_SECOND);
            let count = held.iter().map(|h| h.1).max().unwrap_or(0);
            fits.push((window, start, count));
        }
    }
    let shortest = fits.iter().copied().min_by(|a, b| a.0.total_cmp(&b.0))?;
    let longest = fits.iter().map(|f| f.0).fold(0.0, f64::max);
    let window_s = round_window(shortest.0);
    // Of the explanations with that whole-second length, the one closest to it.
    let (_, opened_at, requests) = fits
        .iter()
        .copied()
        .filter(|f| round_window(f.0) == window_s)
        .min_by(|a, b| (a.0 - window_s).abs().total_cmp(&(b.0 - window_s).abs()))
        .unwrap_or(shortest);
    Some(WindowFit {
        requests,
        window_s,
        opened_at,
        ambiguous: longest - shortest.0 > 1.0,
    })
}

/// How finely the second in which a window ends is searched.
const STEPS_PER_SECOND: u32 = 20;

/// With windows of `window`, does the chain over `before` open one at `start`, and does no
/// earlier window admit more than that one? Returns that window's count.
fn chain_holds(admitted: &[f64], before: &[f64], start: f64, window: f64) -> Option<u32> {
    let mut opened = before[0];
    let mut count = 0u32;
    let mut earlier_max = 0u32;
    for &t in before {
        if t >= opened + window {
            earlier_max = earlier_max.max(count);
            opened = t;
            count = 0;
        }
        count += 1;
    }
    if opened != start {
        return None;
    }
    // In-flight requests sent after the refusal but inside the window count too: the window
    // admitted them, so the limit is at least that many.
    let after = admitted
        .iter()
        .filter(|&&t| t > before[before.len() - 1] && t < opened + window)
        .count() as u32;
    let count = count + after;
    (earlier_max <= count).then_some(count)
}

/// Whole seconds from 1.5 s on; a shorter window is reported as 1 s, the finest a whole-second
/// `Retry-After` can tell.
pub fn round_window(window: f64) -> f64 {
    if window >= 1.5 {
        window.round()
    } else {
        1.0
    }
}

/// The most requests admitted in any `span` seconds, as a rate: what a limit that was never
/// reached is at least.
pub fn peak_rate(shots: &[Shot], span: f64) -> f64 {
    let mut admitted: Vec<f64> = shots.iter().filter(|s| s.admitted).map(|s| s.at).collect();
    admitted.sort_by(f64::total_cmp);
    let mut best = 0usize;
    let mut lo = 0usize;
    for hi in 0..admitted.len() {
        while admitted[hi] - admitted[lo] >= span {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best as f64 / span
}

/// Who shares a limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Each OAuth token has its own.
    Token,
    /// Every token of the org shares it on this endpoint.
    Org,
}

/// A limit as `--json` reports it: the contract's fields, then where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FoundLimit {
    pub scope: Scope,
    pub requests: u32,
    pub window_s: f64,
    pub per_second: f64,
    /// Not reached within `--max-requests`/`--max-429s`: the limit is at least this.
    pub lower_bound: bool,
    /// `measured`, `listed` (the org limits API) or `both`.
    pub source: &'static str,
    /// The limit's key: from a 429 body's `limit`, else the listed key it was matched with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// What the org limits API lists for it, per window of `listed_window_s`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listed_window_s: Option<f64>,
    /// Whether measured and listed rates agree within 10 %.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agrees: Option<bool>,
}

impl FoundLimit {
    pub fn measured(scope: Scope, fit: WindowFit) -> FoundLimit {
        FoundLimit {
            scope,
            requests: fit.requests,
            window_s: fit.window_s,
            per_second: round3(fit.per_second()),
            lower_bound: false,
            source: "measured",
            key: None,
            listed: None,
            listed_window_s: None,
            agrees: None,
        }
    }

    /// `requests` were answered over `window_s` seconds without a 429, at best `per_second`.
    pub fn at_least(scope: Scope, requests: u32, window_s: f64, per_second: f64) -> FoundLimit {
        FoundLimit {
            lower_bound: true,
            window_s: round3(window_s.max(1.0)),
            per_second: round3(per_second),
            requests,
            ..FoundLimit::measured(
                scope,
                WindowFit {
                    requests,
                    window_s: 1.0,
                    opened_at: 0.0,
                    ambiguous: false,
                },
            )
        }
    }

    /// Adds what the org limits API lists (`value` per `window_s`) and whether it agrees.
    pub fn with_listed(mut self, key: &str, value: u64, window_s: f64) -> FoundLimit {
        let listed_rate = value as f64 / window_s;
        self.source = "both";
        self.key.get_or_insert_with(|| key.to_string());
        self.listed = Some(value);
        self.listed_window_s = Some(window_s);
        self.agrees = Some(if self.lower_bound {
            self.per_second <= listed_rate * 1.1
        } else {
            (self.per_second - listed_rate).abs() <= 0.1 * listed_rate
        });
        self
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers a fixed-window limiter (`count` per `window`, windows opened by the first
    /// admitted request) would give to requests sent at `times`: the shots up to and including
    /// the first refusal, and that refusal.
    fn simulate(times: &[f64], count: u32, window: f64) -> (Vec<Shot>, Option<Refusal>) {
        let mut opened: Option<f64> = None;
        let mut used = 0;
        let mut shots = Vec::new();
        for &t in times {
            if opened.is_none_or(|o| t >= o + window) {
                opened = Some(t);
                used = 0;
            }
            if used < count {
                used += 1;
                shots.push(Shot {
                    at: t,
                    admitted: true,
                });
            } else {
                shots.push(Shot {
                    at: t,
                    admitted: false,
                });
                let wait = opened.unwrap() + window - t;
                let retry_after = (wait.ceil() as u64).max(1);
                return (shots, Some(Refusal { at: t, retry_after }));
            }
        }
        (shots, None)
    }

    fn ramp(start: f64, growth: f64, n: usize) -> Vec<f64> {
        let schedule = crate::discover::Schedule::Ramp {
            start,
            growth,
            cap: 1000.0,
        };
        (0..n).map(|i| 0.013 + schedule.due(i)).collect()
    }

    #[test]
    fn a_ramp_into_a_long_window_is_read_right_or_says_it_is_ambiguous() {
        for (count, window) in [(300, 60.0), (40, 60.0), (30, 10.0), (20, 5.0)] {
            let (shots, refusal) = simulate(&ramp(1.0, 1.5, 2000), count, window);
            let fit = fit_window(&shots, refusal.unwrap()).unwrap();
            assert!(
                fit.ambiguous || (fit.requests, fit.window_s) == (count, window),
                "{count}/{window}: {fit:?}"
            );
        }
    }

    #[test]
    fn a_constant_run_into_a_fresh_window_pins_its_length() {
        for (count, window, rate) in [
            (100, 1.0, 200.0),
            (100, 5.0, 80.0),
            (250, 5.0, 120.0),
            (300, 60.0, 100.0),
            (300, 60.0, 10.0),
            (40, 60.0, 20.0),
            (30, 10.0, 9.6),
            (20, 5.0, 8.0),
        ] {
            let times: Vec<f64> = (0..1000).map(|i| 0.004 + i as f64 / rate).collect();
            let (shots, refusal) = simulate(&times, count, window);
            let fit = fit_window(&shots, refusal.unwrap()).unwrap();
            assert_eq!(
                (fit.requests, fit.window_s),
                (count, window),
                "{count}/{window}s at {rate}/s"
            );
            assert!(!fit.ambiguous);
        }
    }

    #[test]
    fn a_per_second_limit_hit_late_in_a_ramp_reads_roughly_as_one_second() {
        let (shots, refusal) = simulate(&ramp(2.0, 1.5, 3000), 40, 1.0);
        let fit = fit_window(&shots, refusal.unwrap()).unwrap();
        assert_eq!(fit.window_s, 1.0);
        // Rough (Retry-After 1 leaves the opening request uncertain): the experiment follows
        // it with a run into a fresh window.
        assert!(
            (32..=48).contains(&fit.requests),
            "within 20 % of the limit: {}",
            fit.requests
        );
    }

    #[test]
    fn nothing_admitted_fits_nothing() {
        let shots = [Shot {
            at: 0.0,
            admitted: false,
        }];
        assert_eq!(
            fit_window(
                &shots,
                Refusal {
                    at: 0.0,
                    retry_after: 1
                }
            ),
            None
        );
    }

    #[test]
    fn the_peak_rate_is_the_busiest_span() {
        let shots: Vec<Shot> = [0.0, 0.1, 0.2, 1.5, 1.6, 1.7, 1.8, 3.0]
            .iter()
            .map(|&at| Shot { at, admitted: true })
            .collect();
        assert_eq!(peak_rate(&shots, 1.0), 4.0);
    }

    #[test]
    fn listed_and_measured_agree_within_ten_percent() {
        let fit = WindowFit {
            requests: 295,
            window_s: 60.0,
            opened_at: 0.0,
            ambiguous: false,
        };
        let limit =
            FoundLimit::measured(Scope::Token, fit).with_listed("token.rate.per.minute", 300, 60.0);
        assert_eq!(limit.source, "both");
        assert_eq!(limit.agrees, Some(true));
        let lower = FoundLimit::measured(
            Scope::Token,
            WindowFit {
                requests: 100,
                ..fit
            },
        )
        .with_listed("token.rate.per.minute", 300, 60.0);
        assert_eq!(lower.agrees, Some(false), "an endpoint's own lower limit");
    }
}
