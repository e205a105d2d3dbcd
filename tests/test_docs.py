"""The documentation keeps up with the code: every option, environment variable, metric
and log event is documented, and the docs name nothing that does not exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pgfence import config, environment
from pgfence.metrics import Metrics
from pgfence.verifyfs import command as verifyfs
from pgfence.verifyfs import verdict as fsverdict

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()
INSTALL = (ROOT / "docs" / "install.md").read_text()
SOURCES = "\n".join(p.read_text() for p in (ROOT / "src" / "pgfence").rglob("*.py"))
OPTIONS = {o.flag: o for opts in config.COMMAND_OPTIONS.values() for o in opts}
pytestmark = pytest.mark.timeout(30)


def table_rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def cells(row: str) -> list[str]:
    """A Markdown table row's cells (`\\|` inside a cell is not a separator)."""
    return [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]


def names_flag(cell: str, flag: str) -> bool:
    """`--flag`, `--flag VALUE` or `--flag`, `--no-flag`: the flag itself, not a longer one."""
    return re.match(rf"`{re.escape(flag)}[` ]", cell) is not None


@pytest.mark.parametrize("flag", sorted(OPTIONS))
def test_every_option_has_a_row_with_its_variable(flag: str) -> None:
    option = OPTIONS[flag]
    commands_part = CONFIGURATION.split("## `verify-fs` options")[0]
    rows = [r for r in table_rows(commands_part) if names_flag(cells(r)[0], flag)]
    assert rows, f"{flag} is not documented in docs/configuration.md"
    [row] = rows
    row_cells = cells(row)
    assert row_cells[1] == (f"`{option.env}`" if option.env else "none"), row
    if option.negative:
        assert f"`{option.negative}`" in row_cells[0]
    assert row_cells[2], f"{flag}: no default documented"


def test_every_variable_the_code_reads_or_sets_is_documented() -> None:
    names = set(re.findall(r"\"((?:PG)?FENCE_[A-Z_]+)\"", SOURCES))
    assert names, "found no variable names in src/"
    missing = sorted(n for n in names if f"`{n}`" not in CONFIGURATION)
    assert not missing, f"document in docs/configuration.md: {missing}"


def test_docs_name_no_variable_that_does_not_exist() -> None:
    documented = set(re.findall(r"`((?:PG)?FENCE_[A-Z_]+)`", CONFIGURATION + OPERATIONS + INSTALL))
    unknown = sorted(n for n in documented if f'"{n}"' not in SOURCES)
    assert not unknown, f"documented but unknown to the code: {unknown}"


def test_the_commands_variables_are_exactly_environment_py_s() -> None:
    """The table of what `run` gives its command lists every variable environment.py
    gives it, with its backends, and no other."""
    section = CONFIGURATION.split("## Variables pgfence sets for the command it runs")[1]
    rows = table_rows(section.split("\n## ")[0])[1:]  # below the header row
    documented = [(cells(r)[0].strip("`"), cells(r)[1]) for r in rows]

    def backends(names: tuple[str, ...]) -> str:
        return "both" if set(names) == {"file", "etcd"} else "/".join(names)

    given = [(v.name, backends(v.backends)) for v in environment.FENCE if v.child]
    given += [(v.name, backends(v.backends)) for v in environment.HELD]
    assert documented == given


def test_verify_fs_options_are_documented() -> None:
    rows = table_rows(CONFIGURATION.split("## `verify-fs` options")[1])
    for option in verifyfs.OPTIONS:
        assert any(names_flag(cells(r)[0], option.flag) for r in rows), option.flag
        assert option.flag in OPERATIONS, option.flag


def test_every_metric_is_documented() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    rendered = Metrics("file", "lease", 15.0).render()
    for family in text_string_to_metric_families(rendered):
        for sample in family.samples:
            assert f"`{sample.name}" in OPERATIONS, sample.name


def test_every_log_event_is_documented() -> None:
    events = set(re.findall(r"log\.event\(\s*\"([a-z_]+)\"", SOURCES))
    events |= set(re.findall(r"event = \"([a-z_]+)\"", SOURCES))
    assert {"acquired", "released", "self_fenced", "fenced_out"} <= events
    rows = {cells(r)[0].strip("`") for r in table_rows(OPERATIONS)}
    assert not events - rows, f"document in docs/operations.md: {sorted(events - rows)}"


def test_operations_covers_what_operators_need() -> None:
    for heading in (
        "## After a crash",
        "## Migrating from the shell script",
        "## Upgrading",
        "## Logs",
        "## Metrics",
        "## verify-fs",
    ):
        assert heading in OPERATIONS
    for verdict, code in fsverdict.EXIT_CODES.items():
        assert f"| {verdict} | {code} |" in OPERATIONS


def test_install_explains_the_images_choices() -> None:
    for phrase in (
        "| 13 to 17 | `/var/lib/postgresql/data` | `/var/lib/postgresql/data/fence_lock`",
        "| 18 and later | `/var/lib/postgresql` | `/var/lib/postgresql/fence_lock`",
        "pgfence entrypoint",
        "python3-minimal",
        "libpython3-stdlib",
        "STOPSIGNAL SIGINT",
        'HEALTHCHECK CMD ["pgfence", "check"]',
        "/newbin/postgres",
        "mode: 0555",
    ):
        assert phrase in INSTALL, phrase


ARCHITECTURE = (ROOT / "docs" / "architecture.md").read_text()


def test_architecture_names_only_modules_and_names_that_exist() -> None:
    """docs/architecture.md says where each rule lives: every module path and every
    `module.name` it gives must exist, so the page cannot drift from the code."""
    import importlib

    package = ROOT / "src" / "pgfence"
    paths = set(re.findall(r"[a-z_/]+\.(?:py|sh)\b", ARCHITECTURE))
    assert paths, "no module named"
    missing = [
        p
        for p in paths
        if not (ROOT / p).exists() and not (package / p).exists() and not any(package.rglob(p))
    ]
    assert not missing, f"docs/architecture.md names modules that do not exist: {missing}"
    dotted = set(re.findall(r"\b([a-z_]+(?:\.[a-z_]+)*)\.([A-Za-z_]+)\b", ARCHITECTURE))
    unknown = []
    for module, name in dotted:
        if name in ("py", "sh", "md") or module in ("docs", "tests"):
            continue
        for prefix in ("pgfence.", "pgfence.backends."):
            try:
                found = importlib.import_module(prefix + module)
            except ModuleNotFoundError:
                continue
            if hasattr(found, name):
                break
        else:
            unknown.append(f"{module}.{name}")
    assert not unknown, f"docs/architecture.md names what does not exist: {sorted(unknown)}"
