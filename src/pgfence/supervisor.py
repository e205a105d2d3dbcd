"""The supervised command: start it, pass signals on, reap, and outlive its whole tree.

Signals are blocked in every thread and collected with sigtimedwait(2) by the main loop,
so none is lost between two checks and none runs a Python handler at an awkward moment.
pgfence is a child subreaper (or PID 1): every descendant that loses its parent is
re-parented to it, so "the tree is gone" can be checked, not assumed. A server started by
`pg_ctl` in its own session is such a descendant.
"""

from __future__ import annotations

import errno
import os
import signal

from pgfence import linux
from pgfence.errors import EXIT_NOT_EXECUTABLE, EXIT_NOT_FOUND, CommandError
from pgfence.signals import FORWARDED

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from pgfence.guardian import Guardian


class Supervisor:
    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        user: str | None = None,
        guardian: Guardian | None = None,
    ) -> None:
        self.is_init = os.getpid() == 1
        self._guardian = guardian.pid if guardian else None  # not the command's: not waited for
        if not self.is_init:
            linux.become_subreaper()
        self._own_proc = _proc_is_ours()
        self.exit_status: int | None = None  # shell convention: code, or 128+signal
        on_fork = None if guardian is None else (lambda pid: guardian.protect({pid}))
        self.pid = _spawn(argv, env, user, on_fork)

    def reap(self) -> None:
        """Collect every exited child (zombies included, as PID 1 must)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid:
                code = os.waitstatus_to_exitcode(status)
                self.exit_status = 128 - code if code < 0 else code

    def forward(self, signum: int) -> None:
        if self.exit_status is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def remaining(self) -> list[int]:
        """Processes we must outlive: as PID 1 every process in the namespace, otherwise
        every descendant. Zombies are dead and do not count."""
        if not (self.is_init and self._own_proc) and not _has_children():
            # As a subreaper we adopt every orphaned descendant: with no child at all
            # there is no descendant left, and no need to read all of /proc.
            return []
        table = _process_table()
        me = os.getpid()
        if self.is_init and self._own_proc:
            return [pid for pid, (_, state) in table.items() if pid != me and state != "Z"]
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in table.items():
            children.setdefault(ppid, []).append(pid)
        found: list[int] = []
        stack = [pid for pid in children.get(me, ()) if pid != self._guardian]
        while stack:
            pid = stack.pop()
            if table[pid][1] != "Z":
                found.append(pid)
            stack.extend(children.get(pid, ()))
        return found

    def sessions(self) -> set[int]:
        """Session ids of the processes we must outlive (for the guardian)."""
        found = set()
        for pid in [self.pid, *self.remaining()]:
            try:
                found.add(os.getsid(pid))
            except OSError:
                pass
        return found

    def signal_all(self, signum: int) -> None:
        for pid in self.remaining():
            try:
                os.kill(pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    def kill_all(self) -> None:
        """SIGKILL the command's whole tree and return only once all of it is gone."""
        while True:
            if self.is_init and self._own_proc:
                try:
                    os.kill(-1, signal.SIGKILL)  # every process in the namespace but us
                except ProcessLookupError:
                    pass
            else:
                self.signal_all(signal.SIGKILL)
            self.reap()
            if not self.remaining():
                return
            signal.sigtimedwait([signal.SIGCHLD], 0.005)


def _spawn(
    argv: list[str], env: dict[str, str], user: str | None, on_fork: Callable[[int], None] | None
) -> int:
    ids = _user_ids(user) if user else None
    parent = os.getpid()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    go_read, go_write = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # child: only async-signal-safe-ish work until exec
        try:
            os.close(read_end)
            os.close(go_write)
            os.setsid()
            signal.pthread_sigmask(signal.SIG_SETMASK, [])
            # Python ignores SIGPIPE and SIGXFSZ; a shell's background job starts with
            # SIGINT and SIGQUIT ignored. Everything we forward must reach the command.
            for signum in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED):
                signal.signal(signum, signal.SIG_DFL)
            if ids:
                os.setgroups(ids[2])
                os.setgid(ids[1])
                os.setuid(ids[0])
            linux.set_parent_death_signal(signal.SIGKILL)  # after the user switch
            if os.getppid() != parent:
                os._exit(1)  # pgfence died before the line above took effect
            if not os.read(go_read, 1):
                os._exit(1)  # pgfence died before the guardian knew of us
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            os.write(write_end, str(exc.errno or 0).encode())
        finally:
            os._exit(EXIT_NOT_FOUND)
    os.close(write_end)
    os.close(go_read)
    # The command may change user (gosu), which clears its parent-death signal: it
    # execs only once `on_fork` (the guardian) knows its session.
    if on_fork:
        on_fork(pid)
    try:
        os.write(go_write, b"g")
    except BrokenPipeError:
        pass  # the child died before reading it: the exec pipe below tells
    os.close(go_write)
    with os.fdopen(read_end, "rb") as pipe:
        failure = pipe.read()
    if not failure:
        return pid
    os.waitpid(pid, 0)
    err = int(failure or b"0")
    if err in (errno.ENOENT, errno.ENOTDIR):
        raise CommandError(f"command not found: {argv[0]}", EXIT_NOT_FOUND)
    raise CommandError(f"cannot run {argv[0]}: {os.strerror(err)}", EXIT_NOT_EXECUTABLE)


def check_command(argv0: str, env: dict[str, str]) -> None:
    """Raise CommandError (127/126) if `argv0` cannot be executed, as execvp would find it:
    checked before the lock is taken, so a typo never touches the lock."""
    if "/" in argv0:
        candidates = [argv0]
    else:
        path = env.get("PATH", os.defpath)
        candidates = [os.path.join(d or ".", argv0) for d in path.split(os.pathsep)]
    found = [c for c in candidates if os.path.exists(c)]
    if not found:
        raise CommandError(f"command not found: {argv0}", EXIT_NOT_FOUND)
    if not any(os.path.isfile(c) and os.access(c, os.X_OK) for c in found):
        raise CommandError(f"cannot run {argv0}: {os.strerror(errno.EACCES)}", EXIT_NOT_EXECUTABLE)


def check_user(user: str) -> None:
    """Raise CommandError (64) for an unknown user or group: called before the lock is
    taken, so a configuration error never converts or removes a lock."""
    _user_ids(user)


def _user_ids(user: str) -> tuple[int, int, list[int]]:
    import grp
    import pwd

    name, _, group = user.partition(":")
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        gid = entry.pw_gid
        if group:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except (KeyError, ValueError):
        raise CommandError(f"unknown user or group {user!r}", 64) from None
    groups = [g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem]
    return entry.pw_uid, gid, sorted({gid, *groups})


def _has_children() -> bool:
    """True while we have any child process, running or not yet reaped."""
    try:
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state letter) for every process /proc shows."""
    table: dict[int, tuple[int, str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(b")") + 2 :].split()
        table[int(name)] = (int(fields[1]), fields[0].decode())
    return table


def _proc_is_ours() -> bool:
    """True if /proc belongs to our PID namespace (then PID 1 sees exactly its own)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False
