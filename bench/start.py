#!/usr/bin/env python3
"""Time to first output, side by side (issue 13): a full pull (containerd's overlayfs) against
Beam with its defaults and Beam without background fetch, in one run, on a link of a given
bandwidth and round-trip time. Run through bench/start.sh, which installs and builds first.

The registry (Debian's docker-registry) listens on 127.0.0.1; every client reaches it through
a relay in this process (127.0.0.1 too) that models the link: one token bucket shared by all
connections for the registry-to-node direction (BANDWIDTH), and half the round-trip time added
to each direction as a pipeline delay (no netem here). The relay counts the bytes it delivers,
so "bytes on the wire" is what crossed the modelled link, the same for every system.

For each system and repetition: a fresh beam-snapshotter (its own root, started with nothing but
--root and --address: the defaults) and a fresh containerd (its own root, state and socket),
the page cache dropped, then the pull and `ctr run` of the workload; time to the first line of
its output, bytes by then, the pull step, and for Beam the time until every chunk of the image
is in its cache. Everything started is stopped by PID, and every mount under the scratch
directory unmounted, also on failure. Prints one table (median, min-max) and writes it to
target/bench/start.txt.
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
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


async def serve_relay(link, upstream_port, ready):
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

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    ready.append(server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


def start_relay(link, upstream_port):
    ready = []
    t = threading.Thread(
        target=lambda: asyncio.run(serve_relay(link, upstream_port, ready)), daemon=True
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
    for m in sorted((m for m in points if m.startswith(d)), key=len, reverse=True):
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


# ----------------------------------------------------------------------------------------------
# One node: containerd + beam-snapshotter, fresh.


class Node:
    closed = 0

    def __init__(self, scratch, containerd_bin, beam_args):
        self.dir = tempfile.mkdtemp(prefix="node-", dir=scratch)
        self.sock = os.path.join(self.dir, "beam.sock")
        self.beam_root = os.path.join(self.dir, "beam")
        self.ctd_sock = os.path.join(self.dir, "containerd.sock")
        self.ctr_bin = os.path.join(os.path.dirname(containerd_bin), "ctr")
        self.beam_log = open(os.path.join(self.dir, "beam.log"), "w")
        self.beam = spawn(
            [SNAPSHOTTER, "--root", self.beam_root, "--address", self.sock] + beam_args,
            self.beam_log,
        )
        wait_for(lambda: os.path.exists(self.sock), 30, "beam-snapshotter")
        cfg = os.path.join(self.dir, "containerd.toml")
        with open(cfg, "w") as f:
            f.write(
                f"""version = 2
root = "{self.dir}/ctd/root"
state = "{self.dir}/ctd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{self.ctd_sock}"
[ttrpc]
  address = "{self.ctd_sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{self.dir}/ctd/opt"
[proxy_plugins.beam]
  type = "snapshot"
  address = "{self.sock}"
