"""Every interval pgfence waits on, derived from one or two settings.

Strict mode has only a heartbeat. Lease mode derives everything from the TTL so that the
safety margin cannot be misconfigured:

    renew interval      R = TTL / 6      the holder writes a heartbeat this often
    fence deadline      D = TTL / 2      the holder kills its server if no renewal that
                                         *started* within the last D seconds succeeded
    lock delay          L = TTL / 4      (default) extra wait before a takeover
    takeover wait       W = TTL + L      a contender must see the lease unchanged this long

    margin              W - D = TTL / 2 + L   (>= 0.75 TTL with the default lock delay)

The margin absorbs what the holder cannot control: the time to kill its process tree,
storage latency of its last write, and the difference in clock rates between hosts.
"""

from __future__ import annotations

from pgfence.record import LockRecord
from pgfence.struct import Struct

MIN_TTL = 2.0
DEFAULT_TTL = 30.0
DEFAULT_HEARTBEAT_INTERVAL = 2.0


class Timings(Struct):
    mode: str  # "strict" or "lease"
    interval: float  # seconds between renewals (start to start)
    ttl: float  # 0 in strict mode
    lock_delay: float  # 0 in strict mode
    deadline: float | None  # lease mode: self-fence after this long without a renewal
    poll: float  # how often a waiting contender reads the lock

    @classmethod
    def strict(cls, heartbeat_interval: float) -> Timings:
        return cls("strict", heartbeat_interval, 0.0, 0.0, None, min(0.5, heartbeat_interval))

    @classmethod
    def lease(cls, ttl: float, lock_delay: float | None = None) -> Timings:
        delay = ttl / 4 if lock_delay is None else lock_delay
        return cls("lease", ttl / 6, ttl, delay, ttl / 2, min(1.0, ttl / 10))

    def takeover_wait(self, holder: LockRecord) -> float:
        """Silence a contender must observe before replacing `holder`'s lease.

        The holder's own TTL bounds its deadline, so a contender configured with a
        shorter TTL still waits out the holder's.
        """
        return max(self.ttl, holder.ttl) + max(self.lock_delay, holder.lock_delay)

    def describe(self) -> str:
        if self.deadline is None:
            return f"strict mode: heartbeat every {self.interval:g} s, never taken over"
        return (
            f"lease mode: TTL {self.ttl:g} s, renew every {self.interval:.3g} s, "
            f"self-fence after {self.deadline:.3g} s without a renewal, "
            f"takeover after {self.ttl + self.lock_delay:.3g} s of silence"
        )
