"""Flush what a killed server left in the page cache, within a bound.

SIGKILL stops processes, not their I/O: the data pages and WAL a server wrote but did not
fsync stay dirty in the page cache (or the NFS client's cache), and Linux writes them back
up to about 35 s later, which may be after a successor started on the same files. So once
the server's whole process tree is gone, and before anyone may take over, pgfence calls
syncfs(2) on the data directory's filesystem (and the lock directory's, if it differs).

A syncfs cannot be cancelled, and on unreachable storage it may never return. It runs in
a thread of its own, and pgfence waits for it at most `bound` seconds: the safety argument
counts that bound inside the margin (`Timings.flush_bound`, half of it). A flush that did
not finish in time is reported, never assumed.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence

from pgfence import clock, signals
from pgfence.frozen import Struct

_libc = ctypes.CDLL(None, use_errno=True)


class FlushResult(Struct):
    ok: bool
    seconds: float  # how long we waited
    detail: str  # what was flushed, or why it failed


def filesystems(directories: Sequence[str]) -> list[str]:
    """One directory per filesystem (by st_dev) among `directories`, nearest existing
    ancestor for one not created yet. Called before anything runs, while stat is safe."""
    seen: dict[int, str] = {}
    for directory in directories:
        path = os.path.abspath(directory)
        while not os.path.isdir(path) and os.path.dirname(path) != path:
            path = os.path.dirname(path)
        try:
            seen.setdefault(os.stat(path).st_dev, path)
        except OSError:
            continue
    return list(seen.values())


def flush(directories: Sequence[str], bound: float) -> FlushResult:
    """syncfs(2) each directory's filesystem (sync(2) of all when none is known), waiting
    at most `bound` seconds. The thread is left behind if it hangs (it cannot be stopped)."""
    done = threading.Event()
    errors: list[str] = []

    def work() -> None:
        try:
            if not directories:
                _libc.sync()
            for directory in directories:
                fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                try:
                    if _libc.syncfs(fd) != 0:
                        err = ctypes.get_errno()
                        errors.append(f"syncfs {directory}: {os.strerror(err)}")
                finally:
                    os.close(fd)
        except OSError as exc:
            errors.append(f"{exc.filename or 'flush'}: {exc.strerror}")
        finally:
            done.set()

    started = clock.now()
    signals.start_thread(threading.Thread(target=work, name="pgfence-flush", daemon=True))
    finished = done.wait(max(0.0, bound))
    took = clock.now() - started
    what = ", ".join(directories) or "all filesystems"
    if not finished:
        return FlushResult(False, took, f"flushing {what} did not finish within {bound:.3g} s")
    if errors:
        return FlushResult(False, took, "; ".join(errors))
    return FlushResult(True, took, what)
