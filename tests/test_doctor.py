"""`pycpt check` (pycpt.doctor): every verdict is compared with what the test reads itself.

The report is computed on this machine, for real; only the broken engines are fakes (a
script claiming an old version, a path that does not exist), because a broken CRIU cannot
be had otherwise.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import gzip
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import pytest

from pycpt import doctor
from pycpt import engine as engine_mod
from pycpt.doctor import Item, Report, Verdict, run_checks
from pycpt.engine import Engine, find_engine
from pycpt.errors import EngineError

EXPECTED = {
    "kernel": [
        "kernel version",
        "CONFIG_CHECKPOINT_RESTORE",
        "namespaces",
        "userfaultfd",
        "soft-dirty",
        "PAGEMAP_SCAN",
    ],
    "privileges": [
        "root",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
        "CAP_CHECKPOINT_RESTORE",
        "CAP_SYS_RESOURCE",
    ],
    "CRIU": ["CRIU engine", "CRIU check", "CRIU features", "CRIU kernel-probe cache"],
    "cgroup freezer": ["freezer v1", "freezer v2"],
    "network": ["network lock", "network hold"],
    "sysctl": ["fs.pipe-max-size", "kernel.ns_last_pid"],
}


# --- what the tests read themselves ---------------------------------------------------------


def cap_eff() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff in /proc/self/status")


def has_cap(bit: int) -> bool:
    return bool(cap_eff() >> bit & 1)


def kernel_config() -> Optional[Dict[str, str]]:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    config = {}
    for line in lines:
        if line.startswith("CONFIG_"):
            key, _, value = line.partition("=")
            config[key] = value
        elif line.endswith(" is not set"):
            config[line[2:].split()[0]] = "n"
    return config


def cgroup_mount_points() -> List[str]:
    """Every cgroup mount point, read from /proc/mounts (not the doctor's mountinfo)."""
    points = []
    for line in Path("/proc/mounts").read_text().splitlines():
        dev, point, fstype, opts = line.split()[:4]
        if fstype in ("cgroup", "cgroup2"):
            points.append(point)
    return points


def probe_leftovers() -> List[str]:
    return [p for m in cgroup_mount_points() for p in glob.glob(f"{m}/{doctor.PROBE_PREFIX}*")]


def working_engine() -> Engine:
    try:
        return find_engine(verify=True)
    except EngineError as exc:
        pytest.skip(f"no working CRIU engine here: {exc.message}")


@pytest.fixture(autouse=True)
def no_probe_cgroups_left() -> Iterator[None]:
    """Every test must leave no pycpt-doctor-* cgroup behind (removed here if one did)."""
    before = set(probe_leftovers())
    yield
    left = [p for p in probe_leftovers() if p not in before]
    for path in left:
        try:
            os.rmdir(path)
        except OSError:
            pass
    assert not left, f"probe cgroups left behind: {left}"


@pytest.fixture(scope="module")
def report() -> Report:
    return run_checks()


# --- the report on this machine --------------------------------------------------------------


def test_covers_every_category(report: Report) -> None:
    seen: Dict[str, List[str]] = {}
    for item in report.items:
        seen.setdefault(item.category, []).append(item.name)
        assert isinstance(item.status, Verdict)
        assert item.detail, item
        if item.status in (Verdict.WARN, Verdict.FAIL):
            assert item.fix, f"{item.name} is {item.status.name} without a what-to-do line"
    assert seen == EXPECTED


def test_ok_iff_no_fail(report: Report) -> None:
    assert report.ok == all(i.status != Verdict.FAIL for i in report.items)
    assert report.status == max(i.status for i in report.items)


def test_kernel_version(report: Report) -> None:
    item = report["kernel version"]
    assert os.uname().release in item.detail
    assert item.status == Verdict.OK  # every supported machine runs >= 5.9


def test_checkpoint_restore(report: Report) -> None:
    item = report["CONFIG_CHECKPOINT_RESTORE"]
    config = kernel_config()
    if config is not None and "CONFIG_CHECKPOINT_RESTORE" in config:
        expected = config["CONFIG_CHECKPOINT_RESTORE"] == "y"
    else:
        expected = os.path.exists("/proc/sys/kernel/ns_last_pid")
    assert (item.status == Verdict.OK) == expected
    assert "ns_last_pid" in item.detail and "PR_SET_MM_MAP_SIZE" in item.detail


def test_namespaces(report: Report) -> None:
    names = ("pid", "mnt", "net", "uts", "ipc", "user", "cgroup", "time")
    all_there = all(os.path.lexists(f"/proc/self/ns/{n}") for n in names)
    assert (report["namespaces"].status == Verdict.OK) == all_there


def test_userfaultfd(report: Report) -> None:
    item = report["userfaultfd"]
    config = kernel_config()
    if config is None:
        pytest.skip("no /proc/config.gz to compare CONFIG_USERFAULTFD with")
    if config.get("CONFIG_USERFAULTFD") != "y":
        assert item.status == Verdict.WARN
    elif os.geteuid() == 0:
        assert item.status == Verdict.OK, item.detail
    else:
        pytest.skip("not root: userfaultfd may be refused by vm.unprivileged_userfaultfd")


def test_soft_dirty(report: Report) -> None:
    item = report["soft-dirty"]
    config = kernel_config()
    if config is not None and "CONFIG_MEM_SOFT_DIRTY" in config:
        assert (item.status == Verdict.OK) == (config["CONFIG_MEM_SOFT_DIRTY"] == "y")
    if report["CRIU engine"].status == Verdict.OK:
        from pycpt.criu import Criu

        with Criu(working_engine()) as criu:
            mem_track = criu.features()["mem_track"]
        assert (item.status == Verdict.OK) == mem_track
        assert f"mem_track: {str(mem_track).lower()}" in item.detail
    if item.status == Verdict.WARN:
        assert "pre-dump and track-mem cannot work; full dumps can" in item.detail


def test_pagemap_scan_matches_kernel_version(report: Report) -> None:
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    assert (report["PAGEMAP_SCAN"].status == Verdict.OK) == ((major, minor) >= (6, 7))


def test_pagemap_scan_says_how_the_probe_was_built(report: Report) -> None:
    from pycpt._native import lib

    headers = Path("/usr/include/linux/fs.h")
    if headers.exists():  # the machine that built pycpt here
        assert bool(lib.PYCPT_PAGEMAP_SCAN_FROM_HEADERS) == ("PAGEMAP_SCAN" in headers.read_text())
    copied = "pycpt's copy of the Linux 6.7 uapi definitions" in report["PAGEMAP_SCAN"].detail
    assert copied == (not lib.PYCPT_PAGEMAP_SCAN_FROM_HEADERS)


@pytest.mark.parametrize(
    "name, bit", [("CAP_SYS_PTRACE", 19), ("CAP_SYS_ADMIN", 21), ("CAP_SYS_RESOURCE", 24)]
)
def test_capabilities_match_capeff(report: Report, name: str, bit: int) -> None:
    item = report[name]
    assert f"{cap_eff():016x}" in item.detail
    assert (item.status == Verdict.OK) == has_cap(bit)
    if name == "CAP_SYS_RESOURCE" and not has_cap(bit):
        assert item.status == Verdict.WARN  # harmless, never FAIL


def test_root_and_checkpoint_restore_cap(report: Report) -> None:
    assert (report["root"].status == Verdict.OK) == (os.geteuid() == 0)
    item = report["CAP_CHECKPOINT_RESTORE"]
    assert (item.status == Verdict.OK) == (has_cap(40) or has_cap(21))


def test_pipe_max_size(report: Report) -> None:
    item = report["fs.pipe-max-size"]
    value = int(Path("/proc/sys/fs/pipe-max-size").read_text())
    assert str(value) in item.detail
    works = value >= doctor.LAZY_PIPE_SIZE or has_cap(24)
    assert item.status == (Verdict.OK if works else Verdict.WARN)
    if not works:
        assert f"sysctl -w fs.pipe-max-size={4 << 20}" in item.fix
    # and the kernel agrees with the verdict
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, 1031, 4 << 20)  # F_SETPIPE_SZ
        made = True
    except PermissionError:
        made = False
    finally:
        os.close(r)
        os.close(w)
    assert made == works


