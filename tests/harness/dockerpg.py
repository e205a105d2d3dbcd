"""PostgreSQL containers in a real Docker engine, on the host network.

Each test's server gets its own port (`-c port=N` after the image's CMD, as a user passes
postgres options), and clients connect through loopback with the host's psql. A container
on the host network would share the host's hostname, which the fence uses as its token; each
container is given its own `--hostname` (its name), as Docker's default network would.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Sequence

from harness import docker as d
from harness import pg

PASSWORD = "pw"
# What the official image needs and nothing more (its documented `docker run`).
BASE_ENV = {"POSTGRES_PASSWORD": PASSWORD}


def run(
    name: str,
    image: str,
    volume: str,
    mount: str,
    port: int,
    env: dict[str, str] | None = None,
    hostname: str | None = None,
    extra: Sequence[str] = (),
    args: Sequence[str] = (),
) -> None:
    """`docker run -d` a server container; `args` go after `-c port=N`."""
    argv = ["run", "-d", "--name", name, "--network", "host", "--hostname", hostname or name]
    for key, value in {**BASE_ENV, **(env or {})}.items():
        argv += ["-e", f"{key}={value}"]
    argv += ["-v", f"{volume}:{mount}", *extra, image, "-c", f"port={port}", *args]
    d.docker(*argv, timeout=60)


def psql(port: int, sql: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    os.environ["PGPASSWORD"] = PASSWORD  # the writer's psql (harness.pg) reads it too
    return pg.psql(port, sql, timeout=timeout)


def serves(port: int) -> bool:
    try:
        return psql(port, "select 1", timeout=5).stdout.strip() == "1"
    except subprocess.TimeoutExpired:
        return False


def wait_serving(port: int, container: str, timeout: float = 120) -> float:
    """Seconds until `select 1` answers on `port`; fails at once if the container exits."""
    start = time.monotonic()
    while not serves(port):
        st = d.state(container)
        if st and not st.get("Running"):
            code, tail = st.get("ExitCode"), d.logs(container)[-3000:]
            raise AssertionError(f"{container} exited {code} before serving:\n{tail}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{container}: port {port} not serving after {timeout} s")
        time.sleep(0.2)
    return time.monotonic() - start


def run_serving(
    name: str, image: str, volume: str, mount: str, port: int, env: dict[str, str] | None = None
) -> float:
    """`run` a server container and `wait_serving` on it; returns the seconds waited."""
    run(name, image, volume, mount, port, env)
    return wait_serving(port, name)


def volume_path(volume: str) -> str:
    """Where a local volume's files are on the host (tests run as root)."""
    return d.docker("volume", "inspect", "--format", "{{.Mountpoint}}", volume).stdout.strip()


def lock_text(volume: str, relative: str = "fence_lock") -> str | None:
    try:
        with open(os.path.join(volume_path(volume), relative), encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        return None


def server_started_at(port: int) -> str:
    """pg_postmaster_start_time() of the server on `port`: changes if it is restarted."""
    done = psql(port, "SELECT pg_postmaster_start_time()")
    assert done.returncode == 0 and done.stdout.strip(), done.stderr
    return done.stdout.strip()


def started_postgres(logs: str) -> bool:
    """True if the logs show initdb, the entrypoint's temporary server or a server starting."""
    markers = (
        "PostgreSQL init process",
        "The files belonging to this database system",
        "starting PostgreSQL",
        "database system is ready",
        "database system was",
        "listening on",
    )
    return any(m in logs for m in markers)


def health(container: str) -> tuple[str, list[int]]:
    """Health status and the exit codes of the health checks run so far."""
    st = d.state(container)
    h = st.get("Health")
    if not isinstance(h, dict):
        return "", []
    codes = [int(entry["ExitCode"]) for entry in h.get("Log") or []]
    return str(h.get("Status")), codes
