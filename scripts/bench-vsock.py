#!/usr/bin/env python3
"""vsock benchmark: host->guest and guest->host stream throughput with 64 KiB writes, and
connection set-up rate (connect, CONNECT line, OK, one byte, close), for vireo and Firecracker
($FIRECRACKER, default ../shared/peers/firecracker; empty to leave it out), runs interleaved.

    scripts/bench-vsock.py [--runs N] [--mib N] [--conns N]

The test guest (`vireo.vsockbench`) sinks what arrives on port 5000 without reading it and
returns credit as it goes; on a connection to port 5001 it sends the requested bytes from one
untouched buffer. The host side is Firecracker's: `CONNECT <port>` on the device's Unix socket.
CPU is the whole VMM process and, separately, its own threads without the vCPU (see
bench-net.py).
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import ROOT, build, peer, process_cpu_ns, thread_cpu_ns

IMAGES = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release")
VIREO = os.path.join(ROOT, "target/release/vireo")


def commands(tmp, mib):
    pvh = os.path.join(IMAGES, "vireo-guest-pvh")
    args = f"vireo.vsocktest vireo.vsockbench={mib << 20}"
    vs = os.path.join(tmp, "vireo.sock")
    cmds = {"vireo": ([VIREO, "run", "--kernel", pvh, "--memory", "256", "--serial", "stdio",
                       "--vsock", f"cid=3,uds={vs}", "--cmdline", args + " vireo.end=poweroff"], vs)}
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        fs = os.path.join(tmp, "fc.sock")
        cfg = os.path.join(tmp, "fc.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": pvh,
                                       "boot_args": args + " vireo.end=reset"},
                       "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                       "drives": [],
                       "vsock": {"guest_cid": 3, "uds_path": fs}}, f)
        cmds["firecracker"] = ([fc, "--no-api", "--config-file", cfg, "--level", "Error",
                                "--log-path", os.path.join(tmp, "fc.log")], fs)
    return cmds


def connect(path, port):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(60)
    s.connect(path)
    s.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        b = s.recv(1)
        if not b:
            raise RuntimeError(f"no OK for port {port}")
        line += b
    if not line.startswith(b"OK "):
        raise RuntimeError(f"answer {line!r}")
    return s


def cpu(pid):
    return process_cpu_ns(pid), thread_cpu_ns(pid)


def one_run(name, cmd, path, mib, conns):
    # Firecracker leaves its socket behind and refuses to start on an existing path.
    if os.path.exists(path):
        os.unlink(path)
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, bufsize=0)
    buf = b""
    while b"@vsock ready" not in buf:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            raise RuntimeError(f"{name}: no ready line (exit {p.wait()})")
        buf += chunk
    out = {}
    total = mib << 20
    block = bytes(64 << 10)
    # Host -> guest: 64 KiB writes, then half-close and wait for the guest's close.
    s = connect(path, 5000)
    t0, c0 = time.perf_counter(), cpu(p.pid)
    sent = 0
    while sent < total:
        sent += s.send(block)
    s.shutdown(socket.SHUT_WR)
    while s.recv(65536):
        pass
    t1, c1 = time.perf_counter(), cpu(p.pid)
    s.close()
    out["h2g"] = (total / (t1 - t0), (c1[0] - c0[0]) / 1e9, (c1[1] - c0[1]) / 1e9)
    # Set-up rate: connect, CONNECT, OK, one byte, close, each waited for.
    t0, c0 = time.perf_counter(), cpu(p.pid)
    for _ in range(conns):
        s = connect(path, 5000)
        s.sendall(b"x")
        s.shutdown(socket.SHUT_WR)
        while s.recv(64):
            pass
        s.close()
    t1, c1 = time.perf_counter(), cpu(p.pid)
    out["setup"] = (conns / (t1 - t0), (c1[0] - c0[0]) / 1e9 / conns, (c1[1] - c0[1]) / 1e9 / conns)
    # Guest -> host.
    s = connect(path, 5001)
    t0, c0 = time.perf_counter(), cpu(p.pid)
    got = 0
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += len(b)
    t1, c1 = time.perf_counter(), cpu(p.pid)
    s.close()
    if got != total:
        raise RuntimeError(f"{name}: guest sent {got} of {total} bytes")
    out["g2h"] = (total / (t1 - t0), (c1[0] - c0[0]) / 1e9, (c1[1] - c0[1]) / 1e9)
    try:
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--conns", type=int, default=200)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build(guest=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(tmp, args.mib)
        for i in range(args.runs):
            order = list(cmds.items()) if i % 2 == 0 else list(reversed(cmds.items()))
            for name, (cmd, path) in order:
                try:
                    results.setdefault(name, []).append(one_run(name, cmd, path, args.mib, args.conns))
                except (RuntimeError, OSError) as e:
                    print(f"({name}: {e})", file=sys.stderr)
    print(f"vsock, {args.mib} MiB each way in 64 KiB writes, {args.conns} connection set-ups; "
          f"medians of {args.runs} runs\n")
    print("| VMM | host→guest MiB/s | guest→host MiB/s | CPU s/GiB h→g (all / VMM-only) "
          "| CPU s/GiB g→h (all / VMM-only) | set-ups/s | CPU µs/set-up (all / VMM-only) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    gib = (args.mib << 20) / (1 << 30)
    for name, runs in results.items():
        med = lambda k, i: statistics.median(r[k][i] for r in runs)  # noqa: E731
        label = name if len(runs) == args.runs else f"{name} ({len(runs)} of {args.runs} runs)"
        print(f"| {label} | {med('h2g', 0) / (1 << 20):.0f} | {med('g2h', 0) / (1 << 20):.0f} "
              f"| {med('h2g', 1) / gib:.2f} / {med('h2g', 2) / gib:.3f} "
              f"| {med('g2h', 1) / gib:.2f} / {med('g2h', 2) / gib:.3f} "
              f"| {med('setup', 0):.0f} | {med('setup', 1) * 1e6:.0f} / {med('setup', 2) * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
