//! `shiftgate discover`: measures one endpoint's limits on a real org (per token and shared by
//! the org), leaves every user it touched as it found them, and writes a config.
//!
//! # Layout
//! - [`schedule`]: when the n-th request of a step is due (a capped geometric ramp, or constant).
//! - [`estimate`]: pure: the fixed window that a run of answers and its first 429 imply.
//! - the org itself is [`crate::loadtest::org`] (tokens, calls) and a user's state
//!   [`crate::loadtest::user_state`] (read, put back), shared with the load test.
//! - `experiment`: the steps, the scope probe, the bounds, restoring users.
//! - `output`: summary, `--json`, config.yaml, HTML report.
//!
//! The estimator and the schedule know nothing of sockets or clocks, so they are unit-tested on
//! simulated answers; the driver is tested against the emulator (`tests/discover.rs`).

pub mod estimate;
mod experiment;
mod output;
pub mod schedule;

use std::io::{IsTerminal as _, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub use crate::loadtest::user_state::StateEndpoint as Endpoint;
pub use estimate::{fit_window, FoundLimit, Refusal, Scope, Shot, WindowFit};
pub use output::{config_yaml, Report, GUARD_BAND};
pub use schedule::Schedule;

use crate::loadtest::org::{Org, OrgError, Secret};
use crate::loadtest::Target;
use experiment::{Run, HOUSEKEEPING_USES, ONE_TOKEN_CAP, RAMP_GROWTH, RAMP_START};
use output::{Latency, Listed};

/// Measure an org's limits for one endpoint (per token and org-wide) and write a config.
#[derive(Debug, Clone, clap::Args)]
pub struct DiscoverArgs {
    /// The API's base URL, e.g. https://api.mypurecloud.com (or an emulator's http://...)
    #[arg(long, value_name = "URL")]
    pub api: String,
    /// The login host's base URL, e.g. https://login.mypurecloud.com
    #[arg(long, value_name = "URL")]
    pub login: String,
    /// The OAuth client (client credentials grant)
    #[arg(long, value_name = "ID")]
    pub client_id: String,
    /// The environment variable that holds the client's secret (never given on the command line)
    #[arg(long, value_name = "VAR")]
    pub client_secret_env: String,
    /// The endpoint to measure
    #[arg(long, value_enum, default_value_t = Endpoint::Presence)]
    pub endpoint: Endpoint,
    /// The users to touch: a file with one user id per line
    #[arg(long, value_name = "FILE", conflicts_with = "users_from_api")]
    pub users: Option<PathBuf>,
    /// The users to touch: the first N of GET /api/v2/users [default: 25 when --users is absent]
    #[arg(long, value_name = "N")]
    pub users_from_api: Option<usize>,
    /// At most this many API requests in all (reads and restores included)
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub max_requests: usize,
    /// At most this many 429 answers
    #[arg(long = "max-429s", value_name = "N", default_value_t = 50)]
    pub max_429s: usize,
    /// Print exactly one JSON object on stdout, and nothing else there
    #[arg(long)]
    pub json: bool,
    /// Also write an HTML report with charts to FILE
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Also write the config.yaml built from the limits found to FILE
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the plan (phases, most requests, users touched) and send nothing
    #[arg(long)]
    pub dry_run: bool,
}

/// Users read from the API when neither `--users` nor `--users-from-api` is given.
pub const DEFAULT_USERS_FROM_API: usize = 25;

/// Why discovery could not run; [`exit_code`] maps it.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("{0}")]
    Org(#[from] OrgError),
    #[error("no users to touch: {0}")]
    NoUsers(String),
    #[error("{0}")]
    Io(String),
}

/// 2 for a usage error (the contract's code), 1 for anything else.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<DiscoverError>() {
        Some(DiscoverError::Usage(_)) => 2,
        _ => 1,
    }
}

/// Where users come from.
enum UserSource {
    File(Vec<String>),
    Api(usize),
}

