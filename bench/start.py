#!/usr/bin/env python3
"""Time to first output, side by side (issue 13): a full pull (containerd's overlayfs) against
Beam with its defaults and Beam without background fetch, and the peers SOCI and nydus, in one
run, on a link of a given bandwidth and round-trip time. Run through bench/start.sh, which
installs, builds and prepares the images first.

The registry (Debian's docker-registry) listens on 127.0.0.1; every client reaches it through
a relay in this process (127.0.0.1 too) that models the link: one token bucket shared by all
connections for the registry-to-node direction (BANDWIDTH), and half the round-trip time added
to each direction as a pipeline delay (no netem here). The relay counts the bytes it delivers,
so "bytes on the wire" is what crossed the modelled link, the same for every system. SOCI
0.4.1 needs HTTPS (see bench/start.sh): its runs go to a second, TLS, registry on the same
storage through a second relay on the same link (same bucket, same byte count; TLS passes
through the relay untouched).

For each system and repetition: a fresh snapshotter (its own root and socket under the node
directory, with its defaults: beam-snapshotter started with nothing but --root and --address,
the peers with their shipped configuration, see SociDaemon and NydusDaemon) and a fresh
containerd (its own root, state and socket), the page cache dropped, then the pull and
`ctr run` of the workload; time to the first line of its output, bytes by then, the pull step,
and for Beam the time until every chunk of the image is in its cache. Everything started is
stopped by PID, and every mount under the scratch directory unmounted, also on failure. Prints
one table (median, min-max) and writes it to target/bench/start.txt.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
BEAM = os.path.join(TARGET, "release/beam")
SNAPSHOTTER = os.path.join(TARGET, "release/beam-snapshotter")
# System `beam-base`: Beam's defaults with the binaries of another build (a baseline commit,
# e.g. `git worktree add /tmp/base REV && cargo build --release` there), run side by side.
BASE_BIN_DIR = os.environ.get("BENCH_BASE_BIN_DIR")


def beam_bins(system):
    """The `beam` and `beam-snapshotter` binaries that `system` runs."""
    if system == "beam-base":
        if not BASE_BIN_DIR:
            sys.exit("system beam-base needs BENCH_BASE_BIN_DIR (the baseline's target/release)")
        return (os.path.join(BASE_BIN_DIR, "beam"), os.path.join(BASE_BIN_DIR, "beam-snapshotter"))
    return (BEAM, SNAPSHOTTER)
# The peers, as bench/install-peers.sh leaves them.
PEERS = os.path.join(ROOT, ".work/peers")
SOCI = os.path.join(PEERS, "soci/usr/bin/soci")
SOCI_GRPC = os.path.join(PEERS, "soci/usr/bin/soci-snapshotter-grpc")
NYDUS_GRPC = os.path.join(PEERS, "nydus/usr/bin/containerd-nydus-grpc")
NYDUSD = os.path.join(PEERS, "nydus-rs/bin/nydusd")
NYDUS_IMAGE = os.path.join(PEERS, "nydus-rs/bin/nydus-image")
# SOCI 0.4.1 keeps its content store here whatever --root says (a constant in its code).
SOCI_STATE = "/var/lib/soci-snapshotter-grpc"


# ----------------------------------------------------------------------------------------------
# The link: a relay with a shared token bucket and a pipeline delay.


class Link:
    def __init__(self):
        self.rate = None  # bytes per second downstream; None = unlimited
        self.delay = 0.0  # one-way seconds
        self.down_bytes = 0
        self._next_free = 0.0
        self._lock = threading.Lock()

    def depart(self, n):
        """When `n` bytes sent now have left the (shared) link."""
        now = time.monotonic()
        if not self.rate:
            return now
        with self._lock:
            start = max(now, self._next_free)
            self._next_free = start + n / self.rate
            return self._next_free


async def pipe(reader, writer, link, downstream):
    queue = asyncio.Queue()

    async def send():
        while True:
            due, data = await queue.get()
            if data is None:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            if downstream:
                link.down_bytes += len(data)
        try:
            writer.write_eof()
        except (OSError, RuntimeError):
            pass

    sender = asyncio.ensure_future(send())
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            due = (link.depart(len(data)) if downstream else time.monotonic()) + link.delay
            await queue.put((due, data))
    except (ConnectionError, OSError):
        pass
    await queue.put((0, None))
    try:
        await sender
    except (ConnectionError, OSError):
        pass


async def serve_relay(link, upstream_port, listen, ready):
    async def handle(cr, cw):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", upstream_port)
        except OSError:
            cw.close()
            return
        await asyncio.gather(pipe(cr, uw, link, False), pipe(ur, cw, link, True))
        for w in (cw, uw):
            try:
                w.close()
            except OSError:
                pass

    server = await asyncio.start_server(handle, listen, 0)
    ready.append(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def start_relay(link, upstream_port, listen="127.0.0.1"):
    ready = []
    t = threading.Thread(
        target=lambda: asyncio.run(serve_relay(link, upstream_port, listen, ready)), daemon=True
    )
    t.start()
    while not ready:
        time.sleep(0.01)
    return ready[0]


# ----------------------------------------------------------------------------------------------
# Processes, by PID.

STARTED = []


def spawn(cmd, log, **kw):
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    STARTED.append(p)
    return p


def cpu_seconds(pid):
    """CPU time (user + system) process `pid` has used so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(p, sig=signal.SIGTERM, grace=15):
    if p.poll() is None:
        p.send_signal(sig)
        try:
            p.wait(grace)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    if p in STARTED:
        STARTED.remove(p)


