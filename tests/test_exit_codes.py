"""The exit-code table, row by row (as dumb-init tests its exit statuses).

    0 or the command's status; 64 usage or configuration; 65 unreadable lock content;
    73 fenced out; 74 I/O error on the lock storage; 126/127 a command that cannot run.

Every bad input gets one line on stderr (no traceback), starts nothing (the command would
create a marker file), and leaves the lock path exactly as it was. Where a lock file is
present it is a one-line lock of our own token, which pgfence would otherwise take.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import PGFENCE, pgfence_run
from harness.fence import (
    FAST,
    assert_one_line_error,
    clean_env,
    fill,
    marker_command,
    path_state,
    remount,
    run_args,
    tmpfs,
    write_file,
)

pytestmark = pytest.mark.timeout(60)
OURS = b"db-1\n"  # a seed lock of our own token: without the fault, pgfence would start


@pytest.fixture
def marker(tmp_path: Path) -> str:
    return str(tmp_path / "started")


def run(lock: str, marker: str, *extra: str, env: dict[str, str] | None = None) -> object:
    argv = run_args(lock, "db-1", *marker_command(marker), extra=(*FAST, *extra))
    return pgfence_run(*argv, env=clean_env() if env is None else env)


def refused(
    lock: str,
    marker: str,
    code: int,
    *needles: str,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    argv: list[str] | None = None,
) -> str:
    """Run, and check the refusal: `code`, one line, nothing started, lock untouched."""
    directory = os.path.dirname(lock)
    before = path_state(lock)
    listing = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
    if argv is None:
        argv = run_args(lock, "db-1", *marker_command(marker), extra=(*FAST, *extra))
    done = pgfence_run(*argv, env=clean_env() if env is None else env)
    assert done.returncode == code, done.stderr
    line = assert_one_line_error(done.stderr, *needles)
    assert not os.path.exists(marker), "the command was started"
    assert path_state(lock) == before, "the lock path was changed"
    if listing is not None:
        assert sorted(os.listdir(directory)) == listing, "files were left next to the lock"
    return line


# -- 0 and the command's own status ------------------------------------------------------


@pytest.mark.parametrize("status", [0, 1, 2, 3, 64, 73, 126, 127, 255])
def test_command_status_is_passed_on(tmp_path: Path, status: int) -> None:
    lock = str(tmp_path / "fence_lock")
    done = pgfence_run(
        "run", "--lock-file", lock, "--token", "db-1", "--", "sh", "-c", f"exit {status}"
    )
    assert done.returncode == status
    assert "Traceback" not in done.stderr
    assert not os.path.exists(lock)


# -- 64: usage and configuration -----------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "env", "needle"),
    [
        (("--bogus",), {}, "unknown option '--bogus'"),
        (("--force",), {}, "unknown option '--force'"),
        (("--token", ""), {}, "is empty"),
        (("--token", "   "), {}, "is blank"),
        (("--token", "db\n1"), {}, "spans several lines"),
        (("--token", "x" * 256), {}, "longer than 255 bytes"),
        (("--token", "db\x071"), {}, "control characters"),
        (("--heartbeat-interval", "0"), {}, "--heartbeat-interval"),
        (("--drain-grace", "soon"), {}, "--drain-grace"),
        (("--log-format", "xml"), {}, "--log-format"),
        ((), {"FENCE_DRAIN_GRACE": "-1"}, "FENCE_DRAIN_GRACE"),
        ((), {"FENCE_ALLOW_OTHER_FILESYSTEM": "perhaps"}, "FENCE_ALLOW_OTHER_FILESYSTEM"),
        ((), {"FENCE_MODE": "eventual"}, "FENCE_MODE"),
        (("--user", "no-such-user-pgfence"), {}, "unknown user"),
        (("--user", "postgres:no-such-group"), {}, "unknown user or group"),
        (("--metrics-address", ":99999"), {}, "--metrics-address"),
        (("--metrics-address", ":\u00b2"), {}, "--metrics-address"),
    ],
)
def test_usage_errors(
    tmp_path: Path, marker: str, extra: tuple[str, ...], env: dict[str, str], needle: str
) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock, OURS)
    # The token flag comes after ours, so it wins (flag order: last one counts).
    refused(lock, marker, 64, needle, extra=extra, env=clean_env(**env))


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"FENCE_VARIABLE": ""}, "FENCE_VARIABLE"),
        ({"FENCE_VARIABLE": "a\nb"}, "FENCE_VARIABLE"),
        ({"FENCE_VARIABLE": "x" * 300}, "FENCE_VARIABLE"),
        ({"HOSTNAME": ""}, "HOSTNAME"),
        ({"FENCE_LOCK_FILE": ""}, "must name a file"),
    ],
)
def test_configuration_errors_from_the_environment(
    tmp_path: Path, marker: str, env: dict[str, str], needle: str
) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock, OURS)
    argv = ["run", "--", *marker_command(marker)]
    env = clean_env(**{"FENCE_LOCK_FILE": lock, **env})
    refused(lock, marker, 64, needle, env=env, argv=argv)


@pytest.mark.parametrize(
    "argv",
    [
        ["frobnicate"],
        ["run"],
        ["run", "--"],
        ["status", "extra"],
        ["release", "--json"],
        ["run", "--token"],
    ],
)
def test_bad_command_lines(tmp_path: Path, marker: str, argv: list[str]) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock, OURS)
    env = clean_env(FENCE_LOCK_FILE=lock, FENCE_VARIABLE="db-1")
    refused(lock, marker, 64, env=env, argv=argv)


def test_no_arguments_prints_usage_and_exits_64() -> None:
    done = pgfence_run(env=clean_env())
    assert done.returncode == 64
    assert done.stdout.startswith("usage: pgfence run")


# -- 65: lock content that cannot be understood --------------------------------------------


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\n",
        b"   \n",
        b"db-1\r\n",
        b"\xff\xfe\n",
        b"db-1\ngarbage\n",
        b"db-1\npgfence-lock 2\ninstance=00112233aabbccdd\n",
        b"db-1\npgfence-lock 1\ninstance=00112233aabbccdd\n",  # fields missing
        b"x" * 5000,
    ],
)
def test_unreadable_lock_content(tmp_path: Path, marker: str, content: bytes) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock, content)
    refused(lock, marker, 65, lock, "pgfence release --force")


def test_unreadable_generation_sidecar(tmp_path: Path, marker: str) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock + ".generation", b"not a number\n")
    refused(lock, marker, 65, "generation")


# -- 73: fenced out ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"db-2", b"db-2\n"])
def test_held_by_another_token(tmp_path: Path, marker: str, content: bytes) -> None:
    lock = str(tmp_path / "fence_lock")
    write_file(lock, content)
    refused(lock, marker, 73, "fenced out", "'db-2'")


# -- 74: the lock storage ----------------------------------------------------------------


def test_missing_directory(tmp_path: Path, marker: str) -> None:
    lock = str(tmp_path / "missing" / "fence_lock")
    refused(lock, marker, 74, "does not exist")
    assert not os.path.exists(os.path.dirname(lock))


def test_parent_is_a_file(tmp_path: Path, marker: str) -> None:
    write_file(str(tmp_path / "file"), b"")
    refused(str(tmp_path / "file" / "fence_lock"), marker, 74)


def test_directory_at_lock_path(tmp_path: Path, marker: str) -> None:
    lock = str(tmp_path / "fence_lock")
    os.mkdir(lock)
    write_file(os.path.join(lock, "inside"), b"keep me")
    refused(lock, marker, 74, "is a directory")


@pytest.mark.parametrize("target", ["file", "dangling", "directory"])
def test_symlink_at_lock_path(tmp_path: Path, marker: str, target: str) -> None:
    lock = str(tmp_path / "fence_lock")
    pointed = tmp_path / "real_lock"
    if target == "file":
        pointed.write_bytes(OURS)
    elif target == "directory":
        pointed.mkdir()
    os.symlink(pointed, lock)
    refused(lock, marker, 74, "symlink")


def test_fifo_at_lock_path(tmp_path: Path, marker: str) -> None:
    lock = str(tmp_path / "fence_lock")
    os.mkfifo(lock)
    refused(lock, marker, 74, "not a regular file")


@pytest.mark.parametrize("existing", [False, True])
def test_permission_denied(shared_dir: str, existing: bool) -> None:
    # The postgres user (as the official image runs pgfence) in a root-owned 0755 directory.
    directory = os.path.join(shared_dir, "root-owned")
    os.mkdir(directory, 0o755)
    lock = os.path.join(directory, "fence_lock")
    if existing:
        write_file(lock, OURS)
    marker = os.path.join(shared_dir, "started")
    before = path_state(lock)
    argv = [PGFENCE, "run", "--lock-file", lock, "--token", "db-1", *FAST]
    done = subprocess.run(
        ["gosu", "postgres", *argv, "--", *marker_command(marker)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 74, done.stderr
    assert_one_line_error(done.stderr, "Permission denied")
    assert not os.path.exists(marker)
    assert path_state(lock) == before
    assert sorted(os.listdir(directory)) == (["fence_lock"] if existing else [])


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[str]:
    with tmpfs(str(tmp_path / "vol"), "64k") as vol:
        yield vol


@pytest.mark.parametrize("existing", [False, True])
def test_read_only_filesystem(small_fs: str, marker: str, existing: bool) -> None:
    lock = os.path.join(small_fs, "fence_lock")
    if existing:
        write_file(lock, OURS)
    remount(small_fs, "ro")
    refused(lock, marker, 74, "read-only")


@pytest.mark.parametrize("existing", [False, True])
def test_full_filesystem(small_fs: str, marker: str, existing: bool) -> None:
    lock = os.path.join(small_fs, "fence_lock")
    if existing:
        write_file(lock, OURS)
    fill(small_fs)
    refused(lock, marker, 74, "full")


@pytest.mark.parametrize("command", ["status", "release"])
def test_operator_commands_report_storage_errors(tmp_path: Path, command: str) -> None:
    lock = str(tmp_path / "missing" / "fence_lock")
    done = pgfence_run(command, "--lock-file", lock, "--token", "db-1", env=clean_env())
    assert done.returncode == 74
    assert_one_line_error(done.stderr, "does not exist")


# -- 126 and 127: a command that cannot run ------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "code", "needle"),
    [
        ("missing", 127, "command not found"),
        ("missing-path", 127, "command not found"),
        ("not-executable", 126, "Permission denied"),
        ("directory", 126, "Permission denied"),
        ("no-interpreter", 126, "Exec format error"),
    ],
)
def test_command_that_cannot_run(tmp_path: Path, kind: str, code: int, needle: str) -> None:
    lock = str(tmp_path / "fence_lock")
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x7fELF not really\n")
    garbage.chmod(0o755)
    command = {
        "no-interpreter": str(garbage),
        "missing": "no-such-command-pgfence",
        "missing-path": str(tmp_path / "nope" / "cmd"),
        "not-executable": str(script),
        "directory": str(tmp_path),
    }[kind]
    done = pgfence_run("run", "--lock-file", lock, "--token", "db-1", "--", command)
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.rstrip("\n").split("\n")[-1]
    assert last.startswith("pgfence: ")
    assert needle in last
    assert not os.path.exists(lock)  # the lock taken for it was released again
