//! Keyed buckets stay bounded: idle keys are forgotten as admissions and passes go by, a table
//! at `max_keys` evicts an idle key before a busy or paused one, a key with requests waiting is
//! never evicted, and an evicted key comes back as a fresh one. Time is the core's own `now`.
use super::*;
use crate::config::{Per, Rate};
use crate::route::Priority;
use crate::throttle::Action;

const MS: Nanos = 1_000_000;
const S: Nanos = 1_000_000_000;

/// One token budget at `rate`/s, burst 1, keeping at most `max_keys`.
fn queue(rate: f64, max_keys: usize) -> Queue<u64> {
    let spec = BudgetSpec {
        max_keys,
        ..BudgetSpec::new("tok", Rate::per_second(rate), 1, Per::Token)
    };
    Queue::new(&[spec], 10_000, Duration::from_millis(50))
}

fn key(n: u32) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&n.to_be_bytes());
    k
}

fn bucket(q: &Queue<u64>, n: u32) -> BucketKey {
    q.bucket_key("tok", Some(key(n)))
}

/// A request of token `n` at `now`, released at once when its bucket allows (a pass follows).
/// Returns its predicted wait.
fn arrive(q: &mut Queue<u64>, now: Nanos, n: u32) -> Duration {
    let demand = Demand {
        buckets: vec![bucket(q, n)],
        priority: Priority::Normal,
        max_wait: Duration::from_secs(3600),
        retry: false,
        not_after: None,
    };
    let id = q.next_id;
    let predicted = match q.admit(now, demand, None, id) {
        Ok(Admitted::Queued { predicted, .. }) => predicted,
        other => panic!("not queued: {other:?}"),
    };
    q.pass(now);
    predicted
}

fn has(q: &Queue<u64>, n: u32) -> bool {
    q.lanes.contains_key(&bucket(q, n))
}

/// A 429 on token `n`'s last grant: pauses it for `secs`.
fn pause(q: &mut Queue<u64>, now: Nanos, n: u32, secs: u64) {
    let plan = Plan {
        keyed: Action::Pause(Duration::from_secs(secs)),
        shared: Action::Go,
    };
    let b = bucket(q, n);
    q.throttle(&[b], None, plan, now, now);
}

#[test]
fn admissions_forget_idle_keys_as_fast_as_new_ones_come() {
    let mut q = queue(10.0, 100_000);
    for n in 0..1000 {
        arrive(&mut q, 0, n);
    }
    assert_eq!(q.keys("tok"), 1000);
    // 1 s on, every one of them would grant at full burst: forgetting them changes nothing.
    // Each admission of a new key forgets SWEEP_STEPS of them.
    for n in 1000..1100 {
        arrive(&mut q, S, n);
    }
    assert_eq!(q.keys("tok"), 1000 + 100 - 100 * SWEEP_STEPS);
}

#[test]
fn a_periodic_pass_forgets_idle_keys_when_no_one_arrives() {
    let mut q = queue(10.0, 100_000);
    for n in 0..3000 {
        arrive(&mut q, 0, n);
    }
    q.pass(SWEEP_EVERY);
    assert_eq!(q.keys("tok"), 3000 - SWEEP_BATCH);
    q.pass(2 * SWEEP_EVERY);
    q.pass(3 * SWEEP_EVERY);
    assert_eq!(q.keys("tok"), 0);
    assert!(q.tallies["tok"].ring.is_empty());
}

#[test]
fn a_full_table_evicts_an_idle_key_before_a_busy_or_paused_one() {
    let mut q = queue(1.0, 3);
    arrive(&mut q, 0, 1); // paused below: not idle for a minute
    pause(&mut q, 0, 1, 60);
    arrive(&mut q, 100 * MS, 2); // idle from 1.1 s
    arrive(&mut q, 5 * S, 3); // busy until 6 s
    arrive(&mut q, 5 * S + MS, 4);
    assert!(has(&q, 1) && !has(&q, 2) && has(&q, 3) && has(&q, 4));
    assert_eq!(q.keys("tok"), 3);
}

#[test]
fn with_no_idle_key_the_least_recently_used_busy_one_goes_and_a_paused_one_last() {
    let mut q = queue(1.0, 3);
    arrive(&mut q, 0, 1);
    pause(&mut q, 0, 1, 60);
    arrive(&mut q, MS, 2);
    arrive(&mut q, 2 * MS, 3);
    // all busy: 2 is the least recently used of those merely busy
    arrive(&mut q, 3 * MS, 4);
    assert!(has(&q, 1) && !has(&q, 2) && has(&q, 3) && has(&q, 4));
    arrive(&mut q, 4 * MS, 5);
    assert!(has(&q, 1) && !has(&q, 3) && has(&q, 4) && has(&q, 5));
    assert_eq!(q.keys("tok"), 3);
}

