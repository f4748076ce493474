#!/usr/bin/env bash
# The project's test command (README "Run the tests"): installs what the tests need on a fresh
# Debian bookworm machine, builds, and runs every unit and integration test. Needs root: the
# tests start a registry, containerd and runc, and mount filesystems.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "tests/run.sh: run as root (the tests start containerd and make mounts)" >&2
  exit 1
fi
bash .ci/install-deps.sh
cargo build --workspace --bins
cargo test --workspace --no-fail-fast -- --test-threads=2
