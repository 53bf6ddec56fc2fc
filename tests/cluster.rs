//! Replicas sharing budgets through a real redis-server (started by the test on a reserved port):
//! together within the budget whatever the spread of load, throttles shared, and no client
//! error when Redis goes away (each replica keeps its fallback share) or comes back.

mod common;

use std::time::{Duration, Instant};

use common::presence::{self, PATH_TEMPLATE};
use common::redis::Redis;
use common::wait::{poll_until, wait_until};
use common::*;
use shiftgate::loadtest::{self, Endpoint, LoadResult, LoadSpec};

/// One budget, `budget` as `spec`, on the presence route; the rest unpaced; `cluster` as is
/// (empty: no sharing).
fn config(budget: &str, spec: &str, cluster: &str) -> ProxyConfig {
    ProxyConfig::new()
        .budget(budget, spec)
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            budgets: [{budget}]
            max_wait: "120s"
            "#
        ))
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("queue:\n  max_depth: 5000")
        .yaml(cluster)
}

fn cluster_block(redis: &Redis) -> String {
    format!(
        "cluster:\n  redis_url: \"{}\"\n  key_prefix: \"test:\"\n  fallback_replicas: 3\n",
        redis.url()
    )
}

fn load(
    target: String,
    agents: usize,
    loops: usize,
    tokens: usize,
    endpoint: Endpoint,
) -> LoadSpec {
    LoadSpec {
        endpoint,
        ..shift_change(target, agents, loops, tokens)
    }
}

async fn start_replicas(cfg: &ProxyConfig, emu: std::net::SocketAddr) -> Vec<ProxyProcess> {
    let mut v = Vec::new();
    for _ in 0..3 {
        v.push(ProxyProcess::start(cfg, emu).await);
    }
    v
}

