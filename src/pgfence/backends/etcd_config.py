"""The etcd options, checked before any connection: endpoints, key, credentials, TLS.

Plain http is refused to any host but loopback unless --etcd-allow-insecure: the fence
and the credentials would otherwise cross the network in clear. The password is read
from a file (FENCE_ETCD_PASSWORD_FILE), never from the command line or the environment,
and appears in no message.
"""

from __future__ import annotations

import ipaddress
import ssl
import urllib.parse
from typing import TYPE_CHECKING, Union

from pgfence.backends.etcd_client import Endpoint, EtcdClient
from pgfence.errors import UsageError
from pgfence.timings import Timings

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
    password = None
    if etcd.user:
        password = read_password(etcd.password_file)
    elif etcd.password_file:
        raise UsageError(
            "an etcd password file is set but no user: set --etcd-user (FENCE_ETCD_USER)"
        )
    tls = tls_context(etcd, endpoints)
    timeout = request_timeouts(settings.timings)[0]
    return EtcdClient(endpoints, timeout, tls, etcd.user, password), key


def request_timeouts(timings: Timings) -> tuple[float, float]:
    """(renewal request timeout, timeout of everything else).

    A renewal may meet an endpoint that stopped answering and must still fail over to the
    next one well within the fence deadline D: each request gets D/3 (0.5 to 5 s), and a
    renewal as a whole gets D. Requests that do not race the deadline get at least 2 s.
    """
    deadline = timings.deadline or timings.ttl / 2
    fast = min(5.0, max(0.5, deadline / 3))
    return fast, max(fast, 2.0)


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
