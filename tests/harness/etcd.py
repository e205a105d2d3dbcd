"""Real etcd for the etcd backend's tests: clusters on loopback ports, network namespaces
for partitions, a test CA for TLS, and a child that logs when it starts.

Every process is started through a `Registry` and stopped by pid; network namespaces
and veth pairs are deleted by name at teardown.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import ssl
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.pg import free_port
from harness.procs import Registry, alive
from harness.waiting import wait_for
from harness.writer import boottime

ETCD = os.environ.get("PGFENCE_TEST_ETCD", "/usr/bin/etcd")
ETCDCTL = os.environ.get("PGFENCE_TEST_ETCDCTL", "/usr/bin/etcdctl")
# The test clusters elect faster than etcd's default (1000 ms), so that pgfence accepts
# the short TTLs that keep these tests quick; pgfence is told (FENCE_ETCD_ELECTION_TIMEOUT).
HEARTBEAT_MS = 50
ELECTION_MS = int(os.environ.get("PGFENCE_TEST_ELECTION_MS", "250"))


def available() -> bool:
    return os.access(ETCD, os.X_OK) and os.access(ETCDCTL, os.X_OK)


# -- TLS -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    cn_client_cert: str  # a client certificate with a Common Name, which the gateway refuses
    cn_client_key: str


def make_tls(directory: str) -> Tls:
    """A self-signed CA, a server certificate for 127.0.0.1 and a client certificate,
    made with the openssl command."""
    os.makedirs(directory, exist_ok=True)

    def path(name: str) -> str:
        return os.path.join(directory, name)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl(
        "req", "-x509", *ec, "-keyout", path("ca.key"), "-out", path("ca.crt"), "-days", "2",
        "-subj", "/CN=pgfence test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    # No Common Name in the client's: with client-certificate auth and user auth both on,
    # etcd's JSON gateway refuses (HTTP 400) every certificate that carries one.
    subjects = {
        "server": "/CN=pgfence-test-server",
        "client": "/O=pgfence test client",
        "cn-client": "/CN=pgfence-test-client",
    }
    usages = {"server": "serverAuth,clientAuth", "client": "clientAuth", "cn-client": "clientAuth"}
    for name, usage in usages.items():
        ext = path(f"{name}.ext")
        with open(ext, "w") as f:
            f.write(
                "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                f"extendedKeyUsage={usage}\n"
                "basicConstraints=CA:FALSE\n"
                "subjectKeyIdentifier=hash\n"
                "authorityKeyIdentifier=keyid,issuer\n"
            )
        openssl(
            "req", *ec, "-keyout", path(f"{name}.key"), "-out", path(f"{name}.csr"),
            "-subj", subjects[name],
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", path(f"{name}.csr"), "-CA", path("ca.crt"),
            "-CAkey", path("ca.key"), "-CAcreateserial", "-out", path(f"{name}.crt"),
            "-days", "2", "-extfile", ext,
        )  # fmt: skip
    return Tls(
        *(path(f) for f in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key")),
        path("cn-client.crt"),
        path("cn-client.key"),
    )


def issue_client_cert(tls: Tls, directory: str, name: str) -> tuple[str, str]:
    """Another client certificate (without CN) from `tls`'s CA: (cert, key)."""
    os.makedirs(directory, exist_ok=True)
    ca_dir = os.path.dirname(tls.ca)
    cert, key = os.path.join(directory, f"{name}.crt"), os.path.join(directory, f"{name}.key")
    ext = os.path.join(ca_dir, "client.ext")
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", cert + ".csr", "-subj", f"/O=pgfence test {name}")  # fmt: skip
    run("x509", "-req", "-in", cert + ".csr", "-CA", tls.ca, "-CAkey",
        os.path.join(ca_dir, "ca.key"), "-CAcreateserial", "-out", cert, "-days", "2",
        "-extfile", ext)  # fmt: skip
    return cert, key


