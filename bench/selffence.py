"""Self-fence latency: how fast a holder that lost its lease stops its PostgreSQL.

One emulated container runs `pgfence run --mode lease --ttl 5 -- postgres`. At a random
point of its renewal cycle one fault is injected:

- stolen: the lock is rewritten by another token (temp file + rename); the holder finds
  it at its next renewal (within one renewal interval, TTL/6);
- read-only: the lock's filesystem (a tiny tmpfs) is remounted read-only; renewals fail
  and the holder fences at its deadline, TTL/2 after its last successful renewal began;
- frozen: the whole container is frozen with the cgroup freezer (as `docker pause`) for
  longer than the deadline, then thawed; the holder fences on waking.

Every process of the server is watched with a pidfd (harness.etcd.DeathWatch), which
timestamps its exit on CLOCK_BOOTTIME. "Detection" is when pgfence decided to fence:
its `self_fenced` event's time minus the kill time it reports (millisecond resolution).
"""

from __future__ import annotations

import os
import random
import time
from typing import Callable

from bench.common import Context, boottime, event_boottime, progress
from harness.etcd import DeathWatch
from harness.lease import Freezer, Node, Tmpfs, freeze_with_signals, read_lock, steal_lock
from pgfence.timings import Timings

TTL = 5.0


def _trial(
    ctx: Context,
    name: str,
    datadir: str,
    lock: str,
    incarnation: int,
    inject: Callable[[Node], float],
    flags: tuple[str, ...] = (),
) -> dict[str, object]:
    timings = Timings.lease(TTL)
    shared = os.path.dirname(datadir)
    node = Node(ctx.registry, name, shared, datadir, incarnation=incarnation)
    node.start(lock, "--ttl", f"{TTL:g}", *flags)
    try:
        node.wait_ready(120)
        time.sleep(timings.interval * (1 + random.random()))
        tree = node.server_pids()
        watches = [DeathWatch(pid) for pid in tree]
        event = inject(node)
        deaths = [w.wait(60) for w in watches]
        assert None not in deaths, f"{name}: a server process outlived the fault"
        gone = max(d for d in deaths if d is not None)
        status = node.wait_exit(60)
        fenced = node.events("self_fenced")
        assert status == 75 and fenced, f"{name}: exit {status}\n{node.log_text()}"
        kill_seconds = float(str(fenced[-1]["kill_seconds"]))
        detected = event_boottime(fenced[-1]) - kill_seconds
        return {
            "event": event,
            "detected": detected,
            "gone": gone,
            "processes": len(tree),
            "kill_seconds": kill_seconds,
            "reason": fenced[-1]["reason"],
            "event_to_gone": gone - event,
            "detection_to_gone": gone - detected,
            "event_to_detection": detected - event,
        }
    finally:
        if node.running():
            node.box.kill()


def stolen(ctx: Context, trials: int) -> list[dict[str, object]]:
    datadir = ctx.cluster("selffence-stolen")
    lock = os.path.join(os.path.dirname(datadir), "fence_lock")

    def steal(_node: Node) -> float:
        steal_lock(lock, "record")
        return boottime()

    found = []
    for i in range(trials):
        found.append(_trial(ctx, "stolen", datadir, lock, i, steal))
        os.unlink(lock)  # the thief's lease: nobody holds it
        _report("stolen", i, trials, found[-1])
    return found


def read_only(ctx: Context, trials: int) -> list[dict[str, object]]:
    datadir = ctx.cluster("selffence-readonly")
    deadline = Timings.lease(TTL).deadline
    assert deadline is not None
    fs = Tmpfs(os.path.join(os.path.dirname(datadir), "lockfs"))
    lock = os.path.join(fs.path, "fence_lock")

    def remount(_node: Node) -> float:
        fs.read_only(True)
        return boottime()

    found = []
    try:
        for i in range(trials):
            other_fs = ("--allow-other-filesystem",)
            trial = _trial(ctx, "readonly", datadir, lock, i, remount, other_fs)
            last = read_lock(lock)  # the last heartbeat that reached the storage
            assert last is not None
            gone = trial["gone"]
            assert isinstance(gone, float)
            trial["deadline"] = last.clock + deadline
            trial["deadline_to_gone"] = gone - (last.clock + deadline)
            found.append(trial)
            fs.read_only(False)
            os.unlink(lock)  # the dead holder's lease
            _report("read-only", i, trials, trial)
    finally:
        fs.unmount()
    return found


def frozen(ctx: Context, trials: int) -> tuple[str, list[dict[str, object]]]:
    datadir = ctx.cluster("selffence-frozen")
    lock = os.path.join(os.path.dirname(datadir), "fence_lock")
    deadline = Timings.lease(TTL).deadline
    assert deadline is not None
    freezer = Freezer("bench") if Freezer.available() else None
    method = "cgroup freezer" if freezer else "SIGSTOP/SIGCONT"

    def freeze_and_thaw(node: Node) -> float:
        if freezer:
            freezer.freeze(node.box)
        else:
            freeze_with_signals(node.box)
        time.sleep(deadline + 1.0)
        thawed = boottime()
        if freezer:
            freezer.thaw()
        else:
            node.box.continue_all()
        return thawed

    found = []
    try:
        for i in range(trials):
            found.append(_trial(ctx, "frozen", datadir, lock, i, freeze_and_thaw))
            os.unlink(lock)
            _report("frozen", i, trials, found[-1])
    finally:
        if freezer:
            freezer.remove()
    return method, found


def _report(kind: str, i: int, trials: int, trial: dict[str, object]) -> None:
    detection = trial["detection_to_gone"]
    event = trial["event_to_gone"]
    assert isinstance(detection, float) and isinstance(event, float)
    progress(
        f"  {kind} trial {i + 1}/{trials}: server gone {event * 1000:.0f} ms after the "
        f"event, {detection * 1000:.0f} ms after detection"
    )


def run(ctx: Context) -> dict[str, object]:
    trials = ctx.trials(10, 3)
    timings = Timings.lease(TTL)
    progress(f"self-fence: stolen, read-only, frozen; TTL {TTL:g} s, {trials} trials each")
    method, frozen_trials = frozen(ctx, trials)
    return {
        "ttl": TTL,
        "interval": timings.interval,
        "deadline": timings.deadline,
        "freeze_method": method,
        "stolen": stolen(ctx, trials),
        "read-only": read_only(ctx, trials),
        "frozen": frozen_trials,
    }
