"""Atomic operations on the lock file and its neighbours, with no knowledge of their format.

Every write goes to a fresh temporary file in the same directory, is fsynced, and then
appears under its final name in one step (link(2) or rename(2)), followed by an fsync of
the directory. A reader therefore sees the old content or the new, never a mix, and the
lock path never goes missing while it is being rewritten (a missing lock means "free").

- `create` uses the link(2) technique: link succeeds for exactly one process even across
  NFS clients (open(2), O_EXCL notes), and a lost reply is recognised by the link count.
- `renew` replaces the holder's own lock: it verifies the content is still what the holder
  wrote last, then renames over it.
- `takeover` replaces someone else's lock only if it still holds what the caller observed.
  Contenders first create a claim file named after the takeover (again with link(2)), so
  of many that decide at once exactly one goes on to verify and rename.
- `remove` deletes a lock only if it still holds what the caller observed, under the same
  claim a takeover of that state takes, and (for its holder) only before its deadline.
- `raise_generation` moves `<lock>.generation` up, never down; acquisitions reserve their
  generation there before they create or take over the lock.

A symlink at the lock path is refused (O_NOFOLLOW), never followed.
"""

from __future__ import annotations

import errno
import os
import stat

from pgfence.errors import LockFormatError, StorageError, storage_error
from pgfence.frozen import Struct
from pgfence.record import MAX_LOCK_BYTES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

GENERATION_SUFFIX = "generation"  # `<lock>.generation`: the highest generation handed out
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class Snapshot(Struct):
    """The lock file's bytes as read once. Two snapshots are the same lock state only if
    their bytes are equal: every write creates a new inode with a new heartbeat."""

    data: bytes


class Outcome(Struct):
    """Result of a conditional write: `ok`, or what was found instead (None: no file),
    or `busy`: another process holds the claim for this very change."""

    ok: bool
    found: Snapshot | None = None
    busy: bool = False


class NotDurable(StorageError):
    """The new content is in place (readers see it) but the directory fsync failed."""


