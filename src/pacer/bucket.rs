//! One bucket's pacing state: its GCRA schedule at the rate in force, its pause, the grants an
//! upstream 429 is measured against and, in cluster mode, its leased slots. Pure: every method
//! is a function of (state, now); what a 429 means comes from [`crate::throttle`].

use std::time::Duration;

use crate::budget::{Gcra, Limit, Nanos};
use crate::config::BudgetSpec;
use crate::shared_budget::{Lease, LeaseRequest, ThrottleRequest};
use crate::throttle::{self, Action, Adaptive, WindowLog};

use super::lease::{Leases, NEVER};

/// How late a release may be and still count as on time (timer granularity is 1 ms).
pub(super) const LATE_SLACK: Nanos = 2_000_000;

#[derive(Debug)]
pub(super) struct Bucket {
    gcra: Gcra,
    burst: u32,
    pub adaptive: Adaptive,
    pub paused_until: Nanos,
    /// What a 429 is measured against to learn the upstream's limit.
    window: WindowLog,
    /// In cluster mode: slots leased from the shared store (boxed: a keyed budget keeps many
    /// buckets, most never in cluster mode, and inline it would be half of each).
    pub shared: Option<Box<Leases>>,
    /// After a 429 whose limit may be another key's: one probe, then wait for its answer.
    hold: Option<Hold>,
}

/// A shared bucket waiting to learn whether a 429 was its own (see [`crate::throttle`]).
#[derive(Debug, Clone, Copy)]
struct Hold {
    since: Nanos,
    /// The hold ends by itself then, whatever the probe says.
    until: Nanos,
    /// The probe has been granted: the rest wait for its answer.
    probe_out: bool,
}

impl Bucket {
    pub fn new(spec: &BudgetSpec, guard: f64, shared: Option<Leases>) -> Bucket {
        Bucket {
            gcra: Gcra::default(),
            burst: spec.burst,
            adaptive: Adaptive::new(
                spec.rate.per_second * guard,
                spec.min_rate.per_second * guard,
            ),
            paused_until: 0,
            window: WindowLog::default(),
            shared: shared.map(Box::new),
            hold: None,
        }
    }

    fn leasing(&mut self) -> Option<&mut Leases> {
        self.shared.as_deref_mut().filter(|l| l.leasing)
    }

    /// Gives back a slot taken at `now` and not used.
    pub fn give_back(&mut self, now: Nanos) {
        // (It may have been the probe: let another go.)
        if let Some(h) = self.hold.as_mut() {
            h.probe_out = false;
        }
        if let Some(l) = self.leasing() {
            l.slots.push_front(now);
            return;
        }
        let limit = self.limit(now);
        self.gcra.give_back(now, &limit);
    }

    /// Takes one slot at `at`.
    pub fn take(&mut self, at: Nanos, now: Nanos) {
        if let Some(h) = self.hold.as_mut().filter(|h| now < h.until) {
            h.probe_out = true;
        }
        let limit = self.limit(now);
        if let Some(l) = self.leasing() {
            l.used(at);
            if l.divisor > 1.0 {
                self.gcra.take(at, &limit);
            }
            return;
        }
        self.gcra.take(at, &limit);
        self.window.record(at, self.paused_until);
    }

    pub fn limit(&self, now: Nanos) -> Limit {
        let divisor = self.shared.as_ref().map_or(1.0, |l| l.divisor);
        Limit::new(self.adaptive.rate(now) / divisor, self.burst)
    }

    /// Earliest time this bucket can grant one slot.
    pub fn ready_at(&self, now: Nanos) -> Nanos {
        // While its probe is out, a hold is a pause until `until` (a floor, as a pause is).
        let held = self
            .hold
            .filter(|h| h.probe_out)
            .map_or(self.paused_until, |h| h.until.max(self.paused_until));
        let local = self.gcra.earliest(&self.limit(now)).max(held);
        match self.shared.as_ref().filter(|l| l.leasing) {
            Some(l) => {
                let slot = l.slots.front().copied().unwrap_or(NEVER).max(held);
                // In the grace period after an outage, also within our own share.
                if l.divisor > 1.0 {
                    slot.max(local)
                } else {
                    slot
                }
            }
            None => local,
        }
    }

