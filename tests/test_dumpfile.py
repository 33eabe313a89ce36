"""The dump file: round trips, atomic writes, and every kind of bad file (no CRIU needed)."""

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
from typing import Callable, Dict, List, Optional

import pytest

import pycpt
from pycpt import dumpfile, errors
from pycpt.dumpfile import Manifest, Part, _manifest, _writing

MIB = 1 << 20
CONFIG = {"id": "web1", "command": ["nginx", "-g", "daemon off;"], "netns": True, "ratio": 0.5}


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
    assert m.format_version == dumpfile.FORMAT_VERSION == 1
    assert m.pycpt_version == pycpt.__version__
    assert m.criu_version == "4.2.1"
    assert m.kernel == os.uname().release
    assert m.config == CONFIG
    assert m.compression == compress
    created = datetime.datetime.fromisoformat(m.created)
    assert created.utcoffset() == datetime.timedelta(0)
    assert before <= created <= datetime.datetime.now(datetime.timezone.utc)
    assert m.parts == [
        Part(n, len(images[n]), hashlib.sha256(images[n]).hexdigest()) for n in sorted(images)
    ]
    assert Manifest.from_dict(m.to_dict()) == m

    dest = tmp_path / "restore" / "images"
    (tmp_path / "restore").mkdir()
    assert dumpfile.extract_dump_file(path, dest) == m
    assert stat.S_IMODE(dest.stat().st_mode) == 0o700
    assert listdir(dest) == sorted(images)  # no log, stats, directory or symlink
    for name, data in images.items():
        assert (dest / name).read_bytes() == data


def test_a_tar_tool_reads_it_marker_first_manifest_last(tmp_path, images):
    path = write(tmp_path, compress="gz")
    with tarfile.open(path) as tar:
        names = tar.getnames()
        assert tar.extractfile("PYCPT-DUMP").read() == b"PYCPT-DUMP 1\n"
    assert names == ["PYCPT-DUMP"] + sorted(images) + ["manifest.json"]


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
        {"config": {"a": {1, 2}}},  # not JSON-able
        {"config": {"a": float("nan")}},
        {"criu_version": 42},
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


@pytest.mark.parametrize("how", ["read", "write", "fsync", "interrupt"])
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, images, monkeypatch, how):
    path = write(tmp_path)
    old = path.read_bytes()
    calls = []

    def failing_read(self, n=-1):
        calls.append(n)
        if len(calls) > 1:  # fail in the middle of the data, not before it
            if how == "interrupt":
                raise KeyboardInterrupt
            raise errors.ImagesDirError("cannot read pages-1.img: Input/output error") from OSError(
                5, "Input/output error"
            )
        return real_read(self, n)

    real_read = _writing._HashingReader.read
    if how in ("read", "interrupt"):
        monkeypatch.setattr(_writing._HashingReader, "read", failing_read)
        exc_type = KeyboardInterrupt if how == "interrupt" else errors.ImagesDirError
    elif how == "write":
        monkeypatch.setattr(_writing, "_fsync_dir", lambda p: None)

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
        write(tmp_path)
    monkeypatch.undo()
    if exc_type is errors.DumpFileError:
        assert info.value.path == str(tmp_path / "Dump.CT")
        assert isinstance(info.value.__cause__, OSError)
    assert path.read_bytes() == old
    assert listdir(tmp_path) == ["Dump.CT", "img"]  # no temporary file left


def test_a_file_that_shrinks_while_packed_fails(tmp_path, images, monkeypatch):
    real_fstat = os.fstat

    def lying_fstat(fd):
        st = real_fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size == len(images["pages-1.img"]):
            return os.stat_result(
                (
                    st.st_mode,
                    st.st_ino,
                    st.st_dev,
                    st.st_nlink,
                    st.st_uid,
                    st.st_gid,
                    st.st_size + 1,
                    0,
                    0,
                    0,
                )
            )
        return st

    monkeypatch.setattr(_writing.os, "fstat", lying_fstat)
    with pytest.raises(errors.ImagesDirError, match="shrank"):
        write(tmp_path)
    monkeypatch.undo()
    assert listdir(tmp_path) == ["img"]


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
    marker: bytes = b"PYCPT-DUMP 1\n",
    manifest: Optional[dict] = None,
    parts: Optional[List[Part]] = None,
) -> None:
    """A hand-made dump: marker, the given TarInfo/data pairs, and a manifest with a valid
    checksum listing `parts` (default: the regular members)."""
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("PYCPT-DUMP")
        info.size = len(marker)
        tar.addfile(info, io.BytesIO(marker))
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
        if parts is None:
            parts = [
                Part(i.name, len(d), hashlib.sha256(d).hexdigest()) for i, d in members if i.isreg()
            ]
        m = Manifest(1, "0.1.0", "4.2", "6.1", "2024-01-01T00:00:00+00:00", {}, parts, None)
        d = {**m.to_dict(), **(manifest or {})}
        d["checksum"] = "sha256:" + hashlib.sha256(_manifest._canonical(d)).hexdigest()
        blob = json.dumps(d).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))


