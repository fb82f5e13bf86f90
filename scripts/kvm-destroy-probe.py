#!/usr/bin/env python3
"""How long KVM takes to destroy a VM, by the VM's age and what user space did first.

Makes a bare KVM VM (1 MiB memory slot, in-kernel irqchip, optionally a PIT and irqfds) with
raw ioctls, waits AGE ms, then times the teardown as a VMM's exit would see it: optionally
deleting the memory slot first, then closing the VM. Needs root (or the kvm group) and
python3; nothing of vireo. Medians of --runs.

    scripts/kvm-destroy-probe.py [--runs 9] [--ages 0,3,7,10,20,50] [--pit]
    scripts/kvm-destroy-probe.py --slot-after-irqchip

The second form times registering a memory slot right after the irqchip instead: what moving
guest-memory registration later in the set-up (off the critical path) would cost.

What it showed on Linux 6.18 (docs/benchmarks.md, "Exit"): KVM frees the I/O bus replaced by
each in-kernel device or ioeventfd registration with call_srcu, and its VM destruction waits
for those callbacks (srcu_barrier), so a VM younger than ~15 ms waits out the rest; deleting
a slot first (an expedited grace period) halves that; a PIT adds a normal grace period at any
age.
"""

import argparse
import ctypes
import mmap
import os
import statistics
import struct
import time

KVM_CREATE_VM = 0xAE01
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_CREATE_IRQCHIP = 0xAE60
KVM_CREATE_PIT2 = 0x4040AE77
KVM_IRQFD = 0x4020AE76
KVM_PIT_SPEAKER_DUMMY = 1

libc = ctypes.CDLL(None, use_errno=True)
MEM = mmap.mmap(-1, 1 << 20)
ADDR = ctypes.addressof(ctypes.c_char.from_buffer(MEM))


def ioctl(fd, req, arg=0):
    if isinstance(arg, bytes):
        arg = ctypes.c_char_p(arg)
    if libc.ioctl(fd, ctypes.c_ulong(req), arg) < 0:
        raise OSError(ctypes.get_errno(), f"ioctl {req:#x}")


def slot(size):
    return struct.pack("IIQQQ", 0, 0, 0, size, ADDR)


def one(kvm, age_ms, pit, delete):
    vm = libc.ioctl(kvm, ctypes.c_ulong(KVM_CREATE_VM), 0)
    if vm < 0:
        raise OSError(ctypes.get_errno(), "KVM_CREATE_VM")
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, slot(1 << 20))
    ioctl(vm, KVM_CREATE_IRQCHIP)
    efds = []
    if pit:
        ioctl(vm, KVM_CREATE_PIT2, struct.pack("I60x", KVM_PIT_SPEAKER_DUMMY))
        for gsi in (4, 5, 6):
            efds.append(libc.eventfd(0, 0))
            ioctl(vm, KVM_IRQFD, struct.pack("IIII16x", efds[-1], gsi, 0, 0))
    time.sleep(age_ms / 1000)
    t = time.perf_counter()
    if delete:
        ioctl(vm, KVM_SET_USER_MEMORY_REGION, slot(0))
    os.close(vm)
    took = time.perf_counter() - t
    for f in efds:
        os.close(f)
    return took * 1000


def slot_after_irqchip(kvm):
    vm = libc.ioctl(kvm, ctypes.c_ulong(KVM_CREATE_VM), 0)
    ioctl(vm, KVM_CREATE_IRQCHIP)
    t = time.perf_counter()
    ioctl(vm, KVM_SET_USER_MEMORY_REGION, slot(1 << 20))
    took = time.perf_counter() - t
    os.close(vm)
    return took * 1000


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--ages", default="0,3,7,10,20,50", help="VM ages in ms, comma-separated")
    ap.add_argument("--pit", action="store_true", help="also a PIT and three irqfds")
    ap.add_argument("--slot-after-irqchip", action="store_true",
                    help="time a slot registered right after the irqchip instead")
    args = ap.parse_args()
    ages = [int(a) for a in args.ages.split(",")]
    kvm = os.open("/dev/kvm", os.O_RDWR)
    if args.slot_after_irqchip:
        ms = statistics.median(slot_after_irqchip(kvm) for _ in range(args.runs))
        print(f"KVM_SET_USER_MEMORY_REGION right after KVM_CREATE_IRQCHIP: {ms:.2f} ms "
              f"(median of {args.runs})")
        return
    print(f"teardown (ms) by VM age, {'with' if args.pit else 'without'} a PIT; "
          f"medians of {args.runs}\n")
    print("| age (ms) | close only | delete the slot, then close |")
    print("|---:|---:|---:|")
    for age in ages:
        plain = statistics.median(one(kvm, age, args.pit, False) for _ in range(args.runs))
        first = statistics.median(one(kvm, age, args.pit, True) for _ in range(args.runs))
        print(f"| {age} | {plain:.2f} | {first:.2f} |")


if __name__ == "__main__":
    main()
