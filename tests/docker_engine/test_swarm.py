"""The stacks in examples/swarm deployed with `docker stack deploy` on a one-node Swarm.

Each stack file is deployed as written, except for what this machine needs (`local_stack`):
- the image names become the locally built ones;
- the NFS volume becomes a local volume: every task on this node mounts the same one;
- no published ports; the services join the host network (external network `host`);
- each task listens on its own port, PGPORT=2<slot>543 (22543 for slot 2), so two tasks
  never contend for one TCP port and "serves" means exactly "its postgres answers"; the
  metrics listener likewise moves to 127.0.0.1:2<slot>638;
- the hostname template pg-{{.Node.Hostname}} gains -{{.Task.Slot}}: one node stands in for
  two, and two tasks of one service get two tokens, as on two nodes;
- secrets are files; the lease TTL may be shortened, to keep the run short;
- `version: "3.8"` is kept (the examples carry it): the engine's `docker stack deploy`
  (20.10) refuses a file without it ("unsupported Compose file version: 1.0").
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness import docker as d
from harness import dockerpg as dp
from harness import standins
from harness.waiting import wait_for
from harness.writer import SCHEMA, Writer

pytestmark = [pytest.mark.integration, pytest.mark.docker]

EXAMPLES = standins.REPO / "examples" / "swarm"
MAJOR = "18"  # the stacks are written for the 18 layout (volume at /var/lib/postgresql)


def slot_port(slot: int) -> int:
    return int(f"2{slot}543")


@pytest.fixture(scope="session")
def swarm(engine: str) -> str:
    try:
        d.ensure_swarm()
    except d.EngineUnavailable as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"no Swarm: {e}", pytrace=False)
        pytest.skip(f"no Swarm: {e}")
    node = d.docker("info", "--format", "{{.Swarm.NodeID}}").stdout.strip()
    d.docker("node", "update", "--label-add", "postgres=true", node)
    return node


def local_stack(
    source: str, image: str, tmp: Path, env: dict[str, str] | None = None, replicas: int = 2
) -> Path:
    doc: dict[str, Any] = yaml.safe_load((EXAMPLES / source).read_text())
    doc = {"version": "3.8", **doc}  # the examples carry it; a stack without one is refused
    svc = doc["services"]["postgres"]
    svc["image"] = image
    svc.pop("ports", None)
    svc["networks"] = ["hostnet"]
    doc["networks"] = {"hostnet": {"external": True, "name": "host"}}
    assert svc["hostname"] == "pg-{{.Node.Hostname}}", svc["hostname"]
    svc["hostname"] = "pg-{{.Node.Hostname}}-{{.Task.Slot}}"
    svc["environment"].update({"PGPORT": "2{{.Task.Slot}}543", **(env or {})})
    if "FENCE_METRICS_ADDRESS" in svc["environment"]:
        svc["environment"]["FENCE_METRICS_ADDRESS"] = "127.0.0.1:2{{.Task.Slot}}638"
    svc["deploy"]["replicas"] = replicas
    doc["volumes"]["pgdata"] = {}
    password = tmp / "postgres-password.txt"
    password.write_text(dp.PASSWORD)
    doc["secrets"]["postgres-password"] = {"file": str(password)}
    path = tmp / f"local.{source}"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def deploy(path: Path, stack: str) -> None:
    d.docker("stack", "deploy", "--prune", "-c", str(path), stack, timeout=120)


def containers(stack: str) -> list[dict[str, Any]]:
    """Every container of the stack's tasks, running or exited, with state and slot."""
    found = []
    for cid in d.stack_containers(stack):
        info = d.inspect(cid)
        if info is None:
            continue
        labels = info["Config"]["Labels"]  # type: ignore[index]
        name = labels.get("com.docker.swarm.task.name", "")
        found.append(
            {
                "id": cid,
                "slot": int(name.rsplit(".", 2)[1]) if name.count(".") >= 2 else 0,
                "running": info["State"]["Running"],  # type: ignore[index]
                "exit": info["State"]["ExitCode"],  # type: ignore[index]
                "status": info["State"]["Status"],  # type: ignore[index]
            }
        )
    return found


def serving_slots() -> list[int]:
    return [slot for slot in (1, 2) if dp.serves(slot_port(slot))]


@pytest.fixture
def stack(swarm: str, names: Any) -> Iterator[str]:
    name = names.stack()
    names.volumes.append(f"{name}_pgdata")
    yield name


def _sustained_one_server(seconds: float) -> int:
    """Poll both slots for `seconds`: exactly one serves each time, always the same one."""
    slots: set[int] = set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        now = serving_slots()
        assert len(now) == 1, f"servers at once: {now}"
        slots.update(now)
        time.sleep(0.5)
    assert len(slots) == 1, f"the serving task changed: {slots}"
    return slots.pop()


