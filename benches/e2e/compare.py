#!/usr/bin/env python3
"""End-to-end comparison, side by side in one run on this machine: a shift change straight at
the Genesys emulator, with SDK-style retries, through nginx limit_req and through shiftgate; one
token's shift change paced by shiftgate vs coalesced into bulk presence calls; the
pass-through overhead of shiftgate and nginx proxy_pass; the latency each adds at a constant
request rate; and the memory per waiting request of shiftgate and of nginx limit_req. Loopback
only. Prints Markdown tables and writes target/bench/e2e.json.

Usage: cargo build --release --bin shiftgate --example pingora_baseline --example constant_rate &&
       python3 benches/e2e/compare.py [--quick] [--before=PATH] [--after=PATH]
                                      [--only=shift-change,one-token,pass-through,latency,memory,
                                              instructions]
--after: the shiftgate binary to measure (default target/release/shiftgate, under
$CARGO_TARGET_DIR instead of target/ when that is set); it also runs the emulator and the load
generator, and examples/pingora_baseline and examples/constant_rate are looked for next to it.
--before: a second shiftgate binary (e.g. a build of the code before a change); the shift-change
and pass-through shiftgate rows are then measured for both in the same run, one after the other,
labelled "shiftgate (before)" and "shiftgate (after)".
Needs: nginx and wrk (Debian packages), the release binary; `instructions` also valgrind.
`instructions` counts the CPU instructions each proxy runs in user space per proxied request
(valgrind's callgrind, 10 connections): unlike requests/s on a shared machine, the count does
not move from one run to the next, so it shows a change in the proxy's own cost that wall-clock
rounds cannot resolve. The kernel's part (the syscalls) is not in it.
"""
import json
import math
import os
import re
import signal
import statistics
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def option(name):
    """The value of `--name=VALUE` on the command line, or None."""
    return next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")), None)


# A misspelt or space-separated option would otherwise be ignored silently, and a run is long.
for arg in sys.argv[1:]:
    if arg != "--quick" and not arg.startswith(("--only=", "--before=", "--after=")):
        sys.exit(f"unknown argument {arg!r}\n{__doc__}")
# Where cargo put the build: the same variable cargo reads, so one export serves both.
TARGET_DIR = os.path.abspath(os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"))
BIN = os.path.abspath(option("after") or os.path.join(TARGET_DIR, "release", "shiftgate"))
BEFORE = os.path.abspath(option("before")) if option("before") is not None else None
# The shiftgate binaries whose rows are measured, as (label, path): one, or "before" and "after".
SHIFTGATES = ([("shiftgate (before)", BEFORE), ("shiftgate (after)", BIN)] if BEFORE
              else [("shiftgate", BIN)])
QUICK = "--quick" in sys.argv
ONLY = option("only").split(",") if option("only") is not None else None


def example(name):
    """An example binary: cargo puts it in release/examples; a copy may sit beside shiftgate."""
    candidates = [os.path.join(os.path.dirname(BIN), d, name) for d in ("examples", "")]
    return next((c for c in candidates if os.path.exists(c)), None)


def wanted(part):
    return ONLY is None or part in ONLY
TMP = tempfile.mkdtemp(prefix="shiftgate-bench-")
PROCS = []


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, timeout=20):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start(cmd, name, env=None):
    log = open(os.path.join(TMP, name + ".log"), "ab")
    p = subprocess.Popen(cmd, stdout=log, stderr=log, env={**os.environ, **(env or {})})
    PROCS.append(p)
    return p


def stop(p):
    if p.poll() is None:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def write(name, text):
    path = os.path.join(TMP, name)
    with open(path, "w") as f:
        f.write(text)
    return path


def http(method, url, body=None):
    req = urllib.request.Request(url, method=method, data=body)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


class Emulator:
    def __init__(self, yaml):
        self.port = free_port()
        cfg = write(f"emu-{self.port}.yaml", yaml)
        self.proc = start([BIN, "emulate", "--listen", f"127.0.0.1:{self.port}", "--config", cfg], "emulator")
        wait_port(self.port)

    def reset(self):
        http("POST", f"http://127.0.0.1:{self.port}/_emulator/stats/reset", b"")

    def stats(self):
        return http("GET", f"http://127.0.0.1:{self.port}/_emulator/stats")


