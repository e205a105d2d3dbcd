"""The optional watchdog (watchdog.py), against a stand-in device.

No watchdog driver can be loaded on the test machines (no softdog module), so the device
is a regular file, and strace plays the driver: it lets pgfence's real ioctl calls
(WDIOC_SETTIMEOUT, WDIOC_GETTIMEOUT) return success without running them, and records
every write (keepalive `k`, magic close `V`). Without strace, the same file exercises the
error path of the real ioctls (ENOTTY: not a watchdog). What no test here can show is the
reset itself.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import needs_root
from harness.faults import Tmpfs, steal_lock
from harness.fence import PGFENCE, assert_one_line_error, clean_env, marker_command
from harness.procs import Registry
from harness.waiting import wait_for
from pgfence import watchdog
from pgfence.errors import UsageError
from pgfence.timings import Timings

pytestmark = pytest.mark.timeout(60)
LEASE = ("--mode", "lease", "--ttl", "4")  # margin 3 s: T = 2 s


def run_args(tmp_path: Path, *extra: str) -> list[str]:
    return [PGFENCE, "run", "--lock-file", str(tmp_path / "fence_lock"), *extra]


@pytest.mark.parametrize(
    ("ttl", "timeout"), [(3.0, 1), (4.0, 2), (8.0, 5), (30.0, 20), (120.0, 81)]
)
def test_timeout_fits_inside_the_margin(ttl: float, timeout: int) -> None:
    timings = Timings.lease(ttl)
    margin = timings.ttl + timings.lock_delay - timings.deadline
    assert watchdog.timeout_for(timings) == timeout
    assert timeout <= margin - 1.0 and timeout > timings.interval


def test_timeout_refused_when_the_margin_is_too_short() -> None:
    with pytest.raises(UsageError, match="too short"):
        watchdog.timeout_for(Timings.lease(2.0))
    # Strict mode has a deadline too (3 intervals + 1 s, taken over after twice that):
    assert watchdog.timeout_for(Timings.strict(2.0)) == 6


@pytest.mark.parametrize(
    ("device", "extra", "code", "needle"),
    [
        ("missing", LEASE, 74, "No such file"),
        ("file", LEASE, 74, "not a watchdog device"),
        ("file", ("--mode", "lease", "--ttl", "2"), 64, "too short"),
    ],
)
def test_required_refuses_without_a_usable_watchdog(
    tmp_path: Path, device: str, extra: tuple[str, ...], code: int, needle: str
) -> None:
    path = tmp_path / "watchdog"
    if device == "file":
        path.write_bytes(b"")
    marker = str(tmp_path / "started")
    argv = run_args(tmp_path, *extra, "--watchdog", "required", "--watchdog-device", str(path))
    done = subprocess.run(
        [*argv, "--", *marker_command(marker)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == code, done.stderr
    assert_one_line_error(done.stderr, needle)
    assert not os.path.exists(marker)
    assert sorted(os.listdir(tmp_path)) == sorted(["watchdog"] if device == "file" else [])


def test_auto_goes_on_without_a_usable_watchdog(tmp_path: Path) -> None:
    marker = str(tmp_path / "started")
    env = clean_env(FENCE_WATCHDOG="auto", FENCE_WATCHDOG_DEVICE=str(tmp_path / "none"))
    done = subprocess.run(
        [*run_args(tmp_path, *LEASE), "--", *marker_command(marker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "going on without a watchdog" in done.stderr
    assert os.path.exists(marker)


class FakeDriver:
    """pgfence under strace, which answers the stand-in's ioctls as a driver would and
    logs each write to it."""

    def __init__(
        self,
        procs: Registry,
        tmp_path: Path,
        command: list[str],
        *inject: str,
        lock: str | None = None,
    ) -> None:
        self.device = tmp_path / "watchdog"
        self.device.write_bytes(b"")
        self.log = tmp_path / "strace.log"
        self.err = tmp_path / "pgfence.err"
        self.lock = lock or str(tmp_path / "fence_lock")
        strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-o", str(self.log)]
        # PGDATA names the directory to flush, so syncfs on it is traced (and delayable).
        strace += ["-P", str(self.device), "-P", str(tmp_path)]
        strace += ["-e", "trace=ioctl,write,close,syncfs"]
        strace += ["-e", "inject=ioctl:retval=0", *inject]
        argv = [PGFENCE, "run", "--lock-file", self.lock, "--allow-other-filesystem", *LEASE]
        argv += ["--watchdog", "required"]
        argv += ["--watchdog-device", str(self.device), "--", *command]
        with open(self.err, "wb") as err:
            env = clean_env(PGDATA=str(tmp_path))
            self.proc = procs.start([*strace, *argv], env=env, stderr=err)

    def calls(self) -> list[str]:
        text = self.log.read_text() if self.log.exists() else ""
        return [line.split(None, 1)[1] for line in text.splitlines() if " " in line]

    def writes(self) -> str:
        device = [c for c in self.calls() if c.startswith("write(")]
        return "".join(re.findall(r'^write\(\d+, "(.)", 1\)', "\n".join(device), re.M))

    def stderr(self) -> str:
        return self.err.read_text()


def test_keepalive_after_renewals_and_magic_close_on_release(
    procs: Registry, tmp_path: Path
) -> None:
    finish = tmp_path / "finish"
    script = f'while [ ! -e "{finish}" ]; do sleep 0.05; done'
    driver = FakeDriver(procs, tmp_path, ["sh", "-c", script])
    wait_for(lambda: driver.writes().count("k") >= 5, "keepalives after renewals")
    finish.touch()
    assert driver.proc.wait(timeout=30) == 0, driver.stderr()
    calls = driver.calls()
    # probed (set, checked, stopped again) before acquiring; armed once held
    assert calls[0].startswith("ioctl(") and "WDIOC_SETTIMEOUT, [2]" in calls[0]
    assert sum("WDIOC_SETTIMEOUT, [2]" in c for c in calls) == 2
    writes = driver.writes()
    assert re.fullmatch(r"kVk{4,}V", writes), writes
    assert "armed" in driver.stderr() and "released" in driver.stderr()
    assert not os.path.exists(driver.lock)


def test_self_fence_that_flushed_stops_the_watchdog(procs: Registry, tmp_path: Path) -> None:
    driver = FakeDriver(procs, tmp_path, ["sleep", "600"])
    wait_for(lambda: driver.writes().count("k") >= 3, "keepalives")
    steal_lock(driver.lock, "record")
    assert driver.proc.wait(timeout=30) == 75, driver.stderr()
    assert driver.writes().endswith("V")
    assert "flushed its writes" in driver.stderr()


def test_self_fence_whose_flush_hangs_leaves_the_watchdog_running(
    procs: Registry, tmp_path: Path
) -> None:
    """A flush that cannot finish (storage unreachable; here strace holds syncfs 10 s):
    exit 76, no magic close, so the machine resets T s after the last keepalive."""
    driver = FakeDriver(procs, tmp_path, ["sleep", "600"], "-e", "inject=syncfs:delay_enter=10s")
    wait_for(lambda: driver.writes().count("k") >= 3, "keepalives")
    steal_lock(driver.lock, "record")
    assert driver.proc.wait(timeout=30) == 76, driver.stderr()
    assert "could not be flushed" in driver.stderr()
    assert not driver.writes().endswith("V"), driver.writes()


def test_frozen_pgfence_writes_no_keepalive(procs: Registry, tmp_path: Path) -> None:
    """SIGSTOP of pgfence alone: the keepalives stop, so a real driver would reset."""
    driver = FakeDriver(procs, tmp_path, ["sleep", "600"])
    wait_for(lambda: driver.writes().count("k") >= 3, "keepalives")
    pid = wait_for(lambda: _pgfence_pid(driver.proc.pid), "pgfence under strace")
    os.kill(pid, signal.SIGSTOP)
    try:
        before = driver.writes()
        time.sleep(1.5)  # two renewal intervals (0.67 s) and more: none may keep it alive
        assert driver.writes() == before
    finally:
        os.kill(pid, signal.SIGCONT)


def _pgfence_pid(strace_pid: int) -> int:
    try:
        with open(f"/proc/{strace_pid}/task/{strace_pid}/children") as f:
            kids = f.read().split()
    except OSError:
        return 0
    return int(kids[0]) if kids else 0


@needs_root
def test_no_keepalive_after_renewals_fail(procs: Registry, tmp_path: Path) -> None:
    """The lock's filesystem turns read-only: renewals fail, and from the first failure
    on not one keepalive is written (a real driver would reset the machine unless pgfence
    fences and flushes first; it does: self-fence after D, flush, magic close)."""
    fs = Tmpfs(str(tmp_path / "lockfs"))
    try:
        driver = FakeDriver(procs, tmp_path, ["sleep", "600"], lock=f"{fs.path}/fence_lock")
        wait_for(lambda: driver.writes().count("k") >= 3, "keepalives")
        fs.read_only(True)
        wait_for(lambda: "heartbeat failed" in driver.stderr(), "a failed renewal")
        after_failure = len(driver.calls())
        assert driver.proc.wait(timeout=30) == 75, driver.stderr()
        late = [c for c in driver.calls()[after_failure:] if c.startswith("write(")]
        assert late and all('"V"' in c for c in late), late
    finally:
        fs.read_only(False)
        fs.unmount()


def test_margin_and_flush_bound_follow_the_takeover_rule() -> None:
    lease = Timings.lease(30.0)
    assert lease.margin == 22.5 and lease.flush_bound == 11.25
    # strict: deadline D = 3 intervals + 1 s, a same-token takeover after 2 D
    strict = Timings.strict(2.0)
    assert strict.margin == 7.0 and strict.flush_bound == 3.5
