"""The etcd backend: the fence is one etcd key, attached to a lease.

Who may create the key (it is never overwritten, only created when absent):

    key                    holder's token   --wait (the default)       --no-wait
    ---------------------  ---------------  -------------------------  -----------------------
    absent                 -                create it, once absent     the same
                                            for the lock delay
    pgfence record         another token    wait until it is gone      73
    pgfence record         ours, another    wait until it is gone      73 once its heartbeat
                           instance                                    moves; create it if it
                                                                       disappears first
    pgfence record         ours, this       our own create, whose      the same
                           instance's lease answer was lost
    anything else          -                65                         65

The key disappears when its holder deletes it or its lease expires, but also while its
holder still runs: a lease revoked by a stuck etcd leader (etcd#15247), `etcdctl del`,
`release --force`. That holder notices at its next renewal, and fences at the latest at
its deadline, TTL/2 after its last successful renewal; a contender may never have seen
it. So a contender creates the key only after it has seen it absent, without a break, for
the lock delay, which is at least TTL/2 + TTL/6, and at least that of a holder it saw,
even on its first look (the lock-delay rule: `timings.lock_delay`). Then it creates the
key in a transaction (create revision 0 -> put): of many contenders exactly one succeeds.

Acquisition grants a lease of ceil(TTL) seconds, then creates the key attached to it. The
fencing token (PGFENCE_GENERATION) is the key's create revision, which grows with every
acquisition on one etcd cluster, but goes back when etcd is restored from a snapshot or
replaced by a new cluster. So each holder also records its generation beside the data
directory, in `<lock file>.generation` (the file the file backend keeps for the same
purpose), and hands out one more than that mark when the revision is not larger: the
generation only grows on a data directory, across restores, new clusters and switches
between backends. Without that directory (FENCE_LOCK_FILE's) it is the bare revision,
with a warning.

Renewal (every TTL/6) is a lease keep-alive, then a transaction that checks the key
(etcd/hold.py); both must succeed, at one raft term. The transaction needs a quorum, so a
renewal never succeeds through a member cut off from the majority. The holder fences on
its own clock, TTL/2 after the start of its last successful renewal (`runloop.py`); the
lease cannot expire before ceil(TTL) after that keep-alive reached the leader (a new
leader restarts every lease's full TTL, so leader changes only lengthen it), and a
contender then waits lock-delay more: the margin is at least TTL/2 + lock-delay.

Liveness, for `status`, `check` and `release`, is judged as with the file backend: the
record's heartbeat (written once per TTL, the interval the record states, so its mod
revision moves) or, on the holder's own boot, the age of its monotonic clock reading.
The lease's remaining TTL is not used: etcd reports it in whole seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from pgfence import clock, log
from pgfence.backends.base import (
    Backend,
    LockState,
    ReleaseSteps,
    fresh_record,
    judge_liveness,
    watch,
)
from pgfence.backends.etcd.client import EtcdClient, KeyValue, first_kv
from pgfence.backends.etcd.config import open_client
from pgfence.backends.etcd.generation_mark import GenerationMark
from pgfence.backends.etcd.hold import EtcdHold, FenceKey, compare, delete, get, put
from pgfence.errors import FencedOut, LockLost, PgfenceError, StorageError
from pgfence.record import LockRecord
from pgfence.timings import Timings, etcd_lease_seconds, lock_delay

if TYPE_CHECKING:
    from pgfence.backends.base import Sleep
    from pgfence.config import Settings
    from pgfence.record import Holder

PROGRESS_EVERY = 5.0  # seconds between "still waiting" messages
WATCH_POLL = 0.2  # seconds between reads while watching a heartbeat


class EtcdBackend(ReleaseSteps, Backend):
    def __init__(
        self,
        client: EtcdClient,
        key: str,
        token: str,
        instance: str,
        timings: Timings,
        wait: bool,
        lock_file: str | None = None,
    ) -> None:
        self.client = client
        self._mark = GenerationMark(lock_file, instance) if lock_file else None
        self._fence = FenceKey(client, key, timings)
        self.key = self._fence.key
        self._token = token
        self._instance = instance
        self._timings = timings
        self._wait = wait
        self.deadline = self._fence.deadline
        self.timeouts = self._fence.timeouts
        self._lease_ttl = etcd_lease_seconds(timings.ttl)

    @classmethod
    def from_settings(cls, settings: Settings, instance: str) -> EtcdBackend:
        """Check the etcd options (no network yet) and build the backend."""
        client, key = open_client(settings)
        return cls(
            client,
            key,
            settings.token,
            instance,
            settings.timings,
            settings.wait,
            settings.lock_file,
        )

    def location(self) -> str:
        return self._fence.location()

    # -- acquisition -----------------------------------------------------------------

    def acquire(self, sleep: Sleep) -> EtcdHold:
        contacted = False  # etcd answered once: later outages are waited out (--wait)
        watched: KeyValue | None = None
        beats = 0  # how often the watched holder's heartbeat moved
        previous = "free"
        absent_since: float | None = None  # first of the reads, all since, that found no key
        delay = lock_delay(self._timings, None, from_absence=True)
        pending: dict[int, int] = {}  # lease -> its TTL, of creates whose answer was lost
        # A waiting contender says at once whom it waits for, and why; one that gives
        # up at the first sign of a live holder (--no-wait) ends with one error line.
        next_progress = clock.now() + (0.0 if self._wait else PROGRESS_EVERY)
        timings = f" ({self._timings.describe()})"  # in the first message only
        announced = False
        while True:
            try:
                kv = self._fence.read()
                contacted = True
                if kv is not None and kv.lease in pending:
                    hold = self._adopt(kv, pending[kv.lease], previous)  # may raise: kept
                    del pending[kv.lease]
                    if hold is not None:
                        self._forget(pending)
                        return hold
                    continue
                if kv is None:
                    # Create the key only once it has been seen absent for the lock delay
                    # without a break, even on the first look: a key can vanish while its
                    # holder still runs (module docstring), and that holder may be one this
                    # contender never saw.
                    now = clock.now()
                    if absent_since is None:
                        absent_since = now
                    left = absent_since + delay - now
                    if left > 0:
                        if not announced and delay >= 1.0:
                            announced = True
                            log.event(
                                "waiting",
                                f"{self.location()} is free: creating it once it stayed "
                                f"free for the lock delay ({delay:.3g} s), which outlasts "
                                "any holder that lost it without noticing yet",
                            )
                        sleep(min(self._timings.poll, left))
                        continue
                    absent_since = None
                    created = self._create(previous, pending)
                    if isinstance(created, EtcdHold):
                        self._forget(pending)
                        return created
                    kv = created
                    if kv is None or kv.lease in pending:
                        continue  # look again (and adopt the key if it is our own)
            except StorageError as exc:
                absent_since = None  # the key may have come and gone unseen meanwhile
                if not (contacted and self._wait):
                    self._forget(pending)
                    raise
                if clock.now() >= next_progress:
                    next_progress = clock.now() + PROGRESS_EVERY
                    log.event(
                        "waiting",
                        f"waiting for {self.location()}: etcd is unavailable ({exc.message})",
                        level="warning",
                    )
                sleep(self._timings.poll)
                continue
            absent_since = None
            holder = self._fence.holder_of(kv)
            # The holder that goes away may have a longer TTL than ours: outlast it too.
            delay = max(delay, lock_delay(self._timings, holder, from_absence=True))
            if watched is not None and kv.create_revision == watched.create_revision:
                beats += kv.mod_revision != watched.mod_revision
            else:
                beats = 0
            watched, previous = kv, holder.describe()
            if holder.token != self._token and not self._wait:
                raise FencedOut(f"fenced out: {self.location()} is held by {holder.describe()}")
            if holder.token == self._token and beats and not self._wait:
                raise FencedOut(
                    f"fenced out: {self.location()} is held by another live pgfence with the "
                    f"same token {holder.token!r} (instance {holder.instance}, its heartbeat "
                    "moved); give each container a distinct token (FENCE_VARIABLE)"
                )
            if clock.now() >= next_progress:
                next_progress = clock.now() + PROGRESS_EVERY
                log.event(
                    "waiting",
                    f"waiting for {self.location()}, held by {holder.describe()}: it is "
                    f"free when its holder releases it or its lease ({self._lease_left(kv)}) "
                    f"expires{timings}",
                    holder=holder.token,
                    lease=f"{kv.lease:x}",
                )
                timings = ""
            sleep(self._timings.poll)

    def _create(self, previous: str, pending: dict[int, int]) -> EtcdHold | KeyValue | None:
        """Create the key: our hold, or the key another contender created first. When the
        answer is lost, the lease is kept in `pending`: a key found under it is ours."""
        started = clock.now()
        budget = self.timeouts.bounded(started + self.deadline)
        lease, granted = self.client.grant(self._lease_ttl, budget)
        record = self._new_record(started)
        value = record.encode()
        try:
            ok, responses = self.client.txn(
                [compare(self.key, "CREATE", 0)],
                [put(self.key, value, lease), get(self.key)],
                [get(self.key)],
                budget,
            )
        except PgfenceError:
            pending[lease] = granted  # the create may have landed: we will recognise it
            raise
        found = first_kv(responses[-1]) if responses else None
        if found is not None and found.lease == lease and not ok:
            # A resent create (its first answer lost) found the key the first one made.
            pending[lease] = granted
            return found
        if not ok or found is None or found.lease != lease:
            self._fence.revoke_quietly(lease)
            return found
        record = record.replace(generation=found.create_revision)
        hold = EtcdHold(self._fence, record, value, lease, granted, started)
        return self._acquired(hold, started, previous)

    def _adopt(self, kv: KeyValue, granted: int, previous: str) -> EtcdHold | None:
        """The key under a lease of ours whose create's answer was lost: our own create.
        Renewed once before it counts, so its deadline starts now; None if that fails
        because the key is not ours after all."""
        record = self._fence.own_record(kv, self._instance, kv.lease, kv.create_revision)
        if record is None:
            self._fence.revoke_quietly(kv.lease)
            return None
        record = record.replace(generation=kv.create_revision)  # what the hold compares
        started = clock.now()
        hold = EtcdHold(self._fence, record, kv.value, kv.lease, granted, started)
        try:
            if not hold.renew(lambda: True):
                return None
        except LockLost:
            return None
        log.event("adopted", f"{self.location()} was created by this pgfence, its answer lost")
        return self._acquired(hold, started, previous)

    def _acquired(self, hold: EtcdHold, started: float, previous: str) -> EtcdHold:
        try:
            last = self._mark.last() if self._mark else None
            if self._mark and last is not None:
                if last >= hold.generation:
                    hold.raise_generation(last + 1)
                self._mark.record(hold.generation)
        except PgfenceError:
            hold.release(lambda: True)  # nothing started: give the key back at once
            raise
        hold.write_generation()
        if clock.now() - started >= self.deadline:
            hold.release(lambda: True)  # compares our create revision: never a successor's
            raise StorageError(
                f"acquiring {self.location()} took longer than the fence deadline "
                f"({self.deadline:.3g} s); etcd is too slow for this TTL"
            )
        if self.client.version_warning:
            log.event("etcd_version", self.client.version_warning, level="warning")
        log.event(
            "acquired",
            f"acquired {self.location()} as token {self._token!r} (generation "
            f"{hold.generation}, lease {hold.lease:x} of {hold.granted} s; previously "
            f"{previous}); {self._timings.describe()}",
            lock=self.location(),
            token=self._token,
            instance=self._instance,
            generation=hold.generation,
            lease=f"{hold.lease:x}",
            lease_ttl=hold.granted,
            previous=previous,
        )
        return hold

    def _forget(self, pending: dict[int, int]) -> None:
        for lease in pending:
            self._fence.revoke_quietly(lease)
        pending.clear()

    def _new_record(self, started: float) -> LockRecord:
        # generation 0: the key's create revision is written right after the key exists;
        # the interval readers judge liveness by is that of heartbeat writes
        record = fresh_record(self._token, self._instance, self._timings, 0, started)
        return record.replace(interval=self._fence.write_every)

    def _lease_left(self, kv: KeyValue) -> str:
        try:
            left, granted = self.client.time_to_live(kv.lease, self.timeouts.unbounded())
        except PgfenceError:
            return f"{kv.lease:x}"
        return f"{kv.lease:x}, {max(left, 0)} s of {granted} s left"

    # -- operator commands ---------------------------------------------------------------

    def state(self, observe: float | None, sleep: Sleep) -> LockState:
        where = self.location()
        kv = self._fence.read()
        if kv is None:
            return LockState(where, None, False, None, None, "none", 0.0)
        holder = self._fence.holder_of(kv)
        ours = holder.token == self._token
        return judge_liveness(
            where, holder, ours, observe, lambda s: self.watch_lock(kv, s, sleep, None)
        )

    # -- the operator release's steps (ReleaseSteps.release runs release_fence) ----------

    def read_lock(self) -> tuple[bytes, KeyValue] | None:
        kv = self._fence.read()
        return None if kv is None else (kv.value, kv)

    def holder_of(self, kv: KeyValue) -> LockRecord:
        return self._fence.holder_of(kv)

    def delete_unchanged(self, kv: KeyValue, holder: Holder | None, sleep: Sleep) -> str | None:
        # Every write gives the key a new mod revision, and so does its deletion and
        # re-creation: an equal one is the state that was read.
        ok, responses = self.client.txn(
            [compare(self.key, "MOD", kv.mod_revision)],
            [delete(self.key)],
            [get(self.key)],
            self.timeouts.unbounded(),
        )
        if not ok:
            return self._fence.now_holds(first_kv(responses[0]) if responses else None)
        if kv.lease:
            self._fence.revoke_quietly(kv.lease)  # its holder's next keep-alive then fails at once
        return None

    def held_by_instance(self, instance: str) -> bool:
        kv = self._fence.read()
        if kv is None:
            return False
        holder = self._fence.holder_of(kv)
        return holder.token == self._token and holder.instance == instance

    def watch_lock(
        self,
        kv: KeyValue,
        limit: float,
        sleep: Sleep,
        progress: Callable[[float], None] | None,
    ) -> tuple[str, float]:
        """Watch the key up to `limit` s (see base.watch): every write gives it a new mod
        revision, and a deletion and re-creation a new create revision."""

        def unchanged(current: KeyValue) -> bool:
            return (current.create_revision, current.mod_revision) == (
                kv.create_revision,
                kv.mod_revision,
            )

        return watch(self._fence.read, unchanged, limit, WATCH_POLL, sleep, progress)
