#!/usr/bin/env bash
# Beam quickstart: on a fresh Debian/Ubuntu machine, as root.
#
# Installs the packages, builds Beam (release), and starts, all in a scratch directory and by
# PID: a private registry on 127.0.0.1, beam-snapshotter, and containerd (Debian's) with Beam
# as its proxy snapshotter. Builds a python3 image of a few hundred MB from Debian packages
# (five layers), pushes and converts it, then starts `python3` from it as a containerd
# container twice: after a full pull (`ctr image pull`, overlayfs) and lazily (`beam pull`,
# `ctr run --snapshotter beam`), printing time to first output and bytes fetched for both.
# Everything it starts is stopped, and everything mounted is unmounted, when it ends or on
# Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ "$(id -u)" != 0 ]; then echo "quickstart: run as root" >&2; exit 1; fi

echo "==> installing packages"
bash .ci/install-deps.sh
echo "==> building beam and beam-snapshotter (release)"
cargo build --release -p beam --bins -q
beam=${CARGO_TARGET_DIR:-$root/target}/release/beam
snapshotter=${CARGO_TARGET_DIR:-$root/target}/release/beam-snapshotter

scratch=$(mktemp -d /tmp/beam-quickstart.XXXXXX)
ns=beam-quickstart
reg_pid=
beam_pid=
ctd_pid=
stop_pid() { if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then kill "$1"; wait "$1" 2>/dev/null || true; fi; }
cleanup() {
  # Containers run with --rm; containerd's shims exit with them.
  stop_pid "$ctd_pid"
  # A real stop: the daemon exits and its fd holder (takeover is on by default) lets the lazy
  # layers go at once instead of keeping them for a successor.
  if [ -n "$beam_pid" ]; then "$snapshotter" --root "$scratch/beam" --stop >/dev/null || stop_pid "$beam_pid"; fi
  for m in $(grep -oE " $scratch[^ ]*" /proc/mounts | sort -r); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  stop_pid "$reg_pid"
  rmdir /sys/fs/cgroup/$ns/* /sys/fs/cgroup/$ns /run/containerd/runc/$ns 2>/dev/null || true
  rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

# shellcheck source=tests/fixtures/lib-registry.sh
. tests/fixtures/lib-registry.sh
start_registry "$scratch/registry"
port=$REGISTRY_PORT
reg_pid=$REGISTRY_PID
echo "==> registry on 127.0.0.1:$port (pid $reg_pid)"

echo "==> building a python3 image from Debian packages (python3, numpy, pandas, sympy, perl)"
bash tests/fixtures/make-python-layers.sh --large "$scratch/layers" | grep "^total"
mapfile -t pylayers < <(sed "s|^|$scratch/layers/|" "$scratch/layers/layers.txt")
python3 tests/fixtures/write-oci-layout.py --cmd '["/usr/bin/python3", "-c", "print(1)"]' \
  "$scratch/layout" 3.11 "${pylayers[@]}"
image="127.0.0.1:$port/python:3.11"

"$beam" convert --plain-http "oci:$scratch/layout:3.11" "$image" >/dev/null
echo "==> the Beam artifact, found from the original reference"
"$beam" inspect --plain-http "$image"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

echo "==> starting beam-snapshotter and containerd"
# Defaults only: no registry settings (`beam pull --plain-http` hands them to the daemon),
# takeover on, background fill on (it yields to the container's reads).
"$snapshotter" --root "$scratch/beam" --address "$scratch/beam.sock" > "$scratch/beam.log" 2>&1 &
beam_pid=$!
for _ in $(seq 100); do [ -S "$scratch/beam.sock" ] && break; sleep 0.1; done
cat > "$scratch/containerd.toml" <<EOF
version = 2
root = "$scratch/containerd/root"
state = "$scratch/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$scratch/containerd.sock"
[ttrpc]
  address = "$scratch/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$scratch/containerd/opt"
[proxy_plugins.beam]
  type = "snapshot"
  address = "$scratch/beam.sock"
EOF
containerd --config "$scratch/containerd.toml" > "$scratch/containerd.log" 2>&1 &
ctd_pid=$!
ctr() { command ctr --address "$scratch/containerd.sock" --namespace "$ns" "$@"; }
for _ in $(seq 100); do ctr version >/dev/null 2>&1 && break; sleep 0.1; done
echo "    beam-snapshotter pid $beam_pid, containerd pid $ctd_pid ($(containerd --version | awk '{print $3}'))"

echo "==> start 1: full pull (ctr image pull: download and unpack every layer, then ctr run)"
drop_caches
t0=$(date +%s.%N)
ctr image pull --plain-http "$image" >/dev/null
full_out=$(ctr run --rm "$image" full /usr/bin/python3 -c 'print("hello from python")')
t1=$(date +%s.%N)
full_bytes=$(du -cb "$scratch"/containerd/root/io.containerd.content.v1.content/blobs/sha256/* | tail -1 | cut -f1)
ctr image rm --sync "$image" >/dev/null

echo "==> start 2: Beam (beam pull: layers mounted lazily; ctr run --snapshotter beam)"
drop_caches
t2=$(date +%s.%N)
"$beam" pull --address "$scratch/containerd.sock" --namespace "$ns" --plain-http "$image"
lazy_out=$(ctr run --rm --snapshotter beam "$image" lazy /usr/bin/python3 -c 'print("hello from python")')
t3=$(date +%s.%N)
lazy_bytes=$("$beam" status --address "$scratch/beam.sock" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["fetch_bytes"])')
lazy_bytes=$((lazy_bytes + $(du -cb "$scratch"/beam/cache/indexes/* | tail -1 | cut -f1)))
manifest=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$scratch/layout/index.json")
image_bytes=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(sum(l["size"] for l in m["layers"]))' "$scratch/layout/blobs/sha256/$manifest")
ctr image rm --sync "$image" >/dev/null

echo
echo "== Beam quickstart results (python3 image of Debian packages, $((image_bytes / 1000000)) MB compressed, local registry)"
awk -v a="$t0" -v b="$t1" -v n="$full_bytes" -v o="$full_out" 'BEGIN { printf "full pull: first output after %.2f s, %.1f MB fetched (\"%s\")\n", b - a, n / 1e6, o }'
awk -v a="$t2" -v b="$t3" -v n="$lazy_bytes" -v o="$lazy_out" 'BEGIN { printf "Beam:      first output after %.2f s, %.1f MB fetched by the time it exited (background fill included) (\"%s\")\n", b - a, n / 1e6, o }'
echo "(the registry is local: on a real network the full pull grows with image size, Beam with what the program reads)"
