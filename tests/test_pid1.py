"""pgfence as PID 1 of an emulated container (`harness.sandbox.Sandbox`: new PID, UTS, IPC
and mount namespaces with their own /proc): it reaps orphans, forwards signals, and after
the command exits it outlives every process in the namespace before releasing the lock.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root
from harness.fence import FAST, PGFENCE, PRINT_SIGNALS, clean_env, first_line, read_text
from harness.procs import Registry, alive, stat_fields
from harness.sandbox import Sandbox
from harness.waiting import wait_for

pytestmark = [needs_root, pytest.mark.timeout(60)]


class Container:
    """`pgfence run` exec'd as PID 1 of a sandbox named `name` (which is also its token)."""

    def __init__(
        self, procs: Registry, tmp_path: Path, command: list[str], *extra: str, name: str = "c1"
    ) -> None:
        self.lock = str(tmp_path / "fence_lock")
        self.err = str(tmp_path / "pgfence.err")
        argv = [PGFENCE, "run", "--lock-file", self.lock, *FAST, *extra, "--", *command]
        with open(self.err, "wb") as err:
            self.box = Sandbox(
                procs, name, argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err
            )
        self.init = self.box.init_pid()
        wait_for(lambda: "started" in self.stderr or self.box.returncode() is not None, "start")
        assert self.box.returncode() is None, self.stderr
        with open(f"/proc/{self.init}/cmdline", "rb") as f:
            assert PGFENCE.encode() in f.read().split(b"\0")  # pgfence itself is PID 1
        assert ns_pid(self.init) == 1
        assert first_line(self.lock) == name  # the token is the container's hostname

    @property
    def stderr(self) -> str:
        return read_text(self.err)

    def host_pid(self, pid_in_box: int) -> int:
        return wait_for(
            lambda: next((p for p in self.box.pids() if ns_pid(p) == pid_in_box), 0),
            f"pid {pid_in_box} to show up in the sandbox",
        )

    def signal(self, signum: int) -> None:
        os.kill(self.init, signum)


