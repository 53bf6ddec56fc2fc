//! `shiftgate demo`: one shift change run three ways (straight at an emulated Genesys without
//! retry, straight at it with SDK-style retry, and through shiftgate) and the results side by
//! side; then one under a single token, paced and coalesced into bulk calls. Invariant: the proxy it starts is a child process that never outlives the demo, whether
//! it ends normally, on an error or on Ctrl-C / SIGTERM.
//!
//! Why a child process: Pingora's server can run only once per process and never returns
//! ([`crate::server::run`]), so the demo runs `shiftgate run --config <temp file>` from its own
//! binary and kills it at the end. The emulators run in-process, on a runtime of their own, so
//! that their clock does not depend on how busy the load generator is (they stand for a remote
//! API). Both are started by [`crate::harness`], as the integration tests start them. Each run
//! gets a fresh emulator: the same org, with no limit window left over from the run before.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};

use crate::config::Config;
use crate::emulator::{EmulatorConfig, StatsSnapshot};
use crate::harness::{EmulatorRuntime, ProxyChild, ProxyOptions};
use crate::loadtest::client::{AgentConnection, OutgoingRequest};
use crate::loadtest::{self, Endpoint, LoadSpec, Percentiles, Summary, Target};

/// `shiftgate demo`: no config needed; everything runs on loopback ports.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Agents changing their presence at once, one connection and one token each
    #[arg(long, value_name = "N", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=20_000))]
    pub agents: u32,
    /// Presence updates per agent
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1_000))]
    pub loops: u32,
    /// The emulated API's presence limit, per second for the whole org (shiftgate's presence
    /// budget is set to the same)
    #[arg(long, value_name = "PER_SECOND", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub limit: u32,
    /// Retries on 429 of the SDK-style client (it waits Retry-After seconds before each)
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub sdk_retries: u32,
}

/// Genesys's `token.rate.per.minute`, kept on in the emulator and as shiftgate's per-token budget.
const TOKEN_RATE_PER_MINUTE: u32 = 300;
/// Upstream connections opened through the proxy before the measured run, as a proxy in service
/// has them.
const WARM_CONNECTIONS: usize = 8;
const WARM_TOKEN: &str = "Bearer shiftgate-demo-warm-up";

/// Runs the demo and prints the comparison on stdout.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start a tokio runtime")?;
    runtime.block_on(async {
        tokio::select! {
            result = demo(&args) => result,
            signal = interrupted() => {
                // Dropping `demo` killed the proxy and stopped the emulators.
                print_now("\n");
                bail!("interrupted by {signal}; the proxy it started has been stopped")
            }
        }
    })
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM with its name.
async fn interrupted() -> &'static str {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "Ctrl-C",
        _ = async {
            match terminate.as_mut() {
                Some(t) => { t.recv().await; }
                None => std::future::pending::<()>().await,
            }
        } => "SIGTERM",
    }
}

/// One way of sending the shift change, and what came of it.
struct WayResult {
    title: &'static str,
    summary: Summary,
    api: StatsSnapshot,
}

