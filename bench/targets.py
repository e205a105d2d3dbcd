"""The issue's targets: what was measured, whether each is met, and for a miss why and what
would close it, with the numbers of this run."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bench.common import median, span

Result = Mapping[str, Any]
# cProfile's names of the calls the start-up explanation quotes.
FSYNC = "~:<built-in method posix.fsync>"
SYNC_DIRECTORY = "lockfile.py:_sync_directory"
PROC_SCAN = "supervisor.py:_process_table"
SPAWN = "supervisor.py:_spawn"
THREAD_START, THREAD_JOIN = "threading.py:start", "threading.py:join"
# What could be done about a standard library module pgfence imports itself, when it is
# among the costly ones (None: needed, no cheaper equivalent in the standard library).
REMEDIES = {
    "typing": "import typing only under `TYPE_CHECKING` (annotations are strings already)",
    "dataclasses": "plain classes instead of dataclasses, which import inspect, ast and dis",
    "signal": "`signal` imports enum only to wrap numbers in IntEnums; the functions pgfence "
    "calls (sigtimedwait, pthread_sigmask, pthread_kill) are the C module `_signal`'s, "
    "which `signal` re-exports (private, and it would need a small typed wrapper for mypy)",
    "collections.abc": None,  # collections comes with functools (threading, enum) anyway
    "json": "import json only where JSON is written (JSON logs, `status --json`)",
    "re": "no regular expressions on the start-up path",
    "threading": None,  # the renewer is a thread
    "ctypes": None,  # prctl(2) (subreaper, parent-death signal) has no stdlib wrapper
}
HOLDER_REMEDY = (
    "give `status`, `check` and `release` (cli.py) a sleep function that imports "
    "pgfence.runloop on its first call instead of importing `holder.interruptible_sleep` up "
    "front: a check of a holder on the same machine never sleeps, and runloop.py pulls in "
    "signal (with enum), threading, supervisor, linux (ctypes) and metrics"
)
RATIO = "`run` start-up at most 3x the bare interpreter"
RUN_50 = "`run` start-up under 50 ms, median"
CHECK_30 = "`check` under 30 ms"


@dataclass
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: not measured in this run
    why: str = ""
    close: str = ""


def _result(sections: Result, name: str) -> Result | None:
    section = sections.get(name)
    return section["result"] if section else None


def _ms(seconds: float, digits: int = 0) -> str:
    return f"{seconds * 1000:.{digits}f} ms"


class _Imports:
    """Numbers from the import-budget section, for the explanations."""

    def __init__(self, result: Result | None) -> None:
        self.result = result

    def __bool__(self) -> bool:
        return self.result is not None

    def added(self, path: str) -> float:
        assert self.result is not None
        return float(self.result[path]["added_self_us"]) / 1e6

    def cumulative(self, path: str, module: str) -> float:
        assert self.result is not None
        entry = self.result[path]["profile"].get(module)
        return float(entry[1]) / 1e6 if entry else 0.0

    def alone(self, module: str) -> float | None:
        """What importing `module` adds to the bare interpreter's wall time (None: not
        measured)."""
        assert self.result is not None
        costs = self.result["module_costs"]
        if module not in costs:
            return None
        return max(0.0, median(costs[module]) - median(costs["pass"]))

    def direct(self, path: str, least: float = 0.0003) -> list[tuple[str, float, str]]:
        """(module, cumulative s, importing pgfence module) of the standard library modules
        pgfence imports itself on `path`, heaviest first."""
        assert self.result is not None
        rows = self.result[path]["direct_stdlib"]
        return [(m, us / 1e6, by) for m, us, by in rows if us / 1e6 >= least]

    def describe(self, path: str) -> str:
        parts = []
        for module, cumulative, by in self.direct(path)[:5]:
            alone = self.alone(module)
            extra = f"; {_ms(alone, 1)} alone" if alone is not None else ""
            parts.append(f"`{module}` ({_ms(cumulative, 1)}, imported by `{by}`{extra})")
        return ", ".join(parts) or "none over 0.3 ms"

    def in_main(self, name: str) -> tuple[float, int]:
        """Median cumulative seconds and calls, under cProfile, of `name` in `run`'s main."""
        assert self.result is not None
        seconds, calls = [], []
        for run in self.result["profiled_run"]:
            rows = [row for row in run["cumulative"] if row[0] == name]
            seconds.append(sum(row[2] for row in rows))
            calls.append(sum(row[3] for row in rows))
        return median(seconds), int(median(calls))


