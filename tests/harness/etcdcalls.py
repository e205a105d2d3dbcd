"""The etcd backend's protocol steps as `tracer.py` sees them: HTTP requests on a socket.

pgfence's etcd client (http.client, etcd's JSON gateway) sends each request in two
sendto(2) calls: the request line with its headers, then the JSON body (GET /version has
none). The tracer names a step at the send that completes its request, by the request's
path and, for a transaction, by what it compares and does:

    etcd version   etcd auth   etcd range   etcd grant   etcd keepalive   etcd revoke
    etcd txn(create)   the create, guarded on create revision 0
    etcd txn(beat)     a write of our record, guarded on create revision, lease and value
    etcd txn(check)    a renewal's compare without a write
    etcd txn(delete)   the release, guarded on create revision and lease
    etcd txn(delete-unchanged)  `pgfence release`, guarded on the mod revision

Faults on such a step: `before` kills at the entry of that send (etcd got an incomplete
request and never runs it); `after`, `lost` and `late` act at its exit once etcd's answer
is on the socket, so the request ran: SIGKILL; steal the answer and shut the connection
(the answer is lost: pgfence sees the connection closed); or hold the thread past the
deadline before it reads the answer. `delay` holds the thread before the send.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import select
import socket
import time

STEPS = {
    "/version": "version",
    "/v3/auth/authenticate": "auth",
    "/v3/kv/range": "range",
    "/v3/kv/txn": "txn",
    "/v3/lease/grant": "grant",
    "/v3/lease/keepalive": "keepalive",
    "/v3/lease/revoke": "revoke",
    "/v3/lease/timetolive": "timetolive",
}
SENDTO = 44
# System calls a thread makes while it sends a request and waits for the answer: a long
# one (etcd syncs its log before answering a write) does not end the thread's burst.
WAITING = {0, 7, 23, 42, 44, 45, 47, 232, 270, 271, 281}
ANSWER_WAIT = 3.0  # s: how long a fault at a step's exit waits for etcd's answer
PIDFD_GETFD = 438
_REQUEST = re.compile(rb"^(GET|POST) (/[^ ]*) HTTP/1\.[01]\r\n")
_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)\r\n", re.IGNORECASE)
_libc = ctypes.CDLL(None, use_errno=True)


def request_head(data: bytes) -> tuple[str, int] | None:
    """(path, body length) when `data` starts an HTTP request to etcd, else None."""
    match = _REQUEST.match(data)
    if match is None:
        return None
    path = match[2].decode("ascii", "replace")
    if path not in STEPS:
        return None
    length = _LENGTH.search(data)
    return path, int(length[1]) if length else 0


def step_name(path: str, body: bytes) -> str:
    step = STEPS[path]
    if step != "txn":
        return f"etcd {step}"
    return f"etcd txn({txn_kind(body)})"


def txn_kind(body: bytes) -> str:
    try:
        txn = json.loads(body)
    except ValueError:
        return "?"
    targets = {str(c.get("target")) for c in txn.get("compare") or []}
    ops = {next(iter(op), "") for op in txn.get("success") or []}
    if "request_delete_range" in ops:
        return "delete" if "LEASE" in targets else "delete-unchanged"
    if "request_put" in ops:
        return "beat" if "LEASE" in targets else "create"
    return "check" if ops == set() else "?"


def borrow(pid: int, fd: int) -> socket.socket | None:
    """A duplicate of the tracee's socket `fd` (pidfd_getfd(2)): it shares the connection."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return None
    try:
        dup = _libc.syscall(PIDFD_GETFD, pidfd, fd, 0)
    finally:
        os.close(pidfd)
    if dup < 0:
        return None
    return socket.socket(fileno=dup)


def await_answer(pid: int, fd: int) -> socket.socket | None:
    """Wait until etcd's answer is on the tracee's socket; the borrowed socket, or None."""
    sock = borrow(pid, fd)
    if sock is None:
        return None
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    if not poller.poll(ANSWER_WAIT * 1000):
        sock.close()
        return None
    return sock


def steal_answer(sock: socket.socket) -> bytes:
    """Read the answer off the connection, shut it and give it back: the tracee's next
    read finds the connection closed, as when a reply is lost with its connection."""
    stolen = b""
    sock.setblocking(False)
    quiet_until = time.monotonic() + 0.05
    while time.monotonic() < quiet_until:
        try:
            chunk = sock.recv(65536)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        if not chunk:
            break
        stolen += chunk
        quiet_until = time.monotonic() + 0.05
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
    return stolen