    pub fn conforms(&self, now: Nanos) -> bool {
        now >= self.ready_at(now)
    }

    /// Start of the request `ahead` places behind the current state (see [`Gcra::predict`]).
    /// While leasing, the local schedule is not where the slots come from: the prediction is
    /// the shared schedule's as leases showed it (see [`Leases::predict`]), so that admission
    /// does not count on the whole rate when other replicas take most of it.
    pub fn predict(&self, now: Nanos, ahead: u64) -> Nanos {
        let limit = self.limit(now);
        let local = self.gcra.predict(now, ahead, &limit).max(self.paused_until);
        match self.shared.as_ref().filter(|l| l.leasing) {
            Some(l) => {
                let whole = Limit::new(self.adaptive.rate(now), self.burst);
                let shared = l.predict(now, ahead, whole.interval).max(self.paused_until);
                if l.divisor > 1.0 {
                    shared.max(local)
                } else {
                    shared
                }
            }
            None => local,
        }
    }

    /// The lease this bucket should ask for now, with `waiting` requests on it.
    pub fn lease_needed(&mut self, waiting: usize, now: Nanos) -> Option<LeaseRequest> {
        let whole = Limit::new(self.adaptive.rate(now), self.burst);
        let l = self.shared.as_mut()?;
        l.needed(waiting, whole, now, now.saturating_sub(LATE_SLACK))
    }

    /// Fresh, unpaused, at its configured rate, no lease under way: can be forgotten.
    pub fn is_idle(&self, now: Nanos) -> bool {
        self.shared
            .as_ref()
            .is_none_or(|l| !l.fetching && l.slots.back().is_none_or(|&t| t < now))
            && self.gcra.is_idle(now)
            && self.paused_until <= now
            && self.hold.is_none_or(|h| h.until <= now)
            && self.adaptive.is_settled(now)
    }

    /// Nothing but its schedule keeps it from being idle: unpaused, at its configured rate, no
    /// hold, not leasing. Such a bucket becomes idle by itself within `burst` intervals.
    pub fn is_plain(&self, now: Nanos) -> bool {
        self.shared.is_none()
            && self.paused_until <= now
            && self.hold.is_none_or(|h| h.until <= now)
            && self.adaptive.is_settled(now)
    }

    /// Whether a hold is in force (or its probe still out).
    pub fn is_holding(&self, now: Nanos) -> bool {
        self.hold.is_some_and(|h| now < h.until)
    }

    /// A request granted at `granted` came back without a 429: a hold that began before it
    /// was granted ends (its limit was not this bucket's). Returns whether one ended.
    pub fn answered(&mut self, granted: Nanos) -> bool {
        let ends = self.hold.is_some_and(|h| granted >= h.since);
        if ends {
            self.hold = None;
        }
        ends
    }

    /// An upstream 429 on a request granted at `sent`, and what it does here (`action`, from
    /// [`throttle::plan`]): a pause learns from it, pauses, then lets one probe go; a hold lets
    /// one probe go and holds the rest for its answer. A 429 on the probe of a hold shows the
    /// limit is this bucket's: the hold becomes a pause. Returns whether the rate was lowered
    /// and, in cluster mode, what to tell the other replicas.
    pub fn throttle(
        &mut self,
        now: Nanos,
        sent: Nanos,
        retry_after: Option<Duration>,
        action: Action,
        guard: f64,
    ) -> (bool, Option<ThrottleRequest>) {
        let pause = match action {
            Action::Go => return (false, None),
            Action::Pause(pause) => pause,
            Action::Hold(pause) => match self.hold {
                Some(h) if h.probe_out && sent >= h.since => pause,
                _ => {
                    self.hold = Some(Hold {
                        since: now,
                        until: throttle::after(now, pause),
                        probe_out: false,
                    });
                    return (false, None);
                }
            },
        };
        self.hold = None;
        let until = throttle::after(now, pause);
        // A replica sees only its own share of what went through: nothing to learn from.
        let estimate = match self.shared {
            Some(_) => None,
            None => self.window.estimate(sent, retry_after).map(|r| r * guard),
        };
        let lowered = self.adaptive.throttled(now, sent, estimate);
        let tell = self.shared.as_ref().map(|l| ThrottleRequest {
            key: l.key.clone(),
            pause,
            tolerance: Duration::from_nanos(self.limit(now).tolerance),
            lowered: lowered.then(|| self.adaptive.state()),
        });
        if let Some(l) = self.shared.as_mut() {
            // Our own leased slots inside the pause are void.
            l.slots.retain(|&t| t >= until);
        }
        if until > self.paused_until {
            self.paused_until = until;
            let limit = self.limit(now);
            throttle::probe_after(&mut self.gcra, until, &limit);
        }
        (lowered, tell)
    }

