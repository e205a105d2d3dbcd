"""Options and environment: a flag beats the environment, which beats the default; every
bad value is a UsageError (64) whose one-line message names where the value came from."""

from __future__ import annotations

import os

import pytest

from pgfence.config import DEFAULT_LOCK_FILE, Settings, parse_args, resolve
from pgfence.errors import UsageError

ENV = {"HOSTNAME": "host-env"}


def settings(command: str, args: list[str], env: dict[str, str] | None = None) -> Settings:
    values, _ = parse_args(command, args)
    return resolve(command, values, ENV if env is None else env)


def usage_error(command: str, args: list[str], env: dict[str, str], *needles: str) -> str:
    with pytest.raises(UsageError) as info:
        values, _ = parse_args(command, args)
        resolve(command, values, env)
    assert info.value.exit_code == 64
    assert "\n" not in info.value.message
    for needle in needles:
        assert needle in info.value.message
    return info.value.message


# -- parse_args --------------------------------------------------------------------------


def test_parsing_stops_at_double_dash() -> None:
    values, rest = parse_args("run", ["--token", "a", "--", "postgres", "--token", "b"])
    assert values == {"token": "a"}
    assert rest == ["postgres", "--token", "b"]


def test_parsing_stops_at_first_positional() -> None:
    values, rest = parse_args("run", ["--lock-file=/x/l", "postgres", "-D", "/data"])
    assert values == {"lock_file": "/x/l"}
    assert rest == ["postgres", "-D", "/data"]


