"""The derived intervals, pinned formula by formula, and the lock-delay rule both backends
follow, checked on each backend with a fake clock (no waiting) and, for etcd, a fake
client. Nothing outside timings.py may derive an interval: a test reads the sources."""

from __future__ import annotations

import base64
import itertools
import pathlib
import tokenize
from collections.abc import Iterator
from typing import Any

import pytest

from harness.records import sample_record
from pgfence import clock
from pgfence.backends.etcd import client as ec
from pgfence.backends.etcd.backend import EtcdBackend
from pgfence.backends.etcd.config import parse_endpoints
from pgfence.backends.file.backend import FileBackend
from pgfence.record import LockRecord
from pgfence.timings import (
    Timings,
    etcd_lease_seconds,
    heartbeat_write_after,
    heartbeat_write_interval,
    lock_delay,
    request_timeouts,
    stale_after,
    takeover_silence,
    vanished_lock_delay,
)

# -- each formula ------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [2.0, 3.0, 30.0, 600.0])
def test_lease_intervals(ttl: float) -> None:
    lease = Timings.lease(ttl)
    assert (lease.mode, lease.ttl) == ("lease", ttl)
    assert lease.interval == ttl / 6  # R
    assert lease.deadline == ttl / 2  # D
    assert lease.lock_delay == ttl / 4  # L, by default
    assert lease.takeover_silence == ttl + ttl / 4  # S = TTL + L
    assert lease.poll == min(1.0, ttl / 10)
    assert Timings.lease(ttl, 0.0).takeover_silence == ttl
    assert Timings.lease(ttl, 100.0).takeover_silence == ttl + 100.0


@pytest.mark.parametrize("interval", [0.1, 2.0, 60.0])
def test_strict_intervals(interval: float) -> None:
    strict = Timings.strict(interval)
    assert (strict.mode, strict.ttl, strict.lock_delay) == ("strict", 0.0, 0.0)
    assert strict.interval == interval
    assert strict.deadline == 3 * interval + 1.0
    assert strict.takeover_silence == 2 * strict.deadline
    assert strict.poll == min(0.5, interval)


def _every_mode() -> Iterator[Timings]:
    for interval in (0.1, 0.2, 2.0, 60.0):
        yield Timings.strict(interval)
    for ttl, delay in itertools.product((2.0, 9.8, 30.0, 600.0), (None, 0.0, 100.0)):
        yield Timings.lease(ttl, delay)
        yield Timings.lease(ttl, vanished_lock_delay(ttl))  # the etcd default


@pytest.mark.parametrize("timings", list(_every_mode()), ids=lambda t: t.describe())
def test_takeover_waits_twice_the_deadline_and_the_margin_is_the_rest(timings: Timings) -> None:
    silence, deadline = timings.takeover_silence, timings.deadline
    assert silence >= 2 * deadline
    assert timings.margin == silence - deadline
    assert timings.flush_bound == timings.margin / 2
    spare = max(1.0, timings.margin / 10)
    assert timings.watchdog_timeout <= timings.margin - spare < timings.watchdog_timeout + 1


@pytest.mark.parametrize("timings", list(_every_mode()), ids=lambda t: t.describe())
def test_a_contender_derives_the_holders_timings_from_its_record(timings: Timings) -> None:
    record = sample_record(
        mode=timings.mode, interval=timings.interval, ttl=timings.ttl, lock_delay=timings.lock_delay
    )
    assert Timings.of(record) == timings
    # `pgfence release` and a contender with the holder's own settings wait the same
    assert takeover_silence(record) == timings.takeover_silence
    assert takeover_silence(record, timings) == timings.takeover_silence


def test_stale_after_two_missed_renewals_and_a_second() -> None:
    assert stale_after(2.0) == 5.0 and stale_after(0.5) == 2.0


def test_etcd_intervals() -> None:
    lease = Timings.lease(12.0)
    assert vanished_lock_delay(12.0) == 6.0 + 2.0  # D + R
    assert heartbeat_write_interval(lease) == 12.0  # once per TTL
    assert heartbeat_write_after(lease) == 12.0 - 1.0  # half a renewal early
    assert [etcd_lease_seconds(t) for t in (0.5, 2.0, 9.8)] == [1, 2, 10]
    assert request_timeouts(lease) == (2.0, 2.0)  # D/3
    assert request_timeouts(Timings.lease(2.0)) == (0.5, 2.0)  # at least 0.5 s, 2 s
    assert request_timeouts(Timings.lease(600.0)) == (5.0, 5.0)  # at most 5 s


