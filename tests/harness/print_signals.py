#!/usr/bin/env python3
"""A child that records every signal it receives (after dumb-init's testing/print_signals.py).

usage: print_signals.py OUTPUT [--exit-on SIGNAME]... [--exit-code N]

Once its handlers are installed it appends `ready <pid> <uid>` to OUTPUT, then one line per
signal received (`SIGTERM`). After recording a signal named by --exit-on it exits with
--exit-code (default 0); otherwise it runs until killed. Each line is one write(2) to a
file opened with O_APPEND, so a test can poll the file while the child runs.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

UNCATCHABLE = (signal.SIGKILL, signal.SIGSTOP)


def main(argv: list[str]) -> int:
    output = argv[1]
    exit_on: set[int] = set()
    exit_code = 0
    rest = argv[2:]
    while rest:
        flag, value, rest = rest[0], rest[1], rest[2:]
        if flag == "--exit-on":
            exit_on.add(int(getattr(signal, value)))
        elif flag == "--exit-code":
            exit_code = int(value)
        else:
            raise SystemExit(f"unknown option {flag}")
    fd = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)

    def record(signum: int, frame: FrameType | None) -> None:
        os.write(fd, f"{signal.Signals(signum).name}\n".encode())
        if signum in exit_on:
            os._exit(exit_code)

    for signum in signal.valid_signals():
        if signum in UNCATCHABLE or signum >= signal.SIGRTMIN:
            continue
        try:
            signal.signal(signum, record)
        except (OSError, ValueError):
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    os.write(fd, f"ready {os.getpid()} {os.getuid()}\n".encode())
    while True:
        signal.pause()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
