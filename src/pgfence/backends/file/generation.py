"""The generation (fencing token) of a file lock: reserved before winning, confirmed after.

`<lock>.generation` holds the highest generation handed out or reserved, and the instance
that won it. A contender raises it (durably; it never moves down) to the number it will
use before it creates or takes over the lock, so a crash at any later point can only skip
that number, never hand it out twice: the next contender reads at least that number, and
an operator release raises the file to the generation of the lock it removes. The lock's
own generation is counted too.

Two contenders that read the same file reserve the same number; only one wins the lock.
The winner then marks the number as won. A contender that finds, once it holds the lock,
that its number was won by another instance meanwhile (who held and released the lock
while it was paused before creating its own), or that a later one was reserved, takes the
next free number and rewrites its fresh lock before it starts anything.
"""

from __future__ import annotations

from pgfence import clock
from pgfence.backends.file.lockfile import LockFile
from pgfence.record import generation_of

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pgfence.backends.file.backend import FileHold
    from pgfence.record import Holder


def reserve_generation(lockfile: LockFile, holder: Holder | None) -> int:
    """One more than any generation this lock has had (lock or generation file), written
    to the generation file before the lock is created or taken over."""
    last, _ = lockfile.read_generation()
    if holder is not None:
        last = max(last, generation_of(holder))
    wanted = last + 1
    while True:
        found = lockfile.raise_generation(wanted)
        if found == wanted:
            return wanted
        wanted = found + 1  # a contender reserved a later one meanwhile


def confirm_generation(lockfile: LockFile, hold: FileHold, started: float, deadline: float) -> None:
    """Mark `hold`'s generation as won by it, or move it to a new one (see above).

    We hold the lock, so no other contender can win meanwhile; a pause past the deadline
    here is caught by the check before the command starts, and the rewrite refuses to
    write past it.
    """

    def in_time() -> bool:
        return clock.now() - started < deadline

    generation = hold.generation
    while True:
        current, owner = lockfile.read_generation()
        if current == generation and owner in ("", hold.instance):
            if lockfile.raise_generation(generation, hold.instance, in_time) == generation:
                return
            continue
        generation = max(current, generation) + 1
        lockfile.raise_generation(generation, guard=in_time)
        hold.regenerate(generation, in_time)
