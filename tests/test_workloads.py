"""Real servers from Debian's packages in a container: checkpointed, restored, still serving.

Each server runs as the container's init, in the foreground, with every file it writes in
the test's tmp_path (the container has its own mount namespace but sees the host's files).
The container has a private network namespace with only loopback, so every client runs
inside it through `Container.exec`: the package's own client where it has one (redis-cli),
Python's urllib for the web server. The data lives only in the servers' memory (redis saves
nothing to disk), so what they serve after the restore came through the dump file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from pycpt import errors
from pycpt.container import Container, ContainerStatus
from tests.helpers import procfacts
from tests.helpers.workload import alive, wait_for


def _need(*programs: str) -> Dict[str, str]:
    """Paths of the server's programs, or a skip naming the package (a failure in CI, where
    `make setup` installs them)."""
    found = {
        p: shutil.which(p, path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        for p in programs
    }
    missing = [p for p, path in found.items() if not path]
    if missing:
        msg = f"{', '.join(missing)} not installed (`make setup` installs redis-server and nginx)"
        if os.environ.get("PYCPT_REQUIRE_CRIU") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return {p: str(path) for p, path in found.items()}


def _run(ct: Container, argv: Sequence[str], stdin: bytes = b"", timeout: float = 30) -> bytes:
    """Run a client inside the container; its stdout, or a failure with its stderr."""
    p = ct.exec(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise
    assert p.returncode == 0, f"{argv[0]} failed ({p.returncode}): {err.decode(errors='replace')}"
    return out


def _ns_pids(pids: Sequence[int]) -> List[int]:
    """The pids these tasks have inside their own (the container's) pid namespace."""
    out = []
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("NSpid:"):
                out.append(int(line.split()[-1]))
    return sorted(out)


def _assert_gone(ct: Container, pids: Sequence[int]) -> None:
    """After chkpnt: dumped, every process ended, nothing left to answer a client."""
    assert ct.status is ContainerStatus.DUMPED and ct.init_pid is None
    wait_for(lambda: not any(alive(p) for p in pids), 10, "the container's processes to end")
    assert not ct.cgroup.exists()
    with pytest.raises(errors.ContainerStateError):
        ct.exec(["true"])


# --- redis: an in-memory database -----------------------------------------------------------

REDIS_PORT = 6379

# Talks to redis over one TCP connection for its whole life: the test asks it, through files,
# to send a command, and it answers with redis's reply. A restored connection keeps redis's
# client id and our local port.
HOLDER = r"""
import json, os, socket, sys, time
port, box = int(sys.argv[1]), sys.argv[2]

def put(name, data):
    with open(os.path.join(box, name + ".tmp"), "w") as f:
        json.dump(data, f)
    os.rename(os.path.join(box, name + ".tmp"), os.path.join(box, name))

def reply(f):
    line = f.readline()
    kind, rest = line[:1], line[1:-2].decode()
    if kind == b"+": return rest
    if kind == b"-": return {"error": rest}
    if kind == b":": return int(rest)
    if kind == b"$": return None if rest == "-1" else f.read(int(rest) + 2)[:-2].decode()
    if kind == b"*": return [reply(f) for _ in range(int(rest))]
    raise ValueError(line)

def call(*args):
    req = b"*%d\r\n" % len(args) + b"".join(
        b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args)
    s.sendall(req)
    return reply(f)

deadline = time.monotonic() + 30
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port))
        break
    except OSError:
        if time.monotonic() > deadline: raise
        time.sleep(0.02)
f = s.makefile("rb")
put("ready", {"id": call("CLIENT", "ID"), "local": s.getsockname()[1]})
while True:
    try:
        with open(os.path.join(box, "req")) as r:
            args = json.load(r)
    except FileNotFoundError:
        time.sleep(0.01)
        continue
    os.unlink(os.path.join(box, "req"))
    put("reply", {"reply": call(*args), "local": s.getsockname()[1]})
"""


class Redis:
    """redis-server as a container's init, with nothing saved to disk; a child of it holds
    one connection open for the whole test."""

    N = 5000  # string keys

    def __init__(self, tmp: Path, ct: str = "redis") -> None:
        bins = _need("redis-server", "redis-cli")
        self.cli = bins["redis-cli"]
        self.dir = tmp / "redis"
        self.box = tmp / "holder"
        self.dir.mkdir()
        self.box.mkdir()
        holder = tmp / "holder.py"
        holder.write_text(HOLDER)
        server = [
            bins["redis-server"],
            "--port",
            str(REDIS_PORT),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.dir),
            "--logfile",
            "",
        ]
        # The holder starts first and retries until redis listens; then sh becomes redis.
        script = '"$0" "$1" "$2" "$3" & shift 3; exec "$@"'
        self.ct = Container.start(
            ct,
            [
                "sh",
                "-c",
                script,
                sys.executable,
                str(holder),
                str(REDIS_PORT),
                str(self.box),
                *server,
            ],
        )
        wait_for(lambda: (self.box / "ready").exists(), 30, "redis and the held connection")
        self.held = json.loads((self.box / "ready").read_text())

    def cmd(self, *args: str, stdin: bytes = b"") -> str:
        """One command through redis-cli inside the container; its (raw) output."""
        return (
            _run(
                self.ct,
                [self.cli, "-p", str(REDIS_PORT), *(["-x"] if stdin else []), *args],
                stdin=stdin,
            )
            .decode()
            .rstrip("\n")
        )

    def held_call(self, *args: str) -> Dict:
        """One command sent over the connection opened at start."""
        (self.box / "req.tmp").write_text(json.dumps(list(args)))
        (self.box / "req.tmp").rename(self.box / "req")
        wait_for(lambda: (self.box / "reply").exists(), 30, "the held connection's reply")
        answer = json.loads((self.box / "reply").read_text())
        (self.box / "reply").unlink()
        return answer

    def digest(self) -> str:
        """SHA-1 (computed by redis) of every string key's value, in key order."""
        lua = (
            "local t = {} for i = 1, tonumber(ARGV[1]) do t[#t + 1] = "
            "redis.call('GET', 'key:' .. i) end return redis.sha1hex(table.concat(t))"
        )
        return self.cmd("EVAL", lua, "0", str(self.N))


