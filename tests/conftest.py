"""Shared fixtures. Integration tests need root (namespaces, gosu) and Debian's
postgresql-15; they are skipped with a reason where those are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from harness import etcd, pg
from harness.procs import Registry

BIN_DIR = os.path.dirname(sys.executable)
PGFENCE = os.path.join(BIN_DIR, "pgfence")
SHARED_ROOT = "/tmp/pgfence-tests"  # readable by the postgres user, unlike pytest's tmp_path


def pgfence_run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30, **kw: object
) -> subprocess.CompletedProcess[str]:
    """Run the installed `pgfence` command and capture its output."""
    return subprocess.run(
        [PGFENCE, *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=timeout,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def procs() -> Iterator[Registry]:
    registry = Registry()
    yield registry
    registry.cleanup()


@pytest.fixture
def shared_dir(request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh directory owned by postgres, mode 0755: the emulated shared volume."""
    os.makedirs(SHARED_ROOT, exist_ok=True)
    os.chmod(SHARED_ROOT, 0o755)
    name = f"{request.node.name[:40]}-{uuid.uuid4().hex[:6]}".replace("/", "_")
    path = pg.make_shared_dir(os.path.join(SHARED_ROOT, name))
    yield path
    shutil.rmtree(path, ignore_errors=True)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, gosu)")
needs_pg = pytest.mark.skipif(not pg.available(), reason="needs postgresql-15 and gosu")
needs_etcd = pytest.mark.skipif(
    not etcd.available(), reason="needs etcd and etcdctl (Debian etcd-server)"
)


@pytest.fixture(scope="session")
def pg_template() -> Iterator[str]:
    """One initdb'd cluster (with data checksums) per session, copied by tests."""
    if not pg.available() or os.geteuid() != 0:
        pytest.skip("needs root, postgresql-15 and gosu")
    os.makedirs(SHARED_ROOT, exist_ok=True)
    os.chmod(SHARED_ROOT, 0o755)
    path = pg.make_shared_dir(os.path.join(SHARED_ROOT, f"template-{uuid.uuid4().hex[:6]}"))
    datadir = os.path.join(path, "data")
    pg.initdb(datadir)
    yield datadir
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pg_cluster(pg_template: str, shared_dir: str) -> str:
    """A fresh copy of the template cluster inside this test's shared directory."""
    datadir = os.path.join(shared_dir, "data")
    pg.clone_cluster(pg_template, datadir)
    return datadir
