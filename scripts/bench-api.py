#!/usr/bin/env python3
"""API benchmark: how soon after exec the API socket answers (wall ms and the process's CPU ms
at that moment), and the latency of PUT /machine-config, for vireo and, when $FIRECRACKER names
a binary, Firecracker in the same run.

    scripts/bench-api.py [--runs N] [--requests N]
"""

import argparse
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import process_cpu_ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO = os.path.join(ROOT, "target/release/vireo")


class UnixConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)


def one(cmd_for, requests):
    with tempfile.TemporaryDirectory() as d:
        sock = os.path.join(d, "api.sock")
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd_for(sock), stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.connect(sock)
                s.close()
                break
            except OSError:
                if time.perf_counter() - t0 > 10:
                    p.kill()
                    raise RuntimeError("socket never appeared")
                time.sleep(0.0002)
        ready_ms = (time.perf_counter() - t0) * 1e3
        ready_cpu = process_cpu_ns(p.pid) / 1e6
        lat = []
        c = UnixConnection(sock)
        for i in range(requests):
            body = '{"vcpu_count": %d, "mem_size_mib": 128}' % (1 + i % 2)
            t = time.perf_counter()
            c.request("PUT", "/machine-config", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            r.read()
            lat.append((time.perf_counter() - t) * 1e6)
            if r.status != 204:
                raise RuntimeError(f"PUT /machine-config answered {r.status}")
        c.close()
        p.terminate()
        p.wait()
        return ready_ms, ready_cpu, statistics.median(lat)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "vireo"], cwd=ROOT, check=True)
    vmms = {"vireo": lambda s: [VIREO, "--api-sock", s]}
    fc = os.environ.get("FIRECRACKER")
    if fc:
        vmms["firecracker"] = lambda s: [fc, "--api-sock", s]
    print(f"API socket ready after exec, and PUT /machine-config latency; medians of {args.runs} runs\n")
    print("| VMM | socket ready (wall ms) | CPU ms until ready | PUT /machine-config (µs) |")
    print("|---|---:|---:|---:|")
    for name, cmd in vmms.items():
        rs = [one(cmd, args.requests) for _ in range(args.runs)]
        print(f"| {name} | {statistics.median(r[0] for r in rs):.2f} | "
              f"{statistics.median(r[1] for r in rs):.2f} | {statistics.median(r[2] for r in rs):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
