"""Signal set-up for `pgfence run`, and the one way it starts threads.

As tini does, `run` (and the `postgres` shim) blocks every signal it handles as its very
first act, before anything can start a thread: a thread inherits its creator's mask, so
every thread pgfence ever has blocks them too. The main loop collects them with
sigtimedwait(2). A thread that did not block them would take SIGUSR1's default action
(the process dies, leaving its lock behind) or turn SIGINT into a KeyboardInterrupt.

`start_thread` is how pgfence starts any thread while it supervises: it refuses to start
one unless the caller's mask blocks every handled signal, so a later change that starts
a thread earlier fails loudly in every test instead of losing signals in production.
"""

from __future__ import annotations

import signal
import threading

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
HANDLED = frozenset((*FORWARDED, signal.SIGCHLD))


class _Saved:
    mask: frozenset[int] | None = None  # the mask pgfence was started with


_saved = _Saved()


def block() -> None:
    """Queue the signals we handle instead of acting on them. Idempotent; call it first."""
    if threading.active_count() != 1:
        raise RuntimeError("signals must be blocked before any thread is started")
    previous = frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED))
    if _saved.mask is None:
        _saved.mask = previous


def restore() -> None:
    """Give back the mask pgfence was started with (before exec'ing another program in
    place, which would inherit the blocked signals)."""
    if _saved.mask is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, _saved.mask)


def all_blocked() -> bool:
    """True if the calling thread blocks every handled signal."""
    return set(signal.pthread_sigmask(signal.SIG_BLOCK, ())) >= HANDLED


def start_thread(thread: threading.Thread) -> None:
    """Start `thread`, which inherits our mask; refuse if that mask lets a handled signal in."""
    if not all_blocked():
        raise RuntimeError(f"refusing to start thread {thread.name}: handled signals not blocked")
    thread.start()


def next_signal(timeout: float) -> int | None:
    """The next handled signal, or None after `timeout` seconds."""
    info = signal.sigtimedwait(HANDLED, max(0.0, timeout))
    return None if info is None else info.si_signo
