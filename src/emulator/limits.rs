//! Genesys-like fixed-window limits: a window opens at the first request counted and admits
//! `count` requests until it ends; a refused request is not counted anywhere.

use std::collections::HashMap;
use std::time::Duration;

use parking_lot::Mutex;
use std::time::Instant;

use super::config::{LimitScope, RouteLimit, WindowLimit};
use crate::genesys::retry_after_secs;

const MINUTE: Duration = Duration::from_secs(60);

/// One fixed window's state. Pure: the caller passes `now`.
///
/// A window is `[start, start + len)`. While it lasts, at most `limit` requests are admitted; the
/// first request at or after its end opens the next one. Nothing happens at the boundary itself,
/// so a quiet token has no open window at all.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct FixedWindow {
    start: Option<Instant>,
    count: u32,
}

impl FixedWindow {
    /// `Ok` if one more request fits, else the time left until the window ends.
    pub(crate) fn check(&self, now: Instant, limit: WindowLimit) -> Result<(), Duration> {
        match self.start {
            Some(start) if now < start + limit.window => {
                if self.count < limit.count {
                    Ok(())
                } else {
                    Err(start + limit.window - now)
                }
            }
            _ => Ok(()),
        }
    }

    /// Counts one request; call only after [`FixedWindow::check`] passed for every limit.
    pub(crate) fn commit(&mut self, now: Instant, limit: WindowLimit) {
        match self.start {
            Some(start) if now < start + limit.window => self.count += 1,
            _ => {
                self.start = Some(now);
                self.count = 1;
            }
        }
    }

    fn expired(&self, now: Instant, window: Duration) -> bool {
        self.start.is_none_or(|s| now >= s + window)
    }
}

/// Which limit refused a request and for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Throttled {
    /// `token.rate.per.minute` or the route limit's name.
    pub limit: String,
    /// The limit's count per window, for a 429 body that names its limit.
    pub value: u32,
    pub retry_after: u64,
}

/// Every limit of one emulator. One short lock: checking all limits and then counting in all of
/// them must be atomic, or two racing requests could both slip under a limit.
pub(crate) struct Limiter {
    token_limit: Option<WindowLimit>,
    routes: Vec<RouteLimit>,
    state: Mutex<LimiterState>,
}

#[derive(Default)]
struct LimiterState {
    per_token: HashMap<String, FixedWindow>,
    route_org: Vec<FixedWindow>,
    route_token: Vec<HashMap<String, FixedWindow>>,
    /// Load tests invent tokens by the thousand; expired windows are dropped when the maps
    /// grow past this, so memory follows the live tokens only.
    prune_at: usize,
}

const PRUNE_FLOOR: usize = 4096;

impl Limiter {
    pub(crate) fn new(token_rate_per_minute: u32, routes: Vec<RouteLimit>) -> Self {
        let state = LimiterState {
            route_org: vec![FixedWindow::default(); routes.len()],
            route_token: vec![HashMap::new(); routes.len()],
            prune_at: PRUNE_FLOOR,
            ..LimiterState::default()
        };
        Limiter {
            token_limit: (token_rate_per_minute > 0).then_some(WindowLimit {
                count: token_rate_per_minute,
                window: MINUTE,
            }),
            routes,
            state: Mutex::new(state),
        }
    }

    /// Admits and counts the request, or names the first exhausted limit (token limit first,
    /// then route limits in config order).
    pub(crate) fn admit(
        &self,
        now: Instant,
        token: &str,
        method: &str,
        path: &str,
    ) -> Result<(), Throttled> {
        let matching: Vec<usize> = (0..self.routes.len())
            .filter(|&i| self.routes[i].applies_to(method, path))
            .collect();
        let mut state = self.state.lock();
        let state = &mut *state;

        if let Some(limit) = self.token_limit {
            if let Some(window) = state.per_token.get(token) {
                window.check(now, limit).map_err(|wait| Throttled {
                    limit: "token.rate.per.minute".to_string(),
                    value: limit.count,
                    retry_after: retry_after_secs(wait),
                })?;
            }
        }
        for &i in &matching {
            let route = &self.routes[i];
            let window = match route.per {
                LimitScope::Org => Some(&state.route_org[i]),
                LimitScope::Token => state.route_token[i].get(token),
            };
            if let Some(window) = window {
                window.check(now, route.limit).map_err(|wait| Throttled {
                    limit: route.name.clone(),
                    value: route.limit.count,
                    retry_after: retry_after_secs(wait),
                })?;
            }
        }

        if let Some(limit) = self.token_limit {
            window_for(&mut state.per_token, token).commit(now, limit);
        }
        for &i in &matching {
            let route = &self.routes[i];
            match route.per {
                LimitScope::Org => state.route_org[i].commit(now, route.limit),
                LimitScope::Token => {
                    window_for(&mut state.route_token[i], token).commit(now, route.limit)
                }
            }
        }
        state.prune(now, self);
        Ok(())
    }
}

