#!/usr/bin/env python3
"""virtio-net benchmark: guest->host and host->guest throughput with 64-byte, 1500-byte and
64 KiB (TSO) frames, for vireo, QEMU microvm's virtio-net-device and Firecracker
($FIRECRACKER, default ../shared/peers/firecracker; empty to leave it out), each on its own TAP
in a private network namespace, runs interleaved.

    scripts/bench-net.py [--runs N] [--count N]

The test guest (`vireo.netbench`) sends `count` frames from one prepared buffer to a MAC nobody
has (the host kernel drops them on arrival), then counts what the host sends it without reading
the payload. The host sends with an AF_PACKET socket on the TAP (64 KiB frames as TCP segments
with a virtio-net header, PACKET_VNET_HDR). Times come from the guest's `@bench` lines as they
arrive; CPU is the whole VMM process (every thread, vCPU included) from
/proc/<pid>/task/*/schedstat, and the VMM's own threads alone (without the vCPU threads, which
KVM charges with the guest's execution); exits and interrupts are the guest's own counts of queue
notifications (one MMIO exit each) and virtio interrupts.
"""

import argparse
import os
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

from benchlib import ROOT, build, peer, process_cpu_ns, thread_cpu_ns

IMAGES = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release")
VIREO = os.path.join(ROOT, "target/release/vireo")
GUEST_MAC = "02:00:00:00:00:02"
SIZES = [64, 1500, 65000]


def guest_args(size, count, end):
    return (f"vireo.nettest vireo.netbench vireo.netbenchsize={size} "
            f"vireo.netbenchcount={count} vireo.end={end}")


def commands(tmp, size, count):
    pvh = os.path.join(IMAGES, "vireo-guest-pvh")
    cmds = {
        "vireo": [VIREO, "run", "--kernel", pvh, "--memory", "256", "--serial", "stdio",
                  "--net", f"tap=tapv,mac={GUEST_MAC}",
                  "--cmdline", guest_args(size, count, "poweroff")],
        "qemu-microvm": ["qemu-system-x86_64", "-M",
                         "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on,ioapic2=off,acpi=off",
                         "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "256", "-smp", "1",
                         "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                         "-monitor", "none", "-name", "bench,debug-threads=on", "-kernel", pvh,
                         "-append", guest_args(size, count, "poweroff"),
                         "-global", "virtio-mmio.force-legacy=false",
                         "-netdev", "tap,id=n0,ifname=tapq,script=no,downscript=no,vhost=off",
                         "-device", f"virtio-net-device,netdev=n0,mac={GUEST_MAC}",
                         "-device", "isa-debug-exit,iobase=0x501,iosize=1"],
    }
    if size == 1500:
        # Rate limiters: measured throughput against the configured 10 MB/s each way.
        cmds["vireo, 10 MB/s limit"] = [
            VIREO, "run", "--kernel", pvh, "--memory", "256", "--serial", "stdio",
            "--net", f"tap=tapl,mac={GUEST_MAC},rx_bw=1000000/100,tx_bw=1000000/100",
            "--cmdline", guest_args(size, count, "poweroff")]
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        import json
        cfg = os.path.join(tmp, f"fc-{size}.json")
        with open(cfg, "w") as f:
            json.dump({"boot-source": {"kernel_image_path": pvh,
                                       "boot_args": guest_args(size, count, "reset")},
                       "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                       "drives": [],
                       "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tapf",
                                               "guest_mac": GUEST_MAC}]}, f)
        cmds["firecracker"] = [fc, "--no-api", "--config-file", cfg, "--level", "Error",
                               "--log-path", os.path.join(tmp, "fc.log")]
        if size == 1500:
            # The same 10 MB/s each way, in Firecracker's own rate limiter.
            limit = {"bandwidth": {"size": 1000000, "refill_time": 100}}
            cfg = os.path.join(tmp, f"fcl-{size}.json")
            with open(cfg, "w") as f:
                json.dump({"boot-source": {"kernel_image_path": pvh,
                                           "boot_args": guest_args(size, count, "reset")},
                           "machine-config": {"vcpu_count": 1, "mem_size_mib": 256},
                           "drives": [],
                           "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tapm",
                                                   "guest_mac": GUEST_MAC,
                                                   "rx_rate_limiter": limit,
                                                   "tx_rate_limiter": limit}]}, f)
            cmds["firecracker, 10 MB/s limit"] = [fc, "--no-api", "--config-file", cfg,
                                                  "--level", "Error", "--log-path",
                                                  os.path.join(tmp, "fcl.log")]
    return cmds


TAPS = {"vireo": "tapv", "qemu-microvm": "tapq", "firecracker": "tapf",
        "vireo, 10 MB/s limit": "tapl", "firecracker, 10 MB/s limit": "tapm"}


def mac(s):
    return bytes(int(p, 16) for p in s.split(":"))


