"""The migration protocol as input: every message is checked before any of it is used
(pycpt/_migration/messages.py), the control channel frames messages and notices a silent
peer (pycpt/_migration/channel.py), and the real target agent refuses what breaks the
rules with an error message the source can report. Property tests (hypothesis) feed the
parser arbitrary and mutated messages."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pycpt import errors
from pycpt._migration import messages
from pycpt._migration.channel import Channel, parse
from pycpt.errors import MigrationProtocolError, PeerSilentError

TOKEN = "0123456789abcdef0123456789abcdef"
HELLO: Dict[str, Any] = {
    "op": "hello",
    "protocol": messages.PROTOCOL,
    "pycpt": "0.1.0",
    "token": TOKEN,
    "criu": [4, 2, 1],
    "ct": "ct1",
    "mode": "postcopy",
    "memory": 64 << 20,
    "root": False,
    "dry_run": False,
}


def refused(msg: Any, accepted=messages.FROM_SOURCE) -> str:
    with pytest.raises(MigrationProtocolError) as info:
        messages.check(msg, accepted, "the source")
    return str(info.value)


# --- the cases the issue names -----------------------------------------------------------------


def test_a_good_hello_passes():
    assert messages.check(dict(HELLO), messages.FROM_SOURCE) == HELLO


def test_hello_without_a_token():
    msg = dict(HELLO)
    del msg["token"]
    assert "hello lacks the required field 'token'" in refused(msg)


def test_file_without_a_name():
    assert "file lacks the required field 'name'" in refused({"op": "file", "size": 3})


def test_a_size_that_is_a_list():
    text = refused({"op": "file", "name": "a.img", "size": [1, 2]})
    assert "file.size must be an integer from 0" in text and "[1, 2]" in text


def test_criu_that_is_a_string():
    assert "hello.criu must be a list" in refused({**HELLO, "criu": "x"})


def test_negative_size():
    assert "file.size must be an integer from 0" in refused({"op": "file", "name": "a", "size": -1})
    assert "hello.memory" in refused({**HELLO, "memory": -1})


@pytest.mark.parametrize(
    "msg, words",
    [
        ({"op": "file", "name": "../x", "size": 1}, "plain file name"),
        ({"op": "file", "name": "a/b", "size": 1}, "plain file name"),
        ({"op": "file", "name": "..", "size": 1}, "plain file name"),
        ({"op": "file", "name": "", "size": 1}, "plain file name"),
        ({"op": "file", "name": "a", "size": True}, "integer"),
        ({"op": "file", "name": "a", "size": 1.5}, "integer"),
        ({"op": "file", "name": "a", "size": 1 << 63}, "integer"),
        ({"op": "file", "name": "a", "size": 1, "extra": 1}, "unknown field 'extra'"),
        ({"op": "rm -rf /"}, "unknown operation"),
        ({"size": 1}, "lacks its operation"),
        ([1, 2], "must be an object"),
        ({**HELLO, "token": "short"}, "token"),
        ({**HELLO, "token": "../../etc/passwd0000"}, "token"),
        ({**HELLO, "ct": "a/b"}, "container id"),
        ({**HELLO, "mode": "fast"}, "one of"),
        ({**HELLO, "dry_run": 1}, "true or false"),
        ({"op": "restore", "config": {"id": "ct1", "cgroup": "/sys"}}, "unknown field 'cgroup'"),
        ({"op": "restore", "config": {"id": "ct1", "incoming": {}}}, "unknown field 'incoming'"),
        ({"op": "restore", "config": {"id": "ct1", "argv": []}}, "list of 1"),
        ({"op": "restore", "config": {"id": "ct1", "root": "rel"}}, "absolute path"),
        # protocol 3: the page channel is a Unix socket, no port anywhere
        ({"op": "restore", "config": {"id": "ct1"}, "lazy_port": 1}, "unknown field 'lazy_port'"),
        ({"op": "page-channel", "path": "/x"}, "unknown field 'path'"),
        ({"op": "sha256", "name": "a", "hex": "zz"}, "SHA-256"),
    ],
)
def test_more_that_is_refused(msg, words):
    assert words in refused(msg)


KEY = "ab" * 64


@pytest.mark.parametrize(
    "msg, words",
    [
        ({"op": "page-channel", "path": "rel/pages.sock", "key": KEY}, "socket path"),
        ({"op": "page-channel", "path": "/tmp/a b/pages.sock", "key": KEY}, "socket path"),
        ({"op": "page-channel", "path": "/" + "a" * 107, "key": KEY}, "path"),
        ({"op": "page-channel", "path": "/tmp/x/pages.sock", "key": KEY[:-2]}, "128 lowercase"),
        ({"op": "page-channel", "path": "/tmp/x/pages.sock", "key": KEY.upper()}, "128 lowercase"),
        ({"op": "page-channel", "path": "/tmp/x/pages.sock"}, "required field 'key'"),
        ({"op": "page-server", "port": 1234}, "unknown field 'port'"),
    ],
)
def test_the_target_s_page_channel_is_checked(msg, words):
    assert words in refused(msg, messages.FROM_TARGET)


def test_a_good_page_channel_passes():
    msg = {"op": "page-channel", "path": "/tmp/.pycpt-pages-x1/pages.sock", "key": KEY}
    assert messages.check(dict(msg), messages.FROM_TARGET, "the target") == msg


def test_each_side_accepts_only_its_peers_operations():
    assert "unknown operation 'hello'" in refused(dict(HELLO), messages.FROM_TARGET)
    assert "unknown operation 'ready'" in refused({"op": "ready"}, messages.FROM_SOURCE)


def test_not_json_and_oversized_headers():
    with pytest.raises(MigrationProtocolError, match="not JSON"):
        parse(b"{nope", messages.FROM_SOURCE, "the source")
    r, w = os.pipe()
    ch = Channel(r, os.open(os.devnull, os.O_WRONLY), accepts=messages.FROM_SOURCE, sends={})
    try:
        os.write(w, struct.pack(">I", 1 << 30))
        with pytest.raises(MigrationProtocolError, match="byte message header"):
            ch.receive(timeout=5)
    finally:
        ch.close()
        os.close(r)
        os.close(w)
        os.close(ch.out)


# --- properties ------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
OPS = sorted(set(messages.FROM_SOURCE) | set(messages.FROM_TARGET))


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(JSON, st.fixed_dictionaries({"op": st.sampled_from(OPS)}, optional={"x": JSON})))
def test_any_value_is_a_message_or_a_protocol_error(value):
    """Whatever arrives, the parser answers with a checked message or MigrationProtocolError,
    never another exception (a KeyError or TypeError would skip the rollback's reporting)."""
    for table in (messages.FROM_SOURCE, messages.FROM_TARGET):
        try:
            out = messages.check(value, table)
        except MigrationProtocolError:
            continue
        assert out["op"] in table


def value_for(field: messages.Field) -> st.SearchStrategy:
    """A strategy of values `field` accepts."""
    if isinstance(field, messages.Int):
        return st.integers(field.lo, field.hi)
    if isinstance(field, messages.Float):
        return st.floats(field.lo, field.hi, allow_nan=False)
    if isinstance(field, messages.Bool):
        return st.booleans()
    if isinstance(field, messages.FileName):
        return st.from_regex(r"[A-Za-z0-9_.-]{1,40}", fullmatch=True).filter(
            lambda s: s not in (".", "..")
        )
    if isinstance(field, messages.Text):
        if field.pattern is not None:
            return st.from_regex(field.pattern, fullmatch=True).filter(
                lambda s: len(s) <= field.max and "\x00" not in s
            )
        return st.text(max_size=40).filter(lambda s: "\x00" not in s)
    if isinstance(field, messages.OneOf):
        return st.sampled_from(field.choices)
    if isinstance(field, messages.Maybe):
        return st.none() | value_for(field.inner)
    if isinstance(field, messages.ListOf):
        return st.lists(value_for(field.item), min_size=field.lo, max_size=min(field.hi, 4))
    if isinstance(field, messages.MapOf):
        return st.dictionaries(value_for(field.key), value_for(field.value), max_size=3)
    if isinstance(field, messages.Record):
        return record(field.required, field.optional)
    raise AssertionError(f"no strategy for {field!r}")


def record(required, optional) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {k: value_for(v) for k, v in required.items()},
        optional={k: value_for(v) for k, v in optional.items()},
    )


