"""The POSIX sh shim (`pgfence export-shim`) in dash and in busybox sh, with busybox's own
tools first on PATH as on Alpine: the Python shim's contract, the same lock record, and
interoperation with pgfence both ways.

The "real" postgres is a shell script that records how it was called and the lock's first
line at that moment, then exits with $FAKE_PG_EXIT.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from harness.fence import (
    FAST,
    PGFENCE,
    assert_one_line_error,
    clean_env,
    lock_fields,
    path_state,
    read_text,
    write_file,
)
from harness.records import sample_record
from pgfence.record import LockRecord, ShimLock, parse

pytestmark = pytest.mark.timeout(60)

SHELLS = {"dash": "#!/bin/dash", "busybox": "#!/bin/busybox sh"}
# What the shim runs besides shell built-ins; busybox provides each as an applet.
TOOLS = ("cat", "cut", "date", "grep", "head", "ln", "mv", "od", "rm", "stat", "sync", "tr")
TOOLS += ("uname", "wc")

FAKE_POSTGRES = """#!/bin/sh
{
  echo "path:$0"
  for arg in "$@"; do echo "arg:$arg"; done
  echo "generation:${PGFENCE_GENERATION:-}"
  if [ -n "${PGFENCE_LOCK:-}" ]; then echo "lock:$(head -n 1 "$PGFENCE_LOCK")"; fi
} > "$FAKE_PG_OUT"
exit "${FAKE_PG_EXIT:-0}"
"""


def exported_shim() -> str:
    result = subprocess.run([PGFENCE, "export-shim"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("#!/bin/sh\n")
    return result.stdout


SHIM_TEXT = exported_shim()


class Setup:
    def __init__(self, tmp_path: Path, shell: str) -> None:
        self.tmp = tmp_path
        self.shell = shell
        self.shim_dir = self.bin_dir("newbin")
        self.shim = os.path.join(self.shim_dir, "postgres")
        write_file(self.shim, SHIM_TEXT.replace("#!/bin/sh", SHELLS[shell], 1).encode())
        os.chmod(self.shim, 0o555)
        self.tools = self.bin_dir("tools")
        if shell == "busybox":
            for tool in TOOLS:
                os.symlink("/bin/busybox", os.path.join(self.tools, tool))
        self.real_dir = self.bin_dir("real")
        self.real = os.path.join(self.real_dir, "postgres")
        write_file(self.real, FAKE_POSTGRES.encode())
        os.chmod(self.real, 0o755)
        self.out = str(tmp_path / "called")
        self.data = tmp_path / "volume"
        self.data.mkdir()
        self.lock = str(self.data / "fence_lock")

    def bin_dir(self, name: str) -> str:
        path = self.tmp / name
        path.mkdir()
        return str(path)

    def failing(self, tool: str) -> str:
        """A bin directory whose `tool` exits 1, to put before the real one."""
        broken = self.bin_dir(f"broken-{tool}")
        write_file(os.path.join(broken, tool), b"#!/bin/sh\nexit 1\n")
        os.chmod(os.path.join(broken, tool), 0o755)
        return broken

    def env(
        self, token: str | None = "db-1", path: list[str] | None = None, **extra: str
    ) -> dict[str, str]:
        dirs = [self.shim_dir, self.real_dir] if path is None else path
        settings = {
            "PATH": ":".join([*dirs, self.tools, "/usr/bin", "/bin"]),
            "FENCE_LOCK_FILE": self.lock,
            "FAKE_PG_OUT": self.out,
        }
        if token is not None:
            settings["FENCE_VARIABLE"] = token
        return clean_env(**{**settings, **extra})

    def postgres(
        self, *args: str, env: dict[str, str] | None = None, token: str | None = "db-1"
    ) -> subprocess.CompletedProcess[str]:
        """`postgres ARGS` as the entrypoint's `exec "$@"` runs it: found on PATH."""
        return subprocess.run(
            ["postgres", *args],
            env=self.env(token) if env is None else env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def pgfence(self, *args: str, token: str = "db-1") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PGFENCE, *args],
            env=clean_env(FENCE_LOCK_FILE=self.lock, FENCE_VARIABLE=token),
            capture_output=True,
            text=True,
            timeout=30,
        )

    def called(self) -> list[str]:
        return read_text(self.out).splitlines()

    def holder(self) -> object:
        with open(self.lock, "rb") as f:
            return parse(f.read(), self.lock)


@pytest.fixture(params=sorted(SHELLS))
def shim(request: pytest.FixtureRequest, shared_dir: str) -> Setup:
    # A directory every user may enter: some cases run the shim as nobody.
    return Setup(Path(shared_dir), request.param)


