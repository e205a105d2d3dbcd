"""The crash-and-pause explorer's machinery: one run of a protocol path, under one fault.

A run seeds the lock directory, starts the path's *target* process under `tracer.py`
(which records every system call the target makes on the lock's directory, and applies
the fault to one of them), starts contenders that an orchestrator would restart when
they exit, polls the lock file's content every few milliseconds, and stops everything
at the end. The commands under the fence are `oracle.py`, which log when they ran and
notice a second copy of themselves. `paths.py` says what each path does, `invariants.py`
judges a run, `matrix.py` runs every (path, call, fault) and writes the table.

Any pgfence source tree can be explored (`src`): the explorer only runs its `pgfence`
command (`python3 -m pgfence` with that tree on PYTHONPATH) and reads lock files as text.
"""

from __future__ import annotations

import json
import os
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
DELAY = WAIT + 1.0  # fault (a) on a lease path: the call is held this long
# ... on a strict path: past the same-token takeover wait of any version, 3 x 0.5 + 1 s,
# or twice that where strict holders fence themselves after 3 x 0.5 + 1 s.
STRICT_DELAY = 2 * (3 * STRICT_INTERVAL + 1.0) + 1.0
TOLERANCE = 0.1  # s: lock poll period + oracle beat + scheduling
FAULTS = ("delay", "before", "after")
# Every process a run started and has not yet reaped, for `kill_everything`.
LIVE: set[subprocess.Popen[bytes]] = set()
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
    target: Callable[[Run], list[str]]  # the target's command line
    seed: Callable[[Run], None]
    drive: Callable[[Run, list[str]], None]  # starts the target (argv) and contenders
    delay: float = DELAY  # how long fault (a) holds the call
    faults: tuple[str, ...] = FAULTS  # the faults that make sense on its calls
    backend: str = "file"  # the matrix's section: "file" or "etcd"
    make_run: Callable[[str, str], Run] | None = None  # (src, root) -> Run; None: a Run
    checks: Callable[[Run], dict[str, str]] | None = None  # invariants of its own


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
    fault_file: str = ""  # the tracer's fault spec for this run
    delay: float = DELAY  # the path's fault (a) delay
    poller: threading.Thread | None = None

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
        return self.pgfence(
            "run", "--lock-file", self.lock, "--token", token, *options, "--", *oracle
        )

    def start(
        self, name: str, argv: list[str], kind: str = "run", traced: str | None = None
    ) -> Proc:
        stderr = os.path.join(self.root, f"{name}-{len(self.procs)}.err")
        if traced is not None:
            log = os.path.join(self.root, "trace.jsonl")
            argv = [
                PYTHON,
                TRACER,
                "--dir",
                self.lock_dir,
                "--log",
                log,
                "--fault",
                traced,
                "--",
                *argv,
            ]
        with open(stderr, "wb") as err:
            popen = subprocess.Popen(
                argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        LIVE.add(popen)
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
        last: bytes | str | None = "unset"
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
                    {
                        "start": start,
                        "end": end,
                        "generation": generation,
                        "instance": instance,
                        "flock": got,
                    }
                )
        return sorted(found, key=lambda o: float(str(o["start"])))

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


# -- one run ----------------------------------------------------------------------


def execute(src: str, path: Path, fault: dict[str, object] | None, work: str) -> tuple[Run, Proc]:
    """One run of `path` with `fault` (None: record only); returns the run and its target."""
    root = os.path.join(work, f"run-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(os.path.join(root, "lock"))
    run = path.make_run(src, root) if path.make_run else Run(src, root)
    fault_file = os.path.join(root, "fault.json")
    with open(fault_file, "w") as f:
        json.dump(fault, f)
    run.fault_file = fault_file
    run.delay = path.delay
    path.seed(run)
    poller = threading.Thread(target=run.poll_lock, daemon=True)
    poller.start()
    try:
        path.drive(run, path.target(run))
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
                proc.popen.wait(run.delay + 5)
            except subprocess.TimeoutExpired:
                run.notes.append(f"{proc.name} did not stop on SIGTERM; killed")
                proc.popen.kill()
                proc.killed_by_us = True
                proc.popen.wait()
            proc.code = proc.popen.returncode
            LIVE.discard(proc.popen)
    run.poller = poller
    target = next(p for p in run.procs if p.name == "target")
    return run, target


def kill_everything() -> None:
    """SIGKILL every process the runs started (the explorer is interrupted). A killed
    pgfence takes its command along (parent-death signal); a killed tracer, its tracee."""
    for popen in list(LIVE):
        try:
            popen.kill()
        except OSError:
            pass


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


def wait_exit(proc: Proc, timeout: float) -> None:
    try:
        proc.popen.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def finish_polling(run: Run) -> None:
    """Stop the lock poller and keep its history in the run directory (for post-mortems)."""
    run.polled.set()
    if run.poller is not None:
        run.poller.join(2)
    with open(os.path.join(run.root, "lock-history.jsonl"), "w") as f:
        for when, data in run.history:
            text = None if data is None else data.decode("utf-8", "replace")
            f.write(json.dumps({"t": when, "lock": text}) + "\n")


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
