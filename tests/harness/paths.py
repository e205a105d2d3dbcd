"""The protocol paths the explorer walks: what is on the lock before, who the target is,
and what happens around it.

Each path has one *target* process whose lock calls are the matrix's rows, in one
*phase* (tracer.py: "main" before the renewer thread makes its first call, "renewer"
that thread, "main-after-thread" the release after the command exited). Contenders
start after the target, so that without a fault the target takes the path under test;
with a fault they race it. Tokens: A the target (or the same-token rival), B another
container, H a holder that crashes, T a takeover target, O the operator.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

from harness.explorer import (
    LEASE,
    STRICT,
    STRICT_DELAY,
    STRICT_INTERVAL,
    TTL,
    WAIT,
    Path,
    Proc,
    Run,
    record,
    seed_file,
    stop,
    wait_exit,
)

# -- what is on the lock before -----------------------------------------------------


def seed_none(run: Run) -> None:
    pass


def seed_one_line(run: Run) -> None:
    with open(run.lock, "wb") as f:
        f.write(b"A\n")  # the old shell script's lock, of the target's own token


def seed_same_token(run: Run) -> None:
    seed_file(run, record("A", "strict", 5, STRICT_INTERVAL), 5)


def seed_silent_lease(run: Run) -> None:
    seed_file(run, record("X", "lease", 5, TTL / 6), 5)


# -- contenders ---------------------------------------------------------------------


def lease_contender(run: Run) -> list[str]:
    return run.run_argv("B", *LEASE)


def same_token_contender(run: Run) -> list[str]:
    return run.run_argv("A", *STRICT)


# -- what happens around the target ---------------------------------------------------


def hold_then_stop(
    run: Run, target: Proc, hold: float, wait_for_start: float, seen: int = 0
) -> None:
    """Once the target's command runs (`seen` commands ran before it), let it hold for
    `hold` s, or until it exits, then SIGTERM it."""
    run.held_by_new_oracle(seen, wait_for_start, target)
    end = time.monotonic() + hold
    while time.monotonic() < end and target.popen.poll() is None:
        time.sleep(0.02)
    stop(target)


Drive = Callable[[Run, list[str]], None]


def drive_acquire(pool_argv: Callable[[Run], list[str]]) -> Drive:
    def drive(run: Run, target_argv: list[str]) -> None:
        target = run.start("target", target_argv, traced=run.fault_file)
        time.sleep(1.0)  # the target goes first
        run.pool("contender", pool_argv(run))
        hold_then_stop(run, target, 1.5, run.delay + WAIT + 3)

    return drive


def drive_renew(pool_argv: Callable[[Run], list[str]]) -> Drive:
    def drive(run: Run, target_argv: list[str]) -> None:
        target = run.start("target", target_argv, traced=run.fault_file)
        run.held_by_new_oracle(0, 10, target)
        run.pool("contender", pool_argv(run), pause=0.5)
        hold_then_stop(run, target, run.delay + WAIT + 0.5, 0)

    return drive


def drive_release(run: Run, target_argv: list[str]) -> None:
    target = run.start("target", target_argv, traced=run.fault_file)
    run.held_by_new_oracle(0, 10, target)
    # Two contenders: when one takes over and a late release deletes its lock, the other
    # is already waiting to create one.
    run.pool("contender", lease_contender(run))
    run.pool("contender", run.run_argv("C", *LEASE))
    time.sleep(1.0)
    stop(target)  # the command exits; the target releases
    wait_exit(target, run.delay + 5)


def crash_holder(run: Run, options: tuple[str, ...]) -> None:
    """A holder H that runs its command, then dies by SIGKILL (its container is killed)."""
    holder = run.start("holder", run.run_argv("H", *options))
    run.held_by_new_oracle(0, 10, holder)
    time.sleep(0.6)
    os.kill(holder.popen.pid, signal.SIGKILL)
    holder.killed_by_us = True
    holder.popen.wait()


def drive_operator_release(run: Run, target_argv: list[str]) -> None:
    crash_holder(run, STRICT)
    target = run.start("target", target_argv, kind="release", traced=run.fault_file)
    time.sleep(1.0)
    run.pool("contender", run.run_argv("H", *STRICT), pause=0.5)  # H's container restarts
    wait_exit(target, run.delay + 10)


def drive_takeover(run: Run, target_argv: list[str]) -> None:
    crash_holder(run, LEASE)
    target = run.start("target", target_argv, traced=run.fault_file)
    time.sleep(1.0)
    run.pool("contender", lease_contender(run))
    run.pool("contender", run.run_argv("C", *LEASE))
    hold_then_stop(run, target, 1.5, run.delay + 2 * WAIT + 3, seen=1)


def _run(token: str, options: tuple[str, ...]) -> Callable[[Run], list[str]]:
    return lambda run: run.run_argv(token, *options)


def _operator(run: Run) -> list[str]:
    return run.pgfence("release", "--lock-file", run.lock, "--token", "O")


PATHS = [
    Path(
        "acquire-free",
        "strict, free lock",
        "main",
        1,
        _run("A", STRICT),
        seed_none,
        drive_acquire(lease_contender),
        STRICT_DELAY,
    ),
    Path(
        "acquire-one-line",
        "strict, one-line lock of our token",
        "main",
        1,
        _run("A", STRICT),
        seed_one_line,
        drive_acquire(lease_contender),
        STRICT_DELAY,
    ),
    Path(
        "acquire-same-token",
        "strict, dead lock of our token, other instance",
        "main",
        1,
        _run("A", STRICT),
        seed_same_token,
        drive_acquire(same_token_contender),
        STRICT_DELAY,
    ),
    Path(
        "acquire-silent-lease",
        "lease, silent lease of another token",
        "main",
        1,
        _run("A", LEASE),
        seed_silent_lease,
        drive_acquire(lease_contender),
    ),
    Path(
        "renew",
        "lease, a steady-state renewal",
        "renewer",
        2,
        _run("A", LEASE),
        seed_none,
        drive_renew(lease_contender),
    ),
    Path(
        "renew-strict",
        "strict, a steady-state heartbeat, same-token rival",
        "renewer",
        2,
        _run("A", STRICT),
        seed_none,
        drive_renew(same_token_contender),
        STRICT_DELAY,
    ),
    Path(
        "holder-release",
        "lease, release after the command exits",
        "main-after-thread",
        1,
        _run("A", LEASE),
        seed_none,
        drive_release,
    ),
    Path(
        "operator-release",
        "`pgfence release` of a crashed strict holder",
        "main",
        1,
        _operator,
        seed_none,
        drive_operator_release,
        STRICT_DELAY,
    ),
    Path(
        "lease-takeover",
        "lease, take over a crashed holder's lease",
        "main",
        1,
        _run("T", LEASE),
        seed_none,
        drive_takeover,
    ),
]
