"""The file backend: the fence is a lock file on the same volume as the data directory.

Who may take the lock (the policy; `lockfile.py` does the atomic writes):

    lock file          holder's token   strict mode           lease mode
    ---------------    --------------   -------------------   ------------------------------
    none               -                take it               take it
    one-line (legacy)  ours             take it (seed rule)   take it (seed rule)
    pgfence record     ours, other      take it after its     same (waiting instead of 73)
                       instance         takeover wait S;
                                        73 if it heartbeats
    any                another token    73                    strict or one-line lock: never
                                                              taken over (wait for release);
                                                              lease: take over after TTL +
                                                              lock-delay of silence

Every S is longer than the holder's self-fence deadline plus a margin (timings.py derives
both from the record). docs/protocol.md lists every step of every path, call by call.

"Silence" is always judged by reading the lock's content on this machine's monotonic
clock, never by timestamps or mtimes (NFS caches attributes, and hosts' clocks differ).
"""

from __future__ import annotations

import threading

from pgfence import clock, log
from pgfence.backends.base import (
    Backend,
    Hold,
    LockState,
    ReleaseSteps,
    fresh_record,
    judge_liveness,
    watch,
)
from pgfence.backends.file.claims import ClaimWait, claim_name, remove_under_claim
from pgfence.backends.file.generation import confirm_generation, reserve_generation
from pgfence.backends.file.lockfile import LockFile, NotDurable, Snapshot
from pgfence.errors import FencedOut, LockFormatError, LockLost
from pgfence.record import LegacyLock, LockRecord, generation_of, parse
from pgfence.timings import Timings, claim_limit

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pgfence.backends.base import Guard, Sleep
    from pgfence.record import Holder

PROGRESS_EVERY = 5.0  # seconds between "still waiting" messages


class FileHold(Hold):
    def __init__(self, lockfile: LockFile, record: LockRecord) -> None:
        self._lockfile = lockfile
        self._record = record
        self._written = Snapshot(record.encode())
        self._mutex = threading.Lock()  # renewals and release never overlap
        self.generation = record.generation
        self.instance = record.instance
        self.acquired_clock = record.clock

    def renew(self, guard: Guard) -> bool:
        with self._mutex:
            record = self._record.next_beat(clock.now(), clock.wall_iso())
            try:
                outcome = self._lockfile.renew(self._written, record.encode(), guard)
            except NotDurable:
                # The heartbeat is in place, so compare against it next time; but it may
                # not survive a storage crash, so this renewal does not count as one.
                self._record, self._written = record, Snapshot(record.encode())
                raise
            if outcome.ok:
                self._record, self._written = record, Snapshot(record.encode())
                return True
            if outcome.found == self._written:
                return False  # still ours, but the guard said it is too late to write
            raise LockLost(f"the lock at {self._lockfile.path} {_now_holds(outcome.found)}")

    def release(self, guard: Guard) -> bool:
        with self._mutex:
            # A writer that read the generation file long ago and renamed its write over it
            # late may have lowered it; with the lock gone, only the file would tell the
            # next holder that our generation was used.
            self._lockfile.raise_generation(self._record.generation, self.instance, guard)
            claim = claim_name(self._record, 1)
            # Should the unlink land late, the path is filled again with a newer heartbeat
            # of ours (which nobody renews) rather than left free: see LockFile.remove.
            refill = self._record.next_beat(clock.now(), clock.wall_iso()).encode()
            return self._lockfile.remove(self._written, claim, guard, refill).ok

    def regenerate(self, generation: int, guard: Guard) -> None:
        """Rewrite our fresh lock with another generation (see confirm_generation)."""
        with self._mutex:
            record = self._record.replace(generation=generation, heartbeat=1)
            outcome = self._lockfile.renew(self._written, record.encode(), guard)
            if not outcome.ok:
                raise LockLost(
                    f"the lock at {self._lockfile.path} {_now_holds(outcome.found)} "
                    "right after it was taken"
                )
            self._record, self._written = record, Snapshot(record.encode())
            self.generation = generation

    def child_values(self) -> dict[str, str | int]:
        return {"lock_file": self._lockfile.path}


