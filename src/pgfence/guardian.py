"""The guardian: the command's tree dies with pgfence, even after the command changed user.

The parent-death signal that pgfence gives its command is cleared by the kernel when the
command changes its own credentials (`gosu postgres`, `su`, as the official image's
entrypoint does), so a SIGKILLed pgfence that is not PID 1 would leave the server running.
(As PID 1 the kernel kills the whole PID namespace with it; `--user` keeps the signal,
because pgfence switches user before setting it.)

So a pgfence that is not PID 1 first forks a guardian: a copy of itself, forked before any
thread exists, in a session of its own (a kill of pgfence's process group misses it), with
every signal pgfence handles blocked (only SIGKILL and SIGSTOP reach it). It holds the
read end of a pipe whose write end only pgfence has. pgfence tells it the sessions the
command's processes run in; when pgfence exits cleanly (tree gone) it writes `done`. On
end-of-file without `done`, pgfence died: the guardian SIGKILLs every process in those
sessions and their descendants, again until none is left, then flushes the data
directory's filesystem (flush.py) and exits.

What it does not cover: a SIGKILL of the guardian itself (then the parent-death signal is
all that is left), and a process that started a session of its own less than one report
interval (2 s) before pgfence died (pgfence reports new sessions at that pace).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable, Sequence

from pgfence import log
from pgfence.flush import flush

REPORT_EVERY = 2.0  # seconds between session reports while the command runs


class Guardian:
    def __init__(self, flush_dirs: Sequence[str], bound: float) -> None:
        read_end, self._write_end = os.pipe2(os.O_CLOEXEC)
        self._reported: set[int] = set()
        self.pid = os.fork()
        if self.pid == 0:
            code = 0
            try:
                os.close(self._write_end)
                os.setsid()
                code = _guard(read_end, flush_dirs, bound)
            finally:
                os._exit(code)
        os.close(read_end)

    def protect(self, sessions: Iterable[int]) -> None:
        """Have the guardian kill these sessions' processes if pgfence dies."""
        # Never our own session (the shell or orchestrator that started us is in it).
        new = set(sessions) - self._reported - {os.getsid(0), 0, 1}
        if new:
            self._send("".join(f"s {sid}\n" for sid in sorted(new)))
            self._reported |= new

    def done(self) -> None:
        """The command's tree is gone: nothing to kill; let the guardian go."""
        self._send("done\n")
        os.close(self._write_end)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass  # reaped already by the supervisor's wait-for-any

    def _send(self, text: str) -> None:
        try:
            os.write(self._write_end, text.encode())
        except OSError:
            pass  # the guardian is gone: only the parent-death signal is left


def _guard(read_end: int, flush_dirs: Sequence[str], bound: float) -> int:
    sessions: set[int] = set()
    pending = b""
    while True:
        data = os.read(read_end, 4096)
        if not data:
            break
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"done":
                return 0
            if line.startswith(b"s "):
                sessions.add(int(line[2:]))
    if not sessions:
        return 0  # pgfence died before it started anything
    killed = kill_sessions(sessions)
    flushed = flush(flush_dirs, bound)
    log.event(
        "guardian_killed",
        f"pgfence died: its guardian killed {len(killed)} process(es) left of the command "
        + (
            f"and flushed their writes in {flushed.seconds * 1000:.0f} ms"
            if flushed.ok
            else f"but could not flush their writes ({flushed.detail}): they may still land"
        ),
        level="error",
        pids=sorted(killed),
        flushed=flushed.ok,
    )
    return 0


def kill_sessions(sessions: set[int]) -> set[int]:
    """SIGKILL every live process in `sessions` and every descendant of one, until none is
    left (a process may fork while we look). Returns the pids killed."""
    killed: set[int] = set()
    while True:
        targets = _members(sessions)
        if not targets:
            return killed
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except (ProcessLookupError, PermissionError):
                pass
        time.sleep(0.01)


def session_of(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else int(stat[3])


def _members(sessions: set[int]) -> list[int]:
    table: dict[int, list[bytes]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _stat(int(name))
            if stat is not None:
                table[int(name)] = stat
    me = os.getpid()
    found = {pid for pid, f in table.items() if int(f[3]) in sessions}
    changed = True
    while changed:  # descendants that left the session (setsid) go too
        more = {pid for pid, f in table.items() if int(f[1]) in found} - found
        found |= more
        changed = bool(more)
    return [pid for pid in found if pid != me and table[pid][0] != b"Z"]


def _stat(pid: int) -> list[bytes] | None:
    """state, ppid, pgrp, session, ... of `pid` (fields after the command name)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()
