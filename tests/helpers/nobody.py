"""An unprivileged local user (`nobody`) attacking a migration's page channel: it connects, as
any local user could, to every listening socket it can find in a host's network namespace
(TCP on any address, Unix sockets by path or abstract name), all through a migration.

The probe runs the system's /usr/bin/python3 (root's interpreters may sit where `nobody`
cannot read) with setpriv, inside the host's namespace, and reports on stdout when its stdin
closes.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from typing import Any, Dict, List, Optional

from pycpt.testing.testhosts import Host

NOBODY_UID = 65534
PYTHON = "/usr/bin/python3"
AS_NOBODY = [
    "setpriv",
    f"--reuid={NOBODY_UID}",
    f"--regid={NOBODY_UID}",
    "--clear-groups",
    "--inh-caps=-all",
]

# every round: the listening sockets of this network namespace, then a connect() to each
_PROBE = r"""
import errno, json, os, select, socket, struct, sys, time

SKIP_PORTS = {int(p) for p in sys.argv[1].split(",") if p}
results = {}
rounds = 0


def tcp_listeners():
    found = []
    for name, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        try:
            lines = open(f"/proc/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != "0A":  # TCP_LISTEN
                continue
            addr, port = f[1].split(":")
            port = int(port, 16)
            raw = bytes.fromhex(addr)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = socket.inet_ntop(family, raw)
            if ip in ("0.0.0.0", "::"):
                ip = "127.0.0.1" if family == socket.AF_INET else "::1"
            found.append((family, ip, port))
    return found


def unix_listeners():
    found = []
    for line in open("/proc/net/unix").read().splitlines()[1:]:
        f = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flag 0x10000: listening
        if len(f) >= 8 and int(f[3], 16) & 0x10000:
            found.append(f[7])
    return found


def attempt(family, address):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(0.5)
    try:
        s.connect(address)
        return "connected"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc)) if exc.errno else type(exc).__name__
    finally:
        s.close()


def note(key, result):
    results.setdefault(key, [])
    if result not in results[key]:
        results[key].append(result)


print("ready", flush=True)
while not select.select([0], [], [], 0)[0]:
    rounds += 1
    for family, ip, port in tcp_listeners():
        if port not in SKIP_PORTS:
            note(f"tcp {ip}:{port}", attempt(family, (ip, port)))
    for path in unix_listeners():
        target = "\0" + path[1:] if path.startswith("@") else path
        note(f"unix {path}", attempt(socket.AF_UNIX, target))
    time.sleep(0.002)
print(json.dumps({"rounds": rounds, "results": results}), flush=True)
"""


class Prober:
    """`nobody` connecting to every listener in `host`'s network namespace until stop()."""

    def __init__(self, host: Host, skip_ports: List[int]) -> None:
        self.host = host
        argv = host.nsenter([*AS_NOBODY, PYTHON, "-c", _PROBE, ",".join(map(str, skip_ports))])
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/"
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline().strip()
        if first != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"the nobody probe in {host.name} did not start: {first!r}")
        self.report: Optional[Dict[str, Any]] = None

    def stop(self) -> Dict[str, Any]:
        """What it tried: {"rounds": N, "results": {"tcp IP:PORT" | "unix PATH": [results]}}."""
        if self.report is None:
            out, _ = self.proc.communicate(timeout=60)
            self.report = json.loads(out.strip().splitlines()[-1])
        return self.report

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def connect_as_nobody(path: str) -> str:
    """`nobody` connecting to the Unix socket `path`: "connected" or the errno's name."""
    code = (
        "import errno, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        "    s.connect(sys.argv[1]); print('connected')\n"
        "except OSError as exc:\n"
        "    print(errno.errorcode.get(exc.errno, str(exc)))\n"
    )
    out = subprocess.run(
        [*AS_NOBODY, PYTHON, "-c", code, path], capture_output=True, text=True, cwd="/", timeout=30
    )
    return out.stdout.strip() or out.stderr.strip()


def nobody_missing() -> Optional[str]:
    """Why a probe as `nobody` cannot run here, or None."""
    for tool in ("setpriv", PYTHON):
        if shutil.which(tool) is None:
            return f"the nobody probe needs {tool}"
    return None
