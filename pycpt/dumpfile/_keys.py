"""This host's signing key and the keys it trusts, in `<state dir>/keys/` (root's, 0700):

    host_ed25519       this host's Ed25519 private key (PKCS#8 PEM), made on first use, 0600
    host_ed25519.pub   its public key line, for copying to other hosts, 0644
    trusted_keys       other hosts' public key lines, one a line (`#` comments), 0600

A key line is `pycpt-ed25519 <base64 of the 32 raw bytes> [comment]`, in the spirit of ssh's
authorized_keys; the type word is not `ssh-ed25519`, so that these keys are never mistaken
for ssh keys either way. A dump file is accepted when its manifest's signature verifies
against this host's key or a trusted one. Every file here is opened relative to the
directory's descriptor without following links, and refused when someone other than its
owner (root) could have written it, as sshd's StrictModes does.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import fcntl
import hashlib
import json
import os
import secrets
import stat
from typing import Dict, Iterator, Optional, Tuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from pycpt import errors
from pycpt._sys.state import state_dir
from pycpt._typing import PathLike

KEY_TYPE = "pycpt-ed25519"
HOST_KEY = "host_ed25519"
HOST_PUB = "host_ed25519.pub"
TRUSTED_KEYS = "trusted_keys"
# what the host key signs is prefixed with this, so that a signature made for one use (a
# dump file's manifest) can never be taken for another (a later signed message)
SIGNATURE_CONTEXT = b"pycpt dump file format 2 manifest\0"
MAX_SIGNATURE = 4096
_MAX_KEY_FILE = 1 << 20
_RAW = 32


def fingerprint(raw: bytes) -> str:
    """`SHA256:<base64>` of a raw public key, as ssh-keygen -l prints its keys."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(raw).digest()).decode().rstrip("=")


def key_line(raw: bytes, comment: str = "") -> str:
    """The one-line form of a raw public key."""
    return f"{KEY_TYPE} {base64.b64encode(raw).decode()} {comment}".rstrip()


def parse_key_line(line: str) -> Tuple[bytes, str]:
    """(raw public key, comment) of a key line; KeyLineError says what is wrong with it."""
    if not isinstance(line, str):
        raise errors.KeyLineError(f"a key line is text, not {type(line).__name__}")
    words = line.strip().split(None, 2)
    if not words or words[0] != KEY_TYPE:
        raise errors.KeyLineError(f"not a {KEY_TYPE} key line: {line.strip()[:60]!r}")
    if len(words) < 2:
        raise errors.KeyLineError("the key line has no key after its type")
    try:
        raw = base64.b64decode(words[1], validate=True)
    except (binascii.Error, ValueError):
        raise errors.KeyLineError("the key is not valid base64") from None
    if len(raw) != _RAW:
        raise errors.KeyLineError(f"the key has {len(raw)} bytes; an Ed25519 key has {_RAW}")
    try:
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise errors.KeyLineError(f"the key is not an Ed25519 public key: {exc}") from None
    comment = words[2].strip() if len(words) > 2 else ""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in comment):
        raise errors.KeyLineError("the key line's comment holds control characters")
    return raw, comment


