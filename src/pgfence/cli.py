"""The `pgfence` command: parse, dispatch, and turn errors into one line and an exit code.

This is the only module that prints; everything else raises typed errors or logs events.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from pgfence import __version__, log
from pgfence.backends.base import Backend, LockState
from pgfence.config import COMMAND_OPTIONS, Settings, parse_args, resolve
from pgfence.errors import (
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_UNHEALTHY,
    EXIT_USAGE,
    PgfenceError,
    UsageError,
)
from pgfence.record import LegacyLock, LockRecord, ShimLock

USAGE = """\
usage: pgfence run [OPTIONS] -- COMMAND [ARG...]  run COMMAND holding the fence
       pgfence status [OPTIONS] [--json]          who holds the fence; alive?
       pgfence release [OPTIONS] [--force]        clear a dead holder's lock
       pgfence check [OPTIONS]                    health: 0 if held here, else 1
       pgfence verify-fs DIR [OPTIONS]            test a shared directory
       pgfence export-shim                        print the sh shim (no Python)
       pgfence COMMAND --help                     its options and exit codes
Installed as `postgres` first on PATH, it fences the real postgres found further
down. Exit codes: 64 usage, 65 unreadable lock, 73 fenced out, 74 storage error,
75 fence lost; otherwise the command's own status (128+N: killed by signal N)."""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    from pgfence import shim, signals

    if (argv and shim.is_shim(argv[0])) or argv[1:2] == ["run"]:
        # First act, as tini's: no thread exists yet, so every thread started later
        # inherits the blocked mask (see signals.py). Exec in place restores it.
        signals.block()
    if argv and shim.is_shim(argv[0]):
        return _guard(lambda: _shim(argv))
    args = argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return EXIT_OK if args else EXIT_USAGE
    if args[0] == "--version":
        print(f"pgfence {__version__}")
        return EXIT_OK
    command = args[0]
    if command not in COMMANDS:
        return _guard(lambda: _fail(_unknown_command(command)))
    if command == "verify-fs":
        from pgfence.verifyfs import command as verifyfs

        return _guard(lambda: verifyfs.main(args[1:], print))
    if command == "export-shim":
        return _guard(lambda: _export_shim(args[1:]))
    if _asks_for_help(command, args[1:]):
        tail = " -- COMMAND [ARG...]" if command == "run" else ""
        from pgfence.helptext import help_text

        print(f"usage: pgfence {command} [OPTIONS]{tail}")
        print(help_text(command))
        return EXIT_OK
    if command == "check":
        return _check(args[1:])
    return _guard(lambda: _dispatch(command, args[1:]))


COMMANDS = (*COMMAND_OPTIONS, "verify-fs", "export-shim")


def _unknown_command(command: str) -> UsageError:
    return UsageError(
        f"unknown command {command!r}; expected one of: {', '.join(COMMANDS)} "
        "(see `pgfence --help`)"
    )


def _export_shim(args: Sequence[str]) -> int:
    from pgfence import exportshim

    return exportshim.main(args, print)


def _asks_for_help(command: str, args: Sequence[str]) -> bool:
    """`-h`/`--help` among pgfence's own options, read exactly as they are parsed (so
    `pgfence run postgres -h '*'` is postgres's -h, not ours). A bad option is not a
    request for help: the command reports it."""
    try:
        return bool(parse_args(command, args)[0].get("help"))
    except UsageError:
        return False


def _settings(command: str, args: Sequence[str]) -> tuple[Settings, list[str]]:
    values, rest = parse_args(command, args)
    settings = resolve(command, values, os.environ)
    log.configure(settings.log_format)
    return settings, rest


def _dispatch(command: str, args: Sequence[str]) -> int:
    settings, rest = _settings(command, args)
    if command == "run":
        if not rest:
            raise UsageError("`pgfence run` needs a command, e.g. `pgfence run -- postgres`")
        return _run(settings, rest)
    if rest:
        raise UsageError(f"`pgfence {command}` takes no arguments, got {rest[0]!r}")
    if command == "status":
        return _status(settings)
    return _release(settings)


def _guard(action: object) -> int:
    """Run `action`, turning pgfence errors into one line and their exit code."""
    assert callable(action)
    try:
        code = action()
        assert isinstance(code, int)
        return code
    except PgfenceError as exc:
        return _fail(exc)
    except KeyboardInterrupt:
        return 130


def _fail(exc: PgfenceError) -> int:
    log.event(exc.event, exc.message, level="error", exit_code=exc.exit_code)
    return exc.exit_code


def _backend(settings: Settings) -> Backend:
    from pgfence.backends import open_backend
    from pgfence.record import new_instance_id

    return open_backend(settings, new_instance_id())