def test_export_shim_is_posix_sh_and_names_its_version() -> None:
    from pgfence import __version__

    assert f"pgfence-sh-shim {__version__}" in SHIM_TEXT.splitlines()[1]
    for shell in ("/bin/dash", "/bin/busybox"):
        argv = [shell, "-n"] if shell == "/bin/dash" else [shell, "sh", "-n"]
        subprocess.run([*argv, "-c", SHIM_TEXT], check=True, timeout=30)


def test_takes_a_free_lock_with_pgfences_record_and_execs_the_real_postgres(
    shim: Setup,
) -> None:
    result = shim.postgres("-D", "/data", "-c", "port=5433")
    assert result.returncode == 0, result.stderr
    assert shim.called() == [
        f"path:{shim.real}",
        "arg:-D",
        "arg:/data",
        "arg:-c",
        "arg:port=5433",
        "generation:1",
        "lock:db-1",
    ]
    held = shim.holder()
    assert isinstance(held, ShimLock) and held.token == "db-1"
    record = held.record
    assert (record.mode, record.generation, record.heartbeat, record.interval) == (
        "strict",
        1,
        0,
        0.0,
    )
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert record.boot_id == f.read().strip()
    with open("/proc/uptime") as f:  # the clock reading: CLOCK_BOOTTIME, as pgfence's
        assert 0 < record.clock <= float(f.read().split()[0])
    assert read_text(f"{shim.lock}.generation") == "1\n"
    assert sorted(os.listdir(shim.data)) == ["fence_lock", "fence_lock.generation"]
    assert "acquired" in result.stderr and "release --force" in result.stderr


def test_token_defaults_to_hostname(shim: Setup) -> None:
    result = shim.postgres(env=shim.env(token=None, HOSTNAME="task-7"))
    assert result.returncode == 0, result.stderr
    assert lock_fields(shim.lock)["token"] == "task-7"  # type: ignore[index]


def test_same_token_starts_another_token_is_fenced_out(shim: Setup) -> None:
    assert shim.postgres().returncode == 0
    before = path_state(shim.lock)
    again = shim.postgres()
    assert again.returncode == 0, again.stderr
    assert shim.called()[-1] == "lock:db-1"
    os.unlink(shim.out)
    other = shim.postgres(token="db-2")
    assert other.returncode == 73
    assert_one_line_error(other.stderr, "fenced out", "'db-1'")
    assert not os.path.exists(shim.out)
    assert path_state(shim.lock) == before


def test_a_one_line_lock_of_this_token_starts_unchanged(shim: Setup) -> None:
    write_file(shim.lock, b"db-1")
    assert shim.postgres().returncode == 0
    assert read_text(shim.lock) == "db-1"
    assert shim.postgres(token="db-2").returncode == 73


def test_generation_never_repeats(shim: Setup) -> None:
    write_file(f"{shim.lock}.generation", b"41\n")
    assert shim.postgres().returncode == 0
    assert shim.holder().record.generation == 42  # type: ignore[attr-defined]
    released = shim.pgfence("release", "--force")
    assert released.returncode == 0, released.stderr
    assert shim.postgres(token="db-2").returncode == 0
    assert shim.holder().record.generation == 43  # type: ignore[attr-defined]
    assert read_text(f"{shim.lock}.generation") == "43\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--version"],
        ["-V"],
        ["--help"],
        ["-?"],
        ["--describe-config"],
        ["-D", "/data", "-C", "port"],
        ["-Cmax_connections"],
    ],
)
def test_printing_invocations_pass_through_a_foreign_or_broken_fence(
    shim: Setup, args: list[str]
) -> None:
    write_file(shim.lock, b"db-2\nnot a record\n")
    before = path_state(shim.lock)
    result = shim.postgres(*args, env=shim.env(token="", FENCE_MODE="lease"))
    assert result.returncode == 0, result.stderr
    assert shim.called()[1:-1] == [f"arg:{a}" for a in args]
    assert path_state(shim.lock) == before and result.stderr == ""


@pytest.mark.parametrize(
    "args", [["--single", "-D", "/d"], ["-C", "shared_memory_size"], ["-CData_Checksums"]]
)
def test_writing_invocations_are_fenced(shim: Setup, args: list[str]) -> None:
    write_file(shim.lock, b"db-2\n")
    result = shim.postgres(*args)
    assert result.returncode == 73, result.stderr
    assert not os.path.exists(shim.out)


def setup_symlink(s: Setup) -> None:
    os.symlink(str(s.tmp / "elsewhere"), s.lock)


def setup_directory(s: Setup) -> None:
    os.mkdir(s.lock)


def setup_fifo(s: Setup) -> None:
    os.mkfifo(s.lock)


def setup_symlinked_sidecar(s: Setup) -> None:
    os.symlink(str(s.tmp / "elsewhere"), f"{s.lock}.generation")


def setup_unwritable(s: Setup) -> None:
    os.chmod(s.data, 0o555)