def blast(tap, size, count, stop):
    """Sends frames to the guest as fast as one Python thread can until `count` or `stop`."""
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    tso = size > 1514
    if tso:
        s.setsockopt(263, 15, 1)  # SOL_PACKET, PACKET_VNET_HDR
    s.bind((tap, 0))
    eth = mac(GUEST_MAC) + mac("02:00:00:00:99:98") + b"\x08\x00"
    ip_len = max(size - 14, 40)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, min(ip_len, 65535), 0, 0x4000, 64, 6, 0,
                     bytes([10, 0, 0, 99]), bytes([10, 0, 0, 2]))
    tcp = struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 5 << 4, 0x10, 65535, 0, 0)
    frame = eth + ip + tcp + bytes(max(size - 54, 0))
    if tso:
        # virtio_net_hdr: NEEDS_CSUM, GSO_TCPV4, hdr_len, gso_size, csum_start, csum_offset.
        frame = struct.pack("<BBHHHH", 1, 1, 54, 1448, 34, 16) + frame
    sent = 0
    while sent < count and not stop.is_set():
        try:
            s.send(frame)
            sent += 1
        except OSError:
            time.sleep(0.0001)
    return sent


def one_run(name, cmd, size, count):
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, bufsize=0)
    phases, starts = {}, {}
    buf = b""
    stop = threading.Event()
    sender = None
    deadline = time.perf_counter() + 300
    while time.perf_counter() < deadline:
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        now = time.perf_counter()
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace").strip()
            if line.startswith("@net error") or line.startswith("@error"):
                raise RuntimeError(f"{name}: {line}")
            if not line.startswith("@bench "):
                continue
            fields = dict(kv.split("=", 1) for kv in line.split()[1:] if "=" in kv)
            phase = fields.get("phase")
            if line.endswith(" start"):
                starts[phase] = (now, process_cpu_ns(p.pid), thread_cpu_ns(p.pid))
                if phase == "rx":
                    sender = threading.Thread(target=blast, args=(TAPS[name], size, count, stop))
                    sender.start()
            elif " end" in line and phase in starts:
                t0, c0, d0 = starts[phase]
                cpu = (process_cpu_ns(p.pid) - c0) / 1e9
                dev = (thread_cpu_ns(p.pid) - d0) / 1e9
                seconds = now - t0
                if phase == "rx":
                    stop.set()
                    seconds -= 0.5  # the guest waits half a second of silence to end
                phases[phase] = {
                    "seconds": seconds, "cpu_s": cpu, "dev_s": dev,
                    "frames": int(fields["frames"]), "bytes": int(fields["bytes"]),
                    "events": int(fields["notifies"]) + int(fields["irqs"]),
                }
    stop.set()
    if sender:
        sender.join()
    try:
        p.wait(timeout=20)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    if len(phases) != 2:
        raise RuntimeError(f"{name}: incomplete run (exit {p.returncode}), phases {list(phases)}")
    return phases


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--count", type=int, default=20000)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not args.inside:
        if not args.no_build:
            build(guest=True)
        # Everything runs in a private network namespace: its TAPs and frames stay there.
        os.execvp("unshare", ["unshare", "--net", sys.executable, os.path.abspath(__file__),
                              "--inside", "--runs", str(args.runs), "--count", str(args.count)])
    subprocess.run("ip link set lo up", shell=True, check=True)
    for tap in TAPS.values():
        subprocess.run(f"ip tuntap add {tap} mode tap && ip link set {tap} txqueuelen 10000 up",
                       shell=True, check=True)
    import tempfile
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            cmds = commands(tmp, size, args.count)
            for i in range(args.runs):
                order = list(cmds.items()) if i % 2 == 0 else list(reversed(cmds.items()))
                for name, cmd in order:
                    try:
                        r = one_run(name, cmd, size, args.count)
                    except RuntimeError as e:
                        print(f"({e})", file=sys.stderr)
                        continue
                    results.setdefault((name, size), []).append(r)
    print(f"virtio-net on a TAP, {args.count} frames each way per run; medians of {args.runs} runs\n")
    print("| VMM | frame | direction | MB/s | kframes/s | CPU s/GiB (all) | CPU µs/frame (all) "
          "| VMM-only CPU s/GiB | VMM-only µs/frame | exits+irqs/frame | frames delivered |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for (name, size), runs in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        for phase, label in (("tx", "guest→host"), ("rx", "host→guest")):
            def med(f):
                return statistics.median(f(r[phase]) for r in runs)
            mbs = med(lambda p: p["bytes"] / p["seconds"] / 1e6)
            kfs = med(lambda p: p["frames"] / p["seconds"] / 1e3)
            gib = med(lambda p: p["cpu_s"] / max(p["bytes"], 1) * (1 << 30))
            us = med(lambda p: p["cpu_s"] / max(p["frames"], 1) * 1e6)
            dgib = med(lambda p: p["dev_s"] / max(p["bytes"], 1) * (1 << 30))
            dus = med(lambda p: p["dev_s"] / max(p["frames"], 1) * 1e6)
            ev = med(lambda p: p["events"] / max(p["frames"], 1))
            got = med(lambda p: p["frames"])
            # The guest powers off right after its last line: a vCPU thread that already left
            # takes its CPU time with it, so a negative difference means "not measurable".
            def fmt(v, digits):
                return f"{v:.{digits}f}" if v >= 0 else "n/a"
            print(f"| {name} | {size} | {label} | {mbs:.0f} | {kfs:.1f} | {fmt(gib, 2)} | {fmt(us, 1)} "
                  f"| {fmt(dgib, 3)} | {fmt(dus, 2)} | {ev:.2f} | {got:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