def _run(settings: Settings, command: list[str]) -> int:
    from pgfence import runloop, supervisor
    from pgfence.datadir import check_same_filesystem, data_directory
    from pgfence.environment import fence_environment, supervising_instance
    from pgfence.flush import filesystems
    from pgfence.guardian import Guardian
    from pgfence.metrics import Metrics, serve

    backend = _backend(settings)
    nested = supervising_instance(backend, os.environ)
    if nested:
        # A pgfence further up this process tree holds the fence and supervises us
        # (wrapper around the entrypoint plus the postgres shim): run the command as is.
        log.event(
            "nested",
            f"{backend.location()} is held by the pgfence supervising this "
            f"process (instance {nested}); running {command[0]} directly",
        )
        return _exec(command)
    data_dir = data_directory(command, os.environ)
    if settings.backend == "file" and data_dir and not settings.allow_other_filesystem:
        check_same_filesystem(settings.lock_file, data_dir)
    if settings.user:
        supervisor.check_user(settings.user)
    supervisor.check_command(command[0], dict(os.environ))
    watchdog = _watchdog_plan(settings)
    # What to flush once the command's tree is gone: the data directory's filesystem and
    # the lock's; all filesystems (sync) when the data directory is not known.
    lock_dir = [os.path.dirname(settings.lock_file)] if settings.backend == "file" else []
    flush_dirs = filesystems([data_dir, *lock_dir]) if data_dir else []
    backend = _noted_here(backend)
    metrics = Metrics(
        settings.backend,
        settings.timings.mode,
        settings.timings.deadline,
        settings.timings.interval,
    )
    # Forked before any thread exists (see guardian.py); PID 1 needs none: the kernel
    # kills its whole namespace with it.
    guardian = None if os.getpid() == 1 else Guardian(flush_dirs, settings.timings.flush_bound)
    if settings.metrics_address:
        serve(settings.metrics_address, metrics)
    try:
        status = runloop.run(
            backend,
            settings.timings,
            command,
            settings.drain_grace,
            settings.user,
            metrics,
            fence_environment(settings),
            flush_dirs,
            watchdog,
            guardian,
        )
    except PgfenceError:
        # Raised before the command started, or after its tree was gone (never while
        # it runs): nothing for the guardian to kill.
        if guardian:
            guardian.done()
        raise
    if guardian:
        guardian.done()  # every return of runloop.run comes after the tree is gone
    return status


def _watchdog_plan(settings: Settings) -> tuple[str, int] | None:
    """(device, timeout) to arm once the fence is held, checked now so that `required`
    refuses before anything is taken or started; None without a watchdog."""
    if settings.watchdog == "off":
        return None
    from pgfence import watchdog

    try:
        timeout = watchdog.timeout_for(settings.timings)
        watchdog.probe(settings.watchdog_device, timeout)
    except PgfenceError as exc:
        if settings.watchdog == "required":
            raise
        log.event(
            "watchdog_unused",
            f"{exc.message} (--watchdog auto: going on without a watchdog)",
            level="warning",
        )
        return None
    return settings.watchdog_device, timeout


def _noted_here(backend: Backend) -> Backend:
    """`backend`, noting the instance of each fence it acquires in a file local to this
    container, for `check` (see localholder.py)."""
    from pgfence.localholder import Recorded

    return Recorded(backend, os.environ)


def _exec(command: list[str]) -> int:
    from pgfence import signals

    signals.restore()  # the command must not inherit our blocked signals
    try:
        os.execvp(command[0], command)
    except OSError as exc:
        raise PgfenceError(f"cannot run {command[0]}: {exc.strerror}") from None
    return EXIT_NOT_FOUND  # not reached


def _shim(argv: list[str]) -> int:
    from pgfence import shim

    real = shim.real_postgres(argv[0], os.environ)
    args = argv[1:]
    if not shim.starts_server(args):
        from pgfence import signals

        signals.restore()
        os.execv(real, [real, *args])
    settings, _ = _settings("run", [])
    return _run(settings, [real, *args])


def _operator_sleep(seconds: float) -> None:
    """Waiting in status, release and check: they hold nothing, so a signal may simply
    end them with its default action; no need for run's signal machinery (start-up)."""
    import time

    time.sleep(seconds)


