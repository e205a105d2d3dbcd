"""The workload of `pgfence verify-fs`: what one participant does to the shared directory.

Two loops run side by side for the test's duration, each doing exactly what the file backend
relies on, and recording what it saw:

- `Hammer` (main thread) contends for one lock by exclusive create, alternating the link(2)
  technique and O_EXCL. Inside each hold it creates an `occupant` file exclusively, reads the
  `counter` the previous holder wrote, writes the next value (temp file + rename), reads it
  back, holds briefly, reads it again and releases. Another holder inside at the same time, a
  counter that moved under us, or a value two holders both read (a lost update: a stale read
  after a handoff, or an overlap) is exactly what would let two servers start.
- `Prober` (a thread) rewrites `ping.<id>` (rename) every few tens of milliseconds, echoes
  every peer's newest ping into `pong.<peer>.<id>`, and times each of its pings until each
  peer's echo becomes visible: a round trip on this participant's own monotonic clock, so no
  two machines' clocks are ever compared. A value that goes backwards or a torn file is a
  broken rename.

All times are this machine's CLOCK_BOOTTIME (pgfence.clock): comparable between participants
only when they share a boot id (same machine).
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from dataclasses import dataclass, field

from pgfence import clock

PROBE_EVERY = 0.05  # seconds between two pings of one participant
POLL_EVERY = 0.005  # seconds between two looks at the peers' files
HOLD_MAX = 0.002  # longest extra sleep inside a hold (widens any overlap window)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass
class Findings:
    """What one participant observed; written to result/<id>.json for everyone to judge."""

    holds: list[list[object]] = field(default_factory=list)  # [start, end, seq_read, prev_id]
    link_holds: int = 0
    excl_holds: int = 0
    overlaps: list[str] = field(default_factory=list)  # one line each
    torn: list[str] = field(default_factory=list)
    regressions: list[str] = field(default_factory=list)
    lag: dict[str, list[float]] = field(default_factory=dict)  # peer id -> round trips (s)
    errors: dict[str, int] = field(default_factory=dict)  # errno name -> count

    def error(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        self.errors[name] = self.errors.get(name, 0) + 1


class Files:
    """Small whole-file reads and atomic writes in the session directory."""

    def __init__(self, root: str, me: str) -> None:
        self.root = root
        self.me = me
        self._serial = 0
        self._lock = threading.Lock()  # the two loops share the temp-name counter

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    def read(self, name: str, whole: bool = False) -> str | None:
        """The file's text (its first 4 KiB unless `whole`), or None if it does not exist."""
        try:
            fd = os.open(self.path(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            chunks = [os.read(fd, 4096)]
            while whole and chunks[-1]:
                chunks.append(os.read(fd, 1 << 20))
            return b"".join(chunks).decode("utf-8", "replace")
        finally:
            os.close(fd)

    def temp(self, data: str) -> str:
        with self._lock:
            self._serial += 1
            name = self.path(f".tmp.{self.me}.{os.getpid()}.{self._serial}")
        fd = os.open(name, _CREATE, 0o644)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return name

    def replace(self, name: str, data: str) -> None:
        temp = self.temp(data)
        try:
            os.rename(temp, self.path(name))
        except OSError:
            _unlink(temp)
            raise

    def create(self, name: str, data: str, use_link: bool) -> bool:
        """Exclusive create, by link(2) of a complete temp file or by O_EXCL."""
        target = self.path(name)
        if not use_link:
            try:
                fd = os.open(target, _CREATE, 0o644)
            except FileExistsError:
                return False
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
            return True
        temp = self.temp(data)
        try:
            os.link(temp, target)
            return True
        except FileExistsError:
            return False
        except OSError:
            # A retransmitted LINK may report failure although it succeeded (NFS).
            if os.lstat(temp).st_nlink == 2:
                return True
            raise
        finally:
            _unlink(temp)


class Hammer:
    def __init__(self, files: Files, findings: Findings) -> None:
        self.files = files
        self.found = findings
        self.me = files.me
        self._rng = random.Random()

    def run(self, until: float) -> None:
        attempt = 0
        while clock.now() < until:
            attempt += 1
            use_link = attempt % 2 == 0
            try:
                held = self.files.create("lock", self.me, use_link)
            except OSError as exc:
                self.found.error(exc)
                held = False
            if held:
                self._hold(use_link)
                time.sleep(self._rng.uniform(0, 0.002))  # let the others in
            else:
                time.sleep(self._rng.uniform(0, 0.001))

    def _hold(self, use_link: bool) -> None:
        start = clock.now()
        own_occupant = False
        try:
            own_occupant = self.files.create("occupant", self.me, use_link=False)
            if not own_occupant:
                other = (self.files.read("occupant") or "?").strip()
                self.found.overlaps.append(f"{self.me} got the lock while {other} was inside")
            text = self.files.read("counter")
            seq, prev = self._parse_counter(text)
            if seq is None:
                return
            mine = f"{seq + 1} {self.me}\n"
            self.files.replace("counter", mine)
            again = self.files.read("counter")
            time.sleep(self._rng.uniform(0, HOLD_MAX))
            last = self.files.read("counter")
            for seen in (again, last):
                if seen != mine:
                    self.found.overlaps.append(
                        f"{self.me} wrote {mine.strip()!r} under the lock but read back "
                        f"{(seen or '(none)').strip()!r}"
                    )
                    break
            end = clock.now()
            self.found.holds.append([start, end, seq, prev])
            if use_link:
                self.found.link_holds += 1
            else:
                self.found.excl_holds += 1
        except OSError as exc:
            self.found.error(exc)
        finally:
            self._release(own_occupant)

    def _parse_counter(self, text: str | None) -> tuple[int | None, str | None]:
        if text is None:
            return 0, None
        parts = text.split()
        if len(parts) != 2 or not _digits(parts[0]) or not text.endswith("\n"):
            self.found.torn.append(f"counter read as {text[:40]!r}")
            return None, None
        return int(parts[0]), parts[1]

    def _release(self, own_occupant: bool) -> None:
        for name, ours in (("occupant", own_occupant), ("lock", True)):
            if not ours:
                continue
            for _ in range(3):
                try:
                    os.unlink(self.files.path(name))
                    break
                except FileNotFoundError:
                    if name == "lock":
                        self.found.overlaps.append(f"{self.me}'s lock vanished while held")
                    break
                except OSError as exc:
                    self.found.error(exc)
                    time.sleep(0.01)


class Prober(threading.Thread):
    """Pings, echoes the peers' pings, and times the round trips (see module docstring)."""

    def __init__(self, files: Files, findings: Findings, peers: list[str]) -> None:
        super().__init__(name="pgfence-verify-probe", daemon=True)
        self.files = files
        self.found = findings
        self.peers = [p for p in peers if p != files.me]
        self.measuring = True  # cleared at the end of the test window; echoes go on
        self.stopping = threading.Event()
        self._sent: dict[int, float] = {}
        self._seen_ping = dict.fromkeys(self.peers, 0)
        self._seen_pong = dict.fromkeys(self.peers, 0)

    def run(self) -> None:
        serial = 0
        next_ping = clock.now()
        while not self.stopping.wait(POLL_EVERY):
            now = clock.now()
            try:
                if self.measuring and now >= next_ping:
                    serial += 1
                    self._sent[serial] = now
                    self.files.replace(f"ping.{self.files.me}", f"{serial}\n")
                    next_ping = now + PROBE_EVERY
                for peer in self.peers:
                    self._echo(peer)
                    self._collect(peer)
            except OSError as exc:
                self.found.error(exc)

    def _value(self, name: str, last: int) -> int | None:
        """The newest value in `name` if it moved forward since `last`."""
        text = self.files.read(name)
        if text is None:
            return None
        if not (text.endswith("\n") and _digits(text[:-1])):
            self.found.torn.append(f"{name} read as {text[:40]!r}")
            return None
        value = int(text)
        if value < last:
            self.found.regressions.append(f"{name} went back from {last} to {value}")
        return value if value > last else None

    def _echo(self, peer: str) -> None:
        value = self._value(f"ping.{peer}", self._seen_ping[peer])
        if value is not None:
            self._seen_ping[peer] = value
            self.files.replace(f"pong.{peer}.{self.files.me}", f"{value}\n")

    def _collect(self, peer: str) -> None:
        value = self._value(f"pong.{self.files.me}.{peer}", self._seen_pong[peer])
        if value is None:
            return
        self._seen_pong[peer] = value
        sent = self._sent.get(value)
        if sent is not None and self.measuring:
            self.found.lag.setdefault(peer, []).append(round(clock.now() - sent, 6))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()