def test_switches_and_negatives() -> None:
    values, _ = parse_args("run", ["--wait", "--no-wait", "--allow-other-filesystem"])
    assert values == {"wait": False, "allow_other_filesystem": True}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["--force"], "unknown option '--force'"),  # a release option, not a run option
        (["--token"], "needs a value"),
        (["--wait=yes"], "takes no value"),
    ],
)
def test_bad_arguments(args: list[str], needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_args("run", args)


def test_json_and_force_belong_to_their_commands() -> None:
    assert parse_args("status", ["--json"])[0] == {"json": True}
    assert parse_args("release", ["--force"])[0] == {"force": True}
    with pytest.raises(UsageError):
        parse_args("check", ["--json"])


# -- precedence --------------------------------------------------------------------------


def test_defaults() -> None:
    s = settings("run", [], {"HOSTNAME": "h"})
    assert s.lock_file == DEFAULT_LOCK_FILE == "/var/lib/postgresql/data/fence_lock"
    assert s.token == "h"
    assert s.log_format == "text"
    assert s.timings.mode == "strict"
    assert s.allow_other_filesystem is False
    assert s.backend == "file"


@pytest.mark.parametrize(
    ("major", "lock"),
    [
        ("", "/var/lib/postgresql/data/fence_lock"),
        ("13", "/var/lib/postgresql/data/fence_lock"),
        ("17", "/var/lib/postgresql/data/fence_lock"),
        ("18", "/var/lib/postgresql/fence_lock"),
        ("19", "/var/lib/postgresql/fence_lock"),
        ("x", "/var/lib/postgresql/data/fence_lock"),
    ],
)
def test_default_lock_follows_the_official_layout(major: str, lock: str) -> None:
    """The official images from 18 on mount their volume at /var/lib/postgresql: the old
    script's path would be off it (the shim image and the Swarm config style rely on this)."""
    env = {"HOSTNAME": "h", "PG_MAJOR": major} if major else {"HOSTNAME": "h"}
    assert settings("status", [], env).lock_file == lock
    assert settings("run", [], {**env, "FENCE_LOCK_FILE": "/x/l"}).lock_file == "/x/l"


@pytest.mark.parametrize(
    ("dest", "flag", "env_name", "flag_value", "env_value", "default"),
    [
        ("lock_file", "--lock-file", "FENCE_LOCK_FILE", "/f/l", "/e/l", DEFAULT_LOCK_FILE),
        ("log_format", "--log-format", "FENCE_LOG_FORMAT", "json", "text", "text"),
        ("drain_grace", "--drain-grace", "FENCE_DRAIN_GRACE", "3", "4", 10.0),
        ("user", "--user", "FENCE_USER", "postgres", "root", None),
        ("wait", "--no-wait", "FENCE_WAIT", False, "yes", False),
        (
            "allow_other_filesystem",
            "--allow-other-filesystem",
            "FENCE_ALLOW_OTHER_FILESYSTEM",
            True,
            "0",
            False,
        ),
    ],
)
def test_flag_beats_env_beats_default(
    dest: str,
    flag: str,
    env_name: str,
    flag_value: object,
    env_value: str,
    default: object,
) -> None:
    args = [flag] if isinstance(flag_value, bool) else [flag, str(flag_value)]

    def expected(raw: object) -> object:
        return float(raw) if isinstance(default, float) else raw

    env = {**ENV, env_name: env_value}
    assert getattr(settings("run", args, env), dest) == expected(flag_value)
    from_env = getattr(settings("run", [], env), dest)
    assert from_env == (
        env_value.lower() in ("yes", "1") if isinstance(default, bool) else expected(env_value)
    )
    assert getattr(settings("run", [], ENV), dest) == default


def test_heartbeat_interval_precedence() -> None:
    env = {**ENV, "FENCE_HEARTBEAT_INTERVAL": "0.5"}
    assert settings("run", ["--heartbeat-interval", "0.2"], env).timings.interval == 0.2
    assert settings("run", [], env).timings.interval == 0.5
    assert settings("run", [], ENV).timings.interval == 2.0


def test_relative_lock_file_is_made_absolute() -> None:
    s = settings("status", ["--lock-file", "rel/lock"])
    assert s.lock_file == os.path.join(os.getcwd(), "rel/lock")


# -- the token -----------------------------------------------------------------------------


def test_token_flag_beats_fence_variable_beats_hostname() -> None:
    env = {"FENCE_VARIABLE": "fv", "HOSTNAME": "hn"}
    assert settings("run", ["--token", "flag"], env).token == "flag"
    assert settings("run", [], env).token == "fv"
    assert settings("run", [], {"HOSTNAME": "hn"}).token == "hn"


def test_token_falls_back_to_kernel_hostname() -> None:
    assert settings("run", [], {}).token == os.uname().nodename


@pytest.mark.parametrize(
    ("token", "problem"),
    [
        ("", "is empty"),
        ("  ", "is blank"),
        ("a\nb", "spans several lines"),
        ("x" * 256, "longer than 255 bytes"),
        ("a\x01b", "control characters"),
        ("a\x1b[31m", "control characters"),
    ],
)
@pytest.mark.parametrize("source", ["--token", "FENCE_VARIABLE", "HOSTNAME"])
def test_bad_tokens_are_usage_errors(token: str, problem: str, source: str) -> None:
    if source == "--token":
        args, env = ["--token", token], dict(ENV)
    else:
        args, env = [], {source: token}
    usage_error("run", args, env, problem, source)


def test_empty_fence_variable_does_not_fall_back_to_hostname() -> None:
    usage_error("run", [], {"FENCE_VARIABLE": "", "HOSTNAME": "hn"}, "FENCE_VARIABLE", "empty")


@pytest.mark.parametrize("command", ["run", "status", "release", "check"])
def test_every_command_checks_the_token(command: str) -> None:
    usage_error(command, [], {"FENCE_VARIABLE": "a\nb"}, "FENCE_VARIABLE")


# -- other bad values ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "needles"),
    [
        (["--lock-file", ""], {}, ("must name a file",)),
        ([], {"FENCE_LOCK_FILE": "/data/"}, ("must name a file",)),
        (["--heartbeat-interval", "0"], {}, ("--heartbeat-interval='0'",)),
        (["--heartbeat-interval", "fast"], {}, ("--heartbeat-interval='fast'",)),
        ([], {"FENCE_HEARTBEAT_INTERVAL": "nan"}, ("FENCE_HEARTBEAT_INTERVAL='nan'",)),
        ([], {"FENCE_DRAIN_GRACE": "-1"}, ("FENCE_DRAIN_GRACE",)),
        (["--drain-grace", "inf"], {}, ("--drain-grace",)),
        ([], {"FENCE_LOG_FORMAT": "xml"}, ("FENCE_LOG_FORMAT='xml'", "text, json")),
        ([], {"FENCE_MODE": "eventual"}, ("FENCE_MODE",)),
        ([], {"FENCE_ALLOW_OTHER_FILESYSTEM": "maybe"}, ("FENCE_ALLOW_OTHER_FILESYSTEM",)),
        ([], {"FENCE_BACKEND": "zookeeper"}, ("FENCE_BACKEND",)),
    ],
)
def test_bad_values(args: list[str], env: dict[str, str], needles: tuple[str, ...]) -> None:
    usage_error("run", args, {**ENV, **env}, *needles)


@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_switch_truthy_values(value: str) -> None:
    s = settings("run", [], {**ENV, "FENCE_ALLOW_OTHER_FILESYSTEM": value})
    assert s.allow_other_filesystem is True


@pytest.mark.parametrize("value", ["0", "false", "No", "off"])
def test_switch_falsy_values(value: str) -> None:
    s = settings("run", [], {**ENV, "FENCE_ALLOW_OTHER_FILESYSTEM": value})
    assert s.allow_other_filesystem is False
