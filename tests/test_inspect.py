"""`pycpt inspect` against real checkpoints: what its JSON says about the process tree,
memory and files must be what /proc said just before the dump (a server with sockets and
files, a multi-process container, redis), and `--diff` must see a child and a socket that
appeared between two checkpoints of one container.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Dict, Iterator

import pytest

import pycpt
from pycpt import dumpfile
from pycpt.cli import main
from pycpt.container import Container
from tests.helpers import procfacts
from tests.helpers.workload import python_tree, wait_for

MiB = 1 << 20


def inspect(capsys: pytest.CaptureFixture[str], *args: str) -> Any:
    """Run `pycpt inspect ARGS`; its JSON output if --json was given, else its text."""
    capsys.readouterr()
    status = main(["inspect", *args])
    out, err = capsys.readouterr()
    assert status == 0, err
    return json.loads(out) if "--json" in args else out


def by_pid(report: Dict[str, Any]) -> Dict[int, Dict[str, Any]]:
    return {p["pid"]: p for p in report["processes"]}


# --- what the report must agree with -----------------------------------------------------


def check_tree(report: Dict[str, Any], facts: Dict[int, Dict[str, Any]]) -> None:
    """pid, ppid, pgid, sid, state, threads, command line and uid of every process."""
    procs = by_pid(report)
    assert set(procs) == set(facts)
    assert report["processes"][0]["ppid"] == 0  # the root comes first
    states = {"S": "alive", "R": "alive", "D": "alive", "T": "stopped", "t": "stopped"}
    for pid, f in facts.items():
        p = procs[pid]
        assert (p["ppid"], p["pgid"], p["sid"]) == (f["ppid"], f["pgid"], f["sid"]), pid
        assert p["state"] == states[f["state"]], pid
        assert len(p["threads"]) == f["threads"] and p["threads"][0] == pid
        assert p["argv"] == f["argv"] and p["comm"] == f["comm"]
        assert (p["uid"], p["gid"]) == (f["uid"], f["gid"])
        assert sorted(p["children"]) == sorted(q for q, g in facts.items() if g["ppid"] == pid)
    counts = report["counts"]
    assert counts["processes"] == len(facts)
    assert counts["threads"] == sum(f["threads"] for f in facts.values())


def check_memory(report: Dict[str, Any], facts: Dict[int, Dict[str, Any]]) -> None:
    """Every VMA where /proc/PID/maps has it, the mapped size, and the page accounts."""
    for pid, f in facts.items():
        p = by_pid(report)[pid]
        vmas = p["vmas"]
        assert [(v["start"], v["end"]) for v in vmas] == [(s, e) for s, e, _ in f["maps"]], pid
        for v, (_, _, name) in zip(vmas, f["maps"], strict=True):
            if name.startswith("/") and not name.endswith("(deleted)"):
                assert v["file"] == name and v["kind"].startswith("file"), (v, name)
            if name == "[stack]":
                assert v["kind"] == "stack"
            if name == "[heap]":
                assert v["kind"] == "heap"
            if name == "[vdso]":
                assert v["kind"] == "vdso"
            pages = v["size"] // 4096
            assert v["pages_dumped"] + v["pages_lazy"] + v["pages_absent"] <= pages
        m = p["memory"]
        assert m["bytes"] == sum(e - s for s, e, _ in f["maps"]) and m["vmas"] == len(vmas)
        assert sum(k["bytes"] for k in m["by_kind"].values()) == m["bytes"]
        private = sum(v["pages_dumped"] for v in vmas if v["shmid"] is None)
        assert private == m["pages"]["dumped"] and m["pages"]["lazy"] == 0


def check_files(report: Dict[str, Any], facts: Dict[int, Dict[str, Any]]) -> None:
    """Every descriptor, and what it is, as /proc/PID/fd links name it."""
    for pid, f in facts.items():
        files = {x["fd"]: x for x in by_pid(report)[pid]["files"]}
        assert set(files) == set(f["fds"]), pid
        for fd, link in f["fds"].items():
            x = files[fd]
            what = (pid, fd, link, x)
            if link.startswith("socket:["):
                assert x["type"].endswith("SK") and x["details"]["ino"] == int(link[8:-1]), what
            elif link.startswith("pipe:["):
                assert x["type"] == "PIPE" and x["details"]["pipe_id"] == int(link[6:-1]), what
            elif link == "anon_inode:[eventfd]":
                assert x["type"] == "EVENTFD", what
            elif link == "anon_inode:[eventpoll]":
                assert x["type"] == "EVENTPOLL", what
            elif link.startswith("/memfd:"):
                assert (
                    x["type"] == "MEMFD" and x["description"] == "memfd:" + link[7:].split(" (")[0]
                )
            else:
                assert (x["type"], x["description"]) == ("REG", link), what
        assert by_pid(report)[pid]["fds"] == len(files)


# --- a server with sockets and files (a process tree, not a container) -------------------

SERVER = r"""
import json, mmap, os, socket, sys, threading, time
box = sys.argv[1]
log = open(os.path.join(box, "server.log"), "a"); log.write("started\n"); log.flush()
data = open(os.path.join(box, "data"), "w+"); data.write("y" * 5000); data.flush(); data.seek(4321)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen(8)
usrv = socket.socket(socket.AF_UNIX); usrv.bind(os.path.join(box, "ctl.sock")); usrv.listen()
cli = socket.create_connection(srv.getsockname()); conn, _ = srv.accept()
cli.sendall(b"request")  # 7 bytes unread in conn
mem = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(mem), 4096):
    mem[i] = 1