def unmount_under(d):
    with open("/proc/self/mountinfo") as f:
        points = [l.split()[4] for l in f]
    under = [m for m in points if m == d or m.startswith(d.rstrip("/") + "/")]
    for m in sorted(under, key=len, reverse=True):
        subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise RuntimeError(f"timed out waiting for {what}")


def drop_caches():
    subprocess.run(["sync"])
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def descendants(pid):
    """PIDs of every process below `pid` (children first found, then theirs), from /proc."""
    children = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def alive(pid):
    """Whether `pid` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_pids(pids, grace=15):
    """SIGTERM to each PID (not our children: no wait() possible), SIGKILL after `grace`."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.monotonic() + grace
    for pid in pids:
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.05)
        if alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------------------------
# The snapshotters: each started fresh in a node directory, stopped by PID.


class BeamDaemon:
    """beam-snapshotter with --root and --address only (its defaults), plus `args`."""

    plugin = "beam"

    def __init__(self, node_dir, args, snapshotter=SNAPSHOTTER):
        self.bin = snapshotter
        self.root = os.path.join(node_dir, "beam")
        self.sock = os.path.join(node_dir, "beam.sock")
        self.log_path = os.path.join(node_dir, "beam.log")
        self.log = open(self.log_path, "w")
        self.p = spawn([self.bin, "--root", self.root, "--address", self.sock] + args, self.log)
        wait_for(lambda: os.path.exists(self.sock), 30, "beam-snapshotter")

    def close(self):
        subprocess.run([self.bin, "--root", self.root, "--stop"], capture_output=True)
        stop(self.p)
        self.log.close()

    def logs(self):
        return [("beam.log", self.log_path)]


SOCI_STATE_MADE = []


