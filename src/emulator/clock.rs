//! The emulator's sense of "now": the system clock, or a hand-moved one so tests can cross
//! minute-long windows instantly (tokio's paused time needs a feature the crate does not enable).

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Clone, Debug, Default)]
pub(crate) enum Clock {
    #[default]
    System,
    /// Starts at the real now and moves only by [`Clock::advance`].
    #[cfg_attr(not(test), allow(dead_code))]
    Manual(Arc<Mutex<Instant>>),
}

impl Clock {
    #[cfg(test)]
    pub(crate) fn manual() -> Self {
        Clock::Manual(Arc::new(Mutex::new(Instant::now())))
    }

    pub(crate) fn now(&self) -> Instant {
        match self {
            Clock::System => Instant::now(),
            Clock::Manual(now) => *now.lock(),
        }
    }

    #[cfg(test)]
    pub(crate) fn advance(&self, by: Duration) {
        match self {
            Clock::System => panic!("the system clock cannot be moved"),
            Clock::Manual(now) => *now.lock() += by,
        }
    }

    /// Time since `earlier` by this clock.
    pub(crate) fn since(&self, earlier: Instant) -> Duration {
        self.now().saturating_duration_since(earlier)
    }
}