    /// A lease from the store, whose answer is taken to have been given at `base`.
    pub fn apply_lease(&mut self, lease: &Lease, base: Nanos) {
        if let Some(a) = lease.adaptive {
            let at = base.saturating_sub(a.ago.as_nanos() as Nanos);
            self.adaptive.adopt(a.lowered, a.ceiling, at);
        }
        let paused = base.saturating_add(lease.paused_for.as_nanos() as Nanos);
        if lease.paused_for > Duration::ZERO && paused > self.paused_until {
            self.paused_until = paused;
        }
        let until = self.paused_until;
        let interval = Limit::new(self.adaptive.rate(base), self.burst).interval;
        if let Some(l) = self.shared.as_mut() {
            l.fetching = false;
            let slots: Vec<Nanos> = lease
                .slots
                .iter()
                .map(|d| base.saturating_add(d.as_nanos() as Nanos))
                .collect();
            l.learn(&slots, base, until, interval);
            l.slots.extend(slots.into_iter().filter(|&t| t >= until));
        }
    }

    /// The store is unreachable: pace locally at `1 / divisor` of the rate, after the slots
    /// already leased (they stay reserved in the store, so the two never overlap).
    pub fn store_down(&mut self, now: Nanos, divisor: f64) {
        if let Some(l) = self.shared.as_mut() {
            let last = l.slots.back().copied().unwrap_or(now);
            l.slots.clear();
            l.leasing = false;
            l.fetching = false;
            l.divisor = divisor;
            self.gcra.tat = self.gcra.tat.max(last);
        }
    }

    /// The store answers again: lease again, staying within our own share until `grace_until`.
    pub fn store_up(&mut self, grace_until: Nanos) {
        if let Some(l) = self.shared.as_mut() {
            l.leasing = true;
            l.grace_until = grace_until;
        }
    }

    /// A request granted here at `granted` left at `sent`. More than half an interval late (and
    /// more than [`LATE_SLACK`]), the schedule moves with it. Less late counts as on time: an
    /// upstream window it opens still sees at most one request over the rate, and moving the
    /// schedule would lose the time it was late, at every such request.
    pub fn sent_late(&mut self, granted: Nanos, sent: Nanos) {
        let limit = self.limit(sent);
        if sent.saturating_sub(granted) > (limit.interval / 2).max(LATE_SLACK) {
            self.gcra.tat = self.gcra.tat.max(sent + limit.interval);
        }
    }

    /// A new definition (reload): it keeps its place in time and takes the new rate at once.
    pub fn reconfigure(&mut self, spec: &BudgetSpec, guard: f64, now: Nanos) {
        let old = self.limit(now);
        self.burst = spec.burst;
        self.adaptive.reconfigure(
            spec.rate.per_second * guard,
            spec.min_rate.per_second * guard,
        );
        let new = self.limit(now);
        // The time still owed at the old rate is owed at the new one instead, so a slower rate
        // cannot keep those waiting for long after a faster one came.
        if self.gcra.tat > now && old.interval != new.interval {
            let owed = (self.gcra.tat - now) as f64 * new.interval as f64 / old.interval as f64;
            self.gcra.tat = now + owed as Nanos;
        }
    }
}
