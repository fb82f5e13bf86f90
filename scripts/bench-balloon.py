#!/usr/bin/env python3
"""Balloon benchmark: inflate and deflate rate (MiB/s) and the host memory released, for vireo
and Firecracker ($FIRECRACKER, default ../shared/peers/firecracker; empty leaves it out) side
by side, runs interleaved. Cloud Hypervisor is left out: its balloon is a virtio-PCI device,
and the test guest drives virtio-mmio devices only.

The guest is vireo's test guest with its balloon driver (`vireo.balloontest=N`): it touches
N MiB, then follows the target. Each run boots a 1 vCPU guest of N + 128 MiB through the API,
waits for `@balloon ready`, then:
* inflate: PATCH /balloon to N MiB; the time until the guest reports the pages given
  (`@balloon inflated`), and how far the resident size of the VMM process fell;
* deflate: PATCH /balloon to 0; the time until the guest reports them taken back.
The guest's driver sends 256 page numbers per request and waits for each, as Linux's does.

    scripts/bench-balloon.py [--runs N] [--mib N]
"""

import argparse
import os
import statistics
import subprocess
import tempfile
import time

from benchlib import build, peer

import importlib.util

_spec = importlib.util.spec_from_file_location(
    "snap", os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench-snapshot.py"))
snap = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(snap)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO = os.path.join(ROOT, "target/release/vireo")
GUEST = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release/vireo-guest-pvh")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_line(path, prefix, start, timeout=60):
    """Waits for a line starting with `prefix` after byte `start` of `path`; returns it and the
    file's size after it."""
    t0 = time.perf_counter()
    while True:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
        at = data.find(prefix)
        if at >= 0 and b"\n" in data[at:]:
            end = data.index(b"\n", at)
            return data[at:end].decode(), start + end + 1
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no {prefix!r} in {path}: {data[-300:]!r}")
        time.sleep(0.0002)


def one(kind, binary, mib, d):
    sock = os.path.join(d, f"{kind}.sock")
    out_path = os.path.join(d, f"{kind}.out")
    if os.path.exists(sock):
        os.unlink(sock)
    with open(out_path, "wb") as out:
        p = snap.spawn(kind, binary, sock, out)
    try:
        snap.req(sock, "PUT", "/boot-source",
                 {"kernel_image_path": GUEST,
                  "boot_args": f"console=ttyS0 vireo.balloontest={mib}"})
        snap.req(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": mib + 128})
        snap.req(sock, "PUT", "/balloon", {"amount_mib": 0, "deflate_on_oom": False})
        snap.req(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        _, pos = wait_line(out_path, b"@balloon ready", 0)
        before = rss_kib(p.pid)
        t = time.perf_counter()
        snap.req(sock, "PATCH", "/balloon", {"amount_mib": mib})
        line, pos = wait_line(out_path, b"@balloon inflated", pos)
        inflate_s = time.perf_counter() - t
        if "ok=1" not in line:
            raise RuntimeError(f"{kind}: {line}")
        after = rss_kib(p.pid)
        t = time.perf_counter()
        snap.req(sock, "PATCH", "/balloon", {"amount_mib": 0})
        line, pos = wait_line(out_path, b"@balloon deflated", pos)
        deflate_s = time.perf_counter() - t
        if "ok=1" not in line:
            raise RuntimeError(f"{kind}: {line}")
    finally:
        p.kill()
        p.wait()
    return mib / inflate_s, mib / deflate_s, (before - after) / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build(guest=True)
    vmms = [("vireo", VIREO)]
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        vmms.append(("firecracker", fc))
    results = {k: [] for k, _ in vmms}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(args.runs):
            for kind, binary in vmms:
                results[kind].append(one(kind, binary, args.mib, d))
    print(f"balloon: {args.mib} MiB touched by the guest, then given and taken back; "
          f"medians of {args.runs} runs")
    print("| VMM | inflate MiB/s | deflate MiB/s | RSS released (MiB) |")
    print("|---|---:|---:|---:|")
    for kind, rs in results.items():
        med = [statistics.median(r[i] for r in rs) for i in range(3)]
        print(f"| {kind} | {med[0]:.0f} | {med[1]:.0f} | {med[2]:.1f} |")


if __name__ == "__main__":
    main()
