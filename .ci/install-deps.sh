#!/usr/bin/env bash
# Installs the Debian packages Beam's tests and quickstart need on a fresh bookworm machine.
# Idempotent; safe to run twice.
set -euo pipefail
PKGS=(protobuf-compiler docker-registry skopeo umoci busybox-static fuse3 containerd runc
      tar gzip zstd attr libcap2-bin xz-utils python3 curl jq iproute2 ca-certificates bc openssl)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# Debian's packages start their services; the tests start their own instances, by PID.
systemctl stop docker-registry containerd 2>/dev/null || true
# containerd 1.7 (Debian trixie) and 2.x (sid) beside the system's 1.6, unpacked (not installed)
# under .work/containerd with a private apt configuration, for the tests that run against every
# containerd version (tests/src/containerd.rs, ContainerdVersion).
bash "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/fixtures/fetch-containerd.sh"