def message(table) -> st.SearchStrategy:
    return st.sampled_from(sorted(table)).flatmap(
        lambda op: record(table[op].required, table[op].optional).map(lambda f: {"op": op, **f})
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(message(messages.FROM_SOURCE))
def test_valid_messages_pass_unchanged_through_the_wire(msg):
    raw = json.dumps(msg).encode()
    assert parse(raw, messages.FROM_SOURCE, "the source") == json.loads(raw)


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(message(messages.FROM_TARGET), st.data())
def test_a_missing_or_mistyped_field_is_refused(msg, data):
    op = messages.FROM_TARGET[msg["op"]]
    if not op.required:
        return
    name = data.draw(st.sampled_from(sorted(op.required)))
    broken = dict(msg)
    if data.draw(st.booleans()):
        del broken[name]
    else:
        wrong = data.draw(
            st.sampled_from([[1], {"a": 1}, "x" * 70000, -1, 1 << 63, None, True]).filter(
                lambda v: _rejects(op.required[name], v)
            )
        )
        broken[name] = wrong
    with pytest.raises(MigrationProtocolError, match=f"{msg['op']}"):
        messages.check(broken, messages.FROM_TARGET)


def _rejects(field: messages.Field, value: Any) -> bool:
    try:
        field.check(value, "x")
    except MigrationProtocolError:
        return True
    return False


# --- the channel ------------------------------------------------------------------------------


def channel_pair(silence: float = 2.0):
    """Two Channels joined by pipes: a (source side) and b (target side)."""
    ab_r, ab_w = os.pipe()
    ba_r, ba_w = os.pipe()
    a = Channel(
        ba_r, ab_w, accepts=messages.FROM_TARGET, sends=messages.FROM_SOURCE, silence=silence
    )
    b = Channel(
        ab_r, ba_w, accepts=messages.FROM_SOURCE, sends=messages.FROM_TARGET, silence=silence
    )
    return a, b, (ab_r, ab_w, ba_r, ba_w)


@pytest.fixture
def pair():
    a, b, fds = channel_pair()
    yield a, b
    a.close()
    b.close()
    for fd in fds:
        os.close(fd)


def test_messages_and_files_cross(pair, tmp_path):
    a, b = pair
    a.send("hello", **{k: v for k, v in HELLO.items() if k != "op"})
    assert b.expect("hello") == HELLO
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "x.img").write_bytes(os.urandom(3 << 20))
    sender = threading.Thread(target=a.send_files, args=(src, ["x.img"]))
    sender.start()
    assert b.receive_files(dst, space_left=4 << 20) == (1, 3 << 20)
    sender.join()
    assert (dst / "x.img").read_bytes() == (src / "x.img").read_bytes()


