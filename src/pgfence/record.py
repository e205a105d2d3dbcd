"""What a lock file says, and how it is written and read.

The first line is always the holder's token, so `cat fence_lock` tells an operator who
holds it, exactly as with the shell script pgfence replaces. A file of one line (with or
without a trailing newline) is such a script's lock and keeps that meaning. pgfence writes
more lines below the token:

    db-1
    pgfence-lock 1
    instance=5f0c3a9e7b1d2468
    mode=strict
    generation=4
    heartbeat=117
    ...

A record with `interval=0` (strict mode, heartbeat 0) comes from a holder that never
renews: the POSIX sh shim (`pgfence export-shim`), which execs the server and is gone.
It is read as a ShimLock and judged exactly like a one-line lock (no liveness to tell;
the same token may take it, another never does).

Parsing is strict: anything pgfence did not write is refused (fail closed) rather than
guessed at, and a newer format version is refused rather than half understood.
"""

from __future__ import annotations

import os

from pgfence.errors import LockFormatError
from pgfence.frozen import Struct

MAGIC = "pgfence-lock 1"
MAGIC_PREFIX = "pgfence-lock "
TOKEN_MAX_BYTES = 255
MAX_LOCK_BYTES = 4096
MODES = ("strict", "lease")
_HEX = frozenset("0123456789abcdef")


def token_problem(token: str) -> str | None:
    """Why `token` cannot name a holder, or None when it can."""
    if token == "":
        return "is empty"
    if token.strip() == "":
        return "is blank"
    if "\n" in token or "\r" in token:
        return "spans several lines"
    if len(token.encode("utf-8", "surrogateescape")) > TOKEN_MAX_BYTES:
        return f"is longer than {TOKEN_MAX_BYTES} bytes"
    if not token.isprintable():
        return "contains control characters"
    if token != token.strip():
        return "starts or ends with white space"
    return None


def new_instance_id() -> str:
    """A random id for one pgfence process; tells apart two holders with the same token."""
    return os.urandom(8).hex()


class LegacyLock(Struct):
    """A one-line lock written by the shell script: just a token, no heartbeat."""

    token: str

    def describe(self) -> str:
        return f"token {self.token!r} (one-line lock without heartbeat)"


class ShimLock(LegacyLock):
    """A full record whose holder never renews it (`interval=0`): written by the POSIX sh
    shim. Judged like a one-line lock; `record` keeps what it says for `status`."""

    record: LockRecord

    def describe(self) -> str:
        return (
            f"token {self.token!r} (sh shim lock without heartbeat, generation "
            f"{self.record.generation}, pid {self.record.pid} on {self.record.host})"
        )


class LockRecord(Struct):
    """A lock written by pgfence."""

    token: str
    instance: str
    mode: str  # "strict" or "lease"
    generation: int  # fencing token: increases on every acquisition
    heartbeat: int  # increases on every renewal
    interval: float  # seconds between the holder's renewals
    ttl: float  # lease mode: how long a silent lease stays valid (0 in strict mode)
    lock_delay: float  # lease mode: extra wait before a takeover (0 in strict mode)
    pid: int
    host: str  # kernel hostname of the holder, for humans
    boot_id: str  # with `clock`: lets a reader on the same boot compute the heartbeat's age
    clock: float  # holder's monotonic clock at this heartbeat
    acquired_at: str  # wall clock, for humans only
    heartbeat_at: str  # wall clock, for humans only

    def describe(self) -> str:
        return (
            f"token {self.token!r} (instance {self.instance}, {self.mode} mode, "
            f"generation {self.generation})"
        )

    def beat(self) -> tuple[str, int, int]:
        """What changes on every renewal; readers compare these, never timestamps."""
        return (self.instance, self.generation, self.heartbeat)

    def next_beat(self, clock: float, wall: str) -> LockRecord:
        return self.replace(heartbeat=self.heartbeat + 1, clock=clock, heartbeat_at=wall)

    def encode(self) -> bytes:
        fields = [
            ("instance", self.instance),
            ("mode", self.mode),
            ("generation", str(self.generation)),
            ("heartbeat", str(self.heartbeat)),
            ("interval", _fmt(self.interval)),
            ("ttl", _fmt(self.ttl)),
            ("lock_delay", _fmt(self.lock_delay)),
            ("pid", str(self.pid)),
            ("host", self.host),
            ("boot_id", self.boot_id),
            ("clock", f"{self.clock:.3f}"),
            ("acquired_at", self.acquired_at),
            ("heartbeat_at", self.heartbeat_at),
        ]
        lines = [self.token, MAGIC, *(f"{k}={v}" for k, v in fields)]
        return ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")


TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Union

    Holder = Union[LegacyLock, LockRecord]


def generation_of(holder: Holder) -> int:
    """The generation a lock records: a pgfence record's, a sh shim lock's, or 0 for a
    one-line lock, which records none."""
    if isinstance(holder, ShimLock):
        return holder.record.generation
    return holder.generation if isinstance(holder, LockRecord) else 0


def _fmt(value: float) -> str:
    return f"{value:g}"


def parse(data: bytes, path: str) -> Holder:
    """Read lock content; raise LockFormatError for anything pgfence did not write."""

    def bad(why: str) -> LockFormatError:
        return LockFormatError(
            f"lock file {path} {why}; inspect it, and if no server runs on this data "
            "directory clear it with `pgfence release --force`"
        )

    if len(data) > MAX_LOCK_BYTES:
        raise bad(f"is larger than {MAX_LOCK_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise bad("is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
    lines = text.split("\n")
    token = lines[0]
    problem = token_problem(token)
    if problem:
        raise bad(f"has a first line (the holder's token) that {problem}")
    if len(lines) == 1:
        return LegacyLock(token)
    if lines[1] != MAGIC:
        if lines[1].startswith(MAGIC_PREFIX):
            raise bad(f"uses format {lines[1]!r}, newer than this pgfence understands")
        raise bad("has more than one line but no pgfence header")
    fields: dict[str, str] = {}
    for line in lines[2:]:
        key, sep, value = line.partition("=")
        if not sep or key in fields:
            raise bad(f"has a malformed line {line[:40]!r}")
        fields[key] = value
    return _record(token, fields, bad)


_FIELDS = (
    "instance",
    "mode",
    "generation",
    "heartbeat",
    "interval",
    "ttl",
    "lock_delay",
    "pid",
    "host",
    "boot_id",
    "clock",
    "acquired_at",
    "heartbeat_at",
)


def _record(token: str, fields: dict[str, str], bad: Callable[[str], LockFormatError]) -> Holder:
    missing = [k for k in _FIELDS if k not in fields]
    unknown = [k for k in fields if k not in _FIELDS]
    if missing or unknown:
        raise bad(f"has unknown or missing fields ({', '.join(missing + unknown)})")

    def integer(key: str) -> int:
        value = fields[key]
        # isascii(): str.isdigit() also accepts "²" (int() raises) and "٣" (int() takes it).
        if not (value.isascii() and value.isdigit()) or len(value) > 18:
            raise bad(f"has a bad {key} {value[:20]!r}")
        return int(value)

    def seconds(key: str) -> float:
        text = fields[key]
        digits = text.replace(".", "", 1)
        if not (digits.isascii() and digits.isdigit()) or len(text) > 20:
            raise bad(f"has a bad {key} {text[:20]!r}")
        value = float(text)
        if not (0 <= value < 1e9):
            raise bad(f"has an out-of-range {key}")
        return value

    def text(key: str, limit: int) -> str:
        value = fields[key]
        if len(value) > limit or not value.isprintable():
            raise bad(f"has a bad {key}")
        return value

    instance = fields["instance"]
    if len(instance) != 16 or not set(instance) <= _HEX:
        raise bad("has a bad instance id")
    mode = fields["mode"]
    if mode not in MODES:
        raise bad(f"has an unknown mode {mode[:20]!r}")
    record = LockRecord(
        token=token,
        instance=instance,
        mode=mode,
        generation=integer("generation"),
        heartbeat=integer("heartbeat"),
        interval=seconds("interval"),
        ttl=seconds("ttl"),
        lock_delay=seconds("lock_delay"),
        pid=integer("pid"),
        host=text("host", 255),
        boot_id=text("boot_id", 64),
        clock=seconds("clock"),
        acquired_at=text("acquired_at", 40),
        heartbeat_at=text("heartbeat_at", 40),
    )
    if record.interval == 0 and mode == "strict" and record.heartbeat == 0:
        return ShimLock(token, record)
    if record.interval <= 0 or (mode == "lease" and record.ttl <= 0):
        raise bad("has a zero renewal interval or TTL")
    return record
