"""The atomic primitives under the lock: create has one winner, renew/takeover/remove only
act on the content the caller saw, and nothing but a regular file is ever read or replaced
at the lock path (a symlink is never followed)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.fence import path_state, write_file
from pgfence.backends.file.lockfile import LockFile, Snapshot
from pgfence.errors import LockFormatError, StorageError
from pgfence.record import MAX_LOCK_BYTES

INSTANCE = "00112233aabbccdd"


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[LockFile]:
    yield LockFile(str(tmp_path / "fence_lock"), INSTANCE)


def leftovers(lockfile: LockFile) -> list[str]:
    """Temporary files and claims left in the lock's directory."""
    return sorted(
        n for n in os.listdir(lockfile.directory) if n.endswith(".tmp") or ".takeover-" in n
    )


def yes() -> bool:
    return True


def no() -> bool:
    return False


# -- reading ---------------------------------------------------------------------------


def test_read_absent_is_none(lock: LockFile) -> None:
    assert lock.read() is None


def test_read_returns_bytes(lock: LockFile) -> None:
    write_file(lock.path, b"db-1\n")
    assert lock.read() == Snapshot(b"db-1\n")


def test_read_stops_past_the_size_limit(lock: LockFile) -> None:
    write_file(lock.path, b"x" * (3 * MAX_LOCK_BYTES))
    snapshot = lock.read()
    assert snapshot is not None
    assert len(snapshot.data) == MAX_LOCK_BYTES + 1  # enough for parse() to refuse it


def test_missing_directory_is_a_storage_error(tmp_path: Path) -> None:
    lockfile = LockFile(str(tmp_path / "nope" / "fence_lock"), INSTANCE)
    with pytest.raises(StorageError, match="does not exist") as info:
        lockfile.read()
    assert info.value.exit_code == 74
    with pytest.raises(StorageError):
        lockfile.create(b"db-1\n")
    assert not os.path.exists(os.path.dirname(lockfile.path))


def test_directory_at_lock_path_is_refused(lock: LockFile) -> None:
    os.mkdir(lock.path)
    before = path_state(lock.path)
    with pytest.raises(StorageError, match="is a directory"):
        lock.read()
    assert lock.create(b"db-1\n") is False
    assert path_state(lock.path) == before
    assert leftovers(lock) == []


def test_fifo_at_lock_path_is_refused_without_blocking(lock: LockFile) -> None:
    os.mkfifo(lock.path)
    with pytest.raises(StorageError, match="not a regular file"):
        lock.read()


@pytest.mark.parametrize("dangling", [False, True])
def test_symlink_at_lock_path_is_never_followed(lock: LockFile, dangling: bool) -> None:
    target = os.path.join(lock.directory, "elsewhere")
    if not dangling:
        write_file(target, b"db-1\n")
    os.symlink(target, lock.path)
    before = path_state(lock.path)
    with pytest.raises(StorageError, match="symlink") as info:
        lock.read()
    assert info.value.exit_code == 74
    assert lock.create(b"other\n") is False  # link(2) does not follow it either
    with pytest.raises(StorageError, match="symlink"):
        lock.remove(Snapshot(b"db-1\n"), "1-1")
    with pytest.raises(StorageError, match="symlink"):
        lock.renew(Snapshot(b"db-1\n"), b"db-1\nx\n", yes)
    assert path_state(lock.path) == before
    assert os.path.exists(target) != dangling
    assert leftovers(lock) == []


# -- create ----------------------------------------------------------------------------


def test_create_once(lock: LockFile) -> None:
    assert lock.create(b"first\n") is True
    assert lock.create(b"second\n") is False
    assert LockFile(lock.path, "ffeeddccbbaa9988").create(b"third\n") is False
    assert lock.read() == Snapshot(b"first\n")
    assert leftovers(lock) == []


