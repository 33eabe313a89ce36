"""The CRIU RPC client against the real CRIU: requests, dump/restore, notify, failures."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

import pycpt
from tests.helpers.workload import MemHash, PidNsMemHash, alive, chain_continues, wait_for


@pytest.fixture(autouse=True)
def _images_dirs(tmp_path):
    """The directories the tests dump into: Criu.dump() refuses a missing one, as `criu dump
    -D` does ("missing" and "dst" stay missing)."""
    for name in ("img", "local", "remote", "src", "ps", "cpu", "pre"):
        (tmp_path / name).mkdir()


@pytest.fixture
def criu(engine):
    with pycpt.Criu(engine) as client:
        yield client


@pytest.fixture
def workloads(tmp_path):
    """Start MemHash workloads; every one is killed and reaped at the end, even on failure."""
    started = []

    def start(mib: int = 8) -> MemHash:
        w = MemHash(mib, tmp_path / f"w{len(started)}")
        started.append(w)
        return w

    (tmp_path / "w0").mkdir()
    for i in range(1, 4):
        (tmp_path / f"w{i}").mkdir()
    yield start
    for w in started:
        w.stop()


def test_version_and_features(criu):
    v = criu.version()
    assert v >= pycpt.CriuVersion(4, 2, 0)
    feats = criu.features()
    assert set(feats) == {"mem_track", "lazy_pages", "pidfd_store"}
    assert all(isinstance(x, bool) for x in feats.values())


def test_session_keeps_one_swrk(criu):
    criu.version()
    first = criu._session.pid
    criu.version()
    criu.features()
    assert criu._session.pid == first and criu._session.alive
    criu.close()
    assert criu._session is None
    with pytest.raises(ProcessLookupError):
        os.kill(first, 0)  # reaped, not a zombie


def test_without_session_every_request_has_its_own_swrk(engine):
    with pycpt.Criu(engine, session=False) as c:
        assert c.version() == c.version()
        assert c._session is None and not c._inflight


def test_check_passes(criu):
    criu.check()


def test_dump_restore_64mib_keeps_memory_and_computation(criu, workloads, tmp_path):
    w = workloads(64)
    before = w.sample()
    result = criu.dump(w.pid, tmp_path / "img")
    assert result.stats["pages_written"] >= (64 << 20) // 4096
    assert result.stats["frozen_time"] > 0
    assert w.reap_original() == -9  # CRIU killed it after the dump, as `criu dump` does
    restored = criu.restore(tmp_path / "img", rst_sibling=True)
    w.adopt(restored.pid)
    assert restored.stats["pages_restored"] >= (64 << 20) // 4096
    after = w.sample()
    assert after[2] == before[2], "memory checksum changed across checkpoint/restore"
    assert after[0] > before[0], "the computation did not go on"
    assert chain_continues(before, after), "the computation did not continue exactly"


def test_dump_leave_running(criu, workloads, tmp_path):
    w = workloads()
    before = w.sample()
    criu.dump(w.pid, tmp_path / "img", leave_running=True)
    assert alive(w.pid)
    after = w.sample()
    assert chain_continues(before, after) and after[2] == before[2]


class Recorder(pycpt.Notify):
    """Records every notification; raises at the one named `fail_at`."""

    def __init__(self, fail_at: str = "") -> None:
        self.seen = []
        self.fail_at = fail_at

    def _record(self, event):
        self.seen.append(event.name)
        if event.name == self.fail_at:
            raise RuntimeError(f"refused at {event.name}")


for _name in (
    "pre_dump",
    "post_dump",
    "network_lock",
    "network_unlock",
    "setup_namespaces",
    "post_setup_namespaces",
    "pre_restore",
    "post_restore",
    "pre_resume",
    "post_resume",
):
    setattr(Recorder, _name, Recorder._record)


def test_notify_sees_dump_and_restore_steps(criu, workloads, tmp_path):
    w = workloads()
    rec = Recorder()
    criu.dump(w.pid, tmp_path / "img", notify=rec)
    assert {"pre-dump", "post-dump"} <= set(rec.seen)
    w.reap_original()
    rec = Recorder()
    restored = criu.restore(tmp_path / "img", rst_sibling=True, notify=rec)
    w.adopt(restored.pid)
    assert rec.seen[0] == "pre-restore"
    assert {"post-restore", "pre-resume", "post-resume"} <= set(rec.seen)


@pytest.mark.parametrize("step", ["pre-dump", "post-dump"])
def test_notify_exception_aborts_dump_and_target_runs_on(criu, workloads, tmp_path, step):
    w = workloads()
    before = w.sample()
    with pytest.raises(RuntimeError, match=f"refused at {step}"):
        criu.dump(w.pid, tmp_path / "img", notify=Recorder(fail_at=step))
    assert alive(w.pid)
    after = w.sample()
    assert chain_continues(before, after) and after[0] > before[0]


@pytest.mark.parametrize("daemon", [False, True], ids=["child", "daemon"])
def test_page_server_receives_the_pages(criu, workloads, tmp_path, daemon):
    """Dump to a page server on loopback: memory goes over TCP into the server's directory,
    the rest stays local; together they restore."""
    w = workloads(16)
    before = w.sample()
    server = criu.page_server(tmp_path / "remote", address="127.0.0.1", port=0, daemon=daemon)
    assert server.port > 0
    criu.dump(w.pid, tmp_path / "local", ps={"address": "127.0.0.1", "port": server.port})
    w.reap_original()
    if not daemon:
        assert server.pid > 0
        assert os.waitstatus_to_exitcode(criu.wait_pid(server.pid)) == 0
    assert list((tmp_path / "remote").glob("pages-*.img"))
    assert not list((tmp_path / "local").glob("pages-*.img"))
    for img in (tmp_path / "local").glob("*.img"):
        (tmp_path / "remote" / img.name).write_bytes(img.read_bytes())
    restored = criu.restore(tmp_path / "remote", rst_sibling=True)
    w.adopt(restored.pid)
    after = w.sample()
    assert after[2] == before[2] and chain_continues(before, after)


def _tcp_listeners() -> set:
    """Inodes of the listening TCP sockets of this network namespace."""
    found = set()
    for name in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{name}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A":  # TCP_LISTEN
                found.add(fields[9])
    return found


def _socket_inodes(pid: int) -> set:
    """Inodes of the sockets `pid` has open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _criu_children() -> list:
    """Our children that run CRIU (a swrk, a page server...)."""
    me = str(os.getpid())
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmd = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if ppid == me and b"criu" in cmd:
            kids.append(int(entry.name))
    return kids


