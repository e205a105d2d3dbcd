"""examples/: every compose and stack file is valid Compose (against the specification's
JSON schema) and carries the settings the docs promise; the Kubernetes manifest parses and
has the fields docs/install.md lists."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from pgfence import config
from pgfence.timings import DEFAULT_TTL, Timings

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
# CI clones the repository next to a copy of shared/.
SCHEMA = ROOT.parent / "shared" / "compose-spec.json"
COMPOSE_FILES = sorted(EXAMPLES.glob("compose/*.yaml")) + sorted(EXAMPLES.glob("swarm/*.yaml"))
MANIFEST = EXAMPLES / "kubernetes" / "postgres.yaml"
KNOWN_ENV = {o.env for opts in config.COMMAND_OPTIONS.values() for o in opts if o.env}
KNOWN_ENV.add("FENCE_POSTGRES_BIN")
LEASE = Timings.lease(DEFAULT_TTL)
TAKEOVER = LEASE.ttl + LEASE.lock_delay
pytestmark = pytest.mark.timeout(60)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def seconds(duration: str) -> float:
    """A Compose duration such as 2m, 90s, 1m30s."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def service(path: Path) -> dict[str, Any]:
    [svc] = load(path)["services"].values()
    assert isinstance(svc, dict)
    return svc


@pytest.fixture(scope="module")
def validator() -> Any:
    if not SCHEMA.exists():
        pytest.skip(f"Compose schema not found at {SCHEMA} (shared/ is expected next to the repo)")
    import jsonschema

    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_compose_files_validate_against_the_spec(validator: Any, path: Path) -> None:
    errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(load(path))]
    assert not errors, errors


def test_schema_rejects_a_broken_file(validator: Any) -> None:
    """The validation above means something: a misspelt key is an error."""
    doc = load(EXAMPLES / "compose" / "compose.lease.yaml")
    doc["services"]["postgres"]["stop_grace_perod"] = "2m"
    assert list(validator.iter_errors(doc))


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_postgres_stops_fast_with_time_to_release(path: Path) -> None:
    svc = service(path)
    assert svc["stop_signal"] == "SIGINT"
    assert seconds(svc["stop_grace_period"]) > DEFAULT_TTL  # fast shutdown and release
    health = svc["healthcheck"]
    if path.name == "stack.sh-shim.yaml":  # no Python in the image, so no pgfence check
        assert health["test"] == ["CMD", "pg_isready", "-q"]
    else:
        assert health["test"] == ["CMD", "pgfence", "check"]
    assert seconds(health["start_period"]) > TAKEOVER


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_environment_names_only_known_variables(path: Path) -> None:
    env = service(path)["environment"]
    fence = {name for name in env if name.startswith("FENCE_")}
    assert fence <= KNOWN_ENV, fence - KNOWN_ENV
    mode = env.get("FENCE_MODE", "lease" if env.get("FENCE_BACKEND") == "etcd" else "strict")
    assert mode in path.name or "etcd" in path.name or "shim" in path.name


@pytest.mark.parametrize("path", COMPOSE_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_data_volume_is_nfs_mounted_hard_at_the_lock_directory(path: Path) -> None:
    doc = load(path)
    svc = service(path)
    [mount] = svc["volumes"]
    name, _, target = mount.partition(":")
    assert target == "/var/lib/postgresql"
    lock = svc["environment"].get("FENCE_LOCK_FILE", "/var/lib/postgresql/fence_lock")
    assert lock.rsplit("/", 1)[0] == target
    opts = doc["volumes"][name]["driver_opts"]
    assert opts["type"] == "nfs" and "hard" in opts["o"].split(",")


def test_every_variant_is_there() -> None:
    names = {f"{p.parent.name}/{p.name}" for p in COMPOSE_FILES}
    for kind, prefix in (("compose", "compose"), ("swarm", "stack")):
        for variant in ("strict", "lease", "etcd"):
            assert f"{kind}/{prefix}.{variant}.yaml" in names
    for path in COMPOSE_FILES:
        env = service(path)["environment"]
        if "etcd" in path.name:
            assert env["FENCE_BACKEND"] == "etcd"
            assert env["FENCE_ETCD_ENDPOINTS"].startswith("https://")
            assert env["FENCE_ETCD_PASSWORD_FILE"].startswith("/run/secrets/")


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("swarm/*.yaml")), ids=lambda p: p.name)
def test_stack_runs_one_task_that_stops_before_the_next_starts(path: Path) -> None:
    deploy = service(path)["deploy"]
    assert deploy["replicas"] == 1
    assert deploy["update_config"]["order"] == "stop-first"
    assert deploy["restart_policy"]["condition"] == "any"
    assert "node.labels.postgres == true" in deploy["placement"]["constraints"]


