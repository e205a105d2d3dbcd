"""Real PostgreSQL 15 fenced through a real etcd key.

Two pgfence instances with distinct tokens supervise `postgres` on one data directory,
the fence being an etcd key. When etcd stops answering (its only member frozen), the
holder must kill its whole server before its deadline and exit 75, and the contender may
start only once etcd, back, has expired the holder's lease; committed data survives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import PGFENCE, needs_etcd, needs_pg, needs_root
from harness import etcd as h
from harness import pg
from harness.procs import Registry, alive
from harness.waiting import wait_for

pytestmark = [
    needs_root,
    needs_pg,
    pytest.mark.integration,
    needs_etcd,
]
TTL = 3.0


@pytest.mark.timeout(240)
def test_postgres_is_killed_when_etcd_stops_answering_and_taken_over_after(
    procs: Registry, pg_cluster: str, shared_dir: str, tmp_path: object
) -> None:
    cluster = h.EtcdCluster(os.path.join(str(tmp_path), "etcd"), size=1)
    os.makedirs(cluster.directory)
    try:
        cluster.start()

        def server(name: str) -> tuple[subprocess.Popen[bytes], int]:
            port = pg.free_port()
            sock = pg.make_shared_dir(os.path.join(shared_dir, f"sock-{name}"))
            env = h.fence_env(cluster.endpoints(), "/pgfence/pg", name, TTL)
            with open(os.path.join(str(tmp_path), f"{name}.stderr"), "wb") as err:
                proc = procs.start(
                    [
                        PGFENCE, "run", "--user", "postgres", "--",
                        *pg.server_argv(pg_cluster, port, sock),
                    ],
                    env=env,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                )  # fmt: skip
            return proc, port

        def stderr(name: str) -> str:
            with open(os.path.join(str(tmp_path), f"{name}.stderr")) as f:
                return f.read()

        holder, port_a = server("A")
        pg.wait_ready(port_a, timeout=60, proc=holder)
        made = pg.psql(port_a, "create table t (x int); insert into t values (42)")
        assert made.returncode == 0, made.stderr
        contender, port_b = server("B")
        time.sleep(TTL)
        assert not pg.is_ready(port_b) and contender.poll() is None
        servers = pg.postmaster_pids(pg_cluster)
        assert servers

        cluster.signal_member(0, signal.SIGSTOP)  # etcd stops answering anyone
        try:
            assert holder.wait(timeout=60) == 75, stderr("A")
            wait_for(
                lambda: not any(map(alive, servers)), "the holder's server to be gone", 30, 0.05
            )
            # No lease can expire while etcd is frozen: the contender must still wait.
            assert not pg.is_ready(port_b) and contender.poll() is None, stderr("B")
        finally:
            cluster.signal_member(0, signal.SIGCONT)

        pg.wait_ready(port_b, timeout=90, proc=contender)
        assert pg.psql(port_b, "select x from t").stdout.strip() == "42"
        assert "generation" in stderr("B")
    finally:
        procs.cleanup()
        cluster.stop()
