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

from harness.fence import FAST, LIVE, PGFENCE, clean_env, read_text, run_args, write_file
from harness.procs import Registry
from harness.race import (
    BARRIER,
    CHILD,
    CONTENDERS,
    check_generations,
    check_log,
    end_round,
    release_all,
)


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
        child = ["sh", "-c", CHILD, str(round_no), log, go]
        argv = ["sh", "-c", BARRIER, fifo, PGFENCE, *run_args(lock, token, *child, extra=extra)]
        with open(tmp / f"err-{round_no}-{i}", "wb") as err:
            contenders.append(
                procs.start(argv, env=clean_env(), stdout=subprocess.DEVNULL, stderr=err)
            )
    release_all(fifo, contenders)
    end_round(tmp, round_no, contenders, tokens)
    assert not os.path.exists(lock)


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
    check_generations(log, lock, rounds)


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
