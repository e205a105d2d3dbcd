"""Watching processes come and go: postmasters that appear, sandboxes frozen and thawed."""

from __future__ import annotations

import os
import signal
import threading

from harness import pg
from harness.procs import stat_fields
from harness.sandbox import Sandbox
from harness.waiting import wait_for


class PostmasterWatch:
    """Samples, from a thread, every postmaster running on a data directory, so a test
    can tell which ones ever appeared while it was watching (a second postmaster that
    started and died between two looks would also leave traces in the data directory;
    tests check those too)."""

    def __init__(self, datadir: str, every: float = 0.02) -> None:
        self.datadir = datadir
        self.seen: set[int] = set()
        self.initial: frozenset[int] = frozenset()
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PostmasterWatch:
        self.seen.update(pg.postmaster_pids(self.datadir))
        self.initial = frozenset(self.seen)
        self._thread.start()
        return self

    def new(self) -> set[int]:
        """Postmasters seen since the watch began that were not running then."""
        return self.seen - self.initial

    def wait_exit(self, box: Sandbox, timeout: float = 60.0) -> int:
        """Wait for `box` to exit and return its status; fail at once if a new
        postmaster shows up meanwhile (no need to wait for a server that started)."""

        def exited() -> bool:
            assert not self.new(), f"a second postmaster appeared: {sorted(self.new())}"
            return box.returncode() is not None

        wait_for(exited, f"sandbox {box.name} to exit", timeout, 0.05)
        return box.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.seen.update(pg.postmaster_pids(self.datadir))

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            self.seen.update(pg.postmaster_pids(self.datadir))


def _state(pid: int) -> str | None:
    fields = stat_fields(pid)
    return None if fields is None else fields[0].decode()


def freeze(box: Sandbox, timeout: float = 30.0) -> None:
    """Stop every process in the sandbox (SIGSTOP) and return once all are stopped, so
    that nothing in it can write to the volume. Processes that exit meanwhile, or that a
    not-yet-stopped parent forks, are handled by looking again."""

    def all_stopped() -> bool:
        pending = False
        for pid in box.pids():
            state = _state(pid)
            if state is None or state in ("T", "t", "Z", "X"):
                continue
            pending = True
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return not pending

    wait_for(all_stopped, f"every process in sandbox {box.name} to stop", timeout, 0.01)


def thaw(box: Sandbox) -> None:
    for pid in box.pids():
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
