#!/usr/bin/env bash
# Start-time benchmark (issue 13), as root: a full pull against Beam (defaults, and without
# background fetch) and, on request, the peers SOCI and nydus, side by side in one run, on a
# modelled link (bandwidth and round-trip time; see bench/start.py). Builds release binaries,
# the python3 image of Debian packages (five layers, as the quickstart's) and a busybox image,
# pushes and converts both into a docker-registry on 127.0.0.1 (stopped by PID on exit), then
# runs bench/start.py.
#
#   bench/start.sh [--runs N] [--bandwidths 200,0] [--rtts 0,20]
#                  [--systems full,beam,beam-nobg[,soci][,nydus][,beam-base]]
#                  [--containerd 1.6|1.7|2[,...]] [--out FILE]
#
# beam-base is Beam's defaults with another build's binaries, for an A/B of a change in one run
# (its images converted by that build's own `beam`):
#   git worktree add /tmp/base REV && (cd /tmp/base && cargo build --release)
#   BENCH_BASE_BIN_DIR=/tmp/base/target/release bench/start.sh --systems beam-base,beam
#
# --containerd takes a list (e.g. 1.7,2): the runs go once per version, on the same images, and
# the tables follow one another in the output.
#
# The peers (bench/install-peers.sh puts them under .work/peers, nothing system-wide) need,
# and get here only when --systems names them:
#   soci:  a SOCI index per image (`soci create` in a throwaway containerd, `soci push`), and
#          HTTPS: SOCI 0.4.1 fetches its index with an HTTPS-only client and treats every
#          loopback address as plain HTTP for layers, so its runs use a second docker-registry
#          on the same storage with TLS (a private CA made here), reached by a host name that
#          resolves to a loopback address (this machine's name) through its own relay.
#   nydus: the images converted to RAFS v6 (bench/nydus-image.py), pushed as
#          bench/python-nydus:1 and bench/busybox-nydus:1.
# SOCI's CLI keeps its state in /var/lib/soci-snapshotter-grpc (a constant in 0.4.1): it runs
# in a private mount namespace with a scratch directory bound there; the empty mount point is
# created if missing and removed on exit.
#
# Output: the table on stdout and in target/bench/start.txt. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
[ "$(id -u)" = 0 ] || { echo "bench/start.sh: run as root" >&2; exit 1; }
containerd_version=1.6
out=$root/target/bench/start.txt
systems=full,beam,beam-nobg
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --containerd) containerd_version=$2; shift 2 ;;
    --systems) systems=$2; args+=("$1" "$2"); shift 2 ;;
    --systems=*) systems=${1#--systems=}; args+=("$1"); shift ;;
    --out) out=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
has_system() { case ",$systems," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }
bash .ci/install-deps.sh
containerd_bins=()
IFS=, read -ra containerd_versions <<< "$containerd_version"
for v in "${containerd_versions[@]}"; do
  case "$v" in
    1.6) containerd_bins+=("$(command -v containerd)") ;;
    1.7|2) containerd_bins+=("$root/.work/containerd/$v/usr/bin/containerd") ;;
    *) echo "bench/start.sh: --containerd takes 1.6, 1.7 or 2 (or a list of them)" >&2; exit 1 ;;
  esac
done
# SOCI's index is made with the first of them.
containerd_bin=${containerd_bins[0]}
if has_system soci || has_system nydus; then
  bash bench/install-peers.sh >/dev/null
fi
peers=$root/.work/peers
cargo build --release -q -p beam --bins
beam=${CARGO_TARGET_DIR:-$root/target}/release/beam

work=$root/target/bench/start
mkdir -p "$work"
scratch=$(mktemp -d /tmp/beam-bench.XXXXXX)
reg_pid='' tls_reg_pid='' ctd_pid='' soci_mountpoint=''
soci_state=/var/lib/soci-snapshotter-grpc
stop_pid() {
  if [ -n "$1" ] && kill -0 "$1" 2>/dev/null; then kill "$1"; wait "$1" 2>/dev/null || true; fi
}
cleanup() {
  stop_pid "$ctd_pid"
  stop_pid "$tls_reg_pid"
  stop_pid "$reg_pid"
  # Only the mount point this script made, and only while it is empty.
  if [ -n "$soci_mountpoint" ]; then rmdir "$soci_state" 2>/dev/null || true; fi
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
py_cmd='["/usr/bin/python3"]'
bb_cmd='["/bin/sh"]'
python3 tests/fixtures/write-oci-layout.py --cmd "$py_cmd" "$work/layout" python "${pylayers[@]}"
python3 tests/fixtures/write-oci-layout.py --cmd "$bb_cmd" "$work/layout" busybox "$work/busybox.tar"

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

# start_tls_registry: a second docker-registry on the storage of the first, serving HTTPS with
# a certificate for $tls_host and 127.0.0.1 from a private CA ($scratch/tls/ca.pem).
start_tls_registry() {
  local dir=$scratch/tls
  mkdir -p "$dir"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=beam bench CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=$tls_host" \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:%s,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' "$tls_host" >"$dir/ext.cnf"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" -CAcreateserial \
    -days 2 -extfile "$dir/ext.cnf" -out "$dir/server.pem" 2>/dev/null
  tls_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  cat >"$dir/registry.yml" <<CONF
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $scratch/registry/data}}
http: {addr: 127.0.0.1:$tls_port, tls: {certificate: $dir/server.pem, key: $dir/server.key}}
CONF
  docker-registry serve "$dir/registry.yml" >"$dir/registry.log" 2>&1 &
  tls_reg_pid=$!
  for _ in $(seq 50); do
    curl -sf --cacert "$dir/ca.pem" "https://127.0.0.1:$tls_port/v2/" >/dev/null && return 0
    sleep 0.2
  done
  echo "TLS docker-registry did not answer on 127.0.0.1:$tls_port: $(tail -5 "$dir/registry.log")" >&2
  return 1
}

