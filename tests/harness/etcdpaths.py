"""The etcd backend's paths for the crash-and-pause explorer, on a real single-member etcd.

The target is `pgfence run --backend etcd` under `tracer.py` with TRACER_ETCD=1, so its
lock calls are the HTTP requests of the protocol (etcdcalls.py: auth, lease grant, the
create guarded on create revision 0, keep-alives, the guarded renewal transactions, the
release's delete guarded on create revision and lease, the lease revoke) and the system
calls on the generation mark beside the data directory (`<lock file>.generation`, in the
run's lock directory). Contenders, orchestrator restarts and the five invariants are the
file paths' (paths.py, invariants.py); the run polls the etcd key instead of a lock file,
and judges one invariant more:

- key: every create revision of the key carries one holder's records; every command's
  generation is at least the create revision of its holder's key; and the key is created
  only after it stayed absent for the lock delay (TTL/2 + TTL/6), even the first time.

One etcd (authentication on, user `pgfence` with readwrite on the matrix's prefix) serves
every run of a process; each run has a key of its own.
"""

from __future__ import annotations

import base64
import http.client
import json
import math
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from harness import etcd
from harness.explorer import (
    FAULTS,
    LEASE,
    LIVE,
    TOLERANCE,
    TTL,
    Path,
    Proc,
    Run,
    parse_lock,
    trace_records,
    wait_exit,
)
from harness.paths import (
    crash_holder,
    drive_release,
    drive_renew,
    hold_then_stop,
    lease_contender,
    seed_none,
)

PREFIX = "/pgfence-matrix/"
USER = "pgfence"
ELECTION_MS = 50  # one member never holds an election after it started: TTL 2 s is allowed
LOCK_DELAY = TTL / 2 + TTL / 6  # the etcd backend's default and least lock delay
WAIT = math.ceil(TTL) + LOCK_DELAY  # a killed holder's lease expires, then the lock delay
DELAY = WAIT + 1.0  # fault `delay`/`late`: the thread is held past every contender's wait
ETCD_FAULTS = (*FAULTS, "lost", "late")
ETCD_ONLY_FAULTS = ("lost", "late")  # only on an etcd request, not on the mark's calls

_cluster: etcd.EtcdCluster | None = None
_cluster_dir = ""
_password_file = ""
_cluster_lock = threading.Lock()


def cluster() -> tuple[etcd.EtcdCluster, str]:
    """The process's etcd (started on first use) and the password file of USER."""
    global _cluster, _cluster_dir, _password_file
    with _cluster_lock:
        if _cluster is None:
            _cluster_dir = tempfile.mkdtemp(prefix="pgfence-matrix-etcd-")
            flags = ["--heartbeat-interval", "10", "--election-timeout", str(ELECTION_MS)]
            started = etcd.EtcdCluster(_cluster_dir, size=1, extra=flags)
            started.start()
            LIVE.update(m.proc for m in started.members if m.proc is not None)
            password = uuid.uuid4().hex
            started.enable_auth(USER, password, PREFIX)
            _password_file = os.path.join(_cluster_dir, "password")
            with open(_password_file, "w") as f:
                f.write(password + "\n")
            _cluster = started
        return _cluster, _password_file


def stop_cluster() -> None:
    global _cluster
    with _cluster_lock:
        if _cluster is not None:
            for member in _cluster.members:
                if member.proc is not None:
                    LIVE.discard(member.proc)
            _cluster.stop()
            _cluster = None
            shutil.rmtree(_cluster_dir, ignore_errors=True)


class Peek:
    """Reads the key over its own connection, logged in as USER."""

    def __init__(self, endpoint: str, password_file: str) -> None:
        host, _, port = endpoint.removeprefix("http://").partition(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=5)
        with open(password_file) as f:
            self.password = f.read().strip()
        self.token = ""

    def call(self, path: str, body: dict[str, object]) -> dict[str, object]:
        headers = {"Content-Type": "application/json"}
        if self.token:
            headers["Authorization"] = self.token
        self.conn.request("POST", path, json.dumps(body), headers)
        answer = json.loads(self.conn.getresponse().read())
        assert isinstance(answer, dict)
        return answer

    def get(self, key: str) -> dict[str, object] | None:
        if not self.token:
            login = self.call("/v3/auth/authenticate", {"name": USER, "password": self.password})
            self.token = str(login["token"])
        answer = self.call("/v3/kv/range", {"key": _b64(key.encode())})
        if "error" in answer:
            self.token = ""  # e.g. a token etcd forgot: log in again
            raise OSError(str(answer["error"]))
        kvs = answer.get("kvs") or []
        assert isinstance(kvs, list)
        return kvs[0] if kvs else None

    def revoke(self, lease: int) -> None:
        self.call("/v3/lease/revoke", {"ID": str(lease)})


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