async fn demo(args: &DemoArgs) -> anyhow::Result<()> {
    let agents = args.agents as usize;
    let loops = args.loops as usize;
    let limit = args.limit;
    let total = agents * loops;
    let ideal = Duration::from_secs_f64(total as f64 / f64::from(limit));
    let emulator_config = emulator_config(limit);

    let mut out = String::new();
    let _ = writeln!(out, "shiftgate demo: one shift change, sent three ways\n");
    let _ = writeln!(
        out,
        "The API: shiftgate's Genesys emulator, in this process, fresh for each run:\n  \
         presence changes (PATCH /api/v2/users/{{userId}}/presences/{{sourceId}}) limited to \
         {limit} per second\n  for the whole org (fixed 1 s windows), and \
         {TOKEN_RATE_PER_MINUTE} requests per minute per token\n  \
         (Genesys's token.rate.per.minute); a 429 carries Genesys's body and Retry-After;\n  \
         every answer takes 20-40 ms."
    );
    let _ = writeln!(
        out,
        "The load: {agents} agents change their presence {loops} {times} each, all starting at \
         once,\n  one keep-alive connection and one token per agent: {total} updates, ideally \
         {:.1} s at {limit}/s.",
        ideal.as_secs_f64(),
        times = if loops == 1 { "time" } else { "times" },
    );
    print_now(&out);

    let emulators = EmulatorRuntime::start(emulator_config, 3)?;
    let proxy_upstream = emulators.get(2).local_addr();
    let (proxy, max_wait) = start_proxy(proxy_upstream, args)
        .await
        .context("cannot start the proxy")?;
    print_now(&format!(
        "shiftgate: `{} run --config {}`\n  (a child process, pid {}) on http://{},\n  \
         budgets: presence {limit}/s (burst 1), per-token {TOKEN_RATE_PER_MINUTE}/min per \
         token; queue max_wait {}.\n\n",
        proxy.exe().display(),
        proxy.config_path().display(),
        proxy.pid(),
        proxy.addr(),
        humantime::format_duration(max_wait),
    ));

    let timeout = Duration::from_secs(30) + ideal * 2;
    let spec = |target: String, sdk_retry: u32| LoadSpec {
        target,
        agents,
        loops,
        ramp: Duration::ZERO,
        tokens: agents,
        endpoint: Endpoint::PresencePatch,
        timeout,
        think_time: Duration::ZERO,
        sdk_retry,
        extra_headers: Vec::new(),
        real_org: Default::default(),
    };
    let retries = args.sdk_retries;
    let runs: [(&'static str, String, String, u32, usize); 3] = [
        (
            "straight, no retry",
            "straight at the API, no retry on 429 (the JavaScript SDK; the others by default)"
                .to_string(),
            format!("http://{}", emulators.get(0).local_addr()),
            0,
            0,
        ),
        (
            "straight, SDK retry",
            format!(
                "straight at the API, SDK-style retry on 429 (wait Retry-After, at most {retries} \
                 retries)"
            ),
            format!("http://{}", emulators.get(1).local_addr()),
            retries,
            1,
        ),
        (
            "through shiftgate",
            "through shiftgate, the same SDK-style client".to_string(),
            proxy.url(),
            retries,
            2,
        ),
    ];

    let mut results = Vec::new();
    for (i, (title, what, target, sdk_retry, emulator)) in runs.into_iter().enumerate() {
        print_now(&format!("[{}/3] {what} ... ", i + 1));
        let api = emulators.get(emulator);
        if emulator == 2 {
            warm_up(proxy.addr()).await?;
        }
        api.reset_stats();
        let started = Instant::now();
        let result = loadtest::run(spec(target, sdk_retry), None).await?;
        print_now(&format!("{:.1} s\n", started.elapsed().as_secs_f64()));
        results.push(WayResult {
            title,
            summary: result.summary(),
            api: api.stats(),
        });
    }
    proxy.stop();

    let mut out = String::new();
    let _ = writeln!(out);
    out.push_str(&comparison(&results, ideal));
    let _ = writeln!(out);
    out.push_str(&conclusion(&results, ideal, total));
    print_now(&out);
    one_token(args).await
}

/// Agents of the one-token part, at most (paced, each update takes a fifth of a second).
const ONE_TOKEN_AGENTS: usize = 100;
/// The emulated bulk presence call's own limit, per token.
const BULK_PER_SECOND: u32 = 10;

/// One integration token sets every agent's presence: paced by Genesys's 300/min, then
/// coalesced into bulk calls, each through a fresh proxy and emulator.
async fn one_token(args: &DemoArgs) -> anyhow::Result<()> {
    let agents = (args.agents as usize).min(ONE_TOKEN_AGENTS);
    let per_second = f64::from(TOKEN_RATE_PER_MINUTE) / 60.0;
    let ideal = Duration::from_secs_f64(agents as f64 / per_second);
    print_now(&format!(
        "\nOne token: {agents} agents change their presence once, all under one integration's \
         token\n  (client credentials): {TOKEN_RATE_PER_MINUTE} requests per minute, ideally \
         {:.1} s one by one. Coalesced, shiftgate\n  sends them as bulk calls of up to 50 \
         (PUT /api/v2/users/presences/bulk, {BULK_PER_SECOND}/s per token in the emulator).\n\n",
        ideal.as_secs_f64()
    ));
    let emulators = EmulatorRuntime::start(one_token_emulator_config(), 2)?;
    let mut results = Vec::new();
    for (i, (title, coalesce)) in [("paced", false), ("coalesced", true)]
        .into_iter()
        .enumerate()
    {
        print_now(&format!("[{}/2] one token, {title} ... ", i + 1));
        let api = emulators.get(i);
        let upstream = api.local_addr();
        let exe = std::env::current_exe().context("cannot find this program's own path")?;
        let mut options = ProxyOptions::new(exe);
        options.rust_log = "warn".into();
        options.dir_prefix = "shiftgate-demo".into();
        let max_wait = ideal * 2 + Duration::from_secs(30);
        let proxy = ProxyChild::start(options, |listen, admin| {
            let text = one_token_proxy_config(listen, admin, upstream, coalesce, max_wait);
            Config::parse(&text).map_err(|e| anyhow::anyhow!("the demo's proxy config: {e}"))?;
            Ok(text)
        })
        .await
        .context("cannot start the proxy")?;
        warm_up(proxy.addr()).await?;
        api.reset_stats();
        let started = Instant::now();
        let spec = LoadSpec {
            target: proxy.url(),
            agents,
            loops: 1,
            ramp: Duration::ZERO,
            tokens: 1,
            endpoint: Endpoint::PresencePatch,
            timeout: max_wait + Duration::from_secs(30),
            think_time: Duration::ZERO,
            sdk_retry: 0,
            extra_headers: Vec::new(),
            real_org: Default::default(),
        };
        let result = loadtest::run(spec, None).await?;
        print_now(&format!("{:.1} s\n", started.elapsed().as_secs_f64()));
        proxy.stop();
        results.push(WayResult {
            title,
            summary: result.summary(),
            api: api.stats(),
        });
    }
    let mut out = String::new();
    let _ = writeln!(out);
    out.push_str(&comparison(&results, ideal));
    if let [paced, coalesced] = &results[..] {
        let _ = writeln!(
            out,
            "\n- Coalesced, the same {agents} updates took {} API requests instead of {}, and \
             {:.1} s instead of {:.1} s;\n  each agent still got its own answer \
             (X-Shiftgate-Batch says how many shared its bulk call).",
            coalesced.api.total_requests,
            paced.api.total_requests,
            coalesced.summary.completion_time.as_secs_f64(),
            paced.summary.completion_time.as_secs_f64(),
        );
    }
    print_now(&out);
    Ok(())
}

/// Genesys's per-token limit and the bulk presence call's own limit per token.
fn one_token_emulator_config() -> EmulatorConfig {
    let yaml = format!(
        r#"
token_rate_per_minute: {TOKEN_RATE_PER_MINUTE}
latency: {{ min: "20ms", max: "40ms" }}
route_limits:
  - name: bulk
    method: PUT
    path: "/api/v2/users/presences/bulk"
    limit: "{BULK_PER_SECOND}/s"
    per: token
"#
    );
    EmulatorConfig::from_yaml_str(&yaml).expect("the demo's emulator config is valid")
}

/// The one-token part's proxy: paced by the token's budget, its updates coalesced or not.
fn one_token_proxy_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    coalesce: bool,
    max_wait: Duration,
) -> String {
    let coalesce = if coalesce {
        "\n    coalesce: { into: presence-bulk, window: \"10ms\", max_batch: 50 }"
    } else {
        ""
    };
    format!(
        r#"# Written by `shiftgate demo`.
listen: "{listen}"
admin_listen: "{admin}"
upstreams:
  api: {{ url: "http://{upstream}" }}
budgets:
  per-token: {{ rate: "{TOKEN_RATE_PER_MINUTE}/min", per: token }}
  presence-bulk: {{ rate: "{BULK_PER_SECOND}/s", per: token }}
routes:
  - name: presence
    match: {{ method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}" }}
    budgets: [per-token]
    max_wait: "{max_wait}s"{coalesce}
  - name: presence-bulk
    match: {{ method: PUT, path: "/api/v2/users/presences/bulk" }}
    budgets: [presence-bulk, per-token]
  - name: default
    match: {{ path: "/**" }}
workers: 2
shutdown:
  drain_timeout: "1s"
"#,
        max_wait = max_wait.as_secs(),
    )
}

/// The emulated org: Genesys's per-token limit and an org-wide presence limit of `limit`/s.
fn emulator_config(limit: u32) -> EmulatorConfig {
    let yaml = format!(
        r#"
token_rate_per_minute: {TOKEN_RATE_PER_MINUTE}
latency: {{ min: "20ms", max: "40ms" }}
route_limits:
  - name: presence
    method: PATCH
    path: "/api/v2/users/{{userId}}/presences/{{sourceId}}"
    limit: "{limit}/s"
    per: org
"#
    );
    EmulatorConfig::from_yaml_str(&yaml).expect("the demo's emulator config is valid")
}

/// The side-by-side table: one column per way of sending.
fn comparison(results: &[WayResult], ideal: Duration) -> String {
    let rows: Vec<(String, Vec<String>)> = vec![
        (
            "completion time".into(),
            results
                .iter()
                .map(|o| format!("{:.2} s", o.summary.completion_time.as_secs_f64()))
                .collect(),
        ),
        (
            format!("  x ideal ({:.1} s)", ideal.as_secs_f64()),
            results
                .iter()
                .map(|o| {
                    format!(
                        "{:.2}",
                        o.summary.completion_time.as_secs_f64() / ideal.as_secs_f64()
                    )
                })
                .collect(),
        ),
        (
            "answers by status".into(),
            results.iter().map(|o| statuses(&o.summary)).collect(),
        ),
        (
            "updates lost".into(),
            results
                .iter()
                .map(|o| {
                    let ok = o
                        .summary
                        .by_status
                        .range(200..300)
                        .map(|(_, n)| n)
                        .sum::<usize>();
                    (o.summary.planned - ok).to_string()
                })
                .collect(),
        ),
        (
            "client-visible 429s".into(),
            results
                .iter()
                .map(|o| o.summary.client_429s.to_string())
                .collect(),
        ),
        (
            "SDK retries".into(),
            results
                .iter()
                .map(|o| o.summary.sdk_retries.to_string())
                .collect(),
        ),
        (
            "API requests".into(),
            results
                .iter()
                .map(|o| o.api.total_requests.to_string())
                .collect(),
        ),
        (
            "upstream 429s (API)".into(),
            results
                .iter()
                .map(|o| o.api.status_count(429).to_string())
                .collect(),
        ),
        (
            "API busiest second".into(),
            results
                .iter()
                .map(|o| {
                    o.api
                        .timeline
                        .iter()
                        .map(|s| s.requests)
                        .max()
                        .unwrap_or(0)
                        .to_string()
                })
                .collect(),
        ),
        percentile_row("latency p50", results, |s| s.latency, |p| p.p50),
        percentile_row("latency p99", results, |s| s.latency, |p| p.p99),
        percentile_row("wait in shiftgate p50", results, |s| s.wait, |p| p.p50),
        percentile_row("wait in shiftgate p99", results, |s| s.wait, |p| p.p99),
    ];
    let label_width = 24;
    let width = rows
        .iter()
        .flat_map(|(_, values)| values.iter().map(String::len))
        .chain(results.iter().map(|o| o.title.len()))
        .max()
        .unwrap_or(10)
        + 3;
    let mut out = String::new();
    let _ = write!(out, "{:<label_width$}", "");
    for o in results {
        let _ = write!(out, "{:>width$}", o.title);
    }
    let _ = writeln!(out);
    for (label, values) in rows {
        let _ = write!(out, "{label:<label_width$}");
        for v in values {
            let _ = write!(out, "{v:>width$}");
        }
        let _ = writeln!(out);
    }
    out
}

fn percentile_row(
    label: &str,
    results: &[WayResult],
    of: impl Fn(&Summary) -> Option<Percentiles>,
    pick: impl Fn(&Percentiles) -> Duration,
) -> (String, Vec<String>) {
    let values = results
        .iter()
        .map(|o| match of(&o.summary) {
            Some(p) => millis(pick(&p)),
            None => "n/a".to_string(),
        })
        .collect();
    (label.to_string(), values)
}

fn millis(d: Duration) -> String {
    if d >= Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

fn statuses(summary: &Summary) -> String {
    let mut parts: Vec<String> = summary
        .by_status
        .iter()
        .map(|(status, n)| format!("{status}: {n}"))
        .collect();
    if summary.transport_errors > 0 {
        parts.push(format!("errors: {}", summary.transport_errors));
    }
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// What the table says, in words.
fn conclusion(results: &[WayResult], ideal: Duration, total: usize) -> String {
    let mut out = String::new();
    let [plain, retried, proxied] = results else {
        return out;
    };
    let ok = |o: &WayResult| o.summary.by_status.get(&200).copied().unwrap_or(0);
    let peak = |o: &WayResult| o.api.timeline.iter().map(|s| s.requests).max().unwrap_or(0);
    let p99 = |o: &WayResult| o.summary.latency.map_or("n/a".into(), |p| millis(p.p99));
    let _ = writeln!(
        out,
        "- Straight at the API without retry, {} of {total} updates were lost to 429s: those \
         agents never\n  changed state. The API saw up to {} requests in one second.",
        total - ok(plain),
        peak(plain),
    );
    let _ = writeln!(
        out,
        "- With SDK-style retry, {} of {total} got through, after {} client-visible 429s: the \
         API got {} requests\n  for {total} updates, and p99 latency was {}. The retries wait \
         out Retry-After together and can meet\n  the next window's limit again. (This run can end \
         before the ideal: a fixed 1 s window lets its\n  requests through at once at its \
         start.)",
        ok(retried),
        retried.summary.client_429s,
        retried.api.total_requests,
        p99(retried),
    );
    let _ = writeln!(
        out,
        "- Through shiftgate, {} of {total} got through with {} client-visible 429s and {} \
         upstream 429s, {} requests\n  at the API, evenly spaced, in {:.2} s ({:.2} x the \
         ideal {:.1} s). The time went into shiftgate's queue\n  (X-Shiftgate-Wait-Ms), not \
         into failures and retries.",
        ok(proxied),
        proxied.summary.client_429s,
        proxied.api.status_count(429),
        proxied.api.total_requests,
        proxied.summary.completion_time.as_secs_f64(),
        proxied.summary.completion_time.as_secs_f64() / ideal.as_secs_f64(),
        ideal.as_secs_f64(),
    );
    let _ = writeln!(
        out,
        "\nTo run your own: `shiftgate emulate`, `shiftgate run`, then `shiftgate loadtest \
         --target ... --report out.html`\n(see docs/capacity-planning.md)."
    );
    out
}

fn print_now(text: &str) {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
}

/// `shiftgate run` from this very binary, on the demo's config, with its config and log in a
/// temporary directory; ready once it answers `/healthz`. Also the `max_wait` of its presence
/// route: admission is decided on arrival from the predicted wait, and at most every agent is
/// ahead.
async fn start_proxy(
    upstream: SocketAddr,
    args: &DemoArgs,
) -> anyhow::Result<(ProxyChild, Duration)> {
    let exe = std::env::current_exe().context("cannot find this program's own path")?;
    let max_wait =
        Duration::from_secs((2 * u64::from(args.agents)).div_ceil(u64::from(args.limit)) + 30);
    let mut options = ProxyOptions::new(exe);
    options.rust_log = "warn".into();
    options.dir_prefix = "shiftgate-demo".into();
    let proxy = ProxyChild::start(options, |listen, admin| {
        let text = proxy_config(listen, admin, upstream, args, max_wait);
        Config::parse(&text).map_err(|e| anyhow::anyhow!("the demo's proxy config: {e}"))?;
        Ok(text)
    })
    .await?;
    Ok((proxy, max_wait))
}

/// Opens upstream connections through an unpaced-by-presence route of the proxy at `addr`,
/// concurrently.
async fn warm_up(addr: SocketAddr) -> anyhow::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..WARM_CONNECTIONS {
        tasks.spawn(async move {
            send(
                addr,
                Method::GET,
                "/api/v2/presence/definitions",
                Some(WARM_TOKEN),
            )
            .await
        });
    }
    while let Some(result) = tasks.join_next().await {
        match result? {
            Ok(200) => {}
            Ok(status) => bail!("warming up through the proxy: answer {status}"),
            Err(e) => bail!("warming up through the proxy: {e}"),
        }
    }
    Ok(())
}

/// The proxy's config: the shipped config.yaml's presence and per-token budgets, on loopback.
fn proxy_config(
    listen: SocketAddr,
    admin: SocketAddr,
    upstream: SocketAddr,
    args: &DemoArgs,
    max_wait: Duration,
) -> String {
    format!(
        r#"# Written by `shiftgate demo`.
listen: "{listen}"
admin_listen: "{admin}"
upstreams:
  api: {{ url: "http://{upstream}" }}
  login: {{ url: "http://{upstream}" }}
budgets:
  per-token: {{ rate: "{TOKEN_RATE_PER_MINUTE}/min", per: token }}
  presence: {{ rate: "{limit}/s", burst: 1 }}
routes:
  - name: oauth
    match: {{ path: "/oauth/**" }}
    upstream: login
  - name: presence
    match: {{ method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}" }}
    upstream: api
    budgets: [presence, per-token]
    max_wait: "{max_wait}s"
    priority: high
  - name: default
    match: {{ path: "/**" }}
    upstream: api
    budgets: [per-token]
queue:
  max_depth: {depth}
workers: 2
shutdown:
  drain_timeout: "1s"
"#,
        limit = args.limit,
        max_wait = max_wait.as_secs(),
        depth = (2 * args.agents as usize).max(10_000),
    )
}

/// One request on a fresh connection; its status.
async fn send(
    addr: SocketAddr,
    method: Method,
    path: &str,
    authorization: Option<&str>,
) -> anyhow::Result<u16> {
    let target = Target::parse(&format!("http://{addr}"))?;
    let mut connection = AgentConnection::new(target);
    let mut headers = HeaderMap::new();
    if let Some(value) = authorization {
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_str(value)?);
    }
    let request = OutgoingRequest {
        method,
        path_and_query: path.to_string(),
        headers,
        body: Bytes::new(),
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), connection.send(&request))
        .await
        .context("no answer within 5 s")??;
    Ok(answer.status.as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn the_proxy_config_it_writes_is_valid() {
        let args = DemoArgs {
            agents: 200,
            loops: 3,
            limit: 100,
            sdk_retries: 10,
        };
        let text = proxy_config(
            loopback(18080),
            loopback(19090),
            loopback(18081),
            &args,
            Duration::from_secs(34),
        );
        let config = Config::parse(&text).unwrap();
        let presence = &config.budgets[config.budget_index("presence").unwrap()];
        assert_eq!(presence.rate.per_second, 100.0);
        assert_eq!(config.routes[1].max_wait, Duration::from_secs(34));
    }

    #[test]
    fn the_one_token_proxy_configs_are_valid_and_only_one_coalesces() {
        for coalesce in [false, true] {
            let text = one_token_proxy_config(
                loopback(18080),
                loopback(19090),
                loopback(18081),
                coalesce,
                Duration::from_secs(70),
            );
            let config = Config::parse(&text).unwrap();
            assert_eq!(config.routes[0].coalesce.is_some(), coalesce);
        }
        assert_eq!(one_token_emulator_config().route_limits[0].limit.count, 10);
    }

    #[test]
    fn the_emulator_config_limits_presence_per_second_for_the_org() {
        let config = emulator_config(50);
        assert_eq!(config.token_rate_per_minute, 300);
        assert_eq!(config.route_limits[0].limit.count, 50);
        assert_eq!(config.route_limits[0].limit.window, Duration::from_secs(1));
    }
}
