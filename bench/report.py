"""bench/RESULTS.md and bench/failover-timeline.png from the saved results."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from bench import ROOT, targets, timeline
from bench.common import DASH, median, span, summary

RESULTS_MD = os.path.join(ROOT, "bench", "RESULTS.md")
TIMELINE_PNG = os.path.join(ROOT, "bench", "failover-timeline.png")
Result = Mapping[str, Any]


def _load(values: list[float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values)


def _header(results: Result) -> list[str]:
    m = results.get("machine", {})
    sections = results.get("sections", {})
    quick = any(s.get("quick") for s in sections.values())
    kind = (
        "a **quick run** (`--quick`: 3 trials instead of 10, failover TTLs 5 and 10 s only, "
        "30 s of holding instead of 5 minutes)"
        if quick
        else "a **full run**"
    )
    minutes = m.get("total_seconds", 0) / 60
    lines = [
        "# pgfence benchmarks",
        "",
        f"Written by `scripts/bench` on {m.get('date', '?')}: {kind}, {minutes:.0f} min.",
        "Re-run as root with `scripts/bench` (full) or `scripts/bench --quick`.",
        "",
        "> **These timings are noisy.** They come from a shared 2-core VM on which other",
        "> engineers ran test suites at the same time: load average "
        f"{_load(m.get('load_start', []))} (1/5/15 min) at the start,",
        f"> {_load(m.get('load_end', []))} at the end, right after the contention section, which "
        "itself starts up to 64",
        "> processes at once (each section's own is listed below).",
        "> Every figure is a median with its min" + DASH + "max over interleaved or repeated",
        "> trials: an indication, not a guarantee.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    for label, key in (
        ("CPU", "cpu"),
        ("cores", "cores"),
        ("memory", "memory"),
        ("kernel", "kernel"),
        ("python", "python"),
        ("PostgreSQL", "postgresql"),
        ("etcd", "etcd"),
        ("code measured", "code"),
    ):
        lines.append(f"| {label} | {m.get(key, '?')} |")
    lines += [
        f"| load average at start | {_load(m.get('load_start', []))} |",
        f"| load average at end | {_load(m.get('load_end', []))} |",
        "",
        "| section | run | when | took | load average before " + DASH + " after (1 min) |",
        "|---|---|---|---|---|",
    ]
    for name, s in sections.items():
        lines.append(
            f"| {name} | {'quick' if s['quick'] else 'full'} | {s['date']} | {s['seconds']:.0f} s "
            f"| {s['load_before'][0]:.2f} {DASH} {s['load_after'][0]:.2f} |"
        )
    return [*lines, ""]


def _targets(verdicts: list[targets.Verdict]) -> list[str]:
    lines = [
        "## Targets",
        "",
        "Reported, not asserted. Measured values are medians with (min" + DASH + "max).",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for v in verdicts:
        met = "not measured" if v.met is None else ("yes" if v.met else "**no**")
        lines.append(f"| {v.target} | {v.measured} | {met} |")
    missed = [v for v in verdicts if v.met is False]
    if missed:
        lines += ["", "### Missed targets: why, and what would close them", ""]
        seen: set[str] = set()
        for v in missed:
            lines.append(f"**{v.target}** ({v.measured}).")
            if v.why in seen:
                lines += ["Same cause and remedy as above.", ""]
                continue
            seen.add(v.why)
            lines += ["", f"- Why: {v.why}", f"- What would close it: {v.close}", ""]
    return [*lines, ""]


def _findings(found: list[str]) -> list[str]:
    if not found:
        return []
    lines = ["### Other costs worth fixing", ""]
    for finding in found:
        lines += [f"- {finding}"]
    return [*lines, ""]


def _startup(result: Result | None, sections: Result) -> list[str]:
    if result is None:
        return []
    samples = result["samples"]
    bare = median(samples["bare interpreter"])
    shell = median(samples["shell lock script"])
    run = median(samples["run (image launcher)"])
    lines = [
        "## Start-up",
        "",
        f"Wall time from posix_spawn to exit, {result['rounds']} rounds; each round runs "
        f"every command once in a new random order ({result['warmup_rounds']} warm-up rounds "
        "discarded); stdio on /dev/null. *image launcher*: pgfence installed as the images "
        "install it (`#!/usr/bin/python3 -I` launcher, package copied and byte-compiled); "
        "*venv script*: `.venv/bin/pgfence` (editable install). The shell lock script is "
        "the fence pgfence replaces: `test -f`, compare the token, `echo token > file`, "
        "`exec`.",
        "",
        "| command | ms, median (min" + DASH + "max) | x bare interpreter |",
        "|---|---|---|",
    ]
    for name, values in samples.items():
        lines.append(f"| {name} | {span(values, digits=1)} | {median(values) / bare:.2f} |")
    lines += [
        "",
        f"`pgfence run -- true` (image launcher) costs {(run - bare) * 1000:.1f} ms more than "
        f"the bare interpreter and {(run - shell) * 1000:.1f} ms more than the shell lock "
        f"script; ratio to the interpreter {run / bare:.2f}.",
        "",
    ]
    analysis = targets.startup_analysis(sections)
    if analysis:
        lines += [
            f"**Where the time goes.** {analysis[0]}",
            "",
            f"**What would make it cheaper.** {analysis[1]}",
            "",
        ]
    return lines


def _imports(result: Result | None) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Import budget",
        "",
        f"`python3 -I -X importtime` of each command path (image launcher), {result['runs']} "
        "runs, per module the median. *Added*: modules beyond those the bare interpreter "
        "imports itself (`site`, `encodings`, ...).",
        "",
        "| path | modules | import time, sum of self (ms) | added modules | added (ms) |",
        "|---|---|---|---|---|",
    ]
    paths = [k for k, v in result.items() if isinstance(v, dict) and "profile" in v]
    for path in paths:
        p = result[path]
        lines.append(
            f"| {path} | {p['modules']} | {p['total_self_us'] / 1000:.1f} | "
            f"{p['added_modules']} | {p['added_self_us'] / 1000:.1f} |"
        )
    for path in paths[1:]:
        p = result[path]
        lines += [
            "",
            f"Slowest imports of **{path}** (ms):",
            "",
            "| # | cumulative | ms | self | ms |",
            "|---|---|---|---|---|",
        ]
        for i, (cum, own) in enumerate(zip(p["top_cumulative"], p["top_self"]), 1):
            lines.append(
                f"| {i} | `{cum[0]}` | {cum[1] / 1000:.2f} | `{own[0]}` | {own[1] / 1000:.2f} |"
            )
    costs = result.get("module_costs")
    if costs:
        base = median(costs["pass"])
        lines += [
            "",
            "What single standard library modules add to `python3 -I -c pass` "
            f"({base * 1000:.1f} ms), wall time, interleaved (modules share dependencies: "
            "the savings do not add up):",
            "",
            "| `python3 -I -c` | ms added, median |",
            "|---|---|",
        ]
        for name, value in costs.items():
            if name != "pass":
                lines.append(f"| `{name}` | {(median(value) - base) * 1000:.1f} |")
    profiled = result.get("profiled_run")
    if profiled:
        main = summary([r["main"] for r in profiled])
        imported = summary([r["imports"] for r in profiled])
        lines += [
            "",
            "`pgfence run -- true` in one process: importing `pgfence.cli` "
            f"{span(imported, digits=1)} ms, then `main()` under cProfile "
            f"{span(main, digits=1)} ms (the profiler inflates it). Own time of its "
            "costliest calls in the first run (ms):",
            "",
            "| call | calls | own | cumulative |",
            "|---|---|---|---|",
        ]
        for name, own, cum, calls in profiled[0]["top"][:8]:
            lines.append(
                f"| `{name.replace('|', '/')}` | {calls} | {own * 1000:.2f} | {cum * 1000:.2f} |"
            )
        lines += [
            "",
            "(`read` of a BufferedReader is mostly `supervisor._spawn` waiting on its "
            "close-on-exec pipe until the child has exec'd.)",
        ]
    return [*lines, ""]


def _failover(result: Result | None, picture: bool) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Failover",
        "",
        "Lease mode, two emulated containers (PID, IPC, UTS and mount namespaces) running "
        "`pgfence run -- postgres` on one data directory; the holder's container is SIGKILLed "
        "at t0 while the contender waits. *Takeover*: file backend, the monotonic time the "
        "new lock record carries (heartbeat 0); etcd, the contender's `acquired` event. "
        "*Serving*: the first `select 1` answered (psql every 20 ms). *Silence seen*: takeover "
        "minus the last "
        "heartbeat that landed in the lock file (watched every 10 ms); it must be at least "
        "TTL + lock-delay. *Data directory fsync*: from PostgreSQL's log, the time between "
        '"database system was interrupted" and "automatic recovery in progress", in which '
        "it fsyncs every file of the data directory (`recovery_init_sync_method=fsync`): "
        "this VM's disk, shared with the other test suites and, in the etcd rows, with "
        "three etcd members fsyncing their WAL. Seconds; takeover and serving after t0.",
        "",
        "| backend | TTL | lock-delay | TTL + lock-delay | takeover | serving | silence seen "
        "| PostgreSQL start + recovery | of which data directory fsync | trials |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["scenarios"]:
        trials = s["trials"]
        silences = [t["acquired"] - t["last_heartbeat"] for t in trials if t.get("last_heartbeat")]
        recovery = [t["ready"] - t["acquired"] for t in trials]
        syncs = [t["pg_recovery"] - t["pg_interrupted"] for t in trials if "pg_recovery" in t]
        lines.append(
            f"| {s['backend']} | {s['ttl']:g} | {s['lock_delay']:g} | {s['takeover_wait']:g} | "
            f"{span([t['acquired_after'] for t in trials], 1, 2)} | "
            f"{span([t['ready_after'] for t in trials], 1, 2)} | "
            f"{span(silences, 1, 2) if silences else 'n/a'} | {span(recovery, 1, 2)} | "
            f"{span(syncs, 1, 2) if syncs else 'n/a'} | {len(trials)} |"
        )
    if picture:
        lines += ["", "![One failover, step by step](failover-timeline.png)"]
    return [*lines, ""]


def _selffence(result: Result | None) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Self-fence",
        "",
        f"Lease mode, TTL {result['ttl']:g} s (renewal every {result['interval'] * 1000:.0f} "
        f"ms, deadline {result['deadline']:g} s), one emulated container running PostgreSQL. "
        "*stolen*: the lock rewritten by another token; *read-only*: the lock's tmpfs "
        "remounted read-only (the holder fences at its deadline); *frozen*: the container "
        f"frozen ({result['freeze_method']}) for the deadline + 1 s, then thawed. Exits of "
        "every server process timestamped with pidfds; *detection* is pgfence's "
        "`self_fenced` event time minus the kill time it reports (1 ms resolution, so "
        "a thaw can seem to follow its detection by a fraction of a millisecond). The "
        "event is the theft, the remount, the thaw. Milliseconds.",
        "",
        "| fault | event to detection | detection to last process gone | event to last "
        "process gone | deadline to last process gone | pgfence's kill time | trials |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in ("stolen", "read-only", "frozen"):
        trials = result[kind]
        deadline = [t["deadline_to_gone"] for t in trials if "deadline_to_gone" in t]
        lines.append(
            f"| {kind} | {span([t['event_to_detection'] for t in trials], digits=1)} | "
            f"{span([t['detection_to_gone'] for t in trials], digits=1)} | "
            f"{span([t['event_to_gone'] for t in trials])} | "
            f"{span(deadline, digits=1) if deadline else 'n/a'} | "
            f"{span([t['kill_seconds'] for t in trials], digits=1)} | {len(trials)} |"
        )
    return [*lines, ""]


def _footprint(result: Result | None) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Footprint",
        "",
        f"Idle holders around `sleep`, image launcher, default settings, {result['seconds']:g} s "
        "of holding after 2 s of settling, sampled every second. CPU from every thread's "
        "schedstat (ns).",
        "",
        "| mode | RSS (MB) | PSS (MB) | peak RSS (MB) | threads | CPU, whole hold | CPU, 10 s "
        "windows | renewals |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, label in (("strict", "strict (heartbeat 2 s)"), ("lease", "lease (TTL 30 s)")):
        r = result[mode]
        lines.append(
            f"| {label} | {span(r['rss_mb'], 1, 1)} | {span(r['pss_mb'], 1, 1)} | "
            f"{r['hwm_mb']:.1f} | {r['threads']} | {r['cpu_percent']:.3f}% | "
            f"{span(r['cpu_percent_windows'], 1, 3)}% | {r['renewals']} |"
        )
    return [*lines, ""]


def _contention(result: Result | None) -> list[str]:
    if result is None:
        return []
    lines = [
        "## Contention",
        "",
        "N contenders (strict mode, own tokens, image launcher) released at once from a "
        "pipe gate on one free lock: one runs its child, the others exit 73. Baseline: the "
        "same gate with N bare interpreters. Milliseconds after the gate opened.",
        "",
        "| contenders | winner's child running | all losers exited | N bare interpreters "
        "exited | trials |",
        "|---|---|---|---|---|",
    ]
    for size, r in result.items():
        if isinstance(r, dict):
            lines.append(
                f"| {size} | {span(r['winner_child_running'])} | {span(r['losers_exited'])} | "
                f"{span(r['bare_interpreters_exited'])} | {len(r['trials'])} |"
            )
    return [*lines, ""]


def write(results: Result) -> None:
    sections = results.get("sections", {})

    def get(name: str) -> Result | None:
        return sections[name]["result"] if name in sections else None

    failover = get("failover")
    scenario = None
    for s in failover["scenarios"] if failover else []:
        if s["backend"] == "file" and (scenario is None or s["ttl"] == 10):
            scenario = s
    if scenario is not None:
        timeline.draw(scenario, TIMELINE_PNG)
    lines = [
        *_header(results),
        *_targets(targets.evaluate(sections)),
        *_findings(targets.findings(sections)),
        *_startup(get("startup"), sections),
        *_imports(get("imports")),
        *_failover(failover, scenario is not None),
        *_selffence(get("selffence")),
        *_footprint(get("footprint")),
        *_contention(get("contention")),
    ]
    with open(RESULTS_MD, "w", encoding="utf-8") as f:
        f.write("\n".join(lines).rstrip() + "\n")
