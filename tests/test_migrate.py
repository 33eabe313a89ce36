"""`pycpt migrate` between two pretend hosts on this kernel (tests/conftest.py `testhosts`):
each has its own network namespace, sshd, state directory and cgroup parent. The source side
runs as `pycpt migrate` inside host "src", exactly as a user would type it there."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from pycpt.container import Container, ContainerStatus
from pycpt.testing import demo_workload
from pycpt.testing.testhosts import Host, TestHosts
from tests.helpers.containers import continued
from tests.helpers.workload import build_counter, wait_for

TCP_PAIR = Path(__file__).with_name("tcp_pair.py")


def on(host: Host):
    """Act as `host` in this process: its state directory and cgroup parent."""
    return host.as_current()


class Workload:
    """The demo workload (random memory + a hash chain) as init of container `ct` on `host`,
    sampled through a report file wherever the container runs now."""

    def __init__(self, host: Host, ct: str, mib: int, tmp: Path) -> None:
        self.ct = ct
        self.report = tmp / f"{ct}-report"
        with on(host):
            Container.start(
                ct, [sys.executable, demo_workload.__file__, str(mib), str(self.report)]
            )
        wait_for(lambda: Path(f"{self.report}.ready").exists(), 120, "the workload")

    def sample(self, host: Host, timeout: float = 30):
        with on(host):
            pid = Container(self.ct).init_pid
        assert pid, f"{self.ct} does not run on {host.name}"
        if self.report.exists():
            self.report.unlink()
        os.kill(pid, signal.SIGUSR1)
        wait_for(self.report.exists, timeout, "a report")
        step, chain, mem = self.report.read_text().split()
        return int(step), chain, mem


def migrate(hosts: TestHosts, ct: str, *args: str, timeout: float = 300):
    """`pycpt migrate ARGS dst CT --json` typed on host src."""
    return hosts["src"].run(
        ["pycpt", "migrate", "--json", *args, "dst", ct],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def stats_of(out) -> dict:
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def status_on(host: Host, ct: str) -> Optional[ContainerStatus]:
    with on(host):
        c = Container(ct)
        return c.status if c.exists else None


def assert_target_clean(hosts: TestHosts, ct: str) -> None:
    dst = hosts["dst"]
    wait_for(
        lambda: not (dst.state_dir / "ct" / ct).exists(), 60, "the target to forget the container"
    )
    for mount in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup/freezer", "/sys/fs/cgroup"):
        assert not Path(mount, dst.cgroup_parent, ct).exists()
    leftovers = [p for p in Path("/dev/shm").glob(f".pycpt-incoming-{ct}-*")]
    assert not leftovers
    mounts = Path("/proc/self/mountinfo").read_text()
    assert f".pycpt-incoming-{ct}-" not in mounts  # e.g. a cgroup yard of a killed CRIU


def assert_source_intact(hosts: TestHosts, w: Workload, before) -> None:
    assert status_on(hosts["src"], w.ct) is ContainerStatus.RUNNING
    assert continued(before, w.sample(hosts["src"]))


# --- success -----------------------------------------------------------------------------


def test_offline_migration(testhosts, tmp_path):
    w = Workload(testhosts["src"], "m1", 32, tmp_path)
    before = w.sample(testhosts["src"])
    stats = stats_of(migrate(testhosts, "m1"))
    assert stats["mode"] == "offline" and stats["image_bytes"] > 32 << 20
    assert status_on(testhosts["dst"], "m1") is ContainerStatus.RUNNING
    assert status_on(testhosts["src"], "m1") is None  # removed at the source
    assert continued(before, w.sample(testhosts["dst"]))


def test_online_postcopy_256mib_with_tcp(testhosts, tmp_path, lazy_pipe_size):
    """The issue's acceptance case: 256 MiB of random memory and a computation, plus a TCP
    client and server inside the container with an established connection; on the target
    the memory checksum matches, the computation continues, the connection is the same one
    and still works, and the source is gone."""
    src, dst = testhosts["src"], testhosts["dst"]
    w = Workload(src, "big", 256, tmp_path)
    tcp_report = tmp_path / "tcp-report"
    with on(src):  # started in the background inside, so that exec returns at once
        Container("big").exec(
            [
                "/bin/sh",
                "-c",
                f"setsid {sys.executable} {TCP_PAIR} {tcp_report} </dev/null >/dev/null 2>&1 &",
            ]
        ).wait(30)
    wait_for(lambda: Path(f"{tcp_report}.ready").exists(), 60, "the TCP pair")
    before = w.sample(src)
    tcp_before = tcp_sample(src, "big", tcp_report)
    stats = stats_of(migrate(testhosts, "big", "--online"))
    assert stats["mode"] == "postcopy"
    assert stats["image_bytes"] < 64 << 20, "post-copy sent the memory in the frozen window"
    # the command returned only after the target's lazy-pages daemon had every page
    assert stats["stages"]["pages"] > 0 and stats["stages"]["cleanup"] > 0
    assert status_on(src, "big") is None
    after = w.sample(dst)
    assert continued(before, after)
    time.sleep(0.2)
    tcp_after = tcp_sample(dst, "big", tcp_report)
    assert tcp_after[0] > tcp_before[0]  # more round trips on...
    assert tcp_after[1:] == tcp_before[1:] == tcp_after[1:2] + (1, 0)  # ...the same connection


def tcp_sample(host: Host, ct: str, report: Path):
    """(round trips, client port, connections accepted, errors) of the TCP pair in `ct`."""
    with on(host):
        cgroup = Container(ct).cgroup
        init = Container(ct).init_pid
    pids = [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    pair = [
        p
        for p in pids
        if p != init
        and TCP_PAIR.name in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
    ]
    assert len(pair) == 1, f"TCP pair not found among {pids}"
    if report.exists():
        report.unlink()
    os.kill(pair[0], signal.SIGUSR1)
    wait_for(report.exists, 30, "the TCP report")
    return tuple(int(x) for x in report.read_text().split())


def test_dry_run_changes_nothing(testhosts, tmp_path):
    w = Workload(testhosts["src"], "dry", 8, tmp_path)
    before = w.sample(testhosts["src"])
    stats = stats_of(migrate(testhosts, "dry", "--online", "--dry-run"))
    assert stats["dry_run"] and stats["target"]["criu"]
    assert not (testhosts["dst"].state_dir / "ct" / "dry").exists()  # no trace there
    assert_source_intact(testhosts, w, before)


def test_keep_src_and_keep_images(testhosts, tmp_path):
    src = testhosts["src"]
    w = Workload(src, "keep", 8, tmp_path)
    before = w.sample(src)
    stats_of(migrate(testhosts, "keep", "--keep-src", "--keep-images"))
    assert status_on(src, "keep") is ContainerStatus.STOPPED
    assert (src.state_dir / "dump" / "Dump.keep").is_file()
    assert continued(before, w.sample(testhosts["dst"]))


# --- failures: the source runs on exactly as before, the target holds nothing -------------


def test_target_sshd_down(testhosts, tmp_path):
    w = Workload(testhosts["src"], "f1", 16, tmp_path)
    before = w.sample(testhosts["src"])
    testhosts["dst"].stop_sshd()
    out = migrate(testhosts, "f1", "--online", "--connect-timeout", "3")
    assert out.returncode == 1 and "cannot reach" in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "f1")


def test_ct_id_taken_on_target(testhosts, tmp_path):
    w = Workload(testhosts["src"], "f2", 16, tmp_path)
    before = w.sample(testhosts["src"])
    with on(testhosts["dst"]):
        other = Container.start("f2", ["/bin/sleep", "1000"])
        other_pid = other.init_pid
    out = migrate(testhosts, "f2", "--online")
    assert out.returncode == 1 and "already exists" in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
    with on(testhosts["dst"]):  # the target's own container is untouched
        assert (
            Container("f2").status is ContainerStatus.RUNNING
            and Container("f2").init_pid == other_pid
        )


def test_target_restore_fails(testhosts, tmp_path):
    """The target cannot make the container's cgroup (cgroup.max.descendants = 0 on its
    parent): the restore fails after the images arrived."""
    dst = testhosts["dst"]
    w = Workload(testhosts["src"], "f3", 16, tmp_path)
    before = w.sample(testhosts["src"])
    with on(dst):
        from pycpt.container import cgroup_root

        parent = cgroup_root()
    parent.mkdir(exist_ok=True)
    (parent / "cgroup.max.descendants").write_text("0")
    out = migrate(testhosts, "f3", "--online", "--mode", "stopcopy")
    assert out.returncode == 1 and "on the target" in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "f3")


def test_connection_cut_during_transfer(testhosts, tmp_path):
    src, dst = testhosts["src"], testhosts["dst"]
    w = Workload(src, "f4", 256, tmp_path)
    before = w.sample(src)
    dst.limit_rate("200mbit")  # about 10 s for the images: time to cut in the middle
    result = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "out", migrate(testhosts, "f4", "--online", "--mode", "stopcopy")
        )
    )
    thread.start()
    try:
        wait_for(lambda: incoming_bytes("f4") > 32 << 20, 120, "the transfer to start")
        dst.link_down()
        thread.join(120)
    finally:
        dst.link_up()
        thread.join(120)
    out = result["out"]
    assert out.returncode == 1, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "f4")


def incoming_bytes(ct: str) -> int:
    total = 0
    for d in Path("/dev/shm").glob(f".pycpt-incoming-{ct}-*"):
        for f in d.iterdir():
            with contextlib.suppress(OSError):
                total += f.stat().st_size
    return total


def test_target_pycpt_killed_mid_restore(testhosts, tmp_path):
    src, dst = testhosts["src"], testhosts["dst"]
    w = Workload(src, "f5", 64, tmp_path)
    before = w.sample(src)
    with on(dst):
        from pycpt.container import cgroup_root

        cgroup = cgroup_root() / "f5"
    killed = {}

    def kill_agent_when_restoring() -> None:
        state = dst.state_dir / "ct" / "f5" / "state.json"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            if cgroup.is_dir() and state.exists():
                incoming = json.loads(state.read_text()).get("incoming") or {}
                pid = (incoming.get("agent") or [None])[0]
                if pid:
                    os.kill(pid, signal.SIGKILL)
                    killed["pid"] = pid
                    return
            time.sleep(0.001)

    watcher = threading.Thread(target=kill_agent_when_restoring)
    watcher.start()
    out = migrate(testhosts, "f5", "--online", "--mode", "stopcopy")
    watcher.join()
    assert killed, "the restore was never seen"
    assert out.returncode == 1, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "f5")


def test_bad_input_is_refused_before_anything_moves(testhosts, tmp_path):
    out = testhosts["src"].run(
        ["pycpt", "migrate", "nosuchhost.invalid", "x"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "no container x" in out.stderr
    Workload(testhosts["src"], "f6", 8, tmp_path)
    for spec in ("-oProxyCommand=sh", "a b", "host:99999", "us;er@host"):
        out = testhosts["src"].run(
            ["pycpt", "migrate", "--", spec, "f6"], capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 2 and "bad" in out.stderr, (spec, out.stderr)
    with on(testhosts["src"]):
        Container.start("shared", ["/bin/sleep", "1000"], share_net=True)
    out = testhosts["src"].run(
        ["pycpt", "migrate", "dst", "shared"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "--share-net" in out.stderr, out.stderr
    assert status_on(testhosts["src"], "shared") is ContainerStatus.RUNNING
    out = testhosts["src"].run(
        ["pycpt", "migrate", "--connect-timeout", "3", "nosuchhost.invalid", "f6"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 1 and "cannot reach" in out.stderr, out.stderr
    assert status_on(testhosts["src"], "f6") is ContainerStatus.RUNNING


def test_private_root_directory_moves_with_it(testhosts, tmp_path):
    """A container in its own root directory: the directory is copied to the target (in
    bulk while it runs, the last changes while frozen) and the container runs on from the
    copy, writing there."""
    src, dst = testhosts["src"], testhosts["dst"]
    root = tmp_path / "root"
    root.mkdir()
    build_counter(root)
    (root / "data").write_bytes(os.urandom(8 << 20))
    with on(src):
        Container.start("rooted", ["/count"], root=str(root))
    counter = root / "counter"
    wait_for(lambda: counter.exists() and counter.read_text().strip(), 10, "the counter")
    stats = stats_of(migrate(testhosts, "rooted", "--online", "--mode", "stopcopy"))
    assert {"sync", "sync-final"} <= set(stats["stages"])
    # the source's root stays as it was at the freeze (maybe in the middle of a write: the
    # counter truncates the file, then writes it)
    frozen_text = counter.read_text()
    frozen_at = int(frozen_text.strip() or 0)
    with on(dst):  # its record names dst's cgroup: read it as dst
        moved = Container("rooted")
        new_root = Path(moved.state["root"])
        init_pid = moved.init_pid
    assert new_root != root and new_root.is_relative_to(dst.state_dir)
    assert (new_root / "data").read_bytes() == (root / "data").read_bytes()
    assert set(os.listdir(f"/proc/{init_pid}/root")) >= {"count", "counter", "data"}
    wait_for(
        lambda: int((new_root / "counter").read_text().strip() or 0) > frozen_at + 2,
        10,
        "counting to go on in the target's copy",
    )
    time.sleep(0.1)
    assert counter.read_text() == frozen_text


def test_target_criu_restore_fails(testhosts, tmp_path):
    """CRIU itself fails the restore on the target: its CRIU is a wrapper that runs it in a
    mount namespace of its own where the freezer hierarchy (which pycpt gives CRIU as part
    of its cgroup yard, used by restores only) is covered by an empty read-only tmpfs."""
    import pycpt

    engine = pycpt.find_engine()
    wrapper = tmp_path / "criu"
    cover = "mount -t tmpfs -o ro pycpt-test-no-cgroups /sys/fs/cgroup/freezer"
    wrapper.write_text(
        "#!/bin/sh\nexec unshare -m --propagation private sh -c "
        f'\'{cover} && exec "$0" "$@"\' ' + " ".join(engine.argv) + ' "$@"\n'
    )
    wrapper.chmod(0o755)
    w = Workload(testhosts["src"], "f7", 16, tmp_path)
    before = w.sample(testhosts["src"])
    out = migrate(
        testhosts,
        "f7",
        "--online",
        "--mode",
        "stopcopy",
        "--remote-pycpt",
        f"env PYCPT_CRIU={wrapper} pycpt",
    )
    assert out.returncode == 1 and "CRIU RESTORE" in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
    assert_target_clean(testhosts, "f7")


def test_key_not_accepted_says_how_to_set_it_up(testhosts, tmp_path):
    """A key the target does not know: a clear error with the fix, never a password prompt
    (BatchMode), and nothing moved."""
    src = testhosts["src"]
    Workload(src, "f8", 8, tmp_path)
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    config = tmp_path / "ssh_config"
    config.write_text(
        testhosts.ssh_config.read_text().replace(str(testhosts.client_key), str(stranger))
    )
    out = src.run(
        ["pycpt", "migrate", "--ssh-config", str(config), "dst", "f8"],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 1 and "refused our key" in out.stderr, out.stderr
    assert "ssh-copy-id" in out.stderr
    assert status_on(src, "f8") is ContainerStatus.RUNNING
    assert_target_clean(testhosts, "f8")


def test_target_disk_full_during_transfer(testhosts, tmp_path):
    """The target's images go to a small file system (PYCPT_IMAGES_DIR) that fills up once
    the memory starts to arrive: the page server fails, the source runs on, the target is
    clean."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=160m", "pycpt-test-small", str(small)], check=True
    )
    try:
        w = Workload(testhosts["src"], "f9", 64, tmp_path)
        before = w.sample(testhosts["src"])
        testhosts["dst"].limit_rate("200mbit")  # time to fill the disk before the pages end
        result = {}
        thread = threading.Thread(
            target=lambda: result.setdefault(
                "out",
                migrate(
                    testhosts,
                    "f9",
                    "--online",
                    "--mode",
                    "stopcopy",
                    "--remote-pycpt",
                    f"env PYCPT_IMAGES_DIR={small} pycpt",
                ),
            )
        )
        thread.start()
        wait_for(lambda: any(small.glob(".pycpt-incoming-f9-*")), 60, "the incoming images")
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", str(150 << 20), str(filler)])
        thread.join(120)
        out = result["out"]
        assert out.returncode == 1 and "no space left" in out.stderr, out.stderr
        filler.unlink()
        assert_source_intact(testhosts, w, before)
        assert_target_clean(testhosts, "f9")
        assert not any(small.glob(".pycpt-incoming-*"))
    finally:
        testhosts["dst"].clear_rate()
        subprocess.run(["umount", "--lazy", str(small)])


