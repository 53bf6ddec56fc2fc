//! Whose limit an upstream 429 was: one token that has used up its own Genesys limit must not
//! stall the other tokens of its route, and no `Retry-After`, however long, pauses a shared
//! budget past `retry.max_retry_after`. The real binary against the emulator, whose per-token
//! limit the proxy is not told.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use http::Method;

/// A presence route charged to a shared budget and a per-token one, both far above what the
/// emulator allows one token: only the emulator's 429s can hold a token back.
fn proxy_config() -> ProxyConfig {
    ProxyConfig::new()
        .budget("presence", r#"{ rate: "50/s", burst: 5 }"#)
        .budget("per-token", r#"{ rate: "20/s", per: token }"#)
        .route(&format!(
            r#"{{ name: presence, match: {{ method: PATCH, path: "{}" }}, budgets: [presence, per-token], max_wait: "20s" }}"#,
            presence::PATH_TEMPLATE
        ))
        .yaml("retry: { max_elapsed: \"2s\" }")
}

async fn patch(
    proxy: &ProxyProcess,
    token: &str,
    user: usize,
) -> shiftgate::loadtest::client::Answer {
    let auth = format!("Bearer {token}");
    request(
        proxy.addr(),
        Method::PATCH,
        &format!("/api/v2/users/user-{user}/presences/purecloud"),
        &[
            ("Authorization", auth.as_str()),
            ("Content-Type", "application/json"),
        ],
        Bytes::from_static(presence::BODY.as_bytes()),
    )
    .await
    .expect("an answer")
}

/// Ten other tokens, one update each, at once: every one answered 200, and quickly.
async fn others_go_on(proxy: &ProxyProcess) -> Duration {
    let started = Instant::now();
    let runs: Vec<_> = (0..10)
        .map(|i| {
            let proxy_addr = proxy.addr();
            tokio::spawn(async move {
                let auth = format!("Bearer other-{i}");
                let a = request(
                    proxy_addr,
                    Method::PATCH,
                    &format!("/api/v2/users/other-{i}/presences/purecloud"),
                    &[
                        ("Authorization", auth.as_str()),
                        ("Content-Type", "application/json"),
                    ],
                    Bytes::from_static(presence::BODY.as_bytes()),
                )
                .await
                .expect("an answer");
                (a.status, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for r in runs {
        let (status, took) = r.await.unwrap();
        assert_eq!(status, 200, "another token's update");
        slowest = slowest.max(took);
    }
    slowest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tokens_own_limit_does_not_stall_the_other_tokens() {
    // Genesys's token.rate.per.minute, lowered to 3 so one token meets it at once.
    let emu =
        emulator("token_rate_per_minute: 3\nlatency: { min: \"5ms\", max: \"10ms\" }\n").await;
    let proxy = ProxyProcess::start(&proxy_config(), emu.local_addr()).await;
    for i in 0..3 {
        assert_eq!(patch(&proxy, "spent", i).await.status, 200);
    }
    // The 4th meets the emulator's 429 (Retry-After: the rest of its minute); the proxy cannot
    // retry it within retry.max_elapsed, so it passes through.
    let refused = patch(&proxy, "spent", 3).await;
    assert_eq!(refused.status, 429);
    let ra: u64 = header(&refused, "Retry-After").unwrap().parse().unwrap();
    assert!(ra > 30, "Retry-After {ra}");

    let slowest = others_go_on(&proxy).await;
    println!("FIGURES throttle-scope: 10 other tokens answered within {slowest:?} after one token's 429 (Retry-After {ra} s)");
    assert!(
        slowest < Duration::from_secs(3),
        "the others waited {slowest:?}"
    );

    // The spent token itself is held back: told at once, with an honest Retry-After.
    let t = Instant::now();
    let again = patch(&proxy, "spent", 4).await;
    assert_own_answer(&again, 429, "shiftgate.queue.wait");
    assert!(t.elapsed() < Duration::from_secs(2));
    let wait: u64 = header(&again, "Retry-After").unwrap().parse().unwrap();
    assert!(
        wait + 2 >= ra && wait <= ra + 1,
        "Retry-After {wait} for a pause of {ra}"
    );
    // The scrape shows the pause: the per-token budget's longest is that token's.
    let paused = proxy
        .metric(r#"shiftgate_budget_paused_seconds{budget="per-token"}"#)
        .await;
    println!("FIGURES throttle-scope: shiftgate_budget_paused_seconds{{budget=\"per-token\"}} {paused} (Retry-After {ra} s)");
    assert!(
        paused + 3.0 >= ra as f64 && paused <= ra as f64 + 1.0,
        "per-token paused for {paused} s after a Retry-After of {ra} s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_past_max_retry_after_passes_through_and_pauses_nothing_shared() {
    // One update per token per hour on presence: the second meets a 429 with Retry-After ~3600.
    let emu = emulator(&format!(
        "token_rate_per_minute: 0\nlatency: {{ min: \"5ms\", max: \"10ms\" }}\nroute_limits:\n  - {{ name: presence, method: PATCH, path: \"{}\", limit: \"1/h\", per: token }}\n",
        presence::PATH_TEMPLATE
    ))
    .await;
    let proxy = ProxyProcess::start(&proxy_config(), emu.local_addr()).await;
    assert_eq!(patch(&proxy, "hourly", 0).await.status, 200);
    let t = Instant::now();
    let refused = patch(&proxy, "hourly", 1).await;
    assert_eq!(
        refused.status, 429,
        "the upstream's own 429, passed through"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "passed through at once"
    );
    let ra: u64 = header(&refused, "Retry-After").unwrap().parse().unwrap();
    assert!(ra > 180, "Retry-After {ra}");
    assert_eq!(json(&refused)["code"], "too.many.requests.retry.after");

    let slowest = others_go_on(&proxy).await;
    assert!(
        slowest < Duration::from_secs(3),
        "the others waited {slowest:?}"
    );
    // The token's own bucket waits retry.max_retry_after (180 s) at most.
    let again = patch(&proxy, "hourly", 2).await;
    assert_own_answer(&again, 429, "shiftgate.queue.wait");
    let wait: u64 = header(&again, "Retry-After").unwrap().parse().unwrap();
    assert!((170..=181).contains(&wait), "Retry-After {wait}");
}
