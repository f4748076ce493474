#!/usr/bin/env bash
# The project's test command (README "Run the tests"): installs what the tests need on a fresh
# Debian bookworm machine, builds, and runs every unit and integration test. Needs root: the
# tests start a registry, containerd and runc, and mount filesystems.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "tests/run.sh: run as root (the tests start containerd and make mounts)" >&2
  exit 1
fi
bash .ci/install-deps.sh
cargo build --workspace --bins
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --lib --bins --tests --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
# Unit tests that must not need root (the format crate's; the recording Mounter's) run again
# as an unprivileged user, so that one that quietly starts to need root fails here.
unprivileged() { # PACKAGE [FILTER...]
  local pkg=$1 exe d
  shift
  exe=$(cargo test -p "$pkg" --lib --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["lib"]:
        print(m["executable"])')
  d=$(dirname "$exe")
  while [ "$d" != / ]; do chmod o+x "$d"; d=$(dirname "$d"); done
  chmod o+rx "$exe"
  echo "== $pkg ${*:-(all)} as nobody"
  (cd /tmp && runuser -u nobody -- "$exe" "$@" --test-threads=2)
}
for t in "beam-format" "beam mount::tests" "beam unpack::tests"; do
  # shellcheck disable=SC2086
  unprivileged $t 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
done
set -e
# One closing line over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "%d passed, %d failed\n", p, f }' "$log"
exit "$rc"
