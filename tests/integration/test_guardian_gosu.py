"""The guardian (guardian.py) on real PostgreSQL started through real gosu.

`gosu postgres postgres ...` changes user itself, which clears the parent-death signal
pgfence set, so a SIGKILLed pgfence (not PID 1) used to leave the server running. The
guardian must take the postmaster and every backend with it; the negative control kills
the guardian first and shows the server then survives pgfence.
"""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from conftest import PGFENCE, needs_pg, needs_root
from harness import pg
from harness.containers import container_env, make_bin_dir, server_args
from harness.fence import clean_env, first_line, read_text
from harness.procs import Registry, alive, descendants
from harness.waiting import wait_for

PSQL = os.path.join(pg.PG_BIN, "psql")
SLEEP = "SELECT pg_sleep(600)"
pytestmark = [needs_root, needs_pg, pytest.mark.integration, pytest.mark.timeout(180)]


class GosuServer:
    """`pgfence run -- gosu postgres postgres -D DATA` as root, not PID 1, or the
    entrypoint-shaped script (`exec gosu postgres "$BASH_SOURCE"`, then `exec postgres`),
    with one client session held open in a backend."""

    def __init__(self, procs: Registry, shared_dir: str, datadir: str, style: str = "gosu") -> None:
        self.lock = os.path.join(shared_dir, "fence_lock")
        self.err = os.path.join(shared_dir, "pgfence.err")
        self.port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(shared_dir, "sock"))
        argv = [PGFENCE, "run", "--lock-file", self.lock, "--"]
        if style == "gosu":
            argv += ["gosu", "postgres", *pg.server_argv(datadir, self.port, sock)]
            env = clean_env()
        else:
            bin_dir = make_bin_dir(os.path.join(shared_dir, "bin"))
            argv += ["entrypoint.sh", *server_args(datadir, self.port, sock)]
            env = container_env([bin_dir], PGDATA=datadir, PGHOST=sock, PGPORT=str(self.port))
        with open(self.err, "wb") as err:
            self.proc = procs.start(argv, env=env, stderr=err)
        pg.wait_ready(self.port, timeout=60, proc=self.proc)
        # pgfence's children: its guardian (a fork of itself) and the command, which
        # exec'd into the postmaster (postmaster_pids could also see a backend that has
        # not yet renamed itself).
        children = read_text(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").split()
        me = read_text(f"/proc/{self.proc.pid}/cmdline")
        (self.guardian,) = [int(p) for p in children if read_text(f"/proc/{p}/cmdline") == me]
        (self.postmaster,) = [int(p) for p in children if int(p) != self.guardian]
        assert self.postmaster in pg.postmaster_pids(datadir)
        self.client = procs.start(
            [PSQL, *pg.client_args(self.port), "-Xqc", SLEEP],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self._backend_count() >= 1, "the client's backend")
        self.tree = [self.postmaster, *descendants(self.postmaster)]
        for pid in self.tree:
            procs.track(pid)  # in its own session: the registry would not find it

    def _backend_count(self) -> int:
        done = pg.psql(self.port, "SELECT count(*) FROM pg_stat_activity WHERE query ~ 'pg_sleep'")
        return int(done.stdout.strip() or 0)


@pytest.mark.parametrize("style", ["gosu", "entrypoint"])
def test_sigkilled_pgfence_takes_the_gosu_server_with_it(
    procs: Registry, shared_dir: str, pg_cluster: str, style: str
) -> None:
    server = GosuServer(procs, shared_dir, pg_cluster, style)
    assert len(server.tree) >= 5  # postmaster, its helpers, and the client's backend
    server.proc.kill()
    server.proc.wait(timeout=30)
    try:
        wait_for(lambda: not any(alive(p) for p in server.tree), "the server tree to die")
    except AssertionError:
        left = [p for p in server.tree if alive(p)]
        raise AssertionError(f"still alive: {left}\n{read_text(server.err)}") from None
    assert pg.postmaster_pids(pg_cluster) == []
    wait_for(lambda: "guardian killed" in read_text(server.err), "the guardian's event")
    assert "flushed their writes" in read_text(server.err)
    assert first_line(server.lock) == os.uname().nodename  # a killed holder leaves its lock


def test_negative_control_without_the_guardian_the_gosu_server_survives(
    procs: Registry, shared_dir: str, pg_cluster: str
) -> None:
    server = GosuServer(procs, shared_dir, pg_cluster)
    os.kill(server.guardian, signal.SIGKILL)
    server.proc.kill()
    server.proc.wait(timeout=30)
    # pgfence is gone, and with it any parent-death signal: gosu cleared it. The server
    # still answers queries, the harm the guardian prevents.
    assert pg.is_ready(server.port)
    assert alive(server.postmaster)
    os.kill(server.postmaster, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in server.tree), "the cleanup")
