"""The `pycpt` command, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pycpt
from tests.helpers.cgroups import wait_until
from tests.helpers.cli import run
from tests.helpers.schemas import validate


def test_version():
    out = run("--version", check=True).stdout
    assert out.strip() == f"pycpt {pycpt.__version__}"


def test_demo_checkpoints_restores_and_migrates(engine):
    r = run("demo", "--mib", "16", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    for verb in (
        "pycpt start",
        "pycpt chkpnt demo:",
        "pycpt restore demo:",
        "--suspend",
        "--dump",
        "--kill",
        "--undump",
        "--resume",
        "pycpt migrate --online dst web",
    ):
        assert verb in r.stdout
    assert r.stdout.count("continued exactly") == 3
    assert "gone from src" in r.stdout
    figures = json.loads(r.stdout[r.stdout.index("{") :])
    assert figures["memory_ok"] and figures["computation_ok"] and figures["ok"]
    assert figures["chkpnt_s"] > 0 and figures["restore_s"] > 0


def test_check_json(engine):
    r = run("check", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["ok"] else 1)
    assert any(item["name"] == "CRIU engine" for item in report["items"])


def test_check_fails_without_criu(tmp_path):
    env = {**os.environ, "PYCPT_CRIU": str(tmp_path / "missing-criu")}
    r = subprocess.run(
        [sys.executable, "-m", "pycpt", "check"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 1
    assert "pycpt engine install" in r.stdout


def test_criu_version(engine):
    assert run("criu", "version", check=True).stdout.strip() == engine.version_string


def test_dump_of_a_missing_pid_says_what_to_do(engine):
    r = run("criu", "dump", "4194000", "/tmp/pycpt-cli-never-created")
    assert r.returncode == 1
    assert "no process with pid 4194000" in r.stderr and "hint:" in r.stderr
    assert not os.path.exists("/tmp/pycpt-cli-never-created")


def test_bad_option_is_a_usage_error(engine, tmp_path):
    target = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        r = run(
            "criu",
            "dump",
            str(target.pid),
            str(tmp_path / "img"),
            "--leave-running",
            "--opt",
            "no_such_option=1",
        )
        assert r.returncode == 2 and "unknown CRIU option 'no_such_option'" in r.stderr
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_freeze_of_a_non_cgroup(tmp_path):
    r = run("freeze", str(tmp_path))
    assert r.returncode == 1 and "hint:" in r.stderr


def test_container_verbs(ctenv):
    def pycpt_cmd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "pycpt", *args],
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ),
        )

    loop = "while :; do sleep 0.05; done"
    assert pycpt_cmd("start", "c1", "--", "/bin/sh", "-c", loop).returncode == 0
    assert pycpt_cmd("status", "c1").stdout.strip() == "running"
    assert "c1" in pycpt_cmd("list").stdout
    assert pycpt_cmd("exec", "c1", "--", "hostname").stdout.strip() == "c1"
    r = pycpt_cmd("chkpnt", "c1", "--kill")
    assert r.returncode == 1 and "it is running" in r.stderr and "hint:" in r.stderr
    for args, status in (
        (["chkpnt", "c1", "--suspend"], "suspended"),
        (["chkpnt", "c1", "--dump"], "suspended (dumped, still frozen)"),
        (["chkpnt", "c1", "--kill"], "dumped"),
        (["restore", "c1", "--undump"], "undumped"),
        (["restore", "c1", "--resume"], "running"),
        (["chkpnt", "c1"], "dumped"),
        (["restore", "c1"], "running"),
        (["stop", "c1"], "stopped"),
    ):
        r = pycpt_cmd(*args)
        assert r.returncode == 0, r.stderr
        assert pycpt_cmd("status", "c1").stdout.strip() == status
    r = pycpt_cmd("status", "nope")
    assert r.returncode == 1 and "no container nope" in r.stderr
    r = pycpt_cmd("start", "../x", "--", "true")
    assert r.returncode == 2 and "invalid container id" in r.stderr


# --- the command line's shape (issue 14) ------------------------------------------------------


def _walk(parser, path=()):
    """(path, parser) for the parser and every verb below it."""
    import argparse

    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _walk(sub, (*path, name))


def test_options_after_the_id_are_options(ctenv):
    # issue 14.2: `start web --share-net -- CMD` took --share-net for the command
    r = run("start", "o1", "--share-net", "--", "/bin/sh", "-c", "sleep 1000")
    assert r.returncode == 0, r.stderr
    try:
        r = run("exec", "o1", "--", "readlink", "/proc/1/ns/net")
        assert r.stdout.strip() == os.readlink("/proc/self/ns/net")  # the host's network
        # the command keeps its own options and `--` untouched
        r = run("exec", "o1", "--", "sh", "-c", 'echo "$@"', "sh", "--share-net", "--", "x")
        assert r.stdout.strip() == "--share-net -- x"
        # --state-dir after the verb, too
        r = run("status", "o1", "--state-dir", os.environ["PYCPT_STATE_DIR"])
        assert r.returncode == 0 and r.stdout.strip() == "running"
    finally:
        run("stop", "o1")


def test_exec_reports_a_signal_as_shells_do(ctenv):
    # issue 14.8: `exec -- sh -c 'kill -9 $$'` exited 247 (-9 & 0xff); shells say 137
    assert run("start", "s1", "--", "/bin/sh", "-c", "sleep 1000").returncode == 0
    try:
        assert run("exec", "s1", "--", "sh", "-c", "kill -9 $$").returncode == 128 + 9
        assert run("exec", "s1", "--", "sh", "-c", "exit 3").returncode == 3
    finally:
        run("stop", "s1")


def test_hidden_verbs_are_hidden_and_every_verb_and_argument_says_what_it_is():
    # issue 14.10
    out = run("--help", check=True).stdout
    assert "SUPPRESS" not in out and "migrate-target" not in out
    from pycpt.cli import build_parser

    missing = []
    for path, parser in _walk(build_parser()):
        if path and path[-1] == "migrate-target":
            continue
        if path and not parser.description:
            missing.append(" ".join(path))
        for action in parser._actions:
            if action.help is None and action.dest != "help":
                missing.append(f"{' '.join(path)} {action.dest}")
    assert missing == []


def test_exit_statuses_are_in_the_help():
    out = run("--help", check=True).stdout
    for status in ("0 ", "1 ", "2 ", "130", "128+N"):
        assert status in out


def test_a_closed_pipe_is_no_traceback(tmp_path):
    # issue 14.10: `pycpt list | head -1` ended in a BrokenPipeError traceback
    state = tmp_path / "state"
    for ct in ("a", "b"):
        (state / "ct" / ct).mkdir(parents=True)
        (state / "ct" / ct / "state.json").write_text('{"id": "%s", "phase": "stopped"}' % ct)
    r = subprocess.run(
        f"{sys.executable} -m pycpt --state-dir {state} --help | head -c1 >/dev/null; "
        f"{sys.executable} -m pycpt --state-dir {state} list | head -c0",
        shell=True,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr


# --- containers: rm, logs, list, status, exit status, freeze (issue 14.1, 14.3, 14.6, 14.9) ----


def _json(*args: str):
    r = run(*args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_rm_refuses_what_would_be_lost(ctenv):
    # issue 14.1: a container could not be removed at all
    loop = "while :; do sleep 0.05; done"
    assert run("start", "r1", "--", "/bin/sh", "-c", loop).returncode == 0
    r = run("rm", "r1")
    assert r.returncode == 1 and "would kill its processes" in r.stderr and "--force" in r.stderr
    assert run("chkpnt", "r1").returncode == 0
    dump = ctenv / "state" / "dump" / "Dump.r1"
    assert dump.is_file()
    r = run("rm", "r1")
    assert r.returncode == 1 and "would delete it" in r.stderr and "--keep-dumpfile" in r.stderr
    assert dump.is_file() and run("status", "r1").stdout.strip() == "dumped"
    r = run("rm", "r1", "--keep-dumpfile")
    assert r.returncode == 0 and dump.is_file()
    assert run("status", "r1").returncode == 1  # gone
    # a running one goes with --force, its dump file too; a restored one is the same id again
    assert run("restore", "r1").returncode == 0
    r = run("rm", "--force", "r1")
    assert r.returncode == 0 and f"removed dump file {dump}" in r.stdout and not dump.exists()
    assert run("list").stdout.strip().splitlines()[1:] == []
    assert not (ctenv / "state" / "ct" / "r1").exists()


def test_exit_status_logs_list_and_status_json(ctenv):
    # issue 14.6 and 14.3: the exit status is kept; logs; a list with a header; --json
    r = run("start", "e3", "--", "/bin/sh", "-c", "echo out; echo err >&2; exit 3")
    assert r.returncode == 0, r.stderr
    assert run("start", "e0", "--", "/bin/true").returncode == 0
    assert run("start", "lv", "--", "/bin/sh", "-c", "echo up; sleep 1000").returncode == 0
    try:
        for ct, code in (("e3", 3), ("e0", 0)):
            assert wait_until(lambda ct=ct: _json("status", ct)["status"] == "stopped", 30)
            info = _json("status", ct)
            assert info["exit_status"] == code and info["init_pid"] is None
            assert run("status", ct).stdout.strip() == f"stopped (exit status {code})"
        assert run("logs", "e3").stdout == "out\nerr\n"
        # its empty cgroup went with it (the monitor removed it)
        assert not os.path.isdir(_json("status", "e3")["cgroup"])
        lines = run("list").stdout.splitlines()
        assert lines[0].split() == [
            "ID",
            "STATUS",
            "INIT",
            "PID",
            "CREATED",
            "DUMP",
            "FILE",
            "SIZE",
            "EXIT",
        ]
        rows = {ln.split()[0]: ln.split() for ln in lines[1:]}
        assert rows["e3"][1] == "stopped" and rows["e3"][-1] == "3"
        assert rows["lv"][1] == "running" and rows["lv"][-1] == "-"
        listed = _json("list")
        assert sorted(c["id"] for c in listed) == ["e0", "e3", "lv"]
        validate(listed, "list")
        validate(_json("status", "lv"), "status")
        # -f follows until the container stops
        follow = subprocess.Popen(
            [sys.executable, "-m", "pycpt", "logs", "-f", "lv"], stdout=subprocess.PIPE, text=True
        )
        assert follow.stdout is not None and follow.stdout.readline() == "up\n"
        assert run("stop", "lv").returncode == 0
        assert follow.wait(timeout=30) == 0
    finally:
        run("stop", "lv")


def test_freeze_thaw_kill_take_a_container_id(ctenv):
    # issue 14.9: `pycpt freeze ct2` said "no such cgroup directory"; status said running
    assert run("start", "f1", "--", "/bin/sh", "-c", "sleep 1000").returncode == 0
    try:
        assert run("freeze", "f1").returncode == 0
        assert run("status", "f1").stdout.strip() == "frozen"
        r = run("exec", "f1", "--", "true")
        assert r.returncode == 1 and "it is frozen" in r.stderr
        assert run("thaw", "f1").returncode == 0
        assert run("status", "f1").stdout.strip() == "running"
        cgroup = _json("status", "f1")["cgroup"]
        assert run("freeze", cgroup).returncode == 0  # a cgroup path still works
        assert run("status", "f1").stdout.strip() == "frozen"
        assert run("thaw", cgroup).returncode == 0
        assert run("kill", "f1").returncode == 0
        assert run("status", "f1").stdout.strip() == "stopped"
    finally:
        run("stop", "f1")


def test_chkpnt_and_restore_take_criu_options(ctenv):
    """issue 12.3: --ghost-limit, --link-remap, --skip-in-flight, --tcp-close and
    --criu-opt NAME=VALUE on chkpnt (and --tcp-close / --criu-opt on restore); bad ones are
    usage errors that change nothing; the stages that run no CRIU refuse them."""
    from pycpt import dumpfile

    assert run("start", "o2", "--", "/bin/sh", "-c", "sleep 1000").returncode == 0
    for args, text in (
        (["--ghost-limit", "lots"], "takes a size"),
        (["--criu-opt", "nosuch=1"], "unknown CRIU option 'nosuch'"),
        (["--criu-opt", "tcp_close=maybe"], "takes true or false"),
        (["--criu-opt", "leave-running"], "set by pycpt"),
        (["--suspend", "--tcp-close"], "do not apply to --suspend"),
    ):
        r = run("chkpnt", "o2", *args)
        assert r.returncode == 2 and text in r.stderr, (args, r.stderr)
        assert run("status", "o2").stdout.strip() == "running"
    dump = str(ctenv / "o2.dump")
    r = run(
        "chkpnt", "o2", "--dumpfile", dump, "--ghost-limit", "64M", "--link-remap",
        "--no-skip-in-flight", "--criu-opt", "tcp-close", "--criu-opt", "timeout=30",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert dumpfile.read_manifest(dump).config["criu_options"]["tcp_close"] is True
    r = run("restore", "o2", "--dumpfile", dump, "--criu-opt", "ghost_limit=1M")
    assert r.returncode == 2 and "dump option" in r.stderr
    r = run("restore", "o2", "--dumpfile", dump, "--tcp-close", "--criu-opt", "weak-sysctls")
    assert r.returncode == 0, r.stderr
    r = run("restore", "o2", "--resume", "--tcp-close")
    assert r.returncode == 2 and "do not apply" in r.stderr
    run("stop", "o2")