def setup_unreadable(s: Setup) -> None:
    write_file(s.lock, b"db-1\n")
    os.chmod(s.lock, 0)


@pytest.mark.parametrize(
    ("setup", "code", "needle"),
    [
        (setup_symlink, 74, "symlink"),
        (setup_directory, 74, "directory"),
        (setup_fifo, 74, "not a regular file"),
        (setup_symlinked_sidecar, 74, "symlink"),
        (setup_unwritable, 74, "cannot write"),
        (setup_unreadable, 74, "cannot read"),
        (lambda s: write_file(s.lock, b""), 65, "is empty"),
        (lambda s: write_file(s.lock, b"   \n"), 65, "is blank"),
        (lambda s: write_file(s.lock, b" db-1\n"), 65, "white space"),
        (lambda s: write_file(s.lock, b"db-1\nsomething else\n"), 65, "no pgfence header"),
        (lambda s: write_file(s.lock, b"db-1\n" + b"x" * 5000), 65, "larger than 4096"),
        (lambda s: write_file(f"{s.lock}.generation", b"seven\n"), 65, "generation number"),
    ],
)
def test_bad_lock_paths_fail_closed(shim: Setup, setup: object, code: int, needle: str) -> None:
    assert callable(setup)
    setup(shim)
    before = sorted(path_state(str(shim.data / n)) for n in os.listdir(shim.data))
    env = shim.env()
    argv = ["postgres", "-D", "/data"]
    if setup is setup_unwritable or setup is setup_unreadable:  # root reads and writes all
        if os.geteuid() != 0:
            pytest.skip("needs root to run the shim as another user")
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == code, result.stderr
    assert_one_line_error(result.stderr, needle)
    assert not os.path.exists(shim.out)
    assert sorted(path_state(str(shim.data / n)) for n in os.listdir(shim.data)) == before


@pytest.mark.parametrize(
    ("variables", "needle"),
    [
        ({"FENCE_VARIABLE": ""}, "is empty"),
        ({"FENCE_VARIABLE": "  "}, "is blank"),
        ({"FENCE_VARIABLE": "a\nb"}, "several lines"),
        ({"FENCE_VARIABLE": "db-1 "}, "white space"),
        ({"FENCE_VARIABLE": "x" * 256}, "longer than 255"),
        ({"FENCE_VARIABLE": "db\t1"}, "control characters"),
        ({"FENCE_VARIABLE": "db\x1b1"}, "control characters"),
        ({"FENCE_LOCK_FILE": ""}, "must name a file"),
        ({"FENCE_LOCK_FILE": "/tmp/dir/"}, "must name a file"),
        ({"FENCE_MODE": "lease"}, "only strict mode"),
        ({"FENCE_BACKEND": "etcd"}, "only the file backend"),
        ({"FENCE_USER": "postgres"}, "FENCE_USER"),
    ],
)
def test_bad_settings_exit_64_and_touch_nothing(
    shim: Setup, variables: dict[str, str], needle: str
) -> None:
    result = shim.postgres(env={**shim.env(), **variables})
    assert result.returncode == 64, result.stderr
    assert_one_line_error(result.stderr, needle)
    assert os.listdir(shim.data) == [] and not os.path.exists(shim.out)


def test_missing_lock_directory(shim: Setup) -> None:
    result = shim.postgres(env=shim.env(FENCE_LOCK_FILE=str(shim.tmp / "gone" / "fence_lock")))
    assert result.returncode == 74
    assert_one_line_error(result.stderr, "does not exist")


def test_never_finds_itself_nor_another_pgfence(shim: Setup) -> None:
    alias = shim.bin_dir("alias")
    os.symlink(shim.shim, os.path.join(alias, "postgres"))
    console = shim.bin_dir("console")
    os.symlink(PGFENCE, os.path.join(console, "postgres"))
    path = [shim.shim_dir, alias, console, shim.shim_dir, shim.real_dir]
    result = shim.postgres("--version", env=shim.env(path=path))
    assert result.returncode == 0, result.stderr
    assert shim.called()[0] == f"path:{shim.real}"
    alone = shim.postgres("--version", env=shim.env(path=[shim.shim_dir, alias]))
    assert alone.returncode == 127
    assert_one_line_error(alone.stderr, "cannot find the real postgres")


def test_fence_postgres_bin(shim: Setup) -> None:
    result = shim.postgres("-V", env=shim.env(path=[shim.shim_dir], FENCE_POSTGRES_BIN=shim.real))
    assert result.returncode == 0 and shim.called()[0] == f"path:{shim.real}"
    for bad in (shim.shim, str(shim.tmp / "missing")):
        result = shim.postgres(env=shim.env(FENCE_POSTGRES_BIN=bad))
        assert result.returncode == 127
        assert_one_line_error(result.stderr, "FENCE_POSTGRES_BIN")
        assert os.listdir(shim.data) == []