/// The plan `--dry-run` prints.
pub fn plan_text(args: &DiscoverArgs, users: Option<usize>) -> String {
    let users_line = match (users, &args.users) {
        (Some(n), Some(path)) => format!("{n} users from {}", path.display()),
        _ => format!(
            "up to {} users from GET /api/v2/users",
            args.users_from_api.unwrap_or(DEFAULT_USERS_FROM_API)
        ),
    };
    let most_users = users.unwrap_or(args.users_from_api.unwrap_or(DEFAULT_USERS_FROM_API));
    format!(
        "shiftgate discover plan for {endpoint}\n\
  0. login: POST {login}/oauth/token (client credentials, client {client}); a fresh token for every {HOUSEKEEPING_USES} reads or restores, and as the experiment needs\n\
  1. read: the org limits API, presence definitions, {users_line}, each user's state (GET {read})\n\
  2. one token: from {RAMP_START}/s, x{RAMP_GROWTH} every second (at most {ONE_TOKEN_CAP}/s), until its first 429s; then one request with another token (its own limit or the org's?); a run into a fresh window if Retry-After was short\n\
  3. many tokens, each at most half its own limit: a ramp until the org's first 429s; a run into a fresh window if Retry-After was short\n\
  4. restore every touched user as found (definition and message, or routing status), also on Ctrl-C\n\
  bounds: at most {max} requests in all ({restore} kept for restoring), at most {max429} answers 429; every Retry-After honoured; users touched: at most {most_users}\n\
  sends nothing now (--dry-run)\n",
        endpoint = args.endpoint.describe(),
        login = args.login.trim_end_matches('/'),
        client = args.client_id,
        read = args.endpoint.path("{userId}"),
        max = args.max_requests,
        restore = most_users,
        max429 = args.max_429s,
    )
}

