//! The experiment against the org: steps of paced requests that end at their first 429s, the
//! probe that tells a token's limit from the org's, and the ledger of users to put back.
//!
//! Gentleness is enforced here, in one place: every request passes [`Run::admit`], which keeps
//! the total under `--max-requests` (less what restoring needs) and the 429s under `--max-429s`
//! (a request in flight may still be refused, so in-flight requests count as possible 429s); and
//! after a 429 nothing is sent with that token again, nor with any token while a shared limit's
//! `Retry-After` runs.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::Value;
use tokio::task::JoinSet;

use super::estimate::{fit_window, peak_rate, FoundLimit, Refusal, Scope, Shot, WindowFit};
use super::schedule::Schedule;
use crate::loadtest::org::{Org, OrgError, Reply, Token};
use crate::loadtest::user_state::{Found, StateEndpoint as Endpoint};

/// One request of the run, for the report and the latency figures.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the run started.
    pub at: f64,
    pub latency_ms: f64,
    pub status: u16,
    pub phase: &'static str,
}

/// A user discovery may touch: its id and what it was found as.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub found: Found,
}

/// The ramp a step starts from and how fast it grows; the cap keeps one token at what a busy
/// agent desk could send.
pub const RAMP_START: f64 = 1.0;
pub const RAMP_GROWTH: f64 = 1.5;
pub const ONE_TOKEN_CAP: f64 = 100.0;
pub const MANY_TOKENS_CAP: f64 = 2000.0;
/// Reads and restores use tokens of their own, each for at most this many requests, so they
/// never eat into a measured token's window nor reach a per-token limit themselves.
pub const HOUSEKEEPING_USES: usize = 5;
/// Reads and restores are paced at this rate at most.
pub const HOUSEKEEPING_RATE: f64 = 10.0;

/// The run's shared state.
pub struct Run {
    pub org: Org,
    pub endpoint: Endpoint,
    pub users: Vec<User>,
    started: Instant,
    max_requests: usize,
    max_429s: usize,
    sent: AtomicUsize,
    refused: AtomicUsize,
    in_flight: AtomicUsize,
    next_user: AtomicUsize,
    touched: Mutex<HashSet<usize>>,
    samples: Mutex<Vec<Sample>>,
    /// Nothing is sent before this: a shared limit's `Retry-After`.
    hold_until: Mutex<Option<Instant>>,
    phase: Mutex<&'static str>,
    house: tokio::sync::Mutex<(Option<Token>, usize)>,
}

/// What a step saw.
struct StepResult {
    shots: Vec<Shot>,
    first: Option<Refusal>,
    key: Option<String>,
    /// The tokens it refused, by their index within the step.
    refused_tokens: usize,
    peak_schedule_rate: f64,
    /// When the latest `Retry-After` it was given runs out; the caller holds the org until then
    /// when the limit is shared.
    retry_until: Option<(Instant, u64)>,
}

/// A ramp's first reading of a limit, before a run into a fresh window may pin it.
struct Rough {
    fit: WindowFit,
    refusal: Refusal,
    /// The ramp's rate when it was last answered.
    peak: f64,
    key: Option<String>,
}

/// The limits found, and what they rest on.
#[derive(Debug, Clone, Default)]
pub struct Findings {
    pub token: Option<FoundLimit>,
    pub org: Option<FoundLimit>,
    /// How the scope of the first refusal was told (`probe`, `tokens`), for the summary.
    pub notes: Vec<String>,
}

impl Run {
    pub fn new(org: Org, endpoint: Endpoint, max_requests: usize, max_429s: usize) -> Run {
        Run {
            org,
            endpoint,
            users: Vec::new(),
            started: Instant::now(),
            max_requests,
            max_429s,
            sent: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            next_user: AtomicUsize::new(0),
            touched: Mutex::new(HashSet::new()),
            samples: Mutex::new(Vec::new()),
            hold_until: Mutex::new(None),
            phase: Mutex::new("login"),
            house: tokio::sync::Mutex::new((None, 0)),
        }
    }

