"""Lease mode under injected faults, on real PostgreSQL in emulated containers (issue 3).

Every test runs `pgfence run --mode lease --ttl 2` around a real PostgreSQL 15 (data
checksums on) in sandboxes with their own PID, IPC, UTS and mount namespaces, on one shared
data directory, while a writer commits to every server and logs each acknowledged commit.
What is asserted are outcomes and orderings: who served, who died before whom, which
commits survived. Latencies are recorded (see harness.lease.record_timing) but never
asserted: this runs on small shared machines.

Each fault has a negative control that shows the harness can see the bad outcome the
fence prevents (a lost commit, an old server that survives a thaw, a server that keeps
running when its lease cannot be renewed, overlapping holders, a corrupted page).
"""

from __future__ import annotations

import calendar
import os
import random
import signal
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import needs_pg, needs_root
from harness import pg
from harness.contenders import (
    CHILD,
    Contender,
    child_intervals,
    overlaps,
    record_stop,
    started_pid,
)
from harness.faults import (
    Freezer,
    Tmpfs,
    foreign_record,
    freeze_with_signals,
    steal_lock,
    write_atomically,
)
from harness.lease import (
    POLL,
    TAKEOVER_WAIT,
    Node,
    all_dead,
    events,
    pg_amcheck,
    pg_checksums,
    prepare_cluster,
    read_lock,
    record_timing,
    seen_at,
)
from harness.procs import Registry, alive
from harness.waiting import wait_for
from harness.writer import Writer, boottime, missing

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


@pytest.fixture
def cluster(pg_cluster: str) -> str:
    prepare_cluster(pg_cluster)
    return pg_cluster


@pytest.fixture
def lock_path(shared_dir: str) -> str:
    return os.path.join(shared_dir, "fence_lock")


@pytest.fixture
def lock_fs(shared_dir: str) -> Iterator[Tmpfs]:
    """A tiny tmpfs for the lock alone (pgfence runs with --allow-other-filesystem), so
    that it can be made read-only or full while the data directory stays writable."""
    fs = Tmpfs(os.path.join(shared_dir, "lockfs"))
    yield fs
    fs.unmount()


def storage_fault(fs: Tmpfs, fault: str, on: bool) -> None:
    if fault == "read-only":
        fs.read_only(on)
    elif on:
        fs.fill()
    else:
        fs.unfill()


# -- 1. the holder's container is SIGKILLed ----------------------------------------------


