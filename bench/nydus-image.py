#!/usr/bin/env python3
"""nydus-image.py: builds a nydus (RAFS v6) image from uncompressed layer tars and pushes it to
a plain-HTTP registry, for the start-time benchmark's `nydus` system (bench/start.sh).

    nydus-image.py --nydus-image BIN --cache DIR --cmd JSON REGISTRY REPO:TAG TAR...

It does what nydus-snapshotter's own converter (pkg/converter, v0.13.4: the code behind
`nerdctl image convert --nydus` and nydusify) does, with the same nydus-image arguments:
  - each layer: `nydus-image create --type tar-rafs --fs-version 6 --blob-inline-meta
    --features blob-toc --prefetch-policy fs --whiteout-spec none` with "/" as the prefetch
    pattern on stdin; the output blob (data + inline RAFS metadata + TOC) is the layer, media
    type application/vnd.oci.image.layer.nydus.blob.v1, annotation
    containerd.io/snapshot/nydus-blob=true, its diff ID its own digest;
  - the per-layer bootstraps (the `image.boot` entry of each blob, found through the blob's
    TOC) are merged with `nydus-image merge --prefetch-policy fs`, each source named by its
    blob's digest (merge takes the file name as the blob ID, which nydusd then fetches as
    /v2/REPO/blobs/sha256:ID);
  - the merged bootstrap goes as `image/image.boot` in a tar.gz layer on top, annotated
    containerd.io/snapshot/nydus-bootstrap=true and nydus-fs-version=6.
Nothing of the original image is kept in the nydus image (no OCI ref mode). The blobs are
cached in --cache keyed by the digest of each layer tar, so a second run only merges and
pushes. Nydus' upstream tool for this (nydusify) is not packaged by Debian, and Debian's
`converter` binary in nydus-snapshotter is an empty main.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import tempfile
import urllib.error
import urllib.request

NYDUS_BLOB = "application/vnd.oci.image.layer.nydus.blob.v1"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"

# nydus-storage src/meta/toc.rs: TOC entry flags for the compression of an entry.
TOC_COMPRESSION_NONE = 0x1
TOC_COMPRESSION_ZSTD = 0x2
TOC_ENTRY_SIZE = 128


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def create_blob(nydus_image, tar_path, cache):
    """The nydus blob of one layer tar, built once and kept in `cache`; returns its path."""
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, sha256_file(tar_path) + ".blob")
    if os.path.exists(out):
        return out
    tmp = out + ".tmp"
    if os.path.exists(tmp):
        os.remove(tmp)
    # The arguments of nydus-snapshotter's converter (pkg/converter/tool/builder.go,
    # buildPackArgs with the tar2rafs feature), "/" as the prefetch pattern as it passes.
    subprocess.run(
        [nydus_image, "create", "--log-level", "warn", "--prefetch-policy", "fs",
         "--blob", tmp, "--whiteout-spec", "none", "--fs-version", "6",
         "--type", "tar-rafs", "--blob-inline-meta", "--features", "blob-toc", tar_path],
        input=b"/", check=True,
    )
    os.rename(tmp, out)
    return out


def toc_entries(blob):
    """The TOC of a blob built with --features blob-toc: {name: (flags, offset, size)}.

    The blob ends with `toc data | tar header "rafs.blob.toc"`; the TOC is an array of 128-byte
    entries (flags u32, reserved u32, name [16], digest [32], compressed offset u64,
    compressed size u64, uncompressed size u64, reserved [48])."""
    with open(blob, "rb") as f:
        f.seek(-512, os.SEEK_END)
        end = f.tell()
        hdr = tarfile.TarInfo.frombuf(f.read(512), "utf-8", "surrogateescape")
        if hdr.name != "rafs.blob.toc":
            raise RuntimeError(f"{blob}: no rafs.blob.toc at its end (found {hdr.name!r})")
        f.seek(end - hdr.size)
        toc = f.read(hdr.size)
    entries = {}
    for i in range(0, len(toc) - TOC_ENTRY_SIZE + 1, TOC_ENTRY_SIZE):
        e = toc[i:i + TOC_ENTRY_SIZE]
        flags = struct.unpack_from("<I", e, 0)[0]
        name = e[8:24].rstrip(b"\0").decode()
        offset, size = struct.unpack_from("<QQ", e, 56)
        entries[name] = (flags, offset, size)
    return entries


def extract_bootstrap(blob, dest):
    """Writes the (decompressed) `image.boot` entry of `blob` to `dest`."""
    flags, offset, size = toc_entries(blob)["image.boot"]
    with open(blob, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if flags & TOC_COMPRESSION_ZSTD:
        # No zstd module in Debian's python3 by default; the zstd tool is a bench dependency.
        data = subprocess.run(["zstd", "-q", "-d", "-c"], input=data, check=True,
                              stdout=subprocess.PIPE).stdout
    elif not flags & TOC_COMPRESSION_NONE:
        raise RuntimeError(f"{blob}: image.boot compressed with flags {flags:#x}, not handled")
    with open(dest, "wb") as f:
        f.write(data)


def merge(nydus_image, blobs, work):
    """Merges the blobs' bootstraps; returns the merged bootstrap's bytes."""
    sources = []
    for b in blobs:
        src = os.path.join(work, sha256_file(b))
        extract_bootstrap(b, src)
        sources.append(src)
    target = os.path.join(work, "bootstrap")
    out_json = os.path.join(work, "merge-output.json")
    subprocess.run(
        [nydus_image, "merge", "--log-level", "warn", "--prefetch-policy", "fs",
         "--output-json", out_json, "--bootstrap", target] + sources,
        input=b"/", check=True,
    )
    with open(out_json) as f:
        referenced = json.load(f)["blobs"]
    expected = [os.path.basename(s) for s in sources]
    if referenced != expected:
        raise RuntimeError(f"merged bootstrap references blobs {referenced}, not {expected}")
    with open(target, "rb") as f:
        return f.read()


def bootstrap_layer(bootstrap):
    """tar.gz with `image/` and `image/image.boot`, as pkg/converter's packToTar; deterministic."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as t:
        d = tarfile.TarInfo("image")
        d.type, d.mode, d.mtime = tarfile.DIRTYPE, 0o755, 0
        t.addfile(d)
        f = tarfile.TarInfo("image/image.boot")
        f.mode, f.size, f.mtime = 0o444, len(bootstrap), 0
        t.addfile(f, io.BytesIO(bootstrap))
    raw = raw.getvalue()
    return raw, gzip.compress(raw, 6, mtime=0)


