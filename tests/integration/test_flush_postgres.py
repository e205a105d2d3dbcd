"""The flush (flush.py) on real PostgreSQL: syncfs(2) of the data directory's filesystem
after a self-fence and before a release, and what happens when it cannot finish.

pgfence runs under strace, which records every syncfs and every call on the lock path
(`-P`), and can hold syncfs as unreachable storage would (`delay_enter`).
"""

from __future__ import annotations

import os
import re
import signal

import pytest

from conftest import PGFENCE, needs_pg, needs_root
from harness import pg
from harness.faults import steal_lock
from harness.fence import clean_env, first_line, read_text
from harness.procs import Registry, alive

pytestmark = [needs_root, needs_pg, pytest.mark.integration, pytest.mark.timeout(180)]


class Traced:
    """`pgfence run --user postgres -- postgres -D DATA` under strace."""

    def __init__(
        self, procs: Registry, shared_dir: str, datadir: str, *flags: str, inject: str = ""
    ) -> None:
        self.lock = os.path.join(shared_dir, "fence_lock")
        self.trace = os.path.join(shared_dir, "strace.log")
        self.err = os.path.join(shared_dir, "pgfence.err")
        self.datadir = datadir
        self.port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(shared_dir, "sock"))
        strace = ["strace", "-f", "--seccomp-bpf", "-qq", "-y", "-o", self.trace]
        strace += ["-P", datadir, "-P", self.lock, "-e", "trace=syncfs,unlink,rename,openat"]
        if inject:
            strace += ["-e", f"inject=syncfs:{inject}"]
        argv = [PGFENCE, "run", "--lock-file", self.lock, "--user", "postgres", *flags, "--"]
        argv += pg.server_argv(datadir, self.port, sock)
        with open(self.err, "wb") as err:
            self.proc = procs.start([*strace, *argv], env=clean_env(), stderr=err)
        pg.wait_ready(self.port, timeout=60, proc=self.proc)
        children = read_text(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        self.pgfence = int(children.split()[0])  # strace's child

    def calls(self) -> list[str]:
        """Traced calls, in order, without the pid column."""
        return [line.split(None, 1)[1] for line in read_text(self.trace).splitlines()]

    def syncfs_index(self) -> int:
        calls = self.calls()
        found = [i for i, c in enumerate(calls) if c.startswith("syncfs(") and self.datadir in c]
        assert found, "\n".join(calls[-20:])
        return found[0]

    @property
    def stderr(self) -> str:
        return read_text(self.err)


def test_release_comes_after_the_flush(procs: Registry, shared_dir: str, pg_cluster: str) -> None:
    run = Traced(procs, shared_dir, pg_cluster)
    pg.psql(run.port, "CREATE TABLE t AS SELECT generate_series(1, 1000) AS x")
    os.kill(run.pgfence, signal.SIGINT)  # fast shutdown, forwarded
    assert run.proc.wait(timeout=60) == 0, run.stderr
    calls = run.calls()
    flushed = run.syncfs_index()
    removed = [i for i, c in enumerate(calls) if c.startswith("unlink(") and run.lock in c]
    assert removed and removed[-1] > flushed, calls
    assert not os.path.exists(run.lock)


def test_self_fence_kills_then_flushes(procs: Registry, shared_dir: str, pg_cluster: str) -> None:
    run = Traced(procs, shared_dir, pg_cluster, "--mode", "lease", "--ttl", "2")
    (postmaster,) = pg.postmaster_pids(pg_cluster)
    before = len(run.calls())
    steal_lock(run.lock, "record")
    assert run.proc.wait(timeout=60) == 75, run.stderr
    assert not alive(postmaster) and pg.postmaster_pids(pg_cluster) == []
    assert run.syncfs_index() >= before  # flushed after the theft, i.e. after the kill
    assert "flushed its writes" in run.stderr
    assert first_line(run.lock) == "thief"


def test_flush_that_hangs_keeps_the_lock(procs: Registry, shared_dir: str, pg_cluster: str) -> None:
    """syncfs held for 20 s, as on unreachable storage: the bound (half the margin,
    0.75 s at TTL 2) passes, pgfence says so and exits 76, and does not release."""
    run = Traced(
        procs, shared_dir, pg_cluster, "--mode", "lease", "--ttl", "2", inject="delay_enter=20s"
    )
    os.kill(run.pgfence, signal.SIGINT)
    assert run.proc.wait(timeout=60) == 76, run.stderr
    assert pg.postmaster_pids(pg_cluster) == []
    assert "could not be flushed" in run.stderr and "did not finish within 0.75 s" in run.stderr
    assert first_line(run.lock) == os.uname().nodename  # still ours: not released
    assert not re.search(r"^unlink\(.*fence_lock", "\n".join(run.calls()), re.M)
