"""The rules of an etcd request budget: a request's timeout never exceeds what is left,
an expired budget sends nothing, the guard is asked before every send (the first and
each failover), and a renewal's budget ends at the fence deadline it would set. Against
a fake transport and a fake clock: no network, no sleeping."""

from __future__ import annotations

import json
from typing import Any, Callable

import pytest

from pgfence import clock
from pgfence.backends.etcd import client as ec
from pgfence.backends.etcd.budget import Budget, RequestTimeouts
from pgfence.backends.etcd.config import parse_endpoints
from pgfence.backends.etcd.hold import EtcdHold, FenceKey
from pgfence.record import LockRecord
from pgfence.timings import Timings


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def now(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(clock, "now", fake)
    return fake


# -- the budget itself ---------------------------------------------------------------------


def test_request_timeout_never_exceeds_what_is_left(now: FakeClock) -> None:
    assert Budget(2.0, now.t + 0.5).request_timeout() == pytest.approx(0.5)
    assert Budget(0.3, now.t + 10).request_timeout() == pytest.approx(0.3)
    budget = Budget(2.0, now.t + 3)
    now.t += 2.5
    assert budget.remaining() == pytest.approx(0.5)
    assert budget.request_timeout() == pytest.approx(0.5)


def test_a_budget_without_deadline_says_so_and_keeps_its_timeout(now: FakeClock) -> None:
    budget = Budget.unbounded(2.0)
    assert budget.until is None and budget.guard is None
    now.t += 1e9
    assert budget.request_timeout() == 2.0
    assert not budget.expired() and budget.ensure(1e9)


def test_expiry_and_margins(now: FakeClock) -> None:
    budget = Budget(2.0, now.t + 1.0)
    assert not budget.expired() and budget.ensure(0.9) and not budget.ensure(1.0)
    now.t += 1.0
    assert budget.expired() and budget.request_timeout() <= 0


def test_the_guard_is_asked_anew_each_time_and_can_be_left_out() -> None:
    answers = iter([True, False])
    budget = Budget(1.0, None, lambda: next(answers))
    assert budget.may_send() and not budget.may_send()
    assert budget.unguarded() == Budget(1.0) and Budget(1.0).may_send()


def test_renewals_get_the_short_timeout_everything_else_the_long_one() -> None:
    timeouts = RequestTimeouts.of(Timings.lease(3.0))
    assert isinstance(timeouts, RequestTimeouts) and timeouts.fast < timeouts.slow
    guard = lambda: True  # noqa: E731
    assert timeouts.renewal(5.0, guard) == Budget(timeouts.fast, 5.0, guard)
    assert timeouts.renewal(5.0) == Budget(timeouts.fast, 5.0)
    assert timeouts.bounded(5.0) == Budget(timeouts.slow, 5.0)
    assert timeouts.unbounded() == Budget.unbounded(timeouts.slow)


# -- the client spends it ------------------------------------------------------------------


class FakeTransport(ec.EtcdClient):
    """Endpoints that answer from a script: a (status, JSON) pair, or an exception after
    `hang` seconds of the fake clock (the whole request timeout for a TimeoutError)."""

    def __init__(self, now: FakeClock, answers: list[Any], endpoints: int = 3) -> None:
        urls = ",".join(f"http://127.0.0.1:{2379 + i}" for i in range(endpoints))
        super().__init__(parse_endpoints(urls, False), None)
        self._checked = True  # the version check is a request of its own: not scripted
        self.clock, self.answers = now, answers
        self.sent: list[tuple[int, str, float]] = []  # (endpoint port, path, timeout)

    def _send(
        self, endpoint: ec.Endpoint, method: str, path: str, body: Any, timeout: float
    ) -> tuple[int, bytes]:
        self.sent.append((endpoint.port, path, timeout))
        answer = self.answers.pop(0)
        if isinstance(answer, TimeoutError):
            self.clock.t += timeout
            raise answer
        if isinstance(answer, Exception):
            raise answer
        return answer[0], json.dumps(answer[1]).encode()


OK = (200, {"result": {"TTL": "5", "header": {"raft_term": "2"}}})


def test_an_expired_budget_sends_nothing(now: FakeClock) -> None:
    c = FakeTransport(now, [OK])
    with pytest.raises(ec.EtcdUnavailable) as err:
        c.keepalive(7, Budget(2.0, now.t))
    assert c.sent == [] and "out of time" in err.value.message
    c._checked = False  # nor the version check before it
    with pytest.raises(ec.EtcdUnavailable):
        c.get(b"/k", Budget(2.0, now.t - 1))
    assert c.sent == []


def test_failover_spends_the_same_budget(now: FakeClock) -> None:
    c = FakeTransport(now, [TimeoutError("timed out"), TimeoutError("timed out"), OK])
    with pytest.raises(ec.EtcdUnavailable) as err:
        c.keepalive(7, Budget(0.6, now.t + 1.0))
    # the first endpoint gets the whole request timeout, the second what is left, and
    # the third nothing: the budget is spent
    assert [(port, timeout) for port, _, timeout in c.sent] == [
        (2379, 0.6),
        (2380, pytest.approx(0.4)),
    ]
    assert "no answer within 0.6 s" in err.value.message and "out of time" in err.value.message


def test_the_guard_is_asked_before_each_send_and_each_failover(now: FakeClock) -> None:
    asked: list[int] = []

    def guard(answers: list[bool]) -> Callable[[], bool]:
        return lambda: (asked.append(len(c.sent)), answers.pop(0))[1]

    c = FakeTransport(now, [ConnectionRefusedError(), ConnectionRefusedError(), OK])
    assert c.keepalive(7, Budget(1.0, now.t + 5, guard([True, True, True]))) == (5, 2)
    assert asked == [0, 1, 2]  # before the first send, and before each failover
    asked.clear()
    c = FakeTransport(now, [ConnectionRefusedError(), OK])
    with pytest.raises(ec.GuardRefused):
        c.keepalive(7, Budget(1.0, now.t + 5, guard([True, False])))
    assert asked == [0, 1] and len(c.sent) == 1  # refused: the failover is not sent


def test_the_version_check_and_login_share_the_time_but_not_the_guard(now: FakeClock) -> None:
    version = (200, {"etcdserver": "3.5.17", "etcdcluster": "3.5.0"})
    login = (200, {"token": "t"})
    c = FakeTransport(now, [version, login, OK], endpoints=1)
    c._checked, c._user, c._password = False, "u", "pw"
    asked: list[int] = []
    budget = Budget(1.0, now.t + 0.5, lambda: (asked.append(len(c.sent)), True)[1])
    assert c.keepalive(7, budget) == (5, 2)
    assert [path for _, path, _ in c.sent] == [
        "/version",
        "/v3/auth/authenticate",
        "/v3/lease/keepalive",
    ]
    assert [timeout for _, _, timeout in c.sent] == [0.5, 0.5, 0.5]
    assert asked == [2]  # once, right before the keep-alive


# -- the hold makes them -------------------------------------------------------------------


class RecordingClient(ec.EtcdClient):
    """Answers every keep-alive and transaction with success; keeps their budgets."""

    def __init__(self) -> None:
        super().__init__(parse_endpoints("http://127.0.0.1:1", False), None)
        self.budgets: list[tuple[str, Budget]] = []

    def keepalive(self, lease: int, budget: Budget) -> tuple[int, int]:
        self.budgets.append(("keepalive", budget))
        return 3, 0

    def txn(self, compares: Any, success: Any, failure: Any, budget: Budget) -> Any:
        self.budgets.append(("txn", budget))
        return True, []

    def revoke(self, lease: int, budget: Budget) -> bool:
        self.budgets.append(("revoke", budget))
        return True


def hold_of(recording: RecordingClient, acquired: float) -> tuple[EtcdHold, FenceKey]:
    timings = Timings.lease(3.0)
    fence = FenceKey(recording, "/k", timings)
    mine = LockRecord("db-1", "a" * 16, "lease", 40, 0, 0.5, 3.0, 0.75, 1, "h", "b", 1.0, "t", "t")
    return EtcdHold(fence, mine, b"old", 9, 3, acquired), fence


def test_a_renewals_budget_ends_at_the_fence_deadline_it_would_set(now: FakeClock) -> None:
    recording = RecordingClient()
    hold, fence = hold_of(recording, now.t)
    now.t += 0.5

    def guard() -> bool:
        return True

    started = now.t
    assert hold.renew(guard)
    expected = Budget(fence.timeouts.fast, started + fence.deadline, guard)
    assert recording.budgets == [("keepalive", expected), ("txn", expected)]
    assert hold._renewed_at + fence.deadline == expected.until


def test_the_generation_write_races_the_deadline_and_release_has_none(now: FakeClock) -> None:
    recording = RecordingClient()
    hold, fence = hold_of(recording, now.t)
    hold.write_generation()
    assert recording.budgets == [("txn", Budget(fence.timeouts.fast, now.t + fence.deadline))]
    recording.budgets.clear()
    assert hold.release(lambda: True)
    assert recording.budgets == [
        ("txn", Budget.unbounded(fence.timeouts.slow)),
        ("revoke", Budget.unbounded(fence.timeouts.slow)),
    ]
