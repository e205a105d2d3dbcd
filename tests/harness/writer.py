"""A client that keeps committing to every server it is given and logs each acknowledgement.

One thread per server port inserts rows one at a time in autocommit (a `psql` process per
insert, each with its own timeout), so the log of one port is in commit order. A commit is
*acknowledged* when `psql` exits 0 having printed the inserted row: only then is it
written to the log, with the port, the generation the server reports (the
`pgfence.generation` setting the fenced server was started with) and the time on
CLOCK_BOOTTIME, the clock pgfence itself uses. An insert that timed out or failed is in
doubt: the row may or may not exist, and it is never counted as acknowledged.

The log is an append-only file of JSON lines, so a test can read it while the writer runs
and it survives a failing test for inspection.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from harness import pg

SCHEMA = (
    "CREATE TABLE acks (id bigint PRIMARY KEY, port int NOT NULL, gen int, "
    "at timestamptz NOT NULL DEFAULT clock_timestamp(), filler text NOT NULL)",
    "CREATE INDEX acks_port_gen ON acks (port, gen)",
    "CREATE EXTENSION amcheck",
)
GENERATION_SETTING = "pgfence.generation"


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME (pgfence's clock; comparable across processes)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


@dataclass(frozen=True)
class Ack:
    id: int
    port: int
    gen: int | None
    sent: float  # boottime when psql was started
    acked: float  # boottime when psql had returned the committed row


def read_log(path: str) -> list[Ack]:
    if not os.path.exists(path):
        return []
    acks = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.endswith("\n"):
                acks.append(Ack(**json.loads(line)))
    return sorted(acks, key=lambda a: a.acked)


class Writer:
    def __init__(
        self, ports: Sequence[int], log_path: str, timeout: float = 2.5, idle: float = 0.02
    ) -> None:
        self.ports = list(ports)
        self.log_path = log_path
        self.timeout = timeout  # per insert; shorter than any freeze the tests inject
        self.idle = idle  # pause after each attempt, so two cores stay usable
        self.attempts = 0
        self.failures = 0
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._paused: set[int] = set()
        self._busy: set[int] = set()
        self._threads = [
            threading.Thread(target=self._loop, args=(p,), name=f"writer-{p}", daemon=True)
            for p in self.ports
        ]

    def __enter__(self) -> Writer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=self.timeout + 5)

    def pause(self, port: int, wait: bool = True) -> None:
        """Stop sending to `port`; wait until no insert to it is in flight."""
        with self._lock:
            self._paused.add(port)
        if not wait:
            return
        deadline = time.monotonic() + self.timeout + 10
        while port in self._busy:
            assert time.monotonic() < deadline, f"an insert to {port} did not end"
            time.sleep(0.01)

    def resume(self, port: int) -> None:
        with self._lock:
            self._paused.discard(port)

    def acks(self, port: int | None = None) -> list[Ack]:
        return [a for a in read_log(self.log_path) if port is None or a.port == port]

    def wait_acks(self, port: int, count: int, timeout: float = 30.0) -> None:
        """Wait until `port` acknowledged `count` more commits than it had so far."""
        target = len(self.acks(port)) + count
        deadline = time.monotonic() + timeout
        while len(self.acks(port)) < target:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"port {port}: fewer than {count} new acknowledged commits in {timeout} s"
                )
            time.sleep(0.05)

    def _loop(self, port: int) -> None:
        while not self._stop.is_set():
            with self._lock:
                if port in self._paused:
                    row = 0
                else:
                    row = next(self._ids)
                    self.attempts += 1
                    self._busy.add(port)
            if not row:
                self._stop.wait(0.01)
                continue
            sent = boottime()
            try:
                ack = self._insert(port, row, sent)
            finally:
                with self._lock:
                    self._busy.discard(port)
            if ack is None:
                with self._lock:
                    self.failures += 1
                self._stop.wait(0.05)
                continue
            line = json.dumps(ack.__dict__) + "\n"
            with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line)
            self._stop.wait(self.idle)

    def _insert(self, port: int, row: int, sent: float) -> Ack | None:
        sql = (
            f"INSERT INTO acks (id, port, gen, filler) VALUES ({row}, {port}, "
            f"nullif(current_setting('{GENERATION_SETTING}', true), '')::int, "
            f"repeat(md5('{row}'), 8)) RETURNING id, gen"
        )
        try:
            done = pg.psql(port, sql, timeout=self.timeout)
        except subprocess.TimeoutExpired:
            return None  # in doubt: the row may exist, it was not acknowledged
        acked = boottime()
        if done.returncode != 0:
            return None
        fields = done.stdout.strip().split("|")
        if len(fields) != 2 or fields[0] != str(row):
            return None
        gen = int(fields[1]) if fields[1] else None
        return Ack(row, port, gen, sent, acked)


def present_ids(port: int) -> set[int]:
    """Every id in the acks table of the server on `port`."""
    done = pg.psql(port, "SELECT id FROM acks", timeout=60)
    assert done.returncode == 0, done.stderr
    return {int(x) for x in done.stdout.split()}


def missing(acks: Iterable[Ack], port: int) -> list[int]:
    """Acknowledged ids the server on `port` does not have (must be empty)."""
    have = present_ids(port)
    return sorted(a.id for a in acks if a.id not in have)
