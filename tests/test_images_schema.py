"""pycpt's declaration of CRIU's image messages and magics against the ones CRIU ships.

Debian's python3-pycriu package of the managed CRIU's version carries protoc's output for
every images/*.proto and the magic table; their serialized descriptors are read (not
imported), and every field of every message pycpt declares must be CRIU's field with the
same number, name, type, label and (for messages and enums) type name, and the reverse.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Tuple

import pytest
from google.protobuf import descriptor_pb2

from pycpt.images import _magic, _schema
from pycpt.testing import pycriu as pycriu_pkg

# fields pycpt leaves undeclared on purpose: other architectures' registers (kept as
# unknown fields when decoded)
OMITTED = {
    "core_entry": {
        "ti_arm",
        "ti_aarch64",
        "ti_ppc64",
        "ti_s390",
        "ti_mips",
        "ti_loongarch64",
        "ti_riscv64",
    }
}


@pytest.fixture(scope="module")
def pycriu(tmp_path_factory) -> Path:
    """python3-pycriu's images directory, fetched with apt like the managed engine."""
    try:
        root = pycriu_pkg.fetch(tmp_path_factory.mktemp("pycriu"))
    except pycriu_pkg.PycriuUnavailable as exc:
        pytest.skip(str(exc))
    assert (root / "pycriu" / "images" / "magic.py").is_file(), "no pycriu/images/magic.py"
    return root / "pycriu" / "images"


@pytest.fixture(scope="module")
def criu_schema(
    pycriu: Path,
) -> Tuple[
    Dict[str, descriptor_pb2.DescriptorProto], Dict[str, descriptor_pb2.EnumDescriptorProto]
]:
    messages, enums = {}, {}
    for path in pycriu.glob("*_pb2.py"):
        fdp = pycriu_pkg.serialized_descriptor(path)
        for m in fdp.message_type:
            messages[m.name] = m
            for e in m.enum_type:
                enums[f"{m.name}.{e.name}"] = e
        for e in fdp.enum_type:
            enums[e.name] = e
    return messages, enums


def _ours() -> Dict[str, descriptor_pb2.DescriptorProto]:
    return {m.name: m for m in _schema.file_descriptor().message_type}


def test_every_declared_message_is_criu_s_field_for_field(criu_schema):
    theirs, _ = criu_schema
    prefix = f".{_schema.PACKAGE}."
    for name, ours in _ours().items():
        assert name in theirs, f"{name} is not one of CRIU's messages"
        mine = {f.number: f for f in ours.field}
        for field in theirs[name].field:
            where = f"{name}.{field.name} = {field.number}"
            if field.name in OMITTED.get(name, ()):
                assert field.number not in mine, where
                continue
            f = mine.pop(field.number, None)
            assert f is not None, f"{where}: missing from pycpt's schema"
            assert (f.name, f.type, f.label) == (field.name, field.type, field.label), where
            if field.type_name:
                assert f.type_name == prefix + field.type_name.lstrip("."), where
            assert f.default_value == field.default_value, where
        assert not mine, (
            f"{name}: pycpt declares fields CRIU does not: {[f.name for f in mine.values()]}"
        )


def test_every_message_an_image_kind_needs_is_declared(criu_schema):
    theirs, _ = criu_schema
    ours = _ours()
    for _pattern, kind in _magic._PATTERNS:
        if kind.message is not None:
            assert kind.message in ours, kind
    # and every message reachable from them
    for m in ours.values():
        for f in m.field:
            if f.type == f.TYPE_MESSAGE:
                assert f.type_name.rsplit(".", 1)[1] in ours, (m.name, f.name)
    assert {"ghost_chunk_entry", "pagemap_head", "ipc_msg"} <= set(ours)


def test_enums_match(criu_schema):
    _, theirs = criu_schema
    for name, values in _schema.ENUMS.items():
        assert name in theirs, f"{name} is not one of CRIU's enums"
        assert values == {v.name: v.number for v in theirs[name].value}, name


def test_magics_match(pycriu: Path):
    text = (pycriu / "magic.py").read_text()
    theirs = {m.group(1): int(m.group(2)) for m in re.finditer(r"by_name\['(\w+)'\] = (\d+)", text)}
    assert theirs["IMG_COMMON"] == _magic.IMG_COMMON
    assert theirs["IMG_SERVICE"] == _magic.IMG_SERVICE
    # not image kinds: the format version, and the kernel-probe cache CRIU keeps in /run
    not_kinds = {"IMG_COMMON", "IMG_SERVICE", "CRTOOLS_IMAGES_V1_1", "KDAT"}
    for name, value in theirs.items():
        if name not in not_kinds:
            assert _magic.MAGICS.get(name) == value, name


def test_schema_builds_without_criu():
    """The pure part: every message class exists and round-trips an empty entry."""
    for name, cls in _schema.CLASSES.items():
        assert cls.DESCRIPTOR.name == name
    pe = _schema.CLASSES["pagemap_entry"](vaddr=0x1000, compat_nr_pages=0, nr_pages=3, flags=4)
    assert _schema.CLASSES["pagemap_entry"].FromString(pe.SerializeToString()) == pe
