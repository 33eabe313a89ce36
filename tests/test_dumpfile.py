"""The dump file (format 2): round trips, signatures and trust, atomic writes, and every kind of
bad file, each refused with its own error before anything is used (no CRIU needed)."""

from __future__ import annotations

import datetime
import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import blake3
import pytest

import pycpt
from pycpt import dumpfile, errors
from pycpt.dumpfile import Keys, Manifest, Part, _format1, _keys, _tar, _writing

MIB = 1 << 20
CONFIG = {"id": "web1", "argv": ["nginx", "-g", "daemon off;"], "share_net": False}


@pytest.fixture(autouse=True)
def state(tmp_path_factory, monkeypatch) -> Path:
    """A state directory of its own (this host's keys), outside tmp_path."""
    path = tmp_path_factory.mktemp("state")
    monkeypatch.setenv("PYCPT_STATE_DIR", str(path))
    return path


def chunks_of(data: bytes) -> bytes:
    return b"".join(
        blake3.blake3(data[i : i + dumpfile.CHUNK_SIZE]).digest()
        for i in range(0, len(data), dumpfile.CHUNK_SIZE)
    )


def make_images(d: Path, sizes: Optional[Dict[str, int]] = None) -> Dict[str, bytes]:
    """A fake CRIU images dir (random bytes) plus things a dump must skip."""
    sizes = sizes or {
        "inventory.img": 36,
        "core-1.img": 5000,
        "pages-1.img": 3 * MIB + 123,
        "pagemap-1.img": 4096,
        "mm-1.img": 0,
    }
    d.mkdir(parents=True, exist_ok=True)
    data = {}
    for name, size in sizes.items():
        data[name] = os.urandom(size)
        (d / name).write_bytes(data[name])
    (d / "dump.log").write_text("(00.000) Dumping finished successfully\n")
    (d / "stats-dump").write_bytes(b"\x01\x02")
    (d / "subdir.img").mkdir()  # a directory named like an image is not an image
    (d / "link.img").symlink_to(d / "core-1.img")
    return data


@pytest.fixture
def images(tmp_path: Path) -> Dict[str, bytes]:
    return make_images(tmp_path / "img")


def write(tmp_path: Path, name: str = "Dump.CT", compress: Optional[str] = None, **kw) -> Path:
    path = tmp_path / name
    dumpfile.write_dump_file(
        path, tmp_path / "img", config=CONFIG, criu_version="4.2.1", compress=compress, **kw
    )
    return path


def listdir(d: Path) -> List[str]:
    return sorted(os.listdir(d)) if d.exists() else []


def extract_into(dest: Path) -> Callable[[Path], Manifest]:
    return lambda p: dumpfile.extract_dump_file(p, dest)


# --- round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [None, "gz", "xz"])
def test_round_trip(tmp_path, images, compress):
    before = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    path = tmp_path / "Dump.CT"
    written = dumpfile.write_dump_file(
        str(path), tmp_path / "img", config=CONFIG, criu_version="4.2.1", compress=compress
    )
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    m = dumpfile.read_manifest(path)
    assert m == written == dumpfile.verify_dump_file(path)
    assert m.format_version == dumpfile.FORMAT_VERSION == 2
    assert m.pycpt_version == pycpt.__version__
    assert m.criu_version == "4.2.1"
    assert m.kernel == os.uname().release
    assert m.host == os.uname().nodename
    assert m.config == CONFIG
    assert m.compression == compress
    assert m.hash == "blake3" and m.chunk_size == MIB
    created = datetime.datetime.fromisoformat(m.created)
    assert created.utcoffset() == datetime.timedelta(0)
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
    assert m.parts == [Part(n, len(images[n]), chunks_of(images[n])) for n in sorted(images)]
    assert Manifest.parse(m.to_bytes()) == m

    dest = tmp_path / "restore" / "images"
    (tmp_path / "restore").mkdir()
    assert dumpfile.extract_dump_file(path, dest) == m
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert listdir(dest) == sorted(images)  # no log, stats, directory or symlink
    for name, data in images.items():
        assert (dest / name).read_bytes() == data


def test_a_tar_tool_reads_it(tmp_path, images):
    """Packed compressed: marker, signed manifest, parts; uncompressed: marker, parts, signed
    manifest (written in one pass, the hashes known at the end)."""
    gz = write(tmp_path, compress="gz")
    with tarfile.open(gz) as tar:
        assert tar.getnames() == ["PYCPT-DUMP", "manifest.json", "manifest.sig", *sorted(images)]
        assert tar.extractfile("PYCPT-DUMP").read() == b"PYCPT-DUMP 2\n"
    plain = write(tmp_path, name="plain")
    with tarfile.open(plain) as tar:
        assert tar.getnames() == ["PYCPT-DUMP", *sorted(images), "manifest.json", "manifest.sig"]
        assert tar.extractfile("pages-1.img").read() == images["pages-1.img"]
        sig = json.loads(tar.extractfile("manifest.sig").read())
    assert sig["alg"] == "ed25519" and sig["key"] == " ".join(Keys().public_line().split()[:2])


def test_in_place_reads_check_every_chunk(tmp_path, images):
    path = write(tmp_path)
    with dumpfile.DumpFile.open(path) as df:
        assert df.signature.trusted and df.signature.comment == "this host"
        assert df.read_part("core-1.img") == images["core-1.img"]
        assert b"".join(bytes(c) for c in df.chunks("pages-1.img")) == images["pages-1.img"]
        held = df.read_small_parts()
        assert sorted(held) == sorted(n for n in images if not n.startswith("pages-"))
        raw = path.read_bytes()
        assert {n: raw[o : o + s] for n, (o, s) in df.offsets.items()} == images