def test_failure_after_commit_keeps_the_target_copy(testhosts, tmp_path):
    """Once the target keeps the container, a failure at the source (here: --keep-images
    cannot write its dump file) must not undo it: the target's copy runs on, the source's
    stays frozen (never two running, never none), and the error says what to do."""
    src, dst = testhosts["src"], testhosts["dst"]
    w = Workload(src, "f10", 16, tmp_path)
    before = w.sample(src)
    src.state_dir.mkdir(parents=True, exist_ok=True)
    (src.state_dir / "dump").write_text("a file where the dump directory should be\n")
    out = migrate(testhosts, "f10", "--keep-images")
    assert out.returncode == 1 and "runs on dst now" in out.stderr, out.stderr
    assert "pycpt migrate --abort f10" in out.stderr
    assert continued(before, w.sample(dst))
    assert status_on(src, "f10") is ContainerStatus.MIGRATING  # frozen, its record says so
    out = src.run(["pycpt", "migrate", "--abort", "f10"], capture_output=True, text=True)
    assert out.returncode == 0 and "migrated to dst" in out.stdout, out.stderr
    assert status_on(src, "f10") is ContainerStatus.MIGRATED
    out = src.run(["pycpt", "status", "f10"], capture_output=True, text=True)
    assert out.stdout.strip() == "migrated to dst", out


