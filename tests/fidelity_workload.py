"""A container init holding one instance of every category of process state, for
tests/test_fidelity.py.

    python fidelity_workload.py WORKDIR REGS_BINARY [SKIP,...]

Sets up the state (see `build`), writes WORKDIR/ready, then idles. On SIGUSR1 it writes
WORKDIR/observation.json (atomically): what it sees of each category from inside the
container, so the test can compare the observation before a checkpoint with the one after
restore. Observing never changes the state: queued data is peeked, or read and written back
when we own both ends. SKIP names categories not to set up (those CRIU is not asked to save).

Run by path; imports nothing of pycpt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import mmap
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from typing import Any, Callable, Dict, List

libc = ctypes.CDLL(None, use_errno=True)
librt = ctypes.CDLL(ctypes.util.find_library("rt") or None, use_errno=True)


def check(ret: int, what: str) -> int:
    if ret == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


class Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", Timespec), ("it_value", Timespec)]


def seconds(ts: Timespec) -> float:
    return ts.tv_sec + ts.tv_nsec / 1e9


CLOCK_MONOTONIC = 1
SIGEV_NONE = 1
TFD_CLOEXEC = 0o2000000
IPC_CREAT, IPC_NOWAIT, MSG_COPY = 0o1000, 0o4000, 0o40000
SETVAL, GETVAL = 16, 12
PR_SET_NAME = 15
SHM_KEY, SEM_KEY, MSG_KEY = 0x5EED01, 0x5EED02, 0x5EED03
SHM_TEXT = b"System V shared memory survives" * 100
MESSAGES = [(1, b"first message"), (7, b"second, of type seven")]

libc.shmat.restype = ctypes.c_void_p
libc.shmat.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
libc.msgsnd.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.msgrcv.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long, ctypes.c_int]
libc.msgrcv.restype = ctypes.c_ssize_t


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def child(body: Callable[[], None]) -> int:
    """Fork a child that runs `body` and then sleeps forever."""
    pid = os.fork()
    if pid == 0:
        try:
            body()
            while True:
                signal.pause()
        finally:
            os._exit(1)
    return pid


def proc_status(pid: Any, *keys: str) -> Dict[str, str]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = " ".join(v.split())
    return out


def proc_stat(pid: int) -> List[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def on_usr2(signum: int, frame: Any) -> None:
    """A handler only observed, never called."""


def on_term(signum: int, frame: Any) -> None:
    """Another handler only observed."""


class Workload:
    def __init__(self, workdir: str, regs: str, skip: List[str]) -> None:
        self.dir, self.regs, self.skip = workdir, regs, skip
        self.alarms = 0
        self.requested = False
        self.s: Dict[str, Any] = {}

    # --- set-up ------------------------------------------------------------------------

    def build(self) -> None:
        s, d = self.s, self.dir
        # address space: heap bytes, an anonymous private mapping, and a MAP_SHARED one
        # that a child keeps echoing (word 0 copied to word 1), so sharing itself is tested
        rnd = random.Random(1)
        s["heap"] = bytearray(rnd.randbytes(4 << 20))
        s["anon"] = mmap.mmap(-1, 2 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        s["anon"][:] = rnd.randbytes(2 << 20)
        s["shared"] = shared = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        shared[16:] = rnd.randbytes((1 << 20) - 16)

        def echo() -> None:
            while True:
                shared[8:16] = shared[0:8]
                time.sleep(0.005)

        s["echo_pid"] = child(echo)

        # registers: the C hash chain
        s["regs_file"] = os.path.join(d, "regs.pub")
        s["regs"] = subprocess.Popen([self.regs, "run", s["regs_file"]], close_fds=True)

        # open files
        path = os.path.join(d, "regular.txt")
        with open(path, "wb") as f:
            f.write(b"0123456789" * 1000)
        s["append"] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK)
        os.write(s["append"], b"appended")
        s["rw"] = os.open(path, os.O_RDWR)
        os.lseek(s["rw"], 4321, os.SEEK_SET)
        s["regular_path"] = path
        gone = os.path.join(d, "deleted.txt")
        s["deleted"] = os.open(gone, os.O_RDWR | os.O_CREAT, 0o600)
        os.write(s["deleted"], b"content of a deleted file " * 50)
        os.lseek(s["deleted"], 77, os.SEEK_SET)
        os.unlink(gone)

        # pipes
        s["pipe"] = os.pipe()
        os.write(s["pipe"][1], b"unread pipe data " * 30)
        os.set_blocking(s["pipe"][0], False)

        # unix sockets
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        a.sendall(b"unix stream a->b")
        b.sendall(b"unix stream b->a, longer")
        s["unix_pair"] = (a, b)
        da, db = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        da.send(b"datagram one")
        da.send(b"datagram two")
        s["unix_dgram"] = (da, db)
        lis = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lis.bind(os.path.join(d, "listen.sock"))
        lis.listen(5)
        s["unix_listen"] = lis

        # TCP over the container's loopback
        if "tcp" not in self.skip:
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind(("127.0.0.1", 0))
            srv.listen(5)
            cli = socket.create_connection(srv.getsockname())
            acc, _ = srv.accept()
            cli.sendall(b"client to server, unread")
            acc.sendall(b"server to client, unread too")
            s["tcp"] = (srv, cli, acc)

        # System V IPC (in the container's own ipc namespace)
        shm = check(libc.shmget(SHM_KEY, 65536, IPC_CREAT | 0o600), "shmget")
        addr = libc.shmat(shm, None, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            check(-1, "shmat")
        ctypes.memmove(addr, SHM_TEXT, len(SHM_TEXT))
        s["shm"] = (shm, addr)
        sem = check(libc.semget(SEM_KEY, 3, IPC_CREAT | 0o600), "semget")
        for i, v in enumerate((5, 0, 42)):
            check(libc.semctl(sem, i, SETVAL, ctypes.c_int(v)), "semctl")
        s["sem"] = sem
        msq = check(libc.msgget(MSG_KEY, IPC_CREAT | 0o600), "msgget")
        for mtype, text in MESSAGES:
            buf = struct.pack("q", mtype) + text
            check(libc.msgsnd(msq, buf, len(text), IPC_NOWAIT), "msgsnd")
        s["msq"] = msq

        # terminal: a pty with changed attributes and window size
        master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ECHO | termios.ICANON)  # lflag
        attrs[1] &= ~termios.OPOST  # oflag
        attrs[4] = attrs[5] = termios.B9600
        attrs[6][termios.VMIN] = 3
        attrs[6][termios.VTIME] = 7
        attrs[6][termios.VINTR] = b"\x07"
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
        s["pty"] = (master, slave)

        # user and group ids, in a child that keeps them
        # ("uids" skipped: only the supplementary groups, see test_fidelity.CAN_DUMP_UIDS)
        def ids() -> None:
            os.setgroups([4242, 4343])
            if "uids" not in self.skip:
                os.setresgid(1001, 1002, 1003)
                os.setresuid(2001, 2002, 2003)

        s["ids_pid"] = child(ids)

        # pid/pgrp/sid: a child in its own process group, and one in its own session
        s["pgrp_pid"] = child(lambda: os.setpgid(0, 0))
        s["sid_pid"] = child(lambda: os.setsid() and None)

        # epoll watching an eventfd with a counter, and the pipe's read end
        s["eventfd"] = os.eventfd(41, os.EFD_NONBLOCK)
        s["epoll"] = ep = select.epoll()
        ep.register(s["eventfd"], select.EPOLLIN)
        ep.register(s["pipe"][0], select.EPOLLIN | select.EPOLLET)

        # file locks: a POSIX write lock on a range, a BSD shared lock on another file
        if "locks" not in self.skip:
            self.build_locks()

    def build_locks(self) -> None:
        s, d = self.s, self.dir
        s["lock_path"] = os.path.join(d, "posix.lock")
        s["posix_lock"] = os.open(s["lock_path"], os.O_RDWR | os.O_CREAT, 0o600)
        os.write(s["posix_lock"], b"\0" * 4096)
        fcntl.lockf(s["posix_lock"], fcntl.LOCK_EX | fcntl.LOCK_NB, 100, 200)
        s["flock_path"] = os.path.join(d, "bsd.lock")
        s["flock"] = os.open(s["flock_path"], os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(s["flock"], fcntl.LOCK_SH | fcntl.LOCK_NB)

    def build_more(self) -> None:
        s = self.s

        # threads, each named and each with its own signal mask and counter
        s["thread_counts"] = [0, 0, 0]
        ready = threading.Barrier(4)

        def worker(i: int) -> None:
            libc.prctl(PR_SET_NAME, f"fid-worker-{i}".encode(), 0, 0, 0)
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN + 10 + i})
            ready.wait()
            while True:
                s["thread_counts"][i] += 1
                time.sleep(0.01)

        for i in range(3):
            threading.Thread(target=worker, args=(i,), daemon=True).start()
        ready.wait()

        # timers: an interval timer, a POSIX timer, a timerfd
        signal.signal(signal.SIGALRM, self.on_alarm)
        signal.setitimer(signal.ITIMER_REAL, 0.25, 0.25)
        timer = ctypes.c_void_p()
        sev = bytearray(64)  # struct sigevent: sigev_value, sigev_signo, sigev_notify
        struct.pack_into("qii", sev, 0, 0, 0, SIGEV_NONE)
        check(
            librt.timer_create(
                CLOCK_MONOTONIC, (ctypes.c_char * 64).from_buffer(sev), ctypes.byref(timer)
            ),
            "timer_create",
        )
        spec = Itimerspec(Timespec(7, 500000000), Timespec(1000, 0))
        check(librt.timer_settime(timer, 0, ctypes.byref(spec), None), "timer_settime")
        s["posix_timer"] = timer
        tfd = check(libc.timerfd_create(CLOCK_MONOTONIC, TFD_CLOEXEC), "timerfd_create")
        spec = Itimerspec(Timespec(3, 0), Timespec(2000, 0))
        check(libc.timerfd_settime(tfd, 0, ctypes.byref(spec), None), "timerfd_settime")
        s["timerfd"] = tfd

        # rlimits: soft limits lowered (raising the hard ones needs CAP_SYS_RESOURCE)
        import resource

        for res, soft in (
            (resource.RLIMIT_NOFILE, 777),
            (resource.RLIMIT_NPROC, 4321),
            (resource.RLIMIT_CORE, 12345),
        ):
            resource.setrlimit(res, (soft, resource.getrlimit(res)[1]))

        # signal handlers and the blocked mask, and one signal pending
        signal.signal(signal.SIGUSR2, on_usr2)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, self.on_usr1)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGWINCH, signal.SIGRTMIN + 3})
        # thread-directed, so that no worker thread (which does not block it) takes it
        signal.pthread_kill(threading.main_thread().ident, signal.SIGRTMIN + 3)

        # cwd, last so that the relative paths above are not affected
        cwd = os.path.join(self.dir, "some dir", "deeper")
        os.makedirs(cwd)
        os.chdir(cwd)

    def on_alarm(self, signum: int, frame: Any) -> None:
        self.alarms += 1

    def on_usr1(self, signum: int, frame: Any) -> None:
        self.requested = True

    # --- observation -------------------------------------------------------------------

    def observe(self) -> Dict[str, Any]:
        obs: Dict[str, Any] = {}
        for name in (
            "memory",
            "registers",
            "files",
            "pipes",
            "unix",
            "tcp",
            "ipc",
            "cwd",
            "signals",
            "timers",
            "terminal",
            "ids",
            "pids",
            "rlimits",
            "threads",
            "epoll",
            "locks",
        ):
            try:
                obs[name] = getattr(self, "observe_" + name)()
            except Exception as exc:  # one category failing must not hide the others
                obs[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return obs

    def observe_memory(self) -> Dict[str, Any]:
        shared = self.s["shared"]
        token = os.urandom(8)
        shared[0:8] = token
        deadline = time.monotonic() + 5
        while shared[8:16] != token and time.monotonic() < deadline:
            time.sleep(0.002)
        return {
            "heap": sha(self.s["heap"]),
            "anon": sha(self.s["anon"][:]),
            "shared": sha(shared[16:]),
            "shared_with_child": shared[8:16] == token,
        }

    def observe_registers(self) -> Dict[str, Any]:
        with open(self.s["regs_file"], "rb") as f:
            pub = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
        try:
            while True:
                seq, step, x, dbits = struct.unpack_from("4Q", pub)
                if seq % 2 == 0 and struct.unpack_from("Q", pub)[0] == seq and step:
                    return {
                        "step": step,
                        "x": f"{x:016x}",
                        "d": f"{dbits:016x}",
                        "alive": self.s["regs"].poll() is None,
                    }
                time.sleep(0.001)
        finally:
            pub.close()

    def observe_files(self) -> Dict[str, Any]:
        s = self.s
        mask = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK

        def fd(n: int) -> Dict[str, Any]:
            return {
                "offset": os.lseek(n, 0, os.SEEK_CUR),
                "flags": fcntl.fcntl(n, fcntl.F_GETFL) & mask,
                "nlink": os.fstat(n).st_nlink,
                "content": sha(os.pread(n, 1 << 20, 0)) if n != s["append"] else None,
            }

        return {
            "append": fd(s["append"]),
            "rw": fd(s["rw"]),
            "deleted": fd(s["deleted"]),
            "regular_content": sha(open(s["regular_path"], "rb").read()),
            "deleted_link": os.readlink(f"/proc/self/fd/{s['deleted']}"),
        }

    def observe_pipes(self) -> Dict[str, Any]:
        r, w = self.s["pipe"]
        queued = struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0]
        data = os.read(r, queued)  # we own both ends: read and write back
        os.write(w, data)
        return {
            "queued": queued,
            "data": sha(data),
            "read_flags": fcntl.fcntl(r, fcntl.F_GETFL) & os.O_NONBLOCK,
            "write_end": fcntl.fcntl(w, fcntl.F_GETFL) & os.O_ACCMODE,
        }

    def observe_unix(self) -> Dict[str, Any]:
        a, b = self.s["unix_pair"]
        da, db = self.s["unix_dgram"]
        lis = self.s["unix_listen"]
        grams = [db.recv(100), db.recv(100)]  # datagrams: read and send back, in order
        for g in grams:
            da.send(g)
        # a new connection to the listening socket works
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(lis.getsockname())
        conn, _ = lis.accept()
        c.sendall(b"hello")
        echoed = conn.recv(5)
        c.close()
        conn.close()
        return {
            "a_queued": b.recv(1000, socket.MSG_PEEK).decode(),
            "b_queued": a.recv(1000, socket.MSG_PEEK).decode(),
            "dgrams": [g.decode() for g in grams],
            "listening": lis.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
            "listen_name": lis.getsockname(),
            "new_connection": echoed.decode(),
        }

    def observe_tcp(self) -> Dict[str, Any]:
        if "tcp" not in self.s:
            return {"skipped": True}
        srv, cli, acc = self.s["tcp"]
        at_server = acc.recv(1000, socket.MSG_PEEK)
        at_client = cli.recv(1000, socket.MSG_PEEK)
        # round trip: the server reads what is queued plus a ping, and the queue is rebuilt
        cli.sendall(b"|ping")
        got = b""
        acc.settimeout(5)
        while len(got) < len(at_server) + 5:
            got += acc.recv(1000)
        cli.sendall(at_server)
        return {
            "at_server": at_server.decode(),
            "at_client": at_client.decode(),
            "round_trip": got.decode(),
            "peer": list(cli.getpeername()),
            "local": list(cli.getsockname()),
            "server_listening": srv.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
            "state": "established" if acc.getpeername() == cli.getsockname() else "?",
        }

    def observe_ipc(self) -> Dict[str, Any]:
        shm, addr = self.s["shm"]
        sem, msq = self.s["sem"], self.s["msq"]
        messages = []
        buf = ctypes.create_string_buffer(8 + 256)
        for i in range(len(MESSAGES) + 1):
            n = libc.msgrcv(msq, buf, 256, i, IPC_NOWAIT | MSG_COPY)
            if n < 0:
                break
            mtype = struct.unpack_from("q", buf.raw)[0]
            messages.append([mtype, buf.raw[8 : 8 + n].decode()])
        return {
            "shm_key": self.sysvipc("shm", shm),
            "shm": sha(ctypes.string_at(addr, 65536)),
            "shm_text": ctypes.string_at(addr, len(SHM_TEXT)) == SHM_TEXT,
            "sem_key": self.sysvipc("sem", sem),
            "sem": [check(libc.semctl(sem, i, GETVAL), "semctl") for i in range(3)],
            "msg_key": self.sysvipc("msg", msq),
            "messages": messages,
        }

    @staticmethod
    def sysvipc(kind: str, ident: int) -> str:
        with open(f"/proc/sysvipc/{kind}") as f:
            for line in f.readlines()[1:]:
                key, idn = line.split()[:2]
                if int(idn) == ident:
                    return key
        return "missing"

    def observe_cwd(self) -> Dict[str, Any]:
        return {"getcwd": os.getcwd(), "proc": os.readlink("/proc/self/cwd")}

    def observe_signals(self) -> Dict[str, Any]:
        def name(h: Any) -> str:
            return getattr(h, "__name__", str(h))

        kernel = proc_status("self", "SigBlk", "SigIgn", "SigCgt", "SigPnd", "ShdPnd")
        return {
            "handlers": {
                sig.name: name(signal.getsignal(sig))
                for sig in (
                    signal.SIGUSR1,
                    signal.SIGUSR2,
                    signal.SIGTERM,
                    signal.SIGHUP,
                    signal.SIGALRM,
                    signal.SIGINT,
                )
            },
            "blocked": sorted(int(x) for x in signal.pthread_sigmask(signal.SIG_BLOCK, [])),
            "pending": sorted(int(x) for x in signal.sigpending()),
            "kernel": kernel,
        }

    def observe_timers(self) -> Dict[str, Any]:
        value, interval = signal.getitimer(signal.ITIMER_REAL)
        cur = Itimerspec()
        check(librt.timer_gettime(self.s["posix_timer"], ctypes.byref(cur)), "timer_gettime")
        tfd = Itimerspec()
        check(libc.timerfd_gettime(self.s["timerfd"], ctypes.byref(tfd)), "timerfd_gettime")
        return {
            "itimer": [value, interval],
            "alarms": self.alarms,
            "posix": [seconds(cur.it_value), seconds(cur.it_interval)],
            "timerfd": [seconds(tfd.it_value), seconds(tfd.it_interval)],
        }

    def observe_terminal(self) -> Dict[str, Any]:
        master, slave = self.s["pty"]
        attrs = termios.tcgetattr(slave)
        attrs[6] = [c.hex() if isinstance(c, bytes) else c for c in attrs[6]]
        # the pair still works: bytes from the master arrive at the slave
        os.write(master, b"xyz")
        got = b""
        deadline = time.monotonic() + 5
        while len(got) < 3 and time.monotonic() < deadline:
            if select.select([slave], [], [], 0.1)[0]:
                got += os.read(slave, 3 - len(got))
        return {
            "attrs": attrs,
            "winsize": list(
                struct.unpack("HHHH", fcntl.ioctl(slave, termios.TIOCGWINSZ, b"\0" * 8))
            ),
            "slave_is_tty": os.isatty(slave),
            "through": got.decode(errors="replace"),
        }

    def observe_ids(self) -> Dict[str, Any]:
        return proc_status(self.s["ids_pid"], "Uid", "Gid", "Groups")

    def observe_pids(self) -> Dict[str, Any]:
        def ids(pid: int) -> List[int]:
            st = proc_stat(pid)
            return [pid, int(st[1]), int(st[2]), int(st[3])]  # pid, ppid, pgrp, session

        s = self.s
        return {
            "init": [os.getpid(), os.getppid(), os.getpgrp(), os.getsid(0)],
            "pgrp_child": ids(s["pgrp_pid"]),
            "sid_child": ids(s["sid_pid"]),
            "ids_child": ids(s["ids_pid"]),
            "regs_child": ids(s["regs"].pid),
        }

    def observe_rlimits(self) -> Dict[str, Any]:
        import resource

        return {
            name: list(resource.getrlimit(getattr(resource, name)))
            for name in ("RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_STACK")
        }

    def observe_threads(self) -> Dict[str, Any]:
        tasks = {}
        for tid in sorted(os.listdir("/proc/self/task"), key=int):
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            tasks[comm] = proc_status(f"self/task/{tid}", "SigBlk")["SigBlk"]
        return {
            "count": threading.active_count(),
            "tasks": tasks,
            "counts": list(self.s["thread_counts"]),
        }

    def observe_epoll(self) -> Dict[str, Any]:
        s = self.s
        ready = sorted(s["epoll"].poll(0))
        fds = {s["eventfd"]: "eventfd", s["pipe"][0]: "pipe"}
        counter = os.eventfd_read(s["eventfd"])  # read resets it: write it back
        os.eventfd_write(s["eventfd"], counter)
        watched = []
        with open(f"/proc/self/fdinfo/{s['epoll'].fileno()}") as f:
            for line in f:
                if line.startswith("tfd:"):
                    w = line.split()
                    watched.append([fds.get(int(w[1]), w[1]), w[3], w[5]])  # fd, events, data
        return {
            "ready": [[fds.get(fd, fd), ev] for fd, ev in ready],
            "counter": counter,
            "watched": sorted(watched),
        }

    def observe_locks(self) -> Dict[str, Any]:
        s = self.s
        if "posix_lock" not in s:
            return {"skipped": True}
        inodes = {
            os.fstat(s["posix_lock"]).st_ino: "posix.lock",
            os.fstat(s["flock"]).st_ino: "bsd.lock",
        }
        held = []
        with open("/proc/locks") as f:
            for line in f:
                w = line.split()
                if w[1] == "->":
                    continue
                ino = int(w[5].split(":")[2])
                if ino in inodes:
                    held.append([inodes[ino], w[1], w[2], w[3], int(w[4]), w[6], w[7]])
        # a helper process probes the locks as another owner would
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                fd = os.open(s["lock_path"], os.O_RDWR)
                probe = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 250, 10, 0)
                lk = struct.unpack("hhqqi4x", fcntl.fcntl(fd, fcntl.F_GETLK, probe))
                fd2 = os.open(s["flock_path"], os.O_RDWR)
                try:
                    fcntl.flock(fd2, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    ex = "granted"
                except BlockingIOError:
                    ex = "refused"
                fcntl.flock(fd2, fcntl.LOCK_SH | fcntl.LOCK_NB)
                os.write(
                    w,
                    json.dumps(
                        {
                            "getlk": [lk[0] == fcntl.F_WRLCK, lk[2], lk[3], lk[4]],
                            "flock_ex": ex,
                            "flock_sh": "granted",
                        }
                    ).encode(),
                )
            finally:
                os._exit(0)
        os.close(w)
        probe = json.loads(os.read(r, 4096) or b"{}")
        os.close(r)
        os.waitpid(pid, 0)
        return {"held": sorted(held), "probe": probe}

    # --- main loop ---------------------------------------------------------------------

    def run(self) -> None:
        self.build()
        self.build_more()
        with open(os.path.join(self.dir, "ready"), "w") as f:
            f.write(str(os.getpid()))
        report = os.path.join(self.dir, "observation.json")
        while True:
            time.sleep(0.02)
            if self.requested:
                self.requested = False
                obs = self.observe()
                with open(report + ".tmp", "w") as f:
                    json.dump(obs, f)
                os.rename(report + ".tmp", report)


if __name__ == "__main__":
    Workload(sys.argv[1], sys.argv[2], sys.argv[3].split(",") if len(sys.argv) > 3 else []).run()
