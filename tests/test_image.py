"""pgfence.image: the images' layout rules, without a container (the real-Docker tests in
tests/docker_engine/ run them on stand-ins of the official images)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from pgfence import image
from pgfence.config import resolve
from pgfence.errors import UsageError


@pytest.mark.parametrize(
    ("args", "server"),
    [
        (["postgres"], True),
        (["-c", "port=5433"], True),  # options mean `postgres ...`
        (["postgres", "-C", "data_checksums"], True),  # the entrypoint initialises first
        (["postgres", "--version"], False),
        (["-V"], False),
        (["postgres", "--describe-config"], False),
        (["psql", "-h", "db"], False),
        (["bash"], False),
        (["pgfence", "status"], False),
        (["gosu", "postgres", "postgres"], False),  # the official script execs it as is
        ([], False),
    ],
)
def test_server_starts_as_the_official_entrypoint_sees_them(args: list[str], server: bool) -> None:
    assert image.starts_server(args) is server


def test_defaults_respect_a_lock_path_the_user_set() -> None:
    env = {"PG_MAJOR": "18"}
    image.apply_defaults(env)
    assert env["FENCE_LOCK_FILE"] == "/var/lib/postgresql/fence_lock"
    env = {"PG_MAJOR": "15", "FENCE_LOCK_FILE": "/srv/lock"}
    image.apply_defaults(env)
    assert env["FENCE_LOCK_FILE"] == "/srv/lock"
    env = {"PG_MAJOR": "15"}
    image.apply_defaults(env)
    assert env["FENCE_LOCK_FILE"] == "/var/lib/postgresql/data/fence_lock"


def _choose(env: dict[str, str]) -> str:
    return image.choose_pgdata(resolve("run", {}, env), env)


def test_lock_beside_pgdata_leaves_pgdata_alone(tmp_path: Path) -> None:
    env = {"PGDATA": str(tmp_path / "db"), "FENCE_LOCK_FILE": str(tmp_path / "fence_lock")}
    assert _choose(env) == str(tmp_path / "db")


def test_lock_inside_an_initialised_pgdata_keeps_it(tmp_path: Path) -> None:
    (tmp_path / "PG_VERSION").write_text("15\n")
    env = {"PGDATA": str(tmp_path), "FENCE_LOCK_FILE": str(tmp_path / "fence_lock")}
    assert _choose(env) == str(tmp_path)


def test_lock_inside_an_empty_pgdata_the_user_chose_is_refused(tmp_path: Path) -> None:
    env = {"PGDATA": str(tmp_path), "FENCE_LOCK_FILE": str(tmp_path / "fence_lock")}
    with pytest.raises(UsageError) as refused:
        _choose(env)
    message = refused.value.message
    assert f"PGDATA={os.path.join(str(tmp_path), 'pgdata')}" in message
    assert "allow-other" not in message


def test_pre_18_image_pgdata_on_a_fresh_volume_goes_one_level_down() -> None:
    """The image's own PGDATA with its lock (paths of the official layout; nothing is
    created: /var/lib/postgresql/data has no PG_VERSION on a machine without that image)."""
    if os.path.exists("/var/lib/postgresql/data/PG_VERSION"):
        pytest.skip("this machine has a database at /var/lib/postgresql/data")
    env = {"PG_MAJOR": "15", "PGDATA": "/var/lib/postgresql/data"}
    image.apply_defaults(env)
    assert _choose(env) == "/var/lib/postgresql/data/pgdata"
    # The same paths on the 18 image are a user's choice: refused, not moved.
    env = {"PG_MAJOR": "18", "PGDATA": "/var/lib/postgresql/data"}
    env["FENCE_LOCK_FILE"] = "/var/lib/postgresql/data/fence_lock"
    with pytest.raises(UsageError):
        _choose(env)


def test_etcd_backend_never_moves_pgdata(tmp_path: Path) -> None:
    env = {
        "PGDATA": str(tmp_path),
        "FENCE_LOCK_FILE": str(tmp_path / "fence_lock"),
        "FENCE_BACKEND": "etcd",
        "FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
        "FENCE_ETCD_ALLOW_INSECURE": "1",
    }
    assert _choose(env) == str(tmp_path)


def test_an_environment_naming_a_fence_we_are_not_under_is_refused(tmp_path: Path) -> None:
    """PGFENCE_INSTANCE set by hand (no pgfence holds that lock for that instance): refused,
    neither trusted as the fence nor fenced a second time."""
    env = {
        "PGDATA": str(tmp_path / "db"),
        "FENCE_LOCK_FILE": str(tmp_path / "fence_lock"),
        "PGFENCE_INSTANCE": "0123456789abcdef",
        "PGFENCE_LOCK": str(tmp_path / "fence_lock"),
    }
    with pytest.raises(UsageError, match="names a fence that does not hold"):
        image.entrypoint("pgfence", ["--", "true", "postgres"], env)


@pytest.mark.skipif(not os.path.exists("/usr/bin/python3"), reason="needs /usr/bin/python3")
def test_launcher_passes_other_commands_through_without_a_lock(tmp_path: Path) -> None:
    launcher = (Path(__file__).resolve().parent.parent / "docker" / "pgfence").read_text()
    src = Path(image.__file__).resolve().parent.parent
    program = tmp_path / "pgfence"
    program.write_text(launcher.replace('"/usr/local/lib/pgfence"', repr(str(src))))
    program.chmod(0o755)
    lock = tmp_path / "missing-dir" / "fence_lock"  # any lock access would fail (74)
    done = subprocess.run(
        [str(program), "entrypoint", "--", "echo", "psql", "-c", "select 1"],
        env={"PATH": "/usr/bin:/bin", "FENCE_LOCK_FILE": str(lock), "PG_MAJOR": "15"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (done.returncode, done.stdout, done.stderr) == (0, "psql -c select 1\n", "")


@pytest.mark.parametrize("args", [[], ["--"], ["--help"], ["--", "-x"]])
def test_entrypoint_without_an_entrypoint_is_a_usage_error(args: list[str]) -> None:
    with pytest.raises(UsageError, match="usage: pgfence entrypoint -- ENTRYPOINT"):
        image.entrypoint("pgfence", args, {})
