"""The lock protocol's rules, step by step, with fakes for the moments that matter.

- A holder's own release obeys the renewal rule (nothing deleted after its deadline) and
  is a compare-and-delete under the takeover claim, so a paused release never deletes a
  successor's lock.
- Takeover and self-fence rules never disagree: for every mode and every holder/contender
  combination, a contender waits longer than the holder's self-fence deadline plus the
  documented margin.
- Generations never repeat, whatever call an acquisition crashes at.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from pgfence import clock
from pgfence.backends.base import fresh_record
from pgfence.backends.file.backend import FileBackend
from pgfence.backends.file.lockfile import LockFile
from pgfence.errors import FencedOut
from pgfence.record import LegacyLock, LockRecord, parse
from pgfence.timings import Timings, takeover_silence

OURS = "0123456789abcdef"
OTHER = "fedcba9876543210"


def _no_sleep(_: float) -> None:
    raise AssertionError("no waiting expected")


def _backend(path: str, token: str = "db-1", instance: str = OURS) -> FileBackend:
    return FileBackend(path, token, instance, Timings.lease(2.0), wait=False)


@pytest.fixture
def lock_path(tmp_path: object) -> str:
    return f"{tmp_path}/fence_lock"


# -- hole: the holder's own release ------------------------------------------------------


def _successor_data(lock_path: str) -> bytes:
    with open(lock_path, "rb") as f:
        previous = parse(f.read(), lock_path)
    assert isinstance(previous, LockRecord)
    return previous.replace(
        token="db-2", instance=OTHER, generation=previous.generation + 1, heartbeat=0
    ).encode()


def test_a_release_paused_after_reading_never_deletes_a_successors_lock(
    lock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder reads its lock, and before it deletes it a contender that saw the
    lease silent takes it over (with the first takeover claim, as every contender of
    that state does). The release must not delete the successor's lock: either the
    takeover was excluded (the claim is the release's), or the lock is the successor's."""
    hold = _backend(lock_path).acquire(_no_sleep)
    with open(lock_path, "rb") as f:
        ours = LockFile(lock_path, OURS).read()
        assert ours is not None and f.read() == ours.data
    successor = _successor_data(lock_path)
    contender = LockFile(lock_path, OTHER)
    real_read = LockFile.read
    took_over: list[bool] = []

    def read_then_lose_the_race(self: LockFile) -> object:
        snapshot = real_read(self)
        if self is not contender and not took_over:
            claim = f"{hold.generation + 1}-1"
            took_over.append(contender.takeover(ours, successor, claim, lambda: True).ok)
        return snapshot

    monkeypatch.setattr(LockFile, "read", read_then_lose_the_race)
    hold.release(lambda: True)
    monkeypatch.undo()
    assert took_over, "the release never read the lock"
    if took_over[0]:
        with open(lock_path, "rb") as f:
            assert f.read() == successor, "the release deleted its successor's lock"


def test_a_release_past_the_deadline_leaves_the_lock(lock_path: str) -> None:
    hold = _backend(lock_path).acquire(_no_sleep)
    before = LockFile(lock_path, OURS).read()
    assert hold.release(lambda: False) is False
    assert LockFile(lock_path, OURS).read() == before


