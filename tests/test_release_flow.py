"""The operator release (`pgfence release [--force]`) is one flow for both backends
(backends/base.py, `release_fence`): the same scenarios, run against the file backend on a
temporary directory and against the etcd backend on an in-memory etcd, end the same way.

The clock is a fake one that only the release's sleeps move, so watching a holder for its
full silence takes no time. The file backend's takeover claims, which a release (like a
takeover) waits out when their claimer looks dead, are tested at the end.
"""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from typing import Any, Callable

import pytest

from harness.records import holder_elsewhere
from pgfence import clock, log
from pgfence.backends.base import Backend
from pgfence.backends.etcd import client as ec
from pgfence.backends.etcd.backend import EtcdBackend
from pgfence.backends.etcd.config import parse_endpoints
from pgfence.backends.file.backend import FileBackend
from pgfence.backends.file.lockfile import LockFile
from pgfence.errors import PgfenceError
from pgfence.record import LockRecord
from pgfence.timings import Timings, takeover_silence

KEY = "/pgfence/db"
LEASE = 0x1F
OPERATOR = "1" * 16
TIMINGS = Timings.lease(2.0)
# A dead lease holder of token db-2 on another boot: a release must watch it.
HOLDER = holder_elsewhere(interval=TIMINGS.interval).replace(
    mode="lease", ttl=TIMINGS.ttl, lock_delay=TIMINGS.lock_delay
)
UNREADABLE = b"\x00\xffgarbage\nline 2\n"
ONE_LINE = b"db-2\n"


class MemoryEtcd(ec.EtcdClient):
    """An etcd holding one key, answering the JSON gateway's range, txn and revoke calls as
    etcd does: every write and deletion takes the next revision; a key goes with its
    revoked lease."""

    def __init__(self) -> None:
        super().__init__(parse_endpoints("http://127.0.0.1:1", False), 1.0, None)
        self.kv: dict[str, str] | None = None  # the key, as the gateway encodes it
        self.revision = 1
        self.revoked: list[int] = []

    def put(self, value: bytes) -> None:
        self.revision += 1
        create = self.kv["create_revision"] if self.kv else str(self.revision)
        self.kv = {
            "key": ec.b64(KEY.encode()),
            "value": ec.b64(value),
            "create_revision": create,
            "mod_revision": str(self.revision),
            "lease": str(LEASE),
        }

    def call(self, path: str, body: Any, *args: Any, **kw: Any) -> Any:
        if path == "/v3/kv/range":
            return self._range()
        if path == "/v3/lease/revoke":
            self.revoked.append(int(body["ID"]))
            if self.kv and self.kv["lease"] == body["ID"]:
                self._delete()
            return {}
        assert path == "/v3/kv/txn", path
        ok = all(self._holds(c) for c in body["compare"])
        responses = []
        for op in body["success" if ok else "failure"]:
            if "request_range" in op:
                responses.append({"response_range": self._range()})
            else:
                assert "request_delete_range" in op, op
                responses.append({"response_delete_range": {"deleted": str(self._delete())}})
        return {"succeeded": ok, "responses": responses}

    def _range(self) -> Any:
        return {"kvs": [self.kv]} if self.kv else {}

    def _delete(self) -> int:
        if self.kv is None:
            return 0
        self.kv, self.revision = None, self.revision + 1
        return 1

    def _holds(self, compare: dict[str, str]) -> bool:
        assert compare["target"] == "MOD" and compare["result"] == "EQUAL", compare
        return (self.kv or {}).get("mod_revision", "0") == compare["mod_revision"]


class FileStore:
    """The file backend's lock, as a test writes and reads it."""

    name = "file"

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "fence_lock")

    def backend(self) -> Backend:
        return FileBackend(self.path, "db-1", OPERATOR, TIMINGS, wait=False)

    def put(self, data: bytes) -> None:
        with open(self.path + ".new", "wb") as f:
            f.write(data)
        os.rename(self.path + ".new", self.path)

    def content(self) -> bytes | None:
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def delete(self) -> None:
        os.unlink(self.path)


class EtcdStore:
    """The etcd backend's key in a MemoryEtcd."""

    name = "etcd"

    def __init__(self) -> None:
        self.etcd = MemoryEtcd()

    def backend(self) -> Backend:
        return EtcdBackend(self.etcd, KEY, "db-1", OPERATOR, TIMINGS, wait=False)

    def put(self, data: bytes) -> None:
        self.etcd.put(data)

    def content(self) -> bytes | None:
        return base64.b64decode(self.etcd.kv["value"]) if self.etcd.kv else None

    def delete(self) -> None:
        self.etcd._delete()


