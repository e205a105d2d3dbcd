"""Helpers for black-box tests of the installed `pgfence` command.

Clean environments, the exact state of a lock path (to prove it was left untouched),
background holders, and tmpfs mounts. Waiting on conditions is `harness.waiting`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence

from harness.procs import Registry, alive
from harness.waiting import wait_for

PGFENCE = os.path.join(os.path.dirname(sys.executable), "pgfence")
PRINT_SIGNALS = os.path.join(os.path.dirname(__file__), "print_signals.py")
FAST = ("--heartbeat-interval", "0.2")  # silence is then judged after 3 * 0.2 + 1 s
# Background holders that others must see alive: 3 * 0.5 + 1 s of silence before anyone
# calls them dead, so a stall of the loaded test machine cannot pass for a crash.
LIVE = ("--heartbeat-interval", "0.5")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without anything that configures pgfence."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FENCE_", "PGFENCE_")) and k not in ("PGDATA", "HOSTNAME")
    }
    env.update(extra)
    return env


def run_args(lock: str, token: str, *command: str, extra: Sequence[str] = ()) -> list[str]:
    """The arguments of `pgfence run` on the lock file `lock` as `token`; `extra` are
    more options (FAST, say)."""
    return ["run", "--lock-file", lock, "--token", token, *extra, "--", *command]


def read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def path_state(path: str) -> tuple[object, ...]:
    """Everything a refused command could have changed at `path`: type, inode, content."""
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ("absent",)
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        resolved = os.path.join(os.path.dirname(path), target)
        return ("symlink", st.st_ino, target, path_state(resolved))
    if stat.S_ISDIR(st.st_mode):
        return ("dir", st.st_ino, st.st_mode, tuple(sorted(os.listdir(path))))
    if stat.S_ISREG(st.st_mode):
        with open(path, "rb") as f:
            return ("file", st.st_ino, f.read())
    return ("other", st.st_ino, stat.S_IFMT(st.st_mode))


def lock_fields(path: str) -> dict[str, str] | None:
    """The lock's token (`token`) and its key=value lines; None when there is no lock."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return None
    fields = {"token": lines[0] if lines else ""}
    for line in lines[1:]:
        key, sep, value = line.partition("=")
        if sep:  # the `pgfence-lock 1` header line has none
            fields[key] = value
    return fields


def first_line(path: str) -> str | None:
    fields = lock_fields(path)
    return None if fields is None else fields["token"]


def write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr is exactly one `pgfence: ...` line (no traceback) containing `needles`."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.rstrip("\n").split("\n")
    assert len(lines) == 1, f"expected one line on stderr, got: {stderr!r}"
    assert lines[0].startswith("pgfence: "), stderr
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def json_events(stderr: str) -> list[dict[str, object]]:
    """Each stderr line parsed as one JSON object (fails on any other line)."""
    events = []
    for line in stderr.splitlines():
        value = json.loads(line)
        assert isinstance(value, dict), line
        events.append(value)
    return events


def marker_command(marker: str, *then: str) -> list[str]:
    """A command that proves it ran by creating `marker` (then runs `then`, if given)."""
    script = ': > "$0"' + ('; exec "$@"' if then else "")
    return ["sh", "-c", script, marker, *then]


class Holder:
    """A `pgfence run` in the background whose child records its pid and waits.

    The child writes its pid to `<marker>` and then sleeps until it is killed, or until
    `<marker>.exit` appears (`finish()`), when it exits with status 0.
    """

    def __init__(
        self,
        procs: Registry,
        lock: str,
        token: str,
        marker: str,
        extra: Sequence[str] = LIVE,
        env: dict[str, str] | None = None,
        stderr: str | None = None,
    ) -> None:
        self.lock = lock
        self.marker = marker
        self.stderr_path = stderr or f"{marker}.stderr"
        script = (
            'echo $$ > "$0.tmp" && mv "$0.tmp" "$0"; while [ ! -e "$0.exit" ]; do sleep 0.05; done'
        )
        argv = [PGFENCE, *run_args(lock, token, "sh", "-c", script, marker, extra=extra)]
        with open(self.stderr_path, "wb") as err:
            self.proc = procs.start(argv, env=env or clean_env(), stderr=err)
        self.child_pid = int(
            wait_for(self._child_pid, f"the child of the holder {token!r}").strip()
        )
        assert first_line(lock) == token

    def _child_pid(self) -> str:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"holder exited with {self.proc.returncode}: {read_text(self.stderr_path)}"
            )
        return read_text(self.marker)

    @property
    def stderr(self) -> str:
        return read_text(self.stderr_path)

    def heartbeat(self) -> int:
        fields = lock_fields(self.lock)
        assert fields is not None
        return int(fields["heartbeat"])

    def wait_beat(self, timeout: float = 20.0) -> None:
        """Wait until the holder has written one more heartbeat."""
        start = self.heartbeat()
        wait_for(lambda: self.heartbeat() > start, "a heartbeat", timeout)

    def kill(self) -> None:
        """SIGKILL pgfence (not PID 1): its child must die too, its lock must stay."""
        self.proc.kill()
        self.proc.wait(timeout=30)
        wait_for(lambda: not alive(self.child_pid), "the child to die with pgfence")

    def finish(self, timeout: float = 30.0) -> int:
        write_file(f"{self.marker}.exit", b"")
        return self.proc.wait(timeout=timeout)


@contextlib.contextmanager
def tmpfs(path: str, size: str = "1m", *options: str) -> Iterator[str]:
    """A small tmpfs mounted at `path` for the duration; always unmounted afterwards."""
    os.makedirs(path, exist_ok=True)
    opts = ",".join([f"size={size}", "mode=0755", *options])
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", path], check=True, timeout=30)
    try:
        yield path
    finally:
        if subprocess.run(["umount", path], timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", path], timeout=30)


def remount(path: str, *options: str) -> None:
    subprocess.run(["mount", "-o", ",".join(["remount", *options]), path], check=True, timeout=30)


def fill(directory: str) -> None:
    """Fill the filesystem of `directory` until it reports ENOSPC."""
    fd = os.open(os.path.join(directory, "filler"), os.O_WRONLY | os.O_CREAT, 0o644)
    block = b"\0" * 4096
    try:
        while True:
            os.write(fd, block)
    except OSError:
        pass
    finally:
        os.close(fd)
