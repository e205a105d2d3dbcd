"""`pgfence verify-fs DIR`: test whether a shared directory is safe for the file backend.

(Being written; see docs/operations.md once it lands.)
"""

from __future__ import annotations

from collections.abc import Sequence

from pgfence.errors import UsageError


def main(args: Sequence[str]) -> int:
    raise UsageError("verify-fs is not implemented yet")