def _winners(contend: Callable[[str, int, object, object], None], path: str) -> list[int]:
    """Run `contend(path, i, barrier, results)` in 16 forked processes released together
    by a barrier; each puts (i, won) on `results`. Returns the indexes that won."""
    ctx = multiprocessing.get_context("fork")
    n = 16
    barrier = ctx.Barrier(n)
    results = ctx.Queue()
    workers = [ctx.Process(target=contend, args=(path, i, barrier, results)) for i in range(n)]
    for w in workers:
        w.start()
    outcomes = dict(results.get(timeout=30) for _ in range(n))
    for w in workers:
        w.join(timeout=30)
    return [i for i, won in outcomes.items() if won]


def _contend(path: str, index: int, barrier: object, results: object) -> None:
    lockfile = LockFile(path, f"{index:016x}")
    barrier.wait()  # type: ignore[attr-defined]
    results.put((index, lockfile.create(f"holder-{index}\n".encode())))  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_create_has_exactly_one_winner_among_processes(lock: LockFile) -> None:
    for _ in range(5):
        if os.path.exists(lock.path):
            os.unlink(lock.path)
        winners = _winners(_contend, lock.path)
        assert len(winners) == 1, winners
        assert lock.read() == Snapshot(f"holder-{winners[0]}\n".encode())
        assert leftovers(lock) == []


def test_created_file_is_complete_and_private_temp_is_gone(lock: LockFile) -> None:
    data = b"db-1\n" + b"k=v\n" * 500
    assert lock.create(data)
    with open(lock.path, "rb") as f:
        assert f.read() == data
    assert os.stat(lock.path).st_nlink == 1


# -- renew -----------------------------------------------------------------------------


def test_renew_replaces_own_content(lock: LockFile) -> None:
    lock.create(b"db-1\nbeat=1\n")
    outcome = lock.renew(Snapshot(b"db-1\nbeat=1\n"), b"db-1\nbeat=2\n", yes)
    assert outcome.ok
    assert lock.read() == Snapshot(b"db-1\nbeat=2\n")
    assert leftovers(lock) == []


def test_renew_refuses_when_content_changed(lock: LockFile) -> None:
    lock.create(b"db-1\nbeat=1\n")
    write_file(lock.path, b"intruder\n")
    outcome = lock.renew(Snapshot(b"db-1\nbeat=1\n"), b"db-1\nbeat=2\n", yes)
    assert not outcome.ok
    assert outcome.found == Snapshot(b"intruder\n")
    assert lock.read() == Snapshot(b"intruder\n")
    assert leftovers(lock) == []


def test_renew_refuses_when_lock_removed(lock: LockFile) -> None:
    lock.create(b"db-1\n")
    os.unlink(lock.path)
    outcome = lock.renew(Snapshot(b"db-1\n"), b"db-1\nbeat=2\n", yes)
    assert not outcome.ok
    assert outcome.found is None
    assert not os.path.exists(lock.path)  # never re-created by a renewal
    assert leftovers(lock) == []


def test_renew_refuses_when_guard_says_too_late(lock: LockFile) -> None:
    lock.create(b"db-1\n")
    outcome = lock.renew(Snapshot(b"db-1\n"), b"db-1\nbeat=2\n", no)
    assert not outcome.ok
    assert outcome.found == Snapshot(b"db-1\n")
    assert lock.read() == Snapshot(b"db-1\n")
    assert leftovers(lock) == []


# -- takeover --------------------------------------------------------------------------


def test_takeover_replaces_observed_content(lock: LockFile) -> None:
    write_file(lock.path, b"old\n")
    outcome = lock.takeover(Snapshot(b"old\n"), b"new\n", "2-1", yes)
    assert outcome.ok
    assert lock.read() == Snapshot(b"new\n")
    assert leftovers(lock) == []  # the claim is gone too


def test_takeover_refuses_changed_content(lock: LockFile) -> None:
    write_file(lock.path, b"old\nbeat=2\n")
    outcome = lock.takeover(Snapshot(b"old\nbeat=1\n"), b"new\n", "2-1", yes)
    assert not outcome.ok
    assert not outcome.busy
    assert outcome.found == Snapshot(b"old\nbeat=2\n")
    assert lock.read() == Snapshot(b"old\nbeat=2\n")
    assert leftovers(lock) == []