class FileBackend(ReleaseSteps, Backend):
    def __init__(self, path: str, token: str, instance: str, timings: Timings, wait: bool) -> None:
        self._lockfile = LockFile(path, instance)
        self._token = token
        self._instance = instance
        self._timings = timings
        self._wait = wait

    def location(self) -> str:
        return self._lockfile.path

    # -- acquisition -----------------------------------------------------------------

    def acquire(self, sleep: Sleep) -> FileHold:
        watched: Snapshot | None = None  # the lock content we are timing
        since = 0.0  # when we first saw `watched`, on our clock
        changes = 0  # how often the lock changed while we watched: a live holder
        claims: ClaimWait | None = None  # of `watched`, once we claim it
        # A contender that waits (lease mode) says at once whom it waits for, and why;
        # a short observation that may end in one error line does not.
        waits = self._timings.mode == "lease" and self._wait
        next_progress = clock.now() + (0.0 if waits else PROGRESS_EVERY)
        first_wait = True
        while True:
            snapshot = self._lockfile.read()
            now = clock.now()
            if snapshot is None:
                hold = self._create()
                if hold:
                    return hold
                continue  # another process created it first: judge its lock
            holder = parse(snapshot.data, self._lockfile.path)
            if snapshot != watched:
                if watched is not None:
                    changes += 1
                watched, since, claims = snapshot, now, None
            needed = self._silence_needed(holder, changes)
            silent = now - since
            if needed is not None and silent >= needed:
                if claims is None:
                    claims = ClaimWait(holder, needed)
                claim = claims.claim()
                hold, busy_claim = self._takeover(snapshot, holder, claim, needed)
                if hold:
                    return hold
                busy = self._lockfile.read_claim(claim) if busy_claim else None
                if busy is None:
                    continue  # lock changed, or the other claimer finished: look again
                claims.held(busy, now)  # moves on to the next claim once it looks abandoned
            if now >= next_progress:
                next_progress = now + PROGRESS_EVERY
                message = _waiting_message(holder, silent, needed)
                if first_wait:
                    message, first_wait = f"{message} ({self._timings.describe()})", False
                log.event(
                    "waiting",
                    message,
                    holder=holder.token,
                    silent_seconds=round(silent, 1),
                    needed_seconds=needed,
                )
            sleep(self._timings.poll)

    def _silence_needed(self, holder: Holder, changes: int) -> float | None:
        """Seconds of silence after which `holder`'s lock is ours to take; None: never
        (wait for its release). Raises FencedOut when we must give up now."""
        where = self._lockfile.path
        if isinstance(holder, LegacyLock):
            if holder.token == self._token:
                return 0.0  # the shell script's rule: our token, our lock
            if self._timings.mode == "lease" and self._wait:
                return None
            raise FencedOut(f"fenced out: {where} is held by {holder.describe()}")
        if holder.token == self._token:
            if changes and not (self._timings.mode == "lease" and self._wait):
                raise FencedOut(
                    f"fenced out: {where} is held by another live pgfence with the same token "
                    f"{holder.token!r} (instance {holder.instance}, its heartbeat moved); "
                    "give each container a distinct token (FENCE_VARIABLE)"
                )
            return self._timings.takeover_wait(holder)
        if self._timings.mode == "strict":
            raise FencedOut(f"fenced out: {where} is held by {holder.describe()}")
        if holder.mode == "strict":
            if self._wait:
                return None
            raise FencedOut(
                f"fenced out: {where} is held by {holder.describe()}; "
                "lease mode never takes over a strict-mode lock"
            )
        if changes and not self._wait:
            raise FencedOut(
                f"fenced out: {where} is held by {holder.describe()}, whose lease is alive"
            )
        return self._timings.takeover_wait(holder)

    def _create(self) -> FileHold | None:
        started = clock.now()
        generation = reserve_generation(self._lockfile, None)
        record = self._new_record(generation, started)
        if not self._lockfile.create(record.encode()):
            return None
        # Claims to take over a lock of the generation before ours (a released holder's,
        # left by a crash) protect nothing any more.
        self._lockfile.remove_claims(f"{generation}-")
        return self._won(record, "acquired", "free")

    def _takeover(
        self, snapshot: Snapshot, holder: Holder, claim: str, needed: float
    ) -> tuple[FileHold | None, bool]:
        """Try to replace `snapshot`: (our hold, False) or (None, whether the claim was busy)."""
        started = clock.now()
        limit = claim_limit(holder, needed)
        built: list[LockRecord] = []

        def in_time() -> bool:
            # A claimer that stalled past its limit may meet a contender that has given
            # its claim up for abandoned: it must not write (nor free the claim).
            return clock.now() - started < limit

        def build() -> bytes:
            # Under the claim: only one contender of this state reserves a generation.
            built.append(self._new_record(reserve_generation(self._lockfile, holder), started))
            return built[-1].encode()

        outcome = self._lockfile.takeover(snapshot, build, claim, in_time)
        if not outcome.ok:
            return None, outcome.busy
        record = built[-1]
        self._lockfile.remove_claims(claim_name(holder, None))
        if not in_time():
            # Paused between the last check and the rename: a contender may have called
            # our claim abandoned, taken the lock over and started its server, and our
            # rename replaced its lease; it stops at its next renewal. Do not start ours
            # on this lock: wait out our own lease like any contender, then take it.
            log.event(
                "waiting",
                f"took over {self._lockfile.path} only {clock.now() - started:.2f} s after "
                f"deciding to (limit {limit:.3g} s): a newer holder may have been "
                "overwritten; not starting the command on it, waiting again",
                level="warning",
                generation=record.generation,
            )
            return None, False
        return self._won(record, "took over", holder.describe()), False

    def _won(self, record: LockRecord, verb: str, previous: str) -> FileHold:
        hold = FileHold(self._lockfile, record)
        confirm_generation(self._lockfile, hold, record.clock, self._timings.deadline)
        log.event(
            "acquired",
            f"{verb} {self._lockfile.path} as token {record.token!r} "
            f"(generation {hold.generation}; previously {previous}); "
            f"{self._timings.describe()}",
            lock=self._lockfile.path,
            token=record.token,
            instance=record.instance,
            generation=hold.generation,
            mode=record.mode,
            previous=previous,
        )
        return hold

    def _new_record(self, generation: int, started: float) -> LockRecord:
        return fresh_record(self._token, self._instance, self._timings, generation, started)

    # -- operator commands -----------------------------------------------------------

    def state(self, observe: float | None, sleep: Sleep) -> LockState:
        snapshot = self._lockfile.read()
        if snapshot is None:
            return LockState(self.location(), None, False, None, None, "none", 0.0)
        holder = parse(snapshot.data, self._lockfile.path)
        ours = holder.token == self._token
        if isinstance(holder, LegacyLock):
            return LockState(self.location(), holder, ours, None, None, "none", 0.0)
        return judge_liveness(
            self.location(),
            holder,
            ours,
            observe,
            lambda s: self.watch_lock(snapshot, s, sleep, None),
        )

    # -- the operator release's steps (ReleaseSteps.release runs release_fence) ----------

    def read_lock(self) -> tuple[bytes, Snapshot] | None:
        snapshot = self._lockfile.read()
        return None if snapshot is None else (snapshot.data, snapshot)

    def holder_of(self, snapshot: Snapshot) -> Holder:
        return parse(snapshot.data, self._lockfile.path)

    def delete_unchanged(
        self, snapshot: Snapshot, holder: Holder | None, sleep: Sleep
    ) -> str | None:
        if holder is not None and generation_of(holder):
            # Whatever the generation file says (lost, restored, or behind because the
            # holder crashed right after winning), the next holder gets a newer one.
            self._lockfile.raise_generation(generation_of(holder), "released")
        outcome = remove_under_claim(self._lockfile, snapshot, holder, self._timings.poll, sleep)
        return None if outcome.ok else f"now {_now_holds(outcome.found)}"

    def held_by_instance(self, instance: str) -> bool:
        snapshot = self._lockfile.read()
        if snapshot is None:
            return False
        holder = parse(snapshot.data, self._lockfile.path)
        return (
            isinstance(holder, LockRecord)
            and holder.token == self._token
            and holder.instance == instance
        )

    def watch_lock(
        self,
        snapshot: Snapshot,
        limit: float,
        sleep: Sleep,
        progress: Callable[[float], None] | None,
    ) -> tuple[str, float]:
        """Watch the lock for up to `limit` seconds (see base.watch)."""
        unchanged = snapshot.__eq__  # any other bytes: a heartbeat, a takeover
        return watch(self._lockfile.read, unchanged, limit, 0.1, sleep, progress)


def _waiting_message(holder: Holder, silent: float, needed: float | None) -> str:
    if needed is None:
        return (
            f"waiting: lock held by {holder.describe()}, which lease mode never takes "
            "over; waiting for it to be released"
        )
    return (
        f"waiting for the lock held by {holder.describe()}: heartbeat silent "
        f"{silent:.1f} s of {needed:.3g} s needed"
    )


def _now_holds(found: Snapshot | None) -> str:
    if found is None:
        return "was removed"
    try:
        return f"holds {parse(found.data, 'lock').describe()}"
    except LockFormatError:
        return "holds unreadable content"
