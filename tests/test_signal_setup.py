"""Signal set-up (signals.py): every thread pgfence starts blocks the handled signals, and
a program exec'd in place of pgfence does not inherit them blocked."""

from __future__ import annotations

import re
import signal
import subprocess
import threading
from pathlib import Path

import pytest

from harness.fence import PGFENCE, clean_env
from pgfence import signals

SRC = Path(signals.__file__).parent


def test_start_thread_refuses_while_handled_signals_are_unblocked() -> None:
    errors: list[BaseException] = []

    def attempt() -> None:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, signals.HANDLED)
        try:
            signals.start_thread(threading.Thread(target=lambda: None, name="late"))
        except RuntimeError as exc:
            errors.append(exc)

    helper = threading.Thread(target=attempt)
    helper.start()
    helper.join()
    assert errors and "late" in str(errors[0])


def test_no_thread_is_started_but_through_start_thread() -> None:
    """A later change cannot start a thread that misses the mask: every `.start()` in the
    package goes through signals.start_thread (verify-fs, which supervises nothing and
    handles no signal, is the one exception)."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "signals.py" or path.parent.name == "verifyfs":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"\.start\(\)", line):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert offenders == []


def sig_blocked(status: str) -> int:
    line = next(x for x in status.splitlines() if x.startswith("SigBlk:"))
    return int(line.split()[1], 16)


@pytest.mark.parametrize("style", ["shim-passthrough", "supervised"])
def test_program_exec_in_place_gets_the_original_mask(tmp_path: Path, style: str) -> None:
    probe = tmp_path / "probe"
    probe.write_text("#!/bin/sh\nexec cat /proc/self/status\n")  # (sh blocks all while forking)
    probe.chmod(0o755)
    if style == "shim-passthrough":
        shim = tmp_path / "postgres"
        shim.symlink_to(PGFENCE)
        argv = [str(shim), "--version"]
        env = clean_env(FENCE_POSTGRES_BIN=str(probe))
    else:
        # The supervised command: its mask comes from the supervisor's child set-up.
        argv = [PGFENCE, "run", "--lock-file", str(tmp_path / "lock"), "--", str(probe)]
        env = clean_env()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert sig_blocked(done.stdout) & sum(1 << (s - 1) for s in signals.HANDLED) == 0
