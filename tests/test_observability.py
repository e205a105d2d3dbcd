"""What an operator watches: JSON log lines with stable event names, the text format's one
line per event, and the opt-in Prometheus endpoint scraped during a real `pgfence run`."""

from __future__ import annotations

import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import PGFENCE
from harness import pg
from harness.fence import json_events
from harness.procs import Registry
from harness.waiting import wait_for

pytestmark = pytest.mark.timeout(60)

# The names log pipelines match on (pgfence.log's docstring lists them).
STABLE_EVENTS = {
    "acquired",
    "waiting",
    "started",
    "fenced_out",
    "renew_failed",
    "renewed",
    "self_fenced",
    "draining",
    "released",
    "removed",
    "claim_abandoned",
    "nested",
    "error",
}
SLEEPER = ["sh", "-c", "trap 'exit 0' TERM INT; while :; do sleep 0.05; done"]


def env(**extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FENCE_", "PGFENCE_"))}
    return {**base, "HOSTNAME": "obs-host", **extra}


def logged_events(stderr: str) -> list[dict[str, Any]]:
    """Every stderr line is one JSON object with the common fields."""
    events: list[dict[str, Any]] = json_events(stderr)
    for event in events:
        assert {"time", "level", "event", "message"} <= event.keys(), event
        assert event["time"].endswith("Z") and event["time"][10] == "T"
        assert event["level"] in ("info", "warning", "error")
        assert event["event"] in STABLE_EVENTS, event
    return events


def test_json_log_of_a_run_from_acquire_to_release(procs: Registry, tmp_path: Path) -> None:
    lock = tmp_path / "fence_lock"
    proc = procs.start(
        [PGFENCE, "run", "--lock-file", str(lock), "--", *SLEEPER],
        env=env(FENCE_LOG_FORMAT="json"),
        stderr=subprocess.PIPE,
    )
    wait_for(lock.exists, "the lock file", 20.0, 0.05)
    refused = subprocess.run(
        [PGFENCE, "run", "--lock-file", str(lock), "--", "true"],
        env=env(FENCE_LOG_FORMAT="json", FENCE_VARIABLE="other-host"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 73
    [fenced_out] = logged_events(refused.stderr)
    assert (fenced_out["event"], fenced_out["level"]) == ("fenced_out", "error")
    assert fenced_out["exit_code"] == 73 and "obs-host" in fenced_out["message"]

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    events = logged_events(err.decode())
    names = [e["event"] for e in events]
    assert names == ["acquired", "started", "released"], names
    acquired, started, released = events
    assert acquired["lock"] == str(lock) and acquired["token"] == "obs-host"
    assert acquired["generation"] == started["generation"] >= 1
    assert isinstance(started["pid"], int)
    assert released["status"] == 0


def test_lease_self_fence_is_logged_as_json(procs: Registry, tmp_path: Path) -> None:
    """A stolen lease: the holder kills its command and says why, as `self_fenced`."""
    lock = tmp_path / "fence_lock"
    proc = procs.start(
        [PGFENCE, "run", "--mode", "lease", "--ttl", "2", "--lock-file", str(lock), "--", *SLEEPER],
        env=env(FENCE_LOG_FORMAT="json"),
        stderr=subprocess.PIPE,
    )
    wait_for(lock.exists, "the lock file", 20.0, 0.05)
    stolen = tmp_path / "stolen"
    stolen.write_text("thief-host\n")
    os.rename(stolen, lock)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 75
    events = logged_events(err.decode())
    assert [e["event"] for e in events][-1] == "self_fenced"
    assert events[-1]["level"] == "error" and "lost the lock" in events[-1]["reason"]


def test_text_format_is_one_readable_line_per_event(procs: Registry, tmp_path: Path) -> None:
    lock = tmp_path / "fence_lock"
    proc = subprocess.run(
        [PGFENCE, "run", "--lock-file", str(lock), "--", "true"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 3
    assert all(line.startswith("pgfence: ") for line in lines)
    assert "acquired" in lines[0] and "released" in lines[-1]


def scrape(port: int) -> dict[str, Any]:
    """The endpoint's families by name, parsed as Prometheus' own client parses them."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(families: dict[str, Any], name: str) -> float:
    [sample] = families[name].samples
    return float(sample.value)


@pytest.mark.parametrize("mode", ["strict", "lease"])
def test_metrics_endpoint_during_a_run(procs: Registry, tmp_path: Path, mode: str) -> None:
    lock = tmp_path / "fence_lock"
    port = pg.free_port()
    timing = ["--heartbeat-interval", "0.2"] if mode == "strict" else ["--ttl", "2"]
    proc = procs.start(
        [
            PGFENCE,
            "run",
            "--mode",
            mode,
            *timing,
            "--lock-file",
            str(lock),
            "--metrics-address",
            f"127.0.0.1:{port}",
            "--",
            *SLEEPER,
        ],
        env=env(),
        stderr=subprocess.PIPE,
    )

    def renewed() -> dict[str, Any] | None:
        try:
            families = scrape(port)
        except (urllib.error.URLError, ConnectionError):
            return None
        return families if value(families, "pgfence_renewals") >= 2 else None

    families = wait_for(renewed, "two renewals on the metrics endpoint", 20.0, 0.05)
    [info] = families["pgfence_info"].samples
    assert info.labels["mode"] == mode and info.labels["backend"] == "file"
    assert value(families, "pgfence_holding") == 1
    assert value(families, "pgfence_generation") >= 1
    assert value(families, "pgfence_renewal_failures") == 0
    assert value(families, "pgfence_self_fences") == 0
    assert families["pgfence_renewals"].type == "counter"
    assert families["pgfence_renewal_seconds"].type == "counter"
    assert families["pgfence_lease_age_seconds"].type == "gauge"
    assert value(families, "pgfence_lease_age_seconds") >= 0
    deadline = value(families, "pgfence_lease_deadline_seconds")
    # TTL/2 in lease mode; 3 * interval + 1 s in strict mode
    assert deadline == pytest.approx(1.0 if mode == "lease" else 3 * 0.2 + 1.0)

    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 0
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(port)  # the endpoint lives and dies with the run


def test_bare_port_serves_on_loopback_only(procs: Registry, tmp_path: Path) -> None:
    port = pg.free_port()
    proc = procs.start(
        [PGFENCE, "run", "--lock-file", str(tmp_path / "lock"), "--", *SLEEPER],
        env=env(FENCE_METRICS_ADDRESS=f":{port}"),
        stderr=subprocess.PIPE,
    )
    families = wait_for(lambda: _holding(port), "the metrics endpoint to say holding", 20.0, 0.05)
    assert value(families, "pgfence_generation") >= 1
    listening = _listening_addresses(port)
    assert listening == {"0100007F"}, listening  # 127.0.0.1, nothing else
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)


def _holding(port: int) -> dict[str, Any] | None:
    """The families once the run holds the fence (the endpoint starts before that)."""
    try:
        families = scrape(port)
    except (urllib.error.URLError, ConnectionError):
        return None
    return families if value(families, "pgfence_holding") == 1 else None


def _listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp shows them) with a listener on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1], row.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found
