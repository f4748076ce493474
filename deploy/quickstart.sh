#!/usr/bin/env bash
# Beam quickstart: on a fresh Debian/Ubuntu machine, as root.
#
# Installs the packages, builds Beam (release), starts a private registry on 127.0.0.1 in a
# scratch directory, builds a python3 image of Debian packages (three layers), pushes it and
# converts it with `beam convert`, shows the Beam artifact found from the same reference, then
# starts `python3` from the image twice: after a full pull (download and extract every layer)
# and from a lazy `beam mount`, printing time to first output and bytes fetched for both.
# Everything it starts is stopped, by PID, and everything it mounts is unmounted, when it ends
# or on Ctrl-C.
#
# The program runs chrooted into the root filesystem, not yet as a containerd container: that
# needs beam-snapshotter (issue 4).
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
mount_pid=
cleanup() {
  if [ -n "$mount_pid" ] && kill -0 "$mount_pid" 2>/dev/null; then
    kill "$mount_pid"; wait "$mount_pid" 2>/dev/null || true
  fi
  for m in $(grep -oE " $scratch[^ ]*" /proc/mounts | sort -r); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
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

"$beam" convert --plain-http "oci:$scratch/layout:3.11" "$image" >/dev/null
echo "==> the Beam artifact, found from the original reference"
"$beam" inspect --plain-http "$image"

drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

echo "==> start 1: full pull (download every layer, extract, run)"
drop_caches
t0=$(date +%s.%N)
skopeo copy -q --src-tls-verify=false "docker://$image" "oci:$scratch/pulled:x" >/dev/null
mkdir -p "$scratch/full"
for l in $(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(" ".join(x["digest"][7:] for x in m["layers"]))' \
            "$scratch/pulled/blobs/sha256/$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["manifests"][0]["digest"][7:])' "$scratch/pulled/index.json")"); do
  tar -xzf "$scratch/pulled/blobs/sha256/$l" -C "$scratch/full" --numeric-owner
done
full_out=$(chroot "$scratch/full" /usr/bin/python3 -c 'print("hello from python")')
t1=$(date +%s.%N)
full_bytes=$(du -cb "$scratch"/pulled/blobs/sha256/* | tail -1 | cut -f1)

echo "==> start 2: Beam (mount lazily, run; chunks fetched on first read)"
drop_caches
t2=$(date +%s.%N)
mkdir -p "$scratch/lazy"
"$beam" mount --plain-http --no-background-fetch --cache-dir "$scratch/cache" --work-dir "$scratch/work" \
  "$image" "$scratch/lazy" > "$scratch/mount.out" 2> "$scratch/mount.err" &
mount_pid=$!
until grep -q "^mounted " "$scratch/mount.out" 2>/dev/null; do
  kill -0 "$mount_pid" 2>/dev/null || { cat "$scratch/mount.err"; exit 1; }; sleep 0.02
done
lazy_out=$(chroot "$scratch/lazy" /usr/bin/python3 -c 'print("hello from python")')
t3=$(date +%s.%N)
kill "$mount_pid"; wait "$mount_pid" || true; mount_pid=
lazy_bytes=$(grep -oE "fetched [0-9]+ bytes" "$scratch/mount.err" | grep -oE "[0-9]+")
lazy_bytes=$((lazy_bytes + $(du -cb "$scratch"/cache/indexes/* | tail -1 | cut -f1)))

echo
echo "== Beam quickstart results (python3 image from Debian packages, local registry)"
awk -v a="$t0" -v b="$t1" -v n="$full_bytes" -v o="$full_out" 'BEGIN { printf "full pull: first output after %.2f s, %.1f MB fetched (\"%s\")\n", b - a, n / 1e6, o }'
awk -v a="$t2" -v b="$t3" -v n="$lazy_bytes" -v o="$lazy_out" 'BEGIN { printf "Beam:      first output after %.2f s, %.1f MB fetched (\"%s\")\n", b - a, n / 1e6, o }'
echo "(the registry is local: on a real network the full pull grows with image size, Beam with what the program reads)"
