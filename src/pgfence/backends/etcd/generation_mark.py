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
from pgfence.backends.file.lockfile import LockFile


class GenerationMark:
    def __init__(self, lock_file: str, instance: str) -> None:
        self._file = LockFile(lock_file, instance)
        self._instance = instance

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
        last, _ = self._file.read_generation()  # 65 when it holds no number
        return last

    def record(self, generation: int) -> None:
        """Durably raise the mark to `generation` (it never moves down), as won by us."""
        self._file.raise_generation(generation, self._instance)
