//! `shiftgate loadtest`: the command-line arguments, the live progress bar and what is printed at the end.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::report;
use super::runner::{run, Progress};
use super::spec::{Endpoint, LoadSpec};

/// The endpoints `--endpoint` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EndpointArg {
    /// PATCH /api/v2/users/{userId}/presences/purecloud
    Presence,
    /// PUT /api/v2/users/{userId}/routingstatus
    RoutingStatus,
    /// --method, --path and --body
    Custom,
}

/// Shift-change load against a target: agents changing their presence or routing status at once.
#[derive(Debug, Clone, clap::Args)]
pub struct LoadtestArgs {
    /// Where to send the load: http[s]://host[:port][/base] (shiftgate's listener, an emulator, or a Genesys API host)
    #[arg(long, value_name = "URL")]
    pub target: String,
    /// Concurrent agents, each with its own keep-alive connection
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub agents: usize,
    /// Requests per agent
    #[arg(long, value_name = "N", default_value_t = 10)]
    pub loops: usize,
    /// Spread the agents' starts evenly over this long (e.g. 30s)
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub ramp: Duration,
    /// Distinct bearer tokens; agent i uses "loadtest-token-<i % N>" (with --client-id: N tokens minted from the org)
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub tokens: usize,
    /// The call every agent makes
    #[arg(long, value_enum, default_value_t = EndpointArg::Presence)]
    pub endpoint: EndpointArg,
    /// HTTP method of a custom endpoint
    #[arg(long, value_name = "METHOD")]
    pub method: Option<String>,
    /// Path of a custom endpoint; {userId}, {agent} and {n} are filled in
    #[arg(long, value_name = "PATH")]
    pub path: Option<String>,
    /// JSON body of a custom endpoint; same placeholders as --path
    #[arg(long, value_name = "JSON")]
    pub body: Option<String>,
    /// Per-request timeout
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Pause between two requests of one agent
    #[arg(long, value_name = "DURATION", default_value = "0s", value_parser = humantime::parse_duration)]
    pub think_time: Duration,
    /// Emulate an SDK with retry on: on a 429 wait Retry-After and retry, up to N times (0 = off)
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub sdk_retry: u32,
    /// Extra header for every request, as 'Name: value' (repeatable)
    #[arg(long = "header", value_name = "'NAME: VALUE'", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// Print the summary as JSON on stdout, and nothing else there
    #[arg(long)]
    pub json: bool,
    /// Also write a self-contained HTML report with charts to FILE
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    /// A real org: the OAuth client whose client-credentials tokens the agents share (--tokens
    /// of them are minted, agent i uses token i % N)
    #[arg(long, value_name = "ID", requires = "client_secret_env")]
    pub client_id: Option<String>,
    /// The environment variable holding that client's secret (never on the command line)
    #[arg(long, value_name = "VAR", requires = "client_id")]
    pub client_secret_env: Option<String>,
    /// Where tokens are asked for [default: the target; shiftgate routes /oauth/** to login]
    #[arg(long, value_name = "URL", requires = "client_id")]
    pub login: Option<String>,
    /// Real users, one id per line (agent i changes user i % N); read before the run and
    /// restored after it
    #[arg(
        long,
        value_name = "FILE",
        requires = "client_id",
        conflicts_with = "users_from_api"
    )]
    pub users: Option<PathBuf>,
    /// Real users: the first N of GET /api/v2/users [default with --client-id: --agents]
    #[arg(long, value_name = "N", requires = "client_id")]
    pub users_from_api: Option<usize>,
}

/// `Name: value` into its two halves.
fn parse_header(raw: &str) -> Result<(String, String), String> {
    match raw.split_once(':') {
        Some((name, value)) if !name.trim().is_empty() => {
            Ok((name.trim().to_string(), value.trim().to_string()))
        }
        _ => Err(format!("header {raw:?} is not of the form 'Name: value'")),
    }
}

/// Why `shiftgate loadtest` failed. The binary maps these to exit codes with [`exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("usage: {0}")]
    Usage(String),
    #[error("no request could be made: {0}")]
    NothingAnswered(String),
}

/// The exit code for an error returned by [`main`]: 2 for a usage error (the contract's code),
/// 1 for anything else.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<LoadtestError>() {
        Some(LoadtestError::Usage(_)) => 2,
        _ => 1,
    }
}