@pytest.mark.parametrize("prepared", [False, True], ids=["fresh", "prepared"])
def test_page_server_on_a_connected_socket(criu, workloads, tmp_path, prepared):
    """A dump given ps={"fd": N} sends its pages over that connected socket to a `criu
    page-server --ps-socket` on the other end: no TCP port anywhere; together the two
    directories restore. A prepared swrk is made to inherit the descriptor."""
    w = workloads(16)
    before = w.sample()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    listening = _tcp_listeners()
    with ours, theirs:
        server = criu.page_server_process(tmp_path / "remote", fd=theirs.fileno())
        theirs.close()  # the page server holds its end now
        if prepared:
            criu.prepare(pass_fd=ours.fileno())
            spare = criu.prepared_pid
            assert spare and ours.fileno() in {
                int(fd.name) for fd in Path(f"/proc/{spare}/fd").iterdir()
            }
        for pid in [server.pid, *_criu_children()]:
            assert not _socket_inodes(pid) & (_tcp_listeners() - listening)
        criu.dump(w.pid, tmp_path / "local", ps={"fd": ours.fileno()})
    w.reap_original()
    assert server.wait(30) == 0
    assert list((tmp_path / "remote").glob("pages-*.img"))
    assert not list((tmp_path / "local").glob("pages-*.img"))
    for img in (tmp_path / "local").glob("*.img"):
        (tmp_path / "remote" / img.name).write_bytes(img.read_bytes())
    restored = criu.restore(tmp_path / "remote", rst_sibling=True)
    w.adopt(restored.pid)
    after = w.sample()
    assert after[2] == before[2] and chain_continues(before, after)


def test_a_page_socket_must_be_an_open_socket(criu, workloads, tmp_path):
    w = workloads(8)
    r, wr = os.pipe()
    try:
        with pytest.raises(pycpt.InvalidArgumentError, match="not a socket"):
            criu.dump(w.pid, tmp_path / "local", ps={"fd": r})
        with pytest.raises(pycpt.InvalidArgumentError, match="not a socket"):
            criu.page_server_process(tmp_path / "remote", fd=r)
    finally:
        os.close(r)
        os.close(wr)
    assert alive(w.pid)