def ns_pid(host_pid: int) -> int:
    """The pid of a host process inside its own (innermost) PID namespace."""
    try:
        with open(f"/proc/{host_pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        pass
    return 0


def parent(pid: int) -> int:
    fields = stat_fields(pid)
    assert fields is not None, f"no process {pid}"
    return int(fields[1])


def zombies(box: Sandbox) -> list[int]:
    found = []
    for pid in box.pids():
        fields = stat_fields(pid)
        if fields is not None and fields[0] == b"Z":
            found.append(pid)
    return found


def recorder(path: str, *options: str) -> list[str]:
    return [sys.executable, PRINT_SIGNALS, path, *options]


def ready_pid(path: str) -> int:
    line = wait_for(
        lambda: next((x for x in read_text(path).splitlines() if x.startswith("ready")), ""),
        f"{path} to be ready",
    )
    return int(line.split()[1])


def signals(path: str) -> list[str]:
    return [x for x in read_text(path).splitlines() if x.startswith("SIG")]


def test_orphans_are_reaped(procs: Registry, tmp_path: Path) -> None:
    done = str(tmp_path / "spawned")
    finish = str(tmp_path / "finish")
    # Each subshell starts a sleep and exits at once: the sleep is orphaned to PID 1.
    script = (
        'for i in 1 2 3 4 5; do (exec sleep 600 &) ; done; : > "$0"; '
        "for i in $(seq 20); do (sleep 0.01 &) ; done; "
        'while [ ! -e "$1" ]; do sleep 0.05; done; exit 7'
    )
    container = Container(procs, tmp_path, ["sh", "-c", script, done, finish])
    wait_for(lambda: os.path.exists(done), "the orphans to be started")

    def orphans() -> list[int]:
        found = []
        for pid in container.box.pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read() == b"sleep\x00600\x00":
                        found.append(pid)
            except OSError:
                pass
        return found

    sleepers = wait_for(lambda: (o := orphans()) and len(o) == 5 and o, "five orphans")
    wait_for(lambda: all(parent(p) == container.init for p in sleepers), "orphans to be adopted")
    for pid in sleepers:
        os.kill(pid, signal.SIGKILL)  # each becomes a zombie until PID 1 waits for it
    wait_for(
        lambda: not any(os.path.exists(f"/proc/{p}") for p in sleepers), "the zombies to be reaped"
    )
    wait_for(lambda: not zombies(container.box), "no zombie left in the container")
    Path(finish).touch()
    assert container.box.wait(timeout=30) == 7
    assert not os.path.exists(container.lock)


def test_signals_are_forwarded_as_pid_1(procs: Registry, tmp_path: Path) -> None:
    out = str(tmp_path / "signals")
    container = Container(procs, tmp_path, recorder(out, "--exit-on", "SIGTERM"))
    ready_pid(out)
    order = ["SIGHUP", "SIGINT", "SIGQUIT", "SIGUSR1", "SIGUSR2", "SIGTERM"]
    for i, name in enumerate(order):
        container.signal(getattr(signal, name))
        wait_for(lambda i=i: signals(out) == order[: i + 1], f"{name} to arrive")
    assert container.box.wait(timeout=30) == 0
    assert not os.path.exists(container.lock)


def test_every_process_in_the_namespace_is_outlived(procs: Registry, tmp_path: Path) -> None:
    # The command starts a daemon in its own session (as pg_ctl starts the entrypoint's
    # temporary server) and exits 3. A second process enters the namespace from outside:
    # not a descendant of the command at all. pgfence must outlive both.
    daemon_out = str(tmp_path / "daemon")
    script = (
        'setsid "$@" & while ! grep -q "^ready" "$0" 2>/dev/null; do sleep 0.02; done; '
        'while [ ! -e "$0.go" ]; do sleep 0.02; done; exit 3'
    )
    command = ["sh", "-c", script, daemon_out, *recorder(daemon_out, "--exit-on", "SIGUSR1")]
    container = Container(procs, tmp_path, command, "--drain-grace", "600")
    daemon = container.host_pid(ready_pid(daemon_out))
    intruder = procs.start(
        ["nsenter", "-t", str(container.init), "-p", "-m", "sleep", "600"],
        stdout=subprocess.DEVNULL,
    )
    sleeper = wait_for(
        lambda: next((p for p in container.box.pids() if parent(p) == intruder.pid), 0),
        "the intruder inside the namespace",
    )
    Path(daemon_out + ".go").touch()
    wait_for(lambda: "still running" in container.stderr, "pgfence to see the leftovers")
    wait_for(lambda: not alive(sleeper), "SIGTERM to end the intruder")
    wait_for(lambda: signals(daemon_out) == ["SIGTERM"], "SIGTERM to reach the daemon")
    assert alive(daemon)  # it ignores SIGTERM; the grace is long
    assert container.box.returncode() is None
    assert first_line(container.lock) == "c1"  # the lock is kept while it runs
    os.kill(daemon, signal.SIGUSR1)
    assert container.box.wait(timeout=30) == 3
    assert not os.path.exists(container.lock)


def test_leftovers_are_killed_after_the_drain_grace(procs: Registry, tmp_path: Path) -> None:
    daemon_out = str(tmp_path / "daemon")
    script = 'setsid "$@" & while ! grep -q "^ready" "$0" 2>/dev/null; do sleep 0.02; done'
    command = ["sh", "-c", script, daemon_out, *recorder(daemon_out)]
    container = Container(procs, tmp_path, command, "--drain-grace", "0.5")
    daemon = container.host_pid(ready_pid(daemon_out))
    assert container.box.wait(timeout=30) == 0
    assert not alive(daemon)
    assert signals(daemon_out) == ["SIGTERM"]  # then SIGKILL, which it cannot record
    assert not os.path.exists(container.lock)


def test_killed_container_leaves_its_lock(procs: Registry, tmp_path: Path) -> None:
    container = Container(procs, tmp_path, ["sleep", "600"])
    container.box.kill()
    assert first_line(container.lock) == "c1"


@pytest.mark.parametrize("mode", ["strict", "lease"])
def test_signal_burst_with_metrics_as_pid_1(procs: Registry, tmp_path: Path, mode: str) -> None:
    """As PID 1 of a PID namespace, with the metrics and renewer threads running: a burst
    of thousands of SIGUSR1/SIGUSR2/SIGHUP neither kills pgfence nor reaches a thread that
    does not block them; SIGINT then ends in the command's status and a released lock."""
    from harness.pg import free_port
    from test_signals import handled_mask, signal_burst, threads_blocking

    out = str(tmp_path / "signals")
    extra = ("--mode", "lease", "--ttl", "2") if mode == "lease" else ()
    container = Container(
        procs,
        tmp_path,
        recorder(out, "--exit-on", "SIGINT", "--exit-code", "6"),
        *extra,
        "--metrics-address",
        f"127.0.0.1:{free_port()}",
    )
    ready_pid(out)
    masks = threads_blocking(container.init)
    assert len(masks) >= 2, masks
    sent = signal_burst(container.init, 6000, lambda: container.box.returncode() is None)
    assert container.box.returncode() is None, f"died after {sent} signals: {container.stderr}"
    for name, mask in masks.items():
        assert mask & handled_mask() == handled_mask(), f"thread {name} blocks {mask:x}"
    container.signal(signal.SIGINT)
    assert container.box.wait(timeout=30) == 6, container.stderr
    assert "Traceback" not in container.stderr
    assert "SIGINT" in signals(out)
    assert not os.path.exists(container.lock)