def test_takeover_refuses_removed_lock(lock: LockFile) -> None:
    outcome = lock.takeover(Snapshot(b"old\n"), b"new\n", "2-1", yes)
    assert not outcome.ok
    assert outcome.found is None
    assert not os.path.exists(lock.path)


def test_takeover_refuses_when_guard_says_too_late(lock: LockFile) -> None:
    write_file(lock.path, b"old\n")
    outcome = lock.takeover(Snapshot(b"old\n"), b"new\n", "2-1", no)
    assert not outcome.ok
    assert lock.read() == Snapshot(b"old\n")
    # A claim held past its limit may already count as abandoned for contenders that
    # moved on to the next attempt; freeing it would let a slow one take this attempt
    # too. It stays until a winner removes the claims of that generation.
    assert leftovers(lock) == ["fence_lock.takeover-2-1"]


def test_takeover_is_busy_while_another_contender_holds_the_claim(lock: LockFile) -> None:
    write_file(lock.path, b"old\n")
    other = LockFile(lock.path, "ffeeddccbbaa9988")
    write_file(other.claim_path("2-1"), b"instance=ffeeddccbbaa9988\npid=1\n")
    outcome = lock.takeover(Snapshot(b"old\n"), b"new\n", "2-1", yes)
    assert not outcome.ok
    assert outcome.busy
    assert lock.read() == Snapshot(b"old\n")
    assert lock.read_claim("2-1") == b"instance=ffeeddccbbaa9988\npid=1\n"  # not ours to remove
    # Another claim name (the next attempt) is free.
    assert lock.takeover(Snapshot(b"old\n"), b"new\n", "2-2", yes).ok
    lock.remove_claims("2-")
    assert leftovers(lock) == []


def _take_over(path: str, index: int, barrier: object, results: object) -> None:
    lockfile = LockFile(path, f"{index:016x}")
    barrier.wait()  # type: ignore[attr-defined]
    outcome = lockfile.takeover(Snapshot(b"old\n"), f"new-{index}\n".encode(), "2-1", yes)
    results.put((index, outcome.ok))  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_concurrent_takeovers_of_one_state_have_exactly_one_winner(lock: LockFile) -> None:
    for _ in range(5):
        write_file(lock.path, b"old\n")
        winners = _winners(_take_over, lock.path)
        assert len(winners) == 1, winners
        assert lock.read() == Snapshot(f"new-{winners[0]}\n".encode())
        assert leftovers(lock) == []


# -- remove ----------------------------------------------------------------------------


def test_remove_deletes_observed_content(lock: LockFile) -> None:
    write_file(lock.path, b"db-1\n")
    assert lock.remove(Snapshot(b"db-1\n"), "1-1").ok
    assert lock.read() is None


def test_remove_compares_first(lock: LockFile) -> None:
    write_file(lock.path, b"db-1\nbeat=2\n")
    outcome = lock.remove(Snapshot(b"db-1\nbeat=1\n"), "1-1")
    assert not outcome.ok
    assert outcome.found == Snapshot(b"db-1\nbeat=2\n")
    assert lock.read() == Snapshot(b"db-1\nbeat=2\n")


def test_remove_under_a_busy_claim_is_refused(lock: LockFile) -> None:
    write_file(lock.path, b"db-1\n")
    write_file(lock.claim_path("1-1"), b"instance=ffeeddccbbaa9988\npid=1\n")
    outcome = lock.remove(Snapshot(b"db-1\n"), "1-1")
    assert not outcome.ok
    assert outcome.busy
    assert lock.read() == Snapshot(b"db-1\n")
    os.unlink(lock.claim_path("1-1"))
    assert lock.remove(Snapshot(b"db-1\n"), "1-1").ok
    assert leftovers(lock) == []


def test_remove_of_absent_lock(lock: LockFile) -> None:
    outcome = lock.remove(Snapshot(b"db-1\n"), "1-1")
    assert not outcome.ok
    assert outcome.found is None


