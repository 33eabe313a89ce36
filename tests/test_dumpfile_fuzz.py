"""Property tests (hypothesis) of what reads untrusted dump files: the manifest parser, the
config schema, the signature member, the tar headers and the whole reader. Whatever the
input, the answer is a value or the one documented error, never another exception."""

from __future__ import annotations

import json
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pycpt import dumpfile, errors
from pycpt.dumpfile import Keys, Manifest, Part, _keys, _tar

FUZZ = settings(
    max_examples=int(os.environ.get("PYCPT_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=25,
)

GOOD = Manifest(
    2,
    "0.1.0",
    "4.2.1",
    "6.18",
    "2024-01-01T00:00:00+00:00",
    {"id": "ct1", "argv": ["/bin/sh"]},
    [Part("core-1.img", 3, b"\1" * 32), Part("pages-1.img", (1 << 20) + 1, b"\2" * 64)],
    None,
    host="h",
)


@FUZZ
@given(st.binary(max_size=2000))
def test_manifest_parse_of_any_bytes(raw):
    try:
        m = Manifest.parse(raw)
    except ValueError:
        return
    assert Manifest.parse(m.to_bytes()) == m


@FUZZ
@given(
    st.sampled_from(sorted(json.loads(GOOD.to_bytes()))),
    json_values,
    st.sampled_from(["replace", "delete", "add"]),
)
def test_manifest_parse_of_a_changed_field(key, value, how):
    data = json.loads(GOOD.to_bytes())
    if how == "replace":
        data[key] = value
    elif how == "delete":
        del data[key]
    else:
        data[f"x{key}"] = value
    try:
        m = Manifest.parse(json.dumps(data).encode())
    except ValueError:
        return
    # accepted only if it is a manifest of format 2 with its exact keys
    assert m.format_version == 2 and how == "replace"
    assert Manifest.parse(m.to_bytes()) == m


@FUZZ
@given(
    st.lists(
        st.fixed_dictionaries(
            {
                "name": st.text(alphabet=string.ascii_letters + "./-_", min_size=0, max_size=12),
                "size": st.integers(min_value=-2, max_value=(3 << 20)),
                "chunks": st.text(alphabet="0123456789abcdefX", max_size=200),
            }
        ),
        max_size=4,
    )
)
def test_manifest_parts_are_checked(parts):
    data = json.loads(GOOD.to_bytes())
    data["parts"] = parts
    try:
        m = Manifest.parse(json.dumps(data).encode())
    except ValueError:
        return
    for p in m.parts:
        assert dumpfile._manifest.valid_name(p.name) and p.size >= 0
        assert p.chunk_count == -(-p.size // m.chunk_size)


@FUZZ
@given(st.dictionaries(st.text(max_size=15), json_values, max_size=6))
def test_config_schema_of_anything(config):
    try:
        checked = dumpfile.check_config(config)
    except errors.ConfigSchemaError as exc:
        assert isinstance(exc, ValueError) and exc.key is not None
        return
    assert set(checked) <= set(dumpfile.SCHEMA)
    assert not set(checked) & dumpfile.INTERNAL_KEYS
    assert dumpfile.check_config(checked) == checked


@FUZZ
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=70),
            "argv": st.lists(st.text(max_size=20), max_size=4),
            "share_net": json_values,
            "root": st.one_of(st.none(), st.text(alphabet="/a.", max_size=12)),
            "env": st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3),
            "links_down": st.lists(st.text(max_size=18), max_size=3),
            "criu_options": st.dictionaries(
                st.sampled_from(["tcp_close", "file_locks", "root", "external", "x"]),
                json_values,
                max_size=3,
            ),
        },
    )
)
def test_config_schema_of_known_keys(config):
    try:
        checked = dumpfile.check_config(config)
    except errors.ConfigSchemaError:
        return
    assert checked == config or "links_down" in config  # only links_down is normalised
    if checked.get("root") is not None:
        assert checked["root"].startswith("/") and "/../" not in checked["root"] + "/"


def test_config_criu_options_are_flags_a_restore_replays():
    """A dump file may ask its restore for CRIU flags that change how the images are read
    (tcp_close, ...), never for an option naming paths, mounts or programs of the host."""
    config = {"criu_options": {"tcp_close": True, "file_locks": False}}
    assert dumpfile.check_config(config) == config
    for bad in ({"root": "/"}, {"external": True}, {"tcp_close": "yes"}, ["tcp_close"]):
        with pytest.raises(errors.ConfigSchemaError, match="criu_options"):
            dumpfile.check_config({"criu_options": bad})


@FUZZ
@given(st.binary(max_size=600))
def test_signature_member_of_any_bytes(raw):
    try:
        key, valid = dumpfile.check_signature(raw, b"manifest")
    except ValueError:
        return
    assert len(key) == 32 and valid is False


@FUZZ
@given(st.binary(min_size=512, max_size=512))
def test_tar_header_of_any_block(block):
    try:
        entry = _tar.parse_header(block)
    except ValueError:
        return
    assert entry is None or (isinstance(entry[0], str) and 0 <= entry[1] < _tar.MAX_SIZE)


@FUZZ
@given(
    st.text(alphabet=string.ascii_letters + string.digits + "._+-", min_size=1, max_size=100),
    st.integers(min_value=0, max_value=(1 << 62) - 1),
)
def test_tar_header_round_trip(name, size):
    assert _tar.parse_header(_tar.header(name, size, 0)) == (name, size)


@pytest.fixture(scope="module")
def small_dump(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzzdump")
    state = d / "state"
    (d / "img").mkdir()
    (d / "img" / "inventory.img").write_bytes(b"inv" * 10)
    (d / "img" / "core-1.img").write_bytes(os.urandom(1500))
    keys = Keys(state)
    path = d / "Dump"
    dumpfile.write_dump_file(path, d / "img", config={"id": "f"}, criu_version="4.2", keys=keys)
    return path.read_bytes(), keys


@FUZZ
@given(st.data())
def test_the_reader_of_a_mutated_file(small_dump, tmp_path_factory, data):
    """Flip, cut, insert or overwrite bytes of a good file: DumpFile.open, verify and extract
    raise DumpFileError (some subclass) or, if the change was harmless, give the same parts."""
    good, keys = small_dump
    raw = bytearray(good)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(raw) - 1))
        how = data.draw(st.sampled_from(["flip", "cut", "insert", "write"]))
        if how == "flip":
            raw[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[at : at + data.draw(st.integers(1, 600))]
        elif how == "insert":
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=600))
        else:
            chunk = data.draw(st.binary(min_size=1, max_size=64))
            raw[at : at + len(chunk)] = chunk
    assume(bytes(raw) != good and raw)
    d = tmp_path_factory.mktemp("m")
    path = Path(d) / "D"
    path.write_bytes(bytes(raw))
    try:
        with dumpfile.DumpFile.open(path, keys=keys) as df:
            df.verify()
        dumpfile.extract_dump_file(path, d / "out", keys=keys)
    except errors.DumpFileError:
        assert not (d / "out").exists()
        return
    assert sorted(os.listdir(d / "out")) == ["core-1.img", "inventory.img"]


def test_a_signature_over_the_manifest_verifies_only_for_it(tmp_path):
    keys = Keys(tmp_path)
    sig = _keys.sign(keys.host_key(), b"manifest")
    assert dumpfile.check_signature(sig, b"manifest")[1] is True
    assert dumpfile.check_signature(sig, b"manifesT")[1] is False
