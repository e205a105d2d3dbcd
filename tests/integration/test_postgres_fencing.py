"""Real PostgreSQL 15 fenced by `pgfence run` in emulated containers on one data directory.

Each container is a sandbox with its own hostname (its token), PID 1, IPC and mount
namespaces: PostgreSQL's own postmaster.pid interlock cannot see across them (the
negative control shows both servers start without pgfence). The lock file sits on the
shared directory next to the data directory, as on a shared volume.

pgfence is PID 1 of each container, started either as root switching to postgres itself
(`--user postgres`) or already as postgres (`gosu postgres pgfence run`).
"""

from __future__ import annotations

import json
import os
import pwd
import signal
from pathlib import Path

import pytest

from conftest import PGFENCE, needs_pg, needs_root, pgfence_run
from harness import pg
from harness.containers import Container, container_env, read_lock, sandbox_pid_uid
from harness.procs import Registry
from harness.waiting import wait_for
from harness.watch import PostmasterWatch

pytestmark = [needs_root, needs_pg, pytest.mark.integration]


def postgres_uid() -> int:
    return pwd.getpwnam("postgres").pw_uid


def launcher(style: str, lock: str, *options: str) -> list[str]:
    """`pgfence run` as a container's command, in one of the two ways to run as postgres."""
    if style == "root":
        return [PGFENCE, "run", "--lock-file", lock, "--user", "postgres", *options, "--"]
    return ["gosu", "postgres", PGFENCE, "run", "--lock-file", lock, *options, "--"]


class Site:
    """One shared directory (data directory + lock file) and the containers using it."""

    def __init__(self, procs: Registry, datadir: str, shared_dir: str, log_dir: str) -> None:
        self.procs = procs
        self.datadir = datadir
        self.shared_dir = shared_dir
        self.lock = os.path.join(shared_dir, "fence_lock")
        self.log_dir = log_dir

    def container(
        self,
        name: str,
        style: str = "root",
        options: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> tuple[Container, int]:
        """Start `pgfence run -- postgres ...` as PID 1 of a new container named `name`."""
        port = pg.free_port()
        sock = pg.make_shared_dir(os.path.join(self.shared_dir, f"sock-{name}-{port}"))
        argv = [
            *prefix,
            *launcher(style, self.lock, *options),
            *pg.server_argv(self.datadir, port, sock),
        ]
        return Container(self.procs, name, argv, container_env(), self.log_dir), port

    def serving(
        self,
        name: str,
        style: str = "root",
        options: tuple[str, ...] = (),
        prefix: tuple[str, ...] = (),
    ) -> tuple[Container, int]:
        box, port = self.container(name, style, options, prefix)
        pg.wait_ready(port, timeout=60, proc=box.proc)
        return box, port

    def refused(self, name: str, style: str = "root") -> Container:
        """A container that must be fenced out: exit 73, and no postgres ever started."""
        pidfile = os.path.join(self.datadir, "postmaster.pid")
        before = _file_state(pidfile)
        with PostmasterWatch(self.datadir) as watch:
            box, _ = self.container(name, style)
            code = watch.wait_exit(box)
        log = box.log()
        assert code == 73, log
        assert "fenced out" in log, log
        assert "starting PostgreSQL" not in log and " LOG: " not in log, log
        assert not watch.new(), "a second postmaster appeared"
        assert _file_state(pidfile) == before, "postmaster.pid was rewritten"
        return box


def _file_state(path: str) -> tuple[bytes, int, int] | None:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), st.st_ino, st.st_mtime_ns
    except FileNotFoundError:
        return None


def status(lock: str, *options: str) -> dict[str, object]:
    result = pgfence_run("status", "--lock-file", lock, "--json", *options, timeout=120)
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stdout)
    assert isinstance(state, dict)
    return state


def generation(lock: str) -> str:
    """The highest generation in `<lock>.generation` (followed by the winner's instance)."""
    with open(f"{lock}.generation") as f:
        return f.read().split()[0]


@pytest.fixture
def site(procs: Registry, pg_cluster: str, shared_dir: str, tmp_path: Path) -> Site:
    return Site(procs, pg_cluster, shared_dir, str(tmp_path))