def test_extract_into_an_existing_empty_dir(tmp_path, images):
    path = write(tmp_path)
    dest = tmp_path / "empty"
    dest.mkdir()
    dumpfile.extract_dump_file(path, dest)
    assert listdir(dest) == sorted(images)


def test_extract_refuses_a_dir_that_is_not_empty(tmp_path, images):
    path = write(tmp_path)
    dest = tmp_path / "full"
    dest.mkdir()
    (dest / "keep").write_text("mine")
    with pytest.raises(errors.ImagesDirError, match="not empty"):
        dumpfile.extract_dump_file(path, dest)
    assert listdir(dest) == ["keep"]


def test_extra_files_are_carried(tmp_path, images):
    path = write(tmp_path, extra_files=["dump.log", "stats-dump"])
    m = dumpfile.verify_dump_file(path)
    assert [p.name for p in m.parts] == sorted([*images, "dump.log", "stats-dump"])
    dest = tmp_path / "out"
    dumpfile.extract_dump_file(path, dest)
    assert (dest / "dump.log").read_text().startswith("(00.000) Dumping finished")


@pytest.mark.parametrize(
    "extra, exc",
    [
        (["missing.log"], errors.ImagesDirError),
        (["subdir.img"], errors.ImagesDirError),  # a directory
        (["../outside"], ValueError),
        (["manifest.json"], ValueError),
        (["manifest.sig"], ValueError),
        (["PYCPT-DUMP"], ValueError),
        ("dump.log", ValueError),  # a str, not a sequence of names
    ],
)
def test_bad_extra_files(tmp_path, images, extra, exc):
    with pytest.raises(exc):
        write(tmp_path, extra_files=extra)
    assert listdir(tmp_path) == ["img"]


@pytest.mark.parametrize(
    "kw",
    [
        {"compress": "bz2"},
        {"config": ["not", "a", "dict"]},
        {"config": {"a": {1, 2}}},  # not a config key
        {"config": {"id": float("nan")}},
        {"config": {"migration": "tok"}},  # internal: pycpt never signs it
        {"criu_version": 42},
        {"keys": "not keys"},
    ],
)
def test_bad_arguments_are_value_errors(tmp_path, images, kw):
    args = dict(config=CONFIG, criu_version="4.2.1")
    args.update(kw)
    with pytest.raises(ValueError):
        dumpfile.write_dump_file(tmp_path / "D", tmp_path / "img", **args)
    with pytest.raises(ValueError):
        dumpfile.read_manifest(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dumpfile.extract_dump_file(tmp_path / "D", None)  # type: ignore[arg-type]
    assert listdir(tmp_path) == ["img"]


def test_images_dir_problems(tmp_path):
    with pytest.raises(errors.ImagesDirError):
        dumpfile.write_dump_file(tmp_path / "D", tmp_path / "nope", config={}, criu_version="4.2")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "dump.log").write_text("x")
    with pytest.raises(errors.ImagesDirError, match="no CRIU images"):
        dumpfile.write_dump_file(tmp_path / "D", tmp_path / "empty", config={}, criu_version="4.2")
    assert not (tmp_path / "D").exists()


def test_target_problems(tmp_path, images):
    with pytest.raises(errors.DumpFileError, match="is a directory"):
        write(tmp_path, name="img")
    with pytest.raises(errors.DumpFileError, match="no directory"):
        write(tmp_path, name="missing/Dump.CT")


# --- atomic writes ---------------------------------------------------------------------------


def test_success_replaces_an_existing_file(tmp_path, images):
    path = tmp_path / "Dump.CT"
    path.write_bytes(b"old")
    path.chmod(0o644)
    write(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    dumpfile.verify_dump_file(path)
    assert listdir(tmp_path) == ["Dump.CT", "img"]


class _FailingImage(io.RawIOBase):
    """An image that fails (or is interrupted) after its first chunk."""

    def __init__(self, how: str) -> None:
        self.how = how
        self.calls = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        self.calls += 1
        if self.calls == 1:
            buf[: len(buf)] = bytes(len(buf))
            return len(buf)
        if self.how == "interrupt":
            raise KeyboardInterrupt
        raise errors.ImagesDirError("cannot read pages-1.img: Input/output error")


@pytest.mark.parametrize("compress", [None, "gz"])
@pytest.mark.parametrize("how", ["read", "write", "fsync", "interrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(
    tmp_path, images, monkeypatch, how, compress
):
    path = write(tmp_path)
    old = path.read_bytes()
    if how in ("read", "interrupt"):
        real_open = _writing._open_image
        monkeypatch.setattr(
            _writing,
            "_open_image",
            lambda src, name: _FailingImage(how) if name == "pages-1.img" else real_open(src, name),
        )
        exc_type = KeyboardInterrupt if how == "interrupt" else errors.ImagesDirError
    elif how == "write":
        monkeypatch.setattr(_writing, "_sync_parent", lambda t, p: None)

        def failing_rename(a, b):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(_writing.os, "rename", failing_rename)
        exc_type = errors.DumpFileError
    else:

        def failing_fsync(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(_writing.os, "fsync", failing_fsync)
        exc_type = errors.DumpFileError

    with pytest.raises(exc_type) as info:
        write(tmp_path, compress=compress)
    monkeypatch.undo()
    if exc_type is errors.DumpFileError:
        assert info.value.path == str(tmp_path / "Dump.CT")
        assert isinstance(info.value.__cause__, OSError)
        if how == "write":
            assert "free space" in info.value.hint
    assert path.read_bytes() == old
    assert listdir(tmp_path) == ["Dump.CT", "img"]  # no temporary file left


def test_an_image_that_changes_while_packed_compressed_fails(tmp_path, images, monkeypatch):
    """Compressed, each part is read twice (hashed, then compressed): a change in between
    is caught, not signed."""
    real_open = _writing._open_image
    opened: List[str] = []

    def changing(src: str, name: str):
        opened.append(name)
        if opened.count(name) == 2 and name == "core-1.img":
            (Path(src) / name).write_bytes(b"changed" * 100)
        return real_open(src, name)

    monkeypatch.setattr(_writing, "_open_image", changing)
    with pytest.raises(errors.ImagesDirError, match="changed while it was packed"):
        write(tmp_path, compress="gz")
    assert listdir(tmp_path) == ["img"]


# --- keys, signatures, trust -----------------------------------------------------------------


def test_keys_are_made_once_with_strict_modes(state):
    keys = Keys()
    line = keys.public_line()
    assert line.startswith("pycpt-ed25519 ") and line == Keys().public_line()
    d = state / "keys"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE((d / "host_ed25519").stat().st_mode) == 0o600
    assert (d / "host_ed25519.pub").read_text().strip() == line
    raw, comment = dumpfile.parse_key_line(line)
    assert len(raw) == 32 and comment.startswith("root@")


def test_a_loose_key_file_is_refused(state):
    Keys().public_line()
    (state / "keys" / "host_ed25519").chmod(0o644)
    with pytest.raises(errors.HostKeyError, match="readable by it alone"):
        Keys().public_line()
    (state / "keys" / "host_ed25519").chmod(0o600)
    (state / "keys").chmod(0o777)
    with pytest.raises(errors.HostKeyError, match="someone else could replace"):
        Keys().public_line()
    (state / "keys").chmod(0o700)


def test_a_linked_keys_dir_is_refused(state, tmp_path):
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (state / "keys").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(errors.HostKeyError, match="link"):
        Keys().public_line()


def test_trust_a_line_or_a_file(tmp_path):
    other = Keys(tmp_path / "other")
    line = other.public_line()
    keys = Keys()
    assert keys.trust(line) == (True, line)
    assert keys.trust(line)[0] is False  # a no-op the second time
    (tmp_path / "k.pub").write_text("# a comment\n\n" + Keys(tmp_path / "third").public_line())
    assert keys.trust(str(tmp_path / "k.pub"))[0] is True
    assert keys.trust(keys.public_line())[0] is False  # this host's own
    text = (keys.dir / "trusted_keys").read_text().splitlines()
    assert len(text) == 2 and text[0] == line
    assert stat.S_IMODE((keys.dir / "trusted_keys").stat().st_mode) == 0o600
    assert set(keys.trusted()) == {
        dumpfile.parse_key_line(x)[0] for x in [*text, keys.public_line()]
    }


@pytest.mark.parametrize(
    "bad, match",
    [
        ("pycpt-ed25519 abc", "base64"),
        ("pycpt-ed25519 " + "QUFB" * 8, "bytes"),
        ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHx", "neither a key line nor a readable file"),
        ("pycpt-ed25519", "no key"),
        ("", "give a key line"),
    ],
)
def test_bad_key_lines_are_refused(bad, match, state):
    with pytest.raises(errors.KeyLineError, match=match) as info:
        Keys().trust(bad)
    assert isinstance(info.value, ValueError)
    assert not (state / "keys" / "trusted_keys").exists()


def test_a_control_character_in_a_comment_is_refused(tmp_path):
    line = Keys(tmp_path / "o").public_line() + "\x1b[2J"
    with pytest.raises(errors.KeyLineError, match="control"):
        Keys().trust(line)


def test_a_file_signed_by_an_untrusted_key(tmp_path, images):
    other = Keys(tmp_path / "other-host")
    path = write(tmp_path, keys=other)
    for how in READERS:
        with pytest.raises(errors.DumpFileUntrustedError) as info:
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)
    e = info.value
    assert "not signed by a trusted key" in str(e) and e.fingerprint in str(e)
    assert e.key_line == " ".join(other.public_line().split()[:2])
    assert "pycpt key trust" in e.hint and "--trust-dumpfile" in e.hint
    # damage in the parts says nothing until the signer is trusted: untrusted wins
    info2 = dumpfile.signature_of(path)
    assert info2.signed and info2.valid and not info2.trusted
    assert "untrusted" in info2.describe()
    # the user's word (dangerous) lets it through; its hashes still count
    dumpfile.verify_dump_file(path, trust_dumpfile=True)
    Keys().trust(other.public_line())
    dumpfile.verify_dump_file(path)
    assert dumpfile.signature_of(path).comment == other.public_line().split(None, 2)[2]


def test_a_trusted_key_s_signature_over_other_bytes_is_damage(tmp_path, images):
    path = write(tmp_path)
    raw = bytearray(path.read_bytes())
    span = member_span(path, "manifest.json")
    text = bytes(raw[span.start : span.stop])
    forged = text.replace(b'"share_net": false', b'"share_net": true ')
    assert forged != text and len(forged) == len(text)
    raw[span.start : span.stop] = forged
    path.write_bytes(bytes(raw))
    with pytest.raises(errors.DumpFileCorruptError, match="signature .* does not match"):
        dumpfile.read_manifest(path)
    with pytest.raises(errors.DumpFileCorruptError):  # even for a file the user vouches for
        dumpfile.read_manifest(path, trust_dumpfile=True)


# --- format 1 (unsigned) --------------------------------------------------------------------


def build_format1(
    path: Path,
    members,
    *,
    compress: Optional[str] = None,
    manifest: Optional[dict] = None,
    parts: Optional[List[Tuple[str, int, str]]] = None,
) -> None:
    """A format 1 file as pycpt wrote them before format 2: marker, members, manifest last
    with a SHA-256 per part and a checksum over the manifest."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("PYCPT-DUMP")
        info.size = 13
        tar.addfile(info, io.BytesIO(b"PYCPT-DUMP 1\n"))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data))
        if parts is None:
            parts = [(i.name, len(d), hashlib.sha256(d).hexdigest()) for i, d in members]
        d = {
            "format_version": 1,
            "pycpt_version": "0.1.0",
            "criu_version": "4.2",
            "kernel": "6.1",
            "created": "2024-01-01T00:00:00+00:00",
            "config": {"id": "old"},
            "compression": compress,
            "parts": [{"name": n, "size": s, "sha256": h} for n, s, h in parts],
            **(manifest or {}),
        }
        d["checksum"] = "sha256:" + hashlib.sha256(_format1.canonical(d)).hexdigest()
        blob = json.dumps(d).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    data = buf.getvalue()
    path.write_bytes(gzip.compress(data) if compress == "gz" else data)


@pytest.mark.parametrize("compress", [None, "gz"])
def test_a_format_1_file_needs_the_callers_word(tmp_path, compress):
    path = tmp_path / "D"
    build_format1(
        path, [reg("inventory.img", b"i" * 700), reg("core-1.img", b"c")], compress=compress
    )
    for how in READERS:
        with pytest.raises(errors.DumpFileUnsignedError) as info:
            read_with(how, path, tmp_path)
        assert "format 1" in str(info.value) and "--trust-dumpfile" in str(info.value)
        assert "--trust-dumpfile" in info.value.hint
        assert isinstance(info.value, errors.DumpFileUntrustedError)
        assert_nothing_extracted(tmp_path)
    m = dumpfile.extract_dump_file(path, tmp_path / "dest", trust_dumpfile=True)
    assert m.format_version == 1 and m.config == {"id": "old"}
    assert (tmp_path / "dest" / "inventory.img").read_bytes() == b"i" * 700
    assert dumpfile.signature_of(path).describe() == "unsigned (format 1)"


def test_a_format_1_file_is_capped_by_its_manifest(tmp_path):
    """A member bigger than its manifest says stops the extraction before it is written."""
    path = tmp_path / "D"
    big = b"\0" * (4 * MIB)
    build_format1(
        path,
        [reg("inventory.img", b"i"), reg("pages-1.img", big)],
        compress="gz",
        parts=[("inventory.img", 1, hashlib.sha256(b"i").hexdigest())],
    )
    with pytest.raises(errors.DumpFileCorruptError, match="not in its manifest"):
        dumpfile.extract_dump_file(path, tmp_path / "dest", trust_dumpfile=True)
    assert_nothing_extracted(tmp_path)


def test_a_format_1_file_with_a_forged_config_is_refused(tmp_path):
    path = tmp_path / "D"
    build_format1(
        path,
        [reg("inventory.img", b"i")],
        manifest={"config": {"migration": "tok", "images": "/x", "made_root": "/y"}},
    )
    with pytest.raises(errors.DumpFileRefusedError, match="'images' is internal") as info:
        dumpfile.read_manifest(path, trust_dumpfile=True)
    assert info.value.rule == "config"


# --- bad files -------------------------------------------------------------------------------


READERS = ["read_manifest", "verify", "extract"]


def read_with(how: str, path: Path, tmp_path: Path) -> Manifest:
    if how == "read_manifest":
        return dumpfile.read_manifest(path)
    if how == "verify":
        return dumpfile.verify_dump_file(path)
    return dumpfile.extract_dump_file(path, tmp_path / "dest")


def assert_nothing_extracted(tmp_path: Path) -> None:
    assert not (tmp_path / "dest").exists()


def build_dump(
    path: Path,
    members,
    *,
    marker: bytes = b"PYCPT-DUMP 2\n",
    manifest: Optional[dict] = None,
    parts: Optional[List[Part]] = None,
    compress: Optional[str] = None,
    keys: Optional[Keys] = None,
) -> None:
    """A hand-made format 2 dump, signed by this host's key: marker, the given (header, data)
    members, a manifest listing `parts` (default: the members) with `manifest` merged into
    it. Uncompressed the manifest comes last, compressed it comes second."""
    if parts is None:
        parts = [Part(name, len(d), chunks_of(d)) for name, _, d in members]
    m = Manifest(
        2, "0.1.0", "4.2", "6.1", "2024-01-01T00:00:00+00:00", {}, parts, compress, host="h"
    )
    d = {**m.to_dict(), **(manifest or {})}
    raw = json.dumps(d).encode()
    meta = _tar.member("manifest.json", raw, 0) + _tar.member(
        "manifest.sig", _keys.sign((keys or Keys()).host_key(), raw), 0
    )
    body = b"".join(h + (d or b"") + bytes(_tar.padding(len(d or b""))) for _, h, d in members)
    head = _tar.member("PYCPT-DUMP", marker, 0) if marker else b""
    data = head + (meta + body if compress else body + meta)
    data += _tar.end(len(data))
    path.write_bytes(gzip.compress(data) if compress == "gz" else data)


def reg(name: str, data: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def member(name: str, data: bytes, size: Optional[int] = None) -> tuple:
    """(name, ustar header, data) of a regular member; `size` overrides the header's size."""
    return name, _tar.header(name, len(data) if size is None else size, 0), data


def special(info: tarfile.TarInfo) -> tuple:
    return info.name, info.tobuf(tarfile.USTAR_FORMAT), b""


@pytest.mark.parametrize("how", READERS)
def test_missing_file(tmp_path, how):
    with pytest.raises(errors.DumpFileNotFoundError) as info:
        read_with(how, tmp_path / "nope", tmp_path)
    assert info.value.path == str(tmp_path / "nope")
    assert "path" in info.value.hint
    assert_nothing_extracted(tmp_path)


@pytest.mark.parametrize("how", READERS)
def test_empty_file(tmp_path, how):
    (tmp_path / "D").write_bytes(b"")
    with pytest.raises(errors.DumpFileCorruptError, match="empty"):
        read_with(how, tmp_path / "D", tmp_path)
    assert_nothing_extracted(tmp_path)


@pytest.mark.parametrize("how", READERS)
def test_directory(tmp_path, how):
    (tmp_path / "D").mkdir()
    with pytest.raises(errors.DumpFileForeignError, match="is a directory"):
        read_with(how, tmp_path / "D", tmp_path)
    assert_nothing_extracted(tmp_path)


def test_a_symlink_is_not_followed(tmp_path, images):
    path = write(tmp_path)
    (tmp_path / "L").symlink_to(path)
    with pytest.raises(errors.DumpFileError, match="symbolic link"):
        dumpfile.read_manifest(tmp_path / "L")


def plain_tar(path: Path) -> None:
    with tarfile.open(path, "w") as tar:
        info, data = reg("core-1.img", b"x" * 1000)
        tar.addfile(info, io.BytesIO(data))


def gz_text(path: Path) -> None:
    path.write_bytes(gzip.compress(b"just a log\n" * 100))


def gz_tar(path: Path) -> None:
    with tarfile.open(path, "w:gz") as tar:
        info, data = reg("inventory.img", b"x" * 10)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("how", READERS)
@pytest.mark.parametrize(
    "make",
    [
        lambda p: p.write_bytes(os.urandom(100_000)),
        lambda p: p.write_bytes(b"PYCPX"),  # short, and not the start of a marker
        lambda p: p.write_text("#!/bin/sh\necho hello\n"),
        plain_tar,
        gz_text,
        gz_tar,
    ],
    ids=["random", "short", "script", "plain-tar", "gz-text", "gz-tar"],
)
def test_foreign_files(tmp_path, how, make):
    make(tmp_path / "D")
    with pytest.raises(errors.DumpFileForeignError, match="not a pycpt dump file") as info:
        read_with(how, tmp_path / "D", tmp_path)
    assert "--dumpfile" in info.value.hint
    assert_nothing_extracted(tmp_path)


@pytest.mark.parametrize("how", READERS)
def test_newer_format(tmp_path, how):
    """A format 3 may look different after its marker: said so at once."""
    path = tmp_path / "D"
    build_dump(path, [member("inventory.img", b"whatever")], marker=b"PYCPT-DUMP 3\n")
    with pytest.raises(errors.DumpFileTooNewError) as info:
        read_with(how, path, tmp_path)
    assert info.value.format_version == 3 and info.value.supported == 2
    assert "upgrade pycpt" in str(info.value) and "format 3" in str(info.value)
    assert_nothing_extracted(tmp_path)


def test_a_manifest_that_disagrees_with_the_marker(tmp_path):
    path = tmp_path / "D"
    build_dump(path, [member("inventory.img", b"i")], manifest={"format_version": 3})
    with pytest.raises(errors.DumpFileCorruptError, match="says format 3"):
        dumpfile.read_manifest(path)


@pytest.mark.parametrize("compress", [None, "gz"])
def test_a_hand_made_dump_is_accepted(tmp_path, compress):
    # the helper itself must build valid dumps, or the refusals below prove nothing
    path = tmp_path / "D"
    build_dump(
        path,
        [member("inventory.img", b"i" * 700), member("core-1.img", b"c")],
        parts=[
            Part("core-1.img", 1, chunks_of(b"c")),
            Part("inventory.img", 700, chunks_of(b"i" * 700)),
        ],
        compress=compress,
    )
    m = dumpfile.extract_dump_file(path, tmp_path / "dest")
    assert [p.name for p in m.parts] == ["core-1.img", "inventory.img"]


def _link(name: str, target: str, kind: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return special(info)


def _dev(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return special(info)


def _dir(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return special(info)


def _pax(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.XHDTYPE
    return special(info)


UNSAFE = [
    ([member("../evil.img", b"x")], "not a plain file name"),
    ([member("/tmp/evil.img", b"x")], "not a plain file name"),
    ([member("sub/evil.img", b"x")], "not a plain file name"),
    ([member("..", b"x")], "not a plain file name"),
    ([_link("core-1.img", "/etc/passwd", tarfile.SYMTYPE)], "is a link"),
    ([member("a.img", b"x"), _link("core-1.img", "a.img", tarfile.LNKTYPE)], "is a link"),
    ([_dev("null.img")], "is a device"),
    ([_dir("dir.img")], "is a directory"),
    ([_pax("a.img")], "is a pax header"),
    ([member("a.img", b"x"), member("a.img", b"y")], "twice"),
    ([member("PYCPT-DUMP", b"PYCPT-DUMP 2\n")], "twice"),
    ([member("manifest.sig", b"{}")], "not where format 2 has them|twice"),
]


@pytest.mark.parametrize("compress", [None, "gz"])
@pytest.mark.parametrize(
    "members, match",
    UNSAFE,
    ids=[
        "dotdot",
        "absolute",
        "subdir",
        "dotdot-only",
        "symlink",
        "hardlink",
        "device",
        "directory",
        "pax",
        "duplicate",
        "second-marker",
        "second-signature",
    ],
)
def test_unsafe_members_are_refused(tmp_path, members, match, compress):
    path = tmp_path / "D"
    build_dump(
        path,
        [member("inventory.img", b"i")] + members,
        parts=[Part("inventory.img", 1, chunks_of(b"i"))],
        compress=compress,
    )
    if compress:  # read in order: an unlisted member may be what is found first
        match += "|is not in its manifest"
    for how in READERS if compress is None else READERS[1:]:
        with pytest.raises(errors.DumpFileCorruptError, match=match):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)
    assert listdir(tmp_path) == ["D"]  # nothing escaped next to dest


@pytest.mark.parametrize("compress", [None, "gz"])
def test_a_member_not_in_the_manifest_is_refused(tmp_path, compress):
    path = tmp_path / "D"
    build_dump(
        path,
        [member("inventory.img", b"i"), member("extra.img", b"sneaky")],
        parts=[Part("inventory.img", 1, chunks_of(b"i"))],
        compress=compress,
    )
    for how in READERS if compress is None else READERS[1:]:
        with pytest.raises(errors.DumpFileCorruptError, match="not in its manifest"):
            read_with(how, path, tmp_path)
    dest = tmp_path / "empty"
    dest.mkdir()
    with pytest.raises(errors.DumpFileCorruptError):
        dumpfile.extract_dump_file(path, dest)
    assert listdir(dest) == []  # an existing dir is emptied again, not removed


def test_a_part_missing_from_the_archive_is_refused(tmp_path):
    path = tmp_path / "D"
    build_dump(
        path,
        [member("inventory.img", b"i")],
        parts=[Part("inventory.img", 1, chunks_of(b"i")), Part("pages-1.img", 1, chunks_of(b"p"))],
    )
    for how in READERS:
        with pytest.raises(errors.DumpFileCorruptError, match="missing"):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)


# --- the gzip bomb -------------------------------------------------------------------------


class _CountingGzip(gzip.GzipFile):
    produced = 0

    def read(self, size=-1):
        data = super().read(size)
        _CountingGzip.produced += len(data)
        return data


@pytest.mark.parametrize("lie", ["size", "unlisted"])
def test_a_gzip_bomb_stops_at_its_declared_sizes(tmp_path, monkeypatch, lie):
    """1 GiB of zeros in a 1 MB gzip file, signed by a trusted key (a key can leak): the
    manifest declares 1 byte; extraction stops before decompressing the bomb."""
    bomb = 1 << 30
    path = tmp_path / "D"
    header = _tar.header("pages-1.img", bomb, 0)
    raw_head = _tar.member("PYCPT-DUMP", b"PYCPT-DUMP 2\n", 0)
    parts = [Part("inventory.img", 1, chunks_of(b"i"))]
    if lie == "size":
        parts.append(Part("pages-1.img", 1, chunks_of(b"\0")))
    m = Manifest(2, "0.1.0", "4.2", "6.1", "2024-01-01T00:00:00+00:00", {}, parts, "gz", host="h")
    raw = m.to_bytes()
    meta = _tar.member("manifest.json", raw, 0) + _tar.member(
        "manifest.sig", _keys.sign(Keys().host_key(), raw), 0
    )
    zeros = gzip.compress(bytes(16 * MIB), 9)  # gzip members concatenate: one stream
    with open(path, "wb") as out:
        out.write(gzip.compress(raw_head + meta + _tar.member("inventory.img", b"i", 0) + header))
        for _ in range(bomb // (16 * MIB)):
            out.write(zeros)
        out.write(gzip.compress(_tar.end(0)[: _tar.RECORD]))
    assert path.stat().st_size < 2 * MIB
    monkeypatch.setattr(gzip, "GzipFile", _CountingGzip)
    _CountingGzip.produced = 0
    match = "its manifest says 1" if lie == "size" else "not in its manifest"
    with pytest.raises(errors.DumpFileCorruptError, match=match):
        dumpfile.extract_dump_file(path, tmp_path / "dest")
    assert _CountingGzip.produced < 64 * 1024  # headers only: not one chunk of the bomb
    assert_nothing_extracted(tmp_path)


def test_declared_sizes_beyond_this_host_are_refused(tmp_path):
    """A signed manifest may declare more than could ever be a container here: refused
    before extraction (the free space of the target is checked too)."""
    path = tmp_path / "D"
    build_dump(path, [member("inventory.img", b"i")], compress="gz")
    with dumpfile.DumpFile.open(path) as df:
        df.manifest.parts.append(Part("pages-1.img", 1 << 50, b""))  # as if declared
        with pytest.raises(errors.DumpFileError, match="free|memory"):
            df.extract(tmp_path / "dest")
    assert_nothing_extracted(tmp_path)


# --- damage ----------------------------------------------------------------------------------


def member_span(path: Path, name: str) -> range:
    with tarfile.open(path) as tar:
        m = tar.getmember(name)
        return range(m.offset_data, m.offset_data + m.size)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("where", ["start", "middle", "last"])
def test_a_flipped_byte_in_an_image(tmp_path, images, where):
    path = write(tmp_path)
    span = member_span(path, "pages-1.img")
    at = {"start": 0, "middle": len(span) // 2, "last": len(span) - 1}[where]
    flip(path, span[at])
    dumpfile.read_manifest(path)  # reads no image data, by design
    for how in ("verify", "extract"):
        with pytest.raises(
            errors.DumpFileCorruptError, match="pages-1.img does not match its hash"
        ):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)
    with dumpfile.DumpFile.open(path) as df:
        got = []
        with pytest.raises(errors.DumpFileCorruptError, match=f"chunk {at // MIB}"):
            for piece in df.chunks("pages-1.img"):
                got.append(bytes(piece))
        assert len(got) == at // MIB  # the chunks before it, nothing of the bad one


def test_a_flipped_byte_anywhere_in_the_manifest(tmp_path):
    make_images(tmp_path / "img", {"inventory.img": 10, "core-1.img": 100})
    path = write(tmp_path)
    good = path.read_bytes()
    for offset in member_span(path, "manifest.json"):
        path.write_bytes(good)
        flip(path, offset)
        for how in READERS:
            with pytest.raises(errors.DumpFileCorruptError, match="manifest"):
                read_with(how, path, tmp_path)
            assert_nothing_extracted(tmp_path)


def test_a_flipped_byte_anywhere_in_a_small_dump(tmp_path):
    """Every byte of the file matters to verify_dump_file: its first bytes name it (foreign
    without them), a changed key in the signature names a signer this host does not trust,
    anything else is damage."""
    make_images(tmp_path / "img", {"inventory.img": 10, "core-1.img": 700})
    path = write(tmp_path)
    good = path.read_bytes()
    sig = member_span(path, "manifest.sig")
    for offset in range(len(good)):
        path.write_bytes(good)
        flip(path, offset)
        if offset < 11:
            expected: tuple = (errors.DumpFileForeignError,)
        elif offset in sig:
            expected = (errors.DumpFileCorruptError, errors.DumpFileUntrustedError)
        else:
            expected = (errors.DumpFileCorruptError,)
        with pytest.raises(expected):
            dumpfile.verify_dump_file(path)


@pytest.mark.parametrize("compress", ["gz", "xz"])
def test_a_flipped_byte_in_compressed_data(tmp_path, images, compress):
    path = write(tmp_path, compress=compress)
    size = path.stat().st_size
    for offset in (size // 3, size // 2, size - 5):
        good = path.read_bytes()
        flip(path, offset)
        for how in READERS[1:]:
            with pytest.raises(errors.DumpFileCorruptError):
                read_with(how, path, tmp_path)
            assert_nothing_extracted(tmp_path)
        path.write_bytes(good)


@pytest.mark.parametrize("compress", [None, "gz", "xz"])
def test_truncated_at_any_point(tmp_path, images, compress):
    path = write(tmp_path, compress=compress)
    good = path.read_bytes()
    size = len(good)
    cuts = {
        1,
        11,
        100,
        511,
        512,
        1024,
        1536,
        size // 4,
        size // 2,
        size - 10241,
        size - 2000,
        size - 1024,
        size - 513,
        size - 512,
        size - 100,
        size - 1,
    }
    if compress is None:
        cuts |= {member_span(path, "manifest.json")[0] - 1, member_span(path, "manifest.json")[5]}
    # a compressed file's manifest comes first: read_manifest reads it alone, verify and
    # extract read everything
    readers = READERS if compress is None else READERS[1:]
    for cut in sorted(c for c in cuts if 0 < c < size):
        path.write_bytes(good[:cut])
        for how in readers:
            with pytest.raises(errors.DumpFileCorruptError) as info:
                read_with(how, path, tmp_path)
            assert info.value.path == str(path)
            assert "damaged" in str(info.value) and "checkpoint again" in info.value.hint
            assert_nothing_extracted(tmp_path)


@pytest.mark.parametrize("compress", [None, "gz"])
def test_data_after_the_end_is_refused(tmp_path, images, compress):
    path = write(tmp_path, compress=compress)
    if compress:
        raw = gzip.decompress(path.read_bytes()) + b"\0" * 10240 + b"garbage"
        path.write_bytes(gzip.compress(raw))
    else:
        with open(path, "ab") as f:
            f.write(b"\0" * 10240 + b"garbage")
    with pytest.raises(errors.DumpFileCorruptError, match="after the end"):
        dumpfile.verify_dump_file(path)


def test_a_foreign_error_is_a_pycpt_error_with_a_cause_free_message(tmp_path):
    (tmp_path / "D").write_bytes(os.urandom(4096))
    with pytest.raises(errors.PycptError) as info:
        dumpfile.read_manifest(tmp_path / "D")
    assert isinstance(info.value, errors.DumpFileError)
    assert str(info.value).startswith(f"{tmp_path / 'D'} is not a pycpt dump file")


def test_manifest_parse_rejects_bad_fields():
    good = json.loads(
        Manifest(
            2,
            "0.1.0",
            "4.2",
            "6.1",
            "2024-01-01T00:00:00+00:00",
            {"a": 1},
            [Part("core-1.img", 1, b"\0" * 32)],
            "gz",
            host="h",
        ).to_bytes()
    )
    assert Manifest.parse(json.dumps(good).encode()).compression == "gz"
    for key, value in [
        ("format_version", "2"),
        ("format_version", True),
        ("format_version", 1),
        ("config", []),
        ("created", "yesterday"),
        ("compression", "zip"),
        ("hash", "sha256"),
        ("chunk_size", 1000),
        ("chunk_size", 1 << 30),
        ("kernel", "x" * 300),
        ("parts", [{"name": "../x", "size": 1, "chunks": "00" * 32}]),
        ("parts", [{"name": "a.img", "size": -1, "chunks": ""}]),
        ("parts", [{"name": "a.img", "size": 1, "chunks": "xyz"}]),
        ("parts", [{"name": "a.img", "size": 1, "chunks": ""}]),  # one chunk, no hash
        ("parts", [{"name": "a.img", "size": 1, "chunks": "00" * 64}]),  # two hashes
        ("parts", [{"name": "a.img", "size": 1, "chunks": "00" * 32, "x": 1}]),
        (
            "parts",
            [
                {"name": "b.img", "size": 0, "chunks": ""},
                {"name": "a.img", "size": 0, "chunks": ""},
            ],
        ),
        ("parts", [{"name": "a.img", "size": 0, "chunks": ""}] * 2),
        ("extra", 1),
    ]:
        with pytest.raises(ValueError):
            Manifest.parse(json.dumps({**good, key: value}).encode())
    with pytest.raises(ValueError):
        Manifest.parse(json.dumps({k: v for k, v in good.items() if k != "kernel"}).encode())
    with pytest.raises(ValueError, match="twice"):
        Manifest.parse(b'{"kernel": "a", "kernel": "b"}')
    with pytest.raises(ValueError, match="not a JSON number"):
        Manifest.parse(b'{"kernel": NaN}')


# --- written while the images arrive (DumpFileWriter, for criu dump --stream) ----------------


def _stream(target: Path, parts: Dict[str, bytes], order: List[str]) -> Manifest:
    """Feed `parts` into a DumpFileWriter in 256 KiB pieces, interleaved in `order` (a name
    per piece; each part closes after its last piece), as CRIU's pipes would."""
    writer = dumpfile.DumpFileWriter(target, config={"id": "ct"}, criu_version="4.2")
    handles = {name: writer.open_part(name) for name in parts}
    pos = dict.fromkeys(parts, 0)
    for name in order:
        piece = memoryview(parts[name][pos[name] : pos[name] + (256 << 10)])
        writer.write(handles[name], piece)
        pos[name] += len(piece)
        if pos[name] == len(parts[name]):
            writer.close_part(handles[name])
    return writer.commit()


def test_streamed_parts_interleaved_give_a_verified_file(tmp_path):
    rng = hashlib.sha256(b"seed").digest()
    big = rng * ((5 << 20) // len(rng))  # streams through once past 1 MiB
    small = b"pagemap" * 1000  # held, written whole after the big one
    other = os.urandom(3 << 20)  # grows past 1 MiB while the big one streams: held, then owns
    pieces = {
        "pages-1.img": -(-len(big) // (256 << 10)),
        "pagemap-1.img": 1,
        "pages-2.img": -(-len(other) // (256 << 10)),
    }
    order = (
        ["pages-1.img"] * 3
        + ["pages-2.img"] * pieces["pages-2.img"]
        + ["pages-1.img"] * (pieces["pages-1.img"] - 3)
        + ["pagemap-1.img"]
    )
    parts = {"pages-1.img": big, "pagemap-1.img": small, "pages-2.img": other}
    written = _stream(tmp_path / "Dump.CT", parts, order)
    assert stat.S_IMODE(os.stat(tmp_path / "Dump.CT").st_mode) == 0o600
    manifest = dumpfile.verify_dump_file(tmp_path / "Dump.CT")
    assert manifest.to_dict() == written.to_dict()
    assert {p.name: p.chunks for p in manifest.parts} == {n: chunks_of(d) for n, d in parts.items()}
    dumpfile.extract_dump_file(tmp_path / "Dump.CT", tmp_path / "out")
    assert {n: (tmp_path / "out" / n).read_bytes() for n in parts} == parts
    with dumpfile.DumpFile.open(tmp_path / "Dump.CT") as df:
        raw = (tmp_path / "Dump.CT").read_bytes()
        assert {n: raw[o : o + s] for n, (o, s) in df.offsets.items()} == parts
    with tarfile.open(tmp_path / "Dump.CT") as tar:  # still a plain tar for tar(1)
        assert tar.getnames()[0] == dumpfile.MARKER_NAME
        assert tar.getnames()[-2:] == [dumpfile.MANIFEST_NAME, dumpfile.SIGNATURE_NAME]


def test_an_aborted_stream_leaves_the_old_file(tmp_path, images):
    path = write(tmp_path)
    old = path.read_bytes()
    writer = dumpfile.DumpFileWriter(path, config={}, criu_version="4.2")
    part = writer.open_part("pages-1.img")
    writer.write(part, memoryview(os.urandom(2 << 20)))
    writer.abort()
    writer.abort()  # idempotent
    assert path.read_bytes() == old and listdir(tmp_path) == ["Dump.CT", "img"]


@pytest.mark.parametrize(
    "name", ["../x.img", "a/b.img", "", dumpfile.MANIFEST_NAME, dumpfile.SIGNATURE_NAME]
)
def test_a_streamed_part_with_a_bad_name_is_refused(tmp_path, name):
    writer = dumpfile.DumpFileWriter(tmp_path / "Dump.CT", config={}, criu_version="4.2")
    try:
        with pytest.raises(errors.ImagesDirError):
            writer.open_part(name)
        writer.open_part("core-1.img")
        with pytest.raises(errors.ImagesDirError, match="twice"):
            writer.open_part("core-1.img")
    finally:
        writer.abort()
    assert listdir(tmp_path) == []


def test_a_compressed_file_cannot_be_read_in_place(tmp_path, images):
    with dumpfile.DumpFile.open(write(tmp_path, compress="gz")) as df:
        assert df.offsets == {}
        with pytest.raises(errors.DumpFileError, match="in place"):
            df.read_part("core-1.img")


def test_sizes_from_8_gib_on_take_a_base_256_header():
    """The header of a streamed part is one block whatever its size; from 8 GiB on its
    size is GNU base-256, which tar and tarfile read."""
    for size in (0, 1, (8 << 30) - 1, 8 << 30, 9 << 30, (1 << 62) - 1):
        block = _tar.header("pages-1.img", size, 0)
        assert len(block) == 512 and _tar.parse_header(block) == ("pages-1.img", size)
        assert tarfile.TarInfo.frombuf(block, "ascii", "strict").size == size
    assert _tar.header("p.img", 9 << 30, 0)[124] == 0x80