def test_files_beyond_the_free_space_are_refused(pair, tmp_path):
    a, b = pair
    src = tmp_path / "src"
    src.mkdir()
    (src / "x.img").write_bytes(b"y" * 1000)
    sender = threading.Thread(target=a.send_files, args=(src, ["x.img"]), daemon=True)
    sender.start()
    with pytest.raises(errors.TargetIncompatibleError, match="not enough space"):
        b.receive_files(tmp_path, space_left=999)


def test_a_silent_peer_is_noticed_and_heartbeats_keep_one_alive(pair):
    a, b = pair
    started = time.monotonic()
    with pytest.raises(PeerSilentError, match="nothing came from"):
        b.receive()
    assert 1.9 < time.monotonic() - started < 10
    a.start_heartbeats(interval=0.5)
    b.last_heard = time.monotonic()
    assert b.receive(timeout=5) is None  # 5 s of heartbeats only: alive, nothing to return
    assert b.peer_beat["op"] == "hb"


def test_a_peer_that_takes_nothing_is_noticed_while_sending(pair, tmp_path):
    a, b = pair
    src = tmp_path / "src"
    src.mkdir()
    (src / "big.img").write_bytes(b"z" * (32 << 20))  # more than the reader and a pipe hold
    with pytest.raises(PeerSilentError, match="has taken nothing"):
        a.send_files(src, ["big.img"])


