//! Property tests of the queue's decisions, driven like the scheduler drives them: after
//! each arrival or departure, and at every wake-up it asks for while the clock steps on.
//! (Given-back slots and throttles are not drawn: they only ever delay the next grant and
//! have unit tests of their own.)
use super::*;
use crate::config::{Per, Rate};
use crate::route::Priority;
use proptest::prelude::*;

const MS: Nanos = 1_000_000;
const AGING: Nanos = 50 * MS;

fn spec(name: &str, rate: f64, burst: u32, per: Per) -> BudgetSpec {
    BudgetSpec::new(name, Rate::per_second(rate), burst, per)
}

#[derive(Debug, Clone)]
enum Op {
    /// A request on the budgets in `mask` (bit 0: "fast", 1: "slow", 2: the token budget,
    /// keyed by `token` modulo the test's number of tokens), of priority `level`, maybe a
    /// retry with a deadline.
    Arrive {
        mask: u8,
        token: u8,
        level: u8,
        retry: Option<u16>,
    },
    /// The `n`-th request still waiting leaves.
    Leave(usize),
    /// The clock moves on by this many microseconds.
    Step(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..8, 0u8..12, 0u8..3, proptest::option::weighted(0.2, 1u16..2000))
            .prop_map(|(mask, token, level, retry)| Op::Arrive { mask, token, level, retry }),
        1 => (0usize..50).prop_map(Op::Leave),
        3 => (0u32..300_000).prop_map(Op::Step),
    ]
}

struct Waiting {
    order: OrderKey,
    buckets: Vec<BucketKey>,
    not_after: Option<Nanos>,
}

/// The harness: the queue, its clock, and everything it released.
struct Run {
    q: Queue<u64>,
    now: Nanos,
    waiting: HashMap<u64, Waiting>,
    /// Grant times per bucket and life of the bucket (a bucket forgotten and made again is a
    /// new life: an evicted key starts afresh).
    grants: HashMap<(BucketKey, u32), Vec<Nanos>>,
    lives: HashMap<BucketKey, u32>,
    /// Buckets the queue held after the last step.
    present: HashSet<BucketKey>,
    wake: Option<Nanos>,
}

impl Run {
    /// One pass at `now`, checking each release against what was waiting.
    fn pass(&mut self) -> Result<(), TestCaseError> {
        let p = self.q.pass(self.now);
        for r in p.released {
            let w = self.waiting.remove(&r.id).expect("released once");
            prop_assert_eq!(r.payload, r.id);
            // every bucket of its route, at once
            prop_assert_eq!(&r.buckets, &w.buckets);
            prop_assert!(r.taken_at <= self.now && r.taken_at >= r.arrived);
            for b in &r.buckets {
                let life = self.lives.get(b).copied().unwrap_or(0);
                self.grants
                    .entry((b.clone(), life))
                    .or_default()
                    .push(r.taken_at);
            }
            // never past its own deadline
            if let Some(t) = w.not_after {
                prop_assert!(r.taken_at < t, "released at {} past {}", r.taken_at, t);
            }
            // nobody with the same buckets and an earlier place still waits: FIFO within
            // a priority, and aging bounds how far a higher priority may pass
            for (id, other) in &self.waiting {
                if other.buckets == w.buckets && self.q.waiters.contains_key(id) {
                    prop_assert!(
                        other.order > w.order,
                        "{:?} passed {:?}",
                        w.order,
                        other.order
                    );
                }
            }
        }
        // retries past their deadline are gone
        self.waiting.retain(|id, _| self.q.waiters.contains_key(id));
        for w in self.q.waiters.values() {
            prop_assert!(w.not_after.is_none_or(|t| t > self.now));
        }
        self.wake = p.wake;
        self.track_lives();
        Ok(())
    }

    /// Notes the buckets the queue forgot since the last step: their next grants are a new life.
    fn track_lives(&mut self) {
        let lanes = &self.q.lanes;
        for gone in self.present.iter().filter(|k| !lanes.contains_key(*k)) {
            *self.lives.entry(gone.clone()).or_default() += 1;
        }
        self.present = lanes.keys().cloned().collect();
    }

