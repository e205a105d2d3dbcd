"""Partition: the holder cut off from the etcd majority, on a real three-member cluster.

The holder's pgfence and one etcd member (a minority of one) share a network namespace,
joined to the host by a veth pair; the other two members and the contender run on the
host. Setting the host side of the pair down loses every packet between the two sides,
as a partition does: the holder can still reach its own member, which cannot commit.

Both children stamp their start with CLOCK_BOOTTIME, and the holder's child's death is
taken from a pidfd on the same clock: the holder's server must be dead before the
contender's starts. A negative control freezes the holder's pgfence during the
partition, and the same measurement then sees both children alive at once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator

import pytest

from conftest import PGFENCE, needs_etcd, needs_root
from harness import etcd as h
from harness.procs import Registry, alive

pytestmark = [
    pytest.mark.integration,
    needs_root,
    needs_etcd,
]
TTL = 3.0


@pytest.fixture(scope="module")
def partitionable(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[h.EtcdCluster, h.Netns]]:
    netns = h.Netns()
    cluster = h.EtcdCluster(
        str(tmp_path_factory.mktemp("etcd-netns")), 3, netns_of={2: netns}, host_ip=netns.host_ip
    )
    try:
        yield cluster.start(), netns
    finally:
        cluster.stop()
        netns.delete()


class Scene:
    def __init__(
        self, procs: Registry, directory: str, cluster: h.EtcdCluster, netns: h.Netns
    ) -> None:
        self.procs, self.dir, self.cluster, self.netns = procs, directory, cluster, netns
        self.key = f"/pgfence/{uuid.uuid4().hex[:8]}"
        self.log = os.path.join(directory, "children.log")

    def start(self, name: str, inside: bool, first: int = 0) -> subprocess.Popen[bytes]:
        if inside:  # its own member first, then the two across the veth pair
            endpoints = ",".join(self.cluster.client_url(i) for i in (2, 0, 1))
            prefix = self.netns.prefix()
        else:
            order = [first, *(i for i in range(3) if i != first)]
            endpoints, prefix = self.cluster.endpoints(order), []
        env = h.fence_env(endpoints, self.key, name, TTL, FENCE_ETCD_ALLOW_INSECURE="1")
        with open(os.path.join(self.dir, f"{name}.stderr"), "wb") as err:
            return self.procs.start(
                [*prefix, PGFENCE, "run", "--", *h.child_argv(self.log, name)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stderr(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.stderr")) as f:
            return f.read()

    def names_started(self) -> list[str]:
        return [e.name for e in h.events(self.log) if e.kind == "start"]

    def heal(self) -> None:
        self.netns.heal()
        self.cluster.wait_healthy()


@pytest.fixture
def scene(
    partitionable: tuple[h.EtcdCluster, h.Netns], procs: Registry, tmp_path: object
) -> Iterator[Scene]:
    cluster, netns = partitionable
    s = Scene(procs, str(tmp_path), cluster, netns)
    try:
        yield s
    finally:
        procs.cleanup()
        s.heal()


@pytest.mark.timeout(120)
def test_partitioned_holder_kills_its_server_before_the_contender_starts(scene: Scene) -> None:
    holder = scene.start("A", inside=True)
    a = h.started(scene.log, "A", timeout=30)
    death = h.DeathWatch(a.pid)
    contender = scene.start("B", inside=False)
    time.sleep(TTL)  # the contender waits behind a live holder
    assert scene.names_started() == ["A"], scene.stderr("B")

    scene.netns.cut()
    b = h.started(scene.log, "B", timeout=60)
    died = death.wait(timeout=30)
    assert died is not None, "the partitioned holder's child is still running"
    assert died < b.time, f"holder's child died at {died:.3f}, contender's started {b.time:.3f}"
    assert holder.wait(timeout=30) == 75
    assert "no lease renewal succeeded" in scene.stderr("A")
    assert b.generation > a.generation
    assert contender.poll() is None
    print(f"holder's child died {b.time - died:.2f} s before the contender's child started")


@pytest.mark.timeout(120)
def test_negative_control_frozen_holder_overlap_is_detected(scene: Scene) -> None:
    holder = scene.start("A", inside=True)
    a = h.started(scene.log, "A", timeout=30)
    death = h.DeathWatch(a.pid)
    scene.start("B", inside=False)
    time.sleep(TTL)

    os.kill(holder.pid, signal.SIGSTOP)  # pgfence frozen: nobody fences its child
    try:
        scene.netns.cut()
        b = h.started(scene.log, "B", timeout=60)
        # Both children run at once: the measurement above would have caught it.
        assert alive(a.pid) and death.died is None
    finally:
        os.kill(holder.pid, signal.SIGCONT)
    # Thawed past its deadline, the holder fences before doing anything else.
    assert holder.wait(timeout=30) == 75, scene.stderr("A")
    died = death.wait(timeout=30)
    assert died is not None and died > b.time


def member_ids(cluster: h.EtcdCluster) -> tuple[list[str], str]:
    """Every member's id (hex, as etcdctl takes it) in member order, and the leader's."""
    status = json.loads(cluster.etcdctl("endpoint", "status", "-w", "json").stdout)
    ids = [f"{s['Status']['header']['member_id']:x}" for s in status]
    return ids, f"{status[0]['Status']['leader']:x}"


@pytest.mark.timeout(180)
def test_a_keepalive_answered_by_an_isolated_leader_is_renewed_again_at_the_new_term(
    scene: Scene,
) -> None:
    """The leader (member 2) loses its peers but not its clients: for an election timeout
    it still answers lease keep-alives, at its old term, while the check fails over to the
    new leader. The renewal sends the keep-alive again there, at the new term."""
    cluster, netns = scene.cluster, scene.netns
    ns = netns.prefix()
    peers = [str(m.peer_port) for m in cluster.members]
    rules = [
        ["INPUT", "-p", "tcp", "--dport", peers[2], "-j", "DROP"],
        *(["OUTPUT", "-p", "tcp", "--dport", p, "-j", "DROP"] for p in peers[:2]),
    ]
    holder = scene.start("A", inside=False, first=2)  # member 2 answers it first
    h.started(scene.log, "A", timeout=30)
    for _attempt in range(4):
        ids, lead = member_ids(cluster)
        if lead != ids[2]:
            cluster.etcdctl("move-leader", ids[2], members=[ids.index(lead)])
        time.sleep(1.0)
        for rule in rules:
            subprocess.run([*ns, "iptables", "-A", *rule], check=True, timeout=30)
        try:
            time.sleep(3 * TTL)
        finally:
            for rule in rules:
                subprocess.run([*ns, "iptables", "-D", *rule], check=True, timeout=30)
        cluster.wait_healthy()
        assert holder.poll() is None, scene.stderr("A")
        if "renewed the lease again at term" in scene.stderr("A"):
            break
    assert "renewed the lease again at term" in scene.stderr("A"), scene.stderr("A")
    assert holder.poll() is None and scene.names_started() == ["A"]
