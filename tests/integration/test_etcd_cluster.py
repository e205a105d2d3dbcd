"""The etcd backend on a real three-member etcd cluster on loopback ports.

Every supervised child appends its start (and stop) to one log, stamped with
CLOCK_BOOTTIME, its pid and the generation it was given; the assertions are orderings on
that one clock, never durations.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator

import pytest

from conftest import PGFENCE, needs_etcd, pgfence_run
from harness import etcd as h
from harness.etcd_fleet import TTL, Fleet, own_cluster, running
from harness.procs import Registry, alive
from harness.waiting import wait_for

pytestmark = [pytest.mark.integration, needs_etcd]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.EtcdCluster]:
    with running(h.EtcdCluster(str(tmp_path_factory.mktemp("etcd3")), size=3)) as c:
        yield c


@pytest.fixture
def fleet(cluster: h.EtcdCluster, procs: Registry, tmp_path: object) -> Fleet:
    return Fleet.on(cluster, procs, str(tmp_path))


@pytest.mark.timeout(180)
def test_16_contenders_without_waiting_exactly_one_holds_each_round(fleet: Fleet) -> None:
    generations = []
    for round_ in range(3):
        names = [f"r{round_}c{i}" for i in range(16)]
        contenders = {n: fleet.start(n, "--no-wait", ttl=4) for n in names}
        wait_for(
            lambda c=contenders: sum(p.poll() is not None for p in c.values()) >= 15,
            "15 of 16 contenders to give up",
            90,
            0.05,
        )
        running = [n for n, p in contenders.items() if p.poll() is None]
        codes = {n: p.returncode for n, p in contenders.items() if n not in running}
        assert len(running) == 1, codes
        assert set(codes.values()) == {73}, {n: fleet.stderr(n) for n in codes}
        winner = running[0]
        start = h.started(fleet.log, winner, timeout=30)
        assert [e.name for e in fleet.starts() if e.name in names] == [winner]
        generations.append(start.generation)
        fleet.stop(contenders[winner], winner)
    assert generations == sorted(set(generations))


@pytest.mark.timeout(240)
def test_8_waiting_contenders_take_turns_without_overlap(fleet: Fleet) -> None:
    names = [f"w{i}" for i in range(8)]  # each turn waits out the lock delay, 2.7 s
    contenders = {n: fleet.start(n, mode="run:0.3", ttl=4) for n in names}
    for name, proc in contenders.items():
        assert proc.wait(timeout=200) == 0, fleet.stderr(name)
    events = h.events(fleet.log)
    starts = sorted((e for e in events if e.kind == "start"), key=lambda e: e.time)
    stops = {e.name: e.time for e in events if e.kind == "stop"}
    assert sorted(e.name for e in starts) == sorted(names)
    for before, after in zip(starts, starts[1:]):
        assert stops[before.name] < after.time, (before, after)
        assert before.generation < after.generation


@pytest.mark.timeout(120)
def test_killed_holder_is_taken_over_only_after_its_lease_expired(
    fleet: Fleet, cluster: h.EtcdCluster
) -> None:
    holder = fleet.start("A")
    a = h.started(fleet.log, "A", timeout=30)
    contender = fleet.start("B")
    time.sleep(TTL)  # the contender watches a live holder: it must keep waiting
    assert [e.name for e in fleet.starts()] == ["A"], fleet.stderr("B")

    killed_at = h.boottime()
    h.kill_tree([holder.pid, a.pid])  # pgfence and its child, no chance to release
    b = h.started(fleet.log, "B", timeout=60)
    assert b.time > killed_at
    assert b.generation > a.generation
    # The old lease is gone: the contender waited for etcd to expire it.
    ttl = cluster.etcdctl("lease", "timetolive", a.lease)
    assert "already expired" in ttl.stdout, ttl.stdout
    assert contender.poll() is None


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tamper", ["delete", "overwrite"])
def test_holder_whose_key_was_deleted_or_overwritten_kills_its_child(
    fleet: Fleet, cluster: h.EtcdCluster, tamper: str
) -> None:
    holder = fleet.start("A")
    a = h.started(fleet.log, "A", timeout=30)
    if tamper == "delete":
        cluster.etcdctl("del", fleet.key)
    else:
        cluster.etcdctl("put", fleet.key, "someone else")
    assert holder.wait(timeout=30) == 75
    assert not alive(a.pid)
    assert "lost the lock" in fleet.stderr("A")


@pytest.mark.timeout(120)
def test_status_check_and_release_see_the_etcd_holder(fleet: Fleet, cluster: h.EtcdCluster) -> None:
    holder = fleet.start("A")
    a = h.started(fleet.log, "A", timeout=30)

    status = pgfence_run("status", "--json", env=fleet.env("other"))
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["state"] == "held" and state["lock"] == f"etcd:{fleet.key}"
    assert state["holder"]["token"] == "A" and state["alive"] is True
    kv = json.loads(cluster.etcdctl("get", fleet.key, "-w", "json").stdout)["kvs"][0]
    assert state["holder"]["generation"] == a.generation == int(kv["create_revision"])

    assert pgfence_run("check", env=fleet.env("A")).returncode == 0
    assert pgfence_run("check", env=fleet.env("other")).returncode == 1
    refused = pgfence_run("release", env=fleet.env("other"))
    assert refused.returncode == 73 and "alive" in refused.stderr
    assert holder.poll() is None and alive(a.pid)

    forced = pgfence_run("release", "--force", env=fleet.env("other"))
    assert forced.returncode == 0, forced.stderr
    assert holder.wait(timeout=30) == 75  # its next renewal finds the key gone
    assert not alive(a.pid)
    free = json.loads(pgfence_run("status", "--json", env=fleet.env("other")).stdout)
    assert free["state"] == "free"


@pytest.mark.timeout(180)
def test_quorum_loss_fences_the_holder_and_after_recovery_exactly_one_runs(
    procs: Registry, tmp_path: object
) -> None:
    with own_cluster(procs, str(tmp_path)) as (cluster, fleet):
        holder = fleet.start("A")
        a = h.started(fleet.log, "A", timeout=30)
        death = h.DeathWatch(a.pid)
        contender = fleet.start("B")
        time.sleep(TTL)

        lost_at = h.boottime()
        cluster.stop_member(1)
        cluster.stop_member(2)
        assert holder.wait(timeout=60) == 75, fleet.stderr("A")
        died = death.wait(timeout=30)
        assert died is not None
        assert "no lease renewal succeeded" in fleet.stderr("A")
        print(f"holder's child killed {died - lost_at:.2f} s after quorum loss (deadline 1.5 s)")

        time.sleep(2 * TTL)  # no quorum, no lease expiry, no takeover: nothing may start
        assert [e.name for e in fleet.starts()] == ["A"], fleet.stderr("B")
        assert contender.poll() is None, fleet.stderr("B")

        cluster.start_member(1, wait=False)
        cluster.start_member(2, wait=False)
        cluster.wait_healthy()
        restarted = fleet.start("A2")
        wait_for(lambda: len(fleet.starts()) >= 2, "one instance to start", 90, 0.05)
        time.sleep(2 * TTL)  # the other keeps waiting behind the live holder
        after = [e for e in fleet.starts() if e.name != "A"]
        assert len(after) == 1, after
        assert after[0].generation > a.generation
        assert contender.poll() is None and restarted.poll() is None


@pytest.mark.timeout(60)
def test_a_pgfence_inside_the_command_recognises_its_supervisors_etcd_fence(
    cluster: h.EtcdCluster, tmp_path: object
) -> None:
    """The outer pgfence is configured by flags only; the inner one (the `postgres` shim
    under a wrapped entrypoint, say) only sees the environment the outer one gives it."""
    key = f"/pgfence/{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FENCE_", "PGFENCE_"))}
    inner = f"{PGFENCE} run -- sh -c 'echo inner-ran-with-generation $PGFENCE_GENERATION'"
    done = pgfence_run(
        "run",
        "--backend",
        "etcd",
        "--etcd-endpoints",
        cluster.endpoints(),
        "--etcd-key",
        key,
        "--token",
        "outer",
        "--ttl",
        "3",
        "--etcd-election-timeout",
        str(h.ELECTION_MS),
        "--",
        "sh",
        "-c",
        inner,
        env=env,
        timeout=45,
    )
    assert done.returncode == 0, done.stderr
    assert "inner-ran-with-generation" in done.stdout
    assert "nested" in done.stderr or "supervising this process" in done.stderr, done.stderr
