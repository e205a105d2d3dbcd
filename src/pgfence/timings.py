"""Every interval pgfence waits on, derived in this one place from one or two settings.

Whatever may take a lock over after a silence S, the lock's holder has killed its server
by its self-fence deadline D, and S - D is the margin. Both sides derive S and D from the
same record here (the holder from its own settings, a contender from the lock it reads),
so the takeover rule and the self-fence rule cannot disagree. In every mode S >= 2 D.

Lease mode (`--ttl`):

    renew interval      R = TTL / 6      the holder writes a heartbeat this often
    fence deadline      D = TTL / 2      the holder kills its server if no renewal that
                                         *started* within the last D seconds succeeded
    lock delay          L = TTL / 4      (default) extra wait before a takeover
    takeover wait       S = TTL + L      a contender must see the lease unchanged this long
    margin              S - D = TTL / 2 + L   (0.75 TTL with the default lock delay)

Strict mode (`--heartbeat-interval` I); only a contender with the holder's own token (the
same container restarted, or a second one with the same hostname) ever takes over:

    renew interval      R = I
    fence deadline      D = 3 I + 1 s    three missed heartbeats and a second of slack
    takeover wait       S = 2 D          for a same-token contender and `pgfence release`
    margin              S - D = D = 3 I + 1 s

The margin absorbs what the holder cannot control: the time to kill its process tree and
flush the data directory's filesystem, storage latency of its last write, how stale a
contender's read may be, and the difference in clock rates between hosts.

A one-line lock (the shell script's) has no heartbeat and no deadline: our own token's is
taken at once (the script's contract), another token's never.
"""

from __future__ import annotations

from pgfence.frozen import Struct
from pgfence.record import LockRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pgfence.record import Holder

MIN_TTL = 2.0
DEFAULT_TTL = 30.0
DEFAULT_HEARTBEAT_INTERVAL = 2.0
STRICT_SLACK = 1.0  # seconds added to a strict holder's deadline for slow storage


def holder_deadline(holder: LockRecord) -> float:
    """How long `holder` runs its server without a successful renewal (from the record,
    which carries the holder's settings)."""
    if holder.mode == "lease":
        return holder.ttl / 2
    return 3 * holder.interval + STRICT_SLACK


def takeover_silence(holder: LockRecord, contender: Timings | None = None) -> float:
    """The silence a contender (with `contender`'s settings; None: the holder's own) must
    observe before replacing `holder`'s lock, or before `pgfence release` deletes it.

    For a lease, the holder's own TTL and lock delay bound the wait from below, so a
    contender configured with shorter ones still waits out the holder's deadline.
    """
    if holder.mode == "lease":
        ttl, delay = holder.ttl, holder.lock_delay
        if contender is not None:
            ttl, delay = max(ttl, contender.ttl), max(delay, contender.lock_delay)
        return ttl + delay
    return 2 * holder_deadline(holder)


def stale_after(holder: LockRecord) -> float:
    """For `status` and `check`: a heartbeat older than this is called stale (a display
    judgement, never a reason to take a lock over)."""
    return 2 * holder.interval + 1.0


def claim_limit(holder: Holder, needed: float) -> float:
    """How long a takeover (or release) of `holder`'s lock may hold its claim before
    giving up.

    Contenders call a claim abandoned only after seeing it unchanged for twice this long
    (see FileBackend.acquire), so a claimer within its limit is never overtaken, even by
    a contender that waits less than we do: every contender of a lease waits at least the
    holder's own TTL (never less than MIN_TTL) plus its lock-delay, whatever TTL each was
    given; for other locks the wait depends on the holder alone.
    """
    floor = needed
    if isinstance(holder, LockRecord) and holder.mode == "lease":
        floor = min(needed, max(MIN_TTL, holder.ttl) + holder.lock_delay)
    return max(floor / 2, 1.0)


def claim_abandoned_after(holder: Holder | None, needed: float) -> float:
    """How long a claim on `holder`'s lock state must stay unchanged, the lock too,
    before a contender (or `pgfence release`) calls it abandoned and uses the next
    attempt's claim: at least twice any claimer's limit, so none is overtaken in time."""
    limit = 1.0 if holder is None else claim_limit(holder, needed)
    return max(needed, 2 * limit)


class Timings(Struct):
    mode: str  # "strict" or "lease"
    interval: float  # seconds between renewals (start to start)
    ttl: float  # 0 in strict mode
    lock_delay: float  # 0 in strict mode
    deadline: float  # self-fence after this long without a successful renewal
    poll: float  # how often a waiting contender reads the lock

    @classmethod
    def strict(cls, heartbeat_interval: float) -> Timings:
        deadline = 3 * heartbeat_interval + STRICT_SLACK
        return cls("strict", heartbeat_interval, 0.0, 0.0, deadline, min(0.5, heartbeat_interval))

    @classmethod
    def lease(cls, ttl: float, lock_delay: float | None = None) -> Timings:
        delay = ttl / 4 if lock_delay is None else lock_delay
        return cls("lease", ttl / 6, ttl, delay, ttl / 2, min(1.0, ttl / 10))

    @property
    def takeover_silence(self) -> float:
        """The least silence after which any contender may take over a lock we hold."""
        if self.mode == "lease":
            return self.ttl + self.lock_delay
        return 2 * self.deadline

    @property
    def margin(self) -> float:
        """Between our deadline and the earliest takeover of our lock: our server's tree
        must be killed and its writes flushed within this (and a watchdog set below it)."""
        return self.takeover_silence - self.deadline

    def takeover_wait(self, holder: LockRecord) -> float:
        """Silence we must observe before replacing `holder`'s lock."""
        return takeover_silence(holder, self)

    def describe(self) -> str:
        if self.mode == "strict":
            return (
                f"strict mode: heartbeat every {self.interval:g} s, self-fence after "
                f"{self.deadline:.3g} s without one, taken over only by the same token "
                f"after {self.takeover_silence:.3g} s of silence"
            )
        return (
            f"lease mode: TTL {self.ttl:g} s, renew every {self.interval:.3g} s, "
            f"self-fence after {self.deadline:.3g} s without a renewal, "
            f"takeover after {self.takeover_silence:.3g} s of silence"
        )