    /// The token budget's table stays within `max_keys`, or over it only by keys that have
    /// requests waiting (plus the one just made for a request that was then queued).
    fn check_keys(&self, max_keys: usize) -> Result<(), TestCaseError> {
        let keys = self.q.keys("tok");
        let lanes: Vec<&Lane> = self
            .q
            .lanes
            .iter()
            .filter(|(k, _)| k.key.is_some())
            .map(|(_, l)| l)
            .collect();
        prop_assert_eq!(keys, lanes.len());
        let waited_on = lanes.iter().filter(|l| !l.waiting.is_empty()).count();
        prop_assert!(
            keys <= max_keys || keys <= waited_on + 1,
            "{} keys, max {}, {} waited on",
            keys,
            max_keys,
            waited_on
        );
        let waiting: usize = lanes.iter().map(|l| l.waiting.len()).sum();
        prop_assert_eq!(self.q.tallies.get("tok").map_or(0, |t| t.waiting), waiting);
        Ok(())
    }
}

/// 64 cases in CI (each runs up to 300 operations); `PROPTEST_CASES` overrides it. A long run:
/// `PROPTEST_CASES=20000 cargo test --release --lib pacer::queue`.
fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases()))]

    #[test]
    fn the_queue_keeps_rates_order_and_deadlines(ops in proptest::collection::vec(op(), 1..300)) {
        drive(ops, 3, 100_000)?;
    }

    /// Many more tokens than `max_keys`: the table stays bounded, and rates, order and
    /// deadlines hold as before (each bucket's rate within each of its lives).
    #[test]
    fn a_keyed_table_stays_within_max_keys(ops in proptest::collection::vec(op(), 1..300)) {
        drive(ops, 12, 3)?;
    }

    /// On one budget, requests of one priority start no later than predicted on arrival,
    /// which admission held to `max_wait`: nobody waits past the deadline it was admitted
    /// with, however the others come and go.
    #[test]
    fn nobody_waits_past_its_admitted_deadline(
        rate in 1.0f64..500.0,
        burst in 1u32..5,
        ops in proptest::collection::vec(op(), 1..300),
    ) {
        let mut q: Queue<u64> = Queue::new(&[spec("g", rate, burst, Per::Global)], 10_000, Duration::from_nanos(AGING));
        let mut now: Nanos = 0;
        let mut deadline: HashMap<u64, Nanos> = HashMap::new();
        let mut wake = None;
        fn check(
            q: &mut Queue<u64>,
            now: Nanos,
            deadline: &mut HashMap<u64, Nanos>,
        ) -> Result<Option<Nanos>, TestCaseError> {
            let p = q.pass(now);
            for r in p.released {
                let d = deadline.remove(&r.id).expect("admitted");
                prop_assert!(r.taken_at <= d, "started at {} after its deadline {}", r.taken_at, d);
            }
            Ok(p.wake)
        }
        for op in ops {
            match op {
                Op::Arrive { .. } => {
                    let demand = Demand {
                        buckets: vec![q.bucket_key("g", None)],
                        priority: Priority::Normal,
                        max_wait: Duration::from_secs(5),
                        retry: false,
                        not_after: None,
                    };
                    let id = q.next_id;
                    match q.admit(now, demand, None, id) {
                        Ok(Admitted::Queued { predicted, .. }) => {
                            prop_assert!(predicted <= Duration::from_secs(5));
                            deadline.insert(id, now + predicted.as_nanos() as Nanos);
                        }
                        Err(Rejection::TooLong { wait }) => prop_assert!(wait > Duration::from_secs(5)),
                        other => prop_assert!(false, "{:?}", other),
                    }
                }
                Op::Leave(n) => {
                    let mut ids: Vec<u64> = q.waiters.keys().copied().collect();
                    ids.sort();
                    if let Some(&id) = ids.get(n % ids.len().max(1)) {
                        q.cancel(id);
                    }
                }
                Op::Step(us) => {
                    let target = now + u64::from(us) * 1000;
                    while let Some(w) = wake.filter(|&w| w > now && w <= target) {
                        now = w;
                        wake = check(&mut q, now, &mut deadline)?;
                    }
                    now = target;
                }
            }
            wake = check(&mut q, now, &mut deadline)?;
        }
    }
}