def _status(settings: Settings) -> int:
    state = _backend(settings).state(settings.observe, _operator_sleep)
    holder = state.holder
    if settings.json:
        import json

        described = None
        if holder is not None:
            described = _holder_json(holder)
        age = state.heartbeat_age
        print(
            json.dumps(
                {
                    "lock": state.location,
                    "state": "held" if holder else "free",
                    "holder": described,
                    "ours": state.ours,
                    "alive": state.alive,
                    "heartbeat_age_seconds": None if age is None else round(age, 3),
                    "age_basis": state.age_basis,
                    "observed_seconds": round(state.observed_for, 3),
                }
            )
        )
        return EXIT_OK
    print(f"lock:        {state.location}")
    if holder is None:
        print("state:       free")
        return EXIT_OK
    print("state:       held")
    print(f"holder:      {holder.token}" + ("  (this token)" if state.ours else ""))
    if isinstance(holder, ShimLock):
        _print_shim_lock(holder)
        return EXIT_OK
    if isinstance(holder, LegacyLock):
        print("format:      one-line lock (no heartbeat, no instance)")
        return EXIT_OK
    print(f"instance:    {holder.instance} (pid {holder.pid} on {holder.host})")
    print(f"mode:        {holder.mode}")
    print(f"generation:  {holder.generation}")
    print(f"taken at:    {holder.acquired_at} (holder's wall clock)")
    print(f"heartbeat:   #{holder.heartbeat}, {_liveness(state)}")
    return EXIT_OK


def _holder_json(holder: LegacyLock | LockRecord) -> dict[str, object]:
    """`status --json`'s holder: the record's fields and its format (legacy: one line;
    shim: written by the POSIX sh shim, never renewed; pgfence)."""
    if isinstance(holder, ShimLock):
        return {**holder.record.as_dict(), "format": "shim"}
    if isinstance(holder, LegacyLock):
        return {**holder.as_dict(), "format": "legacy"}
    return {**holder.as_dict(), "format": "pgfence"}


def _print_shim_lock(holder: ShimLock) -> None:
    record = holder.record
    print("format:      sh shim lock (strict, no heartbeat: nothing releases it)")
    print(f"instance:    {record.instance} (pid {record.pid} on {record.host})")
    print(f"generation:  {record.generation}")
    print(f"taken at:    {record.acquired_at} (holder's wall clock)")


def _liveness(state: LockState) -> str:
    age = state.heartbeat_age
    if age is None:  # a one-line lock: `check` of our own seed-style lock gets here
        return "none: a one-line lock has no heartbeat"
    if state.age_basis == "same-boot clock":
        verdict = "alive" if state.alive else "silent"
        return f"{age:.1f} s ago ({verdict}; measured on this machine's clock)"
    if state.alive:
        return f"moved within {age:.1f} s of watching (alive)"
    if state.alive is False:
        return f"no change for {age:.1f} s of watching (silent)"
    return f"no change for {age:.1f} s of watching (not long enough to call it silent)"


def _release(settings: Settings) -> int:
    print(_backend(settings).release(settings.force, _operator_sleep))
    return EXIT_OK


def _held_elsewhere(state: LockState) -> str | None:
    """Why the fence, held under our token, is not held from this container; None if a
    `pgfence run` here holds it. Same-token contenders (a Swarm hostname template gives
    every task one hostname) are told apart by the holder's instance id."""
    from pgfence.localholder import instances_here

    holder = state.holder
    assert isinstance(holder, LockRecord)
    if holder.instance in instances_here(state.location, os.environ):
        return None
    return (
        f"{state.location} is held by instance {holder.instance} of token "
        f"{holder.token!r}, not by a pgfence run in this container (none runs here, or it "
        "waits for the lock)"
    )


def _check(args: Sequence[str]) -> int:
    """Health check: only 0 or 1, because Docker and Kubernetes give other codes meaning."""
    try:
        settings, rest = _settings("check", args)
        if rest:
            raise UsageError(f"`pgfence check` takes no arguments, got {rest[0]!r}")
        state = _backend(settings).state(None, _operator_sleep)
    except PgfenceError as exc:
        _fail(exc)
        return EXIT_UNHEALTHY
    if state.holder is None:
        print(f"unhealthy: {state.location} is free")
        return EXIT_UNHEALTHY
    if not state.ours:
        print(f"unhealthy: {state.location} is held by {state.holder.token!r}, not by this token")
        return EXIT_UNHEALTHY
    if not state.alive:
        print(
            f"unhealthy: we hold {state.location} but its heartbeat is not fresh "
            f"({_liveness(state)})"
        )
        return EXIT_UNHEALTHY
    elsewhere = _held_elsewhere(state)
    if elsewhere:
        print(f"unhealthy: {elsewhere}")
        return EXIT_UNHEALTHY
    print(f"healthy: holding {state.location}, heartbeat {_liveness(state)}")
    return EXIT_OK
