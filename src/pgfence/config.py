"""Command-line options and environment variables, resolved into one Settings value.

Every option has a flag and (mostly) an environment variable; a flag beats the
environment, which beats the default. Values are checked here, once, with messages that
name where the bad value came from. The variables that name the fence (token, backend,
lock file, etcd) are defined in environment.py, which also gives them to the command.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence

from pgfence.environment import (
    ETCD_SETTINGS,
    MILLISECONDS,
    SWITCH,
    FenceVariable,
    fence_variable,
)
from pgfence.errors import UsageError
from pgfence.frozen import Struct
from pgfence.record import token_problem
from pgfence.timings import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_TTL,
    MIN_TTL,
    Timings,
    vanished_lock_delay,
)

TYPE_CHECKING = False  # typing is not imported at run time: start-up cost (see frozen.py)
if TYPE_CHECKING:
    from typing import Any

DEFAULT_LOCK_FILE = "/var/lib/postgresql/data/fence_lock"
# The official images from 18 on mount their volume at /var/lib/postgresql, PGDATA below
# it: there the old script's path is off the volume. They say which they are in PG_MAJOR.
DEFAULT_LOCK_FILE_18 = "/var/lib/postgresql/fence_lock"


def default_lock_file(env: Mapping[str, str]) -> str:
    """The lock's default path: the old script's, or in an official image from 18 on (by
    its PG_MAJOR) the root of its volume."""
    major = env.get("PG_MAJOR", "")
    return DEFAULT_LOCK_FILE_18 if major.isdigit() and int(major) >= 18 else DEFAULT_LOCK_FILE


DEFAULT_DRAIN_GRACE = 10.0


class Option(Struct):
    flag: str
    dest: str
    env: str | None
    metavar: str | None  # None: a switch without a value
    help: str
    negative: str | None = None  # "--no-wait" for "--wait"


COMMON = (
    Option(
        "--lock-file",
        "lock_file",
        fence_variable("lock_file"),
        "PATH",
        f"lock file on the data volume (default {DEFAULT_LOCK_FILE})",
    ),
    Option(
        "--token",
        "token",
        fence_variable("token"),
        "TOKEN",
        "this holder's token (default $HOSTNAME, else the kernel hostname)",
    ),
    Option(
        "--log-format",
        "log_format",
        "FENCE_LOG_FORMAT",
        "text|json",
        "event format on stderr (default text)",
    ),
)
BACKEND = (
    Option(
        "--backend",
        "backend",
        fence_variable("backend"),
        "file|etcd",
        "where the fence lives: a lock file (default) or an etcd key",
    ),
    Option(
        "--etcd-endpoints",
        "etcd_endpoints",
        fence_variable("etcd_endpoints"),
        "URL[,URL...]",
        "etcd client URLs, e.g. https://10.0.0.1:2379,https://10.0.0.2:2379",
    ),
    Option(
        "--etcd-key",
        "etcd_key",
        fence_variable("etcd_key"),
        "KEY",
        "the etcd key holding this data directory's fence (one key per data directory)",
    ),
    Option("--etcd-user", "etcd_user", fence_variable("etcd_user"), "NAME", "etcd user name"),
    Option(
        "--etcd-password-file",
        "etcd_password_file",
        fence_variable("etcd_password_file"),
        "PATH",
        "file holding the etcd password (never given on the command line)",
    ),
    Option(
        "--etcd-ca-file",
        "etcd_ca_file",
        fence_variable("etcd_ca_file"),
        "PATH",
        "CA bundle to verify https endpoints",
    ),
    Option(
        "--etcd-cert-file",
        "etcd_cert_file",
        fence_variable("etcd_cert_file"),
        "PATH",
        "client certificate for https endpoints",
    ),
    Option(
        "--etcd-key-file",
        "etcd_key_file",
        fence_variable("etcd_key_file"),
        "PATH",
        "private key of the client certificate",
    ),
    Option(
        "--etcd-allow-insecure",
        "etcd_allow_insecure",
        fence_variable("etcd_allow_insecure"),
        None,
        "allow plain http to an etcd endpoint that is not on loopback",
    ),
    Option(
        "--etcd-election-timeout",
        "etcd_election_timeout",
        fence_variable("etcd_election_timeout"),
        "MS",
        "the etcd cluster's --election-timeout (default 1000, etcd's); sets the shortest TTL",
    ),
)
LEASE = (
    Option(
        "--mode",
        "mode",
        "FENCE_MODE",
        "strict|lease",
        "strict: never take over a lock (default); lease: take over a silent lease "
        "(the default and only mode with --backend etcd)",
    ),
    Option(
        "--ttl",
        "ttl",
        "FENCE_LEASE_TTL",
        "SECONDS",
        f"lease mode: lease time to live (default {DEFAULT_TTL:g}, at least {MIN_TTL:g})",
    ),
    Option(
        "--lock-delay",
        "lock_delay",
        "FENCE_LOCK_DELAY",
        "SECONDS",
        "lease mode: extra silence required before a takeover (default TTL/4; "
        "2/3 TTL with --backend etcd)",
    ),
    Option(
        "--heartbeat-interval",
        "heartbeat_interval",
        "FENCE_HEARTBEAT_INTERVAL",
        "SECONDS",
        f"strict mode: seconds between heartbeats (default {DEFAULT_HEARTBEAT_INTERVAL:g})",
    ),
)
RUN = (
    Option(
        "--wait",
        "wait",
        "FENCE_WAIT",
        None,
        "lease mode: wait for the lock instead of exiting 73 (default in lease mode)",
        negative="--no-wait",
    ),
    Option(
        "--allow-other-filesystem",
        "allow_other_filesystem",
        "FENCE_ALLOW_OTHER_FILESYSTEM",
        None,
        "start even if the lock file is not on the data directory's filesystem",
    ),
    Option(
        "--user",
        "user",
        "FENCE_USER",
        "USER[:GROUP]",
        "run the command as this user (the parent-death signal survives the switch)",
    ),
    Option(
        "--metrics-address",
        "metrics_address",
        "FENCE_METRICS_ADDRESS",
        "HOST:PORT",
        "serve Prometheus metrics there (off by default; a bare :PORT means loopback)",
    ),
    Option(
        "--watchdog",
        "watchdog",
        "FENCE_WATCHDOG",
        "off|auto|required",
        "lease mode: reset the machine through the watchdog if pgfence cannot fence in "
        "time (default off; auto: if the device is usable; required: refuse without it)",
    ),
    Option(
        "--watchdog-device",
        "watchdog_device",
        "FENCE_WATCHDOG_DEVICE",
        "PATH",
        "the Linux watchdog device (default /dev/watchdog)",
    ),
    Option(
        "--drain-grace",
        "drain_grace",
        "FENCE_DRAIN_GRACE",
        "SECONDS",
        "after the command exits, how long leftover processes get after SIGTERM "
        f"before SIGKILL (default {DEFAULT_DRAIN_GRACE:g})",
    ),
)
STATUS = (
    Option("--json", "json", None, None, "print the state as one JSON object"),
    Option(
        "--observe",
        "observe",
        None,
        "SECONDS",
        "how long to watch a holder on another machine for a heartbeat",
    ),
)
RELEASE = (
    Option(
        "--force",
        "force",
        None,
        None,
        "remove the lock whatever it holds (after making sure no server runs)",
    ),
)

COMMAND_OPTIONS: dict[str, tuple[Option, ...]] = {
    "run": COMMON + BACKEND + LEASE + RUN,
    "status": COMMON + BACKEND + LEASE + STATUS,
    "release": COMMON + BACKEND + LEASE + RELEASE,
    "check": COMMON + BACKEND + LEASE,
}


class EtcdSettings(Struct):
    """Raw etcd options; the etcd backend checks them (only when it is chosen)."""

    endpoints: str | None
    key: str | None
    user: str | None
    password_file: str | None
    ca_file: str | None
    cert_file: str | None
    key_file: str | None
    allow_insecure: bool
    election_timeout: float  # seconds: the cluster's --election-timeout


class Settings(Struct):
    token: str
    backend: str  # "file" or "etcd"
    lock_file: str
    etcd: EtcdSettings
    log_format: str
    timings: Timings
    wait: bool
    allow_other_filesystem: bool
    drain_grace: float
    user: str | None
    metrics_address: str | None
    watchdog: str  # off, auto or required
    watchdog_device: str
    json: bool
    observe: float | None
    force: bool


def parse_args(command: str, args: Sequence[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Split `args` into option values and the remaining positional arguments.

    Parsing stops at `--` or at the first positional argument, so that a supervised
    command's own options are never mistaken for ours.
    """
    return parse_options(COMMAND_OPTIONS[command], args, command)