class SociDaemon:
    """soci-snapshotter-grpc 0.4.1 with its built-in defaults: Debian ships no config file,
    and the one given here is empty (background fetch on, 4 MiB spans as indexed, layers
    without a zTOC fetched by containerd). Only --root and --address point into the node.

    SOCI keeps SOCI indexes and zTOCs in /var/lib/soci-snapshotter-grpc/content whatever
    --root says. So that every repetition starts from nothing (and nothing is left on the
    system), the daemon runs in its own mount namespace with a directory of the node bound
    there. Its FUSE mounts must still reach containerd: the node directory is made a shared
    mount first, so that mounts below it propagate out of the daemon's namespace, while the
    bind on /var/lib/... is made under a mount turned private in that namespace only.
    Registry TLS: SSL_CERT_FILE names the bench's private CA (Go's x509 reads it)."""

    plugin = "soci"

    def __init__(self, node_dir, ca):
        self.root = os.path.join(node_dir, "soci")
        self.sock = os.path.join(node_dir, "soci.sock")
        state = os.path.join(node_dir, "soci-state")
        os.makedirs(state)
        config = os.path.join(node_dir, "soci-config.toml")
        with open(config, "w") as f:
            f.write("# empty: soci-snapshotter-grpc 0.4.1's defaults\n")
        if not os.path.isdir(SOCI_STATE):
            os.makedirs(SOCI_STATE)
            SOCI_STATE_MADE.append(SOCI_STATE)
        subprocess.run(["mount", "--bind", node_dir, node_dir], check=True)
        subprocess.run(["mount", "--make-shared", node_dir], check=True)
        script = (
            'set -e; m=$(findmnt -n -o TARGET --target "$1"); mount --make-private "$m"; '
            'mount --bind "$2" "$1"; shift 2; exec "$@"'
        )
        self.log_path = os.path.join(node_dir, "soci.log")
        self.log = open(self.log_path, "w")
        self.p = spawn(
            ["unshare", "--mount", "--propagation", "unchanged", "--", "sh", "-c", script, "sh",
             SOCI_STATE, state, SOCI_GRPC, "--root", self.root, "--address", self.sock,
             "--config", config],
            self.log,
            env=dict(os.environ, SSL_CERT_FILE=ca),
        )
        wait_for(lambda: os.path.exists(self.sock), 30, "soci-snapshotter-grpc")

    def close(self):
        stop(self.p)
        self.log.close()

    def logs(self):
        return [("soci.log", self.log_path)]


# nydus-snapshotter's shipped configuration (misc/snapshotter/config.toml of v0.13.4; Debian's
# package ships none), comments dropped. Changed, none of it bearing on the data path: paths
# into the node directory and .work/peers; [cgroup] enable = false (it would create a cgroup on
# the system; memory_limit is empty, so no limit either way); log_to_stdout = true (the log
# lands in the node's log); [metrics] address = "" (shipped: ":9110", a TCP listener on every
# interface).
NYDUS_CONFIG = """version = 1
root = "{root}"
address = "{sock}"
daemon_mode = "dedicated"
cleanup_on_close = false

[system]
enable = true
address = "{system_sock}"

[system.debug]
daemon_cpu_profile_duration_secs = 5
pprof_address = ""

[daemon]
nydusd_config = "{nydusd_config}"
nydusd_path = "{nydusd}"
nydusimage_path = "{nydus_image}"
fs_driver = "fusedev"
recover_policy = "restart"
threads_number = 4
log_rotation_size = 100

[cgroup]
enable = false
memory_limit = ""

[log]
log_to_stdout = true
level = "info"
log_rotation_compress = true
log_rotation_local_time = true
log_rotation_max_age = 7
log_rotation_max_backups = 5
log_rotation_max_size = 100

[metrics]
address = ""

[remote]
convert_vpc_registry = false

[remote.mirrors_config]

[remote.auth]
enable_kubeconfig_keychain = false
kubeconfig_path = ""
enable_cri_keychain = false

[snapshot]
enable_nydus_overlayfs = false
enable_kata_volume = false
sync_remove = false

[cache_manager]
disable = false
gc_period = "24h"
cache_dir = ""

[image]
public_key_file = ""
validate_signature = false

[experimental]
enable_stargz = false
enable_referrer_detect = false
[experimental.tarfs]
enable_tarfs = false
mount_tarfs_on_host = false
tarfs_hint = false
max_concurrent_proc = 0
export_mode = ""
"""

# nydusd's shipped configuration for FUSE (misc/snapshotter/nydusd-config.fusedev.json of
# v0.13.4), unchanged: registry backend, blobcache, prefetch of whole images in the
# background (prefetch_all) with 8 threads.
NYDUSD_CONFIG = {
    "device": {
        "backend": {"type": "registry",
                    "config": {"timeout": 5, "connect_timeout": 5, "retry_limit": 2}},
        "cache": {"type": "blobcache"},
    },
    "mode": "direct",
    "digest_validate": False,
    "iostats_files": False,
    "enable_xattr": True,
    "fs_prefetch": {"enable": True, "threads_count": 8, "merging_size": 1048576,
                    "prefetch_all": True},
}


