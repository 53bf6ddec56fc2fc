//! Coalescing: single updates grouped into batches for one bulk call each. Pure: no sockets,
//! time is passed in. Invariant: a batch holds updates of one key (token) only, never two of
//! one user, and a user's next update joins no batch while the previous one is still open or
//! in flight, so each user's updates reach the API in the order they came.
//!
//! Per key there is at most one *open* batch. It asks for a slot once it is full or its first
//! update has waited `window` ([`Batcher::ready_at`]), and keeps taking updates (up to
//! `max_batch`) until the slot is granted and it is sealed ([`Batcher::seal`]): the longer the
//! wait for a slot, the fuller the batch. Updates that cannot join (their user is busy, or the
//! batch is full) wait in arrival order and fill the next batch.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// One update waiting for a batch: the user it sets and what the caller keeps with it.
#[derive(Debug)]
struct Waiting<T> {
    user: String,
    arrived: Instant,
    item: T,
}

/// One key's updates: the open batch, those waiting for a later one, the users in flight.
#[derive(Debug)]
struct Lane<T> {
    open: Vec<Waiting<T>>,
    /// When the open batch's oldest update arrived.
    first: Option<Instant>,
    later: VecDeque<Waiting<T>>,
    /// Users of the open batch and of sealed batches not yet [`Batcher::done`].
    busy: HashSet<String>,
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Lane {
            open: Vec::new(),
            first: None,
            later: VecDeque::new(),
            busy: HashSet::new(),
        }
    }
}

impl<T> Lane<T> {
    /// Moves waiting updates into the open batch, oldest first, as far as room and busy users
    /// allow. A user skipped once blocks its own later updates, so its order is kept.
    fn refill(&mut self, max_batch: usize) {
        let mut blocked = HashSet::new();
        let mut kept = VecDeque::with_capacity(self.later.len());
        while let Some(w) = self.later.pop_front() {
            if self.open.len() < max_batch
                && !self.busy.contains(&w.user)
                && !blocked.contains(&w.user)
            {
                self.join(w);
            } else {
                blocked.insert(w.user.clone());
                kept.push_back(w);
            }
        }
        self.later = kept;
    }

    fn join(&mut self, w: Waiting<T>) {
        self.first = Some(self.first.map_or(w.arrived, |f| f.min(w.arrived)));
        self.busy.insert(w.user.clone());
        self.open.push(w);
    }

    fn is_idle(&self) -> bool {
        self.open.is_empty() && self.later.is_empty() && self.busy.is_empty()
    }
}

/// The updates of every key, grouped into batches.
#[derive(Debug)]
pub struct Batcher<K, T> {
    window: Duration,
    max_batch: usize,
    lanes: HashMap<K, Lane<T>>,
    waiting: usize,
}

impl<K: Hash + Eq + Clone, T> Batcher<K, T> {
    /// `max_batch` is at least 1.
    pub fn new(window: Duration, max_batch: usize) -> Self {
        Batcher {
            window,
            max_batch: max_batch.max(1),
            lanes: HashMap::new(),
            waiting: 0,
        }
    }

    /// A reload's new `window` and `max_batch`; batches already open keep what they hold.
    pub fn reconfigure(&mut self, window: Duration, max_batch: usize) {
        self.window = window;
        self.max_batch = max_batch.max(1);
    }

    /// An update of `user` under `key` arrives. Returns how many updates of this key are
    /// waiting (open batch and later ones), this one included.
    pub fn push(&mut self, key: &K, user: &str, item: T, now: Instant) -> usize {
        let max_batch = self.max_batch;
        let lane = self.lanes.entry(key.clone()).or_default();
        let w = Waiting {
            user: user.to_string(),
            arrived: now,
            item,
        };
        let blocked = lane.later.iter().any(|l| l.user == user);
        if lane.open.len() < max_batch && !lane.busy.contains(user) && !blocked {
            lane.join(w);
        } else {
            lane.later.push_back(w);
        }
        self.waiting += 1;
        lane.open.len() + lane.later.len()
    }

    /// When the key's open batch asks for a slot: now once it is full, else when its first
    /// update has waited `window`. `None`: no open batch.
    pub fn ready_at(&self, key: &K) -> Option<Instant> {
        let lane = self.lanes.get(key)?;
        let first = lane.first?;
        if lane.open.len() >= self.max_batch {
            Some(first)
        } else {
            Some(first + self.window)
        }
    }

    /// The key's open batch leaves (its slot is granted): its updates, oldest first. Its users
    /// stay busy until [`Batcher::done`]; the updates waiting behind it open the next batch.
    pub fn seal(&mut self, key: &K) -> Vec<(String, T)> {
        let max_batch = self.max_batch;
        let Some(lane) = self.lanes.get_mut(key) else {
            return Vec::new();
        };
        let batch: Vec<(String, T)> = lane.open.drain(..).map(|w| (w.user, w.item)).collect();
        lane.first = None;
        lane.refill(max_batch);
        self.waiting -= batch.len();
        batch
    }

