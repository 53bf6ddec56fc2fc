//! Every kind of config mistake, one fixture each: the whole error list is asserted, each error
//! with its YAML path and line. Also the CLI's exit codes for `check` and `run`.
//!
//! The fixtures are validated against [`fixture_env`], never the environment of this process, and
//! every child process is given the variables it needs (or has them removed) explicitly.

use std::path::Path;
use std::process::Command;

use shiftgate::config::Config;

fn fixture(name: &str) -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let yaml = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
    let expected = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap();
    (yaml, expected)
}

/// The environment the fixtures are validated in: the `admin_token_*` fixtures name these
/// variables; every other variable is unset.
fn fixture_env(name: &str) -> Option<String> {
    match name {
        "SHIFTGATE_TEST_ADMIN_TOKEN_EMPTY" => Some(String::new()),
        "SHIFTGATE_TEST_ADMIN_TOKEN_NEWLINE" => Some("s3cret\n".to_string()),
        _ => None,
    }
}

fn assert_errors(name: &str) {
    let (yaml, expected) = fixture(name);
    let errors = Config::parse_with_env(&yaml, &fixture_env).expect_err("the fixture is invalid");
    let got: Vec<String> = errors.0.iter().map(|e| e.to_string()).collect();
    let want: Vec<&str> = expected.lines().collect();
    assert_eq!(got, want, "fixture {name}");
    // every error says where it is
    for e in &errors.0 {
        assert!(e.line.is_some(), "{name}: {e} has no line");
    }
}

macro_rules! fixtures {
    ($($name:ident),* $(,)?) => {
        $(#[test] fn $name() { assert_errors(stringify!($name)); })*
    };
}

fixtures!(
    unknown_key,
    unknown_budget,
    unknown_upstream,
    duplicate_route,
    bad_rate,
    bad_duration,
    absurd_values,
    bad_path_template,
    bad_burst,
    bad_max_keys,
    bad_per,
    ambiguous_upstream,
    bad_url,
    bad_listen,
    missing_routes,
    bad_enum,
    invalid_yaml,
    many_errors,
    admin_token_unset,
    admin_token_empty,
    admin_token_newline,
    bad_coalesce,
    bad_trusted_proxies,
);

#[test]
fn many_mistakes_are_all_reported_in_line_order() {
    let (yaml, _) = fixture("many_errors");
    let errors = Config::parse_with_env(&yaml, &fixture_env).unwrap_err().0;
    assert_eq!(errors.len(), 6);
    let lines: Vec<usize> = errors.iter().map(|e| e.line.unwrap()).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

/// The variable the shipped config.yaml names in `admin_token_env`.
const SHIPPED_TOKEN_ENV: &str = "SHIFTGATE_ADMIN_TOKEN";

fn shiftgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shiftgate"))
}

#[test]
fn the_shipped_config_passes_check() {
    let out = shiftgate()
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
        .env(SHIPPED_TOKEN_ENV, "t0ken")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(stdout.lines().count(), 1, "one-line summary: {stdout}");
    assert!(
        stdout.contains("6 routes, 3 budgets, 2 upstreams"),
        "{stdout}"
    );
}

#[test]
fn check_exits_1_with_every_error_and_run_refuses_to_start() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config/many_errors.yaml");
    let out = shiftgate()
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("6 error(s)"), "{stderr}");
    assert!(stderr.contains("routes[1].upstream: unknown upstream \"nowhere\" at line 13"));
    let run = shiftgate()
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("refusing to start"));
}

/// `admin_token_env` fails closed: a variable that is unset or empty makes `check` and `run` exit
/// 1 naming it (`run` before it listens), set it and the same file passes.
#[test]
fn an_unset_or_empty_admin_token_variable_makes_check_and_run_exit_1_naming_it() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let var = "SHIFTGATE_TEST_ADMIN_TOKEN_UNSET";
    let path = dir.join("admin_token_unset.yaml");
    for value in [None, Some("")] {
        let with = |cmd: &mut Command| match value {
            None => {
                cmd.env_remove(var);
            }
            Some(v) => {
                cmd.env(var, v);
            }
        };
        let what = if value.is_none() { "unset" } else { "empty" };
        let want = format!("admin_token_env: environment variable {var} is {what}");

        let mut check = shiftgate();
        check.args(["check", "--config"]).arg(&path);
        with(&mut check);
        let out = check.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "check, {what}: {stderr}");
        assert!(stderr.contains("1 error(s)"), "{stderr}");
        assert!(stderr.contains(&format!("{want} ")), "{stderr}");

        let mut run = shiftgate();
        run.args(["run", "--config"]).arg(&path);
        with(&mut run);
        let out = run.output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "run, {what}: {stderr}");
        assert!(stderr.contains("refusing to start"), "{stderr}");
        assert!(stderr.contains(&want), "{stderr}");
    }
    let out = shiftgate()
        .args(["check", "--config"])
        .arg(&path)
        .env(var, "t0ken")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The shipped config asks for a token: without one it does not start either.
    let out = shiftgate()
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
        .env_remove(SHIPPED_TOKEN_ENV)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!(
            "admin_token_env: environment variable {SHIPPED_TOKEN_ENV} is unset"
        )),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_path_defaults_to_the_environment_variable() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
    let out = shiftgate()
        .arg("check")
        .env("SHIFTGATE_CONFIG", &path)
        .env(SHIPPED_TOKEN_ENV, "t0ken")
        .current_dir(std::env::temp_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn usage_errors_exit_2_and_version_and_help_work() {
    assert_eq!(
        shiftgate()
            .arg("frobnicate")
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        shiftgate()
            .args(["check", "--bogus"])
            .output()
            .unwrap()
            .status
            .code(),
        Some(2)
    );
    let v = shiftgate().arg("--version").output().unwrap();
    assert_eq!(v.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&v.stdout).contains(env!("CARGO_PKG_VERSION")));
    let h = shiftgate().arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&h.stdout).contains("emulate"));
}

/// `--version` names the commit and the build date; `completions <shell>` and `man` print
/// what a package installs (a completion script per shell, a roff man page), listing the
/// subcommands; an unknown shell is a usage error.
#[test]
fn version_completions_and_man_page() {
    let v = shiftgate().arg("--version").output().unwrap();
    let v = String::from_utf8_lossy(&v.stdout).trim().to_string();
    let rest = v
        .strip_prefix(&format!("shiftgate {} (commit ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("{v}"));
    let (commit, date) = rest
        .strip_suffix(')')
        .and_then(|r| r.split_once(", built "))
        .unwrap_or_else(|| panic!("{v}"));
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{v}"
    );
    let parts: Vec<&str> = date.split('-').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()) && parts[0].len() == 4,
        "a YYYY-MM-DD build date: {v}"
    );
    println!("{v}");

    for (shell, marker) in [
        ("bash", "complete -F _shiftgate"),
        ("zsh", "#compdef shiftgate"),
        ("fish", "complete -c shiftgate"),
    ] {
        let out = shiftgate().args(["completions", shell]).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {marker}");
        for sub in ["run", "check", "emulate", "loadtest"] {
            assert!(script.contains(sub), "{shell} completes {sub}");
        }
    }
    let bad = shiftgate().args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let man = shiftgate().arg("man").output().unwrap();
    assert_eq!(man.status.code(), Some(0));
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(page.contains(".TH shiftgate 1"), "{page}");
    for sub in ["run", "check", "emulate", "completions"] {
        assert!(page.contains(sub), "the man page lists {sub}");
    }
}
