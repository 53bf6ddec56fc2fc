//! `shiftgate run` started with a low soft limit on open files (as a process started outside its
//! systemd unit inherits one: 1,024, passed in seconds by a shift change's connections) raises
//! it to the hard limit at once.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shiftgate::harness::ReservedPort;

/// (soft, hard) "Max open files" of process `pid`.
fn open_files_limits(pid: u32) -> Option<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Some((fields.next()?.to_string(), fields.next()?.to_string()))
}

#[test]
fn run_raises_its_soft_open_files_limit_to_the_hard_one() {
    let (listen, admin) = (
        ReservedPort::loopback().unwrap(),
        ReservedPort::loopback().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: \"{}\"\nadmin_listen: \"{}\"\nupstreams:\n  api: {{ url: \"http://127.0.0.1:9\" }}\nroutes:\n  - name: all\n    match: {{ path: \"/**\" }}\n",
            listen.addr(),
            admin.addr()
        ),
    )
    .unwrap();
    // The shell lowers only the soft limit, then becomes the proxy (same pid).
    let mut child = Command::new("bash")
        .args(["-c", "ulimit -S -n 512 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_shiftgate"))
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while Instant::now() < deadline {
        seen = open_files_limits(pid);
        if let Some((soft, hard)) = &seen {
            let proxy = std::fs::read_link(format!("/proc/{pid}/exe"))
                .is_ok_and(|exe| exe.to_string_lossy().contains("shiftgate"));
            if proxy && soft == hard {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    let (soft, hard) = seen.expect("the proxy's limits");
    assert_ne!(hard, "512", "the test needs a hard limit above 512");
    assert_eq!(soft, hard, "soft limit raised to the hard one");
}
