"""Containers with an address on the test hosts' bridge, and clients that hold one TCP
connection to them from a client namespace (redis over RESP, nginx over HTTP keep-alive)."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Optional, Sequence

from pycpt.testing.testhosts import Host, TestHosts
from tests.helpers.workload import wait_for

BIN_DIR = os.path.dirname(os.path.abspath(sys.executable))
PYCPT = os.path.join(BIN_DIR, "pycpt")
REDIS_PORT = 6379
HTTP_PORT = 8080


def pycpt(host: Host, *argv: str, check: bool = True, timeout: float = 180) -> str:
    """`pycpt ARGV` run on `host` (its namespace, state dir and cgroup parent); its output."""
    done = host.run(
        [PYCPT, *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"pycpt {' '.join(argv)} on {host.name} failed:\n{done.stderr}")
    return done.stdout + done.stderr


def run_pycpt(host: Host, *argv: str, timeout: float = 180) -> "subprocess.CompletedProcess[str]":
    """The same, returning the finished process (for commands expected to fail)."""
    return host.run(
        [PYCPT, *argv], capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )


def host_links(host: Host) -> str:
    """`ip -o link` on the host: every link there, one per line."""
    return host.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout


def need(*programs: str) -> List[str]:
    """Absolute paths of `programs`; a skip when one is missing."""
    import pytest

    found = [
        shutil.which(p) or (f"/usr/sbin/{p}" if os.path.exists(f"/usr/sbin/{p}") else "")
        for p in programs
    ]
    missing = [p for p, f in zip(programs, found, strict=True) if not f]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (`make setup` installs redis and nginx)")
    return found


def net_spec(hosts: TestHosts, n: int = 0, v6: bool = True) -> str:
    """`--net` for container address n on the test hosts' segment (gateway: the first
    host's bridge)."""
    spec = f"bridge=br0,ip={hosts.container_address(n)}/24"
    if v6:
        spec += f",ip6={hosts.container_address(n, v6=True)}/64"
    return spec + f",gw={hosts.subnet}.1"


def _start(hosts: TestHosts, host: Host, ct: str, n: int, *argv: str) -> None:
    pycpt(host, "start", "--net", net_spec(hosts, n), ct, "--", *argv)


# --- redis ---------------------------------------------------------------------------------


def start_redis(hosts: TestHosts, host: Host, ct: str, work: Path, n: int = 0) -> str:
    """redis-server as the init of container `ct` on `host`, at container address n; returns
    the address."""
    (server,) = need("redis-server")
    data = work / f"redis-{ct}"
    data.mkdir(parents=True, exist_ok=True)
    _start(
        hosts,
        host,
        ct,
        n,
        server,
        "--port",
        str(REDIS_PORT),
        "--bind",
        "0.0.0.0",
        "::",
        "--protected-mode",
        "no",
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--dir",
        str(data),
        "--logfile",
        "",
    )
    return hosts.container_address(n)


