"""The command the safety explorer runs under the fence: it notices a second copy of itself.

    python3 oracle.py RUN_DIR [--once]

On start it takes a non-blocking exclusive flock(2) on RUN_DIR/oracle.lock (outside the
lock's directory): if it cannot, another command runs under the fence at the same moment,
and it says so in its log. The kernel drops the flock when the process dies, however it
dies, so the check needs no cooperation from the process that was there first.

It logs to RUN_DIR/oracle-<pid>.log: `start <monotonic> <generation> <instance>
<flock ok|busy>`, then `beat <monotonic>` every BEAT seconds until it is killed, or
`stop <monotonic>` when SIGTERM asks it to exit (status 0). With --once it exits at once
after the start line (a probe that the lock can be acquired). All hosts here are one
machine, so CLOCK_MONOTONIC readings of the oracles and of the explorer compare.
"""

from __future__ import annotations

import fcntl
import os
import signal
import sys
import time

BEAT = 0.01


def main(argv: list[str]) -> int:
    run_dir = argv[1]
    once = "--once" in argv[2:]
    log = open(os.path.join(run_dir, f"oracle-{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    guard = os.open(os.path.join(run_dir, "oracle.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
        got = "ok"
    except BlockingIOError:
        got = "busy"
    generation = os.environ.get("PGFENCE_GENERATION", "?")
    instance = os.environ.get("PGFENCE_INSTANCE", "?")
    log.write(f"start {time.monotonic():.6f} {generation} {instance} {got}\n")
    if once:
        log.write(f"stop {time.monotonic():.6f}\n")
        return 0
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping:
        log.write(f"beat {time.monotonic():.6f}\n")
        time.sleep(BEAT)
    log.write(f"stop {time.monotonic():.6f}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
