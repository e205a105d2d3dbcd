"""The two prctl(2) calls pgfence needs, through ctypes (the standard library has no prctl)."""

from __future__ import annotations

import ctypes
import os

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36

# Loaded once in the parent, so a freshly forked child never has to dlopen anything.
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def set_parent_death_signal(signum: int) -> None:
    """Have the kernel send `signum` to this process when its parent thread dies.

    The kernel clears this on any change of user or group id, so it is set after them.
    """
    _prctl(PR_SET_PDEATHSIG, signum)


def become_subreaper() -> None:
    """Adopt orphaned descendants, so no process the command started can escape our wait."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
