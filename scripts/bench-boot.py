#!/usr/bin/env python3
"""Boot benchmark: exec to first serial byte, exec to exit, CPU time and peak RSS.

The guest is vireo's test guest (PVH image) with `vireo.firstbyte`: it writes one byte on COM1
and powers off at once. 128 MiB, 1 vCPU. Rows named "100 ms guest" run the guest's banner and
two 25 ms ticks before it ends instead; for them the figure that counts is the last byte to
exit (the teardown of a VM that was not just started). Every VMM boots the same image in the same run,
interleaved, and the figures are medians over --runs boots.

Peers: QEMU's microvm machine (qemu-system-x86_64, always), Firecracker ($FIRECRACKER) and
Cloud Hypervisor ($CLOUD_HYPERVISOR; default: ../shared/peers/, empty to leave one out). Needs GNU time
(/usr/bin/time, Debian package `time`) and python3.

    scripts/bench-boot.py [--runs N] [--only 'vireo (ELF 64-bit entry);firecracker']
                          [--baseline OLD-VIREO-BINARY]

--baseline adds a "baseline" row beside each ELF-entry vireo row, run by another vireo binary
(say, one built from an earlier commit): a before/after in one run. A baseline built before
`--pit` existed had the PIT by default: its rows named `--pit` run it without the flag.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from benchlib import build, only_rows, peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGES = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release")
GUEST = os.path.join(IMAGES, "vireo-guest-pvh")
GUEST_ELF = os.path.join(IMAGES, "vireo-guest-elf")
VIREO = os.path.join(ROOT, "target/release/vireo")
# The same vireo as a static musl binary: no dynamic loader and a much smaller libc resident.
VIREO_MUSL = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/vireo")
CMDLINE = "vireo.firstbyte"
# A guest that lives about 100 ms (the test guest's ticker: two 25 ms ticks after its banner),
# then ends the way each VMM takes: what teardown costs a VM that was not started a moment ago.
LONG = "vireo.count=2 vireo.tickms=25"
LONG_ROW = " 100 ms guest"


def build_all():
    subprocess.run(["rustup", "target", "add", "x86_64-unknown-linux-musl"], cwd=ROOT,
                   check=False, capture_output=True)
    build(guest=True, musl=True)


def baseline_knows_pit(binary):
    out = subprocess.run([binary, "run", "--help"], capture_output=True, text=True).stdout
    return "--pit " in out


def vmm_commands(tmp, baseline=None):
    cmds = {
        "vireo (PVH)": [VIREO, "run", "--kernel", GUEST, "--memory", "128", "--cpus", "1",
                        "--serial", "stdio", "--cmdline", CMDLINE],
        # The same guest as an ELF entered in long mode: no 32-bit start-up code to run.
        "vireo musl (ELF 64-bit entry)": [VIREO_MUSL, "run", "--kernel", GUEST_ELF, "--memory",
                                          "128", "--cpus", "1", "--serial", "stdio",
                                          "--cmdline", CMDLINE],
        "vireo (ELF 64-bit entry)": [VIREO, "run", "--kernel", GUEST_ELF, "--memory", "128",
                                     "--cpus", "1", "--serial", "stdio", "--cmdline", CMDLINE],
        # -cpu host minus arch-capabilities: nested KVM hosts refuse that MSR.
        "qemu-microvm (PVH)": ["qemu-system-x86_64", "-M",
                         "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on",
                         "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-smp", "1",
                         "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                         "-monitor", "none", "-kernel", GUEST, "-append", CMDLINE,
                         "-device", "isa-debug-exit,iobase=0x501,iosize=1"],
    }
    # seccomp filters on (the default) against off, on the same binaries.
    cmds["vireo (ELF 64-bit entry) --no-seccomp"] = [VIREO, "--no-seccomp"] + cmds["vireo (ELF 64-bit entry)"][1:]
    # With KVM's in-kernel PIT (vireo leaves it out unless asked), whose teardown waits out a
    # normal SRCU grace period at every exit.
    cmds["vireo (ELF 64-bit entry) --pit"] = cmds["vireo (ELF 64-bit entry)"] + ["--pit"]
    # A 4 GiB guest: what memory size adds to the first byte (KVM's memory-slot set-up).
    cmds["vireo (ELF 64-bit entry) 4 GiB"] = [
        "4096" if a == "128" else a for a in cmds["vireo (ELF 64-bit entry)"]]
    cmds["vireo musl (ELF 64-bit entry) --no-seccomp"] = (
        [VIREO_MUSL, "--no-seccomp"] + cmds["vireo musl (ELF 64-bit entry)"][1:])
    # vireo ends on the power port (the guest's default), without and with the PIT.
    for name in ("vireo (ELF 64-bit entry)", "vireo (ELF 64-bit entry) --pit"):
        cmds[name + LONG_ROW] = [LONG if a == CMDLINE else a for a in cmds[name]]
    if baseline:
        knows_pit = baseline_knows_pit(baseline)
        for name in [n for n in cmds if n.startswith("vireo (ELF 64-bit entry)")]:
            old = [a for a in cmds[name][1:] if a != "--pit" or knows_pit]
            cmds[name.replace("vireo", "baseline", 1)] = [baseline] + old
    if not os.path.exists(VIREO_MUSL):
        cmds = {k: v for k, v in cmds.items() if "musl" not in k}
    # The harness's own floor: spawning GNU time and a program that prints one byte.
    cmds["floor (printf !)"] = ["/usr/bin/printf", "!"]
    fc = peer("FIRECRACKER", "firecracker")
    if fc:
        for name, mib, args in (("firecracker", 128, CMDLINE),
                                ("firecracker 4 GiB", 4096, CMDLINE),
                                ("firecracker" + LONG_ROW, 128, LONG + " vireo.end=reset")):
            cfg = os.path.join(tmp, f"fc{len(cmds)}.json")
            with open(cfg, "w") as f:
                json.dump({"boot-source": {"kernel_image_path": GUEST, "boot_args": args},
                           "machine-config": {"vcpu_count": 1, "mem_size_mib": mib},
                           "drives": []}, f)
            cmds[name] = [fc, "--no-api", "--config-file", cfg, "--level", "Error"]
    ch = peer("CLOUD_HYPERVISOR", "cloud-hypervisor")
    if ch:
        for name, size, args in (("cloud-hypervisor", "128M", CMDLINE),
                                 ("cloud-hypervisor 4 GiB", "4096M", CMDLINE),
                                 ("cloud-hypervisor" + LONG_ROW, "128M", LONG + " vireo.end=acpi-off")):
            cmds[name] = [ch, "--kernel", GUEST, "--cmdline", args,
                          "--memory", f"size={size}", "--cpus", "boot=1",
                          "--serial", "tty", "--console", "off"]
    return cmds


def one_boot(cmd, tmp, expect):
    # GNU time is the parent that reports CPU time and peak RSS: a child forked from this
    # Python process would carry Python's own RSS into its ru_maxrss across exec.
    usage = os.path.join(tmp, "usage")
    t0 = time.perf_counter()
    p = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", usage] + cmd,
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    first = last = None
    data = b""
    # A VMM that cannot end the guest would hang the whole run: give it 20 s.
    killer = threading.Timer(20, p.kill)
    killer.start()
    while True:
        chunk = os.read(p.stdout.fileno(), 4096)
        if chunk:
            last = time.perf_counter()
            first = first or last
        if not chunk:
            break
        data += chunk
    _, status, ru = os.wait4(p.pid, 0)
    end = time.perf_counter()
    killer.cancel()
    if end - t0 > 19:
        raise RuntimeError(f"{cmd[0]}: did not end within 20 s")
    p.returncode = os.waitstatus_to_exitcode(status)
    if expect not in data:
        raise RuntimeError(f"{cmd[0]}: the guest did not finish (exit {p.returncode})")
    with open(usage) as f:
        maxrss_kib = f.read().split()[-1]
    return {
        "first_ms": (first - t0) * 1e3,
        "exit_ms": (end - t0) * 1e3,
        # From the guest's last byte to the VMM's exit as its parent sees it.
        "teardown_ms": (end - last) * 1e3,
        # wait4 on GNU time covers the VMM it reaped (plus time's own ~0.5 ms).
        "cpu_ms": (ru.ru_utime + ru.ru_stime) * 1e3,
        "rss_mib": int(maxrss_kib) / 1024,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--no-build", action="store_true")
    ap.add_argument("--only", help="row names to run, separated by semicolons (default: all)")
    ap.add_argument("--baseline", help="another vireo binary, run beside the ELF-entry rows")
    args = ap.parse_args()
    if not args.no_build:
        build_all()
    with tempfile.TemporaryDirectory() as tmp:
        cmds = vmm_commands(tmp, args.baseline)
        cmds = only_rows(cmds, args.only)
        results = {name: [] for name in cmds}
        for _ in range(args.runs):
            for name, cmd in cmds.items():
                expect = b"@end" if name.endswith(LONG_ROW) else b"!"
                results[name].append(one_boot(cmd, tmp, expect))
    med = {n: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for n, rs in results.items()}
    print(f"boot to first serial byte, 128 MiB unless named, 1 vCPU; medians of {args.runs} runs\n")
    print("| VMM | first byte (ms) | exit (ms) | last byte to exit (ms) | CPU (ms) | peak RSS (MiB) |")
    print("|---|---:|---:|---:|---:|---:|")
    for n, m in med.items():
        print(f"| {n} | {m['first_ms']:.1f} | {m['exit_ms']:.1f} | {m['teardown_ms']:.1f} "
              f"| {m['cpu_ms']:.1f} | {m['rss_mib']:.2f} |")
    med = {n: m for n, m in med.items() if not n.endswith(LONG_ROW)}
    peers = [n for n in med if not n.startswith(("vireo", "floor", "baseline"))]
    if peers:
        best = min(peers, key=lambda n: med[n]["first_ms"])
        for mine in (n for n in med if n.startswith("vireo")):
            v = med[mine]
            print(f"\n{mine} / {best} (fastest peer here): first byte "
                  f"{v['first_ms'] / med[best]['first_ms']:.2f}x, "
                  f"exit {v['exit_ms'] / med[best]['exit_ms']:.2f}x, "
                  f"CPU {v['cpu_ms'] / max(med[best]['cpu_ms'], 1e-9):.2f}x, "
                  f"peak RSS {v['rss_mib'] / med[best]['rss_mib']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
