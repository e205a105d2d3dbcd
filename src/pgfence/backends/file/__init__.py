"""The file backend: the fence is a lock file on the shared volume.

- `backend`: acquire, takeover and release of the lock file (FileBackend, FileHold);
- `lockfile`: the lock file's atomic operations (create, compare-and-swap by rename, claims);
- `generation`: the fencing-token high-water mark kept beside the lock.

The record written into the lock (`pgfence.record`) is shared with the etcd backend.
"""
