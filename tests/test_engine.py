"""Finding, verifying and installing the CRIU engine (pycpt.engine).

The fake `criu` scripts stand in for broken or old binaries that cannot be had for real here;
the managed install is real: one apt download per test session into a temporary prefix.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional

import pytest

from pycpt import engine
from pycpt.engine import Engine, find_engine, install_engine
from pycpt.errors import CriuBrokenError, CriuNotFoundError, CriuTooOldError, EngineError

VDSO_ERROR = "Error (criu/vdso.c:123): vdso: Unexpected rt vDSO area bounds"


def write_fake_criu(
    directory: Path,
    *,
    version: str = "4.2.1",
    check_rc: int = 0,
    check_output: str = "Looks good.",
    counter: Optional[Path] = None,
    name: str = "criu",
) -> Path:
    """A shell script answering `--version` and `check` like criu would."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    count = f'echo check >> "{counter}"' if counter else ":"
    path.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f'  --version) echo "Version: {version}"; echo "GitID: v{version}"; exit 0;;\n'
        f'  check) {count}; echo "{check_output}" >&2; exit {check_rc};;\n'
        "esac\n"
        "exit 2\n"
    )
    path.chmod(0o755)
    return path


@pytest.fixture
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No PYCPT_CRIU, an empty managed dir, and PATH = one empty directory (returned)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    managed = tmp_path / "no-engine"
    managed.mkdir()
    monkeypatch.delenv("PYCPT_CRIU", raising=False)
    monkeypatch.setenv("PYCPT_ENGINE_DIR", str(managed))
    monkeypatch.setenv("PATH", str(bindir))
    engine.clear_cache()
    yield bindir
    engine.clear_cache()


# --- pure logic -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Version: 4.2.1\nGitID: v4.2.1\n", (4, 2, 1)),
        ("Version: 4.2\n", (4, 2, 0)),
        ("Version: 3.17.1\n", (3, 17, 1)),
        ("criu: command not found\n", None),
    ],
)
def test_parse_version(text: str, expected: Optional[tuple]) -> None:
    assert engine.parse_version(text) == expected


def test_engine_command() -> None:
    e = Engine(
        argv=("/l", "--library-path", "/d", "/c"), path="/c", version=(4, 2, 1), source="managed"
    )
    assert e.command("swrk", "3") == ["/l", "--library-path", "/d", "/c", "swrk", "3"]
    assert e.version_string == "4.2.1"


def test_unmet_from_newer() -> None:
    apt_output = (
        "The following packages have unmet dependencies:\n"
        " criu : Depends: libnl-3-200 (>= 3.11.0) but 3.7.0-2 is to be installed\n"
        "        PreDepends: libc6 (>= 2.42) but 2.41-12 is to be installed\n"
        " libfoo1 : Depends: libnl-3-200 (>= 3.11.0) but 3.7.0-2 is to be installed\n"
        "E: Unable to correct problems, you have held broken packages.\n"
    )
    assert engine.unmet_from_newer(apt_output) == ["libnl-3-200", "libc6"]


def test_find_debian_mirror_deb822(tmp_path: Path) -> None:
    sources = tmp_path / "debian.sources"
    sources.write_text(
        "Types: deb\n"
        "URIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\n"
        "Components: main\n"
        "\n"
        "Types: deb\n"
        "# a comment\n"
        "URIs: http://mirror.example/debian/\n"
        "Suites: bookworm bookworm-updates\n"
        "Components: main contrib\n"
        "Signed-By: /usr/share/keyrings/some-keyring.gpg\n"
    )
    assert engine.find_debian_mirror([str(sources)]) == (
        "http://mirror.example/debian",
        "/usr/share/keyrings/some-keyring.gpg",
    )


def test_find_debian_mirror_one_line_skips_others(tmp_path: Path) -> None:
    other = tmp_path / "nodesource.list"
    other.write_text("deb https://repo.example/node_20.x nodistro main\n")
    disabled = tmp_path / "disabled.sources"
    disabled.write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: trixie\n"
        "Components: main\n"
    )
    classic = tmp_path / "sources.list"
    classic.write_text(
        "# deb http://commented.example/debian trixie main\n"
        "deb-src http://src.example/debian trixie main\n"
        "deb http://security.example/debian-security trixie-security main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian trixie main\n"
    )
    files = [str(other), str(disabled), str(classic)]
    assert engine.find_debian_mirror(files) == ("http://mirror.example/debian", "/k.gpg")


