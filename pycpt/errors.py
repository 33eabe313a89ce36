"""The exceptions pycpt raises: one base, PycptError, and a subclass per known failure."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple


class PycptError(Exception):
    """Base of every pycpt error. `hint` says what to do about it."""

    hint: str = ""

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        if hint:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InvalidArgumentError(PycptError, ValueError):
    """An argument pycpt was given is not valid (a bad container id, an unknown CRIU
    option, a command given as one string...). Also a ValueError, so `except ValueError`
    still catches it; the command line exits with status 2 for it."""


# --- the CRIU engine -------------------------------------------------------------------


class EngineError(PycptError):
    """No usable CRIU: missing, too old, or failing on this kernel.

    Keeps `path` (the criu binary), `source` (where it was found), `version` (a tuple, or
    None) and `output` (what criu or apt printed).
    """

    def __init__(
        self,
        message: str,
        *,
        hint: str = "",
        path: Optional[str] = None,
        source: str = "",
        version: Optional[Tuple[int, ...]] = None,
        output: str = "",
    ) -> None:
        self.path = path
        self.source = source
        self.version = version
        self.output = output
        super().__init__(message, hint=hint)


class CriuNotFoundError(EngineError):
    """No CRIU binary was found."""

    hint = "run `pycpt engine install` (or set PYCPT_CRIU to a criu binary)"


class CriuTooOldError(EngineError):
    """The CRIU found is older than pycpt supports."""

    hint = "run `pycpt engine install` to get a CRIU >= 4.2 next to the system one"


class CriuBrokenError(EngineError):
    """CRIU is there but does not run (or fails its check) on this kernel."""

    hint = "run `pycpt engine install` for a CRIU that works here, and `pycpt check` for details"


# --- CRIU requests -----------------------------------------------------------------------


class CriuError(PycptError):
    """A CRIU request failed.

    Keeps the request type, CRIU's errno and `cr_errmsg`, the error lines of CRIU's log and
    the log's path.
    """

    hint = "read the CRIU log named above for the full story"

    def __init__(
        self,
        message: str,
        *,
        request: str = "",
        errno: Optional[int] = None,
        cr_errmsg: str = "",
        log_lines: Sequence[str] = (),
        log_path: Optional[str] = None,
        hint: str = "",
    ) -> None:
        self.request = request
        self.errno = errno
        self.cr_errmsg = cr_errmsg
        self.log_lines = list(log_lines)
        self.log_path = log_path
        super().__init__(message, hint=hint)

    def __str__(self) -> str:
        parts = [self.message]
        if self.cr_errmsg:
            parts.append(f"  criu: {self.cr_errmsg}")
        # cr_errmsg is often the log's first error line as well: say it once
        for line in [ln for ln in self.log_lines if ln != self.cr_errmsg][-8:]:
            parts.append(f"  log: {line}")
        if self.log_path:
            parts.append(f"  full log: {self.log_path}")
        if self.hint:
            parts.append(f"  hint: {self.hint}")
        return "\n".join(parts)


class CriuConnectionError(CriuError):
    """The `criu swrk` process died or closed the connection before answering."""

    hint = "CRIU crashed or was killed; see its stderr above and run `pycpt check`"


class SoftDirtyUnsupportedError(CriuError):
    """Pre-dump and memory tracking need the kernel's soft-dirty bits (CONFIG_MEM_SOFT_DIRTY)."""

    hint = (
        "this kernel is built without CONFIG_MEM_SOFT_DIRTY: use a full dump (no pre_dump, "
        "no track_mem), or a kernel with soft-dirty support"
    )


class NetworkLockError(CriuError):
    """CRIU could not lock the network of the tree (usually: no iptables binary)."""

    hint = "pass network_lock='nftables' (or install iptables); `pycpt check` shows what works"


class PidInUseError(CriuError):
    """A pid the image needs is taken on this host (often by the process just dumped)."""

    hint = (
        "the pid is still taken (a killed process may not be reaped yet): wait and retry, "
        "restore with rst_sibling=True, or run the workload in its own pid namespace"
    )