KeyState = tuple[int, int, bytes]  # create revision, lease, value


@dataclass
class EtcdRun(Run):
    endpoint: str = ""
    key: str = ""
    password_file: str = ""
    keys: list[tuple[float, KeyState | None]] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        env = super().env()
        env.update(
            FENCE_BACKEND="etcd",
            FENCE_ETCD_ENDPOINTS=self.endpoint,
            FENCE_ETCD_KEY=self.key,
            FENCE_ETCD_USER=USER,
            FENCE_ETCD_PASSWORD_FILE=self.password_file,
            FENCE_ETCD_ELECTION_TIMEOUT=str(ELECTION_MS),
            TRACER_ETCD="1",
        )
        return env

    def poll_lock(self) -> None:
        """The key's states, when they changed (the file paths poll the lock file)."""
        peek = Peek(self.endpoint, self.password_file)
        last: KeyState | str | None = "unset"
        while not self.polled.is_set() or last == "unset":
            try:
                kv = peek.get(self.key)
            except (OSError, http.client.HTTPException, ValueError):
                peek.conn.close()
                time.sleep(0.01)
                continue
            now = time.monotonic()
            state: KeyState | None = None
            if kv is not None:
                value = base64.b64decode(str(kv.get("value", "")))
                state = (
                    int(str(kv.get("create_revision", 0))),
                    int(str(kv.get("lease", 0))),
                    value,
                )
            if state != last:
                self.keys.append((now, state))
                self.history.append((now, None if state is None else state[2]))
                last = state
            time.sleep(0.005)

    def revoke_holders_lease(self) -> None:
        """Revoke the lease of the key's holder, as a stuck etcd leader did (etcd#15247)."""
        state = next((s for _, s in reversed(self.keys) if s is not None), None)
        if state is not None:
            peek = Peek(self.endpoint, self.password_file)
            peek.get(self.key)
            peek.revoke(state[1])


def make_run(src: str, root: str) -> Run:
    started, password_file = cluster()
    return EtcdRun(
        src,
        root,
        endpoint=started.endpoints(),
        key=f"{PREFIX}{uuid.uuid4().hex[:12]}",
        password_file=password_file,
    )


def key_checks(run: Run) -> dict[str, str]:
    return {"key": key_verdict(run) if isinstance(run, EtcdRun) else "ok"}


def key_verdict(run: EtcdRun) -> str:
    owners: dict[int, set[str]] = {}
    absent_since: float | None = None
    previous: KeyState | None = None
    for i, (when, state) in enumerate(run.keys):
        if state is None:
            if i == 0 or previous is not None:
                absent_since = when
        else:
            revision, _, value = state
            if previous is None or previous[0] != revision:  # created
                gap = when - absent_since if absent_since is not None else math.inf
                if i > 0 and gap < LOCK_DELAY - TOLERANCE:
                    return (
                        f"VIOLATION: the key was created (revision {revision}) {gap:.2f} s "
                        f"after it was seen absent, within the lock delay {LOCK_DELAY:.3g} s"
                    )
            fields = parse_lock(value) or {}
            owners.setdefault(revision, set()).add(fields.get("instance", "?"))
        previous = state
    for revision, instances in owners.items():
        if len(instances) > 1:
            return f"VIOLATION: create revision {revision} holds {len(instances)} holders' records"
    for o in run.oracles():
        mine = [r for r, instances in owners.items() if o["instance"] in instances]
        generation = str(o["generation"])
        if not mine:
            return f"VIOLATION: a command of generation {generation} ran without a key of its own"
        if not generation.isdigit() or int(generation) < max(mine):
            return f"VIOLATION: a command got generation {generation} below its key's {max(mine)}"
    return "ok"


# -- what happens around the target ----------------------------------------------------
# A contender creates the key once it saw it absent for the lock delay, counted from its
# own first look: it starts after the target's first look (slowed by the tracer), so that
# without a fault the target takes the path under test.


