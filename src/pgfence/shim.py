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
# `postgres -C NAME` prints a setting before it looks at the data directory, except for
# the settings PostgreSQL computes at run time (15 and later): for those it first locks
# the data directory, rewriting the postmaster.pid of a server running in another
# container and deleting it on exit; that server then shuts itself down within a minute
# ("data directory lock file is invalid"). So these are fenced like a server start.
RUNTIME_COMPUTED = frozenset(
    {
        "data_checksums",
        "data_directory_mode",
        "num_os_semaphores",
        "shared_memory_size",
        "shared_memory_size_in_huge_pages",
        "wal_segment_size",
    }
)


def is_shim(argv0: str) -> bool:
    return os.path.basename(argv0) in PROGRAM_NAMES


def starts_server(args: Sequence[str]) -> bool:
    """False for invocations that only print something and never open the data directory.
    `--single` and `--boot` do write to it, so they are fenced like a server start, and
    so is `-C` of a setting computed at run time (see RUNTIME_COMPUTED)."""
    for i, arg in enumerate(args):
        if arg in PASSTHROUGH_FLAGS or arg.startswith("--describe-config"):
            return False
        if arg.startswith("-C"):
            name = arg[2:] or (args[i + 1] if i + 1 < len(args) else "")
            return name.lower() in RUNTIME_COMPUTED  # GUC names ignore case
    return True


def real_postgres(self_path: str, env: Mapping[str, str]) -> str:
    """The real server binary: $FENCE_POSTGRES_BIN, else the next `postgres` on PATH that
    is neither this program nor another copy of pgfence."""
    configured = env.get("FENCE_POSTGRES_BIN")
    me = os.path.realpath(self_path)
    if configured:
        if not (os.path.isfile(configured) and os.access(configured, os.X_OK)):
            raise CommandError(
                f"FENCE_POSTGRES_BIN={configured!r} is not an executable file", EXIT_NOT_FOUND
            )
        if _is_this_program(configured, me):
            # Running it would exec this shim again, forever (holding the lock).
            raise CommandError(
                f"FENCE_POSTGRES_BIN={configured!r} is pgfence itself, not the real postgres",
                EXIT_NOT_FOUND,
            )
        return configured
    for directory in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory or ".", "postgres")
        if not (os.path.isfile(candidate) and os.access(candidate, os.X_OK)):
            continue
        if _is_this_program(candidate, me):
            continue
        return os.path.abspath(candidate)
    raise CommandError(
        "cannot find the real postgres further down PATH; set FENCE_POSTGRES_BIN to it "
        "(e.g. /usr/lib/postgresql/16/bin/postgres)",
        EXIT_NOT_FOUND,
    )


def _is_this_program(path: str, me: str) -> bool:
    """`path` would run pgfence again: this very file (`me`, resolved) or a copy of it."""
    return os.path.realpath(path) == me or _is_pgfence(path)


def _is_pgfence(path: str) -> bool:
    """A copy of pgfence elsewhere on PATH: its console script (which imports pgfence.cli)
    or a zipapp holding pgfence/cli.py. The real postgres is an ELF binary."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    if not head.startswith(b"#!"):
        return False
    if b"pgfence.cli" in head:
        return True
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return "pgfence/cli.py" in archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return False