def raw_public(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw bytes of a private key's public half."""
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def sign(key: Ed25519PrivateKey, manifest: bytes) -> bytes:
    """The `manifest.sig` member for `manifest` (the exact bytes of manifest.json)."""
    data = {
        "alg": "ed25519",
        "key": key_line(raw_public(key)),
        "signature": base64.b64encode(key.sign(SIGNATURE_CONTEXT + manifest)).decode(),
    }
    return json.dumps(data, sort_keys=True).encode() + b"\n"


def check_signature(signature: bytes, manifest: bytes) -> Tuple[bytes, bool]:
    """(the signer's raw key, whether the signature verifies over `manifest`) of a
    `manifest.sig` member; ValueError when the member itself is malformed."""
    if len(signature) > MAX_SIGNATURE:
        raise ValueError(f"its signature member has {len(signature)} bytes")
    try:
        data = json.loads(signature.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ValueError("its signature member is not JSON text") from None
    if not isinstance(data, dict) or set(data) != {"alg", "key", "signature"}:
        raise ValueError("its signature member does not hold exactly alg, key and signature")
    if data["alg"] != "ed25519":
        raise ValueError(f"its signature has an unknown algorithm {str(data['alg'])[:40]!r}")
    if not isinstance(data["key"], str) or not isinstance(data["signature"], str):
        raise ValueError("its signature's key or signature is not text")
    try:
        raw, _ = parse_key_line(data["key"])
    except errors.KeyLineError as exc:
        raise ValueError(f"its signature names a bad key: {exc.message}") from None
    try:
        sig = base64.b64decode(data["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("its signature is not valid base64") from None
    if len(sig) != 64:
        raise ValueError(f"its signature has {len(sig)} bytes; Ed25519's has 64")
    try:
        Ed25519PublicKey.from_public_bytes(raw).verify(sig, SIGNATURE_CONTEXT + manifest)
    except InvalidSignature:
        return raw, False
    return raw, True


class Keys:
    """The key store of one state directory (default: $PYCPT_STATE_DIR or /var/lib/pycpt)."""

    def __init__(self, state_dir_path: Optional[PathLike] = None) -> None:
        self.dir = state_dir(os.fspath(state_dir_path) if state_dir_path else None) / "keys"
        self._host: Optional[Ed25519PrivateKey] = None

    # --- this host's key -----------------------------------------------------------------

    def host_key(self) -> Ed25519PrivateKey:
        """This host's private key, made on first use."""
        if self._host is None:
            with self._dirfd(create=True) as dfd:
                try:
                    self._host = self._load_host_key(dfd)
                except FileNotFoundError:
                    self._host = self._make_host_key(dfd)
        return self._host

    def _existing_host_key(self) -> Optional[Ed25519PrivateKey]:
        """This host's key if it has one (nothing is made)."""
        if self._host is None:
            if not os.path.isdir(self.dir):
                return None
            with self._dirfd(create=False) as dfd:
                try:
                    self._host = self._load_host_key(dfd)
                except FileNotFoundError:
                    return None
        return self._host

    def public_line(self) -> str:
        """This host's public key line (`pycpt key show`), made on first use."""
        return key_line(raw_public(self.host_key()), f"root@{os.uname().nodename}")

    def _load_host_key(self, dfd: int) -> Ed25519PrivateKey:
        path = str(self.dir / HOST_KEY)
        data = self._read(dfd, HOST_KEY, private=True)
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise errors.HostKeyError(
                f"this host's key {path} cannot be read: {exc}",
                path=path,
                hint="restore it from a backup; removing it makes a new key, and then every "
                "host that trusted the old one must trust the new one",
            ) from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise errors.HostKeyError(f"this host's key {path} is not an Ed25519 key", path=path)
        return key

    def _make_host_key(self, dfd: int) -> Ed25519PrivateKey:
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        line = key_line(raw_public(key), f"root@{os.uname().nodename}") + "\n"
        tmp = self._write_temp(dfd, pem, 0o600)
        try:
            # link, not rename: of two pycpts making the key at once, the second finds the
            # first's and uses it, instead of replacing a key someone may have signed with
            os.link(tmp, HOST_KEY, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            return self._load_host_key(dfd)
        except OSError as exc:
            raise self._write_error(HOST_KEY, exc) from exc
        finally:
            os.unlink(tmp, dir_fd=dfd)
        self._replace(dfd, HOST_PUB, line.encode(), 0o644)
        return key

    # --- trusted keys --------------------------------------------------------------------

    def trusted(self, create: bool = True) -> Dict[bytes, str]:
        """Every key a dump file may be signed with here, raw key -> comment: this host's
        own ("this host"; made on first use unless create=False) and each valid line of
        trusted_keys (invalid lines grant nothing and are skipped, as sshd does with
        authorized_keys)."""
        host = self.host_key() if create else self._existing_host_key()
        keys = {raw_public(host): "this host"} if host is not None else {}
        if not create and not os.path.isdir(self.dir):
            return keys
        with self._dirfd(create=False) as dfd:
            try:
                text = self._read(dfd, TRUSTED_KEYS, private=False).decode("utf-8", "replace")
            except FileNotFoundError:
                return keys
        for line in text.splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                try:
                    raw, comment = parse_key_line(line)
                except errors.KeyLineError:
                    continue
                keys.setdefault(raw, comment or fingerprint(raw))
        return keys

    def trust(self, key: str) -> Tuple[bool, str]:
        """`pycpt key trust FILE|LINE`: add a key line (or the one key line in file `key`) to
        trusted_keys. Returns (added, the line as trusted); added is False when the key was
        trusted already (nothing is written then)."""
        if not isinstance(key, str) or not key.strip():
            raise errors.KeyLineError("give a key line or a file holding one")
        line = key.strip() if key.split()[0] == KEY_TYPE else _line_of_file(key)
        raw, comment = parse_key_line(line)
        clean = key_line(raw, comment)
        with self._dirfd(create=True) as dfd, _flock(dfd):
            if raw == raw_public(self.host_key()):
                return False, clean
            try:
                old = self._read(dfd, TRUSTED_KEYS, private=False)
            except FileNotFoundError:
                old = b""
            for existing in old.decode("utf-8", "replace").splitlines():
                try:
                    if parse_key_line(existing)[0] == raw:
                        return False, existing.strip()
                except errors.KeyLineError:
                    continue
            if old and not old.endswith(b"\n"):
                old += b"\n"
            self._replace(dfd, TRUSTED_KEYS, old + clean.encode() + b"\n", 0o600)
        return True, clean

    # --- files, relative to the keys directory's descriptor ------------------------------

    @contextlib.contextmanager
    def _dirfd(self, create: bool) -> Iterator[int]:
        fd = self._open_dir(create)
        try:
            yield fd
        finally:
            os.close(fd)

    def _open_dir(self, create: bool) -> int:
        path = str(self.dir)
        if create:
            try:
                os.makedirs(self.dir.parent, mode=0o700, exist_ok=True)
                os.mkdir(self.dir, 0o700)
            except FileExistsError:
                pass
            except OSError as exc:
                raise errors.HostKeyError(
                    f"cannot create {path}: {exc.strerror}", path=path
                ) from exc
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ENOENT and not create:
                return self._open_dir(create=True)
            raise errors.HostKeyError(
                f"cannot open {path}: {exc.strerror}"
                + (" (a link? it must be a directory)" if exc.errno == errno.ENOTDIR else ""),
                path=path,
            ) from exc
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_mode & 0o022:
            os.close(fd)
            raise errors.HostKeyError(
                f"{path} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):o}: "
                "someone else could replace the keys in it",
                path=path,
                hint=f"chown root {path} && chmod 700 {path}",
            )
        return fd

    def _read(self, dfd: int, name: str, private: bool) -> bytes:
        path = str(self.dir / name)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise errors.HostKeyError(f"cannot open {path}: {exc.strerror}", path=path) from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(fd)
            loose = st.st_mode & (0o077 if private else 0o022)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or loose:
                raise errors.HostKeyError(
                    f"{path} is not a regular file owned by uid {os.geteuid()} and writable "
                    f"by it alone{' and readable by it alone' if private else ''} "
                    f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})",
                    path=path,
                    hint=f"chown root {path} && chmod {'600' if private else 'go-w'} {path}",
                )
            data = f.read(_MAX_KEY_FILE + 1)
        if len(data) > _MAX_KEY_FILE:
            raise errors.HostKeyError(f"{path} is larger than {_MAX_KEY_FILE} bytes", path=path)
        return data

    def _write_temp(self, dfd: int, data: bytes, mode: int) -> str:
        tmp = f".tmp.{secrets.token_hex(6)}"
        try:
            fd = os.open(
                tmp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode,
                dir_fd=dfd,
            )
        except OSError as exc:
            raise self._write_error(tmp, exc) from exc
        try:
            os.fchmod(fd, mode)  # exactly, whatever the umask took away
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except OSError as exc:
            os.unlink(tmp, dir_fd=dfd)
            raise self._write_error(tmp, exc) from exc
        finally:
            os.close(fd)
        return tmp

    def _replace(self, dfd: int, name: str, data: bytes, mode: int) -> None:
        tmp = self._write_temp(dfd, data, mode)
        try:
            os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
            os.fsync(dfd)
        except OSError as exc:
            try:
                os.unlink(tmp, dir_fd=dfd)
            except FileNotFoundError:
                pass
            raise self._write_error(name, exc) from exc

    def _write_error(self, name: str, exc: OSError) -> errors.HostKeyError:
        path = str(self.dir / name)
        return errors.HostKeyError(f"cannot write {path}: {exc.strerror}", path=path)


def _line_of_file(path: str) -> str:
    """The one key line in file `path` (blank lines and `#` comments aside)."""
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise errors.KeyLineError(
            f"{path[:200]!r} is neither a key line nor a readable file ({exc.strerror})"
        ) from exc
    if len(data) > _MAX_KEY_FILE:
        raise errors.KeyLineError(f"{path} is too big to hold one key line")
    lines = [
        line
        for line in data.decode("utf-8", "replace").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    if len(lines) != 1:
        raise errors.KeyLineError(f"{path} holds {len(lines)} key lines; give one at a time")
    return lines[0]


@contextlib.contextmanager
def _flock(fd: int) -> Iterator[None]:
    """flock() on a directory descriptor: one `key trust` rewrites trusted_keys at a time."""
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
