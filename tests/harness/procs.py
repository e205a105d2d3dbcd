"""Start processes for a test and make sure each is gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence


def pids_in_session(sid: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.getsid(int(name)) == sid:
                    found.append(int(name))
            except OSError:
                pass
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (by /proc parent links)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = stat_fields(int(name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(name))
    found, stack = [], list(children.get(pid, ()))
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(children.get(p, ()))
    return found


def stat_fields(pid: int) -> list[bytes] | None:
    """The fields of /proc/`pid`/stat after the command's name: its state, its parent's
    pid, and so on (proc(5) numbers them from 3); None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), to tell it from a later reuse of its pid."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] != b"Z"


class Registry:
    """Processes started by one test; `cleanup()` SIGKILLs each one and its tree."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra_pids: list[int] = []
        self._start_times: dict[int, int | None] = {}

    def start(self, argv: Sequence[str], **kwargs: object) -> subprocess.Popen[bytes]:
        kwargs.setdefault("start_new_session", True)
        proc = subprocess.Popen(list(argv), **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def track(self, pid: int) -> None:
        self.extra_pids.append(pid)
        self._start_times[pid] = start_time(pid)

    def cleanup(self) -> None:
        pids: list[int] = []
        for proc in self.procs:
            if proc.poll() is None:
                pids.append(proc.pid)
                pids.extend(descendants(proc.pid))
                try:
                    pids.extend(pids_in_session(proc.pid))
                except OSError:
                    pass
        for pid in self.extra_pids:
            # Only if it is still the process we tracked: pids are reused.
            if start_time(pid) == self._start_times.get(pid) is not None:
                pids.append(pid)
                pids.extend(descendants(pid))
        for pid in set(pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in set(pids):
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
