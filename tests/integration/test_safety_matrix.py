"""The crash-and-pause explorer (issue 9): a quick slice of the safety matrix, in CI.

`scripts/safety-matrix` runs every (path, call, fault) and writes docs/safety-matrix.md;
here a representative slice runs (`matrix.quick_selection`: every fault on the calls
that change the lock on the release and takeover paths, the acquiring write, a delayed
renewal; on the etcd backend, a few faults on its create, keep-alive and delete). Before
trusting any verdict, the tracer's faults are checked on a toy, and the checker is shown
a deliberately unfenced pgfence, and an etcd contender without its lock delay, both of
which it must flag.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import pytest

from conftest import needs_root
from harness import etcd, etcdpaths, explorer, invariants, matrix
from harness.paths import PATHS

pytestmark = [pytest.mark.integration, needs_root]
# The tree to explore: this repository's, or another (PGFENCE_EXPLORE_SRC=/path/to/src).
SRC = os.environ.get("PGFENCE_EXPLORE_SRC") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(__file__))), "src"
)
QUICK_PATHS = tuple(matrix.QUICK)
needs_etcd = pytest.mark.skipif(not etcd.available(), reason="etcd is not installed")


@pytest.fixture(scope="module")
def work() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="pgfence-explorer-") as path:
        yield path
    etcdpaths.stop_cluster()  # started by the first etcd run, shared by the others


TOY = textwrap.dedent(
    """
    import os, sys
    d = sys.argv[1]
    for name in ("one", "two", "three"):
        fd = os.open(os.path.join(d, name), os.O_CREAT | os.O_WRONLY, 0o644)
        os.close(fd)
    """
)


def traced_toy(
    tmp_path: str, fault: dict[str, object] | None
) -> tuple[int, list[str], list[dict[str, object]]]:
    lock_dir = os.path.join(tmp_path, "d")
    os.makedirs(lock_dir, exist_ok=True)
    fault_file = os.path.join(tmp_path, "fault.json")
    with open(fault_file, "w") as f:
        json.dump(fault, f)
    log = os.path.join(tmp_path, "trace.jsonl")
    done = subprocess.run(
        [
            explorer.PYTHON,
            explorer.TRACER,
            "--dir",
            lock_dir,
            "--log",
            log,
            "--fault",
            fault_file,
            "--",
            explorer.PYTHON,
            "-c",
            TOY,
            lock_dir,
        ],
        timeout=60,
    )
    with open(log) as f:
        records = [json.loads(line) for line in f]
    return done.returncode, sorted(os.listdir(lock_dir)), records


@pytest.mark.timeout(120)
def test_tracer_faults_hit_exactly_the_named_call(tmp_path: str) -> None:
    code, files, records = traced_toy(str(tmp_path / "clean"), None)
    assert code == 0 and files == ["one", "three", "two"]
    calls = [r for r in records if "sig" in r]
    # openat and close of each file, in one burst of the main thread.
    assert [c["sig"] for c in calls] == [
        f"{call}({name}{flags})"
        for name in ("one", "two", "three")
        for call, flags in (("openat", ",O_CREAT"), ("close", ""))
    ]
    assert [len(c["prefix"]) for c in calls] == list(range(1, 7))  # type: ignore[arg-type]
    opens = [c for c in calls if str(c["sig"]).startswith("openat")]
    second = opens[1]
    fault = {"phase": second["phase"], "prefix": second["prefix"], "nth": second["nth"]}

    code, files, _ = traced_toy(str(tmp_path / "before"), {**fault, "kind": "before"})
    assert code == 128 + 9 and files == ["one"]  # killed at the entry: "two" never created

    code, files, _ = traced_toy(str(tmp_path / "after"), {**fault, "kind": "after"})
    assert code == 128 + 9 and files == ["one", "two"]  # killed at the exit: it was

    code, files, records = traced_toy(
        str(tmp_path / "delay"), {**fault, "kind": "delay", "seconds": 0.5}
    )
    assert code == 0 and files == ["one", "three", "two"]
    held = [r for r in records if r.get("event") in ("fault", "resumed")]
    assert [r["event"] for r in held] == ["fault", "resumed"]
    assert float(str(held[1]["t"])) - float(str(held[0]["t"])) >= 0.5


UNFENCED = textwrap.dedent(
    """
    # A pgfence that fences nothing: it runs the command at once, always as generation 1.
    import os, sys
    args = sys.argv[1:]
    if args[:1] != ["run"]:
        sys.exit(0)
    command = args[args.index("--") + 1 :]
    os.environ["PGFENCE_GENERATION"] = "1"
    os.execvp(command[0], command)
    """
)


@pytest.mark.timeout(240)
def test_negative_control_unfenced_pgfence_is_flagged(work: str) -> None:
    """The checker sees two commands at once and a repeated generation when nothing fences."""
    src = os.path.join(work, "unfenced")
    os.makedirs(os.path.join(src, "pgfence"))
    with open(os.path.join(src, "pgfence", "__init__.py"), "w") as f:
        f.write("")
    with open(os.path.join(src, "pgfence", "__main__.py"), "w") as f:
        f.write(UNFENCED)
    path = next(p for p in PATHS if p.name == "lease-takeover")
    # The unfenced target makes no lock call, so there is nothing to trace: run the path
    # with a fault that never fires and judge what happened.
    fault = {"phase": "main", "prefix": ["never"], "nth": 1, "kind": "before"}
    run, target = explorer.execute(src, path, fault, work)
    recovered = invariants.recover(run)
    explorer.finish_polling(run)
    _, verdicts = invariants.judge(run, target, recovered)
    assert verdicts["one"].startswith("VIOLATION"), verdicts
    assert verdicts["generation"].startswith("VIOLATION"), verdicts


@pytest.mark.timeout(600)
def test_quick_slice_has_no_violation(work: str) -> None:
    """Every run of the quick slice keeps all five invariants."""
    paths = [p for p in PATHS if p.name in QUICK_PATHS]
    rows = matrix.quick_selection(matrix.build_rows(SRC, paths, explorer.FAULTS, work, print))
    assert rows, "the quick selection chose no row"
    results = matrix.run_matrix(SRC, rows, work, 2, False, lambda m: print(m, file=sys.stderr))
    bad = [
        f"{r.path} {r.call} {r.fault}: {'; '.join(r.violations)}" for r in results if r.violations
    ]
    assert not bad, "\n".join(bad)


def run_scene(src: str, path: explorer.Path, work: str) -> dict[str, str]:
    """One run of `path` without a fault (none fires), judged with its own invariants."""
    fault = {"phase": "main", "prefix": ["never"], "nth": 1, "kind": "before"}
    run, target = explorer.execute(src, path, fault, work)
    recovered = invariants.recover(run)
    explorer.finish_polling(run)
    _, verdicts = invariants.judge(run, target, recovered)
    assert path.checks is not None
    verdicts.update(path.checks(run))
    return verdicts


def tree_without_lock_delay(work: str) -> str:
    """A copy of SRC whose etcd contenders create the key as soon as they find it absent."""
    src = os.path.join(work, "no-lock-delay")
    shutil.copytree(os.path.join(SRC, "pgfence"), os.path.join(src, "pgfence"))
    backend = os.path.join(src, "pgfence", "backends", "etcd", "backend.py")
    with open(backend) as f:
        text = f.read()
    for line in (
        "delay = lock_delay(self._timings, None, from_absence=True)",
        "delay = max(delay, lock_delay(self._timings, holder, from_absence=True))",
    ):
        assert line in text, f"the control no longer finds {line!r} in {backend}"
        text = text.replace(line, "delay = 0.0")
    with open(backend, "w") as f:
        f.write(text)
    return src


@needs_etcd
@pytest.mark.timeout(240)
def test_negative_control_etcd_contender_without_lock_delay_is_flagged(work: str) -> None:
    """A lease revoked under its holder (a stuck etcd leader): a contender that skips the
    lock delay creates the key at once, which the key invariant flags; pgfence as it is
    waits the lock delay, by when the holder has fenced, and keeps every invariant."""
    unsafe = run_scene(tree_without_lock_delay(work), etcdpaths.REVOKED, work)
    assert unsafe["key"].startswith("VIOLATION"), unsafe
    safe = run_scene(SRC, etcdpaths.REVOKED, work)
    assert not [v for v in safe.values() if v.startswith("VIOLATION")], safe


@needs_etcd
@pytest.mark.timeout(420)
def test_quick_etcd_slice_has_no_violation(work: str) -> None:
    """The etcd rows of the quick slice keep all six invariants."""
    paths = [p for p in etcdpaths.ETCD_PATHS if p.name in QUICK_PATHS]
    rows = matrix.build_rows(SRC, paths, etcdpaths.ETCD_FAULTS, work, print)
    rows = matrix.quick_selection(rows)
    assert len(rows) >= 5, [f"{r.path.name} {r.call} {r.fault}" for r in rows]
    results = matrix.run_matrix(SRC, rows, work, 2, False, lambda m: print(m, file=sys.stderr))
    bad = [
        f"{r.path} {r.call} {r.fault}: {'; '.join(r.violations)}" for r in results if r.violations
    ]
    assert not bad, "\n".join(bad)