def _startup_why(imports: _Imports, run: float, bare: float) -> tuple[str, str, float]:
    """Why `run` costs what it does, what would make it cheaper, and about how much."""
    fsync, fsyncs = imports.in_main(FSYNC)
    _, directory_syncs = imports.in_main(SYNC_DIRECTORY)
    spawn, _ = imports.in_main(SPAWN)
    scan, _ = imports.in_main(PROC_SCAN)
    threads = imports.in_main(THREAD_START)[0] + imports.in_main(THREAD_JOIN)[0]
    added = imports.added("run")
    work = run - bare - added
    why = (
        f"`run -- true` takes {_ms(run)} against {_ms(bare, 1)} for the bare interpreter. "
        f"pgfence's imports add {_ms(added, 1)} (sum of self times under `-X importtime`, "
        "beyond the interpreter's own); the standard library modules pgfence imports itself "
        f"that cost most are {imports.describe('run')}. The other {_ms(work)} is work; under "
        f"cProfile `main()` spends {_ms(fsync, 1)} in {fsyncs} fsync(2) calls "
        f"({directory_syncs} of them on the lock's directory) and {_ms(spawn, 1)} in "
        "`supervisor._spawn` (fork, then waiting until the child has exec'd)"
        + (f"; {_ms(threads, 1)} starting and joining the renewer thread" if threads else "")
        + (f"; {_ms(scan, 1)} in `supervisor._process_table` (reading /proc)" if scan else "")
        + "."
    )
    remedies, saving = [], 0.0
    for module, cumulative, _ in imports.direct("run"):
        remedy = REMEDIES.get(module)
        if remedy and cumulative >= 0.0005:
            saving += cumulative  # what it costs on this path, dependencies included
            remedies.append(f"{remedy}: about {_ms(cumulative, 1)}")
    if directory_syncs >= 2 and fsyncs:
        gain = fsync / fsyncs
        saving += gain
        remedies.append(
            "fsync the lock's directory once after both the lock's link(2) and the "
            "generation file's rename(2), instead of after each (equally durable before "
            f"the command starts): one fsync, about {_ms(gain, 1)} here"
        )
    if scan >= 0.0005:
        saving += scan
        remedies.append(
            "skip the /proc scan when `reap()` found no child left (ECHILD): for a "
            f"subreaper no child means no descendant: about {_ms(scan, 1)}"
        )
    close = "; ".join(remedies) + "." if remedies else "Nothing obvious left in pgfence's code."
    return why, close, saving


def startup_analysis(sections: Result) -> tuple[str, str] | None:
    """Where `run`'s start-up time goes and what would make it cheaper, met or not."""
    result, imports = _result(sections, "startup"), _Imports(_result(sections, "imports"))
    if result is None or not imports:
        return None
    samples = result["samples"]
    bare = median(samples["bare interpreter"])
    run = median(samples["run (image launcher)"])
    why, close, saving = _startup_why(imports, run, bare)
    after = run - saving
    return (
        why,
        f"{close} Together about {_ms(saving)}: `run` near {_ms(after)} ({after / bare:.1f}x).",
    )


def _startup(sections: Result) -> list[Verdict]:
    result = _result(sections, "startup")
    if result is None:
        return [Verdict(t, "not measured", None) for t in (RATIO, RUN_50, CHECK_30)]
    samples = result["samples"]
    bare = median(samples["bare interpreter"])
    run, run_venv = median(samples["run (image launcher)"]), median(samples["run (venv script)"])
    check = median(samples["check (image launcher)"])
    ratio = Verdict(
        RATIO,
        f"{run / bare:.1f}x: {_ms(run)} vs {_ms(bare, 1)} (venv script {run_venv / bare:.1f}x)",
        run / bare <= 3,
    )
    absolute = Verdict(
        RUN_50,
        f"{span(samples['run (image launcher)'])} ms (venv script "
        f"{span(samples['run (venv script)'])} ms)",
        run < 0.050,
    )
    checked = Verdict(
        CHECK_30,
        f"{span(samples['check (image launcher)'])} ms (venv script "
        f"{span(samples['check (venv script)'])} ms)",
        check < 0.030,
    )
    imports = _Imports(_result(sections, "imports"))
    if not imports:
        return [ratio, absolute, checked]
    if not ratio.met or not absolute.met:
        why, close, saving = _startup_why(imports, run, bare)
        after = run - saving
        verdict = "enough for" if after <= 3 * bare else "still short of"
        ratio.why = absolute.why = why
        ratio.close = absolute.close = (
            f"{close} Together about {_ms(saving)} less: `run` near {_ms(after)} "
            f"({after / bare:.1f}x), {verdict} 3x ({_ms(3 * bare)}) on this machine. Most "
            "of the rest is what a fenced start needs: a durable lock (fsync), a child "
            "(fork/exec) and a renewer thread."
        )
    if not checked.met:
        holder = imports.cumulative("check", "pgfence.runloop")
        checked.why = (
            f"`check` takes {_ms(check)}; its imports add {_ms(imports.added('check'), 1)} "
            f"beyond the interpreter's: {imports.describe('check')}"
            + (
                f"; pgfence.runloop ({_ms(holder, 1)}) is imported only for "
                "`interruptible_sleep`, which a check of a holder on this machine never "
                "calls."
                if holder
                else "."
            )
        )
        checked.close = (
            f"{HOLDER_REMEDY}: about {_ms(holder)}." if holder else "The changes listed for `run`."
        )
    return [ratio, absolute, checked]


