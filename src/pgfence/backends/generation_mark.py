"""The highest generation handed out on a data directory, kept beside it.

etcd's create revision, the etcd backend's fencing token, goes back when etcd is
restored from a snapshot or replaced by a new cluster. The mark lives in
`<lock file>.generation`, the file the file backend keeps for the same purpose, so the
generation only grows on a data directory across restores, new clusters and switches
between backends. Only a holder writes it, before it starts its command.
"""

from __future__ import annotations

import os

from pgfence import log
from pgfence.errors import LockFormatError
from pgfence.lockfile import LockFile

SIDECAR = "generation"


class GenerationMark:
    def __init__(self, lock_file: str, instance: str) -> None:
        self._file = LockFile(lock_file, instance)
        self.path = f"{self._file.path}.{SIDECAR}"

    def last(self) -> int | None:
        """The mark (0 if none yet); None, with a warning, when the lock file's directory
        does not exist, so that no mark can be kept."""
        if not os.path.isdir(self._file.directory):
            log.event(
                "generation",
                f"no generation mark kept ({self._file.directory} does not exist): "
                "PGFENCE_GENERATION is the etcd create revision, which goes back if etcd is "
                "restored from a snapshot or replaced; set FENCE_LOCK_FILE to a path on "
                "the data volume",
                level="warning",
            )
            return None
        data = self._file.read_sidecar(SIDECAR)
        if data is None:
            return 0
        text = data.decode("ascii", "replace").strip()
        if not text.isdigit() or len(text) > 18:
            raise LockFormatError(
                f"{self.path} does not hold a generation number; restore it, or remove it "
                "if no server runs on this data directory"
            )
        return int(text)

    def record(self, generation: int) -> None:
        """Durably replace the mark (fsynced, like the file backend's)."""
        self._file.write_sidecar(SIDECAR, f"{generation}\n".encode())
