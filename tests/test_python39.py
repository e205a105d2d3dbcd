"""pgfence supports Python 3.9 (Debian bullseye, older images): import every module and
run a fenced command with a 3.9 interpreter when one is on this machine."""

from __future__ import annotations

import glob
import os
import pkgutil
import subprocess

import pytest

import pgfence

SRC = os.path.dirname(os.path.dirname(pgfence.__file__))
CANDIDATES = [
    *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9")),
    "/usr/bin/python3.9",
    "/usr/local/bin/python3.9",
]
PYTHON39 = next((p for p in CANDIDATES if os.access(p, os.X_OK)), None)

pytestmark = pytest.mark.skipif(PYTHON39 is None, reason="no Python 3.9 interpreter here")


def _python39(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    assert PYTHON39
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [PYTHON39, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        **kw,  # type: ignore[arg-type]
    )


def test_every_module_imports_on_python39() -> None:
    names = [m.name for m in pkgutil.walk_packages(pgfence.__path__, "pgfence.")]
    names = [n for n in names if n != "pgfence.__main__"]
    result = _python39(
        "-c", "import importlib, sys\nfor n in sys.argv[1:]: importlib.import_module(n)", *names
    )
    assert result.returncode == 0, result.stderr


def test_a_fenced_run_works_on_python39(tmp_path: object) -> None:
    lock = os.path.join(str(tmp_path), "fence_lock")
    result = _python39(
        "-m", "pgfence", "run", "--lock-file", lock, "--token", "py39", "--", "sh", "-c", "exit 7"
    )
    assert result.returncode == 7, result.stderr
    assert not os.path.exists(lock)
