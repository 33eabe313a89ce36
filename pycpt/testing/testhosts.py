"""Pretend hosts on this one kernel, for migration tests, benchmarks and the demo.

Each host is a network namespace with one interface (eth0, its "uplink") plugged into a
bridge that lives in a private "switch" namespace (each namespace kept alive by a sleeping
"holder" process and entered through /proc/PID/ns/net, not bound under /run/netns: see
_Netns), its own sshd (host key, client key and known_hosts generated here) and its own
PYCPT_STATE_DIR and PYCPT_CGROUP_PARENT, so two hosts share no state file and no cgroup.
As on a real host whose containers have addresses of their own, each host has a bridge, br0,
with its uplink plugged in and its own address on it (10.213.0.<n> and fd00:213::<n>), so a
container started there with `pycpt start --net bridge=br0,ip=...` sits on the same L2 segment
as every host and as the client namespaces (`hosts.client()`: the outside world, no sshd), and
a container migrated from one host to another keeps its address. The /24 is shared out:
hosts .1-.49, clients .50-.99, containers .100-.249 (`hosts.container_address(n)`). The
root namespace's interfaces, routes and sysctls are never touched; traffic stays on the
switch.

    with TestHosts(["src", "dst"], tmp_path) as hosts:
        hosts["src"].run(["ssh", "-F", str(hosts.ssh_config), "dst", "pycpt", "list"])

By hand: `python -m pycpt.testing.testhosts up DIR [NAMES...]`, then `... down DIR`.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

from pycpt._native import check, lib
from pycpt._sys.procfs import cgroup_mounts, start_time
from pycpt.errors import PycptError

__all__ = ["Client", "Host", "TestHosts", "TestHostError", "main"]

SUBNET = "10.213.0"  # a /24; every TestHosts has its own switch, so parallel sets may reuse it
SUBNET6 = "fd00:213::"  # the same segment's /64
# the /24 shared out: hosts .1-.49, client namespaces .50-.99, containers .100-.249
MAX_HOSTS, CLIENT_BASE, MAX_CLIENTS, CONTAINER_BASE, MAX_CONTAINERS = 49, 50, 50, 100, 150
BRIDGE = "br0"  # in each host's namespace: its uplink eth0 and its containers' NICs
SSH_PORT = 22
IFNAME = "eth0"  # inside each host's namespace, so the name cannot collide
SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"
STD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
STATE_FILE = "testhosts.json"
PRIVSEP_DIR = Path("/run/sshd")  # compiled into sshd; it refuses to start without it
_PRIVSEP_MADE = ".pycpt-testhosts-made-this"
_NAME = re.compile(r"[a-z][a-z0-9-]{0,19}")
_instances = itertools.count()


class TestHostError(PycptError):
    """Pretend hosts for migration (TestHosts) could not be built, used or removed.

    Keeps `host` (its name, or "" for the whole set) and `output` (what the failing command or
    sshd's log said).
    """

    __test__ = False  # not a pytest test class, despite the name
    hint = "test hosts need root, iproute2, tc and openssh-server (`make setup` installs them)"

    def __init__(self, message: str, *, host: str = "", output: str = "", hint: str = "") -> None:
        self.host = host
        self.output = output
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        text = super().__str__()
        return f"{text}\n  output: {self.output.strip()}" if self.output.strip() else text


def _bin_dir() -> str:
    # not resolved: a venv's bin/python is a symlink, and its bin dir is where pycpt is
    return os.path.dirname(os.path.abspath(sys.executable))


def _session_path() -> str:
    return f"{_bin_dir()}:{STD_PATH}"


def _cmd(argv: Sequence[str], what: str, host: str = "") -> str:
    """Run a set-up command; its failure is a TestHostError with its output."""
    try:
        done = subprocess.run(
            list(argv), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TestHostError(
            f"{what}: {shlex.join(argv)} failed", host=host, output=str(exc)
        ) from exc
    if done.returncode != 0:
        raise TestHostError(
            f"{what}: {shlex.join(argv)} exited with {done.returncode}",
            host=host,
            output=done.stderr + done.stdout,
        )
    return done.stdout


def _netns_inode(path: Path) -> Optional[int]:
    """The inode of the network namespace at `path`, or None (gone, or not a namespace)."""
    try:
        st = os.stat(path)
        if st.st_dev != os.stat("/proc/self/ns/net").st_dev:  # not on nsfs
            return None
        return st.st_ino
    except OSError:
        return None


def _pids_in_netns(inode: int) -> List[int]:
    """Every process whose network namespace has this inode (but not us)."""
    found = []
    target = f"net:[{inode}]"
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if os.readlink(f"/proc/{entry.name}/ns/net") == target:
                    found.append(int(entry.name))
            except OSError:
                pass  # gone, or a zombie (it left its namespaces already)
    return found


def _wait_gone(pid: int, since: Optional[str], timeout: float) -> bool:
    """True once `pid` (started at `since`) has exited (a zombie counts as exited)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if start_time(pid) != since or since is None:
            return True
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.01)
    return False