class LockFile:
    def __init__(self, path: str, instance: str) -> None:
        self.path = os.path.abspath(path)
        self.directory, self.name = os.path.split(self.path)
        self._instance = instance
        self._temp_counter = 0

    # -- reading ---------------------------------------------------------------------

    def read(self) -> Snapshot | None:
        """The lock's current content, or None when there is no lock file."""
        data = self._read_regular(self.path, "lock file")
        return None if data is None else Snapshot(data)

    def _read_regular(self, path: str, what: str) -> bytes | None:
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            self._check_directory()
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StorageError(
                    f"{path} is a symlink; pgfence never follows one at the lock path "
                    "(remove it, or point FENCE_LOCK_FILE at a plain file)"
                ) from None
            raise storage_error(exc, f"read {what}", path) from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise StorageError(
                    f"{path} is a directory, not a {what}; remove it or fix FENCE_LOCK_FILE"
                )
            if not stat.S_ISREG(mode):
                raise StorageError(
                    f"{path} is not a regular file; remove it or fix FENCE_LOCK_FILE"
                )
            chunks = []
            size = 0
            while size <= MAX_LOCK_BYTES:
                chunk = os.read(fd, MAX_LOCK_BYTES + 1 - size)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks)
        except OSError as exc:
            raise storage_error(exc, f"read {what}", path) from None
        finally:
            os.close(fd)

    def _check_directory(self) -> None:
        if not os.path.isdir(self.directory):
            raise StorageError(
                f"lock directory {self.directory} does not exist or is not a directory; "
                "create it on the data volume, or fix FENCE_LOCK_FILE"
            )

    # -- writing ---------------------------------------------------------------------

    def create(self, data: bytes) -> bool:
        """Create the lock with `data` if there is none. True for exactly one caller."""
        temp = self._write_temp(data)
        try:
            won = self._link(temp, self.path)
            if won:
                self._sync_directory()
            return won
        finally:
            self._unlink_quietly(temp)

    def renew(self, expected: Snapshot, data: bytes, guard: Callable[[], bool]) -> Outcome:
        """Replace our own lock, if it still holds `expected` and `guard()`, with `data`."""
        temp = self._write_temp(data)
        try:
            # The temp file is complete before we look, so the window between the
            # checks and the rename is one system call.
            current = self.read()
            if current != expected or not guard():
                return Outcome(False, current)
            self._rename(temp, self.path)
            temp = ""
            try:
                self._sync_directory()
            except StorageError as exc:
                raise NotDurable(exc.message) from None
            return Outcome(True)
        finally:
            if temp:
                self._unlink_quietly(temp)

    def takeover(
        self,
        expected: Snapshot,
        data: bytes | Callable[[], bytes],
        claim: str,
        guard: Callable[[], bool],
    ) -> Outcome:
        """Replace another holder's lock with `data` if it still holds `expected`.

        `claim` names this takeover (the new generation and an attempt number); the claim
        file makes concurrent takeovers of the same state mutually exclusive. Outcome.ok
        is False with busy=True when another contender holds the claim. `guard()` is
        checked just before the rename (a claimer that stalled too long gives up), and
        again before the claim is freed: a claim held past the guard's limit may have
        been judged abandoned by contenders that moved on to the next attempt's claim,
        and freeing it would let one still on this attempt take it too, so that two
        claimers replace the lock. Such a claim stays until the winner removes it.
        """
        claim_path = self.claim_path(claim)
        if not self._link_new(claim_path, self._claim_content()):
            return Outcome(False, None, busy=True)
        temp = ""
        replaced = False
        try:
            temp = self._write_temp(data if isinstance(data, bytes) else data())
            current = self.read()
            if current != expected or not guard():
                return Outcome(False, current)
            self._rename(temp, self.path)
            temp = ""
            replaced = True
            self._sync_directory()
            return Outcome(True)
        finally:
            if temp:
                self._unlink_quietly(temp)
            if replaced or guard():
                self._unlink_quietly(claim_path)

    def remove(
        self,
        expected: Snapshot,
        claim: str,
        guard: Callable[[], bool] | None = None,
        refill: bytes | None = None,
    ) -> Outcome:
        """Delete the lock if it still holds `expected`, under the takeover `claim` of that
        state (a release and a takeover of the same state exclude each other).

        `guard()` (the holder's deadline) is checked immediately before the unlink, after
        the claim, the read and the compare, so a pause anywhere before it is caught. A
        pause in the unlink itself is not: if `guard()` fails right after it, the unlink
        may have landed late, on a successor's lock, and the path is filled again at once
        with `refill` (create-only, so it never displaces a lock): a third contender
        then has to wait out that lock's silence instead of creating one at once, and the
        successor stops at its next renewal. Outcome.ok is then False.

        The claim is freed if the lock was deleted (its state is gone, so the claim
        protects nothing), or if `guard()` still allows; a claim held past the guard's
        limit stays, for the same reason as in `takeover`, until a winner removes it.
        """
        claim_path = self.claim_path(claim)
        refill_temp = self._write_temp(refill) if refill is not None else ""
        removed = False
        try:
            if not self._link_new(claim_path, self._claim_content()):
                return Outcome(False, None, busy=True)
            try:
                current = self.read()
                if current != expected or (guard is not None and not guard()):
                    return Outcome(False, current)
                try:
                    os.unlink(self.path)
                except OSError as exc:
                    raise storage_error(exc, "remove lock file", self.path) from None
                removed = True
                if refill_temp and guard is not None and not guard():
                    self._link(refill_temp, self.path)
                    self._sync_directory()
                    return Outcome(False, None)
                self._sync_directory()
                return Outcome(True)
            finally:
                if removed or guard is None or guard():
                    self._unlink_quietly(claim_path)
        finally:
            if refill_temp:
                self._unlink_quietly(refill_temp)

    def claim_path(self, claim: str) -> str:
        return f"{self.path}.takeover-{claim}"

    def read_claim(self, claim: str) -> bytes | None:
        return self._read_regular(self.claim_path(claim), "takeover claim")

    def remove_claims(self, prefix: str) -> None:
        """Remove leftover claims `<lock>.takeover-<prefix>*` (after a won takeover)."""
        start = f"{self.name}.takeover-{prefix}"
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name.startswith(start):
                self._unlink_quietly(os.path.join(self.directory, name))

    def read_generation(self) -> tuple[int, str]:
        """The generation file: (the highest generation handed out or reserved, and the
        instance that won it, "" while it is only reserved); (0, "") when absent.

        It is kept twice, `<lock>.generation` and `<lock>.generation.mirror`, each raised
        by its own compare-then-rename, and read as the larger: a writer that pauses
        between its last read and its rename can lower the one file it was renaming,
        never both (see `raise_generation`)."""
        return max(self._read_generation_file(path) for path in self._generation_paths())

    def raise_generation(
        self, value: int, owner: str = "", guard: Callable[[], bool] | None = None
    ) -> int:
        """Make the generation file say at least `value` (with `owner`: won by it), durably;
        it never moves down. Returns the generation it holds afterwards.

        Each copy is re-read once the new content is complete, just before its rename, so
        a writer that read an older value and writes late does not lower it; a writer that
        pauses exactly between that read and the rename lowers that copy only, while the
        other keeps the highest value (every writer raises both, one after the other).
        `guard()`, when given, is checked before each rename too (a holder past its
        deadline writes nothing).
        """
        data = (f"{value} {owner}\n" if owner else f"{value}\n").encode()

        def holds_enough(found: tuple[int, str]) -> bool:
            current, current_owner = found
            return current > value or (current == value and bool(current_owner or not owner))

        for path in self._generation_paths():
            if holds_enough(self._read_generation_file(path)):
                continue
            temp = self._write_temp(data)
            try:
                if holds_enough(self._read_generation_file(path)):
                    continue
                if guard is not None and not guard():
                    return self.read_generation()[0]
                self._rename(temp, path)
                temp = ""
                self._sync_directory()
            finally:
                if temp:
                    self._unlink_quietly(temp)
        return max(value, self.read_generation()[0])

    def _generation_paths(self) -> tuple[str, str]:
        primary = f"{self.path}.{GENERATION_SUFFIX}"
        return primary, f"{primary}.mirror"

    def _read_generation_file(self, path: str) -> tuple[int, str]:
        data = self._read_regular(path, "generation file")
        if data is None:
            return 0, ""
        words = data.decode("ascii", "replace").split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or len(words[0]) > 18:
            raise LockFormatError(
                f"{path} does not hold a generation number; "
                "restore it, or remove it if no server runs on this data directory"
            )
        return int(words[0]), words[1] if len(words) == 2 else ""

    # -- primitives ------------------------------------------------------------------

    def _claim_content(self) -> bytes:
        return f"instance={self._instance}\npid={os.getpid()}\n".encode()

    def _link_new(self, path: str, data: bytes) -> bool:
        temp = self._write_temp(data)
        try:
            return self._link(temp, path)
        finally:
            self._unlink_quietly(temp)

    def _write_temp(self, data: bytes) -> str:
        self._temp_counter += 1
        temp = os.path.join(
            self.directory, f".{self.name}.{self._instance}.{os.getpid()}.{self._temp_counter}.tmp"
        )
        try:
            fd = os.open(temp, _CREATE_FLAGS, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                self._check_directory()
            raise storage_error(exc, "write a file in", self.directory) from None
        try:
            self._own_like_directory(fd)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            self._unlink_quietly(temp)
            raise storage_error(exc, "write a file in", self.directory) from None
        os.close(fd)
        return temp

    def _own_like_directory(self, fd: int) -> None:
        """As root, give our file the lock directory's owner. The official entrypoint, as
        root, chowns everything in PGDATA not owned by postgres (`find ... -exec chown`),
        and fails when one of our short-lived files vanishes under it; a file that is
        already the directory owner's is not among them. Refused (NFS root_squash): the
        file stays root's, which changes nothing else."""
        if os.geteuid() != 0:
            return
        owner = os.stat(self.directory)
        if owner.st_uid != 0:
            try:
                os.fchown(fd, owner.st_uid, owner.st_gid)
            except PermissionError:
                pass

    def _link(self, source: str, target: str) -> bool:
        try:
            os.link(source, target)
            return True
        except FileExistsError:
            pass
        except OSError as exc:
            # NFS: a retransmitted LINK may report failure although the first one
            # succeeded; the link count of our unique file tells the truth.
            if not self._has_two_links(source):
                raise storage_error(exc, "create", target) from None
            return True
        return self._has_two_links(source)

    @staticmethod
    def _has_two_links(path: str) -> bool:
        try:
            return os.lstat(path).st_nlink == 2
        except OSError:
            return False

    def _rename(self, source: str, target: str) -> None:
        try:
            os.rename(source, target)
        except OSError as exc:
            raise storage_error(exc, "replace", target) from None

    def _sync_directory(self) -> None:
        try:
            fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise storage_error(exc, "open directory", self.directory) from None
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some filesystems refuse fsync on directories; the rename is still atomic.
            if exc.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
                raise storage_error(exc, "sync directory", self.directory) from None
        finally:
            os.close(fd)

    @staticmethod
    def _unlink_quietly(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass
