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

from pgfence import clock, log, signals
from pgfence.backends.base import Backend, Hold
from pgfence.environment import held_environment
from pgfence.errors import (
    EXIT_SELF_FENCED,
    EXIT_UNFLUSHED,
    CommandError,
    Interrupted,
    LockLost,
    StorageError,
)
from pgfence.flush import FlushResult, flush
from pgfence.guardian import REPORT_EVERY, Guardian
from pgfence.metrics import Metrics
from pgfence.signals import FORWARDED, next_signal
from pgfence.supervisor import Supervisor
from pgfence.timings import Timings
from pgfence.watchdog import Watchdog


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
    flush_dirs: Sequence[str] = (),
    watchdog: tuple[str, int] | None = None,
    guardian: Guardian | None = None,
) -> int:
    if not signals.all_blocked():
        raise RuntimeError("holder.run needs the handled signals blocked (signals.block)")
    metrics = metrics or Metrics("file", timings.mode, timings.deadline)
    hold = backend.acquire(interruptible_sleep)
    metrics.acquired(hold.generation, hold.acquired_clock)
    dog: Watchdog | None = None
    if watchdog:
        try:
            dog = Watchdog(*watchdog)  # armed before anything starts; probed before acquiring
        except StorageError:
            # Nothing started yet; like every release, nothing deleted past the deadline.
            hold.release(lambda: clock.now() - hold.acquired_clock < timings.deadline)
            raise
        log.event(
            "watchdog_armed",
            f"watchdog {dog.device} armed: the machine resets {dog.timeout} s after the "
            "last renewal unless pgfence fences and flushes first",
            device=dog.device,
            timeout=dog.timeout,
        )
    if clock.now() - hold.acquired_clock > timings.deadline:
        # Paused (or stalled on storage) after the acquiring write started: as after any
        # pause past the deadline, the lease may be someone else's by now. Never start
        # the command on it, and leave the lock as it is (a free lock could be taken
        # while a holder we overwrote still runs its server).
        metrics.fenced()
        if dog:
            dog.close(magic=True)  # nothing was started: nothing to reset for
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
    # What the command learns about the fence it runs under (see environment.py).
    env = {**os.environ, **(fence_env or {}), **held_environment(hold, backend.location())}
    renewer = Renewer(hold, timings, metrics, dog)
    try:
        supervisor = Supervisor(list(command), env, user, guardian)
    except CommandError:
        hold.release(renewer.in_time)
        if dog:
            dog.close(magic=True)
        metrics.released()
        raise
    signals.start_thread(renewer)
    log.event(
        "started",
        f"started {command[0]} (pid {supervisor.pid}) holding generation {hold.generation}",
        pid=supervisor.pid,
        generation=hold.generation,
    )

    draining_since: float | None = None
    killed_leftovers = False
    next_report = clock.now() + REPORT_EVERY
    while True:
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
            return _self_fence(supervisor, renewer, reason, flush_dirs, timings, dog)

        if signum in FORWARDED and draining_since is None:
            supervisor.forward(signum)
        if guardian and clock.now() >= next_report:
            # Sessions the command's processes run in, new ones too (pg_ctl starts a
            # server in its own): the guardian kills them all if we die.
            guardian.protect(supervisor.sessions())
            next_report = clock.now() + REPORT_EVERY
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
            if guardian:
                guardian.protect(supervisor.sessions())  # the leftovers', at once
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
    # Every process is gone, but its writes may not be on the storage yet: flush them
    # while the lease is still renewed, and give the lock up only if that finished.
    flushed = flush(flush_dirs, timings.flush_bound)
    reason = renewer.lost or _deadline_passed(renewer, timings)
    if reason:
        metrics.fenced()
        return _self_fence(supervisor, renewer, reason, flush_dirs, timings, dog, flushed)
    renewer.stop()
    if not flushed.ok:
        metrics.fenced()
        return _unflushed(flushed, f"{command[0]} exited with status {status}")
    if dog:
        dog.close(magic=True)  # tree gone and flushed: whatever the release meets now
    metrics.released()
    if hold.release(renewer.in_time):  # like a renewal: nothing deleted past the deadline
        log.event(
            "released",
            f"{command[0]} exited with status {status}; released {backend.location()}",
            status=status,
            lock=backend.location(),
            flush_seconds=round(flushed.seconds, 4),
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
    silent = clock.now() - renewer.last_success
    if silent <= timings.deadline:
        return None
    return (
        f"no lease renewal succeeded for {silent:.2f} s (deadline {timings.deadline:.3g} s); "
        "another instance may take over"
    )


def _self_fence(
    supervisor: Supervisor,
    renewer: Renewer,
    reason: str,
    flush_dirs: Sequence[str],
    timings: Timings,
    dog: Watchdog | None,
    flushed: FlushResult | None = None,
) -> int:
    started = clock.now()
    supervisor.kill_all()  # SIGKILL: a smart shutdown would keep serving for minutes
    renewer.stop(wait=False)
    took = clock.now() - started
    if flushed is None:  # (already flushed when the tree was gone before the fence)
        flushed = flush(flush_dirs, timings.flush_bound)
    if not flushed.ok:
        return _unflushed(flushed, f"{reason}: killed the server's process tree")
    if dog:
        dog.close(magic=True)  # tree gone and flushed: a reset would protect nothing
    log.event(
        "self_fenced",
        f"{reason}: killed the server's process tree in {took * 1000:.0f} "
        f"ms and flushed its writes in {flushed.seconds * 1000:.0f} ms; the lock is "
        "left as it is",
        level="error",
        reason=reason,
        kill_seconds=round(took, 4),
        flush_seconds=round(flushed.seconds, 4),
    )
    return EXIT_SELF_FENCED


def _unflushed(flushed: FlushResult, what: str) -> int:
    """The tree is gone but its writes may not be on the storage: they can still land,
    even after a partition heals. Leave the lock (and an armed watchdog, which resets the
    machine: the only thing that stops them)."""
    log.event(
        "flush_failed",
        f"{what}, but its writes could not be flushed ({flushed.detail}): they may still "
        "reach the storage; the lock is left as it is",
        level="error",
        error=flushed.detail,
        flush_seconds=round(flushed.seconds, 4),
    )
    return EXIT_UNFLUSHED


class Renewer(threading.Thread):
    """Writes heartbeats every `timings.interval`, measured from when each one *started*.

    `last_success` is the start time of the newest renewal that succeeded; the deadline is
    counted from it, because a write that took long may have reached the storage late.
    """

    def __init__(
        self, hold: Hold, timings: Timings, metrics: Metrics, dog: Watchdog | None = None
    ) -> None:
        super().__init__(name="pgfence-renewer", daemon=True)
        self._dog = dog
        self._hold = hold
        self._timings = timings
        self._metrics = metrics
        self._stopping = threading.Event()
        self._main_thread = threading.get_ident()
        self.last_success = hold.acquired_clock
        self.lost: str | None = None

    def in_time(self) -> bool:
        return clock.now() - self.last_success < self._timings.deadline

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
            if self._dog and self.in_time():
                # Only a renewal that also completed within the deadline: the reset then
                # comes by last_success + D + T, inside the takeover wait.
                self._dog.keepalive()

    def _wake_main(self) -> None:
        # SIGCHLD is harmless to the main loop: it just reaps and looks at `lost`.
        signal.pthread_kill(self._main_thread, signal.SIGCHLD)
