"""The crash-and-pause explorer: every lock call of every protocol path, under every fault.

For each path (acquire a free lock, a one-line lock, a same-token lock, a silent lease;
renew; holder release; operator release; lease takeover), one run without a fault records
every system call the *target* process makes on the lock's directory (`tracer.py`). Then
one run per (call, fault) repeats the path with that call delayed past the takeover wait,
or the target SIGKILLed just before or just after it, while contenders run (restarted
when they exit, as an orchestrator would). After each run the checker reads what the
oracles under the fence logged (`oracle.py`), the lock file's content history (polled
every few milliseconds) and every exit status, and judges five invariants:

- one:        never two commands running under the fence at once;
- generation: the generations the commands got strictly increase;
- respected:  no lock is deleted or replaced by anyone else while its holder's command runs;
- exits:      every exit status is a documented one (and no traceback);
- recovers:   afterwards a correct acquisition succeeds without an operator, unless a
              strict-mode or one-line lock is left (the README: clearing those is an
              operator act; then `pgfence release --force` must work).

Any pgfence source tree can be explored (`src`): the explorer only runs its `pgfence`
command and reads its lock files as text.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
TRACER = os.path.join(HERE, "tracer.py")
ORACLE = os.path.join(HERE, "oracle.py")
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
LOCK_NAME = "fence_lock"
TTL = 2.0
WAIT = TTL + TTL / 4  # lease takeover wait W
STRICT_INTERVAL = 0.5  # strict heartbeat; silence is judged after 3 x 0.5 + 1 = 2.5 s
DELAY = WAIT + 1.0  # fault (a): the call is held this long
TOLERANCE = 0.1  # s: lock poll period + oracle beat + scheduling
RUN_CODES = {0, 64, 65, 73, 74, 75, 126, 127, *range(129, 193)}
RELEASE_CODES = {0, 65, 73, 74, *range(129, 193)}
FAULTS = ("delay", "before", "after")
LEASE = ("--mode", "lease", "--ttl", f"{TTL:g}")
STRICT = ("--mode", "strict", "--heartbeat-interval", f"{STRICT_INTERVAL:g}")


@dataclass
class Proc:
    name: str
    kind: str  # "run" or "release"
    popen: subprocess.Popen[bytes]
    stderr: str
    traced_log: str | None = None
    code: int | None = None
    killed_by_us: bool = False


@dataclass
class Path:
    name: str
    what: str
    phase: str  # the target's phase whose calls are the rows
    nth: int  # which burst of that phase (renewals: the second, a steady one)
    seed: Callable[[Run], None]
    drive: Callable[[Run, list[str]], None]  # starts the target (argv) and contenders


@dataclass
class Run:
    src: str
    root: str
    procs: list[Proc] = field(default_factory=list)
    history: list[tuple[float, bytes | None]] = field(default_factory=list)
    pools: list[threading.Thread] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    polled: threading.Event = field(default_factory=threading.Event)  # stop the lock poller
    seed_generation: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def lock_dir(self) -> str:
        return os.path.join(self.root, "lock")

    @property
    def lock(self) -> str:
        return os.path.join(self.lock_dir, LOCK_NAME)

    def env(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("FENCE_", "PGFENCE_", "PYTHON")) and k != "HOSTNAME"
        }
        env.update(PYTHONPATH=self.src, TRACER_LOCK_NAME=LOCK_NAME)
        return env

    def pgfence(self, *args: str) -> list[str]:
        return [PYTHON, "-m", "pgfence", *args]

    def run_argv(self, token: str, *options: str, once: bool = False) -> list[str]:
        oracle = [PYTHON, ORACLE, self.root, *(["--once"] if once else [])]
        return self.pgfence("run", "--lock-file", self.lock, "--token", token, *options, "--", *oracle)

    def start(self, name: str, argv: list[str], kind: str = "run", traced: str | None = None) -> Proc:
        stderr = os.path.join(self.root, f"{name}-{len(self.procs)}.err")
        if traced is not None:
            log = os.path.join(self.root, "trace.jsonl")
            argv = [PYTHON, TRACER, "--dir", self.lock_dir, "--log", log, "--fault", traced, "--", *argv]
        with open(stderr, "wb") as err:
            popen = subprocess.Popen(argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        proc = Proc(name, kind, popen, stderr, log if traced is not None else None)
        self.procs.append(proc)
        return proc

    def pool(self, name: str, argv: list[str], pause: float = 0.3) -> None:
        """Keep one contender running until the run stops (an orchestrator's restart policy)."""

        def loop() -> None:
            while not self.stopping.is_set():
                proc = self.start(name, argv)
                while proc.popen.poll() is None and not self.stopping.is_set():
                    time.sleep(0.02)
                if self.stopping.is_set():
                    return
                self.stopping.wait(pause)

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        self.pools.append(thread)

    def poll_lock(self) -> None:
        last: bytes | None | str = "unset"
        while not self.polled.is_set() or last == "unset":
            data = read_bytes(self.lock)
            if data != last:
                self.history.append((time.monotonic(), data))
                last = data
            time.sleep(0.003)

    def oracles(self) -> list[dict[str, object]]:
        found = []
        for name in sorted(os.listdir(self.root)):
            if not (name.startswith("oracle-") and name.endswith(".log")):
                continue
            start = end = None
            generation = instance = got = ""
            with open(os.path.join(self.root, name)) as f:
                for line in f:
                    parts = line.split()
                    if not parts:
                        continue
                    if parts[0] == "start" and len(parts) >= 5:
                        start = end = float(parts[1])
                        generation, instance, got = parts[2], parts[3], parts[4]
                    elif parts[0] in ("beat", "stop") and len(parts) >= 2:
                        try:
                            end = float(parts[1])
                        except ValueError:
                            pass
            if start is not None:
                found.append(
                    {"start": start, "end": end, "generation": generation, "instance": instance, "flock": got}
                )
        return sorted(found, key=lambda o: float(str(o["start"])))

    def target_pid(self, proc: Proc, timeout: float = 10.0) -> int:
        assert proc.traced_log is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in read_bytes(proc.traced_log, b"").decode().splitlines():
                record = json.loads(line)
                if record.get("event") == "start":
                    return int(record["pid"])
            time.sleep(0.01)
        raise RuntimeError("tracer did not start")

    def held_by_new_oracle(self, count: int, timeout: float, proc: Proc | None = None) -> bool:
        """Wait until more than `count` oracles have started (or `proc` exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(self.oracles()) > count:
                return True
            if proc is not None and proc.popen.poll() is not None:
                return False
            time.sleep(0.02)
        return False


def read_bytes(path: str, default: bytes | None = None) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return default
    except OSError:
        return default


def parse_lock(data: bytes | None) -> dict[str, str] | None:
    """A lock's fields as text (any pgfence version): token, mode, generation, instance."""
    if data is None:
        return None
    lines = data.decode("utf-8", "replace").splitlines()
    fields = {"token": lines[0] if lines else ""}
    if len(lines) <= 1 or not lines[1].startswith("pgfence-lock"):
        fields["mode"] = "one-line"
        return fields
    for line in lines[2:]:
        key, _, value = line.partition("=")
        fields[key] = value
    return fields


def record(token: str, mode: str, generation: int, interval: float) -> bytes:
    """A pgfence lock record of a holder that died at once (its heartbeat never moves)."""
    lines = [
        token,
        "pgfence-lock 1",
        "instance=00000000dead0000",
        f"mode={mode}",
        f"generation={generation}",
        "heartbeat=0",
        f"interval={interval:g}",
        f"ttl={TTL if mode == 'lease' else 0:g}",
        f"lock_delay={TTL / 4 if mode == 'lease' else 0:g}",
        "pid=999999",
        "host=gone",
        "boot_id=00000000-0000-0000-0000-000000000000",
        "clock=0.000",
        "acquired_at=2026-01-01T00:00:00Z",
        "heartbeat_at=2026-01-01T00:00:00Z",
    ]
    return ("\n".join(lines) + "\n").encode()


def seed_file(run: Run, data: bytes, generation: int) -> None:
    with open(run.lock, "wb") as f:
        f.write(data)
    with open(f"{run.lock}.generation", "w") as f:
        f.write(f"{generation}\n")
    run.seed_generation = generation


# -- the paths ------------------------------------------------------------------------


def seed_none(run: Run) -> None:
    pass


def seed_one_line(run: Run) -> None:
    with open(run.lock, "wb") as f:
        f.write(b"A\n")


def seed_same_token(run: Run) -> None:
    seed_file(run, record("A", "strict", 5, STRICT_INTERVAL), 5)


def seed_silent_lease(run: Run) -> None:
    seed_file(run, record("X", "lease", 5, TTL / 6), 5)


def hold_then_stop(run: Run, target: Proc, hold: float, wait_for_start: float, seen: int = 0) -> None:
    """Let the target hold `hold` s once its command runs (or until it exits), then SIGTERM.
    `seen`: how many commands had started before the target."""
    run.held_by_new_oracle(seen, wait_for_start, target)
    end = time.monotonic() + hold
    while time.monotonic() < end and target.popen.poll() is None:
        time.sleep(0.02)
    stop(target)


def stop(proc: Proc) -> None:
    if proc.popen.poll() is None:
        pid = proc.popen.pid
        if proc.traced_log is not None:
            try:
                pid = target_pid_quick(proc)
            except RuntimeError:
                pass
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def target_pid_quick(proc: Proc) -> int:
    for line in read_bytes(proc.traced_log or "", b"").decode().splitlines():
        record = json.loads(line)
        if record.get("event") == "start":
            return int(record["pid"])
    raise RuntimeError("no start")


def drive_acquire(strict_target: bool, pool_argv: Callable[[Run], list[str]]) -> Callable[[Run, list[str]], None]:
    def drive(run: Run, target_argv: list[str]) -> None:
        target = run.start("target", target_argv, traced=run.fault_file)  # type: ignore[attr-defined]
        # The target goes first: without a fault it takes the path under test, and the
        # contenders race it only when the fault holds it up.
        time.sleep(1.0)
        run.pool("contender", pool_argv(run))
        hold_then_stop(run, target, 1.5, DELAY + WAIT + 3)

    return drive


def lease_contender(run: Run) -> list[str]:
    return run.run_argv("B", *LEASE)


def same_token_contender(run: Run) -> list[str]:
    return run.run_argv("A", *STRICT)


def drive_renew(pool_argv: Callable[[Run], list[str]]) -> Callable[[Run, list[str]], None]:
    def drive(run: Run, target_argv: list[str]) -> None:
        target = run.start("target", target_argv, traced=run.fault_file)  # type: ignore[attr-defined]
        run.held_by_new_oracle(0, 10, target)
        run.pool("contender", pool_argv(run), pause=0.5)
        hold_then_stop(run, target, DELAY + WAIT + 0.5, 0)

    return drive


def drive_release(run: Run, target_argv: list[str]) -> None:
    target = run.start("target", target_argv, traced=run.fault_file)  # type: ignore[attr-defined]
    run.held_by_new_oracle(0, 10, target)
    run.pool("contender", lease_contender(run))
    time.sleep(1.0)
    stop(target)
    wait_exit(target, DELAY + 5)


def drive_operator_release(run: Run, target_argv: list[str]) -> None:
    holder = run.start("holder", run.run_argv("H", *STRICT))
    run.held_by_new_oracle(0, 10, holder)
    time.sleep(0.6)
    os.kill(holder.popen.pid, signal.SIGKILL)  # the holder's container dies
    holder.killed_by_us = True
    holder.popen.wait()
    target = run.start("target", target_argv, kind="release", traced=run.fault_file)  # type: ignore[attr-defined]
    time.sleep(1.0)
    run.pool("contender", run.run_argv("H", *STRICT), pause=0.5)
    wait_exit(target, DELAY + 10)


def drive_takeover(run: Run, target_argv: list[str]) -> None:
    holder = run.start("holder", run.run_argv("H", *LEASE))
    run.held_by_new_oracle(0, 10, holder)
    time.sleep(0.5)
    os.kill(holder.popen.pid, signal.SIGKILL)  # the holder's container dies
    holder.killed_by_us = True
    holder.popen.wait()
    target = run.start("target", target_argv, traced=run.fault_file)  # type: ignore[attr-defined]
    time.sleep(1.0)
    run.pool("contender", lease_contender(run))
    hold_then_stop(run, target, 1.5, DELAY + 2 * WAIT + 3, seen=1)


def wait_exit(proc: Proc, timeout: float) -> None:
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


PATHS = [
    Path("acquire-free", "strict, free lock", "main", 1, seed_none, drive_acquire(True, lease_contender)),
    Path("acquire-one-line", "strict, one-line lock of our token", "main", 1, seed_one_line,
         drive_acquire(True, lease_contender)),
    Path("acquire-same-token", "strict, dead lock of our token (other instance)", "main", 1,
         seed_same_token, drive_acquire(True, same_token_contender)),
    Path("acquire-silent-lease", "lease, silent lease of another token", "main", 1,
         seed_silent_lease, drive_acquire(False, lease_contender)),
    Path("renew", "lease, the renewer's steady-state renewal", "t1", 2, seed_none,
         drive_renew(lease_contender)),
    Path("renew-strict", "strict, the heartbeat", "t1", 2, seed_none, drive_renew(same_token_contender)),
    Path("holder-release", "lease, release after the command exits", "main-after-thread", 1,
         seed_none, drive_release),
    Path("operator-release", "`pgfence release` of a crashed strict holder", "main", 1, seed_none,
         drive_operator_release),
    Path("lease-takeover", "lease, take over a crashed holder's lease", "main", 1, seed_none,
         drive_takeover),
]
TARGET_ARGV: dict[str, Callable[[Run], list[str]]] = {
    "acquire-free": lambda r: r.run_argv("A", *STRICT),
    "acquire-one-line": lambda r: r.run_argv("A", *STRICT),
    "acquire-same-token": lambda r: r.run_argv("A", *STRICT),
    "acquire-silent-lease": lambda r: r.run_argv("A", *LEASE),
    "renew": lambda r: r.run_argv("A", *LEASE),
    "renew-strict": lambda r: r.run_argv("A", *STRICT),
    "holder-release": lambda r: r.run_argv("A", *LEASE),
    "operator-release": lambda r: r.pgfence("release", "--lock-file", r.lock, "--token", "O"),
    "lease-takeover": lambda r: r.run_argv("T", *LEASE),
}


# -- one run ----------------------------------------------------------------------------


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


def execute(src: str, path: Path, fault: dict[str, object] | None, work: str) -> tuple[Run, Proc]:
    """One run of `path` with `fault` (None: record only); returns the run and its target."""
    root = os.path.join(work, f"run-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(os.path.join(root, "lock"))
    run = Run(src, root)
    fault_file = os.path.join(root, "fault.json")
    with open(fault_file, "w") as f:
        json.dump(fault, f)
    run.fault_file = fault_file  # type: ignore[attr-defined]
    path.seed(run)
    poller = threading.Thread(target=run.poll_lock, daemon=True)
    poller.start()
    try:
        path.drive(run, TARGET_ARGV[path.name](run))
        # Settle: let contenders take over what the fault left, as they would.
        time.sleep(WAIT + 1.0)
    finally:
        run.stopping.set()
        for pool in run.pools:
            pool.join(5)
        for proc in run.procs:
            stop(proc)
        for proc in run.procs:
            try:
                proc.popen.wait(DELAY + 5)
            except subprocess.TimeoutExpired:
                run.notes.append(f"{proc.name} did not stop on SIGTERM; killed")
                proc.popen.kill()
                proc.killed_by_us = True
                proc.popen.wait()
            proc.code = proc.popen.returncode
    run.poller = poller  # type: ignore[attr-defined]
    target = next(p for p in run.procs if p.name == "target")
    return run, target


def finish_polling(run: Run) -> None:
    run.polled.set()
    run.poller.join(2)  # type: ignore[attr-defined]


def recover(run: Run) -> str:
    """After the run: can a correct newcomer acquire, without an operator where it must?"""
    left = parse_lock(read_bytes(run.lock))
    verdict = "ok"
    if left is not None and left.get("mode") in ("strict", "one-line"):
        # Clearing a strict-mode or one-line lock is an operator act (README); it must work.
        verdict = f"ok (strict: {left.get('mode')} lock left, operator release)"
        released = subprocess.run(
            run.pgfence("release", "--force", "--lock-file", run.lock, "--token", "O"),
            env=run.env(), capture_output=True, timeout=30,
        )
        if released.returncode != 0:
            return (
                f"VIOLATION: `pgfence release --force` exited {released.returncode}: "
                f"{released.stderr.decode(errors='replace').strip()[:160]}"
            )
    before = len(run.oracles())
    probe = subprocess.run(
        run.run_argv("R", *LEASE, "--no-wait", once=True),
        env=run.env(), capture_output=True, timeout=3 * WAIT + 20,
    )
    if len(run.oracles()) > before and probe.returncode == 0:
        return verdict
    # --no-wait gives up when the heartbeat moves, or a claim is busy: wait once more.
    probe = subprocess.run(
        run.run_argv("R", *LEASE, once=True), env=run.env(), capture_output=True, timeout=3 * WAIT + 20
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
        (a, b) for i, a in enumerate(oracles) for b in oracles[i + 1 :]
        if float(str(b["start"])) < float(str(a["end"]))
    ]
    if busy or overlaps:
        pairs = ", ".join(f"gen {a['generation']}+{b['generation']}" for a, b in overlaps) or "flock busy"
        verdicts["one"] = f"VIOLATION: two commands at once ({pairs})"
    else:
        verdicts["one"] = "ok"
    gens = [int(str(o["generation"])) for o in oracles if str(o["generation"]).isdigit()]
    bad = [(a, b) for a, b in zip([run.seed_generation, *gens], gens) if b <= a]
    verdicts["generation"] = (
        f"VIOLATION: a command got generation {bad[0][1]} after {bad[0][0]}" if bad else "ok"
    )
    if not bad:
        # The lock file too: every new holder's generation above every earlier one.
        seen: list[tuple[str, int]] = []
        for _, data in run.history:
            fields = parse_lock(data)
            if fields is None or not fields.get("generation", "").isdigit():
                continue
            holder = (fields.get("instance", ""), int(fields["generation"]))
            if seen and holder == seen[-1]:
                continue
            if seen and holder[1] <= max(g for _, g in seen):
                verdicts["generation"] = (
                    f"VIOLATION: the lock got generation {holder[1]} again "
                    f"(after {max(g for _, g in seen)})"
                )
                break
            seen.append(holder)
    verdicts["respected"] = respected(run, oracles)
    verdicts["exits"] = exits(run, target)
    verdicts["recovers"] = recovered
    return describe(run, target, oracles), verdicts


def respected(run: Run, oracles: list[dict[str, object]]) -> str:
    """No lock replaced or deleted by another while its holder's command still runs."""
    for (_, old), (when, new) in zip(run.history, run.history[1:]):
        before, after = parse_lock(old), parse_lock(new)
        if before is None or "instance" not in before:
            continue
        if after is not None and (after.get("instance"), after.get("generation")) == (
            before.get("instance"), before.get("generation")
        ):
            continue  # a heartbeat of the same holder
        for o in oracles:
            if o["instance"] == before["instance"] and str(o["generation"]) == before.get("generation"):
                late = float(str(o["end"])) - when
                if float(str(o["start"])) < when and late > TOLERANCE:
                    what = "deleted" if new is None else f"replaced by gen {after and after.get('generation')}"
                    return (
                        f"VIOLATION: lock of gen {before['generation']} {what} while its "
                        f"command ran {late:.2f} s more"
                    )
    return "ok"


def exits(run: Run, target: Proc) -> str:
    bad = []
    for proc in run.procs:
        if proc.killed_by_us or (proc is target and fired(target)):
            continue
        codes = RELEASE_CODES if proc.kind == "release" else RUN_CODES
        err = read_bytes(proc.stderr, b"").decode(errors="replace")
        if proc.code not in codes or "Traceback" in err:
            bad.append(f"{proc.name} exited {proc.code}" + (" with a traceback" if "Traceback" in err else ""))
    return f"VIOLATION: {'; '.join(sorted(set(bad)))}" if bad else "ok"


def trace_records(proc: Proc) -> list[dict[str, object]]:
    out = []
    for line in read_bytes(proc.traced_log or "", b"").decode(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def fired(proc: Proc) -> str | None:
    for r in trace_records(proc):
        if r.get("event") == "fault":
            return str(r["kind"])
    return None


def describe(run: Run, target: Proc, oracles: list[dict[str, object]]) -> str:
    exit_of = {"before": "killed before", "after": "killed after", "delay": "delayed"}
    kind = fired(target)
    parts = [exit_of[kind] if kind else "fault not reached"]
    if kind != "before" and kind != "after":
        parts.append(f"target exit {target.code}")
    gens = [str(o["generation"]) for o in oracles]
    parts.append(f"commands ran with gen {','.join(gens) or 'none'}")
    return "; ".join(parts)


# -- the matrix ---------------------------------------------------------------------------


@dataclass
class Row:
    path: Path
    prefix: list[str]
    fault: str

    @property
    def call(self) -> str:
        return f"#{len(self.prefix)} {self.prefix[-1]}"


def enumerate_calls(src: str, path: Path, work: str) -> list[list[str]]:
    """The target's lock calls on `path`, from a traced run without a fault."""
    run, target = execute(src, path, None, work)
    prefixes: list[list[str]] = []
    for r in trace_records(target):
        if r.get("phase") == path.phase and r.get("nth") == path.nth and "prefix" in r:
            prefix = [str(s) for s in r["prefix"]]  # type: ignore[attr-defined]
            if prefix not in prefixes:
                prefixes.append(prefix)
    shutil.rmtree(run.root, ignore_errors=True)
    if not prefixes:
        raise RuntimeError(f"{path.name}: the target made no lock call in phase {path.phase}")
    return prefixes


def run_row(src: str, row: Row, work: str, keep: bool) -> Outcome:
    started = time.monotonic()
    fault: dict[str, object] = {
        "phase": row.path.phase, "prefix": row.prefix, "nth": row.path.nth, "kind": row.fault,
        "seconds": DELAY,
    }
    run, target = execute(src, row.path, fault, work)
    try:
        recovered = recover(run)
    except subprocess.TimeoutExpired:
        recovered = "VIOLATION: the recovery probe hung"
    finish_polling(run)
    outcome, verdicts = judge(run, target, recovered)
    if run.notes:
        outcome += "; " + "; ".join(run.notes)
    result = Outcome(row.path.name, row.call, row.fault, outcome, verdicts, time.monotonic() - started)
    if result.violations and keep:
        result.outcome += f" (kept: {run.root})"
    else:
        shutil.rmtree(run.root, ignore_errors=True)
    return result


def quick_selection(rows: list[Row]) -> list[Row]:
    """A representative slice: every fault on the calls that change the lock (or its
    generation) on the release and takeover paths, and the first and last call of
    every other path under the fault most likely to matter there."""
    chosen = []
    by_path: dict[str, list[Row]] = {}
    for row in rows:
        by_path.setdefault(row.path.name, []).append(row)
    for name, path_rows in by_path.items():
        sigs = [r.prefix[-1] for r in path_rows]
        for row in path_rows:
            sig = row.prefix[-1]
            changes_lock = sig.startswith(("rename(tmp→lock", "link(tmp→lock", "unlink(lock", "rename(tmp→.gen"))
            if name in ("holder-release", "lease-takeover", "operator-release") and changes_lock:
                chosen.append(row)
            elif name in ("acquire-free",) and changes_lock and row.fault == "after":
                chosen.append(row)
            elif name == "renew" and sig.startswith("rename(tmp→lock") and row.fault == "delay":
                chosen.append(row)
            elif name == "renew-strict" and sig.startswith("rename(tmp→lock") and row.fault == "delay":
                chosen.append(row)
        del sigs
    return chosen


def build_rows(src: str, paths: list[Path], faults: tuple[str, ...], work: str,
               progress: Callable[[str], None]) -> list[Row]:
    rows = []
    for path in paths:
        prefixes = enumerate_calls(src, path, work)
        progress(f"{path.name}: {len(prefixes)} calls traced")
        for prefix in prefixes:
            for fault in faults:
                rows.append(Row(path, prefix, fault))
    return rows


def run_matrix(src: str, rows: list[Row], work: str, jobs: int, keep: bool,
               progress: Callable[[str], None]) -> list[Outcome]:
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
            progress(f"[{done[0]}/{len(rows)}] {result.path} {result.call} {result.fault}: {mark} ({result.seconds:.1f} s)")

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(one, range(len(rows))))
    return [r for r in results if r is not None]


def markdown(results: list[Outcome], command: str, src_note: str, seconds: float) -> str:
    violations = sum(1 for r in results if r.violations)
    lines = [
        "# Safety matrix",
        "",
        "Generated by the crash-and-pause explorer (`tests/harness/explorer.py`); do not edit by hand.",
        f"Regenerate with `{command}`.",
        "",
        f"{len(results)} runs, {violations} with a violation; {src_note}; "
        f"{seconds / 60:.1f} min on this machine.",
        "",
        "Each row is one run: the *target* process of a path (see `explorer.PATHS`) makes its",
        "system calls on the lock's directory, as traced by `tests/harness/tracer.py` in a run",
        "without a fault (`#k` is the call's position in its burst of calls), and the fault is",
        f"applied to that one call: `delay` holds the calling thread {DELAY:g} s (past the",
        f"takeover wait of {WAIT:g} s at `--ttl {TTL:g}`, and past the strict observation period",
        f"at `--heartbeat-interval {STRICT_INTERVAL:g}`), `before`/`after` SIGKILL the process",
        "just before the call runs or just after it returned. Contenders run meanwhile and are",
        "restarted when they exit. Invariants: **one** never two commands under the fence at",
        "once; **generation** the commands' generations strictly increase; **respected** no",
        "lock deleted or replaced by another while its holder's command runs",
        f"(tolerance {TOLERANCE:g} s); **exits** every exit status documented, no traceback;",
        "**recovers** a correct newcomer acquires afterwards without an operator, except",
        "after a strict-mode or one-line lock, which `pgfence release --force` must clear.",
        "",
        "| path | call | fault | outcome | one | generation | respected | exits | recovers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        cells = [r.path, f"`{r.call}`", r.fault, r.outcome.replace("|", "/")]
        cells += [r.verdicts[k].replace("|", "/") for k in INVARIANTS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
