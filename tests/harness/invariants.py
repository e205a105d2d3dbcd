"""The five invariants the explorer checks after every run, and the recovery probe.

- one:        never two commands running under the fence at once (each oracle's flock,
              and the oracles' start-to-last-beat intervals);
- generation: the generations the commands got, and the lock file's generations of the
              holders that started a command, strictly increase;
- respected:  no lock is deleted or replaced by anyone else while its holder's command
              runs, beyond the holder's renewal interval (it notices at its next renewal)
              and TOLERANCE (how often the lock is polled and the oracle beats);
- exits:      every exit status is a documented one, and no traceback;
- recovers:   afterwards a correct newcomer acquires without an operator, unless a
              strict-mode or one-line lock is left (README: clearing those is an operator
              act; then `pgfence release --force` must work).
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

from harness.explorer import (
    HERE,
    LEASE,
    TOLERANCE,
    WAIT,
    Proc,
    Run,
    fired,
    parse_lock,
    read_bytes,
)


@dataclass
class Outcome:
    path: str
    call: str  # the call's signature, with its position in its burst
    fault: str
    outcome: str
    verdicts: dict[str, str]
    seconds: float

    @property
    def violations(self) -> list[str]:
        return [f"{k}: {v}" for k, v in self.verdicts.items() if v.startswith("VIOLATION")]


INVARIANTS = ("one", "generation", "respected", "exits", "recovers")
REFILL = 0.05  # s: a deleted lock path filled again this soon counts as replaced


def recover(run: Run) -> str:
    """After the run: can a correct newcomer acquire, without an operator where it must?"""
    left = parse_lock(read_bytes(run.lock))
    verdict = "ok"
    if left is not None and left.get("mode") in ("strict", "one-line"):
        # Clearing a strict-mode or one-line lock is an operator act (README); it must work.
        verdict = f"ok (strict: {left.get('mode')} lock left, operator release)"
        released = subprocess.run(
            run.pgfence("release", "--force", "--lock-file", run.lock, "--token", "O"),
            env=run.env(),
            capture_output=True,
            timeout=30,
        )
        if released.returncode != 0:
            return (
                f"VIOLATION: `pgfence release --force` exited {released.returncode}: "
                f"{released.stderr.decode(errors='replace').strip()[:160]}"
            )
    before = len(run.oracles())
    probe = subprocess.run(
        run.run_argv("R", *LEASE, "--no-wait", once=True),
        env=run.env(),
        capture_output=True,
        timeout=3 * WAIT + 20,
    )
    if len(run.oracles()) > before and probe.returncode == 0:
        return verdict
    # --no-wait gives up when the heartbeat moves, or a claim is busy: wait once more.
    probe = subprocess.run(
        run.run_argv("R", *LEASE, once=True),
        env=run.env(),
        capture_output=True,
        timeout=3 * WAIT + 20,
    )
    if len(run.oracles()) > before and probe.returncode == 0:
        return verdict + " (after waiting)"
    return f"VIOLATION: a new lease holder could not acquire (exit {probe.returncode})"


def judge(run: Run, target: Proc, recovered: str) -> tuple[str, dict[str, str]]:
    oracles = run.oracles()
    verdicts: dict[str, str] = {}
    # one: the flock each oracle takes tells it directly, and intervals must not overlap.
    busy = [o for o in oracles if o["flock"] != "ok"]
    overlaps = [
        (a, b)
        for i, a in enumerate(oracles)
        for b in oracles[i + 1 :]
        if float(str(b["start"])) < float(str(a["end"]))
    ]
    if busy or overlaps:
        pairs = (
            ", ".join(f"gen {a['generation']}+{b['generation']}" for a, b in overlaps)
            or "flock busy"
        )
        verdicts["one"] = f"VIOLATION: two commands at once ({pairs})"
    else:
        verdicts["one"] = "ok"
    gens = [int(str(o["generation"])) for o in oracles if str(o["generation"]).isdigit()]
    bad = [(a, b) for a, b in zip([run.seed_generation, *gens], gens) if b <= a]
    verdicts["generation"] = (
        f"VIOLATION: a command got generation {bad[0][1]} after {bad[0][0]}" if bad else "ok"
    )
    if not bad:
        verdicts["generation"] = lock_generations(run, {str(o["instance"]) for o in oracles})
    verdicts["respected"] = respected(run, oracles)
    verdicts["exits"] = exits(run, target)
    verdicts["recovers"] = recovered
    return describe(run, target, oracles), verdicts


def lock_generations(run: Run, started: set[str]) -> str:
    """Every new holder of the lock file that starts a command has a generation above
    every earlier one.

    A holder may rewrite its own fresh lock with a higher generation before it starts
    its command (one that finds its reserved number was used meanwhile does): what counts
    is the last generation each holder wrote before another holder's record appeared. A
    holder that never starts one (a late acquisition, past its deadline: it exits 75 and
    may not even rewrite its lock) hands no fencing token out, and the next holder counts
    its generation in anyway (README: a late acquisition never starts the command)."""
    holders: list[tuple[str, int]] = []  # (instance, last generation it wrote)
    for _, data in run.history:
        fields = parse_lock(data)
        if fields is None or not fields.get("generation", "").isdigit():
            continue
        instance, generation = fields.get("instance", ""), int(fields["generation"])
        if instance not in started:
            continue
        if holders and holders[-1][0] == instance:
            holders[-1] = (instance, max(holders[-1][1], generation))
        elif any(instance == earlier for earlier, _ in holders):
            # An earlier holder's late write over a newer lock (README, "Not protected":
            # a pause between its final check and the rename). It hands out no new
            # token and starts nothing; `respected` and `one` judge the overwrite.
            continue
        else:
            holders.append((instance, generation))
    for i, (_, generation) in enumerate(holders[1:], 1):
        earlier = max(g for _, g in holders[:i])
        if generation <= earlier:
            return f"VIOLATION: the lock got generation {generation} again (after {earlier})"
    return "ok"


def respected(run: Run, oracles: list[dict[str, object]]) -> str:
    """No lock deleted or replaced by another while its holder's command runs on.

    A replaced lock's holder notices at its next renewal (README: "a stolen or lost lease
    is noticed within R"), and nobody may start on a lock it replaced late, so its command
    may run one renewal interval (the record's `interval`) more. A deleted lock is free at
    once: anyone may create one and start, so its holder's command may not run on beyond
    TOLERANCE, unless a record fills the path again within REFILL (a late release that
    puts a lock back at once), which counts as a replacement."""
    history = run.history
    for i in range(1, len(history)):
        (_, old), (when, new) = history[i - 1], history[i]
        before, after = parse_lock(old), parse_lock(new)
        if before is None or "instance" not in before:
            continue
        if after is not None and (after.get("instance"), after.get("generation")) == (
            before.get("instance"),
            before.get("generation"),
        ):
            continue  # a heartbeat of the same holder
        refilled = i + 1 < len(history) and history[i + 1][0] - when <= REFILL
        bound = TOLERANCE
        if after is not None or refilled:
            bound += _float(before.get("interval", ""))
        for o in oracles:
            if o["instance"] != before["instance"] or str(o["generation"]) != before.get(
                "generation"
            ):
                continue
            late = float(str(o["end"])) - when
            if float(str(o["start"])) < when and late > bound:
                what = (
                    "deleted"
                    if new is None
                    else f"replaced by gen {after and after.get('generation')}"
                )
                return (
                    f"VIOLATION: lock of gen {before['generation']} {what} while its "
                    f"command ran {late:.2f} s more (bound {bound:.2f} s)"
                )
    return "ok"


def documented_codes(src: str, kind: str) -> set[int]:
    """The exit codes the explored tree's README documents (next to its src; else this
    repository's): the table of `pgfence run`'s codes, and release's 0/73 plus the
    storage and format errors every command may give."""
    readme = os.path.join(os.path.dirname(os.path.abspath(src)), "README.md")
    if not os.path.exists(readme):
        readme = os.path.join(os.path.dirname(HERE), "..", "README.md")
    codes = {0, *range(129, 193)}
    in_table = False
    with open(readme, encoding="utf-8") as f:
        for line in f:
            if line.startswith("| code | meaning"):
                in_table = True
            elif in_table and not line.startswith("|"):
                break
            elif in_table:
                cell = line.split("|")[1]
                codes.update(int(c) for c in re.findall(r"\b\d+\b", cell) if int(c) < 128)
    if kind == "release":
        codes &= {0, 65, 73, 74, *range(129, 193)}
    else:
        codes.discard(1)  # `check` only
    return codes


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return 0.0


def exits(run: Run, target: Proc) -> str:
    bad = []
    for proc in run.procs:
        if proc.killed_by_us or (proc is target and fired(target)):
            continue
        codes = documented_codes(run.src, proc.kind)
        err = read_bytes(proc.stderr, b"").decode(errors="replace")
        if proc.code not in codes or "Traceback" in err:
            bad.append(
                f"{proc.name} exited {proc.code}"
                + (" with a traceback" if "Traceback" in err else "")
            )
    return f"VIOLATION: {'; '.join(sorted(set(bad)))}" if bad else "ok"


def describe(run: Run, target: Proc, oracles: list[dict[str, object]]) -> str:
    exit_of = {
        "before": "killed before",
        "after": "killed after",
        "delay": "delayed",
        "lost": "answer lost",
        "late": "answer read late",
    }
    kind = fired(target)
    parts = [exit_of.get(kind, kind) if kind else "fault not reached"]
    if kind not in ("before", "after"):
        parts.append(f"target exit {target.code}")
    gens = [str(o["generation"]) for o in oracles]
    parts.append(f"commands ran with gen {','.join(gens) or 'none'}")
    return "; ".join(parts)
