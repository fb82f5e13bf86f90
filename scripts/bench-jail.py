#!/usr/bin/env python3
"""Jailed start-up: from exec to the first answer on the API socket, for the static vireo run
directly and through vireo-jailer, and for Firecracker ($FIRECRACKER, default
../shared/peers/firecracker) run directly and through its own jailer ($JAILER, default
../shared/peers/jailer), in the same run, runs interleaved. Both jailers make the same jail
(uid/gid 65534, /srv-style chroot in a temporary base directory, no cgroups).

    scripts/bench-jail.py [--runs N]
"""

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import build, peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO_MUSL = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/vireo")
VIREO_JAILER = os.path.join(ROOT, "target/release/vireo-jailer")


def answered(path):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        ok = s.recv(64).startswith(b"HTTP/1.1 200")
        s.close()
        return ok
    except OSError:
        return False


def one(cmd, sock, jail_dir):
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    while not answered(sock):
        if time.perf_counter() - t0 > 10:
            p.kill()
            raise RuntimeError(f"{cmd[0]}: no API answer within 10 s")
        time.sleep(0.0001)
    ms = (time.perf_counter() - t0) * 1e3
    p.kill()
    p.wait()
    if jail_dir:
        shutil.rmtree(jail_dir, ignore_errors=True)
    elif os.path.exists(sock):
        os.unlink(sock)
    return ms


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build(musl=True)
    fc, fc_jailer = peer("FIRECRACKER", "firecracker"), peer("JAILER", "jailer")
    base = tempfile.mkdtemp(prefix="bench-jail-")
    jail = ["--uid", "65534", "--gid", "65534", "--chroot-base-dir", base]
    runs = {}

    def add(name, make):
        runs[name] = (make, [])

    add("vireo musl", lambda n: ([VIREO_MUSL, "--api-sock", f"{base}/v{n}.sock"],
                                 f"{base}/v{n}.sock", None))
    add("vireo musl in vireo-jailer", lambda n: (
        [VIREO_JAILER, "--id", f"v{n}", "--exec-file", VIREO_MUSL] + jail +
        ["--", "--api-sock", "/api.sock"],
        f"{base}/vireo/v{n}/root/api.sock", f"{base}/vireo/v{n}"))
    if fc:
        add("firecracker", lambda n: ([fc, "--api-sock", f"{base}/f{n}.sock"],
                                      f"{base}/f{n}.sock", None))
        if fc_jailer:
            add("firecracker in its jailer", lambda n: (
                [fc_jailer, "--id", f"f{n}", "--exec-file", fc] + jail +
                ["--", "--api-sock", "/api.sock"],
                f"{base}/firecracker/f{n}/root/api.sock", f"{base}/firecracker/f{n}"))
    try:
        n = 0
        for i in range(args.runs):
            order = list(runs.items()) if i % 2 == 0 else list(reversed(runs.items()))
            for name, (make, out) in order:
                n += 1
                cmd, sock, jail_dir = make(n)
                out.append(one(cmd, sock, jail_dir))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"exec → first API answer (GET / = 200), medians of {args.runs} runs\n")
    print("| VMM | ms |")
    print("|---|---:|")
    med = {name: statistics.median(out) for name, (_, out) in runs.items()}
    for name, m in med.items():
        print(f"| {name} | {m:.2f} |")
    if "firecracker in its jailer" in med:
        print(f"\njailed vireo / jailed Firecracker: "
              f"{med['vireo musl in vireo-jailer'] / med['firecracker in its jailer']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