def reg(name: str, data: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


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
@pytest.mark.parametrize("where", ["marker", "manifest"])
def test_newer_format(tmp_path, how, where):
    path = tmp_path / "D"
    if where == "marker":  # a format 2 may look different after its marker: say so at once
        build_dump(path, [reg("inventory.img", b"whatever")], marker=b"PYCPT-DUMP 2\n")
    else:
        build_dump(path, [reg("inventory.img", b"i")], manifest={"format_version": 2})
    with pytest.raises(errors.DumpFileTooNewError) as info:
        read_with(how, path, tmp_path)
    assert info.value.format_version == 2 and info.value.supported == 1
    assert "upgrade pycpt" in str(info.value) and "format 2" in str(info.value)
    assert_nothing_extracted(tmp_path)


def test_a_hand_made_dump_is_accepted(tmp_path):
    # the helper itself must build valid dumps, or the refusals below prove nothing
    path = tmp_path / "D"
    build_dump(path, [reg("inventory.img", b"i" * 700), reg("core-1.img", b"c")])
    m = dumpfile.extract_dump_file(path, tmp_path / "dest")
    assert [p.name for p in m.parts] == ["inventory.img", "core-1.img"]


def _link(name: str, target: str, kind: bytes) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info, None


def _dev(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.CHRTYPE
    info.devmajor, info.devminor = 1, 3
    return info, None


def _dir(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


@pytest.mark.parametrize(
    "members, match",
    [
        ([reg("../evil.img", b"x")], "not a plain file name"),
        ([reg("/tmp/evil.img", b"x")], "not a plain file name"),
        ([reg("sub/evil.img", b"x")], "not a plain file name"),
        ([reg("..", b"x")], "not a plain file name"),
        ([_link("core-1.img", "/etc/passwd", tarfile.SYMTYPE)], "is a link"),
        ([reg("a.img", b"x"), _link("core-1.img", "a.img", tarfile.LNKTYPE)], "is a link"),
        ([_dev("null.img")], "is a device"),
        ([_dir("dir.img")], "is a directory"),
        ([reg("a.img", b"x"), reg("a.img", b"y")], "twice"),
        ([reg("PYCPT-DUMP", b"PYCPT-DUMP 1\n")], "twice"),
    ],
    ids=[
        "dotdot",
        "absolute",
        "subdir",
        "dotdot-only",
        "symlink",
        "hardlink",
        "device",
        "directory",
        "duplicate",
        "second-marker",
    ],
)
def test_unsafe_members_are_refused(tmp_path, members, match):
    path = tmp_path / "D"
    build_dump(
        path,
        [reg("inventory.img", b"i")] + members,
        parts=[Part("inventory.img", 1, hashlib.sha256(b"i").hexdigest())],
    )
    for how in READERS:
        with pytest.raises(errors.DumpFileCorruptError, match=match):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)
    assert listdir(tmp_path) == ["D"]  # nothing escaped next to dest


def test_a_member_not_in_the_manifest_is_refused(tmp_path):
    path = tmp_path / "D"
    build_dump(
        path,
        [reg("inventory.img", b"i"), reg("extra.img", b"sneaky")],
        parts=[Part("inventory.img", 1, hashlib.sha256(b"i").hexdigest())],
    )
    for how in READERS:
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
        [reg("inventory.img", b"i")],
        parts=[
            Part("inventory.img", 1, hashlib.sha256(b"i").hexdigest()),
            Part("pages-1.img", 1, hashlib.sha256(b"p").hexdigest()),
        ],
    )
    for how in READERS:
        with pytest.raises(errors.DumpFileCorruptError, match="missing"):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)


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
    flip(path, {"start": span[0], "middle": span[len(span) // 2], "last": span[-1]}[where])
    dumpfile.read_manifest(path)  # reads no image data, by design
    for how in ("verify", "extract"):
        with pytest.raises(
            errors.DumpFileCorruptError, match="pages-1.img does not match its SHA-256"
        ):
            read_with(how, path, tmp_path)
        assert_nothing_extracted(tmp_path)


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
    # every byte of the file matters to verify_dump_file, except the byte after the NUL that
    # ends each tar header's checksum field, which tar itself ignores
    make_images(tmp_path / "img", {"inventory.img": 10, "core-1.img": 700})
    path = write(tmp_path)
    good = path.read_bytes()
    ignored = set()
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            ignored.add(m.offset + 148 + 7)
    for offset in range(len(good)):
        path.write_bytes(good)
        flip(path, offset)
        if offset in ignored:
            dumpfile.verify_dump_file(path)
            continue
        # the first bytes are the marker's name: without it the file is not a pycpt dump
        cls = errors.DumpFileForeignError if offset < 11 else errors.DumpFileCorruptError
        with pytest.raises(cls):
            dumpfile.verify_dump_file(path)


@pytest.mark.parametrize("compress", ["gz", "xz"])
def test_a_flipped_byte_in_compressed_data(tmp_path, images, compress):
    path = write(tmp_path, compress=compress)
    size = path.stat().st_size
    for offset in (size // 3, size // 2, size - 5):
        good = path.read_bytes()
        flip(path, offset)
        for how in READERS:
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
    for cut in sorted(c for c in cuts if 0 < c < size):
        path.write_bytes(good[:cut])
        for how in READERS:
            with pytest.raises(errors.DumpFileCorruptError) as info:
                read_with(how, path, tmp_path)
            assert info.value.path == str(path)
            assert "damaged" in str(info.value) and "checkpoint again" in info.value.hint
            assert_nothing_extracted(tmp_path)


def test_data_after_the_end_is_refused(tmp_path, images):
    path = write(tmp_path)
    with open(path, "ab") as f:
        f.write(b"\0" * 10240 + b"garbage")
    with pytest.raises(errors.DumpFileCorruptError, match="after its manifest"):
        dumpfile.read_manifest(path)


def test_a_foreign_error_is_a_pycpt_error_with_a_cause_free_message(tmp_path):
    (tmp_path / "D").write_bytes(os.urandom(4096))
    with pytest.raises(errors.PycptError) as info:
        dumpfile.read_manifest(tmp_path / "D")
    assert isinstance(info.value, errors.DumpFileError)
    assert str(info.value).startswith(f"{tmp_path / 'D'} is not a pycpt dump file")


def test_manifest_from_dict_rejects_bad_fields():
    good = Manifest(
        1,
        "0.1.0",
        "4.2",
        "6.1",
        "2024-01-01T00:00:00+00:00",
        {"a": 1},
        [Part("core-1.img", 1, "0" * 64)],
        "gz",
    ).to_dict()
    assert Manifest.from_dict(good).compression == "gz"
    for key, value in [
        ("format_version", "1"),
        ("format_version", True),
        ("config", []),
        ("created", "yesterday"),
        ("compression", "zip"),
        ("parts", [{"name": "../x", "size": 1, "sha256": "0" * 64}]),
        ("parts", [{"name": "a.img", "size": -1, "sha256": "0" * 64}]),
        ("parts", [{"name": "a.img", "size": 1, "sha256": "xyz"}]),
    ]:
        with pytest.raises(ValueError):
            Manifest.from_dict({**good, key: value})
    with pytest.raises(ValueError):
        Manifest.from_dict({k: v for k, v in good.items() if k != "kernel"})


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
    assert {p.name: p.sha256 for p in manifest.parts} == {
        n: hashlib.sha256(d).hexdigest() for n, d in parts.items()
    }
    dumpfile.extract_dump_file(tmp_path / "Dump.CT", tmp_path / "out")
    assert {n: (tmp_path / "out" / n).read_bytes() for n in parts} == parts
    _, offsets = dumpfile.locate_parts(tmp_path / "Dump.CT")
    raw = (tmp_path / "Dump.CT").read_bytes()
    assert {n: raw[o : o + s] for n, (o, s) in offsets.items()} == parts
    with tarfile.open(tmp_path / "Dump.CT") as tar:  # still a plain tar for tar(1)
        assert tar.getnames()[0] == dumpfile.MARKER_NAME
        assert tar.getnames()[-1] == dumpfile.MANIFEST_NAME


def test_an_aborted_stream_leaves_the_old_file(tmp_path, images):
    path = write(tmp_path)
    old = path.read_bytes()
    writer = dumpfile.DumpFileWriter(path, config={}, criu_version="4.2")
    part = writer.open_part("pages-1.img")
    writer.write(part, memoryview(os.urandom(2 << 20)))
    writer.abort()
    writer.abort()  # idempotent
    assert path.read_bytes() == old and listdir(tmp_path) == ["Dump.CT", "img"]


@pytest.mark.parametrize("name", ["../x.img", "a/b.img", "", dumpfile.MANIFEST_NAME])
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


def test_locate_parts_refuses_a_compressed_file(tmp_path, images):
    with pytest.raises(errors.DumpFileError, match="compressed"):
        dumpfile.locate_parts(write(tmp_path, compress="gz"))
