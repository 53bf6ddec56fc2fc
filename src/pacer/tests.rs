//! The pacer handle's tests, on paused time: rates, order, admission, cancellation, throttles,
//! reloads and replicas sharing a store.
use super::*;
use crate::config::{Per, Rate};
use crate::throttle::{self, Action, Scope};
use std::collections::HashMap;

/// A plan that pauses every bucket for `d` (a 429 of a shared limit).
fn pause_all(d: Duration) -> Plan {
    Plan {
        keyed: Action::Pause(d),
        shared: Action::Pause(d),
    }
}

fn spec(name: &str, rate: f64, burst: u32, per: Per) -> BudgetSpec {
    BudgetSpec::new(name, Rate::per_second(rate), burst, per)
}

/// A pacer with one budget: `depth` waiters at most, `aging_s` seconds of aging.
fn one_budget(name: &str, rate: f64, burst: u32, per: Per, depth: usize, aging_s: u64) -> Pacer {
    Pacer::new(
        &[spec(name, rate, burst, per)],
        depth,
        Duration::from_secs(aging_s),
    )
}

fn demand(p: &Pacer, buckets: &[(&str, Option<u8>)], priority: Priority) -> Demand {
    Demand {
        buckets: buckets
            .iter()
            .map(|(b, k)| p.bucket_key(b, k.map(|k| [k; 16])))
            .collect(),
        priority,
        max_wait: Duration::from_secs(3600),
        retry: false,
        not_after: None,
    }
}

/// Spawns a waiter that reports (label, grant time since `t0`) when released.
fn spawn_waiter(
    mut ticket: Ticket,
    label: usize,
    t0: Instant,
    out: tokio::sync::mpsc::UnboundedSender<(usize, Duration)>,
) {
    tokio::spawn(async move {
        if let Ok(g) = ticket.granted().await {
            out.send((label, g.at - t0)).unwrap();
            g.commit();
        }
    });
}

#[tokio::test(start_paused = true)]
async fn a_burst_is_released_at_the_configured_rate_in_fifo_order() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..20 {
        let t = p
            .admit(demand(&p, &[("g", None)], Priority::Normal))
            .unwrap();
        spawn_waiter(t, i, t0, tx.clone());
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some(x) = rx.recv().await {
        got.push(x);
    }
    assert_eq!(got.len(), 20);
    for (i, (label, at)) in got.iter().enumerate() {
        assert_eq!(*label, i, "FIFO");
        // one every 100 ms, the first at once
        assert_eq!(at.as_millis(), 100 * i as u128);
    }
}

