"""`pgfence verify-fs DIR`: is a shared directory safe for the file backend?

Start it at the same time on two or more machines that mount DIR the way PostgreSQL's volume
is mounted (same export, same mount options). The participants find each other through files
in `DIR/pgfence-verify.<session>/` only, hammer it for `--duration` seconds (see probe.py
for the workload), then each reads everyone's findings and prints the same verdict:

    SAFE          (exit 0) no overlap, no lost update, no torn or backwards read, and the
                  visibility lag stayed under --max-lag, with enough handoffs between
                  participants on different machines to mean something
    UNSAFE        (exit 1) at least one of those happened: do not use the file backend there
    INCONCLUSIVE  (exit 2) nothing bad seen, but too little was tested (a participant missing
                  or idle, too few handoffs, no lag measured, or every participant on one
                  machine without --allow-single-host)

Bad options exit 64, an unusable DIR 74. The session directory is removed by the last
participant to finish; a leftover one (a participant crashed) must be removed by hand.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from typing import Any, Callable

from pgfence import clock, log
from pgfence.config import Option, parse_options
from pgfence.errors import StorageError, UsageError, storage_error
from pgfence.verifyfs.probe import Files, Findings, Hammer, Prober
from pgfence.verifyfs.verdict import EXIT_CODES, INCONCLUSIVE, judge, render

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

OPTIONS = (
    Option("--duration", "duration", None, "SECONDS", "how long to hammer (default 30)"),
    Option(
        "--participants",
        "participants",
        None,
        "N",
        "participants to wait for before starting, at least 2 (default 2)",
    ),
    Option("--id", "id", None, "NAME", "this participant's name (default HOSTNAME-PID)"),
    Option(
        "--session",
        "session",
        None,
        "NAME",
        "name shared by the participants of one run (default default)",
    ),
    Option(
        "--join-timeout",
        "join_timeout",
        None,
        "SECONDS",
        "how long to wait for the other participants (default 300)",
    ),
    Option(
        "--max-lag",
        "max_lag",
        None,
        "SECONDS",
        "longest acceptable round trip of a change to a peer and back (default 1)",
    ),
    Option(
        "--allow-single-host",
        "allow_single_host",
        None,
        None,
        "accept participants that all run on one machine (e.g. two NFS mounts of one export)",
    ),
    Option("--json", "json", None, None, "print the report as one JSON object"),
)
USAGE = "usage: pgfence verify-fs DIR [OPTIONS]   (run it on two or more hosts at once)"
EXIT_CODES_HELP = (
    "Exit codes: 0 SAFE, 1 UNSAFE (do not use the file backend on this mount), "
    "2 INCONCLUSIVE (too little was tested: run longer, from every host), 64 usage, "
    "74 storage error."
)


def main(args: Sequence[str], emit: Callable[[str], None] | None = None) -> int:
    """Run one participant; `emit` receives the report's lines (cli.py passes print)."""
    out = emit or (lambda line: log.event("verify_fs", line))
    if any(a in ("-h", "--help") for a in args):
        from pgfence.helptext import format_rows, wrap

        out(USAGE)
        rows = [(o.flag + (f" {o.metavar}" if o.metavar else ""), o.help) for o in OPTIONS]
        for line in [*format_rows(rows).splitlines(), *wrap(EXIT_CODES_HELP).splitlines()]:
            out(line)
        return 0
    opts, directory = _parse(args)
    report = run(directory, opts)
    if opts["json"]:
        out(json.dumps(report, sort_keys=True))
    else:
        for line in render(report):
            out(line)
    return EXIT_CODES[str(report["verdict"])]


