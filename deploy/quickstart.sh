#!/usr/bin/env bash
# Beam quickstart: on a fresh Debian/Ubuntu machine, as root.
#
# Installs the packages, builds Beam (release), starts a private registry on 127.0.0.1 in a
# scratch directory, builds a python3 image of Debian packages (three layers), pushes it and
# converts it with `beam convert`, shows the Beam artifact found from the same reference, and
# materialises the root filesystem from the Beam layers with `beam unpack`, printing timings
# and sizes. Everything it starts is stopped, by PID, when it ends or on Ctrl-C.
#
# What this does not do yet: start a container lazily through containerd. That needs the lazy
# FUSE mount and beam-snapshotter (issues 3 and 4), which are not built yet.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
if [ "$(id -u)" != 0 ]; then echo "quickstart: run as root" >&2; exit 1; fi

echo "==> installing packages"
bash .ci/install-deps.sh
echo "==> building beam (release)"
cargo build --release -p beam --bin beam -q
beam=$root/target/release/beam

scratch=$(mktemp -d /tmp/beam-quickstart.XXXXXX)
reg_pid=
cleanup() {
  if [ -n "$reg_pid" ] && kill -0 "$reg_pid" 2>/dev/null; then
    kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true
  fi
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

echo "==> building a python3 image from Debian packages"
bash tests/fixtures/make-python-layers.sh "$scratch/layers" >/dev/null
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

t0=$(date +%s.%N)
"$beam" convert --plain-http "oci:$scratch/layout:3.11" "$image"
t1=$(date +%s.%N)
echo "==> the Beam artifact, found from the original reference"
"$beam" inspect --plain-http "$image"
echo "==> unpacking the root filesystem from the Beam layers"
t2=$(date +%s.%N)
"$beam" unpack --plain-http "$image" "$scratch/rootfs"
t3=$(date +%s.%N)
out=$(chroot "$scratch/rootfs" /usr/bin/python3 -c 'print(1)')
gz=$(du -cb "$scratch"/layout/blobs/sha256/* | tail -1 | cut -f1)
echo
echo "== Beam quickstart results"
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "convert (push original + Beam layers): %.2f s\n", b - a }'
awk -v a="$t2" -v b="$t3" 'BEGIN { printf "unpack from Beam layers:               %.2f s\n", b - a }'
awk -v g="$gz" 'BEGIN { printf "original image (gzip), layout size:    %.1f MB\n", g / 1e6 }'
echo "python3 -c 'print(1)' in the unpacked rootfs printed: $out"
