"""docs/install.md stays true to the distributions it describes: the full list of modules
that python3-minimal lacks (what Debian's libpython3.X-stdlib adds, read from this
machine's package), and no image variants or majors that are gone."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
INSTALL = (ROOT / "docs" / "install.md").read_text()
DOCS = {p.name: p.read_text() for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]}
pytestmark = pytest.mark.timeout(30)


def stdlib_package_modules() -> set[str]:
    """Public top-level modules in libpython3.X-stdlib, for this machine's python3.X."""
    version = "3.11"  # the list in install.md is bookworm's
    listing = subprocess.run(
        ["dpkg", "-L", f"libpython{version}-stdlib"], capture_output=True, text=True, timeout=30
    )
    if listing.returncode != 0:
        pytest.skip(f"libpython{version}-stdlib is not installed")
    base = f"/usr/lib/python{version}/"
    modules = set()
    for path in listing.stdout.split():
        if not path.startswith(base):
            continue
        rest = path[len(base) :]
        if rest.startswith("lib-dynload/"):
            rest = rest[len("lib-dynload/") :]
            name = rest.split(".")[0]
        elif "/" in rest:
            name = rest.split("/")[0]
        elif rest.endswith(".py"):
            name = rest[:-3]
        else:
            continue
        if not name.startswith("_") and name.isidentifier() and not name.startswith("xxlimited"):
            modules.add(name)
    return modules


@pytest.mark.skipif(shutil.which("dpkg") is None, reason="needs Debian's dpkg")
def test_install_lists_every_module_python3_minimal_lacks() -> None:
    paragraph = INSTALL.split("so what `python3-minimal` alone lacks", 1)[1].split("(and their")[0]
    listed = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", paragraph))
    listed = {m for m in listed if not m.startswith("_") and m != "python3-minimal"}
    actual = stdlib_package_modules()
    assert listed == actual, (sorted(actual - listed), sorted(listed - actual))


def test_modules_pgfence_needs_from_the_stdlib_package_are_named() -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from test_packaging import imported_stdlib

    if shutil.which("dpkg") is None:
        pytest.skip("needs Debian's dpkg")
    extra = {m.split(".")[0] for m in imported_stdlib()} & stdlib_package_modules()
    sentence = INSTALL.split("`python3-minimal` alone lacks", 1)[1].split("which are in")[0]
    assert extra == set(re.findall(r"`([a-z_]+)`", sentence)), sorted(extra)


def test_docs_are_current_about_majors_and_variants() -> None:
    for name, text in DOCS.items():
        for line in text.splitlines():
            assert "bullseye" not in line or "no bullseye" in line, (name, line)
    assert "end of life" in INSTALL.split("## The image", 1)[1].split("##", 1)[0]
