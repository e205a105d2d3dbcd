"""The harness must be able to see a double start, or no fencing test means anything.

Two emulated containers (own PID, IPC, UTS and mount namespaces) start postgres on the
same data directory without pgfence: both come up. This is the data corruption pgfence
prevents, reproduced on purpose.
"""

from __future__ import annotations

import os

import pytest

from conftest import needs_pg, needs_root
from harness import pg
from harness.procs import Registry
from harness.sandbox import Sandbox

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


@pytest.mark.timeout(120)
def test_unfenced_double_start_is_visible(
    procs: Registry, pg_cluster: str, shared_dir: str
) -> None:
    ports = [pg.free_port(), pg.free_port()]
    sandboxes = []
    for i, port in enumerate(ports):
        sock = pg.make_shared_dir(os.path.join(shared_dir, f"sock{i}"))
        argv = pg.as_postgres(pg.server_argv(pg_cluster, port, sock))
        box = Sandbox(procs, f"unfenced-{i}", argv)
        sandboxes.append(box)
        pg.wait_ready(port, proc=box.proc)
    # Both servers answer at once: PostgreSQL's own interlock did not stop the second.
    assert all(pg.is_ready(p) for p in ports)
    assert len(pg.postmaster_pids(pg_cluster)) >= 2
    for box in sandboxes:
        box.kill()
