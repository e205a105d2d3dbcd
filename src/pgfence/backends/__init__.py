"""Where the fence lives: a lock file (`file`, the default) or an etcd key (`etcd`)."""

from __future__ import annotations

TYPE_CHECKING = False

if TYPE_CHECKING:
    from pgfence.backends.base import Backend
    from pgfence.config import Settings


def open_backend(settings: Settings, instance: str) -> Backend:
    """The configured backend. Each is imported only when chosen: the etcd backend's
    imports (ssl, http.client) cost start-up time the file backend does not need."""
    if settings.backend == "etcd":
        from pgfence.backends.etcd.backend import EtcdBackend  # type: ignore[import-not-found,unused-ignore]

        return EtcdBackend.from_settings(settings, instance)  # type: ignore[no-any-return,unused-ignore]
    from pgfence.backends.file.backend import FileBackend

    return FileBackend(
        settings.lock_file, settings.token, instance, settings.timings, settings.wait
    )
