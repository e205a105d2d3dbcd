"""The safety matrix: trace each path's calls, run every (path, call, fault), write the table.

`scripts/safety-matrix` is the command; tests/integration/test_safety_matrix.py runs the
quick slice in CI.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.etcdpaths import DELAY as ETCD_DELAY
from harness.explorer import (
    DELAY,
    FAULTS,
    STRICT_DELAY,
    STRICT_INTERVAL,
    TTL,
    WAIT,
    Path,
    execute,
    finish_polling,
    trace_records,
)
from harness.invariants import INVARIANTS, TOLERANCE, Outcome, judge, recover


@dataclass
class Row:
    path: Path
    phase: str
    prefix: list[str]
    fault: str

    @property
    def call(self) -> str:
        return f"#{len(self.prefix)} {self.prefix[-1]}"


def enumerate_calls(src: str, path: Path, work: str) -> tuple[str, list[list[str]]]:
    """The target's phase and its lock calls on `path`, from a traced run without a fault.

    A path's phase "renewer" is the first thread other than main that makes lock calls,
    whatever threads the explored version starts before it."""
    run, target = execute(src, path, None, work)
    records = [r for r in trace_records(target) if "prefix" in r]
    phase = path.phase
    if phase == "renewer":
        phase = next(
            (
                str(r["phase"])
                for r in records
                if r["phase"] != "main" and r["phase"] != "main-after-thread"
            ),
            "t1",
        )
    prefixes: list[list[str]] = []
    for r in records:
        if r.get("phase") == phase and r.get("nth") == path.nth:
            prefix = [str(s) for s in r["prefix"]]  # type: ignore[attr-defined]
            if prefix not in prefixes:
                prefixes.append(prefix)
    shutil.rmtree(run.root, ignore_errors=True)
    if not prefixes:
        raise RuntimeError(f"{path.name}: the target made no lock call in phase {phase}")
    return phase, prefixes


def run_row(src: str, row: Row, work: str, keep: bool) -> Outcome:
    started = time.monotonic()
    fault: dict[str, object] = {
        "phase": row.phase,
        "prefix": row.prefix,
        "nth": row.path.nth,
        "kind": row.fault,
        "seconds": row.path.delay,
    }
    run, target = execute(src, row.path, fault, work)
    try:
        recovered = recover(run)
    except subprocess.TimeoutExpired:
        recovered = "VIOLATION: the recovery probe hung"
    finish_polling(run)
    outcome, verdicts = judge(run, target, recovered)
    if row.path.checks is not None:
        verdicts.update(row.path.checks(run))
    if run.notes:
        outcome += "; " + "; ".join(run.notes)
    result = Outcome(
        row.path.name, row.call, row.fault, outcome, verdicts, time.monotonic() - started
    )
    if result.violations and keep:
        result.outcome += f" (kept: {run.root})"
    else:
        shutil.rmtree(run.root, ignore_errors=True)
    return result


# The quick slice (CI): every fault on the calls that change the lock on the release and
# takeover paths, the acquiring write killed just after it (before the generation is
# recorded), and a renewal's rename delayed past the takeover wait in both modes.
LOCK_CHANGES = ("rename(tmp→lock", "link(tmp→lock", "unlink(lock", "rename(tmp→.gen")
# Every call that changes the lock's directory or makes a change durable, and every etcd
# request that changes or checks the key or its lease (--changes).
CHANGES = ("link(", "rename(", "unlink(", "fsync(", "fdatasync(")
CHANGES += ("etcd auth", "etcd grant", "etcd txn", "etcd keepalive", "etcd revoke")
# Faults at the exit of an etcd request, on its answer: not on the generation mark's calls.
ANSWER_FAULTS = ("lost", "late")
QUICK = {
    "holder-release": (LOCK_CHANGES, FAULTS),
    "operator-release": (LOCK_CHANGES, FAULTS),
    "lease-takeover": (LOCK_CHANGES, FAULTS),
    "acquire-free": (LOCK_CHANGES, ("after",)),
    "renew": (("rename(tmp→lock",), ("delay",)),
    "renew-strict": (("rename(tmp→lock",), ("delay",)),
    # etcd: the create's answer lost or the holder killed once it landed; a keep-alive held
    # past the deadline; the release's delete answered too late to matter.
    "etcd-acquire": (("etcd txn(create)",), ("after", "lost")),
    "etcd-renew": (("etcd keepalive",), ("delay",)),
    "etcd-release": (("etcd txn(delete)",), ("late", "lost")),
}


def quick_selection(rows: list[Row]) -> list[Row]:
    chosen = []
    for row in rows:
        calls, faults = QUICK.get(row.path.name, ((), ()))
        if row.prefix[-1].startswith(calls) and row.fault in faults:
            chosen.append(row)
    return chosen


def build_rows(
    src: str, paths: list[Path], faults: tuple[str, ...], work: str, progress: Callable[[str], None]
) -> list[Row]:
    rows = []
    for path in paths:
        phase, prefixes = enumerate_calls(src, path, work)
        progress(f"{path.name}: {len(prefixes)} calls traced ({phase})")
        for prefix in prefixes:
            for fault in faults:
                if fault not in path.faults:
                    continue
                if fault in ANSWER_FAULTS and not prefix[-1].startswith("etcd "):
                    continue
                rows.append(Row(path, phase, prefix, fault))
    return rows


def run_matrix(
    src: str, rows: list[Row], work: str, jobs: int, keep: bool, progress: Callable[[str], None]
) -> list[Outcome]:
    from concurrent.futures import ThreadPoolExecutor

    results: list[Outcome | None] = [None] * len(rows)
    done = [0]
    lock = threading.Lock()

    def one(i: int) -> None:
        result = run_row(src, rows[i], work, keep)
        results[i] = result
        with lock:
            done[0] += 1
            mark = "VIOLATION " + "; ".join(result.violations) if result.violations else "ok"
            where = f"{result.path} {result.call} {result.fault}"
            progress(f"[{done[0]}/{len(rows)}] {where}: {mark} ({result.seconds:.1f} s)")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, range(len(rows))))
    return [r for r in results if r is not None]


HEADER = [
    "# Safety matrix",
    "",
    "Generated by the crash-and-pause explorer (`tests/harness/`); do not edit by hand.",
    "Each section is regenerated by the command it names; a run of one backend's paths",
    "keeps the other backend's section as it was.",
]
SECTIONS = {"file": "## File backend: the lock directory", "etcd": "## etcd backend: the key"}


def markdown(
    results: list[Outcome], command: str, src_note: str, seconds: float, backend: str = "file"
) -> str:
    """One backend's section of docs/safety-matrix.md."""
    violations = sum(1 for r in results if r.violations)
    invariants = INVARIANTS + (("key",) if backend == "etcd" else ())
    lines = [
        SECTIONS[backend],
        "",
        f"Regenerate with `{command}`.",
        "",
        f"{len(results)} runs, {violations} with a violation; {src_note}; "
        f"{seconds / 60:.1f} min on this machine.",
        "",
        *(ETCD_EXPLANATION if backend == "etcd" else FILE_EXPLANATION),
        "",
        "| path | call | fault | outcome | " + " | ".join(invariants) + " |",
        "|---|---|---|---|" + "---|" * len(invariants),
    ]
    for r in results:
        cells = [r.path, f"`{r.call}`", r.fault, r.outcome.replace("|", "/")]
        cells += [r.verdicts.get(k, "?").replace("|", "/") for k in invariants]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


