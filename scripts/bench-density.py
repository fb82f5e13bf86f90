#!/usr/bin/env python3
"""Density benchmark: how many idle VMs this host holds at once, and what each costs.

Each VM is vireo's test guest (PVH image) that halts in `hlt` at once (`vireo.end=hang`), with
1 vCPU and 16 MiB, its serial output in a file. The script starts N VMs of one VMM one after
another, waits until every guest has reported (`@end hang`), reads the host's memory figures,
then stops them all, and goes on to the next VMM. Per-VM cost is the drop in MemAvailable
divided by N (everything the host spent: the process, its page tables, KVM's kernel memory),
with the parts of it that /proc/meminfo breaks out (anonymous pages, page tables, kernel
stacks, unreclaimable slab, per-CPU) and the mean PSS of the processes.

VMMs: Cloud Hypervisor ($CLOUD_HYPERVISOR, default ../shared/peers/cloud-hypervisor, without
an API socket), vireo (static musl build) without an API socket and with one, with --pit,
non-PIE, and with
`--memory 16,merge=on` while the kernel's same-page merging runs (KSM is switched on, fast, for
that run only, everything unmerged after, and the host's settings restored), Firecracker
($FIRECRACKER, default ../shared/peers/firecracker, with --no-api and with an API socket) and
QEMU's microvm machine (qemu-system-x86_64). Needs root (it raises kernel.pid_max for the run
and restores it).

    scripts/bench-density.py [--vireo N] [--vireo-api N] [--pit N] [--firecracker N] [--qemu N]
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import build, peer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GUEST = os.path.join(ROOT, "guest/target/x86_64-unknown-none/release/vireo-guest-pvh")
VIREO = os.path.join(ROOT, "target/x86_64-unknown-linux-musl/release/vireo")
CMDLINE = "console=ttyS0 vireo.end=hang"
MEM_MIB = 16
FIELDS = ["MemAvailable", "AnonPages", "PageTables", "SecPageTables", "KernelStack", "SUnreclaim",
          "VmallocUsed", "Percpu"]
# What a VM costs the host, summed from the parts /proc/meminfo breaks out.
PARTS = ["AnonPages", "PageTables", "SecPageTables", "KernelStack", "SUnreclaim", "VmallocUsed",
         "Percpu"]
# The same vireo built as a non-PIE static executable (no start-up relocations, so its data
# pages stay shared between processes; its code sits at a fixed address): --nopie N.
VIREO_NOPIE = os.path.join(ROOT, "target/nopie/x86_64-unknown-linux-musl/release/vireo")


def meminfo():
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            k, v = line.split(":", 1)
            out[k] = int(v.split()[0])
    return out


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def command(vmm, tmp, i):
    serial = os.path.join(tmp, f"serial{i}")
    if vmm in ("vireo", "vireo-nopie", "vireo-merge", "vireo-nopie-merge", "vireo-pit"):
        binary = VIREO_NOPIE if "nopie" in vmm else VIREO
        memory = f"{MEM_MIB},merge=on" if vmm.endswith("merge") else str(MEM_MIB)
        extra = ["--pit"] if vmm == "vireo-pit" else []
        return [binary, "run", "--kernel", GUEST, "--memory", memory, "--serial",
                f"file:{serial}", "--cmdline", CMDLINE] + extra, serial, None
    if vmm == "vireo-api":
        sock = os.path.join(tmp, f"api{i}.sock")
        cfg = os.path.join(tmp, "vireo.json")
        return [VIREO, "--api-sock", sock, "--config-file", cfg], serial, sock
    if vmm.startswith("firecracker"):
        cfg = os.path.join(tmp, "fc.json")
        if vmm == "firecracker-api":
            sock = os.path.join(tmp, f"fc{i}.sock")
            return [FC, "--api-sock", sock, "--config-file", cfg, "--level", "Error"], serial, sock
        return [FC, "--no-api", "--config-file", cfg, "--level", "Error"], serial, None
    if vmm == "cloud-hypervisor":
        # No API socket: Cloud Hypervisor serves its API only when asked for one.
        return [CH, "--kernel", GUEST, "--cmdline", CMDLINE, "--memory", f"size={MEM_MIB}M",
                "--cpus", "boot=1", "--serial", f"file={serial}", "--console", "off"], serial, None
    if vmm == "qemu":
        return ["qemu-system-x86_64", "-M",
                "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on",
                "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", str(MEM_MIB), "-smp", "1",
                "-nodefaults", "-no-user-config", "-display", "none", "-serial", f"file:{serial}",
                "-monitor", "none", "-kernel", GUEST, "-append", CMDLINE], serial, None
    raise ValueError(vmm)


def write_configs(tmp):
    boot = {"boot-source": {"kernel_image_path": GUEST, "boot_args": CMDLINE},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": MEM_MIB}}
    with open(os.path.join(tmp, "fc.json"), "w") as f:
        json.dump(dict(boot, drives=[]), f)
    # vireo with an API socket, booted from the same config file; its serial port goes to a
    # file per VM through PUT /serial's file, which a config file cannot vary per VM, so the
    # guests' output goes to stdout, redirected to the per-VM file.
    with open(os.path.join(tmp, "vireo.json"), "w") as f:
        json.dump(boot, f)


def reported(serial):
    try:
        with open(serial, "rb") as f:
            return b"@end hang" in f.read()
    except OSError:
        return False


class Proc:
    """A VMM started with posix_spawn: its pid, and its exit status once reaped."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self):
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode


KSM = "/sys/kernel/mm/ksm"


def ksm(name, value=None):
    path = os.path.join(KSM, name)
    if value is None:
        with open(path) as f:
            return f.read().strip()
    with open(path, "w") as f:
        f.write(str(value))
    return None


def ksm_settle():
    """Waits until KSM has scanned every mergeable page twice since now (a page merges on the
    scan after the one that saw it unchanged)."""
    start = int(ksm("full_scans"))
    deadline = time.time() + 300
    while int(ksm("full_scans")) < start + 3 and time.time() < deadline:
        time.sleep(0.5)


def run(vmm, n, tmp):
    base = meminfo()
    procs = []
    serials = []
    t0 = time.perf_counter()
    failed = None
    for i in range(n):
        cmd, serial, _ = command(vmm, tmp, i)
        # posix_spawn (vfork and exec) in a new session, stdout to the VM's serial file when
        # the VMM writes its guest's output there: Python's Popen would cost the harness more
        # than vireo's own start-up.
        actions = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                   (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
        if vmm in ("vireo-api", "firecracker", "firecracker-api"):
            actions.append((os.POSIX_SPAWN_OPEN, 1, serial,
                            os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644))
        else:
            actions.append((os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0))
        try:
            pid = os.posix_spawnp(cmd[0], cmd, os.environ, file_actions=actions, setsid=True)
        except OSError as e:
            failed = f"VM {i}: {e}"
            break
        procs.append(Proc(pid))
        serials.append(serial)
    spawn_s = time.perf_counter() - t0
    # Every guest has reported, or some VMM ended: the host holds them all now.
    pending = list(range(len(procs)))
    deadline = time.time() + 120 + len(procs) * 0.05
    while pending and time.time() < deadline:
        still = []
        for i in pending:
            if reported(serials[i]):
                continue
            if procs[i].poll() is not None:
                failed = failed or f"VM {i} ended with {procs[i].returncode}"
                continue
            still.append(i)
        pending = still
        if pending:
            time.sleep(0.2)
    up_s = time.perf_counter() - t0
    up = len(procs) - len(pending) - sum(1 for p in procs if p.poll() is not None)
    if vmm.endswith("merge"):
        ksm_settle()
    res_spawn_s = spawn_s
    time.sleep(2)
    after = meminfo()
    pss = [pss_kib(p.pid) for p in procs[:200]]
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except OSError:
            pass
    for p in procs:
        p.wait()
    for s in serials:
        try:
            os.unlink(s)
        except OSError:
            pass
    for f in os.listdir(tmp):
        if f.endswith(".sock"):
            os.unlink(os.path.join(tmp, f))
    time.sleep(2)
    res = {"vmm": vmm, "asked": n, "up": up, "up_s": up_s, "spawn_s": res_spawn_s,
           "failed": failed,
           "pss_kib": sum(pss) / max(len(pss), 1)}
    for k in FIELDS:
        if k in base:
            d = base[k] - after[k] if k == "MemAvailable" else after[k] - base[k]
            res[k] = d / max(up, 1)
    res["total"] = sum(res.get(k, 0) for k in PARTS)
    return res


def main():
    global FC, CH
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vireo", type=int, default=10000)
    ap.add_argument("--vireo-api", type=int, default=1000)
    ap.add_argument("--nopie", type=int, default=1000)
    ap.add_argument("--pit", type=int, default=1000, help="VMs of vireo run --pit")
    ap.add_argument("--merge", type=int, default=1000,
                    help="VMs with --memory ...,merge=on while the kernel's KSM runs")
    ap.add_argument("--firecracker", type=int, default=1000)
    ap.add_argument("--firecracker-api", type=int, default=0)
    ap.add_argument("--cloud-hypervisor", type=int, default=1000)
    ap.add_argument("--qemu", type=int, default=100)
    ap.add_argument("--no-build", action="store_true")
    args = ap.parse_args()
    if not args.no_build:
        subprocess.run(["rustup", "target", "add", "x86_64-unknown-linux-musl"], cwd=ROOT,
                       check=False, capture_output=True)
        build(guest=True, musl=True)
        if args.nopie > 0:
            env = dict(os.environ, RUSTFLAGS="-C relocation-model=static",
                       CARGO_TARGET_DIR=os.path.join(ROOT, "target/nopie"))
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "vireo", "--target",
                            "x86_64-unknown-linux-musl"], cwd=ROOT, env=env, check=True)
    FC = peer("FIRECRACKER", "firecracker")
    CH = peer("CLOUD_HYPERVISOR", "cloud-hypervisor")
    runs = [("vireo", args.vireo), ("vireo-api", args.vireo_api), ("vireo-pit", args.pit)]
    if os.path.exists(VIREO_NOPIE):
        runs.append(("vireo-nopie", args.nopie))
    if os.path.exists(KSM):
        runs.append(("vireo-merge", args.merge))
        if os.path.exists(VIREO_NOPIE):
            runs.append(("vireo-nopie-merge", args.merge))
    if FC:
        runs += [("firecracker", args.firecracker), ("firecracker-api", args.firecracker_api)]
    if CH:
        runs.append(("cloud-hypervisor", args.cloud_hypervisor))
    if shutil.which("qemu-system-x86_64"):
        runs.append(("qemu", args.qemu))
    with open("/proc/sys/kernel/pid_max") as f:
        pid_max = f.read().strip()
    with open("/proc/sys/kernel/pid_max", "w") as f:
        f.write("4194304")
    results = []
    saved_ksm = {k: ksm(k) for k in ("run", "pages_to_scan", "sleep_millisecs")} \
        if os.path.exists(KSM) else {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            write_configs(tmp)
            for vmm, n in runs:
                if n <= 0:
                    continue
                if vmm.endswith("merge"):
                    # KSM on, scanning fast, for this run only.
                    ksm("pages_to_scan", 5000)
                    ksm("sleep_millisecs", 10)
                    ksm("run", 1)
                r = run(vmm, n, tmp)
                if vmm.endswith("merge"):
                    r["ksm_pages_sharing"] = int(ksm("pages_sharing"))
                    r["ksm_pages_shared"] = int(ksm("pages_shared"))
                    ksm("run", 2)  # unmerge everything
                    ksm("run", 0)
                results.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    finally:
        with open("/proc/sys/kernel/pid_max", "w") as f:
            f.write(pid_max)
        for k, v in saved_ksm.items():
            if k != "run":
                ksm(k, v)
        if saved_ksm:
            ksm("run", saved_ksm["run"])
    print(f"idle VMs: test guest halted, 1 vCPU, {MEM_MIB} MiB; KiB per VM unless noted")
    fc = next((r for r in results if r["vmm"] == "firecracker"), None)
    print("| VMM | asked | up | start rate (VMs/s) | host memory (sum) | vs Firecracker |"
          " MemAvailable drop | PSS | AnonPages | PageTables + Sec | KernelStack | SUnreclaim |"
          " VmallocUsed | failure |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        ratio = f"{r['total'] / fc['total']:.2f}x" if fc else ""
        print(f"| {r['vmm']} | {r['asked']} | {r['up']} | {r['up'] / r['up_s']:.0f} |"
              f" {r['total']:.0f} | {ratio} | {r['MemAvailable']:.0f} | {r['pss_kib']:.0f} |"
              f" {r['AnonPages']:.0f} | {r['PageTables'] + r.get('SecPageTables', 0):.0f} |"
              f" {r['KernelStack']:.0f} | {r['SUnreclaim']:.0f} | {r.get('VmallocUsed', 0):.0f} |"
              f" {r['failed'] or ''} |")


if __name__ == "__main__":
    main()
