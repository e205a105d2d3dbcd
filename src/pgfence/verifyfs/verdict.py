"""The verdict of `pgfence verify-fs`: every participant's findings judged together.

Each participant judges the union of all results files, so all of them print the same
report. Evidence of danger makes the run UNSAFE whatever else happened; otherwise too
little evidence makes it INCONCLUSIVE; otherwise it is SAFE.

- overlaps: a holder found another one inside (occupant file), saw the counter move under
  it, or (participants on one machine, whose clocks agree) held during another's interval
- lost updates: a counter value read by two holders: a stale read after a handoff, or an
  overlap nobody saw directly
- torn or backwards reads: a rename seen half-written, or undone
- lag: a change's round trip to a peer and back at or over --max-lag
"""

from __future__ import annotations

from typing import Any

SAFE, UNSAFE, INCONCLUSIVE = "SAFE", "UNSAFE", "INCONCLUSIVE"
EXIT_CODES = {SAFE: 0, UNSAFE: 1, INCONCLUSIVE: 2}
MIN_HANDOFFS = 10  # handoffs between participants (on different machines) for a verdict


def judge(results: dict[str, Any], peers: list[str], opts: dict[str, Any]) -> dict[str, Any]:
    """The verdict over every participant's findings (the same for every participant)."""
    boot = {pid: str(r["boot_id"]) for pid, r in results.items()}
    reasons: list[str] = []
    unsafe: list[str] = []
    seqs: dict[int, int] = {}
    handoffs = cross_host = 0
    for pid, r in results.items():
        for _start, _end, seq, prev in r["holds"]:
            seqs[seq] = seqs.get(seq, 0) + 1
            if prev is not None and prev != pid:
                handoffs += 1
                cross_host += boot.get(prev, "?") != boot[pid]
    lost = sum(n - 1 for n in seqs.values())
    overlaps = [line for r in results.values() for line in r["overlaps"]]
    overlaps += _interval_overlaps(results)
    torn = [line for r in results.values() for line in r["torn"]]
    backwards = [line for r in results.values() for line in r["regressions"]]
    lags = {
        f"{pid}->{peer}": samples
        for pid, r in results.items()
        for peer, samples in r["lag"].items()
        if samples
    }
    worst = max((max(s) for s in lags.values()), default=None)
    if overlaps:
        unsafe.append(f"{len(overlaps)} overlapping hold(s): {overlaps[0]}")
    if lost:
        unsafe.append(f"{lost} lost update(s): a counter value was read by two holders")
    if torn:
        unsafe.append(f"{len(torn)} torn read(s): {torn[0]}")
    if backwards:
        unsafe.append(f"{len(backwards)} read(s) went backwards: {backwards[0]}")
    if worst is not None and worst >= float(opts["max_lag"]):
        unsafe.append(
            f"a change took {worst:.3f} s to go to a peer and back (--max-lag {opts['max_lag']:g})"
        )
    missing = [p for p in peers if p not in results]
    if missing:
        reasons.append(f"no findings from {', '.join(missing)} (crashed or still running)")
    idle = [pid for pid, r in results.items() if not r["holds"]]
    if idle:
        reasons.append(f"{', '.join(idle)} never got the lock")
    single = len(set(boot.values())) <= 1
    needed = handoffs if (single and opts["allow_single_host"]) else cross_host
    if single and not opts["allow_single_host"]:
        reasons.append(
            "every participant ran on one machine (one boot id), so no cross-host cache was "
            "tested; run it from two hosts (or pass --allow-single-host for two mounts)"
        )
    elif needed < MIN_HANDOFFS:
        between = "participants" if single else "machines"
        reasons.append(f"only {needed} handoff(s) between {between} (need {MIN_HANDOFFS})")
    pairs = {f"{a}->{b}" for a in peers for b in peers if a != b and a in results}
    if pairs - set(lags):
        reasons.append(f"no visibility lag measured for {', '.join(sorted(pairs - set(lags)))}")
    verdict = UNSAFE if unsafe else INCONCLUSIVE if reasons else SAFE
    return {
        "verdict": verdict,
        "reasons": unsafe + reasons,
        "participants": {
            pid: {
                "host": r["host"],
                "boot_id": r["boot_id"],
                "holds": len(r["holds"]),
                "longest_hold_seconds": round(
                    max((e - s for s, e, _, _ in r["holds"]), default=0), 6
                ),
                "ran_seconds": r["ran_seconds"],
                "errors": r["errors"],
            }
            for pid, r in sorted(results.items())
        },
        "holds": sum(seqs.values()),
        "link_holds": sum(int(r["link_holds"]) for r in results.values()),
        "excl_holds": sum(int(r["excl_holds"]) for r in results.values()),
        "handoffs": handoffs,
        "cross_host_handoffs": cross_host,
        "overlaps": len(overlaps),
        "lost_updates": lost,
        "torn_reads": len(torn),
        "backwards_reads": len(backwards),
        "lag_seconds": {
            pair: {"samples": len(s), "median": sorted(s)[len(s) // 2], "max": max(s)}
            for pair, s in sorted(lags.items())
        },
        "max_lag_seconds": worst,
        "max_lag_limit": opts["max_lag"],
        "machines": len(set(boot.values())),
    }


def _interval_overlaps(results: dict[str, Any]) -> list[str]:
    """Hold intervals of participants on one machine share a clock: compare them exactly."""
    by_boot: dict[str, list[tuple[float, float, str]]] = {}
    for pid, r in results.items():
        by_boot.setdefault(str(r["boot_id"]), []).extend((s, e, pid) for s, e, _, _ in r["holds"])
    found = []
    for intervals in by_boot.values():
        intervals.sort()
        end, owner = float("-inf"), ""
        for start, stop, pid in intervals:
            if start < end and pid != owner:
                found.append(f"{pid} held from {start:.6f} while {owner} held until {end:.6f}")
            if stop > end:
                end, owner = stop, pid
    return found


def render(report: dict[str, Any]) -> list[str]:
    lines = [f"verify-fs {report['directory']}: {report['verdict']}"]
    lines += [f"  - {reason}" for reason in report["reasons"]]
    if "participants" not in report:
        return lines
    machines = report["machines"]
    lines.append(f"participants: {len(report['participants'])} on {machines} machine(s)")
    for pid, p in report["participants"].items():
        errors = ", ".join(f"{k} x{v}" for k, v in sorted(p["errors"].items())) or "no errors"
        lines.append(
            f"  {pid} on {p['host']} (boot {p['boot_id'][:8]}): {p['holds']} holds, longest "
            f"{p['longest_hold_seconds'] * 1000:.1f} ms; {errors}"
        )
    lines.append(
        f"exclusive create: {report['holds']} holds (link(2) {report['link_holds']}, O_EXCL "
        f"{report['excl_holds']}), {report['handoffs']} handoffs between participants "
        f"({report['cross_host_handoffs']} between machines); overlaps {report['overlaps']}"
    )
    lines.append(
        f"read-after-write: lost updates {report['lost_updates']}; renames: torn reads "
        f"{report['torn_reads']}, backwards reads {report['backwards_reads']}"
    )
    for pair, lag in report["lag_seconds"].items():
        lines.append(
            f"visibility lag {pair}: {lag['samples']} round trips, median "
            f"{lag['median'] * 1000:.1f} ms, max {lag['max'] * 1000:.1f} ms "
            f"(limit {report['max_lag_limit'] * 1000:g} ms)"
        )
    return lines