class Host:
    """One pretend host: a network namespace with its own address, sshd, state directory and
    cgroup parent. Made by TestHosts; use `run`/`popen` to act "logged in" there."""

    def __init__(self, hosts: "TestHosts", name: str, index: int) -> None:
        self.hosts = hosts
        self.name = name
        self.index = index
        self.address = f"{hosts.subnet}.{index + 1}"
        self.address6 = f"{hosts.subnet6}{index + 1:x}"
        self.bridge = BRIDGE
        # fixed, so that the bridge never takes a container port's MAC as its own
        self.bridge_mac = f"02:00:0a:d5:00:{index + 1:02x}"
        self.netns_name = f"{hosts.prefix}-{name}"  # also the holder's argv[0], for ps
        self._ns = _Netns(self.netns_name)
        self.dir = hosts.workdir / name
        self.state_dir = self.dir / "state"
        self.cgroup_parent = f"{hosts.prefix}-{name}"
        self.port = f"p{index}"  # its cable's end on the switch (in the switch namespace)
        self.sshd_config = self.dir / "sshd_config"
        self.sshd_log = self.dir / "sshd.log"
        self.sshd_stderr = self.dir / "sshd.stderr"
        self.host_key = self.dir / "ssh_host_ed25519_key"
        self._sshd: Optional[subprocess.Popen] = None
        self._sshd_pid: Optional[int] = None
        self._sshd_since: Optional[str] = None

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.address} netns={self.netns_name}>"

    @property
    def netns(self) -> str:
        """The path of this host's network namespace, for `nsenter --net=PATH` or setns()."""
        return str(self._ns.path)

    @property
    def netns_path(self) -> Path:
        """`netns` as a Path."""
        return self._ns.path

    @property
    def env(self) -> Dict[str, str]:
        """The environment of a session on this host: the caller's, with this host's
        PYCPT_STATE_DIR, PYCPT_CGROUP_PARENT, PYCPT_SSH_CONFIG and a PATH that starts with the
        running interpreter's bin dir (the same PATH sshd gives an ssh session here)."""
        env = dict(os.environ)
        env.update(self.session_env)
        return env

    @contextlib.contextmanager
    def as_current(self) -> Iterator["Host"]:
        """Act as this host in the calling process for the length of the block: its
        PYCPT_STATE_DIR and PYCPT_CGROUP_PARENT in os.environ (e.g. to start a container
        there with pycpt.container), the previous values put back afterwards."""
        keys = ("PYCPT_STATE_DIR", "PYCPT_CGROUP_PARENT")
        saved = {k: os.environ.get(k) for k in keys}
        os.environ.update({k: self.session_env[k] for k in keys})
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    @property
    def session_env(self) -> Dict[str, str]:
        """Only the variables this host sets (what its sshd's SetEnv says)."""
        return {
            "PYCPT_STATE_DIR": str(self.state_dir),
            "PYCPT_CGROUP_PARENT": self.cgroup_parent,
            "PYCPT_SSH_CONFIG": str(self.hosts.ssh_config),
            "PATH": _session_path(),
        }

    def nsenter(self, argv: Sequence[str]) -> List[str]:
        """`argv` prefixed to run in this host's network namespace (and nothing else: unlike
        `ip netns exec` it keeps the mount namespace, so /sys/fs/cgroup stays visible)."""
        return self._ns.nsenter(argv)

    def run(self, argv: Sequence[str], **kw: Any) -> "subprocess.CompletedProcess[Any]":
        """subprocess.run of `argv` in this host's namespace with `env` (extra `env=` entries
        are laid over it)."""
        kw["env"] = {**self.env, **(kw.get("env") or {})}
        return subprocess.run(self.nsenter(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """subprocess.Popen like `run`; the pid is the program's (nsenter execs it)."""
        kw["env"] = {**self.env, **(kw.get("env") or {})}
        return subprocess.Popen(self.nsenter(argv), **kw)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in this host's namespace (made by a thread that setns()es, which moves
        only that thread); usable from any thread afterwards."""
        return _socket_in(self.netns_path, family, type, self.name)

    # --- sshd ------------------------------------------------------------------------

    def start_sshd(self, timeout: float = 10.0) -> None:
        """Start this host's sshd (no-op if running) and wait until it accepts connections."""
        if self.sshd_running:
            return
        # stderr to a file, not a pipe: sshd outlives `python -m pycpt.testing.testhosts up`
        with open(self.sshd_stderr, "ab") as stderr:
            self._sshd = self.popen(
                [SSHD, "-D", "-f", str(self.sshd_config), "-E", str(self.sshd_log)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                start_new_session=True,
            )  # a ^C to the caller is not for sshd
        self._sshd_pid = self._sshd.pid
        self._sshd_since = start_time(self._sshd.pid)
        self.hosts._save()
        deadline = time.monotonic() + timeout
        while True:
            if self._sshd.poll() is not None:
                err = self.sshd_stderr.read_text(errors="replace")
                self._forget_sshd()
                raise TestHostError(
                    f"sshd of {self.name} exited at start",
                    host=self.name,
                    output=err + self._log_tail(),
                )
            try:
                with self.socket() as probe:
                    probe.settimeout(0.5)
                    probe.connect((self.address, SSH_PORT))
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop_sshd()
                raise TestHostError(
                    f"sshd of {self.name} does not listen on "
                    f"{self.address}:{SSH_PORT} after {timeout:.0f} s",
                    host=self.name,
                    output=self._log_tail(),
                )
            time.sleep(0.02)

    @property
    def sshd_running(self) -> bool:
        """True while the sshd this host started is alive."""
        return self._sshd_pid is not None and not _wait_gone(self._sshd_pid, self._sshd_since, 0)

    def stop_sshd(self, timeout: float = 10.0) -> None:
        """Stop this host's sshd (by its pid): new connections are refused; sessions already
        open go on, as with a real sshd."""
        pid, since = self._sshd_pid, self._sshd_since
        if pid is None:
            return
        if start_time(pid) == since and since is not None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    break
                if _wait_gone(pid, since, timeout):
                    break
        if self._sshd is not None:
            self._sshd.wait(timeout=timeout)
        self._forget_sshd()

    def _forget_sshd(self) -> None:
        self._sshd = None
        self._sshd_pid = self._sshd_since = None
        self.hosts._save()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.sshd_log.read_text(errors="replace").splitlines()[-10:])
        except OSError:
            return ""

    # --- the link --------------------------------------------------------------------

    def link_down(self) -> None:
        """Pull this host's cable: its switch port goes down, eth0 loses carrier and every
        frame either way is dropped. Open TCP connections stall (and resume after link_up
        unless they time out meanwhile)."""
        self.hosts._switch_ip(["link", "set", self.port, "down"], self.name)

    def link_up(self) -> None:
        """Plug the cable back in."""
        self.hosts._switch_ip(["link", "set", self.port, "up"], self.name)

    # --- what runs there -------------------------------------------------------------

    def processes(self) -> Dict[int, str]:
        """pid -> command line of every process in this host's network namespace, but its
        holder and the listening sshd: what a command left running "on" it (a container
        has a network namespace of its own, so its processes are not among them)."""
        inode = _netns_inode(self.netns_path)
        found: Dict[int, str] = {}
        for pid in _pids_in_netns(inode) if inode else []:
            if pid in (self._ns.pid, self._sshd_pid):
                continue
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            found[pid] = cmd.strip()
        return found

    def crash(self) -> None:
        """Pretend this host crashed: SIGSTOP every process in its network namespace but
        the holder (the crash's instant: none of them acts any more, while the rest takes
        a while), SIGKILL every task under its cgroup parent (its containers), then those
        processes (sshd and sessions too). Files stay (its disk); `start_sshd()` is its
        reboot."""
        stopped = list(self.processes())
        for pid in stopped:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        for mount, _kind, _opts in cgroup_mounts():
            parent = Path(mount, self.cgroup_parent)
            for kill in parent.glob("*/cgroup.kill") if parent.is_dir() else ():
                try:
                    kill.write_text("1")
                except OSError:
                    pass
        for pid in self.processes():  # the stopped ones are still there: they cannot exit
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._sshd_pid is not None:
            try:
                os.kill(self._sshd_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if self._sshd is not None:
                self._sshd.wait(timeout=10)
            self._forget_sshd()

    def limit_rate(self, rate: str, burst: str = "512kb", latency: str = "100ms") -> None:
        """Shape this host's link to `rate` (tc syntax: "100mbit", "1gbit") in both directions:
        a token bucket on eth0 (what it sends) and on its switch port (what it receives)."""
        # A burst below rate/HZ cannot reach the rate, and below 64 KiB it splits veth's GSO
        # packets; 512 KiB suits 100mbit..10gbit.
        qdisc = [
            "qdisc",
            "replace",
            "dev",
            "%s",
            "root",
            "tbf",
            "rate",
            rate,
            "burst",
            burst,
            "latency",
            latency,
        ]
        _cmd(
            self.nsenter(["tc", *[IFNAME if a == "%s" else a for a in qdisc]]),
            "limit the rate",
            self.name,
        )
        _cmd(
            self.hosts._switch.nsenter(["tc", *[self.port if a == "%s" else a for a in qdisc]]),
            "limit the rate",
            self.name,
        )

    def clear_rate(self) -> None:
        """Remove the rate limit (no-op without one)."""
        for ns, dev in ((self, IFNAME), (self.hosts._switch, self.port)):
            subprocess.run(
                ns.nsenter(["tc", "qdisc", "del", "dev", dev, "root"]),
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )

    # --- teardown --------------------------------------------------------------------

    def _remove_containers(self, problems: List[str]) -> None:
        """Kill the containers of this host and remove its cgroups, pycpt's way first
        (container.remove_all, thawing and killing through the freezer), then whatever is
        still in a cgroup under this host's parent."""
        if self.state_dir.is_dir():
            done = subprocess.run(  # in the host's namespace: its containers' NICs are there
                self.nsenter(
                    [sys.executable, "-c", "from pycpt.container import remove_all; remove_all()"]
                ),
                env=self.env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
            )
            if done.returncode != 0:
                problems.append(f"{self.name}: remove_all failed: {done.stderr.strip()[-500:]}")
        for mount, _kind, _opts in cgroup_mounts():
            path = Path(mount, self.cgroup_parent)
            if path.is_dir():
                try:
                    _kill_cgroup_tree(path)
                except OSError as exc:
                    problems.append(f"{self.name}: cannot remove cgroup {path}: {exc}")


def _kill_cgroup_tree(path: Path, timeout: float = 10.0) -> None:
    """SIGKILL every task below `path` and remove the cgroups, deepest first."""
    for child in path.iterdir():
        if child.is_dir():
            _kill_cgroup_tree(child, timeout)
    for name, value in (("freezer.state", "THAWED"), ("cgroup.freeze", "0"), ("cgroup.kill", "1")):
        if (path / name).exists():
            try:
                (path / name).write_text(value)
            except OSError:
                pass
    deadline = time.monotonic() + timeout
    while True:
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.rmdir(path)  # EBUSY while a killed task is still leaving
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _addresses_up(ns: "_Netns", dev: str, address: str, address6: str, who: str) -> None:
    """The segment's IPv4 (/24) and IPv6 (/64, no DAD: the addresses are ours to give)
    addresses on `dev`, then `dev` and lo up."""
    ns.ip(["addr", "add", f"{address}/24", "dev", dev], "address", who)
    ns.ip(["addr", "add", f"{address6}/64", "dev", dev, "nodad"], "address", who)
    ns.ip(["link", "set", dev, "up"], f"bring up {dev}", who)
    ns.ip(["link", "set", "lo", "up"], "bring up lo", who)


class _Netns:
    """A network namespace kept alive by one sleeping process, its holder (`unshare --net`,
    argv[0] = `name`), and entered through /proc/PID/ns/net.

    Not an `ip netns add` bind mount under /run/netns: every container started meanwhile
    copies the mounts of the root mount namespace, and CRIU then refuses to dump it ("mnt:
    ./run/netns/NAME doesn't have a proper root mount"), so hosts made that way break every
    checkpoint on the machine while they exist.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.pid: Optional[int] = None
        self.since: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None

    @property
    def path(self) -> Path:
        """/proc/HOLDER/ns/net."""
        if self.pid is None:
            raise TestHostError(f"network namespace {self.name} is not up")
        return Path(f"/proc/{self.pid}/ns/net")

    def create(self, timeout: float = 10.0) -> None:
        """Start the holder and wait until it sits in its own new namespace."""
        self._proc = subprocess.Popen(
            ["unshare", "--net", "--", "/bin/bash", "-c", 'exec -a "$0" sleep infinity', self.name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.pid = self._proc.pid
        self.since = start_time(self.pid)
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + timeout
        # Until the holder has exec'd sleep, /proc/PID/ns/net may still be ours: configuring
        # it then would change the root namespace.
        while True:
            if self._proc.poll() is not None:
                raise TestHostError(
                    f"unshare --net exited with {self._proc.returncode}",
                    hint="test hosts need root and network namespaces",
                )
            try:
                argv0 = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")[0]
                if argv0 == self.name.encode() and os.readlink(self.path) != ours:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TestHostError(f"the holder of network namespace {self.name} did not start")
            time.sleep(0.005)

    def nsenter(self, argv: Sequence[str]) -> List[str]:
        return ["nsenter", f"--net={self.path}", "--", *argv]

    def ip(self, argv: Sequence[str], what: str, host: str = "") -> str:
        return _cmd(self.nsenter(["ip", *argv]), what, host)

    def destroy(self, problems: List[str]) -> None:
        """Kill (by pid) every process in the namespace, the holder last among them; the
        namespace and its veth ends go with them."""
        if self.pid is None:
            return
        alive = start_time(self.pid) == self.since and self.since is not None
        inode = _netns_inode(self.path) if alive else None
        if inode is not None and inode == _netns_inode(Path("/proc/self/ns/net")):
            # never: that would be every process of the machine
            problems.append(f"{self.name}: holder {self.pid} is in our own namespace")
            inode = None
        victims = [(pid, start_time(pid)) for pid in _pids_in_netns(inode)] if inode else []
        if alive and all(pid != self.pid for pid, _ in victims):
            victims.append((self.pid, self.since))
        for pid, since in victims:
            if since is not None and start_time(pid) == since:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for pid, since in victims:
            if not _wait_gone(pid, since, 10):
                problems.append(f"pid {pid} in netns {self.name} did not die")
        if self._proc is not None:
            self._proc.wait(timeout=10)
            self._proc = None
        self.pid = self.since = None


class Client:
    """A namespace on the switch standing for the outside world: one interface (eth0) with
    an address of the segment (`address`, `address6`), no sshd, no pycpt. Made by TestHosts
    (`hosts.client(name)`)."""

    def __init__(self, hosts: "TestHosts", name: str, index: int) -> None:
        self.hosts = hosts
        self.name = name
        self.address = f"{hosts.subnet}.{CLIENT_BASE + index}"
        self.address6 = f"{hosts.subnet6}{CLIENT_BASE + index:x}"
        self.port = f"c{index}"  # its cable's end on the switch
        self._ns = _Netns(f"{hosts.prefix}-{name}")

    def __repr__(self) -> str:
        return f"<Client {self.name} {self.address}>"

    @property
    def netns(self) -> str:
        """The path of this client's network namespace."""
        return str(self._ns.path)

    def nsenter(self, argv: Sequence[str]) -> List[str]:
        """`argv` prefixed to run in this client's network namespace."""
        return self._ns.nsenter(argv)

    def run(self, argv: Sequence[str], **kw: Any) -> "subprocess.CompletedProcess[Any]":
        """subprocess.run of `argv` in this client's namespace."""
        return subprocess.run(self.nsenter(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """subprocess.Popen of `argv` in this client's namespace (the pid is the program's)."""
        return subprocess.Popen(self.nsenter(argv), **kw)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in this client's namespace (see Host.socket)."""
        return _socket_in(self._ns.path, family, type, self.name)


def _socket_in(path: Path, family: int, kind: int, name: str) -> socket.socket:
    """A socket made in the network namespace at `path` by a thread that setns()es (which
    moves only that thread); usable from any thread afterwards."""
    result: List[Any] = []

    def make() -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                check(lib.pycpt_ns_enter(fd, lib.PYCPT_NS_NET), str(path))
            finally:
                os.close(fd)
            result.append(socket.socket(family, kind))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=make, name=f"setns-{name}")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


class TestHosts:
    """A set of pretend hosts joined by one switch; a context manager (`close()` removes it
    all: sshds, containers, cgroups, namespaces and the files made below `workdir`).

    `hosts[name]` is a Host; `ssh_config` an ssh_config with a Host entry per name.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(
        self,
        names: Sequence[str],
        workdir: Union[str, Path],
        *,
        subnet: str = SUBNET,
        subnet6: str = SUBNET6,
        clients: Sequence[str] = ("client",),
    ) -> None:
        names = list(names)
        clients = list(clients)
        if not names:
            raise ValueError("TestHosts needs at least one host name")
        if len(set(names + clients)) != len(names) + len(clients):
            raise ValueError(f"host and client names must differ: {names + clients}")
        if len(names) > MAX_HOSTS:
            raise ValueError(f"at most {MAX_HOSTS} hosts fit the /24")
        if len(clients) > MAX_CLIENTS:
            raise ValueError(f"at most {MAX_CLIENTS} client namespaces fit the /24")
        for name in names + clients:
            if not _NAME.fullmatch(name):
                raise ValueError(
                    f"invalid host name {name!r}: lower-case letters, digits and "
                    "'-', starting with a letter, at most 20 characters"
                )
        self.names = names
        self.subnet = subnet
        self.subnet6 = subnet6
        self.client_names = clients
        self.workdir = Path(workdir).absolute()
        self.prefix = f"pycpt-th{os.getpid()}-{next(_instances)}"
        self.ssh_config = self.workdir / "ssh_config"
        self.client_key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.state_file = self.workdir / STATE_FILE
        self._switch = _Netns(f"{self.prefix}-sw")
        self._hosts = {name: Host(self, name, i) for i, name in enumerate(names)}
        self._clients = {name: Client(self, name, j) for j, name in enumerate(clients)}
        self._made_workdir = False
        self._privsep_marker: Optional[str] = None
        self._up = False
        self._closed = False

    # --- access ----------------------------------------------------------------------

    def __getitem__(self, name: str) -> Host:
        return self._hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self._hosts.values())

    def __len__(self) -> int:
        return len(self._hosts)

    def client(self, name: str = "client") -> Client:
        """A client namespace on the switch (no sshd, no pycpt state): the outside world."""
        return self._clients[name]

    def container_address(self, n: int, v6: bool = False) -> str:
        """The n-th address (0-based) reserved for containers on the segment, without its
        prefix (/24, /64)."""
        if not 0 <= n < MAX_CONTAINERS:
            raise ValueError(f"container address index {n} out of range")
        if v6:
            return f"{self.subnet6}{CONTAINER_BASE + n:x}"
        return f"{self.subnet}.{CONTAINER_BASE + n}"

    def ssh_argv(self, target: str, *argv: str) -> List[str]:
        """`ssh -F <ssh_config> TARGET ARGV...` (run it with some host's `run`)."""
        return ["ssh", "-F", str(self.ssh_config), target, *argv]

    # --- building --------------------------------------------------------------------

    def __enter__(self) -> "TestHosts":
        self.up()
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close(_quiet=exc is not None)

    def up(self) -> "TestHosts":
        """Build every host and start its sshd. On any failure, what was built is removed."""
        if self._up:
            return self
        if os.geteuid() != 0:
            raise TestHostError(
                "test hosts need root (network namespaces, sshd)", hint="run as root"
            )
        for tool in ("ip", "tc", "nsenter", "ssh", "ssh-keygen", SSHD):
            if shutil.which(tool) is None:
                raise TestHostError(f"{tool} is missing")
        try:
            self._build()
        except BaseException:
            self.close(_quiet=True)
            raise
        self._up = True
        return self

    def _build(self) -> None:
        if not self.workdir.exists():
            self.workdir.mkdir(parents=True)
            self._made_workdir = True
        self._save()
        self._keys()
        self._acquire_privsep_dir()
        self._save()
        self._network()
        for host in self:
            host.state_dir.mkdir(parents=True, exist_ok=True)
            self._write_sshd_config(host)
        self._write_ssh_config()
        for host in self:
            host.start_sshd()

    def _keys(self) -> None:
        _cmd(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"pycpt-testhosts@{self.prefix}",
                "-f",
                str(self.client_key),
            ],
            "make the client key",
        )
        known = []
        for host in self:
            host.dir.mkdir(parents=True, exist_ok=True)
            _cmd(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"{host.name}@{self.prefix}",
                    "-f",
                    str(host.host_key),
                ],
                "make a host key",
                host.name,
            )
            kind, key = Path(f"{host.host_key}.pub").read_text().split()[:2]
            known.append(f"{host.name},{host.address} {kind} {key}\n")
        self.known_hosts.write_text("".join(known))
        shutil.copyfile(f"{self.client_key}.pub", self.workdir / "authorized_keys")

    def _switch_ip(self, argv: Sequence[str], host: str = "") -> None:
        self._switch.ip(argv, "configure the switch", host)

    def _network(self) -> None:
        self._switch.create()
        self._save()
        self._switch_ip(["link", "add", "br0", "type", "bridge"])
        self._switch_ip(["link", "set", "br0", "up"])
        for host in self:
            host._ns.create()
            self._save()
            # made inside the switch namespace and handed over: the root namespace never
            # sees either end
            self._switch_ip(
                [
                    "link",
                    "add",
                    host.port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    IFNAME,
                    "netns",
                    str(host._ns.pid),
                ],
                host.name,
            )
            self._switch_ip(["link", "set", host.port, "master", "br0", "up"], host.name)
            # the host's own bridge on its uplink, as a real host's: its address lives on the
            # bridge, and its containers' NICs (pycpt start --net bridge=br0) join it
            ip = host._ns.ip
            ip(
                ["link", "add", BRIDGE, "address", host.bridge_mac, "type", "bridge"]
                + ["forward_delay", "0", "stp_state", "0"],
                "make the host's bridge",
                host.name,
            )
            ip(["link", "set", IFNAME, "master", BRIDGE, "up"], "plug eth0 into br0", host.name)
            _addresses_up(host._ns, BRIDGE, host.address, host.address6, host.name)
        for client in self._clients.values():
            client._ns.create()
            self._save()
            self._switch_ip(
                ["link", "add", client.port, "type", "veth", "peer", "name", IFNAME]
                + ["netns", str(client._ns.pid)],
                client.name,
            )
            self._switch_ip(["link", "set", client.port, "master", "br0", "up"], client.name)
            _addresses_up(client._ns, IFNAME, client.address, client.address6, client.name)
        # Neighbours known for good: a cut link then drops packets silently (connections time
        # out, as behind a switch) instead of failing ARP ("No route to host" after ~3 s).
        # Between hosts only: a container's MAC moves between hosts and is learnt anew.
        for host in self:
            for other in self:
                if other is not host:
                    host._ns.ip(
                        ["neigh", "replace", other.address, "lladdr", other.bridge_mac]
                        + ["dev", BRIDGE, "nud", "permanent"],
                        "add a neighbour",
                        host.name,
                    )

    def _write_sshd_config(self, host: Host) -> None:
        env = host.session_env
        session = host.dir / "session"
        # Root's ~/.bashrc (sourced by bash when sshd runs it, even for a plain command) and
        # /etc/profile (login shells) rewrite PATH after sshd's SetEnv; this ForceCommand puts
        # the session's PATH back and runs the command without rc files.
        session.write_text(
            "#!/bin/sh\n"
            "# ForceCommand of a pycpt test host's sshd: PATH as SetEnv says, no rc files.\n"
            f"PATH={shlex.quote(env['PATH'])}; export PATH\n"
            'if [ -n "$SSH_ORIGINAL_COMMAND" ]; then\n'
            '    exec /bin/bash --norc --noprofile -c "$SSH_ORIGINAL_COMMAND"\n'
            "fi\n"
            "exec /bin/bash --norc --noprofile -i\n"
        )
        session.chmod(0o755)
        # SHLVL=1 makes the user's bash (which runs the ForceCommand) a nested shell, and a
        # nested bash skips ~/.bashrc: root's pyenv set-up there costs ~0.3 s a connection
        setenv = " ".join(f"{k}={shlex.quote(v)}" for k, v in {**env, "SHLVL": "1"}.items())
        host.sshd_config.write_text(f"""\
# sshd of the pycpt test host {host.name} ({host.address}, netns {host.netns_name})
ListenAddress {host.address}:{SSH_PORT}
HostKey {host.host_key}
PidFile {host.dir / "sshd.pid"}
AuthorizedKeysFile {self.workdir / "authorized_keys"}
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# the files live below a test's tmp directory, which StrictModes would refuse
StrictModes no
PrintMotd no
PrintLastLog no
X11Forwarding no
AllowTcpForwarding yes
PermitUserEnvironment no
AcceptEnv none
MaxStartups 100:30:200
# a session whose client is gone for good ends within seconds, as on a well-kept server
ClientAliveInterval 2
ClientAliveCountMax 4
LogLevel INFO
SetEnv {setenv}
ForceCommand {session}
Subsystem sftp {SFTP_SERVER}
""")

    def _write_ssh_config(self) -> None:
        entries = [
            f"# ssh_config for the pycpt test hosts in {self.workdir}\n"
            "# use it from inside a host: nsenter --net=/proc/HOLDER/ns/net ssh -F THIS HOST\n"
        ]
        for host in self:
            entries.append(f"""
Host {host.name}
    HostName {host.address}
    Port {SSH_PORT}
    User root
    IdentityFile {self.client_key}
    IdentitiesOnly yes
    UserKnownHostsFile {self.known_hosts}
    GlobalKnownHostsFile /dev/null
    StrictHostKeyChecking yes
    UpdateHostKeys no
    BatchMode yes
    ConnectTimeout 10
    ControlMaster no
    LogLevel ERROR
""")
        self.ssh_config.write_text("".join(entries))

    # --- /run/sshd ---------------------------------------------------------------------

    def _acquire_privsep_dir(self) -> None:
        """Make sure /run/sshd exists while we need it, and leave a marker saying so; the
        last user of a /run/sshd that a TestHosts made removes it (rmdir fails safely if
        another run's marker appeared meanwhile)."""
        marker = f".pycpt-testhosts-{self.prefix}"
        for _ in range(100):
            made = False
            try:
                PRIVSEP_DIR.mkdir(mode=0o755)
                made = True
            except FileExistsError:
                pass
            try:
                if made:
                    (PRIVSEP_DIR / _PRIVSEP_MADE).touch()
                (PRIVSEP_DIR / marker).touch()
                self._privsep_marker = marker
                return
            except FileNotFoundError:
                continue  # another run removed it just now
        raise TestHostError(f"cannot keep {PRIVSEP_DIR} in place for sshd")

    def _release_privsep_dir(self) -> None:
        if self._privsep_marker is None:
            return
        try:
            (PRIVSEP_DIR / self._privsep_marker).unlink()
        except FileNotFoundError:
            pass
        self._privsep_marker = None
        try:
            others = [
                e
                for e in os.listdir(PRIVSEP_DIR)
                if e.startswith(".pycpt-testhosts-") and e != _PRIVSEP_MADE
            ]
            if not others and (PRIVSEP_DIR / _PRIVSEP_MADE).exists():
                (PRIVSEP_DIR / _PRIVSEP_MADE).unlink()
                os.rmdir(PRIVSEP_DIR)
        except OSError:
            pass  # someone else is using it, or someone else removed it

    # --- teardown --------------------------------------------------------------------

    def close(self, _quiet: bool = False) -> None:
        """Remove everything: sshds (by pid), processes left in the hosts' namespaces,
        containers and cgroups, the namespaces and the files below workdir. Idempotent, and
        safe after a partial set-up. Problems are collected and raised at the end as one
        TestHostError (only warned about when an exception is already on its way)."""
        if self._closed:
            return
        problems: List[str] = []
        for host in self:
            try:
                host.stop_sshd()
            except Exception as exc:  # go on: the rest must still be removed
                problems.append(f"{host.name}: stopping sshd: {exc}")
        for host in self:
            try:
                host._remove_containers(problems)
            except Exception as exc:
                problems.append(f"{host.name}: removing containers: {exc}")
        for ns in [*(host._ns for host in self), *self._client_ns(), self._switch]:
            try:
                ns.destroy(problems)
            except Exception as exc:
                problems.append(f"{ns.name}: {exc}")
        self._release_privsep_dir()
        self._remove_files(problems)
        self._closed = True
        if problems:
            error = TestHostError(
                "test hosts were not removed completely",
                output="\n".join(problems),
                hint=f"see the output; `ps -ef | grep {self.prefix}` and "
                "/sys/fs/cgroup show what is left",
            )
            if _quiet:
                warnings.warn(str(error), RuntimeWarning, stacklevel=2)
            else:
                raise error

    def _client_ns(self) -> List["_Netns"]:
        return [c._ns for c in self._clients.values()]

    def _remove_files(self, problems: List[str]) -> None:
        if not self.workdir.exists():
            return
        made = [
            self.ssh_config,
            self.client_key,
            Path(f"{self.client_key}.pub"),
            self.known_hosts,
            self.workdir / "authorized_keys",
            self.state_file,
        ]
        try:
            for host in self:
                if host.dir.exists():
                    shutil.rmtree(host.dir)
            for path in made:
                if path.exists():
                    path.unlink()
            if self._made_workdir:
                self.workdir.rmdir()
        except OSError as exc:
            problems.append(f"removing files below {self.workdir}: {exc}")

    # --- a record for `down` in another process ---------------------------------------

    def _save(self) -> None:
        if not self.workdir.is_dir():
            return
        record = {
            "names": self.names,
            "subnet": self.subnet,
            "prefix": self.prefix,
            "made_workdir": self._made_workdir,
            "privsep_marker": self._privsep_marker,
            "clients": self.client_names,
            "netns": {
                ns.name: [ns.pid, ns.since]
                for ns in [self._switch, *(h._ns for h in self), *self._client_ns()]
            },
            "sshd": {h.name: [h._sshd_pid, h._sshd_since] for h in self},
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2))
        os.replace(tmp, self.state_file)

    @classmethod
    def load(cls, workdir: Union[str, Path]) -> "TestHosts":
        """The TestHosts that `up` (maybe another process) built in `workdir`."""
        workdir = Path(workdir).absolute()
        try:
            record = json.loads((workdir / STATE_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise TestHostError(
                f"no test hosts in {workdir}",
                hint="`python -m pycpt.testing.testhosts up DIR` makes them",
            ) from exc
        hosts = cls(
            record["names"], workdir, subnet=record["subnet"], clients=record.get("clients", [])
        )
        hosts.prefix = record["prefix"]
        hosts._switch = _Netns(f"{hosts.prefix}-sw")
        hosts._hosts = {name: Host(hosts, name, i) for i, name in enumerate(hosts.names)}
        hosts._clients = {name: Client(hosts, name, j) for j, name in enumerate(hosts.client_names)}
        hosts._made_workdir = record["made_workdir"]
        for ns in [hosts._switch, *(h._ns for h in hosts), *hosts._client_ns()]:
            ns.pid, ns.since = record["netns"].get(ns.name, [None, None])
        hosts._privsep_marker = record["privsep_marker"]
        for name, (pid, since) in record["sshd"].items():
            hosts[name]._sshd_pid, hosts[name]._sshd_since = pid, since
        hosts._up = True
        return hosts


# --- python -m pycpt.testing.testhosts -----------------------------------------------------


def _usage(hosts: TestHosts) -> str:
    first, last = hosts[hosts.names[0]], hosts[hosts.names[-1]]
    bindir = _bin_dir()
    lines = [f"test hosts up in {hosts.workdir}:"]
    for h in hosts:
        lines.append(
            f"  {h.name:<8} {h.address:<12} netns {h.netns}  state {h.state_dir}  "
            f"cgroup parent {h.cgroup_parent}  bridge {h.bridge}"
        )
    for c in hosts._clients.values():
        lines.append(f"  {c.name:<8} {c.address:<12} netns {c.netns}  (a client: no sshd)")
    env = " ".join(f"{k}={shlex.quote(v)}" for k, v in first.session_env.items())
    lines += [
        f"ssh config: {hosts.ssh_config}",
        "",
        f"a shell on {first.name} (its network, its pycpt state):",
        f"  nsenter --net={first.netns} env {env} bash --norc",
        f"from there (or prefix nsenter --net={first.netns}):",
        f"  ssh -F {hosts.ssh_config} {last.name} pycpt list",
        f"  {bindir}/pycpt start ct1 -- sleep 1000",
        f"  {bindir}/pycpt start web --net bridge={BRIDGE},ip={hosts.container_address(0)}/24 "
        "-- CMD   (its own address on the segment)",
        f"  {bindir}/pycpt migrate {last.name} ct1",
        f"remove it all: {shlex.quote(sys.executable)} -m pycpt.testing.testhosts down "
        f"{hosts.workdir}",
    ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`up DIR [NAMES...]` builds hosts (default src dst) and leaves them running;
    `down DIR` removes them."""
    parser = argparse.ArgumentParser(
        prog="python -m pycpt.testing.testhosts",
        description="pretend hosts for trying pycpt migrate",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("up", help="build hosts (network namespaces with sshd) below DIR")
    p.add_argument("dir", type=Path)
    p.add_argument("names", nargs="*", default=["src", "dst"])
    p = sub.add_parser("down", help="remove the hosts built below DIR")
    p.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if (args.dir / STATE_FILE).exists():
                raise TestHostError(
                    f"test hosts are already up in {args.dir}",
                    hint=f"`python -m pycpt.testing.testhosts down {args.dir}` first",
                )
            hosts = TestHosts(args.names, args.dir).up()
            print(_usage(hosts))
        else:
            TestHosts.load(args.dir).close()
            print(f"test hosts in {args.dir.absolute()} removed")
    except (TestHostError, ValueError) as exc:
        print(f"pycpt.testing.testhosts: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
