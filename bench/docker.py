"""`python -m bench.docker [--quick]`: pgfence's images in a real Docker engine.

On one machine, in one run (so the figures compare):
- failover in real Docker, lease mode: the holder's container is killed (`docker kill`) or
  frozen (`docker pause`), until the waiting container's PostgreSQL answers `select 1`;
  next to the emulated containers' figure (bench/failover.py) at the same TTL;
- `docker run` until the first `select 1`: the pgfence image against the stand-in official
  image it is built on, on a volume both have initialised (a restart, not initdb), trials
  interleaved;
- pgbench TPS under pgfence against the bare stand-in, interleaved rounds on one volume.

Writes bench/DOCKER.md and bench/out/docker.json. Needs root and the Docker engine the tests
use (tests/harness/docker.py starts one if none runs); builds the images as the tests do.
Never part of the tests.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid

from bench import ROOT
from bench.common import OUT, Context, progress, span, summary
from harness import docker as d
from harness import dockerpg as dp
from harness import pg, standins

MAJOR = "15"
TTL = 5.0
PGBENCH = os.path.join(pg.PG_BIN, "pgbench")


class Run:
    """Names of everything one run creates, removed at the end."""

    def __init__(self) -> None:
        self.prefix = f"pgfb-{uuid.uuid4().hex[:6]}"
        self.containers: list[str] = []
        self.volumes: list[str] = []

    def container(self, role: str) -> str:
        name = f"{self.prefix}-{role}-{len(self.containers)}"
        self.containers.append(name)
        return name

    def volume(self, role: str) -> str:
        name = f"{self.prefix}-{role}-{len(self.volumes)}"
        self.volumes.append(name)
        return name

    def cleanup(self) -> None:
        d.remove("container", self.containers)
        d.remove("volume", self.volumes)


def failover(run: Run, image: str, mount: str, how: str, trials: int) -> list[float]:
    lease = {"FENCE_MODE": "lease", "FENCE_LEASE_TTL": f"{TTL:g}"}
    found = []
    for trial in range(trials):
        vol = run.volume(f"fo-{how}")
        holder, contender = run.container("holder"), run.container("contender")
        p1, p2 = pg.free_port(), pg.free_port()
        dp.run(holder, image, vol, mount, p1, env=lease)
        dp.wait_serving(p1, holder)
        dp.run(contender, image, vol, mount, p2, env=lease)
        time.sleep(TTL / 2)  # the contender is watching the lease
        start = time.monotonic()
        d.docker(how, holder)
        dp.wait_serving(p2, contender, timeout=120)
        found.append(time.monotonic() - start)
        progress(f"failover ({how}) trial {trial + 1}: {found[-1]:.2f} s")
        d.remove("container", [holder, contender])
    return found


def emulated_failover(quick: bool, trials: int) -> list[float]:
    from bench import failover as emulated

    ctx = Context(quick=quick)
    try:
        result = emulated.run_file(ctx, TTL, trials)
    finally:
        ctx.close()
    found = result["trials"]
    assert isinstance(found, list)
    return [float(t["ready_after"]) for t in found]


def first_select(
    run: Run, fenced: str, bare: str, mount: str, trials: int
) -> dict[str, list[float]]:
    vol = run.volume("startup")
    port = pg.free_port()
    init = run.container("init")
    dp.run(init, bare, vol, mount, port)
    dp.wait_serving(port, init)
    d.docker("stop", "-t", "60", init, timeout=90)
    found: dict[str, list[float]] = {"pgfence image": [], "stand-in": []}
    for _ in range(trials):
        for label, image in (("pgfence image", fenced), ("stand-in", bare)):
            name = run.container("start")
            start = time.monotonic()
            dp.run(name, image, vol, mount, port)
            dp.wait_serving(port, name)
            found[label].append(time.monotonic() - start)
            d.docker("stop", "-t", "60", name, timeout=90)
            d.remove("container", [name])
    return found


def tps(
    run: Run, fenced: str, bare: str, mount: str, rounds: int, seconds: int
) -> dict[str, list[float]]:
    vol = run.volume("pgbench")
    port = pg.free_port()
    env = {**os.environ, "PGPASSWORD": dp.PASSWORD}
    # Initialised by the plain image (PGDATA at the volume's root), which both images use;
    # the pgfence image on a fresh 13-17 volume would put PGDATA one level down instead.
    init = run.container("init")
    dp.run(init, bare, vol, mount, port)
    dp.wait_serving(port, init)
    d.docker("stop", "-t", "60", init, timeout=90)
    found: dict[str, list[float]] = {"pgfence image": [], "stand-in": []}
    initialised = False
    for _ in range(rounds):
        for label, image in (("pgfence image", fenced), ("stand-in", bare)):
            name = run.container("tps")
            dp.run(name, image, vol, mount, port, args=["-c", "shared_buffers=64MB"])
            dp.wait_serving(port, name)
            base = [PGBENCH, "-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]
            if not initialised:
                subprocess.run([*base, "-i", "-s", "5", "-q", "postgres"], env=env, check=True,
                               capture_output=True, timeout=300)  # fmt: skip
                initialised = True
            done = subprocess.run(
                [*base, "-c", "4", "-j", "2", "-T", str(seconds), "-n", "postgres"],
                env=env, capture_output=True, text=True, timeout=seconds + 120, check=True,
            )  # fmt: skip
            value = next(
                float(line.split("=")[1].split()[0])
                for line in done.stdout.splitlines()
                if line.startswith("tps =")
            )
            found[label].append(value)
            progress(f"pgbench {label}: {value:.0f} tps")
            d.docker("stop", "-t", "60", name, timeout=90)
            d.remove("container", [name])
    return found


def report(results: dict[str, object]) -> str:
    fo = results["failover"]
    st = results["first_select"]
    tp = results["tps"]
    assert isinstance(fo, dict) and isinstance(st, dict) and isinstance(tp, dict)
    w = TTL + TTL / 4
    lines = [
        "# pgfence in a real Docker engine",
        "",
        "Written by `python -m bench.docker` (`scripts/bench --docker`); one run on one machine,",
        f"image docker/Dockerfile on the stand-in postgres:{MAJOR} (tests/harness/standins.py).",
        f"Medians (min{chr(0x2013)}max). Load average at the start: {results['load']}.",
        "",
        f"## Failover, lease mode, TTL {TTL:g} s (takeover wait W = {w:g} s)",
        "",
        "From the holder's kill or freeze until the waiting container's PostgreSQL answers.",
        "",
        "| holder | seconds |",
        "|---|---|",
    ]
    for label, values in fo.items():
        lines.append(f"| {label} | {span(values, 1, 2)} |")
    lines += [
        "",
        "## `docker run` until the first `select 1` (initialised volume)",
        "",
        "| image | seconds |",
        "|---|---|",
    ]
    for label, values in st.items():
        lines.append(f"| {label} | {span(values, 1, 2)} |")
    lines += [
        "",
        "## pgbench TPS (scale 5, 4 clients, TPC-B-like), interleaved rounds",
        "",
        "| server | TPS |",
        "|---|---|",
    ]
    for label, values in tp.items():
        lines.append(f"| {label} | {span(values, 1, 0)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.docker", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer trials and rounds")
    args = parser.parse_args(argv)
    trials = 2 if args.quick else 5
    d.ensure_engine()
    standin = standins.ensure_standin(MAJOR)
    fenced = standins.ensure_image("fence", MAJOR)
    results: dict[str, object] = {"load": [round(x, 2) for x in os.getloadavg()]}
    run = Run()
    try:
        results["failover"] = {
            "docker kill": failover(run, fenced, standin.volume, "kill", trials),
            "docker pause": failover(run, fenced, standin.volume, "pause", trials),
            "emulated container, SIGKILL (bench/failover.py)": emulated_failover(
                args.quick, trials
            ),
        }
        results["first_select"] = first_select(run, fenced, standin.tag, standin.volume, trials * 2)
        results["tps"] = tps(run, fenced, standin.tag, standin.volume, 2 if args.quick else 3,
                             15 if args.quick else 30)  # fmt: skip
    finally:
        run.cleanup()
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "docker.json"), "w", encoding="utf-8") as f:
        json.dump({k: v for k, v in results.items()}, f, indent=1)
    text = report(results)
    with open(os.path.join(ROOT, "bench", "DOCKER.md"), "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    for section in ("failover", "first_select", "tps"):
        value = results[section]
        assert isinstance(value, dict)
        for label, values in value.items():
            print(section, label, summary(values))
    return 0


if __name__ == "__main__":
    sys.exit(main())
