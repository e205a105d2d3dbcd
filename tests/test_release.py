"""The package is release-ready: an Apache-2.0 licence file and SPDX expression, one
source for the version, README links that still work on PyPI (which renders README.md
with no repository around it), development tools as dependency groups, and an sdist and
wheel that `twine check --strict` accepts (built from the tracked files only)."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from pgfence import __version__

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
REPOSITORY = PROJECT["urls"]["Homepage"]
pytestmark = pytest.mark.timeout(300)


def test_licence_is_apache_2_with_an_spdx_expression() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.strip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "APPENDIX: How to apply the Apache License to your work." in text
    assert PROJECT["license"] == "Apache-2.0"
    assert PROJECT["license-files"] == ["LICENSE"]
    # A licence classifier next to an SPDX expression is an error (PEP 639).
    assert not [c for c in PROJECT["classifiers"] if c.startswith("License ::")]
    assert PYPROJECT["build-system"]["requires"] == ["setuptools>=77"]


def test_classifiers_name_every_supported_python() -> None:
    versions = {c.rsplit(" ", 1)[1] for c in PROJECT["classifiers"] if re.search(r":: 3\.\d+$", c)}
    assert versions == {"3.9", "3.10", "3.11", "3.12", "3.13"}
    assert PROJECT["requires-python"] == ">=3.9"
    assert set(PROJECT["urls"]) >= {"Homepage", "Documentation", "Changelog", "Issues"}


def test_one_source_for_the_version() -> None:
    assert PROJECT["dynamic"] == ["version"]
    assert PYPROJECT["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pgfence.__version__"}
    newest = re.search(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert newest is not None and newest.group(1) == __version__
    # No other file of the package spells the version out.
    for path in (ROOT / "src" / "pgfence").rglob("*"):
        if path.is_file() and path.name != "__init__.py" and path.suffix in (".py", ".sh"):
            assert __version__ not in path.read_text(), path


def test_development_tools_are_dependency_groups_not_extras() -> None:
    assert "optional-dependencies" not in PROJECT
    groups = PYPROJECT["dependency-groups"]
    assert {"test", "bench", "release"} <= set(groups)
    names = {re.split(r"[<>=\[ ]", d)[0] for d in groups["test"] if isinstance(d, str)}
    assert {"pytest", "mypy", "ruff", "kubernetes-validate"} <= names
    assert {"include-group": "release"} in groups["test"]
    assert "--group" in (ROOT / "scripts" / "venv").read_text()


def test_readme_links_work_on_pypi() -> None:
    """PyPI shows README.md without the repository: a relative link would lead nowhere.
    Links into the repository are absolute and name files that exist."""
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", readme)
    assert links
    for link in links:
        assert link.startswith(("https://", "http://", "#")), link
        if link.startswith(REPOSITORY + "/"):
            path = re.sub(r"^/(blob|tree)/main/", "", link[len(REPOSITORY) :]).split("#")[0]
            assert (ROOT / path).exists(), link


def tracked_copy(tmp_path: Path) -> Path:
    """The tracked files (with working-tree changes), as a fresh checkout would have them."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.split(b"\0")
    copy = tmp_path / "src-tree"
    for name in filter(None, files):
        source = ROOT / name.decode()
        if source.is_file():
            target = copy / name.decode()
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(source.read_bytes())
            target.chmod(source.stat().st_mode & 0o777)
    return copy


def test_build_and_twine_check_strict(tmp_path: Path) -> None:
    tree = tracked_copy(tmp_path)
    dist = tmp_path / "dist"
    # Without isolation (no network): the test group brings setuptools>=77 and build.
    built = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(dist), str(tree)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    assert wheel.name == f"pgfence-{__version__}-py3-none-any.whl"
    checked = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.count("PASSED") == 2, checked.stdout
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"pgfence-{__version__}.dist-info"
        metadata = archive.read(f"{info}/METADATA").decode()
    assert f"{info}/licenses/LICENSE" in names
    assert {"pgfence/shim.sh", "pgfence/py.typed", "pgfence/cli.py"} <= set(names)
    assert "License-Expression: Apache-2.0" in metadata
    assert "Provides-Extra" not in metadata  # development tools are not extras
    assert "Project-URL: Changelog, " in metadata
    assert "Requires-Dist" not in metadata  # the core has no dependencies
    with tarfile.open(sdist) as archive:
        members = set(archive.getnames())
    top = f"pgfence-{__version__}"
    assert {f"{top}/LICENSE", f"{top}/README.md", f"{top}/src/pgfence/shim.sh"} <= members
