"""Every row of issue 2's contract, as black-box tests of the installed `pgfence` command.

Holders run with a 0.2 s heartbeat, so a silent holder is recognised after 3 * 0.2 + 1 s.
Nothing here waits a fixed time: every wait is for a condition, with a generous timeout.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from conftest import pgfence_run
from harness.fence import (
    FAST,
    PGFENCE,
    Holder,
    assert_one_line_error,
    clean_env,
    first_line,
    json_events,
    lock_fields,
    marker_command,
    path_state,
    read_text,
    run_args,
    tmpfs,
    write_file,
)
from harness.procs import Registry, alive
from harness.records import holder_elsewhere
from harness.waiting import wait_for
from pgfence.record import LockRecord, parse

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def lock(tmp_path: Path) -> str:
    return str(tmp_path / "fence_lock")


def run(
    lock: str,
    token: str,
    *command: str,
    extra: tuple[str, ...] = FAST,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    return pgfence_run(
        *run_args(lock, token, *command, extra=extra), env=clean_env() if env is None else env
    )


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return pgfence_run(*args, env=clean_env() if env is None else env)


def copy_lock(out: str) -> list[str]:
    """A command that copies the lock it runs under to `out` (proof that it ran, and how)."""
    return ["sh", "-c", 'cp "$PGFENCE_LOCK" "$0"', out]


def status_json(lock: str, token: str, *extra: str) -> dict[str, object]:
    done = cli("status", "--json", "--lock-file", lock, "--token", token, *extra)
    assert done.returncode == 0, done.stderr
    value = json.loads(done.stdout)
    assert isinstance(value, dict)
    return value


def refused_untouched(
    lock: str, marker: str, done: subprocess.CompletedProcess[str], before: object, code: int
) -> str:
    """The refusal every bad input gets: a code, one line, nothing started, lock as it was."""
    assert done.returncode == code, done.stderr
    line = assert_one_line_error(done.stderr)
    assert not os.path.exists(marker), "the command was started"
    assert path_state(lock) == before, "the lock path was changed"
    return line


def refused_beside_live_holder(
    lock: str, tmp_path: Path, procs: Registry, token: str, *needles: str
) -> Holder:
    """With a live holder of `token`, `run` as db-1 is refused (73, one line with
    `needles`, nothing started) and the holder is unharmed: it still heartbeats."""
    holder = Holder(procs, lock, token, str(tmp_path / "holder"))
    marker = str(tmp_path / "started")
    done = run(lock, "db-1", *marker_command(marker))
    assert done.returncode == 73
    assert_one_line_error(done.stderr, *needles)
    assert not os.path.exists(marker)
    holder.wait_beat()
    return holder


# -- run: who may start -----------------------------------------------------------------


def test_no_lock_takes_it_and_starts(lock: str, tmp_path: Path) -> None:
    out = str(tmp_path / "seen")
    done = run(lock, "db-1", "sh", "-c", 'cp "$PGFENCE_LOCK" "$0"; exit 5', out)
    assert done.returncode == 5, done.stderr  # the command's own status
    seen = parse(Path(out).read_bytes(), out)
    assert isinstance(seen, LockRecord)
    assert seen.token == "db-1"
    assert Path(out).read_text().splitlines()[:2] == ["db-1", "pgfence-lock 1"]
    assert not os.path.exists(lock)  # released after the command exited
    assert "acquired" in done.stderr
    assert "released" in done.stderr


@pytest.mark.parametrize("content", [b"db-2", b"db-2\n"])
def test_one_line_lock_of_another_token_is_refused(
    lock: str, tmp_path: Path, content: bytes
) -> None:
    write_file(lock, content)
    marker = str(tmp_path / "started")
    before = path_state(lock)
    line = refused_untouched(lock, marker, run(lock, "db-1", *marker_command(marker)), before, 73)
    assert "'db-2'" in line


def test_live_holder_of_another_token_refuses_start(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = refused_beside_live_holder(lock, tmp_path, procs, "db-2", "fenced out", "'db-2'")
    assert first_line(lock) == "db-2"
    assert holder.finish() == 0
    assert not os.path.exists(lock)


@pytest.mark.parametrize("content", [b"db-1", b"db-1\n"])
def test_one_line_lock_of_our_token_starts_and_is_converted(
    lock: str, tmp_path: Path, content: bytes
) -> None:
    write_file(lock, content)
    out = str(tmp_path / "seen")
    done = run(lock, "db-1", *copy_lock(out))
    assert done.returncode == 0, done.stderr
    seen = Path(out).read_text().splitlines()
    assert seen[:2] == ["db-1", "pgfence-lock 1"]  # converted to a record with a heartbeat
    assert not os.path.exists(lock)


def test_killed_holder_leaves_lock_and_new_token_is_refused(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"))
    holder.kill()  # its child died with it (parent-death signal)
    assert first_line(lock) == "db-2"
    before = path_state(lock)
    marker = str(tmp_path / "started")
    line = refused_untouched(lock, marker, run(lock, "db-1", *marker_command(marker)), before, 73)
    assert "'db-2'" in line
    # However stale it gets, strict mode never takes another token's lock over.
    wait_for(lambda: status_json(lock, "db-1")["alive"] is False, "status to say silent")
    refused_untouched(lock, marker, run(lock, "db-1", *marker_command(marker)), before, 73)


def test_same_token_live_other_instance_is_refused(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = refused_beside_live_holder(
        lock, tmp_path, procs, "db-1", "same token", "FENCE_VARIABLE"
    )
    assert holder.finish() == 0


def test_same_token_silent_other_instance_is_taken(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = Holder(procs, lock, "db-1", str(tmp_path / "holder"))
    holder.kill()
    old = lock_fields(lock)
    assert old is not None
    out = str(tmp_path / "seen")
    done = run(lock, "db-1", *copy_lock(out))
    assert done.returncode == 0, done.stderr
    assert "took over" in done.stderr
    new = parse(Path(out).read_bytes(), out)
    assert isinstance(new, LockRecord)
    assert new.token == "db-1"
    assert new.instance != old["instance"]
    assert new.generation > int(old["generation"])
    assert not os.path.exists(lock)


def test_heartbeat_rewrites_are_never_seen_torn_or_missing(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = Holder(procs, lock, "db-1", str(tmp_path / "holder"), ("--heartbeat-interval", "0.1"))
    seen = set()
    while len(seen) < 10:  # read through at least ten rewrites
        data = Path(lock).read_bytes()  # a missing file would raise here
        record = parse(data, lock)  # a torn or mixed write would not parse
        assert isinstance(record, LockRecord)
        assert record.heartbeat >= max(seen, default=0)
        seen.add(record.heartbeat)
    assert holder.finish() == 0


@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_command_options_are_the_command_s(lock: str, tmp_path: Path, flag: str) -> None:
    # Without `--`, our options end at the command: `postgres -h '*'` is postgres's -h.
    out = str(tmp_path / "args")
    command = ["sh", "-c", 'echo "$@" > "$0"', out, flag, "*"]
    done = cli("run", "--lock-file", lock, "--token", "db-1", *command)  # no `--`
    assert done.returncode == 0, done.stderr
    assert read_text(out) == f"{flag} *\n"
    helped = cli("run", "--token", "db-1", flag)
    assert helped.returncode == 0
    assert helped.stdout.startswith("usage: pgfence run")
    assert not os.path.exists(lock)


# -- status ----------------------------------------------------------------------------


def test_status_free(lock: str) -> None:
    done = cli("status", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 0, done.stderr
    assert f"lock:        {lock}" in done.stdout
    assert "state:       free" in done.stdout
    state = status_json(lock, "db-1")
    assert state["lock"] == lock
    assert state["state"] == "free"
    assert state["holder"] is None
    assert not os.path.exists(lock)


def test_status_held_by_live_holder(lock: str, tmp_path: Path, procs: Registry) -> None:
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"))
    for token, ours in (("db-2", True), ("db-1", False)):
        # "alive" is judged against a deadline; wait for it rather than assume no stall.
        done = wait_for(
            lambda t=token: (
                (d := cli("status", "--lock-file", lock, "--token", t))
                and "(alive;" in d.stdout
                and d
            ),
            "status to show the holder alive",
        )
        assert done.returncode == 0, done.stderr
        assert "state:       held" in done.stdout
        assert "holder:      db-2" in done.stdout
        assert ("(this token)" in done.stdout) == ours
        assert "taken at:" in done.stdout
        state = wait_for(
            lambda t=token: (s := status_json(lock, t))["alive"] is True and s,
            "status --json to show the holder alive",
        )
        assert state["state"] == "held"
        assert state["ours"] is ours
        holder_info = state["holder"]
        assert isinstance(holder_info, dict)
        assert holder_info["token"] == "db-2"
        assert holder_info["format"] == "pgfence"
        assert holder_info["acquired_at"]
        assert isinstance(state["heartbeat_age_seconds"], float)
    assert holder.finish() == 0


def test_status_shows_a_killed_holder_as_silent(lock: str, tmp_path: Path, procs: Registry) -> None:
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"))
    holder.kill()
    state = wait_for(
        lambda: (s := status_json(lock, "db-1"))["alive"] is False and s, "status to say silent"
    )
    assert state["state"] == "held"
    age = state["heartbeat_age_seconds"]
    assert isinstance(age, float)
    assert age > 0
    done = cli("status", "--lock-file", lock, "--token", "db-1")
    assert "(silent;" in done.stdout


def test_status_of_a_holder_on_another_boot_is_observed(lock: str) -> None:
    # A dead holder from another machine (another boot id): its age cannot be computed,
    # only observed. Watching less than the staleness limit cannot call it silent.
    record = holder_elsewhere(interval=0.2)
    write_file(lock, record.encode())
    short = status_json(lock, "db-1", "--observe", "0.3")
    assert short["age_basis"] == "observed"
    assert short["alive"] is None
    long = status_json(lock, "db-1", "--observe", "2")
    assert long["alive"] is False  # 2 s watched > 2 * 0.2 + 1 s


def test_status_of_one_line_lock(lock: str) -> None:
    write_file(lock, b"db-2\n")
    state = status_json(lock, "db-2")
    assert state["holder"] == {"token": "db-2", "format": "legacy"}
    assert state["ours"] is True
    assert state["alive"] is None
    done = cli("status", "--lock-file", lock, "--token", "db-2")
    assert "one-line lock" in done.stdout


@pytest.mark.parametrize("json_flag", [(), ("--json",)])
@pytest.mark.parametrize(
    ("content", "code"),
    [(b"garbage\nmore garbage\n", 65), (b"", 65), (b"db-2\npgfence-lock 9\n", 65), (None, 74)],
)
def test_status_cannot_read(
    lock: str, content: bytes | None, code: int, json_flag: tuple[str, ...]
) -> None:
    if content is None:
        os.mkdir(lock)
    else:
        write_file(lock, content)
    before = path_state(lock)
    done = cli("status", *json_flag, "--lock-file", lock, "--token", "db-1")
    assert done.returncode == code
    assert done.stdout == ""
    assert_one_line_error(done.stderr, lock)
    assert path_state(lock) == before


# -- release ---------------------------------------------------------------------------


def test_release_of_a_free_lock(lock: str) -> None:
    done = cli("release", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 0
    assert "nothing to release" in done.stdout


def watching_release(procs: Registry, lock: str, err: str) -> subprocess.Popen[bytes]:
    """`pgfence release` as db-1, started in the background (stderr to `err`), once it
    shows its progress: it is watching the holder's heartbeat stay silent."""
    with open(err, "wb") as stream:
        release = procs.start(
            [PGFENCE, "release", "--lock-file", lock, "--token", "db-1"],
            env=clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=stream,
        )
    wait_for(lambda: "heartbeat silent" in read_text(err), "release to show its progress")
    return release


