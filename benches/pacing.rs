//! Measures the pacing decision: one GCRA step (`Gcra::conforms` + `take`), and one request's
//! `Pacer::admit` + grant + commit when its slot is free at once, on a global budget and on a
//! per-token budget with many keys (plus the shared presence budget, as the presence route has).
//!
//! Run: `cargo bench --bench pacing` (`-- --quick` for a short run).

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use shiftgate::budget::{Gcra, Limit};
use shiftgate::config::{BudgetSpec, Per, Rate};
use shiftgate::pacer::{BucketKey, Demand, Pacer};
use shiftgate::route::Priority;

/// Keys of the keyed budget: one per agent's token, at a small and at a large shift change.
const KEYS: [usize; 2] = [100, 10_000];

fn budget(name: &str, per_second: f64, per: Per) -> BudgetSpec {
    BudgetSpec::new(name, Rate::per_second(per_second), 1, per)
}

/// Polls a future once: a ticket whose slot was free on admission is already granted.
fn ready<F: Future>(future: F) -> Option<F::Output> {
    let mut future = pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => Some(value),
        Poll::Pending => None,
    }
}

fn demand(buckets: Vec<BucketKey>) -> Demand {
    Demand {
        buckets,
        priority: Priority::High,
        max_wait: Duration::from_secs(30),
        retry: false,
        not_after: None,
    }
}

/// Admits one request and takes its grant; panics if it had to wait (the rates are set so that
/// it never does: this measures the decision, not the waiting).
fn admit_and_grant(pacer: &Pacer, buckets: Vec<BucketKey>) {
    let mut ticket = pacer.admit(demand(buckets)).expect("admitted");
    let grant = ready(ticket.granted())
        .expect("granted on admission")
        .expect("not closed");
    grant.commit();
}

fn gcra(c: &mut Criterion) {
    let mut group = c.benchmark_group("gcra");
    group.throughput(Throughput::Elements(1));
    // 100/s, burst 1, one request every 7 ms of simulated time: some conform, some do not.
    let limit = Limit::new(100.0, 1);
    group.bench_function("conforms+take", |b| {
        let mut g = Gcra::default();
        let mut now = 0u64;
        b.iter(|| {
            now += 7_000_000;
            if g.conforms(black_box(now), &limit) {
                g.take(now, &limit);
            }
            black_box(g.tat)
        })
    });
    group.bench_function("conforms", |b| {
        let g = Gcra { tat: 1_000_000_000 };
        let mut now = 0u64;
        b.iter(|| {
            now = now.wrapping_add(3_000_000) & 0x7fff_ffff; // ~2.1 s of simulated time, round and round
            g.conforms(black_box(now), &limit)
        })
    });
    group.finish();
}

fn admit(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // The pacer spawns its scheduler on the first admission; grants made on admission never
    // need it to run.
    let _guard = runtime.enter();
    let mut group = c.benchmark_group("pacer");
    group.throughput(Throughput::Elements(1));

    // A global budget fast enough that every request's slot is free on arrival.
    group.bench_function("admit+grant/global", |b| {
        let pacer = Pacer::new(
            &[budget("presence", 1e9, Per::Global)],
            10_000,
            Duration::from_secs(10),
        );
        let key = pacer.bucket_key("presence", None);
        b.iter(|| admit_and_grant(&pacer, vec![key.clone()]))
    });

    // The presence route's demand: a per-token bucket out of `keys`, and the global budget.
    for keys in KEYS {
        group.bench_function(format!("admit+grant/keyed-{keys}+global"), |b| {
            let pacer = Pacer::new(
                &[
                    budget("per-token", 1e9, Per::Token),
                    budget("presence", 1e9, Per::Global),
                ],
                10_000,
                Duration::from_secs(10),
            );
            let keys: Vec<BucketKey> = (0..keys)
                .map(|i| {
                    let mut hash = [0u8; 16];
                    hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
                    pacer.bucket_key("per-token", Some(hash))
                })
                .collect();
            let global = pacer.bucket_key("presence", None);
            // Every key's bucket exists before measuring, as during a shift change.
            for key in &keys {
                admit_and_grant(&pacer, vec![key.clone(), global.clone()]);
            }
            let mut i = 0;
            b.iter_batched(
                || {
                    i = (i + 1) % keys.len();
                    vec![keys[i].clone(), global.clone()]
                },
                |buckets| admit_and_grant(&pacer, buckets),
                BatchSize::SmallInput,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, gcra, admit);
criterion_main!(benches);
