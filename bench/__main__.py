"""`python -m bench [--quick] [--only SECTION ...] [--report-only]`

Runs the benchmarks in order, saves raw results in bench/out/results.json after each
section, then writes bench/RESULTS.md and bench/failover-timeline.png. Every process a
benchmark starts is killed by pid at the end, also on Ctrl-C, SIGTERM or an exception.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import time
from typing import Callable

from bench import machine, report
from bench.common import OUT, Context, boottime, load_average, progress

SECTIONS = ("startup", "imports", "failover", "selffence", "footprint", "contention")
RESULTS = os.path.join(OUT, "results.json")


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _runner(name: str) -> Callable[[Context, dict[str, object]], dict[str, object]]:
    """The section's entry point, imported only when it runs."""
    if name in ("startup", "imports"):

        def shared(ctx: Context, cache: dict[str, object]) -> dict[str, object]:
            from bench import imports, startup

            if "fixture" not in cache:
                cache["fixture"] = startup.Fixture(ctx)
            fixture = cache["fixture"]
            assert isinstance(fixture, startup.Fixture)
            return (startup if name == "startup" else imports).run(ctx, fixture)

        return shared
    module = importlib.import_module(f"bench.{name}")

    def alone(ctx: Context, _cache: dict[str, object]) -> dict[str, object]:
        result = module.run(ctx)
        assert isinstance(result, dict)
        return result

    return alone


def load() -> dict[str, object]:
    try:
        with open(RESULTS, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return {"sections": {}}
    assert isinstance(data, dict)
    return data


def save(results: dict[str, object]) -> None:
    os.makedirs(OUT, exist_ok=True)
    temp = RESULTS + ".tmp"
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(temp, RESULTS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, shorter holds")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTIONS,
        metavar="SECTION",
        help=f"run only these ({', '.join(SECTIONS)}); others keep their saved results",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite RESULTS.md from saved results"
    )
    args = parser.parse_args(argv)
    if args.report_only:
        report.write(load())
        return 0
    if os.geteuid() != 0:
        print("the benchmarks need root (namespaces, mounts, the postgres user)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    results = load() if args.only else {"sections": {}}
    results["machine"] = machine.describe()
    sections = results["sections"]
    assert isinstance(sections, dict)
    began = time.monotonic()
    ctx = Context(quick=args.quick)
    cache: dict[str, object] = {}
    try:
        for name in args.only or SECTIONS:
            progress(f"== {name} ({'quick' if args.quick else 'full'})")
            load_before, started = load_average(), boottime()
            result = _runner(name)(ctx, cache)
            sections[name] = {
                "quick": args.quick,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "load_before": load_before,
                "load_after": load_average(),
                "seconds": round(boottime() - started, 1),
                "result": result,
            }
            save(results)
    except KeyboardInterrupt:
        progress("interrupted; results of the finished sections are in " + RESULTS)
        return 130
    finally:
        progress("stopping every process the benchmarks started")
        ctx.close()
    machine_info = results["machine"]
    assert isinstance(machine_info, dict)
    machine_info["load_end"] = load_average()
    machine_info["total_seconds"] = round(time.monotonic() - began)
    machine_info["quick"] = args.quick
    save(results)
    report.write(results)
    progress(f"wrote {report.RESULTS_MD} and {report.TIMELINE_PNG}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
