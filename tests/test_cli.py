"""The `pycpt` command, run as a user would (a real subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import pycpt


def run(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pycpt", *args], capture_output=True,
                          text=True, timeout=300, check=check)


def test_version():
    out = run("--version", check=True).stdout
    assert out.strip() == f"pycpt {pycpt.__version__}"


def test_demo_checkpoints_and_restores(engine):
    r = run("demo", "--mib", "16", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    for verb in ("pycpt start", "pycpt chkpnt demo:", "pycpt restore demo:", "--suspend",
                 "--dump", "--kill", "--undump", "--resume"):
        assert verb in r.stdout
    assert r.stdout.count("continued exactly") == 2
    figures = json.loads(r.stdout[r.stdout.index("{"):])
    assert figures["memory_ok"] and figures["computation_ok"] and figures["ok"]
    assert figures["chkpnt_s"] > 0 and figures["restore_s"] > 0


def test_check_json(engine):
    r = run("check", "--json")
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["ok"] else 1)
    assert any(item["name"] == "CRIU engine" for item in report["items"])


def test_check_fails_without_criu(tmp_path):
    env = {**os.environ, "PYCPT_CRIU": str(tmp_path / "missing-criu")}
    r = subprocess.run([sys.executable, "-m", "pycpt", "check"], capture_output=True,
                       text=True, timeout=300, env=env)
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
        r = run("criu", "dump", str(target.pid), str(tmp_path / "img"), "--leave-running",
                "--opt", "no_such_option=1")
        assert r.returncode == 2 and "unknown CRIU option 'no_such_option'" in r.stderr
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()


def test_freeze_of_a_non_cgroup(tmp_path):
    r = run("freeze", str(tmp_path))
    assert r.returncode == 1 and "hint:" in r.stderr