r, w = os.pipe()
worker = os.fork()
if worker == 0:
    os.close(w); srv.close(); cli.close()
    while True:
        time.sleep(1000)
os.close(r)
for _ in range(3):
    threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
facts = {"port": srv.getsockname()[1], "cli": cli.getsockname()[1], "conn": conn.fileno(),
         "data": data.fileno(), "log": log.fileno()}
open(os.path.join(box, "ready.tmp"), "w").write(json.dumps(facts))
os.rename(os.path.join(box, "ready.tmp"), os.path.join(box, "ready"))
while True:
    time.sleep(1000)
"""


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory) -> Iterator[Dict[str, Any]]:
    """The server dumped by CRIU into an images directory, packed into a dump file too,
    with what /proc said about it just before."""
    box = tmp_path_factory.mktemp("inspect-server")
    with python_tree(SERVER, str(box)) as (proc, pids):
        wait_for(lambda: (box / "ready").exists() or proc.poll() is not None, 60, "the server")
        facts = json.loads((box / "ready").read_text())
        pids[:] = procfacts.tree(proc.pid)
        wait_for(lambda: len(os.listdir(f"/proc/{proc.pid}/task")) == 4, 10, "its threads")
        facts["procs"] = procfacts.snapshot(pids)
        facts["root"] = proc.pid
        (box / "img").mkdir()
        with pycpt.Criu(engine) as criu:
            criu.dump(proc.pid, box / "img", tcp_established=True)
        proc.wait(timeout=30)
        dumpfile.write_dump_file(
            box / "Dump.server", box / "img", config={"id": "server"}, criu_version="4.2.1"
        )
        facts["box"] = box
        yield facts


@pytest.mark.parametrize("what", ["img", "Dump.server"])
def test_server_tree_memory_and_files(server, capsys, what):
    report = inspect(capsys, "--json", str(server["box"] / what))
    facts = server["procs"]
    check_tree(report, facts)
    check_memory(report, facts)
    check_files(report, facts)
    root = by_pid(report)[server["root"]]
    (big,) = [v for v in root["vmas"] if v["size"] == 16 * MiB]
    assert big["kind"] == "anon-private" and big["pages_dumped"] == 16 * MiB // 4096
    files = {x["fd"]: x for x in root["files"]}
    assert files[server["data"]]["pos"] == 4321
    assert files[server["log"]]["flags"] & os.O_APPEND
    socks = report["sockets"]
    port = server["port"]
    (listening,) = [s for s in socks if s["state"] == "LISTEN" and s["family"] == "inet"]
    assert listening["local"] == f"127.0.0.1:{port}" and listening["protocol"] == "tcp"
    (conn,) = [s for s in socks if s["peer"] == f"127.0.0.1:{server['cli']}"]
    assert conn["state"] == "ESTABLISHED" and conn["inq"] == 7
    assert {"pid": server["root"], "fd": server["conn"]} in conn["owners"]
    (unix,) = [s for s in socks if s["family"] == "unix" and s["state"] == "LISTEN"]
    assert unix["local"] == str(server["box"] / "ctl.sock")
    assert report["counts"]["pipes"] == 1
    if what == "Dump.server":
        dump = report["dump"]
        assert (dump["container"], dump["format"], dump["criu_version"]) == ("server", 2, "4.2.1")
        sig = dump["signature"]
        assert sig["signed"] and sig["verified"] and sig["trusted"]  # by this host's key
        assert report["manifest"]["config"] == {"id": "server"}
    else:
        assert report["dump"]["format"] is None and report["manifest"] is None


def test_server_text_views(server, capsys):
    path = str(server["box"] / "Dump.server")
    text = inspect(capsys, path)
    assert "container   server" in text and "signature   signed by SHA256:" in text
    assert "(valid, trusted: this host)" in text
    assert f"listening   tcp 127.0.0.1:{server['port']}" in text
    assert "processes   2 (5 threads)" in text
    assert len(text.splitlines()) < 40  # one screen
    text = inspect(capsys, "--ps", "--files", "--mem", "--sockets", "--manifest", path)
    assert f"tcp 127.0.0.1:{server['port']} LISTEN" in text
    assert str(server["box"] / "data") in text and "anon-private" in text
    assert "manifest.json" not in text and "pstree.img" in text  # the parts, listed
    # every view alone, and the JSON of one view holds that section only
    for view in ("--ps", "--files", "--mem", "--sockets", "--manifest"):
        assert inspect(capsys, view, path)
    report = inspect(capsys, "--json", "--sockets", path)
    assert "sockets" in report and "manifest" not in report
    assert "files" not in report["processes"][0]


def test_inspect_reads_little_and_changes_nothing(server, tmp_path):
    path = server["box"] / "Dump.server"
    before = (path.stat().st_mtime_ns, path.read_bytes())
    from pycpt.images import Images

    with Images.open(path) as im:
        im.report(["sockets"])
        assert im.bytes_read < path.stat().st_size / 20
    assert (path.stat().st_mtime_ns, path.read_bytes()) == before


def test_a_container_id_means_its_dump_file(server, capsys, tmp_path, monkeypatch):
    state = tmp_path / "state"
    (state / "dump").mkdir(parents=True)
    shutil.copy(server["box"] / "Dump.server", state / "dump" / "Dump.web")
    report = inspect(capsys, "--json", "--state-dir", str(state), "web")
    assert report["source"]["path"] == str(state / "dump" / "Dump.web")
    monkeypatch.setenv("PYCPT_STATE_DIR", str(state))
    assert main(["inspect", "nosuch"]) == 1
    assert "container nosuch has no dump file" in capsys.readouterr().err
    assert main(["inspect", "bad id!"]) == 1
    assert main(["inspect"]) == 2
    with pytest.raises(SystemExit):
        main(["inspect", "--diff", "web"])  # --diff takes two


def test_damaged_dump_file_is_a_clear_error(server, capsys, tmp_path):
    data = bytearray((server["box"] / "Dump.server").read_bytes())
    bad = tmp_path / "bad"
    bad.write_bytes(data[: len(data) // 3])
    assert main(["inspect", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pycpt: error: {bad}") and "Traceback" not in err


# --- a multi-process container -----------------------------------------------------------

FAMILY = r"""
import json, os, signal, socket, sys, threading, time
box = sys.argv[1]
f = open(os.path.join(box, "shared.txt"), "w"); f.write("x" * 100); f.flush()
r, w = os.pipe()
srv = socket.socket(socket.AF_INET6); srv.bind(("::1", 7000)); srv.listen()
efd = os.eventfd(3)
kids = []
for i in range(3):
    pid = os.fork()
    if pid == 0:
        if i == 1:
            for _ in range(2):
                threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
        if i == 2:
            g = os.fork()  # a grandchild
            if g == 0:
                while True:
                    time.sleep(1000)
        while True:
            time.sleep(1000)
    kids.append(pid)
