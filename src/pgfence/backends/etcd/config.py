"""The etcd options, checked before any connection: endpoints, key, credentials, TLS,
and the timings the etcd backend can keep.

Plain http is refused to any host but loopback unless --etcd-allow-insecure: the fence
and the credentials would otherwise cross the network in clear. The password is read
from a file (FENCE_ETCD_PASSWORD_FILE), never from the command line or the environment,
and appears in no message. The password file and the TLS files are read again whenever
they are needed anew (a new login, a new connection), so that they can be rotated under
a running holder: file first, then etcd.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import urllib.parse
from typing import TYPE_CHECKING, Callable, Generic, TypeVar, Union

from pgfence import log
from pgfence.backends.etcd.client import Endpoint, EtcdClient
from pgfence.errors import UsageError
from pgfence.timings import (
    Timings,
    etcd_minimum_ttl,
    vanished_lock_delay,
)

if TYPE_CHECKING:
    from pgfence.config import EtcdSettings, Settings


def open_client(settings: Settings) -> tuple[EtcdClient, str]:
    """(client, key) for the configured etcd; raises UsageError (64) for bad options."""
    etcd = settings.etcd
    if settings.timings.mode != "lease":
        raise UsageError(
            "--mode strict is not available with the etcd backend: an etcd key lives "
            "only as long as its lease, so this backend always runs in lease mode (the "
            "default with --backend etcd); remove --mode strict / FENCE_MODE=strict"
        )
    endpoints = parse_endpoints(etcd.endpoints, etcd.allow_insecure)
    key = etcd.key
    if not key:
        raise UsageError(
            "the etcd backend needs the key of this data directory's fence: set "
            "--etcd-key or FENCE_ETCD_KEY, e.g. /pgfence/db1 (one key per data directory)"
        )
    if not key.isprintable() or key != key.strip() or len(key.encode("utf-8")) > 1024:
        raise UsageError(
            f"etcd key {key[:60]!r} must be printable text without surrounding white "
            "space, at most 1024 bytes"
        )
    check_timings(settings.timings, etcd.election_timeout)
    password = None
    if etcd.user:
        password = Reloading(
            f"password file {etcd.password_file}",
            [etcd.password_file],
            lambda: read_password(etcd.password_file),
        )
        password()  # read now: a bad file is a usage error before any connection
    elif etcd.password_file:
        raise UsageError(
            "an etcd password file is set but no user: set --etcd-user (FENCE_ETCD_USER)"
        )
    tls = tls_source(etcd, endpoints)
    return EtcdClient(endpoints, tls, etcd.user, password), key


# -- timings ---------------------------------------------------------------------------


def check_timings(timings: Timings, election_timeout: float) -> None:
    """Refuse (64) a TTL or lock delay the etcd backend cannot keep (the limits are
    derived in timings.py)."""
    shortest = etcd_minimum_ttl(election_timeout)
    if timings.ttl < shortest:
        raise UsageError(
            f"TTL {timings.ttl:g} s is too short for the etcd backend: when the etcd leader "
            f"fails, no renewal succeeds until a new one is elected (up to 3 election "
            f"timeouts, {3 * election_timeout:g} s with --etcd-election-timeout "
            f"{election_timeout * 1000:g}), and the holder must come through that within "
            f"its fence deadline, TTL/2; set --ttl (FENCE_LEASE_TTL) to {shortest:g} or "
            "more, or, if the cluster elects faster, its --etcd-election-timeout"
        )
    least = vanished_lock_delay(timings.ttl)
    if timings.lock_delay < least - 1e-9:
        raise UsageError(
            f"lock delay {timings.lock_delay:g} s is too short for the etcd backend: an "
            "etcd key can vanish under a live holder (a lease revoked by a stuck etcd "
            "leader, etcdctl del, release --force), which kills its server only at its "
            f"next renewal, at the latest TTL/2 later; set --lock-delay (FENCE_LOCK_DELAY) "
            f"to {least:.3g} (TTL/2 + TTL/6) or more, or leave it unset"
        )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: we do not resolve it to decide, so it counts as remote


def parse_endpoints(text: str | None, allow_insecure: bool) -> list[Endpoint]:
    """Comma-separated client URLs; raises UsageError naming the bad one."""
    if text is None or not text.strip():
        raise UsageError(
            "the etcd backend needs endpoints: set --etcd-endpoints or FENCE_ETCD_ENDPOINTS, "
            "e.g. https://10.0.0.1:2379,https://10.0.0.2:2379"
        )
    found: list[Endpoint] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        try:
            url = urllib.parse.urlsplit(item)
            port = url.port or 2379
            host = url.hostname
        except ValueError as exc:
            raise UsageError(f"etcd endpoint {item!r} is not a URL ({exc})") from None
        if url.scheme not in ("http", "https") or not host:
            raise UsageError(
                f"etcd endpoint {item!r} must be http://HOST:PORT or https://HOST:PORT"
            )
        if url.path not in ("", "/") or url.query or url.fragment or url.username:
            raise UsageError(
                f"etcd endpoint {item!r} must be just scheme, host and port (no path, "
                "query or user)"
            )
        if url.scheme == "http" and not is_loopback(host) and not allow_insecure:
            raise UsageError(
                f"etcd endpoint {item!r} is plain http to a host that is not loopback: the "
                "lock and credentials would cross the network unencrypted; use https, or "
                "--etcd-allow-insecure (FENCE_ETCD_ALLOW_INSECURE=1) if the network is trusted"
            )
        endpoint = Endpoint(url.scheme, host, port)
        if endpoint not in found:
            found.append(endpoint)
    if not found:
        raise UsageError(f"no etcd endpoint in {text!r}")
    return found


def read_password(path: str | None) -> str:
    if not path:
        raise UsageError(
            "--etcd-user is set but no password file: put the password in a file and set "
            "FENCE_ETCD_PASSWORD_FILE (or --etcd-password-file); pgfence never takes the "
            "password itself on the command line or from the environment"
        )
    try:
        with open(path, "rb") as f:
            data = f.read(4097)
    except OSError as exc:
        raise UsageError(
            f"cannot read the etcd password file {path}: {exc.strerror or exc}"
        ) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the etcd password file {path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
    if text.endswith("\r"):
        text = text[:-1]
    if not text or len(data) > 4096:
        raise UsageError(f"the etcd password file {path} is empty or larger than 4 KiB")
    if "\n" in text:
        raise UsageError(f"the etcd password file {path} has more than one line")
    return text


T = TypeVar("T")


class Reloading(Generic[T]):
    """A value read from files, read again when a file's identity or size or time
    changes. A file that cannot be read any more (being replaced, say) leaves the last
    good value in use, with a warning; at the first read it is a usage error."""

    def __init__(self, what: str, paths: list[str | None], load: Callable[[], T]) -> None:
        self._what = what
        self._paths = [p for p in paths if p]
        self._load = load
        self._stamp: object = None
        self._value: T | None = None

    def _stamps(self) -> object:
        stamps = []
        for path in self._paths:
            try:
                st = os.stat(path)
            except OSError:
                return None
            stamps.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(stamps)

    def __call__(self) -> T:
        stamp = self._stamps()
        if self._value is not None and stamp == self._stamp:
            return self._value
        try:
            value = self._load()
        except UsageError as exc:
            if self._value is None:
                raise
            log.event(
                "etcd_credentials",
                f"kept the previous etcd {self._what}: {exc.message}",
                level="warning",
            )
            return self._value
        if self._value is not None:
            log.event("etcd_credentials", f"read the etcd {self._what} again: it changed")
        self._stamp, self._value = stamp, value
        return value


def tls_source(
    etcd: EtcdSettings, endpoints: list[Endpoint]
) -> Callable[[], ssl.SSLContext] | None:
    """The TLS context for new connections, loaded now (to check the files) and again
    whenever one of the files changed."""
    if tls_context(etcd, endpoints) is None:
        return None
    files = [etcd.ca_file, etcd.cert_file, etcd.key_file]

    def load() -> ssl.SSLContext:
        context = tls_context(etcd, endpoints)
        assert context is not None  # an endpoint uses https
        return context

    source = Reloading("TLS files", files, load)
    source()
    return source


def tls_context(etcd: EtcdSettings, endpoints: list[Endpoint]) -> ssl.SSLContext | None:
    files = [f for f in (etcd.ca_file, etcd.cert_file, etcd.key_file) if f]
    if not any(e.scheme == "https" for e in endpoints):
        if files:
            raise UsageError(
                "etcd TLS files are set but no endpoint uses https://; use https endpoints "
                "or remove --etcd-ca-file/--etcd-cert-file/--etcd-key-file"
            )
        return None
    if etcd.key_file and not etcd.cert_file:
        raise UsageError("--etcd-key-file needs --etcd-cert-file (FENCE_ETCD_CERT_FILE)")
    what = f"CA file {etcd.ca_file} (PEM certificates)"
    try:
        context = ssl.create_default_context(cafile=etcd.ca_file)
        if etcd.cert_file:
            what = f"client certificate {etcd.cert_file} (PEM, with its unencrypted PEM key"
            what += f" {etcd.key_file})" if etcd.key_file else " in the same file)"
            context.load_cert_chain(etcd.cert_file, etcd.key_file, password=_no_passphrase)
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc)
        raise UsageError(f"cannot load the etcd {what}: {reason}") from None
    return context


def _no_passphrase() -> Union[str, bytes]:
    """An encrypted client key would make OpenSSL prompt on the terminal: refuse it."""
    raise UsageError("encrypted client keys are not supported; use an unencrypted key file")
