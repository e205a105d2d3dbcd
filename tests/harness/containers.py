"""Emulated containers running PostgreSQL under pgfence, the way images run it.

- `Container` is a sandbox whose output goes to a log file (a pipe nobody reads could
  fill up and stall the server) with a hostname of its own, which is its default token.
- `make_bin_dir` lays out what an image adds to its PATH: the entrypoint script and,
  for the shim installation style, `postgres` as a symlink to pgfence.
- `read_lock` reads a lock file the way an operator does (`cat`), without pgfence.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from harness import pg
from harness.fence import lock_fields as read_lock  # noqa: F401 (re-exported)
from harness.procs import Registry
from harness.sandbox import Sandbox

TESTS_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRYPOINT = os.path.join(TESTS_DIR, "integration", "entrypoint.sh")
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class Container(Sandbox):
    def __init__(
        self,
        registry: Registry,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_dir: str,
    ) -> None:
        self.log_path = os.path.join(log_dir, f"{name}.log")
        attempt = 1
        while os.path.exists(self.log_path):  # a container of the same name started again
            attempt += 1
            self.log_path = os.path.join(log_dir, f"{name}.{attempt}.log")
        with open(self.log_path, "wb") as log:
            super().__init__(
                registry,
                name,
                argv,
                env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )

    def log(self) -> str:
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def run_to_end(
    registry: Registry,
    name: str,
    argv: Sequence[str],
    env: Mapping[str, str],
    log_dir: str,
    timeout: float = 60,
) -> tuple[int, str]:
    """Run a short command in a fresh container (registered for cleanup like any other)
    and wait for it: (exit status, its stdout and stderr)."""
    box = Container(registry, name, argv, env, log_dir)
    return box.wait(timeout=timeout), box.log()


def make_bin_dir(path: str, shim_target: str | None = None) -> str:
    """A directory for the front of PATH, readable by the postgres user: the entrypoint
    script (as an image COPYs it) and, with `shim_target`, `postgres` -> pgfence."""
    pg.make_shared_dir(path)
    shutil.copy(ENTRYPOINT, os.path.join(path, "entrypoint.sh"))
    os.chmod(os.path.join(path, "entrypoint.sh"), 0o755)
    if shim_target:
        os.symlink(shim_target, os.path.join(path, "postgres"))
    return path


def container_env(path_front: Sequence[str] = (), **variables: str) -> dict[str, str]:
    """A small, container-like environment: PATH as the official image has it (its own
    directories first, then PostgreSQL's bin directory), plus `variables`."""
    path = ":".join([*path_front, pg.PG_BIN, BASE_PATH])
    return {"PATH": path, "LANG": "C.UTF-8", **variables}


def server_args(datadir: str, port: int, socket_dir: str) -> list[str]:
    """`postgres ARGS` as an image's CMD names it: found on PATH (the shim, if present)."""
    return ["postgres", *pg.server_argv(datadir, port, socket_dir)[1:]]


def sandbox_pid_uid(pid: int) -> int:
    """Real uid of a host pid (e.g. to check which user a sandbox's PID 1 runs as)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError(f"no Uid line for pid {pid}")


def cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
