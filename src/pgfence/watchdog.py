"""The optional watchdog: a machine reset when pgfence cannot fence in time.

pgfence fences by killing its server's process tree and flushing its writes. Neither
helps when pgfence itself is frozen or starved while the server runs, or when the flush
cannot complete (storage unreachable): then only a reset of the machine keeps a successor
safe. With `--watchdog auto|required`, pgfence arms the Linux watchdog (`/dev/watchdog`,
the API Patroni and sanlock's wdmd use) with a timeout T below the margin, and writes a
keepalive only after a lease renewal that completed within the deadline. If keepalives
stop, the machine resets T seconds after the last one.

Why T fits (s: start of the last successful renewal; D: deadline; W: takeover wait):
that renewal completed, and its keepalive was written, before s + D; the machine resets by
s + D + T; a contender acts no earlier than s + W. So T < W - D, less a slack for clock
rates and the driver's precision: T = floor(margin - max(1 s, margin / 10)), at least 1 s
(`Timings.watchdog_timeout`).

The magic close (`V`, then close) stops the timer only once the server's tree is gone
and its writes are flushed: a clean release, or a self-fence whose flush completed.
Every other exit (SIGKILL of pgfence included) leaves the timer running: the reset is
what makes those safe. This needs a driver without `nowayout`, or every exit resets.
"""

from __future__ import annotations

import array
import errno
import fcntl
import os
import threading

from pgfence.errors import StorageError, UsageError
from pgfence.timings import Timings

DEFAULT_DEVICE = "/dev/watchdog"
MODES = ("off", "auto", "required")
# <linux/watchdog.h>: _IOWR('W', 6, int) and _IOR('W', 7, int)
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707
KEEPALIVE = b"k"  # any byte but V is a keepalive (write(2) interface)
MAGIC_CLOSE = b"V"


def timeout_for(timings: Timings) -> int:
    """Whole seconds T with D + T safely below S; UsageError if the timings leave none."""
    seconds = timings.watchdog_timeout
    if seconds < 1 or seconds <= timings.interval:
        raise UsageError(
            f"--watchdog: the margin S - D is {timings.margin:.3g} s, too short for a watchdog "
            "timeout of at least 1 s (and longer than a renewal interval) with 1 s to spare; "
            "raise --ttl (3 s or more fits with the default lock delay) or --lock-delay, "
            "or use --watchdog off"
        )
    return seconds


class Watchdog:
    """An open watchdog device, timer running, set to `timeout` seconds."""

    def __init__(self, device: str, timeout: int) -> None:
        self.device = device
        self.timeout = timeout
        self._fd: int | None = None
        # The renewer keeps it alive, the main thread closes it: never a write to a
        # descriptor number that was closed (and perhaps reused) meanwhile.
        self._mutex = threading.Lock()
        try:
            self._fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _unusable(device, exc.strerror or str(exc)) from None
        try:
            wanted = array.array("i", [timeout])
            fcntl.ioctl(self._fd, WDIOC_SETTIMEOUT, wanted, True)
            actual = array.array("i", [timeout])
            fcntl.ioctl(self._fd, WDIOC_GETTIMEOUT, actual, True)
            got = max(wanted[0], actual[0])
        except OSError as exc:
            why = "not a watchdog device" if exc.errno == errno.ENOTTY else exc.strerror
            self.close(magic=True)
            raise _unusable(device, f"cannot set its timeout to {timeout} s: {why}") from None
        if got > timeout:
            self.close(magic=True)
            raise _unusable(device, f"the driver set {got} s, more than the {timeout} s asked")
        self.keepalive()

    def keepalive(self) -> None:
        with self._mutex:
            if self._fd is not None:
                try:
                    os.write(self._fd, KEEPALIVE)
                except OSError:
                    pass  # the timer keeps running: a missed keepalive ends in a reset

    def close(self, magic: bool) -> None:
        """Close the device; with `magic`, stop the timer first (magic close)."""
        with self._mutex:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            try:
                if magic:
                    os.write(fd, MAGIC_CLOSE)
            except OSError:
                pass
            os.close(fd)


def probe(device: str, timeout: int) -> None:
    """Check that `device` is a usable watchdog that takes `timeout`, and stop it again
    (a contender may wait long before it holds anything worth a reset)."""
    Watchdog(device, timeout).close(magic=True)


def _unusable(device: str, why: str) -> StorageError:
    return StorageError(
        f"watchdog {device} is not usable: {why}; give pgfence the device "
        "(docker run --device /dev/watchdog), fix --watchdog-device, or use --watchdog auto|off"
    )
