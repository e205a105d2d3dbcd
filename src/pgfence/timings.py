"""Every interval pgfence waits on, derived in this one place from one or two settings.

Whatever may take a lock over after a silence S, the lock's holder has killed its server
by its self-fence deadline D, and S - D is the margin. Both sides derive S and D from the
same record here (the holder from its own settings, a contender from the lock it reads),
so the takeover rule and the self-fence rule cannot disagree. In every mode S >= 2 D.

Lease mode (`--ttl`):

    renew interval      R = TTL / 6      the holder writes a heartbeat this often
    fence deadline      D = TTL / 2      the holder kills its server if no renewal that
                                         *started* within the last D seconds succeeded
    lock delay          L = TTL / 4      (default; etcd: D + R, and no less) extra wait
                                         before a takeover: see `lock_delay`
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
contender's read may be, and the difference in clock rates between hosts. Of it, the
holder waits at most half for the flush (F = margin / 2), and a watchdog resets the
machine T = floor(margin - max(1 s, margin / 10)) after the last keepalive.

The lock-delay rule, one for both backends (`lock_delay`): a contender waits the larger
of its own lock delay and the holder's; where it counts the delay from the lock's
disappearance (etcd: a key can vanish while its holder still runs), also never less than
D + R of the holder, or of one with the contender's own TTL (a holder it never saw).

A one-line lock (the shell script's) has no heartbeat and no deadline: our own token's is
taken at once (the script's contract), another token's never.
"""

from __future__ import annotations

import math

from pgfence.frozen import Struct
from pgfence.record import LockRecord

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pgfence.record import Holder

MIN_TTL = 2.0
DEFAULT_TTL = 30.0
DEFAULT_HEARTBEAT_INTERVAL = 2.0
STRICT_SLACK = 1.0  # seconds added to a strict holder's deadline for slow storage
LEADERLESS_MARGIN = 0.25  # s: an etcd election's own messages, a scheduling delay


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

    @classmethod
    def of(cls, holder: LockRecord) -> Timings:
        """The timings `holder` runs by, from the settings its record states: what a
        contender judges it by (its deadline above all)."""
        if holder.mode == "lease":
            return cls.lease(holder.ttl, holder.lock_delay)
        return cls.strict(holder.interval)

    @property
    def takeover_silence(self) -> float:
        """The least silence after which any contender may take over a lock we hold."""
        if self.mode == "lease":
            return self.ttl + lock_delay(self, None)
        return 2 * self.deadline

    @property
    def margin(self) -> float:
        """Between our deadline and the earliest takeover of our lock: our server's tree
        must be killed and its writes flushed within this (and a watchdog set below it)."""
        return self.takeover_silence - self.deadline

    @property
    def flush_bound(self) -> float:
        """How long we wait for the flush after killing our server: half the margin, so
        that the kill time, a stale read, the last write's latency and clock-rate
        differences keep the other half."""
        return self.margin / 2

    @property
    def watchdog_timeout(self) -> int:
        """Whole seconds T with D + T below S: a reset T after our last keepalive (sent
        before D) comes before any takeover, with max(1 s, margin / 10) to spare for clock
        rates and the driver's precision. May be less than 1: no watchdog fits."""
        return math.floor(self.margin - max(1.0, self.margin / 10))

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


# -- what a contender waits for --------------------------------------------------------


def lock_delay(
    contender: Timings, holder: LockRecord | None, *, from_absence: bool = False
) -> float:
    """L: how long `contender` waits, beyond what tells it that `holder`'s lease ended,
    before it takes the lock (holder None: none known but the contender itself, as for
    the takeover of our own lock, or a free lock whose last holder, if any, it never
    saw). The rule both backends follow:

    - The larger of the contender's lock delay and the holder's: whichever of the two was
      configured shorter, the wait still covers the margin the other counted on.
    - `from_absence`: the delay is counted from the moment the lock was seen gone, not
      after a silence the contender timed itself. An etcd key can vanish while its holder
      still runs (a lease revoked by a stuck leader, `etcdctl del`, `release --force`);
      that holder notices at its next renewal and fences at the latest at its deadline.
      So L is also never less than D + R (`vanished_lock_delay`) of the holder, nor of
      one with the contender's own TTL: a holder may have come and gone between two
      reads, unseen. A lock file needs no such floor: its holder's silence is timed by
      the contender, the TTL alone (>= 2 D) outlasts the holder's deadline, and L there
      is margin on top.
    """
    delay = contender.lock_delay
    if holder is not None:
        delay = max(delay, holder.lock_delay)
    if from_absence:
        ttl = contender.ttl if holder is None else max(contender.ttl, holder.ttl)
        delay = max(delay, vanished_lock_delay(ttl))
    return delay


