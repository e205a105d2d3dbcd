"""The lock protocol's steps under pauses and crashes, with strace on real processes.

- A holder's release whose unlink strace delays past a takeover never lets two commands
  run at once (the release is a compare-and-delete under the takeover claim, guarded by
  the holder's deadline, and a late unlink fills the path again).
- A strict holder whose heartbeat writes stall kills its command before a contender
  with the same token starts one (strict mode has a self-fence deadline D, and a
  same-token takeover waits 2 D).
- An acquisition SIGKILLed at any of its calls, then `release --force`, never makes the
  next acquisition repeat a generation.

Each test also shows, against the harness itself, that it sees the bad outcome: the
overlap monitor sees two commands when two run (test_the_overlap_monitor_sees_two_commands).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import pytest

from conftest import needs_root, pgfence_run
from harness.fence import clean_env
from harness.lease import DEADLINE, PGFENCE, POLL, TAKEOVER_WAIT, TTL, events, read_lock
from harness.procs import Registry, alive
from harness.waiting import wait_for
from pgfence.record import LockRecord, parse

pytestmark = [needs_root, pytest.mark.integration]
needs_strace = pytest.mark.skipif(shutil.which("strace") is None, reason="needs strace")

# Appends "start <generation> <pid>" to the log, then runs for argv[2] seconds (or until
# killed, without one).
CHILD = (
    "import os, sys, time\n"
    "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)\n"
    "os.write(fd, f'start {os.environ[\"PGFENCE_GENERATION\"]} {os.getpid()}\\n'.encode())\n"
    "time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 3600)\n"
)


def starts(log: str) -> list[tuple[int, int]]:
    """(generation, pid) of every command started so far, in order."""
    try:
        with open(log, encoding="utf-8") as f:
            return [(int(w[1]), int(w[2])) for w in map(str.split, f) if len(w) == 3]
    except FileNotFoundError:
        return []


class OverlapMonitor(threading.Thread):
    """Polls every started command's pid; records every moment two were alive at once."""

    def __init__(self, log: str) -> None:
        super().__init__(daemon=True)
        self.log = log
        self.seen: list[list[tuple[int, int]]] = []
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            running = [(g, p) for g, p in starts(self.log) if alive(p)]
            if len(running) > 1:
                self.seen.append(running)
            time.sleep(0.002)

    def stop(self) -> list[list[tuple[int, int]]]:
        self._done.set()
        self.join(10)
        return self.seen


def fence(
    procs: Registry,
    directory: str,
    lock: str,
    token: str,
    options: Sequence[str],
    log: str,
    lifetime: float | None = None,
    prefix: Sequence[str] = (),
) -> tuple[subprocess.Popen[bytes], str]:
    """`pgfence run` around CHILD; returns the process and its stderr's path."""
    stderr = os.path.join(directory, f"{token}.log")
    child = [sys.executable, "-c", CHILD, log, *([f"{lifetime:g}"] if lifetime else [])]
    argv = [*prefix, PGFENCE, "run", "--lock-file", lock, "--token", token]
    argv += ["--log-format", "json", *options, "--", *child]
    with open(stderr, "ab") as err:
        proc = procs.start(argv, stderr=err, env=clean_env())
    return proc, stderr


def strace(lock: str, call: str, action: str) -> list[str]:
    """Run under strace, injecting `action` into `call`s that name the lock file."""
    return ["strace", "-f", "-qq", "-o", "/dev/null", "-P", lock, "-e", f"trace={call}",
            "-e", f"inject={call}:{action}"]  # fmt: skip


LEASE = ("--mode", "lease", "--ttl", f"{TTL:g}")


@pytest.fixture
def lock_path(shared_dir: str) -> str:
    return os.path.join(shared_dir, "fence_lock")