def test_ns_last_pid(report: Report) -> None:
    writable = os.access("/proc/sys/kernel/ns_last_pid", os.W_OK)
    assert (report["kernel.ns_last_pid"].status == Verdict.OK) == writable


def test_freezers(report: Report) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating probe cgroups needs root")
    mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    v1 = any(m[2] == "cgroup" and "freezer" in m[3].split(",") for m in mounts)
    v2 = any(m[2] == "cgroup2" for m in mounts)
    assert (report["freezer v1"].status == Verdict.OK) == v1
    assert (report["freezer v2"].status == Verdict.OK) == v2
    for name, there in (("freezer v1", v1), ("freezer v2", v2)):
        if there:
            assert "removed" in report[name].detail
    if v2:
        assert "cgroup.kill" in report["freezer v2"].detail


def test_criu_items_with_the_working_engine(report: Report) -> None:
    eng = working_engine()
    item = report["CRIU engine"]
    assert item.status == Verdict.OK
    assert eng.path in item.detail and eng.version_string in item.detail
    assert eng.source in item.detail
    assert report["CRIU check"].status == Verdict.OK
    assert report["CRIU features"].status in (Verdict.OK, Verdict.WARN)
    for feature in ("mem_track", "lazy_pages", "pidfd_store"):
        assert feature in report["CRIU features"].detail
    assert report.engine is not None and report.engine["selected"]["path"] == eng.path


