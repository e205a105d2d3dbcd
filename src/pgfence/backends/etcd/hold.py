"""One fence key in etcd: reading it, and holding it (renewal and release).

A renewal is a lease keep-alive, then a transaction that checks that the key still has
our create revision, our lease and the value we last wrote; both must succeed, at the
same raft term, and the whole renewal gives up at the fence deadline (retrying while etcd
has no leader). The transaction needs a quorum (a read-only one is a linearizable read),
so no renewal succeeds through a member cut off from the majority. Such a member, if it
led, may still answer keep-alives for an election timeout, but at its old term: a
keep-alive answered at another term than the transaction is sent again where the
transaction was answered, and the renewal counts only if the terms then agree.

Every write adds to etcd's history (about 400 bytes), which etcd keeps until it is
compacted. So the heartbeat (the record with its counter and clock) is written only once
per TTL, by the transaction of that renewal; the others only compare. `status`, `check`
and `release` judge liveness from the record's interval, which is that write interval.
A write refused because etcd's database is full does not fail the renewal: the compare
alone still proves the key ours, and a full etcd must not stop every database.
"""

from __future__ import annotations

import threading
import time

from pgfence import clock, log
from pgfence.backends.base import Hold
from pgfence.backends.etcd.budget import Budget, RequestTimeouts
from pgfence.backends.etcd.client import (
    EtcdClient,
    EtcdNoSpace,
    EtcdUnavailable,
    GuardRefused,
    Json,
    KeyValue,
    b64,
    first_kv,
)
from pgfence.errors import LockFormatError, LockLost, PgfenceError, StorageError
from pgfence.record import LegacyLock, LockRecord, parse
from pgfence.timings import (
    Timings,
    heartbeat_write_after,
    heartbeat_write_interval,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pgfence.backends.base import Guard

RETRY_PAUSE = 0.1  # s between the attempts of one renewal while etcd has no leader

# -- parts of the transactions on the key ---------------------------------------------------


def compare(key: bytes, target: str, value: int | bytes) -> Json:
    """`target` is CREATE, MOD, VERSION, LEASE or VALUE; the result is always EQUAL."""
    field = {
        "CREATE": "create_revision",
        "MOD": "mod_revision",
        "VERSION": "version",
        "LEASE": "lease",
        "VALUE": "value",
    }[target]
    encoded = b64(value) if isinstance(value, bytes) else str(value)
    return {"key": b64(key), "target": target, "result": "EQUAL", field: encoded}


def put(key: bytes, value: bytes, lease: int) -> Json:
    return {"request_put": {"key": b64(key), "value": b64(value), "lease": str(lease)}}


def get(key: bytes) -> Json:
    return {"request_range": {"key": b64(key)}}


def delete(key: bytes) -> Json:
    return {"request_delete_range": {"key": b64(key)}}


class FenceKey:
    """The key, the client that reaches it, and how long requests about it may take."""

    def __init__(self, client: EtcdClient, key: str, timings: Timings) -> None:
        self.client = client
        self.text = key
        self.key = key.encode("utf-8", "surrogateescape")
        self.deadline = timings.deadline
        self.timeouts = RequestTimeouts.of(timings)
        self.interval = timings.interval
        self.write_every = heartbeat_write_interval(timings)
        self.write_after = heartbeat_write_after(timings)

    def location(self) -> str:
        return f"etcd:{self.text}"

    def read(self) -> KeyValue | None:
        return self.client.get(self.key, self.timeouts.unbounded())

    def holder_of(self, kv: KeyValue) -> LockRecord:
        """The pgfence record in `kv`, its generation being the key's create revision;
        LockFormatError (65) for anything pgfence did not write."""
        where = f"etcd key {self.text}"
        hint = (
            "inspect it with `etcdctl get`, and if no server runs on this data directory "
            "remove it with `pgfence release --force`"
        )
        try:
            holder = parse(kv.value, self.text)
        except LockFormatError as exc:
            raise LockFormatError(exc.message.replace(f"lock file {self.text}", where, 1)) from None
        if isinstance(holder, LegacyLock):
            raise LockFormatError(
                f"{where} holds the one-line value {holder.token!r}, which pgfence never "
                f"writes to etcd; {hint}"
            )
        if kv.lease == 0:
            raise LockFormatError(
                f"{where} holds {holder.describe()} without a lease, which pgfence never "
                f"writes (it would never expire); {hint}"
            )
        # The generation is the create revision unless the holder's high-water mark beside
        # the data directory raised it (after an etcd restore, say): then its record says.
        return holder.replace(generation=max(holder.generation, kv.create_revision))

    def own_record(
        self, kv: KeyValue | None, instance: str, lease: int, revision: int
    ) -> LockRecord | None:
        """The record in `kv` if it is exactly that hold's, else None."""
        if kv is None or kv.lease != lease or kv.create_revision != revision:
            return None
        try:
            record = self.holder_of(kv)
        except LockFormatError:
            return None
        return record if record.instance == instance else None

    def now_holds(self, kv: KeyValue | None) -> str:
        if kv is None:
            return "was deleted"
        try:
            holder = self.holder_of(kv)
        except LockFormatError:
            return "holds content pgfence did not write"
        return f"now holds {holder.describe()} (lease {kv.lease:x})"

    def revoke_quietly(self, lease: int) -> None:
        try:
            self.client.revoke(lease, self.timeouts.unbounded())
        except PgfenceError:
            pass  # an unused lease expires by itself


class EtcdHold(Hold):
    def __init__(
        self,
        fence: FenceKey,
        record: LockRecord,
        value: bytes,
        lease: int,
        granted: int,
        acquired: float,
    ) -> None:
        self._fence = fence
        self._client = fence.client
        self._key = fence.key
        self._record = record
        self._value = value  # what we last wrote: renewals compare against it
        self.lease = lease
        self.granted = granted
        self._mutex = threading.Lock()  # renewals and release never overlap
        self.revision = record.generation  # the key's create revision: what we compare
        self.generation = record.generation  # the fencing token: at least the revision
        self.instance = record.instance
        self.acquired_clock = acquired
        self._renewed_at = acquired  # start of the newest renewal that succeeded
        self._written_at = acquired  # start of the newest heartbeat write
        self._full_since: float | None = None  # etcd refused writes: database full

    def renew(self, guard: Guard) -> bool:
        with self._mutex:
            started = clock.now()
            # The renewal as a whole ends where its success would put the fence deadline.
            budget = self._fence.timeouts.renewal(started + self._fence.deadline, guard)
            try:
                while True:
                    try:
                        self._renew_once(budget)
                        break
                    except EtcdUnavailable:
                        # No leader for now (an election), or no endpoint answered: etcd
                        # elects within two election timeouts, so try again within the
                        # budget rather than waiting for the next renewal; but give up
                        # a renewal interval early, so that the reason is logged before
                        # the deadline fences.
                        if not budget.ensure(RETRY_PAUSE + self._fence.interval):
                            raise
                        time.sleep(RETRY_PAUSE)
            except GuardRefused:
                return False
            except (LockLost, StorageError):
                raise
            except PgfenceError as exc:  # e.g. credentials refused mid-hold: not fatal by itself
                raise StorageError(exc.message) from None
            except Exception as exc:  # never a traceback from the renewer: the deadline decides
                raise StorageError(f"renewal failed unexpectedly: {exc!r}") from None
            self._renewed_at = started
            return True

    def _renew_once(self, budget: Budget) -> None:
        kept_at = self._keepalive(budget)
        since = clock.now() - self._written_at
        write = since >= self._fence.write_after
        checked_at = None
        if write:
            started = clock.now()
            try:
                checked_at = self._beat(self._record.next_beat(started, clock.wall_iso()), budget)
                self._written_at = started
                self._full_since = None
            except EtcdNoSpace as exc:
                if self._full_since is None:
                    self._full_since = started
                    log.event("etcd_full", f"heartbeat not written: {exc.message}", level="error")
        if checked_at is None:
            checked_at = self._check(budget)
        if kept_at != checked_at:
            # The keep-alive may have reached a leader cut off from the majority, whose
            # renewal counts for nothing once another member leads: renew again where
            # the transaction was answered (the endpoint tried first now).
            first = kept_at
            kept_at = self._keepalive(budget)
            if kept_at == checked_at:
                log.event(
                    "etcd_term",
                    f"the lease keep-alive was answered at raft term {first} and the check "
                    f"at term {checked_at}: renewed the lease again at term {checked_at}",
                )
            else:
                raise StorageError(
                    f"the lease keep-alive was answered at raft term {kept_at} and the "
                    f"check of {self._fence.location()} at term {checked_at} (an etcd "
                    "election is under way)"
                )

    def _keepalive(self, budget: Budget) -> int:
        """Renew the lease; the raft term at which it was renewed."""
        ttl, term = self._client.keepalive(self.lease, budget)
        if ttl <= 0:
            raise LockLost(
                f"etcd no longer knows the lease {self.lease:x} of "
                f"{self._fence.location()}: it expired or was revoked"
            )
        return term

    def _check(self, budget: Budget) -> int:
        """Is the key still ours (a linearizable read, no write)? Its raft term."""
        key = self._key
        ok, responses = self._client.txn(
            [
                compare(key, "CREATE", self.revision),
                compare(key, "LEASE", self.lease),
                compare(key, "VALUE", self._value),
            ],
            [],
            [get(key)],
            budget,
        )
        term = self._client.last_term
        if ok:
            return term
        found = first_kv(responses[0]) if responses else None
        mine = self._fence.own_record(found, self.instance, self.lease, self.revision)
        if found is None or mine is None:
            raise LockLost(f"{self._fence.location()} {self._fence.now_holds(found)}")
        # Our previous write landed although its answer was lost: go on from it.
        self._record, self._value = mine, found.value
        return term

    def raise_generation(self, generation: int) -> None:
        """Hand out `generation` (above the create revision) as the fencing token."""
        self.generation = generation
        self._record = self._record.replace(generation=generation)

    def write_generation(self) -> None:
        """Right after creating the key: write the record again with its generation (the
        create revision, unknown before the write). Best effort: the next heartbeat
        write has it too."""
        with self._mutex:
            try:
                self._beat(
                    self._record, self._fence.timeouts.renewal(clock.now() + self._fence.deadline)
                )
            except PgfenceError:
                pass

    def _beat(self, record: LockRecord, budget: Budget) -> int:
        """Write `record` over our last value; the raft term of the answer."""
        key = self._key
        for _ in range(2):
            data = record.encode()
            ok, responses = self._client.txn(
                [
                    compare(key, "CREATE", self.revision),
                    compare(key, "LEASE", self.lease),
                    compare(key, "VALUE", self._value),
                ],
                [put(key, data, self.lease)],
                [get(key)],
                budget,
            )
            if ok:
                self._record, self._value = record, data
                return self._client.last_term
            found = first_kv(responses[0]) if responses else None
            mine = self._fence.own_record(found, self.instance, self.lease, self.revision)
            if found is None or mine is None:
                break
            # Our previous write landed although its answer was lost: go on from it.
            self._value = found.value
            record = mine.next_beat(clock.now(), clock.wall_iso())
        raise LockLost(f"{self._fence.location()} {self._fence.now_holds(found)}")

    def release(self, guard: Guard) -> bool:
        with self._mutex:
            if not guard() or clock.now() - self._renewed_at > self._fence.deadline:
                return False  # past the deadline the key may be another's: touch nothing
            key, budget = self._key, self._fence.timeouts.unbounded()
            try:
                ok, _ = self._client.txn(
                    [compare(key, "CREATE", self.revision), compare(key, "LEASE", self.lease)],
                    [delete(key)],
                    [],
                    budget,
                )
            except PgfenceError as exc:
                try:
                    self._client.revoke(self.lease, budget)  # its keys go with it
                    return True
                except PgfenceError:
                    raise StorageError(
                        f"could not release {self._fence.location()} ({exc.message}); it "
                        f"disappears when its lease expires, within {self.granted} s"
                    ) from None
            self._fence.revoke_quietly(self.lease)
            return ok

    def child_values(self) -> dict[str, str | int]:
        return {"etcd_key": self._key.decode("utf-8", "surrogateescape"), "etcd_lease": self.lease}
