"""Many `pgfence run --mode lease` contenders on the host, each around a tiny child that
records when it ran, so that overlapping holders can be seen.

The child appends "start <generation> <pid> <boottime>" to an append-only log, then waits
to be killed; the test appends "stop <generation> <pid> <boottime>" once it has seen the
child dead, so each interval [start, stop] contains the child's whole life.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from harness.lease import PGFENCE, TTL
from harness.procs import Registry
from harness.writer import boottime

CHILD = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
    "t = time.clock_gettime(time.CLOCK_BOOTTIME)\n"
    'os.write(fd, f\'start {os.environ.get("PGFENCE_GENERATION", "-")} {os.getpid()} '
    "{t:.6f}\\n'.encode())\n"
    "while True:\n"
    "    time.sleep(60)\n"
)


def child_intervals(path: str) -> list[tuple[float, float, str]]:
    """(start, stop, generation) per child from the interval log; stop is +inf while alive."""
    starts: dict[str, tuple[float, str]] = {}
    stops: dict[str, float] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            what, gen, pid, at = line.split()
            if what == "start":
                starts[pid] = (float(at), gen)
            else:
                stops[pid] = float(at)
    return sorted((t, stops.get(pid, float("inf")), gen) for pid, (t, gen) in starts.items())


def overlaps(intervals: list[tuple[float, float, str]]) -> list[tuple[str, str]]:
    """Pairs of children that ran at the same time."""
    return [(a[2], b[2]) for a, b in zip(intervals, intervals[1:]) if b[0] < a[1]]


class Contender:
    """`pgfence run --mode lease` on the host around CHILD (optionally under `prefix`)."""

    def __init__(
        self,
        procs: Registry,
        directory: str,
        lock: str,
        log: str,
        n: int,
        prefix: Sequence[str] = (),
    ) -> None:
        self.token = f"contender-{n}"
        self.stderr = os.path.join(directory, f"{self.token}.log")
        with open(self.stderr, "wb") as err:
            self.proc = procs.start(
                [
                    *prefix,
                    PGFENCE,
                    "run",
                    "--mode",
                    "lease",
                    "--ttl",
                    f"{TTL:g}",
                    "--lock-file",
                    lock,
                    "--token",
                    self.token,
                    "--log-format",
                    "json",
                    "--",
                    sys.executable,
                    "-c",
                    CHILD,
                    log,
                ],
                stderr=err,
            )


def started_pid(path: str, generation: str) -> int:
    """The pid of the child that started under `generation`."""
    with open(path, encoding="utf-8") as f:
        (pid,) = [int(w[2]) for w in map(str.split, f) if w[:2] == ["start", generation]]
    return pid


def record_stop(path: str, generation: object, pid: int) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"stop {generation} {pid} {boottime():.6f}\n")
