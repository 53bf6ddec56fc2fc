//! What the request path resolves once allocates nothing per request: metric children per
//! route and status, the access line's buffer, route matching of a path already normal, the
//! path sent upstream when nothing is rewritten, the hop-by-hop header names. Counted with a
//! global allocator that counts this thread's allocations.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, SystemTime};

use shiftgate::access::{self, Line};
use shiftgate::config::Config;
use shiftgate::metrics::{status_label, Metrics};
use shiftgate::route::{connection_named_headers, find_route, normalize_path, upstream_path};

struct Counting;

thread_local! {
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.with(|n| n.set(n.get() + 1));
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations `f` makes on this thread.
fn allocations(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    f();
    ALLOCATIONS.with(Cell::get) - before
}

const REQUESTS: usize = 1000;

#[test]
fn metric_children_of_a_route_and_status_are_found_without_allocating() {
    let m = Metrics::new();
    let count = |status: u16| {
        let route = "presence";
        m.requests_total
            .with_label_values(&[route, status_label(status)])
            .inc();
        m.upstream_responses_total
            .with_label_values(&[route, status_label(status)])
            .inc();
        m.request_duration_seconds
            .with_label_values(&[route])
            .observe(0.012);
        m.queue_wait_seconds
            .with_label_values(&[route])
            .observe(0.0);
        m.inflight_requests.with_label_values(&[route]).inc();
        m.inflight_requests.with_label_values(&[route]).dec();
    };
    count(200); // the children are made on first use
    let n = allocations(|| (0..REQUESTS).for_each(|_| count(200)));
    assert_eq!(n, 0, "{n} allocations for {REQUESTS} requests");
    assert_eq!(
        m.requests_total
            .with_label_values(&["presence", "200"])
            .get(),
        REQUESTS as u64 + 1
    );
}

#[test]
fn the_access_line_is_formatted_into_a_kept_buffer_without_allocating() {
    let line = Line {
        client: Some("10.1.2.3".parse().unwrap()),
        peer: Some("10.1.2.3:50123".parse().unwrap()),
        route: "presence",
        method: "PATCH",
        path: "/api/v2/users/3b0ba7d6/presences/PURECLOUD",
        status: 200,
        duration: Duration::from_micros(1234),
        bytes_in: 61,
        bytes_out: 412,
        wait: Duration::from_millis(950),
        attempts: 1,
        upstream: Duration::from_millis(31),
        correlation_id: Some("6b6e2a5c-8d0e-4a57-9d6a-1b1f1c7d9a10"),
        error: None,
    };
    let mut buf = Vec::with_capacity(1024);
    for json in [false, true] {
        let n = allocations(|| {
            for _ in 0..REQUESTS {
                buf.clear();
                access::format(&mut buf, &line, SystemTime::now(), json).unwrap();
            }
        });
        assert_eq!(n, 0, "json: {json}: {n} allocations");
        assert!(buf.ends_with(b"\n") && buf.len() > 300, "a whole line");
    }
}

#[test]
fn routing_a_normal_path_and_forwarding_it_unchanged_allocate_nothing() {
    let cfg = Config::parse(
        r#"
listen: "127.0.0.1:1"
upstreams:
  api: { url: "http://127.0.0.1:2" }
routes:
  - name: presence
    match: { method: PATCH, path: "/api/v2/users/{userId}/presences/{sourceId}" }
  - name: other
    match: { path: "/**" }
"#,
    )
    .expect("valid config");
    let target = "/api/v2/users/3b0ba7d6/presences/PURECLOUD";
    let method = http::Method::PATCH;
    let mut found = None;
    let n = allocations(|| {
        for _ in 0..REQUESTS {
            let path = normalize_path(target).expect("a normal path");
            found = find_route(&cfg.routes, &method, &path);
            let upstream = upstream_path(target, None, "");
            assert_eq!(upstream, target);
            assert!(connection_named_headers(["keep-alive"]).is_empty());
        }
    });
    assert_eq!(n, 0, "{n} allocations for {REQUESTS} requests");
    assert_eq!(found, Some(0));
}
