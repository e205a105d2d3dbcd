"""Lock records for tests: one complete sample, changed field by field where a test needs."""

from __future__ import annotations

from typing import Any

from pgfence.record import LockRecord

SAMPLE = LockRecord(
    token="db-1",
    instance="5f0c3a9e7b1d2468",
    mode="strict",
    generation=4,
    heartbeat=117,
    interval=2.0,
    ttl=0.0,
    lock_delay=0.0,
    pid=4242,
    host="vm-7",
    boot_id="d7938180-9a0a-43d2-a36a-b74dde36b7c4",
    clock=1031.252,
    acquired_at="2026-11-27T12:41:39Z",
    heartbeat_at="2026-11-27T12:45:33Z",
)


def sample_record(**changes: Any) -> LockRecord:
    """SAMPLE with `changes` applied."""
    return SAMPLE.replace(**changes)


def holder_elsewhere(interval: float) -> LockRecord:
    """A dead strict-mode holder of token db-2 on another machine (another boot id), so a
    reader cannot compute its heartbeat's age and has to watch it."""
    return sample_record(
        token="db-2",
        instance="00112233aabbccdd",
        generation=3,
        heartbeat=9,
        interval=interval,
        pid=12345,
        host="elsewhere",
        boot_id="another-boot",
        clock=5.0,
        acquired_at="2026-01-01T00:00:00Z",
        heartbeat_at="2026-01-01T00:00:09Z",
    )
