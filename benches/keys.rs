//! Measures the memory a keyed budget holds per key: 100,000 distinct tokens, one request each,
//! admitted into the pure queue and released (so every bucket is drained: no one waits on it),
//! with the heap counted by a counting global allocator and the resident set read from
//! `/proc/self/statm`. Then the clock moves on until every bucket is idle, and periodic passes
//! forget them: the heap goes back down.
//!
//! Run: `cargo bench --bench keys`. Prints one line per figure; no criterion (it measures
//! bytes, not time).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::{Duration, Instant};

use shiftgate::budget::Nanos;
use shiftgate::config::{BudgetSpec, Per, Rate};
use shiftgate::pacer::queue::{Admitted, Queue, SWEEP_EVERY};
use shiftgate::pacer::Demand;
use shiftgate::route::Priority;

/// Bytes allocated and not yet freed.
static LIVE: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed to the system allocator unchanged; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const KEYS: usize = 100_000;

fn rss_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: usize = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn key(i: usize) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&(i as u64).to_le_bytes());
    k
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: run small then.
    let keys = if std::env::args().any(|a| a == "--bench") {
        KEYS
    } else {
        1000
    };
    // The shipped config's per-token budget: 300/min, burst 1, max_keys 100,000.
    let spec = BudgetSpec::new("per-token", Rate::per_second(5.0), 1, Per::Token);
    let mut q: Queue<u64> = Queue::new(&[spec], 10_000, Duration::from_secs(10));
    let (heap0, rss0) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    let started = Instant::now();
    let now: Nanos = 3600 * 1_000_000_000;
    for i in 0..keys {
        let demand = Demand {
            buckets: vec![q.bucket_key("per-token", Some(key(i)))],
            priority: Priority::Normal,
            max_wait: Duration::from_secs(30),
            retry: false,
            not_after: None,
        };
        match q.admit(now, demand, None, i as u64) {
            Ok(Admitted::Queued { .. }) => {}
            other => panic!("not queued: {other:?}"),
        }
        assert_eq!(q.pass(now).released.len(), 1);
    }
    let took = started.elapsed();
    let (heap1, rss1) = (LIVE.load(Ordering::Relaxed), rss_bytes());
    assert_eq!(q.keys("per-token"), keys);
    let per_key = |bytes: isize| bytes as f64 / keys as f64;
    println!(
        "keys: {keys} distinct tokens, one request each, {:.2} µs per admission and release",
        took.as_secs_f64() * 1e6 / keys as f64
    );
    println!(
        "keys: heap per drained key {:.0} bytes ({:.1} MiB for {keys})",
        per_key(heap1 - heap0),
        (heap1 - heap0) as f64 / (1 << 20) as f64
    );
    println!(
        "keys: resident set per drained key {:.0} bytes ({:.1} MiB for {keys})",
        per_key(rss1 as isize - rss0 as isize),
        (rss1 as f64 - rss0 as f64) / (1 << 20) as f64
    );
    // Idle now (200 ms later a 5/s bucket would grant at full burst): periodic passes forget
    // them, SWEEP_BATCH per pass.
    let mut t = now;
    let mut passes = 0;
    while q.keys("per-token") > 0 {
        t += SWEEP_EVERY;
        q.pass(t);
        passes += 1;
    }
    let heap2 = LIVE.load(Ordering::Relaxed);
    println!(
        "keys: all {keys} forgotten after {passes} periodic passes; heap left {:.0} bytes per key \
         once held (the table shrinks once most of its keys are gone)",
        per_key(heap2 - heap0)
    );
}