def test_redis_serves_its_data_after_restore(ctenv):
    r = Redis(ctenv)
    lua = (
        "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'key:' .. i, "
        "redis.sha1hex('value' .. i)) end return 'OK'"
    )
    assert r.cmd("EVAL", lua, "0", str(r.N)) == "OK"
    blob = os.urandom(512 * 1024)
    assert r.cmd("SET", "blob", stdin=blob) == "OK"  # -x: the value is stdin, as it is
    assert r.cmd("RPUSH", "list", "a", "b", "c") == "3"
    assert r.cmd("HSET", "hash", "f1", "v1", "f2", "v2") == "2"
    assert r.cmd("INCRBY", "counter", "41") == "41"
    digest, size = r.digest(), r.cmd("DBSIZE")
    assert size == str(r.N + 4)
    assert r.held_call("GET", "counter")["reply"] == "41"
    pids = procfacts.tree(r.ct.init_pid)
    ns_pids = _ns_pids(pids)
    assert len(pids) >= 2  # redis-server and the holder (redis' own threads are tasks)

    r.ct.chkpnt()
    _assert_gone(r.ct, pids)

    ct = Container.restore("redis")
    assert ct.status is ContainerStatus.RUNNING
    r.ct = ct
    assert _ns_pids(procfacts.tree(ct.init_pid)) == ns_pids
    assert r.cmd("DBSIZE") == size
    assert r.digest() == digest
    assert (
        r.cmd("EVAL", "return redis.sha1hex(redis.call('GET', 'blob'))", "0")
        == hashlib.sha1(blob).hexdigest()
    )
    assert r.cmd("LRANGE", "list", "0", "-1").split("\n") == ["a", "b", "c"]
    assert r.cmd("HGET", "hash", "f2") == "v2"
    # it takes writes, and the connection opened before the checkpoint is the same one
    assert r.cmd("INCR", "counter") == "42"
    assert r.cmd("SET", "after", "restore") == "OK"
    held = r.held_call("CLIENT", "ID")
    assert held == {"reply": r.held["id"], "local": r.held["local"]}
    assert r.held_call("GET", "after")["reply"] == "restore"
    assert r.held_call("INCR", "counter")["reply"] == 43


# --- nginx: a web server ------------------------------------------------------------------

NGINX_PORT = 8080

NGINX_CONF = """\
worker_processes 2;
user root;  # the test's tmp_path is private to root
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        root {prefix}/www;
        location = /hello {{ return 200 "hello from {ct}\\n"; }}
    }}
}}
"""

# GETs each path inside the container; prints {path: [status, sha256 of the body]}.
FETCH = textwrap.dedent("""\
    import hashlib, json, sys, urllib.error, urllib.request
    out = {}
    for path in sys.argv[2:]:
        try:
            with urllib.request.urlopen("http://127.0.0.1:%s%s" % (sys.argv[1], path),
                                        timeout=20) as r:
                out[path] = [r.status, hashlib.sha256(r.read()).hexdigest()]
        except urllib.error.HTTPError as e:
            out[path] = [e.code, None]
    print(json.dumps(out))
""")