@pytest.mark.timeout(120)
def test_sigkilled_holder_is_taken_over_without_losing_commits(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str
) -> None:
    old = Node(procs, "kill-a", shared_dir, cluster).start(lock_path)
    old.wait_ready()
    new = Node(procs, "kill-b", shared_dir, cluster).start(lock_path)
    with Writer([old.port, new.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(old.port, 20)
        assert not new.server_pids(), "the contender started a server while the lease was held"
        killed = boottime()
        old.box.kill()
        ready = new.wait_ready()
        record_timing("takeover_after_kill", ready - killed)
        writer.wait_acks(new.port, 20)
    acks = writer.acks()
    old_acks = [a for a in acks if a.port == old.port]
    new_acks = [a for a in acks if a.port == new.port]
    assert old_acks and new_acks
    assert max(a.acked for a in old_acks) < min(a.acked for a in new_acks)
    assert killed < min(a.acked for a in new_acks)
    assert max(a.gen or 0 for a in old_acks) < min(a.gen or 0 for a in new_acks)
    assert missing(acks, new.port) == []
    assert len(new.events("acquired")) == 1


@pytest.mark.timeout(120)
def test_negative_control_lost_commits_are_detected(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str
) -> None:
    """Asynchronous commit acknowledges before the WAL is written: the same kill then
    loses acknowledged commits, and the check above sees it."""
    lazy = ("-c", "synchronous_commit=off", "-c", "wal_writer_delay=10000")
    old = Node(procs, "async-a", shared_dir, cluster).start(lock_path, pg_extra=lazy)
    old.wait_ready()
    with Writer([old.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(old.port, 30)
        old.box.kill()
    new = Node(procs, "async-b", shared_dir, cluster).start(lock_path)
    new.wait_ready()
    assert missing(writer.acks(), new.port) != []


# -- 2. the holder's container is frozen longer than the TTL, then thawed ----------------


class Freeze:
    """Freeze and thaw a whole container: the cgroup freezer (all tasks thaw at once, as
    with `docker pause`) or SIGSTOP/SIGCONT of every process (PID 1 resumes first)."""

    def __init__(self, method: str, name: str) -> None:
        if method == "freezer" and not Freezer.available():
            pytest.skip("the cgroup v1 freezer is not available")
        self.method = method
        self.freezer = Freezer(name) if method == "freezer" else None

    def freeze(self, node: Node) -> None:
        if self.freezer:
            self.freezer.freeze(node.box)
        else:
            freeze_with_signals(node.box)

    def thaw(self, node: Node) -> None:
        if self.freezer:
            self.freezer.thaw()
        else:
            node.box.continue_all()

    def close(self) -> None:
        if self.freezer:
            self.freezer.remove()


@pytest.fixture(params=["freezer", "sigstop"])
def freeze(request: pytest.FixtureRequest) -> Iterator[Freeze]:
    f = Freeze(request.param, request.node.name[:20].replace("[", "-").replace("]", ""))
    yield f
    f.close()


@pytest.mark.timeout(120)
def test_frozen_holder_is_fenced_on_thaw_before_serving_again(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str, freeze: Freeze
) -> None:
    old = Node(procs, "freeze-a", shared_dir, cluster).start(lock_path)
    old.wait_ready()
    new = Node(procs, "freeze-b", shared_dir, cluster).start(lock_path)
    with Writer([old.port, new.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(old.port, 20)
        frozen = boottime()
        freeze.freeze(old)
        writer.pause(old.port, wait=False)  # see below
        old_tree = old.server_pids()  # frozen: none of them can fork now
        postmaster = old.postmaster()
        assert postmaster in old_tree
        ready = new.wait_ready()
        record_timing("takeover_after_freeze", ready - frozen, method=freeze.method)
        writer.wait_acks(new.port, 10)
        # The old server is still there, frozen, while the new one serves: only its own
        # pgfence can stop it, and on thaw it must do that before anything else.
        assert alive(postmaster)
        assert old.running()
        lease = read_lock(lock_path)
        assert lease is not None and lease.token == new.name
        # No insert may be waiting on the frozen server when it thaws: one that is would
        # race pgfence's SIGKILL inside the thawed container, the write in flight that no
        # fence can stop (see the README). Inserts to it resume right after the thaw:
        # a server that survived would acknowledge them.
        writer.pause(old.port)
        thawed = boottime()
        freeze.thaw(old)
        writer.resume(old.port)
        status = old.wait_exit(30)
        gone = seen_at(lambda: all_dead(old_tree), "the old server's tree to die", 30)
        record_timing("fence_after_thaw", gone - thawed, method=freeze.method)
        writer.wait_acks(new.port, 10)
    # The thawed holder did not take its lease back (patroni#2787): the new holder kept
    # renewing its own, same generation, and never had to fence.
    after = read_lock(lock_path)
    assert after is not None and (after.token, after.instance) == (lease.token, lease.instance)
    assert after.generation == lease.generation and after.heartbeat > lease.heartbeat
    assert not new.events("self_fenced")
    assert status == 75, old.log_text()
    # Past its deadline; or, if the thaw caught a renewal half-way, it found the lock
    # no longer its own (and wrote nothing).
    (fenced,) = old.events("self_fenced")
    reason = str(fenced["reason"])
    assert "no lease renewal succeeded" in reason or "lost the lock" in reason, reason
    assert all_dead(old_tree) and not old.box.pids()
    acks = writer.acks()
    old_acks = [a for a in acks if a.port == old.port]
    new_acks = [a for a in acks if a.port == new.port]
    # Not one commit acknowledged by the old server after the new one acknowledged any.
    assert max(a.acked for a in old_acks) < min(a.acked for a in new_acks)
    assert max(a.gen or 0 for a in old_acks) < min(a.gen or 0 for a in new_acks)
    assert missing(acks, new.port) == []
    assert new.running() and new.ready()


@pytest.mark.timeout(120)
def test_negative_control_unfenced_frozen_server_serves_after_thaw(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str, freeze: Freeze
) -> None:
    """Without pgfence, the same freeze and a second server: on thaw the old server
    serves again, and both checks of the test above see it."""
    old = Node(procs, "unfenced-a", shared_dir, cluster).start(lock_path, fenced=False)
    old.wait_ready()
    new = Node(procs, "unfenced-b", shared_dir, cluster)
    with Writer([old.port, new.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(old.port, 10)
        postmaster = old.postmaster()
        freeze.freeze(old)
        writer.pause(old.port, wait=False)  # the same protocol as the test above
        new.start(lock_path, fenced=False)
        new.wait_ready()
        writer.wait_acks(new.port, 5)
        writer.pause(old.port)
        freeze.thaw(old)
        writer.resume(old.port)
        writer.wait_acks(old.port, 5)
    assert alive(postmaster)
    acks = writer.acks()
    first_new = min(a.acked for a in acks if a.port == new.port)
    assert max(a.acked for a in acks if a.port == old.port) > first_new
    old.box.kill()
    new.box.kill()


# -- 3. storage fault under the holder ------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_storage_fault_makes_the_holder_kill_its_server_and_exit_75(
    procs: Registry, cluster: str, shared_dir: str, lock_fs: Tmpfs, fault: str
) -> None:
    lock = os.path.join(lock_fs.path, "fence_lock")
    other_fs = "--allow-other-filesystem"
    node = Node(procs, "storage-a", shared_dir, cluster).start(lock, other_fs)
    node.wait_ready()
    with Writer([node.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(node.port, 10)
        tree = node.server_pids()
        faulted = boottime()
        storage_fault(lock_fs, fault, True)
        gone = seen_at(lambda: all_dead(tree), "the server's tree to die", 30)
        status = node.wait_exit(30)
    last_beat = read_lock(lock)
    assert last_beat is not None
    record_timing("self_fence_after_storage_fault", gone - faulted, fault=fault)
    # The holder's clock and ours are the same boot's: this is the fence deadline, measured.
    record_timing("storage_fault_last_renewal_to_dead", gone - last_beat.clock, fault=fault)
    assert status == 75, node.log_text()
    (fenced,) = node.events("self_fenced")
    assert "no lease renewal succeeded" in str(fenced["reason"])
    assert node.events("renew_failed")
    # The lease is left as it was; with the storage back, a contender takes it over.
    storage_fault(lock_fs, fault, False)
    new = Node(procs, "storage-b", shared_dir, cluster).start(lock, other_fs)
    new.wait_ready()
    assert read_lock(lock).generation > last_beat.generation  # type: ignore[union-attr]
    assert missing(writer.acks(), new.port) == []


@pytest.mark.timeout(120)
def test_negative_control_strict_holder_keeps_serving_on_storage_fault(
    procs: Registry, cluster: str, shared_dir: str, lock_fs: Tmpfs
) -> None:
    """A holder whose deadline is far off (strict mode, 10 s heartbeat: it fences only
    3 * 10 + 1 s after its last one) keeps serving through the same fault while the test
    watches, well past a lease holder's deadline, and the harness sees that."""
    lock = os.path.join(lock_fs.path, "fence_lock")
    node = Node(procs, "strict-a", shared_dir, cluster)
    node.start(lock, "--allow-other-filesystem", "--heartbeat-interval", "10", mode="strict")
    node.wait_ready()
    with Writer([node.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(node.port, 5)
        storage_fault(lock_fs, "read-only", True)
        wait_for(lambda: node.events("renew_failed"), "a failed heartbeat", 30, POLL)
        faulted = boottime()
        # Well past a lease holder's deadline and a contender's takeover wait.
        writer.wait_acks(node.port, 10)
        wait_for(lambda: boottime() - faulted > 2 * TAKEOVER_WAIT, "time to pass", 30, 0.1)
        writer.wait_acks(node.port, 5)
    assert node.running() and alive(node.postmaster())
    storage_fault(lock_fs, "read-only", False)
    node.box.kill()


# -- 4. the lock is stolen -------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("kind", ["record", "one-line"])
def test_stolen_lock_makes_the_holder_kill_its_server_and_leave_the_lock(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str, kind: str
) -> None:
    node = Node(procs, "stolen-a", shared_dir, cluster).start(lock_path)
    node.wait_ready()
    with Writer([node.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(node.port, 10)
        tree = node.server_pids()
        data = steal_lock(lock_path, kind)
        stolen = boottime()
        gone = seen_at(lambda: all_dead(tree), "the server's tree to die", 30)
        status = node.wait_exit(30)
    record_timing("self_fence_after_stolen_lock", gone - stolen, lock=kind)
    assert status == 75, node.log_text()
    (fenced,) = node.events("self_fenced")
    assert "lost the lock" in str(fenced["reason"])
    # A fenced holder never touches a lock that is not its own.
    with open(lock_path, "rb") as f:
        assert f.read() == data
    assert max(a.acked for a in writer.acks()) < gone


@pytest.mark.timeout(120)
def test_negative_control_stopped_supervisor_lets_its_server_outlive_a_stolen_lock(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str
) -> None:
    """With only pgfence stopped (SIGSTOP to PID 1), nothing watches the lock: the server
    keeps committing after the theft, and the harness sees it. On SIGCONT pgfence fences
    first, and leaves the thief's lock as it is."""
    node = Node(procs, "stopped-a", shared_dir, cluster).start(lock_path)
    node.wait_ready()
    with Writer([node.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(node.port, 5)
        postmaster = node.postmaster()
        os.kill(node.box.init_pid(), signal.SIGSTOP)
        data = steal_lock(lock_path, "record")
        stolen = boottime()
        writer.wait_acks(node.port, 10)
        wait_for(lambda: boottime() - stolen > TAKEOVER_WAIT, "time to pass", 30, 0.1)
        writer.wait_acks(node.port, 3)
        assert alive(postmaster)
        tree = node.server_pids()
        assert max(a.acked for a in writer.acks()) > stolen + TAKEOVER_WAIT
        os.kill(node.box.init_pid(), signal.SIGCONT)
        status = node.wait_exit(30)
    assert status == 75
    assert all_dead(tree)
    with open(lock_path, "rb") as f:
        assert f.read() == data


# -- 5. many contenders for one expired lease ----------------------------------------------


@pytest.mark.timeout(150)
def test_many_contenders_exactly_one_takes_over_each_round(
    procs: Registry, shared_dir: str, lock_path: str
) -> None:
    rounds, waiting = 5, 16
    log = os.path.join(shared_dir, "intervals.log")
    open(log, "w").close()
    write_atomically(lock_path, foreign_record(None, "dead-holder"))  # an expired lease
    contenders: dict[str, Contender] = {}
    n = 0
    for round_ in range(rounds):
        while len(contenders) < waiting:
            c = Contender(procs, shared_dir, lock_path, log, n)
            contenders[c.token] = c
            n += 1
        wait_for(
            lambda r=round_: len(child_intervals(log)) > r, f"round {round_}'s winner", 60, POLL
        )
        # Give a second winner every chance to appear: losers poll every TTL/10.
        time.sleep(1.0)
        intervals = child_intervals(log)
        assert len(intervals) == round_ + 1, intervals
        holder = read_lock(lock_path)
        assert holder is not None and holder.token in contenders
        gen = str(holder.generation)
        assert intervals[-1][2] == gen
        winner = contenders.pop(holder.token)
        assert all(c.proc.poll() is None for c in contenders.values()), "a loser gave up"
        child = started_pid(log, gen)
        winner.proc.kill()  # SIGKILL: its child dies by the parent-death signal
        wait_for(lambda c=child: not alive(c), "the winner's child to die", 10, 0.001)
        record_stop(log, gen, child)
        winner.proc.wait(10)
    intervals = child_intervals(log)
    assert len(intervals) == rounds
    assert overlaps(intervals) == []
    generations = [int(g) for _, _, g in intervals]
    assert generations == sorted(set(generations))
    took_over = [
        e
        for c in os.listdir(shared_dir)
        if c.startswith("contender-")
        for e in events(os.path.join(shared_dir, c), "acquired")
    ]
    assert len(took_over) == rounds


@pytest.mark.timeout(60)
def test_negative_control_unfenced_children_overlap(procs: Registry, shared_dir: str) -> None:
    """Two of the same children started without pgfence: the interval check sees them."""
    log = os.path.join(shared_dir, "intervals.log")
    kids = [procs.start([sys.executable, "-c", CHILD, log]) for _ in range(2)]
    wait_for(
        lambda: len(child_intervals(log)) == 2 if os.path.exists(log) else False,
        "both children",
        30,
        POLL,
    )
    for kid in kids:
        kid.kill()
        kid.wait(10)
        record_stop(log, "-", kid.pid)
    assert overlaps(child_intervals(log)) != []


# -- 6. randomised failovers, then the data is checked ----------------------------------

FAULTS = ("kill", "freezer", "sigstop", "stolen", "read-only", "full", "stop")
# pgfence's exit status after each fault (a killed container's is unshare's business).
STATUS_AFTER = {"kill": None, "stop": 0}  # the others: 75, self-fenced


def _event_time(event: dict[str, object]) -> float:
    """Wall-clock seconds of a pgfence JSON event ("2026-01-01T00:00:00.123Z")."""
    stamp = str(event["time"])
    whole, millis = stamp.rstrip("Z").split(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000


def inject(fault: str, node: Node, lock: str, fs: Tmpfs, freezer: Freezer | None) -> None:
    if fault == "kill":
        node.box.kill()
    elif fault == "freezer":
        assert freezer is not None
        freezer.freeze(node.box)
    elif fault == "sigstop":
        freeze_with_signals(node.box)
    elif fault == "stolen":
        steal_lock(lock, "record")
    elif fault in ("read-only", "full"):
        storage_fault(fs, fault, True)
    else:
        os.kill(node.box.init_pid(), signal.SIGTERM)  # `docker stop`: a smart shutdown


@pytest.mark.timeout(280)
def test_randomised_failovers_lose_no_commit_and_corrupt_nothing(
    procs: Registry, cluster: str, shared_dir: str, lock_fs: Tmpfs
) -> None:
    seed = int(os.environ.get("PGFENCE_TEST_SEED") or time.time_ns() % 2**32)
    print(f"failover seed {seed} (PGFENCE_TEST_SEED reproduces the order)")
    rng = random.Random(seed)
    kinds = [k for k in FAULTS if k != "freezer" or Freezer.available()]
    faults = kinds * -(-20 // len(kinds))
    rng.shuffle(faults)
    lock = os.path.join(lock_fs.path, "fence_lock")
    ports = {"a": pg.free_port(), "b": pg.free_port()}
    nodes: dict[str, Node] = {}
    incarnations = {"a": 0, "b": 0}
    unexpected_exits: list[str] = []

    def start(slot: str) -> Node:
        incarnations[slot] += 1
        node = Node(procs, f"node-{slot}", shared_dir, cluster, ports[slot], incarnations[slot])
        nodes[slot] = node.start(lock, "--allow-other-filesystem")
        return node

    def taken_over(slot: str, generation: int) -> bool:
        node = nodes[slot]
        if not node.running():
            # A contender meets the storage fault only if it tries to take over during
            # it (exit 74); anything else is unexpected.
            status = node.box.returncode()
            if status != 74:
                unexpected_exits.append(f"{node.name}: {status}: {node.log_text()}")
            node = start(slot)
        record = read_lock(lock)
        return (
            record is not None
            and record.token == node.name
            and record.generation > generation
            and node.ready()
        )

    freezer = Freezer("failovers") if "freezer" in kinds else None
    writer = Writer(list(ports.values()), os.path.join(shared_dir, "acks.log"))
    holder = "a"
    start("a").wait_ready()
    start("b")
    failovers = 0
    try:
        writer.start()
        for fault in faults:
            old, slot = nodes[holder], "b" if holder == "a" else "a"
            writer.wait_acks(old.port, 3)
            before = read_lock(lock)
            assert before is not None and before.token == old.name
            tree = old.server_pids()
            postmaster = old.postmaster()
            injected, injected_wall = boottime(), time.time()
            inject(fault, old, lock, lock_fs, freezer)
            if fault in ("freezer", "sigstop"):
                writer.pause(old.port, wait=False)  # see test 2
                tree += old.server_pids()  # and whatever forked meanwhile, frozen now
            if fault in ("read-only", "full"):
                assert old.wait_exit(30) == 75, old.log_text()
                storage_fault(lock_fs, fault, False)
            ready = seen_at(
                lambda s=slot, g=before.generation: taken_over(s, g),
                f"takeover after {fault}",
                60,
                0.02,
            )
            acquired = nodes[slot].events("acquired")[-1]
            record_timing(
                f"failover_{fault}",
                ready - injected,
                lock_taken_after=round(_event_time(acquired) - injected_wall, 3),
            )
            if fault in ("freezer", "sigstop"):
                assert alive(postmaster)  # frozen, not dead, while the new one serves
                writer.pause(old.port)  # nothing in flight into the thaw (see test 2)
                if freezer and fault == "freezer":
                    freezer.thaw()
                else:
                    old.box.continue_all()
                writer.resume(old.port)
            status = old.wait_exit(30)
            wait_for(lambda t=tree: all_dead(t), "the old server's tree to die", 30, POLL)
            expected = STATUS_AFTER.get(fault, 75)
            assert expected is None or status == expected, f"{fault}: {old.log_text()}"
            failovers += 1
            holder = slot
            start("a" if slot == "b" else "b")
        final = nodes[holder]
        writer.wait_acks(final.port, 5)
    finally:
        writer.stop()
        if freezer:
            freezer.remove()
    assert unexpected_exits == []
    assert failovers >= 20
    acks = writer.acks()
    generations = [a.gen for a in acks]
    assert None not in generations
    # No server acknowledged a commit after a newer generation had acknowledged one.
    assert generations == sorted(generations)  # type: ignore[type-var]
    assert len(set(generations)) >= failovers + 1
    assert missing(acks, final.port) == []
    amcheck = pg_amcheck(final.port)
    assert amcheck.returncode == 0, amcheck.stdout + amcheck.stderr
    contender = nodes["a" if holder == "b" else "b"]
    contender.box.kill()
    os.kill(final.box.init_pid(), signal.SIGTERM)
    assert final.wait_exit(60) == 0
    assert read_lock(lock) is None  # released after a clean stop
    checksums = pg_checksums(cluster)
    assert checksums.returncode == 0, checksums.stdout + checksums.stderr


@pytest.mark.timeout(120)
def test_negative_control_corrupted_page_is_detected(
    procs: Registry, cluster: str, shared_dir: str, lock_path: str
) -> None:
    """A damaged heap page: pg_checksums and pg_amcheck both report it."""
    node = Node(procs, "corrupt-a", shared_dir, cluster).start(lock_path)
    node.wait_ready()
    with Writer([node.port], os.path.join(shared_dir, "acks.log")) as writer:
        writer.wait_acks(node.port, 30)
    relation = pg.psql(node.port, "SELECT pg_relation_filepath('acks')").stdout.strip()
    os.kill(node.box.init_pid(), signal.SIGTERM)
    assert node.wait_exit(60) == 0
    assert pg_checksums(cluster).returncode == 0
    with open(os.path.join(cluster, relation), "r+b") as f:
        f.seek(8192 - 512)  # inside the first page's tuples
        f.write(os.urandom(64))
    checksums = pg_checksums(cluster)
    assert checksums.returncode != 0
    assert "checksum verification failed" in checksums.stdout + checksums.stderr
    again = Node(procs, "corrupt-b", shared_dir, cluster).start(lock_path)
    again.wait_ready()
    assert pg_amcheck(again.port).returncode != 0
    again.box.kill()