class InetSocketError(CriuError):
    """CRIU < 4.2 cannot dump AF_INET sockets on this kernel."""

    hint = "run `pycpt engine install` to get CRIU >= 4.2, which dumps AF_INET sockets here"


class PipeSizeError(CriuError):
    """Lazy pages need pipes bigger than fs.pipe-max-size allows."""

    hint = "raise the limit: sysctl -w fs.pipe-max-size=4194304"


class SessionLeaderError(CriuError):
    """The tree's session leader lives outside the dumped pid namespace."""

    hint = (
        "make the workload's root a session leader inside its pid namespace (setsid), "
        "or pass shell_job=True for a tree started from a terminal"
    )


class ImagesDirError(PycptError):
    """The images (or work) directory cannot be used."""


class ProcessNotFoundError(PycptError):
    """The pid to act on (`pid`) does not exist."""

    hint = "check the pid (ps -p PID); the process may have exited"

    def __init__(self, message: str, *, pid: Optional[int] = None, hint: str = "") -> None:
        self.pid = pid
        super().__init__(message, hint=hint)


class PrivilegeError(PycptError):
    """pycpt lacks a privilege the operation needs."""

    hint = "run as root"


# --- the freezer -----------------------------------------------------------------------


class FreezerError(PycptError):
    """A cgroup freezer operation failed. `path` is the cgroup directory."""

    def __init__(self, message: str, *, path: Optional[str] = None, hint: str = "") -> None:
        self.path = path
        super().__init__(message, hint=hint)


class FreezeTimeoutError(FreezerError):
    """The cgroup did not reach the wanted state in time; it was put back as it was.

    Keeps `path`, `operation` ("freeze", "thaw" or "kill"), `timeout` (seconds) and `state`,
    the freezer state read after the rollback.
    """

    hint = (
        "a task may be stuck in the kernel (state D) or the cgroup keeps gaining tasks; "
        "retry with a longer timeout"
    )

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        operation: str = "",
        timeout: Optional[float] = None,
        state: object = None,
        hint: str = "",
    ) -> None:
        self.operation = operation
        self.timeout = timeout
        self.state = state
        super().__init__(message, path=path, hint=hint)


# --- containers ------------------------------------------------------------------------


class ContainerError(PycptError):
    """A container operation failed or does not fit the container's state."""


class ContainerNotFoundError(ContainerError):
    """No container with this id."""

    hint = "`pycpt list` shows the containers; `pycpt start CT -- CMD` makes one"


class ContainerStateError(ContainerError):
    """The step asked for does not fit what the container is doing; nothing was changed."""


class ContainerBusyError(ContainerError):
    """Another pycpt command holds the container's lock."""

    hint = "wait for the other command to finish, then retry"


class NetworkHoldError(ContainerError):
    """The container's network hold (nf_tables table `inet pycpt-hold` in its network
    namespace) could not be switched on or off. `pid` is the process whose namespace it is,
    `errno` the kernel's error."""

    hint = "`pycpt check` says whether nf_tables works here (the hold needs it)"

    def __init__(
        self, message: str, *, pid: Optional[int] = None, errno: int = 0, hint: str = ""
    ) -> None:
        super().__init__(message, hint=hint)
        self.pid = pid
        self.errno = errno


class CriuOptionError(InvalidArgumentError):
    """A CRIU option given to a container verb is unknown, malformed, out of range, meant
    for the other step (dump or restore), or one that pycpt sets itself."""

    hint = "see `pycpt chkpnt --help`; --criu-opt takes NAME=VALUE with CRIU's option names"


class NicError(ContainerError):
    """A container's network interface (a veth pair on a host bridge, `--net`) could not be
    made, held, moved or removed. Keeps `nic` (the container's interface name, or "")."""

    hint = "`ip -d link show` and `bridge link` show the host's bridges and ports"

    def __init__(self, message: str, *, nic: str = "", hint: str = "") -> None:
        self.nic = nic
        super().__init__(message, hint=hint)


