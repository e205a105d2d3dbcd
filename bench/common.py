"""What every benchmark shares: the run context, the clock, statistics, formatting.

`Context` owns the work directory (readable by the postgres user, like the tests' shared
volume), the process registry (every process a benchmark starts is registered there and
killed by pid at the end), the image-style pgfence installation, and the PostgreSQL
cluster template.
"""

from __future__ import annotations

import calendar
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from bench import ROOT
from harness import lease, pg, procs

SRC = os.path.join(ROOT, "src", "pgfence")
OUT = os.path.join(ROOT, "bench", "out")
PYTHON = "/usr/bin/python3"  # the distribution's interpreter, as in the images
SHELL = "/bin/sh"
VENV_PGFENCE = os.path.join(os.path.dirname(sys.executable), "pgfence")
WORK_ROOT = "/tmp"
DASH = "\u2013"  # en dash, between the min and max of a spread


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME: pgfence's clock, comparable across processes."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def wall_boottime(stamp: str, layout: str) -> float:
    """A UTC wall-clock stamp with milliseconds ("...SS.mmm") on CLOCK_BOOTTIME, converted
    with the current wall-minus-boottime offset."""
    whole, millis = stamp.split(".")
    wall = calendar.timegm(time.strptime(whole, layout)) + int(millis) / 1000
    return wall - (time.time() - boottime())


def event_boottime(event: dict[str, object]) -> float:
    """When a pgfence JSON event was logged ("2026-01-01T00:00:00.123Z"), on CLOCK_BOOTTIME."""
    return wall_boottime(str(event["time"]).rstrip("Z"), "%Y-%m-%dT%H:%M:%S")


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median and spread of a sample (empty dict for no values)."""
    if not values:
        return {}
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def span(values: dict[str, float] | Sequence[float], scale: float = 1000.0, digits: int = 0) -> str:
    """The median and (min-max) of a sample or of its `summary`, scaled (default s -> ms)."""
    s = summary(values) if isinstance(values, (list, tuple)) else values
    if not s:
        return "not measured"
    median, lo, hi = (s[k] * scale for k in ("median", "min", "max"))
    return f"{median:.{digits}f} ({lo:.{digits}f}{DASH}{hi:.{digits}f})"


def median(values: dict[str, float] | Sequence[float]) -> float:
    """The median of a sample or of its `summary`."""
    s = summary(values) if isinstance(values, (list, tuple)) else values
    return s["median"]


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Registry(procs.Registry):
    """harness.procs.Registry, safe over a long run: cleanup kills only processes that are
    still registered children (not yet reaped, so their pids cannot have been reused) and
    their descendants and sessions. The pids `track()` records (a sandbox's PID 1) are
    such descendants while they live; once dead, the number may belong to anyone by the
    end of a 20-minute run (pid_max is often 32768), so they are not killed by number."""

    def cleanup(self) -> None:
        self.extra_pids.clear()
        super().cleanup()


@dataclass
class Context:
    quick: bool
    registry: Registry = field(default_factory=Registry)
    work: str = ""
    launcher: str = ""  # pgfence as the images install it: python3 -I + a copy of src
    library: str = ""  # where that copy is (the launcher puts it first on sys.path)
    _template: str | None = None

    def __post_init__(self) -> None:
        self.work = pg.make_shared_dir(
            os.path.join(WORK_ROOT, f"pgfence-bench-{uuid.uuid4().hex[:8]}")
        )
        self.launcher = stage_image(os.path.join(self.work, "image"))
        self.library = os.path.join(self.work, "image", "lib")
        # The emulated containers of harness.lease run pgfence from PGFENCE: make them run
        # this snapshot too, started the way the images start it.
        lease.PGFENCE = self.launcher

    def trials(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def directory(self, name: str) -> str:
        """A fresh directory under the work directory, usable by the postgres user."""
        return pg.make_shared_dir(os.path.join(self.work, name))

    def cluster(self, name: str) -> str:
        """A fresh copy of an initdb'd cluster (data checksums on) in its own directory."""
        if self._template is None:
            progress("initdb of the template cluster")
            template = os.path.join(self.directory("template"), "data")
            pg.initdb(template)
            self._template = template
        datadir = os.path.join(self.directory(name), "data")
        pg.clone_cluster(self._template, datadir)
        return datadir

    def close(self) -> None:
        """Kill every registered process by pid, then remove the work directory."""
        self.registry.cleanup()
        shutil.rmtree(self.work, ignore_errors=True)


def stage_image(directory: str) -> str:
    """Install pgfence the way docker/Dockerfile does: the package copied into a library
    directory, its bytecode compiled by the system python3, and docker/pgfence (a
    `#!/usr/bin/python3 -I` launcher) pointing at it. Returns the launcher's path.

    The copy is a snapshot: a benchmark run measures one version of the code even when
    src/ changes meanwhile."""
    lib = os.path.join(directory, "lib")
    shutil.copytree(
        SRC, os.path.join(lib, "pgfence"), ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    subprocess.run([PYTHON, "-m", "compileall", "-q", lib], check=True, timeout=120)
    with open(os.path.join(ROOT, "docker", "pgfence"), encoding="utf-8") as f:
        text = f.read()
    assert "/usr/local/lib/pgfence" in text, "docker/pgfence no longer names its library"
    launcher = os.path.join(directory, "bin", "pgfence")
    os.makedirs(os.path.dirname(launcher))
    with open(launcher, "w", encoding="utf-8") as f:
        f.write(text.replace("/usr/local/lib/pgfence", lib))
    os.chmod(launcher, 0o755)
    for path in (directory, lib, os.path.dirname(launcher)):
        os.chmod(path, 0o755)
    return launcher
