"""`pgfence export-shim`: print the POSIX sh shim (shim.sh) for images without Python.

The shim itself is shim.sh, next to this module: a shell script, shipped as package data
and read through the package's loader, so it prints from an installed package and from
inside the zipapp alike.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from pgfence import __version__
from pgfence.errors import EXIT_OK, PgfenceError, UsageError

USAGE = "usage: pgfence export-shim > postgres"
HELP = """\
Prints a POSIX sh fencing shim for images without Python. Mount it at
/newbin/postgres (mode 0555), first on PATH: it takes FENCE_LOCK_FILE as
token FENCE_VARIABLE (default $HOSTNAME), strict mode, and execs the real
postgres. It has no heartbeat and nothing releases its lock: after the server
has stopped for good, run `pgfence release --force`.
Exit codes: 0 printed, 64 usage. The shim's own: 64 usage, 65 unreadable lock,
73 fenced out, 74 storage error, 127 no real postgres."""


def shim_text() -> str:
    import pgfence

    path = os.path.join(os.path.dirname(pgfence.__file__ or ""), "shim.sh")
    try:
        data = getattr(pgfence.__loader__, "get_data")(path)  # noqa: B009 (not typed)
    except (OSError, AttributeError):
        raise PgfenceError(f"this installation of pgfence lacks {path}") from None
    assert isinstance(data, bytes)
    return data.decode("utf-8").replace("@VERSION@", __version__)


def main(args: Sequence[str], out: Callable[[str], None]) -> int:
    if list(args) in (["-h"], ["--help"]):
        out(USAGE)
        out(HELP)
        return EXIT_OK
    if args:
        raise UsageError(f"`pgfence export-shim` takes no arguments, got {args[0]!r}")
    out(shim_text().rstrip("\n"))
    return EXIT_OK
