"""The one clock pgfence measures elapsed time with.

CLOCK_BOOTTIME is monotonic and, unlike CLOCK_MONOTONIC, keeps counting while the machine
is suspended: a holder whose VM was suspended past its deadline sees that time pass and
fences itself instead of renewing a lease it may have lost. Wall clocks are never used to
decide anything; they only appear in records and messages for humans.
"""

from __future__ import annotations

import time

_CLOCK_ID = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def now() -> float:
    """Seconds on this machine's monotonic clock (suspend included)."""
    return time.clock_gettime(_CLOCK_ID)


def boot_id() -> str:
    """An id of this kernel boot; two readings of `now()` compare only under the same id."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def wall_iso() -> str:
    """Wall-clock time in UTC for humans (ISO 8601, second precision)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