Store = Any  # FileStore | EtcdStore


@pytest.fixture(params=["file", "etcd"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Store:
    return FileStore(str(tmp_path)) if request.param == "file" else EtcdStore()


class FakeClock:
    """pgfence's clock, moved only by `sleep`, which runs `during` at each call."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept = 0.0
        self.during: Callable[[], None] = lambda: None

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        self.during()


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(clock, "now", lambda: fake.now)
    return fake


class Events:
    """The JSON events logged since the fixture started."""

    def __init__(self) -> None:
        self.stream = io.StringIO()

    def named(self, name: str) -> list[dict[str, Any]]:
        logged = [json.loads(line) for line in self.stream.getvalue().splitlines()]
        return [e for e in logged if e["event"] == name]


@pytest.fixture
def events() -> Iterator[Events]:
    logged = Events()
    log.configure("json", logged.stream)
    yield logged
    log.configure("text", None)


def release(store: Store, force: bool, fake_clock: FakeClock) -> tuple[str, int, str]:
    """Run an operator release: (outcome class, exit code, what it said)."""
    try:
        said = store.backend().release(force, fake_clock.sleep)
    except PgfenceError as exc:
        return "refused", exc.exit_code, exc.message
    return ("removed" if said.startswith("released ") else "nothing"), 0, said


def newer(record: LockRecord) -> bytes:
    return record.next_beat(record.clock + 1.0, "2026-01-01T00:00:20Z").encode()


# -- the scenario table: the same outcome for both backends ----------------------------


def test_a_free_lock_has_nothing_to_release(store: Store, fake_clock: FakeClock) -> None:
    assert release(store, False, fake_clock)[:2] == ("nothing", 0)
    assert release(store, True, fake_clock)[:2] == ("nothing", 0)


def test_a_live_holder_is_refused_and_its_lock_kept(store: Store, fake_clock: FakeClock) -> None:
    store.put(HOLDER.encode())
    fake_clock.during = lambda: store.put(newer(HOLDER))  # its heartbeat moves
    outcome, code, message = release(store, False, fake_clock)
    assert (outcome, code) == ("refused", 73)
    assert "heartbeat is moving" in message and "token 'db-2'" in message
    assert store.content() == newer(HOLDER)


def test_a_silent_holder_is_removed_after_the_takeover_silence(
    store: Store, fake_clock: FakeClock, events: Events
) -> None:
    store.put(HOLDER.encode())
    outcome, code, said = release(store, False, fake_clock)
    assert (outcome, code) == ("removed", 0)
    assert store.content() is None
    assert fake_clock.slept >= takeover_silence(HOLDER) - 1e-9  # as long as a takeover waits
    assert said.endswith(f"(it held {HOLDER.describe()})")
    [removed] = events.named("removed")
    assert (removed["forced"], removed["level"]) == (False, "warning")
    assert removed["first_line"] == "db-2"
    assert events.named("waiting"), "the watch shows its progress"


def test_force_removes_a_live_holder_without_watching(
    store: Store, fake_clock: FakeClock, events: Events
) -> None:
    store.put(HOLDER.encode())
    fake_clock.during = lambda: pytest.fail("a forced release does not watch")
    assert release(store, True, fake_clock)[:2] == ("removed", 0)
    assert store.content() is None
    assert [e["forced"] for e in events.named("removed")] == [True]
    if isinstance(store, EtcdStore):
        assert store.etcd.revoked == [LEASE]  # the holder's next keep-alive fails at once


@pytest.mark.parametrize("content", [ONE_LINE, UNREADABLE])
def test_what_pgfence_cannot_judge_is_refused_unless_forced(
    store: Store, fake_clock: FakeClock, events: Events, content: bytes
) -> None:
    """A one-line lock has no heartbeat to watch; unreadable content is not pgfence's.
    Without --force both are refused and left as they are: the file backend refuses a
    one-line lock (the shell script's) as a live-holder question (73), etcd as content
    pgfence never writes there (65), like unreadable content everywhere."""
    store.put(content)
    fake_clock.during = lambda: pytest.fail("nothing to watch")
    outcome, code, message = release(store, False, fake_clock)
    one_line_file = content == ONE_LINE and isinstance(store, FileStore)
    assert (outcome, code) == ("refused", 73 if one_line_file else 65)
    assert "--force" in message
    assert store.content() == content
    outcome, code, said = release(store, True, fake_clock)
    assert (outcome, code) == ("removed", 0)
    assert store.content() is None
    described = "one-line lock" if one_line_file else "unreadable content (first line"
    assert described in said
    [removed] = events.named("removed")
    assert removed["first_line"] == content.split(b"\n")[0].decode("utf-8", "replace")


@pytest.mark.parametrize("force", [False, True])
def test_a_lock_changed_between_read_and_delete_is_kept(
    store: Store, fake_clock: FakeClock, events: Events, force: bool
) -> None:
    """A takeover (or a heartbeat) lands after the release read the lock (and, without
    --force, watched it silent): the delete compares with what was read and refuses."""
    store.put(HOLDER.encode())
    successor = HOLDER.replace(token="db-3", instance="3" * 16, generation=9).encode()
    backend = store.backend()
    real_delete = backend.delete_unchanged

    def changed_first(*args: Any) -> Any:
        store.put(successor)
        return real_delete(*args)

    backend.delete_unchanged = changed_first
    with pytest.raises(PgfenceError) as err:
        backend.release(force, fake_clock.sleep)
    assert err.value.exit_code == 73
    assert "changed while it was being released (it now holds token 'db-3'" in err.value.message
    assert store.content() == successor
    assert not events.named("removed")


def test_a_lock_gone_while_watched(store: Store, fake_clock: FakeClock) -> None:
    """One rule for both backends: a lock deleted during the watch (its holder released
    it) leaves nothing to release, exit 0, and nothing is written in its place."""
    store.put(HOLDER.encode())
    fake_clock.during = lambda: store.content() and store.delete()
    outcome, code, said = release(store, False, fake_clock)
    assert (outcome, code) == ("nothing", 0) and "disappeared while being watched" in said
    assert store.content() is None


# -- the file backend's takeover claims ------------------------------------------------


def _leftover_claim(lock: str, name: str) -> str:
    """A claim whose claimer died (SIGKILL: its `finally` never ran)."""
    path = LockFile(lock, "2" * 16).claim_path(name)
    with open(path, "wb") as f:
        f.write(b"instance=2222222222222222\npid=1\n")
    return path


def test_a_release_waits_out_an_abandoned_claim_then_uses_the_next(
    tmp_path: Any, fake_clock: FakeClock, events: Events
) -> None:
    lock = FileStore(str(tmp_path))
    lock.put(HOLDER.encode())
    first = _leftover_claim(lock.path, f"{HOLDER.generation + 1}-1")
    assert release(lock, True, fake_clock)[:2] == ("removed", 0)
    assert lock.content() is None
    [waiting] = events.named("waiting")
    assert "has a takeover claim 4-1" in waiting["message"]
    [abandoned] = events.named("claim_abandoned")
    assert abandoned["claim"] == "4-1"
    assert fake_clock.slept >= 2 * 1.0 - 1e-9  # twice the least claim limit
    assert not os.path.exists(first), "claims on the removed state are cleared"


def test_a_release_meeting_a_changed_lock_under_a_claim_keeps_it(
    tmp_path: Any, fake_clock: FakeClock
) -> None:
    lock = FileStore(str(tmp_path))
    lock.put(HOLDER.encode())
    _leftover_claim(lock.path, f"{HOLDER.generation + 1}-1")
    fake_clock.during = lambda: lock.put(newer(HOLDER))  # the claimer was alive after all
    outcome, code, message = release(lock, True, fake_clock)
    assert (outcome, code) == ("refused", 73)
    assert "changed while it was being released (it now holds token 'db-2'" in message
    assert lock.content() == newer(HOLDER)


def test_a_takeover_waits_out_an_abandoned_claim_then_uses_the_next(
    tmp_path: Any, fake_clock: FakeClock, events: Events
) -> None:
    lock = FileStore(str(tmp_path))
    lock.put(HOLDER.replace(token="db-1").encode())  # our token's silent lease
    _leftover_claim(lock.path, f"{HOLDER.generation + 1}-1")
    hold = FileBackend(lock.path, "db-1", "4" * 16, TIMINGS, wait=True).acquire(fake_clock.sleep)
    assert hold.generation > HOLDER.generation
    assert [e["claim"] for e in events.named("claim_abandoned")] == ["4-1"]
    assert fake_clock.slept >= 2 * takeover_silence(HOLDER) - 1e-9  # silence, then the claim
