"""Contention: N pgfence processes started at once on one free lock (strict mode, the
default, each with its own token): one wins and runs its child, the others exit 73.

"At once": each contender is a shell blocked reading a pipe (`read`, then exec pgfence
as the images start it); once every one of them sleeps in that read, the pipe's write
end is closed and all of them wake up together: t0. The winner's child writes to a FIFO
the benchmark holds open; every contender's exit is seen through a pidfd. All of it is
timestamped in one poll(2) loop on CLOCK_BOOTTIME.

Baseline: the same gate with the bare interpreter (`python3 -I -c pass`) in place of
pgfence, until all have exited: what N interpreters alone cost on this machine's cores.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time

from bench.common import PYTHON, SHELL, Context, boottime, progress, summary
from harness.containers import BASE_PATH

GATE = 'read -r _; exec "$@" </dev/null'
CHILD = 'echo running > "$0"; exec sleep 1000000'
SIZES = (2, 8, 32, 64)


def _waiting_on_pipe(pid: int) -> bool:
    """True once `pid` (still the gate shell) sleeps reading its pipe."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/wchan", encoding="ascii") as f:
            wchan = f.read()
    except OSError:
        return False
    comm = stat[stat.find(b"(") + 1 : stat.rfind(b")")]
    state = stat[stat.rfind(b")") + 2 :].split()[0]
    return comm == b"sh" and state == b"S" and "pipe_read" in wchan


def trial(ctx: Context, size: int, directory: str, baseline: bool = False) -> dict[str, object]:
    """One round of `size` contenders (or, as `baseline`, of bare interpreters)."""
    lock = os.path.join(directory, "fence_lock")
    ready = os.path.join(directory, "ready")
    os.mkfifo(ready)
    ready_fd = os.open(ready, os.O_RDONLY | os.O_NONBLOCK)
    gate_read, gate_write = os.pipe()  # closing the write end opens the gate
    env = {"PATH": BASE_PATH, "LANG": "C.UTF-8", "FENCE_LOCK_FILE": lock}
    procs: list[subprocess.Popen[bytes]] = []
    pidfds: dict[int, subprocess.Popen[bytes]] = {}
    try:
        for i in range(size):
            argv = [SHELL, "-c", GATE, "gate", ctx.launcher, "run", "--token", f"c{i}", "--"]
            argv += [SHELL, "-c", CHILD, ready]
            if baseline:
                argv = [SHELL, "-c", GATE, "gate", PYTHON, "-I", "-c", "pass"]
            proc = ctx.registry.start(
                argv,
                env=env,
                stdin=gate_read,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            procs.append(proc)
            pidfds[os.pidfd_open(proc.pid)] = proc
        os.close(gate_read)
        gate_read = -1
        deadline = time.monotonic() + 30
        while not all(_waiting_on_pipe(p.pid) for p in procs):
            assert time.monotonic() < deadline, "contenders did not reach the gate"
            time.sleep(0.005)

        poller = select.poll()
        poller.register(ready_fd, select.POLLIN)
        for fd in pidfds:
            poller.register(fd, select.POLLIN)
        t0 = boottime()
        os.close(gate_write)
        gate_write = -1
        child_running: float | None = None
        exits: dict[int, float] = {}
        deadline = time.monotonic() + 60
        exiting = size if baseline else size - 1  # every process but the winner
        while len(exits) < exiting or (child_running is None and not baseline):
            assert time.monotonic() < deadline, f"{size} contenders: no outcome in 60 s"
            for fd, _ in poller.poll(1000):
                now = boottime()
                poller.unregister(fd)
                if fd == ready_fd:
                    child_running = now
                else:
                    exits[pidfds[fd].pid] = now
        codes = [p.wait(10) for p in procs if p.pid in exits]
        if baseline:
            assert set(codes) == {0}, sorted(set(codes))
            return {"all_exited": max(exits.values()) - t0}
        running = [p for p in procs if p.pid not in exits]
        assert len(running) == 1 and set(codes) == {73}, (len(running), sorted(set(codes)))
        winner = running[0]
        winner.send_signal(signal.SIGTERM)  # forwarded to its child; the lock is released
        winner.wait(30)
        assert child_running is not None
        return {
            "winner_child_running": child_running - t0,
            "losers_exited": max(exits.values()) - t0,
            "first_loser_exited": min(exits.values()) - t0,
        }
    finally:
        for fd in (ready_fd, gate_read, gate_write, *pidfds):
            if fd >= 0:
                os.close(fd)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)


def run(ctx: Context) -> dict[str, object]:
    trials = ctx.trials(10, 3)
    result: dict[str, object] = {"trials": trials}
    for size in SIZES:
        found = []
        for i in range(trials):
            found.append(trial(ctx, size, ctx.directory(f"contention-{size}-{i}")))
        base = [
            trial(ctx, size, ctx.directory(f"contention-{size}-{i}-bare"), baseline=True)
            for i in range(trials)
        ]
        result[str(size)] = {
            "trials": found,
            "bare_interpreters_exited": summary([float(str(t["all_exited"])) for t in base]),
            "winner_child_running": summary([float(t["winner_child_running"]) for t in found]),
            "losers_exited": summary([float(t["losers_exited"]) for t in found]),
        }
        progress(
            f"contention: {size} contenders, {trials} trials: winner's child running "
            f"{_median_ms(found, 'winner_child_running')} ms, all losers exited "
            f"{_median_ms(found, 'losers_exited')} ms; {size} bare interpreters exited "
            f"{_median_ms(base, 'all_exited')} ms (medians)"
        )
    return result


def _median_ms(trials: list[dict[str, object]], key: str) -> str:
    values = summary([float(str(t[key])) for t in trials])
    return f"{values['median'] * 1000:.0f}"
