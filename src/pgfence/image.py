"""What the container images add (docker/Dockerfile*, run by their launcher docker/pgfence):
the lock path of the official image's volume layout, and `pgfence entrypoint`.

The official images have two layouts, told apart by their PG_MAJOR:

- 13 to 17: `VOLUME /var/lib/postgresql/data`, which is also PGDATA. The lock has to be on
  that volume, and cannot sit inside an empty PGDATA (initdb refuses a directory that is
  not empty). So the lock is `/var/lib/postgresql/data/fence_lock`, the old script's path,
  and a fresh volume gets its database one level down, `/var/lib/postgresql/data/pgdata`
  (the official image's own advice for mount points). A volume the official image
  initialised (PG_VERSION at its root) keeps PGDATA there; the lock then lies among the
  database's files, which PostgreSQL ignores.
- 18 and later: `VOLUME /var/lib/postgresql`, PGDATA `/var/lib/postgresql/18/docker`; the
  lock is `/var/lib/postgresql/fence_lock`, beside every major version's PGDATA.

`pgfence entrypoint -- docker-entrypoint.sh ARGS` is the images' ENTRYPOINT. It fences
what the official entrypoint treats as a server start (ARGS starting with an option or
`postgres`, without a help or version flag) and passes anything else through unfenced
(`psql`, `bash`, `pgfence status`), as that entrypoint itself does. A server start becomes
`pgfence run -- pgfence entrypoint -- ...`: the inner entrypoint finds itself under the
fence, and only then chooses PGDATA and execs the official entrypoint. The choice is made
by the holder, so two containers starting on one fresh volume cannot choose differently.

This module imports nothing beyond what python3-minimal has until the standard library is
known to be complete (`missing_stdlib`), so that a missing package is one line, not a
traceback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, MutableMapping, Sequence

from pgfence.frozen import Struct

TYPE_CHECKING = False  # not `typing`: importing it costs every start in an image ~8 ms
if TYPE_CHECKING:
    from pgfence.config import Settings

# Every standard library module pgfence imports (tests/test_packaging.py keeps the list
# complete). Debian's python3-minimal lacks several of them (ctypes, dataclasses, json, http).
STDLIB = (
    "abc",
    "base64",
    "collections.abc",
    "ctypes",
    "dataclasses",
    "http.client",
    "http.server",
    "importlib.util",
    "ipaddress",
    "json",
    "os",
    "random",
    "re",
    "shutil",
    "signal",
    "ssl",
    "stat",
    "threading",
    "typing",
    "urllib.parse",
    "zipfile",
)
# The official entrypoint's _pg_want_help: with any of these, `postgres` only prints.
HELP_FLAGS = ("-?", "--help", "--describe-config", "-V", "--version")
PRE_18_VOLUME = "/var/lib/postgresql/data"
VOLUME_18 = "/var/lib/postgresql"
FRESH_SUBDIRECTORY = "pgdata"


class Layout(Struct):
    volume: str  # where the official image declares its VOLUME
    pgdata: str  # the image's own PGDATA
    lock_file: str  # the images' default FENCE_LOCK_FILE: the volume's root


def layout(env: Mapping[str, str]) -> Layout:
    """The official image's layout for its PG_MAJOR (13-17 when it is not a number)."""
    from pgfence.config import default_lock_file

    major = env.get("PG_MAJOR", "")
    if major.isdigit() and int(major) >= 18:
        return Layout(VOLUME_18, f"{VOLUME_18}/{int(major)}/docker", default_lock_file(env))
    return Layout(PRE_18_VOLUME, PRE_18_VOLUME, default_lock_file(env))


def missing_stdlib() -> str | None:
    """One line naming the package to install, if a module pgfence imports is missing."""
    import importlib.util

    for name in STDLIB:
        try:
            spec = importlib.util.find_spec(name)
        except ImportError:  # a parent package (http, urllib) is missing
            spec = None
        # An empty directory of that name is a namespace package (origin None), not the
        # module: the standard library has none.
        if spec is None or spec.origin is None:
            return stdlib_message(name)
    return None


def stdlib_message(module: str) -> str:
    if os.path.exists("/etc/alpine-release"):
        fix = "apk add python3"
    else:
        fix = "apt-get install libpython3-stdlib (python3-minimal alone is not enough)"
    return (
        f"this Python ({sys.executable}) lacks the standard library module {module!r} "
        f"that pgfence needs; install it: {fix}"
    )


def apply_defaults(env: MutableMapping[str, str]) -> None:
    """The image's lock path, unless the user chose one (an empty value included)."""
    env.setdefault("FENCE_LOCK_FILE", layout(env).lock_file)