class LazyDump:
    """A lazy dump of `w` running in a thread (it blocks until its pages are served), its
    page server on a TCP port or (ps={"fd": N}) on a connected socket."""

    def __init__(self, engine, w, images_dir, port: int = 0, ps=None) -> None:
        self.criu = pycpt.Criu(engine)
        self.outcome = {}
        ready_r, ready_w = os.pipe()

        def source():
            try:
                self.outcome["dump"] = self.criu.dump(
                    w.pid,
                    images_dir,
                    lazy_pages=True,
                    ps=ps or {"address": "127.0.0.1", "port": port},
                    status_fd=ready_w,
                )
            except BaseException as exc:  # the test asserts on it
                self.outcome["error"] = exc
            finally:
                os.close(ready_w)

        self.thread = threading.Thread(target=source, daemon=True)
        self.thread.start()
        try:
            assert os.read(ready_r, 1), f"the lazy dump did not get ready: {self.outcome}"
        finally:
            os.close(ready_r)

    def close(self) -> None:
        """Kill the dump if it still waits for its client."""
        self.criu.close()
        self.thread.join(10)


@pytest.fixture
def pipe_max_size():
    """Set fs.pipe-max-size for one test; the old value is put back afterwards."""
    path = Path("/proc/sys/fs/pipe-max-size")
    old = path.read_text().strip()

    def set_to(value: int) -> None:
        path.write_text(str(value))

    yield set_to
    path.write_text(old)


def test_lazy_dump_refused_when_pipes_are_too_small(criu, engine, tmp_path, pipe_max_size):
    pipe_max_size(1 << 20)
    w = PidNsMemHash(16, tmp_path)
    try:
        before = w.sample()
        with pytest.raises(pycpt.PipeSizeError, match="fs.pipe-max-size") as ei:
            criu.dump(
                w.pid,
                tmp_path / "src",
                lazy_pages=True,
                ps={"address": "127.0.0.1", "port": _free_port()},
            )
        assert "sysctl -w fs.pipe-max-size" in str(ei.value)
        assert chain_continues(before, w.sample())
    finally:
        w.stop()


def test_lazy_pages_restore(criu, engine, tmp_path, pipe_max_size):
    """Post-copy: a lazy dump serves memory from a page server, the restore starts before the
    pages arrive, and `criu lazy-pages` brings every page over; memory and computation match.
    The workload is init of its own pid namespace, since the source keeps its pid until the
    last page has been served."""
    pipe_max_size(4 << 20)
    w = PidNsMemHash(64, tmp_path)
    port = _free_port()
    lazy = None
    try:
        before = w.sample()
        lazy = LazyDump(engine, w, tmp_path / "src", port)
        shutil.copytree(tmp_path / "src", tmp_path / "dst")
        copied = sum(p.stat().st_size for p in (tmp_path / "dst").glob("pages-*.img"))
        assert copied < (8 << 20), "the lazy dump wrote the memory instead of serving it"
        with criu.lazy_pages(tmp_path / "dst", address="127.0.0.1", port=port) as daemon:
            restored = criu.restore(tmp_path / "dst", lazy_pages=True)
            w.adopt(restored.pid)
            after = w.sample()
            assert daemon.wait(60) == 0
        lazy.thread.join(60)
        assert "error" not in lazy.outcome, lazy.outcome.get("error")
        assert after[2] == before[2] and chain_continues(before, after)
    finally:
        if lazy:
            lazy.close()
        w.stop()


def test_lazy_pages_over_a_connected_socket(criu, engine, tmp_path, pipe_max_size, monkeypatch):
    """Post-copy without a TCP port: the lazy dump gets one end of a connected socket (RPC
    config file `ps-socket N`, as CRIU's RPC ignores ps.fd for lazy dumps), `criu lazy-pages
    --ps-socket` the other; CRIU listens nowhere, and memory and computation match."""
    pipe_max_size(4 << 20)
    made: "list[int]" = []
    memfd_create = os.memfd_create

    def recorded(name, flags=os.MFD_CLOEXEC):
        fd = memfd_create(name, flags)
        made.append(fd)
        return fd

    monkeypatch.setattr(os, "memfd_create", recorded)
    in_tmp = set(os.listdir(tempfile.gettempdir()))
    w = PidNsMemHash(64, tmp_path)
    lazy = None
    listening = _tcp_listeners()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        before = w.sample()
        given = ours.fileno()
        lazy = LazyDump(engine, w, tmp_path / "src", ps={"fd": given})
        ours.close()  # CRIU has its copy
        for pid in _criu_children():
            assert not _socket_inodes(pid) & (_tcp_listeners() - listening)
        # the descriptor went to CRIU in a config file that is a memfd of this process:
        # nothing in /tmp that a killed pycpt could leave behind
        assert len(made) == 1, made
        assert os.readlink(f"/proc/self/fd/{made[0]}").startswith("/memfd:pycpt-criu-rpc.conf")
        assert os.pread(made[0], 64, 0) == f"ps-socket {given}\n".encode()
        assert not {n for n in os.listdir(tempfile.gettempdir()) if "criu-conf" in n} - in_tmp
        shutil.copytree(tmp_path / "src", tmp_path / "dst")
        with criu.lazy_pages(tmp_path / "dst", fd=theirs.fileno()) as daemon:
            theirs.close()
            restored = criu.restore(tmp_path / "dst", lazy_pages=True)
            w.adopt(restored.pid)
            after = w.sample()
            assert daemon.wait(60) == 0
        lazy.thread.join(60)
        assert "error" not in lazy.outcome, lazy.outcome.get("error")
        assert after[2] == before[2] and chain_continues(before, after)
        try:  # closed after the request (its number may have been taken again since)
            now = os.readlink(f"/proc/self/fd/{made[0]}")
        except FileNotFoundError:
            now = ""
        assert not now.startswith("/memfd:pycpt-criu-rpc.conf")
    finally:
        ours.close()
        theirs.close()
        if lazy:
            lazy.close()
        w.stop()


