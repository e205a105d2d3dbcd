"""The etcd backend's security options and bad input, against real etcd.

A one-member cluster with TLS (a CA, server and client certificates made here with the
openssl command), client-certificate authentication and etcd's user/password auth; and a
plain loopback member for content pgfence did not write. Every refusal must be one line
with its documented exit code, and the command must never have started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from conftest import PGFENCE, needs_etcd, pgfence_run
from harness import etcd as h
from harness.procs import Registry

pytestmark = [pytest.mark.integration, needs_etcd]
TTL = 3.0
USER = "fence"
PASSWORD = "s3cret-" + uuid.uuid4().hex  # must never show up in argv, env or messages


class Secure:
    def __init__(self, cluster: h.EtcdCluster, tls: h.Tls, password_file: str) -> None:
        self.cluster, self.tls, self.password_file = cluster, tls, password_file

    def env(self, key: str, token: str = "A", **changes: str | None) -> dict[str, str]:
        env = h.fence_env(
            self.cluster.endpoints(),
            key,
            token,
            TTL,
            FENCE_ETCD_CA_FILE=self.tls.ca,
            FENCE_ETCD_CERT_FILE=self.tls.client_cert,
            FENCE_ETCD_KEY_FILE=self.tls.client_key,
            FENCE_ETCD_USER=USER,
            FENCE_ETCD_PASSWORD_FILE=self.password_file,
        )
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secure]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command (Debian openssl) to make the test CA")
    directory = str(tmp_path_factory.mktemp("etcd-tls"))
    tls = h.make_tls(os.path.join(directory, "tls"))
    password_file = os.path.join(directory, "password")
    with open(os.open(password_file, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(PASSWORD + "\n")
    cluster = h.EtcdCluster(os.path.join(directory, "etcd"), size=1, tls=tls)
    os.makedirs(cluster.directory)
    try:
        cluster.start()
        cluster.enable_auth(USER, PASSWORD, "/pgfence/")
        yield Secure(cluster, tls, password_file)
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[h.EtcdCluster]:
    cluster = h.EtcdCluster(str(tmp_path_factory.mktemp("etcd1")), size=1)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def refused(env: dict[str, str], log: str) -> subprocess.CompletedProcess[str]:
    """`pgfence run` of a logging child that must not start."""
    result = pgfence_run("run", "--", *h.child_argv(log, "child"), env=env, timeout=60)
    assert h.events(log) == [], "the command was started"
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result


@pytest.mark.timeout(120)
def test_tls_client_certificate_and_password_auth(
    secure: Secure, procs: Registry, tmp_path: object
) -> None:
    log = os.path.join(str(tmp_path), "children.log")
    key = f"/pgfence/{uuid.uuid4().hex[:8]}"
    err_path = os.path.join(str(tmp_path), "A.stderr")
    with open(err_path, "wb") as err:
        holder = procs.start(
            [PGFENCE, "run", "--", *h.child_argv(log, "A")],
            env=secure.env(key),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    a = h.started(log, "A", timeout=30)
    for part in ("cmdline", "environ"):
        with open(f"/proc/{holder.pid}/{part}", "rb") as f:
            assert PASSWORD.encode() not in f.read()

    status = pgfence_run("status", "--json", env=secure.env(key, token="B"))
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["holder"]["token"] == "A" and state["holder"]["generation"] == a.generation
    stored = secure.cluster.etcdctl("get", key, "--print-value-only").stdout
    assert stored.splitlines()[0] == "A"

    holder.send_signal(signal.SIGTERM)
    assert holder.wait(timeout=30) == 0
    assert secure.cluster.etcdctl("get", key, "--print-value-only").stdout == ""
    with open(err_path) as f:
        assert PASSWORD not in f.read()


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("case", "changes", "code", "words"),
    [
        ("wrong password", {"FENCE_ETCD_PASSWORD_FILE": "WRONG"}, 64, "refused user"),
        ("no user", {"FENCE_ETCD_USER": None, "FENCE_ETCD_PASSWORD_FILE": None}, 64, "etcd"),
        ("system CAs only", {"FENCE_ETCD_CA_FILE": None}, 74, "TLS certificate not trusted"),
        ("no client cert", {"FENCE_ETCD_CERT_FILE": None, "FENCE_ETCD_KEY_FILE": None}, 74, "TLS"),
        ("client cert with CN", {"FENCE_ETCD_CERT_FILE": "CN"}, 64, "without CN"),
        ("key outside role", {"FENCE_ETCD_KEY": "/elsewhere/db"}, 64, "permission denied"),
        ("missing password file", {"FENCE_ETCD_PASSWORD_FILE": "/nonexistent"}, 64, "password"),
        ("user, no password file", {"FENCE_ETCD_PASSWORD_FILE": None}, 64, "password file"),
    ],
)
def test_bad_credentials_and_tls_are_refused(
    secure: Secure,
    tmp_path: object,
    case: str,
    changes: dict[str, str | None],
    code: int,
    words: str,
) -> None:
    if changes.get("FENCE_ETCD_PASSWORD_FILE") == "WRONG":
        wrong = os.path.join(str(tmp_path), "wrong")
        with open(wrong, "w") as f:
            f.write("not-the-password\n")
        changes = {**changes, "FENCE_ETCD_PASSWORD_FILE": wrong}
    if changes.get("FENCE_ETCD_CERT_FILE") == "CN":
        changes = {
            "FENCE_ETCD_CERT_FILE": secure.tls.cn_client_cert,
            "FENCE_ETCD_KEY_FILE": secure.tls.cn_client_key,
        }
    env = secure.env(f"/pgfence/{uuid.uuid4().hex[:8]}", **changes)
    result = refused(env, os.path.join(str(tmp_path), "children.log"))
    assert result.returncode == code, result.stderr
    assert words in result.stderr
    assert PASSWORD not in result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("case", "changes", "code", "words"),
    [
        ("no endpoints", {"FENCE_ETCD_ENDPOINTS": ""}, 64, "needs endpoints"),
        ("no scheme", {"FENCE_ETCD_ENDPOINTS": "etcd1:2379"}, 64, "must be http"),
        ("bad port", {"FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:99999"}, 64, "not a URL"),
        ("remote http", {"FENCE_ETCD_ENDPOINTS": "http://192.0.2.10:2379"}, 64, "allow-insecure"),
        ("unreachable", {"FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:{closed}"}, 74, "refused"),
        ("not etcd", {"FENCE_ETCD_ENDPOINTS": "http://127.0.0.1:{peer}"}, 74, "etcd"),
        ("strict mode", {"FENCE_MODE": "strict"}, 64, "lease mode"),
        ("no key", {"FENCE_ETCD_KEY": ""}, 64, "FENCE_ETCD_KEY"),
        ("tls files, http", {"FENCE_ETCD_CA_FILE": "/etc/hostname"}, 64, "https"),
    ],
)
def test_bad_configuration_is_refused(
    plain: h.EtcdCluster,
    tmp_path: object,
    case: str,
    changes: dict[str, str],
    code: int,
    words: str,
) -> None:
    env = h.fence_env(plain.endpoints(), f"/pgfence/{uuid.uuid4().hex[:8]}", "A", TTL)
    ports = {"closed": h.free_port(), "peer": plain.members[0].peer_port}
    env.update({k: v.format(**ports) for k, v in changes.items()})
    result = refused(env, os.path.join(str(tmp_path), "children.log"))
    assert result.returncode == code, result.stderr
    assert words in result.stderr, result.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("content", ["hello", "db-1\nnot a pgfence record", ""])
def test_foreign_key_content_is_refused_and_only_forced_release_clears_it(
    plain: h.EtcdCluster, tmp_path: object, content: str
) -> None:
    key = f"/pgfence/{uuid.uuid4().hex[:8]}"
    plain.etcdctl("put", key, "--", content)
    env = h.fence_env(plain.endpoints(), key, "A", TTL)
    result = refused(env, os.path.join(str(tmp_path), "children.log"))
    assert result.returncode == 65, result.stderr
    assert f"etcd key {key}" in result.stderr
    assert pgfence_run("status", env=env).returncode == 65
    assert pgfence_run("release", env=env).returncode == 65
    assert plain.etcdctl("get", key, "--print-value-only").stdout.rstrip("\n") == content
    forced = pgfence_run("release", "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert plain.etcdctl("get", key, "--print-value-only").stdout == ""
