"""The single-file build (scripts/build-zipapp): small enough for a Swarm config, and a
working `postgres` shim under the system python3, found by `#!/usr/bin/env python3`.

The PATH given to every run starts with /usr/bin, so the shebang finds Debian's python3
(the one a postgres image gets from python3-minimal), never a version manager's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import zipfile
from pathlib import Path

import pytest

from conftest import BIN_DIR, needs_pg, needs_root
from harness import pg
from harness.procs import Registry
from pgfence import __version__, shim

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-zipapp"
SYSTEM_PYTHON = "/usr/bin/python3"
SWARM_CONFIG_LIMIT = 500 * 1000
PG_BIN = pg.PG_BIN
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3"),
]


def build(output: Path, python: str = SYSTEM_PYTHON, **env: str) -> Path:
    proc = subprocess.run(
        [python, str(BUILD), "--output", str(output)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return output


def other_pythons() -> list[str]:
    """Every Python 3.9+ on this machine besides the system one (a version manager's)."""
    import glob

    found = []
    for path in sorted(glob.glob("/root/.pyenv/versions/3.*/bin/python3")):
        minor = int(path.split("/versions/3.")[1].split(".")[0])
        if minor >= 9 and os.access(path, os.X_OK):
            found.append(path)
    return found


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/pgfence.pyz as the build script makes it, in a directory anyone may read
    (the shim runs as the postgres user in the real-server test)."""
    directory = tmp_path_factory.mktemp("zipapp")
    os.chmod(directory, 0o755)
    return build(directory / "pgfence.pyz")


def env_with(path: list[str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FENCE_", "PGFENCE_"))}
    env["PATH"] = os.pathsep.join([*path, "/usr/sbin", "/usr/bin", "/sbin", "/bin"])
    env.update(extra)
    return env


def shim_dir(base: Path, pyz: Path, how: str = "symlink") -> Path:
    """A /newbin-like directory holding `postgres` as a symlink to, or a copy of, the pyz."""
    directory = base / f"newbin-{how}"
    directory.mkdir(exist_ok=True)
    os.chmod(directory, 0o755)
    target = directory / "postgres"
    if how == "symlink":
        target.symlink_to(pyz)
    else:
        shutil.copy2(pyz, target)
    return directory


def test_build_is_small_reproducible_and_sources_only(pyz: Path, tmp_path: Path) -> None:
    data = pyz.read_bytes()
    assert len(data) < SWARM_CONFIG_LIMIT
    assert data.startswith(b"#!/usr/bin/env python3\n")
    assert os.stat(pyz).st_mode & 0o777 == 0o555
    assert build(tmp_path / "again.pyz").read_bytes() == data
    # Its checksum is published next to it, in `sha256sum` format.
    checksum = Path(f"{pyz}.sha256").read_text()
    assert checksum == f"{hashlib.sha256(data).hexdigest()}  {pyz.name}\n"
    check = subprocess.run(["sha256sum", "-c", f"{pyz.name}.sha256"], cwd=pyz.parent, timeout=30)
    assert check.returncode == 0
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
    assert "__main__.py" in names
    assert "pgfence/cli.py" in names and "pgfence/verifyfs/command.py" in names
    assert not [n for n in names if n.endswith(".pyc") or "__pycache__" in n]
    # A copy of the pyz elsewhere on PATH is recognised as pgfence, never run as postgres.
    assert shim._is_pgfence(str(pyz))


def test_build_is_byte_identical_whatever_tmpdir_umask_and_source_times(
    pyz: Path, tmp_path: Path
) -> None:
    """Nothing of the build machine's state ends up in the archive."""
    elsewhere = tmp_path / "tmp"
    elsewhere.mkdir()
    source = ROOT / "src" / "pgfence" / "clock.py"
    stat = source.stat()
    os.utime(source, (stat.st_atime, stat.st_mtime + 12345))  # a fresh checkout's times
    try:
        other = subprocess.run(
            [
                "sh",
                "-c",
                'umask 077 && exec "$@"',
                "sh",
                SYSTEM_PYTHON,
                str(BUILD),
                "--output",
                str(tmp_path / "b.pyz"),
            ],
            env={**os.environ, "TMPDIR": str(elsewhere)},
            capture_output=True,
            timeout=60,
        )
    finally:
        os.utime(source, (stat.st_atime, stat.st_mtime))
    assert other.returncode == 0, other.stderr
    assert (tmp_path / "b.pyz").read_bytes() == pyz.read_bytes()
    assert list(elsewhere.iterdir()) == []  # no staging directory at all
    with zipfile.ZipFile(pyz) as archive:
        infos = archive.infolist()
    assert [i.filename for i in infos] == sorted(i.filename for i in infos)
    assert {i.date_time for i in infos} == {(1980, 1, 2, 0, 0, 0)}
    assert {i.external_attr >> 16 for i in infos} == {0o100644}
    assert not [i for i in infos if i.is_dir()]
    # SOURCE_DATE_EPOCH sets every entry's time, and only that changes.
    dated = build(tmp_path / "dated.pyz", SOURCE_DATE_EPOCH="1767225600")  # 2026-01-01
    with zipfile.ZipFile(dated) as archive:
        assert {i.date_time for i in archive.infolist()} == {(2026, 1, 1, 0, 0, 0)}
        assert archive.read("pgfence/cli.py") == (ROOT / "src/pgfence/cli.py").read_bytes()


@pytest.mark.skipif(not other_pythons(), reason="no other Python 3.9+ on this machine")
def test_build_is_byte_identical_on_every_python(pyz: Path, tmp_path: Path) -> None:
    for python in other_pythons():
        other = build(tmp_path / f"{Path(python).parent.parent.name}.pyz", python)
        assert other.read_bytes() == pyz.read_bytes(), python


def test_runs_as_pgfence_with_system_python(pyz: Path, tmp_path: Path) -> None:
    version = subprocess.run(
        [str(pyz), "--version"], env=env_with([]), capture_output=True, text=True, timeout=30
    )
    assert (version.returncode, version.stdout) == (0, f"pgfence {__version__}\n")
    # The exit status is the command's (zipapp's own generated __main__ would lose it).
    lock = tmp_path / "fence_lock"
    run = subprocess.run(
        [SYSTEM_PYTHON, str(pyz), "run", "--lock-file", str(lock), "--", "sh", "-c", "exit 3"],
        env=env_with([]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 3, run.stderr
    assert not lock.exists()


@needs_pg
@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_postgres_version_passes_through_the_shim(pyz: Path, tmp_path: Path, how: str) -> None:
    newbin = shim_dir(tmp_path, pyz, how)
    lock = tmp_path / "fence_lock"
    # Another copy of the shim further down PATH is skipped, like the shim itself.
    (tmp_path / "decoy").mkdir()
    decoy = shim_dir(tmp_path / "decoy", pyz, "copy")
    path = [str(newbin), str(decoy), PG_BIN]
    proc = subprocess.run(
        ["postgres", "--version"],
        env=env_with(path, FENCE_LOCK_FILE=str(lock)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("postgres (PostgreSQL) ")
    assert not lock.exists()  # passed straight through, the lock untouched


@needs_pg
def test_real_postgres_from_fence_postgres_bin(pyz: Path, tmp_path: Path) -> None:
    newbin = shim_dir(tmp_path, pyz)
    proc = subprocess.run(
        ["postgres", "-V"],
        env=env_with([str(newbin)], FENCE_POSTGRES_BIN=os.path.join(PG_BIN, "postgres")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (proc.returncode, proc.stdout.split()[:2]) == (0, ["postgres", "(PostgreSQL)"])


def fake_postgres(tmp_path: Path) -> Path:
    """A stand-in server that records what the shim ran it with (and which interpreter its
    parent, the shim, runs on), then exits 0."""
    script = tmp_path / "real" / "postgres"
    script.parent.mkdir()
    script.write_text(
        "#!/bin/sh\n"
        'echo "$@" > "$0.args"\n'
        'echo "$PGFENCE_GENERATION" > "$0.generation"\n'
        'readlink "/proc/$PPID/exe" > "$0.python"\n'
    )
    script.chmod(0o755)
    return script


def run_shim_on_fake_postgres(
    pyz: Path, tmp_path: Path, lock: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    """`postgres ARGS` through the shim, as host this-host, on `fake_postgres`."""
    newbin = shim_dir(tmp_path, pyz)
    real = fake_postgres(tmp_path)
    return subprocess.run(
        ["postgres", *args],
        env=env_with(
            [str(newbin), str(real.parent)], FENCE_LOCK_FILE=str(lock), HOSTNAME="this-host"
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_shim_refuses_73_when_another_token_holds_the_lock(pyz: Path, tmp_path: Path) -> None:
    lock = tmp_path / "fence_lock"
    lock.write_text("other-host\n")  # the shell script's one-line lock
    proc = run_shim_on_fake_postgres(pyz, tmp_path, lock, "-D", str(tmp_path / "data"))
    assert proc.returncode == 73, proc.stderr
    assert "fenced out" in proc.stderr and "other-host" in proc.stderr
    assert lock.read_text() == "other-host\n"
    assert not (tmp_path / "real" / "postgres.args").exists()  # never started


def test_shim_starts_on_our_own_one_line_lock(pyz: Path, tmp_path: Path) -> None:
    """The seed's rule: a one-line lock holding our token is ours; the server starts with
    the shim's arguments, under a generation, and the lock is released afterwards."""
    lock = tmp_path / "fence_lock"
    lock.write_text("this-host")
    proc = run_shim_on_fake_postgres(
        pyz, tmp_path, lock, "-D", str(tmp_path / "data"), "-c", "port=5999"
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "real" / "postgres.args").read_text().split() == [
        "-D",
        str(tmp_path / "data"),
        "-c",
        "port=5999",
    ]
    assert int((tmp_path / "real" / "postgres.generation").read_text()) >= 1
    python = (tmp_path / "real" / "postgres.python").read_text().strip()
    assert os.path.realpath(python) == os.path.realpath(SYSTEM_PYTHON)
    assert not lock.exists()


@needs_root
@needs_pg
@pytest.mark.integration
def test_fenced_start_of_real_postgres_through_the_shim(
    pyz: Path, procs: Registry, pg_cluster: str, shared_dir: str
) -> None:
    """The shim as the official entrypoint runs it: as the postgres user, `postgres` on
    PATH. The server serves while the lock names this token; SIGINT (the image's stop
    signal) is a fast shutdown, after which the lock is gone."""
    newbin = shim_dir(Path(shared_dir), pyz, "copy")  # pytest's tmp dirs are root's only
    lock = os.path.join(shared_dir, "fence_lock")
    sock = pg.make_shared_dir(os.path.join(shared_dir, "sock"))
    port = pg.free_port()
    argv = ["postgres", *pg.server_argv(pg_cluster, port, sock)[1:]]
    env = env_with([str(newbin), PG_BIN], FENCE_LOCK_FILE=lock, HOSTNAME="shim-host")
    server = procs.start(pg.as_postgres(argv), env=env, stderr=subprocess.PIPE)
    pg.wait_ready(port, proc=server)
    with open(lock) as f:
        assert f.readline() == "shim-host\n"
    status = subprocess.run(
        [os.path.join(BIN_DIR, "pgfence"), "status", "--json", "--lock-file", lock],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"state": "held"' in status.stdout and '"ours": true' in status.stdout
    assert len(pg.postmaster_pids(pg_cluster)) >= 1
    server.send_signal(signal.SIGINT)
    _, err = server.communicate(timeout=60)
    assert server.returncode == 0, err.decode()
    assert not os.path.exists(lock)
    assert pg.postmaster_pids(pg_cluster) == []


def _python39() -> str | None:
    """A real Python 3.9 (Debian's, or a version manager's build; never its shim)."""
    import glob

    candidates = [
        "/usr/bin/python3.9",
        *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9")),
    ]
    return next((c for c in candidates if os.access(c, os.X_OK)), None)


@pytest.mark.skipif(_python39() is None, reason="no Python 3.9 here (pgfence's oldest)")
def test_runs_on_the_oldest_supported_python(pyz: Path, tmp_path: Path) -> None:
    """Debian bullseye's postgres images get Python 3.9: the whole package must import."""
    python = _python39()
    assert python is not None
    lock = tmp_path / "fence_lock"
    run = subprocess.run(
        [python, str(pyz), "run", "--lock-file", str(lock), "--", python, str(pyz), "status"],
        env=env_with([], HOSTNAME="py39"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert "holder:      py39  (this token)" in run.stdout
    importer = "import pgfence.cli, pgfence.verifyfs.command, pgfence.backends.etcd.backend"
    imported = subprocess.run(
        [python, "-c", f"import sys; sys.path.insert(0, {str(pyz)!r}); {importer}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr


def test_export_shim_from_the_zipapp(pyz: Path) -> None:
    """The sh shim is read through the package's loader, so the zipapp prints it too."""
    from_pyz = subprocess.run(
        [SYSTEM_PYTHON, str(pyz), "export-shim"], capture_output=True, timeout=30
    )
    from_package = subprocess.run(
        [os.path.join(BIN_DIR, "pgfence"), "export-shim"], capture_output=True, timeout=30
    )
    assert from_pyz.returncode == 0 == from_package.returncode, from_pyz.stderr
    assert from_pyz.stdout == from_package.stdout
    assert from_pyz.stdout.startswith(b"#!/bin/sh\n# pgfence-sh-shim ")
