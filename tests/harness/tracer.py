"""A tiny ptrace(2) tracer: record, or fault, the system calls a process makes on one directory.

    python3 tracer.py --dir LOCKDIR --log TRACE.jsonl [--fault SPEC.json] -- CMD [ARG...]

It runs CMD as its only child and follows its threads (not the processes it forks: the
supervised command is not traced). Every system call whose path argument, or whose file
descriptor, lies in LOCKDIR (the directory itself or a file directly inside it) is a
"lock call" and is written to TRACE as one JSON line at its exit (or at its entry, when
the process dies there).

A call's *phase* is the thread that makes it: "main", then "main-after-thread" once
another thread (the renewer) has made a lock call, or "t1", "t2", ... for the threads in
the order they started. Lock calls are grouped into *bursts*: a thread's burst ends
when that thread makes any other system call that blocks for BURST_GAP seconds or more
(a sleep, a wait for a signal or a lock). Each call is named by its phase, the
signatures of the calls before it in its burst, and its own signature (system call,
and what the path is: the lock, a temporary file, a takeover claim, ...). Such a name
means the same step of the protocol
in every run, whatever the timing: a contender polls a varying number of times, but its
first poll and its decisive takeover burst always start the same way.

A fault SPEC names one call that way (`phase`, `prefix`: the burst's signatures up to
and including the call, `nth`: which burst that reaches this prefix) and what to do:
`before` (SIGKILL the process at the call's entry: the call never runs), `after`
(SIGKILL at its exit: the call ran) or `delay` (hold that thread at the call's entry for
`seconds`, while the process's other threads go on).

With TRACER_ETCD=1 in its environment it also follows the etcd backend's steps: each
HTTP request to etcd is a lock call named `etcd <step>` (etcdcalls.py), with two more
faults at its exit: `lost` (etcd's answer is taken off the connection, which is shut)
and `late` (the thread is held `seconds` before it reads the answer).

The tracer's exit status is the child's (128+N when signal N killed it). x86_64 only.
strace would enumerate the same calls (`strace -f -y`), but it cannot pick a call by a
path it only learns at run time (temporary files carry the process id and a random
instance id), and counts `when=N` per thread; hence this tracer.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import signal
import sys
import time

import etcdcalls  # type: ignore[import-not-found]  # run as a script, beside it

PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_GETREGS = 12
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_SYSCALL = 24
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXEC = 0x10
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXEC = 4
WALL = 0x40000000

BURST_GAP = 0.02  # a non-lock call blocking this long (seconds) ends a burst
AT_FDCWD = -100
AT_EMPTY_PATH = 0x1000

# x86_64 system call numbers -> (name, arguments holding paths as (dirfd index or None,
# path index), argument holding a file descriptor or None).
SYSCALLS: dict[int, tuple[str, tuple[tuple[int | None, int], ...], int | None]] = {
    0: ("read", (), 0),
    1: ("write", (), 0),
    2: ("open", ((None, 0),), None),
    3: ("close", (), 0),
    4: ("stat", ((None, 0),), None),
    5: ("fstat", (), 0),
    6: ("lstat", ((None, 0),), None),
    8: ("lseek", (), 0),
    16: ("ioctl", (), 0),
    17: ("pread64", (), 0),
    18: ("pwrite64", (), 0),
    21: ("access", ((None, 0),), None),
    72: ("fcntl", (), 0),
    73: ("flock", (), 0),
    74: ("fsync", (), 0),
    75: ("fdatasync", (), 0),
    77: ("ftruncate", (), 0),
    78: ("getdents", (), 0),
    82: ("rename", ((None, 0), (None, 1)), None),
    83: ("mkdir", ((None, 0),), None),
    84: ("rmdir", ((None, 0),), None),
    86: ("link", ((None, 0), (None, 1)), None),
    87: ("unlink", ((None, 0),), None),
    88: ("symlink", ((None, 1),), None),
    89: ("readlink", ((None, 0),), None),
    90: ("chmod", ((None, 0),), None),
    91: ("fchmod", (), 0),
    92: ("chown", ((None, 0),), None),
    93: ("fchown", (), 0),
    137: ("statfs", ((None, 0),), None),
    138: ("fstatfs", (), 0),
    217: ("getdents64", (), 0),
    221: ("fadvise64", (), 0),
    257: ("openat", ((0, 1),), None),
    258: ("mkdirat", ((0, 1),), None),
    262: ("newfstatat", ((0, 1),), None),
    263: ("unlinkat", ((0, 1),), None),
    264: ("renameat", ((0, 1), (2, 3)), None),
    265: ("linkat", ((0, 1), (2, 3)), None),
    267: ("readlinkat", ((0, 1),), None),
    269: ("faccessat", ((0, 1),), None),
    277: ("sync_file_range", (), 0),
    285: ("fallocate", (), 0),
    306: ("syncfs", (), 0),
    316: ("renameat2", ((0, 1), (2, 3)), None),
    332: ("statx", ((0, 1),), None),
    437: ("openat2", ((0, 1),), None),
    439: ("faccessat2", ((0, 1),), None),
}
OPEN_CALLS = {"open": 1, "openat": 2, "openat2": 2}  # which argument holds the flags


class Regs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_ulonglong)
        for name in [
            "r15",
            "r14",
            "r13",
            "r12",
            "rbp",
            "rbx",
            "r11",
            "r10",
            "r9",
            "r8",
            "rax",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "orig_rax",
            "rip",
            "cs",
            "eflags",
            "rsp",
            "ss",
            "fs_base",
            "gs_base",
            "ds",
            "es",
            "fs",
            "gs",
        ]
    ]

    def args(self) -> tuple[int, ...]:
        return (self.rdi, self.rsi, self.rdx, self.r10, self.r8, self.r9)


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.ptrace.restype = ctypes.c_long


def ptrace(request: int, tid: int, addr: int = 0, data: int = 0) -> int:
    result = _libc.ptrace(request, tid, ctypes.c_void_p(addr), ctypes.c_void_p(data))
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return int(result)


def _signed(value: int) -> int:
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= 1 << 63 else value


def _fd(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class Thread:
    def __init__(self, tid: int, role: str) -> None:
        self.tid = tid
        self.role = role  # "main" or "t1", "t2", ... in the order they were started
        self.in_call = False
        self.entered = 0.0
        self.call: dict[str, object] | None = None  # the lock call in progress
        self.burst: list[str] = []  # signatures of this burst's calls so far
        self.bursts_since_gap = True
        self.held_until: float | None = None  # delay fault: resume at this time


class Tracer:
    def __init__(self, lock_dir: str, log_path: str, fault: dict[str, object] | None) -> None:
        self.lock_dir = os.path.realpath(lock_dir)
        self.log = open(log_path, "w", buffering=1)  # noqa: SIM115 (closed at exit)
        self.fault = fault
        self.fired = False
        self.prefix_counts: dict[tuple[str, tuple[str, ...]], int] = {}
        self.threads: dict[int, Thread] = {}
        self.main_pid = 0
        self.started_threads = 0
        self.other_thread_called = False  # has a thread but main made a lock call yet?
        self.seq = 0
        self.mem_fd: int | None = None
        self.etcd = os.environ.get("TRACER_ETCD") == "1"
        self.heads: dict[int, tuple[int, str]] = {}  # tid -> (fd, path) of a request's head

    # -- reading the tracee --------------------------------------------------------

    def read_string(self, addr: int) -> str:
        if self.mem_fd is None:
            self.mem_fd = os.open(f"/proc/{self.main_pid}/mem", os.O_RDONLY)
        out = b""
        while len(out) < 4096:
            chunk_len = 4096 - (addr % 4096)
            try:
                chunk = os.pread(self.mem_fd, chunk_len, addr)
            except OSError:
                break
            if not chunk:
                break
            end = chunk.find(b"\0")
            if end >= 0:
                out += chunk[:end]
                break
            out += chunk
            addr += len(chunk)
        return out.decode("utf-8", "surrogateescape")

    def read_bytes(self, addr: int, length: int) -> bytes:
        if self.mem_fd is None:
            self.mem_fd = os.open(f"/proc/{self.main_pid}/mem", os.O_RDONLY)
        try:
            return os.pread(self.mem_fd, min(length, 1 << 16), addr)
        except OSError:
            return b""

    def resolve(self, tid: int, dirfd: int | None, path: str) -> str:
        if path.startswith("/"):
            return os.path.normpath(path)
        if dirfd is None or _fd(dirfd) == AT_FDCWD:
            base = self.fd_path(tid, None)
        else:
            base = self.fd_path(tid, _fd(dirfd))
        return os.path.normpath(os.path.join(base, path)) if path else base

    def fd_path(self, tid: int, fd: int | None) -> str:
        try:
            return os.readlink(f"/proc/{tid}/cwd" if fd is None else f"/proc/{tid}/fd/{fd}")
        except OSError:
            return ""

    def in_lock_dir(self, path: str) -> bool:
        return path == self.lock_dir or os.path.dirname(path) == self.lock_dir

    # -- naming calls --------------------------------------------------------------

    def role_of(self, path: str) -> str:
        """What a path in the lock directory is, without the parts that vary per run."""
        if path == self.lock_dir:
            return "dir"
        name = os.path.basename(path)
        lock = os.environ.get("TRACER_LOCK_NAME", "")
        if lock and name == lock:
            return "lock"
        if lock and name.startswith(f"{lock}.takeover-"):
            return "claim"
        if name.endswith(".tmp"):
            return "tmp"
        if lock and name.startswith(f"{lock}."):
            return name[len(lock) :].split("-")[0].rstrip("0123456789") or "lock.*"
        return re.sub(r"[0-9a-f]{8,}|\d+", "N", name)

    def describe(self, tid: int, nr: int, args: tuple[int, ...]) -> dict[str, object] | None:
        if self.etcd and nr == etcdcalls.SENDTO:
            return self.etcd_step(tid, _fd(args[0]), self.read_bytes(args[1], args[2]))
        entry = SYSCALLS.get(nr)
        if entry is None:
            return None
        name, path_args, fd_arg = entry
        paths: list[str] = []
        for dirfd_index, path_index in path_args:
            raw = self.read_string(args[path_index])
            dirfd = None if dirfd_index is None else args[dirfd_index]
            if name in ("newfstatat", "statx") and raw == "":
                flags = args[3] if name == "newfstatat" else args[2]
                if flags & AT_EMPTY_PATH:
                    paths.append(self.fd_path(tid, _fd(args[0])))
                    continue
            paths.append(self.resolve(tid, dirfd, raw))
        if fd_arg is not None:
            paths.append(self.fd_path(tid, _fd(args[fd_arg])))
        if not any(self.in_lock_dir(p) for p in paths):
            return None
        roles = [self.role_of(p) if self.in_lock_dir(p) else "elsewhere" for p in paths]
        detail = ""
        if name in OPEN_CALLS:
            flags = args[OPEN_CALLS[name]] if name != "openat2" else 0
            detail = (
                ",O_CREAT"
                if flags & os.O_CREAT
                else (",O_DIRECTORY" if flags & os.O_DIRECTORY else "")
            )
        signature = f"{name}({'→'.join(roles)}{detail})"
        return {"name": name, "paths": paths, "sig": signature}

    def etcd_step(self, tid: int, fd: int, data: bytes) -> dict[str, object] | None:
        """The send that completes an HTTP request to etcd, named for its step."""
        head = etcdcalls.request_head(data)
        if head is not None:
            path, length = head
            if length:  # the body follows in the next send
                self.heads[tid] = (fd, path)
                return None
            body = b""
        elif self.heads.get(tid, (None,))[0] == fd:
            path, body = self.heads.pop(tid)[1], data
        else:
            return None
        return {"name": "sendto", "paths": [], "fd": fd, "sig": etcdcalls.step_name(path, body)}

    def phase_of(self, thread: Thread) -> str:
        if thread.role != "main":
            return thread.role
        return "main-after-thread" if self.other_thread_called else "main"

    # -- the loop ------------------------------------------------------------------

    def run(self, argv: list[str]) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                ptrace(PTRACE_TRACEME, 0)
                os.kill(os.getpid(), signal.SIGSTOP)
                os.execvp(argv[0], argv)
            finally:
                os._exit(127)
        self.main_pid = pid
        # While a thread is held, stops of the others are awaited with sigtimedwait: every
        # stop sends SIGCHLD, so each is handled at once (polling would add a sleep to
        # every system call of the threads that go on, and slow their fencing down).
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
        _, status = os.waitpid(pid, WALL)
        assert os.WIFSTOPPED(status), status
        ptrace(
            PTRACE_SETOPTIONS,
            pid,
            0,
            PTRACE_O_TRACESYSGOOD | PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL,
        )
        self.threads[pid] = Thread(pid, "main")
        self.emit({"event": "start", "pid": pid, "t": time.monotonic()})
        ptrace(PTRACE_SYSCALL, pid)
        exit_status: int | None = None
        while self.threads:
            held = [t for t in self.threads.values() if t.held_until is not None]
            if held:
                wpid, status = os.waitpid(-1, WALL | os.WNOHANG)
                if wpid == 0:
                    now = time.monotonic()
                    for thread in held:
                        if thread.held_until is not None and now >= thread.held_until:
                            thread.held_until = None
                            self.emit({"event": "resumed", "tid": thread.tid, "t": now})
                            self.resume(thread.tid)
                    until = min(t.held_until or now for t in held)
                    signal.sigtimedwait({signal.SIGCHLD}, max(0.0, min(until - now, 0.05)))
                    continue
            else:
                try:
                    wpid, status = os.waitpid(-1, WALL)
                except ChildProcessError:
                    break
            code = self.handle(wpid, status)
            if code is not None:
                exit_status = code
        self.emit({"event": "exit", "status": exit_status, "fired": self.fired})
        return 1 if exit_status is None else exit_status

    def resume(self, tid: int, sig: int = 0) -> None:
        try:
            ptrace(PTRACE_SYSCALL, tid, 0, sig)
        except ProcessLookupError:
            pass

    def handle(self, tid: int, status: int) -> int | None:
        if os.WIFEXITED(status) or os.WIFSIGNALED(status):
            thread = self.threads.pop(tid, None)
            if thread is not None and thread.call is not None and tid != self.main_pid:
                pass
            if tid == self.main_pid:
                if thread is not None and thread.call is not None:
                    self.finish(thread, None)
                for other in list(self.threads.values()):
                    if other.call is not None:
                        self.finish(other, None)
                self.threads.clear()
                if os.WIFEXITED(status):
                    return os.WEXITSTATUS(status)
                return 128 + os.WTERMSIG(status)
            return None
        if not os.WIFSTOPPED(status):
            return None
        thread = self.threads.get(tid)
        if thread is None:  # a new thread's first stop can come before its parent's event
            thread = self.threads[tid] = Thread(tid, self.new_role())
        sig = os.WSTOPSIG(status)
        event = status >> 16
        if sig == (signal.SIGTRAP | 0x80):
            self.syscall_stop(thread)
            return None
        if event == PTRACE_EVENT_CLONE:
            child = ctypes.c_ulong()
            ptrace(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(child))
            if child.value not in self.threads:
                self.threads[child.value] = Thread(child.value, self.new_role())
            self.resume(tid)
            return None
        if event == PTRACE_EVENT_EXEC:
            if self.mem_fd is not None:
                os.close(self.mem_fd)
                self.mem_fd = None
            self.resume(tid)
            return None
        if sig == signal.SIGSTOP and thread.role != "main" and not thread.in_call:
            self.resume(tid)  # the stop a traced new thread starts with
            return None
        self.resume(tid, sig)  # a signal for the tracee: deliver it
        return None

    def new_role(self) -> str:
        self.started_threads += 1
        return f"t{self.started_threads}"

    def syscall_stop(self, thread: Thread) -> None:
        now = time.monotonic()
        regs = Regs()
        try:
            ptrace(PTRACE_GETREGS, thread.tid, 0, ctypes.addressof(regs))
        except ProcessLookupError:
            return
        if not thread.in_call:
            thread.in_call = True
            thread.entered = now
            call = self.describe(thread.tid, int(regs.orig_rax), regs.args())
            if call is not None:
                self.enter(thread, call, now)
                if thread.held_until is not None or self.killed_at_entry:
                    self.killed_at_entry = False
                    return  # held (resumed by the loop) or killed
            self.resume(thread.tid)
            return
        thread.in_call = False
        if thread.call is not None:
            call = thread.call
            result = _signed(regs.rax)
            self.finish(thread, result)
            if self.pending_exit is not None:
                kind, self.pending_exit = self.pending_exit, None
                if "fd" in call and not self.answered(thread, call, kind):
                    return
                self.emit({"event": "fault", "kind": kind, "t": time.monotonic()})
                if kind == "after":
                    os.kill(self.main_pid, signal.SIGKILL)
                    return
                if kind == "late":
                    thread.held_until = time.monotonic() + float(str(self.fault["seconds"]))  # type: ignore[index]
                    return
        elif now - thread.entered >= BURST_GAP and not (
            self.etcd and int(regs.orig_rax) in etcdcalls.WAITING
        ):
            thread.burst = []  # it slept: the next lock call starts a new burst
        self.resume(thread.tid)

    def answered(self, thread: Thread, call: dict[str, object], kind: str) -> bool:
        """At the exit of an etcd step's send: wait for etcd's answer (the request ran),
        and for `lost` take it off the connection. False if the thread was resumed."""
        sock = etcdcalls.await_answer(self.main_pid, int(str(call["fd"])))
        if sock is None:
            self.emit({"event": "no-answer", "t": time.monotonic()})
        elif kind == "lost":
            stolen = etcdcalls.steal_answer(sock)
            self.emit(
                {"event": "fault", "kind": "lost", "t": time.monotonic(), "bytes": len(stolen)}
            )
            self.resume(thread.tid)
            return False
        else:
            sock.close()
        return True

    killed_at_entry = False
    pending_exit: str | None = None  # a fault to apply at the exit of the faulted call

    def enter(self, thread: Thread, call: dict[str, object], now: float) -> None:
        if thread.role != "main":
            self.other_thread_called = True
        prefix = (*thread.burst, str(call["sig"]))
        thread.burst = list(prefix)
        phase = self.phase_of(thread)
        key = (phase, prefix)
        self.prefix_counts[key] = self.prefix_counts.get(key, 0) + 1
        self.seq += 1
        call.update(
            seq=self.seq,
            tid=thread.tid,
            phase=phase,
            prefix=list(prefix),
            nth=self.prefix_counts[key],
            t=now,
        )
        thread.call = call
        fault = self.fault
        if (
            fault is None
            or self.fired
            or fault["phase"] != phase
            or list(prefix) != fault["prefix"]
            or self.prefix_counts[key] != fault.get("nth", 1)
        ):
            return
        self.fired = True
        kind = fault["kind"]
        call["fault"] = kind
        if kind == "before":
            self.emit({"event": "fault", "kind": "before", "t": now})
            self.finish(thread, None)
            os.kill(self.main_pid, signal.SIGKILL)
            self.killed_at_entry = True
        elif kind in ("after", "lost", "late"):
            self.pending_exit = str(kind)
        elif kind == "delay":
            seconds = float(str(fault["seconds"]))
            self.emit({"event": "fault", "kind": "delay", "t": now, "seconds": seconds})
            thread.held_until = now + seconds

    def finish(self, thread: Thread, result: int | None) -> None:
        call = thread.call
        if call is None:
            return
        thread.call = None
        call["result"] = result
        call["done"] = time.monotonic()
        self.emit(call)

    def emit(self, record: dict[str, object]) -> None:
        self.log.write(json.dumps(record) + "\n")


def main(argv: list[str]) -> int:
    args = argv[1:]
    options: dict[str, str] = {}
    while args and args[0] != "--":
        options[args[0]] = args[1]
        args = args[2:]
    command = args[1:]
    fault = None
    if options.get("--fault"):
        with open(options["--fault"]) as f:
            fault = json.load(f)
    tracer = Tracer(options["--dir"], options["--log"], fault)
    # Signals for the tracer go to the traced process instead (it is the "real" one).
    return tracer.run(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
