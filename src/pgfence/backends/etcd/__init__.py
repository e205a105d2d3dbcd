"""The etcd backend: the fence is a key attached to an etcd lease.

- `backend`: acquire (create on create revision 0 after the lock delay) and release;
- `hold`: the held key, its renewal (keep-alive plus guarded transaction);
- `client`: a standard-library client of etcd's JSON gateway, endpoint failover, auth;
- `budget`: what each request may spend: its timeout, the deadline, the guard;
- `config`: settings to client, the minimum TTL and lock delay, request timeouts;
- `generation_mark`: the fencing-token high-water mark kept beside the data directory.
"""
