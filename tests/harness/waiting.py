"""Waiting for a condition, never for a fixed time: the one poll loop every test uses."""

from __future__ import annotations

import time
from typing import Callable, Literal, TypeVar

T = TypeVar("T")


def wait_for(
    predicate: Callable[[], T | Literal[False] | None],
    what: str,
    timeout: float = 30.0,
    interval: float = 0.02,
) -> T:
    """Call `predicate` every `interval` seconds until it returns something truthy, and
    return that (so not None nor False); fail after `timeout` seconds, saying it was
    waiting for `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
