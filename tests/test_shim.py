"""pgfence invoked as `postgres` (a symlink first on PATH) fences the real postgres found
further down PATH or at FENCE_POSTGRES_BIN, and never itself.

The "real" postgres here is a shell script that records how it was called (its path, its
arguments, and the first line of the lock it runs under, if any) and exits with
$FAKE_PG_EXIT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.fence import (
    FAST,
    PGFENCE,
    assert_one_line_error,
    clean_env,
    path_state,
    read_text,
    write_file,
)

pytestmark = pytest.mark.timeout(60)

FAKE_POSTGRES = """#!/bin/sh
{
  echo "path:$0"
  for arg in "$@"; do echo "arg:$arg"; done
  if [ -n "$PGFENCE_LOCK" ]; then echo "lock:$(head -n 1 "$PGFENCE_LOCK")"; fi
} > "$FAKE_PG_OUT"
exit "${FAKE_PG_EXIT:-0}"
"""


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.shim_dir = self.bin_dir("shim")
        os.symlink(PGFENCE, os.path.join(self.shim_dir, "postgres"))
        self.real_dir = self.bin_dir("real")
        self.real = self.fake(self.real_dir)
        self.out = str(tmp_path / "called")
        self.lock = str(tmp_path / "fence_lock")
        self.data = str(tmp_path / "data")

    def bin_dir(self, name: str) -> str:
        path = self.tmp / name
        path.mkdir()
        return str(path)

    def fake(self, directory: str) -> str:
        path = os.path.join(directory, "postgres")
        write_file(path, FAKE_POSTGRES.encode())
        os.chmod(path, 0o755)
        return path

    def env(self, path: list[str] | None = None, **extra: str) -> dict[str, str]:
        dirs = [self.shim_dir, self.real_dir] if path is None else path
        settings = {
            "PATH": ":".join([*dirs, "/usr/bin", "/bin"]),
            "FENCE_LOCK_FILE": self.lock,
            "FENCE_VARIABLE": "db-1",
            "FENCE_HEARTBEAT_INTERVAL": "0.2",
            "FAKE_PG_OUT": self.out,
        }
        return clean_env(**{**settings, **extra})

    def postgres(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`postgres ARGS` as a shell would run it: found by name on PATH."""
        return subprocess.run(
            ["postgres", *args],
            env=self.env() if env is None else env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def called(self) -> list[str] | None:
        """What the real postgres recorded, or None if it did not run."""
        if not os.path.exists(self.out):
            return None
        lines = read_text(self.out).splitlines()
        os.unlink(self.out)
        return lines


@pytest.fixture
def shim(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


PASSTHROUGH = [
    ["--version"],
    ["-V"],
    ["--help"],
    ["-?"],
    ["-C", "shared_buffers"],
    ["-Cshared_buffers"],
    ["-D", "/somewhere", "-C", "port"],
    ["--describe-config"],
]


@pytest.mark.parametrize("args", PASSTHROUGH)
def test_printing_invocations_pass_straight_through(shim: Setup, args: list[str]) -> None:
    write_file(shim.lock, b"db-2\n")  # held by another container: irrelevant here
    before = path_state(shim.lock)
    done = shim.postgres(*args, env=shim.env(FAKE_PG_EXIT="3"))
    assert done.returncode == 3, done.stderr
    assert done.stderr == ""  # pgfence said nothing: it did not fence anything
    assert shim.called() == [f"path:{shim.real}", *(f"arg:{a}" for a in args)]  # no lock
    assert path_state(shim.lock) == before


@pytest.mark.parametrize("args", [["--version"], ["-C", "port"]])
def test_pass_through_needs_no_working_fence(shim: Setup, args: list[str]) -> None:
    # Neither a lock directory nor a valid token is needed to print something.
    env = shim.env(FENCE_LOCK_FILE=str(shim.tmp / "missing" / "lock"), FENCE_VARIABLE="")
    done = shim.postgres(*args, env=env)
    assert done.returncode == 0, done.stderr
    assert shim.called() == [f"path:{shim.real}", *(f"arg:{a}" for a in args)]


@pytest.mark.parametrize(
    "args",
    [
        ["--single", "-D", "DATA", "postgres"],
        ["--boot", "-D", "DATA"],
        ["-D", "DATA"],
        ["-D", "DATA", "-c", "listen_addresses=*"],
        [],
    ],
)
def test_server_starts_are_fenced(shim: Setup, args: list[str]) -> None:
    args = [shim.data if a == "DATA" else a for a in args]
    write_file(shim.lock, b"db-2\n")
    before = path_state(shim.lock)
    done = shim.postgres(*args)
    assert done.returncode == 73
    assert_one_line_error(done.stderr, "fenced out", "'db-2'")
    assert shim.called() is None
    assert path_state(shim.lock) == before

    os.unlink(shim.lock)  # free: the real postgres runs under the lock, status passed on
    done = shim.postgres(*args, env=shim.env(FAKE_PG_EXIT="5"))
    assert done.returncode == 5, done.stderr
    assert shim.called() == [
        f"path:{shim.real}",
        *(f"arg:{a}" for a in args),
        "lock:db-1",
    ]
    assert not os.path.exists(shim.lock)


def test_fence_postgres_bin(shim: Setup) -> None:
    elsewhere = shim.fake(shim.bin_dir("elsewhere"))  # not on PATH
    env = shim.env(path=[shim.shim_dir], FENCE_POSTGRES_BIN=elsewhere)
    done = shim.postgres("-D", shim.data, env=env)
    assert done.returncode == 0, done.stderr
    assert shim.called() == [f"path:{elsewhere}", "arg:-D", f"arg:{shim.data}", "lock:db-1"]
    done = shim.postgres("--version", env=env)
    assert done.returncode == 0, done.stderr
    assert shim.called() == [f"path:{elsewhere}", "arg:--version"]
    # It beats PATH too.
    done = shim.postgres("-V", env=shim.env(FENCE_POSTGRES_BIN=elsewhere))
    assert shim.called() == [f"path:{elsewhere}", "arg:-V"]


@pytest.mark.parametrize(
    "kind", ["missing", "not-executable", "directory", "the-shim", "pgfence", "copy"]
)
@pytest.mark.parametrize("args", [["--version"], ["-D", "DATA"]])
def test_bad_fence_postgres_bin(shim: Setup, kind: str, args: list[str]) -> None:
    # The last three would make the shim exec itself forever: refused like the others.
    shutil.copy2(PGFENCE, shim.tmp / "copy")
    target = {
        "missing": str(shim.tmp / "nope"),
        "not-executable": str(shim.tmp / "plain"),
        "directory": shim.real_dir,
        "the-shim": os.path.join(shim.shim_dir, "postgres"),
        "pgfence": PGFENCE,
        "copy": str(shim.tmp / "copy"),
    }[kind]
    write_file(str(shim.tmp / "plain"), FAKE_POSTGRES.encode())
    args = [shim.data if a == "DATA" else a for a in args]
    done = shim.postgres(*args, env=shim.env(FENCE_POSTGRES_BIN=target))
    assert done.returncode == 127
    assert_one_line_error(done.stderr, "FENCE_POSTGRES_BIN")
    assert shim.called() is None
    assert not os.path.exists(shim.lock)


@pytest.mark.parametrize("args", [["--version"], ["-D", "DATA"]])
def test_never_finds_itself(shim: Setup, args: list[str]) -> None:
    args = [shim.data if a == "DATA" else a for a in args]
    # The shim twice on PATH (the same file again, and another symlink to it), no real one.
    second = shim.bin_dir("second")
    os.symlink(os.path.join(shim.shim_dir, "postgres"), os.path.join(second, "postgres"))
    env = shim.env(path=[shim.shim_dir, shim.shim_dir, second])
    done = shim.postgres(*args, env=env)
    assert done.returncode == 127
    assert_one_line_error(done.stderr, "cannot find the real postgres", "FENCE_POSTGRES_BIN")
    assert not os.path.exists(shim.lock)


@pytest.mark.parametrize("copy", ["symlink", "copy"])
def test_skips_a_second_shim_on_path(shim: Setup, copy: str) -> None:
    second = shim.bin_dir("second")
    target = os.path.join(second, "postgres")
    if copy == "symlink":
        os.symlink(PGFENCE, target)
    else:
        shutil.copy2(PGFENCE, target)  # a copy of the console script, not the same file
    for first in (shim.shim_dir, second):  # whichever copy runs, it skips the other
        env = shim.env(path=[first, shim.shim_dir, second, shim.real_dir])
        done = shim.postgres("-D", shim.data, env=env)
        assert done.returncode == 0, done.stderr
        assert shim.called() == [f"path:{shim.real}", "arg:-D", f"arg:{shim.data}", "lock:db-1"]


@pytest.mark.parametrize("configured", ["flags", "environment"])
def test_nested_under_pgfence_run_runs_the_real_postgres_directly(
    shim: Setup, configured: str
) -> None:
    # An outer `pgfence run` wraps an entrypoint that ends in `exec postgres ...`, which
    # is the shim: it must recognise its supervisor's fence and not take it again.
    env = shim.env()
    outer = [PGFENCE, "run"]
    if configured == "flags":
        outer += ["--lock-file", env.pop("FENCE_LOCK_FILE"), "--token", env.pop("FENCE_VARIABLE")]
    entrypoint = ["sh", "-c", 'exec postgres -D "$0"', shim.data]
    done = subprocess.run(
        [*outer, *FAST, "--", *entrypoint],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert shim.called() == [f"path:{shim.real}", "arg:-D", f"arg:{shim.data}", "lock:db-1"]
    assert "fenced out" not in done.stderr
    assert not os.path.exists(shim.lock)


def test_stale_supervisor_variables_do_not_bypass_the_fence(shim: Setup) -> None:
    # PGFENCE_INSTANCE names an instance that does not hold the lock: fenced as usual.
    write_file(shim.lock, b"db-2\n")
    env = shim.env(PGFENCE_INSTANCE="00112233aabbccdd", PGFENCE_LOCK=shim.lock)
    done = shim.postgres("-D", shim.data, env=env)
    assert done.returncode == 73
    assert shim.called() is None
    assert read_text(shim.lock) == "db-2\n"