class Registry:
    """Just enough of the distribution API to push blobs and a manifest over plain HTTP."""

    def __init__(self, host, repo):
        self.base = f"http://{host}/v2/{repo}"

    def _do(self, method, url, data=None, headers=None):
        req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        return urllib.request.urlopen(req)

    def has_blob(self, digest):
        try:
            self._do("HEAD", f"{self.base}/blobs/{digest}")
            return True
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return False
            raise

    def push_blob(self, digest, path=None, data=None):
        if self.has_blob(digest):
            return
        r = self._do("POST", f"{self.base}/blobs/uploads/")
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.base.split("/v2/")[0] + loc
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        sep = "&" if "?" in loc else "?"
        self._do("PUT", f"{loc}{sep}digest={digest}", data=data,
                 headers={"Content-Type": "application/octet-stream"})

    def push_manifest(self, tag, manifest):
        self._do("PUT", f"{self.base}/manifests/{tag}", data=manifest,
                 headers={"Content-Type": OCI_MANIFEST})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--nydus-image", required=True)
    ap.add_argument("--cache", required=True, help="directory keeping the per-layer blobs")
    ap.add_argument("--cmd", type=json.loads, required=True)
    ap.add_argument("registry", help="host:port of a plain-HTTP registry")
    ap.add_argument("ref", help="repository:tag")
    ap.add_argument("tars", nargs="+", help="uncompressed layer tars, bottom first")
    a = ap.parse_args()
    repo, tag = a.ref.rsplit(":", 1)

    blobs = [create_blob(a.nydus_image, t, a.cache) for t in a.tars]
    work = tempfile.mkdtemp(prefix="nydus-merge-")
    try:
        bootstrap = merge(a.nydus_image, blobs, work)
    finally:
        shutil.rmtree(work)
    boot_raw, boot_gz = bootstrap_layer(bootstrap)

    reg = Registry(a.registry, repo)
    layers, diff_ids = [], []
    for b in blobs:
        digest = "sha256:" + sha256_file(b)
        reg.push_blob(digest, path=b)
        layers.append({"mediaType": NYDUS_BLOB, "digest": digest, "size": os.path.getsize(b),
                       "annotations": {"containerd.io/snapshot/nydus-blob": "true"}})
        # A nydus blob is not compressed as a whole: its diff ID is its digest.
        diff_ids.append(digest)
    boot_digest = "sha256:" + hashlib.sha256(boot_gz).hexdigest()
    reg.push_blob(boot_digest, data=boot_gz)
    layers.append({"mediaType": OCI_LAYER_GZIP, "digest": boot_digest, "size": len(boot_gz),
                   "annotations": {"containerd.io/snapshot/nydus-bootstrap": "true",
                                   "containerd.io/snapshot/nydus-fs-version": "6"}})
    diff_ids.append("sha256:" + hashlib.sha256(boot_raw).hexdigest())

    config = json.dumps({"architecture": "amd64", "os": "linux",
                         "config": {"Cmd": a.cmd},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    reg.push_blob(config_digest, data=config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": config_digest,
                                      "size": len(config)},
                           "layers": layers}).encode()
    reg.push_manifest(tag, manifest)
    total = sum(l["size"] for l in layers)
    print(f"{a.ref}: {len(blobs)} nydus blobs + bootstrap, {total / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
