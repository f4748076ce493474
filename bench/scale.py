#!/usr/bin/env python3
"""Scale (issue 13, item 6), side by side on the modelled link of bench/start.py: Beam with its
defaults against a full pull. Run through bench/scale.sh, which builds the images.

1. Ten containers of one image started at once on a node (one pull, then ten `ctr run` at the
   same moment): time to first output of the last of them, against a single start on a fresh
   node; bytes on the wire by then, against the single start's (every chunk fetched once).
   Also each from the end of its pull step: for the full pull, the cost of the ten starts
   themselves on this machine (containerd, runc, the program), which no snapshotter avoids.
2. The same workload as the image grows: the python image (0.12 GB), and the same image with
   a layer of random data beneath it that the workload never reads (1 GB and 4 GB in all).
3. The same workload with ten more (small) layers: the cost of one layer.

Everything comes from bench/start.py: the relay that models the link, the node (its own
containerd and snapshotter, started and stopped by PID), the page cache dropped per run.
Prints one table (median, min-max) and writes it to target/bench/scale.txt.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import start  # noqa: E402  (bench/start.py: the link, the node, the pull commands)


def run_many(system, image, workload, n, link, scratch, containerd_bin):
    """One pull, then `n` containers of `image` started at once: seconds to the first output
    of each (from the pull's start), bytes on the wire by the last."""
    node = start.Node(scratch, containerd_bin, system)
    try:
        start.drop_caches()
        b0 = link.down_bytes
        t0 = time.monotonic()
        pull = subprocess.run(start.pull_command(node, system, image, None), capture_output=True,
                              env=node.env)
        if pull.returncode != 0:
            raise RuntimeError(f"{system} pull of {image} failed: {pull.stdout + pull.stderr!r}")
        t_pulled = time.monotonic()
        firsts = [None] * n
        errors = []
        go = threading.Barrier(n)

        def one(i):
            args = ["run", "--rm"]
            if system != "full":
                args += ["--snapshotter", node.snap.plugin]
            # IDs of their own: runc keeps its state per namespace under /run, shared by
            # every containerd on the machine.
            cmd = node.ctr(args + [image, f"scale-{os.getpid()}-{id(node)}-{i}"] + workload)
            go.wait()
            try:
                t, _line = start.first_line(cmd, node.env)
                firsts[i] = t - t0
            except RuntimeError as e:
                errors.append(e)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return {"last": max(firsts), "first": min(firsts), "bytes": link.down_bytes - b0,
                "after_pull": max(firsts) - (t_pulled - t0)}
    finally:
        node.close()


def main():
    start.exit_on_signals()
    ap = argparse.ArgumentParser()
    ap.add_argument("--registry-port", type=int, required=True)
    ap.add_argument("--images", required=True,
                    help="JSON: {base, sizes: {label: path}, layers: path}")
    ap.add_argument("--containerd", default=shutil.which("containerd"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--bandwidth", type=int, default=200, help="Mbit/s, 0 = unlimited")
    ap.add_argument("--rtt", type=int, default=0, help="ms")
    ap.add_argument("--containers", type=int, default=10)
    ap.add_argument("--systems", default="full,beam",
                    help="for the ten at once (beam-nobg: Beam without background fetch)")
    ap.add_argument("--parts", default="ten,sizes,layers")
    ap.add_argument("--out", default=os.path.join(start.ROOT, "target/bench/scale.txt"))
    a = ap.parse_args()
    images = json.loads(a.images)
    systems = a.systems.split(",")
    parts = a.parts.split(",")
    workload = ["/usr/bin/python3", "-c", "import json, sqlite3; print(\"ready\")"]

    link = start.Link()
    relay_port = start.start_relay(link, a.registry_port)
    link.rate = a.bandwidth * 1e6 / 8 if a.bandwidth else None
    link.delay = a.rtt / 2000.0
    ref = lambda path: f"127.0.0.1:{relay_port}/{path}"  # noqa: E731
    scratch = tempfile.mkdtemp(prefix="beam-bench-scale-")
    version = subprocess.run([a.containerd, "--version"], capture_output=True,
                             text=True).stdout.split()[2]
    single, many, sizes, layers = {}, {}, {}, {}

    def once(system, path):
        r = start.run_once(system, ref(path), workload, link, scratch, a.containerd, None,
                           wait_whole=False)
        print(f"  {system} {path}: first output {r['first']:.2f} s, {r['bytes'] / 1e6:.1f} MB",
              flush=True)
        return r

    try:
        for system in systems if "ten" in parts else []:
            for _ in range(a.runs):
                single.setdefault(system, []).append(once(system, images["base"]))
                r = run_many(system, ref(images["base"]), workload, a.containers, link, scratch,
                             a.containerd)
                print(f"  {system} x{a.containers}: last first output {r['last']:.2f} s, "
                      f"{r['bytes'] / 1e6:.1f} MB", flush=True)
                many.setdefault(system, []).append(r)
        if ("sizes" in parts or "layers" in parts) and "beam" not in single:
            single["beam"] = [once("beam", images["base"]) for _ in range(a.runs)]
        for label, path in images["sizes"].items() if "sizes" in parts else []:
            sizes[label] = [once("beam", path) for _ in range(a.runs)]
        if "layers" in parts:
            layers["base"] = single["beam"]
            layers["more"] = [once("beam", images["layers"]) for _ in range(a.runs)]
    finally:
        start.clean_scratch(scratch)

    med = statistics.median
    link_s = f"{a.bandwidth} Mbit/s" if a.bandwidth else "unlimited"
    lines = [
        f"# Scale, containerd {version}, {link_s}, RTT {a.rtt} ms, medians of {a.runs} (min-max); "
        f"one run of bench/scale.sh, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
    ]
    if "ten" in parts:
        lines += [
            "",
            f"## {a.containers} containers of one image at once",
            "",
            "| system | single start: first output | single: bytes | "
            f"{a.containers} at once: first output of the last | ratio | bytes by then | ratio | "
            f"after the pull step: single / last of {a.containers} |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for system in systems:
            s1 = med([r["first"] for r in single[system]])
            b1 = med([r["bytes"] for r in single[system]])
            sn = med([r["last"] for r in many[system]])
            bn = med([r["bytes"] for r in many[system]])
            lines.append(
                f"| {system} | {start.fmt([r['first'] for r in single[system]], 's')} | "
                f"{start.fmt([r['bytes'] for r in single[system]], 'b')} | "
                f"{start.fmt([r['last'] for r in many[system]], 's')} | {sn / s1:.2f}x | "
                f"{start.fmt([r['bytes'] for r in many[system]], 'b')} | {bn / b1:.2f}x | "
                f"{med([r['first'] - r['pull'] for r in single[system]]):.2f} s / "
                f"{med([r['after_pull'] for r in many[system]]):.2f} s |")
    if "sizes" in parts:
        base = med([r["first"] for r in single["beam"]])
        lines += [
            "",
            "## Beam, the same workload as the image grows",
            "",
            "| image | first output | against the 0.12 GB image | bytes by first output |",
            "|---|---|---|---|",
            f"| python, 0.12 GB | {start.fmt([r['first'] for r in single['beam']], 's')} | 1.00x | "
            f"{start.fmt([r['bytes'] for r in single['beam']], 'b')} |",
        ]
        for label, res in sizes.items():
            m = med([r["first"] for r in res])
            lines.append(f"| {label} | {start.fmt([r['first'] for r in res], 's')} | "
                         f"{m / base:.2f}x | {start.fmt([r['bytes'] for r in res], 'b')} |")
    if "layers" in parts:
        base = med([r["first"] for r in layers["base"]])
        more = med([r["first"] for r in layers["more"]])
        lines += [
            "",
            "## Beam, ten more layers",
            "",
            "| image | first output | per extra layer |",
            "|---|---|---|",
            f"| python | {start.fmt([r['first'] for r in layers['base']], 's')} | |",
            f"| python + 10 small layers | {start.fmt([r['first'] for r in layers['more']], 's')} | "
            f"{(more - base) * 1000 / 10:+.0f} ms |",
        ]
    start.write_table(lines, a.out)


if __name__ == "__main__":
    main()