class Resp:
    """One redis connection made in a client namespace, held for the whole test."""

    def __init__(self, sock: socket.socket, address: str, timeout: float = 60) -> None:
        self.sock = sock
        self.sock.settimeout(timeout)
        wait_for(lambda: self._connect(address), 30, f"redis at {address}")
        self.port = self.sock.getsockname()[1]
        self.buf = b""

    def _connect(self, address: str) -> bool:
        try:
            self.sock.connect((address, REDIS_PORT))
            return True
        except ConnectionRefusedError:
            return False

    def call(self, *args: Any) -> Any:
        """Send one command, return its reply (bytes, int, list, None; errors raise)."""
        self.send(*args)
        return self.reply()

    def send(self, *args: Any) -> None:
        """Send one command without waiting for the reply."""
        parts = [str(a).encode() if not isinstance(a, bytes) else a for a in args]
        out = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sock.sendall(out)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n + 2:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("redis closed the connection")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n + 2 :]
        return data

    def reply(self) -> Any:
        """The next reply."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            return None if int(rest) < 0 else self._exact(int(rest))
        if kind == b"*":
            return [self.reply() for _ in range(int(rest))]
        raise RuntimeError(f"bad reply {line!r}")

    def close(self) -> None:
        self.sock.close()


def redis_fill(r: Resp, n: int = 2000) -> str:
    """Store n keys and one 256 KiB value through the held connection; redis' own SHA-1 of
    every value (so that "data intact" compares what the server holds)."""
    lua = (
        "for i = 1, tonumber(ARGV[1]) do redis.call('SET', 'key:' .. i, "
        "redis.sha1hex('value' .. i)) end return 'OK'"
    )
    assert r.call("EVAL", lua, "0", n) == b"OK"
    assert r.call("SET", "big", hashlib.sha256(b"seed").hexdigest() * 4096) == b"OK"
    return redis_digest(r, n)


def redis_digest(r: Resp, n: int = 2000) -> str:
    lua = (
        "local t = {} for i = 1, tonumber(ARGV[1]) do t[#t + 1] = "
        "redis.call('GET', 'key:' .. i) end t[#t + 1] = redis.call('GET', 'big') "
        "return redis.sha1hex(table.concat(t))"
    )
    return r.call("EVAL", lua, "0", n).decode()


def redis_peer_port(r: Resp) -> int:
    """The client port redis sees for this connection (CLIENT INFO's addr=)."""
    info = r.call("CLIENT", "INFO").decode()
    addr = next(f for f in info.split() if f.startswith("addr="))
    return int(addr.rsplit(":", 1)[1])


# --- nginx ---------------------------------------------------------------------------------

NGINX_CONF = """\
worker_processes 1;
user root;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 64; }}
http {{
    access_log off;
    keepalive_timeout 300s;
    keepalive_requests 100000;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    default_type application/octet-stream;
    server {{
        listen {port};
        listen [::]:{port};
        root {prefix}/www;
        location = /conn {{ return 200 "$connection $remote_port\\n"; }}
    }}
}}
"""


def start_nginx(hosts: TestHosts, host: Host, ct: str, work: Path, n: int = 0) -> str:
    """nginx (master and one worker) as container `ct` on `host`, serving a 1 MiB file
    (`/blob`); returns the address."""
    (nginx,) = need("nginx")
    prefix = work / f"nginx-{ct}"
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    (prefix / "www").mkdir(exist_ok=True)
    (prefix / "www" / "blob").write_bytes(hashlib.sha256(b"blob").digest() * (1 << 15))
    conf = prefix / "nginx.conf"
    conf.write_text(NGINX_CONF.format(prefix=prefix, port=HTTP_PORT))
    _start(
        hosts,
        host,
        ct,
        n,
        nginx,
        "-p",
        str(prefix),
        "-c",
        str(conf),
        "-e",
        str(prefix / "error.log"),
        "-g",
        "daemon off;",
    )
    return hosts.container_address(n)


BLOB_SHA = hashlib.sha256(hashlib.sha256(b"blob").digest() * (1 << 15)).hexdigest()


class KeepAlive:
    """One HTTP/1.1 keep-alive connection made in a client namespace."""

    def __init__(self, sock: socket.socket, address: str, timeout: float = 60) -> None:
        sock.settimeout(timeout)

        def connect() -> bool:
            try:
                sock.connect((address, HTTP_PORT))
                return True
            except ConnectionRefusedError:
                return False

        wait_for(connect, 30, f"nginx at {address}")
        self.conn = http.client.HTTPConnection(address, HTTP_PORT, timeout=timeout)
        self.conn.sock = sock  # http.client uses it as it is: no new connection
        self.port = sock.getsockname()[1]
        self.sock = sock

    def get(self, path: str) -> "tuple[int, bytes]":
        """GET path over the held connection (never a new one): status and body."""
        self.conn.request("GET", path)
        resp = self.conn.getresponse()
        body = resp.read()
        if resp.will_close or self.conn.sock is not self.sock:
            raise ConnectionError("the server closed the keep-alive connection")
        return resp.status, body

    def close(self) -> None:
        self.conn.close()


def connection_info(k: KeepAlive) -> Sequence[str]:
    """nginx's connection serial number and the client port it sees."""
    status, body = k.get("/conn")
    assert status == 200
    return body.decode().split()


def outside_name(host: Host, ct: str, index: int = 0) -> Optional[str]:
    """The outside end's name of container ct's NIC `index` (the first by default), read
    from its state file (the name is pycpt's, not the user's)."""
    import json

    state = json.loads((host.state_dir / "ct" / ct / "state.json").read_text())
    nics = state.get("nics") or []
    return nics[index]["host_name"] if len(nics) > index else None
