"""How long etcd requests may take: one value that travels with every request.

A budget is a per-request socket timeout, an overall monotonic deadline (`until`, None
for none) and a guard, asked right before each send (may we still act?). The client asks
the budget before each attempt, the first and every failover: what is left, capped at
the per-request timeout, is that attempt's timeout; nothing left, and no request is sent.
A budget decides nothing itself: its questions answer True or False, and the client
chooses what to raise.

Which per-request timeout a request gets is the policy of `RequestTimeouts`
(config.request_timeouts): a renewal's requests get the short one, so that a renewal can
fail over from an endpoint that stopped answering and still finish within the fence
deadline; everything else gets the longer one.
"""

from __future__ import annotations

from typing import NamedTuple

from pgfence import clock
from pgfence.frozen import Struct
from pgfence.timings import request_timeouts

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Callable, Optional

    from pgfence.timings import Timings

    Guard = Optional[Callable[[], bool]]


class Budget(Struct):
    timeout: float  # seconds, at most, for one request to one endpoint
    until: float | None = None  # pgfence's monotonic clock; None: no overall deadline
    guard: Guard = None  # asked before each send; None: always allowed

    @classmethod
    def unbounded(cls, timeout: float) -> Budget:
        """Requests that have no deadline, only their own timeout."""
        return cls(timeout)

    def remaining(self) -> float:
        """Seconds left until the deadline (negative once past; infinite without one)."""
        return float("inf") if self.until is None else self.until - clock.now()

    def request_timeout(self) -> float:
        """The next request's timeout: the per-request timeout, or what is left if less
        (zero or negative: no request)."""
        return min(self.timeout, self.remaining())

    def expired(self) -> bool:
        return self.remaining() <= 0

    def ensure(self, margin: float) -> bool:
        """More than `margin` seconds left?"""
        return self.remaining() > margin

    def may_send(self) -> bool:
        """The guard's answer, right now."""
        return self.guard is None or self.guard()

    def unguarded(self) -> Budget:
        """The same time, without the guard."""
        return self.replace(guard=None)


class RequestTimeouts(NamedTuple):
    """(renewal request timeout, timeout of everything else), and budgets made of them."""

    fast: float
    slow: float

    @classmethod
    def of(cls, timings: Timings) -> RequestTimeouts:
        """The timeouts timings.request_timeouts derives for `timings`."""
        return cls(*request_timeouts(timings))

    def renewal(self, until: float, guard: Guard = None) -> Budget:
        """Requests that race the fence deadline `until`: each gets the short timeout."""
        return Budget(self.fast, until, guard)

    def bounded(self, until: float) -> Budget:
        """Other requests that must still be done by `until`."""
        return Budget(self.slow, until)

    def unbounded(self) -> Budget:
        """Requests without a deadline (reads, operator commands, releases)."""
        return Budget.unbounded(self.slow)
