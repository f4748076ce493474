#!/usr/bin/env bash
# Lazy-mount benchmarks (issue 3), each against a baseline run side by side, medians of RUNS
# (default 5). Needs root. Starts its own docker-registry on 127.0.0.1 (stopped by PID on exit),
# builds release binaries, and reports:
#   1. cold sequential read of a 100 MiB file through `beam mount` (empty cache, no background
#      fetch) vs the same file read from local disk (page cache dropped before each run);
#   2. warm read of that file through the mount (chunks cached: FUSE passthrough, and with
#      --no-passthrough) vs a plain overlay mount of the unpacked tree;
#   3. `find` + `stat` over 50,000 files through the mount vs the unpacked tree;
#   4. chunk-size sweep, 64 KiB to 4 MiB: bytes fetched and wall time of
#      `python3 -c 'print(1)'` from a cold lazy mount of the python3 image.
# Output: stdout and target/bench/mount.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
RUNS=${RUNS:-5}
# Which parts to run (digits 1-4; 1 includes 2), e.g. SECTIONS=3 for find + stat only.
SECTIONS=${SECTIONS:-1234}
[ "$(id -u)" = 0 ] || { echo "bench/mount.sh: run as root" >&2; exit 1; }
bash .ci/install-deps.sh
cargo build --release -q -p beam --bin beam
beam=${CARGO_TARGET_DIR:-$root/target}/release/beam
mkdir -p target/bench
scratch=$(mktemp -d /tmp/beam-bench.XXXXXX)
reg_pid=
mount_pid=
cleanup() {
  if [ -n "$mount_pid" ] && kill -0 "$mount_pid" 2>/dev/null; then kill "$mount_pid"; wait "$mount_pid" 2>/dev/null || true; fi
  for m in $(grep -oE " $scratch[^ ]*" /proc/mounts | sort -r); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
  if [ -n "$reg_pid" ] && kill -0 "$reg_pid" 2>/dev/null; then kill "$reg_pid"; wait "$reg_pid" 2>/dev/null || true; fi
  rm -rf "$scratch"
}
trap cleanup EXIT INT TERM

# shellcheck source=tests/fixtures/lib-registry.sh
. tests/fixtures/lib-registry.sh
start_registry "$scratch/registry"
port=$REGISTRY_PORT
reg_pid=$REGISTRY_PID
reg=127.0.0.1:$port

now() { date +%s.%N; }
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
drop_caches() { sync; echo 3 > /proc/sys/vm/drop_caches; }

# mklayout DIR TAG TAR...: an OCI layout of gzip layers.
mklayout() {
  local out=$1 tag=$2
  shift 2
  python3 tests/fixtures/write-oci-layout.py --gzip-level 1 "$out" "$tag" "$@"
}

# start_mount IMAGE DIR CACHE [FLAGS...]: beam mount in the background, wait until mounted.
start_mount() {
  local image=$1 dir=$2 cache=$3; shift 3
  mkdir -p "$dir"
  "$beam" mount --plain-http --cache-dir "$cache" --work-dir "$scratch/work" "$@" "$image" "$dir" \
    > "$scratch/mount.out" 2> "$scratch/mount.err" &
  mount_pid=$!
  for _ in $(seq 600); do grep -q "^mounted " "$scratch/mount.out" && return 0; kill -0 "$mount_pid" 2>/dev/null || break; sleep 0.05; done
  cat "$scratch/mount.err" >&2; return 1
}
# stop_mount: SIGTERM, wait; the bytes it fetched go to $scratch/fetched.
stop_mount() {
  kill "$mount_pid"; wait "$mount_pid" 2>/dev/null || true; mount_pid=
  { grep -oE "fetched [0-9]+ bytes" "$scratch/mount.err" | grep -oE "[0-9]+" || echo 0; } > "$scratch/fetched"
}