FILE_EXPLANATION = [
    "Each row is one run: the *target* process of a path (`tests/harness/paths.py`)",
    "makes its system calls on the lock's directory, as traced by `tests/harness/tracer.py`",
    "in a run without a fault (`#k` is the call's position in its burst of calls), and the",
    "fault is applied to that one call: `delay` holds the calling thread",
    f"{DELAY:g} s on lease paths (past the takeover wait of {WAIT:g} s at `--ttl {TTL:g}`)",
    f"and {STRICT_DELAY:g} s on strict ones (past any same-token takeover wait at",
    f"`--heartbeat-interval {STRICT_INTERVAL:g}`); `before`/`after` SIGKILL the process",
    "just before the call runs or just after it returned. Contenders run meanwhile and are",
    "restarted when they exit. Invariants: **one** never two commands under the fence at",
    "once; **generation** the commands' generations, and those of the lock file's holders",
    "that started one, strictly increase (an earlier holder's late write is judged under",
    "**respected**);",
    "**respected** no lock deleted or replaced by another while its holder's command runs",
    f"longer than one renewal interval (+{TOLERANCE:g} s); **exits** every exit status",
    "documented, no traceback;",
    "**recovers** a correct newcomer acquires afterwards without an operator, except",
    "after a strict-mode or one-line lock, which `pgfence release --force` must clear.",
]
ETCD_EXPLANATION = [
    "Each row is one run of `pgfence run --backend etcd --ttl 2` against a real",
    "single-member etcd on loopback (authentication on), paths in",
    "`tests/harness/etcdpaths.py`. The target's steps are the HTTP requests it sends to",
    "etcd (`etcd <step>`, named by `tests/harness/etcdcalls.py`: `txn(create)` is the",
    "create guarded on create revision 0, `txn(check)` and `txn(beat)` a renewal's guarded",
    "compare and heartbeat write, `txn(delete)` the release guarded on create revision and",
    "lease) and its system calls on the generation mark beside the data directory, traced",
    "by `tests/harness/tracer.py` in a run without a fault. Faults: `before` SIGKILL before",
    "the request is complete (etcd never runs it); `after` SIGKILL once etcd's answer is",
    "on the socket (it ran, pgfence never read the answer); `lost` that answer taken off",
    "the connection, which is shut (pgfence resends or fails over, as on a lost reply);",
    f"`late` the thread held {ETCD_DELAY:.3g} s after etcd answered, before it reads the",
    f"answer; `delay` the thread held {ETCD_DELAY:.3g} s before it sends (both past the",
    "deadline and past a contender's wait: lease expiry plus the lock delay). Contenders",
    "run meanwhile and are restarted when they exit. Invariants as for the file backend,",
    "on the key's history, and **key**: every create revision carries one holder's",
    "records, every command's generation is at least its key's create revision, and the",
    "key is created only after it was seen absent for the lock delay (TTL/2 + TTL/6).",
]


def document(existing: str, sections: dict[str, str]) -> str:
    """docs/safety-matrix.md with `sections` (backend -> text) replaced or added."""
    kept = split_sections(existing)
    kept.update(sections)
    parts = ["\n".join(HEADER) + "\n"]
    parts += [kept[b] for b in SECTIONS if b in kept]
    return "\n".join(parts)


def split_sections(text: str) -> dict[str, str]:
    """The sections of an existing matrix (one without sections is the file backend's)."""
    found: dict[str, str] = {}
    titles = {title: backend for backend, title in SECTIONS.items()}
    lines = text.splitlines()
    if not any(line in titles for line in lines):
        regenerate = next((i for i, ln in enumerate(lines) if ln.startswith("Regenerate")), None)
        if regenerate is None:
            return found
        body = [SECTIONS["file"], "", *lines[regenerate:]]
        return {"file": "\n".join(body).rstrip("\n") + "\n"}
    current: str | None = None
    for line in lines:
        if line in titles:
            current = titles[line]
            found[current] = ""
        if current is not None:
            found[current] += line + "\n"
    return {backend: text.rstrip("\n") + "\n" for backend, text in found.items()}
