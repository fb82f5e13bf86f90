#!/usr/bin/env python3
"""The Linux kit's costs on this host: building a root file system from a 100 MiB directory and
from a 3-layer OCI tarball (uncached, and found in the cache), the agent's round trip for `true`
over its Unix transport (through `vireo exec`, and beside spawning `true` locally), and the
agent's size. No peer has these tools, so figures stand alone.

    scripts/bench-kit.py [--runs N]
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import tarfile
import tempfile
import time

from benchlib import ROOT

MUSL = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release")


def timed(cmd, env=None):
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return (time.perf_counter() - t) * 1000


def tree(root, mib):
    """`mib` MiB in a realistic spread: 1000 small files, 100 medium, a few large."""
    os.makedirs(root)
    rnd = open("/dev/urandom", "rb")
    left = mib << 20
    for i in range(1000):
        d = os.path.join(root, f"usr/lib/pkg{i % 50}")
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"small{i}"), "wb") as f:
            f.write(rnd.read(4000))
        left -= 4000
    for i in range(100):
        with open(os.path.join(root, f"usr/lib/pkg{i % 50}/medium{i}"), "wb") as f:
            f.write(rnd.read(200_000))
        left -= 200_000
    for i in range(4):
        with open(os.path.join(root, f"big{i}"), "wb") as f:
            f.write(rnd.read(left // 4))


def oci_tarball(path, src_root):
    """The tree split into three layers (gzip, plain, gzip), as an OCI layout tarball."""
    entries = sorted(os.listdir(src_root))
    parts = [entries[0::3], entries[1::3], entries[2::3]]
    blobs, layers = {}, []
    for n, names in enumerate(parts):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name in names:
                t.add(os.path.join(src_root, name), arcname=name)
        data = buf.getvalue()
        media = "application/vnd.oci.image.layer.v1.tar"
        if n != 1:
            data = gzip.compress(data, compresslevel=1)
            media += "+gzip"
        digest = hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        layers.append({"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)})
    manifest = json.dumps({"schemaVersion": 2, "layers": layers,
                           "mediaType": "application/vnd.oci.image.manifest.v1+json"}).encode()
    md = hashlib.sha256(manifest).hexdigest()
    blobs[md] = manifest
    index = json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json",
         "digest": f"sha256:{md}", "size": len(manifest)}]}).encode()
    with tarfile.open(path, "w") as t:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for d, data in blobs.items():
            add(f"blobs/sha256/{d}", data)
        add("index.json", index)
        add("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')


def hw_virt():
    with open("/proc/cpuinfo") as f:
        return any(w in ("vmx", "svm") for line in f if line.startswith("flags")
                   for w in line.split())


def first_output(vireo, work, env, runs):
    """Where Linux boots: `vireo run --rootfs` (image cached) to the command's first byte."""
    kernel = os.environ.get("VIREO_KIT_KERNEL",
                            os.path.expanduser("~/.local/share/vireo/vmlinux"))
    busybox = os.environ.get("VIREO_BUSYBOX", "/bin/busybox")
    if not hw_virt():
        print("run --rootfs to first output byte: skipped (no vmx or svm in /proc/cpuinfo)")
        return
    if not (os.path.isfile(kernel) and os.path.isfile(busybox)):
        print(f"run --rootfs to first output byte: skipped (need {kernel} and {busybox})")
        return
    root = os.path.join(work, "bb")
    os.makedirs(os.path.join(root, "bin"))
    shutil.copy(busybox, os.path.join(root, "bin/busybox"))
    os.symlink("busybox", os.path.join(root, "bin/echo"))
    cmd = [vireo, "run", "--rootfs", root, "--kernel", kernel, "--", "echo", "hi"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)  # fills the cache
    first, total = [], []
    for _ in range(runs):
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env)
        p.stdout.read(1)
        first.append((time.perf_counter() - t) * 1000)
        p.wait()
        total.append((time.perf_counter() - t) * 1000)
    print(f"run --rootfs to first output byte: {statistics.median(first):.1f} ms; "
          f"to exit: {statistics.median(total):.1f} ms (median of {runs})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vireo"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "agent", "-p", "vireo", "--target",
                    "x86_64-unknown-linux-musl"], cwd=ROOT, check=True)
    vireo = os.path.join(ROOT, "target/release/vireo")
    agent = os.path.join(MUSL, "vireo-agent")
    work = tempfile.mkdtemp(prefix="vireo-bench-kit-")
    try:
        src = os.path.join(work, "root")
        tree(src, 100)
        tarball = os.path.join(work, "image.tar")
        oci_tarball(tarball, src)
        env = dict(os.environ, VIREO_AGENT=agent, XDG_CACHE_HOME=os.path.join(work, "cache"))
        results = {}
        for label, source in [("directory, 100 MiB", src), ("OCI tarball, 3 layers", tarball)]:
            uncached, cached = [], []
            for _ in range(args.runs):
                out = os.path.join(work, "out.ext4")
                uncached.append(timed([vireo, "rootfs", "build", source, "-o", out], env))
                os.remove(out)
                shutil.rmtree(os.path.join(work, "cache"), ignore_errors=True)
                timed([vireo, "rootfs", "build", source], env)  # fills the cache
                cached.append(timed([vireo, "rootfs", "build", source], env))
            results[label] = (statistics.median(uncached), statistics.median(cached))
            print(f"rootfs from {label}: uncached {results[label][0]:.0f} ms, "
                  f"cached {results[label][1]:.0f} ms (median of {args.runs})")

        sock = os.path.join(work, "agent.sock")
        p = subprocess.Popen([agent, "--listen", f"unix:{sock}"], stderr=subprocess.DEVNULL)
        try:
            for _ in range(500):
                try:
                    socket.socket(socket.AF_UNIX).connect(sock)
                    break
                except OSError:
                    time.sleep(0.01)
            for label, binary in [("glibc", vireo), ("static musl", os.path.join(MUSL, "vireo"))]:
                rt = [timed([binary, "exec", "--agent-socket", sock, "--", "true"])
                      for _ in range(50)]
                print(f"agent round trip for `true` (vireo exec, {label}, Unix transport): "
                      f"{statistics.median(rt):.2f} ms median")
            local = [timed(["/bin/true"]) for _ in range(50)]
            print(f"spawning /bin/true here: {statistics.median(local):.2f} ms")
        finally:
            p.kill()
        first_output(vireo, work, env, args.runs)
        size = os.path.getsize(agent)
        stripped = os.path.join(work, "agent.stripped")
        subprocess.run(["strip", "-o", stripped, agent], check=True)
        print(f"vireo-agent (static musl, release): {size} bytes, "
              f"{os.path.getsize(stripped)} stripped")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