def test_sh_shim_stack_runs_the_official_image_in_strict_mode() -> None:
    path = EXAMPLES / "swarm" / "stack.sh-shim.yaml"
    doc = load(path)
    svc = service(path)
    assert svc["image"].startswith("postgres:")  # the unchanged official image
    [config] = svc["configs"]
    assert (config["target"], config["mode"]) == ("/newbin/postgres", 0o555)
    assert doc["configs"][config["source"]]["file"] == "../../dist/pgfence-shim.sh"
    env = svc["environment"]
    assert env.get("FENCE_MODE", "strict") == "strict" and "FENCE_BACKEND" not in env
    assert env["PATH"].split(":")[0] == "/newbin"
    assert "{{.Node.Hostname}}" in svc["hostname"] and "FENCE_VARIABLE" not in env


def test_swarm_config_injects_the_zipapp_as_postgres() -> None:
    path = EXAMPLES / "swarm" / "stack.shim-config.yaml"
    doc = load(path)
    svc = service(path)
    targets = {c["target"]: c for c in svc["configs"]}
    shim = targets["/newbin/postgres"]
    assert shim["mode"] == 0o555
    assert doc["configs"][shim["source"]]["file"] == "../../dist/pgfence.pyz"
    assert (path.parent / "../../dist").resolve() == ROOT / "dist"
    path_dirs = svc["environment"]["PATH"].split(":")
    assert path_dirs[0] == "/newbin" and "/usr/lib/postgresql/18/bin" in path_dirs[1:]


def test_kubernetes_manifest_has_what_the_docs_promise() -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    claim = docs["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    deployment = docs["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) - {"POSTGRES_PASSWORD"} <= KNOWN_ENV
    assert env["FENCE_MODE"]["value"] == "lease"
    ttl = float(env["FENCE_LEASE_TTL"]["value"])
    assert pod["terminationGracePeriodSeconds"] > ttl
    assert env["FENCE_VARIABLE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    [mount] = container["volumeMounts"]
    assert mount["mountPath"] == env["FENCE_LOCK_FILE"]["value"].rsplit("/", 1)[0]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    # pgfence fences itself: no probe that restarts the container (a slow disk, a long
    # recovery or a wait for the lease would restart a healthy server or the wait).
    assert "livenessProbe" not in container and "startupProbe" not in container
    assert "pgfence check" in container["readinessProbe"]["exec"]["command"][-1]
    # Evicted 30 s after its node is lost, not the default 300 s.
    tolerated = {t["key"]: t for t in pod["tolerations"]}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        assert tolerated[key]["effect"] == "NoExecute"
        assert 20 <= tolerated[key]["tolerationSeconds"] <= 40
    timings = Timings.lease(ttl)
    assert timings.deadline is not None
    assert timings.deadline < tolerated["node.kubernetes.io/unreachable"]["tolerationSeconds"]
    resources = container["resources"]
    assert resources["requests"]["memory"] and resources["requests"]["cpu"]
    assert "cpu" not in resources.get("limits", {})  # throttling would delay renewals
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    budget = docs["PodDisruptionBudget"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "pg_ctl stop" in container["lifecycle"]["preStop"]["exec"]["command"][-1]
    port = env["FENCE_METRICS_ADDRESS"]["value"].rsplit(":", 1)[1]
    assert int(port) in {p["containerPort"] for p in container["ports"]}


KUBERNETES_VALIDATE = shutil.which("kubernetes-validate") or os.path.join(
    os.path.dirname(sys.executable), "kubernetes-validate"
)


@pytest.mark.skipif(not os.path.exists(KUBERNETES_VALIDATE), reason="kubernetes-validate missing")
def test_kubernetes_manifest_validates_strictly(tmp_path: Path) -> None:
    def validate(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KUBERNETES_VALIDATE, "--strict", str(path)],
            capture_output=True,
            text=True,
            timeout=120,
        )

    result = validate(MANIFEST)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 4, result.stdout
    # Negative control: a misspelt field fails strict validation.
    broken = tmp_path / "broken.yaml"
    broken.write_text(MANIFEST.read_text().replace("tolerationSeconds", "tolerationSecond", 1))
    assert validate(broken).returncode != 0
