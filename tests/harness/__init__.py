"""Test harness: real processes, real PostgreSQL, emulated containers.

- `procs.Registry` starts processes and kills every one of them, by pid, at teardown.
- `sandbox.Sandbox` is an emulated container: `unshare --uts --pid --ipc --mount --fork
  --mount-proc` with its own hostname, HOSTNAME and PID 1.
- `pg` runs initdb/postgres/psql from Debian's postgresql-15 as the postgres user.
- `waiting.wait_for` waits for a condition, never for a fixed time; every test uses it.
"""
