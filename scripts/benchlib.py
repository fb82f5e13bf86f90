"""Helpers shared by the benchmark scripts."""

import glob
import http.client
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def process_cpu_ns(pid, skip_vcpus=False):
    """CPU time of every thread of `pid`, in nanoseconds (from /proc/<pid>/task/*/schedstat);
    with `skip_vcpus`, leaving out vCPU threads (their time is mostly the guest's own), so that
    what remains is the VMM's side of the work. vCPU threads are told by name: vireo's `vcpuN`,
    Firecracker's `fc_vcpu N`, QEMU's `CPU N/KVM`."""
    total = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            if skip_vcpus:
                with open(f"{task}/comm") as fh:
                    comm = fh.read().strip()
                if comm.startswith(("vcpu", "fc_vcpu")) or comm.endswith("/KVM"):
                    continue
            with open(f"{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except OSError:
            pass
    return total


def only_rows(cmds, only):
    """The rows of `cmds` named in `only` (names separated by semicolons, as row names hold
    commas), in that order; all of them when `only` is empty. An unknown name ends the run."""
    if not only:
        return cmds
    wanted = [w.strip() for w in only.split(";")]
    missing = [w for w in wanted if w not in cmds]
    if missing:
        sys.exit(f"--only: no row {missing}; rows are {list(cmds)}")
    return {n: cmds[n] for n in wanted}


def peer(env, name):
    """The peer binary named by $env, else ../shared/peers/<name> beside the checkout, else
    None (an empty $env turns the peer off)."""
    if env in os.environ:
        return os.environ[env] or None
    path = os.path.join(ROOT, "..", "shared", "peers", name)
    return path if os.access(path, os.X_OK) else None


def thread_cpu_ns(pid, exclude=("vcpu", "fc_vcpu", "CPU ")):
    """CPU time of the threads of `pid` whose name does not start with one of `exclude`
    (vireo's `vcpu0`, Firecracker's `fc_vcpu 0`, QEMU's `CPU 0/KVM`): the VMM's own work,
    without the guest's execution, which KVM accounts to the vCPU threads."""
    total = 0
    for task in glob.glob(f"/proc/{pid}/task/*"):
        try:
            with open(f"{task}/comm") as fh:
                name = fh.read().strip()
            if name.startswith(exclude):
                continue
            with open(f"{task}/schedstat") as fh:
                total += int(fh.read().split()[0])
        except OSError:
            pass
    return total


def build(guest=False, musl=False):
    """Builds vireo (release), and the test guest and the static musl vireo if asked; the musl
    build may fail (no target installed) without stopping the benchmark."""
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "vireo"], cwd=ROOT, check=True)
    if musl:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "vireo",
                        "--target", "x86_64-unknown-linux-musl"], cwd=ROOT, check=False)
    if guest:
        subprocess.run(["cargo", "build", "--release", "-q"], cwd=os.path.join(ROOT, "guest"),
                       check=True)


class UnixConnection(http.client.HTTPConnection):
    """HTTP over an API's Unix socket."""

    def __init__(self, path):
        super().__init__("localhost")
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self.unix_path)
