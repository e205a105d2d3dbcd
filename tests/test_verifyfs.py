"""`pgfence verify-fs`: participants coordinate through the directory only, and agree.

Real processes on a local directory (one machine, so --allow-single-host), a participant
with a broken exclusive create as the negative control, two FUSE mounts of one directory
(one with the kernel's caches on) when bindfs is there, bad input, and the verdict rules
on synthetic findings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import PGFENCE
from harness.procs import Registry
from pgfence.errors import EXIT_STORAGE, EXIT_USAGE, PgfenceError, StorageError, UsageError
from pgfence.verifyfs import command as verifyfs
from pgfence.verifyfs import verdict as fsverdict

DURATION = "2"
# The safe runs must not hinge on scheduling: a shared 2-core machine may stall a prober
# for a second. Lag is judged in the caching-mount test, where it is seconds by design.
LENIENT = ("--allow-single-host", "--max-lag", "60")
pytestmark = pytest.mark.timeout(120)

# A participant whose "exclusive" create always succeeds for the lock: a filesystem without
# atomic exclusive create, as seen by the verifier.
BROKEN = """
import sys
from pgfence.verifyfs import probe as fsprobe
from pgfence.cli import main
real = fsprobe.Files.create
def create(self, name, data, use_link):
    if name == "lock":
        fsprobe.Files.replace(self, name, data)
        return True
    return real(self, name, data, use_link)