class NetSpecError(NicError, ValueError):
    """A `--net` specification (or NetSpec) is malformed: an unknown key, a bad address,
    prefix, gateway, MAC, name or MTU. Nothing was started."""

    hint = (
        "write it as bridge=BR,ip=ADDR/PREFIX[,ip=...][,gw=GW][,mac=MAC][,name=eth0]"
        "[,mtu=N] (ip6= and gw6= take IPv6 ones)"
    )


class BridgeError(NicError, ValueError):
    """The host bridge named for a NIC is missing, is not a bridge, is down, or runs the
    kernel's STP (which owns its ports' states). Keeps `bridge`."""

    def __init__(self, message: str, *, bridge: str = "", nic: str = "", hint: str = "") -> None:
        self.bridge = bridge
        super().__init__(message, nic=nic, hint=hint)


class AddressInUseError(NicError, ValueError):
    """An address given to a container is in use already: by this host, by another pycpt
    container here, or by whatever answered the duplicate-address probe on the bridge's
    segment. Keeps `address`, `owner` (a MAC, a container id or "this host") and `bridge`."""

    hint = "choose a free address (or stop whatever holds it)"

    def __init__(
        self, message: str, *, address: str = "", owner: str = "", bridge: str = "", hint: str = ""
    ) -> None:
        self.address = address
        self.owner = owner
        self.bridge = bridge
        super().__init__(message, hint=hint)


class StateDirError(ContainerError):
    """The state directory cannot be used: it (or a parent) could be changed by someone
    other than root, it is on a read-only file system, or it cannot be read. Nothing was
    written. `path` is the offending path."""

    hint = "fix the state directory's ownership and mode, or choose another --state-dir"

    def __init__(self, message: str, *, path: Optional[str] = None, hint: str = "") -> None:
        self.path = path
        super().__init__(message, hint=hint)


class StateTamperedError(StateDirError):
    """A record under the state directory is not what pycpt wrote: a symlink, a file of
    another owner or mode, a cgroup outside this host's PYCPT_CGROUP_PARENT, a pid that is
    another process. Nothing was killed or removed on its word."""

    hint = (
        "inspect it by hand: pycpt does not act on a record it cannot trust "
        "(if PYCPT_CGROUP_PARENT changed since the container started, set it back)"
    )


# --- the dump file -----------------------------------------------------------------------


class DumpFileError(PycptError):
    """A dump file cannot be written or read. `path` is the dump file."""

    hint = "check the dump file's path, the free space and the permissions of its directory"
    errno: Optional[int] = None  # the file system's errno, when it is what failed

    def __init__(self, message: str, *, path: Optional[str] = None, hint: str = "") -> None:
        self.path = path
        super().__init__(message, hint=hint)


class NoSpaceError(DumpFileError):
    """The dump file's file system has no room left (or the quota is used up): the error
    names the file system, the space the dump would need and the space there is. The
    container was not touched (it runs on, or stays suspended)."""

    hint = "free some space there, or give --dumpfile on a file system with room"


class DumpFileLocationError(DumpFileError):
    """The dump file lies where someone other than root could replace, change or remove
    it (its owner or mode, or a directory above it): refused, as it could take away or
    swap the only copy of a container."""

    hint = (
        "keep dump files in directories only root can write (a sticky one such as /tmp "
        "will do), owned by root, mode 0600"
    )


class DumpFileNotFoundError(DumpFileError):
    """There is no dump file at `path`."""

    hint = (
        "check the path; `pycpt chkpnt CT` writes <state dir>/dump/Dump.CT unless --dumpfile "
        "says otherwise"
    )


class DumpFileCorruptError(DumpFileError):
    """The dump file is damaged: truncated, a part's size or SHA-256 differs, an unreadable
    archive or a bad manifest. Nothing is restored from it."""

    hint = (
        "the file is damaged (an interrupted copy, a disk error): use another copy of it or "
        "checkpoint again"
    )


