"""Real PostgreSQL 15 from Debian, run as the postgres user."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

PG_BIN = os.environ.get("PGFENCE_TEST_PG_BIN", "/usr/lib/postgresql/15/bin")


def available() -> bool:
    return os.path.exists(os.path.join(PG_BIN, "postgres")) and shutil.which("gosu") is not None


def as_postgres(argv: Sequence[str]) -> list[str]:
    """Prefix that drops to the postgres user, as the official image does with gosu."""
    return ["gosu", "postgres", *argv]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_shared_dir(path: str) -> str:
    """A directory both root and postgres can use (the "shared volume")."""
    os.makedirs(path, exist_ok=True)
    shutil.chown(path, "postgres", "postgres")
    os.chmod(path, 0o755)
    return path


def initdb(datadir: str, checksums: bool = True) -> None:
    argv = [
        os.path.join(PG_BIN, "initdb"),
        "-D",
        datadir,
        "--auth=trust",
        "-U",
        "postgres",
        "--no-sync",
        "-E",
        "UTF8",
        "--locale=C",
    ]
    if checksums:
        argv.append("--data-checksums")
    subprocess.run(as_postgres(argv), check=True, capture_output=True, timeout=120)


def clone_cluster(template: str, datadir: str) -> None:
    """Copy an initdb'd cluster (much faster than initdb per test)."""
    subprocess.run(["cp", "-a", template, datadir], check=True, timeout=60)


def server_argv(datadir: str, port: int, socket_dir: str, *extra: str) -> list[str]:
    """The postgres command line (without user switch) for a test server on loopback."""
    return [
        os.path.join(PG_BIN, "postgres"),
        "-D",
        datadir,
        "-p",
        str(port),
        "-k",
        socket_dir,
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "fsync=on",
        "-c",
        "shared_buffers=16MB",
        "-c",
        "max_connections=30",
        *extra,
    ]


def client_args(port: int) -> list[str]:
    """How a client program (psql, pg_amcheck) reaches the test server on `port`."""
    return ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres"]


def psql(
    port: int, sql: str, timeout: float = 10.0, db: str = "postgres"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            os.path.join(PG_BIN, "psql"),
            *client_args(port),
            "-d",
            db,
            "-XAtqc",
            sql,
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PGCONNECT_TIMEOUT": "3"},
    )


def query(port: int, sql: str) -> str:
    """What `sql` prints, trimmed; fails the test if psql fails."""
    result = psql(port, sql, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def is_ready(port: int) -> bool:
    try:
        return psql(port, "select 1", timeout=5).stdout.strip() == "1"
    except subprocess.TimeoutExpired:
        return False


def wait_ready(
    port: int, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> float:
    """Wait until the server answers a query; returns the seconds it took."""
    start = time.monotonic()
    while not is_ready(port):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"server process exited with {proc.returncode} before ready")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"server on port {port} not ready after {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - start


def postmaster_pids(datadir: str) -> list[int]:
    """Host pids of every running `postgres` process whose command line names `datadir`."""
    found = []
    needle = datadir.encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        if cmd and os.path.basename(cmd[0]) == b"postgres" and needle in cmd:
            found.append(int(name))
    return found
