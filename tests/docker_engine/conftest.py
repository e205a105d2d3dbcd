"""Fixtures of the real-Docker tests: one engine and one set of images per test session.

Where no engine answers and none can be started (not root, no docker.io), every test here
is skipped with the reason; under CI (CI=true) that is a failure instead, so CI never
passes without having run them. Images are built once per session and cached in the
engine between sessions (tests/harness/standins.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from harness import docker as d
from harness import standins


@pytest.fixture(scope="session")
def engine() -> str:
    try:
        return d.ensure_engine()
    except d.EngineUnavailable as e:
        message = f"no Docker engine: {e}"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: the Docker tests must run in CI)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def images(engine: str) -> Iterator[ImageSet]:
    yield ImageSet()


class ImageSet:
    """Builds (or finds cached) images on first use, once per session."""

    def __init__(self) -> None:
        self._built: dict[tuple[str, str], str] = {}

    def standin(self, major: str) -> standins.Standin:
        key = ("standin", major)
        if key not in self._built:
            self._built[key] = standins.ensure_standin(major).tag
        return standins.STANDINS[major]

    def image(self, kind: str, major: str) -> str:
        key = (kind, major)
        if key not in self._built:
            self._built[key] = standins.ensure_image(kind, major)
        return self._built[key]


@pytest.fixture
def names(engine: str) -> Iterator[Names]:
    """Unique names for one test's containers and volumes; all removed in teardown."""
    registry = Names()
    yield registry
    registry.cleanup()


class Names:
    def __init__(self) -> None:
        self.prefix = f"pgft-{uuid.uuid4().hex[:8]}"
        self.containers: list[str] = []
        self.volumes: list[str] = []
        self.stacks: list[str] = []

    def container(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        self.containers.append(name)
        return name

    def volume(self, role: str = "data") -> str:
        name = f"{self.prefix}-{role}"
        self.volumes.append(name)
        return name

    def stack(self, role: str = "db") -> str:
        name = f"{self.prefix}-{role}".replace("-", "_")
        self.stacks.append(name)
        return name

    def cleanup(self) -> None:
        d.remove("stack", self.stacks)
        if self.stacks:
            d.wait_stacks_gone(self.stacks)
        d.remove("container", self.containers)
        d.remove("volume", self.volumes)
