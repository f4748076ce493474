#!/usr/bin/env bash
# Builds Beam's Debian package with dpkg-deb (no cargo-deb, no debhelper):
#
#   deploy/deb/build.sh [OUTDIR]        (default OUTDIR: target/deb)
#
# Builds the release binaries (cargo build --release -p beam --bins; $CARGO_TARGET_DIR is
# respected), stages the package and writes OUTDIR/beam_VERSION_ARCH.deb; prints its path
# as the last line of stdout. VERSION is the Cargo workspace version, ARCH dpkg's.
# Contents:
#   /usr/bin/beam, /usr/bin/beam-snapshotter     (debug info stripped, symbols kept)
#   /lib/systemd/system/beam-snapshotter.service (deploy/systemd/)
#   /lib/systemd/system/beam-autoconvert.service (deploy/systemd/; not enabled)
#   /usr/share/doc/beam/examples/autoconvert.toml (deploy/autoconvert/)
#   /usr/lib/tmpfiles.d/beam.conf                (deploy/systemd/beam-snapshotter.tmpfiles)
#   /etc/beam/config.toml                        (conffile; deploy/beam/config.toml)
#   /usr/share/doc/beam/{README.md,copyright}
# and the maintainer scripts beside this file (postinst, prerm, postrm). Needs dpkg-deb and
# strip (binutils); dpkg-shlibdeps (dpkg-dev) when present computes the libc dependency.
# BEAM_DEB_MAINTAINER overrides the Maintainer field.
set -euo pipefail
umask 022

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

die() {
    echo "deploy/deb/build.sh: $*" >&2
    exit 1
}

outdir=${1:-$repo/target/deb}
mkdir -p "$outdir"
outdir=$(cd "$outdir" && pwd)

for tool in cargo dpkg dpkg-deb strip md5sum; do
    command -v "$tool" >/dev/null 2>&1 || die "$tool is missing"
done

# The workspace version, from [workspace.package] of the root Cargo.toml.
version=$(sed -n '/^\[workspace\.package\]/,/^\[/ s/^version[[:space:]]*=[[:space:]]*"\([^"]*\)".*/\1/p' \
    "$repo/Cargo.toml")
[ -n "$version" ] || die "no version in [workspace.package] of $repo/Cargo.toml"
# A Cargo pre-release (1.0.0-rc.1) becomes 1.0.0~rc.1: sorts before 1.0.0, and a hyphen
# would make the rest a Debian revision.
deb_version=${version//-/\~}
arch=$(dpkg --print-architecture)
maintainer=${BEAM_DEB_MAINTAINER:-Beam maintainers <maintainers@users.noreply.r-seed-d3acae0c.example>}
# Reproducible timestamps in the archive: the last commit's time.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH=$(git -C "$repo" log -1 --format=%ct 2>/dev/null || date +%s)
    export SOURCE_DATE_EPOCH
fi

(cd "$repo" && cargo build --release -p beam --bins) >&2

target=${CARGO_TARGET_DIR:-target}
case "$target" in
/*) ;;
*) target=$repo/$target ;;
esac
bin=$target/release
for b in beam beam-snapshotter; do
    [ -x "$bin/$b" ] || die "$bin/$b was not built"
done
# The binaries must be the version the package says.
got=$("$bin/beam-snapshotter" --version)
[ "$got" = "beam-snapshotter $version" ] || die "$bin/beam-snapshotter --version says '$got', want $version"

work=$(mktemp -d "${TMPDIR:-/tmp}/beam-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
# debian/<package>/ is where dpkg-shlibdeps expects the staged files.
pkg=$work/debian/beam
install -d -m 0755 "$pkg" "$pkg/DEBIAN" "$pkg/usr/bin" "$pkg/lib/systemd/system" \
    "$pkg/usr/lib/tmpfiles.d" "$pkg/etc/beam" "$pkg/usr/share/doc/beam"

# Release builds keep line tables (Cargo.toml's profile): about 100 MB a binary. Strip the
# debug sections and keep the symbol table, so backtraces still name functions.
for b in beam beam-snapshotter; do
    strip --strip-debug -o "$pkg/usr/bin/$b" "$bin/$b"
    chmod 0755 "$pkg/usr/bin/$b"
done
install -m 0644 "$repo/deploy/systemd/beam-snapshotter.service" "$pkg/lib/systemd/system/"
# Shipped, not enabled: it runs beside a registry, not on nodes (docs/autoconvert.md).
install -m 0644 "$repo/deploy/systemd/beam-autoconvert.service" "$pkg/lib/systemd/system/"
install -d -m 0755 "$pkg/usr/share/doc/beam/examples"
install -m 0644 "$repo/deploy/autoconvert/autoconvert.toml" "$pkg/usr/share/doc/beam/examples/autoconvert.toml"
install -m 0644 "$repo/deploy/systemd/beam-snapshotter.tmpfiles" "$pkg/usr/lib/tmpfiles.d/beam.conf"
install -m 0644 "$repo/deploy/beam/config.toml" "$pkg/etc/beam/config.toml"
install -m 0644 "$repo/README.md" "$pkg/usr/share/doc/beam/README.md"
install -m 0644 "$here/copyright" "$pkg/usr/share/doc/beam/copyright"
for s in postinst prerm postrm; do
    install -m 0755 "$here/$s" "$pkg/DEBIAN/$s"
done
echo /etc/beam/config.toml >"$pkg/DEBIAN/conffiles"
chmod 0644 "$pkg/DEBIAN/conffiles"

# Shared-library dependencies (libc6, libgcc-s1 with versions) as dpkg-shlibdeps finds them.
shlibs="libc6, libgcc-s1"
if command -v dpkg-shlibdeps >/dev/null 2>&1; then
    printf 'Source: beam\n\nPackage: beam\nArchitecture: any\n' >"$work/debian/control"
    line=$(cd "$work" && dpkg-shlibdeps -O -e"$pkg/usr/bin/beam" -e"$pkg/usr/bin/beam-snapshotter")
    shlibs=${line#shlibs:Depends=}
    rm -f "$work/debian/control"
fi

# md5sums of everything but the conffile (dpkg keeps that one's sum in its status file).
(cd "$pkg" && find usr lib -type f | LC_ALL=C sort | xargs md5sum) >"$pkg/DEBIAN/md5sums"
chmod 0644 "$pkg/DEBIAN/md5sums"

installed_size=$(du -s -k --apparent-size --exclude=DEBIAN "$pkg" | cut -f1)
cat >"$pkg/DEBIAN/control" <<EOF
Package: beam
Version: $deb_version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: fuse3, containerd | containerd.io, $shlibs
Section: admin
Priority: optional
Description: containerd snapshotter that starts containers before their image is pulled
 Beam converts image layers into chunked, digest-addressed Beam layers stored beside the
 unchanged image in any OCI registry. On a node, beam-snapshotter (containerd's proxy
 snapshotter plugin "beam", run by systemd as beam-snapshotter.service) mounts each layer
 at once over FUSE and fetches only the chunks a program reads, verifying every chunk.
 The beam command converts images, pulls them lazily into containerd, sets a node up
 and diagnoses it.
 .
 After installing: 'beam node-setup --no-install' merges Beam into containerd's config
 and restarts containerd; 'beam doctor' checks the result.
EOF
chmod 0644 "$pkg/DEBIAN/control"
chmod 0755 "$pkg"

deb=$outdir/beam_${deb_version}_${arch}.deb
dpkg-deb --root-owner-group -Zxz --build "$pkg" "$deb" >&2
echo "$deb"
