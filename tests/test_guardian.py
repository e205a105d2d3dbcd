"""The guardian (guardian.py): the command's processes die with a SIGKILLed pgfence that
is not PID 1, also when the command changed user itself (gosu clears the parent-death
signal), and also when the kill hits pgfence's whole process group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import needs_root
from harness.fence import PGFENCE, PRINT_SIGNALS, clean_env, read_text
from harness.procs import Registry, alive
from harness.waiting import wait_for

pytestmark = [needs_root, pytest.mark.timeout(60)]


def start(
    procs: Registry, tmp_path: Path, command: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    out = tmp_path / "signals"
    os.chmod(tmp_path, 0o777)
    argv = [PGFENCE, "run", "--lock-file", str(tmp_path / "lock"), "--", *command]
    argv += [sys.executable, PRINT_SIGNALS, str(out)]
    with open(tmp_path / "err", "wb") as err:
        proc = procs.start(argv, env=clean_env(), stderr=err)
    line = wait_for(
        lambda: next((x for x in read_text(str(out)).splitlines() if x.startswith("ready")), ""),
        "the command",
    )
    pid = int(line.split()[1])
    procs.track(pid)
    return proc, pid


@pytest.mark.parametrize("kill", ["pgfence", "process-group"])
def test_gosu_command_dies_with_pgfence(procs: Registry, shared_dir: str, kill: str) -> None:
    tmp_path = Path(shared_dir)  # the postgres user writes there
    proc, child = start(procs, tmp_path, ["gosu", "postgres"])
    if kill == "pgfence":
        proc.kill()
    else:
        os.killpg(proc.pid, signal.SIGKILL)  # the guardian has a session of its own
    proc.wait(timeout=30)
    wait_for(lambda: not alive(child), "the command to die with pgfence")
    wait_for(lambda: "guardian killed 1 process" in read_text(str(tmp_path / "err")), "the event")


def test_guardian_leaves_with_a_clean_exit(procs: Registry, tmp_path: Path) -> None:
    done = subprocess.run(
        [PGFENCE, "run", "--lock-file", str(tmp_path / "lock"), "--", "true"],
        env=clean_env(),
        capture_output=True,  # a guardian left behind would hold these pipes open
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert "guardian killed" not in done.stderr


def test_leftover_daemon_in_its_own_session_dies_with_pgfence(
    procs: Registry, tmp_path: Path
) -> None:
    """The command exits and leaves a daemon in a session of its own (as pg_ctl starts a
    server); pgfence drains it and is SIGKILLed meanwhile: the daemon must not survive.
    It has no parent-death signal at all (only pgfence's direct child gets one)."""
    out = str(tmp_path / "daemon")
    script = 'setsid "$@" & while ! grep -q "^ready" "$0" 2>/dev/null; do sleep 0.02; done'
    argv = [PGFENCE, "run", "--lock-file", str(tmp_path / "lock"), "--drain-grace", "600"]
    argv += ["--", "sh", "-c", script, out, sys.executable, PRINT_SIGNALS, out]
    err = str(tmp_path / "err")
    with open(err, "wb") as f:
        proc = procs.start(argv, env=clean_env(), stderr=f)
    daemon = int(wait_for(lambda: read_text(out).partition("\n")[0], "the daemon").split()[1])
    procs.track(daemon)
    assert os.getsid(daemon) == daemon
    wait_for(lambda: "still running" in read_text(err), "the drain")
    proc.kill()
    proc.wait(timeout=30)
    wait_for(lambda: not alive(daemon), "the daemon to die with pgfence")