def _release_delayed(
    procs: Registry, shared_dir: str, lock_path: str, delay: float
) -> tuple[list[list[tuple[int, int]]], list[tuple[int, int]]]:
    """A lease holder whose command exits after 1 s; strace delays its release's unlink
    of the lock by `delay` (longer than the holder's deadline, so the release cannot tell
    whether it landed late, and fills the path again). Two contenders of other tokens
    wait for the lock meanwhile. Returns what the overlap monitor saw, and every command
    started."""
    log = os.path.join(shared_dir, "starts.log")
    delayed = strace(lock_path, "unlink", f"delay_enter={int(delay * 1e6)}:when=1")
    holder, holder_log = fence(procs, shared_dir, lock_path, "holder", LEASE, log, 1.0, delayed)
    wait_for(lambda: starts(log), "the holder's command", 30, POLL)
    monitor = OverlapMonitor(log)
    monitor.start()
    contender_logs = [
        fence(procs, shared_dir, lock_path, f"contender-{n}", LEASE, log)[1] for n in range(2)
    ]
    assert holder.wait(delay + 30) == 0, events(holder_log)
    wait_for(lambda: len(starts(log)) >= 2, "a contender's command", 60, POLL)
    # A lock deleted under a contender lets the other start within a poll interval; a
    # lock overwritten under it makes it stop within a renewal interval. Wait for both.
    time.sleep(TAKEOVER_WAIT + 1)
    seen = monitor.stop()
    # Nobody ever found the lock free: the late unlink was followed by a refill at once,
    # so each contender took a lock over after watching it (never created one).
    acquired = [e for path in contender_logs for e in events(path, "acquired")]
    assert acquired and all(e["previous"] != "free" for e in acquired), acquired
    return seen, starts(log)


