#!/usr/bin/env python3
"""The benchmark driver behind bench/run.sh (see there for usage). Standard library only.

Starts, all on 127.0.0.1 and under one temporary work directory:
  - the upstream: nginx, 1 worker, a small JSON body at /json and a large file at /big;
  - helpers.py token (the OAuth2 token endpoint) and helpers.py sink (reads uploads);
  - the targets: aleph-proxy variants, nginx and HAProxy configured as the same proxy;
then puts the same wrk load on every target (and on the upstream directly) in alternating
rounds, and reports medians. CPU time (utime+stime) and peak RSS (VmHWM, reset before each run
through /proc/PID/clear_refs) are read from /proc for the target's processes.
"""
import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# CPU pinning (--pin, the default on 2+ CPUs): the proxy under test alone on the last CPU, wrk, the
# upstream and the helpers on the others. Unpinned, the scheduler puts the target on whichever
# core is free at start and the same build moves by +-30% from one process to the next.
PIN = {"target": None, "rest": None}


def pinned(argv, role):
    # role "free": not pinned (the transfers place their processes themselves).
    cpus = PIN.get(role)
    return (["taskset", "-c", cpus] + argv) if cpus else argv
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024


def set_cpus(proc, cpus=None):
    """Moves a running process (its threads and children) to `cpus`; None: every CPU."""
    if shutil.which("taskset") is None:
        return
    cpus = cpus or f"0-{(os.cpu_count() or 1) - 1}"
    for pid in [proc.p.pid] + children(proc.p.pid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(pid)], capture_output=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=20.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def fill(template, out, **vars):
    with open(os.path.join(HERE, template)) as f:
        text = f.read()
    for k, v in vars.items():
        text = text.replace("@" + k + "@", str(v))
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        sys.exit(f"{template}: unfilled {leftover}")
    with open(out, "w") as f:
        f.write(text)
    return out


# ---------------------------------------------------------------- /proc readings


def children(pid):
    try:
        out = subprocess.run(
            ["pgrep", "-P", str(pid)], capture_output=True, text=True
        ).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


def cpu_ticks(pid, user_only=False):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[0] is state (field 3); utime and stime are fields 14 and 15.
    return int(fields[11]) + (0 if user_only else int(fields[12]))


def waited_ns(pid):
    """Nanoseconds the process's threads spent runnable but waiting for a CPU (the second field
    of /proc/PID/task/TID/schedstat): time lost to other processes on the same core."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[1])
            except (OSError, IndexError, ValueError):
                pass
    except OSError:
        pass
    return total


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_hwm(pid):
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


class Proc:
    """A started process; `measured` are the pids whose CPU and RSS count (nginx: workers)."""

    def __init__(self, name, argv, env=None, log=None):
        self.name = name
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.p = subprocess.Popen(
            argv,
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.master_only = True

    def measured(self):
        kids = children(self.p.pid)
        # nginx: the master forks the workers, which do all the work; count the workers only
        # (the master is idle; its shared pages would be counted twice).
        return kids if (kids and not self.master_only) else [self.p.pid]

    def cpu_s(self, user_only=False):
        return sum(cpu_ticks(p, user_only) for p in self.measured()) / CLK_TCK

    def hwm_mib(self):
        return sum(status_kib(p, "VmHWM") for p in self.measured()) / 1024

    def waited_ms(self):
        return sum(waited_ns(p) for p in self.measured()) / 1e6

    def rss_mib(self):
        return sum(status_kib(p, "VmRSS") for p in self.measured()) / 1024

    def reset_hwm(self):
        for p in self.measured():
            reset_hwm(p)

    def alive(self):
        return self.p.poll() is None

    def stop(self):
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()


# ---------------------------------------------------------------- wrk


UNIT = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def to_ms(s):
    m = re.match(r"([\d.]+)(us|ms|s|m)$", s)
    return float(m.group(1)) * UNIT[m.group(2)]


# wrk's done() hook: the finer percentiles of the same latency histogram `--latency` reports.
# With a delay (pacing), every connection waits that long after each response before it sends
# the next request: a lighter load than the closed loop, the same for every target.
WRK_LUA = """
{delay}
done = function(summary, latency, requests)
  io.write(string.format("percentiles p99.9=%d p99.99=%d max=%d\\n",
    latency:percentile(99.9), latency:percentile(99.99), latency.max))