    /// Updates of the open batch that no longer wait (their clients left) are dropped; `keep`
    /// says which stay. Their users are free again.
    pub fn retain(&mut self, key: &K, mut keep: impl FnMut(&T) -> bool) {
        let max_batch = self.max_batch;
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        let before = lane.open.len() + lane.later.len();
        let (stay, gone): (Vec<_>, Vec<_>) = lane.open.drain(..).partition(|w| keep(&w.item));
        for w in &gone {
            lane.busy.remove(&w.user);
        }
        lane.open = stay;
        lane.later.retain(|w| keep(&w.item));
        lane.first = lane.open.iter().map(|w| w.arrived).min();
        lane.refill(max_batch);
        self.waiting -= before - (lane.open.len() + lane.later.len());
        if lane.is_idle() {
            self.lanes.remove(key);
        }
    }

    /// Takes back the first waiting update (open batch or later) that `is` picks, when its
    /// request ended before its batch left; whether there was one. Its user is free again only
    /// if it was in the open batch (a later update never made it busy).
    pub fn remove(&mut self, key: &K, mut is: impl FnMut(&T) -> bool) -> bool {
        let max_batch = self.max_batch;
        let Some(lane) = self.lanes.get_mut(key) else {
            return false;
        };
        if let Some(i) = lane.open.iter().position(|w| is(&w.item)) {
            let w = lane.open.remove(i);
            lane.busy.remove(&w.user);
            lane.first = lane.open.iter().map(|w| w.arrived).min();
        } else if let Some(i) = lane.later.iter().position(|w| is(&w.item)) {
            lane.later.remove(i);
        } else {
            return false;
        }
        self.waiting -= 1;
        lane.refill(max_batch);
        if lane.is_idle() {
            self.lanes.remove(key);
        }
        true
    }

