"""The init of the container fidelity tests (tests/test_container_fidelity.py).

    python3 container_workload.py REPORT PART [PART...]

Sets up each PART, writes REPORT.ready (JSON: what it set up), then sleeps. SIGUSR1 makes
it check every part from inside and write REPORT.json (atomically); the tests look from
outside too (/proc, ss, a client in the container's network namespace).

Parts:
  tcp6       an IPv6 listener on ::1 and an established pair through it; each end sends a
             pattern until its send buffer is full, so both have unsent data in the send
             queue and unread data in the receive queue. Checked: every byte arrives in order
             both ways, new data flows both ways, the listener accepts (and echoes for the
             outside client).
  udp        connected UDP pairs over IPv6 (::1) and on 127.0.0.2, a datagram each way
             queued. Checked: new datagrams flow both ways (CRIU drops UDP receive queues).
  stops      three children in process groups of their own: one stopped by SIGSTOP, one by
             SIGTSTP, one running (it counts in a file). Checked: what the parent's
             waitid(WSTOPPED|WNOWAIT) says about each.
  ghost=PATH a 16 MiB file of random bytes written at PATH, opened, then unlinked. Checked:
             nlink 0, offset, contents (SHA-256).
  remap=PATH a file at PATH hard-linked to PATH.keep, opened through PATH, then PATH
             unlinked (the last link of the name it was opened by; CRIU's link remap).
             Checked: contents, offset, nlink 1.
  inflight   a listener on 127.0.0.1 with a connection that was never accepted (in its
             accept queue). Checked: the listener still accepts a new connection.
  tcpclose   an established IPv4 pair on 127.0.0.1. Checked: what each end sees when read.
  echo=PORT  a TCP server on every address, port PORT, echoing what each client sends (for a
             peer outside the container, through a NIC the test gives it).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys
import threading
import time

REPORT = sys.argv[1]
PARTS = sys.argv[2:]
PATTERN = bytes(range(251)) * 300
facts: dict = {}
checks = []


def pattern(offset: int, n: int) -> bytes:
    out = bytearray()
    while n:
        i = offset % 251
        k = min(n, 251 - i)
        out += PATTERN[i : i + k]
        offset += k
        n -= k
    return bytes(out)


def fill(sock: socket.socket) -> int:
    """Send the pattern until the send buffer is full; the bytes accepted."""
    sock.setblocking(False)
    sent = 0
    while True:
        try:
            sent += sock.send(pattern(sent, 65536))
        except BlockingIOError:
            break
    sock.setblocking(True)
    return sent


def write_atomically(path: str, data: dict) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(data, f)
    os.rename(path + ".tmp", path)


def part_tcp6() -> None:
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    client = socket.create_connection(("::1", port))
    server, _ = listener.accept()
    sent = {"c->s": fill(client), "s->c": fill(server)}
    facts["tcp6"] = {"port": port, "sent": sent, "client": client.getsockname()[1]}

    def echo() -> None:  # the outside client's connections, one line each
        while True:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(conn.recv(100))

    def check() -> dict:
        r = {}
        for name, snd, rcv in (("c->s", client, server), ("s->c", server, client)):
            total, got, same = sent[name], 0, True
            rcv.settimeout(20)
            while got < total:
                chunk = rcv.recv(min(65536, total - got))
                if not chunk:
                    break
                same = same and chunk == pattern(got, len(chunk))
                got += len(chunk)
            snd.sendall(b"more")
            r[name] = {"sent": total, "got": got, "same": same, "more": rcv.recv(4) == b"more"}
        r["ok"] = all(v["got"] == v["sent"] and v["same"] and v["more"] for v in r.values())
        threading.Thread(target=echo, daemon=True).start()
        return r

    checks.append(("tcp6", check))


def part_udp() -> None:
    pairs = {}
    for name, family, addr in (
        ("udp6", socket.AF_INET6, "::1"),
        ("udp4_127.0.0.2", socket.AF_INET, "127.0.0.2"),
    ):
        a, b = socket.socket(family, socket.SOCK_DGRAM), socket.socket(family, socket.SOCK_DGRAM)
        a.bind((addr, 0))
        b.bind((addr, 0))
        a.connect(b.getsockname()[:2])
        b.connect(a.getsockname()[:2])
        a.send(b"queued a->b")
        b.send(b"queued b->a")
        pairs[name] = (a, b)
    facts["udp"] = {n: [a.getsockname()[1], b.getsockname()[1]] for n, (a, b) in pairs.items()}

    def check() -> dict:
        r = {}
        for name, (a, b) in pairs.items():
            ok = True
            for x, y in ((a, b), (b, a)):
                y.setblocking(False)
                while True:  # what was queued at the dump, if anything
                    try:
                        y.recv(100)
                    except BlockingIOError:
                        break
                y.settimeout(10)
                x.send(b"new")
                ok = ok and y.recv(100) == b"new"
            r[name] = ok
        r["ok"] = all(r.values())
        return r

    checks.append(("udp", check))


def part_stops() -> None:
    kids = {}
    counter = REPORT + ".count"
    for name, sig in (("sigstop", signal.SIGSTOP), ("sigtstp", signal.SIGTSTP), ("run", None)):
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            n = 0
            while True:
                n += 1
                if sig is None:
                    with open(counter + ".tmp", "w") as f:
                        f.write(str(n))
                    os.rename(counter + ".tmp", counter)
                time.sleep(0.02)
        # a group of its own before the signal: job-control stops sent to an orphaned
        # process group are dropped by the kernel
        os.setpgid(pid, pid)
        if sig is not None:
            os.kill(pid, sig)
        kids[name] = pid
    facts["stops"] = {"pids": kids, "counter": counter}

    def check() -> dict:
        r = {}
        for name, pid in kids.items():
            info = os.waitid(os.P_PID, pid, os.WSTOPPED | os.WNOHANG | os.WNOWAIT)
            r[name] = {"pid": pid, "stop_signal": info.si_status if info else None}
        return r

    checks.append(("stops", check))


def part_ghost(path: str) -> None:
    data = os.urandom(16 << 20)
    with open(path, "wb") as f:
        f.write(data)
    fd = os.open(path, os.O_RDONLY)
    os.lseek(fd, 12345, os.SEEK_SET)
    os.unlink(path)
    digest = hashlib.sha256(data).hexdigest()
    facts["ghost"] = {"fd": fd, "sha256": digest, "size": len(data)}

    def check() -> dict:
        st = os.fstat(fd)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        content = os.pread(fd, st.st_size + 1, 0)
        ok = st.st_nlink == 0 and offset == 12345 and hashlib.sha256(content).hexdigest() == digest
        return {"nlink": st.st_nlink, "offset": offset, "ok": ok}

    checks.append(("ghost", check))


def part_remap(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"linked remap " * 100)
    fd = os.open(path, os.O_RDWR)
    os.lseek(fd, 7, os.SEEK_SET)
    os.link(path, path + ".keep")
    os.unlink(path)
    facts["remap"] = {"fd": fd}

    def check() -> dict:
        st = os.fstat(fd)
        offset = os.lseek(fd, 0, os.SEEK_CUR)
        content = os.pread(fd, 4096, 0)
        same_file = os.stat(path + ".keep").st_ino == st.st_ino
        ok = st.st_nlink == 1 and offset == 7 and content == b"linked remap " * 100 and same_file
        return {"nlink": st.st_nlink, "offset": offset, "ok": ok}

    checks.append(("remap", check))


def part_inflight() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    waiting = socket.create_connection(("127.0.0.1", port))  # never accepted
    facts["inflight"] = {"port": port}

    def check() -> dict:
        fresh = socket.create_connection(("127.0.0.1", port), timeout=10)
        listener.settimeout(10)
        conn, peer = listener.accept()
        # the first one in the queue may be the old, never accepted one, if it was kept
        ok = conn is not None
        fresh.close()
        conn.close()
        return {"ok": ok, "waiting_port": waiting.getsockname()[1], "accepted": peer[1]}

    checks.append(("inflight", check))


def part_tcpclose() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    facts["tcpclose"] = {"port": listener.getsockname()[1]}

    def check() -> dict:
        r = {}
        for name, s in (("client", client), ("server", server)):
            s.settimeout(5)
            try:
                r[name] = "eof" if s.recv(10) == b"" else "data"
            except OSError as exc:
                r[name] = type(exc).__name__
        return r

    checks.append(("tcpclose", check))


def part_echo(port: str) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("0.0.0.0", int(port)))
    listener.listen(8)

    def serve(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    facts["echo"] = {"port": int(port)}


def report(*_: object) -> None:
    def run() -> None:
        out = {}
        for name, check in checks:
            try:
                out[name] = check()
            except Exception as exc:  # reported: the test says what failed
                out[name] = {"ok": False, "error": repr(exc)}
        write_atomically(REPORT + ".json", out)

    threading.Thread(target=run).start()


for spec in PARTS:
    name, _, arg = spec.partition("=")
    globals()["part_" + name](*([arg] if arg else []))
signal.signal(signal.SIGUSR1, report)
write_atomically(REPORT + ".ready", facts)
# Short sleeps, not one long one: a signal that arrives after a restore but before the
# restored task re-enters its interrupted sleep runs Python's C-level handler only, and
# CPython looks at it when the sleep ends (seen: a report lost in a 3600 s sleep).
while True:
    time.sleep(0.05)