def findings(sections: Result) -> list[str]:
    """Costs outside the targets that are worth fixing."""
    found = []
    startup, imports = _result(sections, "startup"), _Imports(_result(sections, "imports"))
    if startup and imports:
        samples = startup["samples"]
        shim = median(samples["postgres --version (shim, image)"])
        real = median(samples["postgres --version (real)"])
        bare = median(samples["bare interpreter"])
        path = "shim passthrough (postgres --version)"
        if shim - bare - real > 0.003:
            found.append(
                f"`postgres --version` through the shim takes {_ms(shim)} against {_ms(real)} "
                f"for the real binary and {_ms(bare)} for the bare interpreter, although it "
                f"only execs the real binary: it imports {_ms(imports.added(path), 1)} of "
                f"modules first ({imports.describe(path)}), because `pgfence.cli` imports "
                "its dependencies at module level before `main()` looks at argv[0]. "
                "Deciding the pass-through first (in the launchers, or in a `main` that "
                "imports only `os` and `pgfence.shim` until it knows it must fence) saves "
                "that much on every such call; the official image's entrypoint makes them "
                "(`postgres -C ...`) before each server start."
            )
        holder = imports.cumulative("check", "pgfence.runloop")
        check = median(samples["check (image launcher)"])
        if holder >= 0.001:
            found.append(
                f"`check` ({_ms(check)}; the images' HEALTHCHECK runs it every 10 s) "
                f"spends {_ms(holder, 1)} importing pgfence.runloop, only for "
                f"`interruptible_sleep`. Remedy: {HOLDER_REMEDY}."
            )
    return found


def _footprint(sections: Result) -> list[Verdict]:
    result = _result(sections, "footprint")
    if result is None:
        return [Verdict(t, "not measured", None) for t in ("idle RSS", "idle CPU")]
    strict, lease = result["strict"], result["lease"]
    held = f"{result['seconds']:g} s of holding"
    rss = Verdict(
        "idle holder under 25 MB RSS",
        f"strict {span(strict['rss_mb'], 1, 1)} MB, lease {span(lease['rss_mb'], 1, 1)} MB "
        f"({held})",
        max(strict["rss_mb"]["max"], lease["rss_mb"]["max"]) < 25,
    )
    cpu = Verdict(
        "idle holder under 0.2% of one core",
        f"strict {strict['cpu_percent']:.3f}%, lease {lease['cpu_percent']:.3f}% ({held}; "
        f"10 s windows: strict {span(strict['cpu_percent_windows'], 1, 3)}%)",
        max(strict["cpu_percent"], lease["cpu_percent"]) < 0.2,
    )
    if not rss.met:
        rss.why = "RSS includes the interpreter and every imported module."
        rss.close = "Fewer imports in the holder (see start-up); a smaller interpreter build."
    if not cpu.met:
        cpu.why = "Each renewal wakes both threads and rewrites and fsyncs the lock."
        cpu.close = "A longer renewal interval, or fewer syscalls per renewal."
    return [rss, cpu]


def _selffence(sections: Result) -> list[Verdict]:
    result = _result(sections, "selffence")
    if result is None:
        return [Verdict(t, "not measured", None) for t in ("self-fence", "stolen lease")]
    kinds = ("stolen", "read-only", "frozen")
    pooled = [t["detection_to_gone"] for k in kinds for t in result[k]]
    parts = ", ".join(
        f"{k} {median([t['detection_to_gone'] for t in result[k]]) * 1000:.0f}" for k in kinds
    )
    fence = Verdict(
        "self-fence under 200 ms from detection to the last PostgreSQL process gone",
        f"{span(pooled)} ms over {len(pooled)} trials (medians: {parts} ms); worst trial counts",
        max(pooled) < 0.2,
    )
    detection = [t["event_to_detection"] for t in result["stolen"]]
    interval = float(result["interval"])
    stolen = Verdict(
        "stolen lease detected within one renewal interval",
        f"{span(detection)} ms after the theft; renewal interval {interval * 1000:.0f} ms "
        f"(TTL {result['ttl']:g} s)",
        max(detection) <= interval + 0.005,  # event times have 1 ms resolution
    )
    if not fence.met:
        fence.why = (
            "pgfence SIGKILLs every process of the tree and waits until /proc shows none; "
            "a slow trial is the machine not scheduling the kill or the exits."
        )
        fence.close = "Kill the process group first (one kill(2)), then sweep the stragglers."
    if not stolen.met:
        stolen.why = "The renewer thread checks the lock only at each renewal."
        stolen.close = "Check the lock at the start of each renewal, before writing."
    return [fence, stolen]