impl LoadtestArgs {
    /// The spec these arguments describe; every inconsistency is a usage error.
    pub fn to_spec(&self) -> Result<LoadSpec, LoadtestError> {
        let custom_only = [
            ("--method", self.method.is_some()),
            ("--path", self.path.is_some()),
            ("--body", self.body.is_some()),
        ];
        let endpoint = match self.endpoint {
            EndpointArg::Custom => {
                let path = self
                    .path
                    .clone()
                    .ok_or_else(|| LoadtestError::Usage("--endpoint custom needs --path".into()))?;
                let method_text = self.method.as_deref().unwrap_or("GET");
                let method = http::Method::from_bytes(method_text.to_ascii_uppercase().as_bytes())
                    .map_err(|_| {
                        LoadtestError::Usage(format!(
                            "--method {method_text:?} is not an HTTP method"
                        ))
                    })?;
                Endpoint::Custom {
                    method,
                    path,
                    body: self.body.clone(),
                }
            }
            other => {
                if let Some((flag, _)) = custom_only.iter().find(|(_, given)| *given) {
                    return Err(LoadtestError::Usage(format!(
                        "{flag} only applies to --endpoint custom (not {other:?})"
                    )));
                }
                match other {
                    EndpointArg::Presence => Endpoint::PresencePatch,
                    _ => Endpoint::RoutingStatusPut,
                }
            }
        };
        let spec = LoadSpec {
            target: self.target.clone(),
            agents: self.agents,
            loops: self.loops,
            ramp: self.ramp,
            tokens: self.tokens,
            endpoint,
            timeout: self.timeout,
            think_time: self.think_time,
            sdk_retry: self.sdk_retry,
            extra_headers: self.headers.clone(),
            real_org: Default::default(),
        };
        spec.validate()
            .map_err(|e| LoadtestError::Usage(e.to_string()))?;
        Ok(spec)
    }
}

/// `shiftgate loadtest`: runs the load, shows progress on stderr, prints the summary on stdout.
pub async fn main(args: LoadtestArgs) -> anyhow::Result<()> {
    let show_progress = !args.quiet && !args.json && std::io::stderr().is_terminal();
    let mut stdout = std::io::stdout().lock();
    execute(&args, show_progress, &mut stdout).await
}

/// [`main`] with its output and progress bar passed in, so tests can read what it prints.
pub async fn execute(
    args: &LoadtestArgs,
    show_progress: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut spec = args.to_spec()?;
    let real = match &args.client_id {
        Some(client_id) => Some(prepare_real_org(args, client_id).await?),
        None => None,
    };
    if let Some(real) = &real {
        spec.real_org = real.real.clone();
    }
    let bar = progress_bar(spec.total_requests() as u64, show_progress);
    let on_progress = bar.clone().map(|bar| {
        Arc::new(move |p: Progress| {
            bar.set_position(p.done as u64);
            bar.set_message(format!(
                "{:.0} req/s, 429s: {}, errors: {}",
                p.current_rps, p.client_429s, p.transport_errors
            ));
        }) as super::runner::ProgressFn
    });

    let result = run(spec, on_progress).await;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(real) = &real {
        let (restored, of) = real.restore().await;
        eprintln!("shiftgate loadtest: {restored} of {of} users restored as found");
    }
    let result = result?;
    let summary = result.summary();

    if args.json {
        serde_json::to_writer_pretty(&mut *out, &summary)?;
        writeln!(out)?;
    } else {
        write!(out, "{}", report::summary_table(&summary, &result.spec))?;
    }
    if let Some(path) = &args.report {
        report::write_html_report(&result, path)?;
        if !args.json {
            writeln!(out, "\nreport written to {}", path.display())?;
        }
    }
    out.flush()?;

    if summary.answered == 0 {
        let why = summary
            .transport_error_messages
            .keys()
            .next()
            .cloned()
            .unwrap_or_else(|| "no request was sent".into());
        return Err(LoadtestError::NothingAnswered(why).into());
    }
    Ok(())
}

/// Tokens, users, definitions and the users' states of the real org `--client-id` names.
async fn prepare_real_org(
    args: &LoadtestArgs,
    client_id: &str,
) -> Result<super::real_org::Prepared, LoadtestError> {
    use super::real_org::{prepare, RealOrgError, Users};
    use super::user_state::StateEndpoint;
    let users = match &args.users {
        Some(path) => Users::File(path),
        None => Users::Api(args.users_from_api.unwrap_or(args.agents)),
    };
    let endpoint = match args.endpoint {
        EndpointArg::Presence => Some(StateEndpoint::Presence),
        EndpointArg::RoutingStatus => Some(StateEndpoint::RoutingStatus),
        EndpointArg::Custom => None,
    };
    let secret_env = args.client_secret_env.as_deref().unwrap_or_default();
    let login = args.login.as_deref().unwrap_or(&args.target);
    prepare(
        &args.target,
        login,
        client_id,
        secret_env,
        args.tokens,
        users,
        endpoint,
    )
    .await
    .map_err(|e| match e {
        RealOrgError::Usage(m) => LoadtestError::Usage(m),
        other => LoadtestError::NothingAnswered(other.to_string()),
    })
}

fn progress_bar(total: u64, show: bool) -> Option<ProgressBar> {
    if !show {
        return None;
    }
    let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
    let style =
        ProgressStyle::with_template("{elapsed_precise} [{wide_bar}] {pos}/{len} requests  {msg}")
            .expect("the template is valid")
            .progress_chars("=> ");
    bar.set_style(style);
    // Redraw even while no request completes, so a stalled target shows a ticking clock.
    bar.enable_steady_tick(Duration::from_millis(250));
    Some(bar)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadtestArgs,
    }

    fn parse(argv: &[&str]) -> Result<LoadtestArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("loadtest").chain(argv.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let args = parse(&["--target", "http://127.0.0.1:8080"]).unwrap();
        let spec = args.to_spec().unwrap();
        assert_eq!(
            spec,
            LoadSpec::default(),
            "the CLI defaults are LoadSpec::default()"
        );
        assert!(!args.json && !args.quiet && args.report.is_none());
    }

    #[test]
    fn every_flag_reaches_the_spec() {
        let args = parse(&[
            "--target",
            "http://127.0.0.1:9/base",
            "--agents",
            "7",
            "--loops",
            "3",
            "--ramp",
            "1m 30s",
            "--tokens",
            "2",
            "--endpoint",
            "routing-status",
            "--timeout",
            "500ms",
            "--think-time",
            "20ms",
            "--sdk-retry",
            "4",
            "--header",
            "X-A: 1",
            "--header",
            "X-B:two words ",
            "--json",
            "--report",
            "out.html",
            "--quiet",
        ])
        .unwrap();
        let spec = args.to_spec().unwrap();
        assert_eq!(spec.target, "http://127.0.0.1:9/base");
        assert_eq!(
            (spec.agents, spec.loops, spec.tokens, spec.sdk_retry),
            (7, 3, 2, 4)
        );
        assert_eq!(spec.ramp, Duration::from_secs(90));
        assert_eq!(spec.endpoint, Endpoint::RoutingStatusPut);
        assert_eq!(spec.timeout, Duration::from_millis(500));
        assert_eq!(spec.think_time, Duration::from_millis(20));
        assert_eq!(
            spec.extra_headers,
            [
                ("X-A".to_string(), "1".to_string()),
                ("X-B".to_string(), "two words".to_string())
            ]
        );
        assert!(args.json && args.quiet);
        assert_eq!(args.report, Some(PathBuf::from("out.html")));
    }

    #[test]
    fn a_custom_endpoint_takes_method_path_and_body() {
        let args = parse(&[
            "--target",
            "http://127.0.0.1:8080",
            "--endpoint",
            "custom",
            "--method",
            "post",
            "--path",
            "/api/v2/x/{userId}",
            "--body",
            "{}",
        ])
        .unwrap();
        assert_eq!(
            args.to_spec().unwrap().endpoint,
            Endpoint::Custom {
                method: http::Method::POST,
                path: "/api/v2/x/{userId}".into(),
                body: Some("{}".into())
            }
        );
    }

    #[test]
    fn inconsistent_arguments_are_usage_errors_with_exit_code_2() {
        let cases: [(&[&str], &str); 5] = [
            (&["--endpoint", "custom"], "--endpoint custom needs --path"),
            (
                &["--path", "/x"],
                "--path only applies to --endpoint custom",
            ),
            (
                &["--endpoint", "custom", "--path", "/x", "--method", "NO PE"],
                "is not an HTTP method",
            ),
            (&["--agents", "0"], "agents must be at least 1"),
            (
                &["--target", "ftp://127.0.0.1:8443"],
                "is not http or https",
            ),
        ];
        for (extra, expected) in cases {
            let mut argv = extra.to_vec();
            if !argv.contains(&"--target") {
                argv.extend(["--target", "http://127.0.0.1:8080"]);
            }
            let error = parse(&argv).unwrap().to_spec().unwrap_err();
            assert!(error.to_string().contains(expected), "{argv:?}: {error}");
            assert_eq!(exit_code(&anyhow::Error::new(error)), 2);
        }
    }

    #[test]
    fn malformed_flags_are_rejected_by_clap_itself() {
        for argv in [
            &["--target", "http://x", "--header", "no colon"][..],
            &["--target", "http://x", "--ramp", "soon"],
            &["--target", "http://x", "--endpoint", "wfm"],
            &["--agents", "3"],
        ] {
            let error = parse(argv)
                .err()
                .unwrap_or_else(|| panic!("{argv:?} should fail"));
            assert_eq!(
                error.exit_code(),
                2,
                "{argv:?}: clap exits 2 on usage errors"
            );
        }
    }

    #[test]
    fn errors_other_than_usage_exit_with_1() {
        let error = anyhow::Error::new(LoadtestError::NothingAnswered("refused".into()));
        assert_eq!(exit_code(&error), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("anything else")), 1);
    }
}