# -- the lock-delay rule -----------------------------------------------------------------


def _lease_holder(ttl: float, delay: float) -> LockRecord:
    """A lease of another token, held on another machine (its clock cannot be read)."""
    return sample_record(
        token="db-2",
        instance="00112233aabbccdd",
        mode="lease",
        interval=ttl / 6,
        ttl=ttl,
        lock_delay=delay,
        boot_id="another-boot",
    )


# (contender TTL, contender L, holder TTL, holder L)
CASES = [
    (4.0, 1.0, 4.0, 1.0),  # the same settings
    (4.0, 3.0, 4.0, 1.0),  # the contender's delay is longer
    (4.0, 0.5, 4.0, 2.0),  # the holder's is
    (4.0, 0.5, 4.0, 5.0),  # the holder's, longer than any floor
    (2.0, 0.5, 6.0, 1.5),  # the holder has the longer TTL
    (6.0, 0.0, 2.0, 0.5),  # the contender has
]


@pytest.mark.parametrize(("ttl", "delay", "holder_ttl", "holder_delay"), CASES)
def test_the_lock_delay_rule(
    ttl: float, delay: float, holder_ttl: float, holder_delay: float
) -> None:
    contender, holder = Timings.lease(ttl, delay), _lease_holder(holder_ttl, holder_delay)
    assert lock_delay(contender, holder) == max(delay, holder_delay)
    assert lock_delay(contender, None) == delay
    longer = max(ttl, holder_ttl)
    floor = longer / 2 + longer / 6  # counted from the lock's absence: D + R
    assert lock_delay(contender, holder, from_absence=True) == max(delay, holder_delay, floor)
    assert lock_delay(contender, None, from_absence=True) == max(delay, ttl / 2 + ttl / 6)


