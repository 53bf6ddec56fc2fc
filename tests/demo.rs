//! `shiftgate demo` end to end: the real binary starts its emulators and a proxy child process,
//! runs a small shift change three ways and prints the comparison. Straight at the emulated API
//! some updates meet 429s; through shiftgate none do. Then one token's updates, paced and
//! coalesced into bulk calls.

use std::process::Command;
use std::time::{Duration, Instant};

/// The values of the table row whose label is `label`, one per column.
fn row<'a>(output: &'a str, label: &str) -> Vec<&'a str> {
    let line = output
        .lines()
        .find(|l| l.starts_with(label) && l[label.len()..].starts_with(' '))
        .unwrap_or_else(|| panic!("no row {label:?} in:\n{output}"));
    line[label.len()..].split_whitespace().collect()
}

fn numbers(output: &str, label: &str) -> Vec<u64> {
    row(output, label)
        .iter()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("row {label:?}: {v:?} is not a number"))
        })
        .collect()
}

#[test]
fn the_demo_shows_429s_straight_at_the_api_and_none_through_shiftgate() {
    // 40 agents × 2 updates against a 50/s presence limit: the second round of the straight
    // runs arrives in the same 1 s window as the first and exceeds it.
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_shiftgate"))
        .args(["demo", "--agents", "40", "--loops", "2", "--limit", "50"])
        .env("RUST_LOG", "warn")
        .output()
        .expect("shiftgate demo runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    println!("{stdout}");

    // The three columns, in order.
    let header = stdout
        .lines()
        .find(|l| l.contains("through shiftgate") && l.contains("straight, no retry"))
        .unwrap_or_else(|| panic!("no table header in:\n{stdout}"));
    assert!(header.find("straight, no retry") < header.find("straight, SDK retry"));
    assert!(header.find("straight, SDK retry") < header.find("through shiftgate"));

    let client_429s = numbers(&stdout, "client-visible 429s");
    assert_eq!(client_429s.len(), 3, "{stdout}");
    assert!(
        client_429s[0] > 0,
        "straight at the API, some updates meet 429s: {stdout}"
    );
    assert!(
        client_429s[1] > 0,
        "the SDK-style client sees 429s too: {stdout}"
    );
    assert_eq!(
        client_429s[2], 0,
        "through shiftgate no client sees a 429: {stdout}"
    );

    let lost = numbers(&stdout, "updates lost");
    assert!(lost[0] > 0, "without retry, updates are lost: {stdout}");
    assert_eq!(lost[1..], [0, 0], "{stdout}");

    let retries = numbers(&stdout, "SDK retries");
    assert_eq!(retries[0], 0, "{stdout}");
    assert_eq!(retries[2], 0, "{stdout}");

    // The proxy column carries shiftgate's own wait; the straight ones cannot.
    let wait = row(&stdout, "wait in shiftgate p99");
    assert_eq!(wait[..2], ["n/a", "n/a"], "{stdout}");
    assert_ne!(wait[2], "n/a", "{stdout}");

    // Then one token, paced and coalesced: the same updates in far fewer API requests, none
    // of them refused.
    let (_, one_token) = stdout
        .split_once("One token:")
        .unwrap_or_else(|| panic!("no one-token part in:\n{stdout}"));
    let header = one_token
        .lines()
        .find(|l| l.contains("paced") && l.contains("coalesced"))
        .unwrap_or_else(|| panic!("no one-token table in:\n{stdout}"));
    assert!(header.find("paced") < header.find("coalesced"));
    assert_eq!(
        numbers(one_token, "client-visible 429s"),
        [0, 0],
        "{stdout}"
    );
    assert_eq!(numbers(one_token, "updates lost"), [0, 0], "{stdout}");
    let api = numbers(one_token, "API requests");
    assert_eq!(api[0], 40, "paced: one request per update: {stdout}");
    assert!(
        api[1] <= 2,
        "coalesced: 40 updates in bulk calls of 50: {stdout}"
    );

    // The proxy child is gone: nothing listens on the port it printed.
    let url = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("http://").map(|a| a.trim_end_matches(',')))
        .unwrap_or_else(|| panic!("no proxy address in:\n{stdout}"));
    let addr: std::net::SocketAddr = url.parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err(),
        "the proxy on {addr} still answers after the demo"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the demo took {:?}",
        started.elapsed()
    );
}
