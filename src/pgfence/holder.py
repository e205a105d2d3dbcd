"""`pgfence run`: acquire the fence, supervise the command, renew, release.

This is the safety-critical path, top to bottom:

1. Block the signals we handle, so none is lost and none acts before we are ready.
2. Acquire (atomic; may wait in lease mode; a termination signal aborts the wait).
3. Start the command as a child in its own session, with the fence's generation in its
   environment and a parent-death signal so it dies with us.
4. Renew from a thread, and in the main loop, on every wake-up and before anything else:
   if the fence is lost, or (lease mode) no renewal that started within the deadline has
   succeeded, kill the whole process tree with SIGKILL and exit 75 without touching the
   lock. A process that was frozen or a VM that was suspended past its deadline wakes up
   into this check, and the renewer refuses to write once the deadline has passed.
5. Pass signals on to the command. When it exits, outlive every process it started
   (SIGTERM after it exits, SIGKILL after the drain grace), then release the lock.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping, Sequence

from pgfence import clock, log
from pgfence.backends.base import Backend, Hold
from pgfence.errors import EXIT_SELF_FENCED, CommandError, Interrupted, LockLost, StorageError
from pgfence.metrics import Metrics
from pgfence.supervisor import FORWARDED, Supervisor, next_signal
from pgfence.timings import Timings

# What the supervised command learns about the fence it runs under. A pgfence started
# inside that command (the `postgres` shim under a wrapped entrypoint) recognises its
# supervisor's fence from the last two and does not try to take it a second time.
GENERATION_ENV = "PGFENCE_GENERATION"
INSTANCE_ENV = "PGFENCE_INSTANCE"
LOCK_ENV = "PGFENCE_LOCK"


def interruptible_sleep(seconds: float) -> None:
    """Sleep, but give up the wait when a termination signal arrives (signals are
    blocked, so they queue until collected here)."""
    deadline = clock.now() + seconds
    while True:
        signum = next_signal(deadline - clock.now())
        if signum is None:
            return
        if signum in FORWARDED:
            raise Interrupted(signum)


def run(
    backend: Backend,
    timings: Timings,
    command: Sequence[str],
    drain_grace: float,
    user: str | None = None,
    metrics: Metrics | None = None,
    fence_env: Mapping[str, str] | None = None,
) -> int:
    metrics = metrics or Metrics("file", timings.mode, timings.deadline)
    hold = backend.acquire(interruptible_sleep)
    metrics.acquired(hold.generation, hold.acquired_clock)
    if timings.deadline is not None and clock.now() - hold.acquired_clock > timings.deadline:
        # Paused (or stalled on storage) after the acquiring write started: as after any
        # pause past the deadline, the lease may be someone else's by now. Never start
        # the command on it, and leave the lock as it is (a free lock could be taken
        # while a holder we overwrote still runs its server).
        metrics.fenced()
        late = (
            f"acquiring {backend.location()} took {clock.now() - hold.acquired_clock:.2f} s, "
            f"longer than the deadline ({timings.deadline:.3g} s)"
        )
        log.event(
            "self_fenced",
            f"{late}: did not start {command[0]}; the lock is left as it is",
            level="error",
            reason=late,
            kill_seconds=0.0,
        )
        return EXIT_SELF_FENCED
    env = {
        **os.environ,
        **(fence_env or {}),
        **hold.child_environment(),
        GENERATION_ENV: str(hold.generation),
        INSTANCE_ENV: hold.instance,
        LOCK_ENV: backend.location(),
    }
    renewer = Renewer(hold, timings, metrics)
    try:
        supervisor = Supervisor(list(command), env, user)
    except CommandError:
        hold.release(renewer.in_time)
        metrics.released()
        raise
    renewer.start()
    log.event(
        "started",
        f"started {command[0]} (pid {supervisor.pid}) holding generation {hold.generation}",
        pid=supervisor.pid,
        generation=hold.generation,
    )

    draining_since: float | None = None
    killed_leftovers = False
    while True:
        timeout = 0.1 if draining_since is not None else 1.0
        if timings.deadline is not None:
            # sigtimedwait's timeout runs on CLOCK_MONOTONIC, which stands still while the
            # machine is suspended: wake often, so that after a resume the deadline check
            # (on CLOCK_BOOTTIME) comes within 0.25 s, not within the rest of a long wait.
            # (0.1 s would cost an idle holder 0.2% of a core; 0.25 s costs under 0.1%.)
            timeout = min(0.25, renewer.last_success + timings.deadline - clock.now())
        signum = next_signal(timeout)

        # The fence first: after a pause of any length this is the first thing we do.
        reason = renewer.lost or _deadline_passed(renewer, timings)
        if reason:
            metrics.fenced()
            return _self_fence(supervisor, renewer, reason)

        if signum in FORWARDED and draining_since is None:
            supervisor.forward(signum)
        supervisor.reap()
        if supervisor.exit_status is None:
            continue

        # The command has exited; whatever it started must be gone before we let go.
        leftovers = supervisor.remaining()
        if not leftovers:
            break
        now = clock.now()
        if draining_since is None:
            draining_since = now
            log.event(
                "draining",
                f"{command[0]} exited with status {supervisor.exit_status}; "
                f"{len(leftovers)} process(es) it started are still running: sent "
                f"SIGTERM, SIGKILL in {drain_grace:g} s",
                pids=leftovers,
            )
            supervisor.signal_all(signal.SIGTERM)
        elif not killed_leftovers and now - draining_since >= drain_grace:
            supervisor.signal_all(signal.SIGKILL)
            killed_leftovers = True

    status = supervisor.exit_status
    assert status is not None
    renewer.stop()
    metrics.released()
    if hold.release(renewer.in_time):  # like a renewal: nothing deleted past the deadline
        log.event(
            "released",
            f"{command[0]} exited with status {status}; released {backend.location()}",
            status=status,
            lock=backend.location(),
        )
    else:
        log.event(
            "released",
            f"{command[0]} exited with status {status}; the lock was no "
            "longer ours, left it as it is",
            level="warning",
            status=status,
        )
    return status


def _deadline_passed(renewer: Renewer, timings: Timings) -> str | None:
    if timings.deadline is None:
        return None
    silent = clock.now() - renewer.last_success
    if silent <= timings.deadline:
        return None
    return (
        f"no lease renewal succeeded for {silent:.2f} s (deadline {timings.deadline:.3g} s); "
        "another instance may take over"
    )


def _self_fence(supervisor: Supervisor, renewer: Renewer, reason: str) -> int:
    started = clock.now()
    supervisor.kill_all()  # SIGKILL: a smart shutdown would keep serving for minutes
    renewer.stop(wait=False)
    took = clock.now() - started
    log.event(
        "self_fenced",
        f"{reason}: killed the server's process tree in {took * 1000:.0f} "
        "ms; the lock is left as it is",
        level="error",
        reason=reason,
        kill_seconds=round(took, 4),
    )
    return EXIT_SELF_FENCED


class Renewer(threading.Thread):
    """Writes heartbeats every `timings.interval`, measured from when each one *started*.

    `last_success` is the start time of the newest renewal that succeeded; the deadline is
    counted from it, because a write that took long may have reached the storage late.
    """

    def __init__(self, hold: Hold, timings: Timings, metrics: Metrics) -> None:
        super().__init__(name="pgfence-renewer", daemon=True)
        self._hold = hold
        self._timings = timings
        self._metrics = metrics
        self._stopping = threading.Event()
        self._main_thread = threading.get_ident()
        self.last_success = hold.acquired_clock
        self.lost: str | None = None

    def in_time(self) -> bool:
        deadline = self._timings.deadline
        return deadline is None or clock.now() - self.last_success < deadline

    def stop(self, wait: bool = True) -> None:
        self._stopping.set()
        if wait and self.is_alive():
            self.join()

    def run(self) -> None:
        failures = 0
        next_start = self.last_success + self._timings.interval
        while not self._stopping.wait(max(0.0, next_start - clock.now())):
            started = clock.now()
            next_start = started + self._timings.interval
            if not self.in_time():
                return  # never renew a lease we may have lost; the main loop fences
            try:
                if not self._hold.renew(self.in_time):
                    return
            except LockLost as exc:
                self.lost = f"lost the lock: {exc.message}"
                self._wake_main()
                return
            except (StorageError, OSError) as exc:
                failures += 1
                self._metrics.renewal_failed()
                message = exc.message if isinstance(exc, StorageError) else str(exc)
                log.event(
                    "renew_failed",
                    f"heartbeat failed ({failures} in a row): {message}",
                    level="warning",
                    failures=failures,
                    error=message,
                )
                continue
            if failures:
                log.event("renewed", f"heartbeat written again after {failures} failure(s)")
            failures = 0
            self.last_success = started
            self._metrics.renewed(started, clock.now() - started)

    def _wake_main(self) -> None:
        # SIGCHLD is harmless to the main loop: it just reaps and looks at `lost`.
        signal.pthread_kill(self._main_thread, signal.SIGCHLD)