@pytest.mark.timeout(120)
@needs_strace
def test_a_release_delayed_past_a_takeover_never_runs_two_commands(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    """The unlink lands after the lease has been silent for longer than the takeover
    wait. Without the claim, a contender would have taken the lock over meanwhile and
    the late unlink would delete its lock, so that the other contender creates one and
    starts a second command."""
    seen, started = _release_delayed(procs, shared_dir, lock_path, TAKEOVER_WAIT + 1)
    assert seen == []
    generations = [g for g, _ in started]
    assert generations == sorted(set(generations)), generations


@pytest.mark.timeout(120)
@needs_strace
def test_a_release_delayed_past_an_abandoned_claim_never_runs_two_commands(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    """Longer still: a contender calls the release's claim abandoned and takes the lock
    over on the next attempt, and the late unlink deletes its lock. The release sees
    that it was late and fills the path again at once, so the other contender waits out
    that lock instead of creating one, while the overtaken contender stops at its next
    renewal."""
    seen, started = _release_delayed(procs, shared_dir, lock_path, 3 * TAKEOVER_WAIT + 1)
    assert seen == []
    generations = [g for g, _ in started]
    assert generations == sorted(set(generations)), generations


@pytest.mark.timeout(120)
def test_a_strict_holder_whose_heartbeats_fail_stops_before_a_same_token_takeover(
    procs: Registry, shared_dir: str
) -> None:
    """The lock storage turns read-only under a strict holder (a remount in its own
    mount namespace, so others still write): every heartbeat fails. A second pgfence
    with the same token waits for the lock; it takes it over once the heartbeat has been
    silent for the takeover wait, 2 D. The holder must have killed its command by its
    deadline D, before that: the two commands never run at once."""
    log = os.path.join(shared_dir, "starts.log")
    locks = os.path.join(shared_dir, "locks")  # no file open for writing: can turn read-only
    os.mkdir(locks)
    lock_path = os.path.join(locks, "fence_lock")
    strict = ("--heartbeat-interval", "0.2")
    own_mounts = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                  'mount --bind "$0" "$0" && exec "$@"', locks]  # fmt: skip
    holder, holder_log = fence(procs, shared_dir, lock_path, "db", strict, log, prefix=own_mounts)
    wait_for(lambda: starts(log), "the holder's command", 30, POLL)
    monitor = OverlapMonitor(log)
    monitor.start()
    remount = ["nsenter", "-t", str(holder.pid), "-m", "mount", "-o", "remount,bind,ro"]
    done = subprocess.run([*remount, locks], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    contender, contender_log = fence(procs, shared_dir, lock_path, "db", strict, log)
    wait_for(lambda: len(starts(log)) >= 2, "the takeover", 40, POLL)
    time.sleep(1)
    assert monitor.stop() == []
    assert holder.wait(30) == 75
    (fenced,) = events(holder_log, "self_fenced")
    assert "renewal succeeded" in str(fenced["reason"])
    assert events(holder_log, "renew_failed")
    (first, _), (second, pid) = starts(log)
    assert second > first and alive(pid)
    left = read_lock(lock_path)
    assert left is not None and left.generation == second
    contender.terminate()
    assert contender.wait(30) == 143
    assert events(contender_log, "released")


CALLS = ("link", "rename", "unlink", "fsync")
# No heartbeat during the short command (so every run makes the same calls), and a dead
# claimer's claim is called abandoned after 2 * (3 * 0.5 + 1) s.
HEARTBEAT = ("--heartbeat-interval", "0.5")


def _run(lock: str, log: str, strace_options: Sequence[str]) -> int:
    """`pgfence run` (strict) of a short command under strace; its exit status."""
    argv = ["strace", "-f", "-qq", *strace_options,
            PGFENCE, "run", "--lock-file", lock, "--token", "db", *HEARTBEAT, "--",
            sys.executable, "-c", CHILD, log, "0"]  # fmt: skip
    return subprocess.run(argv, env=clean_env(), capture_output=True, timeout=60).returncode


def _generation_in(lock: str) -> int | None:
    try:
        with open(lock, "rb") as f:
            holder = parse(f.read(), lock)
    except FileNotFoundError:
        return None
    return holder.generation if isinstance(holder, LockRecord) else None


def _prepare(lock: str, start: str) -> None:
    """The starting state: no lock, or our token's one-line lock; no leftover claims or
    temporary files of an earlier crash (each crash point starts from the same state)."""
    directory = os.path.dirname(lock)
    for name in os.listdir(directory):
        if ".takeover-" in name or name.endswith(".tmp"):
            os.unlink(os.path.join(directory, name))
    if start == "one-line":
        with open(lock, "wb") as f:
            f.write(b"db\n")


@pytest.mark.timeout(900)
@needs_strace
@pytest.mark.parametrize("start", ["free", "one-line"])
def test_a_crash_at_any_call_of_an_acquisition_never_repeats_a_generation(
    shared_dir: str, lock_path: str, start: str
) -> None:
    """For every link, rename, unlink and fsync that an acquisition (and the release
    after its command) makes, as counted in a trace of an undisturbed run: SIGKILL
    pgfence at that call, `release --force` what it left (waiting out a claim it left),
    acquire again. Every generation a lock ever held or a command was given is larger
    than all before it. `one-line`: the lock starts as our token's one-line lock, so the
    acquisition is a takeover; `free`: it is created."""
    log = os.path.join(shared_dir, "starts.log")
    trace = os.path.join(shared_dir, "trace")
    handed_out: list[int] = []
    for call in CALLS:
        _prepare(lock_path, start)
        assert _run(lock_path, log, ["-o", trace, "-e", f"trace={call}"]) == 0
        with open(trace, encoding="utf-8") as f:
            lines = [line.split(maxsplit=1) for line in f if line.strip()]
        # strace counts calls per thread: those of pgfence's main thread, the first
        # traced, make up the acquisition and the release (no heartbeat runs meanwhile).
        count = sum(rest.startswith(f"{call}(") for tid, rest in lines if tid == lines[0][0])
        handed_out.append(starts(log)[-1][0])
        assert count > 0, f"an acquisition makes no {call} call"
        for occurrence in range(1, count + 1):
            _prepare(lock_path, start)
            before = len(starts(log))
            kill = ["-o", "/dev/null", "-e", f"trace={call}",
                    "-e", f"inject={call}:signal=KILL:when={occurrence}"]  # fmt: skip
            status = _run(lock_path, log, kill)
            new = [g for g, _ in starts(log)[before:]]
            left = _generation_in(lock_path)
            handed_out += new + ([left] if left is not None and left not in new else [])
            assert status == -9, f"{call} #{occurrence} of {count}: exit {status}"
            release = ("release", "--force", "--lock-file", lock_path, "--token", "op")
            done = pgfence_run(*release, env=clean_env(), timeout=60)
            assert done.returncode == 0, done.stderr
            assert handed_out == sorted(set(handed_out)), (call, occurrence, handed_out)
    _prepare(lock_path, start)
    assert _run(lock_path, log, ["-o", "/dev/null"]) == 0
    assert starts(log)[-1][0] > max(handed_out)


@pytest.mark.timeout(60)
def test_the_overlap_monitor_sees_two_commands(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    """Negative control: two fences on two lock files run two commands; the monitor
    must report them."""
    log = os.path.join(shared_dir, "starts.log")
    monitor = OverlapMonitor(log)
    monitor.start()
    fence(procs, shared_dir, lock_path, "a", LEASE, log)
    fence(procs, shared_dir, f"{lock_path}-other", "b", LEASE, log)
    wait_for(lambda: len(starts(log)) >= 2, "both commands", 30, POLL)
    time.sleep(DEADLINE)
    assert monitor.stop() != []