def shiftgate(upstream_port, budget=None, workers=2, extra="", max_wait="10m", log="info", binary=BIN,
              prefix=()):
    port, admin = free_port(), free_port()
    budgets = f'budgets:\n  presence: {{ rate: "{budget}" }}\n' if budget else ""
    route_budgets = f"    budgets: [presence]\n    max_wait: \"{max_wait}\"\n" if budget else ""
    cfg = write(
        f"shiftgate-{port}.yaml",
        f"""listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
upstreams:
  api: {{ url: "http://127.0.0.1:{upstream_port}" }}
{budgets}routes:
  - name: presence
    match: {{ method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}" }}
{route_budgets}  - name: default
    match: {{ path: "/**" }}
queue:
  max_depth: 20000
workers: {workers}
{extra}""",
    )
    p = start(
        [*prefix, binary, "run", "--config", cfg, "--upgrade-sock", os.path.join(TMP, f"up-{port}.sock"),
         "--pid-file", os.path.join(TMP, f"pid-{port}")],
        f"shiftgate-{port}",
        env={"RUST_LOG": log},
    )
    wait_port(port, 120 if prefix else 20)
    wait_port(admin, 120 if prefix else 20)
    return p, port, admin


def nginx(upstream_port, rate=None, workers=1, prefix=()):
    port = free_port()
    d = os.path.join(TMP, f"nginx-{port}")
    os.makedirs(os.path.join(d, "logs"), exist_ok=True)
    # One zone for all requests: the key must not be empty (nginx does not count those).
    limit_zone = (
        f'map $host $shift_all {{ default "all"; }}\n  limit_req_zone $shift_all zone=shift:1m rate={rate}r/s;'
        if rate else ""
    )
    # Queue the excess (no nodelay) so that a burst is smoothed to the rate, like shiftgate.
    limit = "limit_req zone=shift burst=20000;" if rate else ""
    conf = write(
        f"nginx-{port}.conf",
        f"""worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/logs/error.log warn;
events {{ worker_connections 16384; }}
http {{
  access_log {d}/logs/access.log;
  client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
  fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
  {limit_zone}
  upstream emu {{ server 127.0.0.1:{upstream_port}; keepalive 256; }}
  server {{
    listen 127.0.0.1:{port};
    # Requests in progress ("Writing"), including those limit_req delays: the memory part's count.
    location = /_nginx_status {{ stub_status; }}
    location / {{
      {limit}
      proxy_pass http://emu;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}
}}
""",
    )
    # Under valgrind: no master process, so that the worker is the process measured.
    extra = " master_process off;" if prefix else ""
    p = start([*prefix, "nginx", "-c", conf, "-p", d, "-g", "daemon off;" + extra], f"nginx-{port}")
    wait_port(port, 120 if prefix else 20)
    return p, port


def loadtest(port, agents, loops, sdk_retry=0, tokens=None):
    out = subprocess.run(
        [BIN, "loadtest", "--target", f"http://127.0.0.1:{port}", "--agents", str(agents),
         "--loops", str(loops), "--tokens", str(tokens or agents), "--timeout", "1200s",
         "--sdk-retry", str(sdk_retry), "--json", "--quiet"],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout)


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def shift_change(limit_rate, budget_rate, agents, loops):
    """One shift change four ways against an emulator limiting presence PATCHes."""
    emu = Emulator(
        f"""token_rate_per_minute: 0
latency: {{ min: "20ms", max: "40ms" }}
route_limits:
  - {{ name: presence, method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}", limit: "{limit_rate}/s" }}
"""
    )
    ideal = agents * loops / limit_rate
    rows = []
    ways = [
        ("direct", lambda: (None, emu.port), 0),
        ("direct, SDK-style retry (Retry-After, 5 times)", lambda: (None, emu.port), 5),
        (f"nginx limit_req {budget_rate} r/s", lambda: nginx(emu.port, budget_rate), 0),
    ] + [
        (f"{label} {budget_rate}/s",
         lambda b=binary: shiftgate(emu.port, f"{budget_rate}/s", binary=b)[:2], 0)
        for label, binary in SHIFTGATES
    ]
    for name, make, retry in ways:
        proc, port = make()
        time.sleep(1.5)  # windows of the previous run expire
        emu.reset()
        s = loadtest(port, agents, loops, retry)
        st = emu.stats()
        if proc:
            stop(proc)
        lat = s.get("latency") or {}
        rows.append({
            "way": name,
            "completion_s": s["completion_time_ms"] / 1000,
            "ratio": s["completion_time_ms"] / 1000 / ideal,
            "answered_200": s["by_status"].get("200", 0),
            "client_429": s["final_429s"],
            "sdk_retries": s["sdk_retries"],
            "upstream_429": st["by_status"].get("429", 0),
            "upstream_requests": st["total_requests"],
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
            "transport_errors": s["transport_errors"],
        })
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    stop(emu.proc)
    return {"limit": limit_rate, "budget": budget_rate, "agents": agents, "loops": loops,
            "ideal_s": ideal, "rows": rows}