#[tokio::test(start_paused = true)]
async fn waiting_for_one_budget_does_not_burn_a_slot_of_another() {
    // "slow" allows 1/s, "fast" 100/s. A request needs both; it waits on slow. Meanwhile
    // requests that need only fast must keep fast's full rate.
    let p = Pacer::new(
        &[
            spec("slow", 1.0, 1, Per::Global),
            spec("fast", 100.0, 1, Per::Global),
        ],
        1000,
        Duration::from_secs(10),
    );
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // first takes slow's only slot for the next second
    let mut first = p
        .admit(demand(&p, &[("slow", None)], Priority::Normal))
        .unwrap();
    first.granted().await.unwrap().commit();
    let both = p
        .admit(demand(
            &p,
            &[("fast", None), ("slow", None)],
            Priority::Normal,
        ))
        .unwrap();
    spawn_waiter(both, 999, t0, tx.clone());
    for i in 0..50 {
        let t = p
            .admit(demand(&p, &[("fast", None)], Priority::Normal))
            .unwrap();
        spawn_waiter(t, i, t0, tx.clone());
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some(x) = rx.recv().await {
        got.push(x);
    }
    let fast_only: Vec<_> = got.iter().filter(|(l, _)| *l != 999).collect();
    // 50 fast-only requests in 490 ms: fast was never held by the waiter on slow.
    assert_eq!(fast_only.len(), 50);
    assert_eq!(fast_only.last().unwrap().1.as_millis(), 490);
    // The stacked request went when slow allowed it (1 s), taking one fast slot then.
    let stacked = got.iter().find(|(l, _)| *l == 999).unwrap();
    assert_eq!(stacked.1.as_millis(), 1000);
}

#[tokio::test(start_paused = true)]
async fn an_exhausted_token_does_not_hold_back_the_shared_budget() {
    let p = Pacer::new(
        &[
            spec("shared", 100.0, 1, Per::Global),
            spec("tok", 1.0, 1, Per::Token),
        ],
        1000,
        Duration::from_secs(10),
    );
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // token 1 sends 3: the 2nd and 3rd wait 1 s and 2 s on its own bucket.
    for i in 0..3 {
        let t = p
            .admit(demand(
                &p,
                &[("shared", None), ("tok", Some(1))],
                Priority::Normal,
            ))
            .unwrap();
        spawn_waiter(t, i, t0, tx.clone());
    }
    // tokens 2..=11 send one each and must not wait behind token 1.
    for k in 2..12u8 {
        let t = p
            .admit(demand(
                &p,
                &[("shared", None), ("tok", Some(k))],
                Priority::Normal,
            ))
            .unwrap();
        spawn_waiter(t, 100 + k as usize, t0, tx.clone());
    }
    drop(tx);
    let mut got = HashMap::new();
    while let Some((l, at)) = rx.recv().await {
        got.insert(l, at.as_millis());
    }
    assert_eq!(got[&0], 0);
    assert_eq!(got[&1], 1000);
    assert_eq!(got[&2], 2000);
    let others: Vec<u128> = (2..12).map(|k| got[&(100 + k)]).collect();
    // released at the shared budget's pace right away: 10, 20, ..., 100 ms
    assert_eq!(others, (1..=10).map(|i| i * 10).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn priority_goes_first_and_aging_prevents_starvation() {
    // 1/s, aging 1 s per level: a low request is 2 s behind a high one of the same arrival.
    let p = one_budget("g", 1.0, 1, Per::Global, 1000, 1);
    let t0 = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    // hold the bucket until 1 s so that all of these queue
    p.admit(demand(&p, &[("g", None)], Priority::Normal))
        .unwrap()
        .granted()
        .await
        .unwrap()
        .commit();
    for (label, prio) in [
        (0, Priority::Low),
        (1, Priority::Normal),
        (2, Priority::High),
    ] {
        spawn_waiter(
            p.admit(demand(&p, &[("g", None)], prio)).unwrap(),
            label,
            t0,
            tx.clone(),
        );
    }
    // A high one at 1.5 s still passes the low one (1.5 < 0 + 2) ...
    tokio::time::sleep_until(t0 + Duration::from_millis(1500)).await;
    spawn_waiter(
        p.admit(demand(&p, &[("g", None)], Priority::High)).unwrap(),
        10,
        t0,
        tx.clone(),
    );
    // ... but those at 2.5 s do not: the low one has aged past them.
    tokio::time::sleep_until(t0 + Duration::from_millis(2500)).await;
    for label in [11, 12] {
        spawn_waiter(
            p.admit(demand(&p, &[("g", None)], Priority::High)).unwrap(),
            label,
            t0,
            tx.clone(),
        );
    }
    drop(tx);
    let mut got = Vec::new();
    while let Some((l, at)) = rx.recv().await {
        got.push((l, at.as_millis()));
    }
    assert_eq!(
        got,
        vec![
            (2, 1000),
            (1, 2000),
            (10, 3000),
            (0, 4000),
            (11, 5000),
            (12, 6000)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn admission_predicts_the_wait_and_refuses_what_cannot_start_in_time() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let mut d = demand(&p, &[("g", None)], Priority::Normal);
    d.max_wait = Duration::from_millis(450);
    let mut tickets = Vec::new();
    for i in 0..5 {
        let t = p.admit(d.clone()).unwrap();
        assert_eq!(t.predicted, Duration::from_millis(100 * i));
        tickets.push(t);
    }
    // the 6th would start at 500 ms > 450 ms
    match p.admit(d.clone()) {
        Err(Rejection::TooLong { wait }) => assert_eq!(wait, Duration::from_millis(500)),
        other => panic!("expected a rejection, got {other:?}"),
    }
    assert_eq!(p.depth(), 4, "the first went at once");
}

#[tokio::test(start_paused = true)]
async fn the_queue_has_a_maximum_depth() {
    let p = one_budget("g", 1.0, 1, Per::Global, 3, 10);
    let d = demand(&p, &[("g", None)], Priority::Normal);
    let _t: Vec<Ticket> = (0..4).map(|_| p.admit(d.clone()).unwrap()).collect();
    assert_eq!(p.depth(), 3);
    assert!(matches!(p.admit(d), Err(Rejection::Full { depth: 3, .. })));
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_and_its_slot_goes_to_the_next() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    p.admit(d.clone())
        .unwrap()
        .granted()
        .await
        .unwrap()
        .commit();
    let leaving = p.admit(d.clone()).unwrap();
    let mut staying = p.admit(d.clone()).unwrap();
    assert_eq!(p.depth(), 2);
    drop(leaving);
    assert_eq!(p.depth(), 1);
    let g = staying.granted().await.unwrap();
    assert_eq!(
        (g.at - t0).as_millis(),
        100,
        "took the slot the leaver would have had"
    );
}

#[tokio::test(start_paused = true)]
async fn a_grant_dropped_unused_gives_its_slot_back() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
    drop(g); // not committed: never sent
    let g2 = p.admit(d).unwrap().granted().await.unwrap();
    assert_eq!((g2.at - t0).as_millis(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_throttle_pauses_the_bucket_for_everyone_then_one_probe_then_the_lower_rate() {
    let p = one_budget("g", 10.0, 5, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
    let buckets = g.buckets.clone();
    g.commit();
    let lowered = p.throttle(
        &buckets,
        Some(Duration::from_secs(2)),
        pause_all(Duration::from_secs(2)),
        t0,
    );
    assert_eq!(lowered, vec!["g".to_string()]);
    // nothing could be learned from one request: × 0.7
    assert_eq!(p.view()[0].rate_in_force, 7.0);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
    }
    drop(tx);
    let mut at = Vec::new();
    while let Some((_, t)) = rx.recv().await {
        at.push(t.as_millis());
    }
    // nothing during the pause, no burst after it (burst is 5): the probe at 2 s, then
    // about 1/7 s apart (the rate starts to recover 2 s after the decrease, and the
    // burst tolerance shrinks with the interval, so a little more)
    assert_eq!(at[0], 2000);
    for w in at.windows(2) {
        assert!((130..=160).contains(&(w[1] - w[0])), "{at:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_left_late_moves_the_schedule_with_it() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
    // granted at 0, but it only left at 250 ms
    p.sent(&g.buckets, g.at, t0 + Duration::from_millis(250));
    g.commit();
    let next = p.admit(d).unwrap().granted().await.unwrap();
    assert_eq!(
        (next.at - t0).as_millis(),
        350,
        "one interval after it really left"
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_less_late_than_half_an_interval_leaves_the_schedule_alone() {
    // 10/s: an interval of 100 ms. Left 40 ms late, it is on time; 60 ms late, it is not.
    for (late, next) in [(40, 100), (60, 160)] {
        let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
        let t0 = Instant::now();
        let d = demand(&p, &[("g", None)], Priority::Normal);
        let g = p.admit(d.clone()).unwrap().granted().await.unwrap();
        p.sent(&g.buckets, g.at, t0 + Duration::from_millis(late));
        g.commit();
        let n = p.admit(d).unwrap().granted().await.unwrap();
        assert_eq!((n.at - t0).as_millis(), next, "left {late} ms late");
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_goes_to_the_head_of_the_queue() {
    let p = one_budget("g", 10.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    p.admit(d.clone())
        .unwrap()
        .granted()
        .await
        .unwrap()
        .commit();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..3 {
        spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
    }
    let mut r = d.clone();
    r.retry = true;
    spawn_waiter(p.admit(r).unwrap(), 99, t0, tx.clone());
    drop(tx);
    let first = rx.recv().await.unwrap();
    assert_eq!(first, (99, Duration::from_millis(100)));
}

#[tokio::test(start_paused = true)]
async fn a_reload_applies_new_rates_to_those_already_waiting() {
    let p = one_budget("g", 1.0, 1, Per::Global, 1000, 10);
    let t0 = Instant::now();
    let d = demand(&p, &[("g", None)], Priority::Normal);
    p.admit(d.clone())
        .unwrap()
        .granted()
        .await
        .unwrap()
        .commit();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for i in 0..5 {
        spawn_waiter(p.admit(d.clone()).unwrap(), i, t0, tx.clone());
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(10)).await;
    p.update(
        &[spec("g", 100.0, 1, Per::Global)],
        1000,
        Duration::from_secs(10),
    );
    let mut at = Vec::new();
    while let Some((_, t)) = rx.recv().await {
        at.push(t.as_millis());
    }
    // the 990 ms still owed at 1/s became 9.9 ms at 100/s (released at 19.9 ms); then 10 ms apart
    assert_eq!(at, vec![19, 29, 39, 49, 59]);
}

/// Three replicas' pacers sharing one store; `waiters[i]` requests queue on replica i at
/// once. Returns every grant time (since start) with its replica.
async fn run_replicas(
    store: Arc<crate::shared_budget::MemoryStore>,
    budget: BudgetSpec,
    waiters: [usize; 3],
    during: impl FnOnce(Vec<Pacer>) -> tokio::task::JoinHandle<()>,
) -> Vec<(usize, Duration)> {
    let t0 = Instant::now();
    let pacers: Vec<Pacer> = (0..3)
        .map(|_| {
            Pacer::new(
                std::slice::from_ref(&budget),
                10_000,
                Duration::from_secs(10),
            )
            .with_store(store.clone(), "test:", 3)
        })
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for (i, p) in pacers.iter().enumerate() {
        for _ in 0..waiters[i] {
            let t = p
                .admit(demand(p, &[(budget.name.as_str(), None)], Priority::Normal))
                .unwrap();
            spawn_waiter(t, i, t0, tx.clone());
        }
    }
    drop(tx);
    let side = during(pacers.clone());
    let mut got = Vec::new();
    while let Some(x) = rx.recv().await {
        got.push(x);
    }
    side.abort();
    got.sort_by_key(|(_, at)| *at);
    got
}

fn max_in_window(grants: &[(usize, Duration)], window: Duration) -> usize {
    (0..grants.len())
        .map(|i| {
            grants[i..]
                .iter()
                .take_while(|(_, t)| *t < grants[i].1 + window)
                .count()
        })
        .max()
        .unwrap_or(0)
}

#[tokio::test(start_paused = true)]
async fn replicas_sharing_a_store_stay_within_the_budget_together() {
    let store = Arc::new(crate::shared_budget::MemoryStore::default());
    // 60/s shared; load split 60/30/10 % over three replicas
    let grants = run_replicas(
        store.clone(),
        spec("g", 60.0, 1, Per::Global),
        [180, 90, 30],
        |_| tokio::spawn(async {}),
    )
    .await;
    assert_eq!(grants.len(), 300);
    assert!(max_in_window(&grants, Duration::from_secs(1)) <= 61);
    let done = grants.last().unwrap().1;
    // ideal: 300 / 60 = 5 s
    assert!(done <= Duration::from_millis(5_500), "{done:?}");
    // leases, not a store call per request
    assert!(
        store.calls() < 150,
        "{} store calls for 300 requests",
        store.calls()
    );
}

#[tokio::test(start_paused = true)]
async fn without_the_store_each_replica_keeps_its_share_and_shares_again_when_it_is_back() {
    let store = Arc::new(crate::shared_budget::MemoryStore::default());
    let s2 = store.clone();
    let grants = run_replicas(
        store.clone(),
        spec("g", 30.0, 1, Per::Global),
        [60, 60, 60],
        move |pacers| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                s2.set_down(true);
                tokio::time::sleep(Duration::from_secs(2)).await;
                assert_eq!(pacers[0].store_status().map(|s| s.0), Some(false));
                s2.set_down(false);
            })
        },
    )
    .await;
    assert_eq!(grants.len(), 180, "nothing failed because of the store");
    // While down (1.5 s .. 3 s): each replica at 10/s, together 30/s.
    let during: Vec<_> = grants
        .iter()
        .filter(|(_, t)| *t >= Duration::from_millis(1500) && *t < Duration::from_millis(3000))
        .collect();
    for r in 0..3 {
        let n = during.iter().filter(|(i, _)| *i == r).count();
        assert!(
            (13..=17).contains(&n),
            "replica {r}: {n} grants in 1.5 s at 10/s"
        );
    }
    assert!(max_in_window(&grants, Duration::from_secs(1)) <= 33);
}

#[tokio::test(start_paused = true)]
async fn a_throttle_seen_by_one_replica_pauses_the_others() {
    let store = Arc::new(crate::shared_budget::MemoryStore::default());
    let grants = run_replicas(
        store.clone(),
        spec("g", 50.0, 1, Per::Global),
        [50, 50, 50],
        |pacers| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let key = pacers[0].bucket_key("g", None);
                pacers[0].throttle(
                    &[key],
                    Some(Duration::from_secs(2)),
                    pause_all(Duration::from_secs(2)),
                    Instant::now(),
                );
            })
        },
    )
    .await;
    // From 1 s to 3 s, only slots leased before the throttle (at most one horizon's worth
    // per replica) may still be used.
    let paused: Vec<_> = grants
        .iter()
        .filter(|(_, t)| *t > Duration::from_millis(1000) && *t < Duration::from_millis(3000))
        .collect();
    assert!(
        paused.len() <= 6,
        "{} grants during the pause: {paused:?}",
        paused.len()
    );
    assert_eq!(grants.len(), 150);
}

#[tokio::test(start_paused = true)]
async fn idle_keyed_buckets_are_forgotten() {
    let p = one_budget("tok", 100.0, 1, Per::Token, 1000, 10);
    for k in 0..200u8 {
        let d = demand(&p, &[("tok", Some(k))], Priority::Normal);
        p.admit(d).unwrap().granted().await.unwrap().commit();
    }
    assert_eq!(p.view()[0].keys, 200);
    tokio::time::sleep(Duration::from_secs(11)).await;
    // any pass after the sweep interval drops them
    let d = demand(&p, &[("tok", Some(0))], Priority::Normal);
    p.admit(d).unwrap().granted().await.unwrap().commit();
    assert!(p.view()[0].keys <= 1);
}

/// The presence route of the shipped config: a shared budget and a per-token one.
fn shared_and_token() -> Pacer {
    Pacer::new(
        &[
            spec("shared", 100.0, 1, Per::Global),
            spec("tok", 100.0, 1, Per::Token),
        ],
        1000,
        Duration::from_secs(10),
    )
}

/// One request of token `k` through `p`, answered now: returns its grant.
async fn one(p: &Pacer, k: u8) -> Grant {
    p.admit(demand(
        p,
        &[("shared", None), ("tok", Some(k))],
        Priority::Normal,
    ))
    .unwrap()
    .granted()
    .await
    .unwrap()
}

#[tokio::test(start_paused = true)]
async fn one_tokens_429_pauses_its_key_and_the_others_go_on_after_one_probe() {
    let p = shared_and_token();
    let t0 = Instant::now();
    // token 1 meets a 429 with Retry-After 20 s; whose limit it was is not said
    let g = one(&p, 1).await;
    let plan = throttle::plan(
        Some(Duration::from_secs(20)),
        Duration::from_secs(180),
        Scope::Unknown,
        true,
    );
    p.throttle(&g.buckets, Some(Duration::from_secs(20)), plan, g.at);
    g.commit();
    // token 2 is the probe: it goes at once (the shared budget's next slot)
    let probe = one(&p, 2).await;
    assert!(
        probe.at - t0 <= Duration::from_millis(20),
        "{:?}",
        probe.at - t0
    );
    // while the probe is out, the others wait for its answer...
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for k in 3..8u8 {
        let t = p
            .admit(demand(
                &p,
                &[("shared", None), ("tok", Some(k))],
                Priority::Normal,
            ))
            .unwrap();
        spawn_waiter(t, k as usize, t0, tx.clone());
    }
    drop(tx);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(rx.try_recv().is_err(), "held while the probe is out");
    // ... and go on at the shared rate as soon as it comes back without a 429
    let answered = Instant::now();
    p.answered(&probe.buckets, probe.at);
    probe.commit();
    let mut at = Vec::new();
    while let Some((_, t)) = rx.recv().await {
        at.push(t);
    }
    assert_eq!(at.len(), 5);
    assert!(
        at.iter()
            .all(|t| *t < answered - t0 + Duration::from_millis(60)),
        "{at:?}"
    );
    // token 1 itself stays paused for its Retry-After
    let mut again = p
        .admit(demand(
            &p,
            &[("shared", None), ("tok", Some(1))],
            Priority::Normal,
        ))
        .unwrap();
    assert!(
        again.predicted >= Duration::from_secs(19),
        "{:?}",
        again.predicted
    );
    let g = again.granted().await.unwrap();
    assert!(g.at - t0 >= Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn a_429_on_the_probe_too_shows_the_limit_is_shared_and_pauses_everyone() {
    let p = shared_and_token();
    let t0 = Instant::now();
    let ra = Some(Duration::from_secs(5));
    let plan = throttle::plan(ra, Duration::from_secs(180), Scope::Unknown, true);
    let g = one(&p, 1).await;
    p.throttle(&g.buckets, ra, plan, g.at);
    g.commit();
    let probe = one(&p, 2).await;
    p.throttle(&probe.buckets, ra, plan, probe.at);
    probe.commit();
    // token 3 never met a 429, but the shared budget is paused now
    let g3 = one(&p, 3).await;
    assert!(g3.at - t0 >= Duration::from_secs(5), "{:?}", g3.at - t0);
    assert!(p
        .view()
        .iter()
        .any(|v| v.name == "shared" && v.rate_in_force < 100.0));
}

#[tokio::test(start_paused = true)]
async fn a_retry_after_past_the_cap_pauses_nothing_shared_and_the_key_at_most_the_cap() {
    let p = shared_and_token();
    let t0 = Instant::now();
    let ra = Some(Duration::from_secs(3600));
    let plan = throttle::plan(ra, Duration::from_secs(180), Scope::Unknown, true);
    let g = one(&p, 1).await;
    p.throttle(&g.buckets, ra, plan, g.at);
    g.commit();
    // twenty other tokens: at the shared rate, at once, no probe to wait for
    for k in 2..22u8 {
        let g = one(&p, k).await;
        assert!(
            g.at - t0 < Duration::from_millis(300),
            "token {k} at {:?}",
            g.at - t0
        );
        g.commit();
    }
    let t = p
        .admit(demand(
            &p,
            &[("shared", None), ("tok", Some(1))],
            Priority::Normal,
        ))
        .unwrap();
    let wait = t.predicted;
    assert!(
        wait <= Duration::from_secs(180) && wait >= Duration::from_secs(179),
        "{wait:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_hold_ends_by_itself_when_no_answer_comes() {
    let p = shared_and_token();
    let t0 = Instant::now();
    let ra = Some(Duration::from_secs(2));
    let g = one(&p, 1).await;
    p.throttle(
        &g.buckets,
        ra,
        throttle::plan(ra, Duration::from_secs(180), Scope::Unknown, true),
        g.at,
    );
    g.commit();
    let probe = one(&p, 2).await; // never answered
    probe.commit();
    let g3 = one(&p, 3).await;
    let at = g3.at - t0;
    assert!(
        at >= Duration::from_secs(2) && at < Duration::from_millis(2100),
        "{at:?}"
    );
}

/// Item: `max_wait` holds in cluster mode as it does alone. Three replicas share one 60/s
/// budget through the store; each is offered 100/s (five times the budget together) for 4 s,
/// with `max_wait` 1 s. Every request either starts within its second of arrival or is refused
/// (at arrival, or at its deadline when the other replicas took the slots admission counted
/// on), and the budget is still used in full.
#[tokio::test(start_paused = true)]
async fn with_replicas_no_admitted_request_starts_later_than_its_max_wait() {
    let store = Arc::new(crate::shared_budget::MemoryStore::default());
    let budget = spec("g", 60.0, 1, Per::Global);
    let max_wait = Duration::from_secs(1);
    let pacers: Vec<Pacer> = (0..3)
        .map(|_| {
            Pacer::new(
                std::slice::from_ref(&budget),
                10_000,
                Duration::from_secs(10),
            )
            .with_store(store.clone(), "test:", 3)
        })
        .collect();
    #[derive(Debug)]
    enum End {
        Refused,
        Started(Duration),
        Late(Duration),
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = Instant::now();
    // 20 requests per replica every 200 ms, for 4 s.
    for _ in 0..20 {
        for p in &pacers {
            for _ in 0..20 {
                let mut d = demand(p, &[("g", None)], Priority::Normal);
                d.max_wait = max_wait;
                let arrived = Instant::now();
                match p.admit(d) {
                    Err(Rejection::TooLong { wait }) => {
                        assert!(wait > max_wait);
                        tx.send(End::Refused).unwrap();
                    }
                    Err(e) => panic!("{e}"),
                    Ok(mut ticket) => {
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let end = match ticket.granted().await {
                                Ok(g) => {
                                    let waited = g.at - arrived;
                                    g.commit();
                                    End::Started(waited)
                                }
                                Err(Closed) => End::Late(arrived.elapsed()),
                            };
                            tx.send(end).unwrap();
                        });
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(tx);
    let mut ends = Vec::new();
    while let Some(e) = rx.recv().await {
        ends.push(e);
    }
    let total = t0.elapsed();
    assert_eq!(ends.len(), 1200);
    let waits: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            End::Started(w) => Some(*w),
            _ => None,
        })
        .collect();
    let refused = ends.iter().filter(|e| matches!(e, End::Refused)).count();
    let late: Vec<Duration> = ends
        .iter()
        .filter_map(|e| match e {
            End::Late(w) => Some(*w),
            _ => None,
        })
        .collect();
    let worst = waits.iter().max().copied().unwrap_or_default();
    println!(
        "FIGURES cluster max_wait: {} started (worst wait {worst:?} for max_wait {max_wait:?}), {refused} refused at arrival, {} refused at their deadline, over {total:?}",
        waits.len(),
        late.len()
    );
    // The bound: no request starts after its deadline (timer granularity aside).
    assert!(
        worst <= max_wait + Duration::from_millis(3),
        "worst wait {worst:?}"
    );
    // Refused late means refused at the deadline, not later.
    for w in &late {
        assert!(*w <= max_wait + Duration::from_millis(3), "left at {w:?}");
    }
    // The budget is still used: about 60/s over the ~5 s the load and its last waits last.
    let expected = 60.0 * total.as_secs_f64();
    assert!(
        waits.len() as f64 >= 0.85 * expected,
        "{} started, {expected:.0} possible",
        waits.len()
    );
    // Admission predicts from the shared schedule: most refusals happen on arrival.
    assert!(
        late.len() < refused / 2,
        "{} refused late, {refused} on arrival",
        late.len()
    );
}