def test_nfs_link_reply_lost_but_link_made(shim: Setup) -> None:
    """A retransmitted LINK reports EEXIST although the first one succeeded: the temp
    file's link count (2) says we won."""
    flaky = shim.bin_dir("flaky")
    write_file(os.path.join(flaky, "ln"), b'#!/bin/sh\n/bin/ln "$@" && exit 1\n')
    os.chmod(os.path.join(flaky, "ln"), 0o755)
    env = shim.env(path=[shim.shim_dir, flaky, shim.real_dir])
    result = shim.postgres(env=env, token="db-1")
    assert result.returncode == 0, result.stderr
    assert "acquired" in result.stderr and shim.called()[-1] == "lock:db-1"
    assert sorted(os.listdir(shim.data)) == ["fence_lock", "fence_lock.generation"]


def test_generation_not_recorded_means_no_start(shim: Setup) -> None:
    """The holder records its generation before the server starts; if it cannot, it
    gives the lock back and exits 74, so no server runs under an unrecorded generation."""
    write_file(f"{shim.lock}.generation", b"5\n")
    result = shim.postgres(env=shim.env(path=[shim.shim_dir, shim.failing("mv"), shim.real_dir]))
    assert result.returncode == 74
    assert_one_line_error(result.stderr, "gave the lock back")
    assert not os.path.exists(shim.out) and not os.path.exists(shim.lock)
    assert read_text(f"{shim.lock}.generation") == "5\n"
    assert sorted(os.listdir(shim.data)) == ["fence_lock.generation"]


def test_link_impossible_is_a_storage_error(shim: Setup) -> None:
    result = shim.postgres(env=shim.env(path=[shim.shim_dir, shim.failing("ln"), shim.real_dir]))
    assert result.returncode == 74
    assert_one_line_error(result.stderr, "hard links")
    assert not os.path.exists(shim.lock) and not os.path.exists(shim.out)
    assert [n for n in os.listdir(shim.data) if n.endswith(".tmp")] == []


# -- interoperation with pgfence ----------------------------------------------------------


def test_pgfence_reads_and_respects_a_shim_lock(shim: Setup) -> None:
    assert shim.postgres().returncode == 0
    before = path_state(shim.lock)
    status = shim.pgfence("status", token="db-2")
    assert status.returncode == 0
    assert "sh shim lock" in status.stdout and "generation:  1" in status.stdout
    # Another token: never taken over, in strict or in lease mode.
    for mode in (["--mode", "strict"], ["--mode", "lease", "--no-wait"]):
        other = shim.pgfence("run", *mode, *FAST, "--", "true", token="db-2")
        assert other.returncode == 73, other.stderr
    # Nobody can tell whether its server still runs: no release without --force.
    refused = shim.pgfence("release", token="db-2")
    assert refused.returncode == 73 and "--force" in refused.stderr
    check = shim.pgfence("check")
    assert check.returncode == 1
    assert path_state(shim.lock) == before


def test_pgfence_with_the_same_token_takes_a_shim_lock_as_the_seed_rule_says(
    shim: Setup,
) -> None:
    assert shim.postgres().returncode == 0
    run = shim.pgfence("run", *FAST, "--", "sh", "-c", f'head -n 1 "$PGFENCE_LOCK" > {shim.out}')
    assert run.returncode == 0, run.stderr
    assert shim.called() == ["db-1"]
    assert not os.path.exists(shim.lock)
    # the next generation after the shim's:
    assert read_text(f"{shim.lock}.generation").split()[0] == "2"


def test_shim_respects_pgfence_locks(shim: Setup) -> None:
    foreign = sample_record(token="db-2", boot_id="elsewhere")
    write_file(shim.lock, foreign.encode())
    assert shim.postgres().returncode == 73
    # The same token, written by a pgfence that heartbeats: the shim cannot watch it.
    write_file(shim.lock, sample_record(token="db-1").encode())
    result = shim.postgres()
    assert result.returncode == 73
    assert_one_line_error(result.stderr, "same token", "heartbeats")
    assert not os.path.exists(shim.out)


def test_a_record_with_interval_0_is_a_shim_lock_only_in_strict_mode() -> None:
    shim_record = sample_record(interval=0.0, heartbeat=0)
    held = parse(shim_record.encode(), "lock")
    assert isinstance(held, ShimLock) and held.record == shim_record
    for bad in (
        sample_record(interval=0.0),
        sample_record(interval=0.0, heartbeat=0, mode="lease", ttl=30.0),
    ):
        with pytest.raises(Exception, match="zero renewal interval"):
            parse(bad.encode(), "lock")
    assert isinstance(parse(sample_record().encode(), "lock"), LockRecord)
