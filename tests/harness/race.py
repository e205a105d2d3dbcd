"""Contenders released at the same instant, and the checks of what they did.

Each contender blocks opening a FIFO for reading (`BARRIER`); once all of them are
blocked there, `release_all` opens its write end and all go on at once to exec the
command after it. The winner's command (`CHILD`) appends `start` and `end` lines to a
shared log (one O_APPEND write each) and keeps running until the test's go-ahead file
exists, so a late loser cannot legitimately start after the winner's release within the
same round.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from harness.fence import read_text, write_file
from harness.waiting import wait_for

CONTENDERS = 16
# The barrier: open the FIFO (blocks until the test opens its write end), then exec.
BARRIER = ': < "$0"; exec "$@"'
# The supervised command: log start, wait for the test's go-ahead, log end.
CHILD = (
    'echo "start $0 $$" >> "$1"; echo "$PGFENCE_GENERATION" >> "$1.generations"; '
    'while [ ! -e "$2" ]; do sleep 0.02; done; echo "end $0 $$" >> "$1"'
)


def blocked_on_fifo(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "wait_for_partner"
    except OSError:
        return False


def release_all(fifo: str, contenders: list[subprocess.Popen[bytes]]) -> None:
    wait_for(
        lambda: all(blocked_on_fifo(p.pid) for p in contenders),
        "every contender to block on the FIFO",
    )
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # wakes every reader at once
    os.close(fd)


def end_round(
    tmp: Path, round_no: int, contenders: list[subprocess.Popen[bytes]], labels: list[str]
) -> list[int]:
    """Once every loser has exited, let the winner's command end (go-`round_no`); check
    that exactly one won and every other was fenced out (73) without a traceback, the
    stderr of contender i being in err-`round_no`-i. Returns the exit codes."""

    def losers_done() -> bool:
        return sum(p.poll() is not None for p in contenders) >= len(contenders) - 1

    wait_for(losers_done, f"the losers of round {round_no} to exit", timeout=60)
    write_file(str(tmp / f"go-{round_no}"), b"")
    codes = [p.wait(timeout=60) for p in contenders]
    errors = [read_text(str(tmp / f"err-{round_no}-{i}")) for i in range(len(contenders))]
    assert sorted(codes) == [0] + [73] * (len(contenders) - 1), list(zip(codes, labels, errors))
    for code, err in zip(codes, errors):
        assert "Traceback" not in err
        if code == 73:
            assert "fenced out" in err.splitlines()[-1]
    return codes


def check_log(log: str, rounds: int) -> None:
    """At most one command runs at any time, and exactly one ran per round."""
    running: set[str] = set()
    starts: list[int] = []
    for line in read_text(log).splitlines():
        what, round_no, pid = line.split()
        if what == "start":
            assert not running, f"round {round_no}: pid {pid} started while {running} ran"
            running.add(pid)
            starts.append(int(round_no))
        else:
            assert running == {pid}, f"round {round_no}: unexpected end of {pid}"
            running.clear()
    assert not running
    assert starts == list(range(rounds))


def check_generations(log: str, lock: str, rounds: int) -> None:
    """One generation per round, each larger than the last: a fencing token never
    repeats. (Before only holders wrote <lock>.generation, a shim that lost a round and
    stalled could lower it, and a later round repeated a generation: this caught it.)"""
    generations = [int(g) for g in read_text(f"{log}.generations").split()]
    assert len(generations) == rounds
    assert all(a < b for a, b in zip(generations, generations[1:])), generations
    assert int(read_text(f"{lock}.generation").split()[0]) >= generations[-1]