end
"""
LUA_DIR = {"dir": None}  # the work directory, set by Bench


def wrk_script(delay_ms):
    path = os.path.join(LUA_DIR["dir"], f"wrk-{delay_ms}.lua")
    if not os.path.exists(path):
        delay = f"function delay() return {delay_ms} end" if delay_ms else ""
        with open(path, "w") as f:
            f.write(WRK_LUA.format(delay=delay))
    return path


def wrk(port, conns, seconds, path="/json", delay_ms=0):
    out = subprocess.run(
        pinned([
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            wrk_script(delay_ms),
            f"http://127.0.0.1:{port}{path}",
        ], "rest"),
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = to_ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))
    p99 = to_ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    fine = re.search(r"^percentiles p99.9=(\d+) p99.99=(\d+) max=(\d+)", out, re.M)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: (.*)", out)
    return {
        "rps": rps,
        "p50": p50,
        "p99": p99,
        # Lua's percentiles are in microseconds.
        "p999": int(fine.group(1)) / 1000 if fine else None,
        "requests": total,
        "non2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errs.group(1).strip() if errs else "",
    }


# ---------------------------------------------------------------- setup


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = tempfile.mkdtemp(prefix="aleph-bench.")
        # nginx workers started by root run as nobody and must read big.bin.
        os.chmod(self.work, 0o755)
        LUA_DIR["dir"] = self.work
        self.procs = []
        self.targets = {}  # name -> (port, Proc or None)

    def start(self, name, argv, env=None, port=None, master_only=True, role="rest"):
        p = Proc(name, pinned(argv, role), env=env, log=os.path.join(self.work, name + ".log"))
        p.master_only = master_only
        self.procs.append(p)
        if port is not None and not wait_port(port):
            with open(os.path.join(self.work, name + ".log")) as f:
                sys.stderr.write(f.read()[-3000:])
            sys.exit(f"{name} did not start listening on {port}")
        return p

    def setup(self):
        a = self.args
        w = self.work
        for d in ["tmp-up-body", "tmp-px-body"]:
            os.makedirs(os.path.join(w, d), exist_ok=True)
        self.up_port = free_port()
        up = fill(
            "nginx-upstream.conf",
            os.path.join(w, "nginx-upstream.conf"),
            WORK=w,
            UPSTREAM_PORT=self.up_port,
        )
        self.upstream = self.start(
            "upstream-nginx",
            ["nginx", "-p", w, "-c", up, "-e", os.path.join(w, "nginx-upstream.err")],
            port=self.up_port,
            master_only=False,
        )
        self.targets["direct"] = (self.up_port, None)

        self.token_port = free_port()
        self.start(
            "token",
            [sys.executable, os.path.join(HERE, "helpers.py"), "token", str(self.token_port)],
            port=self.token_port,
        )
        self.sink_port = free_port()
        self.sink = self.start(
            "sink",
            [sys.executable, os.path.join(HERE, "helpers.py"), "sink", str(self.sink_port)],
            port=self.sink_port,
        )

        for name in a.targets:
            if name == "direct":
                continue
            kind, _, variant = name.partition("-")
            if kind == "aleph":
                self.start_aleph(name, variant)
            elif kind == "alt":
                # The same as aleph-*, with --alt-bin: A/B comparisons of two builds in one run.
                self.start_aleph(name, variant, binary=self.args.alt_bin)
            elif kind == "nginx":
                # nginx-wN+log: with nginx's default access log (combined format, a write per
                # request) to a file, the counterpart of aleph-wN+info.
                workers = int(variant.split("+")[0].lstrip("w") or 1)
                port = free_port()
                conf = fill(
                    "nginx-proxy.conf",
                    os.path.join(w, f"{name}.conf"),
                    WORK=w,
                    PORT=port,
                    UPSTREAM_PORT=self.up_port,
                    WORKERS=workers,
                )
                # Each nginx instance needs its own pid file.
                with open(conf) as f:
                    text = f.read().replace("nginx-proxy.pid", f"{name}.pid")
                if variant.endswith("+log"):
                    log = os.path.join(w, f"{name}.access.log")
                    text = text.replace("access_log off;", f"access_log {log};")
                with open(conf, "w") as f:
                    f.write(text)
                p = self.start(
                    name,
                    ["nginx", "-p", w, "-c", conf, "-e", os.path.join(w, f"{name}.err")],
                    port=port,
                    master_only=False,
                    role="target",
                )
                self.targets[name] = (port, p)
            elif kind == "haproxy":
                threads = int(variant.lstrip("w") or 1)
                port = free_port()
                conf = fill(
                    "haproxy.cfg",
                    os.path.join(w, f"{name}.cfg"),
                    WORK=w,
                    PORT=port,
                    UPSTREAM_PORT=self.up_port,
                    WORKERS=threads,
                )
                with open(conf) as f:
                    text = f.read().replace("haproxy.pid", f"{name}.pid")
                with open(conf, "w") as f:
                    f.write(text)
                p = self.start(name, ["haproxy", "-db", "-f", conf], port=port, role="target")
                self.targets[name] = (port, p)
            else:
                sys.exit(f"unknown target {name}")

    def start_aleph(self, name, variant, upstream_port=None, binary=None, role="target"):
        """Variants: w1/w2 = tokio worker threads; +rw = link rewriting on; +info = RUST_LOG=info
        (the default: an access log line per request, text); +json = the same as JSON lines (the
        container image's default); +sys = tcp.client_congestion_control = "system" (the host's
        algorithm on client connections, where the default `auto` leaves BBR on loopback)."""
        parts = variant.split("+")
        threads = int(parts[0].lstrip("w") or 2)
        port, admin = free_port(), free_port()
        conf = fill(
            "aleph-proxy.toml",
            os.path.join(self.work, f"{name}.toml"),
            PORT=port,
            ADMIN_PORT=admin,
            UPSTREAM_PORT=upstream_port or self.up_port,
            TOKEN_PORT=self.token_port,
            REWRITE="true" if "rw" in parts else "false",
        )
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("ALEPH_PROXY_")
        }
        env["TOKIO_WORKER_THREADS"] = str(threads)
        env["RUST_LOG"] = "info" if ("info" in parts or "json" in parts) else "warn"
        if "json" in parts:
            env["ALEPH_PROXY_LOG__FORMAT"] = "json"
        if "sys" in parts:
            env["ALEPH_PROXY_TCP__CLIENT_CONGESTION_CONTROL"] = "system"
        for k in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY"):
            env.pop(k, None)
        p = self.start(
            name, [binary or self.args.bin, "--config", conf], env=env, port=port, role=role
        )
        self.targets[name] = (port, p)
        # Idle RSS: started, token fetched, no request served yet.
        if not wait_port(admin):
            sys.exit(f"{name}: admin port did not open")
        time.sleep(0.5)
        p.idle_rss = p.rss_mib()
        return port, p

    def check_targets(self):
        for name, (port, p) in self.targets.items():
            out = subprocess.run(
                ["curl", "-s", "-D", "-", "-o", "/dev/null", f"http://127.0.0.1:{port}/json"],
                capture_output=True,
                text=True,
            ).stdout
            first = out.splitlines()[0] if out else ""
            if " 200" not in first:
                sys.exit(f"{name}: /json did not answer 200:\n{out}")

    def stop(self):
        for p in reversed(self.procs):
            p.stop()
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------ runs

    def measure(self, name, conns, seconds, delay_ms=0):
        port, p = self.targets[name]
        if p is not None:
            if not p.alive():
                sys.exit(f"{name} died; log in {self.work}")
            p.reset_hwm()
            c0 = p.cpu_s()
            u0 = p.cpu_s(user_only=True)
            w0 = p.waited_ms()
        up0 = self.upstream.waited_ms()
        r = wrk(port, conns, seconds, delay_ms=delay_ms)
        # Run-queue waits: the target's threads, and the upstream's (which shares its core with
        # wrk), during the run.
        r["up_wait_ms"] = self.upstream.waited_ms() - up0
        if p is not None:
            r["cpu_s"] = p.cpu_s() - c0
            r["user_s"] = p.cpu_s(user_only=True) - u0
            r["hwm"] = p.hwm_mib()
            r["wait_ms"] = p.waited_ms() - w0
        else:
            r["cpu_s"] = r["user_s"] = r["hwm"] = r["wait_ms"] = None
        return r

    def load_rounds(self):
        a = self.args
        names = list(self.targets)
        # Warm-up: connection pools filled, pages faulted in, token fetched.
        for n in names:
            wrk(self.targets[n][0], a.conns, 1)
        results = {n: [] for n in names}
        for r in range(a.rounds):
            # Alternate: rotate the order every round so no target always runs first or last.
            order = names[r % len(names):] + names[: r % len(names)]
            for n in order:
                res = self.measure(n, a.conns, a.duration)
                results[n].append(res)
                print(
                    f"  round {r + 1} {n:<18} {res['rps']:>9.0f} req/s  p50 {res['p50']:.3f} ms"
                    f"  p99 {res['p99']:.3f} ms"
                    + (f"  cpu {res['cpu_s']:.2f} s  hwm {res['hwm']:.1f} MiB" if res["cpu_s"] is not None else "")
                    + (f"  NON-2XX {res['non2xx']}" if res["non2xx"] else "")
                    + (f"  SOCKET ERRORS {res['socket_errors']}" if res["socket_errors"] else ""),
                    flush=True,
                )
        return results

    def paired(self, names, slices, seconds):
        """Short back-to-back runs of a few targets, the order rotated every slice. The host's
        noise here moves over seconds to minutes (one target: 26k to 52k req/s across the rounds
        of one run), so runs a minute apart compare badly; runs a second apart share most of it.
        Each slice gives every target's ratio to each peer in that slice."""
        names = [n for n in names if n in self.targets]
        for n in names:
            wrk(self.targets[n][0], self.args.conns, 1)
        out = []
        for i in range(slices):
            order = names[i % len(names):] + names[: i % len(names)]
            out.append({n: self.measure(n, self.args.conns, seconds) for n in order})
        return names, out

    def paced(self, names, slices, seconds, delay_ms):
        """A lighter load than the closed loop: every connection waits `delay_ms` after each
        response. The same offered load for every target, and no core saturated: the latency
        distribution of a proxy that is not the bottleneck."""
        names = ["direct"] + [n for n in names if n in self.targets and n != "direct"]
        for n in names:
            wrk(self.targets[n][0], self.args.conns, 1, delay_ms=delay_ms)
        out = []
        for i in range(slices):
            order = names[i % len(names):] + names[: i % len(names)]
            out.append(
                {n: self.measure(n, self.args.conns, seconds, delay_ms=delay_ms) for n in order}
            )
        return names, out

    def many_connections(self, name, conns):
        port, p = self.targets[name]
        p.reset_hwm()
        r = wrk(port, conns, self.args.duration)
        r["hwm"] = p.hwm_mib()
        return r

    def transfers(self):
        a = self.args
        big = os.path.join(self.work, "big.bin")
        up = os.path.join(self.work, "upload.bin")
        for path, size in ((big, a.download_mib), (up, a.upload_mib)):
            # Real (non-sparse) data, read once so both runs read it from the page cache.
            subprocess.run(
                ["dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={size}", "status=none"],
                check=True,
            )
            os.chmod(path, 0o644)
            subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)
        if not any(n.startswith("aleph") for n in self.targets):
            return None
        # Fresh instances (2 worker threads, the default on this machine): their peak RSS is the
        # transfer's, not what the load runs before left in the allocator.
        dl_port, aleph_dl = self.start_aleph("aleph-download", "w2", role="free")
        # The same with the host's congestion control on the client leg (BBR on many hosts):
        # what `auto` changes.
        sys_port, aleph_sys = self.start_aleph("aleph-download-sys", "w2+sys", role="free")
        sink_port, aleph_up = self.start_aleph(
            "aleph-upload", "w2", upstream_port=self.sink_port, role="free"
        )
        del self.targets["aleph-download"]
        del self.targets["aleph-download-sys"]
        del self.targets["aleph-upload"]
        # The reference relay (helpers.py relay): splice(2) and nothing else, no HTTP.
        relay, relay_procs = {}, []
        if hasattr(os, "splice"):
            for kind, up_port in (("download", self.up_port), ("upload", self.sink_port)):
                port = free_port()
                relay[kind] = port
                relay_procs.append(self.start(
                    f"relay-{kind}",
                    [sys.executable, os.path.join(HERE, "helpers.py"), "relay", str(port), str(up_port)],
                    port=port,
                    role="free",
                ))
        servers = [self.upstream, self.sink, aleph_dl, aleph_sys, aleph_up] + relay_procs
        who_all = ["direct", "aleph", "aleph-sys"] + (["relay"] if relay else [])
        # Two placements, every round in both:
        # - "client core": curl alone on CPU 0 in every run; the upstream (or sink), aleph-proxy
        #   and the relay share the other CPUs. The client has the same core direct and proxied,
        #   and the proxy has no core of its own: it must fit beside the upstream.
        # - "free": nothing pinned; curl, the upstream, the proxy and the relay share the CPUs as
        #   the scheduler likes, and a third process takes turns with curl.
        ncpu = os.cpu_count() or 1
        placements = ["free"]
        if PIN["target"] and ncpu >= 2:
            placements.insert(0, "client core")
        res = {
            pl: {k: {w: [] for w in who_all} | {"hwm": 0.0, "cpu": []} for k in ("download", "upload")}
            for pl in placements
        }

        def curl(args, field, cpus):
            argv = ["curl", "-sS", "-o", "/dev/null", "-H", "Expect:", "-w", "%{http_code} %{" + field + "}"]
            if cpus:
                argv = ["taskset", "-c", cpus] + argv
            out = subprocess.run(argv + args, capture_output=True, text=True, timeout=600)
            code, speed = out.stdout.split()
            if code != "200":
                sys.exit(f"transfer failed: {args}: {code} {out.stderr}")
            return float(speed) / MIB

        kinds = {
            "download": (aleph_dl, dl_port, self.up_port, lambda port: [f"http://127.0.0.1:{port}/big"], "speed_download"),
            "upload": (aleph_up, sink_port, self.sink_port, lambda port: ["-T", up, f"http://127.0.0.1:{port}/upload"], "speed_upload"),
        }
        for r in range(a.transfer_rounds):
            for pl in placements:
                client_cpus = "0" if pl == "client core" else None
                for p in servers:
                    set_cpus(p, ("1" if ncpu == 2 else f"1-{ncpu - 1}") if client_cpus else None)
                # Each round in another order, so no one goes first every time.
                order = who_all[r % len(who_all):] + who_all[: r % len(who_all)]
                for kind, (proc, aleph_port, direct_port, argv, field) in kinds.items():
                    out = res[pl][kind]
                    for who in order:
                        if who == "aleph-sys" and kind != "download":
                            continue  # the client leg's algorithm acts on what the proxy sends
                        port = {
                            "direct": direct_port,
                            "aleph": aleph_port,
                            "aleph-sys": sys_port,
                            "relay": relay.get(kind),
                        }[who]
                        if who == "aleph":
                            proc.reset_hwm()
                            c0, t0 = proc.cpu_s(), time.monotonic()
                        out[who].append(curl(argv(port), field, client_cpus))
                        if who == "aleph":
                            out["hwm"] = max(out["hwm"], proc.hwm_mib())
                            out["cpu"].append((proc.cpu_s() - c0) / (time.monotonic() - t0))
        return res


