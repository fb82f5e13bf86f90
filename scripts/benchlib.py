"""Helpers shared by the benchmark scripts."""

import glob


def process_cpu_ns(pid):
    """CPU time of every thread of `pid`, in nanoseconds (from /proc/<pid>/task/*/schedstat)."""
    total = 0
    for f in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            with open(f) as fh:
                total += int(fh.read().split()[0])
        except OSError:
            pass
    return total