def test_a_lazy_page_socket_and_a_config_file_do_not_mix(criu, workloads, tmp_path):
    w = workloads(8)
    a, b = socket.socketpair()
    with a, b, pytest.raises(pycpt.InvalidArgumentError, match="config_file"):
        criu.dump(w.pid, tmp_path / "src", lazy_pages=True, ps={"fd": a.fileno()}, config_file="/x")
    assert alive(w.pid)


def test_close_aborts_a_lazy_dump_and_the_tree_runs_on(engine, tmp_path, pipe_max_size):
    """A lazy dump whose client never comes blocks; close() from another thread ends it, the
    dumping call raises, and the tree is still running with its memory intact."""
    pipe_max_size(4 << 20)
    w = PidNsMemHash(16, tmp_path)
    lazy = None
    try:
        before = w.sample()
        lazy = LazyDump(engine, w, tmp_path / "src", _free_port())
        lazy.close()
        assert isinstance(lazy.outcome.get("error"), pycpt.CriuConnectionError)
        assert alive(w.pid)
        after = w.sample()
        assert after[2] == before[2] and chain_continues(before, after)
    finally:
        if lazy:
            lazy.close()
        w.stop()


def test_close_ends_a_page_server_nobody_waited_for(engine, tmp_path):
    c = pycpt.Criu(engine)
    server = c.page_server(tmp_path / "ps", address="127.0.0.1", port=0)
    assert alive(server.pid)
    c.close()
    wait_for(lambda: not alive(server.pid), 10, "the page server to end")


def test_cpuinfo_dump_and_check(criu, tmp_path):
    criu.cpuinfo_dump(tmp_path / "cpu")
    assert (tmp_path / "cpu" / "cpuinfo.img").is_file()
    assert criu.cpuinfo_check(tmp_path / "cpu") is True


@pytest.mark.parametrize("freezing", ["ptrace", "cgroup-v1", "cgroup-v2"])
def test_ctrl_c_during_a_dump_stops_criu_and_the_tree_runs_on(
    make_cgroup, criu, workloads, tmp_path, freezing
):
    # (make_cgroup first: fixtures end in reverse order, so the workload goes before its cgroup)
    """SIGINT while CRIU is busy dumping: KeyboardInterrupt reaches the caller, CRIU is
    killed and reaped, and the tree (which CRIU had frozen, by ptrace or by its cgroup)
    runs on."""
    w = workloads(256)
    opts = {}
    if freezing.startswith("cgroup"):
        cgroup = make_cgroup(int(freezing[-1]))
        Path(cgroup, "cgroup.procs").write_text(str(w.pid))
        opts["freeze_cgroup"] = cgroup
    before = w.sample()

    class InterruptSoon(pycpt.Notify):
        def pre_dump(self, event):
            threading.Timer(0.03, os.kill, (os.getpid(), signal.SIGINT)).start()

    with pytest.raises(KeyboardInterrupt):
        criu.dump(w.pid, tmp_path / "img", notify=InterruptSoon(), **opts)
    assert not criu._inflight
    wait_for(lambda: _state(w.pid) not in ("t", "T", "D"), 10, "the tree to resume")
    if freezing.startswith("cgroup"):  # v1 keeps it frozen if CRIU dies: pycpt thaws it
        assert pycpt.Freezer(opts["freeze_cgroup"]).state is pycpt.FreezerState.THAWED
    after = w.sample()
    assert after[2] == before[2] and chain_continues(before, after)


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_dump_of_missing_pid(criu):
    pid = _free_pid()
    with pytest.raises(pycpt.ProcessNotFoundError, match=f"no process with pid {pid}") as ei:
        criu.dump(pid, "/tmp/pycpt-never-created")
    assert "ps -p" in str(ei.value)
    assert not Path("/tmp/pycpt-never-created").exists()