# ---------------------------------------------------------------- report


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def sysctl(name):
    try:
        with open(f"/proc/sys/{name}") as f:
            return f.read().strip()
    except OSError:
        return "?"


def machine():
    def first(path, key):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(key):
                        return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    def version(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "?"

    return [
        f"- CPU: {os.cpu_count()} x {first('/proc/cpuinfo', 'model name')} "
        f"({first('/proc/cpuinfo', 'cpu MHz')} MHz), RAM {int(first('/proc/meminfo', 'MemTotal').split()[0]) // 1024} MiB",
        f"- kernel: {os.uname().release}; TCP congestion control: {sysctl('net/ipv4/tcp_congestion_control')}",
        f"- {version(['nginx', '-v'])}; {version(['haproxy', '-v'])}; {version(['wrk', '-v'])}",
        f"- load average before the run: {os.getloadavg()[0]:.2f}",
    ]


def is_peer(n):
    """The peers the targets are judged against: nginx and HAProxy without an access log, as
    aleph-wN without +info/+json (nginx-wN+log is reported beside them, not counted)."""
    return (n.startswith("nginx") or n.startswith("haproxy")) and "+" not in n


def quantiles(xs):
    """Median and interquartile range (25th, 75th percentile)."""
    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[1], q[0], q[2]


def report_paired(args, names, slices):
    ours = [n for n in names if n.startswith(("aleph-", "alt-"))]
    peers = [n for n in names if is_peer(n)]
    lines = [
        f"Paired slices: {len(slices)} slices of `wrk -t1 -c{args.conns} -d{args.paired_seconds}s` "
        f"on {', '.join(names)} back to back, the order rotated every slice; the ratio of each "
        "target to each peer inside every slice, median [25th-75th percentile]; wins = slices "
        "where the target did better. CPU/req from the targets' /proc times.",
        "",
        "| target vs peer | req/s ratio | req/s wins | p99 ratio | p99 wins | CPU/req ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in ours:
        # An --alt-bin build is also compared with the same variant of --bin (the A/B row).
        twin = "aleph-" + a[len("alt-"):] if a.startswith("alt-") else None
        # With an access log on (+info, +json), also against nginx with its access log.
        workers = a.split("-", 1)[1].split("+")[0]
        logged = f"nginx-{workers}+log" if "+info" in a or "+json" in a else None
        for b in peers + [x for x in (twin, logged) if x in names]:
            rps = [sl[a]["rps"] / sl[b]["rps"] for sl in slices]
            p99 = [sl[a]["p99"] / sl[b]["p99"] for sl in slices]
            cpu = [
                (sl[a]["cpu_s"] / sl[a]["requests"]) / (sl[b]["cpu_s"] / sl[b]["requests"])
                for sl in slices
                if sl[a]["requests"] and sl[b]["requests"] and sl[b]["cpu_s"]
            ]
            fmt = "{:.3f} [{:.3f}-{:.3f}]"
            lines.append(
                f"| {a} vs {b} | {fmt.format(*quantiles(rps))} | {sum(r > 1 for r in rps)}/{len(rps)} | "
                f"{fmt.format(*quantiles(p99))} | {sum(r < 1 for r in p99)}/{len(p99)} | "
                + (fmt.format(*quantiles(cpu)) if cpu else "-")
                + " |"
            )
    return lines


def report_paced(args, names, slices):
    peers = [n for n in names if is_peer(n)]
    lines = [
        f"Paced slices: {len(slices)} slices of `wrk -t1 -c{args.conns} -d{args.paired_seconds}s` "
        f"where every connection waits {args.paced_ms} ms after each response (the same lighter "
        f"load on every target; no core saturated), on {', '.join(names)} back to back, the "
        "order rotated every slice. Medians over the slices; wait = the target's run-queue wait "
        "per slice (schedstat); the ratios to each peer are per slice, median [25th-75th "
        "percentile], wins = slices where the target had the lower value.",
        "",
        "| target | req/s | p50 ms | p99 ms | p99.9 ms | run-queue wait ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        rs = [sl[n] for sl in slices]
        waits = [r["wait_ms"] for r in rs if r["wait_ms"] is not None]
        p999 = [r["p999"] for r in rs if r["p999"] is not None]
        lines.append(
            f"| {n} | {med([r['rps'] for r in rs]):.0f} | {med([r['p50'] for r in rs]):.3f} | "
            f"{med([r['p99'] for r in rs]):.3f} | {(format(med(p999), '.3f') if p999 else '-')} | "
            f"{(format(med(waits), '.1f') if waits else '-')} |"
        )
    lines += [
        "",
        "| target vs peer | p50 ratio | p50 wins | p99 ratio | p99 wins | p99.9 ratio | p99.9 wins |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    fmt = "{:.3f} [{:.3f}-{:.3f}]"
    for a in [n for n in names if n.startswith(("aleph-", "alt-"))]:
        for b in peers:
            cols = []
            for key in ("p50", "p99", "p999"):
                xs = [sl[a][key] / sl[b][key] for sl in slices if sl[a][key] and sl[b][key]]
                cols.append(
                    f"{fmt.format(*quantiles(xs))} | {sum(x < 1 for x in xs)}/{len(xs)}" if xs else "- | -"
                )
            lines.append(f"| {a} vs {b} | " + " | ".join(cols) + " |")
    return lines


def report(args, bench, results, many, transfers):
    lines = []
    lines.append(f"aleph-proxy: {args.bin}" + (f"; alt: {args.alt_bin}" if args.alt_bin else ""))
    lines.append("")
    lines.append(
        f"wrk -t1 -c{args.conns} -d{args.duration}s, {args.rounds} alternating rounds, medians; "
        + (f"target pinned to CPU {PIN['target']}, wrk/upstream/helpers to CPU {PIN['rest']}; " if PIN["target"] else "unpinned; ")
        + 
        "CPU s = proxy CPU time (user+sys) per run, user µs/req its user-space part; RSS = peak (VmHWM) during the run."
    )
    lines.append("")
    rows = {}
    for n, rs in results.items():
        rows[n] = {
            "rps": med([r["rps"] for r in rs]),
            "p50": med([r["p50"] for r in rs]),
            "p99": med([r["p99"] for r in rs]),
            "cpu": med([r["cpu_s"] for r in rs]) if rs[0]["cpu_s"] is not None else None,
            "us_req": med([r["cpu_s"] / r["requests"] * 1e6 for r in rs]) if rs[0]["cpu_s"] is not None else None,
            "user_us_req": med([r["user_s"] / r["requests"] * 1e6 for r in rs]) if rs[0]["cpu_s"] is not None else None,
            "hwm": max(r["hwm"] for r in rs) if rs[0]["hwm"] is not None else None,
            "bad": sum(r["non2xx"] for r in rs),
        }
    peers = [n for n in rows if is_peer(n)]
    best_rps = max((rows[n]["rps"] for n in peers), default=None)
    best_p99 = min((rows[n]["p99"] for n in peers), default=None)
    direct = rows.get("direct")
    lines.append(
        "| target | req/s | p50 ms | p99 ms | CPU s | CPU µs/req | user µs/req | peak RSS MiB | req/s vs best peer | p99 vs best peer | req/s vs direct | p99 vs direct |"
    )
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, r in rows.items():
        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        lines.append(
            f"| {n} | {r['rps']:.0f} | {r['p50']:.3f} | {r['p99']:.3f} | {f(r['cpu'], '.2f')} | "
            f"{f(r['us_req'], '.1f')} | {f(r['user_us_req'], '.1f')} | {f(r['hwm'], '.1f')} | "
            f"{f(r['rps'] / best_rps if best_rps else None, '.2f')} | {f(r['p99'] / best_p99 if best_p99 else None, '.2f')} | "
            f"{f(r['rps'] / direct['rps'] if direct else None, '.2f')} | {f(r['p99'] / direct['p99'] if direct else None, '.2f')} |"
            + (f" {r['bad']} non-2xx!" if r["bad"] else "")
        )
    lines.append("")
    lines.append(
        "Waiting for a CPU (run-queue wait from /proc/PID/task/*/schedstat, median per run): "
        "the target's threads, and the upstream's, which shares its core with wrk: "
        + "; ".join(
            f"{n} {med([r['wait_ms'] for r in rs]):.1f} / {med([r['up_wait_ms'] for r in rs]):.0f} ms"
            if rs[0]["wait_ms"] is not None
            else f"{n} - / {med([r['up_wait_ms'] for r in rs]):.0f} ms"
            for n, rs in results.items()
        )
    )
    lines.append("")
    idle = [
        (n, p.idle_rss)
        for n, (_, p) in bench.targets.items()
        if p is not None and hasattr(p, "idle_rss")
    ]
    if idle:
        lines.append(
            "aleph-proxy idle RSS (started, token fetched, before any request): "
            + ", ".join(f"{n} {v:.1f} MiB" for n, v in idle)
        )
    if many:
        n, r = many
        lines.append(
            f"{n} at {args.many_conns} connections: {r['rps']:.0f} req/s, p99 {r['p99']:.3f} ms, "
            f"peak RSS {r['hwm']:.1f} MiB"
        )
    if transfers:
        lines.append("")
        first = next(iter(transfers.values()))
        relay = "relay" in first["download"]
        lines.append(
            f"Transfers (curl, {args.transfer_rounds} rounds, each in both placements, rotating order, "
            "medians; placement `client core`: curl alone on CPU 0 in every run, the upstream, "
            "aleph-proxy and the relay on the other CPUs; `free`: nothing pinned; "
            "aleph-proxy: fresh instances, 2 worker threads, peak RSS over their runs"
            + ("; relay: helpers.py relay, splice(2) and nothing else" if relay else "")
            + "):"
        )
        lines.append("")
        lines.append(
            "| transfer | placement | direct MiB/s | via aleph-proxy MiB/s | ratio (medians) | ratio (per round) | "
            + "via aleph-proxy, `system` congestion control: MiB/s (ratio medians / per round) | "
            + ("via relay MiB/s | relay ratio (medians / per round) | " if relay else "")
            + "aleph-proxy peak RSS MiB | aleph-proxy CPU % |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if relay else "") + "---:|---:|")
        for kind, size in (("download", args.download_mib), ("upload", args.upload_mib)):
            for pl, by_kind in transfers.items():
                t = by_kind[kind]
                d, al = med(t["direct"]), med(t["aleph"])
                per_round = med([x / y for x, y in zip(t["aleph"], t["direct"])])
                cpu = med(t["cpu"]) * 100
                sy = "-"
                if t["aleph-sys"]:
                    sr = med([x / y for x, y in zip(t["aleph-sys"], t["direct"])])
                    sy = f"{med(t['aleph-sys']):.0f} ({med(t['aleph-sys']) / d:.2f} / {sr:.2f})"
                rl = ""
                if relay:
                    rr = med([x / y for x, y in zip(t["relay"], t["direct"])])
                    rl = f"{med(t['relay']):.0f} | {med(t['relay']) / d:.2f} / {rr:.2f} | "
                lines.append(
                    f"| {kind} {size} MiB | {pl} | {d:.0f} | {al:.0f} | {al / d:.2f} | {per_round:.2f} | {sy} | {rl}"
                    f"{t['hwm']:.1f} | {cpu:.0f} |"
                )
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--alt-bin", help="a second aleph-proxy build, for targets alt-wN[+rw][+info]")
    # Many short rounds rather than a few long ones: on a shared VM (CPU steal) a bad spell then
    # spoils a round or two of each target, which the median drops.
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--conns", type=int, default=32)
    ap.add_argument("--many-conns", type=int, default=256)
    ap.add_argument("--download-mib", type=int, default=1024)
    ap.add_argument("--upload-mib", type=int, default=256)
    ap.add_argument("--transfer-rounds", type=int, default=9)
    ap.add_argument("--no-transfers", action="store_true")
    ap.add_argument(
        "--paired",
        default="aleph-w1,nginx-w1,nginx-w2,haproxy-w1,haproxy-w2",
        help="targets for the paired slices (each of them must also be in --targets)",
    )
    ap.add_argument("--paired-slices", type=int, default=30, help="0: no paired slices")
    ap.add_argument("--paired-seconds", type=int, default=2)
    ap.add_argument(
        "--paced-slices",
        type=int,
        default=10,
        help="slices at a lighter load (direct and the --paired targets); 0: none",
    )
    ap.add_argument(
        "--paced-ms", type=int, default=1, help="pause of each connection after each response"
    )
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, configs)")
    ap.add_argument("--out", help="also write the report to this file")
    ap.add_argument(
        "--targets",
        default="direct,aleph-w1,aleph-w2,nginx-w1,nginx-w2,haproxy-w1,haproxy-w2,aleph-w1+rw,aleph-w1+info,aleph-w1+json,nginx-w1+log",
    )
    ap.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin the target to its own CPU (pinned by default when there are 2+ CPUs)",
    )
    args = ap.parse_args()
    args.targets = args.targets.split(",")
    ncpu = os.cpu_count() or 1
    if not args.no_pin and ncpu >= 2 and shutil.which("taskset"):
        PIN["target"] = str(ncpu - 1)
        PIN["rest"] = "0" if ncpu == 2 else f"0-{ncpu - 2}"
    for tool in ("nginx", "haproxy", "wrk", "curl"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install -y nginx-light haproxy wrk curl")

    bench = Bench(args)
    try:
        bench.setup()
        bench.check_targets()
        print(f"work dir {bench.work}; targets {', '.join(bench.targets)}", flush=True)
        results = bench.load_rounds()
        many = None
        aleph = [n for n in bench.targets if n.startswith("aleph")]
        if aleph and args.many_conns:
            name = "aleph-w1" if "aleph-w1" in bench.targets else aleph[0]
            many = (name, bench.many_connections(name, args.many_conns))
        paired = None
        if args.paired_slices:
            paired = bench.paired(args.paired.split(","), args.paired_slices, args.paired_seconds)
        paced = None
        if args.paced_slices:
            paced = bench.paced(
                args.paired.split(","), args.paced_slices, args.paired_seconds, args.paced_ms
            )
        transfers = None if args.no_transfers else bench.transfers()
        lines = ["Machine:", ""] + machine() + [""] + report(args, bench, results, many, transfers)
        if paired and paired[1]:
            lines += [""] + report_paired(args, *paired)
        if paced and paced[1]:
            lines += [""] + report_paced(args, *paced)
        text = "\n".join(lines) + "\n"
        print()
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text)
    finally:
        bench.stop()


if __name__ == "__main__":
    main()
