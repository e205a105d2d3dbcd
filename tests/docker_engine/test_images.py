"""docker/Dockerfile built on stand-ins of the official images and run in a real engine.

Every test uses the image's default usage (`docker run -e POSTGRES_PASSWORD=... -v VOL:<the
official image's VOLUME>`), plus only what the host network needs (a port, a hostname) and,
where a test says so, lease-mode settings. Outcomes are asserted; durations never are.
"""

from __future__ import annotations

import os
import time

import pytest

from harness import docker as d
from harness import dockerpg as dp
from harness import pg
from harness.writer import Writer

pytestmark = [pytest.mark.integration, pytest.mark.docker]

MAJORS = ["15", "17", "18"]
LEASE = {"FENCE_MODE": "lease", "FENCE_LEASE_TTL": "4"}  # D = 2 s, W = TTL + TTL/4 = 5 s


def _fenced_out_without_postgres(name: str) -> None:
    code = d.wait_exit(name, timeout=60)
    logs = d.logs(name)
    assert code == 73, f"{name} exited {code}, expected 73:\n{logs[-2000:]}"
    assert not dp.started_postgres(logs), f"{name} started postgres:\n{logs[-2000:]}"


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", MAJORS)
def test_default_usage_one_server_stop_hands_over(images, names, major: str) -> None:
    image = images.image("fence", major)
    standin = images.standin(major)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()

    dp.run_serving(first, image, vol, standin.volume, p1)
    assert dp.lock_text(vol) is not None, "no lock at the volume's root/fence_lock"
    started = dp.server_started_at(p1)

    dp.run(second, image, vol, standin.volume, p2)
    _fenced_out_without_postgres(second)
    assert dp.serves(p1)
    assert dp.server_started_at(p1) == started, "the first server was restarted"

    # docker stop: STOPSIGNAL SIGINT is a fast shutdown, then pgfence releases the lock.
    d.docker("stop", "-t", "60", first, timeout=90)
    assert d.state(first).get("ExitCode") == 0, d.logs(first)[-2000:]
    assert "fast shutdown request" in d.logs(first)
    assert dp.lock_text(vol) is None, "the lock is still held after docker stop"
    d.docker("start", second)
    dp.wait_serving(p2, second)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", MAJORS)
def test_existing_volume_of_the_plain_image_keeps_its_data(images, names, major: str) -> None:
    standin = images.standin(major)
    image = images.image("fence", major)
    vol = names.volume()
    plain, fenced, other = (
        names.container("plain"),
        names.container("fenced"),
        names.container("other"),
    )
    port = pg.free_port()

    dp.run_serving(plain, standin.tag, vol, standin.volume, port)
    done = dp.psql(port, "CREATE TABLE kept AS SELECT g AS n FROM generate_series(1, 1000) g")
    assert done.returncode == 0, done.stderr
    d.docker("stop", "-t", "60", plain, timeout=90)

    dp.run_serving(fenced, image, vol, standin.volume, port)
    assert dp.psql(port, "SELECT count(*), sum(n) FROM kept").stdout.strip() == "1000|500500"
    dp.run(other, image, vol, standin.volume, pg.free_port())
    _fenced_out_without_postgres(other)


# The scenarios below depend on pgfence, not on the layout: one major keeps CI short.
MAJOR = os.environ.get("PGFENCE_DOCKER_MAJOR", "15")


@pytest.mark.timeout(400)
def test_kill_then_start_the_same_container_and_another(images, names) -> None:
    image, standin = images.image("fence", MAJOR), images.standin(MAJOR)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, p1)

    d.docker("kill", first)
    assert dp.lock_text(vol) is not None, "a killed holder's lock must stay (strict mode)"
    # Another container: strict mode never takes over a lock.
    dp.run(second, image, vol, standin.volume, p2)
    _fenced_out_without_postgres(second)
    # The same container (same hostname, so same token, new instance): once the dead
    # holder's heartbeat has stayed silent for the observation period, it starts again.
    d.docker("start", first)
    dp.wait_serving(p1, first)
    d.docker("restart", "-t", "60", first, timeout=120)
    dp.wait_serving(p1, first)
    assert "fast shutdown request" in d.logs(first)
    d.docker("start", second)
    _fenced_out_without_postgres(second)


@pytest.mark.timeout(400)
def test_kill_in_lease_mode_another_container_takes_over(images, names) -> None:
    image, standin = images.image("fence", MAJOR), images.standin(MAJOR)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, p1, env=LEASE)
    dp.run(second, image, vol, standin.volume, p2, env=LEASE)
    time.sleep(3)
    assert d.state(second).get("Running") and not dp.serves(p2), "the contender must wait"
    d.docker("kill", first)
    dp.wait_serving(p2, second)


