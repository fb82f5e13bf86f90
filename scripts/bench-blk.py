#!/usr/bin/env python3
"""virtio-blk benchmark: sequential read and write MiB/s with 1 MiB requests at queue depth 1 and
8, 4 KiB random-read IOPS at queue depth 8, and CPU seconds per GiB moved, for vireo, QEMU's microvm machine
(virtio-blk-device) and Firecracker ($FIRECRACKER, default ../shared/peers/firecracker; empty to
leave it out), driven by the same test guest (`vireo.blkbench`). QEMU runs with acpi=off so that
it announces its virtio-mmio devices on the kernel command line, as vireo and Firecracker do.
Cloud Hypervisor is left out: its devices are virtio-pci only, and the test guest drives
virtio-mmio.

The guest never touches the data, so the figures are the VMM's data path: notification,
request parsing, the host file I/O and the completion interrupt. The image is a 1 GiB sparse
file on tmpfs (/dev/shm) by default, so the host's storage does not dominate; --image-dir moves it.
CPU is the whole VMM process (all threads) from /proc/<pid>/task/*/schedstat, and the "VMM side"
leaves out the vCPU threads. Each VMM runs with its default block engine, and vireo and
Firecracker again with their io_uring engines (io_engine Async).

    scripts/bench-blk.py [--runs N] [--image-dir DIR] [--only 'vireo;vireo, Async;firecracker']
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchlib import build, only_rows, peer, process_cpu_ns

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release")
VIREO = os.path.join(ROOT, "target/release/vireo")
GIB = 1 << 30


def commands(image, tmp):
    cmds = {
        "vireo": [VIREO, "run", "--kernel", os.path.join(IMAGES, "vireo-guest-elf"),
                  "--memory", "256", "--serial", "stdio", "--cmdline", "vireo.blkbench",
                  "--drive", f"path={image}"],
        # The io_uring engine (Firecracker's io_engine "Async").
        "vireo, Async": [VIREO, "run", "--kernel", os.path.join(IMAGES, "vireo-guest-elf"),
                         "--memory", "256", "--serial", "stdio", "--cmdline", "vireo.blkbench",
                         "--drive", f"path={image},io_engine=async"],
        # seccomp filters on (the default) against off.
        "vireo --no-seccomp": [VIREO, "--no-seccomp", "run", "--kernel",
                               os.path.join(IMAGES, "vireo-guest-elf"), "--memory", "256",
                               "--serial", "stdio", "--cmdline", "vireo.blkbench",
                               "--drive", f"path={image}"],
        # Rate limiters: measured throughput against the configured rate.
        "vireo, bw limit 256 MiB/s": [VIREO, "run", "--kernel",
                                      os.path.join(IMAGES, "vireo-guest-elf"), "--memory", "256",
                                      "--serial", "stdio", "--cmdline", "vireo.blkbench",
                                      "--drive", f"path={image},bw=33554432/125"],
        "vireo, ops limit 5000/s": [VIREO, "run", "--kernel",
                                    os.path.join(IMAGES, "vireo-guest-elf"), "--memory", "256",
                                    "--serial", "stdio", "--cmdline", "vireo.blkbench",
                                    "--drive", f"path={image},ops=500/100"],
        "qemu-microvm": ["qemu-system-x86_64", "-M",
                         "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,ioapic2=off,acpi=off",
                         "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1",
                         "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                         "-monitor", "none", "-kernel", os.path.join(IMAGES, "vireo-guest-pvh"),
                         "-append", "vireo.blkbench",
                         "-global", "virtio-mmio.force-legacy=false",
                         "-drive", f"id=d0,if=none,file={image},format=raw",
                         "-device", "virtio-blk-device,drive=d0",
                         "-device", "isa-debug-exit,iobase=0x501,iosize=1"],
    }
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        # The same limits as vireo's limited rows, in Firecracker's own rate limiter.
        limits = {"": (None, "Sync"),
                  ", Async": (None, "Async"),
                  ", bw limit 256 MiB/s": ({"bandwidth": {"size": 33554432, "refill_time": 125}}, "Sync"),
                  ", ops limit 5000/s": ({"ops": {"size": 500, "refill_time": 100}}, "Sync")}
        for n, (suffix, (limit, engine)) in enumerate(limits.items()):
            drive = {"drive_id": "d0", "path_on_host": image, "is_root_device": False,
                     "is_read_only": False, "io_engine": engine}
            if limit:
                drive["rate_limiter"] = limit
            cfg = os.path.join(tmp, f"fc{n}.json")
            with open(cfg, "w") as f:
                # Firecracker has no debug-exit port: the guest ends with the i8042 reset.
                json.dump({"boot-source": {"kernel_image_path": os.path.join(IMAGES, "vireo-guest-pvh"),
                                           "boot_args": "vireo.blkbench vireo.end=reset"},
                           "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                           "drives": [drive]}, f)
            cmds["firecracker" + suffix] = [fc, "--no-api", "--config-file", cfg, "--level",
                                            "Error", "--log-path", os.path.join(tmp, "fc.log")]
    return cmds


PHASES = ["seqread", "seqwrite", "seqread8", "seqwrite8", "randread"]


def one_run(cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, bufsize=0)
    phases = {}
    starts = {}
    buf = b""
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("@bench "):
                continue
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            name = fields.get("phase")
            if line.endswith(" start"):
                starts[name] = (now, process_cpu_ns(p.pid), process_cpu_ns(p.pid, True))
            elif " end" in line and name in starts:
                t0, c0, h0 = starts[name]
                if fields.get("errors") != "0":
                    raise RuntimeError(f"{cmd[0]}: {line}")
                phases[name] = {
                    "seconds": now - t0,
                    "cpu_s": (process_cpu_ns(p.pid) - c0) / 1e9,
                    "host_cpu_s": (process_cpu_ns(p.pid, True) - h0) / 1e9,
                    "bytes": int(fields["bytes"]),
                    "requests": int(fields["requests"]),
                }
            elif "error" in line:
                raise RuntimeError(f"{cmd[0]}: {line}")
    p.wait()
    if len(phases) != len(PHASES):
        raise RuntimeError(f"{cmd[0]}: incomplete run (exit {p.returncode}), phases {list(phases)}")
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--image-dir", default="/dev/shm" if os.path.isdir("/dev/shm") else "/tmp")
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", help="row names to run, separated by semicolons (default: all)")
    args = ap.parse_args()
    if not args.no_build:
        build(guest=True)
    image = os.path.join(args.image_dir, f"vireo-bench-{os.getpid()}.img")
    with open(image, "wb") as f:
        f.truncate(GIB)
    tmp = tempfile.TemporaryDirectory()
    try:
        cmds = commands(image, tmp.name)
        cmds = only_rows(cmds, args.only)
        results = {n: [] for n in cmds}
        for i in range(args.runs):
            # Alternate the order, and start each run from an empty sparse image so every VMM
            # pays for the same page allocation on write.
            order = list(cmds.items()) if i % 2 == 0 else list(reversed(cmds.items()))
            for n, cmd in order:
                with open(image, "wb") as f:
                    f.truncate(GIB)
                results[n].append(one_run(cmd))
    finally:
        os.unlink(image)
        tmp.cleanup()
    print(f"virtio-blk, 1 GiB image in {args.image_dir}; medians of {args.runs} runs\n")
    print("CPU is the whole process; 'VMM side' leaves out the vCPU threads, whose time is mostly")
    print("the guest's (its kernel code is emulated on this host). QD1 / QD8: requests in flight.\n")
    print("| VMM | seq read MiB/s QD1 / QD8 | seq write MiB/s QD1 / QD8 | 4K rand read IOPS (QD8) "
          "| CPU s/GiB read / write (QD1) | CPU µs/IO rand | VMM side s/GiB read / write QD1 "
          "| VMM side s/GiB read / write QD8 | VMM side µs/IO rand |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, runs in results.items():
        def med(phase, f):
            return statistics.median(f(r[phase]) for r in runs)

        def rate(phase):
            return med(phase, lambda p: p["bytes"] / p["seconds"] / (1 << 20))

        def per_gib(phase, key):
            return med(phase, lambda p: p[key] / (p["bytes"] / GIB))

        iops = med("randread", lambda p: p["requests"] / p["seconds"])
        cio = med("randread", lambda p: p["cpu_s"] / p["requests"] * 1e6)
        hio = med("randread", lambda p: p["host_cpu_s"] / p["requests"] * 1e6)
        print(f"| {n} | {rate('seqread'):.0f} / {rate('seqread8'):.0f} "
              f"| {rate('seqwrite'):.0f} / {rate('seqwrite8'):.0f} | {iops:.0f} "
              f"| {per_gib('seqread', 'cpu_s'):.3f} / {per_gib('seqwrite', 'cpu_s'):.3f} | {cio:.1f} "
              f"| {per_gib('seqread', 'host_cpu_s'):.3f} / {per_gib('seqwrite', 'host_cpu_s'):.3f} "
              f"| {per_gib('seqread8', 'host_cpu_s'):.3f} / {per_gib('seqwrite8', 'host_cpu_s'):.3f} "
              f"| {hio:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
