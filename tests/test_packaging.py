"""The source distribution carries what the build needs (issue 14.14); `make package-check`
(run by `make test`, so by CI) installs the sdist and the wheel into fresh virtualenvs and
runs `pycpt --version`, the C extension and `pycpt check` there."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_sdist_carries_the_build_and_the_metadata_is_current(tmp_path):
    pytest.importorskip("build")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--sdist",
            "-o",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "deprecated" not in (r.stdout + r.stderr).lower()  # e.g. the license table form
    (sdist,) = tmp_path.glob("pycpt-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for area in ("rpc", "freezer", "container", "fs", "ns"):
        for ext in (".c", ".h", ".cdef"):
            assert f"csrc/{area}{ext}" in names, f"csrc/{area}{ext} missing from the sdist"
    assert "csrc/build_ffi.py" in names and "pycpt/py.typed" in names
    assert "setup.py" in names and "pyproject.toml" in names
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(project["license"], str)  # SPDX string, not the deprecated table


def test_ci_runs_the_package_check():
    makefile = (ROOT / "Makefile").read_text()
    assert "package-check" in makefile.split("test: lint", 1)[1].split("\n\n", 1)[0]
    assert 'pycpt" check' in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
