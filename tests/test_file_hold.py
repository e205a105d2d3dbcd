"""FileHold's renewals when the storage misbehaves (fakes for the failing system call)."""

from __future__ import annotations

import pytest

from pgfence.backends.file.backend import FileBackend
from pgfence.backends.file.lockfile import LockFile, NotDurable
from pgfence.errors import StorageError
from pgfence.timings import Timings


def _sleep(_: float) -> None:
    raise AssertionError("no waiting expected")


def test_a_heartbeat_whose_directory_fsync_failed_still_counts_as_ours(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rename happened (readers see the new heartbeat) but the directory fsync failed:
    that renewal fails, yet the next one must compare against the heartbeat in place,
    not report the lock as lost (which would kill a strict-mode server on a transient EIO)."""
    backend = FileBackend(
        f"{tmp_path}/fence_lock", "db-1", "0123456789abcdef", Timings.strict(1.0), wait=False
    )
    hold = backend.acquire(_sleep)
    real_sync = LockFile._sync_directory
    calls = {"n": 0}

    def failing_once(self: LockFile) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StorageError("cannot sync directory: Input/output error")
        real_sync(self)

    monkeypatch.setattr(LockFile, "_sync_directory", failing_once)
    with pytest.raises(NotDurable):
        hold.renew(lambda: True)
    assert hold.renew(lambda: True) is True
    assert backend.held_by_instance("0123456789abcdef")
    assert hold.release(lambda: True)
