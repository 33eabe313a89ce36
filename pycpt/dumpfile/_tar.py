"""The tar pieces of a format 2 dump file, written and read by hand so that the reader can
be strict: one-block ustar headers of regular files only, with plain names, a valid
checksum, and a size in octal below 8 GiB or in GNU's base-256 form from 8 GiB on. A header
is one block whatever the size, so the header of an image that is still streaming is
written with size 0 and rewritten in place once its size is known (`tar` and Python's
tarfile read both forms)."""

from __future__ import annotations

import re
from typing import Optional, Tuple

BLOCK = 512
RECORD = 10240  # the archive is padded to a multiple of this, as tar does
OCTAL_LIMIT = 8 << 30  # 11 octal digits hold sizes below 8 GiB
MAX_SIZE = 1 << 62
NAME_MAX = 100  # a ustar name field, without the prefix field (names have no '/')
_OCTAL = re.compile(rb"[0-7]{11}\0\Z")
_CHECKSUM = re.compile(rb"[0-7]{6}\0 \Z")
_USTAR = b"ustar\x0000"


def header(name: str, size: int, mtime: int) -> bytes:
    """The 512-byte ustar header of regular file `name` (mode 0600, owner 0:0)."""
    raw = name.encode("ascii")
    if not 0 < len(raw) <= NAME_MAX:
        raise ValueError(f"a member name has 1 to {NAME_MAX} characters, not {len(raw)}")
    if not 0 <= size < MAX_SIZE:
        raise ValueError(f"a member size must be in [0, 2**62), not {size}")
    block = bytearray(BLOCK)
    block[0 : len(raw)] = raw
    block[100:108] = b"0000600\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    if size < OCTAL_LIMIT:
        block[124:136] = b"%011o\0" % size
    else:  # GNU base-256: a first byte of 0x80, then the size big-endian
        block[124:136] = b"\x80" + size.to_bytes(11, "big")
    block[136:148] = b"%011o\0" % (max(0, mtime) & 0o77777777777)
    block[148:156] = b" " * 8
    block[156:157] = b"0"
    block[257:265] = _USTAR
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def padding(size: int) -> int:
    """The zero bytes after `size` bytes of data, up to the next block."""
    return -size % BLOCK


def member(name: str, data: bytes, mtime: int) -> bytes:
    """A whole small member: header, data, padding."""
    return header(name, len(data), mtime) + data + bytes(padding(len(data)))


def end(offset: int) -> bytes:
    """The end of an archive whose members end at `offset`: two zero blocks, then zeros up
    to a multiple of RECORD."""
    stop = offset + 2 * BLOCK
    return bytes(stop + (-stop % RECORD) - offset)


def parse_header(block: bytes) -> Optional[Tuple[str, int]]:
    """(name, size) of a member's header; None for a zero block (the end of the archive);
    ValueError saying what is wrong with anything that is not a header this module writes."""
    if len(block) != BLOCK:
        raise ValueError("it is truncated inside a tar header")
    if not any(block):
        return None
    if not _CHECKSUM.match(block[148:156]):
        raise ValueError("a tar header has a malformed checksum field")
    want = int(block[148:154], 8)
    if sum(block[:148]) + 8 * 0x20 + sum(block[156:]) != want:
        raise ValueError("a tar header does not match its checksum")
    if block[257:265] != _USTAR:
        raise ValueError("a tar header is not a ustar header")
    raw = block[0:100].split(b"\0", 1)
    if len(raw) == 2 and any(raw[1]):
        raise ValueError("a tar header's name field has bytes after its end")
    try:
        name = raw[0].decode("ascii")
    except UnicodeDecodeError:
        raise ValueError("a member's name is not ASCII") from None
    if block[156:157] != b"0":
        kinds = {
            b"1": "a link",
            b"2": "a link",
            b"3": "a device",
            b"4": "a device",
            b"5": "a directory",
            b"6": "a fifo",
            b"x": "a pax header",
            b"g": "a pax header",
            b"L": "a GNU long name",
        }
        what = kinds.get(block[156:157], f"of type {block[156:157]!r}")
        raise ValueError(f"member {name[:60]!r} is {what}; a dump file holds only regular files")
    if any(block[157:257]) or any(block[345:500]):
        raise ValueError(f"member {name[:60]!r} has a link name or a name prefix")
    field = block[124:136]
    if field[0] == 0x80:
        size = int.from_bytes(field[1:12], "big")
    elif _OCTAL.match(field):
        size = int(field[:11], 8)
    else:
        raise ValueError(f"member {name[:40]!r} has a malformed size field")
    if size >= MAX_SIZE:
        raise ValueError(f"member {name[:40]!r} claims {size} bytes")
    return name, size
