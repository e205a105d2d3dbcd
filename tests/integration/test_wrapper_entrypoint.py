"""pgfence wrapped around an entrypoint shaped like the official image's, on real PostgreSQL.

`pgfence run -- entrypoint.sh postgres -D ...` is PID 1 of each emulated container, as
root: the lock is taken before the entrypoint runs, so the entrypoint's initdb and its
temporary server (started by pg_ctl in a session of its own) are fenced too, and a
refused container never touches the volume.

The volume holds PGDATA as a subdirectory and the lock file next to it: a lock file
inside an empty PGDATA would make initdb refuse the directory (shown below).
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
    sandbox_pid_uid,
    server_args,
)
from harness.procs import Registry, stat_fields
from harness.volume import changes, snapshot
from harness.waiting import wait_for
from harness.watch import PostmasterWatch, freeze, thaw

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


class Volume:
    """An emulated shared volume; each container runs pgfence around the entrypoint."""

    def __init__(
        self,
        procs: Registry,
        shared_dir: str,
        log_dir: str,
        pgdata_in_volume: str = "pgdata",
        shim: bool = False,
    ) -> None:
        self.procs = procs
        self.shared_dir = shared_dir
        self.log_dir = log_dir
        self.root = pg.make_shared_dir(os.path.join(shared_dir, "volume"))
        self.pgdata = os.path.normpath(os.path.join(self.root, pgdata_in_volume))
        self.lock = os.path.join(self.root, "fence_lock")
        self.bin = make_bin_dir(
            os.path.join(shared_dir, "bin"), shim_target=PGFENCE if shim else None
        )

    def container(self, name: str, flags: bool = False) -> tuple[Container, int]:
        """pgfence configured as images do (FENCE_LOCK_FILE in the environment, the
        hostname as token) or, with `flags`, on its command line only."""
        port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(self.shared_dir, f"sock-{name}-{port}"))
        env = container_env([self.bin], PGDATA=self.pgdata, PGHOST=sock, PGPORT=str(port))
        options = ["--lock-file", self.lock, "--token", f"{name}-by-flag"] if flags else []
        if not flags:
            env["FENCE_LOCK_FILE"] = self.lock
        argv = [
            PGFENCE,
            "run",
            *options,
            "--",
            "entrypoint.sh",
            *server_args(self.pgdata, port, sock),
        ]
        return Container(self.procs, name, argv, env, self.log_dir), port

    def serving(self, name: str, flags: bool = False) -> tuple[Container, int]:
        box, port = self.container(name, flags)
        pg.wait_ready(port, timeout=90, proc=box.proc)
        return box, port


def stop(box: Container, signum: int = signal.SIGTERM) -> None:
    os.kill(box.init_pid(), signum)
    assert box.wait(timeout=90) == 0, box.log()
    assert "released" in box.log()


def assert_refused_untouched(vol: Volume, holder: Container, name: str) -> Container:
    """Start a container while `holder` is frozen: it must exit 73 having changed nothing
    on the volume (every entry's metadata compared) and started no process there."""
    freeze(holder)
    try:
        before = snapshot(vol.root)
        with PostmasterWatch(vol.pgdata) as watch:
            box, _ = vol.container(name)
            code = watch.wait_exit(box)
        after = snapshot(vol.root)
    finally:
        thaw(holder)
    log = box.log()
    assert code == 73, log
    assert "fenced out" in log, log
    assert "entrypoint:" not in log and "database system" not in log, log  # it never ran
    assert not watch.new(), "a second postmaster appeared"
    assert changes(before, after) == []
    return box


@pytest.mark.timeout(240)
def test_wrapper_fences_initdb_and_server(procs: Registry, shared_dir: str, tmp_path: Path) -> None:
    vol = Volume(procs, shared_dir, str(tmp_path))
    assert os.listdir(vol.root) == []
    a, port_a = vol.serving("wrap-a")
    log_a = a.log()
    # The lock came first, then the entrypoint initialised the empty volume under it.
    assert log_a.index("acquired") < log_a.index("entrypoint: initialising")
    assert "init process complete" in log_a
    assert pg.query(port_a, "SELECT host FROM fence_init") == "wrap-a"
    held = read_lock(vol.lock)
    assert held is not None and held["token"] == "wrap-a" and held["pid"] == "1"
    assert held["generation"] == "1"
    init = a.init_pid()
    assert cmdline(init)[1:3] == [PGFENCE, "run"] and sandbox_pid_uid(init) == 0
    (postmaster,) = pg.postmaster_pids(vol.pgdata)
    assert sandbox_pid_uid(postmaster) != 0

    assert_refused_untouched(vol, a, "wrap-b")
    pg.query(port_a, "INSERT INTO fence_init (host) VALUES ('a after b')")
    assert pg.postmaster_pids(vol.pgdata) == [postmaster]

    stop(a)
    assert read_lock(vol.lock) is None
    b, port_b = vol.serving("wrap-b")
    assert "skipping initialisation" in b.log()
    assert pg.query(port_b, "SELECT string_agg(host, ',' ORDER BY host) FROM fence_init") == (
        "a after b,wrap-a"
    )
    held_b = read_lock(vol.lock)
    assert held_b is not None and held_b["token"] == "wrap-b" and held_b["generation"] == "2"
    stop(b, signal.SIGINT)
    assert read_lock(vol.lock) is None


@pytest.mark.timeout(240)
def test_wrapper_two_containers_start_together_on_an_empty_volume(
    procs: Registry, shared_dir: str, tmp_path: Path
) -> None:
    """The race the shim style cannot win: both containers find no database at once.
    Under the wrapper exactly one initialises; the other is refused before its
    entrypoint runs."""
    vol = Volume(procs, shared_dir, str(tmp_path))
    boxes = [vol.container("race-a"), vol.container("race-b")]
    finished = wait_for(
        lambda: [box for box, _ in boxes if box.returncode() is not None],
        "one of the two containers to be refused",
        timeout=90,
        interval=0.1,
    )
    (loser,) = finished
    (winner, port) = next((box, port) for box, port in boxes if box is not loser)
    assert loser.wait(timeout=10) == 73, loser.log()
    assert "entrypoint:" not in loser.log()
    pg.wait_ready(port, timeout=90, proc=winner.proc)
    assert pg.query(port, "SELECT host FROM fence_init") == winner.name
    assert winner.log().count("entrypoint: initialising") == 1
    stop(winner)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("flags", [False, True], ids=["configured-by-env", "configured-by-flags"])
def test_wrapper_and_shim_nested(
    procs: Registry, shared_dir: str, tmp_path: Path, flags: bool
) -> None:
    """The wrapper around the entrypoint, and the `postgres` shim first on PATH too: the
    shim that the entrypoint's `exec "$@"` reaches finds the fence held by the pgfence
    supervising it (PGFENCE_INSTANCE, PGFENCE_LOCK) and becomes the server in place.
    The shim reads only the environment; the wrapper's own settings reach it there even
    when they were given as flags (another lock path, a token other than the hostname)."""
    vol = Volume(procs, shared_dir, str(tmp_path), shim=True)
    a, port_a = vol.serving("nest-a", flags)
    log_a = a.log()
    assert f"running {pg.PG_BIN}/postgres directly" in log_a, log_a
    assert "fenced out" not in log_a
    assert pg.query(port_a, "SELECT host FROM fence_init") == "nest-a"
    held = read_lock(vol.lock)
    token = "nest-a-by-flag" if flags else "nest-a"
    assert held is not None and held["token"] == token and held["generation"] == "1"
    # No second supervisor: the server is PID 1's own child, in the fence it names.
    init = a.init_pid()
    (postmaster,) = pg.postmaster_pids(vol.pgdata)
    fields = stat_fields(postmaster)
    assert fields is not None and int(fields[1]) == init
    with open(f"/proc/{postmaster}/environ", "rb") as f:
        environ = dict(item.decode().partition("=")[::2] for item in f.read().split(b"\0") if item)
    assert environ["PGFENCE_INSTANCE"] == held["instance"]
    assert environ["PGFENCE_LOCK"] == vol.lock

    assert_refused_untouched(vol, a, "nest-b")
    stop(a)
    assert read_lock(vol.lock) is None


@pytest.mark.timeout(120)
def test_wrapper_with_lock_inside_empty_pgdata_breaks_initdb(
    procs: Registry, shared_dir: str, tmp_path: Path
) -> None:
    """The pre-18 layout with the seed's default lock path: the volume is PGDATA and the
    lock file sits inside it. Under the wrapper the lock (and its generation file, which
    outlives a release) are in PGDATA before initdb runs, and initdb refuses a non-empty
    directory. Hence: with the wrapper, keep the lock outside PGDATA."""
    vol = Volume(procs, shared_dir, str(tmp_path), pgdata_in_volume=".")
    box, _ = vol.container("inside-a")
    code = box.wait(timeout=90)
    log = box.log()
    assert code not in (0, 73), log
    assert "exists but is not empty" in log, log
    assert read_lock(vol.lock) is None  # released when the entrypoint failed
    assert "fence_lock.generation" in os.listdir(vol.pgdata)
    assert not os.path.exists(os.path.join(vol.pgdata, "PG_VERSION"))