def test_our_own_malformed_message_never_leaves(pair):
    a, b = pair
    with pytest.raises(MigrationProtocolError):
        a.send("file", name="../x", size=1)
    with pytest.raises(MigrationProtocolError):
        a.send("hello")


# --- the real agent ---------------------------------------------------------------------------


class Agent:
    """`pycpt migrate-target CT` run here, with its own state directory, spoken to directly
    through its stdin and stdout as a source would (no ssh)."""

    def __init__(self, tmp_path: Path, ct: str = "ct1") -> None:
        self.state = tmp_path / "state"
        env = {
            **os.environ,
            "PYCPT_STATE_DIR": str(self.state),
            "PYCPT_CGROUP_PARENT": f"pycpt-test-{os.getpid()}-agent",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pycpt", "migrate-target", ct],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.ch = Channel(
            self.proc.stdout,
            self.proc.stdin,
            accepts=messages.FROM_TARGET,
            sends={},
            peer="the agent",
        )

    def raw(self, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.proc.stdin.write(struct.pack(">I", len(data)) + data)
        self.proc.stdin.flush()

    def error(self) -> str:
        with pytest.raises(errors.MigrationError) as info:
            self.ch.expect("ready", timeout=60)
        return str(info.value)

    def close(self) -> int:
        self.proc.stdin.close()
        rc = self.proc.wait(60)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc


@pytest.fixture
def agent(tmp_path):
    made = []

    def start(ct: str = "ct1") -> Agent:
        a = Agent(tmp_path, ct)
        made.append(a)
        return a

    yield start
    for a in made:
        if a.proc.poll() is None:
            a.proc.kill()
        a.close()


def assert_no_trace(a: Agent, ct: str = "ct1") -> None:
    assert not (a.state / "ct" / ct / "state.json").exists()
    assert not list(Path("/dev/shm").glob(f".pycpt-incoming-{ct}-*"))


@pytest.mark.parametrize(
    "first, words",
    [
        ({k: v for k, v in HELLO.items() if k != "token"}, "lacks the required field 'token'"),
        ({**HELLO, "criu": "x"}, "hello.criu must be a list"),
        ({**HELLO, "memory": -1}, "hello.memory must be an integer from 0"),
        ({**HELLO, "ct": "other"}, "hello names container 'other'"),
        ({"op": "resume"}, "'resume' where 'hello' belongs"),
    ],
)
def test_the_agent_refuses_a_bad_hello_and_says_why(agent, first, words):
    a = agent()
    a.raw(first)
    text = a.error()
    assert words in text and text.startswith("on the target:"), text
    assert a.close() == 1
    assert_no_trace(a)


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"op": "file", "size": 3}, "file lacks the required field 'name'"),
        ({"op": "file", "name": "../../evil", "size": 3}, "plain file name"),
        ({"op": "file", "name": "cpuinfo.img", "size": [1]}, "file.size must be an integer"),
        ({"op": "file", "name": "cpuinfo.img", "size": -1}, "file.size must be an integer"),
        ({"op": "file", "name": "cpuinfo.img", "size": 2 << 20}, "not enough space"),
    ],
)
def test_the_agent_refuses_a_bad_file_and_says_why(agent, tmp_path, bad, words):
    a = agent()
    a.raw(HELLO)
    a.raw(bad)
    text = a.error()
    assert words in text, text
    assert a.close() == 1
    assert_no_trace(a)
    assert not (tmp_path / "evil").exists()
