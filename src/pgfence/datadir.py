"""Which data directory a command serves, and whether the lock file can fence it.

A lock file on another filesystem than the data directory fences nothing: a second
container that mounts the same data volume would not see it. When the data directory is
known (from `-D`/`--pgdata` in the command, else $PGDATA), pgfence compares the st_dev
of both and refuses a mismatch, saying where the lock belongs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from pgfence.errors import StorageError, UsageError, storage_error


def data_directory(command: Sequence[str], env: Mapping[str, str]) -> str | None:
    """The data directory named by `-D DIR`, `-DDIR`, `--pgdata[=]DIR`, else $PGDATA."""
    args = list(command[1:])
    for i, arg in enumerate(args):
        if arg in ("-D", "--pgdata") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--pgdata="):
            return arg[len("--pgdata=") :]
        if arg.startswith("-D") and len(arg) > 2:
            return arg[2:]
    return env.get("PGDATA") or None


def check_same_filesystem(lock_file: str, data_dir: str) -> None:
    lock_dir = os.path.dirname(os.path.abspath(lock_file))
    try:
        lock_dev = os.stat(lock_dir).st_dev
    except FileNotFoundError:
        raise StorageError(
            f"lock directory {lock_dir} does not exist; create it on the data volume, "
            "or fix FENCE_LOCK_FILE"
        ) from None
    except OSError as exc:
        raise storage_error(exc, "inspect lock directory", lock_dir) from None
    existing = _nearest_existing(os.path.abspath(data_dir))
    if os.stat(existing).st_dev != lock_dev:
        raise UsageError(
            f"lock file {lock_file} is on another filesystem than the data directory "
            f"{data_dir}, so it fences nothing; set FENCE_LOCK_FILE (--lock-file) to a "
            "path on the data directory's volume, outside an uninitialised PGDATA (e.g. "
            "the volume's root, with PGDATA in a subdirectory)"
        )


def _nearest_existing(path: str) -> str:
    """The data directory may not exist yet (before initdb): judge by its parent."""
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path
