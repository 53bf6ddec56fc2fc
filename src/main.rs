//! The `shiftgate` binary: `run`, `check`, `health`, `emulate`, `loadtest`, `discover`, `demo`,
//! `completions`, `man`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use shiftgate::config::{Config, LogFormat};

/// `shiftgate --version`: the crate's version, the commit and the build date (see build.rs).
const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("SHIFTGATE_COMMIT"),
    ", built ",
    env!("SHIFTGATE_BUILD_DATE"),
    ")"
);

#[derive(Parser)]
#[command(
    name = "shiftgate",
    version = VERSION,
    about = "A rate-shaping reverse proxy for the Genesys Cloud Platform API"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Run {
        /// Config file [default: $SHIFTGATE_CONFIG, else ./config.yaml]
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Take the listening sockets over from a running shiftgate (graceful upgrade: start
        /// this, then send SIGQUIT to the old process).
        #[arg(long, short)]
        upgrade: bool,
        /// Socket through which the listeners are handed over during an upgrade.
        #[arg(long, default_value = "/tmp/shiftgate_upgrade.sock")]
        upgrade_sock: PathBuf,
        /// Write this process's PID to this file once it serves (after an upgrade, once it has
        /// taken the sockets over), for supervisors that track one (systemd's PIDFile=). Not
        /// removed on exit. Without it, no file is written.
        #[arg(long, value_name = "PATH")]
        pid_file: Option<PathBuf>,
    },
    /// Validate a config file and exit: 0 with a summary, 1 with every error.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Ask a running proxy's admin listener for /readyz: exit 0 when it answers 200 (serving),
    /// 1 otherwise (draining, not started, unreachable). For container health checks.
    Health {
        /// Config file whose admin_listen is probed (only that key is read) [default:
        /// $SHIFTGATE_CONFIG, else ./config.yaml]
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a shell completion script to stdout.
    Completions {
        /// bash, zsh, fish, elvish or powershell
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) to stdout: `shiftgate man > /usr/local/share/man/man1/shiftgate.1`.
    Man,
    /// Run a stand-in for the Genesys API (for tests and load tests).
    Emulate {
        /// Address to listen on [default: 127.0.0.1:8081]
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Emulator config (see emulator.yaml)
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Shift-change load against a target, with a report.
    Loadtest(shiftgate::loadtest::LoadtestArgs),
    /// Measure an org's limits for one endpoint (per token, org-wide), restore every user
    /// touched, and write a config.
    Discover(shiftgate::discover::DiscoverArgs),
    /// Start an emulator and a proxy in-process and run the same shift change straight at the
    /// emulator and through the proxy.
    Demo(shiftgate::demo::DemoArgs),
}

fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("SHIFTGATE_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config.yaml"))
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,pingora=warn,pingora_core=warn,pingora_proxy=warn")
    });
    use std::io::IsTerminal;
    // Colours only for a person at a terminal, never in a file or the journal.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(shiftgate::access::MakeLogWriter);
    shiftgate::access::start_flusher();
    shiftgate::access::set_json(matches!(format, LogFormat::Json));
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check { config } => {
            let path = config_path(config);
            match Config::load(&path) {
                Ok(c) => {
                    println!("{}: ok: {}", path.display(), c.summary());
                    ExitCode::SUCCESS
                }
                Err(errors) => {
                    eprintln!("{}: {} error(s):", path.display(), errors.0.len());
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    ExitCode::from(1)
                }
            }
        }
        Command::Run {
            config,
            upgrade,
            upgrade_sock,
            pid_file,
        } => {
            let path = config_path(config);
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!(
                        "{}: refusing to start, {} error(s):",
                        path.display(),
                        errors.0.len()
                    );
                    for e in &errors.0 {
                        eprintln!("  {e}");
                    }
                    return ExitCode::from(1);
                }
            };
            init_logging(config.log.format);
            shiftgate::server::run(
                config,
                shiftgate::server::RunOptions {
                    config_path: path,
                    upgrade,
                    upgrade_sock,
                    pid_file,
                },
            )
        }
        Command::Health { config } => match shiftgate::health::check(&config_path(config)) {
            Ok(addr) => {
                println!("ready: GET http://{addr}/readyz answered 200");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("not ready: {e}");
                ExitCode::from(1)
            }
        },
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "shiftgate",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
        Command::Man => {
            match clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shiftgate man: {e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Emulate { listen, config } => {
            init_logging(LogFormat::Text);
            match runtime().block_on(shiftgate::emulator::run_cli(listen, config)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("shiftgate emulate: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Loadtest(args) => match runtime().block_on(shiftgate::loadtest::main(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shiftgate loadtest: {e:#}");
                ExitCode::from(shiftgate::loadtest::exit_code(&e) as u8)
            }
        },
        Command::Discover(args) => match runtime().block_on(shiftgate::discover::main(args)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shiftgate discover: {e:#}");
                ExitCode::from(shiftgate::discover::exit_code(&e) as u8)
            }
        },
        Command::Demo(args) => match shiftgate::demo::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("shiftgate demo: {e:#}");
                ExitCode::from(1)
            }
        },
    }
}
