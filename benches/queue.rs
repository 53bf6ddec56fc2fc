//! Measures the queue: N requests admitted at once onto a 1000/s budget, then released one by one
//! by the pacer's scheduler as their slots come (tokio's clock paused and auto-advanced, so no
//! real waiting): reported per waiter, for a global budget and for the presence route's demand
//! (per-token bucket, one token per agent, plus the global budget).
//!
//! Run: `cargo bench --bench queue` (`-- --quick` for a short run).

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shiftgate::config::{BudgetSpec, Per, Rate};
use shiftgate::pacer::{BucketKey, Demand, Pacer};
use shiftgate::route::Priority;

const RATE: f64 = 1000.0;

fn budget(name: &str, per_second: f64, per: Per) -> BudgetSpec {
    BudgetSpec::new(name, Rate::per_second(per_second), 1, per)
}

fn demand(buckets: Vec<BucketKey>) -> Demand {
    Demand {
        buckets,
        priority: Priority::High,
        max_wait: Duration::from_secs(3600),
        retry: false,
        not_after: None,
    }
}

/// Admits `n` waiters, each with the buckets `buckets_of(pacer, i)` gives, then awaits every
/// grant in order.
async fn admit_then_release(
    n: usize,
    budgets: &[BudgetSpec],
    buckets_of: impl Fn(&Pacer, usize) -> Vec<BucketKey>,
) {
    let pacer = Pacer::new(budgets, n + 1, Duration::from_secs(10));
    let mut tickets = Vec::with_capacity(n);
    for i in 0..n {
        tickets.push(
            pacer
                .admit(demand(buckets_of(&pacer, i)))
                .expect("admitted"),
        );
    }
    for ticket in &mut tickets {
        ticket.granted().await.expect("granted").commit();
    }
}

fn token_hash(i: usize) -> [u8; 16] {
    let mut hash = [0u8; 16];
    hash[..8].copy_from_slice(&(i as u64).to_le_bytes());
    hash
}

fn queue(c: &mut Criterion) {
    // Paused clock: the scheduler's sleeps end as soon as every task is idle.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    let mut group = c.benchmark_group("queue");
    group.sample_size(10);
    for n in [100usize, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new("global", n), &n, |b, &n| {
            let budgets = [budget("presence", RATE, Per::Global)];
            b.iter(|| {
                runtime.block_on(admit_then_release(n, &budgets, |pacer, _| {
                    vec![pacer.bucket_key("presence", None)]
                }))
            })
        });
        group.bench_with_input(BenchmarkId::new("per-token+global", n), &n, |b, &n| {
            let budgets = [
                budget("per-token", 5.0, Per::Token),
                budget("presence", RATE, Per::Global),
            ];
            b.iter(|| {
                runtime.block_on(admit_then_release(n, &budgets, |pacer, i| {
                    vec![
                        pacer.bucket_key("per-token", Some(token_hash(i))),
                        pacer.bucket_key("presence", None),
                    ]
                }))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, queue);
criterion_main!(benches);