os.kill(kids[0], signal.SIGSTOP)
open(os.path.join(box, "ready.tmp"), "w").close()  # renamed: closed before it is seen
os.rename(os.path.join(box, "ready.tmp"), os.path.join(box, "ready"))
while True:
    time.sleep(1000)
"""


def test_multi_process_container(ctenv, capsys):
    box = ctenv / "box"
    box.mkdir()
    ct = Container.start("family", [sys.executable, "-c", FAMILY, str(box)])
    wait_for(lambda: (box / "ready").exists(), 30, "the container's processes")
    wait_for(lambda: len(procfacts.tree(ct.init_pid)) == 5, 10, "five processes")
    pids = procfacts.tree(ct.init_pid)
    wait_for(lambda: sum(len(os.listdir(f"/proc/{p}/task")) for p in pids) == 7, 10, "the threads")
    facts = procfacts.snapshot(pids)
    assert len(facts) == 5 and 1 in facts  # (threads take pids too)
    cgroup = str(ct.cgroup)
    ct.chkpnt()
    report = inspect(capsys, "--json", "family")  # the container id: its dump file
    check_tree(report, facts)
    check_memory(report, facts)
    check_files(report, facts)
    assert report["dump"]["container"] == "family"
    assert {"pid", "mnt", "uts", "ipc", "net"} <= set(report["namespaces"]["created_on_restore"])
    root = by_pid(report)[1]
    # the container's own cgroup, below the hierarchy's root (v2: controller "")
    path = root["cgroup"]["" if "unified" in cgroup else "freezer"]
    assert path.endswith("/family") and cgroup.endswith(path)
    (sock,) = [s for s in report["sockets"] if s["state"] == "LISTEN"]
    assert sock["local"] == "[::1]:7000" and len(sock["owners"]) == 5  # inherited by all
    text = inspect(capsys, "family")
    assert "container   family" in text and "stopped" in text
    assert "own, made anew on restore:" in text


# --- redis ------------------------------------------------------------------------------


def _program(name: str) -> str:
    path = shutil.which(name, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    if not path:
        msg = f"{name} not installed (`make setup` installs redis-server)"
        if os.environ.get("PYCPT_REQUIRE_CRIU") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def test_redis(ctenv, capsys):
    server = _program("redis-server")
    cli = _program("redis-cli")
    ct = Container.start(
        "redis",
        [server, "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        + ["--dir", str(ctenv), "--logfile", "", "--daemonize", "no"],
    )

    def answers() -> bool:
        p = ct.exec([cli, "ping"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        return p.communicate(timeout=10)[0].strip() == b"PONG"

    wait_for(answers, 30, "redis to answer")
    fill = ct.exec(
        [
            cli,
            "eval",
            "for i = 1, 20000 do redis.call('SET', 'k' .. i, string.rep('v', 200)) end",
            "0",
        ],
        stdout=subprocess.DEVNULL,
    )
    assert fill.wait(timeout=60) == 0

    def clients_gone() -> bool:  # redis closes a client's socket after the client left
        links = procfacts.descriptors(ct.init_pid).values()
        return sum(link.startswith("socket:") for link in links) == 1  # the listening one

    wait_for(clients_gone, 30, "redis to close its clients' sockets")
    pids = procfacts.tree(ct.init_pid)
    facts = procfacts.snapshot(pids)
    assert facts[1]["threads"] >= 2  # redis' background threads
    ct.chkpnt()
    report = inspect(capsys, "--json", "redis")
    check_tree(report, facts)
    check_memory(report, facts)
    check_files(report, facts)
    root = by_pid(report)[1]
    assert root["comm"] == "redis-server" and root["exe"] == os.path.realpath(server)
    (listening,) = [s for s in report["sockets"] if s["state"] == "LISTEN"]
    assert listening["local"] == "127.0.0.1:6379"
    # 20000 values of 200 bytes: several MiB of the heap or anonymous memory were dumped
    assert root["memory"]["pages"]["dumped"] * 4096 > 4 * MiB


# --- --diff between two checkpoints of one container --------------------------------------

GROWS = r"""
import os, signal, socket, sys, time
box = sys.argv[1]
held = []
def grow(*_):
    if os.fork() == 0:
        while True:
            time.sleep(1000)
    s = socket.socket(); s.bind(("127.0.0.1", 8080)); s.listen()
    held.append(s)
    held.append(bytearray(8 << 20))
    for i in range(0, len(held[-1]), 4096):
        held[-1][i] = 1
    open(os.path.join(box, "grown.tmp"), "w").close()
    os.rename(os.path.join(box, "grown.tmp"), os.path.join(box, "grown"))