fsprobe.Files.create = create
sys.exit(main(["pgfence", *sys.argv[1:]]))
"""


def start(procs: Registry, directory: Path, *args: str, broken: bool = False) -> Any:
    argv = [PGFENCE, "verify-fs", str(directory), "--duration", DURATION, "--join-timeout", "60"]
    argv += args
    if broken:
        argv = [sys.executable, "-c", BROKEN, *argv[1:]]
    return procs.start(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc: Any) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out.decode(), err.decode()


def run_all(procs: Registry, dirs: list[Path], *args: str) -> list[tuple[int, dict[str, Any]]]:
    """One participant per directory (p0, p1, ...), all at once; their JSON reports."""
    n = str(len(dirs))
    started = [
        start(procs, d, "--participants", n, "--id", f"p{i}", "--json", *args)
        for i, d in enumerate(dirs)
    ]
    results = []
    for proc in started:
        code, out, err = finish(proc)
        assert out.strip(), err
        results.append((code, json.loads(out)))
    return results


def test_three_local_participants_agree_on_safe(procs: Registry, tmp_path: Path) -> None:
    results = run_all(procs, [tmp_path] * 3, *LENIENT)
    for code, report in results:
        assert (code, report["verdict"]) == (0, "SAFE"), report["reasons"]
        assert report["participants"].keys() == {"p0", "p1", "p2"}
        assert report["overlaps"] == report["lost_updates"] == report["torn_reads"] == 0
        assert report["handoffs"] >= fsverdict.MIN_HANDOFFS
        assert report["link_holds"] > 0 and report["excl_holds"] > 0
        assert len(report["lag_seconds"]) == 6  # every ordered pair measured
    # Everyone judged the same findings, and the last one removed the session directory.
    assert len({json.dumps(r["participants"], sort_keys=True) for _, r in results}) == 1
    assert os.listdir(tmp_path) == []


def test_one_machine_is_inconclusive_without_allow_single_host(
    procs: Registry, tmp_path: Path
) -> None:
    for code, report in run_all(procs, [tmp_path] * 2, "--max-lag", "60"):
        assert (code, report["verdict"]) == (2, "INCONCLUSIVE")
        assert any("one machine" in r for r in report["reasons"])
        assert report["overlaps"] == report["lost_updates"] == 0


def test_text_report_names_the_verdict_and_what_was_measured(
    procs: Registry, tmp_path: Path
) -> None:
    started = [
        start(procs, tmp_path, "--participants", "2", "--id", name, *LENIENT)
        for name in ("left", "right")
    ]
    for proc in started:
        code, out, err = finish(proc)
        assert code == 0, out + err
        lines = out.splitlines()
        assert lines[0] == f"verify-fs {tmp_path}: SAFE"
        assert any(line.startswith("exclusive create: ") for line in lines)
        assert any(line.startswith("visibility lag left->right: ") for line in lines)
        assert "participants joined" in err  # progress goes to stderr, the report to stdout


def test_broken_exclusive_create_is_unsafe(procs: Registry, tmp_path: Path) -> None:
    """Negative control: the verifier sees overlapping holders when exclusion fails."""
    good = start(procs, tmp_path, "--participants", "2", "--id", "good", "--json",
                 "--allow-single-host")  # fmt: skip
    bad = start(procs, tmp_path, "--participants", "2", "--id", "bad", "--json",
                "--allow-single-host", broken=True)  # fmt: skip
    for proc in (good, bad):
        code, out, err = finish(proc)
        report = json.loads(out)
        assert (code, report["verdict"]) == (1, "UNSAFE"), err
        assert report["overlaps"] + report["lost_updates"] > 0


def test_a_lone_participant_gives_up_after_the_join_timeout(tmp_path: Path) -> None:
    proc = subprocess.run(
        [PGFENCE, "verify-fs", str(tmp_path), "--join-timeout", "1", "--id", "alone"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "INCONCLUSIVE" in proc.stdout and "only 1 of 2 participants joined" in proc.stdout
    assert os.listdir(tmp_path / "pgfence-verify.default" / "join") == []  # may retry


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["DIR", "--bogus"], "unknown option '--bogus'"),
        ([], "needs exactly one directory"),
        (["DIR", "DIR"], "needs exactly one directory"),
        (["DIR", "--participants", "1"], "--participants='1' must be a number from 2"),
        (["DIR", "--participants=2.5"], "must be a whole number"),
        (["DIR", "--duration", "soon"], "--duration='soon'"),
        (["DIR", "--max-lag", "-1"], "--max-lag='-1'"),
        (["DIR", "--id", "a/b"], "--id 'a/b' must be"),
        (["DIR", "--duration"], "needs a value"),
    ],
)
def test_bad_options_exit_64(tmp_path: Path, args: list[str], message: str) -> None:
    argv = [PGFENCE, "verify-fs", *(str(tmp_path) if a == "DIR" else a for a in args)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert message in proc.stderr
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1
    assert os.listdir(tmp_path) == []  # refused before touching the directory


def test_unusable_directory_exits_74(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for target in (tmp_path / "missing", tmp_path / "file"):
        proc = subprocess.run(
            [PGFENCE, "verify-fs", str(target)], capture_output=True, text=True, timeout=30
        )
        assert proc.returncode == EXIT_STORAGE, proc.stderr
        assert "is not a directory" in proc.stderr


def test_typed_errors_reach_cli_unprinted(tmp_path: Path) -> None:
    """verifyfs raises; only cli.py prints (here: nothing is emitted at all)."""
    lines: list[str] = []
    with pytest.raises(UsageError):
        verifyfs.main(["--participants", "x", str(tmp_path)], lines.append)
    with pytest.raises(StorageError):
        verifyfs.main([str(tmp_path / "missing")], lines.append)
    assert lines == []


def test_taken_id_and_leftover_results_are_refused(tmp_path: Path) -> None:
    session = tmp_path / "pgfence-verify.default"
    (session / "join").mkdir(parents=True)
    (session / "join" / "dup").write_text("{}")
    with pytest.raises(UsageError, match="participant id 'dup' is taken"):
        verifyfs.main(["--id", "dup", str(tmp_path)], print)
    shutil.rmtree(session)
    (session / "result").mkdir(parents=True)
    (session / "result" / "old.json").write_text("{}")
    with pytest.raises(UsageError, match="results of an earlier run") as caught:
        verifyfs.main(["--id", "new", str(tmp_path)], print)
    assert isinstance(caught.value, PgfenceError) and caught.value.exit_code == EXIT_USAGE


def test_help_lists_every_option() -> None:
    lines: list[str] = []
    assert verifyfs.main(["--help"], lines.append) == 0
    for option in verifyfs.OPTIONS:
        assert any(line.lstrip().startswith(option.flag) for line in lines)


# -- the verdict rules, on synthetic findings ----------------------------------------------


def finding(pid: str, boot: str, holds: list[list[Any]], **extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": pid,
        "host": f"host-{boot}",
        "boot_id": boot,
        "ran_seconds": 2.0,
        "holds": holds,
        "link_holds": len(holds),
        "excl_holds": 0,
        "overlaps": [],
        "torn": [],
        "regressions": [],
        "lag": {},
        "errors": {},
    }
    base.update(extra)
    return base


def alternating(n: int, boots: tuple[str, str] = ("A", "B")) -> dict[str, Any]:
    """Two participants on two machines handing the lock back and forth n times."""
    holds: dict[str, list[list[Any]]] = {"a": [], "b": []}
    for seq in range(n):
        me, prev = ("a", "b") if seq % 2 == 0 else ("b", "a")
        holds[me].append([seq * 1.0, seq + 0.5, seq, prev if seq else None])
    return {
        "a": finding("a", boots[0], holds["a"], lag={"b": [0.01, 0.02]}),
        "b": finding("b", boots[1], holds["b"], lag={"a": [0.015]}),
    }


OPTS = {"max_lag": 1.0, "allow_single_host": False}


def test_judge_two_machines_with_enough_handoffs_is_safe() -> None:
    report = fsverdict.judge(alternating(40), ["a", "b"], OPTS)
    assert report["verdict"] == "SAFE", report["reasons"]
    assert report["cross_host_handoffs"] == 39
    assert report["machines"] == 2
    assert report["max_lag_seconds"] == 0.02


def test_judge_findings_that_make_it_unsafe() -> None:
    lost = alternating(40)
    lost["b"]["holds"][0][2] = 0  # b read the counter value a also read
    assert fsverdict.judge(lost, ["a", "b"], OPTS)["lost_updates"] == 1
    slow = alternating(40)
    slow["a"]["lag"]["b"].append(1.5)
    backwards = alternating(40)
    backwards["b"]["regressions"] = ["ping.a went back from 9 to 8"]
    torn = alternating(40)
    torn["a"]["torn"] = ["counter read as '1'"]
    overlap = alternating(40)
    overlap["a"]["overlaps"] = ["a got the lock while b was inside"]
    for results in (lost, slow, backwards, torn, overlap):
        report = fsverdict.judge(results, ["a", "b"], OPTS)
        assert report["verdict"] == "UNSAFE", report


def test_judge_intervals_on_one_machine_are_compared_exactly() -> None:
    results = alternating(40, boots=("A", "A"))
    results["b"]["holds"][0][0] = 0.2  # b's first hold starts inside a's first one
    report = fsverdict.judge(results, ["a", "b"], {**OPTS, "allow_single_host": True})
    assert report["verdict"] == "UNSAFE"
    assert report["overlaps"] == 1


def test_judge_too_little_evidence_is_inconclusive() -> None:
    few = fsverdict.judge(alternating(5), ["a", "b"], OPTS)
    assert few["verdict"] == "INCONCLUSIVE"
    assert any("handoff" in r for r in few["reasons"])
    missing = fsverdict.judge(alternating(40), ["a", "b", "c"], OPTS)
    assert missing["verdict"] == "INCONCLUSIVE"
    assert any("no findings from c" in r for r in missing["reasons"])
    unmeasured = alternating(40)
    unmeasured["b"]["lag"] = {}
    assert fsverdict.judge(unmeasured, ["a", "b"], OPTS)["verdict"] == "INCONCLUSIVE"


# -- two FUSE mounts of one directory: independent kernel caches on one machine ------------

CACHED = "entry_timeout=3,attr_timeout=3,negative_timeout=3,kernel_cache"
UNCACHED = "entry_timeout=0,attr_timeout=0,negative_timeout=0,direct_io"


@pytest.fixture
def fuse_mounts(tmp_path: Path) -> Iterator[Any]:
    if os.geteuid() != 0 or shutil.which("bindfs") is None or not os.path.exists("/dev/fuse"):
        pytest.skip("needs root, /dev/fuse and bindfs (Debian package bindfs)")
    mounted: list[Path] = []

    def mount(options: str) -> list[Path]:
        backing = tmp_path / f"backing-{len(mounted)}"
        backing.mkdir()
        points = []
        for _ in range(2):
            point = tmp_path / f"mount-{len(mounted)}"
            point.mkdir()
            subprocess.run(
                ["bindfs", "-o", options, str(backing), str(point)], check=True, timeout=30
            )
            mounted.append(point)
            points.append(point)
        return points

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], timeout=30)


def test_two_uncached_fuse_mounts_are_safe(procs: Registry, fuse_mounts: Any) -> None:
    for code, report in run_all(procs, fuse_mounts(UNCACHED), *LENIENT):
        assert (code, report["verdict"]) == (0, "SAFE"), report["reasons"]


def test_two_caching_fuse_mounts_are_unsafe(procs: Registry, fuse_mounts: Any) -> None:
    """The kernel keeps each mount's view of names and contents for seconds: holders read
    counters other holders already replaced, and changes take seconds to be seen."""
    for code, report in run_all(procs, fuse_mounts(CACHED), "--allow-single-host"):
        assert (code, report["verdict"]) == (1, "UNSAFE"), report
        assert report["lost_updates"] > 0 or report["max_lag_seconds"] >= 1.0
