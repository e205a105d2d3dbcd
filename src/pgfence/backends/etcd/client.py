"""A small client for etcd's v3 JSON gateway, standard library only.

etcd (3.4 and later) serves its gRPC API as JSON over HTTP at `/v3/...` on every client
URL, the way Patroni's etcd3 backend uses it: bytes (keys, values) travel as base64,
int64 values arrive as strings, and a field that is absent means zero, false or empty.
No gRPC client, no protobuf: nothing to keep in step with the image's other libraries.

Every request travels with a budget (etcd/budget.py): its per-request timeout, maybe an
overall deadline on pgfence's monotonic clock, and maybe a guard checked right before
each send. A transport failure or an "unavailable" answer (no leader, request timed out,
leader changed) moves on to the next endpoint, within the same budget; the one that
answered last is tried first next time.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pgfence import log
from pgfence.backends.etcd.budget import Budget
from pgfence.errors import StorageError, UsageError

Json = dict[str, Any]
MIN_VERSION = (3, 4)
UNAVAILABLE_CODES = (4, 8, 14)  # gRPC DeadlineExceeded, ResourceExhausted, Unavailable
# A login that etcd no longer accepts: a simple token it forgot, or (JWT) a token issued
# before the auth store changed (any user or role added, a password changed).
STALE_LOGIN = ("invalid auth token", "revision of auth store is old")
MAX_BODY = 1 << 20


class EtcdUnavailable(StorageError):
    """No endpoint gave a usable answer (connection, TLS, timeout, no quorum): 74."""


class EtcdNoSpace(StorageError):
    """etcd's database reached its quota (the NOSPACE alarm): it refuses every write."""


class EtcdRefused(UsageError):
    """etcd refused our credentials or permissions, or is too old: a configuration fault, 64."""