signal.signal(signal.SIGUSR1, grow)
open(os.path.join(box, "ready.tmp"), "w").close()  # renamed: closed before it is seen
os.rename(os.path.join(box, "ready.tmp"), os.path.join(box, "ready"))
while True:
    time.sleep(1000)
"""


def test_diff_sees_a_new_child_and_socket(ctenv, capsys):
    box = ctenv / "box"
    box.mkdir()
    ct = Container.start("grows", [sys.executable, "-c", GROWS, str(box)])
    wait_for(lambda: (box / "ready").exists(), 30, "the container")
    ct.suspend()
    first = ct.dump(str(ctenv / "first.dump"))
    ct.resume()
    os.kill(ct.init_pid, signal.SIGUSR1)
    try:
        wait_for(lambda: (box / "grown").exists(), 60, "the child and the socket")
    except AssertionError as exc:  # say what the container did (its console has tracebacks)
        log = ct.log_path.read_text(errors="replace")[-2000:] if ct.log_path.exists() else ""
        state = procfacts.snapshot(procfacts.tree(ct.init_pid)) if ct.init_pid else {}
        states = {pid: f["state"] for pid, f in state.items()}
        raise AssertionError(f"{exc}; tasks {states}; console: {log!r}") from None
    second = ct.chkpnt(str(ctenv / "second.dump"))
    d = inspect(capsys, "--json", "--diff", str(first), str(second))
    assert d["same_container"] and d["a"]["container"] == d["b"]["container"] == "grows"
    (child,) = d["processes"]["added"]
    assert child["ppid"] == 1 and child["pid"] == 2 and child["state"] == "alive"
    assert d["processes"]["removed"] == []
    (added,) = d["sockets"]["added"]
    assert (added["protocol"], added["local"], added["state"]) == (
        "tcp",
        "127.0.0.1:8080",
        "LISTEN",
    )
    assert d["sockets"]["removed"] == []
    (root_files,) = [f for f in d["files"] if f["pid"] == 1]
    assert [x["type"] for x in root_files["added"]] == ["INETSK"]
    assert d["counts"]["processes"] == [1, 2] and d["counts"]["sockets"] == [0, 1]
    (mem,) = [m for m in d["memory"] if m["pid"] == 1]
    assert mem["bytes"][1] - mem["bytes"][0] >= 8 * MiB
    assert mem["pages"]["dumped"][1] - mem["pages"]["dumped"][0] >= 8 * MiB // 4096
    text = inspect(capsys, "--diff", str(first), str(second))
    assert "+ process 2 (ppid 1, alive)" in text
    assert "+ socket tcp 127.0.0.1:8080 LISTEN" in text
    assert "~ memory of 1: mapped" in text
    same = inspect(capsys, "--diff", str(first), str(first))
    assert "no change" in same


def test_text_views_escape_what_a_terminal_would_run(server):
    """Names, paths and arguments come from the images: none reaches the terminal raw."""
    from pycpt.images import Images, diff_reports, format_diff, format_report

    with Images.open(server["box"] / "Dump.server") as im:
        report = im.report()
    evil = "\x1b]0;owned\x07\x1b[2J\u202e"
    for p in report["processes"]:
        p["comm"] = p["argv"][0] = p["exe"] = p["cwd"] = evil
        for f in p["files"]:
            f["description"] = evil
        for v in p["vmas"]:
            v["file"] = evil
    for s in report["sockets"]:
        s["local"] = evil
    report["manifest"]["kernel"] = report["dump"]["kernel"] = evil
    report["dump"]["container"] = report["source"]["path"] = evil
    text = format_report(report, ["summary", "ps", "files", "mem", "sockets", "manifest"])
    text += format_diff(diff_reports(report, report))
    assert "\\x1b]0;owned\\x07\\x1b[2J\\u202e" in text
    assert not any(c in text for c in "\x1b\x07\u202e")


def test_diff_ignores_what_a_restore_renumbers():
    """Pipe and socket inodes are new after a restore: not a change; a file's position is."""
    from pycpt.images import diff_reports

    def report(pipe: int, peer: int, pos: int) -> Dict[str, Any]:
        files = [
            {"fd": 0, "type": "PIPE", "description": f"pipe:[{pipe}]", "pos": None,
             "details": {"pipe_id": pipe, "queued": 0}},
            {"fd": 1, "type": "UNIXSK", "description": f"unix stream (unnamed) peer ino {peer}",
             "pos": None, "details": {"type": "stream", "name": None, "state": "ESTABLISHED",
                                      "ino": peer + 1, "peer_ino": peer}},
            {"fd": 2, "type": "REG", "description": "/var/log/x", "pos": pos, "details": {}},
        ]  # fmt: skip
        proc = {"pid": 1, "ppid": 0, "sid": 1, "state": "alive", "threads": [1], "files": files,
                "memory": None}  # fmt: skip
        return {"source": {"path": "p", "modified": None}, "dump": {"container": "c"},
                "processes": [proc], "sockets": [], "counts": {}}  # fmt: skip

    d = diff_reports(report(10, 20, 5), report(11, 21, 5))
    assert d["files"] == [] and d["processes"]["changed"] == [] and d["memory"] == []
    (f,) = diff_reports(report(10, 20, 5), report(11, 21, 9))["files"]
    assert [(c["fd"], c["before"]["pos"], c["after"]["pos"]) for c in f["changed"]] == [(2, 5, 9)]