def revocation_list(tls: Tls, revoked: Sequence[str], directory: str) -> str:
    """A CRL from `tls`'s CA that revokes the certificates in `revoked`."""
    os.makedirs(directory, exist_ok=True)
    ca_dir = os.path.dirname(tls.ca)
    config = os.path.join(directory, "ca.cnf")
    with open(config, "w") as f:
        f.write(
            "[ca]\ndefault_ca = fence\n[fence]\n"
            f"database = {directory}/index.txt\ncrlnumber = {directory}/crlnumber\n"
            "default_md = sha256\ndefault_crl_days = 2\n"
        )
    open(os.path.join(directory, "index.txt"), "w").close()
    with open(os.path.join(directory, "crlnumber"), "w") as f:
        f.write("01\n")
    ca = ["-config", config, "-cert", tls.ca, "-keyfile", os.path.join(ca_dir, "ca.key")]
    for cert in revoked:
        subprocess.run(["openssl", "ca", *ca, "-revoke", cert], check=True, capture_output=True,
                       timeout=60)  # fmt: skip
    crl = os.path.join(directory, "crl.pem")
    subprocess.run(["openssl", "ca", *ca, "-gencrl", "-out", crl], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    return crl


# -- network namespaces --------------------------------------------------------------------


class Netns:
    """A network namespace joined to the host by a veth pair (host side HOST_IP, inside
    NS_IP). `cut()` sets the host side down: packets from inside are silently lost, as in
    a partition, while the host side's address keeps working for processes outside."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"pgfence-etcd-{tag}"
        self.host_if, self.ns_if = f"pgfe{tag}h", f"pgfe{tag}n"
        net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
        self.host_ip, self.ns_ip = f"{net}.1", f"{net}.2"
        ip = ["ip"]
        inside = ["ip", "netns", "exec", self.name, "ip"]
        for argv in (
            [*ip, "netns", "add", self.name],
            [*ip, "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if],
            [*ip, "link", "set", self.ns_if, "netns", self.name],
            [*ip, "addr", "add", f"{self.host_ip}/24", "dev", self.host_if],
            [*ip, "link", "set", self.host_if, "up"],
            [*inside, "addr", "add", f"{self.ns_ip}/24", "dev", self.ns_if],
            [*inside, "link", "set", self.ns_if, "up"],
            [*inside, "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)

    def prefix(self) -> list[str]:
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        subprocess.run(["ip", "link", "set", self.host_if, "down"], check=True, timeout=30)

    def heal(self) -> None:
        subprocess.run(["ip", "link", "set", self.host_if, "up"], check=True, timeout=30)

    def delete(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=30)


# -- clusters ------------------------------------------------------------------------------


@dataclass
class Member:
    name: str
    ip: str  # advertised client and peer address
    netns: Netns | None
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def peer_url(self) -> str:
        return f"http://{self.ip}:{self.peer_port}"


class EtcdCluster:
    """`size` members in `directory`; member i runs inside `netns_of.get(i)` if given."""

    def __init__(
        self,
        directory: str,
        size: int = 3,
        tls: Tls | None = None,
        netns_of: dict[int, Netns] | None = None,
        host_ip: str = "127.0.0.1",
        extra: Sequence[str] = (),
    ) -> None:
        self.extra = list(extra)  # more etcd flags for every member
        self.client_ca: str | None = None  # CA that members trust for client certificates
        self.registry = Registry()
        self.directory = directory
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self.root_password: str | None = None
        netns_of = netns_of or {}
        self.members = [
            Member(
                f"m{i}",
                netns_of[i].ns_ip if i in netns_of else host_ip,
                netns_of.get(i),
            )
            for i in range(size)
        ]
        self._token = f"pgfence-test-{uuid.uuid4().hex[:8]}"

    def client_url(self, i: int, ip: str | None = None) -> str:
        member = self.members[i]
        return f"{self.scheme}://{ip or member.ip}:{member.client_port}"

    def endpoints(self, members: Sequence[int] | None = None) -> str:
        """Comma-separated client URLs as seen from the host's network namespace."""
        chosen = range(len(self.members)) if members is None else members
        return ",".join(self.local_url(i) for i in chosen)

    def local_url(self, i: int) -> str:
        member = self.members[i]
        return self.client_url(i, member.ip if member.netns else "127.0.0.1")

    def start(self, timeout: float = 60.0) -> EtcdCluster:
        for i in range(len(self.members)):
            self.start_member(i, wait=False)
        self.wait_healthy(timeout=timeout)
        return self

    def start_member(self, i: int, wait: bool = True) -> None:
        member = self.members[i]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        listen = [member.ip]
        if member.netns is None and member.ip != "127.0.0.1":
            listen.append("127.0.0.1")
        client_urls = ",".join(f"{self.scheme}://{ip}:{member.client_port}" for ip in listen)
        argv = [
            ETCD,
            "--name", member.name,
            "--data-dir", os.path.join(self.directory, member.name),
            "--listen-client-urls", client_urls,
            "--advertise-client-urls", self.client_url(i),
            "--listen-peer-urls", member.peer_url,
            "--initial-advertise-peer-urls", member.peer_url,
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self._token,
            "--heartbeat-interval", str(HEARTBEAT_MS),
            "--election-timeout", str(ELECTION_MS),
            "--logger", "zap",
            "--log-level", "warn",
            "--log-outputs", "stderr",
        ]  # fmt: skip
        if self.tls:
            argv += [
                "--cert-file", self.tls.server_cert,
                "--key-file", self.tls.server_key,
                "--trusted-ca-file", self.client_ca or self.tls.ca,
                "--client-cert-auth",
            ]  # fmt: skip
        argv += self.extra
        if member.netns:
            argv = [*member.netns.prefix(), *argv]
        log = open(os.path.join(self.directory, f"{member.name}.log"), "ab")  # noqa: SIM115
        member.proc = self.registry.start(argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_healthy([i])

    def stop_member(self, i: int, sig: int = signal.SIGKILL) -> None:
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def signal_member(self, i: int, sig: int) -> None:
        proc = self.members[i].proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)

    def healthy(self, i: int) -> bool:
        try:
            answer = self._get(self.local_url(i) + "/health", timeout=2.0)
        except (OSError, ValueError):
            return False
        return str(answer.get("health")) == "true"

    def wait_healthy(self, members: Sequence[int] | None = None, timeout: float = 60.0) -> None:
        chosen = range(len(self.members)) if members is None else members
        deadline = time.monotonic() + timeout
        for i in chosen:
            while not self.healthy(i):
                proc = self.members[i].proc
                if proc is None or proc.poll() is not None:
                    raise AssertionError(f"etcd {self.members[i].name} exited: {self.log(i)}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"etcd {self.members[i].name} not healthy: {self.log(i)}")
                time.sleep(0.1)

    def log(self, i: int) -> str:
        try:
            with open(os.path.join(self.directory, f"{self.members[i].name}.log")) as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def _get(self, url: str, timeout: float) -> dict[str, object]:
        context = None
        if self.tls:
            context = ssl.create_default_context(cafile=self.tls.ca)
            context.load_cert_chain(self.tls.client_cert, self.tls.client_key)
        with urllib.request.urlopen(url, timeout=timeout, context=context) as response:
            answer = json.loads(response.read())
        assert isinstance(answer, dict)
        return answer

    def etcdctl(
        self,
        *args: str,
        members: Sequence[int] | None = None,
        check: bool = True,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = [ETCDCTL, "--endpoints", self.endpoints(members), "--command-timeout", "10s"]
        if self.tls:
            tls = self.tls
            argv += ["--cacert", tls.ca, "--cert", tls.client_cert, "--key", tls.client_key]
        if self.root_password:
            argv += ["--user", f"root:{self.root_password}"]
        result = subprocess.run(
            [*argv, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "ETCDCTL_API": "3"},
        )
        if check and result.returncode != 0:
            raise AssertionError(f"etcdctl {' '.join(args)} failed: {result.stderr}")
        return result

    def enable_auth(self, user: str, password: str, prefix: str) -> None:
        """Users root and `user` (role with readwrite on `prefix`), then auth enable."""
        root = uuid.uuid4().hex
        self.etcdctl("user", "add", "root", "--new-user-password", root, "--interactive=false")
        self.etcdctl("role", "add", "pgfence")
        self.etcdctl("role", "grant-permission", "pgfence", "readwrite", "--prefix=true", prefix)
        self.etcdctl("user", "add", user, "--new-user-password", password, "--interactive=false")
        self.etcdctl("user", "grant-role", user, "pgfence")
        self.etcdctl("user", "grant-role", "root", "root")
        self.etcdctl("auth", "enable")
        self.root_password = root

    def restore(self, snapshot: str) -> None:
        """Stop every member and restore all from `snapshot` (etcdctl snapshot restore),
        as after losing the cluster: the revision goes back to the snapshot's."""
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        for i, member in enumerate(self.members):
            self.stop_member(i)
            data = os.path.join(self.directory, member.name)
            shutil.rmtree(data)
            subprocess.run(
                [ETCDCTL, "snapshot", "restore", snapshot, "--data-dir", data,
                 "--name", member.name, "--initial-cluster", initial,
                 "--initial-cluster-token", self._token,
                 "--initial-advertise-peer-urls", member.peer_url],
                check=True, capture_output=True, timeout=60, env={**os.environ, "ETCDCTL_API": "3"},
            )  # fmt: skip
        for i in range(len(self.members)):
            self.start_member(i, wait=False)
        self.wait_healthy()

    def stop(self) -> None:
        self.registry.cleanup()


# -- supervised children that log their life on one clock ---------------------------------

CHILD = r"""
import os, signal, sys, time
log, name, mode = sys.argv[1], sys.argv[2], sys.argv[3]
def note(event):
    line = "%s %.6f %d %s %s %s\n" % (
        event, time.clock_gettime(time.CLOCK_BOOTTIME), os.getpid(), name,
        os.environ.get("PGFENCE_GENERATION", "-"), os.environ.get("PGFENCE_ETCD_LEASE", "-"))
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, line.encode())
    os.close(fd)
signal.signal(signal.SIGTERM, lambda *_: (note("stop"), os._exit(0)))
note("start")
if mode.startswith("run:"):
    time.sleep(float(mode[4:]))
    note("stop")
    sys.exit(0)
while True:
    time.sleep(3600)
"""


@dataclass(frozen=True)
class Event:
    kind: str  # "start" or "stop"
    time: float  # CLOCK_BOOTTIME
    pid: int
    name: str
    generation: int
    lease: str


def child_argv(log: str, name: str, mode: str = "hold") -> list[str]:
    """A child that appends "start"/"stop" lines to `log`; mode "hold" or "run:SECONDS"."""
    import sys

    return [sys.executable, "-c", CHILD, log, name, mode]


def events(log: str) -> list[Event]:
    try:
        with open(log) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    found = []
    for line in lines:
        kind, when, pid, name, generation, lease = line.split()
        found.append(Event(kind, float(when), int(pid), name, int(generation), lease))
    return found


def started(log: str, name: str, timeout: float) -> Event:
    """Wait for `name`'s child to log its start."""
    box: list[Event] = []

    def seen() -> bool:
        box[:] = [e for e in events(log) if e.kind == "start" and e.name == name]
        return bool(box)

    wait_for(seen, f"{name}'s child to start", timeout, 0.05)
    return box[0]


class DeathWatch:
    """Records, on CLOCK_BOOTTIME, when a process (not our child) dies: a pidfd becomes
    readable at its exit, so the time is taken within a scheduling delay of the death."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.died: float | None = None
        self._fd = os.pidfd_open(pid)
        self._thread = threading.Thread(target=self._wait, daemon=True)
        self._thread.start()

    def _wait(self) -> None:
        import select

        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        while not poller.poll(1000):
            pass
        self.died = boottime()
        os.close(self._fd)

    def wait(self, timeout: float) -> float | None:
        self._thread.join(timeout)
        return self.died


def kill_tree(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.01)


def cleanup_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fence_env(endpoints: str, key: str, token: str, ttl: float, **extra: str) -> dict[str, str]:
    """Environment for `pgfence run/status/...` with the etcd backend."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FENCE_", "PGFENCE_"))}
    env.update(
        FENCE_BACKEND="etcd",
        FENCE_ETCD_ENDPOINTS=endpoints,
        FENCE_ETCD_KEY=key,
        FENCE_VARIABLE=token,
        FENCE_LEASE_TTL=f"{ttl:g}",
        FENCE_DRAIN_GRACE="1",
        FENCE_ETCD_ELECTION_TIMEOUT=str(ELECTION_MS),
        # No generation mark (a test that wants one sets a lock file in its own directory):
        # marks shared by tests on different clusters would raise their generations.
        FENCE_LOCK_FILE="/nonexistent/pgfence-etcd-tests/fence_lock",
    )
    env.update(extra)
    return env
