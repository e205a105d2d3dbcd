"""Failover: the holder's emulated container is SIGKILLed; when does the contender serve?

Two emulated containers (harness.lease.Node: own PID, IPC, UTS and mount namespaces)
run `pgfence run --mode lease -- postgres` on one data directory. Each trial: the holder
serves, a contender starts and waits, then the holder's sandbox PID 1 is SIGKILLed at t0
(the kernel kills everything inside). Measured on CLOCK_BOOTTIME, from t0:

- acquired: file backend, the monotonic time the new lock record carries while its
  heartbeat is 0 (same boot, so exact; the lock is watched every 10 ms); otherwise, and
  for etcd, the contender's `acquired` event (millisecond wall time);
- serving: the first `select 1` the contender's PostgreSQL answered (psql every 20 ms).

Roles then swap: the contender is the next trial's holder. The file backend's lock is
also watched every 10 ms, to see each heartbeat land (for the timeline).
"""

from __future__ import annotations

import os
import random
import threading
import time
import uuid

from bench.common import Context, boottime, event_boottime, progress, wall_boottime
from harness import etcd
from harness.lease import Node, read_lock
from pgfence.errors import PgfenceError
from pgfence.timings import Timings, vanished_lock_delay


class LockWatch:
    """Polls a lock file and records every content change: (boottime, token,
    generation, heartbeat)."""

    def __init__(self, path: str, every: float = 0.01) -> None:
        self.path = path
        self.every = every
        # (seen at, token, generation, heartbeat, the record's own monotonic time)
        self.changes: list[tuple[float, str, int, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LockWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        last = None
        while not self._stop.wait(self.every):
            try:
                record = read_lock(self.path)
            except (OSError, PgfenceError):  # not readable or not a record right now
                continue
            if record is None:
                continue
            key = (record.token, record.generation, record.heartbeat)
            if key != last:
                last = key
                self.changes.append((boottime(), *key, record.clock))

    def beats(self, generation: int) -> list[float]:
        return [seen for seen, _, gen, _, _ in self.changes if gen == generation]

    def acquired(self, generation: int) -> float | None:
        """When `generation` was acquired, as its first record says (heartbeat 0 carries
        the acquisition's own monotonic time; later beats carry theirs)."""
        for _, _, gen, beat, clock in self.changes:
            if gen == generation and beat == 0:
                return clock
        return None


def _trial_loop(
    ctx: Context,
    label: str,
    ttl: float,
    trials: int,
    datadir: str,
    lock: str,
    flags: tuple[str, ...],
    watch: LockWatch | None,
) -> list[dict[str, object]]:
    """Kill the holder `trials` times; `watch` (file backend only) sees the lock."""
    shared = os.path.dirname(datadir)
    timings = Timings.lease(ttl)
    names = (f"{label}-a", f"{label}-b")
    incarnation = 0

    def node(slot: int) -> Node:
        nonlocal incarnation
        incarnation += 1
        n = Node(ctx.registry, names[slot], shared, datadir, incarnation=incarnation)
        return n.start(lock, *flags)

    rng = random.Random(ttl)
    slot = 0
    holder = node(slot)
    holder_started = holder.started_at
    holder_ready = holder.wait_ready(120)
    results = []
    try:
        for i in range(trials):
            contender = node(1 - slot)
            # Let the contender watch a live lease for a while; the random part puts the
            # kill at a random point of the holder's renewal cycle.
            time.sleep(1.5 + rng.uniform(0, timings.interval))
            assert contender.running(), contender.log_text()
            assert not contender.server_pids(), "contender serving while the lease is held"
            before = _generation(lock) if watch else 0
            killed = boottime()
            holder.box.kill()
            ready = contender.wait_ready(2 * ttl + 90)
            acquired_events = contender.events("acquired")
            assert acquired_events, contender.log_text()
            acquired = event_boottime(acquired_events[-1])
            started = contender.events("started")
            trial: dict[str, object] = {
                "killed": killed,
                "holder_started": holder_started,
                "holder_ready": holder_ready,
                "contender_started": contender.started_at,
                "acquired": acquired,
                "server_started": event_boottime(started[-1]) if started else None,
                "ready": ready,
            }
            if watch is not None:
                record = read_lock(lock)
                assert record is not None and record.generation > before
                trial["acquired"] = watch.acquired(record.generation) or acquired
                beats = [t for t in watch.beats(before) if t <= killed]
                trial["heartbeats"] = beats
                trial["last_heartbeat"] = beats[-1] if beats else None
            acquired_at = trial["acquired"]
            assert isinstance(acquired_at, float)
            trial.update(_recovery(contender.log_text()))
            trial["acquired_after"] = acquired_at - killed
            trial["ready_after"] = ready - killed
            results.append(trial)
            progress(
                f"  {label} trial {i + 1}/{trials}: acquired {acquired_at - killed:.2f} s, "
                f"serving {ready - killed:.2f} s after the kill"
            )
            holder, slot = contender, 1 - slot
            holder_started, holder_ready = contender.started_at, ready
    finally:
        if holder.sandbox is not None and holder.running():
            holder.box.kill()
    return results


# PostgreSQL's log lines of a crash recovery, in order (log_line_prefix "%m [%p] ").
RECOVERY_STEPS = {
    "pg_interrupted": "database system was interrupted",
    "pg_recovery": "automatic recovery in progress",
    "pg_ready": "database system is ready to accept connections",
}


def _recovery(log: str) -> dict[str, float]:
    """When the server logged each step of its start, on CLOCK_BOOTTIME. Between the first
    two it fsyncs every file of the data directory (recovery_init_sync_method=fsync)."""
    found = {}
    for line in log.splitlines():
        for key, text in RECOVERY_STEPS.items():
            if text in line and key not in found and line[:2] == "20":
                found[key] = wall_boottime(line[:23], "%Y-%m-%d %H:%M:%S")
    return found


def _generation(lock: str) -> int:
    record = read_lock(lock)
    assert record is not None, f"no lease in {lock}"
    return record.generation


def run_file(ctx: Context, ttl: float, trials: int) -> dict[str, object]:
    datadir = ctx.cluster(f"failover-file-{ttl:g}")
    lock = os.path.join(os.path.dirname(datadir), "fence_lock")
    flags = ("--ttl", f"{ttl:g}")
    with LockWatch(lock) as watch:
        found = _trial_loop(ctx, f"file{ttl:g}", ttl, trials, datadir, lock, flags, watch)
    return _describe("file", ttl, found)


def run_etcd(ctx: Context, ttl: float, trials: int) -> dict[str, object]:
    datadir = ctx.cluster(f"failover-etcd-{ttl:g}")
    cluster = etcd.EtcdCluster(ctx.directory("etcd-failover"), size=3)
    try:
        cluster.start()
        key = f"/pgfence/bench-{uuid.uuid4().hex[:8]}"
        flags = (
            *("--backend", "etcd", "--etcd-endpoints", cluster.endpoints()),
            *("--etcd-key", key, "--ttl", f"{ttl:g}"),
        )
        lock = os.path.join(os.path.dirname(datadir), "unused_lock")
        found = _trial_loop(ctx, f"etcd{ttl:g}", ttl, trials, datadir, lock, flags, None)
    finally:
        cluster.stop()
    return _describe("etcd (3 members)", ttl, found)


def _describe(backend: str, ttl: float, trials: list[dict[str, object]]) -> dict[str, object]:
    # Each backend's default lock delay, as config.resolve gives it: an etcd key can
    # vanish under a live holder, so its contenders wait longer (timings.lock_delay).
    etcd = backend.startswith("etcd")
    timings = Timings.lease(ttl, vanished_lock_delay(ttl) if etcd else None)
    return {
        "backend": backend,
        "ttl": ttl,
        "lock_delay": timings.lock_delay,
        "interval": timings.interval,
        "deadline": timings.deadline,
        "takeover_wait": ttl + timings.lock_delay,
        "trials": trials,
    }


def run(ctx: Context) -> dict[str, object]:
    ttls = (5.0, 10.0) if ctx.quick else (5.0, 10.0, 30.0)
    trials = ctx.trials(10, 3)
    scenarios = []
    for ttl in ttls:
        progress(f"failover: file backend, TTL {ttl:g} s, {trials} trials")
        scenarios.append(run_file(ctx, ttl, trials))
    if etcd.available():
        progress(f"failover: etcd backend (3 members), TTL 10 s, {trials} trials")
        scenarios.append(run_etcd(ctx, 10.0, trials))
    return {"scenarios": scenarios}
