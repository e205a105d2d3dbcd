"""Start-up: wall time from exec to exit of short pgfence commands, against baselines.

Every command is started with posix_spawn (no shell, stdio on /dev/null) and timed until
waitpid returns. One round runs every command once, in a fresh random order, so that
load changes on the shared machine hit all of them alike; the first rounds warm the page
cache and are discarded.

pgfence is measured twice: as the images install it (`#!/usr/bin/python3 -I` launcher,
package copied and byte-compiled, see common.stage_image) and as the venv console script
(`.venv/bin/pgfence`, an editable install: site-packages and .pth files are processed).
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from bench.common import PYTHON, VENV_PGFENCE, Context, boottime, progress
from harness import pg
from harness.containers import BASE_PATH

# The fence pgfence replaces, reduced to its steps: test -f, compare, echo token > file,
# exec the command.
LOCK_SCRIPT = """\
#!/bin/sh
lock="$FENCE_LOCK_FILE"
token="${FENCE_VARIABLE:-$HOSTNAME}"
if [ -f "$lock" ]; then
  read -r holder < "$lock"
  if [ "$holder" != "$token" ]; then
    echo "fenced out: $lock is held by $holder" >&2
    exit 73
  fi
fi
echo "$token" > "$lock"
exec "$@"
"""
TOKEN = "bench-startup"


@dataclass(frozen=True)
class Command:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str]


class Fixture:
    """What the start-up commands need: lock files, a live holder for `check` and
    `status`, and `postgres` shims (symlinks to each pgfence) first on PATH."""

    def __init__(self, ctx: Context) -> None:
        self.dir = ctx.directory("startup")
        self.launcher = ctx.launcher
        self.library = ctx.library
        self.script = os.path.join(self.dir, "fence.sh")
        with open(self.script, "w", encoding="utf-8") as f:
            f.write(LOCK_SCRIPT)
        os.chmod(self.script, 0o755)
        self.shims = {}
        for kind, target in (("image", ctx.launcher), ("venv", VENV_PGFENCE)):
            shim_dir = os.path.join(self.dir, f"shim-{kind}")
            os.makedirs(shim_dir)
            os.symlink(target, os.path.join(shim_dir, "postgres"))
            self.shims[kind] = shim_dir
        self.held = os.path.join(self.dir, "held.lock")
        holder_env = self.env(self.held)
        ctx.registry.start([ctx.launcher, "run", "--", "sleep", "1000000"], env=holder_env)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.held):
            assert time.monotonic() < deadline, "the holder for `check` did not acquire"
            time.sleep(0.01)

    def env(self, lock: str, path_front: str | None = None) -> dict[str, str]:
        """A small container-like environment (the same for every command)."""
        path = ":".join(p for p in (path_front, pg.PG_BIN, BASE_PATH) if p)
        return {
            "PATH": path,
            "LANG": "C.UTF-8",
            "HOSTNAME": TOKEN,
            "FENCE_VARIABLE": TOKEN,
            "FENCE_LOCK_FILE": lock,
        }

    def lock(self, name: str) -> str:
        return os.path.join(self.dir, f"{name}.lock")

    def commands(self) -> list[Command]:
        postgres = os.path.join(pg.PG_BIN, "postgres")
        cmds = [
            Command("true (exec floor)", ["/bin/true"], self.env(self.lock("none"))),
            Command("bare interpreter", [PYTHON, "-I", "-c", "pass"], self.env(self.lock("none"))),
            Command("shell lock script", [self.script, "/bin/true"], self.env(self.lock("sh"))),
            Command(
                "run (image launcher)",
                [self.launcher, "run", "--", "/bin/true"],
                self.env(self.lock("run-image")),
            ),
            Command(
                "run (venv script)",
                [VENV_PGFENCE, "run", "--", "/bin/true"],
                self.env(self.lock("run-venv")),
            ),
            Command("check (image launcher)", [self.launcher, "check"], self.env(self.held)),
            Command("check (venv script)", [VENV_PGFENCE, "check"], self.env(self.held)),
            Command("postgres --version (real)", [postgres, "--version"], self.env(self.held)),
        ]
        for kind in ("image", "venv"):
            shim = os.path.join(self.shims[kind], "postgres")
            cmds.append(
                Command(
                    f"postgres --version (shim, {kind})",
                    [shim, "--version"],
                    self.env(self.held, self.shims[kind]),
                )
            )
        return cmds


def timed(argv: Sequence[str], env: Mapping[str, str]) -> tuple[float, int]:
    """(seconds from spawn to exit, exit status) of one run; killed if interrupted."""
    devnull = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0),
    ]
    start = time.perf_counter()
    pid = os.posix_spawn(argv[0], list(argv), dict(env), file_actions=devnull)
    try:
        _, status = os.waitpid(pid, 0)
    except BaseException:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    return time.perf_counter() - start, os.waitstatus_to_exitcode(status)


def run(ctx: Context, fixture: Fixture) -> dict[str, object]:
    rounds = ctx.trials(100, 25)
    warmup = 5
    commands = fixture.commands()
    rng = random.Random(6)
    samples: dict[str, list[float]] = {c.name: [] for c in commands}
    progress(f"start-up: {len(commands)} commands, {rounds} interleaved rounds")
    started = boottime()
    for round_ in range(warmup + rounds):
        order = list(commands)
        rng.shuffle(order)
        for cmd in order:
            seconds, status = timed(cmd.argv, cmd.env)
            if status != 0:
                raise RuntimeError(f"{cmd.name}: {list(cmd.argv)} exited {status}")
            if round_ >= warmup:
                samples[cmd.name].append(seconds)
    return {
        "rounds": rounds,
        "warmup_rounds": warmup,
        "seconds": boottime() - started,
        "samples": samples,
        "argv": {c.name: " ".join(c.argv) for c in commands},
    }