def _one_of_two_serving(image: str, file: str, tmp_path: Path, stack: str) -> int:
    """Deploy `file`'s two replicas of `image`; once one task serves, it must be the only
    one for 30 s. Returns its slot."""
    deploy(local_stack(file, image, tmp_path), stack)
    wait_for(lambda: len(serving_slots()) == 1, "one task serving", 120, 0.5)
    return _sustained_one_server(30)


@pytest.mark.timeout(400)
def test_strict_stack_two_replicas_one_serves_other_exits_73(images, stack, tmp_path) -> None:
    holder = _one_of_two_serving(images.image("fence", MAJOR), "stack.strict.yaml", tmp_path, stack)
    fenced = _exited(stack, holder)
    assert fenced, "the other task never exited"
    assert {c["exit"] for c in fenced} == {73}, fenced
    for c in fenced:
        assert not dp.started_postgres(d.logs(c["id"])), d.logs(c["id"])[-2000:]


@pytest.mark.timeout(400)
def test_lease_stack_two_replicas_one_serves_other_waits(images, stack, tmp_path) -> None:
    holder = _one_of_two_serving(images.image("fence", MAJOR), "stack.lease.yaml", tmp_path, stack)
    other = [c for c in containers(stack) if c["slot"] != holder]
    # Waiting, never exited.
    assert other and all(c["running"] for c in other), [(c, d.logs(c["id"])) for c in other]
    assert not any(dp.started_postgres(d.logs(c["id"])) for c in other)


@pytest.mark.timeout(400)
def test_rolling_update_stop_first_hands_over(images, stack, tmp_path) -> None:
    image = images.image("fence", MAJOR)
    deploy(local_stack("stack.strict.yaml", image, tmp_path, replicas=1), stack)
    port = slot_port(1)
    wait_for(lambda: dp.serves(port), "the task serving", 120, 0.5)
    (old,) = [c["id"] for c in containers(stack) if c["running"]]
    started = time.monotonic()
    d.docker("service", "update", "--detach", "--force", f"{stack}_postgres", timeout=120)
    wait_for(lambda: not d.state(old).get("Running"), "the old task stopped", 150, 0.5)
    wait_for(lambda: dp.serves(port), "the new task serving", 150, 0.5)
    # Stopped by the fast shutdown within the 2 min grace period, not SIGKILLed after it.
    assert d.state(old).get("ExitCode") == 0, d.logs(old)[-2000:]
    assert "fast shutdown request" in d.logs(old)
    assert time.monotonic() - started < 120
    new = [c for c in containers(stack) if c["running"]]
    assert len(new) == 1 and new[0]["id"] != old


@pytest.mark.timeout(400)
def test_configs_style_shim_mounted_at_newbin(images, stack, tmp_path) -> None:
    image = images.image("shim", MAJOR)
    path = local_stack("stack.shim-config.yaml", image, tmp_path, replicas=2)
    doc = yaml.safe_load(path.read_text())
    pyz = tmp_path / "pgfence.pyz"
    standins.build_zipapp(pyz)
    doc["configs"]["pgfence-shim"] = {"file": str(pyz)}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    holder = _one_holder_with_the_shim(path, stack)
    # The stack is in lease mode: the other task waits for the lease, it does not exit.
    other = [c for c in containers(stack) if c["slot"] != holder]
    assert other and all(c["running"] for c in other), [d.logs(c["id"]) for c in other]


def _one_holder_with_the_shim(path: Path, stack: str) -> int:
    """Deploy `path` one task then two; exactly one serves, with the shim at
    /newbin/postgres (mode 555), and holds the lock. Returns its slot."""
    _deploy_one_then_two(path, stack)
    holder = _sustained_one_server(20)
    (running,) = [c for c in containers(stack) if c["slot"] == holder and c["running"]]
    mode = d.docker("exec", running["id"], "stat", "-c", "%a", "/newbin/postgres").stdout
    assert mode.strip() == "555"
    lock = dp.lock_text(f"{stack}_pgdata")
    assert lock is not None and lock.startswith(f"pg-{_node_hostname()}-{holder}\n"), lock
    return holder


def _deploy_one_then_two(path: Path, stack: str) -> None:
    """One task first, the second once the first serves: in the shim styles initdb and the
    entrypoint's temporary server are not fenced (only the final `exec postgres` is), so two
    tasks on a fresh volume would race in initdb (docs/install.md)."""
    doc = yaml.safe_load(path.read_text())
    doc["services"]["postgres"]["deploy"]["replicas"] = 1
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    deploy(path, stack)
    wait_for(lambda: serving_slots() == [1], "the first task serving", 120, 0.5)
    d.docker("service", "scale", "--detach", f"{stack}_postgres=2", timeout=60)
    wait_for(lambda: any(c["slot"] == 2 for c in containers(stack)), "a second task", 60, 0.5)


def _exited(stack: str, holder: int) -> list[dict[str, Any]]:
    """The containers of other slots than the holder's that ran and exited."""
    return [c for c in containers(stack) if c["slot"] != holder and c["status"] == "exited"]