@pytest.mark.timeout(400)
def test_paused_lease_holder_fences_itself_on_unpause(images, names, tmp_path) -> None:
    image, standin = images.image("fence", MAJOR), images.standin(MAJOR)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, p1, env=LEASE)
    done = dp.psql(
        p1,
        "CREATE TABLE acks (id bigint PRIMARY KEY, port int NOT NULL, gen int, "
        "at timestamptz NOT NULL DEFAULT clock_timestamp(), filler text NOT NULL)",
    )
    assert done.returncode == 0, done.stderr
    dp.run(second, image, vol, standin.volume, p2, env=LEASE)

    log = str(tmp_path / "acks.jsonl")
    with Writer([p1, p2], log) as writer:
        writer.wait_acks(p1, 20)
        d.docker("pause", first)
        paused = time.clock_gettime(time.CLOCK_BOOTTIME)
        dp.wait_serving(p2, second, timeout=60)
        writer.wait_acks(p2, 20)
        unpaused = time.clock_gettime(time.CLOCK_BOOTTIME)
        d.docker("unpause", first)
        code = d.wait_exit(first, timeout=30)
        writer.wait_acks(p2, 20)
    logs = d.logs(first)
    assert code == 75, f"the thawed holder exited {code}, expected 75:\n{logs[-2000:]}"
    late = [a for a in writer.acks(p1) if a.acked > paused]
    assert not late, f"the paused holder acknowledged commits after its pause: {late[:3]}"
    assert all(a.sent > paused for a in writer.acks(p2))
    assert unpaused > paused
    # Every acknowledged commit survived the handover.
    lost = _missing(writer.acks(), p2)
    assert not lost, f"acknowledged commits lost: {lost[:10]}"


def _missing(acks, port: int) -> list[int]:
    done = dp.psql(port, "SELECT id FROM acks", timeout=60)
    assert done.returncode == 0, done.stderr
    have = {int(x) for x in done.stdout.split()}
    return sorted(a.id for a in acks if a.id not in have)


@pytest.mark.timeout(400)
def test_healthcheck_holder_healthy_waiting_contender_not_unhealthy(images, names) -> None:
    image, standin = images.image("fence", MAJOR), images.standin(MAJOR)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, p1, env=LEASE)
    # The contender's checks run every 2 s instead of 10 (its start period is the image's):
    # three failing checks in a row would make it unhealthy outside the start period.
    dp.run(
        second,
        image,
        vol,
        standin.volume,
        p2,
        env=LEASE,
        extra=["--health-interval=2s", "--health-retries=1"],
    )
    deadline = time.monotonic() + 40
    seen: set[str] = set()
    codes: list[int] = []
    while time.monotonic() < deadline:
        status, codes = dp.health(second)
        seen.add(status)
        time.sleep(1)
    assert "unhealthy" not in seen and "healthy" not in seen, seen
    assert codes and all(c == 1 for c in codes), f"the waiting contender's checks: {codes}"
    deadline = time.monotonic() + 60
    while dp.health(first)[0] != "healthy":
        assert time.monotonic() < deadline, f"holder not healthy: {dp.health(first)}"
        time.sleep(1)


@pytest.mark.timeout(400)
def test_negative_control_the_plain_image_starts_a_second_server(images, names) -> None:
    """Without pgfence, the stand-in official image starts a second server on a volume in
    use (docker-library/postgres#171): the checks above can see that outcome."""
    standin = images.standin(MAJOR)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, standin.tag, vol, standin.volume, p1)
    dp.run_serving(second, standin.tag, vol, standin.volume, p2)
    assert dp.serves(p1) and dp.serves(p2), "two servers on one data directory"
    assert dp.started_postgres(d.logs(second))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("major", MAJORS)
def test_shim_image_default_usage_one_server(images, names, major: str) -> None:
    """examples/shim/Dockerfile (the zipapp copied to /newbin/postgres), default usage.
    Its fence covers only the final `exec postgres`: the second container starts after the
    first has initialised the volume, so neither initdb nor the temporary server runs again."""
    image = images.image("shim", major)
    standin = images.standin(major)
    vol = names.volume()
    first, second = names.container("first"), names.container("second")
    p1, p2 = pg.free_port(), pg.free_port()
    dp.run_serving(first, image, vol, standin.volume, p1)
    dp.run(second, image, vol, standin.volume, p2)
    _fenced_out_without_postgres(second)
    assert dp.serves(p1)
