//! Armed faults and the decision, per request, of which of them hit it.

use std::time::Duration;

use parking_lot::RwLock;
use rand::Rng as _;
use std::time::Instant;

use super::config::{Fault, FaultKind};

/// Faults with their active interval fixed in time.
#[derive(Default)]
pub(crate) struct FaultSet {
    // Read on every request, written only when a fault is added, so a read-mostly lock.
    armed: RwLock<Vec<Armed>>,
}

struct Armed {
    fault: Fault,
    from: Instant,
    until: Option<Instant>,
}

/// What the faults do to one request.
#[derive(Debug, Default)]
pub(crate) struct FaultDecision {
    /// The sum of the delays of the `slow` faults that hit.
    pub extra_delay: Duration,
    /// How many `slow` faults hit, for the stats.
    pub slow_hits: u32,
    /// The first answering fault (anything but `slow`) that hit, with the end of its interval.
    pub answer: Option<(FaultKind, Option<Instant>)>,
}

impl FaultSet {
    /// Arms `fault` with its `start` counted from `origin`.
    pub(crate) fn arm(&self, fault: Fault, origin: Instant, now: Instant) {
        let from = origin + fault.start;
        let until = fault.duration.map(|d| from + d);
        let mut armed = self.armed.write();
        armed.retain(|a| a.until.is_none_or(|u| u > now));
        armed.push(Armed { fault, from, until });
    }

    pub(crate) fn clear(&self) {
        self.armed.write().clear();
    }

    /// Rolls each active fault whose path matches, in the order they were armed.
    pub(crate) fn decide(&self, now: Instant, path: &str) -> FaultDecision {
        let mut decision = FaultDecision::default();
        let armed = self.armed.read();
        for a in armed.iter() {
            let active = now >= a.from && a.until.is_none_or(|u| now < u);
            if !active || !a.fault.path.matches(path) || !roll(a.fault.rate) {
                continue;
            }
            match &a.fault.kind {
                FaultKind::Slow { delay } => {
                    decision.extra_delay += *delay;
                    decision.slow_hits += 1;
                }
                kind => {
                    decision.answer = Some((kind.clone(), a.until));
                    break;
                }
            }
        }
        decision
    }
}

fn roll(rate: f64) -> bool {
    rate >= 1.0 || (rate > 0.0 && rand::rng().random::<f64>() < rate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::config::FaultStatus;
    use crate::route::PathTemplate;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_fault_is_active_only_inside_its_interval() {
        let set = FaultSet::default();
        let t0 = Instant::now();
        set.arm(
            Fault::new(FaultKind::Reset)
                .starting_after(5 * S)
                .lasting(3 * S),
            t0,
            t0,
        );
        assert!(set.decide(t0 + 4 * S, "/api/v2/x").answer.is_none());
        let (kind, until) = set.decide(t0 + 5 * S, "/api/v2/x").answer.unwrap();
        assert_eq!(kind, FaultKind::Reset);
        assert_eq!(until, Some(t0 + 8 * S));
        assert!(set.decide(t0 + 8 * S, "/api/v2/x").answer.is_none());
    }

    #[test]
    fn the_path_filter_and_rate_zero_keep_a_fault_off() {
        let set = FaultSet::default();
        let t0 = Instant::now();
        set.arm(
            Fault::new(FaultKind::Reset).on_path(PathTemplate::parse("/oauth/token").unwrap()),
            t0,
            t0,
        );
        set.arm(
            Fault::new(FaultKind::Outage429 {
                retry_after: Some(1),
            })
            .with_rate(0.0),
            t0,
            t0,
        );
        assert!(set.decide(t0, "/api/v2/x").answer.is_none());
        assert!(set.decide(t0, "/oauth/token").answer.is_some());
    }

    #[test]
    fn slow_faults_add_up_and_the_first_answering_fault_wins() {
        let set = FaultSet::default();
        let t0 = Instant::now();
        set.arm(Fault::new(FaultKind::Slow { delay: S }), t0, t0);
        set.arm(
            Fault::new(FaultKind::Status {
                status: FaultStatus::GatewayTimeout,
                retry_after: None,
            }),
            t0,
            t0,
        );
        set.arm(Fault::new(FaultKind::Slow { delay: 2 * S }), t0, t0);
        set.arm(Fault::new(FaultKind::Reset), t0, t0);
        let d = set.decide(t0, "/api/v2/users/presences/bulk");
        assert_eq!(
            d.extra_delay, S,
            "the slow fault after the answering one is not reached"
        );
        assert!(matches!(d.answer, Some((FaultKind::Status { .. }, None))));
    }

    #[test]
    fn a_partial_rate_hits_roughly_that_share() {
        let set = FaultSet::default();
        let t0 = Instant::now();
        set.arm(Fault::new(FaultKind::Reset).with_rate(0.5), t0, t0);
        let hits = (0..2000)
            .filter(|_| set.decide(t0, "/api/v2/x").answer.is_some())
            .count();
        assert!((800..1200).contains(&hits), "{hits} of 2000 at rate 0.5");
    }
}
