"""`check` and /healthz are healthy only in the container whose pgfence holds the fence.

Two containers with the same token (a Swarm hostname template) share a lock: one holds
it, the other waits for it. Each container has its own runtime directory (FENCE_RUNTIME_DIR
stands for the container-local /run), where `run` notes the instance it holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness import pg
from harness.fence import PGFENCE, clean_env, lock_fields
from harness.procs import Registry
from harness.waiting import wait_for
from pgfence import clock, localholder
from pgfence.metrics import Metrics

pytestmark = pytest.mark.timeout(90)


def healthz(port: int) -> tuple[int, str] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError):
        return None


class Box:
    """An emulated container: its own runtime directory and metrics port."""

    def __init__(self, procs: Registry, tmp: Path, name: str, lock: str) -> None:
        self.runtime = str(tmp / f"run-{name}")
        self.port = pg.free_port()
        self.lock = lock
        argv = [PGFENCE, "run", "--mode", "lease", "--ttl", "2", "--wait", "--lock-file", lock]
        argv += ["--metrics-address", f"127.0.0.1:{self.port}", "--", "sleep", "60"]
        self.proc = procs.start(
            argv,
            env=self.env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def env(self) -> dict[str, str]:
        return clean_env(FENCE_VARIABLE="pg", FENCE_RUNTIME_DIR=self.runtime)

    def check(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PGFENCE, "check", "--mode", "lease", "--ttl", "2", "--lock-file", self.lock],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def health(self) -> tuple[int, str] | None:
        return healthz(self.port)


def test_only_the_holders_container_is_healthy(procs: Registry, tmp_path: Path) -> None:
    lock = str(tmp_path / "fence_lock")
    a = Box(procs, tmp_path, "a", lock)
    wait_for(lambda: a.check().returncode == 0, "a to be healthy")
    held = lock_fields(lock)
    assert held is not None
    b = Box(procs, tmp_path, "b", lock)  # same token: waits for a's lease
    wait_for(lambda: b.health() is not None, "b's metrics endpoint")
    checked = b.check()
    assert checked.returncode == 1
    assert "not by a pgfence run in this container" in checked.stdout
    assert held["instance"] in checked.stdout
    status_a, status_b = a.health(), b.health()
    assert status_a is not None and status_a[0] == 200 and status_a[1].startswith("healthy")
    assert status_b is not None and status_b[0] == 503
    assert (lock_fields(lock) or {}).get("instance") == held["instance"]  # b still waits

    # a stops and releases; b takes over. a's runtime directory still names a's instance
    # (a stale note, as after a restart): a is unhealthy, b healthy.
    a.proc.send_signal(signal.SIGTERM)
    a.proc.wait(timeout=30)
    wait_for(lambda: b.check().returncode == 0, "b to be healthy after taking the lock")
    assert a.check().returncode == 1
    health_b = b.health()
    assert health_b is not None and health_b[0] == 200
    b.proc.send_signal(signal.SIGTERM)
    b.proc.wait(timeout=30)


def test_a_note_is_kept_off_other_users_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(localholder, "RUN_DIR", str(tmp_path / "run" / "pgfence"))
    monkeypatch.setattr(localholder, "TMP_DIR", str(tmp_path / "tmp"))
    monkeypatch.setattr(localholder, "SOCKET_DIR", str(tmp_path / "run" / "postgresql"))
    os.makedirs(tmp_path / "tmp")
    path = localholder.record("/v/fence_lock", "0123456789abcdef", {})
    assert path is not None and path.startswith(str(tmp_path / "run"))
    assert localholder.instances_here("/v/fence_lock", {}) == {"0123456789abcdef"}
    assert localholder.instances_here("/v/other_lock", {}) == set()
    # A note in a /tmp directory named after another uid than its owner does not count.
    planted = tmp_path / "tmp" / "pgfence-12345"
    planted.mkdir()
    (planted / localholder.marker_name("/w/fence_lock")).write_text(
        "fedcba9876543210\n/w/fence_lock\n"
    )
    assert localholder.instances_here("/w/fence_lock", {}) == set()
    # /run not writable: the note goes to /tmp/pgfence-<uid>, and check finds it there.
    monkeypatch.setattr(localholder, "RUN_DIR", "/proc/pgfence")
    fallback = localholder.record("/w/fence_lock", "1111222233334444", {})
    assert fallback == str(
        tmp_path / "tmp" / f"pgfence-{os.geteuid()}" / localholder.marker_name("/w/fence_lock")
    )
    assert localholder.instances_here("/w/fence_lock", {}) == {"1111222233334444"}
    # /tmp not writable either (a read-only root filesystem): PostgreSQL's socket
    # directory, which must be writable for the server to run at all.
    monkeypatch.setattr(localholder, "TMP_DIR", str(tmp_path / "not-a-directory"))
    (tmp_path / "not-a-directory").write_text("")  # unwritable even for root
    os.makedirs(tmp_path / "run" / "postgresql")
    socket = localholder.record("/x/fence_lock", "5555666677778888", {})
    assert socket is not None and "/run/postgresql/pgfence-" in socket
    assert localholder.instances_here("/x/fence_lock", {}) == {"5555666677778888"}
    # FENCE_RUNTIME_DIR is the operator's: any owner.
    chosen = {"FENCE_RUNTIME_DIR": str(tmp_path / "chosen")}
    assert localholder.record("/y/fence_lock", "9999aaaabbbbcccc", chosen) is not None
    assert localholder.instances_here("/y/fence_lock", chosen) == {"9999aaaabbbbcccc"}
    assert localholder.instances_here("/y/fence_lock", {}) == set()


def test_healthz_needs_a_fresh_renewal(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr(clock, "now", lambda: now[0])
    metrics = Metrics("file", "strict", None, 2.0)
    assert metrics.health()[0] is False
    metrics.acquired(3, 100.0)
    assert metrics.health() == (True, "healthy: holding generation 3, renewed 0.0 s ago")
    now[0] = 105.5  # 2 intervals + 1 s without a renewal
    healthy, why = metrics.health()
    assert not healthy and "5.5 s ago" in why
    metrics.renewed(105.0, 0.01)
    assert metrics.health()[0] is True
    metrics.fenced()
    assert metrics.health()[0] is False
    lease = Metrics("file", "lease", 15.0, 5.0)  # TTL 30: fresh within min(11, 15) s
    lease.acquired(1, 100.0)
    now[0] = 111.5
    assert lease.health()[0] is False
