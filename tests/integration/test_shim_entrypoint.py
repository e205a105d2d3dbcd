"""The seed's installation style on real PostgreSQL: pgfence as `postgres` first on PATH.

Each emulated container runs `entrypoint.sh postgres -D ...` (shaped like the official
image's docker-entrypoint.sh) as root; the script initialises an empty data directory,
steps down with `exec gosu postgres "$BASH_SOURCE" "$@"` and ends in `exec "$@"`, so the
shim ends up as PID 1 of the container, running as postgres, and fences the server.

Where the lock lives: the volume holds PGDATA as a subdirectory and the lock file next
to it (the 18+ image layout), so nothing of pgfence's is ever inside PGDATA. In this
style `initdb` and the entrypoint's temporary server never go through the shim (they run
the binary next to themselves), so they are not fenced: the fence starts at `exec "$@"`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from conftest import PGFENCE, needs_pg, needs_root
from harness import pg
from harness.containers import (
    Container,
    cmdline,
    container_env,
    make_bin_dir,
    read_lock,
    run_to_end,
    sandbox_pid_uid,
    server_args,
)
from harness.procs import Registry
from harness.volume import changes, snapshot
from harness.watch import PostmasterWatch, freeze, thaw

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


class Volume:
    """An emulated shared volume and the containers that mount it, shim installed."""

    def __init__(
        self, procs: Registry, shared_dir: str, log_dir: str, pgdata: str, lock: str
    ) -> None:
        self.procs = procs
        self.shared_dir = shared_dir
        self.log_dir = log_dir
        self.pgdata = pgdata
        self.lock = lock
        self.bin = make_bin_dir(os.path.join(shared_dir, "bin"), shim_target=PGFENCE)

    def env(self, port: int, sock: str) -> dict[str, str]:
        return container_env(
            [self.bin],
            PGDATA=self.pgdata,
            PGHOST=sock,
            PGPORT=str(port),
            FENCE_LOCK_FILE=self.lock,
        )

    def container(self, name: str) -> tuple[Container, int]:
        port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(self.shared_dir, f"sock-{name}-{port}"))
        argv = ["entrypoint.sh", *server_args(self.pgdata, port, sock)]
        return Container(self.procs, name, argv, self.env(port, sock), self.log_dir), port

    def serving(self, name: str) -> tuple[Container, int]:
        box, port = self.container(name)
        pg.wait_ready(port, timeout=90, proc=box.proc)
        return box, port


def generation(lock: str) -> str:
    """The highest generation in `<lock>.generation` (followed by the winner's instance)."""
    with open(f"{lock}.generation") as f:
        return f.read().split()[0]


@pytest.mark.timeout(240)
def test_shim_fences_the_server_the_entrypoint_execs(
    procs: Registry, shared_dir: str, tmp_path: Path
) -> None:
    root = pg.make_shared_dir(os.path.join(shared_dir, "volume"))
    vol = Volume(
        procs,
        shared_dir,
        str(tmp_path),
        pgdata=os.path.join(root, "pgdata"),
        lock=os.path.join(root, "fence_lock"),
    )
    a, port_a = vol.serving("shim-a")
    log_a = a.log()
    assert "entrypoint: initialising" in log_a and "init process complete" in log_a
    assert pg.query(port_a, "SELECT host FROM fence_init") == "shim-a"

    # PID 1 is the shim (pgfence under the name `postgres`), running as postgres; it
    # holds the lock and supervises the real server.
    init = a.init_pid()
    assert cmdline(init)[1] == os.path.join(vol.bin, "postgres")
    assert sandbox_pid_uid(init) == sandbox_pid_uid(pg.postmaster_pids(vol.pgdata)[0])
    held = read_lock(vol.lock)
    assert held is not None and held["token"] == "shim-a" and held["pid"] == "1"
    # One acquisition in all: initdb and the temporary server did not pass the shim.
    assert held["generation"] == "1" and generation(vol.lock) == "1"
    visible = sorted(n for n in os.listdir(root) if not n.startswith("."))  # not heartbeat temps
    assert visible == [
        "fence_lock",
        "fence_lock.generation",
        "fence_lock.generation.mirror",
        "pgdata",
    ]

    # Commands that start no server pass through the shim while another container
    # holds the lock (the official entrypoint runs some before any server starts).
    env = vol.env(pg.free_port(), shared_dir)

    def run(*argv: str) -> tuple[int, str]:
        return run_to_end(procs, "shim-c", argv, env, str(tmp_path))

    code, out = run("postgres", "--version")
    assert code == 0 and "(PostgreSQL) 15" in out, out
    code, out = run("entrypoint.sh", "postgres", "-V")
    assert code == 0 and "(PostgreSQL) 15" in out, out
    code, out = run("gosu", "postgres", "postgres", "-D", vol.pgdata, "-C", "port")
    assert code == 0 and out.strip().isdigit(), out
    # But `-C` of a setting computed at run time locks the data directory (it would
    # replace, then delete, the running server's postmaster.pid): fenced.
    pidfile = os.path.join(vol.pgdata, "postmaster.pid")
    with open(pidfile, "rb") as f:
        pid_before = f.read()
    code, out = run("gosu", "postgres", "postgres", "-D", vol.pgdata, "-C", "data_checksums")
    assert code == 73 and "fenced out" in out, out
    assert "on" not in out.splitlines() and "off" not in out.splitlines()
    with open(pidfile, "rb") as f:
        assert f.read() == pid_before
    still = read_lock(vol.lock)
    assert still is not None and still["instance"] == held["instance"]

    # A second container on the same volume: its entrypoint finds a database and execs
    # the shim, which is fenced out before any server starts. The first is frozen
    # meanwhile, so every change to the volume is the second container's doing.
    freeze(a)
    try:
        before = snapshot(root)
        with PostmasterWatch(vol.pgdata) as watch:
            b, _ = vol.container("shim-b")
            code = watch.wait_exit(b)
        after = snapshot(root)
    finally:
        thaw(a)
    log_b = b.log()
    assert code == 73, log_b
    assert "skipping initialisation" in log_b and "fenced out" in log_b
    assert "'shim-a'" in log_b
    assert "starting PostgreSQL" not in log_b and " LOG: " not in log_b, log_b
    assert not watch.new(), "a second postmaster appeared"
    # Before the shim runs, the entrypoint's root step chmods and chowns PGDATA: that
    # changes PGDATA's inode ctime, and nothing else (no file was written).
    diff = changes(before, after)
    assert all(line.startswith("changed directory pgdata:") for line in diff), diff
    assert before["pgdata"][:5] == after["pgdata"][:5]  # mode, owner, size, mtime

    pg.query(port_a, "INSERT INTO fence_init (host) VALUES ('still a')")

    # Stop the first cleanly: SIGTERM to PID 1, the shim, which forwards it.
    os.kill(init, signal.SIGTERM)
    assert a.wait(timeout=90) == 0, a.log()
    assert "released" in a.log()
    assert read_lock(vol.lock) is None

    b2, port_b = vol.serving("shim-b")
    assert "skipping initialisation" in b2.log()
    assert pg.query(port_b, "SELECT string_agg(host, ',' ORDER BY host) FROM fence_init") == (
        "shim-a,still a"
    )
    held_b = read_lock(vol.lock)
    assert held_b is not None and held_b["token"] == "shim-b" and held_b["generation"] == "2"
    os.kill(b2.init_pid(), signal.SIGINT)
    assert b2.wait(timeout=90) == 0, b2.log()
    assert read_lock(vol.lock) is None


@pytest.mark.timeout(180)
def test_shim_with_the_seed_lock_path_inside_pgdata(
    procs: Registry, shared_dir: str, tmp_path: Path
) -> None:
    """The seed's layout: the volume is PGDATA and the lock file sits inside it
    (FENCE_LOCK_FILE=$PGDATA/fence_lock). In the shim style this works: the entrypoint's
    initdb runs before the shim ever creates the lock, and PostgreSQL ignores the extra
    files afterwards."""
    pgdata = pg.make_shared_dir(os.path.join(shared_dir, "volume"))
    vol = Volume(
        procs, shared_dir, str(tmp_path), pgdata=pgdata, lock=os.path.join(pgdata, "fence_lock")
    )
    a, port_a = vol.serving("seed-a")
    assert "init process complete" in a.log()
    held = read_lock(vol.lock)
    assert held is not None and held["token"] == "seed-a" and held["generation"] == "1"

    b = vol.container("seed-b")[0]
    assert b.wait(timeout=60) == 73, b.log()
    assert pg.query(port_a, "SELECT host FROM fence_init") == "seed-a"

    os.kill(a.init_pid(), signal.SIGINT)
    assert a.wait(timeout=90) == 0, a.log()
    assert read_lock(vol.lock) is None
    b2, port_b = vol.serving("seed-b")
    assert "skipping initialisation" in b2.log()
    assert pg.query(port_b, "SELECT host FROM fence_init") == "seed-a"
    os.kill(b2.init_pid(), signal.SIGINT)
    assert b2.wait(timeout=90) == 0, b2.log()