@pytest.mark.parametrize("pid", [0, -3, "12", True, 1.5])
def test_dump_rejects_bad_pid(criu, pid):
    with pytest.raises(ValueError):
        criu.dump(pid, "/tmp/x")


def test_images_dir_is_a_file(criu, workloads, tmp_path):
    w = workloads()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(pycpt.ImagesDirError, match="not a directory"):
        criu.dump(w.pid, f)
    assert alive(w.pid) and f.read_text() == "x"


def test_images_dir_not_writable(criu, workloads, tmp_path):
    w = workloads()
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "--bind", str(ro), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], check=True)
        with pytest.raises(pycpt.ImagesDirError, match="not writable"):
            criu.dump(w.pid, ro)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert alive(w.pid)
    w.sample()


def test_unknown_option_is_a_value_error(criu, workloads, tmp_path):
    w = workloads()
    with pytest.raises(ValueError, match="unknown CRIU option 'tcp_establshed'"):
        criu.dump(w.pid, tmp_path / "img", tcp_establshed=True)
    with pytest.raises(ValueError, match="takes one of"):
        criu.dump(w.pid, tmp_path / "img", network_lock="pf")
    assert alive(w.pid)


def test_no_criu_binary(tmp_path):
    with pycpt.Criu(tmp_path / "no-such-criu") as c:
        with pytest.raises(pycpt.CriuNotFoundError, match="cannot start CRIU"):
            c.version()


def test_criu_that_dies_at_start(tmp_path):
    fake = tmp_path / "criu"
    fake.write_text(
        "#!/bin/sh\n"
        "echo 'Error (criu/kerndat.c:1): vdso: Unexpected rt vDSO area bounds' >&2\nexit 1\n"
    )
    fake.chmod(0o755)
    with pycpt.Criu(fake) as c:
        with pytest.raises(pycpt.CriuConnectionError) as ei:
            c.version()
    assert "vDSO" in str(ei.value)
    assert ei.value.request == "VERSION"


def test_pre_dump_without_soft_dirty(criu, workloads, tmp_path):
    if criu.features()["mem_track"]:
        pytest.skip("this kernel tracks dirty memory; the refusal path is not reachable")
    w = workloads()
    before = w.sample()
    for call in (
        lambda: criu.pre_dump(w.pid, tmp_path / "pre"),
        lambda: criu.dump(w.pid, tmp_path / "img", track_mem=True),
    ):
        with pytest.raises(pycpt.SoftDirtyUnsupportedError, match="CONFIG_MEM_SOFT_DIRTY"):
            call()
    assert alive(w.pid)
    assert "CRIUMFD" not in Path(f"/proc/{w.pid}/maps").read_text()
    assert chain_continues(before, w.sample())


def test_restore_onto_a_taken_pid(criu, workloads, tmp_path):
    w = workloads()
    criu.dump(w.pid, tmp_path / "img", leave_running=True)
    with pytest.raises(pycpt.PidInUseError) as ei:
        criu.restore(tmp_path / "img", rst_sibling=True)
    assert ei.value.log_lines and ei.value.log_path
    assert "rlimit" not in ei.value.cr_errmsg.lower()
    assert not any("RLIMIT_NOFILE" in line for line in ei.value.log_lines)
    assert "Can't fork for" in str(ei.value) and "hint:" in str(ei.value)
    assert alive(w.pid)
    w.sample()


def test_restore_from_a_corrupt_images_dir(criu, workloads, tmp_path):
    w = workloads()
    criu.dump(w.pid, tmp_path / "img")
    w.reap_original()
    for img in (tmp_path / "img").glob("core-*.img"):
        img.write_bytes(img.read_bytes()[:20])
    with pytest.raises(pycpt.CriuError):
        criu.restore(tmp_path / "img", rst_sibling=True)
    assert not alive(w.pid)


def test_restore_from_a_dir_without_images(criu, tmp_path):
    with pytest.raises(pycpt.ImagesDirError, match="no inventory.img"):
        criu.restore(tmp_path)
    with pytest.raises(pycpt.ImagesDirError, match="does not exist"):
        criu.restore(tmp_path / "missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _free_pid() -> int:
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 7
    while Path(f"/proc/{pid}").exists():
        pid -= 1
    return pid
