#!/usr/bin/env python3
"""User-space instructions per proxied request, counted by valgrind's callgrind.

Wall-clock rounds on a shared VM move by +-40% (CPU steal); the instructions a proxy executes per
request do not. This runs the same setup as bench.py (nginx upstream, token helper) and, for each
binary given, starts aleph-proxy under callgrind, warms it up, zeroes the counters, puts a fixed
wrk load on it, dumps the counters and divides by the requests wrk completed. With --peers, nginx
and HAProxy (1 worker each, the bench.py configurations) are counted the same way.

    bench/instructions.py --bin target/release/aleph-proxy [--bin OTHER ...] [--peers] [--variant w1+info]
                          [--cache]

--cache adds callgrind's cache and branch simulation (slower, fewer requests counted) and
reports per request the first-level instruction and data cache misses and the mispredicted
branches: two proxies executing as many instructions can still differ in how much of their
code and data the caches hold.

Needs valgrind (apt-get install -y valgrind) besides bench.py's packages. Kernel time is not
counted: it is the same four socket calls per request for every proxy (BENCHMARKS.md).
"""
import argparse
import glob
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as B  # noqa: E402


SIM = []  # ["--cache-sim=yes", "--branch-sim=yes"] with --cache


def callgrind_argv(work, name, argv):
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={work}/{name}.cg.%p",
        "--dump-instr=no",
        "--trace-children=no",
    ] + SIM + argv


def totals(path):
    """The dump's event totals by name (Ir; with the simulations also I1mr, D1mr, D1mw, Bcm,
    Bim...)."""
    events = None
    with open(path) as f:
        for line in f:
            if line.startswith("events:"):
                events = line.split()[1:]
            m = re.match(r"(summary|totals):\s+([\d ]+)", line)
            if m and events:
                return dict(zip(events, map(int, m.group(2).split())))
    raise SystemExit(f"no totals in {path}")


def count(bench, name, port, pid, conns, seconds):
    """Instructions per request of process `pid` under a wrk load of `seconds`."""
    B.wrk(port, conns, 1)  # warm-up: pools filled, lazy statics made
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)
    r = B.wrk(port, conns, seconds)
    before = set(glob.glob(f"{bench.work}/{name}.cg.{pid}*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        new = set(glob.glob(f"{bench.work}/{name}.cg.{pid}*")) - before
        if new:
            time.sleep(0.5)  # the dump is written in one go; let it finish
            if r["requests"] == 0:
                raise SystemExit(f"{name}: no request completed under callgrind")
            t = totals(sorted(new)[-1])
            return {k: v / r["requests"] for k, v in t.items()}, r["requests"]
        time.sleep(0.1)
    raise SystemExit(f"{name}: no callgrind dump")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", action="append", required=True, help="aleph-proxy build (repeatable)")
    ap.add_argument("--peers", action="store_true", help="also count nginx and HAProxy")
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--cache", action="store_true", help="also simulate caches and branch prediction")
    ap.add_argument(
        "--variant",
        default="w1",
        help="aleph-proxy variant as in bench.py (w1, w1+info, w1+json, w1+rw); the count is "
        "single-threaded, so use w1",
    )
    args = ap.parse_args()
    if args.cache:
        SIM.extend(["--cache-sim=yes", "--branch-sim=yes"])
    for tool in ("valgrind", "callgrind_control", "nginx", "wrk"):
        if not B.shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y valgrind nginx-light haproxy wrk")
    ns = argparse.Namespace(targets=["direct"], bin=args.bin[0], alt_bin=None, keep=args.keep)
    bench = B.Bench(ns)
    rows = []
    try:
        bench.setup()
        w = bench.work
        for i, binary in enumerate(args.bin):
            name = f"aleph{i}"
            wrapper = os.path.join(w, f"{name}.sh")
            with open(wrapper, "w") as f:
                f.write("#!/bin/sh\nexec " + " ".join(callgrind_argv(w, name, [binary])) + ' "$@"\n')
            os.chmod(wrapper, 0o755)
            port, p = bench.start_aleph(name, args.variant, binary=wrapper)
            per, n = count(bench, name, port, p.p.pid, args.conns, args.duration)
            rows.append((f"aleph-proxy {binary} ({args.variant})", per, n))
            p.stop()
        if args.peers:
            port = B.free_port()
            conf = B.fill("nginx-proxy.conf", os.path.join(w, "nginx-cg.conf"), WORK=w, PORT=port,
                          UPSTREAM_PORT=bench.up_port, WORKERS=1)
            with open(conf) as f:
                text = f.read().replace("nginx-proxy.pid", "nginx-cg.pid")
            # One process, no master: callgrind follows no forks.
            text = "master_process off;\n" + text
            with open(conf, "w") as f:
                f.write(text)
            argv = callgrind_argv(w, "nginx", ["nginx", "-p", w, "-c", conf, "-e",
                                               os.path.join(w, "nginx-cg.err")])
            p = bench.start("nginx-cg", argv, port=port, role="target")
            per, n = count(bench, "nginx", port, p.p.pid, args.conns, args.duration)
            rows.append(("nginx (1 worker)", per, n))
            p.stop()
            if B.shutil.which("haproxy"):
                port = B.free_port()
                conf = B.fill("haproxy.cfg", os.path.join(w, "haproxy-cg.cfg"), WORK=w, PORT=port,
                              UPSTREAM_PORT=bench.up_port, WORKERS=1)
                p = bench.start("haproxy-cg", callgrind_argv(w, "haproxy", ["haproxy", "-db", "-f", conf]),
                                port=port, role="target")
                per, n = count(bench, "haproxy", port, p.p.pid, args.conns, args.duration)
                rows.append(("HAProxy (1 thread)", per, n))
                p.stop()
    finally:
        bench.stop()
    print(f"\nwrk -t1 -c{args.conns} -d{args.duration}s under callgrind; user-space instructions per request:\n")
    cols = [("Ir", "instructions")]
    if args.cache:
        cols += [("I1mr", "L1i misses"), ("D1mr", "L1d read misses"), ("D1mw", "L1d write misses"),
                 ("Bcm", "mispredicted cond. branches"), ("Bim", "mispredicted ind. branches")]
    print("| target | " + " | ".join(c[1] + "/request" for c in cols) + " | requests counted |")
    print("|---|" + "---:|" * (len(cols) + 1))
    for what, per, n in rows:
        print(f"| {what} | " + " | ".join(f"{per.get(c[0], 0):,.{0 if c[0] == 'Ir' else 1}f}" for c in cols) + f" | {n} |")


if __name__ == "__main__":
    main()
