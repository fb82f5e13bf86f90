#!/usr/bin/env python3
"""Snapshot benchmark: create (Full, Diff) and load+resume latency, the memory file's disk use,
and clones per second from one snapshot, for vireo and Firecracker ($FIRECRACKER, default
../shared/peers/firecracker; empty leaves it out) side by side, runs interleaved. Cloud
Hypervisor ($CLOUD_HYPERVISOR, default ../shared/peers/cloud-hypervisor) is asked to snapshot the
same guest too, and its time or its error is printed.

The guest is vireo's test guest counting timer ticks (idle between ticks): the same ELF
image, command line, vCPU count and memory size in both VMMs.

    scripts/bench-snapshot.py [--runs N] [--sizes 128,1024,4096] [--clones N]

Create latency is the PUT /snapshot/create round trip on a paused VM; load+resume is the
PUT /snapshot/load (resume_vm) round trip in a fresh process whose API socket is up. A clone is
a new process restored from the snapshot until the guest's first serial byte after the
restore (an idle guest: vireo's wakes it at once with the VM generation ID's interrupt;
Firecracker's next timer tick, at most a second later, prints); clones per second is N clones
started at once divided by the time until the last of them printed.
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import UnixConnection, build, peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VIREO = os.path.join(ROOT, "target/release/vireo")
GUEST = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release/vireo-guest-pvh")
ARGS = "console=ttyS0 vireo.count=0 vireo.tickms=5"
# Clones: an idle guest (one tick a second) that a restore wakes at once through the VM
# generation ID's interrupt, printing its new ID.
CLONE_ARGS = "console=ttyS0 vireo.count=0 vireo.tickms=1000"


def req(sock, method, path, body=None):
    c = UnixConnection(sock)
    t = time.perf_counter()
    c.request(method, path, json.dumps(body) if body is not None else None,
              {"Content-Type": "application/json"})
    r = c.getresponse()
    data = r.read()
    dt = (time.perf_counter() - t) * 1e3
    c.close()
    if r.status >= 300:
        raise RuntimeError(f"{method} {path}: {r.status} {data!r}")
    return dt


def wait_socket(sock, proc):
    t0 = time.perf_counter()
    while True:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(sock)
            s.close()
            return
        except OSError:
            if proc.poll() is not None or time.perf_counter() - t0 > 10:
                raise RuntimeError("API socket never appeared")
            time.sleep(0.0005)


def spawn(kind, binary, sock, out):
    cmd = [binary, "--api-sock", sock]
    if kind == "firecracker":
        cmd += ["--level", "Error"]
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.DEVNULL)
    wait_socket(sock, p)
    return p


def wait_output(path, size, timeout=20):
    t0 = time.perf_counter()
    while os.path.getsize(path) <= size:
        if time.perf_counter() - t0 > timeout:
            with open(path, "rb") as f:
                tail = f.read()[-300:]
            raise RuntimeError(f"no guest output in {path}: {tail!r}")
        time.sleep(0.0005)


def wait_text(path, text, timeout=20):
    t0 = time.perf_counter()
    while True:
        if os.path.exists(path):
            with open(path, "rb") as f:
                if text in f.read():
                    return
        if time.perf_counter() - t0 > timeout:
            raise RuntimeError(f"no {text!r} in {path}")
        time.sleep(0.001)


def one(kind, binary, mib, d):
    """Boot, snapshot (Full, then Diff after a few ticks), restore once; return figures."""
    sock = os.path.join(d, "a.sock")
    out_path = os.path.join(d, "a.out")
    with open(out_path, "wb") as out:
        p = spawn(kind, binary, sock, out)
    try:
        req(sock, "PUT", "/boot-source", {"kernel_image_path": GUEST, "boot_args": ARGS})
        req(sock, "PUT", "/machine-config",
            {"vcpu_count": 1, "mem_size_mib": mib, "track_dirty_pages": True})
        req(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        wait_text(out_path, b"@tick n=2")
        req(sock, "PATCH", "/vm", {"state": "Paused"})
        # Other runs' dirty pages must not be flushed on this create's account (vireo syncs
        # its files; ext4 then waits for everything the journal holds).
        os.sync()
        full = req(sock, "PUT", "/snapshot/create",
                   {"snapshot_type": "Full", "snapshot_path": os.path.join(d, "full.state"),
                    "mem_file_path": os.path.join(d, "full.mem")})
        req(sock, "PATCH", "/vm", {"state": "Resumed"})
        time.sleep(0.1)
        req(sock, "PATCH", "/vm", {"state": "Paused"})
        os.sync()
        diff = req(sock, "PUT", "/snapshot/create",
                   {"snapshot_type": "Diff", "snapshot_path": os.path.join(d, "diff.state"),
                    "mem_file_path": os.path.join(d, "diff.mem")})
    finally:
        p.kill()
        p.wait()
    disk = os.stat(os.path.join(d, "full.mem")).st_blocks * 512
    diff_disk = os.stat(os.path.join(d, "diff.mem")).st_blocks * 512
    os.sync()
    sock2 = os.path.join(d, "b.sock")
    out2 = os.path.join(d, "b.out")
    with open(out2, "wb") as out:
        p = spawn(kind, binary, sock2, out)
    try:
        load = req(sock2, "PUT", "/snapshot/load",
                   {"snapshot_path": os.path.join(d, "full.state"),
                    "mem_backend": {"backend_type": "File",
                                    "backend_path": os.path.join(d, "full.mem")},
                    "resume_vm": True})
        wait_output(out2, 0)
    finally:
        p.kill()
        p.wait()
    return full, diff, load, disk / 2**20, diff_disk / 2**20


def cloud_hypervisor_create(ch, d):
    """Cloud Hypervisor's snapshot of the same guest: the create's time, or why it failed."""
    sock = os.path.join(d, "ch.sock")
    out = os.path.join(d, "ch.out")
    p = subprocess.Popen([ch, "--api-socket", f"path={sock}", "--kernel", GUEST, "--cmdline", ARGS,
                          "--memory", "size=128M", "--cpus", "boot=1", "--serial", f"file={out}",
                          "--console", "off"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, p)
        wait_text(out, b"@tick n=2")
        req(sock, "PUT", "/api/v1/vm.pause")
        snap = os.path.join(d, "ch-snapshot")
        os.makedirs(snap)
        try:
            return f"{req(sock, 'PUT', '/api/v1/vm.snapshot', {'destination_url': f'file://{snap}'}):.1f} ms"
        except RuntimeError as e:
            reason = str(e)
            for key in ("GetNestedState", "Cannot snapshot VM"):
                if key in reason:
                    reason = reason[reason.index(key):].split("\\n")[0]
                    break
            return f"fails: {reason[:160].rstrip(chr(92))}"
    finally:
        p.kill()
        p.wait()


def clones(kind, binary, d, n):
    """N restores from one snapshot started at once: clones per second until the last printed."""
    procs = []
    # Fresh socket and output paths each time: a killed Firecracker leaves its socket behind,
    # and refuses to start on an existing one.
    run = tempfile.mkdtemp(dir=d)
    t0 = time.perf_counter()
    outs = []
    for i in range(n):
        out = os.path.join(run, f"c{i}.out")
        outs.append(out)
        with open(out, "wb") as f:
            if kind == "vireo":
                procs.append(subprocess.Popen(
                    [binary, "restore", "--snapshot", os.path.join(d, "snapdir")],
                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.DEVNULL))
            else:
                sock = os.path.join(run, f"c{i}.sock")
                procs.append(subprocess.Popen(
                    [binary, "--api-sock", sock, "--level", "Error"],
                    stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.DEVNULL))
    try:
        if kind != "vireo":
            for i, p in enumerate(procs):
                sock = os.path.join(run, f"c{i}.sock")
                wait_socket(sock, p)
                req(sock, "PUT", "/snapshot/load",
                    {"snapshot_path": os.path.join(d, "snapdir", "state"),
                     "mem_backend": {"backend_type": "File",
                                     "backend_path": os.path.join(d, "snapdir", "memory")},
                     "resume_vm": True})
        for out in outs:
            wait_output(out, 0, timeout=60)
        wall = time.perf_counter() - t0
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        shutil.rmtree(run, ignore_errors=True)
    return n / wall


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sizes", default="128,1024,4096")
    ap.add_argument("--clones", type=int, default=50)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        build(guest=True)
    vmms = {"vireo": VIREO}
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        vmms["firecracker"] = fc
    sizes = [int(s) for s in args.sizes.split(",")]
    results = {(k, s): [] for k in vmms for s in sizes}
    base = tempfile.mkdtemp(prefix="vireo-bench-snap-", dir=os.environ.get("BENCH_DIR", "/var/tmp"))
    try:
        for _ in range(args.runs):
            for s in sizes:
                for kind, binary in vmms.items():
                    d = tempfile.mkdtemp(dir=base)
                    results[(kind, s)].append(one(kind, binary, s, d))
                    shutil.rmtree(d)
        print(f"Snapshot create and load+resume (ms), memory file disk use (MiB); medians of "
              f"{args.runs} runs, idle test guest, 1 vCPU\n")
        print("| VMM | guest MiB | create Full | create Diff | load+resume | Full file on disk | Diff file on disk |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        med = {}
        for (kind, s), rs in results.items():
            m = [statistics.median(r[i] for r in rs) for i in range(5)]
            med[(kind, s)] = m
            print(f"| {kind} | {s} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | {m[3]:.1f} | {m[4]:.1f} |")
        if "firecracker" in vmms:
            print()
            for s in sizes:
                v, f = med[("vireo", s)], med[("firecracker", s)]
                print(f"{s} MiB, vireo / Firecracker: create Full {v[0] / f[0]:.3f}x, "
                      f"create Diff {v[1] / f[1]:.2f}x, load+resume {v[2] / f[2]:.2f}x")
        ch = peer("CLOUD_HYPERVISOR", "cloud-hypervisor")
        if ch:
            d = tempfile.mkdtemp(dir=base)
            print(f"\nCloud Hypervisor, the same guest at 128 MiB, paused, vm.snapshot: "
                  f"{cloud_hypervisor_create(ch, d)}")
            shutil.rmtree(d)
        # Clones: one 128 MiB snapshot per VMM, N restored at once.
        print(f"\nClones per second: {args.clones} restores of one 128 MiB snapshot started at "
              f"once, until each guest's first serial byte (median of {args.runs})\n")
        print("| VMM | clones/s |")
        print("|---|---:|")
        for kind, binary in vmms.items():
            d = tempfile.mkdtemp(dir=base)
            sock = os.path.join(d, "a.sock")
            out_path = os.path.join(d, "a.out")
            with open(out_path, "wb") as out:
                p = spawn(kind, binary, sock, out)
            os.makedirs(os.path.join(d, "snapdir"))
            try:
                req(sock, "PUT", "/boot-source",
                    {"kernel_image_path": GUEST, "boot_args": CLONE_ARGS})
                req(sock, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128})
                req(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
                wait_text(out_path, b"@ticker start")
                time.sleep(0.2)
                req(sock, "PATCH", "/vm", {"state": "Paused"})
                req(sock, "PUT", "/snapshot/create",
                    {"snapshot_path": os.path.join(d, "snapdir", "state"),
                     "mem_file_path": os.path.join(d, "snapdir", "memory")})
            finally:
                p.kill()
                p.wait()
            rates = [clones(kind, binary, d, args.clones) for _ in range(args.runs)]
            print(f"| {kind} | {statistics.median(rates):.0f} |")
            shutil.rmtree(d)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
