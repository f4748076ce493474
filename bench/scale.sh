#!/usr/bin/env bash
# Scale benchmark (issue 13, item 6), as root: ten containers of one image at once, the same
# workload as the image grows to 1 and 4 GB, and ten more layers; Beam with its defaults
# against a full pull, on a modelled link (bench/start.py's relay). Builds release binaries
# and the images (kept in target/bench/scale; the padding layers are random data), pushes and
# converts them into a docker-registry on 127.0.0.1 (stopped by PID on exit), then runs
# bench/scale.py.
#
#   bench/scale.sh [--runs N] [--bandwidth 200] [--rtt 0] [--containers 10]
#                  [--systems full,beam[,beam-nobg]] [--parts ten,sizes,layers]
#                  [--containerd 1.6|1.7|2]
#
# Needs about 20 GB of disk (the 4 GB layer as tar, gzip, registry blobs and Beam chunks).
# Output: the tables on stdout and in target/bench/scale.txt. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "$(id -u)" = 0 ] || { echo "bench/scale.sh: run as root" >&2; exit 1; }
containerd_version=2
parts=ten,sizes,layers
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --containerd) containerd_version=$2; shift 2 ;;
    --parts) parts=$2; args+=("$1" "$2"); shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
bash .ci/install-deps.sh
case "$containerd_version" in
  1.6) containerd_bin=$(command -v containerd) ;;
  1.7|2) containerd_bin=$root/.work/containerd/$containerd_version/usr/bin/containerd ;;
  *) echo "bench/scale.sh: --containerd takes 1.6, 1.7 or 2" >&2; exit 1 ;;
esac
cargo build --release -q -p beam --bins
beam=${CARGO_TARGET_DIR:-$root/target}/release/beam

work=$root/target/bench/scale
mkdir -p "$work"
scratch=$(mktemp -d /tmp/beam-bench.XXXXXX)
reg_pid=''
cleanup() {
  if [ -n "$reg_pid" ] && kill -0 "$reg_pid" 2>/dev/null; then kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

# The python image of bench/start.sh (built there or here), and what goes with it.
py=$root/target/bench/start/python
if [ ! -f "$py/layers.txt" ]; then
  bash tests/fixtures/make-python-layers.sh --large "$py" | grep "^total" || true
fi
mapfile -t pylayers < <(sed "s|^|$py/|" "$py/layers.txt")
# pad_layer MB: a layer of random files (64 MB each) under /pad, MB in all.
pad_layer() {
  local mb=$1 out=$work/pad-$1.tar
  if [ ! -f "$out" ]; then
    local d=$scratch/pad-$mb
    mkdir -p "$d/pad"
    for i in $(seq $((mb / 64))); do head -c $((64 << 20)) /dev/urandom > "$d/pad/f$i"; done
    tar --numeric-owner -C "$d" -cf "$out.tmp" pad && mv "$out.tmp" "$out"
    rm -rf "$d"
  fi
  echo "$out"
}
small_layers=()
for i in $(seq 10); do
  f=$work/small-$i.tar
  if [ ! -f "$f" ]; then
    d=$scratch/small-$i
    mkdir -p "$d/etc/extra"
    echo "layer $i" > "$d/etc/extra/$i.conf"
    tar --numeric-owner -C "$d" -cf "$f" etc
  fi
  small_layers+=("$f")
done
layout=$work/layout
cmd='["/usr/bin/python3"]'
if [ ! -f "$layout/index.json" ]; then
  python3 tests/fixtures/write-oci-layout.py --cmd "$cmd" "$layout" python "${pylayers[@]}"
  python3 tests/fixtures/write-oci-layout.py --cmd "$cmd" --gzip-level 1 "$layout" python-1g \
    "$(pad_layer 896)" "${pylayers[@]}"
  python3 tests/fixtures/write-oci-layout.py --cmd "$cmd" --gzip-level 1 "$layout" python-4g \
    "$(pad_layer 3968)" "${pylayers[@]}"
  python3 tests/fixtures/write-oci-layout.py --cmd "$cmd" "$layout" python-layers \
    "${pylayers[@]}" "${small_layers[@]}"
  rm -f "$work"/pad-*.tar
fi

# shellcheck source=tests/fixtures/lib-registry.sh
. tests/fixtures/lib-registry.sh
start_registry "$scratch/registry"
port=$REGISTRY_PORT
reg_pid=$REGISTRY_PID
tags=(python)
case ",$parts," in *,sizes,*) tags+=(python-1g python-4g) ;; esac
case ",$parts," in *,layers,*) tags+=(python-layers) ;; esac
for tag in "${tags[@]}"; do
  echo "converting $tag" >&2
  "$beam" convert --plain-http "oci:$layout:$tag" "127.0.0.1:$port/bench/$tag:1" >/dev/null
done
images='{"base": "bench/python:1", "sizes": {"python + 0.9 GB layer, 1 GB": "bench/python-1g:1",
         "python + 3.9 GB layer, 4 GB": "bench/python-4g:1"}, "layers": "bench/python-layers:1"}'
python3 bench/scale.py --registry-port "$port" --images "$images" --containerd "$containerd_bin" \
  "${args[@]}"
