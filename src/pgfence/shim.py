"""pgfence installed as `postgres`, first on PATH (the shell script's installation style).

`postgres ARGS` then means `pgfence run -- <real postgres> ARGS`, configured from the
environment only. Invocations that start no server pass straight through without touching
the lock, because the official image's entrypoint runs some of them (`-C`, `--version`)
before any server starts, possibly while another container holds the fence.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pgfence.errors import EXIT_NOT_FOUND, CommandError

PROGRAM_NAMES = ("postgres",)
PASSTHROUGH_FLAGS = ("--version", "-V", "--help", "-?", "--describe-config")


def is_shim(argv0: str) -> bool:
    return os.path.basename(argv0) in PROGRAM_NAMES


def starts_server(args: Sequence[str]) -> bool:
    """False for invocations that only print something and never open the data directory.
    `--single` and `--boot` do write to it, so they are fenced like a server start."""
    for arg in args:
        if arg in PASSTHROUGH_FLAGS or arg.startswith("-C") or arg.startswith("--describe-config"):
            return False
    return True


def real_postgres(self_path: str, env: Mapping[str, str]) -> str:
    """The real server binary: $FENCE_POSTGRES_BIN, else the next `postgres` on PATH that
    is neither this program nor another copy of pgfence."""
    configured = env.get("FENCE_POSTGRES_BIN")
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise CommandError(
                f"FENCE_POSTGRES_BIN={configured!r} is not an executable file", EXIT_NOT_FOUND
            )
        return configured
    me = os.path.realpath(self_path)
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", "postgres")
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if os.path.realpath(candidate) == me or _is_pgfence(candidate):
            continue
        return os.path.abspath(candidate)
    raise CommandError(
        "cannot find the real postgres further down PATH; set FENCE_POSTGRES_BIN to it "
        "(e.g. /usr/lib/postgresql/16/bin/postgres)",
        EXIT_NOT_FOUND,
    )


def _is_pgfence(path: str) -> bool:
    """A script or zipapp of pgfence (a copy of this shim elsewhere on PATH)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(b"#!") and b"pgfence" in head
