"""pycpt keeps CRIU's kernel-probe cache where CRIU cannot (a /run that is not a tmpfs)."""

from __future__ import annotations

import pytest

import pycpt
from pycpt._criu import kdat
from tests.helpers.workload import PidNsMemHash


@pytest.fixture
def needs_kdat(engine):
    if not kdat.needed():
        pytest.skip("/run is a tmpfs here (CRIU keeps its cache itself) or we are not root")
    return engine


def test_cache_is_made_for_this_boot_and_remade_when_stale(needs_kdat):
    assert kdat.ensure(needs_kdat.argv) and kdat.fresh()
    kdat.BOOT_STAMP.write_text("an earlier boot\n")
    assert not kdat.fresh()
    assert kdat.ensure(needs_kdat.argv) and kdat.fresh()
    assert kdat.BOOT_STAMP.read_text().strip() == kdat.boot_id()
    assert not (kdat.RUN / "criu.kdat.tmp").exists()


def test_criu_loads_it(needs_kdat, tmp_path):
    w = PidNsMemHash(4, tmp_path)
    try:
        (tmp_path / "img").mkdir()
        with pycpt.Criu(needs_kdat) as criu:
            criu.dump(w.pid, tmp_path / "img", leave_running=True, log_level=4)
        log = (tmp_path / "img" / "dump.log").read_text()
    finally:
        w.stop()
    assert "Loaded kdat cache from /run/criu.kdat" in log
