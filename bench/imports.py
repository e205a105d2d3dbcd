"""Import budget: `python3 -I -X importtime` of each command path, and where the rest goes.

Each path runs several times; per module the median self and cumulative times are kept.
"Added" is what a path imports beyond the bare interpreter's own start-up modules.

Two checks of what the profile suggests:
- module costs: wall time of `python3 -I -c "import X"`, interleaved with `-c pass`, for
  the standard library modules that pgfence modules import themselves and that cost most
  on the `run` path (found in its profile): what not importing X could save at most
  (modules share dependencies, so the savings do not add up);
- `run` after its imports: `pgfence.cli.main` under cProfile (inflated by the profiler,
  but it shows which calls the remaining time goes to).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
from collections.abc import Sequence

from bench.common import PYTHON, Context, progress, summary
from bench.startup import Fixture, timed

# Runs `pgfence run` in-process: imports timed, then main() under cProfile.
# pgfence.cli is imported before cProfile and pstats, which import typing, dataclasses and
# re themselves and would hide their cost.
PROFILED_RUN = """
import sys, time
sys.path.insert(0, sys.argv[1])
began = time.perf_counter()
from pgfence import cli
imported = time.perf_counter()
import cProfile, json, pstats
profiler = cProfile.Profile()
profiler.enable()
status = cli.main(["pgfence", "run", "--", "/bin/true"])
profiler.disable()
done = time.perf_counter()
stats = pstats.Stats(profiler).stats
rows = [(f"{fn[0].rsplit('/', 1)[-1]}:{fn[2]}", tt, ct, nc)
        for fn, (_, nc, tt, ct, _) in stats.items()]
json.dump({"status": status, "imports": imported - began, "main": done - imported,
           "top": sorted(rows, key=lambda r: -r[1])[:12],
           "cumulative": sorted((r for r in rows if r[2] >= 5e-5), key=lambda r: -r[2])},
          sys.stdout)
"""

# module -> (self us, cumulative us, nesting depth)
Profile = dict[str, tuple[int, int, int]]


def parse(stderr: str) -> Profile:
    """Lines of `import time: self [us] | cumulative | imported package`."""
    found: Profile = {}
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "imported package" in line:
            continue
        fields = line[len("import time:") :].split("|")
        if len(fields) != 3:
            continue
        name = fields[2].rstrip()
        depth = (len(name) - len(name.lstrip())) // 2
        found[name.strip()] = (int(fields[0]), int(fields[1]), depth)
    return found


def profile(argv: Sequence[str], env: dict[str, str], runs: int) -> Profile:
    """Per module, the median over `runs` of self and cumulative microseconds."""
    runs_seen: list[Profile] = []
    for _ in range(runs):
        done = subprocess.run(
            [PYTHON, "-I", "-X", "importtime", *argv],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{list(argv)} exited {done.returncode}: {done.stderr[-500:]}")
        runs_seen.append(parse(done.stderr))
    merged: Profile = {}
    for name in runs_seen[-1]:
        values = [p[name] for p in runs_seen if name in p]
        merged[name] = (
            int(statistics.median(v[0] for v in values)),
            int(statistics.median(v[1] for v in values)),
            values[0][2],
        )
    return merged


def direct_imports(prof: Profile, bare: set[str]) -> list[list[object]]:
    """[module, cumulative us, importer] of each standard library module that a pgfence
    module imports itself (where it is first imported), heaviest first. In importtime's
    output a module's importer is the next line one level less indented."""
    entries = list(prof.items())
    found: list[list[object]] = []
    for i, (name, (_, cumulative, depth)) in enumerate(entries):
        if name.startswith("pgfence") or name in bare:
            continue
        parent = next((n for n, v in entries[i + 1 :] if v[2] == depth - 1), "")
        if parent.startswith("pgfence"):
            found.append([name, cumulative, parent])
    return sorted(found, key=lambda row: -int(str(row[1])))


def module_costs(fixture: Fixture, modules: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Wall seconds of `python3 -I -c "import X"` for each module, all of them together,
    and `-c pass`, interleaved."""
    env = fixture.env(fixture.lock("none"))
    codes = {"pass": "pass", **{m: f"import {m}" for m in modules}}
    if len(modules) > 1:
        codes["all of the above"] = f"import {', '.join(modules)}"
    samples: dict[str, list[float]] = {name: [] for name in codes}
    rng = random.Random(9)
    for round_ in range(rounds + 3):
        order = list(codes.items())
        rng.shuffle(order)
        for name, code in order:
            seconds, _ = timed([PYTHON, "-I", "-c", code], env)
            if round_ >= 3:
                samples[name].append(seconds)
    return {name: summary(values) for name, values in samples.items()}


def profile_run(fixture: Fixture, runs: int) -> list[dict[str, object]]:
    found = []
    for _ in range(runs):
        done = subprocess.run(
            [PYTHON, "-I", "-c", PROFILED_RUN, fixture.library],
            env=fixture.env(fixture.lock("profiled")),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"profiled run failed: {done.stderr[-500:]}")
        found.append(json.loads(done.stdout))
    return found


def run(ctx: Context, fixture: Fixture) -> dict[str, object]:
    runs = ctx.trials(9, 3)
    shim = os.path.join(fixture.shims["image"], "postgres")
    paths = {
        "bare interpreter": (["-c", "pass"], fixture.env(fixture.lock("none"))),
        "run": ([fixture.launcher, "run", "--", "/bin/true"], fixture.env(fixture.lock("imp"))),
        "check": ([fixture.launcher, "check"], fixture.env(fixture.held)),
        "status": ([fixture.launcher, "status"], fixture.env(fixture.held)),
        "shim passthrough (postgres --version)": (
            [shim, "--version"],
            fixture.env(fixture.held, fixture.shims["image"]),
        ),
    }
    progress(f"import budget: {len(paths)} command paths, {runs} runs each")
    profiles = {name: profile(argv, env, runs) for name, (argv, env) in paths.items()}
    bare = set(profiles["bare interpreter"])
    result: dict[str, object] = {"runs": runs}
    for name, prof in profiles.items():
        added = {m: v for m, v in prof.items() if m not in bare}
        result[name] = {
            "modules": len(prof),
            "total_self_us": sum(v[0] for v in prof.values()),
            "added_modules": len(added),
            "added_self_us": sum(v[0] for v in added.values()),
            "top_cumulative": sorted(
                ([m, v[1], v[0]] for m, v in prof.items()), key=lambda r: -r[1]
            )[:10],
            "top_self": sorted(([m, v[0], v[1]] for m, v in prof.items()), key=lambda r: -r[1])[
                :10
            ],
            "direct_stdlib": direct_imports(prof, bare),
            "profile": prof,
        }
    heavy = [
        str(row[0])
        for row in direct_imports(profiles["run"], bare)
        if int(str(row[1])) >= 300  # microseconds
    ][:6]
    progress(f"import budget: {', '.join(heavy)} alone; `run` under cProfile")
    result["module_costs"] = module_costs(fixture, heavy, ctx.trials(40, 15))
    result["profiled_run"] = profile_run(fixture, ctx.trials(5, 3))
    return result
