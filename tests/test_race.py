"""Acquisition is atomic: many `pgfence run` released at once yield exactly one holder.

Each round starts N contenders that block opening a FIFO for reading; once all of them
are blocked there, the test opens its write end and all N go on at the same instant to
exec pgfence. The winner's command appends `start` and `end` lines to a shared log (one
O_APPEND write each) and keeps running until every loser has exited, so a late loser
cannot legitimately start after the winner's release within the same round. Afterwards:
exactly one start per round, no two intervals overlap, every loser exited 73.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.fence import FAST, LIVE, PGFENCE, clean_env, read_text, write_file
from harness.procs import Registry
from harness.waiting import wait_for

CONTENDERS = 16
# The barrier: open the FIFO (blocks until the test opens its write end), then exec.
BARRIER = ': < "$0"; exec "$@"'
# The supervised command: log start, wait for the test's go-ahead, log end.
CHILD = (
    'echo "start $0 $$" >> "$1"; echo "$PGFENCE_GENERATION" >> "$1.generations"; '
    'while [ ! -e "$2" ]; do sleep 0.02; done; echo "end $0 $$" >> "$1"'
)


def blocked_on_fifo(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read().strip() == "wait_for_partner"
    except OSError:
        return False


def release_all(fifo: str, contenders: list[subprocess.Popen[bytes]]) -> None:
    wait_for(
        lambda: all(blocked_on_fifo(p.pid) for p in contenders),
        "every contender to block on the FIFO",
    )
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # wakes every reader at once
    os.close(fd)


def play_round(
    procs: Registry,
    tmp: Path,
    round_no: int,
    lock: str,
    tokens: list[str],
    log: str,
    extra: tuple[str, ...] = FAST,
) -> None:
    fifo = str(tmp / "barrier")
    go = str(tmp / f"go-{round_no}")
    contenders = []
    for i, token in enumerate(tokens):
        argv = ["sh", "-c", BARRIER, fifo, PGFENCE, "run", "--lock-file", lock]
        argv += ["--token", token, *extra, "--", "sh", "-c", CHILD, str(round_no), log, go]
        with open(tmp / f"err-{round_no}-{i}", "wb") as err:
            contenders.append(
                procs.start(argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
            )
    release_all(fifo, contenders)

    def losers_done() -> bool:
        return sum(p.poll() is not None for p in contenders) >= len(contenders) - 1

    wait_for(losers_done, f"the losers of round {round_no} to exit", timeout=60)
    write_file(go, b"")
    codes = [p.wait(timeout=60) for p in contenders]
    errors = [read_text(str(tmp / f"err-{round_no}-{i}")) for i in range(len(tokens))]
    assert sorted(codes) == [0] + [73] * (len(tokens) - 1), list(zip(codes, errors))
    for code, err in zip(codes, errors):
        assert "Traceback" not in err
        if code == 73:
            assert "fenced out" in err.splitlines()[-1]
    assert not os.path.exists(lock)


def check_log(log: str, rounds: int) -> None:
    """At most one command runs at any time, and exactly one ran per round."""
    running: set[str] = set()
    starts: list[int] = []
    for line in read_text(log).splitlines():
        what, round_no, pid = line.split()
        if what == "start":
            assert not running, f"round {round_no}: pid {pid} started while {running} ran"
            running.add(pid)
            starts.append(int(round_no))
        else:
            assert running == {pid}, f"round {round_no}: unexpected end of {pid}"
            running.clear()
    assert not running
    assert starts == list(range(rounds))


@pytest.mark.timeout(120)
def test_distinct_tokens_race_for_a_free_lock(procs: Registry, tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "barrier")
    lock = str(tmp_path / "fence_lock")
    log = str(tmp_path / "log")
    rounds = 20
    tokens = [f"db-{i}" for i in range(CONTENDERS)]
    for round_no in range(rounds):
        play_round(procs, tmp_path, round_no, lock, tokens, log)
    check_log(log, rounds)
    # Every acquisition got a newer generation. Numbers may be skipped: a loser that
    # read the generation file after another's reservation reserved the next one.
    generations = [int(g) for g in read_text(log + ".generations").split()]
    assert len(generations) == rounds
    assert all(a < b for a, b in zip(generations, generations[1:])), generations
    assert int(read_text(lock + ".generation").split()[0]) >= generations[-1]


@pytest.mark.timeout(120)
def test_same_token_race_to_convert_a_one_line_lock(procs: Registry, tmp_path: Path) -> None:
    # The takeover path: all contenders share the token of a seed lock, so each may take it
    # over; the claim file lets exactly one do so, and the others then see a live holder
    # with their token but another instance (73).
    os.mkfifo(tmp_path / "barrier")
    lock = str(tmp_path / "fence_lock")
    log = str(tmp_path / "log")
    rounds = 6
    tokens = ["db-1"] * CONTENDERS
    for round_no in range(rounds):
        write_file(lock, b"db-1\n")
        # The losers must see the winner's heartbeat move before they call it dead
        # (3 * 0.5 + 1 s), even with sixteen pythons starting on a loaded machine.
        play_round(procs, tmp_path, round_no, lock, tokens, log, LIVE)
    check_log(log, rounds)
    generations = [int(g) for g in read_text(log + ".generations").split()]
    assert all(a < b for a, b in zip(generations, generations[1:])), generations
    leftovers = [n for n in os.listdir(tmp_path) if ".takeover-" in n or n.endswith(".tmp")]
    assert leftovers == []
