//! Every kind of config mistake, one fixture each: the whole error list is asserted, each error
//! with its YAML path and line. Also the CLI's exit codes for `check` and `run`.

use std::path::Path;
use std::process::Command;

use shiftgate::config::Config;

fn fixture(name: &str) -> (String, String) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/config");
    let yaml = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
    let expected = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap();
    (yaml, expected)
}

fn assert_errors(name: &str) {
    let (yaml, expected) = fixture(name);
    let errors = Config::parse(&yaml).expect_err("the fixture is invalid");
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
    bad_path_template,
    bad_burst,
    bad_per,
    ambiguous_upstream,
    bad_url,
    bad_listen,
    missing_routes,
    bad_enum,
    invalid_yaml,
    many_errors,
);

#[test]
fn many_mistakes_are_all_reported_in_line_order() {
    let (yaml, _) = fixture("many_errors");
    let errors = Config::parse(&yaml).unwrap_err().0;
    assert_eq!(errors.len(), 6);
    let lines: Vec<usize> = errors.iter().map(|e| e.line.unwrap()).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);
}

fn shiftgate() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shiftgate"))
}

#[test]
fn the_shipped_config_passes_check() {
    let out = shiftgate()
        .args(["check", "--config"])
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml"))
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

#[test]
fn config_path_defaults_to_the_environment_variable() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.yaml");
    let out = shiftgate()
        .arg("check")
        .env("SHIFTGATE_CONFIG", &path)
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
