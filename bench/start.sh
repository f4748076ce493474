#!/usr/bin/env bash
# Start-time benchmark (issue 13), as root: a full pull against Beam (defaults, and without
# background fetch), side by side in one run, on a modelled link (bandwidth and round-trip
# time; see bench/start.py). Builds release binaries, the python3 image of Debian packages
# (five layers, as the quickstart's) and a busybox image, pushes and converts both into a
# docker-registry on 127.0.0.1 (stopped by PID on exit), then runs bench/start.py.
#
#   bench/start.sh [--runs N] [--bandwidths 200,0] [--rtts 0,20] [--systems full,beam,beam-nobg]
#                  [--containerd 1.6|1.7|2]
#
# Output: the table on stdout and in target/bench/start.txt. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "$(id -u)" = 0 ] || { echo "bench/start.sh: run as root" >&2; exit 1; }
containerd_version=1.6
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --containerd) containerd_version=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
bash .ci/install-deps.sh
case "$containerd_version" in
  1.6) containerd_bin=$(command -v containerd) ;;
  1.7|2) containerd_bin=$root/.work/containerd/$containerd_version/usr/bin/containerd ;;
  *) echo "bench/start.sh: --containerd takes 1.6, 1.7 or 2" >&2; exit 1 ;;
esac
cargo build --release -q -p beam --bins
beam=${CARGO_TARGET_DIR:-$root/target}/release/beam

work=$root/target/bench/start
mkdir -p "$work"
scratch=$(mktemp -d /tmp/beam-bench.XXXXXX)
reg_pid=
cleanup() {
  if [ -n "$reg_pid" ] && kill -0 "$reg_pid" 2>/dev/null; then kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

# Images, built once and kept in target/bench/start.
if [ ! -f "$work/python/layers.txt" ]; then
  bash tests/fixtures/make-python-layers.sh --large "$work/python" | grep "^total" || true
fi
if [ ! -f "$work/busybox.tar" ]; then
  bash tests/fixtures/make-busybox-layer.sh "$work/busybox.tar"
fi
mapfile -t pylayers < <(sed "s|^|$work/python/|" "$work/python/layers.txt")
python3 tests/fixtures/write-oci-layout.py --cmd '["/usr/bin/python3"]' "$work/layout" python "${pylayers[@]}"
python3 tests/fixtures/write-oci-layout.py --cmd '["/bin/sh"]' "$work/layout" busybox "$work/busybox.tar"

# shellcheck source=tests/fixtures/lib-registry.sh
. tests/fixtures/lib-registry.sh
start_registry "$scratch/registry"
port=$REGISTRY_PORT
reg_pid=$REGISTRY_PID
for tag in python busybox; do
  "$beam" convert --plain-http "oci:$work/layout:$tag" "127.0.0.1:$port/bench/$tag:1" >/dev/null
done
# The same python image with a recorded prefetch list (`beam record`: the files the workload
# opens, in order), under its own name so the plain conversion stays as it is.
"$beam" convert --plain-http "oci:$work/layout:python" "127.0.0.1:$port/bench/python-recorded:1" >/dev/null
"$beam" record --plain-http --cache-dir "$scratch/record-cache" --work-dir "$scratch/record-mounts" \
  "127.0.0.1:$port/bench/python-recorded:1" -- /usr/bin/python3 -c 'import json, sqlite3; print("ready")' >/dev/null
images='{"python": ["bench/python:1", ["/usr/bin/python3", "-c", "import json, sqlite3; print(\"ready\")"]],
         "python-recorded": ["bench/python-recorded:1", ["/usr/bin/python3", "-c", "import json, sqlite3; print(\"ready\")"], ["beam", "beam-nobg"]],
         "busybox": ["bench/busybox:1", ["/bin/echo", "ready"]]}'
python3 bench/start.py --registry-port "$port" --images "$images" \
  --containerd "$containerd_bin" "${args[@]}"