def shiftgate_one_token(upstream_port, coalesce):
    """shiftgate paced by the token's 300/min, its presence updates coalesced into bulk calls
    (paced by the token and the bulk route's 10/s) or not."""
    port, admin = free_port(), free_port()
    more = ', coalesce: { into: presence-bulk, window: "10ms", max_batch: 50 }' if coalesce else ""
    cfg = write(
        f"shiftgate-{port}.yaml",
        f"""listen: "127.0.0.1:{port}"
admin_listen: "127.0.0.1:{admin}"
upstreams:
  api: {{ url: "http://127.0.0.1:{upstream_port}" }}
budgets:
  per-token: {{ rate: "300/min", per: token }}
  presence-bulk: {{ rate: "10/s", per: token }}
routes:
  - {{ name: presence, match: {{ method: PATCH, path: "/api/v2/users/{{userId}}/presences/{{sourceId}}" }}, budgets: [per-token], max_wait: "20m"{more} }}
  - {{ name: presence-bulk, match: {{ method: PUT, path: "/api/v2/users/presences/bulk" }}, budgets: [presence-bulk, per-token] }}
  - {{ name: default, match: {{ path: "/**" }} }}
queue:
  max_depth: 20000
workers: 2
""",
    )
    p = start([BIN, "run", "--config", cfg, "--upgrade-sock", os.path.join(TMP, f"up-{port}.sock"),
               "--pid-file", os.path.join(TMP, f"pid-{port}")], f"shiftgate-{port}",
              env={"RUST_LOG": "warn"})
    wait_port(port)
    wait_port(admin)
    return p, port


