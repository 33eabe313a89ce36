"""The way to another host: ssh with key authentication, one master connection per migration.

    with SshConnection(SshTarget.parse("root@dst:2222")) as conn:
        agent = conn.popen(["pycpt", "status", "ct1"], stdout=subprocess.PIPE)
        conn.forward_socket(str(conn.directory / "s"), "/tmp/.x/s")   # ssh -O forward -L

BatchMode is always on: a missing key is an error saying how to set one up, never a
password prompt. Every remote argument is quoted (the remote side runs it through a shell).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence

from pycpt import errors
from pycpt._sys.process import die_with_parent

# dead links are noticed within ServerAliveInterval * ServerAliveCountMax seconds
_ALIVE = [
    "-o",
    "ServerAliveInterval=2",
    "-o",
    "ServerAliveCountMax=3",
    # AES-GCM runs on the CPU's AES instructions: 1.5x chacha20's rate here
    "-o",
    "Ciphers=^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
    # the page channel's local end: 0600 whatever a user's ssh_config says (it sits in a
    # 0700 directory too), and never over a path that exists
    "-o",
    "StreamLocalBindMask=0177",
    "-o",
    "StreamLocalBindUnlink=no",
]
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*|\[[0-9A-Fa-f:.]+\]")


@dataclass(frozen=True)
class SshTarget:
    """`[user@]host[:port]`, checked: nothing in it can reach a shell or pass for an option."""

    host: str
    user: Optional[str] = None
    port: Optional[int] = None

    @classmethod
    def parse(cls, spec: str) -> "SshTarget":
        """Parse `[user@]host[:port]` (an IPv6 address goes in brackets: `[fd00::2]:22`)."""
        if not isinstance(spec, str) or not spec:
            raise errors.InvalidArgumentError("a host is `[user@]host[:port]`, not empty")
        user, at, rest = spec.rpartition("@")
        host, port = rest, None
        if rest.startswith("["):
            close = rest.find("]")
            host, tail = rest[: close + 1], rest[close + 1 :]
            if close < 0 or (tail and not tail.startswith(":")):
                raise errors.InvalidArgumentError(
                    f"bad host {spec!r}: write an IPv6 address as [addr]:port"
                )
            port = tail[1:] or None
        elif ":" in rest:
            host, _, port = rest.partition(":")
        if at and not _USER.fullmatch(user):
            raise errors.InvalidArgumentError(f"bad user in {spec!r}")
        if not _HOST.fullmatch(host):
            raise errors.InvalidArgumentError(f"bad host name in {spec!r}")
        number = None
        if port is not None:
            if not port.isdigit() or not 0 < int(port) < 65536:
                raise errors.InvalidArgumentError(f"bad port in {spec!r}: 1-65535")
            number = int(port)
        return cls(
            host=host.strip("[]") if host.startswith("[") else host,
            user=user if at else None,
            port=number,
        )

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return (
            (f"{self.user}@" if self.user else "") + host + (f":{self.port}" if self.port else "")
        )


class SshConnection:
    """A master ssh connection (ControlMaster) to `target`; every command and port forward
    of a migration rides on it, so only the first one pays for the handshake.

    `config` is an ssh_config file (ssh -F), e.g. the one pycpt.testing.testhosts writes;
    `control_dir` a directory to create for its control socket (default: a new temporary
    one), removed by close().
    """

    def __init__(
        self,
        target: SshTarget,
        *,
        config: Optional[str] = None,
        connect_timeout: float = 10.0,
        control_dir: Optional[Path] = None,
    ) -> None:
        self.target = target
        if control_dir is not None:  # a name chosen (and recorded) by the caller
            control_dir.mkdir(mode=0o700)
            self._dir = control_dir
        else:
            self._dir = Path(tempfile.mkdtemp(prefix="pycpt-ssh-"))
        self._control = self._dir / "control"
        base = [
            "ssh",
            "-o",
            "BatchMode=yes",
            "-o",
            f"ConnectTimeout={int(connect_timeout)}",
            *_ALIVE,
            "-S",
            str(self._control),
        ]
        if config:
            if not Path(config).is_file():
                shutil.rmtree(self._dir, ignore_errors=True)
                raise errors.InvalidArgumentError(f"ssh config {config!r} does not exist")
            base += ["-F", config]
        if target.user:
            base += ["-l", target.user]
        if target.port:
            base += ["-p", str(target.port)]
        self._base = base
        self._master: Optional[subprocess.Popen[bytes]] = None
        try:
            self._start_master(connect_timeout)
        except BaseException:
            self.close()
            raise

    def _start_master(self, timeout: float) -> None:
        self._master = subprocess.Popen(
            [*self._base, "-M", "-N", "-o", "ControlPersist=no", "--", self.target.host],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C at the terminal must not cut us off mid-way
            preexec_fn=die_with_parent(),  # but our death must: no master without us
        )
        deadline = time.monotonic() + timeout + 5
        while not self._control.exists():
            if self._master.poll() is not None:
                assert self._master.stderr is not None
                raise connection_error(
                    self.target, self._master.stderr.read().decode(errors="replace")
                )
            if time.monotonic() > deadline:
                raise errors.HostUnreachableError(
                    f"ssh to {self.target} did not connect within {timeout:.0f} s",
                    host=str(self.target),
                )
            time.sleep(0.01)

    def command(self, argv: Sequence[str]) -> List[str]:
        """The local argv that runs `argv` on the target, each word quoted for its shell."""
        return [*self._base, "--", self.target.host, shlex.join(argv)]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> "subprocess.Popen[bytes]":
        """Start `argv` on the target (in a session of its own here: a Ctrl-C meant for us
        must not end it before we have cleaned up through it; it dies with us, though, and
        its end there sees the session close). Call it from a thread that lives as long."""
        return subprocess.Popen(
            self.command(argv), start_new_session=True, preexec_fn=die_with_parent(), **kwargs
        )

    def run(
        self, argv: Sequence[str], timeout: float = 60.0
    ) -> "subprocess.CompletedProcess[bytes]":
        """Run `argv` on the target and capture its output."""
        return subprocess.run(
            self.command(argv),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            start_new_session=True,
            preexec_fn=die_with_parent(),
        )

    @property
    def directory(self) -> Path:
        """The connection's private directory (0700, removed by close()): its control socket
        and the page channel's local end live there."""
        return self._dir

    def forward_socket(self, local: str, remote: str) -> None:
        """Make the Unix socket `local` here (bound by ssh, 0600) reach the Unix socket
        `remote` on the target, through the master connection (`ssh -O forward -L`). The
        target's sshd is asked only when something connects: a refusal shows as that
        connection closing at once."""
        out = self._control_command("forward", local, remote)
        if out.returncode != 0:
            raise errors.PageChannelError(
                f"ssh cannot forward the page channel to {self.target}: "
                f"{out.stderr.decode(errors='replace').strip() or f'exit status {out.returncode}'}",
                host=str(self.target),
                hint="the target's sshd must allow forwarding Unix sockets "
                "(AllowStreamLocalForwarding yes or local)",
            )

    def cancel_socket_forward(self, local: str, remote: str) -> None:
        """Close the local end of a forward_socket() (connections made through it stay).
        Best effort: a master that is gone has closed it anyway."""
        try:
            self._control_command("cancel", local, remote)
        except (OSError, subprocess.TimeoutExpired):
            pass

    def _control_command(
        self, command: str, local: str, remote: str
    ) -> "subprocess.CompletedProcess[bytes]":
        return subprocess.run(
            [*self._base, "-O", command, "-L", f"{local}:{remote}", "--", self.target.host],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=30,
        )

    @property
    def alive(self) -> bool:
        """True while the master connection runs."""
        return self._master is not None and self._master.poll() is None

    def close(self) -> None:
        """End the master connection (and with it every session on it). Idempotent."""
        if self._master is not None:
            if self._master.poll() is None:
                self._master.terminate()
                try:
                    self._master.wait(5)
                except subprocess.TimeoutExpired:
                    self._master.kill()
                    self._master.wait()
            if self._master.stderr:
                self._master.stderr.close()
            self._master = None
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "SshConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connection_error(target: SshTarget, stderr: str) -> errors.MigrationError:
    """The error for an ssh that could not connect, from what ssh printed."""
    text = stderr.strip().splitlines()
    detail = text[-1] if text else "ssh exited"
    if "Permission denied" in stderr:
        return errors.SshAuthError(
            f"ssh to {target} refused our key: {detail}",
            host=str(target),
            hint=f"set up key authentication first: `ssh-copy-id {target}` (pycpt never asks "
            "for a password)",
        )
    if "Host key verification failed" in stderr or "HOST IDENTIFICATION HAS CHANGED" in stderr:
        return errors.SshAuthError(
            f"ssh to {target}: the host key is unknown or changed: {detail}",
            host=str(target),
            hint=f"check the host's key and add it to known_hosts (`ssh {target} true` once)",
        )
    return errors.HostUnreachableError(
        f"cannot reach {target} over ssh: {detail}", host=str(target)
    )
