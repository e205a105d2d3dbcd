"""The safety matrix's generation invariant on recorded lock histories: it must see a
repeated fencing token, and must not mistake an earlier holder's late write for one."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from harness.invariants import lock_generations


def lock(instance: str, generation: int) -> bytes:
    return f"tok\npgfence-lock 1\ninstance={instance}\ngeneration={generation}\n".encode()


def history(*locks: bytes) -> Any:
    return SimpleNamespace(history=[(float(i), data) for i, data in enumerate(locks)])


def test_a_new_holder_with_a_repeated_generation_is_a_violation() -> None:
    run = history(lock("a", 1), lock("b", 2), lock("c", 2))
    assert lock_generations(run, {"a", "b", "c"}).startswith("VIOLATION")


def test_heartbeats_and_a_rewrite_by_the_same_holder_are_one_holder() -> None:
    run = history(lock("a", 1), lock("a", 1), lock("a", 3), lock("b", 4))
    assert lock_generations(run, {"a", "b"}) == "ok"


def test_an_earlier_holders_late_rename_over_a_newer_lock_hands_out_no_token() -> None:
    # The holder paused between its final check and the rename; the successor fences at
    # its next renewal and the next holder takes a higher generation.
    run = history(lock("a", 1), lock("b", 2), lock("a", 1), lock("c", 3))
    assert lock_generations(run, {"a", "b", "c"}) == "ok"


def test_a_holder_that_never_started_counts_for_nothing() -> None:
    run = history(lock("a", 1), lock("late", 1), lock("b", 2))
    assert lock_generations(run, {"a", "b"}) == "ok"