@pytest.mark.timeout(240)
@pytest.mark.parametrize(
    ("style", "stop_signal"),
    [("root", signal.SIGTERM), ("gosu", signal.SIGINT)],
    ids=["root-user-postgres-sigterm", "gosu-postgres-sigint"],
)
def test_second_container_is_fenced_out_until_first_stops_cleanly(
    site: Site, style: str, stop_signal: int
) -> None:
    a, port_a = site.serving("pg-a", style=style)
    pg.query(port_a, "CREATE TABLE t (v text); INSERT INTO t VALUES ('from a')")
    init = a.init_pid()
    assert sandbox_pid_uid(init) == (0 if style == "root" else postgres_uid())
    held = read_lock(site.lock)
    assert held is not None
    assert held["token"] == "pg-a" and held["pid"] == "1" and held["host"] == "pg-a"
    (postmaster,) = pg.postmaster_pids(site.datadir)
    assert sandbox_pid_uid(postmaster) == postgres_uid()

    b = site.refused("pg-b", style=style)
    assert "'pg-a'" in b.log()

    # The first keeps serving, still under the same holder.
    pg.query(port_a, "INSERT INTO t VALUES ('after b was refused')")
    assert pg.query(port_a, "SELECT count(*) FROM t") == "2"
    now = read_lock(site.lock)
    assert now is not None and now["instance"] == held["instance"]
    assert pg.postmaster_pids(site.datadir) == [postmaster]

    # Operators see a live holder; a plain release refuses to remove its lock.
    wait_for(lambda: status(site.lock)["alive"] is True, "status to call pg-a alive", 60, 0.1)
    wait_for(
        lambda: pgfence_run("check", "--lock-file", site.lock, "--token", "pg-a").returncode == 0,
        "pgfence check to call pg-a's hold healthy",
        60,
        0.1,
    )
    assert pgfence_run("check", "--lock-file", site.lock, "--token", "pg-b").returncode == 1
    refused = pgfence_run("release", "--lock-file", site.lock, timeout=120)
    assert refused.returncode == 73, refused.stderr
    assert "heartbeat is moving" in refused.stderr
    assert read_lock(site.lock) is not None

    # A clean stop: the signal reaches PID 1 (pgfence), which passes it to postgres,
    # waits for it, releases the lock and exits with postgres's status.
    os.kill(init, stop_signal)
    assert a.wait(timeout=90) == 0, a.log()
    log_a = a.log()
    assert "database system is shut down" in log_a
    assert "exited with status 0; released" in log_a
    assert read_lock(site.lock) is None
    assert pg.postmaster_pids(site.datadir) == []
    assert status(site.lock)["state"] == "free"

    # Now the second container comes up on the same data, as the next generation.
    b2, port_b = site.serving("pg-b", style=style)
    assert pg.query(port_b, "SELECT string_agg(v, ',' ORDER BY v) FROM t") == (
        "after b was refused,from a"
    )
    held_b = read_lock(site.lock)
    assert held_b is not None and held_b["token"] == "pg-b" and held_b["generation"] == "2"
    assert generation(site.lock) == "2"
    os.kill(b2.init_pid(), signal.SIGTERM)
    assert b2.wait(timeout=90) == 0, b2.log()
    assert read_lock(site.lock) is None


def _kill_holder(site: Site, style: str = "root") -> tuple[Container, dict[str, str]]:
    """A serving container with a 1 s heartbeat, then SIGKILL of its whole sandbox."""
    a, port = site.serving("pg-a", style=style, options=("--heartbeat-interval", "1"))
    pg.query(port, "CREATE TABLE t (v text); INSERT INTO t VALUES ('committed before kill')")
    a.kill()
    a.wait(timeout=30)
    assert pg.postmaster_pids(site.datadir) == []
    lock = read_lock(site.lock)
    assert lock is not None and lock["token"] == "pg-a"  # a killed holder leaves its lock
    return a, lock


