"""The command line explains itself: every command named where one is expected, help that
fits 80 columns and states each command's exit codes, and every FENCE_* value checked
whatever the mode (a bad setting the current mode ignores is still an error)."""

from __future__ import annotations

import subprocess

import pytest

from harness.fence import PGFENCE, assert_one_line_error, clean_env
from pgfence.cli import COMMANDS
from pgfence.config import resolve
from pgfence.errors import UsageError

pytestmark = pytest.mark.timeout(60)


def pgfence(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGFENCE, *args], env=clean_env(**env), capture_output=True, text=True, timeout=30
    )


def test_unknown_command_lists_every_command() -> None:
    assert set(COMMANDS) == {"run", "status", "release", "check", "verify-fs", "export-shim"}
    result = pgfence("statu")
    assert result.returncode == 64
    line = assert_one_line_error(result.stderr, "unknown command 'statu'")
    for command in COMMANDS:
        assert command in line


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_fits_80_columns_and_states_exit_codes(command: str) -> None:
    result = pgfence(*([command] if command else []), "--help")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("usage: pgfence")
    too_wide = [line for line in lines if len(line) > 80]
    assert not too_wide, too_wide
    assert "Exit codes:" in result.stdout
    if not command:  # the overview names every command
        for name in COMMANDS:
            assert f"pgfence {name}" in result.stdout


@pytest.mark.parametrize("command", ["run", "status", "release", "check"])
@pytest.mark.parametrize(
    ("mode", "variable", "value"),
    [
        ("strict", "FENCE_LEASE_TTL", "soon"),
        ("strict", "FENCE_LEASE_TTL", "1"),  # below the minimum
        ("strict", "FENCE_LOCK_DELAY", "-1"),
        ("lease", "FENCE_HEARTBEAT_INTERVAL", "0"),
        ("lease", "FENCE_HEARTBEAT_INTERVAL", "fast"),
    ],
)
def test_fence_values_are_checked_whatever_the_mode(
    command: str, mode: str, variable: str, value: str
) -> None:
    env = {"FENCE_MODE": mode, variable: value}
    with pytest.raises(UsageError, match=variable):
        resolve(command, {}, env)


def test_a_bad_ttl_in_strict_mode_is_refused_before_anything_starts(tmp_path: object) -> None:
    result = pgfence(
        "run", "--lock-file", f"{tmp_path}/fence_lock", "--", "true", FENCE_LEASE_TTL="30s"
    )
    assert result.returncode == 64
    assert_one_line_error(result.stderr, "FENCE_LEASE_TTL='30s'")
