"""The small interface every backend implements, and the values it returns.

`run`, `status`, `release` and `check` only talk to a backend through this interface, so
they behave the same whether the fence is a file on a shared volume or a key in etcd.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod

from pgfence import clock, log
from pgfence.errors import FencedOut, LockFormatError
from pgfence.frozen import Struct
from pgfence.record import LegacyLock, LockRecord
from pgfence.timings import Timings, stale_after, takeover_silence

TYPE_CHECKING = False  # typing is not imported at run time: start-up cost (see frozen.py)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from pgfence.record import Holder

    # Sleeps for the given seconds on the monotonic clock; raises Interrupted when a
    # termination signal arrives meanwhile, so waiting never makes pgfence unkillable.
    Sleep = Callable[[float], None]
    # Checked immediately before a renewal is written: False: "too late, do not write".
    Guard = Callable[[], bool]
    # One read of the lock, as its backend tells that state of it from any other (the
    # file backend: the file's bytes; etcd: the key with its revisions).
    Seen = Any


class LockState(Struct):
    """What `status` and `check` report."""

    location: str  # lock file path or etcd key
    holder: Holder | None  # None: free
    ours: bool  # held under this process's token
    alive: bool | None  # heartbeat seen recently; None when it cannot be told
    heartbeat_age: float | None  # seconds since the last heartbeat, when known
    age_basis: str  # how heartbeat_age was obtained: "same-boot clock", "observed", "none"
    observed_for: float  # seconds spent watching for a heartbeat


class Hold(ABC):
    """A fence we hold. Renewed from one thread; released once, after renewals stopped."""

    generation: int
    instance: str  # this pgfence process's random id
    acquired_clock: float  # monotonic time at which the acquiring write started

    @abstractmethod
    def renew(self, guard: Guard) -> bool:
        """Write a heartbeat if the fence is still ours and `guard()` still allows it.

        Returns False when `guard()` refused. Raises LockLost when the fence is no
        longer ours, StorageError when the write failed (the caller decides whether that
        is fatal).
        """

    @abstractmethod
    def release(self, guard: Guard) -> bool:
        """Give the fence up if it is still ours and `guard()` allows it, checked
        immediately before the deleting call, as for a renewal: a holder past its
        deadline deletes nothing. False when the fence was left as it is."""

    @abstractmethod
    def child_values(self) -> dict[str, str | int]:
        """What this backend tells the supervised command about the hold, besides the
        generation, instance and location, by value name (environment.HELD names the
        variable each goes into, and how it is written)."""


class Backend(ABC):
    @abstractmethod
    def location(self) -> str:
        """Where the fence lives, for messages."""

    @abstractmethod
    def acquire(self, sleep: Sleep) -> Hold:
        """Take the fence, waiting as the mode allows; raises FencedOut when refused."""

    @abstractmethod
    def state(self, observe: float | None, sleep: Sleep) -> LockState:
        """The fence's state, watching a remote holder's heartbeat up to `observe` s."""

    @abstractmethod
    def release(self, force: bool, sleep: Sleep) -> str:
        """Operator release; returns what was done, raises FencedOut when refused.
        Both backends run `release_fence` with their own ReleaseSteps."""

    @abstractmethod
    def held_by_instance(self, instance: str) -> bool:
        """True if the fence is held right now by this token and pgfence instance."""


def first_line_of(data: bytes) -> str:
    """The first line of lock content (its token, if pgfence wrote it), for messages."""
    return data.split(b"\n", 1)[0].decode("utf-8", "replace")[:80]


def fresh_record(
    token: str, instance: str, timings: Timings, generation: int, started: float
) -> LockRecord:
    """The record a new holder writes: heartbeat 0, stamped with when its write started."""
    wall = clock.wall_iso()
    return LockRecord(
        token=token,
        instance=instance,
        mode=timings.mode,
        generation=generation,
        heartbeat=0,
        interval=timings.interval,
        ttl=timings.ttl,
        lock_delay=timings.lock_delay,
        pid=os.getpid(),
        host=os.uname().nodename,
        boot_id=clock.boot_id(),
        clock=started,
        acquired_at=wall,
        heartbeat_at=wall,
    )


def judge_liveness(
    where: str,
    holder: LockRecord,
    ours: bool,
    observe: float | None,
    watch_for: Callable[[float], tuple[str, float]],
) -> LockState:
    """Is `holder` alive? Exact on the same kernel boot (same monotonic clock), else by
    watching its heartbeat for `observe` seconds (default: long enough to call it silent)."""
    stale = stale_after(holder.interval)
    if holder.boot_id == clock.boot_id():
        age = clock.now() - holder.clock
        if age >= -1.0:
            age = max(age, 0.0)
            return LockState(where, holder, ours, age <= stale, age, "same-boot clock", 0.0)
    limit = min(takeover_silence(holder), stale) if observe is None else observe
    outcome, watched = watch_for(limit)
    if outcome == "gone":
        return LockState(where, None, False, None, None, "none", watched)
    if outcome == "moved":
        return LockState(where, holder, ours, True, watched, "observed", watched)
    alive = False if watched >= stale else None
    return LockState(where, holder, ours, alive, watched, "observed", watched)


def watch(
    read: Callable[[], Seen | None],
    unchanged: Callable[[Seen], bool],
    limit: float,
    poll: float,
    sleep: Sleep,
    progress: Callable[[float], None] | None,
) -> tuple[str, float]:
    """Read the lock for up to `limit` seconds, on our own clock, until it is gone (`read`
    returned None: its holder or an operator released it) or `unchanged` says it moved.

    Returns "gone", "moved" or "still" and the seconds watched; `progress` gets the
    seconds watched every 2 s.
    """
    start = clock.now()
    next_progress = start + 2.0
    while True:
        elapsed = clock.now() - start
        current = read()
        if current is None:
            return "gone", elapsed
        if not unchanged(current):
            return "moved", elapsed
        if elapsed >= limit:
            return "still", elapsed
        if progress and clock.now() >= next_progress:
            next_progress += 2.0
            progress(elapsed)
        sleep(min(poll, limit - elapsed))


class ReleaseSteps(ABC):
    """What an operator release (`release_fence`) does that depends on the backend. The
    first step reads the lock once; every later one acts on the state that read found
    (`seen`), never on whatever the lock holds by then. A backend lists it before
    Backend among its bases, so that this `release` is its `Backend.release`."""

    def release(self, force: bool, sleep: Sleep) -> str:
        return release_fence(self, force, sleep)

    @abstractmethod
    def location(self) -> str:
        """Where the fence lives, for messages."""

    @abstractmethod
    def read_lock(self) -> tuple[bytes, Seen] | None:
        """The lock's content and that state of it; None when there is no lock."""

    @abstractmethod
    def holder_of(self, seen: Seen) -> Holder:
        """Who holds it; LockFormatError (65) for content this backend never holds."""

    @abstractmethod
    def watch_lock(
        self, seen: Seen, limit: float, sleep: Sleep, progress: Callable[[float], None] | None
    ) -> tuple[str, float]:
        """Watch for up to `limit` s whether the lock stays `seen`: "moved", "gone" or
        "still", and the seconds watched (`watch` judges which)."""

    @abstractmethod
    def delete_unchanged(self, seen: Seen, holder: Holder | None, sleep: Sleep) -> str | None:
        """Delete the lock if it is still `seen` (`holder`: what it says, None when
        unreadable): None. If it changed, delete nothing and say what it holds now,
        as the end of "it ..."."""


