//! Waiting on a condition, with a deadline, instead of sleeping for a fixed time; and, for the
//! few tests whose point is that something does *not* happen, watching a bounded window.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is looked at.
pub const POLL: Duration = Duration::from_millis(20);

/// Polls `condition` every [`POLL`] until it holds; how long that took, or `None` if it still
/// did not hold after `limit`.
pub async fn poll_until<F, Fut>(limit: Duration, mut condition: F) -> Option<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if condition().await {
            return Some(started.elapsed());
        }
        if started.elapsed() >= limit {
            return None;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Like [`poll_until`], but panics, saying `what` it waited for, after `limit`.
pub async fn wait_until_async<F, Fut>(what: &str, limit: Duration, condition: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    poll_until(limit, condition)
        .await
        .unwrap_or_else(|| panic!("not within {limit:?}: {what}"))
}

/// [`wait_until_async`] for a condition that needs no `.await` (the emulator's stats, a file).
pub async fn wait_until(
    what: &str,
    limit: Duration,
    mut condition: impl FnMut() -> bool,
) -> Duration {
    wait_until_async(what, limit, || std::future::ready(condition())).await
}

/// Asserts that `condition` holds at every look for the whole of `window`; panics, saying
/// `what` should have held, at the first look where it does not.
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        assert!(condition().await, "after {:?}: {what}", started.elapsed());
        if started.elapsed() >= window {
            return;
        }
        tokio::time::sleep(POLL).await;
    }
}
