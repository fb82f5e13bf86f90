#!/bin/bash
# Where a command's threads sleep uninterruptibly in the kernel, and for how long, with the
# kernel functions under each sleep: the tool that found what KVM waits for when a VM is
# destroyed (docs/benchmarks.md, "Exit"). Works where only tracepoints are allowed (no function
# tracer): a stack-trace trigger on sched_switch. Needs root and tracefs.
#
#     scripts/trace-sleeps.sh CMD [ARGS...]     e.g. target/release/vireo run --kernel K
#
# Prints one line per sleep: ms since exec, the sleep's length, the thread, four callers.
set -eu
T=/sys/kernel/tracing
[ -e $T/trace ] || mount -t tracefs nodev $T
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
echo 0 > $T/tracing_on
echo > $T/trace
echo > $T/set_event
echo 'stacktrace if prev_state == 2' > $T/events/sched/sched_switch/trigger
echo sched:sched_switch >> $T/set_event
echo sched:sched_process_exit >> $T/set_event
echo sched:sched_process_exec >> $T/set_event
echo 1 > $T/options/event-fork
# The traced shell's pid, then its exec of the command: the command and every thread it starts.
bash -c 'echo $$ > /sys/kernel/tracing/set_event_pid; echo 1 > /sys/kernel/tracing/tracing_on; exec "$@"' x "$@" > "$OUT/stdout" 2>&1 || true
echo 0 > $T/tracing_on
cat $T/trace > "$OUT/trace"
echo '!stacktrace if prev_state == 2' > $T/events/sched/sched_switch/trigger
echo > $T/set_event_pid
echo > $T/set_event
python3 - "$OUT/trace" <<'PY'
import re, sys
lines = open(sys.argv[1]).read().split("\n")
events = []
for i, l in enumerate(lines):
    m = re.search(r"\s(\d+\.\d+): (\w+): (.*)", l)
    if m:
        events.append((float(m.group(1)), m.group(2), m.group(3), i))
execs = [e for e in events if e[1] == "sched_process_exec"]
t0 = execs[0][0] if execs else events[0][0]
skip = ("trace_event", "__traceiter", "__schedule", "schedule", "wait_for", "entry_SYS",
        "do_syscall", "x64_sys")
asleep = {}
for t, name, rest, i in events:
    if name == "sched_switch":
        m = re.search(r"prev_comm=(.*) prev_pid=(\d+).*prev_state=(\S+) ==> .* next_pid=(\d+)", rest)
        comm, prev, state, nxt = m.groups()
        if nxt in asleep:
            since, where, who = asleep.pop(nxt)
            print(f"{(since - t0) * 1000:9.3f} ms  +{(t - since) * 1000:8.3f} ms  {who:16s} {where}")
        if state.startswith("D"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith(" =>"):
                j += 1
            stack = []
            while j < len(lines) and lines[j].startswith(" =>"):
                stack.append(lines[j][4:])
                j += 1
            where = " < ".join([s for s in stack if not s.startswith(skip)][:4])
            asleep[prev] = (t, where, comm)
    elif name == "sched_process_exit" and "group_dead=true" in rest:
        print(f"{(t - t0) * 1000:9.3f} ms  the process exits")
PY