def test_find_debian_mirror_none(tmp_path: Path) -> None:
    only_security = tmp_path / "sources.list"
    only_security.write_text("deb http://security.example/debian-security bookworm-security main\n")
    with pytest.raises(EngineError, match="no Debian archive") as info:
        engine.find_debian_mirror([str(only_security)])
    assert str(only_security) in str(info.value)


def test_replace_dir(tmp_path: Path) -> None:
    target = tmp_path / "engine"
    first = tmp_path / "new1"
    first.mkdir()
    (first / "a").write_text("1")
    engine.replace_dir(str(first), str(target))
    assert (target / "a").read_text() == "1" and not first.exists()

    second = tmp_path / "new2"
    second.mkdir()
    (second / "b").write_text("2")
    engine.replace_dir(str(second), str(target))
    assert sorted(p.name for p in target.iterdir()) == ["b"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine"]


# --- finding, with fake binaries --------------------------------------------------------------


def test_nothing_found(isolated: Path) -> None:
    with pytest.raises(CriuNotFoundError) as info:
        find_engine()
    text = str(info.value)
    assert "pycpt engine install" in text
    assert os.environ["PYCPT_ENGINE_DIR"] in text


def test_too_old_on_path(isolated: Path) -> None:
    fake = write_fake_criu(isolated, version="3.17.1")
    with pytest.raises(CriuTooOldError) as info:
        find_engine()
    err = info.value
    assert "3.17.1" in str(err) and str(fake) in str(err) and "4.2.0" in str(err)
    assert err.version == (3, 17, 1) and err.path == str(fake)  # type: ignore[attr-defined]


def test_check_fails(isolated: Path) -> None:
    fake = write_fake_criu(isolated, version="4.2.0", check_rc=1, check_output=VDSO_ERROR)
    with pytest.raises(CriuBrokenError) as info:
        find_engine()
    assert VDSO_ERROR in str(info.value) and str(fake) in str(info.value)
    assert VDSO_ERROR in info.value.output  # type: ignore[attr-defined]
    # without verification only the version is read
    assert find_engine(verify=False).version == (4, 2, 0)


def test_check_result_cached_per_mtime(isolated: Path, tmp_path: Path) -> None:
    counter = tmp_path / "checks"
    fake = write_fake_criu(isolated, counter=counter)
    first = find_engine()
    assert find_engine() == first == Engine((str(fake),), str(fake), (4, 2, 1), "PATH")
    assert counter.read_text().split() == ["check"]
    st = fake.stat()
    os.utime(fake, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    find_engine()
    assert counter.read_text().split() == ["check", "check"]


def test_pycpt_criu_wins(isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_criu(isolated, version="4.2.1")
    chosen = write_fake_criu(tmp_path / "elsewhere", version="4.3.0", name="my-criu")
    monkeypatch.setenv("PYCPT_CRIU", str(chosen))
    found = find_engine()
    assert (found.source, found.path, found.version) == ("PYCPT_CRIU", str(chosen), (4, 3, 0))


def test_pycpt_criu_broken_is_an_error(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_criu(isolated, version="4.2.1")  # works, but was not asked for
    broken = write_fake_criu(tmp_path / "elsewhere", check_rc=1, check_output=VDSO_ERROR)
    monkeypatch.setenv("PYCPT_CRIU", str(broken))
    with pytest.raises(CriuBrokenError, match="PYCPT_CRIU"):
        find_engine()
    monkeypatch.setenv("PYCPT_CRIU", str(tmp_path / "missing" / "criu"))
    with pytest.raises(CriuNotFoundError, match="missing/criu"):
        find_engine()


def test_broken_managed_falls_back_to_path(isolated: Path) -> None:
    managed = Path(os.environ["PYCPT_ENGINE_DIR"])
    (managed / "engine.json").write_text("{ not json")
    fake = write_fake_criu(isolated)
    found = find_engine()
    assert (found.source, found.path) == ("PATH", str(fake))

    status = engine.engine_status()
    assert status["selected"]["source"] == "PATH"
    by_source = {c["source"]: c for c in status["candidates"]}
    assert not by_source["managed"]["ok"] and "engine.json" in by_source["managed"]["problem"]
    assert by_source["PATH"]["ok"] and by_source["PATH"]["version"] == "4.2.1"
    json.dumps(status)


def test_all_broken_reports_first_and_others(isolated: Path) -> None:
    (Path(os.environ["PYCPT_ENGINE_DIR"]) / "engine.json").write_text("[]")
    write_fake_criu(isolated, version="3.17.1")
    with pytest.raises(CriuBrokenError) as info:
        find_engine()
    assert "engine.json" in str(info.value) and "3.17.1" in str(info.value)


def test_status_lists_hidden_candidates(
    isolated: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_criu(isolated, version="3.17.1")
    chosen = write_fake_criu(tmp_path / "elsewhere")
    monkeypatch.setenv("PYCPT_CRIU", str(chosen))
    status = engine.engine_status()
    assert status["selected"]["path"] == str(chosen) and status["error"] is None
    rows = [(c["source"], c["ok"], c["considered"]) for c in status["candidates"]]
    assert rows == [("PYCPT_CRIU", True, True), ("managed", False, False), ("PATH", False, False)]
    assert "CriuTooOldError" in status["candidates"][2]["problem"]


# --- the real managed install (one download per session) ----------------------------------------


class Installed(NamedTuple):
    engine: Engine
    prefix: Path
    messages: List[str]


@pytest.fixture(scope="session")
def installed() -> Iterator[Installed]:
    missing = [tool for tool in ("apt-get", "dpkg-deb") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"installing the engine needs Debian's {' and '.join(missing)}, absent here")
    if os.geteuid() != 0:
        pytest.skip("installing the engine needs root (criu check runs as root)")
    top = Path(tempfile.mkdtemp(prefix="pycpt-engine-test-", dir="/tmp"))
    messages: List[str] = []
    try:
        prefix = top / "engine"
        found = install_engine(prefix=str(prefix), progress=messages.append)
        yield Installed(found, prefix, messages)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_install_gives_a_working_engine(installed: Installed) -> None:
    e = installed.engine
    assert e.source == "managed" and e.version >= engine.MIN_VERSION
    assert e.path == str(installed.prefix / "usr/sbin/criu")
    assert e.argv[0].startswith(str(installed.prefix)) and e.argv[1] == "--library-path"
    out = subprocess.run(
        e.command("--version"), stdout=subprocess.PIPE, check=True, text=True
    ).stdout
    assert engine.parse_version(out) == e.version

    manifest = engine.read_manifest(str(installed.prefix))
    assert manifest["version"] == e.version_string and list(manifest["argv"]) == list(e.argv)
    assert "criu" in manifest["packages"] and "libc6" in manifest["packages"]
    # the temporary apt and staging directories are gone
    leftovers = sorted(
        p.name for p in installed.prefix.parent.iterdir() if p.name != ".pycpt-engine.lock"
    )
    assert leftovers == ["engine"]
    text = "\n".join(installed.messages)
    assert "downloaded" in text and "MB" in text and f"installed CRIU {e.version_string}" in text


def test_install_is_idempotent(installed: Installed) -> None:
    manifest = installed.prefix / "engine.json"
    before = (manifest.read_bytes(), manifest.stat().st_mtime_ns)
    messages: List[str] = []
    again = install_engine(prefix=str(installed.prefix), progress=messages.append)
    assert again == installed.engine
    assert (manifest.read_bytes(), manifest.stat().st_mtime_ns) == before
    assert len(messages) == 1 and "already installed" in messages[0]


def test_managed_found_before_path(
    installed: Installed, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_criu(isolated)
    monkeypatch.setenv("PYCPT_ENGINE_DIR", str(installed.prefix))
    found = find_engine()  # runs the real `criu check`
    assert found == installed.engine


def test_pycpt_criu_may_name_a_managed_dir(
    installed: Installed, isolated: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYCPT_CRIU", str(installed.prefix))
    found = find_engine()
    assert found.source == "PYCPT_CRIU" and found.argv == installed.engine.argv
    # where the bare binary of a managed install cannot start without its loader, say so
    direct = subprocess.run([installed.engine.path, "--version"], capture_output=True, text=True)
    if "error while loading shared libraries" in direct.stderr:
        monkeypatch.setenv("PYCPT_CRIU", installed.engine.path)
        with pytest.raises(CriuBrokenError) as info:
            find_engine()
        assert "engine.json" in info.value.hint
