"""Footprint: memory and CPU of an idle pgfence holder at default settings.

Two holders run side by side, started as the images start pgfence, each around `sleep`:
strict mode (the default: heartbeat every 2 s) and lease mode (default TTL 30 s: renewal
every 5 s). After a short settling time, every second, /proc gives each pgfence process's
RSS (VmRSS), PSS (smaps_rollup) and threads; CPU time is the sum of every thread's
on-CPU nanoseconds (/proc/PID/task/*/schedstat), which is exact where utime/stime only
count 10 ms ticks.
"""

from __future__ import annotations

import os
import signal
import time

from bench.common import Context, boottime, progress, summary
from harness.containers import BASE_PATH

SETTLE = 2.0  # seconds after acquisition not counted (start-up is measured elsewhere)
WINDOW = 10  # samples (seconds) per CPU-rate window, for the spread


def _status_kb(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_ns(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat", encoding="ascii") as f:
                total += int(f.read().split()[0])
        except OSError:
            pass  # a thread that ended meanwhile
    return total


def _heartbeat(lock: str) -> int:
    with open(lock, encoding="utf-8") as f:
        for line in f:
            if line.startswith("heartbeat="):
                return int(line.split("=", 1)[1])
    return 0


def run(ctx: Context) -> dict[str, object]:
    seconds = 30.0 if ctx.quick else 300.0
    directory = ctx.directory("footprint")
    holders = {}
    for mode in ("strict", "lease"):
        lock = os.path.join(directory, f"{mode}.lock")
        env = {
            "PATH": BASE_PATH,
            "LANG": "C.UTF-8",
            "FENCE_VARIABLE": f"footprint-{mode}",
            "FENCE_LOCK_FILE": lock,
            "FENCE_MODE": mode,
        }
        proc = ctx.registry.start([ctx.launcher, "run", "--", "sleep", "1000000"], env=env)
        holders[mode] = (proc, lock)
    progress(f"footprint: strict and lease holders, {seconds:g} s of holding")
    deadline = time.monotonic() + 30
    while not all(os.path.exists(lock) for _, lock in holders.values()):
        assert time.monotonic() < deadline, "a footprint holder did not acquire"
        time.sleep(0.01)
    time.sleep(SETTLE)
    start = {m: (boottime(), _cpu_ns(p.pid), _heartbeat(lock)) for m, (p, lock) in holders.items()}
    samples: dict[str, dict[str, list[int]]] = {
        m: {"rss_kb": [], "pss_kb": [], "threads": [], "cpu_ns": [], "at": []} for m in holders
    }
    end_at = boottime() + seconds
    while boottime() < end_at:
        for mode, (proc, _) in holders.items():
            assert proc.poll() is None, f"the {mode} holder exited ({proc.returncode})"
            samples[mode]["rss_kb"].append(_status_kb(proc.pid, "VmRSS"))
            samples[mode]["pss_kb"].append(_pss_kb(proc.pid))
            samples[mode]["threads"].append(len(os.listdir(f"/proc/{proc.pid}/task")))
            samples[mode]["cpu_ns"].append(_cpu_ns(proc.pid))
            samples[mode]["at"].append(int(boottime() * 1e9))
        time.sleep(1.0)
    result: dict[str, object] = {"seconds": seconds}
    for mode, (proc, lock) in holders.items():
        began, cpu0, beat0 = start[mode]
        wall = boottime() - began
        cpu = _cpu_ns(proc.pid) - cpu0
        ns, at = samples[mode]["cpu_ns"], samples[mode]["at"]
        windows = [
            100 * (ns[i + WINDOW] - ns[i]) / (at[i + WINDOW] - at[i])
            for i in range(0, len(ns) - WINDOW, WINDOW)
        ]
        result[mode] = {
            "rss_mb": summary([kb / 1024 for kb in samples[mode]["rss_kb"]]),
            "pss_mb": summary([kb / 1024 for kb in samples[mode]["pss_kb"]]),
            "hwm_mb": _status_kb(proc.pid, "VmHWM") / 1024,
            "threads": max(samples[mode]["threads"]),
            "cpu_seconds": cpu / 1e9,
            "wall_seconds": wall,
            "cpu_percent": 100 * cpu / 1e9 / wall,
            "cpu_percent_windows": summary(windows),
            "renewals": _heartbeat(lock) - beat0,
        }
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    return result
