#!/usr/bin/env bash
# Runs every check and test of the workspace: formatting, clippy, unit, property, integration and
# end-to-end tests (the kubectl suite drives the real kubectl against the simulator).
set -euo pipefail
cd "$(dirname "$0")/.."

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "error: $1 is not installed; install it with: $2" >&2; exit 1; }
}
need cargo "curl https://sh.rustup.rs | sh (the Rust toolchain)"
need kubectl "apt-get install -y kubectl (from the Kubernetes or Google Cloud apt repository)"
need python3 "apt-get install -y python3"
need diff "apt-get install -y diffutils"
need git "apt-get install -y git"
need ssh "apt-get install -y openssh-client"
# The SSH follower test runs a real sshd on a loopback port.
if [ ! -x /usr/sbin/sshd ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "openssh-server is missing; installing it" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server >/dev/null
  else
    echo "error: sshd is not installed; install it with: apt-get install -y openssh-server" >&2
    exit 1
  fi
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing; installing it" >&2
  cargo install --locked cargo-nextest
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# End-to-end tests run the workspace binaries as real processes.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast
