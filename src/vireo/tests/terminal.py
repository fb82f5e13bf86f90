"""Runs vireo on a pseudo-terminal and checks that the terminal is raw while the guest runs
and exactly restored afterwards. Used by tests/terminal.rs.

usage: terminal.py VIREO KERNEL MODE   (MODE: quit = type Ctrl-A x; sigterm = send SIGTERM)
Prints one line: the exit code, whether the terminal was raw while attached, whether it was
restored, and the guest's echo of typed input.
"""
import os
import pty
import select
import signal
import sys
import termios
import time

vireo, kernel, mode = sys.argv[1:4]
master, slave = pty.openpty()
before = termios.tcgetattr(slave)
pid = os.fork()
if pid == 0:
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.execv(vireo, [vireo, "run", "--kernel", kernel, "--cmdline", "vireo.input vireo.end=hang"])

out = b""


def read_until(token, timeout=30):
    global out
    end = time.time() + timeout
    while token not in out and time.time() < end:
        r, _, _ = select.select([master], [], [], 0.1)
        if r:
            try:
                out += os.read(master, 4096)
            except OSError:
                break
    return token in out


assert read_until(b"@input ready"), out
attrs = termios.tcgetattr(slave)
raw = not (attrs[3] & termios.ICANON) and not (attrs[3] & termios.ECHO) and not (attrs[3] & termios.ISIG)
os.write(master, b"hi\x03there\r")  # Ctrl-C goes to the guest, not to vireo
read_until(b"@end hang")
if mode == "quit":
    os.write(master, b"\x01x")
else:
    os.kill(pid, signal.SIGTERM)
_, status = os.waitpid(pid, 0)
after = termios.tcgetattr(slave)
echo = [l for l in out.split(b"\n") if l.startswith(b"@input line=")]
print(os.waitstatus_to_exitcode(status), int(raw), int(after == before), repr(echo[0] if echo else b""))
