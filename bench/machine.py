"""What the benchmarks ran on and which code they measured."""

from __future__ import annotations

import os
import platform
import subprocess
import time

from bench import ROOT
from bench.common import PYTHON, load_average
from harness import etcd, pg


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"unavailable ({exc.strerror})"
    return (done.stdout or done.stderr).strip().splitlines()[0] if done.returncode == 0 else "?"


def _cpu_model() -> str:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _memory() -> str:
    with open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return "unknown"


def _code() -> str:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=30
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "src")
    changed = len(dirty.splitlines())
    return commit + (f" + uncommitted changes in {changed} file(s) under src/" if dirty else "")


def describe() -> dict[str, object]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory": _memory(),
        "kernel": platform.release(),
        "python": _first_line([PYTHON, "--version"]) + f" ({PYTHON})",
        "postgresql": _first_line([os.path.join(pg.PG_BIN, "postgres"), "--version"]),
        "etcd": _first_line([etcd.ETCD, "--version"]),
        "code": _code(),
        "load_start": load_average(),
    }