def test_a_release_checks_its_guard_immediately_before_deleting(
    lock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard is asked after every other step of the release (the claim, the read and
    the compare), so a pause anywhere before the unlink is caught by it."""
    hold = _backend(lock_path).acquire(_no_sleep)
    steps: list[str] = []
    real_unlink, real_read = os.unlink, LockFile.read

    def unlink(path: str) -> None:
        if path == lock_path:
            steps.append("unlink")
        real_unlink(path)

    def read(self: LockFile) -> object:
        steps.append("read")
        return real_read(self)

    def guard() -> bool:
        steps.append("guard")
        return True

    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(LockFile, "read", read)
    assert hold.release(guard) is True
    first_unlink = steps.index("unlink")
    assert steps[first_unlink - 1] == "guard"
    assert "read" in steps[:first_unlink]
    assert not os.path.exists(lock_path)


def test_a_release_and_a_takeover_of_the_same_state_exclude_each_other(
    lock_path: str,
) -> None:
    """A contender holds the first takeover claim of the holder's state: the holder's
    release must not delete the lock under it (it is being taken over)."""
    hold = _backend(lock_path).acquire(_no_sleep)
    contender = LockFile(lock_path, OTHER)
    claim = contender.claim_path(f"{hold.generation + 1}-1")
    with open(claim, "wb") as f:
        f.write(b"instance=fedcba9876543210\npid=1\n")
    before = contender.read()
    assert hold.release(lambda: True) is False
    assert contender.read() == before
    assert os.path.exists(claim), "the release freed a claim it does not hold"


def test_a_late_release_leaves_its_claim(lock_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release that finds itself past its deadline with the claim taken leaves the
    claim in place: contenders may have judged it abandoned and moved on to the next
    attempt, and freeing it would let one still on this attempt take it as well."""
    hold = _backend(lock_path).acquire(_no_sleep)
    assert hold.release(lambda: False) is False
    claim = LockFile(lock_path, OURS).claim_path(f"{hold.generation + 1}-1")
    assert os.path.exists(claim)


# -- hole: takeover and self-fence rules -------------------------------------------------


def _timings() -> Iterator[Timings]:
    for interval in (0.1, 0.2, 2.0, 60.0):
        yield Timings.strict(interval)
    for ttl, delay in itertools.product((2.0, 30.0, 600.0), (None, 0.0, 100.0)):
        yield Timings.lease(ttl, delay)


@pytest.mark.parametrize("holder_timings", list(_timings()), ids=lambda t: t.describe())
def test_every_takeover_waits_out_the_holders_deadline_and_margin(
    holder_timings: Timings, lock_path: str
) -> None:
    """For every holder mode and setting, and every contender that may take its lock
    over (same token or not, any mode and setting, waiting or not): the silence the
    contender waits, S, exceeds the holder's self-fence deadline D by at least the
    margin the holder's timings document, and S is at least 2 D."""
    deadline = holder_timings.deadline
    assert deadline is not None, f"{holder_timings.describe()}: a holder that never fences"
    margin = holder_timings.margin
    assert margin >= 1.0 and margin >= deadline / 2
    assert holder_timings.takeover_silence - deadline == pytest.approx(margin)
    record = fresh_record("db-1", OURS, holder_timings, 3, clock.now())
    holder = parse(record.encode(), lock_path)
    for contender_timings, token, wait in itertools.product(
        _timings(), ("db-1", "db-2"), (True, False)
    ):
        backend = FileBackend(lock_path, token, OTHER, contender_timings, wait)
        try:
            silence = backend._silence_needed(holder, 0)
        except FencedOut:
            continue
        if silence is None:
            continue
        assert silence - deadline >= margin - 1e-9, (
            f"{contender_timings.describe()} (token {token}) takes over "
            f"{holder_timings.describe()} after {silence} s, deadline {deadline} s"
        )
        assert silence >= 2 * deadline - 1e-9


def test_an_operator_release_waits_as_long_as_a_takeover(lock_path: str) -> None:
    """`pgfence release` (no --force) deletes a silent lock, after which anyone may create
    one at once: it must watch at least as long as a takeover waits."""
    for timings in _timings():
        record = fresh_record("db-1", OURS, timings, 3, clock.now())
        assert takeover_silence(record) >= timings.takeover_silence - 1e-9


def test_a_one_line_lock_is_the_only_lock_taken_without_silence(lock_path: str) -> None:
    """The shell script's contract (our token: start) is the one exception: its lock has
    no heartbeat and no deadline to wait out."""
    backend = FileBackend(lock_path, "db-1", OURS, Timings.strict(2.0), wait=False)
    assert backend._silence_needed(LegacyLock("db-1"), 0) == 0.0


# -- hole: generations never repeat ------------------------------------------------------


class Crash(BaseException):
    """The process dies here: no later step of the acquisition runs. (`finally` blocks
    still do, unlike after a SIGKILL; on these paths they only remove temporary files.
    tests/integration/test_protocol_faults.py kills real processes at every call.)"""


def _generation_after_crash(lock_path: str, monkeypatch: pytest.MonkeyPatch, call: str) -> int:
    """Crash the acquisition right after `call` made the lock ours, force-release, acquire
    again; return the first generation and the second."""
    real = getattr(LockFile, call)
    crashed: list[int] = []

    def crash_after(self: LockFile, source: str, target: str) -> object:
        result = real(self, source, target)
        if target == lock_path and not crashed:
            with open(lock_path, "rb") as f:
                holder = parse(f.read(), lock_path)
            crashed.append(holder.generation if isinstance(holder, LockRecord) else 0)
            raise Crash
        return result

    monkeypatch.setattr(LockFile, call, crash_after)
    with pytest.raises(Crash):
        _backend(lock_path, instance=OURS).acquire(_no_sleep)
    monkeypatch.undo()
    _backend(lock_path, "operator", "1" * 16).release(True, _no_sleep)
    hold = _backend(lock_path, instance="2" * 16).acquire(_no_sleep)
    assert hold.generation > crashed[0], f"generation {crashed[0]} handed out twice"
    return hold.generation


def test_a_crash_right_after_creating_the_lock_never_repeats_its_generation(
    lock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _generation_after_crash(lock_path, monkeypatch, "_link")


def test_a_crash_right_after_taking_a_lock_over_never_repeats_its_generation(
    lock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(lock_path, "wb") as f:
        f.write(b"db-1\n")  # our token's one-line lock: taken over at once, by rename
    _generation_after_crash(lock_path, monkeypatch, "_rename")


def test_the_generation_file_never_moves_down(lock_path: str) -> None:
    """A contender that read an older generation and writes its reservation late must
    not lower it: the file only ever moves up."""
    early, late = LockFile(lock_path, OURS), LockFile(lock_path, OTHER)
    assert late.raise_generation(7) == 7
    assert early.raise_generation(6) == 7
    assert early.read_generation() == (7, "")


def test_an_operator_release_keeps_the_removed_generation(
    lock_path: str,
) -> None:
    """A lock whose generation file is behind (lost, or restored from an old backup) is
    force-released: the next acquisition still gets a newer generation."""
    hold = _backend(lock_path).acquire(_no_sleep)
    os.unlink(f"{lock_path}.generation")
    _backend(lock_path, "operator", "1" * 16).release(True, _no_sleep)
    assert _backend(lock_path, instance="2" * 16).acquire(_no_sleep).generation > hold.generation


def test_an_unlink_that_lands_late_fills_the_lock_path_again(
    lock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder passes its last check, then pauses in the unlink itself (one system
    call) for longer than a takeover takes: the unlink deletes the successor's lock. The
    path must not stay free for a third contender to create a lock at once: the release
    fills it again (create-only) with a record of its own that nobody renews."""
    hold = _backend(lock_path).acquire(_no_sleep)
    successor = _successor_data(lock_path)
    real_unlink = os.unlink
    late = {"now": False}

    def unlink_late(path: str) -> None:
        if path == lock_path:
            # The successor took over meanwhile (its claim was of a later attempt).
            with open(f"{lock_path}.new", "wb") as f:
                f.write(successor)
            os.rename(f"{lock_path}.new", lock_path)
            late["now"] = True
        real_unlink(path)

    monkeypatch.setattr(os, "unlink", unlink_late)
    assert hold.release(lambda: not late["now"]) is False
    monkeypatch.undo()
    with open(lock_path, "rb") as f:
        left = parse(f.read(), lock_path)
    assert isinstance(left, LockRecord)
    assert (left.instance, left.generation) == (OURS, hold.generation)
    assert left.heartbeat > 0, "the refill is a new state, so watchers start counting again"


def test_a_release_repairs_a_generation_file_lowered_by_a_late_writer(lock_path: str) -> None:
    """A contender that was overtaken while paused in its rename of the generation file
    lands it late, lowering the file below the holder's generation. The holder's release
    deletes the lock, the one other place that generation is recorded, so it raises the
    file again first: the next holder still gets a newer generation."""
    hold = _backend(lock_path).acquire(_no_sleep)
    with open(f"{lock_path}.generation", "w") as f:
        f.write(f"{hold.generation - 1} {OTHER}\n")  # what the late rename left
    assert hold.release(lambda: True)
    assert _backend(lock_path, instance="2" * 16).acquire(_no_sleep).generation > hold.generation


def test_a_generation_write_past_the_guard_is_not_made(lock_path: str) -> None:
    lock = LockFile(lock_path, OURS)
    assert lock.raise_generation(3) == 3
    assert lock.raise_generation(4, OURS, lambda: False) == 3
    assert lock.read_generation() == (3, "")


def test_a_release_that_dies_after_its_unlink_blocks_nobody(lock_path: str) -> None:
    """The holder dies (SIGKILL) right after its unlink, before freeing its claim: the
    lock is free, and the next contender takes it at once (a claim only guards a
    takeover of the state it names, which is gone) and clears the claim."""
    hold = _backend(lock_path).acquire(_no_sleep)
    assert hold.release(lambda: True)
    claim = LockFile(lock_path, OURS).claim_path(f"{hold.generation + 1}-1")
    with open(claim, "wb") as f:  # what the SIGKILL left: `finally` never ran
        f.write(f"instance={OURS}\npid=1\n".encode())
    nxt = _backend(lock_path, "db-2", "2" * 16).acquire(_no_sleep)
    assert nxt.generation > hold.generation
    assert not os.path.exists(claim)
