"""Typed errors: each carries the exit code and the one-line message an operator sees.

Only `cli.py` prints them. The codes follow sysexits(3), so scripts can tell a refusal
(73) from a storage fault (74) without parsing text.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_UNHEALTHY = 1  # `pgfence check`: anything but "we hold it and it is fresh"
EXIT_USAGE = 64  # bad usage or configuration
EXIT_LOCK_FORMAT = 65  # lock content pgfence cannot understand
EXIT_FENCED_OUT = 73  # another holder has the fence
EXIT_STORAGE = 74  # I/O error on the lock storage
EXIT_SELF_FENCED = 75  # we lost (or could not keep) the fence and stopped the child
EXIT_UNFLUSHED = 76  # the child's tree is gone but its writes could not be flushed in time
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127


class PgfenceError(Exception):
    """An error with a documented exit code and a message fit for an operator."""

    exit_code = 1
    event = "error"  # the log event name under which cli.py reports it

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UsageError(PgfenceError):
    exit_code = EXIT_USAGE


class LockFormatError(PgfenceError):
    exit_code = EXIT_LOCK_FORMAT


class FencedOut(PgfenceError):
    exit_code = EXIT_FENCED_OUT
    event = "fenced_out"


class StorageError(PgfenceError):
    exit_code = EXIT_STORAGE


class LockLost(PgfenceError):
    """The lock is no longer ours (removed, or rewritten by someone else)."""

    exit_code = EXIT_SELF_FENCED


class CommandError(PgfenceError):
    """The command to supervise could not be started."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Interrupted(PgfenceError):
    """A termination signal arrived before the command was started."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by signal {signum} before starting the command")
        self.exit_code = 128 + signum


def storage_error(exc: OSError, what: str, path: str) -> StorageError:
    """Turn an OSError into a one-line message that says what failed, where, and a hint."""
    import errno

    hints = {
        errno.EACCES: "check the owner and mode of the directory",
        errno.EPERM: "check the owner and mode of the directory",
        errno.EROFS: "the filesystem is mounted read-only",
        errno.ENOSPC: "the filesystem is full",
        errno.EDQUOT: "the disk quota is exhausted",
        errno.ENOENT: "the directory does not exist; create it or fix FENCE_LOCK_FILE",
        errno.ENOTDIR: "a path component is not a directory; fix FENCE_LOCK_FILE",
        errno.ELOOP: "a symlink is in the way; pgfence never follows one at the lock path",
        errno.EIO: "the storage reported an I/O error",
        errno.ESTALE: "the NFS file handle went stale",
    }
    reason = exc.strerror or str(exc)
    hint = hints.get(exc.errno or 0)
    text = f"cannot {what} {path}: {reason}"
    return StorageError(f"{text} ({hint})" if hint else text)