def release_fence(steps: ReleaseSteps, force: bool, sleep: Sleep) -> str:
    """`pgfence release [--force]`: delete a lock whose holder is gone, and say what was
    removed. FencedOut (73) when refused; LockFormatError (65) for content pgfence did
    not write, unless forced.

    The lock is read once, and only the state that read found is judged and deleted: a
    lock that changed meanwhile (a live holder's heartbeat, a takeover) is never deleted.
    Without --force, a lock without heartbeat (one-line, sh shim) is refused, as nothing
    tells whether its holder runs; any other holder must stay silent for as long as a
    takeover of its lock waits, longer than its self-fence deadline plus a margin. With
    --force, whatever the lock holds is deleted; a live holder finds it gone at its next
    renewal and fences.
    """
    where = steps.location()
    read = steps.read_lock()
    if read is None:
        return f"{where} does not exist; nothing to release"
    content, seen = read
    try:
        holder: Holder | None = steps.holder_of(seen)
    except LockFormatError:
        if not force:
            raise
        holder = None
    if not force:
        assert holder is not None  # content that is no lock raised above
        if isinstance(holder, LegacyLock):
            raise FencedOut(
                f"{where} holds {holder.describe()}: a lock without heartbeat, so "
                "pgfence cannot tell whether its holder still runs; make sure no server "
                "runs on this data directory, then use `pgfence release --force`"
            )
        needed = takeover_silence(holder)
        outcome, _ = steps.watch_lock(seen, needed, sleep, _watch_progress(holder, needed))
        if outcome == "moved":
            raise FencedOut(
                f"not released: {where} is held by {holder.describe()}, "
                "whose heartbeat is moving (the holder is alive)"
            )
        if outcome == "gone":
            return (
                f"{where} disappeared while being watched (its holder released it, or "
                "its lease expired); nothing to release"
            )
    now_holds = steps.delete_unchanged(seen, holder, sleep)
    if now_holds is not None:
        raise FencedOut(
            f"not released: {where} changed while it was being released (it {now_holds}); "
            "look again with `pgfence status`"
        )
    return _report_removed(where, holder, first_line_of(content), force)


def _watch_progress(holder: Holder, needed: float) -> Callable[[float], None]:
    """Progress lines for an operator release watching `holder`'s heartbeat."""

    def progress(silent: float) -> None:
        log.event(
            "waiting",
            f"watching {holder.describe()}: heartbeat silent {silent:.1f} s of {needed:g} s needed",
            silent_seconds=round(silent, 1),
            needed_seconds=needed,
        )

    return progress


def _report_removed(where: str, holder: Holder | None, first_line: str, force: bool) -> str:
    """Log what an operator release removed (a warning: it is never routine) and say it."""
    what = holder.describe() if holder else f"unreadable content (first line {first_line!r})"
    log.event(
        "removed",
        f"removed {where}, which held {what}",
        level="warning",
        lock=where,
        forced=force,
        first_line=first_line,
    )
    return f"released {where} (it held {what})"
