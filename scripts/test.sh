#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine as root: installs what the tests need
# (the build's C toolchain and cmake, Redis, Prometheus's promtool, Chromium) when missing,
# then lints and runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
have() { command -v "$1" >/dev/null 2>&1; }
have cmake || missing+=(cmake)
have cc || missing+=(gcc)
have c++ || missing+=(g++)
have make || missing+=(make)
have pkg-config || missing+=(pkg-config)
have redis-server || missing+=(redis-server)
have promtool || missing+=(prometheus)
have prometheus || missing+=(prometheus)
have chromium || missing+=(chromium)
have python3 || missing+=(python3)
have openssl || missing+=(openssl)
[ -e /etc/ssl/certs/ca-certificates.crt ] || missing+=(ca-certificates)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Load tests open a connection per simulated agent.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" || true

cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
# Integration tests measure rates against real sockets: one at a time, so that they do not
# compete for the two cores.
cargo test --locked -- --test-threads=1
