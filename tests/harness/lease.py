"""Lease mode on real PostgreSQL: fenced servers in emulated containers, and what to check.

- `Node`: one emulated container running `pgfence run --mode lease -- postgres` on the
  shared data directory, with its own loopback port and socket directory. The server is
  started with `-c pgfence.generation=$PGFENCE_GENERATION`, so every acknowledged commit
  says which generation (fencing token) served it.
- `prepare_cluster`, `pg_amcheck`, `pg_checksums`: the writer's table, and corruption
  checks on the data directory afterwards.
- `record_timing`: observed latencies, appended to $PGFENCE_TEST_TIMINGS (JSON lines) when
  set, for the README's table of medians. Tests never assert on them.

The faults themselves are in `harness.faults`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence

from harness import pg
from harness.faults import (
    Freezer,
    Tmpfs,
    foreign_record,
    freeze_with_signals,
    read_lock,
    steal_lock,
    write_atomically,
)
from harness.procs import Registry, alive, stat_fields
from harness.sandbox import Sandbox
from harness.waiting import wait_for
from harness.writer import GENERATION_SETTING, SCHEMA, boottime
from pgfence.timings import MIN_TTL

__all__ = [  # the fault helpers too, for the benchmarks that import them from here
    "DEADLINE",
    "PGFENCE",
    "POLL",
    "TAKEOVER_WAIT",
    "TTL",
    "Freezer",
    "Node",
    "Tmpfs",
    "all_dead",
    "events",
    "foreign_record",
    "freeze_with_signals",
    "pg_amcheck",
    "pg_checksums",
    "prepare_cluster",
    "read_lock",
    "record_timing",
    "seen_at",
    "server_command",
    "steal_lock",
    "write_atomically",
]

PGFENCE = os.path.join(os.path.dirname(sys.executable), "pgfence")
TTL = MIN_TTL  # 2 s, the minimum; every other lease timing derives from it
# Takeover wait W = TTL + lock-delay (TTL/4); the holder's deadline D = TTL/2.
TAKEOVER_WAIT = TTL * 1.25
DEADLINE = TTL / 2
# Fine enough to time a fence deadline of DEADLINE seconds.
POLL = 0.005


def record_timing(kind: str, seconds: float, **extra: object) -> None:
    print(f"timing {kind}: {seconds:.3f} s {extra or ''}")
    path = os.environ.get("PGFENCE_TEST_TIMINGS")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "seconds": round(seconds, 4), **extra}) + "\n")


def seen_at(
    predicate: Callable[[], object], what: str, timeout: float, interval: float = POLL
) -> float:
    """Poll until `predicate()` is true; returns the boottime at which it was seen true."""
    wait_for(predicate, what, timeout, interval)
    return boottime()


def prepare_cluster(datadir: str) -> None:
    """Create the writer's table and the amcheck extension (single-user mode, no port)."""
    done = subprocess.run(
        pg.as_postgres(
            [os.path.join(pg.PG_BIN, "postgres"), "--single", "-D", datadir, "postgres"]
        ),
        input="\n".join(SCHEMA) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and "ERROR" not in done.stdout + done.stderr, (
        done.stdout + done.stderr
    )


def server_command(datadir: str, port: int, sockdir: str, *extra: str) -> list[str]:
    """postgres on `port`, told its fencing generation through a custom setting."""
    argv = pg.server_argv(datadir, port, sockdir, *extra)
    script = f'exec "$@" -c {GENERATION_SETTING}="${{PGFENCE_GENERATION:-}}"'
    return ["sh", "-c", script, "postgres", *argv]


class Node:
    """One emulated container that runs (or waits to run) the fenced server."""

    def __init__(
        self,
        procs: Registry,
        name: str,
        shared_dir: str,
        datadir: str,
        port: int = 0,
        incarnation: int = 0,
    ) -> None:
        self.procs = procs
        self.name = name  # the container's hostname, hence pgfence's token
        self.datadir = datadir
        self.port = port or pg.free_port()
        self.fenced = True
        self.sockdir = pg.make_shared_dir(os.path.join(shared_dir, f"sock-{name}"))
        self.log_path = os.path.join(shared_dir, f"pgfence-{name}-{incarnation}.log")
        self.sandbox: Sandbox | None = None
        self.started_at = 0.0

    def start(
        self,
        lock: str,
        *flags: str,
        mode: str = "lease",
        pg_extra: Sequence[str] = (),
        fenced: bool = True,
    ) -> Node:
        server = server_command(self.datadir, self.port, self.sockdir, *pg_extra)
        self.fenced = fenced
        if fenced:
            argv = [
                PGFENCE,
                "run",
                "--mode",
                mode,
                "--lock-file",
                lock,
                "--user",
                "postgres",
                "--log-format",
                "json",
                *(("--ttl", f"{TTL:g}") if mode == "lease" else ()),
                *flags,
                "--",
                *server,
            ]
        else:
            argv = pg.as_postgres(server)
        env = {**os.environ, "PGDATA": self.datadir}
        env.pop("PGFENCE_GENERATION", None)
        with open(self.log_path, "ab") as log:
            log.write(f'{{"harness": "start", "at": {boottime():.4f}}}\n'.encode())
            self.sandbox = Sandbox(self.procs, self.name, argv, env=env, stderr=log)
        self.started_at = boottime()
        self.sandbox.init_pid()
        return self

    @property
    def box(self) -> Sandbox:
        assert self.sandbox is not None
        return self.sandbox

    def server_pids(self) -> list[int]:
        """The server's tree: every process in the container but pgfence (its PID 1)."""
        init = self.box.init_pid() if self.fenced else 0
        return [p for p in self.box.pids() if p != init and alive(p)]

    def postmaster(self) -> int:
        """Host pid of the postmaster (pgfence's child, or PID 1 when unfenced)."""
        init = self.box.init_pid()
        if not self.fenced:
            return init
        for pid in self.box.pids():
            fields = stat_fields(pid)
            if fields is not None and int(fields[1]) == init:
                return pid
        raise AssertionError(f"{self.name}: no server process")

    def running(self) -> bool:
        return self.sandbox is not None and self.box.returncode() is None

    def ready(self) -> bool:
        return pg.is_ready(self.port)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Boottime at which the server first answered a query."""
        return seen_at(self.ready, f"{self.name} to accept connections", timeout, 0.02)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.box.wait(timeout)

    def events(self, name: str | None = None) -> list[dict[str, object]]:
        return events(self.log_path, name)

    def log_text(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def events(path: str, name: str | None = None) -> list[dict[str, object]]:
    """pgfence's JSON events in a captured stderr (other lines are skipped)."""
    found = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and (name is None or event.get("event") == name):
                found.append(event)
    return found


def all_dead(pids: Sequence[int]) -> bool:
    return not any(alive(p) for p in pids)


def pg_amcheck(port: int) -> subprocess.CompletedProcess[str]:
    """Check every table and B-tree index of every database (server running)."""
    return subprocess.run(
        [
            os.path.join(pg.PG_BIN, "pg_amcheck"),
            *pg.client_args(port),
            "--all",
            "--install-missing",
            "--heapallindexed",
            "--rootdescend",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def pg_checksums(datadir: str) -> subprocess.CompletedProcess[str]:
    """Verify every page's checksum (server stopped)."""
    return subprocess.run(
        pg.as_postgres([os.path.join(pg.PG_BIN, "pg_checksums"), "--check", "-D", datadir]),
        capture_output=True,
        text=True,
        timeout=120,
    )