class Nginx:
    """nginx as a container's init (master in the foreground, two workers), serving a
    directory in tmp_path and one answer from its configuration."""

    def __init__(self, tmp: Path, ct: str = "web") -> None:
        nginx = _need("nginx")["nginx"]
        self.prefix = tmp / "nginx"
        self.www = self.prefix / "www"
        (self.prefix / "tmp").mkdir(parents=True)
        self.www.mkdir()
        conf = self.prefix / "nginx.conf"
        conf.write_text(NGINX_CONF.format(prefix=self.prefix, port=NGINX_PORT, ct=ct))
        self.ct = Container.start(
            ct,
            [
                nginx,
                "-p",
                str(self.prefix),
                "-c",
                str(conf),
                "-e",
                str(self.prefix / "error.log"),
                "-g",
                "daemon off;",
            ],
        )
        wait_for(lambda: self._workers() == 2, 30, "nginx's workers")

    def _workers(self) -> int:
        pid = self.ct.init_pid
        return (
            len((Path(f"/proc/{pid}/task/{pid}/children")).read_text().split())
            if pid and alive(pid)
            else 0
        )

    def get(self, *paths: str) -> Dict[str, List]:
        """{path: [status, sha256 of body]} as a client inside the container sees them."""
        return json.loads(_run(self.ct, [sys.executable, "-c", FETCH, str(NGINX_PORT), *paths]))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_nginx_serves_its_content_after_restore(ctenv):
    web = Nginx(ctenv)
    page = b"<html><body>" + os.urandom(16).hex().encode() + b"</body></html>\n"
    blob = os.urandom(2 * 1024 * 1024)
    (web.www / "index.html").write_bytes(page)
    (web.www / "blob.bin").write_bytes(blob)
    hello = b"hello from web\n"
    expected = {
        "/index.html": [200, _sha(page)],
        "/blob.bin": [200, _sha(blob)],
        "/hello": [200, _sha(hello)],
        "/missing": [404, None],
    }
    wait_for(lambda: web.get("/hello")["/hello"][0] == 200, 30, "nginx to answer")
    assert web.get(*expected) == expected
    pids = procfacts.tree(web.ct.init_pid)
    ns_pids = _ns_pids(pids)

    web.ct.chkpnt()
    _assert_gone(web.ct, pids)

    web.ct = Container.restore("web")
    assert web.ct.status is ContainerStatus.RUNNING
    assert _ns_pids(procfacts.tree(web.ct.init_pid)) == ns_pids
    assert web.get(*expected) == expected
    # new content on disk is served too: the restored workers still read the document root
    later = os.urandom(4096)
    (web.www / "later.bin").write_bytes(later)
    assert web.get("/later.bin", "/index.html") == {
        "/later.bin": [200, _sha(later)],
        "/index.html": [200, _sha(page)],
    }
    log = (web.prefix / "access.log").read_text()
    assert "GET /later.bin" in log and "GET /blob.bin" in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nginx_on_the_hosts_loopback(ctenv):
    """share_net: nginx listens on the host's loopback; the port refuses connections while
    the container is dumped and answers again, from the same workers, after the restore.
    (A client connection from the host is not kept: chkpnt ends the container after CRIU
    has let the network go again, so its sockets close towards the host.)"""
    import urllib.request

    nginx = _need("nginx")["nginx"]
    port = _free_port()
    prefix = ctenv / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    (prefix / "www").mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=port, ct="hostweb"))
    page = os.urandom(64 * 1024)
    (prefix / "www" / "page.bin").write_bytes(page)
    ct = Container.start(
        "hostweb",
        [
            nginx,
            "-p",
            str(prefix),
            "-c",
            str(conf),
            "-e",
            str(prefix / "error.log"),
            "-g",
            "daemon off;",
        ],
        share_net=True,
    )

    def answers() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            return True
        except ConnectionRefusedError:
            return False

    def get(path: str) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=20) as r:
            return r.read()

    wait_for(answers, 30, "nginx on the host's loopback")
    assert get("/page.bin") == page
    pids = procfacts.tree(ct.init_pid)
    ns_pids = _ns_pids(pids)

    ct.chkpnt()
    _assert_gone(ct, pids)
    assert not answers()

    ct = Container.restore("hostweb")
    assert ct.status is ContainerStatus.RUNNING
    assert _ns_pids(procfacts.tree(ct.init_pid)) == ns_pids
    assert get("/page.bin") == page
    assert get("/hello") == b"hello from hostweb\n"
