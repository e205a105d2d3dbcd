"""docker/Dockerfile's `pgfence entrypoint` on stand-ins of the official images, in a real
engine: which layout a volume gets, what is fenced and what passes through, and Python
in the image (bytecode compiled at build time, a clear line without the full stdlib).

Only the official image's documented usage (`-e POSTGRES_PASSWORD=... -v VOL:<its VOLUME>`)
plus what the host network needs (a port, a hostname), unless a test says otherwise.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

d = pytest.importorskip("harness.docker", reason="needs the real-Docker harness")
dp = pytest.importorskip("harness.dockerpg", reason="needs the real-Docker harness")
standins = pytest.importorskip("harness.standins", reason="needs the real-Docker harness")
from harness import pg  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.docker]

PRE_18 = ["15", "17"]
MAJORS = ["15", "17", "18"]


def _volume_files(vol: str) -> set[str]:
    return set(os.listdir(dp.volume_path(vol)))


def _data_directory(port: int) -> str:
    done = dp.psql(port, "SHOW data_directory")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _run_once(
    image: str, *args: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return d.docker("run", "--rm", "--network", "host", *extra, image, *args, check=False)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", PRE_18)
def test_fresh_pre_18_volume_gets_pgdata_one_level_down_and_the_lock_at_its_root(
    images, names, major: str
) -> None:
    image, standin = images.image("fence", major), images.standin(major)
    vol = names.volume()
    first, port = names.container("first"), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, port)
    assert {"fence_lock", "pgdata"} <= _volume_files(vol)
    assert "PG_VERSION" not in _volume_files(vol)
    assert _data_directory(port) == "/var/lib/postgresql/data/pgdata"
    assert dp.lock_text(vol).startswith(f"{first}\n")  # the token is the first line
    done = dp.psql(port, "CREATE TABLE kept AS SELECT 7 AS n")
    assert done.returncode == 0, done.stderr
    d.docker("stop", "-t", "60", first, timeout=90)
    assert dp.lock_text(vol) is None
    # The same volume again: the database in pgdata/ is found, not initialised anew.
    again = names.container("again")
    dp.run_serving(again, image, vol, standin.volume, port)
    assert "Skipping initialization" in d.logs(again)
    assert dp.psql(port, "SELECT n FROM kept").stdout.strip() == "7"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", PRE_18)
def test_volume_the_official_image_initialised_keeps_pgdata_at_its_root(
    images, names, major: str
) -> None:
    image, standin = images.image("fence", major), images.standin(major)
    vol = names.volume()
    plain, fenced, port = names.container("plain"), names.container("fenced"), pg.free_port()
    dp.run_serving(plain, standin.tag, vol, standin.volume, port)
    d.docker("stop", "-t", "60", plain, timeout=90)
    dp.run_serving(fenced, image, vol, standin.volume, port)
    assert _data_directory(port) == "/var/lib/postgresql/data"
    assert "pgdata" not in _volume_files(vol)  # no second, empty database beside it
    assert dp.lock_text(vol) is not None


@pytest.mark.timeout(400)
def test_two_containers_at_once_on_a_fresh_volume_initialise_it_once(images, names) -> None:
    """The layout decision is taken by the fence's holder: one initdb, one refusal."""
    image, standin = images.image("fence", "15"), images.standin("15")
    vol = names.volume()
    d.docker("volume", "create", vol)
    a, b = names.container("a"), names.container("b")
    ports = {a: pg.free_port(), b: pg.free_port()}
    procs = [
        subprocess.Popen(
            [d.client(), "run", "-d", "--name", name, "--network", "host", "--hostname", name,
             "-e", f"POSTGRES_PASSWORD={dp.PASSWORD}", "-v", f"{vol}:{standin.volume}",
             image, "-c", f"port={ports[name]}"],
            stdout=subprocess.DEVNULL,
        )
        for name in (a, b)
    ]  # fmt: skip
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    deadline = time.monotonic() + 120
    while all(d.state(n).get("Running") for n in (a, b)):
        assert time.monotonic() < deadline, "neither container was refused"
        time.sleep(0.2)
    (loser,) = [n for n in (a, b) if not d.state(n).get("Running")]
    (winner,) = [n for n in (a, b) if n != loser]
    assert d.wait_exit(loser, timeout=30) == 73, d.logs(loser)[-2000:]
    assert not dp.started_postgres(d.logs(loser)), d.logs(loser)[-2000:]
    dp.wait_serving(ports[winner], winner)
    assert d.logs(winner).count("PostgreSQL init process complete") == 1
    assert dp.lock_text(vol).startswith(f"{winner}\n")


@pytest.mark.timeout(400)
def test_pgdata_and_lock_the_user_sets_are_used(images, names) -> None:
    image, standin = images.image("fence", "15"), images.standin("15")
    vol = names.volume()
    box, port = names.container("box"), pg.free_port()
    env = {
        "PGDATA": "/var/lib/postgresql/data/mydb",
        "FENCE_LOCK_FILE": "/var/lib/postgresql/data/my_lock",
    }
    dp.run_serving(box, image, vol, standin.volume, port, env=env)
    assert _data_directory(port) == env["PGDATA"]
    assert {"mydb", "my_lock"} <= _volume_files(vol)
    assert not {"pgdata", "fence_lock"} & _volume_files(vol)


