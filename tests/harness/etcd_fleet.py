"""`pgfence run` against real etcd clusters, for the etcd integration tests.

- `Fleet`: the pgfence processes of one test on one etcd key, their stderr files and the
  children's shared log (each child stamps its start with CLOCK_BOOTTIME, see
  `harness.etcd.child_argv`).
- `running`: a cluster started for a block and stopped after it (a module's fixture).
- `own_cluster`: a cluster of one test's own, with a fleet on it; the test's processes
  are killed before the cluster stops, so no holder sees its etcd go away first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import uuid
from collections.abc import Iterator, Sequence

from harness import etcd as h
from harness.fence import PGFENCE
from harness.procs import Registry

# Fence deadline 1.5 s, renewal every 0.5 s, lock delay 0.75 s: the shortest TTL pgfence
# accepts at the test clusters' election timeout (250 ms).
TTL = 3.0


class Fleet:
    """pgfence processes of one test, their stderr files and the children's shared log."""

    def __init__(self, procs: Registry, directory: str, endpoints: str, key: str) -> None:
        self.procs = procs
        self.dir = directory
        self.endpoints = endpoints
        self.key = key
        self.log = os.path.join(directory, "children.log")

    @classmethod
    def on(
        cls, cluster: h.EtcdCluster, procs: Registry, directory: str, endpoints: str = ""
    ) -> Fleet:
        """A fleet on a fresh key of `cluster` (through `endpoints` if given)."""
        key = f"/pgfence/{uuid.uuid4().hex[:8]}"
        return cls(procs, directory, endpoints or cluster.endpoints(), key)

    def env(self, token: str, ttl: float = TTL, **extra: str) -> dict[str, str]:
        return h.fence_env(self.endpoints, self.key, token, ttl, **extra)

    def start(
        self, name: str, *flags: str, mode: str = "hold", ttl: float = TTL, **extra: str
    ) -> subprocess.Popen[bytes]:
        """`pgfence run FLAGS -- child` as token `name`; its stderr goes to `name`.stderr."""
        with open(os.path.join(self.dir, f"{name}.stderr"), "wb") as err:
            return self.procs.start(
                [PGFENCE, "run", *flags, "--", *h.child_argv(self.log, name, mode)],
                env=self.env(name, ttl, **extra),
                stdout=subprocess.DEVNULL,
                stderr=err,
            )

    def stop(self, proc: subprocess.Popen[bytes], name: str) -> None:
        """SIGTERM to `name`'s pgfence: it stops its child, releases, and exits 0."""
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, self.stderr(name)

    def stderr(self, name: str) -> str:
        with open(os.path.join(self.dir, f"{name}.stderr")) as f:
            return f.read()

    def starts(self) -> list[h.Event]:
        return [e for e in h.events(self.log) if e.kind == "start"]


@contextlib.contextmanager
def running(cluster: h.EtcdCluster) -> Iterator[h.EtcdCluster]:
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@contextlib.contextmanager
def own_cluster(
    procs: Registry,
    directory: str,
    size: int = 3,
    tls: h.Tls | None = None,
    extra: Sequence[str] = (),
) -> Iterator[tuple[h.EtcdCluster, Fleet]]:
    """A cluster of `size` members in `directory`/etcd, and a fleet on it."""
    cluster = h.EtcdCluster(os.path.join(directory, "etcd"), size, tls=tls, extra=extra)
    os.makedirs(cluster.directory, exist_ok=True)
    try:
        cluster.start()
        yield cluster, Fleet.on(cluster, procs, directory)
    finally:
        procs.cleanup()
        cluster.stop()
