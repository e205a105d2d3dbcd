"""Takeover claims: how they are named, how a claim another process holds is waited out,
and the operator release's delete under one.

A contender that replaces a lock state, and an operator release that deletes one, first
create the claim file of that state (`LockFile.takeover`, `LockFile.remove`), so that of
all who decide at once exactly one goes on. A claimer that crashed, or stalled past its
own limit (`claim_limit`), leaves its claim behind; whoever meets it waits until it (and
the lock) stayed unchanged for `claim_abandoned_after`, at least twice any claimer's
limit, so that no claimer within its limit is ever overtaken, and then uses the next
attempt's claim.
"""

from __future__ import annotations

from pgfence import clock, log
from pgfence.backends.file.lockfile import LockFile, Outcome, Snapshot
from pgfence.record import LockRecord, generation_of
from pgfence.timings import claim_abandoned_after, takeover_silence

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pgfence.backends.base import Sleep
    from pgfence.record import Holder


def claim_name(holder: Holder | None, attempt: int | None) -> str:
    """The takeover claim of `holder`'s lock state for `attempt` (a release uses the
    first; None: the prefix of all attempts). It depends on the lock alone, so every
    contender, releaser and the holder itself name the same claim for the same state:
    `<generation + 1>-<attempt>`."""
    generation = generation_of(holder) if holder is not None else 0
    return f"{generation + 1}-{'' if attempt is None else attempt}"


class ClaimWait:
    """The claim to take on one lock state, moving past claims that look abandoned. The
    caller makes a new one whenever the lock changes: a new state has new claims.

    `needed` is the silence the caller waits for before it claims (0 for a release of a
    lock without heartbeat)."""

    def __init__(self, holder: Holder | None, needed: float) -> None:
        self._holder = holder
        self.abandoned_after = claim_abandoned_after(holder, needed)
        self._attempt = 1
        self._seen: tuple[str, bytes, float] | None = None  # claim, its content, since

    def claim(self) -> str:
        return claim_name(self._holder, self._attempt)

    def held(self, content: bytes, now: float) -> bool:
        """The claim was found held, with `content`, at `now`, the lock unchanged. True if
        that is news (another claim or claimer than before). Once the same claimer held it
        for `abandoned_after`, it has stopped (crashed, or stalled past its own limit,
        which is at most half as long): the next attempt's claim is used."""
        claim = self.claim()
        if self._seen is None or self._seen[:2] != (claim, content):
            self._seen = (claim, content, now)
            return True
        if now - self._seen[2] >= self.abandoned_after:
            log.event(
                "claim_abandoned",
                f"takeover claim {claim} looks abandoned; trying the next one",
                level="warning",
                claim=claim,
            )
            self._attempt += 1
        return False


def remove_under_claim(
    lockfile: LockFile, snapshot: Snapshot, holder: Holder | None, poll: float, sleep: Sleep
) -> Outcome:
    """Delete `snapshot` under the takeover claim of that state, so a release and a
    takeover of the same lock exclude each other and a release never deletes a fresh
    takeover. A claim left by a contender that died stays: after watching it (and the
    lock) unchanged as long as a contender would, move on to the next attempt's.
    Outcome(False, what the lock holds now) when the lock changed: nothing deleted."""
    needed = takeover_silence(holder) if isinstance(holder, LockRecord) else 0.0
    claims = ClaimWait(holder, needed)
    while True:
        claim = claims.claim()
        outcome = lockfile.remove(snapshot, claim)
        if outcome.ok:
            if isinstance(holder, LockRecord):
                # That state is gone: claims left on it protect nothing. (One-line
                # locks all share claim names, so theirs stay.)
                lockfile.remove_claims(claim_name(holder, None))
            return outcome
        busy = lockfile.read_claim(claim) if outcome.busy else None
        current = lockfile.read()
        if current != snapshot:
            return Outcome(False, current)
        if busy is None:
            continue  # the claimer finished meanwhile: look again
        if claims.held(busy, clock.now()):
            log.event(
                "waiting",
                f"{lockfile.path} has a takeover claim {claim}; waiting to see whether its "
                f"claimer is alive (up to {claims.abandoned_after:.3g} s)",
                claim=claim,
            )
        sleep(poll)