class NydusDaemon:
    """containerd-nydus-grpc 0.13.4 with its shipped configuration (above), which starts one
    nydusd (2.2.0) per image. nydusd raises RLIMIT_NOFILE to 1,000,000 by default and exits
    where root lacks CAP_SYS_RESOURCE (as here): nydusd_path is a wrapper adding
    `--rlimit-nofile 0` (leave it as it is). nydusd tries HTTPS first and falls back to HTTP
    by itself on a plain registry. The nydusd processes are children of the snapshotter;
    cleanup_on_close is false (shipped), so they are stopped here by PID after it."""

    plugin = "nydus"

    def __init__(self, node_dir):
        self.root = os.path.join(node_dir, "nydus")
        self.sock = os.path.join(node_dir, "nydus.sock")
        wrapper = os.path.join(node_dir, "nydusd")
        with open(wrapper, "w") as f:
            f.write(f'#!/bin/sh\nexec "{NYDUSD}" "$@" --rlimit-nofile 0\n')
        os.chmod(wrapper, 0o755)
        nydusd_config = os.path.join(node_dir, "nydusd-config.fusedev.json")
        with open(nydusd_config, "w") as f:
            json.dump(NYDUSD_CONFIG, f, indent=2)
        config = os.path.join(node_dir, "nydus-config.toml")
        with open(config, "w") as f:
            f.write(NYDUS_CONFIG.format(
                root=self.root, sock=self.sock,
                system_sock=os.path.join(node_dir, "nydus-system.sock"),
                nydusd_config=nydusd_config, nydusd=wrapper, nydus_image=NYDUS_IMAGE))
        self.log_path = os.path.join(node_dir, "nydus.log")
        self.log = open(self.log_path, "w")
        self.p = spawn([NYDUS_GRPC, "--config", config], self.log)
        wait_for(lambda: os.path.exists(self.sock), 30, "containerd-nydus-grpc")

    def close(self):
        nydusds = descendants(self.p.pid)
        stop(self.p)
        stop_pids(nydusds)
        self.log.close()

    def logs(self):
        out = [("nydus.log", self.log_path)]
        # nydusd's own logs, one directory per daemon under <root>/logs.
        logs = os.path.join(self.root, "logs")
        for d, _, files in os.walk(logs):
            for name in sorted(files):
                rel = os.path.relpath(os.path.join(d, name), logs).replace("/", "-")
                out.append((f"nydusd-{rel}", os.path.join(d, name)))
        return out


# ----------------------------------------------------------------------------------------------
# One node: containerd + a snapshotter, fresh.


class Node:
    closed = 0

    def __init__(self, scratch, containerd_bin, system, tls_ca=None):
        self.dir = tempfile.mkdtemp(prefix="node-", dir=scratch)
        self.ctd_sock = os.path.join(self.dir, "containerd.sock")
        self.ctr_bin = os.path.join(os.path.dirname(containerd_bin), "ctr")
        self.ctd_major = containerd_major(containerd_bin)
        self.ctd = None
        if system == "soci":
            self.snap = SociDaemon(self.dir, tls_ca)
        elif system == "nydus":
            self.snap = NydusDaemon(self.dir)
        else:
            # `full` too: the same node as Beam's, the snapshotter idle.
            args = ["--no-background-fetch"] if system == "beam-nobg" else []
            self.snap = BeamDaemon(self.dir, args, beam_bins(system)[1])
        self.sock = self.snap.sock
        cfg = os.path.join(self.dir, "containerd.toml")
        with open(cfg, "w") as f:
            f.write(self.containerd_config())
        self.ctd_log = open(os.path.join(self.dir, "containerd.log"), "w")
        env = dict(os.environ, PATH=os.path.dirname(containerd_bin) + ":" + os.environ["PATH"])
        self.ctd = spawn([containerd_bin, "--config", cfg], self.ctd_log, env=env)
        self.env = env
        wait_for(
            lambda: subprocess.run(self.ctr(["version"]), capture_output=True).returncode == 0,
            30,
            "containerd",
        )

    def containerd_config(self):
        plugin = self.snap.plugin
        text = f"""version = 2
root = "{self.dir}/ctd/root"
state = "{self.dir}/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.ctd_sock}"
[ttrpc]
  address = "{self.ctd_sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/ctd/opt"
[proxy_plugins.{plugin}]
  type = "snapshot"
  address = "{self.sock}"
"""
        if self.ctd_major >= 2 and plugin in ("soci", "nydus"):
            # containerd 2.1+: `ctr image pull` goes through the transfer service, which
            # passes the remote-snapshot labels only to a proxy snapshotter that asks for them,
            # and unpacks only into snapshotters listed in its unpack_config.
            text += f"""[proxy_plugins.{plugin}.exports]
  root = "{self.snap.root}"
  enable_remote_snapshot_annotations = "true"
[[plugins."io.containerd.transfer.v1.local".unpack_config]]
  platform = "linux"
  snapshotter = "{plugin}"
"""
        return text

    def ctr(self, args):
        return [self.ctr_bin, "--address", self.ctd_sock, "--namespace", "bench"] + args

    def status(self):
        out = subprocess.run(
            [BEAM, "status", "--json", "--address", self.sock], capture_output=True, text=True
        )
        return json.loads(out.stdout) if out.returncode == 0 else None

    def close(self):
        subprocess.run(self.ctr(["task", "ls"]), capture_output=True)
        if self.ctd is not None:
            stop(self.ctd)
        self.snap.close()
        unmount_under(self.dir)
        self.ctd_log.close()
        # Every node's logs stay (numbered in run order), for a look at what happened.
        logs = os.path.join(ROOT, "target/bench/start-logs")
        os.makedirs(logs, exist_ok=True)
        Node.closed += 1
        ctd_log = ("containerd.log", os.path.join(self.dir, "containerd.log"))
        for name, path in self.snap.logs() + [ctd_log]:
            if os.path.exists(path):
                shutil.copy(path, os.path.join(logs, f"{Node.closed:03}-{name}"))
        shutil.rmtree(self.dir, ignore_errors=True)


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def containerd_major(containerd_bin):
    out = subprocess.run([containerd_bin, "--version"], capture_output=True, text=True).stdout
    return int(out.split()[2].lstrip("v").split(".")[0])


def first_line(cmd, env):
    """Run `cmd`; seconds until its first line of output, and its whole output."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    line = p.stdout.readline()
    t = time.monotonic()
    rest = p.stdout.read()
    p.wait()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed: {line + rest!r}")
    return t, line.decode().strip()


def pull_command(node, system, image, tls_ca):
    """The pull step of `system`, as its users run it with ctr-style tools."""
    if system == "full":
        return node.ctr(["image", "pull", "--plain-http", image])
    if system == "soci":
        # SOCI's own client: containerd's client.Pull with unpack into soci and the
        # remote-snapshot labels (image ref, manifest and layer digests) on each layer.
        return [SOCI, "--address", node.ctd_sock, "--namespace", "bench", "image", "rpull",
                "--tlscacert", tls_ca, image]
    if system == "nydus":
        if node.ctd_major >= 2:
            # containerd 2.1's transfer service adds the labels (exports in the config).
            return node.ctr(["image", "pull", "--plain-http", "--snapshotter", "nydus", image])
        # ctr 1.x fetches every layer before unpacking and adds no labels: nydus has no
        # client of its own packaged (nydusify, nerdctl are not), so the generic remote pull
        # of SOCI's CLI is used (client.Pull + unpack + the same CRI labels as ctr 2.x and
        # CRI add; SOCI's own extra labels are ignored by nydus).
        return [SOCI, "--address", node.ctd_sock, "--namespace", "bench", "image", "rpull",
                "--plain-http", "--snapshotter", "nydus", image]
    return [beam_bins(system)[0], "pull", "--address", node.ctd_sock, "--namespace", "bench",
            "--plain-http", "--json", image]


def run_once(system, image, workload, link, scratch, containerd_bin, tls_ca, wait_whole=True):
    node = Node(scratch, containerd_bin, system, tls_ca)
    try:
        drop_caches()
        b0 = link.down_bytes
        t0 = time.monotonic()
        pull = subprocess.run(pull_command(node, system, image, tls_ca), capture_output=True,
                              env=node.env)
        if pull.returncode != 0:
            raise RuntimeError(f"{system} pull of {image} failed: {pull.stdout + pull.stderr!r}")
        if os.environ.get("BENCH_KEEP_LOGS"):
            # The pull's own report (Beam's --json has its steps' seconds).
            run_once.pull_out = pull.stdout + pull.stderr
        if system == "full":
            run = node.ctr(["run", "--rm", image, "w"] + workload)
        else:
            snapshotter = node.snap.plugin
            run = node.ctr(["run", "--rm", "--snapshotter", snapshotter, image, "w"] + workload)
        t1 = time.monotonic()
        tf, line = first_line(run, node.env)
        b1 = link.down_bytes
        whole = None
        if system in ("beam", "beam-base") and wait_whole:
            def cached():
                s = node.status()
                return bool(s) and bool(s["layers"]) and all(
                    l["chunks_cached"] >= l["chunks_total"] for l in s["layers"])
            try:
                wait_for(cached, 600, "the whole image in the cache")
                whole = time.monotonic() - t0
            except RuntimeError:
                whole = None
        cpu = cpu_seconds(node.snap.p.pid) if isinstance(node.snap, BeamDaemon) else None
        return {
            "first": tf - t0,
            "bytes": b1 - b0,
            "pull": t1 - t0,
            "whole": whole,
            "cpu": cpu,
            "line": line,
        }
    finally:
        # BENCH_KEEP_LOGS=DIR keeps each run's daemon logs there (e.g. with BEAM_LOG=debug).
        keep = os.environ.get("BENCH_KEEP_LOGS")
        if keep:
            os.makedirs(keep, exist_ok=True)
            tag = f"{system}-{image.rsplit('/', 1)[-1].replace(':', '_')}-{link.rate or 0:.0f}-" \
                  f"{link.delay * 2000:.0f}ms-{time.strftime('%H%M%S')}"
            for name, path in node.snap.logs():
                if os.path.exists(path):
                    shutil.copy(path, os.path.join(keep, f"{tag}-{name}"))
            with open(os.path.join(keep, f"{tag}-pull.out"), "wb") as f:
                f.write(getattr(run_once, "pull_out", b""))
            run_once.pull_out = b""
        node.close()


def write_table(lines, out):
    """Print the table's lines and write them to `out`."""
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        f.write(text)
    print()
    print(text)


def fmt(vals, unit):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.median(vals)
    if unit == "s":
        return f"{m:.2f} s ({min(vals):.2f}-{max(vals):.2f})"
    return f"{m / 1e6:.1f} MB ({min(vals) / 1e6:.1f}-{max(vals) / 1e6:.1f})"


