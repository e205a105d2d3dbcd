"""Emulated containers: new UTS, PID, IPC and mount namespaces, own hostname, own PID 1.

PostgreSQL's postmaster.pid interlock cannot see across such sandboxes (the old PID is
meaningless in a new PID namespace, the shared-memory check runs in another IPC
namespace), which is exactly the situation pgfence exists for.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from harness.procs import Registry, alive

UNSHARE = ["unshare", "--uts", "--pid", "--ipc", "--mount", "--fork", "--mount-proc"]
# For short-lived sandboxes: if unshare itself dies (a test timeout), so does the inside.
UNSHARE_KILL_CHILD = [*UNSHARE, "--kill-child"]
# An inherited HOSTNAME survives unshare, so the sandbox sets both, then becomes `argv`.
_ENTER = 'hostname "$0" && export HOSTNAME="$0" && exec "$@"'


class Sandbox:
    def __init__(
        self,
        registry: Registry,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen: object,
    ) -> None:
        self.name = name
        full_env = dict(os.environ if env is None else env)
        full_env.pop("HOSTNAME", None)
        self.proc = registry.start(
            [*UNSHARE, "sh", "-c", _ENTER, name, *argv], env=full_env, **popen
        )
        self._init: int | None = None
        self._registry = registry

    def init_pid(self, timeout: float = 10.0) -> int:
        """Host pid of the sandbox's PID 1 (the forked child of unshare)."""
        deadline = time.monotonic() + timeout
        while self._init is None:
            try:
                with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                    kids = f.read().split()
            except OSError:
                kids = []
            if kids:
                self._init = int(kids[0])
                self._registry.track(self._init)
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"sandbox {self.name} did not start (rc={self.proc.poll()})")
            else:
                time.sleep(0.01)
        return self._init

    def pids(self) -> list[int]:
        """Host pids of every process inside the sandbox's PID namespace."""
        try:
            ns = os.readlink(f"/proc/{self.init_pid()}/ns/pid")
        except OSError:
            return []
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.readlink(f"/proc/{name}/ns/pid") == ns:
                        found.append(int(name))
                except OSError:
                    pass
        return found

    def kill(self) -> None:
        """SIGKILL the sandbox's PID 1: the kernel then kills everything inside."""
        pids = self.pids()
        try:
            os.kill(self.init_pid(), signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait_gone(pids)

    def stop_all(self) -> None:
        """Freeze every process inside (SIGSTOP), as a frozen container."""
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass  # exited between listing and signalling

    def continue_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    @staticmethod
    def wait_gone(pids: Sequence[int], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while any(alive(p) for p in pids):
            if time.monotonic() > deadline:
                raise AssertionError(f"processes still alive: {[p for p in pids if alive(p)]}")
            time.sleep(0.01)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def returncode(self) -> int | None:
        return self.proc.poll()


def run_in_sandbox(
    name: str, argv: Sequence[str], timeout: float = 60, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run a short command in a fresh sandbox and wait for it."""
    return subprocess.run(
        [*UNSHARE_KILL_CHILD, "sh", "-c", _ENTER, name, *argv],
        text=True,
        capture_output=True,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )
