"""A real Docker engine for the tests: find or start one, and run the `docker` client.

Rules this module keeps (README, "Docker tests"):
- A daemon that already answers is used as it is, never reconfigured or stopped.
- Otherwise, as root with Debian's docker.io installed, it starts
  `dockerd --bridge=none --iptables=false --ip-masq=false` detached, and leaves it running
  after the tests (other test runs and `scripts/docker-standins` reuse it, and the image
  cache it holds is what makes later runs fast). `scripts/docker-standins --stop-engine`
  stops a daemon this module started, by the pid it recorded.
- Containers and services use the host network or none; no bridge is ever created.

The client is Debian's /usr/bin/docker (20.10, the daemon's own version) when present: a
newer client first on PATH may speak an API version or a build plugin the daemon lacks.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence

DEBIAN_CLIENT = "/usr/bin/docker"
DOCKERD_FLAGS = ("--bridge=none", "--iptables=false", "--ip-masq=false")
STATE_DIR = "/var/lib/pgfence-tests"
STARTED_PID_FILE = os.path.join(STATE_DIR, "dockerd.pid")  # written only for a daemon we start
STARTED_ID_FILE = os.path.join(STATE_DIR, "dockerd.id")  # that daemon's engine ID (docker info)
DOCKERD_LOG = os.path.join(STATE_DIR, "dockerd.log")
START_LOCK = os.path.join(STATE_DIR, "dockerd.start-lock")


class EngineUnavailable(Exception):
    """No Docker engine answers and none can be started here (the message says why)."""


def client() -> str:
    if os.access(DEBIAN_CLIENT, os.X_OK):
        return DEBIAN_CLIENT
    found = shutil.which("docker")
    if found is None:
        raise EngineUnavailable("no docker client (install Debian's docker.io)")
    return found


def docker(
    *args: str,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `docker ARGS`; with check, a failure raises with the command's stderr in the message."""
    full_env = dict(os.environ, **(env or {}))
    proc = subprocess.run(
        [client(), *args],
        text=True,
        capture_output=True,
        timeout=timeout,
        input=input,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"docker {' '.join(args)[:300]} exited {proc.returncode}:\n"
            f"{proc.stderr[-3000:]}{proc.stdout[-2000:]}"
        )
    return proc


def engine_answers() -> bool:
    try:
        proc = subprocess.run(
            [client(), "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired, EngineUnavailable):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def ensure_engine(timeout: float = 90) -> str:
    """Return the server version of a running engine, starting dockerd if none answers.

    Raises EngineUnavailable with the reason when no engine can be had.
    """
    if engine_answers():
        return server_version()
    if os.environ.get("DOCKER_HOST"):
        raise EngineUnavailable(f"DOCKER_HOST={os.environ['DOCKER_HOST']} does not answer")
    if os.geteuid() != 0:
        raise EngineUnavailable("no Docker engine answers, and starting dockerd needs root")
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(dockerd, os.X_OK):
        raise EngineUnavailable("no Docker engine answers and dockerd is not installed")
    os.makedirs(STATE_DIR, exist_ok=True)
    # Two test runs starting at once must not both start a daemon: the second waits here
    # and then finds the first one's daemon answering.
    with open(START_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if engine_answers():
            return server_version()
        with open(DOCKERD_LOG, "ab") as log:
            proc = subprocess.Popen(
                [dockerd, *DOCKERD_FLAGS],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # outlives the test run on purpose (module docstring)
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise EngineUnavailable(
                    f"dockerd exited {proc.returncode} at start; see {DOCKERD_LOG}:\n"
                    + _tail(DOCKERD_LOG)
                )
            if engine_answers():
                with open(STARTED_PID_FILE, "w") as f:
                    f.write(f"{proc.pid}\n")
                with open(STARTED_ID_FILE, "w") as f:
                    f.write(engine_id() + "\n")
                return server_version()
            time.sleep(0.5)
        proc.terminate()  # ours, and of no use: it is not left behind unrecorded
        proc.wait(timeout=60)
        raise EngineUnavailable(f"dockerd did not answer within {timeout:.0f} s; see {DOCKERD_LOG}")


def stop_started_engine(timeout: float = 60) -> bool:
    """Stop the dockerd that ensure_engine started (by its recorded pid); False if none."""
    try:
        with open(STARTED_PID_FILE) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return False
    try:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "dockerd":
                os.unlink(STARTED_PID_FILE)
                return False
        os.kill(pid, 15)
    except OSError:
        os.unlink(STARTED_PID_FILE)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
        time.sleep(0.2)
    os.unlink(STARTED_PID_FILE)
    return True


def server_version() -> str:
    return docker("version", "--format", "{{.Server.Version}}").stdout.strip()


def _tail(path: str, size: int = 2000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


# -- images ----------------------------------------------------------------------------------


def image_labels(ref: str) -> dict[str, str] | None:
    """The labels of a local image, {} when it has none, None when there is no such image."""
    proc = docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref, check=False)
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout) or {}


def build(
    tag: str,
    context: str,
    dockerfile: str | None = None,
    dockerfile_text: str | None = None,
    build_args: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    buildkit: bool = False,
    timeout: float = 1800,
) -> None:
    """`docker build --network host` (the only network a build may use here).

    dockerfile_text is fed on stdin (`-f -`), for Dockerfiles this harness generates.
    """
    args = ["build", "--network", "host", "-t", tag]
    for key, value in (build_args or {}).items():
        args += ["--build-arg", f"{key}={value}"]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    if dockerfile_text is not None:
        args += ["-f", "-"]
    elif dockerfile is not None:
        args += ["-f", dockerfile]
    args.append(context)
    docker(
        *args,
        input=dockerfile_text,
        timeout=timeout,
        env={"DOCKER_BUILDKIT": "1" if buildkit else "0"},
    )


# -- containers ------------------------------------------------------------------------------


def inspect(ref: str) -> dict[str, object] | None:
    proc = docker("inspect", ref, check=False)
    if proc.returncode != 0:
        return None
    data: list[dict[str, object]] = json.loads(proc.stdout)
    return data[0] if data else None


def state(container: str) -> dict[str, object]:
    info = inspect(container)
    if info is None:
        return {}
    result = info.get("State")
    return result if isinstance(result, dict) else {}


def wait_exit(container: str, timeout: float) -> int | None:
    """The container's exit code once it has stopped, None if it still runs after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        st = state(container)
        if st and not st.get("Running") and st.get("Status") in ("exited", "dead"):
            code = st.get("ExitCode")
            return int(code) if isinstance(code, int) else None
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.2)


def logs(container: str) -> str:
    proc = docker("logs", container, check=False, timeout=30)
    return proc.stdout + proc.stderr


def remove(kind: str, names: Sequence[str]) -> None:
    """Best-effort removal (containers, volumes, services, stacks) in teardown."""
    if not names:
        return
    if kind == "container":
        docker("rm", "-f", "-v", *names, check=False, timeout=120)
    elif kind == "volume":
        docker("volume", "rm", "-f", *names, check=False, timeout=120)
    elif kind == "stack":
        for name in names:
            docker("stack", "rm", name, check=False, timeout=120)
    else:
        raise ValueError(kind)


def stack_containers(stack: str, all_states: bool = True) -> list[str]:
    """Ids of the containers of a stack's tasks (running and, with all_states, exited)."""
    args = ["ps", "-q", "--no-trunc", "--filter", f"label=com.docker.stack.namespace={stack}"]
    if all_states:
        args.insert(1, "-a")
    return docker(*args).stdout.split()


def wait_stacks_gone(stacks: Sequence[str], timeout: float = 180) -> None:
    """After `docker stack rm`: wait until no container of these stacks is left."""
    deadline = time.monotonic() + timeout
    while any(stack_containers(s, all_states=False) for s in stacks):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"containers of {list(stacks)} still run {timeout} s after stack rm"
            )
        time.sleep(1)
    # Exited task containers keep their volume in use until they are removed.
    leftovers = [c for s in stacks for c in stack_containers(s)]
    if leftovers:
        docker("rm", "-f", *leftovers, check=False, timeout=120)


def engine_id() -> str:
    return docker("info", "--format", "{{.ID}}").stdout.strip()


def started_engine_pid() -> int | None:
    """The pid of the dockerd this module started, if it still runs and is the engine the
    client talks to (DOCKER_HOST may name another one)."""
    try:
        with open(STARTED_PID_FILE) as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/comm") as f:
            if f.read().strip() != "dockerd":
                return None
        with open(STARTED_ID_FILE) as f:
            recorded = f.read().strip()
    except (OSError, ValueError):
        return None
    return pid if recorded and recorded == engine_id() else None


def ensure_swarm() -> bool:
    """Make this engine a one-node Swarm; True if this call initialised it.

    An engine that is already in a Swarm is used as it is. One that is not is only turned into
    a Swarm if this module started it: a user's own engine is never reconfigured.
    """
    node_state = docker("info", "--format", "{{.Swarm.LocalNodeState}}").stdout.strip()
    if node_state == "active":
        return False
    if started_engine_pid() is None:
        raise EngineUnavailable(
            "the Docker engine is not in a Swarm and was not started by the tests "
            "(run `docker swarm init --advertise-addr 127.0.0.1` to allow the Swarm tests)"
        )
    docker("swarm", "init", "--advertise-addr", "127.0.0.1", timeout=120)
    return True