"""
            )
        self.ctd_log = open(os.path.join(self.dir, "containerd.log"), "w")
        env = dict(os.environ, PATH=os.path.dirname(containerd_bin) + ":" + os.environ["PATH"])
        self.ctd = spawn([containerd_bin, "--config", cfg], self.ctd_log, env=env)
        self.env = env
        wait_for(
            lambda: subprocess.run(self.ctr(["version"]), capture_output=True).returncode == 0,
            30,
            "containerd",
        )

    def ctr(self, args):
        return [self.ctr_bin, "--address", self.ctd_sock, "--namespace", "bench"] + args

    def status(self):
        out = subprocess.run(
            [BEAM, "status", "--json", "--address", self.sock], capture_output=True, text=True
        )
        return json.loads(out.stdout) if out.returncode == 0 else None

    def close(self):
        subprocess.run(self.ctr(["task", "ls"]), capture_output=True)
        stop(self.ctd)
        subprocess.run([SNAPSHOTTER, "--root", self.beam_root, "--stop"], capture_output=True)
        stop(self.beam)
        unmount_under(self.dir)
        for f in (self.beam_log, self.ctd_log):
            f.close()
        # Every node's logs stay (numbered in run order), for a look at what happened.
        logs = os.path.join(ROOT, "target/bench/start-logs")
        os.makedirs(logs, exist_ok=True)
        Node.closed += 1
        for name in ("beam.log", "containerd.log"):
            shutil.copy(os.path.join(self.dir, name), os.path.join(logs, f"{Node.closed:03}-{name}"))
        shutil.rmtree(self.dir, ignore_errors=True)


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


def run_once(system, image, workload, link, scratch, containerd_bin):
    beam_args = ["--no-background-fetch"] if system == "beam-nobg" else []
    node = Node(scratch, containerd_bin, beam_args)
    try:
        drop_caches()
        b0 = link.down_bytes
        t0 = time.monotonic()
        if system == "full":
            subprocess.run(
                node.ctr(["image", "pull", "--plain-http", image]),
                check=True,
                capture_output=True,
                env=node.env,
            )
            run = node.ctr(["run", "--rm", image, "w"] + workload)
        else:
            subprocess.run(
                [BEAM, "pull", "--address", node.ctd_sock, "--namespace", "bench", "--plain-http",
                 "--json", image],
                check=True,
                capture_output=True,
            )
            run = node.ctr(["run", "--rm", "--snapshotter", "beam", image, "w"] + workload)
        t1 = time.monotonic()
        tf, line = first_line(run, node.env)
        b1 = link.down_bytes
        whole = None
        if system == "beam":
            def cached():
                s = node.status()
                return bool(s) and bool(s["layers"]) and all(
                    l["chunks_cached"] >= l["chunks_total"] for l in s["layers"])
            try:
                wait_for(cached, 600, "the whole image in the cache")
                whole = time.monotonic() - t0
            except RuntimeError:
                whole = None
        return {
            "first": tf - t0,
            "bytes": b1 - b0,
            "pull": t1 - t0,
            "whole": whole,
            "line": line,
        }
    finally:
        node.close()


def fmt(vals, unit):
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = statistics.median(vals)
    if unit == "s":
        return f"{m:.2f} s ({min(vals):.2f}-{max(vals):.2f})"
    return f"{m / 1e6:.1f} MB ({min(vals) / 1e6:.1f}-{max(vals) / 1e6:.1f})"


def main():
    # SIGTERM/SIGINT end the run through the cleanup below (finally), not around it.
    def interrupted(sig, _frame):
        raise SystemExit(f"interrupted by signal {sig}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry-port", type=int, required=True)
    ap.add_argument(
        "--images",
        required=True,
        help="JSON: name -> [reference path, workload, (systems to run it with)]",
    )
    ap.add_argument("--containerd", default=shutil.which("containerd"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bandwidths", default="200,0", help="Mbit/s, 0 = unlimited")
    ap.add_argument("--rtts", default="0,20", help="ms")
    ap.add_argument("--systems", default="full,beam,beam-nobg")
    ap.add_argument("--out", default=os.path.join(ROOT, "target/bench/start.txt"))
    a = ap.parse_args()

    link = Link()
    relay_port = start_relay(link, a.registry_port)
    images = json.loads(a.images)
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
                    ref = f"127.0.0.1:{relay_port}/{path}"
                    for system in a.systems.split(","):
                        if only is not None and system not in only:
                            continue
                        results = []
                        for i in range(a.runs):
                            r = run_once(system, ref, workload, link, scratch, a.containerd)
                            whole = "-" if r["whole"] is None else f"{r['whole']:.1f} s"
                            print(f"  {name} {bw or 'unlimited'} Mbit/s rtt {rtt} ms {system} "
                                  f"run {i + 1}: first output {r['first']:.2f} s "
                                  f"({r['line']!r}), {r['bytes'] / 1e6:.1f} MB, pull "
                                  f"{r['pull']:.2f} s, whole {whole}", flush=True)
                            results.append(r)
                        rows.append((name, bw, rtt, system, results))
    finally:
        for p in list(STARTED):
            stop(p)
        for d in os.listdir(scratch):
            beam_root = os.path.join(scratch, d, "beam")
            if os.path.isdir(beam_root):
                subprocess.run([SNAPSHOTTER, "--root", beam_root, "--stop"], capture_output=True)
        unmount_under(scratch)
        shutil.rmtree(scratch, ignore_errors=True)

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
    text = "\n".join(lines) + "\n"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write(text)
    print()
    print(text)


if __name__ == "__main__":
    main()