/// `shiftgate discover`.
pub async fn main(args: DiscoverArgs) -> anyhow::Result<()> {
    let api = Target::parse(&args.api).map_err(|e| DiscoverError::Usage(format!("--api: {e}")))?;
    let login =
        Target::parse(&args.login).map_err(|e| DiscoverError::Usage(format!("--login: {e}")))?;
    if args.max_requests == 0 {
        return Err(DiscoverError::Usage("--max-requests must be at least 1".into()).into());
    }
    let source = match (&args.users, args.users_from_api) {
        (Some(path), _) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                DiscoverError::NoUsers(format!("cannot read {}: {e}", path.display()))
            })?;
            let ids: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect();
            UserSource::File(ids)
        }
        (None, Some(0)) => {
            return Err(DiscoverError::Usage("--users-from-api must be at least 1".into()).into())
        }
        (None, n) => UserSource::Api(n.unwrap_or(DEFAULT_USERS_FROM_API)),
    };
    if args.dry_run {
        let users = match &source {
            UserSource::File(ids) => Some(ids.len()),
            UserSource::Api(_) => None,
        };
        print!("{}", plan_text(&args, users));
        return Ok(());
    }
    let secret = match std::env::var(&args.client_secret_env) {
        Ok(s) if !s.is_empty() => Secret::new(s),
        _ => {
            return Err(DiscoverError::Usage(format!(
                "--client-secret-env: the variable {} is unset or empty",
                args.client_secret_env
            ))
            .into())
        }
    };
    if let UserSource::File(ids) = &source {
        if ids.is_empty() {
            return Err(DiscoverError::NoUsers("the users file lists none".into()).into());
        }
    }

    let org = Org::new(api, login, args.client_id.clone(), secret);
    let mut run = Run::new(org, args.endpoint, args.max_requests, args.max_429s);
    // Login first: a refused client is the commonest mistake, and it costs nothing.
    run.org.mint().await.map_err(DiscoverError::from)?;

    let progress = progress_bar();
    run.set_phase("reading");
    let listed = read_listed_limits(&run).await?;
    if args.endpoint == Endpoint::Presence {
        run.house_read("/api/v2/presence/definitions")
            .await
            .map_err(DiscoverError::from)?;
    }
    let ids = match source {
        UserSource::File(ids) => ids,
        UserSource::Api(n) => list_users(&run, n).await?,
    };
    if ids.is_empty() {
        return Err(DiscoverError::NoUsers("GET /api/v2/users listed none".into()).into());
    }
    run.read_users(ids).await.map_err(DiscoverError::from)?;
    if run.users.is_empty() {
        return Err(DiscoverError::NoUsers("no user's state could be read".into()).into());
    }

    let run = Arc::new(run);
    let ticker = progress.clone().map(|bar| {
        let run = run.clone();
        tokio::spawn(async move {
            loop {
                bar.set_message(format!(
                    "{} | {:.0}s | sent {} | 429s {} | users touched {}",
                    run.phase(),
                    run.elapsed(),
                    run.requests_sent(),
                    run.upstream_429s(),
                    run.users_touched()
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });

    let (outcome, interrupted) = tokio::select! {
        outcome = run.measure() => (Some(outcome), false),
        _ = tokio::signal::ctrl_c() => (None, true),
    };
    let (findings, failure) = match outcome {
        Some(Ok(findings)) => (findings, None),
        Some(Err(e)) => (Default::default(), Some(e)),
        None => (Default::default(), None),
    };
    let slowest = [findings.token.as_ref(), findings.org.as_ref()]
        .into_iter()
        .flatten()
        .map(|l| l.per_second)
        .fold(f64::INFINITY, f64::min);
    let restore_rate = (slowest * 0.5).clamp(1.0, experiment::HOUSEKEEPING_RATE);
    let restored = run.restore(restore_rate).await;
    if let Some(t) = ticker {
        t.abort();
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }

    let token = findings.token.map(|t| match_listed(t, &listed));
    let org = findings.org;
    let config = config_yaml(
        &args.api,
        &args.login,
        args.endpoint,
        token.as_ref(),
        org.as_ref(),
    );
    let samples = run.samples();
    let report = Report {
        endpoint: args.endpoint.describe(),
        limits: token.into_iter().chain(org).collect(),
        requests_sent: run.requests_sent(),
        upstream_429s: run.upstream_429s(),
        latency_ms: Latency::of(&samples),
        users_touched: run.users_touched(),
        users_restored: restored,
        config,
        listed,
        notes: findings.notes,
        interrupted,
    };
    if let Some(path) = &args.config {
        std::fs::write(path, &report.config)
            .map_err(|e| DiscoverError::Io(format!("cannot write {}: {e}", path.display())))?;
    }
    if let Some(path) = &args.report {
        let html = output::html_report(&report, &samples).map_err(DiscoverError::Io)?;
        std::fs::write(path, html)
            .map_err(|e| DiscoverError::Io(format!("cannot write {}: {e}", path.display())))?;
    }
    let mut stdout = std::io::stdout().lock();
    if args.json {
        writeln!(stdout, "{}", serde_json::to_string(&report)?)?;
    } else {
        write!(stdout, "{}", output::summary(&report))?;
        if args.config.is_none() {
            writeln!(stdout, "\n{}", report.config)?;
        }
    }
    stdout.flush()?;
    if let Some(e) = failure {
        return Err(DiscoverError::from(e).into());
    }
    Ok(())
}

/// A live progress line on stderr, only for a person at a terminal (stdout stays the summary
/// or the one JSON object).
fn progress_bar() -> Option<ProgressBar> {
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    bar.set_style(ProgressStyle::with_template("{spinner} discover: {msg}").expect("template"));
    bar.enable_steady_tick(Duration::from_millis(120));
    Some(bar)
}

/// Everything the org limits API lists; empty when it is not available.
async fn read_listed_limits(run: &Run) -> Result<Vec<Listed>, DiscoverError> {
    let listing = run
        .house_read("/api/v2/organizations/limits/namespaces")
        .await?;
    if listing.status != http::StatusCode::OK {
        return Ok(Vec::new());
    }
    let names: Vec<String> = listing.body["entities"]
        .as_array()
        .map(|e| {
            e.iter()
                .filter_map(|n| n["name"].as_str().map(str::to_string))
                .take(20)
                .collect()
        })
        .unwrap_or_default();
    let mut listed = Vec::new();
    for name in names {
        let reply = run
            .house_read(&format!("/api/v2/organizations/limits/namespaces/{name}"))
            .await?;
        for limit in reply.body["entities"].as_array().into_iter().flatten() {
            if let (Some(key), Some(value)) = (limit["key"].as_str(), limit["value"].as_u64()) {
                listed.push(Listed {
                    namespace: name.clone(),
                    key: key.to_string(),
                    value,
                });
            }
        }
    }
    Ok(listed)
}

/// The per-token limit with what the org lists for client-credentials tokens (or any token).
fn match_listed(limit: FoundLimit, listed: &[Listed]) -> FoundLimit {
    let found = [
        "client.credentials.token.rate.per.minute",
        "token.rate.per.minute",
    ]
    .iter()
    .find_map(|key| listed.iter().find(|l| l.key == *key));
    match found {
        Some(l) => limit.with_listed(&l.key, l.value, 60.0),
        None => limit,
    }
}

/// The first `n` users of `GET /api/v2/users`, 100 a page.
async fn list_users(run: &Run, n: usize) -> Result<Vec<String>, DiscoverError> {
    let page_size = n.min(100);
    let mut ids = Vec::new();
    for page in 1.. {
        let reply = run
            .house_read(&format!(
                "/api/v2/users?pageSize={page_size}&pageNumber={page}"
            ))
            .await?;
        if reply.status != http::StatusCode::OK {
            return Err(DiscoverError::NoUsers(format!(
                "GET /api/v2/users answered {}",
                reply.status.as_u16()
            )));
        }
        let entities = reply.body["entities"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if entities.is_empty() {
            break;
        }
        ids.extend(
            entities
                .iter()
                .filter_map(|u| u["id"].as_str().map(str::to_string)),
        );
        if ids.len() >= n || reply.body["pageCount"].as_u64().is_some_and(|c| page >= c) {
            break;
        }
    }
    ids.truncate(n);
    Ok(ids)
}
