//! docs/reference.md against the code: every metric a real registry exports, every answer the
//! proxy makes itself and every subcommand appear in it, so the reference cannot fall behind.
//! (Config keys: `config::raw`'s unit test, which derives them from the config types.)

use shiftgate::local_response::Reason;
use shiftgate::metrics::{Metrics, CONTRACT_METRICS};

fn reference() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/reference.md"))
        .expect("docs/reference.md")
}

/// A table row of the reference that starts with `name` in backticks.
fn has_row(reference: &str, name: &str) -> bool {
    reference.contains(&format!("| `{name}` |"))
}

#[test]
fn every_registered_metric_is_documented_with_a_row() {
    let m = Metrics::new();
    // Gauges hidden until set (the Redis state without `cluster`) are exported once set.
    m.cluster_redis_up.set(1);
    let mut names: Vec<String> = m
        .registry
        .gather()
        .iter()
        .map(|f| f.name().to_string())
        .collect();
    names.extend(CONTRACT_METRICS.iter().map(|(n, _)| n.to_string()));
    names.sort();
    names.dedup();
    let reference = reference();
    let missing: Vec<&String> = names.iter().filter(|n| !has_row(&reference, n)).collect();
    assert!(
        missing.is_empty(),
        "metrics not documented in docs/reference.md (a table row \"| `name` |\"): {missing:?}"
    );
}

#[test]
fn every_answer_the_proxy_makes_is_documented_with_its_status_code_and_reason() {
    let reference = reference();
    for r in Reason::ALL {
        let row = format!("| {} | `{}` | `{}` |", r.status(), r.code(), r.label());
        assert!(
            reference.contains(&row),
            "{r:?}: no row starting {row:?} in docs/reference.md"
        );
    }
}

#[test]
fn every_subcommand_is_documented() {
    let reference = reference();
    for name in subcommands() {
        assert!(
            reference.contains(&format!("`shiftgate {name}")),
            "subcommand {name} is not in docs/reference.md"
        );
    }
}

/// The subcommands the binary's `--help` lists (the clap definitions live in the binary).
fn subcommands() -> Vec<String> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .arg("--help")
        .output()
        .expect("run shiftgate --help");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = text
        .split("Commands:")
        .nth(1)
        .expect("a Commands: section")
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_string)
        .collect();
    assert!(names.len() >= 5, "{text}");
    names
}
