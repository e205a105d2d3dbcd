"""Faults to inject under a lease holder: freeze its container, break its storage, steal
its lock.

- `Freezer`: the cgroup v1 freezer, as `docker pause` uses it (all tasks thaw at once);
  `freeze_with_signals`: SIGSTOP of every process instead (PID 1 resumes first).
- `Tmpfs`: a tiny filesystem for the lock, to make it read-only or full under a holder.
- `steal_lock`: rewrite the lock as another holder would (temp file + rename);
  `foreign_record`: a lease record of another token that nobody renews; `read_lock`.

(`harness.lease` re-exports these names, which is where the benchmarks import them from.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

from harness.sandbox import Sandbox
from pgfence.record import LockRecord, parse
from pgfence.timings import MIN_TTL

TTL = MIN_TTL  # of the records written here (the tests' lease TTL too)


def read_lock(path: str) -> LockRecord | None:
    """The lock's record, or None when there is no lock (or a one-line lock)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    holder = parse(data, path)
    return holder if isinstance(holder, LockRecord) else None


def write_atomically(path: str, data: bytes) -> None:
    """What any careful writer of the lock does: temp file, fsync, rename over it."""
    temp = f"{os.path.dirname(path)}/.steal-{uuid.uuid4().hex}"
    with open(temp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)


def foreign_record(previous: LockRecord | None, token: str = "thief") -> bytes:
    """A lease-mode lock of another token, one generation on, that nobody renews."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return LockRecord(
        token=token,
        instance=uuid.uuid4().hex[:16],
        mode="lease",
        generation=(previous.generation if previous else 0) + 1,
        heartbeat=0,
        interval=TTL / 6,
        ttl=TTL,
        lock_delay=TTL / 4,
        pid=999999,
        host=token,
        boot_id="00000000-0000-0000-0000-000000000000",
        clock=0.0,
        acquired_at=now,
        heartbeat_at=now,
    ).encode()


def steal_lock(path: str, kind: str) -> bytes:
    """Rewrite the lock as another token: a lease record ("record") or a shell script's
    one-line lock ("one-line"). Returns the bytes written."""
    data = foreign_record(read_lock(path)) if kind == "record" else b"thief\n"
    write_atomically(path, data)
    return data


class Freezer:
    """A cgroup v1 freezer group: freeze and thaw a whole container at once."""

    ROOT = "/sys/fs/cgroup/freezer"

    def __init__(self, name: str) -> None:
        self.path = os.path.join(self.ROOT, f"pgfence-test-{name}-{uuid.uuid4().hex[:6]}")
        os.mkdir(self.path)

    @classmethod
    def available(cls) -> bool:
        return os.path.exists(os.path.join(cls.ROOT, "cgroup.procs")) and os.access(
            cls.ROOT, os.W_OK
        )

    def _members(self) -> set[int]:
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            return {int(x) for x in f.read().split()}

    def _state(self) -> str:
        with open(os.path.join(self.path, "freezer.state")) as f:
            return f.read().strip()

    def _set_state(self, state: str) -> None:
        with open(os.path.join(self.path, "freezer.state"), "w") as f:
            f.write(state)

    def freeze(self, box: Sandbox, timeout: float = 10.0) -> None:
        """Move every process of `box` into the group (until none is left out: new ones
        may fork meanwhile, and inherit the group once their parent is in), then freeze."""
        deadline = time.monotonic() + timeout
        while True:
            outside = set(box.pids()) - self._members()
            if not outside:
                break
            for pid in outside:
                try:
                    with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                except OSError:
                    pass  # exited meanwhile
            assert time.monotonic() < deadline, "could not move the container into the freezer"
        self._set_state("FROZEN")
        while self._state() != "FROZEN":
            assert time.monotonic() < deadline, "the freezer did not freeze"
            time.sleep(0.005)

    def thaw(self) -> None:
        self._set_state("THAWED")

    def remove(self) -> None:
        """Thaw, hand the members back to the root group, delete the group."""
        try:
            self.thaw()
            for pid in self._members():
                try:
                    with open(os.path.join(self.ROOT, "cgroup.procs"), "w") as f:
                        f.write(str(pid))
                except OSError:
                    pass
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.rmdir(self.path)
                    return
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        except FileNotFoundError:
            pass


def freeze_with_signals(box: Sandbox) -> None:
    """SIGSTOP every process in the container (pgfence, postmaster, backends)."""
    for _ in range(3):  # a process may fork while we stop the others
        for pid in box.pids():
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass


class Tmpfs:
    """A tiny tmpfs for the lock file, to fill or make read-only under a holder."""

    def __init__(self, path: str, size: str = "512k") -> None:
        self.path = path
        os.makedirs(path, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
            check=True,
            timeout=30,
        )
        self.mounted = True
        self._filler = os.path.join(path, "filler")

    def read_only(self, on: bool) -> None:
        """Remount read-only (the superblock: every mount namespace sees it) or back."""
        opts = "remount,ro" if on else "remount,rw"
        deadline = time.monotonic() + 10
        while True:
            done = subprocess.run(
                ["mount", "-o", opts, self.path], capture_output=True, text=True, timeout=30
            )
            if done.returncode == 0:
                return
            # EBUSY: a file was open for writing at that instant (a heartbeat); try again.
            assert time.monotonic() < deadline, done.stderr
            time.sleep(0.01)

    def fill(self) -> None:
        """Fill the filesystem: no new heartbeat can be written."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError:
                    pass
        finally:
            os.close(fd)

    def unfill(self) -> None:
        try:
            os.unlink(self._filler)
        except FileNotFoundError:
            pass

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["mount", "-o", "remount,rw", self.path], timeout=30)
            subprocess.run(["umount", "-l", self.path], timeout=30)
            self.mounted = False