def vanished_lock_delay(ttl: float) -> float:
    """The shortest lock delay that outlasts a lease holder (with this TTL) whose lock
    vanished under it: it fences at the latest at its deadline D after its last
    successful renewal, and one renewal interval R more covers killing its server. The
    etcd backend's default lock delay, and its minimum."""
    lease = Timings.lease(ttl)
    return lease.deadline + lease.interval


def takeover_silence(holder: LockRecord, contender: Timings | None = None) -> float:
    """The silence a contender (with `contender`'s settings; None: the holder's own) must
    observe before replacing `holder`'s lock, or before `pgfence release` deletes it.

    For a lease, the holder's own TTL and lock delay bound the wait from below, so a
    contender configured with shorter ones still waits out the holder's deadline.
    """
    if holder.mode == "lease":
        own = Timings.of(holder) if contender is None else contender
        return max(holder.ttl, own.ttl) + lock_delay(own, holder)
    return 2 * Timings.of(holder).deadline


def stale_after(interval: float) -> float:
    """For `status`, `check` and /healthz: a heartbeat of a holder renewing every
    `interval` is called stale after two missed renewals and a second (a display
    judgement, never a reason to take a lock over)."""
    return 2 * interval + 1.0


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


# -- the etcd backend's intervals ------------------------------------------------------


def etcd_lease_seconds(ttl: float) -> int:
    """The TTL of the etcd lease we grant: etcd counts whole seconds, so the TTL rounded
    up (never shorter than ours: the lease outlives our deadline)."""
    return max(1, math.ceil(ttl))


def heartbeat_write_interval(timings: Timings) -> float:
    """Seconds between etcd heartbeat writes: one per TTL, every sixth renewal (each
    write adds to etcd's history; the renewals between only compare)."""
    return max(timings.interval, 6 * timings.interval)


def heartbeat_write_after(timings: Timings) -> float:
    """How long after a heartbeat write a renewal writes the next one: the write interval
    less half a renewal interval, so that a renewal started a little early (renewals are
    timed start to start) still writes instead of leaving it to the next."""
    return heartbeat_write_interval(timings) - timings.interval / 2


def request_timeouts(timings: Timings) -> tuple[float, float]:
    """(renewal request timeout, timeout of everything else) for etcd.

    A renewal may meet an endpoint that stopped answering and must still fail over to the
    next one well within the fence deadline D: each request gets D/3 (0.5 to 5 s), and a
    renewal as a whole gets D. Requests that do not race the deadline get at least 2 s.
    """
    fast = min(5.0, max(0.5, timings.deadline / 3))
    return fast, max(fast, 2.0)


def etcd_minimum_ttl(election_timeout: float) -> float:
    """The shortest TTL whose holder survives an etcd leader failure (quorum kept).

    With the leader gone, no renewal succeeds until the others elect a new one: up to
    two election timeouts (each member waits a random timeout in [ET, 2 ET)), and one
    more when two candidates split the vote, plus one request timeout for a renewal that
    was waiting on the failed member. The holder must come through that within its fence
    deadline, TTL/2. (With two election timeouts and no more, a holder at that minimum
    self-fenced once in three leader crashes on etcd 3.4.23.) In tenths of a second.
    """
    needed = 3 * election_timeout + LEADERLESS_MARGIN
    deadline = needed + 0.5
    for _ in range(60):  # the request timeout grows with the deadline, by a third
        deadline = needed + request_timeouts(Timings.lease(2 * deadline))[0]
    return math.ceil(20 * deadline - 1e-9) / 10
