"""Which pgfence instance holds a fence from this container: a small file off the volume.

The lock names its holder by token and instance id. The token alone cannot tell the
holder's container from a waiting contender when both have the same token (a Swarm
hostname template gives every task of a service the same hostname), so `pgfence run`
writes the instance id of the fence it holds to a file local to its container, keyed
by the lock's location, and `check` is healthy only where that file names the lock's
holder. A file left by an earlier run (a restart) names another instance: unhealthy,
as it should be. Nothing here decides who holds the fence; it only answers health checks.

Where: $FENCE_RUNTIME_DIR if set, else the first of /run/pgfence, $XDG_RUNTIME_DIR/pgfence,
/tmp/pgfence-<uid> and /run/postgresql/pgfence-<uid> (PostgreSQL's socket directory in the
official images: writable wherever the server runs, also on a read-only root filesystem
with a tmpfs there) that this user can write. `check` may run as another user than `run`
(a HEALTHCHECK as root, the shim as postgres), so it looks in all of them.
"""

from __future__ import annotations

import os

from pgfence import log
from pgfence.backends.base import Backend, Hold, LockState

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping

    from pgfence.backends.base import Sleep

RUN_DIR = "/run/pgfence"
TMP_DIR = "/tmp"
SOCKET_DIR = "/run/postgresql"
TMP_PREFIX = "pgfence-"


def _shared_bases() -> tuple[str, ...]:
    """Directories every user may write, where each uid gets its own pgfence-<uid>."""
    return (TMP_DIR, SOCKET_DIR)


def marker_name(location: str) -> str:
    """A file name for `location`: readable, short enough for any filesystem, with a
    checksum of the whole location. The file also holds the location, which readers
    compare, so a collision could only make `check` unhealthy, never healthy."""
    readable = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in location)
    return f"{readable[-120:].lstrip('_')}.{_fnv1a(location):016x}"


def _fnv1a(text: str) -> int:
    """64-bit FNV-1a: a stable checksum without importing hashlib (start-up cost)."""
    value = 0xCBF29CE484222325
    for byte in text.encode("utf-8", "surrogateescape"):
        value = ((value ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return value


def _directories(env: Mapping[str, str]) -> list[str]:
    configured = env.get("FENCE_RUNTIME_DIR")
    if configured:
        return [os.path.abspath(configured)]
    dirs = [RUN_DIR]
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        dirs.append(os.path.join(runtime, "pgfence"))
    dirs += [os.path.join(base, f"{TMP_PREFIX}{os.geteuid()}") for base in _shared_bases()]
    return dirs


def record(location: str, instance: str, env: Mapping[str, str]) -> str | None:
    """Note that `instance` holds `location` from here; the file's path, or None if no
    candidate directory could take it (then `check` reports unhealthy: fail safe)."""
    name = marker_name(location)
    configured = bool(env.get("FENCE_RUNTIME_DIR"))
    for directory in _directories(env):
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
            st = os.lstat(directory)
            if not os.path.isdir(directory) or (st.st_uid != os.geteuid() and not configured):
                continue  # someone else's directory (e.g. planted in /tmp): not ours
            path = os.path.join(directory, name)
            temp = f"{path}.{os.getpid()}.tmp"
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            try:
                os.write(fd, f"{instance}\n{location}\n".encode("utf-8", "surrogateescape"))
            finally:
                os.close(fd)
            os.replace(temp, path)
            return path
        except OSError:
            continue
    log.event(
        "error",
        f"cannot note the held fence in {', '.join(_directories(env))}; "
        "`pgfence check` in this container will report unhealthy",
        level="warning",
    )
    return None


def instances_here(location: str, env: Mapping[str, str]) -> set[str]:
    """Instance ids that a `pgfence run` in this container noted for `location`."""
    found = set()
    configured = bool(env.get("FENCE_RUNTIME_DIR"))
    for path in _candidates(location, env):
        try:
            st = os.lstat(path)
            # Only a file its directory's owner wrote (root, or the uid a pgfence-<uid>
            # directory is named after) counts; FENCE_RUNTIME_DIR is the operator's.
            owner = os.lstat(os.path.dirname(path)).st_uid
            if not (configured or st.st_uid in (0, owner)):
                continue
            with open(path, encoding="utf-8", errors="surrogateescape") as f:
                instance, _, rest = f.read(4096).partition("\n")
        except OSError:
            continue
        if rest.rstrip("\n") == location and instance:
            found.add(instance)
    return found


def _candidates(location: str, env: Mapping[str, str]) -> Iterator[str]:
    name = marker_name(location)
    if env.get("FENCE_RUNTIME_DIR"):
        yield os.path.join(_directories(env)[0], name)
        return
    yield os.path.join(RUN_DIR, name)
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isabs(runtime):
        yield os.path.join(runtime, "pgfence", name)
    for base in _shared_bases():
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for entry in names:
            suffix = entry[len(TMP_PREFIX) :]
            if entry.startswith(TMP_PREFIX) and suffix.isascii() and suffix.isdigit():
                directory = os.path.join(base, entry)
                try:
                    st = os.lstat(directory)
                except OSError:
                    continue
                if st.st_uid == int(suffix) and os.path.isdir(directory):
                    yield os.path.join(directory, name)


class Recorded(Backend):
    """`backend`, noting each fence it acquires for `check` (see the module's docstring)."""

    def __init__(self, backend: Backend, env: Mapping[str, str]) -> None:
        self._backend = backend
        self._env = env

    def location(self) -> str:
        return self._backend.location()

    def acquire(self, sleep: Sleep) -> Hold:
        hold = self._backend.acquire(sleep)
        record(self._backend.location(), hold.instance, self._env)
        return hold

    def state(self, observe: float | None, sleep: Sleep) -> LockState:
        return self._backend.state(observe, sleep)

    def release(self, force: bool, sleep: Sleep) -> str:
        return self._backend.release(force, sleep)

    def held_by_instance(self, instance: str) -> bool:
        return self._backend.held_by_instance(instance)