#[test]
fn a_key_with_requests_waiting_is_never_evicted() {
    let mut q = queue(1.0, 2);
    // two requests each: the second of each waits a second
    for n in [1, 2] {
        arrive(&mut q, 0, n);
        arrive(&mut q, 0, n);
    }
    assert_eq!(q.depth(), 2);
    // a third key finds only keys with someone waiting: it is served, and dropped by the same
    // pass (the one bucket no one waits on)
    let mut demand = Demand {
        buckets: vec![bucket(&q, 3)],
        priority: Priority::Normal,
        max_wait: Duration::from_secs(3600),
        retry: false,
        not_after: None,
    };
    assert!(matches!(
        q.admit(MS, demand.clone(), None, 99),
        Ok(Admitted::Queued { .. })
    ));
    assert_eq!(q.keys("tok"), 3);
    let p = q.pass(MS);
    assert_eq!(p.released.len(), 1);
    assert!(has(&q, 1) && has(&q, 2) && !has(&q, 3));
    // those waiting were served in their turn
    q.pass(S);
    assert_eq!(q.depth(), 0);
    assert!(has(&q, 1) && has(&q, 2));
    demand.buckets = vec![bucket(&q, 4)];
    assert!(q.admit(3 * S, demand, None, 100).is_ok());
    q.pass(3 * S);
    // (1 and 2 are idle by now: that admission's sweep forgot them)
    assert!(has(&q, 4) && q.keys("tok") <= 2);
}

#[test]
fn max_keys_holds_under_ten_times_as_many_rotating_keys() {
    let mut q = queue(5.0, 100);
    let mut now = 0;
    for round in 0..10u32 {
        for n in 0..100 {
            arrive(&mut q, now, round * 100 + n);
            assert!(q.keys("tok") <= 100);
            now += MS;
        }
    }
    assert_eq!(q.keys("tok"), 100);
    // the ring holds no more than a live entry per key plus bounded garbage
    assert!(q.tallies["tok"].ring.len() <= 2 * 100 + 64);
}

#[test]
fn an_evicted_key_comes_back_as_a_fresh_one() {
    let mut q = queue(1.0, 2);
    assert_eq!(arrive(&mut q, 0, 1), Duration::ZERO);
    // a second request of key 1 now would wait a second
    assert_eq!(arrive(&mut q, 0, 1), Duration::from_secs(1));
    q.pass(S);
    arrive(&mut q, S + MS, 2);
    arrive(&mut q, S + 2 * MS, 3); // evicts key 1 (busy until 2 s)
    assert!(!has(&q, 1));
    // like any new key: its first request goes at once
    assert_eq!(arrive(&mut q, S + 3 * MS, 1), Duration::ZERO);
}

#[test]
fn the_view_comes_from_tallies_and_forgets_recovered_rates() {
    let mut q = queue(10.0, 100);
    for n in 0..5 {
        arrive(&mut q, 0, n);
    }
    arrive(&mut q, 0, 0); // waits 100 ms
    pause(&mut q, 0, 3, 20);
    let v = &q.view(S / 20)[0];
    assert_eq!((v.keys, v.waiting), (5, 1));
    assert_eq!(v.paused_for, Duration::from_nanos(20 * S - S / 20));
    assert!(v.rate_in_force < 10.0);
    assert_eq!(q.tallies["tok"].lowered.len(), 1);
    // long after, the rate is back and the lowered bucket is no longer visited
    let v = &q.view(1000 * S)[0];
    assert_eq!((v.rate_in_force, v.paused_for), (10.0, Duration::ZERO));
    assert!(q.tallies["tok"].lowered.is_empty());
}

#[test]
fn a_reload_to_a_smaller_max_keys_trims_the_table_over_the_next_passes() {
    let mut q = queue(1.0, 5000);
    for n in 0..3000 {
        arrive(&mut q, 0, n);
    }
    let smaller = BudgetSpec {
        max_keys: 100,
        ..BudgetSpec::new("tok", Rate::per_second(1.0), 1, Per::Token)
    };
    q.update(&[smaller], 10_000, Duration::from_millis(50), MS);
    // busy keys all: the least recently used go, SWEEP_BATCH per pass
    q.pass(MS);
    assert_eq!(q.keys("tok"), 3000 - SWEEP_BATCH);
    q.pass(2 * MS);
    q.pass(3 * MS);
    assert_eq!(q.keys("tok"), 100);
    // the newest were kept
    assert!(has(&q, 2999) && !has(&q, 2899));
}
