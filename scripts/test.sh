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
# The hub's etcd store: protoc builds etcd-client, and its tests run real etcd processes.
apt_updated=""
install_pkg() {  # install_pkg COMMAND-OR-FILE PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  [ -e "$1" ] && return 0
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "$2 is missing; installing it" >&2
    if [ -z "$apt_updated" ]; then apt-get update -qq >/dev/null; apt_updated=1; fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$2" >/dev/null
  else
    echo "error: $1 is missing; install it with: apt-get install -y $2" >&2
    exit 1
  fi
}
install_pkg protoc protobuf-compiler
# protoc's well-known types (google/protobuf/descriptor.proto), which etcd-client's protos import.
install_pkg /usr/include/google/protobuf/descriptor.proto libprotobuf-dev
install_pkg etcd etcd-server
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "cargo-nextest is missing; installing it" >&2
  cargo install --locked cargo-nextest
fi

cargo fmt --all --check
# Everything with the hub's etcd store (hub replicas) built in; the plain build is what the demo uses.
features="--features flotilla-hub/etcd"
cargo clippy --workspace --all-targets --locked $features -- -D warnings
# End-to-end tests run the workspace binaries as real processes.
cargo build --workspace --bins --locked $features
cargo nextest run --workspace --locked --no-fail-fast $features