def parse_options(
    options: Sequence[Option], args: Sequence[str], command: str, interleaved: bool = False
) -> tuple[dict[str, str | bool], list[str]]:
    """Parse `options` out of `args`; with `interleaved`, positional arguments may stand
    anywhere (not only after the options) and are all returned, in order."""
    by_flag: dict[str, tuple[Option, bool]] = {}
    for option in options:
        by_flag[option.flag] = (option, True)
        if option.negative:
            by_flag[option.negative] = (option, False)
    values: dict[str, str | bool] = {}
    positional: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return values, positional + list(args[i + 1 :])
        if arg in ("-h", "--help"):
            values["help"] = True
            i += 1
            continue
        if not arg.startswith("-") or arg == "-":
            if not interleaved:
                return values, list(args[i:])
            positional.append(arg)
            i += 1
            continue
        flag, has_inline, inline = arg.partition("=")
        if flag not in by_flag:
            raise UsageError(
                f"unknown option {flag!r} for `pgfence {command}`; see `pgfence {command} --help`"
            )
        option, positive = by_flag[flag]
        if option.metavar is None:
            if has_inline:
                raise UsageError(f"option {flag} takes no value")
            values[option.dest] = positive
        elif has_inline:
            values[option.dest] = inline
        elif i + 1 < len(args):
            i += 1
            values[option.dest] = args[i]
        else:
            raise UsageError(f"option {flag} needs a value ({option.metavar})")
        i += 1
    return values, positional


