"""The Python API as a user meets it (issue 14.11, 14.12): errors, reprs, enums, names."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import pycpt
from pycpt import errors
from pycpt.container import Container
from pycpt.criu import OPTION_ALIASES, OPTION_NAMES

PACKAGE = Path(pycpt.__file__).parent


def test_every_exception_derives_from_pycpt_error():
    classes = [
        c for _, c in inspect.getmembers(errors, inspect.isclass) if c.__module__ == errors.__name__
    ]
    assert classes and all(issubclass(c, pycpt.PycptError) for c in classes)
    assert issubclass(pycpt.InvalidArgumentError, ValueError)


def test_bad_arguments_are_not_plain_value_errors():
    """No `raise ValueError/TypeError(...)` in the API: a bad argument is an
    InvalidArgumentError (PycptError and ValueError), with a hint where one helps. Internal
    parsers whose ValueError is caught and turned into a DumpFileCorruptError or ImageError
    are the exceptions."""
    internal = {
        "dumpfile/_manifest.py",  # bad data, caught by the reader and said as damage
        "dumpfile/_format1.py",
        "dumpfile/_keys.py",
        "dumpfile/_tar.py",
        "engine/_find.py",
        "testing/testhosts.py",
    }
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = str(path.relative_to(PACKAGE))
        if rel in internal or rel.startswith("images/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call):
                name = getattr(node.exc.func, "id", None)
                if name in ("ValueError", "TypeError"):
                    bad.append(f"{rel}:{node.lineno}")
    assert bad == []


@pytest.mark.parametrize("ct", ["../x", "", "a b", "x" * 200, 3])
def test_a_bad_id_says_what_an_id_is(ct, tmp_path):
    with pytest.raises(pycpt.InvalidArgumentError) as ei:
        Container(ct, state_dir_path=str(tmp_path))
    assert isinstance(ei.value, ValueError) and "letters, digits" in ei.value.hint


def test_a_command_as_one_string_is_refused(tmp_path):
    with pytest.raises(pycpt.InvalidArgumentError, match="list of words") as ei:
        Container.start("x", "sleep 100", state_dir_path=str(tmp_path))  # type: ignore[arg-type]
    assert "shlex.split" in ei.value.hint
    assert not (tmp_path / "ct" / "x" / "state.json").exists()


def test_a_missing_executable_has_a_hint(tmp_path):
    with pytest.raises(pycpt.InvalidArgumentError, match="no executable 'no-such-prog'") as ei:
        Container.start("x", ["no-such-prog"], state_dir_path=str(tmp_path))
    assert "PATH" in ei.value.hint


def test_reprs_are_readable(tmp_path):
    assert repr(Container("web", state_dir_path=str(tmp_path))) == (
        f"<Container 'web' absent in {str(tmp_path)!r}>"
    )
    assert repr(pycpt.Criu(["/bin/false"])) == "<Criu '/bin/false' session=closed>"


def test_enums_print_their_names():
    assert str(pycpt.FreezerState.FROZEN) == f"{pycpt.FreezerState.FROZEN}" == "FROZEN"
    assert pycpt.FreezerState.FROZEN == int(pycpt.FreezerState.FROZEN)  # still an int
    assert str(pycpt.NetworkLock.NFTABLES) == "NFTABLES"
    assert str(pycpt.RequestType.DUMP) == "DUMP"
    assert f"{pycpt.RequestType.DUMP:d}" == str(int(pycpt.RequestType.DUMP))
    assert str(pycpt.ContainerStatus.RUNNING) == f"{pycpt.ContainerStatus.RUNNING}" == "running"


def test_the_namespace_is_the_api():
    code = (
        "import pycpt, pycpt.container, pycpt.criu; "
        "print(*[n for n in dir(pycpt) if not n.startswith('_')])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == pycpt.__all__
    for name in ("Optional", "TYPE_CHECKING", "container", "criu"):
        assert name not in pycpt.__all__
    assert "list_containers" in pycpt.__all__ and "InvalidArgumentError" in pycpt.__all__


# --- CRIU options under criu's own names -------------------------------------------------------


def test_criu_option_aliases_sizes_and_namespaces():
    from pycpt._criu.options import build_options, command_line_args

    opts = build_options(
        {
            "skip_in_flight": True,
            "restore_sibling": True,
            "cgroup_root": "freezer:/ct1",
            "ext_mount_map": {"/a": "b"},
            "enable_external_masters": True,
            "manage_cgroups": "full",
            "ghost_limit": "1G",
            "empty_ns": "net",
            "inherit_fd": "fd[3]:key",
            "--tcp-established": True,
        }
    )
    assert opts.tcp_skip_in_flight and opts.rst_sibling and opts.ext_masters
    assert opts.tcp_established
    assert [(r.ctrl, r.path) for r in opts.cg_root] == [("freezer", "/ct1")]
    assert [(m.key, m.val) for m in opts.ext_mnt] == [("/a", "b")]
    assert opts.manage_cgroups and opts.manage_cgroups_mode == pycpt.CgroupMode.FULL
    assert opts.ghost_limit == 1 << 30
    assert opts.empty_ns == 0x40000000  # CLONE_NEWNET
    assert [(f.key, f.fd) for f in opts.inherit_fd] == [("key", 3)]
    assert build_options({"ghost_limit": "512K"}).ghost_limit == 512 << 10
    assert build_options({"ghost_limit": 4096}).ghost_limit == 4096
    assert set(OPTION_ALIASES.values()) <= set(OPTION_NAMES)
    # and back to criu's command line, under its names
    assert command_line_args({"tcp_skip_in_flight": True}) == ("--skip-in-flight",)


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("tcp_establshed", "tcp_established"),
        ("skip_in_flite", "skip_in_flight"),
        ("restore_sibbling", "restore_sibling"),
        ("cgroup_rot", "cgroup_root"),
    ],
)
def test_a_near_miss_says_did_you_mean(name, suggestion):
    from pycpt._criu.options import build_options

    with pytest.raises(pycpt.InvalidArgumentError, match=f"unknown CRIU option '{name}'") as ei:
        build_options({name: True})
    assert ei.value.hint.startswith("did you mean") and suggestion in ei.value.hint
    assert len(str(ei.value)) < 400  # not the list of ~70 names


@pytest.mark.parametrize(
    "opts", [{"ghost_limit": "lots"}, {"empty_ns": "pid"}, {"ext_mount_map": ["nocolon"]}]
)
def test_bad_option_values_are_invalid_arguments(opts):
    from pycpt._criu.options import build_options

    with pytest.raises(pycpt.InvalidArgumentError):
        build_options(opts)


def test_an_option_given_under_both_names_is_refused():
    from pycpt._criu.options import build_options

    with pytest.raises(pycpt.InvalidArgumentError, match="given twice"):
        build_options({"rst_sibling": True, "restore_sibling": True})


def test_criu_error_says_criu_s_first_line_once():
    exc = errors.CriuError(
        "CRIU DUMP failed",
        cr_errmsg="Error (criu/x.c:1): boom",
        log_lines=["Error (criu/x.c:1): boom", "Error (criu/y.c:2): then this"],
    )
    assert str(exc).count("boom") == 1 and "then this" in str(exc)


def test_dump_into_a_missing_directory_refuses(engine, tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    target = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        with pycpt.Criu(engine) as criu, pytest.raises(pycpt.ImagesDirError) as ei:
            criu.dump(target.pid, missing, leave_running=True)
        assert "does not exist" in str(ei.value) and "mkdir -p" in ei.value.hint
        assert not (tmp_path / "no").exists() and target.poll() is None
    finally:
        target.kill()
        target.wait()
