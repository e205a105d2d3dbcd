"""Pauses at the worst moments of an acquisition, and the claim protocol they test.

A contender can be paused (or stalled on storage) between its last check and its write,
or right after taking the lock; a claimer can stall past its limit. These tests put the
pause exactly there, with strace delaying one system call, or drive the claim files
directly, and check that no two holders ever run at once (found while writing the many
contenders round of test_lease_faults, and fixed in backends/file/lockfile.py,
backends/file/backend.py and runloop.py).
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable

import pytest

from conftest import needs_pg, needs_root
from harness.contenders import Contender, child_intervals, overlaps, record_stop, started_pid
from harness.faults import foreign_record, write_atomically
from harness.lease import DEADLINE, POLL, TAKEOVER_WAIT, events, read_lock
from harness.procs import Registry, alive
from harness.waiting import wait_for
from pgfence.backends.file.lockfile import LockFile
from pgfence.record import LockRecord, parse
from pgfence.timings import Timings, claim_limit

pytestmark = [needs_root, needs_pg, pytest.mark.integration]
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")


@pytest.fixture
def lock_path(shared_dir: str) -> str:
    return os.path.join(shared_dir, "fence_lock")


def strace_delay(seconds: float, occurrence: int = 1) -> list[str]:
    """Run under strace, delaying the `occurrence`-th rename(2) by `seconds`."""
    inject = f"inject=rename:delay_enter={int(seconds * 1e6)}:when={occurrence}"
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=rename", "-e", inject]


@pytest.mark.timeout(60)
@needs_strace
def test_acquisition_stalled_past_the_deadline_never_starts_the_command(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    """The write that marks the new generation as won (strace delays its rename(2), the
    third: the first two reserved it, in both copies of the generation file) stalls
    longer than the fence deadline right after the lock was taken: the lease may already
    be lost, so pgfence must not start the command at all (not start it and kill it a
    moment later), exit 75, and leave the lock as it is."""
    log = os.path.join(shared_dir, "intervals.log")
    delayed = strace_delay(1.5 * DEADLINE, occurrence=3)
    stalled = Contender(procs, shared_dir, lock_path, log, 0, prefix=delayed)
    assert stalled.proc.wait(30) == 75
    assert events(stalled.stderr, "acquired")
    assert not events(stalled.stderr, "started")
    (fenced,) = events(stalled.stderr, "self_fenced")
    assert "longer than the deadline" in str(fenced["reason"])
    assert not os.path.exists(log)
    left = read_lock(lock_path)
    assert left is not None and left.token == stalled.token


@pytest.mark.timeout(90)
@needs_strace
def test_contender_paused_before_its_rename_does_not_start_over_a_newer_holder(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    """A contender paused between its last check and its rename (strace delays that one
    rename(2), the third: the first two reserved the generation, by longer than its claim
    limit). Another contender meanwhile calls the claim
    abandoned, takes the lease over and starts its child; then the late rename lands over
    its lease. The late contender must not start its child until the overtaken holder,
    which sees its lock lost at its next renewal, has killed its own: the two children
    never overlap, and the one left running is the late contender's, on a newer
    generation."""
    log = os.path.join(shared_dir, "intervals.log")
    open(log, "w").close()
    write_atomically(lock_path, foreign_record(None, "dead-holder"))
    # Long enough for the other contender to wait out the lease, then the claim.
    delay = 3 * TAKEOVER_WAIT + 1
    late = Contender(procs, shared_dir, lock_path, log, 0, prefix=strace_delay(delay, 3))
    claim = f"{lock_path}.takeover-2-1"
    wait_for(lambda: os.path.exists(claim), "the late contender's claim", 30, 0.01)
    other = Contender(procs, shared_dir, lock_path, log, 1)  # finds that claim busy
    wait_for(lambda: len(child_intervals(log)) >= 1, "the other contender's child", 60, 0.01)
    first = read_lock(lock_path)
    assert first is not None and first.token == other.token
    child = started_pid(log, str(first.generation))
    wait_for(lambda: not alive(child), "the overtaken holder to kill its child", 30, 0.001)
    record_stop(log, first.generation, child)
    assert other.proc.wait(30) == 75
    wait_for(lambda: len(child_intervals(log)) >= 2, "the late contender's child", 60, POLL)
    intervals = child_intervals(log)
    assert len(intervals) == 2
    assert overlaps(intervals) == []
    (fenced,) = events(other.stderr, "self_fenced")
    assert "lost the lock" in str(fenced["reason"])
    assert any(
        "not starting the command" in str(e["message"]) for e in events(late.stderr, "waiting")
    )
    final = read_lock(lock_path)
    assert final is not None and final.token == late.token
    assert final.generation > first.generation
    assert intervals[-1][2] == str(final.generation)


@pytest.mark.timeout(30)
def test_a_claim_held_past_its_limit_is_never_handed_to_a_late_contender(
    shared_dir: str,
) -> None:
    """A claimer that stalled past its
    limit may have been judged abandoned: another contender then holds the next attempt's
    claim and is about to replace the lock. If the stalled claimer freed its claim when
    giving up, a contender still on the first attempt could take it too, and both would
    replace the lock (two winners). It must leave its claim in place."""
    path = os.path.join(shared_dir, "fence_lock")
    assert LockFile(path, "0" * 16).create(b"dead holder\n")
    state = LockFile(path, "0" * 16).read()
    assert state is not None
    stalled, moved_on, late = (LockFile(path, c * 16) for c in "abc")
    holding, verified, late_done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, bool] = {}

    def stalled_guard() -> bool:
        if not holding.is_set():
            holding.set()
            verified.wait(10)  # stalled here while the others move on
        return False  # and then too late, every time it asks

    def moved_on_guard() -> bool:
        verified.set()
        late_done.wait(10)
        return True

    def run(name: str, lock: LockFile, claim: str, guard: Callable[[], bool]) -> None:
        results[name] = lock.takeover(state, name.encode(), claim, guard).ok

    threads = [
        threading.Thread(target=run, args=("stalled", stalled, "2-1", stalled_guard)),
        threading.Thread(target=run, args=("moved-on", moved_on, "2-2", moved_on_guard)),
    ]
    threads[0].start()
    assert holding.wait(10)
    threads[1].start()  # judged claim 2-1 abandoned: takes 2-2, verifies, waits to rename
    assert verified.wait(10)
    threads[0].join(10)  # the stalled claimer gives up
    results["late"] = late.takeover(state, b"late", "2-1", lambda: True).ok
    late_done.set()
    threads[1].join(10)
    assert results == {"stalled": False, "moved-on": True, "late": False}
    with open(path, "rb") as f:
        assert f.read() == b"moved-on"


@pytest.mark.timeout(30)
@pytest.mark.parametrize("holder_ttl", [2.0, 30.0])
def test_a_claim_is_given_up_before_any_contender_may_call_it_abandoned(
    holder_ttl: float,
) -> None:
    """Contenders configured with different TTLs wait different times before a takeover;
    each one's claim limit is still at most half of the shortest time any of them takes
    to call a claim abandoned, so a slow claimer is never overtaken while it may write."""
    record = foreign_record(None).replace(b"\nttl=2\n", f"\nttl={holder_ttl:g}\n".encode())
    holder = parse(record, "lock")
    assert isinstance(holder, LockRecord) and holder.ttl == holder_ttl
    waits = [Timings.lease(ttl).takeover_wait(holder) for ttl in (2.0, 30.0, 300.0)]
    limits = [claim_limit(holder, w) for w in waits]
    abandoned_after = [max(w, 2 * lim) for w, lim in zip(waits, limits)]
    assert max(limits) <= min(abandoned_after) / 2
