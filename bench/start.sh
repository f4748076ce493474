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
beam=$root/target/release/beam

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
python3 - "$work/layout" "$work/python" "$work/busybox.tar" <<'EOF'
import gzip, hashlib, json, os, sys
out, pydir, bb = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(out + "/blobs/sha256", exist_ok=True)
def put(data):
    d = hashlib.sha256(data).hexdigest()
    p = f"{out}/blobs/sha256/{d}"
    if not os.path.exists(p):
        open(p, "wb").write(data)
    return "sha256:" + d, len(data)
def image(tars, tag, cmd):
    layers, diffs = [], []
    for t in tars:
        raw = open(t, "rb").read()
        diffs.append("sha256:" + hashlib.sha256(raw).hexdigest())
        d, s = put(gzip.compress(raw, 6, mtime=0))
        layers.append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": s})
    cfg = {"architecture": "amd64", "os": "linux", "config": {"Cmd": cmd},
           "rootfs": {"type": "layers", "diff_ids": diffs}}
    cd, cs = put(json.dumps(cfg).encode())
    m = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
         "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
         "layers": layers}
    md, ms = put(json.dumps(m).encode())
    return {"mediaType": m["mediaType"], "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": tag}}
py = [os.path.join(pydir, n) for n in open(pydir + "/layers.txt").read().split()]
index = {"schemaVersion": 2, "manifests": [
    image(py, "python", ["/usr/bin/python3"]),
    image([bb], "busybox", ["/bin/sh"])]}
open(out + "/oci-layout", "w").write('{"imageLayoutVersion":"1.0.0"}')
json.dump(index, open(out + "/index.json", "w"))
EOF

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
