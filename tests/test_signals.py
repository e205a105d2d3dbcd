"""Supervision: signals reach the command unchanged, its exit status comes back, the lock
outlives the command and everything it started, and the command dies with pgfence.

The command is usually `harness/print_signals.py`, which records every signal it receives.
"""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from harness.fence import (
    FAST,
    PGFENCE,
    PRINT_SIGNALS,
    Holder,
    clean_env,
    first_line,
    lock_fields,
    marker_command,
    path_state,
    read_text,
)
from harness.pg import free_port
from harness.procs import Registry, alive
from harness.waiting import wait_for

pytestmark = pytest.mark.timeout(60)
FORWARDED = ("SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def default_dispositions() -> None:
    """Start pgfence as Docker starts PID 1: with default signal dispositions. A test run
    launched as a shell's background job inherits SIGINT and SIGQUIT ignored, and pgfence
    passes ignored dispositions on to its command, as exec would."""
    for name in FORWARDED:
        signal.signal(getattr(signal, name), signal.SIG_DFL)


class Run:
    """`pgfence run` in the background, its stderr in a file."""

    def __init__(
        self,
        procs: Registry,
        directory: str,
        command: list[str],
        *extra: str,
        prefix: tuple[str, ...] = (),
    ) -> None:
        self.lock = os.path.join(directory, "fence_lock")
        self.err = os.path.join(directory, "pgfence.err")
        argv = [*prefix, PGFENCE, "run", "--lock-file", self.lock, "--token", "db-1"]
        with open(self.err, "wb") as err:
            self.proc = procs.start(
                [*argv, *FAST, *extra, "--", *command],
                env=clean_env(),
                stdout=subprocess.DEVNULL,
                stderr=err,
                preexec_fn=default_dispositions,
            )

    @property
    def stderr(self) -> str:
        return read_text(self.err)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            tree = subprocess.run(
                ["ps", "-o", "pid,ppid,stat,wchan:24,cmd", "-s", str(self.proc.pid)],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout
            raise AssertionError(
                f"pgfence still running after {timeout:g} s\n{tree}\n{self.stderr}"
            ) from None

    def wait_started(self) -> None:
        wait_for(lambda: "started" in self.stderr or self.proc.poll() is not None, "the start")
        assert self.proc.poll() is None, self.stderr

    def signal(self, name: str) -> None:
        self.proc.send_signal(getattr(signal, name))

    def heartbeat(self) -> int:
        fields = lock_fields(self.lock)
        assert fields is not None, "the lock is gone"
        return int(fields["heartbeat"])

    def wait_beat(self) -> None:
        start = self.heartbeat()
        wait_for(lambda: self.heartbeat() > start, "a heartbeat")


class Recorder:
    """A print_signals.py process: its output file and its pid once it is ready."""

    def __init__(self, path: str) -> None:
        self.path = path

    def command(self, *options: str) -> list[str]:
        return [sys.executable, PRINT_SIGNALS, self.path, *options]

    def lines(self) -> list[str]:
        return read_text(self.path).splitlines()

    def ready(self) -> tuple[int, int]:
        line = wait_for(
            lambda: next((x for x in self.lines() if x.startswith("ready ")), ""),
            f"{self.path} to be ready",
        )
        _, pid, uid = line.split()
        return int(pid), int(uid)

    def signals(self) -> list[str]:
        return [x for x in self.lines() if x.startswith("SIG")]

    def wait_signal(self, name: str, count: int = 1) -> None:
        wait_for(lambda: self.signals().count(name) >= count, f"{name} to arrive")


# -- forwarding ----------------------------------------------------------------------------


def test_each_signal_is_forwarded_unchanged(procs: Registry, tmp_path: Path) -> None:
    recorder = Recorder(str(tmp_path / "signals"))
    run = Run(procs, str(tmp_path), recorder.command("--exit-on", "SIGTERM"))
    recorder.ready()
    order = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGTERM"]
    for i, name in enumerate(order):
        run.signal(name)
        recorder.wait_signal(name, order[: i + 1].count(name))
    assert run.wait() == 0
    assert recorder.signals() == order  # each one, once, unchanged, in order
    assert not os.path.exists(run.lock)


# -- exit status -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [0, 1, 2, 127])
def test_exit_status_is_propagated(procs: Registry, tmp_path: Path, status: int) -> None:
    run = Run(procs, str(tmp_path), ["sh", "-c", f"exit {status}"])
    assert run.wait() == status
    assert not os.path.exists(run.lock)


@pytest.mark.parametrize("name", ["SIGKILL", "SIGTERM", "SIGSEGV"])
def test_death_by_signal_is_128_plus_n(procs: Registry, tmp_path: Path, name: str) -> None:
    run = Run(procs, str(tmp_path), ["sh", "-c", f'kill -{name[3:]} "$$"'])
    assert run.wait() == 128 + getattr(signal, name)
    assert not os.path.exists(run.lock)


@pytest.mark.parametrize("name", FORWARDED)
def test_forwarded_signal_that_kills_gives_128_plus_n(
    procs: Registry, tmp_path: Path, name: str
) -> None:
    run = Run(procs, str(tmp_path), ["sleep", "600"])
    run.wait_started()
    run.signal(name)
    assert run.wait() == 128 + getattr(signal, name)
    assert "Traceback" not in run.stderr
    assert not os.path.exists(run.lock)


def test_signal_aborts_the_wait_for_a_lock(procs: Registry, tmp_path: Path) -> None:
    # A killed holder of our own token with a 2 s heartbeat: a new instance must watch it
    # for 3 * 2 + 1 s before taking over. SIGTERM meanwhile ends the wait: nothing starts.
    lock = str(tmp_path / "fence_lock")
    holder = Holder(procs, lock, "db-1", str(tmp_path / "holder"), ("--heartbeat-interval", "2"))
    holder.kill()
    before = path_state(lock)
    marker = str(tmp_path / "started")
    waiting = Run(procs, str(tmp_path), marker_command(marker))
    wait_for(lambda: "waiting for the lock" in waiting.stderr, "the progress message")
    waiting.signal("SIGTERM")
    assert waiting.wait() == 128 + signal.SIGTERM
    assert "interrupted by signal 15" in waiting.stderr.splitlines()[-1]
    assert not os.path.exists(marker)
    assert path_state(lock) == before


# -- the lock outlives the command ------------------------------------------------------------


def test_lock_kept_while_the_command_ignores_sigterm(procs: Registry, tmp_path: Path) -> None:
    recorder = Recorder(str(tmp_path / "signals"))
    run = Run(procs, str(tmp_path), recorder.command("--exit-on", "SIGUSR1", "--exit-code", "4"))
    child, _ = recorder.ready()
    run.signal("SIGTERM")
    recorder.wait_signal("SIGTERM")
    # The command is still running, so pgfence holds the lock and keeps it fresh.
    run.wait_beat()
    assert alive(child)
    assert run.proc.poll() is None
    assert first_line(run.lock) == "db-1"
    run.signal("SIGUSR1")
    assert run.wait() == 4
    assert not alive(child)
    assert not os.path.exists(run.lock)


def daemonizing_command(daemon: Recorder, *daemon_options: str) -> list[str]:
    """A command that starts `daemon` in its own session (as pg_ctl does) and exits 3."""
    script = 'setsid "$@" & while ! grep -q "^ready" "$0" 2>/dev/null; do sleep 0.02; done; exit 3'
    return ["sh", "-c", script, daemon.path, *daemon.command(*daemon_options)]


def test_lock_kept_until_a_daemon_in_its_own_session_is_gone(
    procs: Registry, tmp_path: Path
) -> None:
    daemon = Recorder(str(tmp_path / "daemon"))
    run = Run(
        procs,
        str(tmp_path),
        daemonizing_command(daemon, "--exit-on", "SIGUSR1"),
        "--drain-grace",
        "600",
    )
    pid, _ = daemon.ready()
    assert os.getsid(pid) == pid  # its own session, like a server started by pg_ctl
    wait_for(lambda: "still running" in run.stderr, "pgfence to notice the leftover daemon")
    daemon.wait_signal("SIGTERM")  # asked to stop; it does not
    run.wait_beat()
    assert run.proc.poll() is None
    assert first_line(run.lock) == "db-1"
    os.kill(pid, signal.SIGUSR1)  # now it stops
    assert run.wait() == 3  # the command's status, not the daemon's
    assert not os.path.exists(run.lock)


def test_daemon_ignoring_sigterm_is_killed_after_the_drain_grace(
    procs: Registry, tmp_path: Path
) -> None:
    daemon = Recorder(str(tmp_path / "daemon"))
    run = Run(procs, str(tmp_path), daemonizing_command(daemon), "--drain-grace", "0.5")
    pid, _ = daemon.ready()
    assert run.wait() == 3
    assert not alive(pid)  # gone before pgfence exited and released
    assert daemon.signals() == ["SIGTERM"]
    assert "still running: sent SIGTERM, SIGKILL in 0.5 s" in run.stderr
    assert not os.path.exists(run.lock)


# -- pgfence dies: the command dies, the lock stays --------------------------------------------


@pytest.mark.parametrize("user", [None, "postgres"])
def test_command_dies_with_pgfence(
    procs: Registry, tmp_path: Path, shared_dir: str, user: str | None
) -> None:
    directory = shared_dir if user else str(tmp_path)
    recorder = Recorder(os.path.join(directory, "signals"))
    extra = ("--user", user) if user else ()
    run = Run(procs, directory, recorder.command(), *extra)
    child, uid = recorder.ready()
    assert uid == (pwd.getpwnam(user).pw_uid if user else os.getuid())
    run.proc.kill()
    run.wait()
    wait_for(lambda: not alive(child), "the command to die with pgfence (parent-death signal)")
    assert first_line(run.lock) == "db-1"  # a killed holder leaves its lock
    assert recorder.signals() == []  # SIGKILL, which it cannot record


# -- a burst of signals with every thread running ---------------------------------------------

BURST = ("SIGUSR1", "SIGUSR2", "SIGHUP")
MODES = {"strict": FAST, "lease": ("--mode", "lease", "--ttl", "2")}


def signal_burst(pid: int, count: int, keep_going: Callable[[], bool]) -> int:
    """Send `count` SIGUSR1/SIGUSR2/SIGHUP in turn to `pid`, as fast as possible, while
    `keep_going()`; returns how many were sent."""
    sent = 0
    for sent in range(count):
        if sent % 100 == 0 and not keep_going():
            break
        os.kill(pid, getattr(signal, BURST[sent % len(BURST)]))
    return sent


def threads_blocking(pid: int) -> dict[str, int]:
    """name -> blocked-signal mask of every thread of `pid` but the main one (from
    /proc). The main thread waits in sigtimedwait(2), which unblocks what it waits for
    while it sleeps, so its SigBlk reads 0 then; it is the thread meant to take them."""
    masks = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        if tid == str(pid):
            continue
        name = read_text(f"/proc/{pid}/task/{tid}/comm").strip()
        status = read_text(f"/proc/{pid}/task/{tid}/status")
        blocked = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
        masks[f"{name}/{tid}"] = int(blocked.split()[1], 16)
    return masks


def handled_mask() -> int:
    names = (*FORWARDED, "SIGCHLD")
    return sum(1 << (getattr(signal, name) - 1) for name in names)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_signal_burst_with_metrics_on_then_sigint_releases(
    procs: Registry, tmp_path: Path, mode: str
) -> None:
    """Thousands of forwarded signals while the metrics and renewer threads run: every
    thread blocks them (none can take a signal's default action, nor turn SIGINT into a
    KeyboardInterrupt); pgfence survives, and a final SIGINT ends in the command's own
    status and a released lock."""
    recorder = Recorder(str(tmp_path / "signals"))
    port = free_port()
    run = Run(
        procs,
        str(tmp_path),
        recorder.command("--exit-on", "SIGINT", "--exit-code", "5"),
        *(MODES[mode] if mode == "lease" else ()),
        "--metrics-address",
        f"127.0.0.1:{port}",
    )
    recorder.ready()
    masks = threads_blocking(run.proc.pid)
    assert len(masks) >= 2, masks  # renewer, metrics
    sent = signal_burst(run.proc.pid, 6000, lambda: run.proc.poll() is None)
    assert run.proc.poll() is None, f"pgfence died after {sent} signals: {run.stderr}"
    for name, mask in masks.items():
        assert mask & handled_mask() == handled_mask(), f"thread {name} blocks {mask:x}"
    run.wait_beat()
    run.signal("SIGINT")
    assert run.wait() == 5, run.stderr
    assert "Traceback" not in run.stderr
    assert "SIGINT" in recorder.signals()
    assert not os.path.exists(run.lock)