def test_network_lock(report: Report) -> None:
    item = report["network lock"]
    if shutil.which("iptables-restore"):
        assert item.status == Verdict.OK
        return
    eng = working_engine()
    rc = subprocess.run(
        eng.command("check", "--feature", "network_lock_nftables"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    ).returncode
    assert item.status == Verdict.WARN
    if rc == 0:
        assert "iptables missing: pycpt uses network_lock=nftables" in item.detail
    else:
        assert "no network lock works" in item.detail


def test_network_hold(report: Report) -> None:
    """nf_tables is in this kernel (CONFIG_NF_TABLES_INET): the probe must say it works."""
    item = report["network hold"]
    config = kernel_config()
    if config is not None and config.get("CONFIG_NF_TABLES_INET") not in ("y", "m"):
        assert item.status == Verdict.WARN and "nf_tables does not work" in item.detail
        return
    assert item.status == Verdict.OK, item.detail
    assert "inet pycpt-hold" in item.detail


def test_to_dict_is_json(report: Report) -> None:
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is report.ok
    assert [i["name"] for i in data["items"]] == [i.name for i in report.items]
    assert {i["status"] for i in data["items"]} <= {s.name for s in Verdict}
    assert data["system"]["kernel"] == os.uname().release


def test_format(report: Report) -> None:
    text = report.format()
    for item in report.items:
        assert item.name in text
    assert text.splitlines()[-1] == report.verdict()
    assert text.splitlines()[-1].startswith("OK" if report.ok else "FAIL")
    for item in report.items:
        if item.status in (Verdict.WARN, Verdict.FAIL):
            first_words = " ".join(item.fix.split()[:3])
            assert first_words in " ".join(text.split()), item.name


def test_pycpt_check_is_run_checks() -> None:
    import pycpt

    report = pycpt.check()
    assert isinstance(report, Report)
    assert [i.name for i in report.items] == [n for names in EXPECTED.values() for n in names]


def test_given_engine_is_used() -> None:
    eng = working_engine()
    report = run_checks(engine=eng)
    assert report["CRIU engine"].status == Verdict.OK
    assert report.engine is None  # candidates are listed only when pycpt chose the engine


def test_bad_engine_argument() -> None:
    with pytest.raises(ValueError):
        run_checks(engine="/usr/sbin/criu")  # type: ignore[arg-type]


# --- broken engines ---------------------------------------------------------------------------


def fake_old_criu(directory: Path) -> str:
    path = directory / "criu"
    path.write_text('#!/bin/sh\necho "Version: 3.17"\nexit 0\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("kind", ["too old", "missing"])
def test_broken_engine_fails_the_report(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, kind: str
) -> None:
    path = fake_old_criu(tmp_path) if kind == "too old" else str(tmp_path / "no" / "criu")
    monkeypatch.setenv("PYCPT_CRIU", path)
    engine_mod.clear_cache()
    report = run_checks()
    item = report["CRIU engine"]
    assert item.status == Verdict.FAIL
    assert path in item.detail
    assert ("3.17" if kind == "too old" else "no existing criu") in item.detail
    assert "pycpt engine install" in item.fix
    assert report.ok is False
    assert report.verdict().startswith("FAIL")
    assert report["CRIU check"].status == Verdict.SKIP
    assert report["CRIU features"].status == Verdict.SKIP
    assert report.engine is not None and report.engine["selected"] is None
    json.dumps(report.to_dict())


# --- pure logic -------------------------------------------------------------------------------


def test_ok_and_verdict_logic() -> None:
    good = Report(
        [
            Item("a", Verdict.OK, "fine"),
            Item("b", Verdict.WARN, "meh", "do x"),
            Item("c", Verdict.SKIP, "n/a"),
        ]
    )
    assert good.ok and good.status == Verdict.WARN
    assert good.verdict().startswith("OK") and "1 warning" in good.verdict()
    bad = Report(good.items + [Item("d", Verdict.FAIL, "broken", "fix it")])
    assert not bad.ok and bad.status == Verdict.FAIL
    assert "1 failure" in bad.verdict()
    assert "-> fix it" in bad.format()
    assert "-> do x" in bad.format()
    with pytest.raises(KeyError):
        bad["nope"]


def test_probe_failure_is_reported_and_cleaned(monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating probe cgroups needs root")
    mount = next((m for m, t, _ in doctor.cgroup_mounts() if t == "cgroup2"), None)
    if mount is None:
        pytest.skip("no cgroup2 mount")

    def broken(path: str) -> str:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    ok, said = doctor._probe_cgroup(mount, broken)
    assert not ok and "Input/output error" in said and said.endswith("removed")


def test_freezer_probe_failure_is_reported_and_cleaned() -> None:
    """A Freezer that refuses (here: the wrong cgroup version) fails the probe, which still
    removes its cgroup."""
    if os.geteuid() != 0:
        pytest.skip("creating probe cgroups needs root")
    mount = next((m for m, t, _ in doctor.cgroup_mounts() if t == "cgroup2"), None)
    if mount is None:
        pytest.skip("no cgroup2 mount")
    ok, said = doctor._probe_cgroup(mount, lambda path: "/".join(doctor._freeze_cycle(path, 1)))
    assert not ok and said.endswith("removed")
    path = os.path.join(mount, f"{doctor.PROBE_PREFIX}{os.getpid()}")
    assert f"probe {path}: is a cgroup v2 freezer, not v1;" in said
    assert not os.path.exists(path)


def test_engine_that_cannot_serve_rpc() -> None:
    """An engine whose version looks right but which dies at once: CHECK and FEATURE_CHECK fail."""
    false = shutil.which("false")
    assert false is not None
    dead = Engine(argv=(false,), path=false, version=(4, 2, 1), source="test")
    report = run_checks(engine=dead)
    assert report["CRIU engine"].status == Verdict.OK  # it is what the caller gave
    assert report["CRIU check"].status == Verdict.FAIL
    assert report["CRIU features"].status == Verdict.FAIL
    assert "pycpt engine install" in report["CRIU check"].fix
    assert report.ok is False


def test_kdat_cache_needs_a_tmpfs():
    """CRIU keeps its kernel probe only on a tmpfs: /dev/shm is one, a plain directory not."""
    from pycpt.doctor import Verdict, _check_kdat_cache

    assert _check_kdat_cache("/dev/shm").status is Verdict.OK
    item = _check_kdat_cache("/var/lib")
    assert item.status is Verdict.WARN and "tmpfs" in item.fix
