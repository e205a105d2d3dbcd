"""The POSIX sh shim (`pgfence export-shim`) on real PostgreSQL, in emulated containers
without Python on the shim's path: the official image's style of a Swarm config mounted
at /newbin/postgres. Each container runs `entrypoint.sh postgres ...`; the entrypoint's
final `exec "$@"` runs the shim (dash, or busybox sh with busybox's tools), which takes
the lock and execs the real server: PID 1 is postgres itself, with nothing supervising it.

So nothing releases the lock when that server stops: a second container stays fenced out
until an operator runs `pgfence release --force`, then starts on the same data.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import needs_pg, needs_root, pgfence_run
from harness import pg
from harness.containers import Container, cmdline, container_env, make_bin_dir, read_lock
from harness.fence import clean_env, write_file
from harness.procs import Registry
from harness.watch import PostmasterWatch
from test_sh_shim import SHELLS, SHIM_TEXT, TOOLS

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_sh_shim_fences_the_official_entrypoints_server(
    procs: Registry, shared_dir: str, tmp_path: Path, shell: str
) -> None:
    shim = os.path.join(shared_dir, "pgfence-shim")
    write_file(shim, SHIM_TEXT.replace("#!/bin/sh", SHELLS[shell], 1).encode())
    os.chmod(shim, 0o555)
    newbin = make_bin_dir(os.path.join(shared_dir, "newbin"), shim_target=shim)
    front = [newbin]
    if shell == "busybox":
        tools = pg.make_shared_dir(os.path.join(shared_dir, "busybox"))
        for tool in TOOLS:
            os.symlink("/bin/busybox", os.path.join(tools, tool))
        front.append(tools)
    root = pg.make_shared_dir(os.path.join(shared_dir, "volume"))
    pgdata = os.path.join(root, "pgdata")
    lock = os.path.join(root, "fence_lock")

    def container(name: str) -> tuple[Container, int]:
        port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(shared_dir, f"sock-{name}-{port}"))
        env = container_env(front, PGDATA=pgdata, PGHOST=sock, PGPORT=str(port))
        env["FENCE_LOCK_FILE"] = lock
        argv = ["entrypoint.sh", "postgres", *pg.server_argv(pgdata, port, sock)[1:]]
        return Container(procs, name, argv, env, str(tmp_path)), port

    a, port_a = container("sh-a")
    pg.wait_ready(port_a, timeout=90, proc=a.proc)
    assert pg.query(port_a, "SELECT host FROM fence_init") == "sh-a"
    # PID 1 is the real server: the shim exec'd it, with the lock in its record.
    init = a.init_pid()
    assert cmdline(init)[0].endswith("/postgres") and pg.PG_BIN in cmdline(init)[0]
    held = read_lock(lock)
    assert held is not None
    assert (held["token"], held["pid"], held["interval"], held["generation"]) == (
        "sh-a",
        "1",
        "0",
        "1",
    )
    status = pg_status(lock)
    assert "sh shim lock" in status and "holder:      sh-a" in status

    # A second container on the same volume is fenced out before any server starts.
    with PostmasterWatch(pgdata) as watch:
        b, _ = container("sh-b")
        code = watch.wait_exit(b)
    assert code == 73, b.log()
    assert "fenced out" in b.log() and "'sh-a'" in b.log()
    assert not watch.new(), "a second postmaster appeared"
    pg.query(port_a, "INSERT INTO fence_init (host) VALUES ('still a')")

    # The server stops cleanly; nothing releases its lock (nothing supervised it).
    os.kill(init, signal.SIGINT)
    assert a.wait(timeout=90) == 0, a.log()
    assert read_lock(lock) == held
    b2, _ = container("sh-b")
    assert b2.wait(timeout=60) == 73, b2.log()

    # The operator releases it; then the next container starts on the same data.
    released = pg_release(lock)
    assert "released" in released
    b3, port_b = container("sh-b")
    pg.wait_ready(port_b, timeout=90, proc=b3.proc)
    assert "skipping initialisation" in b3.log()
    rows = pg.query(port_b, "SELECT string_agg(host, ',' ORDER BY host) FROM fence_init")
    assert rows == "sh-a,still a"
    held_b = read_lock(lock)
    assert held_b is not None and held_b["token"] == "sh-b" and held_b["generation"] == "2"
    os.kill(b3.init_pid(), signal.SIGINT)
    assert b3.wait(timeout=90) == 0, b3.log()


def pg_status(lock: str) -> str:
    result = pgfence_run("status", "--lock-file", lock, "--token", "operator", env=clean_env())
    assert result.returncode == 0, result.stderr
    return result.stdout


def pg_release(lock: str) -> str:
    operator = ("--lock-file", lock, "--token", "operator")
    refused = pgfence_run("release", *operator, env=clean_env())
    assert refused.returncode == 73 and "--force" in refused.stderr, refused.stderr
    result = pgfence_run("release", "--force", *operator, env=clean_env())
    assert result.returncode == 0, result.stderr
    return result.stdout
