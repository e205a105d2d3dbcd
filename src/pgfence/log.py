"""Operator-facing events, one line each on stderr, as text or JSON.

Event names are stable (scripts and log pipelines match on them): acquired, waiting,
started, fenced_out (as error), renew_failed, renewed, self_fenced, flush_failed,
draining, released, removed, claim_abandoned, nested, watchdog_armed, watchdog_unused,
guardian_killed, error.
"""

from __future__ import annotations

import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO


class _Sink:
    format = "text"
    stream: TextIO | None = None  # None: whatever sys.stderr is at the time


_sink = _Sink()


def configure(fmt: str, stream: TextIO | None = None) -> None:
    _sink.format = fmt
    _sink.stream = stream


def event(name: str, message: str, level: str = "info", **fields: object) -> None:
    """Emit one event. `message` is the whole story for humans; `fields` are for machines."""
    if _sink.format == "json":
        import json

        now = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
        line = json.dumps(
            {
                "time": f"{stamp}.{int(now % 1 * 1000):03d}Z",
                "level": level,
                "event": name,
                "message": message,
                **fields,
            },
            default=str,
        )
    else:
        line = f"pgfence: {message}"
    stream = _sink.stream or sys.stderr
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must not take the supervisor down with it