def first_look(run: Run, target: Proc, timeout: float = 15.0) -> None:
    """Wait until the traced target has read the key once."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and target.popen.poll() is None:
        if any(r.get("sig") == "etcd range" for r in trace_records(target)):
            return
        time.sleep(0.02)


def drive_acquire(run: Run, target_argv: list[str]) -> None:
    target = run.start("target", target_argv, traced=run.fault_file)
    first_look(run, target)
    time.sleep(0.5)
    run.pool("contender", lease_contender(run))
    hold_then_stop(run, target, 1.5, run.delay + WAIT + 3)


def drive_takeover(run: Run, target_argv: list[str]) -> None:
    """A holder H crashes (its lease expires); T, then B and C, wait for the key."""
    assert isinstance(run, EtcdRun)
    crash_holder(run, LEASE)
    target = run.start("target", target_argv, traced=run.fault_file)
    first_look(run, target)
    deadline = time.monotonic() + WAIT + 5
    while time.monotonic() < deadline and not (run.keys and run.keys[-1][1] is None):
        time.sleep(0.02)
    time.sleep(0.3)  # the key is gone: T counts its absence first
    run.pool("contender", lease_contender(run))
    run.pool("contender", run.run_argv("C", *LEASE))
    hold_then_stop(run, target, 1.5, run.delay + 2 * WAIT + 3, seen=1)


def revoked_checks(run: Run) -> dict[str, str]:
    """The scene below deletes the key under a live holder on purpose: its command may run
    until the holder's next renewal (one interval, TTL/6) notices, no longer; contenders
    wait the lock delay, which outlasts that."""
    verdicts = key_checks(run)
    if isinstance(run, EtcdRun):
        verdicts["respected"] = respected_within(run, TTL / 6 + TOLERANCE)
    return verdicts


def respected_within(run: EtcdRun, bound: float) -> str:
    """No holder's command runs on longer than `bound` after its key vanished or changed."""
    oracles = run.oracles()
    for i in range(1, len(run.keys)):
        (_, old), (when, new) = run.keys[i - 1], run.keys[i]
        if old is None or (new is not None and new[0] == old[0]):
            continue
        instance = (parse_lock(old[2]) or {}).get("instance")
        for o in oracles:
            late = float(str(o["end"])) - when
            if o["instance"] == instance and float(str(o["start"])) < when and late > bound:
                return (
                    f"VIOLATION: the key of gen {o['generation']} vanished while its command "
                    f"ran {late:.2f} s more (bound {bound:.2f} s)"
                )
    return "ok"


def drive_revoked(run: Run, target_argv: list[str]) -> None:
    """The target holds; a contender waits; the target's lease is revoked under it, as a
    stuck etcd leader did (etcd#15247). The contender may create the key only after the
    lock delay, by when the target has noticed at a renewal and killed its command."""
    assert isinstance(run, EtcdRun)
    target = run.start("target", target_argv)
    run.held_by_new_oracle(0, 15, target)
    run.pool("contender", lease_contender(run))
    time.sleep(1.0)
    run.revoke_holders_lease()
    wait_exit(target, 5)


# Not a row of the matrix: the scene of the tests' control of the lock delay.
REVOKED = Path(
    "etcd-revoked",
    "etcd, the holder's lease revoked under it",
    "main",
    1,
    lambda run: run.run_argv("A", *LEASE),
    seed_none,
    drive_revoked,
    DELAY,
    ETCD_FAULTS,
    "etcd",
    make_run,
    revoked_checks,
)


def _etcd_path(name: str, what: str, phase: str, nth: int, drive: object) -> Path:
    return Path(
        name,
        what,
        phase,
        nth,
        lambda run: run.run_argv("A" if name != "etcd-takeover" else "T", *LEASE),
        seed_none,
        drive,  # type: ignore[arg-type]
        DELAY,
        ETCD_FAULTS,
        "etcd",
        make_run,
        key_checks,
    )


ETCD_PATHS = [
    _etcd_path("etcd-acquire", "etcd, free key", "main", 1, drive_acquire),
    _etcd_path(
        "etcd-renew", "etcd, a steady-state renewal", "renewer", 2, drive_renew(lease_contender)
    ),
    _etcd_path(
        "etcd-release",
        "etcd, release after the command exits",
        "main-after-thread",
        1,
        drive_release,
    ),
    _etcd_path(
        "etcd-takeover", "etcd, take over a crashed holder's key", "main", 1, drive_takeover
    ),
]