class DumpFileForeignError(DumpFileError):
    """The file is not a pycpt dump file (a plain tar, some other file, a directory)."""

    hint = "this is not a file written by `pycpt chkpnt`: check the --dumpfile path"


class DumpFileTooNewError(DumpFileError):
    """The dump file has a newer format than this pycpt reads.

    Keeps `format_version` (the file's) and `supported` (the newest this pycpt reads).
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        format_version: int = 0,
        supported: int = 0,
        hint: str = "",
    ) -> None:
        self.format_version = format_version
        self.supported = supported
        super().__init__(
            message,
            path=path,
            hint=hint
            or (
                f"upgrade pycpt: this file has dump format {format_version}, this pycpt reads "
                f"formats up to {supported}"
            ),
        )


class DumpFileUntrustedError(DumpFileError):
    """The dump file is intact, but its signature is not by this host's key nor by a key in
    this host's trusted keys (`pycpt key trust`). Nothing of it was read beyond its manifest.

    Keeps `key_line` (the signer's public key line, "" when unsigned) and `fingerprint`.
    """

    def __init__(
        self,
        message: str,
        *,
        path: Optional[str] = None,
        key_line: str = "",
        fingerprint: str = "",
        hint: str = "",
    ) -> None:
        self.key_line = key_line
        self.fingerprint = fingerprint
        super().__init__(
            message,
            path=path,
            hint=hint
            or (
                "if you trust the host that made it, run `pycpt key trust "
                f"'{key_line or 'ITS KEY LINE'}'` here (`pycpt key show` prints it there); "
                "or restore with --trust-dumpfile, which is dangerous: it runs whatever the "
                "file holds as root"
            ),
        )


class DumpFileUnsignedError(DumpFileUntrustedError):
    """The dump file carries no signature at all (format 1, written by an older pycpt)."""

    hint = (
        "restore it with --trust-dumpfile only if you vouch for where it comes from (it runs "
        "as root whatever the file holds); pycpt writes signed files (format 2) only"
    )

    def __init__(self, message: str, *, path: Optional[str] = None, hint: str = "") -> None:
        super().__init__(message, path=path, hint=hint or self.hint)


class DumpFileRefusedError(DumpFileError):
    """The dump file is intact (and trusted or vouched for), but what it would restore breaks
    one of pycpt's rules: a task in the host's namespaces or outside the container's cgroup,
    a config key that is unknown, internal or out of range, images that cannot be read.
    Nothing of it ran. `rule` names the rule ("namespaces", "cgroup", "config", "images")."""

    hint = (
        "pycpt restores containers only: their tasks in namespaces and a cgroup of their own, "
        "with a config it knows; this file was not written by `pycpt chkpnt`, or was forged"
    )

    def __init__(
        self, message: str, *, path: Optional[str] = None, rule: str = "", hint: str = ""
    ) -> None:
        self.rule = rule
        super().__init__(message, path=path, hint=hint)


class ConfigSchemaError(PycptError, ValueError):
    """A container config (from a dump file's manifest or a migration peer) does not fit the
    schema: an unknown or internal key, a wrong type, a value out of range. `key` names it."""

    hint = "the config was not written by this version of pycpt, or was forged"

    def __init__(self, message: str, *, key: str = "", hint: str = "") -> None:
        self.key = key
        super().__init__(message, hint=hint)


# --- keys ---------------------------------------------------------------------------------


class HostKeyError(PycptError):
    """This host's signing key or its trusted keys cannot be used: a key file with loose
    permissions or another owner, a damaged key, a file that cannot be written. `path`
    names the file."""

    hint = "check <state dir>/keys: owned by root, the directory 0700, host_ed25519 0600"

    def __init__(self, message: str, *, path: Optional[str] = None, hint: str = "") -> None:
        self.path = path
        super().__init__(message, hint=hint)


class KeyLineError(HostKeyError, ValueError):
    """A public key given to `pycpt key trust` is not a valid pycpt key line."""

    hint = (
        "give the line `pycpt key show` prints on the other host (`pycpt-ed25519 BASE64 "
        "COMMENT`), or a file holding exactly that line"
    )


# --- migration ---------------------------------------------------------------------------


class MigrationError(PycptError):
    """A migration failed. Unless the message says otherwise, the source container runs on
    as before and the target holds nothing of it. `stage` is where it failed."""

    hint = "the source container runs on unchanged; fix the cause and migrate again"

    def __init__(self, message: str, *, stage: str = "", host: str = "", hint: str = "") -> None:
        self.stage = stage
        self.host = host
        super().__init__(message, hint=hint)


class ChannelClosed(MigrationError):
    """The other side of a migration went away (its process died or the connection broke)."""


class HostUnreachableError(MigrationError):
    """ssh could not reach the target host (down, wrong address or port, no sshd)."""

    hint = "check the host name and port, that sshd runs there, and `ssh HOST true` by hand"


class SshAuthError(MigrationError):
    """ssh reached the host but key authentication failed (pycpt never prompts)."""


class TargetIncompatibleError(MigrationError):
    """The target cannot take the container: pycpt or CRIU missing or too old there, another
    CPU, not enough space or memory, a missing kernel feature."""


class TargetContainerExistsError(MigrationError):
    """The target already has a container with this id."""

    hint = (
        "remove it on the target (`pycpt rm CT` run there), or migrate to another host; if "
        "the target named is this host and state directory, CT is there already: a "
        "container cannot migrate onto itself"
    )


class MigrationInDoubtError(MigrationError):
    """The target was told to run the container, and now cannot be asked whether it runs it
    (the connection broke, the host is down). The source keeps its copy frozen (never two
    copies running) and records the migration; `decides` is the command that settles it
    once the target can be reached (`pycpt migrate --abort CT` on the source)."""

    hint = (
        "the copy here stays frozen; once the target can be reached, `pycpt migrate --abort CT` "
        "here asks it and resumes the container here, or ends this copy if the target runs it"
    )

    def __init__(
        self,
        message: str,
        *,
        stage: str = "",
        host: str = "",
        hint: str = "",
        decides: str = "",
    ) -> None:
        self.decides = decides
        super().__init__(message, stage=stage, host=host, hint=hint)


class MigrationProtocolError(MigrationError):
    """A migration message broke the protocol: an unknown operation, a missing or unknown
    field, a value of the wrong type or out of range. Nothing of it was used."""

    hint = "install the same pycpt version on both hosts"


class PageChannelError(MigrationError):
    """The page channel (the one connection between the two hosts' CRIUs, a Unix socket
    forwarded by the migration's ssh connection) could not be made or did not prove the
    migration's key. Raised before anything is frozen."""


class PageChannelRefusedError(PageChannelError):
    """The target's sshd would not forward the page channel's Unix socket (its
    AllowStreamLocalForwarding is `no` or `remote`)."""

    hint = (
        "allow it in the target's sshd_config: `AllowStreamLocalForwarding yes` (or `local`), "
        "then reload sshd"
    )


class PeerSilentError(ChannelClosed):
    """Nothing came from the other side of a migration for longer than the heartbeat
    timeout: the link is cut, or that host or its pycpt hangs."""


# --- CRIU images (pycpt.images) ------------------------------------------------------------


class ImageError(PycptError):
    """A CRIU image (or the container it came in) is malformed or cannot be read.

    `file` names the image (or dump file), `offset` is where in it the problem is (None when
    it is not about one place). Like DumpFileCorruptError, it is about the data, not about
    the arguments: not a ValueError (`pycpt inspect` exits with 1, not 2).
    """

    hint = "the images are damaged or were not written by CRIU >= 4.2"

    def __init__(
        self, message: str, *, file: str = "", offset: Optional[int] = None, hint: str = ""
    ) -> None:
        self.file = file
        self.offset = offset
        where = f"{file}" + (f" at offset {offset}" if offset is not None else "")
        super().__init__(f"{where}: {message}" if where else message, hint=hint)