def test_directory_at_lock_path_is_never_removed(lock: LockFile) -> None:
    os.mkdir(lock.path)
    with pytest.raises(StorageError):
        lock.remove(Snapshot(b""), "1-1")
    assert os.path.isdir(lock.path)


# -- the generation file ---------------------------------------------------------------


def test_generation_file_round_trip(lock: LockFile) -> None:
    assert lock.read_generation() == (0, "")
    assert lock.raise_generation(7) == 7
    assert lock.read_generation() == (7, "")
    assert lock.raise_generation(7, "a" * 16) == 7  # marked as won
    assert lock.read_generation() == (7, "a" * 16)
    assert lock.raise_generation(7) == 7  # an unmarked reservation never unmarks it
    assert lock.read_generation() == (7, "a" * 16)
    assert lock.raise_generation(5) == 7  # never down
    assert lock.raise_generation(8) == 8
    assert leftovers(lock) == []


@pytest.mark.parametrize("content", [b"", b"x\n", b"-1\n", b"1 2 3\n", b"9" * 19 + b"\n"])
def test_a_bad_generation_file_is_refused(lock: LockFile, content: bytes) -> None:
    write_file(f"{lock.path}.generation", content)
    with pytest.raises(LockFormatError):
        lock.read_generation()


def test_remove_claims_only_touches_its_prefix(lock: LockFile) -> None:
    for claim in ("3-1", "3-2", "4-1"):
        write_file(lock.claim_path(claim), b"x")
    write_file(lock.path, b"db-1\n")
    lock.remove_claims("3-")
    assert leftovers(lock) == [f"{lock.name}.takeover-4-1"]
    assert lock.read() == Snapshot(b"db-1\n")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown)")
def test_files_written_as_root_belong_to_the_directory_owner(tmp_path: Path) -> None:
    """The official entrypoint chowns whatever in PGDATA is not postgres's, as root: a
    short-lived file of ours that vanished under that `find -exec chown` stopped the
    container. Written as root, our files are the directory owner's from the start."""
    directory = tmp_path / "pgdata"
    directory.mkdir()
    os.chown(directory, 999, 999)
    lockfile = LockFile(str(directory / "fence_lock"), INSTANCE)
    assert lockfile.create(b"db-1\n")
    written = os.stat(lockfile.path)
    assert (written.st_uid, written.st_gid) == (999, 999)
    assert lockfile.renew(Snapshot(b"db-1\n"), b"db-1\nbeat\n", yes).ok
    assert os.stat(lockfile.path).st_uid == 999
    assert leftovers(lockfile) == []


def test_files_in_a_root_directory_stay_roots(lock: LockFile) -> None:
    assert lock.create(b"db-1\n")
    assert os.stat(lock.path).st_uid == os.geteuid()


def test_a_late_write_lowers_one_copy_of_the_generation_never_both(lock: LockFile) -> None:
    """A writer paused between its last read and its rename puts back the value it read
    long ago; it lowers the copy it was renaming, and the other still says the highest."""
    assert lock.raise_generation(7, "aaaa") == 7
    primary, mirror = f"{lock.path}.generation", f"{lock.path}.generation.mirror"
    assert read_bytes(primary) == read_bytes(mirror) == b"7 aaaa\n"
    for late in (primary, mirror):
        write_file(late, b"3\n")  # what the late rename lands
        assert lock.read_generation() == (7, "aaaa")
        assert lock.raise_generation(4) == 7  # nobody is handed a lower number
        write_file(late, b"7 aaaa\n")
    assert lock.raise_generation(8) == 8
    assert read_bytes(primary) == read_bytes(mirror) == b"8\n"


def test_a_broken_copy_of_the_generation_is_refused(lock: LockFile) -> None:
    lock.raise_generation(2)
    write_file(f"{lock.path}.generation.mirror", b"garbage\n")
    with pytest.raises(LockFormatError, match=r"generation\.mirror does not hold"):
        lock.read_generation()


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