/// Drives the queue through `ops` with `tokens` distinct tokens and the token budget keeping at
/// most `max_keys`, checking every pass (see [`Run::pass`]), the token table after every step,
/// and at the end that no bucket granted more than its rate allows.
fn drive(ops: Vec<Op>, tokens: u8, max_keys: usize) -> Result<(), TestCaseError> {
    let specs = [
        spec("fast", 200.0, 3, Per::Global),
        spec("slow", 20.0, 1, Per::Global),
        BudgetSpec {
            max_keys,
            ..spec("tok", 10.0, 2, Per::Token)
        },
    ];
    let mut run = Run {
        q: Queue::new(&specs, 10_000, Duration::from_nanos(AGING)),
        now: 0,
        waiting: HashMap::new(),
        grants: HashMap::new(),
        lives: HashMap::new(),
        present: HashSet::new(),
        wake: None,
    };
    for op in ops {
        match op {
            Op::Arrive {
                mask,
                token,
                level,
                retry,
            } => {
                let names = ["fast", "slow", "tok"];
                let buckets: Vec<BucketKey> = (0..3)
                    .filter(|i| mask & (1 << i) != 0)
                    .map(|i| {
                        run.q
                            .bucket_key(names[i], (i == 2).then_some([token % tokens; 16]))
                    })
                    .collect();
                let priority = [Priority::High, Priority::Normal, Priority::Low][level as usize];
                let not_after = retry.map(|ms| run.now + u64::from(ms) * MS);
                let demand = Demand {
                    buckets,
                    priority,
                    max_wait: Duration::from_secs(3600),
                    retry: retry.is_some(),
                    not_after: None,
                };
                let id = run.q.next_id;
                match run.q.admit(run.now, demand, not_after, id) {
                    Ok(Admitted::Queued { id: got, .. }) => {
                        prop_assert_eq!(got, id);
                        let w = &run.q.waiters[&id];
                        run.waiting.insert(
                            id,
                            Waiting {
                                order: w.order,
                                buckets: w.buckets.clone(),
                                not_after,
                            },
                        );
                    }
                    other => prop_assert!(false, "not queued: {:?}", other),
                }
            }
            Op::Leave(n) => {
                let mut ids: Vec<u64> = run.waiting.keys().copied().collect();
                ids.sort();
                if let Some(&id) = ids.get(n % ids.len().max(1)) {
                    prop_assert!(run.q.cancel(id));
                    run.waiting.remove(&id);
                }
            }
            Op::Step(us) => {
                let target = run.now + u64::from(us) * 1000;
                // the scheduler wakes when asked to, until the step is over
                for _ in 0..10_000 {
                    match run.wake {
                        Some(w) if w > run.now && w <= target => {
                            run.now = w;
                            run.pass()?;
                        }
                        _ => break,
                    }
                }
                run.now = target;
            }
        }
        run.pass()?;
        run.check_keys(max_keys)?;
    }
    // No bucket ever granted more than burst + rate·t in any window of length t.
    for ((key, _), mut times) in run.grants {
        let s = specs.iter().find(|s| *s.name == *key.budget).unwrap();
        times.sort();
        for i in 0..times.len() {
            for j in i..times.len() {
                let t = (times[j] - times[i]) as f64 / 1e9;
                let allowed = f64::from(s.burst) + s.rate.per_second * t;
                prop_assert!(
                    ((j - i + 1) as f64) <= allowed + 1e-6 * (j - i + 1) as f64,
                    "{}: {} grants in {} s",
                    key.budget,
                    j - i + 1,
                    t
                );
            }
        }
    }
    Ok(())
}