{
echo "== Beam lazy-mount benchmarks ($(nproc) cores, $RUNS runs each, medians)"

# --- 1 and 2: one 100 MiB file ---
if [[ $SECTIONS == *1* ]]; then
mkdir -p "$scratch/big/data"
head -c $((100 << 20)) /dev/urandom > "$scratch/big/data/big.bin"
tar --numeric-owner -C "$scratch/big" -cf "$scratch/big.tar" data
mklayout "$scratch/layout-big" v1 "$scratch/big.tar"
"$beam" convert --plain-http "oci:$scratch/layout-big:v1" "$reg/big:v1" > /dev/null
local_t=(); cold_t=(); warm_pt=(); warm_nopt=(); ovl_t=()
mkdir -p "$scratch/ovl-lower2" "$scratch/ovl"
for i in $(seq "$RUNS"); do
  drop_caches; t0=$(now); cat "$scratch/big/data/big.bin" > /dev/null; t1=$(now)
  local_t+=("$(echo "$t1 - $t0" | bc -l)")
  rm -rf "$scratch/cache"
  start_mount "$reg/big:v1" "$scratch/mnt" "$scratch/cache" --no-background-fetch
  drop_caches; t0=$(now); cat "$scratch/mnt/data/big.bin" > /dev/null; t1=$(now)
  cold_t+=("$(echo "$t1 - $t0" | bc -l)")
  stop_mount
  # Warm, passthrough (the backing file is assembled by the first open of a cached file).
  start_mount "$reg/big:v1" "$scratch/mnt" "$scratch/cache" --no-background-fetch
  cat "$scratch/mnt/data/big.bin" > /dev/null
  drop_caches; t0=$(now); cat "$scratch/mnt/data/big.bin" > /dev/null; t1=$(now)
  warm_pt+=("$(echo "$t1 - $t0" | bc -l)")
  stop_mount
  start_mount "$reg/big:v1" "$scratch/mnt" "$scratch/cache" --no-background-fetch --no-passthrough
  drop_caches; t0=$(now); cat "$scratch/mnt/data/big.bin" > /dev/null; t1=$(now)
  warm_nopt+=("$(echo "$t1 - $t0" | bc -l)")
  stop_mount
  mount -t overlay overlay -o "lowerdir=$scratch/big:$scratch/ovl-lower2" "$scratch/ovl"
  drop_caches; t0=$(now); cat "$scratch/ovl/data/big.bin" > /dev/null; t1=$(now)
  ovl_t+=("$(echo "$t1 - $t0" | bc -l)")
  umount "$scratch/ovl"
done
mb=104.8576
l=$(printf '%s\n' "${local_t[@]}" | median); c=$(printf '%s\n' "${cold_t[@]}" | median)
p=$(printf '%s\n' "${warm_pt[@]}" | median); n=$(printf '%s\n' "${warm_nopt[@]}" | median)
o=$(printf '%s\n' "${ovl_t[@]}" | median)
awk -v l="$l" -v c="$c" -v mb="$mb" 'BEGIN { printf "1. cold read, 100 MiB: beam mount %.0f MB/s, local disk %.0f MB/s: %.2fx of local\n", mb/c, mb/l, l/c }'
awk -v o="$o" -v p="$p" -v n="$n" -v mb="$mb" 'BEGIN { printf "2. warm read, 100 MiB: passthrough %.0f MB/s (%.0f%% of overlay), no passthrough %.0f MB/s (%.0f%% of overlay), plain overlay %.0f MB/s\n", mb/p, 100*o/p, mb/n, 100*o/n, mb/o }'
fi

# --- 3: find + stat over 50k files ---
if [[ $SECTIONS == *3* ]]; then
mkdir -p "$scratch/many"
python3 - "$scratch/many" <<'EOF'
import os, sys
root = sys.argv[1]
for d in range(250):
    p = os.path.join(root, f"d{d:03}")
    os.makedirs(p)
    for f in range(200):
        with open(os.path.join(p, f"f{f:03}"), "w") as fh:
            fh.write("x")
EOF
tar --numeric-owner -C "$scratch/many" -cf "$scratch/many.tar" .
mklayout "$scratch/layout-many" v1 "$scratch/many.tar"
"$beam" convert --plain-http "oci:$scratch/layout-many:v1" "$reg/many:v1" > /dev/null
rm -rf "$scratch/cache"
start_mount "$reg/many:v1" "$scratch/mnt" "$scratch/cache" --no-background-fetch
native_t=(); lazy_t=()
for i in $(seq "$RUNS"); do
  drop_caches; t0=$(now); find "$scratch/many" -printf '%s %m %u\n' > /dev/null; t1=$(now)
  native_t+=("$(echo "$t1 - $t0" | bc -l)")
  drop_caches; t0=$(now); find "$scratch/mnt" -printf '%s %m %u\n' > /dev/null; t1=$(now)
  lazy_t+=("$(echo "$t1 - $t0" | bc -l)")
done
stop_mount
a=$(printf '%s\n' "${native_t[@]}" | median); b=$(printf '%s\n' "${lazy_t[@]}" | median)
awk -v a="$a" -v b="$b" 'BEGIN { printf "3. find+stat, 50k files: beam mount %.3f s, native %.3f s: %.2fx the native time\n", b, a, b/a }'
fi

# --- 4: chunk-size sweep on the python3 image ---
if [[ $SECTIONS == *4* ]]; then
bash tests/fixtures/make-python-layers.sh "$scratch/py" > /dev/null
mapfile -t pylayers < <(sed "s|^|$scratch/py/|" "$scratch/py/layers.txt")
mklayout "$scratch/layout-py" v1 "${pylayers[@]}"
gzsize=$(for f in "$scratch"/layout-py/blobs/sha256/*; do stat -c %s "$f"; done | awk '{s+=$1} END {print s}')
echo "4. chunk-size sweep, python3 -c 'print(1)' from a cold lazy mount (image: $(awk -v g="$gzsize" 'BEGIN{printf "%.1f", g/1e6}') MB gzip)"
echo "   chunk      fetched      % of gzip image   time to output"
for cs in 65536 131072 262144 524288 1048576 2097152 4194304; do
  "$beam" convert --plain-http --chunk-size "$cs" "oci:$scratch/layout-py:v1" "$reg/py-$cs:v1" > /dev/null
  bytes=(); times=()
  for i in $(seq "$RUNS"); do
    rm -rf "$scratch/cache"
    start_mount "$reg/py-$cs:v1" "$scratch/mnt" "$scratch/cache" --no-background-fetch
    drop_caches; t0=$(now); chroot "$scratch/mnt" /usr/bin/python3 -c 'print(1)' > /dev/null; t1=$(now)
    times+=("$(echo "$t1 - $t0" | bc -l)")
    stop_mount
    bytes+=("$(cat "$scratch/fetched")")
  done
  bm=$(printf '%s\n' "${bytes[@]}" | median); tm=$(printf '%s\n' "${times[@]}" | median)
  awk -v cs="$cs" -v b="$bm" -v g="$gzsize" -v t="$tm" 'BEGIN { printf "   %5d KiB  %8.2f MB   %6.1f%%            %.3f s\n", cs/1024, b/1e6, 100*b/g, t }'
done
fi
} | tee target/bench/mount.txt