fn ok_count(r: &LoadResult) -> usize {
    r.summary().by_status.get(&200).copied().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_with_uneven_load_stay_within_one_shared_budget() {
    let redis = Redis::start();
    let emu = emulator(&presence::limited_emulator("60/s", "10ms", "20ms")).await;
    let cfg = config("presence", r#"{ rate: "60/s" }"#, &cluster_block(&redis));
    let replicas = start_replicas(&cfg, emu.local_addr()).await;
    emu.reset_stats();
    let calls_before = redis.script_calls();
    // 600 requests split 60 / 30 / 10 % over the replicas: ideal 10 s at 60/s.
    let started = Instant::now();
    let runs = [(0, 60), (1, 30), (2, 10)].map(|(i, agents)| {
        tokio::spawn(loadtest::run(
            load(
                replicas[i].url(),
                agents,
                6,
                agents,
                Endpoint::PresencePatch,
            ),
            None,
        ))
    });
    let mut total_ok = 0;
    let mut transport_errors = 0;
    for r in runs {
        let r = r.await.unwrap().unwrap();
        total_ok += ok_count(&r);
        transport_errors += r.summary().transport_errors;
    }
    let elapsed = started.elapsed();
    let stats = emu.stats();
    let ratio = elapsed.as_secs_f64() / 10.0;
    let calls = redis.script_calls() - calls_before;
    let busiest = stats
        .timeline
        .iter()
        .map(|s| s.requests - s.status_429)
        .max()
        .unwrap_or(0);
    println!(
        "FIGURES cluster: completion {:.2}s ratio {ratio:.3}; upstream 429s {}; busiest second {busiest}; redis script calls {calls} ({:.1}/s)",
        elapsed.as_secs_f64(),
        stats.status_count(429),
        calls as f64 / elapsed.as_secs_f64()
    );
    for s in &stats.timeline {
        if s.status_429 > 0 {
            println!("429 in second {} ({} requests)", s.second, s.requests);
        }
    }
    assert_eq!(total_ok, 600);
    assert_eq!(transport_errors, 0);
    assert!(
        stats.status_count(429) <= 6,
        "upstream 429s {} > 1 %",
        stats.status_count(429)
    );
    assert!(
        busiest <= 61,
        "the replicas together sent {busiest} in one second"
    );
    assert!(ratio <= 1.10, "completion {ratio:.3} × ideal");
    for r in &replicas {
        assert_eq!(r.metric("shiftgate_cluster_redis_up").await, 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_redis_dies_replicas_keep_their_share_and_share_again_when_it_returns() {
    let mut redis = Redis::start();
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"5ms\", max: \"10ms\" }\n").await;
    let cfg = config("presence", r#"{ rate: "60/s" }"#, &cluster_block(&redis));
    let replicas = start_replicas(&cfg, emu.local_addr()).await;
    emu.reset_stats();
    // Equal load on the three replicas for ~12 s.
    let runs: Vec<_> = replicas
        .iter()
        .map(|r| {
            tokio::spawn(loadtest::run(
                load(r.url(), 30, 8, 30, Endpoint::PresencePatch),
                None,
            ))
        })
        .collect();
    // Redis goes away 3 s into the run (180 requests at 60/s) ...
    wait_until(
        "180 requests through the replicas",
        Duration::from_secs(20),
        || emu.stats().total_requests >= 180,
    )
    .await;
    redis.kill();
    // ... every replica notices ...
    for r in &replicas {
        r.wait_for_metric(
            "shiftgate_cluster_redis_up",
            Duration::from_secs(10),
            |up| up == 0.0,
        )
        .await;
    }
    // ... and it stays away for the three whole seconds after that, which the assertions below
    // measure: the length of the outage is the point, not a wait for something.
    let fallback_from = emu.stats().elapsed_seconds.ceil() as u64;
    let outage_seconds = fallback_from..fallback_from + 3;
    wait_until(
        "three whole seconds without Redis",
        Duration::from_secs(10),
        || emu.stats().elapsed_seconds >= outage_seconds.end as f64,
    )
    .await;
    let down_seen = replicas[0].metric("shiftgate_cluster_redis_up").await;
    redis.spawn();
    let mut total_ok = 0;
    let mut errors = 0;
    for r in runs {
        let r = r.await.unwrap().unwrap();
        total_ok += ok_count(&r);
        errors += r.summary().transport_errors
            + r.summary()
                .by_status
                .iter()
                .filter(|(s, _)| **s != 200)
                .map(|(_, n)| n)
                .sum::<usize>();
    }
    let stats = emu.stats();
    // Those seconds were without Redis: 3 replicas × 20/s.
    let outage: Vec<u64> = stats
        .timeline
        .iter()
        .filter(|s| outage_seconds.contains(&s.second))
        .map(|s| s.requests)
        .collect();
    // Sharing resumes (its probe runs every 500 ms): looked for up to 1.5 s more, asserted below.
    let first = &replicas[0];
    poll_until(Duration::from_millis(1500), || async move {
        first.metric("shiftgate_cluster_redis_up").await == 1.0
    })
    .await;
    let up_again = replicas[0].metric("shiftgate_cluster_redis_up").await;
    let fallback = replicas[0]
        .metric("shiftgate_cluster_fallback_seconds_total")
        .await;
    println!("FIGURES redis-outage: per-second upstream rate without Redis {outage:?}; fallback seconds {fallback:.1}");
    assert_eq!(errors, 0, "no client error because of Redis");
    assert_eq!(total_ok, 720);
    assert_eq!(down_seen, 0.0);
    assert_eq!(up_again, 1.0, "sharing resumed without a restart");
    assert!(fallback >= 2.0, "fallback time counted: {fallback}");
    assert_eq!(outage.len(), 3, "whole seconds without Redis: {outage:?}");
    for n in &outage {
        assert!((45..=62).contains(n), "fallback share: {outage:?}");
    }
    // The log says it once per outage.
    let log = replicas[0].logs();
    assert_eq!(
        log.matches("shared budget store unreachable").count(),
        1,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_seen_by_one_replica_pauses_the_other_two() {
    let redis = Redis::start();
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"5ms\", max: \"10ms\" }\n").await;
    let cfg = config("presence", r#"{ rate: "30/s" }"#, &cluster_block(&redis));
    let replicas = start_replicas(&cfg, emu.local_addr()).await;
    // Replica 0's agents update one user whose path answers 429 (Retry-After 3) for a while;
    // replicas 1 and 2 update others.
    let victim = Endpoint::Custom {
        method: http::Method::PATCH,
        path: "/api/v2/users/victim/presences/purecloud".into(),
        body: Some(r#"{"presenceDefinition":{"id":"6a3af858-942f-489d-9700-5f9bcdcdae9b"},"primary":true}"#.into()),
    };
    let fault: shiftgate::emulator::Fault = serde_json::from_value(serde_json::json!({
        "kind": "outage_429", "start": "2s", "duration": "1s", "retry_after": 3,
        "path": "/api/v2/users/victim/presences/purecloud"
    }))
    .unwrap();
    emu.reset_stats();
    emu.add_fault(fault);
    let r0 = tokio::spawn(loadtest::run(
        load(replicas[0].url(), 10, 20, 10, victim),
        None,
    ));
    let others: Vec<_> = replicas[1..]
        .iter()
        .map(|r| {
            tokio::spawn(loadtest::run(
                load(r.url(), 10, 15, 10, Endpoint::PresencePatch),
                None,
            ))
        })
        .collect();
    r0.await.unwrap().unwrap();
    for o in others {
        assert_eq!(ok_count(&o.await.unwrap().unwrap()), 150);
    }
    let stats = emu.stats();
    // The first 429 came at ~2 s with Retry-After 3: the shared budget sends nothing new until
    // ~5 s, apart from slots already leased (at most 100 ms worth per replica).
    let first_429 = stats
        .timeline
        .iter()
        .find(|s| s.status_429 > 0)
        .map(|s| s.second)
        .unwrap();
    let paused: u64 = stats
        .timeline
        .iter()
        .filter(|s| s.second > first_429 && s.second < first_429 + 3)
        .map(|s| s.requests)
        .sum();
    println!("FIGURES shared-throttle: first 429 in second {first_429}; upstream requests in the 2 s after it {paused}");
    assert!(
        paused <= 10,
        "{paused} requests while the shared budget was paused"
    );
    for r in &replicas {
        assert!(
            r.metric(r#"shiftgate_budget_rate{budget="presence"}"#)
                .await
                <= 30.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_keeps_its_limit_across_replicas() {
    let redis = Redis::start();
    let emu =
        emulator("token_rate_per_minute: 0\nlatency: { min: \"5ms\", max: \"10ms\" }\n").await;
    let cfg = config(
        "per-token",
        r#"{ rate: "20/s", per: token }"#,
        &cluster_block(&redis),
    );
    let replicas = start_replicas(&cfg, emu.local_addr()).await;
    emu.reset_stats();
    // One token through all three replicas: 120 requests at 20/s ≈ 6 s, not 2 s.
    let started = Instant::now();
    let runs: Vec<_> = replicas
        .iter()
        .map(|r| {
            tokio::spawn(loadtest::run(
                load(r.url(), 10, 4, 1, Endpoint::PresencePatch),
                None,
            ))
        })
        .collect();
    for r in runs {
        assert_eq!(ok_count(&r.await.unwrap().unwrap()), 40);
    }
    let elapsed = started.elapsed();
    let busiest = emu
        .stats()
        .timeline
        .iter()
        .map(|s| s.requests)
        .max()
        .unwrap();
    println!("FIGURES keyed: 120 requests of one token via 3 replicas in {:.2}s; busiest second {busiest}", elapsed.as_secs_f64());
    assert!(busiest <= 21, "{busiest} in one second for one token");
    assert!(elapsed >= Duration::from_millis(5500), "{elapsed:?}");
    assert!(elapsed <= Duration::from_secs(8), "{elapsed:?}");
    // Keys are hashes, never the token.
    let keys = redis.cli(&["KEYS", "*"]);
    assert!(keys.contains("test:per-token:"), "{keys}");
    assert!(!keys.contains("loadtest-token"), "{keys}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharing_adds_little_latency_and_few_redis_calls() {
    let redis = Redis::start();
    let emu = emulator("token_rate_per_minute: 0\n").await;
    // A budget far above the load: latency is the proxy's own, not the pacing.
    let budget = r#"{ rate: "1000/s", burst: 50 }"#;
    let off = ProxyProcess::start(&config("presence", budget, ""), emu.local_addr()).await;
    let on = ProxyProcess::start(
        &config("presence", budget, &cluster_block(&redis)),
        emu.local_addr(),
    )
    .await;
    let spec = |t: String| load(t, 20, 50, 20, Endpoint::PresencePatch);
    // warm both
    loadtest::run(load(off.url(), 5, 5, 5, Endpoint::PresencePatch), None)
        .await
        .unwrap();
    loadtest::run(load(on.url(), 5, 5, 5, Endpoint::PresencePatch), None)
        .await
        .unwrap();
    let a = loadtest::run(spec(off.url()), None)
        .await
        .unwrap()
        .summary();
    let calls_before = redis.script_calls();
    let t = Instant::now();
    let b = loadtest::run(spec(on.url()), None).await.unwrap().summary();
    let calls = redis.script_calls() - calls_before;
    let rate = b.answered as f64 / t.elapsed().as_secs_f64();
    let p99_off = a.latency.as_ref().unwrap().p99;
    let p99_on = b.latency.as_ref().unwrap().p99;
    println!(
        "FIGURES cluster-latency: p99 off {p99_off:?} on {p99_on:?}; {rate:.0} req/s with {calls} redis script calls ({:.1}/s)",
        calls as f64 / t.elapsed().as_secs_f64()
    );
    assert_eq!(b.by_status.get(&200), Some(&1000));
    // Leases, not a round trip per request: fewer than one Redis call per 10 requests.
    assert!(calls * 10 < 1000, "{calls} Redis calls for 1000 requests");
    assert!(
        p99_on < p99_off + Duration::from_millis(25),
        "{p99_on:?} vs {p99_off:?}"
    );
}

/// Garbage in a bucket's hash (another program, a bug, a hand edit): the store neither panics
/// nor pauses for ever nor grants without bound; the bucket starts afresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_in_redis_count_as_absent_and_never_pause_for_ever() {
    use shiftgate::shared_budget::{LeaseRequest, RedisStore, SlotStore, ThrottleRequest};
    let redis = Redis::start();
    let store = RedisStore::new(&redis.url(), Duration::from_secs(2)).unwrap();
    let lease = |key: &str| LeaseRequest {
        key: key.to_string(),
        interval: Duration::from_millis(10),
        tolerance: Duration::ZERO,
        count: 3,
    };
    let bad_values = [
        "nan",
        "NaN",
        "inf",
        "-inf",
        "-5",
        "1e300",
        "banana",
        "",
        "99999999999999999999",
    ];
    for (i, bad) in bad_values.iter().enumerate() {
        let key = format!("test:bad{i}");
        redis.cli(&[
            "HSET",
            &key,
            "tat",
            bad,
            "paused_until",
            bad,
            "lowered",
            bad,
            "ceiling",
            bad,
            "dec_at",
            bad,
        ]);
        let l = store
            .lease(lease(&key))
            .await
            .unwrap_or_else(|e| panic!("{bad:?}: {e}"));
        // Spaced from now as a fresh bucket's are: not paused, not bunched up.
        assert_eq!(l.slots.len(), 3, "{bad:?}");
        assert!(l.slots[0] < Duration::from_millis(5), "{bad:?}: {l:?}");
        assert!(l.slots[2] < Duration::from_millis(30), "{bad:?}: {l:?}");
        assert_eq!(l.paused_for, Duration::ZERO, "{bad:?}");
        assert_eq!(l.adaptive, None, "{bad:?}");
        // What the script stored back is a plain number again.
        let tat = redis.cli(&["HGET", &key, "tat"]);
        assert!(tat.trim().parse::<u64>().is_ok(), "{bad:?}: tat {tat:?}");
        // A throttle over garbage pauses for what it says, no longer.
        redis.cli(&["HSET", &key, "tat", bad, "paused_until", bad]);
        store
            .throttle(ThrottleRequest {
                key: key.clone(),
                pause: Duration::from_millis(500),
                tolerance: Duration::ZERO,
                lowered: None,
            })
            .await
            .unwrap();
        let l = store.lease(lease(&key)).await.unwrap();
        assert!(
            l.paused_for <= Duration::from_millis(500) && l.paused_for > Duration::from_millis(300),
            "{bad:?}: {l:?}"
        );
        assert!(l.slots[0] <= Duration::from_millis(500), "{bad:?}: {l:?}");
    }
    // A pause that would last a year: garbage too, not obeyed.
    let key = "test:far";
    let t = redis.cli(&["TIME"]);
    let secs: u64 = t.lines().next().unwrap().trim().parse().unwrap();
    let year = ((secs + 365 * 86_400) * 1_000_000).to_string();
    redis.cli(&["HSET", key, "tat", &year, "paused_until", &year]);
    let l = store.lease(lease(key)).await.unwrap();
    assert_eq!(l.paused_for, Duration::ZERO, "{l:?}");
    assert!(l.slots[0] < Duration::from_millis(5), "{l:?}");
}

/// `max_wait` holds with replicas as it does alone: three replicas share a 20/s budget with
/// `max_wait` 1 s and are offered three times that for 3 s. Every request that is sent waited
/// at most `max_wait` (its `X-Shiftgate-Wait-Ms`), the rest are answered
/// `429 shiftgate.queue.wait` with a `Retry-After`, and the budget is still used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_replicas_no_request_waits_longer_than_max_wait() {
    let redis = Redis::start();
    let emu = emulator("token_rate_per_minute: 0\n").await;
    let cfg = ProxyConfig::new()
        .budget("presence", r#"{ rate: "20/s" }"#)
        .route(&format!(
            r#"
            name: presence
            match: {{ method: PATCH, path: "{PATH_TEMPLATE}" }}
            budgets: [presence]
            max_wait: "1s"
            "#
        ))
        .route(r#"{ name: default, match: { path: "/**" } }"#)
        .yaml("queue:\n  max_depth: 5000")
        .yaml(&cluster_block(&redis));
    let replicas = start_replicas(&cfg, emu.local_addr()).await;
    let max_wait = Duration::from_secs(1);
    let t0 = Instant::now();
    // Each replica: 6 requests every 100 ms for 3 s (180/s together, nine times 20/s).
    let mut handles = Vec::new();
    for round in 0..30 {
        for (r, replica) in replicas.iter().enumerate() {
            for i in 0..6 {
                let addr = replica.addr();
                let user = format!("u{round}-{r}-{i}");
                handles.push(tokio::spawn(async move {
                    let t = Instant::now();
                    let a = request(
                        addr,
                        http::Method::PATCH,
                        &presence::path(&user),
                        &[("Authorization", "Bearer t")],
                        presence::BODY,
                    )
                    .await
                    .unwrap();
                    (a, t.elapsed())
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut worst_wait = 0u64;
    let mut worst_answer = Duration::ZERO;
    let (mut ok, mut refused) = (0, 0);
    for h in handles {
        let (a, took) = h.await.unwrap();
        match a.status.as_u16() {
            200 => {
                ok += 1;
                let w: u64 = header(&a, "X-Shiftgate-Wait-Ms").unwrap().parse().unwrap();
                worst_wait = worst_wait.max(w);
                worst_answer = worst_answer.max(took);
            }
            429 => {
                assert_own_answer(&a, 429, "shiftgate.queue.wait");
                assert!(header(&a, "Retry-After").unwrap().parse::<u64>().unwrap() >= 1);
                refused += 1;
            }
            s => panic!("status {s}: {}", String::from_utf8_lossy(&a.body)),
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "FIGURES cluster max_wait: {ok} sent (worst X-Shiftgate-Wait-Ms {worst_wait} for max_wait {max_wait:?}, slowest answer {worst_answer:?}), {refused} answered 429 queue.wait, over {elapsed:.2} s"
    );
    assert!(
        worst_wait <= max_wait.as_millis() as u64 + 20,
        "a request waited {worst_wait} ms"
    );
    assert!(refused > 0, "the load was over the budget");
    // About 20/s while the load lasted (3 s and the last second of waits), the burst aside.
    assert!(ok >= 60, "{ok} sent");
    assert!(
        ok as f64 <= 20.0 * elapsed + 5.0,
        "{ok} sent in {elapsed:.2} s"
    );
}