def starts_server(args: Sequence[str]) -> bool:
    """The official docker-entrypoint.sh's rule: a first argument that is an option means
    `postgres`, and `postgres` without a help or version flag initialises the volume if
    needed and starts the server. Everything else it execs as is."""
    if not args or not (args[0].startswith("-") or args[0] == "postgres"):
        return False
    return not any(arg in HELP_FLAGS for arg in args)


def main(argv: Sequence[str]) -> int:
    """The images' `pgfence`: their defaults, then `entrypoint` or any pgfence command."""
    argv = list(argv)
    apply_defaults(os.environ)
    from pgfence import cli

    if argv[1:2] != ["entrypoint"]:
        return cli.main(argv)
    return cli._guard(lambda: entrypoint(argv[0], argv[2:], os.environ))


def entrypoint(program: str, args: Sequence[str], env: Mapping[str, str]) -> int:
    from pgfence.errors import UsageError

    command = list(args[1:] if args[:1] == ["--"] else args)
    if not command or command[0].startswith("-"):
        raise UsageError(
            "usage: pgfence entrypoint -- ENTRYPOINT [ARG...] (no options; fenced when ARGs "
            "start a server, e.g. `pgfence entrypoint -- docker-entrypoint.sh postgres`)"
        )
    if not starts_server(command[1:]):
        return _exec(command, env)  # psql, bash, pgfence status: nothing to fence
    from pgfence import cli

    settings, _ = cli._settings("run", [])
    if not _under_the_fence(settings, env):
        return cli.main([program, "run", "--", program, "entrypoint", "--", *command])
    pgdata = choose_pgdata(settings, env)
    if settings.backend == "file" and not settings.allow_other_filesystem:
        from pgfence.datadir import check_same_filesystem

        check_same_filesystem(settings.lock_file, pgdata)
    return _exec(command, {**env, "PGDATA": pgdata})


def _under_the_fence(settings: Settings, env: Mapping[str, str]) -> bool:
    """True when the pgfence that started us holds the fence these settings name (the
    same test as a nested `pgfence run`). An environment that names a fence we are not
    under is refused rather than trusted or fenced twice."""
    from pgfence.backends import open_backend
    from pgfence.environment import INSTANCE, LOCK, supervising_instance
    from pgfence.errors import UsageError
    from pgfence.record import new_instance_id

    instance = env.get(INSTANCE)
    if not instance:
        return False
    backend = open_backend(settings, new_instance_id())
    if supervising_instance(backend, env):
        return True
    raise UsageError(
        f"{INSTANCE}={instance} names a fence that does not hold "
        f"{backend.location()}; do not set {INSTANCE} or {LOCK}"
    )


def choose_pgdata(settings: Settings, env: Mapping[str, str]) -> str:
    """PGDATA for this start, decided under the fence. Only a lock inside PGDATA needs a
    decision: a database already there stays; a fresh pre-18 volume (the image's own
    PGDATA) gets its database in a subdirectory; any other empty PGDATA is refused, since
    initdb would refuse it after the lock was written into it."""
    from pgfence import log
    from pgfence.errors import UsageError, storage_error

    pgdata = env.get("PGDATA") or layout(env).pgdata
    inside = os.path.normpath(os.path.abspath(pgdata))
    if settings.backend != "file" or not settings.lock_file.startswith(inside + os.sep):
        return pgdata
    version = os.path.join(pgdata, "PG_VERSION")
    try:
        os.stat(version)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise storage_error(exc, "inspect", version) from None
    else:
        log.event("pgdata", f"{pgdata} holds a database: PGDATA stays there")
        return pgdata
    if inside == layout(env).pgdata and inside == PRE_18_VOLUME:
        chosen = os.path.join(pgdata, FRESH_SUBDIRECTORY)
        log.event("pgdata", f"{pgdata} holds no database: PGDATA={chosen}")
        return chosen
    raise UsageError(
        f"the lock {settings.lock_file} is inside PGDATA {pgdata}, which holds no database "
        "yet, and initdb refuses a directory that is not empty; set PGDATA to a "
        f"subdirectory (e.g. PGDATA={os.path.join(pgdata, FRESH_SUBDIRECTORY)}) or "
        "FENCE_LOCK_FILE beside PGDATA on the same volume"
    )


def _exec(command: list[str], env: Mapping[str, str]) -> int:
    from pgfence.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, CommandError

    try:
        os.execvpe(command[0], command, dict(env))
    except FileNotFoundError:
        raise CommandError(f"cannot run {command[0]}: not found", EXIT_NOT_FOUND) from None
    except OSError as exc:
        raise CommandError(
            f"cannot run {command[0]}: {exc.strerror}", EXIT_NOT_EXECUTABLE
        ) from None
    return EXIT_NOT_FOUND  # not reached
