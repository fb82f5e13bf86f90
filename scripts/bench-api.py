#!/usr/bin/env python3
"""API benchmark: how soon after exec the API socket answers (wall ms and the process's CPU ms
at that moment), and the latency of GET / and PUT /machine-config, for vireo, Firecracker
($FIRECRACKER, default ../shared/peers/firecracker) and Cloud Hypervisor ($CLOUD_HYPERVISOR,
default ../shared/peers/cloud-hypervisor; an empty variable leaves a peer out) in the same run,
runs interleaved. Cloud Hypervisor's API has no GET / or machine-config: its row times
GET /api/v1/vmm.ping, the nearest request, and has no PUT figure. The "floor" row is a static C
program (built here with gcc -static) that only binds and listens on the socket, then sleeps:
no VMM can be ready sooner, measured the same way.

    scripts/bench-api.py [--runs N] [--requests N]
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import UnixConnection, build, peer, process_cpu_ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO = os.path.join(ROOT, "target/release/vireo")
VIREO_MUSL = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/vireo")


def one(cmd_for, requests, get_path="/", put=True):
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
        c = UnixConnection(sock)
        get = []
        for _ in range(requests if get_path else 0):
            t = time.perf_counter()
            c.request("GET", get_path)
            r = c.getresponse()
            r.read()
            get.append((time.perf_counter() - t) * 1e6)
            if r.status != 200:
                raise RuntimeError(f"GET {get_path} answered {r.status}")
        lat = []
        for i in range(requests if put else 0):
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
        return (ready_ms, ready_cpu, statistics.median(get) if get else float("nan"),
                statistics.median(lat) if lat else float("nan"))


FLOOR_C = r"""
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
int main(int argc, char **argv) {
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    strncpy(a.sun_path, argv[1], sizeof a.sun_path - 1);
    int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (s < 0 || bind(s, (struct sockaddr *)&a, sizeof a) || listen(s, 128)) return 1;
    pause();
    return 0;
}
"""


def build_floor(tmp):
    """The bind-and-listen floor, or None where no C compiler is found."""
    src, exe = os.path.join(tmp, "floor.c"), os.path.join(tmp, "floor")
    with open(src, "w") as f:
        f.write(FLOOR_C)
    try:
        subprocess.run(["gcc", "-static", "-O2", "-o", exe, src], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        print("floor: gcc -static failed; the floor row is left out", file=sys.stderr)
        return None
    return exe


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build(musl=True)
    # name: (command for a socket path, GET path, whether PUT /machine-config exists)
    vmms = {"vireo": (lambda s: [VIREO, "--api-sock", s], "/", True),
            # seccomp filters on (the default) against off.
            "vireo --no-seccomp": (lambda s: [VIREO, "--no-seccomp", "--api-sock", s], "/", True)}
    if os.path.exists(VIREO_MUSL):
        # Firecracker's release binary is static (musl): compare like with like too.
        vmms["vireo musl"] = (lambda s: [VIREO_MUSL, "--api-sock", s], "/", True)
        vmms["vireo musl --no-seccomp"] = (
            lambda s: [VIREO_MUSL, "--no-seccomp", "--api-sock", s], "/", True)
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        vmms["firecracker"] = (lambda s: [fc, "--api-sock", s, "--level", "Error"], "/", True)
    ch = peer("CLOUD_HYPERVISOR", "cloud-hypervisor")
    if ch:
        vmms["cloud-hypervisor"] = (lambda s: [ch, "--api-socket", f"path={s}"],
                                    "/api/v1/vmm.ping", False)
    floor_dir = tempfile.TemporaryDirectory()
    floor = build_floor(floor_dir.name)
    if floor:
        vmms["floor (C bind+listen)"] = (lambda s: [floor, s], None, False)
    results = {name: [] for name in vmms}
    for _ in range(args.runs):
        for name, (cmd, get_path, put) in vmms.items():
            results[name].append(one(cmd, args.requests, get_path, put))
    print(f"API socket ready after exec, GET / and PUT /machine-config latency; "
          f"medians of {args.runs} runs ({args.requests} requests each)\n")
    print("| VMM | socket ready (wall ms) | CPU ms until ready | GET / (µs) | PUT /machine-config (µs) |")
    print("|---|---:|---:|---:|---:|")
    med = {}
    for name, rs in results.items():
        med[name] = [statistics.median(r[i] for r in rs) for i in range(4)]
        m = med[name]
        put = f"{m[3]:.0f}" if m[3] == m[3] else "n/a"
        get = f"{m[2]:.0f}" if m[2] == m[2] else "n/a"
        print(f"| {name} | {m[0]:.2f} | {m[1]:.2f} | {get} | {put} |")
    if floor:
        f = med["floor (C bind+listen)"]
        print("\nabove the floor (wall ms): " + ", ".join(
            f"{n} +{m[0] - f[0]:.2f}" for n, m in med.items() if not n.startswith("floor")))
    for peer_name, label in (("firecracker", "Firecracker"), ("cloud-hypervisor", "Cloud Hypervisor")):
        if peer_name not in med:
            continue
        f = med[peer_name]
        for mine in (n for n in med if n.startswith("vireo")):
            print(f"\n{mine} / {label}: " + ", ".join(
                f"{what} {a / b:.2f}x" for what, a, b in
                zip(["ready", "CPU", "GET", "PUT"], med[mine], f) if b == b))
    return 0


if __name__ == "__main__":
    sys.exit(main())