class FakeClock:
    """clock.now() that moves only when pgfence sleeps."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        self.start = self.now
        monkeypatch.setattr(clock, "now", lambda: self.now)

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += max(seconds, 1e-3)

    def elapsed(self) -> float:
        return self.now - self.start


def assert_waited(waited: float, needed: float, poll: float) -> None:
    """No earlier than `needed` (give or take the fake clock's rounding), and no more
    than one read of the lock later."""
    assert needed - 1e-9 <= waited < needed + poll + 0.01


@pytest.mark.parametrize(("ttl", "delay", "holder_ttl", "holder_delay"), CASES)
def test_the_file_backend_takes_a_silent_lease_over_after_ttl_and_lock_delay(
    ttl: float,
    delay: float,
    holder_ttl: float,
    holder_delay: float,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The lease's silence is timed by the contender: the longer TTL, then the lock
    delay of the rule (no floor: the TTL alone outlasts the holder's deadline)."""
    path = tmp_path / "fence_lock"
    path.write_bytes(_lease_holder(holder_ttl, holder_delay).encode())
    fake = FakeClock(monkeypatch)
    timings = Timings.lease(ttl, delay)
    backend = FileBackend(str(path), "db-1", "0123456789abcdef", timings, wait=True)
    hold = backend.acquire(fake.sleep)
    needed = max(ttl, holder_ttl) + max(delay, holder_delay)
    assert_waited(fake.elapsed(), needed, timings.poll)
    assert hold.generation == 5  # took over the sample's generation 4


def _kv_json(key: bytes, value: bytes, lease: int, revision: int) -> dict[str, str]:
    return {
        "key": base64.b64encode(key).decode(),
        "value": base64.b64encode(value).decode(),
        "create_revision": str(revision),
        "mod_revision": str(revision),
        "version": "1",
        "lease": str(lease),
    }


class FakeEtcd(ec.EtcdClient):
    """One key: held by `holder` until the fake clock reaches `gone_at`, then absent until
    a contender creates it (the time of that create is kept)."""

    def __init__(self, holder: LockRecord | None, gone_at: float) -> None:
        super().__init__(parse_endpoints("http://127.0.0.1:1", False), 1.0, None)
        self.holder, self.gone_at = holder, gone_at
        self.created: dict[str, str] | None = None
        self.created_at: float | None = None

    def _kvs(self, key: bytes) -> list[dict[str, str]]:
        if self.created is not None:
            return [self.created]
        if self.holder is not None and clock.now() < self.gone_at:
            return [_kv_json(key, self.holder.encode(), 7, 3)]
        return []

    def get(self, key: bytes, *args: Any, **kw: Any) -> ec.KeyValue | None:
        return ec.first_kv({"kvs": self._kvs(key)})

    def grant(self, ttl: int, *args: Any, **kw: Any) -> tuple[int, int]:
        return 9, ttl

    def txn(self, compares: Any, success: Any, failure: Any, *args: Any, **kw: Any) -> Any:
        key = base64.b64decode(compares[0]["key"])
        creates = compares[0]["target"] == "CREATE" and compares[0]["create_revision"] == "0"
        if creates and self._kvs(key):
            return False, [{"kvs": self._kvs(key)}]
        put = next((op["request_put"] for op in success if "request_put" in op), None)
        if put is not None:
            self.created = _kv_json(key, base64.b64decode(put["value"]), 9, 10)
            if creates:
                self.created_at = clock.now()
        return True, [{}, {"kvs": self._kvs(key)}]

    def time_to_live(self, lease: int, *args: Any, **kw: Any) -> tuple[int, int]:
        return 1, 1

    def revoke(self, lease: int, *args: Any, **kw: Any) -> bool:
        return True


def _etcd_acquire(fake: FakeEtcd, timings: Timings, sleep: Any) -> None:
    backend = EtcdBackend(fake, "/pgfence/db1", "db-1", "0123456789abcdef", timings, wait=True)
    hold = backend.acquire(sleep)
    assert hold.generation == 10  # the create revision of our own create


@pytest.mark.parametrize(("ttl", "delay", "holder_ttl", "holder_delay"), CASES)
def test_the_etcd_backend_creates_a_vanished_key_after_the_lock_delay(
    ttl: float,
    delay: float,
    holder_ttl: float,
    holder_delay: float,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The key of a holder it saw vanishes (lease expired, revoked, deleted): the lock
    delay of the rule, counted from the absence, floor included."""
    clocked = FakeClock(monkeypatch)
    gone_at = clocked.now + 1.5
    fake = FakeEtcd(_lease_holder(holder_ttl, holder_delay), gone_at)
    timings = Timings.lease(ttl, delay)
    _etcd_acquire(fake, timings, clocked.sleep)
    assert fake.created_at is not None
    needed = lock_delay(timings, fake.holder, from_absence=True)
    longer = max(ttl, holder_ttl)
    assert needed == max(delay, holder_delay, longer / 2 + longer / 6)
    assert_waited(fake.created_at - gone_at, needed, timings.poll)


@pytest.mark.parametrize("ttl", [2.0, 9.8, 30.0])
def test_the_etcd_backend_creates_a_key_absent_at_first_sight_after_its_lock_delay(
    ttl: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even a key absent at the first read: its holder, if any, may still run."""
    clocked = FakeClock(monkeypatch)
    fake = FakeEtcd(None, clocked.now)
    timings = Timings.lease(ttl, vanished_lock_delay(ttl))
    _etcd_acquire(fake, timings, clocked.sleep)
    assert fake.created_at is not None
    assert_waited(fake.created_at - clocked.start, timings.lock_delay, timings.poll)


# -- one place -----------------------------------------------------------------------------

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "pgfence"
TIMING_NAMES = {"ttl", "interval", "deadline", "lock_delay", "margin"}
SCALING = {"*", "/", "//"}


def _scaled_timings(path: pathlib.Path) -> list[str]:
    """Lines of code (not strings or comments) that multiply or divide a timing, bare
    (`ttl / 2`) or as an attribute (`2 * holder.interval`)."""
    found = []
    with tokenize.open(path) as f:
        skipped = (tokenize.COMMENT, tokenize.NL)
        tokens = [t for t in tokenize.generate_tokens(f.readline) if t.type not in skipped]
    for i, token in enumerate(tokens):
        if token.type != tokenize.NAME or token.string not in TIMING_NAMES:
            continue
        first = i  # the start of the dotted name `a.b.ttl`
        while (
            first >= 2
            and tokens[first - 1].string == "."
            and tokens[first - 2].type == tokenize.NAME
        ):
            first -= 2
        before = tokens[first - 1].string if first else ""
        after = tokens[i + 1].string if i + 1 < len(tokens) else ""
        if before in SCALING or after in SCALING:
            found.append(f"{path.relative_to(SRC)}:{token.start[0]}: {token.line.strip()}")
    return found


def test_no_module_but_timings_derives_an_interval() -> None:
    """A TTL, interval, deadline, lock delay or margin multiplied or divided anywhere but
    timings.py is a second derivation that can drift from the first."""
    offenders = [
        line
        for path in sorted(SRC.rglob("*.py"))
        if path.name != "timings.py"
        for line in _scaled_timings(path)
    ]
    assert offenders == []