def _node_hostname() -> str:
    return d.docker("info", "--format", "{{.Name}}").stdout.strip()


@pytest.mark.timeout(600)
def test_split_brain_stand_in_paused_holder_and_a_second_task(images, stack, tmp_path) -> None:
    """The mission's failure: the holder's node looks dead (its container is frozen) and
    Swarm starts another task on the same storage. One server at every instant."""
    image = images.image("fence", MAJOR)
    lease = {"FENCE_LEASE_TTL": "4", "POSTGRES_INITDB_ARGS": "--data-checksums"}
    deploy(local_stack("stack.lease.yaml", image, tmp_path, env=lease, replicas=1), stack)
    p1, p2 = slot_port(1), slot_port(2)
    wait_for(lambda: dp.serves(p1), "the first task serving", 120, 0.5)
    for sql in SCHEMA:
        assert dp.psql(p1, sql).returncode == 0
    (holder,) = [c["id"] for c in containers(stack) if c["running"]]
    log = str(tmp_path / "acks.jsonl")
    with Writer([p1, p2], log) as writer:
        writer.wait_acks(p1, 20)
        d.docker("pause", holder)
        paused = time.clock_gettime(time.CLOCK_BOOTTIME)
        d.docker("service", "scale", "--detach", f"{stack}_postgres=2", timeout=60)
        wait_for(lambda: dp.serves(p2), "the second task serving", 120, 0.5)
        writer.wait_acks(p2, 20)
        d.docker("unpause", holder)
        assert d.wait_exit(holder, timeout=30) == 75, d.logs(holder)[-2000:]
        writer.wait_acks(p2, 20)
    late = [a for a in writer.acks(p1) if a.acked > paused]
    assert not late, f"the frozen holder acknowledged commits after its pause: {late[:3]}"
    assert all(a.sent > paused for a in writer.acks(p2))
    done = dp.psql(p2, "SELECT id FROM acks", timeout=60)
    have = {int(x) for x in done.stdout.split()}
    lost = sorted(a.id for a in writer.acks() if a.id not in have)
    assert not lost, f"acknowledged commits lost: {lost[:10]}"
    assert dp.psql(p2, "SELECT bt_index_check('acks_pkey')").returncode == 0
    d.docker("stack", "rm", stack)
    d.wait_stacks_gone([stack])
    checked = d.docker(
        "run", "--rm", "--network", "none", "--user", "postgres", "--entrypoint", "pg_checksums",
        "-v", f"{stack}_pgdata:/var/lib/postgresql", image,
        "--check", "-D", standins.STANDINS[MAJOR].pgdata,
        check=False, timeout=300,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _exported_sh_shim(tmp: Path) -> Path | None:
    """`pgfence export-shim` of the image source tree, or None where it has no such command."""
    pyz = tmp / "pgfence.pyz"
    standins.build_zipapp(pyz)
    done = subprocess.run(
        ["python3", str(pyz), "export-shim"], capture_output=True, text=True, timeout=30
    )
    if done.returncode != 0 or not done.stdout.startswith("#!/bin/sh"):
        return None
    shim = tmp / "postgres.sh"
    shim.write_text(done.stdout)
    return shim


@pytest.mark.timeout(400)
def test_configs_style_sh_shim_in_the_official_image_without_python(
    images, stack, tmp_path
) -> None:
    """The seed's own deployment: the unchanged official image (the stand-in postgres:18, no
    Python), the fence injected as a Swarm config at /newbin/postgres with mode 0555."""
    shim = _exported_sh_shim(tmp_path)
    if shim is None:
        pytest.skip("this tree's pgfence has no `export-shim` command (issue 11, item 3)")
    standin = images.standin(MAJOR)
    no_python = d.docker("run", "--rm", "--network", "none", "--entrypoint", "sh", standin.tag,
                         "-c", "command -v python3", check=False)  # fmt: skip
    assert no_python.returncode != 0, "the stand-in official image must not have python3"
    path = local_stack("stack.shim-config.yaml", standin.tag, tmp_path, replicas=2)
    doc = yaml.safe_load(path.read_text())
    svc = doc["services"]["postgres"]
    doc["configs"]["pgfence-shim"] = {"file": str(shim)}
    # The sh shim is the fence only: strict mode, no `pgfence` command for status/check.
    svc["configs"] = [c for c in svc["configs"] if c["target"] == "/newbin/postgres"]
    svc.pop("healthcheck", None)
    for key in ("FENCE_MODE", "FENCE_LEASE_TTL"):
        svc["environment"].pop(key, None)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    holder = _one_holder_with_the_shim(path, stack)
    wait_for(lambda: _exited(stack, holder), "the second task exits", 60, 0.5)
    fenced = _exited(stack, holder)
    wrong = [(c, d.logs(c["id"])[-2500:]) for c in fenced if c["exit"] != 73]
    assert not wrong, wrong
