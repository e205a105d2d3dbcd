"""The supervised command's environment (pgfence.environment): the FENCE_* settings that
name the fence, the PGFENCE_* facts about the fence held, and the nesting they allow.

The expected environments were recorded from the code that wrote them by hand (in cli.py,
the Holds and the run loop) before it was generated from environment.py's tables: the
command gets exactly what it got before, in the same order."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import pgfence_run
from harness.fence import FAST, clean_env
from pgfence import config, environment
from pgfence.backends.base import Hold, fresh_record
from pgfence.backends.etcd.hold import EtcdHold, FenceKey
from pgfence.backends.file.backend import FileHold
from pgfence.backends.file.lockfile import LockFile
from pgfence.config import EtcdSettings, Settings, resolve
from pgfence.timings import Timings

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parent.parent
ETCD_ENV = {
    "FENCE_ETCD_ENDPOINTS": "https://10.0.0.1:2379,https://10.0.0.2:2379",
    "FENCE_ETCD_KEY": "/pgfence/db-a",
    "FENCE_ETCD_USER": "pgfence",
    "FENCE_ETCD_PASSWORD_FILE": "/run/secrets/etcd_password",
    "FENCE_ETCD_CA_FILE": "/etc/etcd/ca.pem",
    "FENCE_ETCD_CERT_FILE": "/etc/etcd/client.pem",
    "FENCE_ETCD_KEY_FILE": "/etc/etcd/client-key.pem",
    "FENCE_ETCD_ALLOW_INSECURE": "yes",
    "FENCE_ETCD_ELECTION_TIMEOUT": "250",
}
ETCD_FLAGS: dict[str, str | bool] = {
    "backend": "etcd",
    "etcd_endpoints": "https://e:2379",
    "etcd_key": "/pg/a",
    "etcd_user": "u",
    "etcd_password_file": "/p",
    "etcd_ca_file": "/ca",
    "etcd_cert_file": "/cert",
    "etcd_key_file": "/key",
    "etcd_allow_insecure": True,
    "etcd_election_timeout": "500",
}
ETCD_CHILD = [
    ("FENCE_ETCD_USER", "pgfence"),
    ("FENCE_ETCD_PASSWORD_FILE", "/run/secrets/etcd_password"),
    ("FENCE_ETCD_CA_FILE", "/etc/etcd/ca.pem"),
    ("FENCE_ETCD_CERT_FILE", "/etc/etcd/client.pem"),
    ("FENCE_ETCD_KEY_FILE", "/etc/etcd/client-key.pem"),
    ("FENCE_ETCD_ALLOW_INSECURE", "1"),
]
TOKEN, FILE, ETCD = ("FENCE_VARIABLE", "db-1"), ("FENCE_BACKEND", "file"), ("FENCE_BACKEND", "etcd")
DEFAULT_LOCK = ("FENCE_LOCK_FILE", "/var/lib/postgresql/data/fence_lock")
LOOPBACK = ("FENCE_ETCD_ENDPOINTS", "http://127.0.0.1:2379")

# name: (flags, environment, what the command gets)
MATRIX: dict[str, tuple[dict[str, str | bool], dict[str, str], list[tuple[str, str]]]] = {
    "file defaults": ({}, {"HOSTNAME": "db-1"}, [TOKEN, FILE, DEFAULT_LOCK]),
    "file 18 default": (
        {},
        {"HOSTNAME": "db-1", "PG_MAJOR": "18"},
        [TOKEN, FILE, ("FENCE_LOCK_FILE", "/var/lib/postgresql/fence_lock")],
    ),
    "file flags": (
        {"lock_file": "/vol/fence_lock", "token": "flag-token"},
        {"HOSTNAME": "db-1"},
        [("FENCE_VARIABLE", "flag-token"), FILE, ("FENCE_LOCK_FILE", "/vol/fence_lock")],
    ),
    "file environment": (
        {},
        {"FENCE_LOCK_FILE": "/vol//x/../fence_lock", "FENCE_VARIABLE": "env-token"},
        [("FENCE_VARIABLE", "env-token"), FILE, ("FENCE_LOCK_FILE", "/vol/fence_lock")],
    ),
    "file flags over environment": (
        {"lock_file": "/flag/lock", "token": "flag"},
        {"FENCE_LOCK_FILE": "/env/lock", "FENCE_VARIABLE": "env", "FENCE_BACKEND": "file"},
        [("FENCE_VARIABLE", "flag"), FILE, ("FENCE_LOCK_FILE", "/flag/lock")],
    ),
    "file ignores etcd settings": (
        {},
        {"HOSTNAME": "db-1", **ETCD_ENV},
        [TOKEN, FILE, DEFAULT_LOCK],
    ),
    "file lease mode": (
        {"mode": "lease", "ttl": "6"},
        {"HOSTNAME": "db-1", "FENCE_LOCK_FILE": "/vol/lock"},
        [TOKEN, FILE, ("FENCE_LOCK_FILE", "/vol/lock")],
    ),
    "etcd minimal": (
        {"backend": "etcd", "etcd_endpoints": "http://127.0.0.1:2379", "etcd_key": "/k"},
        {"HOSTNAME": "db-1"},
        [TOKEN, ETCD, LOOPBACK, ("FENCE_ETCD_KEY", "/k")],
    ),
    "etcd everything from the environment": (
        {},
        {"HOSTNAME": "db-1", "FENCE_BACKEND": "etcd", **ETCD_ENV},
        [
            TOKEN,
            ETCD,
            ("FENCE_ETCD_ENDPOINTS", "https://10.0.0.1:2379,https://10.0.0.2:2379"),
            ("FENCE_ETCD_KEY", "/pgfence/db-a"),
            *ETCD_CHILD,
        ],
    ),
    "etcd everything from flags": (
        {**ETCD_FLAGS, "token": "t"},
        {"HOSTNAME": "db-1", "FENCE_LOCK_FILE": "/ignored/lock"},
        [
            ("FENCE_VARIABLE", "t"),
            ETCD,
            ("FENCE_ETCD_ENDPOINTS", "https://e:2379"),
            ("FENCE_ETCD_KEY", "/pg/a"),
            ("FENCE_ETCD_USER", "u"),
            ("FENCE_ETCD_PASSWORD_FILE", "/p"),
            ("FENCE_ETCD_CA_FILE", "/ca"),
            ("FENCE_ETCD_CERT_FILE", "/cert"),
            ("FENCE_ETCD_KEY_FILE", "/key"),
            ("FENCE_ETCD_ALLOW_INSECURE", "1"),
        ],
    ),
    "etcd optional settings empty": (
        {},
        {
            "HOSTNAME": "db-1",
            "FENCE_BACKEND": "etcd",
            "FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:2379",
            "FENCE_ETCD_KEY": "/k",
            **{name: "" for name, _ in ETCD_CHILD},
            "FENCE_ETCD_ALLOW_INSECURE": "0",
        },
        [TOKEN, ETCD, LOOPBACK, ("FENCE_ETCD_KEY", "/k")],
    ),
    "etcd flags over environment": (
        {"etcd_key": "/flag", "etcd_endpoints": "http://[::1]:2379", "token": "flag"},
        {"HOSTNAME": "db-1", "FENCE_BACKEND": "etcd", **ETCD_ENV},
        [
            ("FENCE_VARIABLE", "flag"),
            ETCD,
            ("FENCE_ETCD_ENDPOINTS", "http://[::1]:2379"),
            ("FENCE_ETCD_KEY", "/flag"),
            *ETCD_CHILD,
        ],
    ),
    "etcd without endpoints or key": ({"backend": "etcd"}, {"HOSTNAME": "db-1"}, [TOKEN, ETCD]),
}


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_the_command_gets_the_settings_it_got_before(case: str) -> None:
    flags, env, expected = MATRIX[case]
    assert list(environment.fence_environment(resolve("run", flags, env)).items()) == expected


@pytest.mark.parametrize("case", sorted(MATRIX))
def test_a_pgfence_inside_the_command_names_the_same_fence(case: str) -> None:
    """Settings -> the command's environment -> config.resolve from that environment only
    (flags become variables): the same backend, token, lock file and etcd settings. The
    election timeout, a property of the cluster, is inherited as it was found."""
    flags, env, _ = MATRIX[case]
    ours = resolve("run", flags, env)
    inner = resolve("run", {}, {**env, **environment.fence_environment(ours)})
    assert (inner.backend, inner.token) == (ours.backend, ours.token)
    if ours.backend == "file":
        assert inner.lock_file == ours.lock_file
    else:
        inherited = resolve("run", {}, env).etcd.election_timeout
        assert inner.etcd == ours.etcd.replace(election_timeout=inherited)


def test_flags_alone_reach_a_pgfence_inside_the_command() -> None:
    """The strongest round trip: nothing in the environment, every etcd setting a flag."""
    ours = resolve("run", {**ETCD_FLAGS, "token": "t"}, {})
    inner = resolve("run", {}, environment.fence_environment(ours))
    assert inner.etcd == ours.etcd.replace(election_timeout=1.0)  # etcd's default
    assert (inner.backend, inner.token) == ("etcd", "t")


def test_every_variable_naming_the_fence_is_read_by_config() -> None:
    options = {o.dest: o for o in config.COMMAND_OPTIONS["run"]}
    for variable in environment.FENCE:
        assert options[variable.dest].env == variable.name
    etcd_fields = {v.field.partition(".")[2] for v in environment.ETCD_SETTINGS}
    assert etcd_fields == set(EtcdSettings._fields)
    settings_fields = {v.field.partition(".")[0] for v in environment.FENCE}
    assert settings_fields <= set(Settings._fields)


def test_only_the_election_timeout_stays_with_the_parent() -> None:
    kept = [v.name for v in environment.FENCE if not v.child]
    assert kept == ["FENCE_ETCD_ELECTION_TIMEOUT"]


# -- what the command learns about the fence held ---------------------------------------

TIMINGS = Timings.lease(30.0, 7.5)
RECORD = fresh_record("db-1", "0123456789abcdef", TIMINGS, 7, 100.0)


def file_hold() -> FileHold:
    return FileHold(LockFile("/vol/fence_lock", RECORD.instance), RECORD)


def etcd_hold() -> EtcdHold:
    fence = FenceKey(None, "/pgfence/db-\udcff", TIMINGS)  # type: ignore[arg-type]
    return EtcdHold(fence, RECORD.replace(generation=42), b"", 0x694D7C2A1B, 30, 100.0)


def test_a_file_hold_gives_its_lock_file_and_the_common_facts() -> None:
    assert list(environment.held_environment(file_hold(), "/vol/fence_lock").items()) == [
        ("PGFENCE_LOCK_FILE", "/vol/fence_lock"),
        ("PGFENCE_GENERATION", "7"),
        ("PGFENCE_INSTANCE", "0123456789abcdef"),
        ("PGFENCE_LOCK", "/vol/fence_lock"),
    ]


def test_an_etcd_hold_gives_its_key_and_lease_in_hex() -> None:
    held = environment.held_environment(etcd_hold(), "etcd:/pgfence/db-a")
    assert list(held.items()) == [
        ("PGFENCE_ETCD_KEY", "/pgfence/db-\udcff"),  # a key that is not UTF-8 survives
        ("PGFENCE_ETCD_LEASE", "694d7c2a1b"),  # as etcdctl prints and reads it
        ("PGFENCE_GENERATION", "42"),
        ("PGFENCE_INSTANCE", "0123456789abcdef"),
        ("PGFENCE_LOCK", "etcd:/pgfence/db-a"),
    ]


@pytest.mark.parametrize(("backend", "hold"), [("file", file_hold), ("etcd", etcd_hold)])
def test_each_hold_gives_exactly_the_values_the_table_names(
    backend: str, hold: Callable[[], Hold]
) -> None:
    made = hold()
    named = {v.value for v in environment.HELD if backend in v.backends}
    assert set(made.child_values()) == named - set(environment.COMMON_VALUES)


def test_the_sh_shim_sets_what_a_file_hold_sets() -> None:
    """The POSIX sh shim has no Python: its exports are checked against the table."""
    text = (ROOT / "src" / "pgfence" / "shim.sh").read_text()
    exported = set(re.findall(r"export ((?:[A-Z_]+=\S+ ?)+)", text))
    names = {part.split("=")[0] for line in exported for part in line.split()}
    assert names == {v.name for v in environment.HELD if "file" in v.backends}


def test_a_real_run_gives_its_command_the_whole_contract(tmp_path: Path) -> None:
    lock, out = str(tmp_path / "fence_lock"), str(tmp_path / "env.json")
    dump = "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1], 'w'))"
    done = pgfence_run(
        *("run", "--lock-file", lock, "--token", "db-1", *FAST),
        *("--", sys.executable, "-c", dump, out),
        env=clean_env(),
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(Path(out).read_text())
    contract = {k: v for k, v in seen.items() if k.startswith(("FENCE_", "PGFENCE_"))}
    instance = contract.get("PGFENCE_INSTANCE", "")
    assert contract == {
        "FENCE_VARIABLE": "db-1",
        "FENCE_BACKEND": "file",
        "FENCE_LOCK_FILE": lock,
        "PGFENCE_LOCK_FILE": lock,
        "PGFENCE_GENERATION": "1",
        "PGFENCE_INSTANCE": instance,
        "PGFENCE_LOCK": lock,
    }
    assert re.fullmatch(r"[0-9a-f]{16}", instance)
    assert not os.path.exists(lock)  # released after the command


# -- nesting -----------------------------------------------------------------------------


class Fence:
    """A backend stand-in: where it lives, and which instance holds it."""

    def __init__(self, location: str, holder: str | None) -> None:
        self._location, self._holder = location, holder
        self.asked: list[str] = []

    def location(self) -> str:
        return self._location

    def held_by_instance(self, instance: str) -> bool:
        self.asked.append(instance)
        return instance == self._holder


@pytest.mark.parametrize(
    ("env", "holder", "expected", "asked"),
    [
        ({"PGFENCE_INSTANCE": "a1", "PGFENCE_LOCK": "/vol/lock"}, "a1", "a1", ["a1"]),
        ({"PGFENCE_INSTANCE": "a1", "PGFENCE_LOCK": "/vol/lock"}, "b2", None, ["a1"]),
        ({"PGFENCE_INSTANCE": "a1", "PGFENCE_LOCK": "/other"}, "a1", None, []),
        ({"PGFENCE_INSTANCE": "a1"}, "a1", None, []),
        ({"PGFENCE_INSTANCE": "", "PGFENCE_LOCK": "/vol/lock"}, "", None, []),
        ({"PGFENCE_LOCK": "/vol/lock"}, "a1", None, []),
    ],
)
def test_a_supervisor_is_recognised_by_its_instance_holding_this_fence(
    env: dict[str, str], holder: str | None, expected: str | None, asked: list[str]
) -> None:
    fence = Fence("/vol/lock", holder)
    assert environment.supervising_instance(fence, env) == expected  # type: ignore[arg-type]
    assert fence.asked == asked  # the fence is asked only about the lock it is


def test_a_pgfence_inside_the_command_runs_under_its_supervisor(tmp_path: Path) -> None:
    """Configured by flags, the outer pgfence; by the environment only, the inner one,
    which finds its supervisor's fence and runs its command directly (no second lock)."""
    lock, out = str(tmp_path / "fence_lock"), str(tmp_path / "inner")
    inner = f"{sys.executable} -m pgfence run -- sh -c 'echo $PGFENCE_GENERATION > {out}'"
    done = pgfence_run(
        "run",
        *("--lock-file", lock, "--token", "db-1", *FAST),
        *("--", "sh", "-c", inner),
        env=clean_env(HOSTNAME="another-token"),
    )
    assert done.returncode == 0, done.stderr
    assert Path(out).read_text() == "1\n"
    assert "held by the pgfence supervising this process" in done.stderr