def _failover(sections: Result) -> list[Verdict]:
    result = _result(sections, "failover")
    found = []
    for scenario in result["scenarios"] if result else []:
        if scenario["ttl"] != 10:
            continue
        limit = scenario["takeover_wait"] + 3
        ready = [t["ready_after"] for t in scenario["trials"]]
        verdict = Verdict(
            f"failover, TTL 10 s ({scenario['backend']}): serving within TTL + lock-delay + "
            "3 s, median",
            f"{span(ready, 1, 2)} s after the kill (limit {limit:g} s; takeover at "
            f"{span([t['acquired_after'] for t in scenario['trials']], 1, 2)} s)",
            median(ready) <= limit,
        )
        if not verdict.met:
            verdict.why = (
                "The contender takes over TTL + lock-delay after the last heartbeat it saw "
                "plus up to one poll (TTL/10); the rest is PostgreSQL's crash recovery."
            )
            verdict.close = "A shorter poll, or a checkpoint before the failover (less WAL)."
        found.append(verdict)
    return found or [Verdict("failover, TTL 10 s", "not measured", None)]


def _contention(sections: Result) -> list[Verdict]:
    result = _result(sections, "contention")
    if result is None or "64" not in result:
        return [Verdict(t, "not measured", None) for t in ("64: winner", "64: losers")]
    big = result["64"]
    winner = Verdict(
        "64 contenders: winner's child running within 200 ms",
        f"{span(big['winner_child_running'])} ms",
        median(big["winner_child_running"]) <= 0.2,
    )
    losers = Verdict(
        "64 contenders: all losers exited within 500 ms",
        f"{span(big['losers_exited'])} ms",
        median(big["losers_exited"]) <= 0.5,
    )
    bare64 = median(big["bare_interpreters_exited"])
    two = median(result["2"]["winner_child_running"]) if "2" in result else None
    startup = _result(sections, "startup")
    imports = _Imports(_result(sections, "imports"))
    per_process = median(startup["samples"]["run (image launcher)"]) if startup else None
    bare = median(startup["samples"]["bare interpreter"]) if startup else None
    cores = os.cpu_count() or 1
    why = (
        f"64 pgfence processes start 64 interpreters at once on {cores} core(s)"
        + (
            f"; one `run` alone takes {_ms(per_process)}, nearly all of it CPU"
            if per_process
            else ""
        )
        + ". The scheduler shares the cores among all of them, so the winner's link(2) "
        "happens only when most contenders are far into their own start-up too, and the last "
        "loser exits when all are done. The same gate with 64 bare interpreters "
        f"(`python3 -I -c pass`) takes {_ms(bare64)} until the last one has exited: the floor "
        "for any Python process on this machine"
        + (f"; 2 contenders show one host's latency ({_ms(two)})." if two else ".")
    )
    holder = imports.cumulative("run", "pgfence.runloop") if imports else 0.0
    signal = imports.cumulative("run", "signal") if imports else 0.0
    close = (
        "Cheaper start-up shrinks both roughly in proportion (see start-up)"
        + (
            "; losers could exit a little sooner if `cli._run` imported what only a winner "
            "needs (pgfence.runloop with threading and metrics, and supervisor's ctypes) "
            f"after `acquire` succeeded: about {_ms(holder - signal, 1)} of the "
            f"{_ms(holder, 1)} that pgfence.runloop costs (signal is needed before acquiring, "
            "to block the handled signals)"
            if holder > signal
            else ""
        )
        + f". The rest is cores: 64 bare interpreters alone take {_ms(bare64)} until all "
        f"have exited on these {cores} cores, so all losers gone within 500 ms leaves each "
        f"pgfence about {_ms(max(0.0, 0.5 - bare64) * cores / 64, 1)} of CPU beyond the "
        "interpreter's"
        + (f" (it uses about {_ms(per_process - bare, 0)})" if per_process and bare else "")
        + f", and until most of them are done the winner gets about 1/{64 // cores} of a "
        "core. In a deployment contenders run on separate hosts, where each one's latency "
        "is its own start-up."
    )
    for verdict in (winner, losers):
        if not verdict.met:
            verdict.why, verdict.close = why, close
    return [winner, losers]


def evaluate(sections: Result) -> list[Verdict]:
    return [
        *_startup(sections),
        *_footprint(sections),
        *_selffence(sections),
        *_failover(sections),
        *_contention(sections),
    ]
