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
beam=$root/target/release/beam
snapshotter=$root/target/release/beam-snapshotter

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

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$scratch/registry.yml" <<EOF
version: 0.1
log: {level: error}
storage: {filesystem: {rootdirectory: $scratch/registry}}
http: {addr: 127.0.0.1:$port}
EOF
docker-registry serve "$scratch/registry.yml" > "$scratch/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 50); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.2; done
echo "==> registry on 127.0.0.1:$port (pid $reg_pid)"

echo "==> building a python3 image from Debian packages (python3, numpy, pandas, sympy, perl)"
bash tests/fixtures/make-python-layers.sh --large "$scratch/layers" | grep "^total"
python3 - "$scratch/layout" "$scratch/layers" <<'EOF'
import gzip, hashlib, json, os, sys
out, layers_dir = sys.argv[1], sys.argv[2]
os.makedirs(out + "/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    open(f"{out}/blobs/sha256/{d}", "wb").write(data)
    return "sha256:" + d, len(data)
layers, diffs = [], []
for name in open(layers_dir + "/layers.txt").read().split():
    raw = open(os.path.join(layers_dir, name), "rb").read()
    diffs.append("sha256:" + hashlib.sha256(raw).hexdigest())
    d, s = put(gzip.compress(raw, 6, mtime=0))
    layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
cfg = {"architecture": "amd64", "os": "linux",
       "config": {"Cmd": ["/usr/bin/python3", "-c", "print(1)"]},
       "rootfs": {"type": "layers", "diff_ids": diffs}}
cd, cs = put(json.dumps(cfg).encode())
m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
     "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
     "layers": layers}
md, ms = put(json.dumps(m).encode())
open(out + "/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump({"schemaVersion": 2, "manifests": [{"mediaType": m["mediaType"], "digest": md, "size": ms,
           "annotations": {"org.opencontainers.image.ref.name": "3.11"}}]}, open(out + "/index.json", "w"))
EOF
image="127.0.0.1:$port/python:3.11"

"$beam" convert --plain-http "oci:$scratch/layout:3.11" "$image" >/dev/null
echo "==> the Beam artifact, found from the original reference"
"$beam" inspect --plain-http "$image"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

echo "==> starting beam-snapshotter and containerd"
# Defaults only: no registry settings (`beam pull --plain-http` hands them to the daemon),
# takeover on.
"$snapshotter" --root "$scratch/beam" --address "$scratch/beam.sock" \
  --no-background-fetch > "$scratch/beam.log" 2>&1 &
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
awk -v a="$t2" -v b="$t3" -v n="$lazy_bytes" -v o="$lazy_out" 'BEGIN { printf "Beam:      first output after %.2f s, %.1f MB fetched (\"%s\")\n", b - a, n / 1e6, o }'
echo "(the registry is local: on a real network the full pull grows with image size, Beam with what the program reads)"