class EtcdRequestError(StorageError):
    """etcd answered this request with an error that another endpoint would repeat: 74."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason or message


class GuardRefused(Exception):
    """The guard said it is too late to send (internal to renewals; never escapes them)."""


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "http" or "https"
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def malformed(what: str) -> EtcdRequestError:
    return EtcdRequestError(f"etcd sent a malformed answer ({what})")


def unb64(text: object, what: str) -> bytes:
    if text is None or text == "":
        return b""
    try:
        if isinstance(text, str):
            return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError):
        pass
    raise malformed(f"{what} is not base64")


def integer(obj: Json, name: str) -> int:
    """An int64 field: a string (or number) in the JSON, absent meaning 0."""
    value = obj.get(name)
    if value is None:
        return 0
    try:
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return int(value)
    except ValueError:
        pass
    raise malformed(f"{name} is not an integer")


def key_value(obj: Json) -> KeyValue:
    return KeyValue(
        key=unb64(obj.get("key"), "key"),
        value=unb64(obj.get("value"), "value"),
        create_revision=integer(obj, "create_revision"),
        mod_revision=integer(obj, "mod_revision"),
        version=integer(obj, "version"),
        lease=integer(obj, "lease"),
    )


def first_kv(range_response: Json) -> KeyValue | None:
    kvs = range_response.get("kvs") or []
    if not isinstance(kvs, list) or not all(isinstance(kv, dict) for kv in kvs):
        raise malformed("kvs is not a list of key-values")
    return key_value(kvs[0]) if kvs else None


# -- the client --------------------------------------------------------------------------


class EtcdClient:
    def __init__(
        self,
        endpoints: list[Endpoint],
        tls: ssl.SSLContext | Callable[[], ssl.SSLContext] | None,
        user: str | None = None,
        password: str | Callable[[], str] | None = None,
    ) -> None:
        self.endpoints = endpoints
        self._tls = tls  # a callable: read anew for every new connection
        self._user = user
        self._password = password  # never logged, never part of a message; a callable:
        # read anew at every login
        self.last_term = 0  # raft term in the header of the last answer
        self.version_warning: str | None = None
        self._token: str | None = None  # auth token; "" when auth turned out disabled
        self._checked = False
        self._current = 0
        self._connections: dict[Endpoint, http.client.HTTPConnection] = {}
        self._lock = threading.RLock()

    # -- the calls pgfence makes ---------------------------------------------------------

    def get(self, key: bytes, budget: Budget) -> KeyValue | None:
        return first_kv(self.call("/v3/kv/range", {"key": b64(key)}, budget))

    def txn(
        self, compares: list[Json], success: list[Json], failure: list[Json], budget: Budget
    ) -> tuple[bool, list[Json]]:
        """(succeeded, the responses of the branch that ran, unwrapped)."""
        body = {"compare": compares, "success": success, "failure": failure}
        answer = self.call("/v3/kv/txn", body, budget)
        responses: list[Json] = []
        for item in answer.get("responses") or []:
            # {"response_put": {...}}, {"response_range": {...}}, ...: one op's answer
            inner = next(iter(item.values()), None) if isinstance(item, dict) else None
            responses.append(inner if isinstance(inner, dict) else {})
        return bool(answer.get("succeeded", False)), responses

    def grant(self, ttl: int, budget: Budget) -> tuple[int, int]:
        """A new lease: (id, granted TTL), the TTL being at least `ttl`."""
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)}, budget)
        lease = integer(answer, "ID")
        if lease <= 0:
            raise EtcdRequestError("etcd granted a lease without an id")
        return lease, integer(answer, "TTL")

    def keepalive(self, lease: int, budget: Budget) -> tuple[int, int]:
        """Renew `lease`: (its TTL, or 0 when etcd no longer knows it (expired, revoked);
        the raft term of the member that answered)."""
        answer = self.call("/v3/lease/keepalive", {"ID": str(lease)}, budget)
        return integer(answer, "TTL"), self.last_term

    def time_to_live(self, lease: int, budget: Budget) -> tuple[int, int]:
        """(seconds left, granted TTL); seconds left is -1 when the lease is gone."""
        answer = self.call("/v3/lease/timetolive", {"ID": str(lease)}, budget)
        return integer(answer, "TTL"), integer(answer, "grantedTTL")

    def revoke(self, lease: int, budget: Budget) -> bool:
        """Revoke `lease` (its keys go with it); False when etcd did not know it."""
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)}, budget)
        except EtcdRequestError as exc:
            if "lease not found" in exc.message:
                return False
            raise
        return True

    # -- plumbing ------------------------------------------------------------------------

    def call(self, path: str, body: Json, budget: Budget) -> Json:
        with self._lock:
            # The version check and the login share the request's time, not its guard:
            # they touch no key.
            if not self._checked:
                self._check_version(budget.unguarded())
            if self._user and self._token is None:
                self._authenticate(budget.unguarded())
            try:
                return self._request("POST", path, body, budget)
            except EtcdRequestError as exc:
                if not self._user or not any(s in exc.message for s in STALE_LOGIN):
                    raise
            # The token is no longer accepted: log in again, once.
            self._token = None
            self._authenticate(budget.unguarded())
            return self._request("POST", path, body, budget)

    def _check_version(self, budget: Budget) -> None:
        answer = self._request("GET", "/version", None, budget)
        where = self.endpoints[self._current].url
        server = answer.get("etcdserver")
        if not isinstance(server, str) or not re.match(r"\d+\.\d+", server):
            raise EtcdUnavailable(
                f"{where} did not say which etcd version it runs (GET /version); "
                "is it an etcd client URL?"
            )
        if _revokes_live_leases(server):  # said by the holder, once it holds the fence
            self.version_warning = (
                f"etcd at {where} runs {server}, whose stuck leader can revoke a lease that "
                "was renewed (etcd#15247): pgfence stays safe, but such a holder fences "
                "itself; upgrade to etcd 3.4.31, 3.5.13 or later"
            )
        for version in (server, str(answer.get("etcdcluster"))):
            match = re.match(r"(\d+)\.(\d+)", version)  # the cluster's may be "not_decided"
            if match and (int(match[1]), int(match[2])) < MIN_VERSION:
                raise EtcdRefused(
                    f"etcd at {where} runs version {version}; pgfence needs etcd 3.4 or "
                    "later (its /v3 JSON gateway)"
                )
        self._checked = True

    def _authenticate(self, budget: Budget) -> None:
        password = self._password() if callable(self._password) else self._password
        body = {"name": self._user, "password": password}
        try:
            answer = self._request("POST", "/v3/auth/authenticate", body, budget)
        except EtcdRequestError as exc:
            if "authentication is not enabled" in exc.message:
                log.event(
                    "etcd_auth_disabled",
                    f"etcd has authentication disabled; --etcd-user {self._user!r} is not used",
                    level="warning",
                )
                self._token = ""
                return
            raise EtcdRefused(
                f"etcd refused user {self._user!r}: {exc.reason}; check --etcd-user "
                "(FENCE_ETCD_USER) and the password file (FENCE_ETCD_PASSWORD_FILE)"
            ) from None
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise EtcdUnavailable("etcd accepted the credentials but returned no auth token")
        self._token = token

    def _request(self, method: str, path: str, body: Json | None, budget: Budget) -> Json:
        errors: list[str] = []
        count = len(self.endpoints)
        for step in range(count):
            index = (self._current + step) % count
            endpoint = self.endpoints[index]
            limit = budget.request_timeout()
            if limit <= 0:
                errors.append("out of time")
                break
            if not budget.may_send():
                raise GuardRefused()
            try:
                status, data = self._send(endpoint, method, path, body, limit)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self._drop(endpoint)
                errors.append(f"{endpoint.url}: {_transport_reason(exc, limit)}")
                continue
            try:
                answer = _decode(data)
            except ValueError as exc:
                self._drop(endpoint)
                if b"CommonName of client" in data:
                    raise EtcdRefused(
                        f"etcd at {endpoint.url} refuses client certificates that carry a "
                        "Common Name on its JSON gateway when authentication is on; use a "
                        "client certificate without CN (the user is --etcd-user)"
                    ) from None
                hint = ": not an etcd 3.4+ client URL" if status == 404 else f", {exc}"
                errors.append(f"{endpoint.url}: HTTP {status}{hint}")
                continue
            failed, code, reason = _error_of(answer, status)
            if not failed:
                self._current = index
                result = answer.get("result")
                result = result if isinstance(result, dict) else answer
                header = result.get("header")
                self.last_term = integer(header, "raft_term") if isinstance(header, dict) else 0
                return result
            if "database space exceeded" in reason:
                raise EtcdNoSpace(
                    f"etcd at {endpoint.url} refused {path}: its database is full (database "
                    "space exceeded, the NOSPACE alarm); free it (etcdctl compact, etcdctl "
                    "defrag, etcdctl alarm disarm) and run etcd with "
                    "--auto-compaction-retention so that its history cannot fill it again"
                )
            if code in UNAVAILABLE_CODES or status in (502, 503, 504):
                errors.append(f"{endpoint.url}: {reason}")
                continue
            self._current = index
            if "user name is empty" in reason:
                raise EtcdRefused(
                    f"etcd at {endpoint.url} requires authentication: set --etcd-user "
                    "(FENCE_ETCD_USER) and FENCE_ETCD_PASSWORD_FILE"
                )
            if code == 7 or "permission denied" in reason:
                raise EtcdRefused(
                    f"etcd at {endpoint.url} refused {path}: {reason}; the etcd user "
                    f"{self._user!r} needs a role with readwrite on the fence key"
                )
            if status == 404 and code is None:
                raise EtcdUnavailable(
                    f"{endpoint.url} answered HTTP 404 for {path}: not an etcd 3.4+ JSON gateway"
                )
            raise EtcdRequestError(f"etcd at {endpoint.url} refused {path}: {reason}", reason)
        raise EtcdUnavailable(f"no etcd endpoint answered {method} {path}: {'; '.join(errors)}")

    def _send(
        self, endpoint: Endpoint, method: str, path: str, body: Json | None, timeout: float
    ) -> tuple[int, bytes]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._token:
            headers["Authorization"] = self._token
        payload = None if body is None else json.dumps(body).encode("utf-8")
        while True:
            conn = self._connections.get(endpoint)
            if conn is None:
                conn = self._connect(endpoint, timeout)
                self._connections[endpoint] = conn
            reused = conn.sock is not None
            conn.timeout = timeout
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop(endpoint)
                if not reused:
                    raise
                continue  # the server had closed an idle connection: once more, afresh
            data = response.read(MAX_BODY + 1)
            if len(data) > MAX_BODY:
                raise ValueError("the answer is larger than 1 MiB")
            if response.will_close:
                self._drop(endpoint)
            return response.status, data

    def _connect(self, endpoint: Endpoint, timeout: float) -> http.client.HTTPConnection:
        if endpoint.scheme == "https":
            tls = self._tls() if callable(self._tls) else self._tls
            context = tls or ssl.create_default_context()
            return http.client.HTTPSConnection(
                endpoint.host, endpoint.port, timeout=timeout, context=context
            )
        return http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout)

    def _drop(self, endpoint: Endpoint) -> None:
        conn = self._connections.pop(endpoint, None)
        if conn is not None:
            conn.close()


def _revokes_live_leases(version: str) -> bool:
    """etcd 3.4 before 3.4.31 and 3.5 before 3.5.13 (etcd#15247)."""
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not match:
        return False
    parts = tuple(int(p) for p in match.groups())
    return (3, 4, 0) <= parts < (3, 4, 31) or (3, 5, 0) <= parts < (3, 5, 13)


def _decode(data: bytes) -> Json:
    """The first JSON object of an answer (a streaming call sends one per line)."""
    text = data.decode("utf-8")
    line = next((part for part in text.split("\n") if part.strip()), "")
    try:
        answer = json.loads(line)
    except ValueError:
        raise ValueError(f"not a JSON answer ({line[:60]!r})") from None
    if not isinstance(answer, dict):
        raise ValueError("not a JSON object")
    return answer


def _error_of(answer: Json, status: int) -> tuple[bool, int | None, str]:
    """(is an error, gRPC code, reason) of an answer.

    Unary calls answer `{"error": "...", "code": N}` with an HTTP error status; a streaming
    call (keepalive) answers 200 with `{"result": {...}}` or `{"error": {"grpc_code": N,
    "message": "..."}}`.
    """
    error = answer.get("error")
    if isinstance(error, dict):
        answer, error = error, error.get("message")
    if status == 200 and error is None:
        return False, None, ""
    code = answer.get("code", answer.get("grpc_code"))
    if not isinstance(code, int) or isinstance(code, bool):
        code = None
    reason = error if isinstance(error, str) and error else answer.get("message")
    text = str(reason) if reason else f"HTTP {status}"
    return True, code, text.replace("etcdserver: ", "")[:200]


def _transport_reason(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({exc.verify_message}); check --etcd-ca-file"
    if isinstance(exc, ssl.SSLError):
        return (
            f"TLS failed ({exc.reason or exc}); check that it serves https and whether it "
            "wants a client certificate (--etcd-cert-file, --etcd-key-file)"
        )
    if isinstance(exc, TimeoutError) or "timed out" in str(exc):
        return f"no answer within {timeout:.2g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or str(exc) or type(exc).__name__
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer ({type(exc).__name__})"
    return str(exc)[:120]
