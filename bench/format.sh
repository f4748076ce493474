#!/usr/bin/env bash
# Format benchmark on the python3 rootfs (issue 2): builds the layers from Debian packages,
# records which files `python3 -c 'print(1)'` opens, then runs `cargo bench --bench format`,
# which converts the layers and reports throughputs and sizes against baselines run side by
# side in the same process (gzip for conversion, gzip/zstd decompression for lz4), plus a
# chunk-size sweep. Medians of several runs. Output: stdout and target/bench/format.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/install-deps.sh
command -v strace >/dev/null || apt-get install -y -qq strace >/dev/null
work=$(pwd)/target/bench/python
if [ ! -f "$work/layers/layers.txt" ]; then
  rm -rf "$work"; mkdir -p "$work"
  bash tests/fixtures/make-python-layers.sh "$work/layers" >/dev/null
fi
if [ ! -f "$work/reads.txt" ]; then
  rootfs=$(mktemp -d)
  trap 'rm -rf "$rootfs"' EXIT
  mapfile -t layers < <(sed "s|^|$work/layers/|" "$work/layers/layers.txt")
  bash tests/fixtures/reference-extract.sh "$rootfs" "${layers[@]}" >/dev/null
  strace -f -qq -e trace=openat,execve -o "$work/strace.txt" chroot "$rootfs" /usr/bin/python3 -c 'print(1)' >/dev/null
  # Files opened successfully, resolved inside the rootfs, relative to it.
  # The kernel reads the program and its ELF interpreter itself (no openat): add them.
  { grep -v ENOENT "$work/strace.txt" | grep -oE '"/[^"]+"' | tr -d '"'
    echo /lib64/ld-linux-x86-64.so.2; } | sort -u | while read -r p; do
    real=$(chroot "$rootfs" /usr/bin/readlink -f "$p" 2>/dev/null || true)
    if [ -n "$real" ] && [ -f "$rootfs$real" ]; then echo "${real#/}"; fi
  done | sort -u > "$work/reads.txt"
fi
mkdir -p target/bench
BEAM_BENCH_LAYERS="$work/layers" BEAM_BENCH_READS="$work/reads.txt" \
  cargo bench -p beam --bench format | tee target/bench/format.txt
