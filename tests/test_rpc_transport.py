"""The C transport under pycpt.Criu, on a plain SOCK_SEQPACKET socketpair (no CRIU)."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from pycpt._native import ffi, lib


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    yield a, b
    a.close()
    b.close()


def receive(sock: socket.socket, timeout_ms: int = 5000):
    size = lib.pycpt_rpc_next_size(sock.fileno(), timeout_ms)
    assert size > 0, os.strerror(-size)
    buf = ffi.new("char[]", size)
    fd = ffi.new("int *")
    n = lib.pycpt_rpc_recv(sock.fileno(), buf, size, fd)
    return ffi.buffer(buf, n)[:], fd[0]


@pytest.mark.parametrize("size", [1, 4096, 300_000, 4 << 20])
def test_whole_messages_of_any_size(pair, size):
    """Larger than the default socket buffer (212992 bytes) too: the sender grows it."""
    a, b = pair
    data = os.urandom(size)
    assert lib.pycpt_rpc_send(a.fileno(), data, len(data)) == 0
    got, fd = receive(b)
    assert got == data and fd == -1


def test_messages_keep_their_boundaries(pair):
    a, b = pair
    for msg in (b"one", b"two-two", b"3"):
        assert lib.pycpt_rpc_send(a.fileno(), msg, len(msg)) == 0
    assert [receive(b)[0] for _ in range(3)] == [b"one", b"two-two", b"3"]


def test_a_descriptor_travels_with_a_message(pair, tmp_path):
    a, b = pair
    f = tmp_path / "f"
    f.write_text("hello")
    with open(f) as handle:
        socket.send_fds(a, [b"note"], [handle.fileno()])
    got, fd = receive(b)
    try:
        assert got == b"note"
        assert os.read(fd, 5) == b"hello"
    finally:
        os.close(fd)


def test_timeout_and_closed_peer(pair):
    a, b = pair
    assert lib.pycpt_rpc_next_size(b.fileno(), 10) == -errno.ETIMEDOUT
    a.close()
    assert lib.pycpt_rpc_next_size(b.fileno(), 1000) == -errno.ECONNRESET


def test_spawn_of_a_missing_binary_is_an_errno():
    keep = [ffi.new("char[]", b"/nonexistent/criu")]
    argv = ffi.new("char *[]", keep + [ffi.NULL])
    sock, pid = ffi.new("int *"), ffi.new("int *")
    assert lib.pycpt_rpc_spawn(argv, -1, -1, 0, sock, pid) == -errno.ENOENT


def test_wait_reaps_with_a_timeout():
    # "swrk N", appended by spawn, become sh's $0 and $1
    keep = [ffi.new("char[]", a) for a in (b"/bin/sh", b"-c", b"sleep 0.3")]
    argv = ffi.new("char *[]", keep + [ffi.NULL])
    sock, pid, status = ffi.new("int *"), ffi.new("int *"), ffi.new("int *")
    assert lib.pycpt_rpc_spawn(argv, -1, -1, 0, sock, pid) == 0
    os.close(sock[0])
    assert lib.pycpt_rpc_wait(pid[0], 10, status) == -errno.ETIMEDOUT
    assert lib.pycpt_rpc_wait(pid[0], 5000, status) == 0
    assert os.WIFEXITED(status[0]) and os.WEXITSTATUS(status[0]) == 0
    with pytest.raises(ChildProcessError):
        os.waitpid(pid[0], os.WNOHANG)


def test_criu_dies_with_the_process_that_started_it(engine, tmp_path):
    """A `criu swrk` gets PR_SET_PDEATHSIG: when its caller is SIGKILLed, CRIU does not go on
    by itself (a migration's page server, a tree held for a dump nobody will use)."""
    import signal
    import subprocess
    import sys
    import time

    from tests.helpers.workload import alive, wait_for

    code = (
        "import sys, pycpt\n"
        "c = pycpt.Criu()\n"
        "c.prepare()\n"
        "print(c.prepared_pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        criu = int(proc.stdout.readline())
        assert alive(criu)
        time.sleep(0.1)
        assert alive(criu)  # it waits for requests while its caller lives
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not alive(criu), 10, "CRIU to die with its caller")


def test_a_child_started_with_die_with_parent_dies_with_it():
    import signal
    import subprocess
    import sys

    from tests.helpers.workload import alive, wait_for

    code = (
        "import subprocess, sys\n"
        "from pycpt._sys.process import die_with_parent\n"
        "p = subprocess.Popen(['sleep', '1000'], preexec_fn=die_with_parent())\n"
        "print(p.pid, flush=True)\n"
        "sys.stdin.read()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(proc.stdout.readline())
        assert alive(child)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    wait_for(lambda: not alive(child), 10, "the child to die with its parent")


def test_take_fd_copies_a_descriptor_of_another_process(tmp_path):
    import subprocess

    from pycpt._sys.process import fds_of_kind, take_fd

    f = tmp_path / "f"
    f.write_text("held")
    proc = subprocess.Popen(["sh", "-c", f"exec 7<{f}; exec sleep 1000"], pass_fds=())
    try:
        from tests.helpers.workload import wait_for

        wait_for(lambda: os.path.exists(f"/proc/{proc.pid}/fd/7"), 10, "fd 7")
        assert 7 in fds_of_kind(proc.pid, str(f))
        pidfd = os.pidfd_open(proc.pid)
        try:
            fd = take_fd(pidfd, 7)
        finally:
            os.close(pidfd)
        try:
            assert os.read(fd, 4) == b"held"
            assert not os.get_inheritable(fd)
        finally:
            os.close(fd)
    finally:
        proc.kill()
        proc.wait()


def test_a_fence_writes_when_its_owner_dies_and_holds_descriptors_until_then():
    """pycpt_proc_fence: held descriptors stay open while the fence lives; the owner's
    death (its end of the socket closing) makes it write its bytes, then let go."""
    from pycpt._sys.process import Fence

    fence = Fence()
    try:
        killed_r, killed_w = os.pipe()
        held_r, held_w = os.pipe()
        fence.on_our_death(killed_w, b"1")
        fence.hold([held_w])
        os.close(killed_w)
        os.close(held_w)
        os.set_blocking(held_r, False)
        with pytest.raises(BlockingIOError):
            os.read(held_r, 1)  # not EOF: the fence still holds the write end
        fence.sock.close()  # as if we died
        fence.sock = None
        assert os.read(killed_r, 1) == b"1"
        os.waitpid(fence.pid, 0)
        os.set_blocking(held_r, True)
        assert os.read(held_r, 1) == b""  # it let go of what it held
    finally:
        fence.release()


def test_a_released_fence_writes_nothing():
    from pycpt._sys.process import Fence

    fence = Fence()
    killed_r, killed_w = os.pipe()
    fence.on_our_death(killed_w, b"FROZEN")
    os.close(killed_w)
    fence.release()
    assert os.read(killed_r, 10) == b""