def test_a_committed_copy_that_died_there_is_answered_lost(testhosts, tmp_path):
    """A copy that arrived and committed, then died behind pycpt's back on the target (that
    host crashed before its source had ended its own copy): asked about that migration, the
    target answers "lost" and forgets it, so that the source's frozen tree takes the
    container back instead of ending the last copy; asked again, it answers the same."""
    src, dst = testhosts["src"], testhosts["dst"]
    Workload(src, "f12", 8, tmp_path)
    stats_of(migrate(testhosts, "f12"))
    with on(dst):
        ct = Container("f12")
        token, pid = ct.state["migrated_by"], ct.init_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # init of its pid namespace: the whole copy dies
    wait_for(lambda: status_on(dst, "f12") is ContainerStatus.STOPPED, 30, "the copy to die")
    for _ in range(2):
        out = dst.run(
            ["pycpt", "migrate-target", "--abort", token, "f12"], capture_output=True, text=True
        )
        assert out.returncode == 0 and out.stdout.strip() == "lost", (out.stdout, out.stderr)
        assert status_on(dst, "f12") is None
    assert_target_clean(testhosts, "f12")


def test_a_target_that_breaks_the_protocol_is_reported(testhosts, tmp_path):
    """A "target" that answers with a malformed message: the source refuses it, says which
    rule it broke, and the container runs on here."""
    w = Workload(testhosts["src"], "f11", 8, tmp_path)
    before = w.sample(testhosts["src"])
    fake = tmp_path / "fake_target.py"
    fake.write_text(
        "import json, struct, sys\n"
        "data = json.dumps({'op': 'ready', 'pycpt': '9', 'criu': 'x'}).encode()\n"
        "sys.stdout.buffer.write(struct.pack('>I', len(data)) + data)\n"
        "sys.stdout.buffer.flush()\n"
        "sys.stdin.buffer.read()\n"
    )
    out = migrate(testhosts, "f11", "--remote-pycpt", f"{sys.executable} {fake}")
    assert out.returncode == 1, out.stderr
    assert "ready.criu must be a list" in out.stderr, out.stderr
    assert_source_intact(testhosts, w, before)