fn window_for<'a>(map: &'a mut HashMap<String, FixedWindow>, token: &str) -> &'a mut FixedWindow {
    // Avoids allocating the key on the hot path, where the token is almost always known.
    if !map.contains_key(token) {
        map.insert(token.to_string(), FixedWindow::default());
    }
    map.get_mut(token).expect("inserted above")
}

impl LimiterState {
    fn prune(&mut self, now: Instant, limiter: &Limiter) {
        let size = self.per_token.len() + self.route_token.iter().map(HashMap::len).sum::<usize>();
        if size < self.prune_at {
            return;
        }
        self.per_token.retain(|_, w| !w.expired(now, MINUTE));
        for (i, map) in self.route_token.iter_mut().enumerate() {
            let window = limiter.routes[i].limit.window;
            map.retain(|_, w| !w.expired(now, window));
        }
        let left = self.per_token.len() + self.route_token.iter().map(HashMap::len).sum::<usize>();
        // Doubling keeps pruning amortised O(1) per request even when every token is live.
        self.prune_at = (left * 2).max(PRUNE_FLOOR);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::route::PathTemplate;

    fn per_second(count: u32) -> WindowLimit {
        WindowLimit {
            count,
            window: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_window_opens_at_the_first_request_and_admits_count_requests() {
        let t0 = Instant::now();
        let limit = per_second(2);
        let mut w = FixedWindow::default();
        for _ in 0..2 {
            assert_eq!(w.check(t0, limit), Ok(()));
            w.commit(t0, limit);
        }
        let later = t0 + Duration::from_millis(300);
        assert_eq!(
            w.check(later, limit),
            Err(Duration::from_millis(700)),
            "the third request waits for the end of the window that opened at t0"
        );
        let next = t0 + Duration::from_secs(1);
        assert_eq!(w.check(next, limit), Ok(()), "the window ends at t0 + 1 s");
        w.commit(next, limit);
        assert_eq!(
            w.count, 1,
            "the first request after the end opens a new window"
        );
        assert_eq!(w.start, Some(next));
    }

    #[test]
    fn the_token_limit_is_per_token_and_refusals_are_not_counted() {
        let limiter = Limiter::new(2, Vec::new());
        let t0 = Instant::now();
        assert!(limiter.admit(t0, "a", "GET", "/api/v2/x").is_ok());
        assert!(limiter.admit(t0, "a", "GET", "/api/v2/x").is_ok());
        let refused = limiter
            .admit(t0 + Duration::from_secs(10), "a", "GET", "/api/v2/x")
            .unwrap_err();
        assert_eq!(refused.limit, "token.rate.per.minute");
        assert_eq!(
            refused.retry_after, 50,
            "60 s window opened at t0, asked at t0+10s"
        );
        assert!(
            limiter.admit(t0, "b", "GET", "/api/v2/x").is_ok(),
            "another token has its own window"
        );
        // Many refusals later, the window still ends at t0 + 60 s: refusals did not count.
        for s in 11..60 {
            assert!(limiter
                .admit(t0 + Duration::from_secs(s), "a", "GET", "/x")
                .is_err());
        }
        assert!(limiter
            .admit(t0 + Duration::from_secs(60), "a", "GET", "/x")
            .is_ok());
    }

    #[test]
    fn a_request_refused_by_a_route_limit_does_not_use_the_token_window() {
        let route = RouteLimit {
            name: "presence".into(),
            method: Some("PATCH".into()),
            path: PathTemplate::parse("/api/v2/users/{u}/presences/{s}").unwrap(),
            limit: per_second(1),
            per: LimitScope::Org,
        };
        let limiter = Limiter::new(3, vec![route]);
        let t0 = Instant::now();
        let p = "/api/v2/users/u/presences/purecloud";
        assert!(limiter.admit(t0, "a", "PATCH", p).is_ok());
        let refused = limiter.admit(t0, "b", "PATCH", p).unwrap_err();
        assert_eq!(
            refused.limit, "presence",
            "the org-wide route window is shared"
        );
        assert_eq!(refused.retry_after, 1);
        assert!(
            limiter.admit(t0, "a", "GET", p).is_ok(),
            "another method is outside the route limit"
        );
        assert!(limiter.admit(t0, "a", "GET", p).is_ok());
        assert_eq!(
            limiter.admit(t0, "a", "GET", p).unwrap_err().limit,
            "token.rate.per.minute",
            "token a used exactly 3: the refused PATCH of b was not counted for a or b"
        );
        assert!(limiter
            .admit(t0 + Duration::from_secs(1), "b", "PATCH", p)
            .is_ok());
    }

    #[test]
    fn expired_windows_of_forgotten_tokens_are_pruned() {
        let limiter = Limiter::new(300, Vec::new());
        let t0 = Instant::now();
        // One short of the threshold, so the next new token triggers the prune.
        for i in 0..PRUNE_FLOOR - 1 {
            limiter.admit(t0, &format!("t{i}"), "GET", "/x").unwrap();
        }
        limiter
            .admit(t0 + Duration::from_secs(61), "fresh", "GET", "/x")
            .unwrap();
        assert_eq!(limiter.state.lock().per_token.len(), 1);
    }
}
