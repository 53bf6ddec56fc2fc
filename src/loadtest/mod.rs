//! Shift-change load generator: the `shiftgate loadtest` command and the HTTP load library the project's integration tests and benchmarks use.
//!
//! # Layout
//! - [`spec`]: what to send: [`LoadSpec`], [`Endpoint`], the agents' user ids and tokens.
//! - [`client`]: one keep-alive HTTP/1.1 connection per agent (http or https), reopened when the
//!   server closes it.
//! - [`org`]: a real org: client-credentials tokens, calls over a shared pool; secrets redacted.
//! - [`user_state`]: a user's presence or routing status, read and put back as found;
//!   [`real_org`]: a run against a real org (tokens, users, definitions, restoring users).
//! - [`runner`]: [`run`]: agents started along the ramp, SDK-style retries on 429, progress.
//! - [`stats`]: [`RequestRecord`], [`Summary`] (nearest-rank percentiles), [`rate_timeline`].
//! - [`charts`] and [`report`]: the summary table and the self-contained HTML report.
//! - [`cli`]: [`LoadtestArgs`] and [`main`], the subcommand itself.
//!
//! # Use from a test
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use shiftgate::loadtest::{run, LoadSpec};
//! let result = run(LoadSpec { target: "http://127.0.0.1:8080".into(), agents: 10, loops: 5, ..LoadSpec::default() }, None).await?;
//! let summary = result.summary();
//! assert_eq!(summary.by_status.get(&200), Some(&50));
//! # Ok(()) }
//! ```

pub mod charts;
pub mod cli;
pub mod client;
pub mod org;
pub mod real_org;
pub mod report;
pub mod runner;
pub mod spec;
pub mod stats;
pub mod user_state;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod testutil;

pub use cli::{execute, exit_code, main, EndpointArg, LoadtestArgs, LoadtestError};
pub use client::{Target, TargetError};
pub use report::{html_report, summary_table, write_html_report};
pub use runner::{run, sdk_retry_delay, Progress, ProgressFn, SdkRetry};
pub use spec::{bearer_token, user_id, Endpoint, LoadSpec, RealOrg, SpecError};
pub use stats::{
    latency_timeline, nearest_rank, rate_timeline, LatencyBucket, LoadResult, Percentiles,
    RequestRecord, Summary,
};