def test_release_refuses_a_live_holder_while_showing_progress(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    # A 2 s heartbeat: release needs 3 * 2 + 1 s of silence. The holder is frozen so the
    # release shows its progress, then thawed: its heartbeat moves, the release refuses.
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"), ("--heartbeat-interval", "2"))
    holder.proc.send_signal(signal.SIGSTOP)
    try:
        err = str(tmp_path / "release.err")
        release = watching_release(procs, lock, err)
        assert release.poll() is None
    finally:
        holder.proc.send_signal(signal.SIGCONT)
    assert release.wait(timeout=30) == 73
    lines = read_text(err).splitlines()
    assert lines[0].startswith("pgfence: watching token 'db-2'")
    assert "not released" in lines[-1]
    assert "heartbeat is moving" in lines[-1]
    assert first_line(lock) == "db-2"
    assert holder.finish() == 0


def test_release_refuses_when_the_lock_changes_while_watched(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    # A dead holder on another machine, with a 2 s heartbeat: release watches it for
    # 3 * 2 + 1 s. The lock changes meanwhile (a holder that was only slow): refused.
    holder_record = holder_elsewhere(interval=2.0)
    write_file(lock, holder_record.encode())
    err = str(tmp_path / "release.err")
    release = watching_release(procs, lock, err)
    newer = holder_record.next_beat(6.0, "2026-01-01T00:00:11Z").encode()
    write_file(lock + ".new", newer)
    os.rename(lock + ".new", lock)
    assert release.wait(timeout=30) == 73
    assert "heartbeat is moving" in read_text(err).splitlines()[-1]
    assert Path(lock).read_bytes() == newer


def test_release_clears_a_silent_holder(lock: str, tmp_path: Path, procs: Registry) -> None:
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"))
    holder.kill()
    done = cli("release", "--lock-file", lock, "--token", "db-1", "--log-format", "json")
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(lock)
    assert done.stdout.startswith(f"released {lock}")
    removed = [e for e in json_events(done.stderr) if e["event"] == "removed"]
    assert len(removed) == 1
    assert removed[0]["forced"] is False
    assert removed[0]["first_line"] == "db-2"


def test_release_refuses_one_line_lock_without_force(lock: str) -> None:
    write_file(lock, b"db-2\n")
    before = path_state(lock)
    done = cli("release", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 73
    assert_one_line_error(done.stderr, "--force", "'db-2'")
    assert path_state(lock) == before


@pytest.mark.parametrize(
    ("content", "described"),
    [
        (b"db-2\n", "token 'db-2'"),
        (b"db-2", "token 'db-2'"),
        (b"\x00\xffgarbage\nline 2\n", "unreadable content"),
        (b"", "unreadable content"),
    ],
)
def test_release_force_removes_anything_and_logs_it(
    lock: str, content: bytes, described: str
) -> None:
    write_file(lock, content)
    done = cli("release", "--force", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(lock)
    assert described in done.stdout
    assert_one_line_error(done.stderr, "removed", lock, described)


def test_release_force_of_a_live_holder_makes_it_fence_itself(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    holder = Holder(procs, lock, "db-2", str(tmp_path / "holder"))
    done = cli("release", "--force", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 0, done.stderr
    # The holder finds its lock gone at its next heartbeat: it kills its command and
    # exits 75 without writing the lock again.
    assert holder.proc.wait(timeout=30) == 75
    assert not alive(holder.child_pid)
    assert not os.path.exists(lock)
    assert "lost the lock" in holder.stderr


@pytest.mark.parametrize("kind", ["directory", "symlink", "missing-dir"])
def test_release_force_refuses_what_is_not_a_lock_file(
    lock: str, tmp_path: Path, kind: str
) -> None:
    target = tmp_path / "target"
    target.write_bytes(b"db-2\n")
    if kind == "directory":
        os.mkdir(lock)
    elif kind == "symlink":
        os.symlink(target, lock)
    else:
        lock = str(tmp_path / "missing" / "fence_lock")
    before = path_state(lock)
    done = cli("release", "--force", "--lock-file", lock, "--token", "db-1")
    assert done.returncode == 74
    assert_one_line_error(done.stderr)
    assert path_state(lock) == before
    assert target.read_bytes() == b"db-2\n"


# -- check -----------------------------------------------------------------------------


def check(lock: str, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return cli("check", "--lock-file", lock, "--token", token, *extra)


def test_check_is_healthy_only_for_our_fresh_lock(
    lock: str, tmp_path: Path, procs: Registry
) -> None:
    assert check(lock, "db-1").returncode == 1  # free
    holder = Holder(procs, lock, "db-1", str(tmp_path / "holder"))
    done = wait_for(
        lambda: (d := check(lock, "db-1")).returncode == 0 and d, "check to say healthy"
    )
    assert done.stdout.startswith("healthy")
    other = check(lock, "db-2")
    assert other.returncode == 1
    assert "not by this token" in other.stdout
    holder.kill()
    wait_for(lambda: check(lock, "db-1").returncode == 1, "check to see a stale heartbeat")
    assert "not fresh" in check(lock, "db-1").stdout


@pytest.mark.parametrize(
    "case", ["one-line-ours", "garbage", "directory", "missing-dir", "bad-option", "bad-token"]
)
def test_check_is_unhealthy_on_anything_else(lock: str, tmp_path: Path, case: str) -> None:
    extra: tuple[str, ...] = ()
    token = "db-1"
    if case == "one-line-ours":
        write_file(lock, b"db-1\n")
    elif case == "garbage":
        write_file(lock, b"garbage\n\x00\n")
    elif case == "directory":
        os.mkdir(lock)
    elif case == "missing-dir":
        lock = str(tmp_path / "missing" / "fence_lock")
    elif case == "bad-option":
        extra = ("--bogus",)
    else:
        token = "two\nlines"
    done = check(lock, token, *extra)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr


# -- the lock must be on the data directory's filesystem ------------------------------------


@pytest.mark.parametrize(
    "where", [("env", "PGDATA"), ("arg", "-D"), ("arg", "-Dglued"), ("arg", "--pgdata=")]
)
def test_lock_on_another_filesystem_is_refused(tmp_path: Path, where: tuple[str, str]) -> None:
    data = str(tmp_path / "data")  # on the test's filesystem, not on the tmpfs
    os.mkdir(data)
    marker = str(tmp_path / "started")
    with tmpfs(str(tmp_path / "vol"), "1m") as vol:
        lock = os.path.join(vol, "fence_lock")
        env = clean_env()
        command = marker_command(marker)
        kind, flag = where
        if kind == "env":
            env["PGDATA"] = data
        elif flag == "-D":
            command += ["-D", data]
        elif flag == "-Dglued":
            command += [f"-D{data}"]
        else:
            command += [f"--pgdata={data}"]
        done = run(lock, "db-1", *command, env=env)
        line = refused_untouched(lock, marker, done, ("absent",), 64)
        assert "another filesystem" in line
        # Where the lock belongs, never the override that would run unfenced.
        assert "FENCE_LOCK_FILE" in line and "--allow-other-filesystem" not in line

        ok = run(lock, "db-1", *command, extra=(*FAST, "--allow-other-filesystem"), env=env)
        assert ok.returncode == 0, ok.stderr
        assert os.path.exists(marker)
        os.unlink(marker)
        ok = run(lock, "db-1", *command, env={**env, "FENCE_ALLOW_OTHER_FILESYSTEM": "1"})
        assert ok.returncode == 0, ok.stderr
        assert os.path.exists(marker)
        assert not os.path.exists(lock)


def test_lock_on_the_data_filesystem_is_accepted(tmp_path: Path) -> None:
    marker = str(tmp_path / "started")
    with tmpfs(str(tmp_path / "vol"), "1m") as vol:
        lock = os.path.join(vol, "fence_lock")
        # PGDATA need not exist yet (before initdb): its nearest existing parent counts.
        env = clean_env(PGDATA=os.path.join(vol, "pgdata", "15"))
        done = run(lock, "db-1", *marker_command(marker), env=env)
        assert done.returncode == 0, done.stderr
        assert os.path.exists(marker)
        os.unlink(marker)
        # No PGDATA and no -D: nothing to compare with.
        done = run(lock, "db-1", *marker_command(marker))
        assert done.returncode == 0, done.stderr
        assert os.path.exists(marker)


# -- the token and the lock file: flag > environment > default -----------------------------


def run_env(lock: str, env: dict[str, str], *extra: str) -> str:
    """Run a command with only `env` configuring pgfence; the token it held the lock as."""
    out = lock + ".seen"
    done = pgfence_run("run", "--lock-file", lock, *FAST, *extra, "--", *copy_lock(out), env=env)
    assert done.returncode == 0, done.stderr
    token = first_line(out)
    assert token is not None
    os.unlink(out)
    return token


def test_token_precedence(lock: str) -> None:
    assert run_env(lock, clean_env(FENCE_VARIABLE="fv", HOSTNAME="hn"), "--token", "flag") == "flag"
    assert run_env(lock, clean_env(FENCE_VARIABLE="fv", HOSTNAME="hn")) == "fv"
    assert run_env(lock, clean_env(HOSTNAME="hn")) == "hn"


def test_token_falls_back_to_the_kernel_hostname(lock: str) -> None:
    out = lock + ".seen"
    script = 'hostname kernel-name && exec "$@"'
    argv = ["unshare", "--uts", "sh", "-c", script, "sh", PGFENCE, "run", "--lock-file", lock]
    done = subprocess.run(
        [*argv, *FAST, "--", *copy_lock(out)],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    assert first_line(out) == "kernel-name"


@pytest.mark.parametrize(
    ("source", "value"),
    [("FENCE_VARIABLE", ""), ("FENCE_VARIABLE", "a\nb"), ("HOSTNAME", ""), ("HOSTNAME", " ")],
)
def test_bad_token_from_the_environment_is_refused(
    lock: str, tmp_path: Path, source: str, value: str
) -> None:
    marker = str(tmp_path / "started")
    env = clean_env(**{source: value})
    done = pgfence_run("run", "--lock-file", lock, "--", *marker_command(marker), env=env)
    line = refused_untouched(lock, marker, done, ("absent",), 64)
    assert source in line


def test_lock_file_override_precedence(tmp_path: Path) -> None:
    env_lock = str(tmp_path / "env_lock")
    flag_lock = str(tmp_path / "flag_lock")
    out = str(tmp_path / "where")
    command = ["sh", "-c", 'echo "$PGFENCE_LOCK" > "$0"', out]
    env = clean_env(FENCE_LOCK_FILE=env_lock, FENCE_VARIABLE="db-1")
    done = pgfence_run("run", "--", *command, env=env)
    assert done.returncode == 0, done.stderr
    assert read_text(out).strip() == env_lock
    done = pgfence_run("run", "--lock-file", flag_lock, "--", *command, env=env)
    assert done.returncode == 0, done.stderr
    assert read_text(out).strip() == flag_lock


def test_lock_file_default(tmp_path: Path) -> None:
    # /var/lib/postgresql is replaced by a tmpfs in a private mount namespace, so the
    # default path can be used without touching the machine's.
    out = str(tmp_path / "seen")
    script = (
        "mount -t tmpfs -o size=1m tmpfs /var/lib/postgresql && "
        'mkdir /var/lib/postgresql/data && exec "$@"'
    )
    os.makedirs("/var/lib/postgresql", exist_ok=True)
    enter = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]
    record = ["sh", "-c", 'cp "$PGFENCE_LOCK" "$0" && echo "$PGFENCE_LOCK" >> "$0"', out]
    done = subprocess.run(
        [*enter, PGFENCE, "run", "--token", "db-1", *FAST, "--", *record],
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = read_text(out).splitlines()
    assert lines[0] == "db-1"
    assert lines[-1] == "/var/lib/postgresql/data/fence_lock"


# -- logs ------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["env", "flag"])
def test_json_log_is_one_object_per_line_with_stable_events(
    lock: str, tmp_path: Path, how: str
) -> None:
    env = clean_env(FENCE_LOG_FORMAT="json") if how == "env" else clean_env()
    extra = (*FAST, "--log-format", "json") if how == "flag" else FAST
    done = run(lock, "db-1", "true", extra=extra, env=env)
    assert done.returncode == 0
    events = json_events(done.stderr)
    assert [e["event"] for e in events] == ["acquired", "started", "released"]
    for event in events:
        assert {"time", "level", "event", "message"} <= event.keys()
        assert event["level"] == "info"
    assert events[0]["token"] == "db-1"
    assert events[0]["lock"] == lock
    assert events[2]["status"] == 0

    write_file(lock, b"db-2\n")
    refused = run(lock, "db-1", "true", extra=extra, env=env)
    assert refused.returncode == 73
    (event,) = json_events(refused.stderr)
    assert (event["event"], event["level"], event["exit_code"]) == ("fenced_out", "error", 73)

    os.unlink(lock)
    os.mkdir(lock)
    broken = run(lock, "db-1", "true", extra=extra, env=env)
    assert broken.returncode == 74
    (event,) = json_events(broken.stderr)
    assert (event["event"], event["exit_code"]) == ("error", 74)
