"""Acquisition by the POSIX sh shim is atomic: sixteen contenders released at once (sh
shims in dash or busybox, or a mix of sh shims and `pgfence run`) yield exactly one
holder, every round. The barrier and the log checks are harness.race's, as in
test_race.py.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness import race
from harness.fence import FAST, PGFENCE, clean_env, read_text, run_args, write_file
from harness.procs import Registry
from harness.waiting import wait_for
from test_sh_shim import SHELLS, SHIM_TEXT, TOOLS

# The winner's command: race.CHILD's start/end log lines and the generation it holds.
WINNER = race.CHILD
# The real postgres of the shim's contenders runs the same.
assert "'" not in WINNER
REAL_POSTGRES = f"#!/bin/sh\nexec sh -c '{WINNER}' \"$@\"\n"


def shim_bin(tmp: Path, shell: str) -> str:
    """PATH for a shim contender: the shim as `postgres`, busybox's tools if busybox,
    then the fake real postgres."""
    newbin, tools, real = (tmp / f"{shell}-{d}" for d in ("newbin", "tools", "real"))
    for d in (newbin, tools, real):
        d.mkdir(exist_ok=True)
    write_file(str(newbin / "postgres"), SHIM_TEXT.replace("#!/bin/sh", SHELLS[shell], 1).encode())
    os.chmod(newbin / "postgres", 0o555)
    if shell == "busybox":
        for tool in TOOLS:
            if not (tools / tool).exists():
                os.symlink("/bin/busybox", tools / tool)
    write_file(str(real / "postgres"), REAL_POSTGRES.encode())
    os.chmod(real / "postgres", 0o755)
    return ":".join(map(str, (newbin, tools, real, "/usr/bin", "/bin")))


def play_round(
    procs: Registry, tmp: Path, round_no: int, lock: str, kinds: list[str], log: str
) -> None:
    fifo = str(tmp / "barrier")
    go = str(tmp / f"go-{round_no}")
    contenders = []
    for i, kind in enumerate(kinds):
        token = f"db-{i}"
        if kind == "pgfence":
            child = ["sh", "-c", WINNER, str(round_no), log, go]
            argv = [
                "sh",
                "-c",
                race.BARRIER,
                fifo,
                PGFENCE,
                *run_args(lock, token, *child, extra=FAST),
            ]
            env = clean_env()
        else:
            argv = ["sh", "-c", race.BARRIER, fifo, "postgres", str(round_no), log, go]
            env = clean_env(PATH=shim_bin(tmp, kind), FENCE_LOCK_FILE=lock, FENCE_VARIABLE=token)
        with open(tmp / f"err-{round_no}-{i}", "wb") as err:
            contenders.append(procs.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=err))
    race.release_all(fifo, contenders)
    codes = race.end_round(tmp, round_no, contenders, kinds)
    winner = kinds[codes.index(0)]
    if winner == "pgfence":
        assert not os.path.exists(lock)  # released
    else:
        assert os.path.exists(lock)  # nothing releases a shim's lock: the operator does
        os.unlink(lock)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("shell", sorted(SHELLS))
def test_sh_shims_race_for_a_free_lock(procs: Registry, tmp_path: Path, shell: str) -> None:
    os.mkfifo(tmp_path / "barrier")
    lock = str(tmp_path / "fence_lock")
    log = str(tmp_path / "log")
    rounds = 15
    for round_no in range(rounds):
        play_round(procs, tmp_path, round_no, lock, [shell] * race.CONTENDERS, log)
    race.check_log(log, rounds)
    race.check_generations(log, lock, rounds)
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []


@pytest.mark.timeout(180)
def test_sh_shims_and_pgfence_race_for_a_free_lock(procs: Registry, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "barrier")
    lock = str(tmp_path / "fence_lock")
    log = str(tmp_path / "log")
    kinds = ["pgfence", "dash", "busybox", "dash"] * (race.CONTENDERS // 4)
    rounds = 10
    for round_no in range(rounds):
        play_round(procs, tmp_path, round_no, lock, kinds, log)
    race.check_log(log, rounds)
    race.check_generations(log, lock, rounds)  # whoever wins


@pytest.mark.timeout(120)
def test_same_token_shims_create_the_lock_once(procs: Registry, tmp_path: Path) -> None:
    """The script's rule lets every contender with the holder's token start (it means
    "the same container, restarted"), but exactly one of them creates the lock."""
    fifo = str(tmp_path / "barrier")
    os.mkfifo(fifo)
    lock = str(tmp_path / "fence_lock")
    path = shim_bin(tmp_path, "dash")
    contenders = []
    for i in range(race.CONTENDERS):
        with open(tmp_path / f"err-{i}", "wb") as err:
            argv = [
                "sh",
                "-c",
                race.BARRIER,
                fifo,
                "postgres",
                "0",
                str(tmp_path / "log"),
                str(tmp_path / "go"),
            ]
            env = clean_env(PATH=path, FENCE_LOCK_FILE=lock, FENCE_VARIABLE="db-1")
            contenders.append(procs.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=err))
    write_file(str(tmp_path / "go"), b"")
    race.release_all(fifo, contenders)
    assert [p.wait(timeout=60) for p in contenders] == [0] * race.CONTENDERS
    errors = [read_text(str(tmp_path / f"err-{i}")) for i in range(race.CONTENDERS)]
    assert sum("acquired" in e for e in errors) == 1, errors
    assert read_text(lock + ".generation").split()[0] == "1"


@pytest.mark.timeout(120)
def test_negative_control_check_then_write_lets_several_start(
    procs: Registry, tmp_path: Path
) -> None:
    """The race above can see a broken shim: with check-then-copy in place of the hard
    link, several contenders of one round start."""
    broken = SHIM_TEXT.replace(
        'if ln "$temp" "$lock" 2>/dev/null; then',
        'if [ ! -e "$lock" ] && sleep 0.1 && cp "$temp" "$lock"; then',
    )
    assert broken != SHIM_TEXT
    fifo = str(tmp_path / "barrier")
    os.mkfifo(fifo)
    lock = str(tmp_path / "fence_lock")
    path = shim_bin(tmp_path, "dash")
    write_file(
        str(tmp_path / "dash-newbin" / "postgres"),
        broken.replace("#!/bin/sh", "#!/bin/dash", 1).encode(),
    )
    log = str(tmp_path / "log")
    contenders = []
    for i in range(race.CONTENDERS):
        argv = ["sh", "-c", race.BARRIER, fifo, "postgres", "0", log, str(tmp_path / "go")]
        env = clean_env(PATH=path, FENCE_LOCK_FILE=lock, FENCE_VARIABLE=f"db-{i}")
        contenders.append(
            procs.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    race.release_all(fifo, contenders)
    wait_for(lambda: read_text(log).count("start") >= 2, "a second contender to start")
    write_file(str(tmp_path / "go"), b"")
    for p in contenders:
        p.wait(timeout=60)