def _next_container_serves(site: Site, killed: dict[str, str]) -> None:
    b, port = site.serving("pg-b")
    assert pg.query(port, "SELECT v FROM t") == "committed before kill"
    lock = read_lock(site.lock)
    assert lock is not None and lock["token"] == "pg-b"
    assert int(lock["generation"]) == int(killed["generation"]) + 1
    os.kill(b.init_pid(), signal.SIGINT)
    assert b.wait(timeout=90) == 0, b.log()


@pytest.mark.timeout(180)
def test_killed_holder_is_silent_and_release_clears_it(site: Site) -> None:
    _, killed = _kill_holder(site)
    assert read_lock(site.lock) == killed
    site.refused("pg-b")
    assert read_lock(site.lock) == killed  # refusing touched nothing

    # Same machine: status reads the holder's heartbeat age off the shared boot clock.
    state = wait_for(
        lambda: (s := status(site.lock))["alive"] is False and s,
        "status to call the killed holder silent",
        60,
        0.1,
    )
    assert state["state"] == "held" and state["age_basis"] == "same-boot clock"
    holder = state["holder"]
    assert isinstance(holder, dict) and holder["token"] == "pg-a"
    assert holder["instance"] == killed["instance"]
    # --observe is for holders on other machines; on the same boot the clock says it all.
    assert status(site.lock, "--observe", "1")["age_basis"] == "same-boot clock"
    text = pgfence_run("status", "--lock-file", site.lock)
    assert text.returncode == 0
    assert "holder:      pg-a" in text.stdout
    assert "silent; measured on this machine's clock" in text.stdout
    assert pgfence_run("check", "--lock-file", site.lock, "--token", "pg-a").returncode == 1

    # A plain release watches the heartbeat for the holder's silence period first.
    released = pgfence_run("release", "--lock-file", site.lock, timeout=120)
    assert released.returncode == 0, released.stderr
    assert "released" in released.stdout and "'pg-a'" in released.stdout
    assert "removed" in released.stderr
    assert read_lock(site.lock) is None

    _next_container_serves(site, killed)


@pytest.mark.timeout(180)
def test_killed_holder_cleared_by_force_release(site: Site) -> None:
    _, killed = _kill_holder(site, style="gosu")
    site.refused("pg-b", style="gosu")
    forced = pgfence_run("release", "--lock-file", site.lock, "--force", timeout=60)
    assert forced.returncode == 0, forced.stderr
    assert f"instance {killed['instance']}" in forced.stderr  # logs what it removed
    assert read_lock(site.lock) is None
    _next_container_serves(site, killed)


FAKE_BOOT = ("sh", "-c", 'mount --bind "$0" /proc/sys/kernel/random/boot_id && exec "$@"')


@pytest.mark.timeout(180)
def test_holder_on_another_machine_is_judged_by_observation(site: Site) -> None:
    """A holder whose lock names another kernel boot (as one on another host would): its
    clock readings mean nothing here, so status and release watch its heartbeat."""
    boot = os.path.join(site.shared_dir, "other-boot-id")
    with open(boot, "w") as f:
        f.write("0badb007-0000-4000-8000-000000000000\n")
    a, port = site.serving("pg-a", options=("--heartbeat-interval", "1"), prefix=(*FAKE_BOOT, boot))
    pg.query(port, "CREATE TABLE t (v text); INSERT INTO t VALUES ('committed before kill')")
    killed = read_lock(site.lock)
    assert killed is not None and killed["boot_id"] == "0badb007-0000-4000-8000-000000000000"

    live = status(site.lock, "--observe", "60")
    assert live["age_basis"] == "observed" and live["alive"] is True

    a.kill()
    killed = read_lock(site.lock)
    assert killed is not None
    site.refused("pg-b")
    silent = status(site.lock, "--observe", "4")
    assert silent["age_basis"] == "observed" and silent["alive"] is False
    assert isinstance(silent["observed_seconds"], float) and silent["observed_seconds"] >= 4
    text = pgfence_run("status", "--lock-file", site.lock, "--observe", "4")
    assert "of watching (silent)" in text.stdout, text.stdout

    released = pgfence_run("release", "--lock-file", site.lock, timeout=120)
    assert released.returncode == 0, released.stderr
    assert read_lock(site.lock) is None
    _next_container_serves(site, killed)
