"""pycpt.images against real checkpoints: a process tree and a container dumped by the real
CRIU, checked against what the processes had before the dump; hand-made and mutated images
for the untrusted-input rules (only ImageError, no hang, bounded memory).
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import struct
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest

import pycpt
from pycpt import dumpfile
from pycpt.images import (
    NAMESPACE_KINDS,
    ImageError,
    Images,
    TaskState,
    _magic,
    _render,
    _schema,
    decode_image,
    diff_reports,
)
from tests.helpers.workload import python_tree, wait_for

MiB = 1 << 20
C = _schema.CLASSES

# --- hand-made images (pure logic, no CRIU) ----------------------------------------------


def image(kind: str, *messages: Any, extra: bytes = b"", head: int = _magic.IMG_COMMON) -> bytes:
    """An image file as CRIU writes it: magics, then size-prefixed entries."""
    out = b"" if kind == "INVENTORY" else struct.pack("<I", head)
    out += struct.pack("<I", _magic.MAGICS[kind])
    for m in messages:
        data = m.SerializeToString()
        out += struct.pack("<I", len(data)) + data
    return out + extra


def pstree(*entries: Any) -> bytes:
    return image(
        "PSTREE",
        *(C["pstree_entry"](pid=p, ppid=pp, pgid=p, sid=p, threads=[p]) for p, pp in entries),
    )


def test_decodes_entries_and_payloads():
    data = (
        image("PIPES_DATA", C["pipe_data_entry"](pipe_id=7, bytes=3))
        + b"abc"
        + image("PIPES_DATA", C["pipe_data_entry"](pipe_id=8, bytes=0))[8:]
    )
    im = Images.from_files({"pipes-data.img": data})
    f = im["pipes-data.img"]
    records = list(f.records())
    assert [r.message.pipe_id for r in records] == [7, 8]
    assert f.payload(records[0]) == b"abc" and records[1].extra_size == 0
    assert f.info().kind == "PIPES_DATA" and f.info().head_magic == _magic.IMG_COMMON


def _mm(*vmas: Dict[str, int], **fields: int) -> bytes:
    """An mm image with these VMAs (prot rw, no fd) and mm fields (every other one 0)."""
    required = ("start_code", "end_code", "start_data", "end_data", "start_stack", "start_brk")
    required += ("brk", "arg_start", "arg_end", "env_start", "env_end")
    mm = C["mm_entry"](**{"exe_file_id": 0, **{f"mm_{f}": 0 for f in required}, **fields})
    for v in vmas:
        mm.vmas.add(prot=3, fd=-1, **v)
    return image("MM", mm)


def test_pagemap_locates_pages_without_reading_them():
    head = C["pagemap_head"](pages_id=5)
    runs = [
        C["pagemap_entry"](vaddr=0x10000, compat_nr_pages=0, nr_pages=2, flags=4),
        C["pagemap_entry"](vaddr=0x20000, compat_nr_pages=0, nr_pages=1, flags=2),
        C["pagemap_entry"](vaddr=0x30000, compat_nr_pages=3),
    ]  # an old CRIU's entry
    pm = image("PAGEMAP") + b"".join(
        struct.pack("<I", len(m.SerializeToString())) + m.SerializeToString() for m in (head, *runs)
    )
    mm = _mm(
        dict(start=0x10000, end=0x40000, pgoff=0, shmid=0, flags=0x22, status=(1 << 9) | 1),
        mm_arg_start=0x30000,
        mm_arg_end=0x30008,
    )
    pages = bytes(2 * 4096) + b"ab\0cd\0\0\0" + bytes(3 * 4096 - 8)
    im = Images.from_files({"pagemap-1.img": pm, "mm-1.img": mm, "pages-5.img": pages})
    mem = im.memory(1)
    assert [(r.nr_pages, r.offset) for r in mem.runs] == [(2, 0), (1, None), (3, 8192)]
    assert (mem.pages_dumped, mem.pages_lazy, mem.pages_not_dumped) == (5, 1, 48 - 6)
    assert mem.by_kind() == {"anon-private": {"vmas": 1, "bytes": 0x30000, "dumped": 5 * 4096}}
    assert mem.locate(0x30004) == ("pages-5.img", 8196)
    assert im.read_memory(1, 0x20000, 4) is None  # lazy: not in this dump
    before = im.bytes_read
    assert im.argv(1) == ["ab", "cd"]
    assert im.bytes_read - before == 8  # the argument bytes, nothing else of the pages


def _pagemap(pages_id: int, runs: List[tuple]) -> bytes:
    out = image("PAGEMAP")
    for m in (
        C["pagemap_head"](pages_id=pages_id),
        *(C["pagemap_entry"](vaddr=a, compat_nr_pages=0, nr_pages=n, flags=4) for a, n in runs),
    ):
        data = m.SerializeToString()
        out += struct.pack("<I", len(data)) + data
    return out


def test_overlapping_runs_of_pages_are_refused():
    vma = dict(start=0x10000, end=0x40000, pgoff=0, shmid=0, flags=0x22, status=(1 << 9) | 1)
    im = Images.from_files(
        {"mm-1.img": _mm(vma), "pagemap-1.img": _pagemap(1, [(0x10000, 4), (0x12000, 1)])}
    )
    with pytest.raises(ImageError, match="overlap at 0x12000") as exc:
        im.memory(1)
    assert exc.value.file == "pagemap-1.img"


def test_many_vmas_over_many_runs_of_a_shared_object_stay_fast():
    """20000 VMAs mapping the same shared object whole, over 20000 runs of its pages:
    counted per VMA without visiting every pair (no hang)."""
    n = 20000
    vmas = [
        dict(
            start=(1 << 32) + i * (1 << 28),
            end=(1 << 32) + i * (1 << 28) + (n << 13),
            pgoff=0,
            shmid=5,
            flags=0x01,
            status=(1 << 8) | 1,
        )
        for i in range(n)
    ]
    runs = [(i << 13, 1) for i in range(n)]  # every other page of the object
    im = Images.from_files({"mm-1.img": _mm(*vmas), "pagemap-shmem-5.img": _pagemap(9, runs)})
    with deadline(20):
        mem = im.memory(1)
    assert {v.pages_dumped for v in mem.vmas} == {n} and mem.pages_shared == n * n
    assert {v.pages_absent for v in mem.vmas} == {n} and mem.pages_zero == n * n


def test_a_fifo_is_not_opened_as_a_dump_file(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    with deadline(10), pytest.raises(ImageError, match="neither an images directory"):
        Images.open(tmp_path / "fifo")


def test_a_format_2_signature_is_shown_not_trusted():
    import base64
    import hashlib

    from pycpt.images import _report

    key = bytes(range(32))
    sig = json.dumps(
        {
            "alg": "ed25519",
            "key": "pycpt-ed25519 " + base64.b64encode(key).decode(),
            "signature": base64.b64encode(bytes(64)).decode(),
        }
    ).encode()
    data = _tar(
        [
            ("PYCPT-DUMP", b"PYCPT-DUMP 2\n", {}),
            ("manifest.json", b"{}", {}),
            ("manifest.sig", sig, {}),
            ("utsns-3.img", UTS, {}),
        ]
    )
    with Images.open(data) as im:
        s = _report.signature(im)
    fingerprint = "SHA256:" + base64.b64encode(hashlib.sha256(key).digest()).decode().rstrip("=")
    assert (s["signed"], s["format"], s["fingerprint"]) == (True, 2, fingerprint)
    # a signature of zeros by a key this host does not know: checked, and said so
    assert s["verified"] is False and not s["trusted"]
    assert "INVALID" in s["text"] or "malformed" in s["text"]
    with Images.open(
        _tar([("PYCPT-DUMP", b"PYCPT-DUMP 2\n", {}), ("manifest.sig", b"[1]", {})])
    ) as im:
        with pytest.raises(ImageError, match="not a pycpt signature") as exc:
            _report.signature(im)
    assert exc.value.file == "manifest.sig"
    with Images.open(_tar([("PYCPT-DUMP", b"PYCPT-DUMPER\n", {})])) as im:
        with pytest.raises(ImageError, match="not a pycpt marker"):
            im.dump_format()


def test_image_names_follow_their_patterns():
    """kind_of() against the patterns written as regular expressions (N: a decimal number,
    X: a hex number, S: a word; .img required but for the service files)."""

    def regex(pattern: str) -> "re.Pattern[str]":
        body = (
            re.escape(pattern)
            .replace("N", r"([0-9]{1,20})")
            .replace("X", r"([0-9a-f]{1,16})")
            .replace("S", r"([a-z]{1,16})")
        )
        tail = r"(?:\.img)?\Z" if pattern.startswith(("stats", "irmap")) else r"\.img\Z"
        return re.compile(body + tail)

    patterns = [(regex(p), k) for p, k in _magic._PATTERNS]
    names = ["N.img", "core-N.img", "core-.img", "core-1", "-1.img", "pages-1.img.img", ""]
    for p, _ in _magic._PATTERNS:
        for n, x, w in (("7", "1f", "dump"), ("123456", "abc", "x"), ("0", "10", "zz")):
            name = p.replace("N", n).replace("X", x).replace("S", w)
            names += [name + ".img", name, name + ".im", "x" + name + ".img", name + "-1.img"]
    for name in names:
        want = next(
            ((k, m.group(1) if m.groups() else None) for r, k in patterns if (m := r.match(name))),
            (None, None),
        )
        assert _magic.kind_of(name) == want, name


def test_unknown_files_are_listed_never_fatal():
    im = Images.from_files(
        {
            "mystery.img": b"\x01\x02\x03\x04\x05\x06\x07\x08",
            "tiny.img": b"\x01",
            "pages-1.img": b"\0" * 4096,
            "renamed.img": image("UTSNS", C["utsns_entry"](nodename="a", domainname="b")),
        }
    )
    listing = {i.name: i for i in im.list()}
    assert listing["mystery.img"].kind is None and listing["mystery.img"].size == 8
    assert listing["tiny.img"].kind is None
    assert listing["pages-1.img"].kind == "PAGES" and listing["pages-1.img"].magic is None
    assert listing["renamed.img"].kind == "UTSNS"  # known by its magic
    assert im["renamed.img"].first().nodename == "a"
    with pytest.raises(ImageError) as exc:
        list(im["mystery.img"].entries())
    assert exc.value.file == "mystery.img"


@pytest.mark.parametrize(
    "damage, where, what",
    [
        (lambda d: d[:-3], 22, "claims"),  # truncated inside the second entry
        (lambda d: d[:10], 8, "stray bytes"),  # truncated inside the size
        (lambda d: d[:8] + struct.pack("<I", 0xFFFFFFF0) + d[12:], 8, "claims"),
        (lambda d: d[:4] + struct.pack("<I", _magic.MAGICS["CORE"]) + d[8:], 4, "magic"),
        (lambda d: struct.pack("<I", 1) + d[4:], 0, "first magic"),
        (lambda d: d[:12] + b"\xff" * (len(d) - 12), 8, "not a valid"),
    ],
)
def test_malformed_images_name_file_and_offset(damage, where, what):
    good = pstree((1, 0), (2, 1))
    im = Images.from_files({"pstree.img": damage(good)})
    with pytest.raises(ImageError) as exc:
        im.process_tree()
    assert exc.value.file == "pstree.img" and exc.value.offset == where, exc.value
    assert what in str(exc.value)
    # damaged data, not a bad argument (as DumpFileCorruptError)
    assert isinstance(exc.value, pycpt.PycptError) and not isinstance(exc.value, ValueError)


def test_an_entry_larger_than_the_cap_is_refused_before_it_is_read(monkeypatch):
    from pycpt.images import _reader

    monkeypatch.setattr(_reader, "MAX_ENTRY", 16)
    data = image("UTSNS", C["utsns_entry"](nodename="x" * 40, domainname=""))
    with pytest.raises(ImageError, match="more than the 16"):
        decode_image("utsns-1.img", data)


def test_recursion_is_capped():
    # cgroup dirs nest; protobuf's depth limit turns a deep nest into a decode error
    inner = b""
    for _ in range(200):
        body = b"\x0a\x01d" + (b"\x12" + _varint(len(inner)) + inner if inner else b"")
        inner = body
    ctl = b"\x12" + _varint(len(inner)) + inner
    entry = b"\x12" + _varint(len(ctl)) + ctl
    data = image("CGROUP") + struct.pack("<I", len(entry)) + entry
    with pytest.raises(ImageError):
        decode_image("cgroup.img", data)


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])


def test_ghost_file_and_message_queue_layouts():
    ghost = (
        image(
            "GHOST_FILE",
            C["ghost_file_entry"](uid=0, gid=0, mode=0o100600, chunks=True),
            C["ghost_chunk_entry"](len=3, off=0),
        )
        + b"xyz"
    )
    assert [type(m).__name__ for m in decode_image("ghost-file-1a.img", ghost)] == [
        "ghost_file_entry",
        "ghost_chunk_entry",
    ]
    whole = image("GHOST_FILE", C["ghost_file_entry"](uid=0, gid=0, mode=0o100600)) + b"content"
    f = Images.from_files({"ghost-file-2.img": whole})["ghost-file-2.img"]
    (rec,) = f.records()
    assert f.payload(rec) == b"content"
    desc = C["ipc_desc_entry"](key=1, uid=0, gid=0, cuid=0, cgid=0, mode=0o600, id=3)
    msg = C["ipc_msg"](mtype=1, msize=5).SerializeToString()
    q = (
        image("IPCNS_MSG", C["ipc_msg_entry"](desc=desc, qbytes=100, qnum=1))
        + struct.pack("<I", len(msg))
        + msg
        + b"hello\0\0\0"
    )
    f = Images.from_files({"ipcns-msg-9.img": q})["ipcns-msg-9.img"]
    (rec,) = f.records()
    assert rec.message.qnum == 1 and rec.extra_size == 4 + len(msg) + 8
    with pytest.raises(ImageError, match="ends before"):
        decode_image(
            "ipcns-msg-9.img",
            image("IPCNS_MSG", C["ipc_msg_entry"](desc=desc, qbytes=100, qnum=2))
            + struct.pack("<I", len(msg))
            + msg
            + b"hello\0\0\0",
        )


def _tar(members: List[tuple], compress: str = "") -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compress}", format=tarfile.PAX_FORMAT) as tar:
        for name, data, pax in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.pax_headers = pax
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


UTS = image("UTSNS", C["utsns_entry"](nodename="n", domainname="d"))


@pytest.mark.parametrize("compress", ["", "gz", "xz"])
def test_dump_files_in_memory_and_on_disk(tmp_path, compress):
    data = _tar(
        [
            ("PYCPT-DUMP", b"PYCPT-DUMP 1\n", {}),
            ("utsns-3.img", UTS, {}),
            ("images/pstree.img", pstree((1, 0)), {}),
            ("manifest.json", b"{}", {}),
            ("../evil.img", UTS, {}),
        ],
        compress,
    )
    (tmp_path / "d").write_bytes(data)
    for source in (data, tmp_path / "d"):
        with Images.open(source) as im:
            assert im.names() == ["pstree.img", "utsns-3.img"]
            assert set(im.other_members()) == {"PYCPT-DUMP", "manifest.json", "../evil.img"}
            assert im["utsns-3.img"].first().nodename == "n"
            assert im.compression == (compress or None)


@pytest.mark.parametrize("compress", ["", "gz"])
def test_an_extended_tar_header_bomb_is_refused(tmp_path, compress):
    data = _tar([("utsns-3.img", UTS, {"comment": "x" * (2 << 20)})], compress)
    (tmp_path / "d").write_bytes(data)
    with pytest.raises(ImageError, match="extended header"):
        Images.open(tmp_path / "d")


@pytest.mark.parametrize(
    "damage, what",
    [
        (lambda d: d[:700], "unexpected end|runs past the end"),
        (lambda d: b"\x1f\x8b" + d[2:], "cannot be read"),
        (lambda d: b"garbage" * 200, "not a readable tar"),
    ],
)
def test_damaged_dump_files(tmp_path, damage, what):
    data = _tar([("utsns-3.img", UTS * 3, {})])
    (tmp_path / "d").write_bytes(damage(data))
    with pytest.raises(ImageError, match=what) as exc:
        Images.open(tmp_path / "d")
    assert exc.value.file == str(tmp_path / "d")


def test_a_member_twice_is_refused():
    data = _tar([("utsns-3.img", UTS, {}), ("utsns-3.img", UTS, {})])
    with pytest.raises(ImageError, match="twice"):
        Images.open(data)


# --- a real process tree -----------------------------------------------------------------

TREE = r"""
import json, mmap, os, select, signal, socket, sys, time
report = sys.argv[1]
data = open(sys.argv[2], "w+")
data.write("x" * 1000); data.flush(); data.seek(123)
srv = socket.socket(); srv.bind(("127.0.0.1", 0)); srv.listen()
cli = socket.create_connection(srv.getsockname()); acc, _ = srv.accept()
cli.sendall(b"abc")  # left unread in acc's queue
mem = mmap.mmap(-1, 32 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for i in range(0, len(mem), 4096):
    mem[i] = 1
# shared memory: anonymous (8 MiB, 3 touched) and a memfd (4 MiB, 1 touched)
shm = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
for i in range(0, 3 << 20, 4096):
    shm[i] = 1
mfd = os.memfd_create("images-test")
os.ftruncate(mfd, 4 << 20)
mfd_map = mmap.mmap(mfd, 4 << 20, flags=mmap.MAP_SHARED)
for i in range(0, 1 << 20, 4096):
    mfd_map[i] = 2
pr, pw = os.pipe(); os.write(pw, b"hello pipe")  # 10 bytes left in the pipe
efd = os.eventfd(7)
ua, ub = socket.socketpair(); ua.send(b"xyz")  # 3 bytes left in ub's queue
ep = select.epoll(); ep.register(pr, select.EPOLLIN); ep.register(efd, select.EPOLLIN)
kids = {}
for name in ("stopped", "running", "tstp"):
    pid = os.fork()
    if pid == 0:
        while True:
            time.sleep(1000)
    kids[name] = pid
zombie = os.fork()
if zombie == 0:
    os._exit(3)  # never reaped: a zombie at the dump
kids["zombie"] = zombie
# the kernel drops SIGTSTP to an orphaned process group (ours: the parent is in another
# session): the child gets a group of its own, whose parent is in this session
os.setpgid(kids["tstp"], kids["tstp"])
os.kill(kids["stopped"], signal.SIGSTOP)
os.kill(kids["tstp"], signal.SIGTSTP)
facts = {"kids": kids, "fd": data.fileno(), "srv": [srv.fileno(), srv.getsockname()],
         "cli": [cli.fileno(), cli.getsockname(), cli.getpeername()],
         "acc": [acc.fileno(), acc.getsockname(), acc.getpeername()],
         "pipe": [pr, pw], "efd": efd, "unix": [ua.fileno(), ub.fileno()], "epoll": ep.fileno(),
         "mfd": mfd}
open(report + ".tmp", "w").write(json.dumps(facts)); os.rename(report + ".tmp", report)
while True:
    time.sleep(1000)
"""


def proc_stat(pid: int) -> List[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def maps(pid: int) -> List[tuple]:
    out = []
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            start, end = line.split()[0].split("-")
            out.append(
                (int(start, 16), int(end, 16), line.split()[-1] if len(line.split()) > 5 else "")
            )
    return out


@pytest.fixture(scope="module")
def dumped_tree(engine, tmp_path_factory) -> Iterator[Dict[str, Any]]:
    """A tree dumped by CRIU (and killed by it), with what /proc said just before."""
    tmp = tmp_path_factory.mktemp("images-tree")
    report = tmp / "report"
    with python_tree(TREE, str(report), str(tmp / "data")) as (proc, pids):
        wait_for(lambda: report.exists() or proc.poll() is not None, 60, "the tree")
        facts = json.loads(report.read_text())
        pids += list(facts["kids"].values())
        wait_for(
            lambda: (
                proc_stat(facts["kids"]["stopped"])[0] == "T"
                and proc_stat(facts["kids"]["tstp"])[0] == "T"
            ),
            10,
            "stopped children",
        )
        facts["root"] = proc.pid
        facts["stat"] = {pid: proc_stat(pid) for pid in pids}
        facts["comm"] = {pid: Path(f"/proc/{pid}/comm").read_text().strip() for pid in pids}
        facts["maps"] = maps(proc.pid)
        facts["argv"] = Path(f"/proc/{proc.pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        (tmp / "img").mkdir()
        with pycpt.Criu(engine) as criu:
            criu.dump(proc.pid, tmp / "img", tcp_established=True)
        proc.wait(timeout=30)
        facts["images"] = tmp / "img"
        facts["tmp"] = tmp
        yield facts


def test_tree_pids_states_and_names(dumped_tree):
    t = dumped_tree
    kids = t["kids"]
    with Images.open(t["images"]) as im:
        tree = {task.pid: task for task in im.process_tree()}
        states = im.task_states()
    assert list(tree)[0] == t["root"] and set(tree) == {t["root"], *kids.values()}
    for pid, task in tree.items():
        st = t["stat"][pid]
        ppid = 0 if pid == t["root"] else int(st[1])  # CRIU records the root's parent as 0
        assert (task.ppid, task.pgid, task.sid) == (ppid, int(st[2]), int(st[3])), pid
        assert task.comm == t["comm"][pid]
        if pid == kids["zombie"]:  # a zombie has no memory, files or credentials left
            assert (task.exe, task.uid, len(task.threads)) == (None, None, 1)
            assert task.exit_code >> 8 == 3  # a wait status: exited with 3
            continue
        assert task.uid == os.getuid()
        assert task.threads == [pid] and task.exe == os.path.realpath(sys.executable)
    assert sorted(tree[t["root"]].children) == sorted(kids.values())
    assert states == {
        t["root"]: TaskState.ALIVE,
        kids["running"]: TaskState.ALIVE,
        kids["stopped"]: TaskState.STOPPED,
        kids["tstp"]: TaskState.STOPPED,
        kids["zombie"]: TaskState.DEAD,
    }
    assert tree[kids["stopped"]].stop_signo == signal.SIGSTOP
    assert tree[kids["tstp"]].stop_signo == signal.SIGTSTP
    assert tree[kids["running"]].stop_signo is None


def test_tree_report_with_a_zombie(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        report = im.report()
    zombie = next(p for p in report["processes"] if p["pid"] == t["kids"]["zombie"])
    assert (zombie["state"], zombie["memory"], zombie["fds"], zombie["argv"]) == (
        "dead",
        None,
        0,
        None,
    )
    assert zombie["namespaces"] == {} and zombie.get("files") == []
    text = _render.format_report(report, ["summary", "ps"])
    assert "zombie" in text and "exit status 3" in text


def test_tree_files_and_sockets(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        files = {f.fd: f for f in im.files(t["root"])}
        socks = {s.id: s for s in im.sockets()}
        cwd, root = im.cwd(t["root"])
    data = files[t["fd"]]
    assert (data.type, data.description, data.pos) == ("REG", str(t["tmp"] / "data"), 123)
    assert files[0].description == "/dev/null"
    srv, cli, acc = (files[t[k][0]] for k in ("srv", "cli", "acc"))
    assert srv.description == f"tcp 127.0.0.1:{t['srv'][1][1]} LISTEN"
    assert cli.description == (
        f"tcp 127.0.0.1:{t['cli'][1][1]} -> 127.0.0.1:{t['cli'][2][1]} ESTABLISHED"
    )
    s = socks[acc.id]
    assert (s.family, s.protocol, s.state) == ("inet", "tcp", "ESTABLISHED")
    assert (s.local, s.peer) == (f"127.0.0.1:{t['acc'][1][1]}", f"127.0.0.1:{t['acc'][2][1]}")
    assert (t["root"], t["acc"][0]) in s.owners and s.inq == 3 and s.outq == 0
    assert root == "/" and cwd == os.getcwd()


def test_reads_after_close_are_refused(dumped_tree):
    im = Images.open(dumped_tree["images"])
    im.close()
    with pytest.raises(ImageError, match="closed"):
        im.process_tree()
    im.close()


def test_tree_memory(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        mem = im.memory(t["root"])
        argv = im.argv(t["root"])
    # the kernel shows [vvar] and [vvar_vclock]; CRIU keeps them as one vvar VMA
    proc = [(s, e) for s, e, name in t["maps"] if not name.startswith("[vvar")]
    assert [(v.start, v.end) for v in mem.vmas if v.kind != "vvar"] == proc
    (vvar,) = [v for v in mem.vmas if v.kind == "vvar"]
    kernel_vvar = [(s, e) for s, e, name in t["maps"] if name.startswith("[vvar")]
    assert (vvar.start, vvar.end) == (kernel_vvar[0][0], kernel_vvar[-1][1])
    big = [v for v in mem.vmas if v.size == 32 * MiB]
    assert len(big) == 1 and big[0].kind == "anon-private"
    assert big[0].pages_dumped == 32 * MiB // 4096
    names = {v.file for v in mem.vmas if v.file}
    assert os.path.realpath(sys.executable) in names
    by_kind = mem.by_kind()
    assert by_kind["stack"]["vmas"] == 1 and by_kind["vdso"]["vmas"] == 1
    assert mem.pages_dumped >= 32 * MiB // 4096 and mem.pages_lazy == 0
    assert argv == [a.decode() for a in t["argv"]]


def test_tree_shared_memory_counted_per_vma(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        mem = im.memory(t["root"])
        kid = im.memory(t["kids"]["running"])
    (anon,) = [v for v in mem.vmas if v.kind == "anon-shared"]
    (memfd,) = [v for v in mem.vmas if v.kind == "memfd"]
    assert (anon.size, anon.pages_dumped, anon.pages_absent) == (8 * MiB, 768, 1280)
    assert anon.file is None and anon.prot_text == "rw-s"
    assert (memfd.size, memfd.pages_dumped, memfd.file) == (4 * MiB, 256, "memfd:images-test")
    assert mem.pages_shared == 768 + 256
    # the child maps the same objects: the same pages, counted in its VMAs too
    assert {(v.kind, v.pages_dumped) for v in kid.vmas if v.shmid is not None} == {
        ("anon-shared", 768),
        ("memfd", 256),
    }
    # every page of a VMA is dumped, lazy, in a parent, or absent (zero or from the file)
    for v in mem.vmas:
        assert v.pages_dumped + v.pages_lazy + v.pages_in_parent + v.pages_absent == v.pages
    assert mem.pages_zero + mem.pages_from_file <= mem.pages_not_dumped


def test_tree_pipes_eventfd_epoll_and_unix_sockets(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        files = {f.fd: f for f in im.files(t["root"])}
        socks = {s.id: s for s in im.sockets()}
    pr, pw = (files[fd] for fd in t["pipe"])
    assert (pr.type, pw.type) == ("PIPE", "PIPE")
    assert pr.details["pipe_id"] == pw.details["pipe_id"] and pr.details["queued"] == 10
    assert pr.description.endswith("(10 bytes queued)")
    assert (pr.flags & 3, pw.flags & 3) == (os.O_RDONLY, os.O_WRONLY)
    assert files[t["efd"]].details == {"counter": 7}
    assert files[t["epoll"]].details == {"watches": sorted([t["pipe"][0], t["efd"]])}
    assert files[t["mfd"]].description == "memfd:images-test"
    assert files[t["mfd"]].details["size"] == 4 * MiB
    ua, ub = (files[fd] for fd in t["unix"])
    assert (
        ua.details["peer_ino"] == ub.details["ino"] and ub.details["peer_ino"] == ua.details["ino"]
    )
    assert socks[ub.id].inq == 3 and socks[ub.id].family == "unix"


def test_tree_in_host_namespaces_shares_all_with_the_dumper(dumped_tree):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        ns = im.namespaces()
        cg = im.cgroups()
    present = set(ns.tasks[t["root"]])
    assert {"pid", "net", "ipc", "uts", "mnt"} <= present <= set(NAMESPACE_KINDS)
    assert ns.own() == set() and ns.shared_with_dumper() == present
    assert ns.created_on_restore() == set()
    # the tree ran in the test's own cgroup, the one CRIU ran in: the dumper's set
    assert cg.tasks[t["root"]] == cg.dumper and cg.dumper not in cg.sets


def test_dump_file_in_place_compressed_and_bytes_agree(dumped_tree, tmp_path):
    t = dumped_tree
    with Images.open(t["images"]) as im:
        want = im.summary()
        names = [n for n in im.names() if n.endswith(".img")]  # a dump file packs *.img
        del want["images"]
    plain, gz = tmp_path / "plain.dump", tmp_path / "gz.dump"
    dumpfile.write_dump_file(plain, t["images"], config={}, criu_version="4.2.1")
    dumpfile.write_dump_file(gz, t["images"], config={}, criu_version="4.2.1", compress="gz")
    for source in (plain, gz, plain.read_bytes()):
        with Images.open(source) as im:
            assert im.names() == names
            got = im.summary()
            del got["images"]
            if im.compression:  # its pages were not kept: no command lines
                assert all(p["argv"] is None for p in got["processes"])
                for p in got["processes"]:
                    p["argv"] = next(q["argv"] for q in want["processes"] if q["pid"] == p["pid"])
            assert got == want
            assert {"PYCPT-DUMP", "manifest.json", "manifest.sig"} <= set(im.other_members())
            assert im.dump_format() == 2
            manifest = im.manifest()
            assert manifest is not None and manifest["criu_version"] == "4.2.1"
            report = im.report()
            sig = report["dump"]["signature"]
            assert sig["signed"] and sig["verified"] and sig["trusted"]  # this host signed it
            assert "valid, trusted: this host" in sig["text"]
            assert report["dump"]["criu_version"] == "4.2.1" and report["manifest"] == manifest
    with Images.open(gz) as im:  # pages images are not kept from a compressed file
        assert im.compression == "gz" and im.argv(t["root"]) is None
        with pytest.raises(ImageError, match="not kept"):
            im["pages-1.img"].read(0, 1)


def test_summary_reads_under_one_percent(dumped_tree, tmp_path):
    t = dumped_tree
    plain = tmp_path / "plain.dump"
    dumpfile.write_dump_file(plain, t["images"], config={}, criu_version="4.2.1")
    with Images.open(plain) as im:
        im.summary()
        assert im.bytes_read < im.source_size / 100, (im.bytes_read, im.source_size)


# --- a real container --------------------------------------------------------------------

CT = r"""
import os, signal, socket, time
s = socket.socket(socket.AF_INET6); s.bind(("::1", 0)); s.listen()
kid = os.fork()
if kid == 0:
    while True:
        time.sleep(1000)
os.kill(kid, signal.SIGSTOP)
open("/tmp/images-helper-ct-%d" % os.getppid(), "w").close()
while True:
    time.sleep(1000)
"""


@pytest.fixture
def images_ctenv(tmp_path, monkeypatch):
    """Private state dir and cgroup parent for containers; all removed afterwards."""
    from pycpt.container import remove_all

    if os.geteuid() != 0:
        pytest.skip("containers need root")
    try:
        pycpt.find_engine()
    except pycpt.EngineError as exc:
        pytest.skip(f"no usable CRIU ({exc.message})")
    monkeypatch.setenv("PYCPT_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PYCPT_CGROUP_PARENT", f"images-helper-{os.getpid()}")
    yield tmp_path
    remove_all()


@pytest.mark.parametrize("compress", [None, "gz"])
def test_container_checkpoint(images_ctenv, compress):
    from pycpt.container import Container

    marker = Path("/tmp/images-helper-ct-0")  # the container's init has ppid 0
    marker.unlink(missing_ok=True)
    ct = Container.start("imgct", [sys.executable, "-c", CT])
    try:
        wait_for(marker.exists, 30, "the container")
        cgroup = ct.cgroup
        path = ct.chkpnt(str(images_ctenv / "Dump.imgct"), compress=compress)
    finally:
        marker.unlink(missing_ok=True)
    with Images.open(path) as im:
        tree = im.process_tree()
        assert [(x.pid, x.ppid, x.sid) for x in tree] == [(1, 0, 1), (2, 1, 1)]
        assert im.task_states() == {1: TaskState.ALIVE, 2: TaskState.STOPPED}
        ns = im.namespaces()
        assert {"pid", "mnt", "uts", "ipc", "net"} <= ns.own()
        assert {"pid", "mnt", "uts", "ipc", "net"} <= ns.created_on_restore()
        assert {"uts", "ipc", "net", "mnt"} <= set(ns.saved)
        cg = im.cgroups()
        # the container's own cgroup, as a path below the hierarchy's root (v2: controller
        # "", v1: the freezer's)
        path = cg.of(1).get("" if "unified" in str(cgroup) else "freezer")
        assert path and path.endswith("/imgct") and str(cgroup).endswith(path)
        assert cg.tasks[1] == cg.tasks[2] != cg.dumper
        (sock,) = [s for s in im.sockets() if s.state == "LISTEN"]
        assert sock.family == "inet6" and sock.local.startswith("[::1]:")
        assert im.summary()["processes"][1]["state"] == "stopped"


# --- mutated real images -----------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class Hang(Exception):
    pass


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    def fire(*_: object) -> None:
        raise Hang()

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.fixture(scope="module")
def real_images(dumped_tree) -> Dict[str, bytes]:
    """Every image of the real dump but the big pages images."""
    return {
        p.name: p.read_bytes()
        for p in sorted(Path(dumped_tree["images"]).iterdir())
        if p.is_file() and not p.name.startswith("pages-")
    }


_PAGES: Dict[str, bytes] = {}


def real_pages(dumped_tree: Dict[str, Any]) -> Dict[str, bytes]:
    """The pages images, read once (the mutations leave them alone)."""
    if not _PAGES:
        for p in Path(dumped_tree["images"]).glob("pages-*.img"):
            _PAGES[p.name] = p.read_bytes()
    return _PAGES


def _mutate(data: bytes, how: str, at: int, value: bytes) -> bytes:
    at = at % (len(data) + 1)
    if how == "flip":
        return data[:at] + value + data[at + len(value) :]
    if how == "truncate":
        return data[:at]
    if how == "insert":
        return data[:at] + value + data[at:]
    # a u32 size field (or any four bytes) replaced
    return data[:at] + (value * 4)[:4] + data[at + 4 :]


def _use_everything(im: Images, pid: int) -> None:
    im.list()
    for f in im:
        if f.decodable:
            for r in f.records():
                if r.extra_size <= MiB:
                    f.payload(r)
    json.dumps(im.summary())
    for task in im.process_tree():
        im.files(task.pid)
        im.cwd(task.pid)
        im.argv(task.pid)
    im.sockets()
    # what `pycpt inspect` shows, every view and a diff against itself
    report = im.report()
    json.dumps(report)
    for view in (
        _render.format_summary,
        _render.format_ps,
        _render.format_files,
        _render.format_memory,
        _render.format_sockets,
        _render.format_manifest,
    ):
        view(report)
    _render.format_diff(diff_reports(report, report))


FUZZ_CASES = {"run": 0, "image_errors": 0}
FUZZ_ERRORS: Dict[str, int] = {}


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_images_raise_only_image_error(real_images, dumped_tree, data):
    name = data.draw(st.sampled_from(sorted(real_images)))
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "u32"]))
    at = data.draw(st.integers(0, 1 << 16))
    value = data.draw(st.binary(min_size=1, max_size=8))
    files = {**real_images, **real_pages(dumped_tree)}
    files[name] = _mutate(real_images[name], how, at, value)
    FUZZ_CASES["run"] += 1
    with deadline(20):
        try:
            _use_everything(Images.from_files(files), dumped_tree["root"])
        except ImageError as exc:
            FUZZ_CASES["image_errors"] += 1
            assert exc.file, exc
            why = re.sub(r"\d+|'.*'", "N", exc.message.split(":", 1)[-1])[:50]
            FUZZ_ERRORS[why] = FUZZ_ERRORS.get(why, 0) + 1


@pytest.fixture(scope="module")
def small_dump_file(real_images, tmp_path_factory) -> bytes:
    """A real dump file (format 1) of the tree's images without the pages images."""
    tmp = tmp_path_factory.mktemp("small-dump")
    (tmp / "img").mkdir()
    for name, data in real_images.items():
        if name.endswith(".img"):
            (tmp / "img" / name).write_bytes(data)
    dumpfile.write_dump_file(tmp / "dump", tmp / "img", config={"id": "x"}, criu_version="4.2.1")
    return (tmp / "dump").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_mutated_dump_files_raise_only_image_error(small_dump_file, dumped_tree, data):
    """The dump file around the images: tar headers, marker, manifest."""
    d = small_dump_file
    marker = d.index(b"PYCPT-DUMP 2\n")
    manifest = d.rindex(b'"parts"')
    near = data.draw(st.sampled_from([0, marker, manifest, len(d) - 2048, None]))
    at = (
        data.draw(st.integers(0, len(d)))
        if near is None
        else near + data.draw(st.integers(-600, 600))
    )
    how = data.draw(st.sampled_from(["flip", "truncate", "insert", "u32"]))
    value = data.draw(st.binary(min_size=1, max_size=8))
    FUZZ_CASES["run"] += 1
    with deadline(20):
        try:
            with Images.open(_mutate(d, how, max(0, at), value)) as im:
                _use_everything(im, dumped_tree["root"])
        except ImageError as exc:
            FUZZ_CASES["image_errors"] += 1
            assert exc.file, exc
            why = re.sub(r"\d+|'.*'", "N", exc.message.split(":", 1)[-1])[:50]
            FUZZ_ERRORS[why] = FUZZ_ERRORS.get(why, 0) + 1


def test_fuzzing_stayed_within_memory(real_images):
    """After the property test above: the process grew by far less than any bomb would."""
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert peak_mib < 1024, peak_mib
    print(f"fuzz cases run: {FUZZ_CASES}, peak RSS {peak_mib:.0f} MiB")
    for why, n in sorted(FUZZ_ERRORS.items(), key=lambda x: -x[1]):
        print(f"  {n:4} {why}")