@pytest.mark.timeout(400)
def test_lock_off_the_volume_is_refused_with_where_to_put_it(images, names) -> None:
    image, standin = images.image("fence", "15"), images.standin("15")
    vol = names.volume()
    box = names.container("box")
    dp.run(box, image, vol, standin.volume, pg.free_port(),
           env={"FENCE_LOCK_FILE": "/var/lib/postgresql/fence_lock"})  # fmt: skip
    assert d.wait_exit(box, timeout=60) == 64
    logs = d.logs(box)
    assert "another filesystem" in logs and "set FENCE_LOCK_FILE" in logs, logs[-2000:]
    assert "--allow-other-filesystem" not in logs and not dp.started_postgres(logs)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", MAJORS)
def test_commands_that_start_no_server_pass_through_unfenced(images, names, major: str) -> None:
    """While another container holds the fence: psql, bash and pgfence itself run (the
    official entrypoint execs them as they are), and none of them touches the lock."""
    image, standin = images.image("fence", major), images.standin(major)
    vol = names.volume()
    holder, port = names.container("holder"), pg.free_port()
    dp.run_serving(holder, image, vol, standin.volume, port)
    lock = dp.lock_text(vol)
    mount = ("-v", f"{vol}:{standin.volume}")

    status = _run_once(image, "pgfence", "status", extra=mount)
    assert status.returncode == 0, status.stderr
    assert f"holder:      {holder}" in status.stdout
    password = ("-e", f"PGPASSWORD={dp.PASSWORD}")
    psql = _run_once(image, "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres",
                     "-Atc", "SELECT 40 + 2", extra=(*mount, *password))  # fmt: skip
    assert (psql.returncode, psql.stdout.strip()) == (0, "42"), psql.stderr
    shell = _run_once(image, "bash", "-c", "echo through", extra=mount)
    assert (shell.returncode, shell.stdout) == (0, "through\n"), shell.stderr
    version = _run_once(image, "postgres", "--version", extra=mount)
    assert version.returncode == 0 and "PostgreSQL" in version.stdout, version.stderr
    assert "fenced out" not in status.stderr + psql.stderr + shell.stderr + version.stderr
    # A server start is still fenced.
    refused = _run_once(image, "-c", f"port={pg.free_port()}", extra=mount)
    assert refused.returncode == 73, refused.stderr[-2000:]
    assert (
        dp.lock_text(vol) is not None and dp.lock_text(vol).split("\n")[:3] == lock.split("\n")[:3]
    )


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", ["15", "18"])
def test_read_only_root_filesystem_serves_and_python_writes_nothing(
    images, names, major: str
) -> None:
    image, standin = images.image("fence", major), images.standin(major)
    vol = names.volume()
    ro, port = names.container("ro"), pg.free_port()
    dp.run(ro, image, vol, standin.volume, port,
           extra=["--read-only", "--tmpfs", "/run", "--tmpfs", "/tmp"])  # fmt: skip
    dp.wait_serving(port, ro)
    check = d.docker("exec", ro, "pgfence", "check", check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    d.docker("stop", "-t", "60", ro, timeout=90)
    assert d.state(ro).get("ExitCode") == 0, d.logs(ro)[-2000:]
    # The same on a writable root: the container's layer gets nothing outside /run and /tmp
    # (no bytecode written by pgfence, its health check or `pgfence status --json`).
    rw, port = names.container("rw"), pg.free_port()
    dp.run_serving(rw, image, names.volume("rw"), standin.volume, port)
    for command in (["pgfence", "check"], ["pgfence", "status", "--json"]):
        done = d.docker("exec", rw, *command, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    changed = d.docker("diff", rw).stdout.split("\n")
    paths = [line.split(" ", 1)[1] for line in changed if line.strip()]
    assert [p for p in paths if not p.startswith(("/run", "/var/run", "/tmp"))] == []


@pytest.mark.timeout(900)
def test_python3_minimal_alone_gets_one_line_naming_the_package(images) -> None:
    """The launcher and package on the stand-in with python3-minimal only (no
    libpython3-stdlib): one line naming the package, no traceback, nothing started."""
    standin = images.standin("15")
    source = standins.image_source()
    tag = "pgfence-test/python3-minimal:15"
    dockerfile = (
        f"FROM {standin.tag}\n"
        "RUN apt-get update && apt-get install -y --no-install-recommends python3-minimal "
        "&& rm -rf /var/lib/apt/lists/*\n"
        "COPY src/pgfence/ /usr/local/lib/pgfence/pgfence/\n"
        "COPY docker/pgfence /usr/local/bin/pgfence\n"
        'ENTRYPOINT ["pgfence", "entrypoint", "--", "docker-entrypoint.sh"]\n'
        'CMD ["postgres"]\n'
    )
    with tempfile.TemporaryDirectory(prefix="pgfence-minimal-") as ctx:
        shutil.copytree(source / "src" / "pgfence", Path(ctx) / "src" / "pgfence",
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
        (Path(ctx) / "docker").mkdir()
        shutil.copy2(source / "docker" / "pgfence", Path(ctx) / "docker" / "pgfence")
        d.build(tag, ctx, dockerfile_text=dockerfile)
    password = ("-e", f"POSTGRES_PASSWORD={dp.PASSWORD}")
    health_check = ("--entrypoint", "pgfence", *password)  # as HEALTHCHECK runs it: 0 or 1
    for extra, args, code in (
        (password, [], 64),  # the server start
        (password, ["pgfence", "--version"], 64),
        (health_check, ["check"], 1),
    ):
        done = _run_once(tag, *args, extra=extra)
        lines = done.stderr.splitlines()
        assert done.returncode == code, done.stderr
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "libpython3-stdlib" in lines[0] and "pgfence" in lines[0]
        assert not dp.started_postgres(done.stdout + done.stderr)