def _parse(args: Sequence[str]) -> tuple[dict[str, Any], str]:
    values, positional = parse_options(OPTIONS, args, "verify-fs", interleaved=True)
    if len(positional) != 1:
        raise UsageError(f"`pgfence verify-fs` needs exactly one directory; {USAGE}")

    def number(dest: str, default: float, low: float, high: float) -> float:
        raw = values.get(dest)
        if raw is None:
            return default
        try:
            value = float(str(raw))
        except ValueError:
            value = float("nan")
        if not low <= value <= high:
            flag = next(o.flag for o in OPTIONS if o.dest == dest)
            raise UsageError(f"{flag}={raw!r} must be a number from {low:g} to {high:g}")
        return value

    participants = number("participants", 2, 2, 64)
    if participants != int(participants):
        raise UsageError(f"--participants={values['participants']!r} must be a whole number")
    host = os.environ.get("HOSTNAME") or os.uname().nodename
    opts: dict[str, Any] = {
        "duration": number("duration", 30.0, 1.0, 86400.0),
        "participants": int(participants),
        "join_timeout": number("join_timeout", 300.0, 1.0, 86400.0),
        "max_lag": number("max_lag", 1.0, 0.001, 3600.0),
        "allow_single_host": bool(values.get("allow_single_host", False)),
        "json": bool(values.get("json", False)),
        "id": str(values.get("id") or re.sub(r"[^A-Za-z0-9._-]", "_", f"{host}-{os.getpid()}")),
        "session": str(values.get("session") or "default"),
        "host": host,
    }
    for key in ("id", "session"):
        if not _NAME.match(opts[key]):
            raise UsageError(f"--{key} {opts[key]!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return opts, positional[0]


def run(directory: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Join the session in `directory`, hammer it, and judge everyone's findings."""
    me = str(opts["id"])
    root = _session_dir(directory, str(opts["session"]))
    files = Files(root, me)
    _join(files, opts)
    try:
        peers = _wait_for(files, "join", int(opts["participants"]), float(opts["join_timeout"]))
        if len(peers) < int(opts["participants"]):
            _unlink(files.path(f"join/{me}"))
            return {
                "directory": directory,
                "verdict": INCONCLUSIVE,
                "reasons": [
                    f"only {len(peers)} of {opts['participants']} participants joined within "
                    f"{opts['join_timeout']:g} s"
                ],
            }
        log.event(
            "verify_fs",
            f"{len(peers)} participants joined ({', '.join(peers)}); "
            f"testing {directory} for {opts['duration']:g} s",
        )
        findings = Findings()
        prober = Prober(files, findings, peers)
        prober.start()
        try:
            started = clock.now()
            Hammer(files, findings).run(started + float(opts["duration"]))
            prober.measuring = False
            _write_result(files, opts, findings, clock.now() - started)
            joined = _read_all(files, "join").values()
            longest = max(float(p.get("duration", 0)) for p in joined)
            results = _wait_results(files, peers, longest + 30.0)
        finally:
            prober.stopping.set()
            prober.join()
    except OSError as exc:
        raise storage_error(exc, "use", root) from None
    report = judge(results, peers, opts)
    report["directory"] = directory
    _finish(files, peers)
    return report


def _session_dir(directory: str, session: str) -> str:
    if not os.path.isdir(directory):
        raise StorageError(f"{directory} is not a directory; give the shared directory to test")
    root = os.path.join(directory, f"pgfence-verify.{session}")
    try:
        for sub in ("", "join", "result", "done"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
    except OSError as exc:
        raise storage_error(exc, "create the session directory in", directory) from None
    return root


def _join(files: Files, opts: dict[str, Any]) -> None:
    me = str(opts["id"])
    if os.listdir(files.path("result")):
        raise UsageError(
            f"{files.root} holds the results of an earlier run; remove that directory, "
            "or give this run another --session"
        )
    entry = {
        "id": me,
        "host": opts["host"],
        "boot_id": clock.boot_id(),
        "pid": os.getpid(),
        "duration": opts["duration"],
    }
    try:
        joined = files.create(f"join/{me}", json.dumps(entry), use_link=True)
    except OSError as exc:
        raise storage_error(exc, "join the session in", files.root) from None
    if not joined:
        raise UsageError(
            f"participant id {me!r} is taken in {files.root}; give each participant its own "
            "--id, or remove a leftover session directory"
        )
    log.event("verify_fs", f"joined {files.root} as {me}; waiting for the others")


def _wait_for(files: Files, sub: str, count: int, timeout: float) -> list[str]:
    deadline = clock.now() + timeout
    while True:
        names = sorted(n for n in os.listdir(files.path(sub)) if not n.startswith("."))
        if len(names) >= count or clock.now() >= deadline:
            return [n[:-5] if n.endswith(".json") else n for n in names]
        time.sleep(0.05)


def _wait_results(files: Files, peers: list[str], timeout: float) -> dict[str, Any]:
    deadline = clock.now() + timeout
    while True:
        results = _read_all(files, "result")
        if all(p in results for p in peers) or clock.now() >= deadline:
            return results
        time.sleep(0.1)


def _read_all(files: Files, sub: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for name in os.listdir(files.path(sub)):
        if name.startswith("."):
            continue
        text = files.read(f"{sub}/{name}", whole=True)
        try:
            found[name[:-5] if name.endswith(".json") else name] = json.loads(text or "")
        except ValueError:
            continue  # still being written by a participant on a slow client
    return found


def _write_result(files: Files, opts: dict[str, Any], found: Findings, ran: float) -> None:
    result = {
        "id": opts["id"],
        "host": opts["host"],
        "boot_id": clock.boot_id(),
        "ran_seconds": round(ran, 3),
        **found.__dict__,
    }
    files.replace(f"result/{opts['id']}.json", json.dumps(result))


def _finish(files: Files, peers: list[str]) -> None:
    """Mark our reading done; the last participant to do so removes the session."""
    import shutil

    try:
        files.replace(f"done/{files.me}", "read\n")
        if set(peers) <= set(os.listdir(files.path("done"))):
            shutil.rmtree(files.root, ignore_errors=True)
    except OSError:
        pass


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
