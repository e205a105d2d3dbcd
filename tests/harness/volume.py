"""What is on an emulated shared volume, so a test can prove that something did not touch it."""

from __future__ import annotations

import os
import stat

# path relative to the root -> (file type and mode, owner, group, size, mtime, ctime, inode)
Entry = tuple[int, int, int, int, int, int, int]


def snapshot(root: str) -> dict[str, Entry]:
    """Every entry under `root` (root included, symlinks not followed) with the metadata
    any write, create, delete, rename, chmod or chown changes. Access times are left out:
    reading is not touching."""
    entries: dict[str, Entry] = {}

    def record(path: str) -> None:
        st = os.lstat(path)
        entries[os.path.relpath(path, root)] = (
            st.st_mode,
            st.st_uid,
            st.st_gid,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
            st.st_ino,
        )

    record(root)
    for directory, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(directory, name)
            try:
                record(path)
            except FileNotFoundError:
                pass  # removed while we walked: the caller compares two snapshots anyway
    return entries


def changes(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    """Human-readable differences between two snapshots (empty: nothing changed)."""
    found = []
    for path in sorted(before.keys() | after.keys()):
        old, new = before.get(path), after.get(path)
        if old == new:
            continue
        if old is None:
            found.append(f"created {path}")
        elif new is None:
            found.append(f"removed {path}")
        else:
            kind = "directory" if stat.S_ISDIR(new[0]) else "file"
            found.append(f"changed {kind} {path}: {old} -> {new}")
    return found