def one_token(agents, loops):
    """A shift change under one token (Genesys's 300/min), paced vs coalesced into bulk calls."""
    emu = Emulator(
        """token_rate_per_minute: 300
latency: { min: "20ms", max: "40ms" }
route_limits:
  - { name: bulk, method: PUT, path: "/api/v2/users/presences/bulk", limit: "10/s", per: token }
"""
    )
    updates = agents * loops
    rows = []
    for name, coalesce, ideal in [
        ("shiftgate, paced (300/min)", False, updates / 5),
        ("shiftgate, coalesced into bulk calls", True, -(-updates // 50) / 5),
    ]:
        proc, port = shiftgate_one_token(emu.port, coalesce)
        time.sleep(1.5)
        emu.reset()
        s = loadtest(port, agents, loops, tokens=1)
        st = emu.stats()
        stop(proc)
        lat = s.get("latency") or {}
        rows.append({
            "way": name,
            "ideal_s": ideal,
            "completion_s": s["completion_time_ms"] / 1000,
            "answered_200": s["by_status"].get("200", 0),
            "client_429": s["final_429s"],
            "upstream_429": st["by_status"].get("429", 0),
            "upstream_requests": st["total_requests"],
            "p50_ms": lat.get("p50_ms"),
            "p99_ms": lat.get("p99_ms"),
        })
        print(f"  {name}: {rows[-1]}", file=sys.stderr)
    stop(emu.proc)
    return {"agents": agents, "loops": loops, "rows": rows}


def wrk(port, seconds, conns=50):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-H", "Authorization: Bearer bench",
         f"http://127.0.0.1:{port}/api/v2/presence/definitions"],
        capture_output=True, text=True, check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(re.search(r"(\d+) requests in", out).group(1))
    return {"rps": rps, "p99_ms": float(p99.group(1)) * scale, "requests": requests,
            "non_2xx": int(errors.group(1)) if errors else 0}


def cpu_seconds(pids):
    """User and system CPU the processes `pids` have used so far (every thread), in seconds."""
    ticks = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            # "pid (comm) state ...": utime and stime are fields 14 and 15, after comm's ")".
            fields = f.read().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def pass_through(seconds, rounds):
    """Every way started once, then measured in turn, `rounds` times: on two shared cores one
    15-second run moves by up to 30 % from the next, so each way's figure is its median, and the
    ratio to bare Pingora is the median of the rounds' ratios (each pair measured minutes apart
    at most). The CPU each proxy used per request (user and kernel, from /proc) is measured in
    the same runs: it moves less with the machine than requests/s, which also depend on how the
    two cores are shared between the proxy, the upstream and wrk."""
    emu = Emulator("token_rate_per_minute: 0\n")
    # (way, port, the pids whose CPU is the way's)
    ways = [("emulator directly (reference)", emu.port, [emu.proc.pid])]
    p, port = nginx(emu.port, None, workers=1)
    ways.append(("nginx proxy_pass, 1 worker", port, [p.pid, nginx_worker(p.pid)]))
    for log, variant in [("info", "1 worker (access log on, the default)"),
                         ("warn", "1 worker, access log off (RUST_LOG=warn)")]:
        for label, binary in SHIFTGATES:
            p, port, _ = shiftgate(emu.port, None, workers=1, log=log, binary=binary)
            ways.append((f"{label}, {variant}", port, [p.pid]))
    baseline = example("pingora_baseline")
    if baseline:
        port = free_port()
        p = start([baseline, f"127.0.0.1:{port}", f"127.0.0.1:{emu.port}"], "pingora-baseline")
        wait_port(port)
        ways.append(("Pingora 0.9.1 with no hooks, 1 thread (examples/pingora_baseline)", port, [p.pid]))
    runs = {way: [] for way, _, _ in ways}
    for r in range(rounds):
        for way, port, pids in ways:
            before = cpu_seconds(pids)
            run = wrk(port, seconds)
            run["cpu_us"] = (cpu_seconds(pids) - before) * 1e6 / max(run["requests"], 1)
            runs[way].append(run)
        print(f"  round {r + 1}: " + ", ".join(
            f"{w.split(',')[0][:24]} {runs[w][-1]['rps']:.0f} ({runs[w][-1]['cpu_us']:.1f} µs)"
            for w, _, _ in ways), file=sys.stderr)
    bare = runs[ways[-1][0]] if baseline else None
    rows = []
    for way, _, _ in ways:
        rs = runs[way]
        row = {"way": way, "rps": statistics.median(x["rps"] for x in rs),
               "p99_ms": statistics.median(x["p99_ms"] for x in rs),
               "cpu_us_per_request": statistics.median(x["cpu_us"] for x in rs),
               "non_2xx": sum(x["non_2xx"] for x in rs), "rounds": [x["rps"] for x in rs],
               "cpu_rounds": [x["cpu_us"] for x in rs]}
        if bare:
            row["x_bare_pingora"] = statistics.median(x["rps"] / b["rps"] for x, b in zip(rs, bare))
            row["cpu_x_bare_pingora"] = statistics.median(x["cpu_us"] / b["cpu_us"] for x, b in zip(rs, bare))
        rows.append(row)
    for p in list(PROCS):
        stop(p)
    for r in rows:
        print(f"  {r}", file=sys.stderr)
    return rows


def callgrind(start_way, seconds, load):
    """User-space instructions of one proxy run under callgrind for `seconds`, loaded with wrk
    (10 connections) or left idle: (requests answered, instructions). `start_way(prefix)` starts
    the proxy with `prefix` before its command and returns (process, port, stop signal)."""
    out = os.path.join(TMP, f"callgrind-{free_port()}.out")
    p, port, sig = start_way(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"])
    requests = 0
    if load:
        requests = wrk(port, seconds, conns=10)["requests"]
    else:
        time.sleep(seconds)
    p.send_signal(sig)
    try:
        p.wait(120)
    except subprocess.TimeoutExpired:
        p.kill()
        raise RuntimeError(f"{start_way.__name__} did not stop under callgrind")
    with open(out) as f:
        totals = [int(line.split()[1]) for line in f if line.startswith(("summary:", "totals:"))]
    return requests, totals[-1]


def instructions(seconds):
    """Instructions per proxied request: each way run once loaded and once idle for as long, and
    the difference divided by the requests (start-up, and work done per second whatever the
    load, cancel out)."""
    emu = Emulator("token_rate_per_minute: 0\n")

    def pingora(prefix):
        port = free_port()
        p = start([*prefix, example("pingora_baseline"), f"127.0.0.1:{port}", f"127.0.0.1:{emu.port}"],
                  "pingora-baseline-callgrind")
        wait_port(port, 120)
        return p, port, signal.SIGINT

    def nginx_way(prefix):
        p, port = nginx(emu.port, None, workers=1, prefix=prefix)
        return p, port, signal.SIGQUIT

    ways = [(PINGORA_WAY + " (examples/pingora_baseline)", pingora), (NGINX_WAY, nginx_way)]
    for log, variant in [("info", "access log on"), ("warn", "access log off")]:
        for label, binary in SHIFTGATES:
            def way(prefix, log=log, binary=binary):
                p, port, _ = shiftgate(emu.port, None, workers=1, log=log, binary=binary, prefix=prefix)
                return p, port, signal.SIGTERM
            way.__name__ = label
            ways.append((f"{label}, 1 worker, {variant}", way))
    # As the shipped config is: the presence route paced, so the client edge reads every head
    # first (the GET measured is on the unpaced default route).
    for label, binary in SHIFTGATES:
        def paced_way(prefix, binary=binary):
            p, port, _ = shiftgate(emu.port, "100/s", workers=1, binary=binary, prefix=prefix)
            return p, port, signal.SIGTERM
        paced_way.__name__ = label
        ways.append((f"{label}, 1 worker, access log on, presence route paced", paced_way))
    rows = []
    for name, way in ways:
        requests, loaded = callgrind(way, seconds, load=True)
        _, idle = callgrind(way, seconds, load=False)
        rows.append({"way": name, "requests": requests,
                     "instructions_per_request": (loaded - idle) / max(requests, 1)})
        print(f"  {rows[-1]}", file=sys.stderr)
    bare = rows[0]["instructions_per_request"]
    for r in rows:
        r["x_bare_pingora"] = r["instructions_per_request"] / bare
    stop(emu.proc)
    return rows


NGINX_WAY = "nginx proxy_pass, 1 worker"
# Requests/s the latency part sends in all at one time: above it, two cores shared by the
# generator, the emulator and the proxies queue each other's work and every way's p99 is the
# scheduler's (measured: the emulator directly at 5 ms p99 with four ways at 5,000/s each).
MAX_RATE_AT_ONCE = 10_000
PINGORA_WAY = "Pingora 0.9.1 with no hooks, 1 thread"


def constant_rate(ports, rate, seconds, warmup):
    """examples/constant_rate: open loop, latency counted from each request's due time; every
    port gets `rate` from the same pacer at the same moments. One result per port, in order."""
    targets = [a for port in ports for a in ("--target", f"127.0.0.1:{port}")]
    out = subprocess.run(
        [example("constant_rate"), *targets, "--rate", str(rate), "--seconds", str(seconds),
         "--warmup", str(warmup)],
        capture_output=True, text=True, check=True,
    )
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def median_ci(values, confidence=0.9):
    """The median and a distribution-free confidence interval for it: the order statistics
    x(k) and x(n-k+1) with k the largest such that P(Binomial(n, 1/2) < k) <= (1 - confidence)/2
    (the sign test's interval). With too few values for that, the interval is all of them."""
    xs, n = sorted(values), len(values)
    tail, k, below = (1 - confidence) / 2, 0, 0.0
    while True:
        below += math.comb(n, k) / 2 ** n  # P(B <= k)
        if below > tail:
            break
        k += 1
    # P(B <= k-1) <= tail: the interval is x(k) .. x(n-k+1), 1-based.
    low, high = (xs[k - 1], xs[n - k]) if k >= 1 else (xs[0], xs[-1])
    return statistics.median(xs), low, high


def latency(rates, seconds, warmup, rounds):
    """p50/p99/p99.9 at a constant, non-saturating rate, straight at the emulator and through
    each proxy, several at once: one generator gives every way in a run the whole rate from the
    same pacer (a way's requests offset from the next way's by a fraction of the interval), so a
    run measures them through the same seconds of the machine's life, with its stalls and the
    generator's own lateness in all of them. All ways share one run while that stays under
    MAX_RATE_AT_ONCE in all; above it, each way other than shiftgate runs with the shiftgates
    only. A way's figures are the medians of its rounds; what one way adds over another is the
    median of their differences within a run, with a 90 % confidence interval for that median
    (sign test)."""
    emu = Emulator("token_rate_per_minute: 0\n")
    ng, nginx_port = nginx(emu.port, None, workers=1)
    baseline_port = free_port()
    baseline = start([example("pingora_baseline"), f"127.0.0.1:{baseline_port}", f"127.0.0.1:{emu.port}"],
                     "pingora-baseline")
    wait_port(baseline_port)
    ways, procs = [("emulator directly (reference)", emu.port), (NGINX_WAY, nginx_port),
                   (PINGORA_WAY, baseline_port)], [ng, baseline]
    for label, binary in SHIFTGATES:
        p, port, _ = shiftgate(emu.port, None, workers=1, binary=binary)
        ways.append((f"{label}, 1 worker (access log on, the default)", port))
        procs.append(p)
    shiftgates = [w for w in ways if w[0].startswith("shiftgate")]
    rows = []
    for rate in rates:
        # Every way at once while the machine can carry it; above that, each other way at once
        # with the shiftgates only, so that every comparison is still made within one run.
        if rate * len(ways) <= MAX_RATE_AT_ONCE:
            groups = [ways]
        else:
            groups = [[w] + shiftgates for w in ways if w not in shiftgates]
        # runs[ref][way]: the way's results in the rounds of the group measured with `ref`.
        runs = {g[0][0]: {way: [] for way, _ in g} for g in groups}
        for r in range(rounds):
            for group in groups:
                results = constant_rate([port for _, port in group], rate, seconds, warmup)
                for (way, _), result in zip(group, results):
                    runs[group[0][0]][way].append(result)
            print(f"  {rate}/s round {r + 1}: p99 " + ", ".join(
                f"{w[:24]} {x[-1]['p99_ms']:.3f} ms" for g in runs.values() for w, x in g.items()),
                file=sys.stderr)

        for way, _ in ways:
            # The way's own figures come from the run it shared with bare Pingora, if any.
            run = next((g for g in runs.values() if way in g and PINGORA_WAY in g),
                       next(g for g in runs.values() if way in g))
            rs = run[way]
            row = {"way": way, "rate": rate, "seconds": seconds, "rounds": rounds, "measured_with": list(run),
                   **{k: statistics.median(x[k] for x in rs)
                      for k in ("achieved_rate", "p50_ms", "p99_ms", "p99_9_ms", "send_lag_p99_ms")},
                   "errors": sum(x["errors"] for x in rs), "sent": sum(x["sent"] for x in rs),
                   "p99_rounds_ms": [x["p99_ms"] for x in rs]}
            for key, ref in [("pingora", PINGORA_WAY), ("nginx", NGINX_WAY)]:
                if way == ref:
                    continue
                pair = next((g for g in runs.values() if way in g and ref in g), None)
                if pair is None:
                    continue
                for q in ("p50", "p99"):
                    diffs = [x[f"{q}_ms"] - b[f"{q}_ms"] for x, b in zip(pair[way], pair[ref])]
                    median, low, high = median_ci(diffs)
                    row[f"added_{q}_over_{key}_ms"] = median
                    row[f"added_{q}_over_{key}_ci90_ms"] = [low, high]
                    row[f"added_{q}_over_{key}_rounds_ms"] = diffs
            rows.append(row)
    for p in procs:
        stop(p)
    stop(emu.proc)
    return rows


def hold(port, waiting):
    """`waiting` clients, each with its own connection and one presence PATCH."""
    return subprocess.Popen(
        [BIN, "loadtest", "--target", f"http://127.0.0.1:{port}", "--agents", str(waiting), "--loops", "1",
         "--tokens", "10", "--timeout", "600s", "--json", "--quiet"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def loaded_rss(pid, waiting, count):
    """Once `count()` has reached (nearly) `waiting` and had a second to settle: (RSS, count)."""
    deadline = time.time() + 120
    while time.time() < deadline and count() < waiting - 5:
        time.sleep(0.5)
    time.sleep(1)
    return rss_kib(pid), count()


def memory_row(way, waiting, idle, loaded, depth):
    row = {"way": way, "waiting": depth, "rss_idle_kib": idle, "rss_loaded_kib": loaded,
           "kib_per_waiting_request": (loaded - idle) / max(depth, 1)}
    print(f"  {row}", file=sys.stderr)
    return row


def memory_shiftgate(emu, waiting):
    # 1/s and a wait of up to 5 h: every request stays queued for the measurement.
    p, port, admin = shiftgate(emu.port, "1/s", workers=2, max_wait="5h")
    # warm: a few requests through, then the idle footprint
    loadtest(port, 2, 1)
    time.sleep(1)
    idle = rss_kib(p.pid)
    lt = hold(port, waiting)
    loaded, depth = loaded_rss(
        p.pid, waiting, lambda: http("GET", f"http://127.0.0.1:{admin}/status.json")["queue_depth"])
    lt.kill()
    lt.wait()
    stop(p)
    return memory_row("shiftgate, 2 workers, budget 1/s", waiting, idle, loaded, depth)


def nginx_worker(master):
    """The pid of nginx's worker process: the master's child (its ppid, in /proc/PID/stat)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")".
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            if ppid == master:
                return int(pid)
        time.sleep(0.1)
    raise RuntimeError(f"nginx master {master} has no worker")


def memory_nginx(emu, waiting):
    # The same queueing as shiftgate's: 1 r/s, the excess delayed (burst=20000, no nodelay).
    p, port = nginx(emu.port, 1, workers=1)
    worker = nginx_worker(p.pid)
    loadtest(port, 2, 1)
    time.sleep(1)
    idle = rss_kib(worker)
    lt = hold(port, waiting)

    def in_progress():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/_nginx_status", timeout=10) as r:
            # "Writing" counts every request past its header, the delayed ones and this one.
            return int(re.search(rb"Writing: (\d+)", r.read()).group(1)) - 1
    loaded, depth = loaded_rss(worker, waiting, in_progress)
    lt.kill()
    lt.wait()
    stop(p)
    return memory_row("nginx limit_req 1 r/s, burst=20000, 1 worker", waiting, idle, loaded, depth)


def memory(waiting):
    """RSS per waiting request: shiftgate's queue and nginx limit_req's delay, held the same way."""
    emu = Emulator("token_rate_per_minute: 0\n")
    rows = [memory_shiftgate(emu, waiting), memory_nginx(emu, waiting)]
    stop(emu.proc)
    return rows


def table(title, header, rows):
    """A Markdown table under a `###` title: `header` and each row are lists of cells."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")


def main():
    if not os.path.isfile(BIN):
        sys.exit(f"build first: cargo build --release (no {BIN})")
    if BEFORE and not os.path.isfile(BEFORE):
        sys.exit(f"--before: no such file {BEFORE}")
    if wanted("latency"):
        for name in ("constant_rate", "pingora_baseline"):
            if not example(name):
                sys.exit(f"build first: cargo build --release --example {name} (none beside {BIN})")
    agents, loops = (100, 5) if QUICK else (500, 10)
    results = {"machine": {"cpus": os.cpu_count()}, "quick": QUICK}
    if BEFORE:
        results["binaries"] = {"before": BEFORE, "after": BIN}
    try:
        if wanted("shift-change"):
            print("shift change at the limit", file=sys.stderr)
            results["shift_change"] = shift_change(100, 100, agents, loops)
            print("shift change, budget 50 % above the limit", file=sys.stderr)
            results["over_budget"] = shift_change(100, 150, agents, loops)
        if wanted("one-token"):
            print("one token, paced vs coalesced", file=sys.stderr)
            results["one_token"] = one_token(*((100, 2) if QUICK else (500, 10)))
        if wanted("pass-through"):
            print("pass-through", file=sys.stderr)
            results["pass_through"] = pass_through(5 if QUICK else 10, 2 if QUICK else 5)
        if wanted("latency"):
            print("latency at a constant rate", file=sys.stderr)
            results["latency"] = latency([1000] if QUICK else [1000, 5000], *((5, 1, 3) if QUICK else (5, 1, 15)))
        if wanted("memory"):
            print("memory", file=sys.stderr)
            results["memory"] = memory(1000 if QUICK else 10000)
        if wanted("instructions"):
            print("instructions per request (callgrind)", file=sys.stderr)
            results["instructions"] = instructions(5 if QUICK else 15)
    finally:
        for p in PROCS:
            if p.poll() is None:
                p.kill()
    os.makedirs(os.path.join(ROOT, "target", "bench"), exist_ok=True)
    name = "e2e.json" if ONLY is None else "e2e-" + "-".join(ONLY) + ".json"
    with open(os.path.join(ROOT, "target", "bench", name), "w") as f:
        json.dump(results, f, indent=2)
    for key, title in [("shift_change", "at the limit"), ("over_budget", "budget 50 % above the limit")]:
        if key not in results:
            continue
        sc = results[key]
        table(f"Shift change {title}: {sc['agents']} agents x {sc['loops']} presence updates, "
              f"upstream limit {sc['limit']}/s (ideal {sc['ideal_s']:.0f} s)",
              ["way", "completion", "÷ ideal", "200s", "client 429s", "SDK retries", "upstream 429s",
               "p50", "p99"],
              [[r["way"], f"{r['completion_s']:.1f} s", f"{r['ratio']:.3f}", r["answered_200"],
                r["client_429"], r["sdk_retries"], r["upstream_429"], f"{r['p50_ms']:.0f} ms",
                f"{r['p99_ms']:.0f} ms"] for r in sc["rows"]])
    if "one_token" in results:
        ot = results["one_token"]
        table(f"One token (Genesys's 300/min): {ot['agents']} agents x {ot['loops']} presence updates, "
              f"bulk calls limited to 10/s",
              ["way", "completion", "ideal", "200s", "client 429s", "upstream 429s", "upstream requests",
               "p50", "p99"],
              [[r["way"], f"{r['completion_s']:.1f} s", f"{r['ideal_s']:.1f} s", r["answered_200"],
                r["client_429"], r["upstream_429"], r["upstream_requests"], f"{r['p50_ms']:.0f} ms",
                f"{r['p99_ms']:.0f} ms"] for r in ot["rows"]])
    if "pass_through" in results:
        rounds = len(results["pass_through"][0]["rounds"])
        table(f"Pass-through overhead (wrk -t1 -c50, GET, emulator upstream without limits; "
              f"median of {rounds} rounds, every way measured in turn in each)",
              ["way", "requests/s", "× bare Pingora", "p99", "each round", "CPU per request",
               "CPU × bare Pingora", "non-2xx"],
              [[r["way"], f"{r['rps']:.0f}",
                f"{r['x_bare_pingora']:.2f}" if "x_bare_pingora" in r else "-", f"{r['p99_ms']:.2f} ms",
                " / ".join(f"{x:.0f}" for x in r["rounds"]), f"{r['cpu_us_per_request']:.1f} µs",
                f"{r['cpu_x_bare_pingora']:.2f}" if "cpu_x_bare_pingora" in r else "-", r["non_2xx"]]
               for r in results["pass_through"]])
    if "latency" in results:
        lat = results["latency"]

        def added(r, q, key, ref):
            if f"added_{q}_over_{key}_ms" not in r:
                return "—"
            low, high = r[f"added_{q}_over_{key}_ci90_ms"]
            return f"{r[f'added_{q}_over_{key}_ms']:+.3f} ms ({low:+.3f} … {high:+.3f})"
        table(f"Latency at a constant rate (open loop, GET, emulator upstream without limits; "
              f"median of {lat[0]['rounds']} rounds of {lat[0]['seconds']:.0f} s, each way at the rate given, "
              f"the ways of one run at once (all up to {MAX_RATE_AT_ONCE:,}/s in all, else each with the "
              f"shiftgates); added: median of the rounds' differences within a run, its 90 % confidence "
              f"interval in brackets)",
              ["way", "rate", "achieved", "p50", "p99", "p99.9", "generator late at p99",
               "added p50 over bare Pingora", "added p99 over bare Pingora", "added p99 over nginx"],
              [[r["way"], f"{r['rate']:.0f}/s", f"{r['achieved_rate']:.0f}/s", f"{r['p50_ms']:.3f} ms",
                f"{r['p99_ms']:.3f} ms", f"{r['p99_9_ms']:.3f} ms", f"{r['send_lag_p99_ms']:.3f} ms",
                added(r, "p50", "pingora", PINGORA_WAY), added(r, "p99", "pingora", PINGORA_WAY),
                added(r, "p99", "nginx", NGINX_WAY)] for r in lat])
        print()
        for r in lat:
            if r["errors"]:
                print(f"{r['way']} at {r['rate']:.0f}/s: {r['errors']} errors of {r['sent']}")
            if r["way"].startswith("shiftgate"):
                median = r["added_p99_over_pingora_ms"]
                low, high = r["added_p99_over_pingora_ci90_ms"]
                # An interval that straddles the goal leaves the verdict open.
                verdict = ("met" if high <= 0.2 else "NOT met" if low > 0.2
                           else "not judged: its 90 % confidence interval lies on both sides of it")
                print(f"{r['way']} at {r['rate']:.0f}/s adds {median:+.3f} ms at p99 over bare Pingora "
                      f"(90 % confidence {low:+.3f} … {high:+.3f} ms): goal ≤ 0.2 ms {verdict}")
    if "instructions" in results:
        table("Instructions per proxied request (user space, callgrind, wrk -c10 GET, "
              "emulator upstream without limits)",
              ["way", "requests measured", "instructions per request", "× bare Pingora"],
              [[r["way"], r["requests"], f"{r['instructions_per_request']:,.0f}",
                f"{r['x_bare_pingora']:.3f}"] for r in results["instructions"]])
    if "memory" in results:
        table("Memory", ["way", "waiting requests", "RSS idle", "RSS with them waiting", "per waiting request"],
              [[m["way"], m["waiting"], f"{m['rss_idle_kib'] / 1024:.1f} MiB",
                f"{m['rss_loaded_kib'] / 1024:.1f} MiB", f"{m['kib_per_waiting_request']:.1f} KiB"]
               for m in results["memory"]])

if __name__ == "__main__":
    main()
