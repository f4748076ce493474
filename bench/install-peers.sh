#!/usr/bin/env bash
# install-peers.sh: puts the two peer lazy-pulling snapshotters that bench/start.sh compares
# Beam with (--systems ...,soci,nydus) under <repo>/.work/peers, as root. Idempotent: what is
# already there and answers --version is kept.
#
#   .work/peers/soci/usr/bin/{soci,soci-snapshotter-grpc}  SOCI 0.4.1 (Debian sid soci-snapshotter)
#   .work/peers/nydus/usr/bin/containerd-nydus-grpc        nydus-snapshotter 0.13.4 (Debian sid)
#   .work/peers/nydus-rs/bin/{nydusd,nydus-image}          nydus-rs 2.2.0 (cargo install)
#
# Neither .deb ships a configuration file; bench/start.py writes the peers' upstream defaults
# (SOCI: none needed; nydus: misc/snapshotter/ of nydus-snapshotter 0.13.4) per node.
#
# Nothing is installed system-wide except cmake (apt), which nydus-rs' build needs. The .debs
# come through a private apt configuration naming only sid (lists and cache under
# .work/apt-peers; /etc/apt and /var/lib/apt are left alone), and are unpacked with
# `dpkg-deb -x`; they are Go binaries that need little of libc, so they run on bookworm.
# nydusd and nydus-image are not packaged by Debian: `cargo install nydus-rs` builds them
# (about 10 minutes on 2 cores, under `nice -n 19`).
set -euo pipefail
umask 022

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
peers="$repo/.work/peers"
apt_dir="$repo/.work/apt-peers"
nydus_rs_version=2.2.0
# The versions bench/start.py's configurations are written for (sid's candidates when written).
soci_version=0.4.1 nydus_snapshotter_version=0.13.4

die() {
  echo "install-peers.sh: $*" >&2
  exit 1
}

[ "$(id -u)" = 0 ] || die "run as root"

runs() { [ -x "$1" ] && "$@" >/dev/null 2>&1; }

have_soci() {
  runs "$peers/soci/usr/bin/soci" --version && runs "$peers/soci/usr/bin/soci-snapshotter-grpc" --version
}
have_nydus() { runs "$peers/nydus/usr/bin/containerd-nydus-grpc" --version; }
# nydusd --version says "unknown" when built by cargo install: the version is cargo's record.
have_nydus_rs() {
  runs "$peers/nydus-rs/bin/nydusd" --version && runs "$peers/nydus-rs/bin/nydus-image" --version &&
    grep -q "\"nydus-rs $nydus_rs_version " "$peers/nydus-rs/.crates2.json" 2>/dev/null
}

# unpack_sid PKG DEST BIN...: PKG's sid candidate unpacked to DEST (lib-debs.sh).
unpack_sid() {
  local pkg=$1 dest=$2
  shift 2
  unpack_suite_deb "$pkg" sid "$dest" "$@" || die "unpacking $pkg (sid) failed"
}

# check_version DIR WANTED: warns when the unpacked .deb is not the upstream version WANTED.
check_version() {
  local got
  got=$(cat "$1/.deb-version" 2>/dev/null || echo unknown)
  case "$got" in
    "$2"-*) ;;
    *) echo "install-peers.sh: warning: $1 is $got, bench/start.py is written for $2" >&2 ;;
  esac
}

mkdir -p "$peers"

if ! have_soci || ! have_nydus; then
  command -v dpkg-deb >/dev/null || die "dpkg-deb not found"
  # shellcheck source=tests/fixtures/lib-debs.sh
  . "$repo/tests/fixtures/lib-debs.sh"
  private_apt "$apt_dir" sid || die "setting up the private apt source (sid) failed"
    have_soci || unpack_sid soci-snapshotter "$peers/soci" usr/bin/soci usr/bin/soci-snapshotter-grpc
  have_nydus || unpack_sid nydus-snapshotter "$peers/nydus" usr/bin/containerd-nydus-grpc
fi

if ! have_nydus_rs; then
  if ! dpkg-query -W -f='${Status}' cmake 2>/dev/null | grep -q "install ok installed"; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends cmake
  fi
  echo "install-peers.sh: cargo install nydus-rs $nydus_rs_version (about 10 minutes)" >&2
  nice -n 19 cargo install nydus-rs --version "$nydus_rs_version" --locked --root "$peers/nydus-rs"
fi

have_soci || die "$peers/soci: soci does not run"
have_nydus || die "$peers/nydus: containerd-nydus-grpc does not run"
have_nydus_rs || die "$peers/nydus-rs: nydusd or nydus-image does not run"
check_version "$peers/soci" "$soci_version"
check_version "$peers/nydus" "$nydus_snapshotter_version"
echo "soci-snapshotter $(cat "$peers/soci/.deb-version"): $peers/soci/usr/bin"
echo "nydus-snapshotter $(cat "$peers/nydus/.deb-version"): $peers/nydus/usr/bin"
echo "nydus-rs $nydus_rs_version: $peers/nydus-rs/bin"