# soci_indexes REF...: `soci create` and `soci push` for each image, as a user would: the image
# pulled into a throwaway containerd (its own root, state and socket; stopped by PID), SOCI's
# defaults (4 MiB spans, no zTOC for layers under 10 MiB).
soci_indexes() {
  local dir=$scratch/soci-prep ref
  mkdir -p "$dir/lib"
  cat >"$dir/containerd.toml" <<CONF
version = 2
root = "$dir/root"
state = "$dir/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
CONF
  "$containerd_bin" --config "$dir/containerd.toml" >"$dir/containerd.log" 2>&1 &
  ctd_pid=$!
  local ctr
  ctr=$(dirname "$containerd_bin")/ctr
  for _ in $(seq 150); do
    "$ctr" --address "$dir/containerd.sock" version >/dev/null 2>&1 && break
    sleep 0.2
  done
  for ref in "$@"; do
    "$ctr" --address "$dir/containerd.sock" --namespace bench image pull --plain-http "$ref" >/dev/null
  done
  if [ ! -d "$soci_state" ]; then mkdir -p "$soci_state"; soci_mountpoint=1; fi
  # shellcheck disable=SC2016  # expanded by the inner shell
  unshare --mount -- sh -euc '
    lib=$1 soci=$2 sock=$3; shift 3
    mount --bind "$lib" /var/lib/soci-snapshotter-grpc
    for ref in "$@"; do
      # An image whose layers are all under the minimum size gets no index (SOCI says so and
      # fails): SOCI then pulls it as containerd would, which is what its users get.
      if ! out=$("$soci" --address "$sock" --namespace bench create "$ref" 2>&1); then
        case "$out" in
          *"no ztocs created"*) echo "soci: no index for $ref (no layer of 10 MiB or more)" >&2; continue ;;
          *) echo "$out" >&2; exit 1 ;;
        esac
      fi
      "$soci" --address "$sock" --namespace bench push --plain-http "$ref" >/dev/null
    done' sh "$dir/lib" "$peers/soci/usr/bin/soci" "$dir/containerd.sock" "$@"
  stop_pid "$ctd_pid"
  ctd_pid=
}

peer_args=()
own_py='' own_bb=''
# beam-base runs images converted by its own `beam`: a change of what conversion writes (the
# index packing, say) is then compared as a whole, and a baseline build never meets a format
# it does not read.
if has_system beam-base; then
  for tag in python busybox; do
    "${BENCH_BASE_BIN_DIR:?beam-base needs BENCH_BASE_BIN_DIR}/beam" convert --plain-http \
      "oci:$work/layout:$tag" "127.0.0.1:$port/bench/$tag-base:1" >/dev/null
  done
  own_py='"beam-base": "bench/python-base:1"' own_bb='"beam-base": "bench/busybox-base:1"'
fi
if has_system soci; then
  # A name for the registry that is not a loopback literal, so that SOCI uses HTTPS for it.
  tls_host=$(hostname)
  tls_addr=$(getent ahostsv4 "$tls_host" | awk 'NR == 1 { print $1 }')
  case "$tls_addr" in
    127.*) ;;
    *)
      echo "bench/start.sh: soci needs this machine's name ($tls_host) to resolve to a" \
        "loopback address (got '$tls_addr'; see /etc/hosts)" >&2
      exit 1 ;;
  esac
  start_tls_registry
  soci_indexes "127.0.0.1:$port/bench/python:1" "127.0.0.1:$port/bench/busybox:1"
  peer_args+=(--tls-registry-port "$tls_port" --tls-host "$tls_host" --tls-ca "$scratch/tls/ca.pem")
fi
if has_system nydus; then
  python3 bench/nydus-image.py --nydus-image "$peers/nydus-rs/bin/nydus-image" --cache "$work/nydus-blobs" \
    --cmd "$py_cmd" "127.0.0.1:$port" bench/python-nydus:1 "${pylayers[@]}"
  python3 bench/nydus-image.py --nydus-image "$peers/nydus-rs/bin/nydus-image" --cache "$work/nydus-blobs" \
    --cmd "$bb_cmd" "127.0.0.1:$port" bench/busybox-nydus:1 "$work/busybox.tar"
  own_py+=${own_py:+, }'"nydus": "bench/python-nydus:1"'
  own_bb+=${own_bb:+, }'"nydus": "bench/busybox-nydus:1"'
fi
# name -> [reference path, workload, systems to run it with (null: all), {system: own path}]
images='{"python": ["bench/python:1", ["/usr/bin/python3", "-c", "import json, sqlite3; print(\"ready\")"], null, {'"$own_py"'}],
         "python-recorded": ["bench/python-recorded:1", ["/usr/bin/python3", "-c", "import json, sqlite3; print(\"ready\")"], ["beam", "beam-nobg"]],
         "busybox": ["bench/busybox:1", ["/bin/echo", "ready"], null, {'"$own_bb"'}]}'
parts=()
for i in "${!containerd_bins[@]}"; do
  part=$scratch/start-${containerd_versions[$i]}.txt
  python3 bench/start.py --registry-port "$port" --images "$images" \
    --containerd "${containerd_bins[$i]}" --out "$part" "${peer_args[@]}" "${args[@]}"
  parts+=("$part")
done
mkdir -p "$(dirname "$out")"
for p in "${parts[@]}"; do cat "$p"; echo; done > "$out"
echo "bench/start.sh: the tables are in $out"