def resolve(command: str, values: Mapping[str, str | bool], env: Mapping[str, str]) -> Settings:
    """Apply flag > environment > default, and check every value."""
    options = {o.dest: o for o in COMMAND_OPTIONS[command]}

    def raw(dest: str) -> tuple[str | bool | None, str]:
        option = options.get(dest)
        if option is None:
            return None, ""
        if dest in values:
            return values[dest], option.flag
        if option.env and option.env in env:
            return env[option.env], option.env
        return None, ""

    def seconds(dest: str, default: float | None, minimum: float) -> float | None:
        value, source = raw(dest)
        if value is None:
            return default
        try:
            number = float(str(value))
        except ValueError:
            number = math.nan
        if not math.isfinite(number) or number < minimum or number > 86400:
            raise UsageError(
                f"{source}={value!r} is not a number of seconds from {minimum:g} to 86400"
            )
        return number

    def switch(dest: str, default: bool) -> bool:
        value, source = raw(dest)
        if value is None:
            return default
        if isinstance(value, bool):
            return value
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise UsageError(f"{source}={value!r} must be 1/true/yes/on or 0/false/no/off")

    def choice(dest: str, default: str, allowed: tuple[str, ...]) -> str:
        value, source = raw(dest)
        if value is None:
            return default
        if value not in allowed:
            raise UsageError(f"{source}={value!r} must be one of: {', '.join(allowed)}")
        return str(value)

    backend = choice("backend", "file", ("file", "etcd"))
    # An etcd key lives only as long as its lease: lease mode is that backend's default.
    mode = choice("mode", "lease" if backend == "etcd" else "strict", ("strict", "lease"))
    # Every value is checked whatever the mode: a typo in a setting the current mode
    # ignores would otherwise surface only on the day someone switches modes.
    ttl = seconds("ttl", DEFAULT_TTL, MIN_TTL)
    lock_delay = seconds("lock_delay", None, 0.0)
    interval = seconds("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL, 0.1)
    assert ttl is not None and interval is not None
    if mode == "lease" and backend == "etcd" and lock_delay is None:
        # A key can vanish under a live holder (see backends/etcd/backend.py): the lock
        # delay must outlast the holder's fence deadline, TTL/2, by a renewal.
        lock_delay = vanished_lock_delay(ttl)
    timings = Timings.lease(ttl, lock_delay) if mode == "lease" else Timings.strict(interval)
    drain_grace = seconds("drain_grace", DEFAULT_DRAIN_GRACE, 0.0)
    assert drain_grace is not None
    lock_file, _ = raw("lock_file")

    def etcd(variable: FenceVariable) -> Any:
        if variable.encoding == SWITCH:
            return switch(variable.dest, False)
        if variable.encoding == MILLISECONDS:
            return _milliseconds(raw(variable.dest), 1000.0)  # etcd's default
        return _optional_text(raw(variable.dest)[0])

    return Settings(
        token=_token(values, env),
        backend=backend,
        lock_file=_lock_file(lock_file, env),
        etcd=EtcdSettings(**{v.field[len("etcd.") :]: etcd(v) for v in ETCD_SETTINGS}),
        log_format=choice("log_format", "text", ("text", "json")),
        timings=timings,
        wait=switch("wait", mode == "lease"),
        allow_other_filesystem=switch("allow_other_filesystem", False),
        drain_grace=drain_grace,
        user=_optional_text(raw("user")[0]),
        metrics_address=_optional_text(raw("metrics_address")[0]),
        watchdog=choice("watchdog", "off", ("off", "auto", "required")),
        watchdog_device=_optional_text(raw("watchdog_device")[0]) or "/dev/watchdog",
        json=bool(values.get("json", False)),
        observe=seconds("observe", None, 0.0),
        force=bool(values.get("force", False)),
    )


def _milliseconds(raw: tuple[str | bool | None, str], default: float) -> float:
    """A whole number of milliseconds (10 to 60000), returned in seconds."""
    value, source = raw
    if value is None:
        return default / 1000
    text = str(value).strip()
    if not text.isdigit() or not 10 <= int(text) <= 60000:
        raise UsageError(f"{source}={value!r} is not a number of milliseconds from 10 to 60000")
    return int(text) / 1000


def _token(values: Mapping[str, str | bool], env: Mapping[str, str]) -> str:
    variable = fence_variable("token")
    if "token" in values:
        token, source = str(values["token"]), "--token"
    elif variable in env:
        token, source = env[variable], variable
    elif "HOSTNAME" in env:
        token, source = env["HOSTNAME"], "HOSTNAME"
    else:
        token, source = os.uname().nodename, "the kernel hostname"
    problem = token_problem(token)
    if problem:
        raise UsageError(
            f"the token from {source} {problem}; set {variable} (or --token) to a "
            "single-line name of this container"
        )
    return token


def _optional_text(value: str | bool | None) -> str | None:
    return None if value is None or value == "" else str(value)


def _lock_file(value: str | bool | None, env: Mapping[str, str]) -> str:
    path = default_lock_file(env) if value is None else str(value)
    if not path or path.endswith("/") or "\0" in path:
        raise UsageError(
            f"lock file path {path!r} must name a file; fix FENCE_LOCK_FILE or --lock-file"
        )
    return os.path.abspath(path)