    /// The updates of `users` (from a sealed batch) are answered: their next updates may join.
    pub fn done<'a>(&mut self, key: &K, users: impl IntoIterator<Item = &'a str>) {
        let max_batch = self.max_batch;
        let Some(lane) = self.lanes.get_mut(key) else {
            return;
        };
        for u in users {
            lane.busy.remove(u);
        }
        lane.refill(max_batch);
        if lane.is_idle() {
            self.lanes.remove(key);
        }
    }

    /// Updates waiting for a batch to leave, all keys together.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// Updates of `key` waiting for a batch to leave.
    pub fn waiting_of(&self, key: &K) -> usize {
        self.lanes
            .get(key)
            .map_or(0, |l| l.open.len() + l.later.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn users<T>(batch: &[(String, T)]) -> Vec<&str> {
        batch.iter().map(|(u, _)| u.as_str()).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_is_ready_after_the_window_or_once_full() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 3);
        assert_eq!(b.ready_at(&"k"), None);
        b.push(&"k", "a", 1, t0);
        b.push(&"k", "b", 2, t0 + 4 * MS);
        assert_eq!(
            b.ready_at(&"k"),
            Some(t0 + 10 * MS),
            "the first update's window"
        );
        b.push(&"k", "c", 3, t0 + 5 * MS);
        assert_eq!(b.ready_at(&"k"), Some(t0), "full: at once");
        let batch = b.seal(&"k");
        assert_eq!(users(&batch), ["a", "b", "c"]);
        assert_eq!(b.ready_at(&"k"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_never_share_a_batch() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 50);
        b.push(&"token-1", "a", 1, t0);
        b.push(&"token-2", "b", 2, t0);
        b.push(&"token-1", "c", 3, t0);
        assert_eq!(users(&b.seal(&"token-1")), ["a", "c"]);
        assert_eq!(users(&b.seal(&"token-2")), ["b"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_users_second_update_waits_for_the_next_batch_in_order() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 50);
        b.push(&"k", "a", "a1", t0);
        b.push(&"k", "b", "b1", t0);
        b.push(&"k", "a", "a2", t0 + MS);
        b.push(&"k", "a", "a3", t0 + 2 * MS);
        b.push(&"k", "c", "c1", t0 + 3 * MS);
        let first = b.seal(&"k");
        assert_eq!(
            first.iter().map(|(_, t)| *t).collect::<Vec<_>>(),
            ["a1", "b1", "c1"]
        );
        // a is in flight: a2 waits for its answer, a3 waits behind a2
        assert_eq!(b.ready_at(&"k"), None);
        assert_eq!(b.waiting_of(&"k"), 2);
        b.done(&"k", ["a", "b", "c"]);
        assert_eq!(b.ready_at(&"k"), Some(t0 + MS + 10 * MS), "a2's window");
        assert_eq!(
            b.seal(&"k").into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
            ["a2"]
        );
        b.done(&"k", ["a"]);
        assert_eq!(
            b.seal(&"k").into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
            ["a3"]
        );
        b.done(&"k", ["a"]);
        assert_eq!(b.waiting(), 0);
        assert!(b.lanes.is_empty(), "an idle key is forgotten");
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_keeps_filling_until_sealed_and_the_rest_opens_the_next() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 2);
        for (i, u) in ["a", "b", "c", "d", "e"].iter().enumerate() {
            b.push(&"k", u, i, t0 + i as u32 * MS);
        }
        assert_eq!(users(&b.seal(&"k")), ["a", "b"]);
        // c and d waited already: the next batch is full, so ready at once
        assert_eq!(b.ready_at(&"k"), Some(t0 + 2 * MS));
        assert_eq!(users(&b.seal(&"k")), ["c", "d"]);
        assert_eq!(users(&b.seal(&"k")), ["e"]);
        assert_eq!(b.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn updates_whose_clients_left_are_dropped() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 50);
        b.push(&"k", "a", 1, t0);
        b.push(&"k", "b", 2, t0 + MS);
        b.push(&"k", "a", 3, t0 + 2 * MS);
        b.retain(&"k", |&i| i != 1);
        // a's first update left: its second takes its place
        assert_eq!(b.ready_at(&"k"), Some(t0 + MS + 10 * MS));
        let batch = b.seal(&"k");
        assert_eq!(batch.iter().map(|(_, t)| *t).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(b.waiting(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn an_update_taken_back_frees_its_user_only_if_it_held_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(10 * MS, 50);
        b.push(&"k", "a", 1, t0);
        assert_eq!(users(&b.seal(&"k")), ["a"]);
        b.push(&"k", "a", 2, t0 + MS);
        b.push(&"k", "a", 3, t0 + 2 * MS);
        // 2 waits behind the 1 in flight; taking it back leaves a busy (1 is still in flight)
        assert!(b.remove(&"k", |&i| i == 2));
        assert!(!b.remove(&"k", |&i| i == 2));
        assert_eq!(b.ready_at(&"k"), None, "a is still in flight");
        b.done(&"k", ["a"]);
        assert_eq!(
            b.seal(&"k").into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
            [3]
        );
        b.push(&"k", "b", 4, t0 + 3 * MS);
        b.push(&"k", "b", 5, t0 + 4 * MS);
        // 4 held b in the open batch: taken back, 5 takes its place
        assert!(b.remove(&"k", |&i| i == 4));
        assert_eq!(
            b.seal(&"k").into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
            [5]
        );
    }

    proptest::proptest! {
        /// Whatever arrives, batches hold one update per user and at most `max_batch`, each
        /// user's updates leave in arrival order, and every update leaves exactly once.
        #[test]
        fn batches_keep_users_apart_and_in_order(
            users in proptest::collection::vec(0u8..6, 1..120),
            max_batch in 1usize..8,
            answer_every in 1usize..4,
        ) {
            let t0 = Instant::now();
            let mut b = Batcher::new(10 * MS, max_batch);
            let mut sent: Vec<(String, usize)> = Vec::new();
            let mut in_flight: Vec<Vec<String>> = Vec::new();
            for (i, u) in users.iter().enumerate() {
                b.push(&0, &u.to_string(), i, t0);
                if i % answer_every == 0 {
                    let batch = b.seal(&0);
                    proptest::prop_assert!(batch.len() <= max_batch);
                    let mut seen = HashSet::new();
                    for (u, _) in &batch {
                        proptest::prop_assert!(seen.insert(u.clone()), "two updates of {} in one batch", u);
                    }
                    in_flight.push(batch.iter().map(|(u, _)| u.clone()).collect());
                    sent.extend(batch);
                    if in_flight.len() > 1 {
                        let done = in_flight.remove(0);
                        b.done(&0, done.iter().map(String::as_str));
                    }
                }
            }
            loop {
                for done in in_flight.drain(..) {
                    b.done(&0, done.iter().map(String::as_str));
                }
                let batch = b.seal(&0);
                if batch.is_empty() {
                    break;
                }
                in_flight.push(batch.iter().map(|(u, _)| u.clone()).collect());
                sent.extend(batch);
            }
            proptest::prop_assert_eq!(sent.len(), users.len());
            proptest::prop_assert_eq!(b.waiting(), 0);
            for u in 0u8..6 {
                let order: Vec<usize> = sent.iter().filter(|(s, _)| *s == u.to_string()).map(|(_, i)| *i).collect();
                let mut sorted = order.clone();
                sorted.sort();
                proptest::prop_assert_eq!(order, sorted);
            }
        }
    }
}