def exit_on_signals():
    """SIGTERM/SIGINT end a run through its cleanup (`finally`), not around it."""
    def interrupted(sig, _frame):
        raise SystemExit(f"interrupted by signal {sig}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)


def clean_scratch(scratch):
    """Stop what the runs under `scratch` started (by PID), unmount what is mounted below it,
    and remove it."""
    for p in list(STARTED):
        stop(p)
    for d in os.listdir(scratch):
        beam_root = os.path.join(scratch, d, "beam")
        if os.path.isdir(beam_root):
            subprocess.run([SNAPSHOTTER, "--root", beam_root, "--stop"], capture_output=True)
    # nydusd processes of a node whose close did not run (killed mid-way) are below
    # `scratch` only by their mounts: found by their command line naming the scratch dir.
    stop_pids([pid for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
               if pid != os.getpid() and scratch in cmdline(pid)])
    unmount_under(scratch)
    shutil.rmtree(scratch, ignore_errors=True)


def main():
    exit_on_signals()
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry-port", type=int, required=True)
    ap.add_argument(
        "--images",
        required=True,
        help="JSON: name -> [reference path, workload, (systems to run it with; null: all), "
        "({system: its own reference path})]",
    )
    ap.add_argument("--containerd", default=shutil.which("containerd"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bandwidths", default="200,0", help="Mbit/s, 0 = unlimited")
    ap.add_argument("--rtts", default="0,20", help="ms")
    ap.add_argument("--systems", default="full,beam,beam-nobg")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench/start.txt"))
    # SOCI's runs (see bench/start.sh): the TLS registry on the same storage, the name its
    # certificate is for (resolving to a loopback address), and the CA.
    ap.add_argument("--tls-registry-port", type=int)
    ap.add_argument("--tls-host")
    ap.add_argument("--tls-ca")
    a = ap.parse_args()
    systems = a.systems.split(",")
    if "soci" in systems and not (a.tls_registry_port and a.tls_host and a.tls_ca):
        ap.error("soci needs --tls-registry-port, --tls-host and --tls-ca (bench/start.sh)")

    link = Link()
    relay_port = start_relay(link, a.registry_port)
    tls_relay_port = None
    if "soci" in systems:
        # Its own relay on the same link, listening where the name resolves.
        tls_addr = socket.getaddrinfo(a.tls_host, None, socket.AF_INET)[0][4][0]
        tls_relay_port = start_relay(link, a.tls_registry_port, tls_addr)
    images = json.loads(a.images)
    if os.environ.get("BENCH_IMAGES"):
        # BENCH_IMAGES=python,busybox: only those of the images.
        keep = os.environ["BENCH_IMAGES"].split(",")
        images = {k: v for k, v in images.items() if k in keep}
    scratch = tempfile.mkdtemp(prefix="beam-bench-start-")
    version = subprocess.run([a.containerd, "--version"], capture_output=True, text=True).stdout.split()[2]
    rows = []
    try:
        for bw in [int(x) for x in a.bandwidths.split(",")]:
            for rtt in [int(x) for x in a.rtts.split(",")]:
                link.rate = bw * 1e6 / 8 if bw else None
                link.delay = rtt / 2000.0
                for name, spec in images.items():
                    path, workload = spec[0], spec[1]
                    only = spec[2] if len(spec) > 2 else None
                    own = (spec[3] if len(spec) > 3 else None) or {}
                    for system in systems:
                        if only is not None and system not in only:
                            continue
                        if system == "soci":
                            ref = f"{a.tls_host}:{tls_relay_port}/{own.get(system, path)}"
                        else:
                            ref = f"127.0.0.1:{relay_port}/{own.get(system, path)}"
                        results = []
                        for i in range(a.runs):
                            r = run_once(system, ref, workload, link, scratch, a.containerd,
                                         a.tls_ca)
                            whole = "-" if r["whole"] is None else f"{r['whole']:.1f} s"
                            print(f"  {name} {bw or 'unlimited'} Mbit/s rtt {rtt} ms {system} "
                                  f"run {i + 1}: first output {r['first']:.2f} s "
                                  f"({r['line']!r}), {r['bytes'] / 1e6:.1f} MB, pull "
                                  f"{r['pull']:.2f} s, whole {whole}"
                                  + (f", daemon CPU {r['cpu']:.2f} s" if r.get("cpu") else ""),
                                  flush=True)
                            results.append(r)
                        rows.append((name, bw, rtt, system, results))
    finally:
        clean_scratch(scratch)
        for d in SOCI_STATE_MADE:
            try:
                os.rmdir(d)
            except OSError:
                pass

    lines = [
        f"# Time to first output, containerd {version}, medians of {a.runs} (min-max); "
        f"one run of bench/start.sh, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        "| image | link | system | first output | bytes by first output | pull step | whole image cached |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, bw, rtt, system, res in rows:
        link_s = f"{bw or 'unlimited'} Mbit/s, RTT {rtt} ms" if bw else f"unlimited, RTT {rtt} ms"
        lines.append(
            f"| {name} | {link_s} | {system} | {fmt([r['first'] for r in res], 's')} | "
            f"{fmt([r['bytes'] for r in res], 'b')} | {fmt([r['pull'] for r in res], 's')} | "
            f"{fmt([r['whole'] for r in res], 's')} |"
        )
    write_table(lines, a.out)


if __name__ == "__main__":
    main()