    pub fn requests_sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }

    pub fn upstream_429s(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }

    pub fn users_touched(&self) -> usize {
        self.touched.lock().len()
    }

    pub fn samples(&self) -> Vec<Sample> {
        self.samples.lock().clone()
    }

    pub fn phase(&self) -> &'static str {
        *self.phase.lock()
    }

    pub fn set_phase(&self, phase: &'static str) {
        *self.phase.lock() = phase;
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// What the experiment may still send: the budget less a restore for every user.
    fn experiment_budget(&self) -> usize {
        self.max_requests
            .saturating_sub(self.requests_sent())
            .saturating_sub(self.users.len())
    }

    /// Waits out a shared limit's `Retry-After`.
    async fn wait_hold(&self) {
        let until = *self.hold_until.lock();
        if let Some(until) = until {
            tokio::time::sleep_until(until.into()).await;
        }
    }

    fn hold(&self, from: Instant, retry_after: u64) {
        // A quarter second past the end: the window has surely ended by then.
        let until = from + Duration::from_secs(retry_after) + Duration::from_millis(250);
        let mut hold = self.hold_until.lock();
        if hold.is_none_or(|h| h < until) {
            *hold = Some(until);
        }
    }

    /// Sends one API request and records it. Every request of the run goes through here.
    async fn send(
        &self,
        token: &Token,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(f64, Reply), OrgError> {
        self.sent.fetch_add(1, Ordering::SeqCst);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        let at = self.elapsed();
        let reply = self.org.call(token, method, path, body).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let reply = reply?;
        if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
            self.refused.fetch_add(1, Ordering::SeqCst);
        }
        self.samples.lock().push(Sample {
            at,
            latency_ms: reply.latency.as_secs_f64() * 1000.0,
            status: reply.status.as_u16(),
            phase: self.phase(),
        });
        Ok((at, reply))
    }

    /// A housekeeping token, fresh every [`HOUSEKEEPING_USES`] requests.
    async fn house_token(&self) -> Result<Token, OrgError> {
        let mut house = self.house.lock().await;
        if house.0.is_none() || house.1 >= HOUSEKEEPING_USES {
            *house = (Some(self.org.mint().await?), 0);
        }
        house.1 += 1;
        Ok(house.0.clone().expect("set above"))
    }

    /// A GET for the reads, with a housekeeping token; a 429 is waited out and retried.
    pub async fn house_read(&self, path: &str) -> Result<Reply, OrgError> {
        for _ in 0..5 {
            let token = self.house_token().await?;
            let (_, reply) = self.send(&token, http::Method::GET, path, None).await?;
            match reply.retry_after {
                Some(after) if reply.status == http::StatusCode::TOO_MANY_REQUESTS => {
                    self.house.lock().await.0 = None;
                    tokio::time::sleep(Duration::from_secs(after)).await;
                }
                _ => return Ok(reply),
            }
        }
        Err(OrgError::Unexpected {
            what: format!("GET {path}"),
            status: 429,
            message: "still refused after five waits".into(),
        })
    }

    /// Reads every candidate's state; only users whose state could be read are kept.
    pub async fn read_users(&mut self, ids: Vec<String>) -> Result<(), OrgError> {
        let mut users = Vec::new();
        for id in ids {
            let started = Instant::now();
            let reply = self.house_read(&self.endpoint.path(&id)).await?;
            if reply.status == http::StatusCode::OK {
                if let Some(found) = self.endpoint.found(&reply.body) {
                    users.push(User { id, found });
                }
            } else {
                tracing::warn!(user = %id, status = reply.status.as_u16(), "cannot read this user's state: it is left alone");
            }
            pace(started, HOUSEKEEPING_RATE).await;
        }
        self.users = users;
        Ok(())
    }

    /// The experiment: a token's limit, then the org's. Each step ends at its first 429s.
    pub async fn measure(self: &Arc<Self>) -> Result<Findings, OrgError> {
        let mut findings = Findings::default();
        let budget = self.experiment_budget();
        // The first phase may use at most 60 % of the budget, so the org's phase has its share.
        let phase_a = budget * 6 / 10;

        self.set_phase("one token");
        let ramp = Schedule::Ramp {
            start: RAMP_START,
            growth: RAMP_GROWTH,
            cap: ONE_TOKEN_CAP,
        };
        let s1 = self.step(ramp, phase_a, None).await?;
        let single_token_admitted = s1.shots.iter().filter(|s| s.admitted).count();
        let Some(refusal) = s1.first else {
            findings.token = Some(lower_bound(Scope::Token, &s1.shots));
            findings
                .notes
                .push("one token was never refused within the budget".into());
            let per_token = (single_token_admitted / 2).max(1);
            findings.org = self.org_phase(per_token, 1.0, &mut findings.notes).await?;
            return Ok(findings);
        };
        let fit1 = fit_window(&s1.shots, refusal);
        // Was that the token's own limit or one all tokens share? Ask once with another token.
        self.set_phase("probe");
        let scope = self.probe().await?;
        if let (Scope::Org, Some((sent, retry_after))) = (scope, s1.retry_until) {
            self.hold(sent, retry_after);
        }
        findings.notes.push(format!(
            "the first 429 of one token was {}: another token was {} right after",
            match scope {
                Scope::Token => "its own limit",
                Scope::Org => "a limit shared by the org",
            },
            match scope {
                Scope::Token => "answered",
                Scope::Org => "refused too",
            }
        ));
        let Some(fit1) = fit1 else {
            findings.token = Some(lower_bound(Scope::Token, &s1.shots));
            return Ok(findings);
        };
        self.set_phase(match scope {
            Scope::Token => "one token: fresh window",
            Scope::Org => "org: fresh window",
        });
        let (fit, key) = self
            .confirm(
                Rough {
                    fit: fit1,
                    refusal,
                    peak: s1.peak_schedule_rate,
                    key: s1.key,
                },
                ONE_TOKEN_CAP,
                None,
                scope,
            )
            .await?;
        let mut limit = FoundLimit::measured(scope, fit);
        limit.key = key;
        match scope {
            Scope::Token => {
                let per_token = (fit.requests as usize / 2).max(1);
                let start = fit.per_second().max(RAMP_START);
                findings.token = Some(limit);
                findings.org = self
                    .org_phase(per_token, start, &mut findings.notes)
                    .await?;
            }
            Scope::Org => {
                findings.org = Some(limit);
                findings.token = Some(lower_bound(Scope::Token, &s1.shots));
            }
        }
        Ok(findings)
    }

    /// Many tokens, each kept to half its own limit, ramping until the org's limit answers.
    async fn org_phase(
        self: &Arc<Self>,
        per_token: usize,
        start: f64,
        notes: &mut Vec<String>,
    ) -> Result<Option<FoundLimit>, OrgError> {
        self.set_phase("many tokens");
        self.wait_hold().await;
        let ramp = Schedule::Ramp {
            start,
            growth: RAMP_GROWTH,
            cap: MANY_TOKENS_CAP,
        };
        // Keep a share for the fresh-window run that may follow.
        let budget = self.experiment_budget() * 7 / 10;
        let s = self.step(ramp, budget, Some(per_token)).await?;
        if let Some((sent, retry_after)) = s.retry_until {
            self.hold(sent, retry_after);
        }
        let Some(refusal) = s.first else {
            notes.push(format!(
                "many tokens ({per_token} requests each at most) were never refused within the budget"
            ));
            return Ok(Some(lower_bound(Scope::Org, &s.shots)));
        };
        notes.push(format!(
            "{} token(s), each far below its own limit, were refused at once: the org's limit",
            s.refused_tokens
        ));
        let Some(fit) = fit_window(&s.shots, refusal) else {
            return Ok(Some(lower_bound(Scope::Org, &s.shots)));
        };
        self.set_phase("many tokens: fresh window");
        let (fit, key) = self
            .confirm(
                Rough {
                    fit,
                    refusal,
                    peak: s.peak_schedule_rate,
                    key: s.key,
                },
                MANY_TOKENS_CAP,
                Some(per_token),
                Scope::Org,
            )
            .await?;
        let mut limit = FoundLimit::measured(Scope::Org, fit);
        limit.key = key;
        Ok(Some(limit))
    }

    /// A step into a fresh window when a ramp's answer is ambiguous (a short `Retry-After`):
    /// a constant rate above the limit, so the first 429 comes inside the window that the first
    /// request opened, and `Retry-After` then tells its end.
    async fn confirm(
        self: &Arc<Self>,
        rough: Rough,
        cap: f64,
        per_token: Option<usize>,
        scope: Scope,
    ) -> Result<(WindowFit, Option<String>), OrgError> {
        let Rough {
            fit,
            refusal,
            peak,
            key,
        } = rough;
        if !fit.ambiguous && refusal.retry_after > 2 {
            return Ok((fit, key));
        }
        self.wait_hold().await;
        let rate = peak.max(2.0 * fit.per_second()).min(cap);
        let budget = (2 * fit.requests as usize + 20).min(self.experiment_budget());
        let s = self
            .step(Schedule::Constant { rate }, budget, per_token)
            .await?;
        if let (Scope::Org, Some((sent, retry_after))) = (scope, s.retry_until) {
            self.hold(sent, retry_after);
        }
        match s.first.and_then(|r| fit_window(&s.shots, r)) {
            Some(confirmed) => Ok((confirmed, s.key.or(key))),
            None => Ok((fit, key)),
        }
    }

    /// One token (fresh) asks once; whether it is answered tells the scope.
    async fn probe(&self) -> Result<Scope, OrgError> {
        if self.experiment_budget() == 0 || self.upstream_429s() >= self.max_429s {
            return Ok(Scope::Token);
        }
        let token = self.org.mint().await?;
        let (user, body) = self.next_user();
        let (at, reply) = self
            .send(
                &token,
                self.endpoint.method(),
                &self.endpoint.path(&user),
                Some(&body),
            )
            .await?;
        if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
            self.hold(
                self.started + Duration::from_secs_f64(at),
                reply.retry_after.unwrap_or(1),
            );
            Ok(Scope::Org)
        } else {
            Ok(Scope::Token)
        }
    }

    fn next_user(&self) -> (String, Value) {
        let i = self.next_user.fetch_add(1, Ordering::SeqCst) % self.users.len();
        self.touched.lock().insert(i);
        let user = &self.users[i];
        (user.id.clone(), user.found.body(&user.id))
    }

    /// Sends on `schedule` until the first 429, `max_requests`, or a bound of the run. With
    /// `per_token`, a fresh token every `per_token` requests; else one fresh token.
    async fn step(
        self: &Arc<Self>,
        schedule: Schedule,
        max_requests: usize,
        per_token: Option<usize>,
    ) -> Result<StepResult, OrgError> {
        struct Shared {
            shots: Mutex<Vec<Shot>>,
            first: Mutex<Option<(Refusal, Option<String>)>>,
            refused_tokens: Mutex<HashSet<usize>>,
            stop: AtomicBool,
            last_admitted: Mutex<f64>,
            retry_until: Mutex<Option<(Instant, u64)>>,
        }
        let shared = Arc::new(Shared {
            shots: Mutex::new(Vec::new()),
            first: Mutex::new(None),
            refused_tokens: Mutex::new(HashSet::new()),
            stop: AtomicBool::new(false),
            last_admitted: Mutex::new(0.0),
            retry_until: Mutex::new(None),
        });
        let start = Instant::now();
        let step_origin = self.elapsed();
        let mut tasks = JoinSet::new();
        let mut tokens: Vec<Token> = Vec::new();
        let mut uses = 0usize;
        let mut error = None;
        for n in 0..max_requests {
            let due = start + Duration::from_secs_f64(schedule.due(n));
            tokio::time::sleep_until(due.into()).await;
            if shared.stop.load(Ordering::SeqCst) || self.experiment_budget() == 0 {
                break;
            }
            // Every request in flight may yet be refused: never let them pass --max-429s.
            while self.upstream_429s() + self.in_flight.load(Ordering::SeqCst) >= self.max_429s
                && !shared.stop.load(Ordering::SeqCst)
            {
                if self.in_flight.load(Ordering::SeqCst) == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            if shared.stop.load(Ordering::SeqCst) || self.upstream_429s() >= self.max_429s {
                break;
            }
            if tokens.is_empty() || per_token.is_some_and(|p| uses >= p) {
                match self.org.mint().await {
                    Ok(token) => tokens.push(token),
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
                uses = 0;
            }
            uses += 1;
            let token_index = tokens.len() - 1;
            let token = tokens[token_index].clone();
            let (user, body) = self.next_user();
            let run = self.clone();
            let shared = shared.clone();
            tasks.spawn(async move {
                let path = run.endpoint.path(&user);
                let (at, reply) = run
                    .send(&token, run.endpoint.method(), &path, Some(&body))
                    .await?;
                let at = at - step_origin;
                let admitted = reply.status.is_success();
                if admitted {
                    let mut last = shared.last_admitted.lock();
                    *last = last.max(at);
                }
                if admitted || reply.status == http::StatusCode::TOO_MANY_REQUESTS {
                    shared.shots.lock().push(Shot { at, admitted });
                }
                if reply.status == http::StatusCode::TOO_MANY_REQUESTS {
                    shared.stop.store(true, Ordering::SeqCst);
                    shared.refused_tokens.lock().insert(token_index);
                    let retry_after = reply.retry_after.unwrap_or(1);
                    let sent = run.started + Duration::from_secs_f64(at + step_origin);
                    let mut until = shared.retry_until.lock();
                    if until.is_none_or(|(u, r)| {
                        u + Duration::from_secs(r) < sent + Duration::from_secs(retry_after)
                    }) {
                        *until = Some((sent, retry_after));
                    }
                    drop(until);
                    let mut first = shared.first.lock();
                    if first.as_ref().is_none_or(|(f, _)| at < f.at) {
                        *first = Some((Refusal { at, retry_after }, reply.limit_key()));
                    }
                }
                Ok::<(), OrgError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok(Err(e)) = done {
                error.get_or_insert(e);
            }
        }
        if let Some(e) = error {
            return Err(e);
        }
        let first = shared.first.lock().take();
        let peak_schedule_rate = schedule.rate_at(*shared.last_admitted.lock());
        let shots = std::mem::take(&mut *shared.shots.lock());
        let refused_tokens = shared.refused_tokens.lock().len();
        let retry_until = *shared.retry_until.lock();
        Ok(StepResult {
            retry_until,
            shots,
            key: first.as_ref().and_then(|(_, k)| k.clone()),
            first: first.map(|(r, _)| r),
            refused_tokens,
            peak_schedule_rate,
        })
    }

    /// Puts every touched user back as found, paced below the limits found; a 429 is waited out
    /// and retried. Returns how many were restored.
    pub async fn restore(&self, rate: f64) -> usize {
        self.set_phase("restoring");
        self.wait_hold().await;
        let touched: Vec<usize> = {
            let mut t: Vec<usize> = self.touched.lock().iter().copied().collect();
            t.sort_unstable();
            t
        };
        let mut restored = 0;
        for i in touched {
            let user = &self.users[i];
            let body = user.found.body(&user.id);
            for _attempt in 0..6 {
                let started = Instant::now();
                let token = match self.house_token().await {
                    Ok(token) => token,
                    Err(e) => {
                        tracing::warn!(user = %user.id, error = %e, "restore: no token");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                match self
                    .send(
                        &token,
                        self.endpoint.method(),
                        &self.endpoint.path(&user.id),
                        Some(&body),
                    )
                    .await
                {
                    Ok((_, reply)) if reply.status.is_success() => {
                        restored += 1;
                        pace(started, rate).await;
                        break;
                    }
                    Ok((_, reply)) => {
                        let wait = reply.retry_after.unwrap_or(1);
                        self.house.lock().await.0 = None;
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    Err(e) => {
                        tracing::warn!(user = %user.id, error = %e, "restore failed; trying again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        restored
    }
}

/// Waits until `1/rate` seconds have passed since `started`.
async fn pace(started: Instant, rate: f64) {
    let due = started + Duration::from_secs_f64(1.0 / rate.max(0.1));
    tokio::time::sleep_until(due.into()).await;
}

/// What a step that met no limit shows: the limit is at least its busiest second.
fn lower_bound(scope: Scope, shots: &[Shot]) -> FoundLimit {
    let admitted: Vec<f64> = shots.iter().filter(|s| s.admitted).map(|s| s.at).collect();
    let span = match (
        admitted.iter().copied().reduce(f64::min),
        admitted.iter().copied().reduce(f64::max),
    ) {
        (Some(first), Some(last)) => last - first,
        _ => 0.0,
    };
    FoundLimit::at_least(scope, admitted.len() as u32, span, peak_rate(shots, 1.0))
}
