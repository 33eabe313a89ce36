"""The command as a user types it, for the verbs of issue 14: checkpoints by name, --json,
progress on a terminal, exec -d, enter, and the guards against losing someone's file."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from typing import Tuple

import pytest

from tests.helpers.cgroups import wait_until
from tests.helpers.cli import run
from tests.helpers.schemas import validate


def ok(*args: str) -> str:
    r = run(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def on_a_terminal(
    *args: str, stdin: bytes = b"", after: str = "", tty_stdout: bool = False
) -> Tuple[int, str, str]:
    """Run pycpt with stderr (and stdin, and stdout if asked) on a new 24x100 pseudo-terminal;
    `stdin` is typed once the terminal shows `after` (a regular expression: a shell drops
    what was typed before it started). Returns the exit status, stdout (when piped) and
    what the terminal showed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pycpt", *args],
        stdin=slave,
        stdout=slave if tty_stdout else subprocess.PIPE,
        stderr=slave,
        start_new_session=True,
    )
    os.close(slave)
    typed = not stdin
    shown = b""
    out = b""
    streams = [master] + ([] if tty_stdout else [proc.stdout.fileno()])  # type: ignore[union-attr]
    deadline = time.monotonic() + 300
    while streams and time.monotonic() < deadline:
        ready, _, _ = select.select(streams, [], [], 1)
        for fd in ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the terminal's last user is gone
                data = b""
            if not data:
                streams.remove(fd)
            elif fd == master:
                shown += data
                if not typed and re.search(after.encode(), shown):
                    os.write(master, stdin)
                    typed = True
            else:
                out += data
    os.close(master)
    return proc.wait(timeout=60), out.decode(), shown.decode(errors="replace")


MIB512 = "import time; b = b'\\x01' * (512 << 20); open('/tmp/up', 'w').close(); time.sleep(10**6)"


def test_progress_on_a_terminal_only_and_the_same_stdout(ctenv):
    """Done-when: a 512 MiB chkpnt and restore draw progress on a terminal; piped, the same
    commands print no progress and the same stdout."""
    outputs = {}
    for how in ("terminal", "piped"):
        ct = f"p-{how}"
        ok("start", ct, "--", sys.executable, "-c", MIB512)
        assert wait_until(lambda ct=ct: _rss(ct) > 500 << 20, 60)
        if how == "terminal":
            status, out1, shown1 = on_a_terminal("chkpnt", ct)
            assert status == 0, shown1
            status, out2, shown2 = on_a_terminal("restore", ct)
            assert status == 0, shown2
            assert re.search(rf"chkpnt {ct}: +\d+%\|", shown1), shown1[-2000:]
            assert re.search(rf"restore {ct}: +\d+%\|", shown2), shown2[-2000:]
            assert "MB/s" in shown1 + shown2 or "kB/s" in shown1 + shown2
        else:
            r1, r2 = run("chkpnt", ct), run("restore", ct)
            assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
            out1, out2 = r1.stdout, r2.stdout
            assert r1.stderr == "" and r2.stderr == ""  # no progress, nothing else either
        ok("stop", ct)
        # the same words; only the names, times and pids differ
        outputs[how] = [re.sub(r"p-\w+|\d+(\.\d+)?", "#", o) for o in (out1, out2)]
    assert outputs["terminal"] == outputs["piped"]
    # --quiet silences it on a terminal too
    ok("start", "p-quiet", "--", sys.executable, "-c", MIB512)
    assert wait_until(lambda: _rss("p-quiet") > 500 << 20, 60)
    status, _, shown = on_a_terminal("chkpnt", "-q", "p-quiet")
    assert status == 0 and "%|" not in shown


def _rss(ct: str) -> int:
    info = json.loads(ok("status", ct, "--json"))
    try:
        with open(f"/proc/{info['init_pid']}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, TypeError):
        return 0


def test_enter_runs_a_shell_inside_through_a_pty(ctenv):
    ok("start", "en", "--", "/bin/sh", "-c", "sleep 1000")
    status, _, shown = on_a_terminal(
        "enter",
        "en",
        stdin=b"echo $((6*7)); hostname; tty; exit 3\n",
        after=r"[#$] $",
        tty_stdout=True,
    )
    assert status == 3, shown
    assert "42" in shown and "\nen\r\n" in shown.replace("\r\r", "\r")
    assert "/dev/pts/" in shown  # the shell has a terminal


def test_exec_detach_is_in_the_dump_and_runs_after_restore(ctenv):
    """Done-when: a process started with `pycpt exec -d` is in the dump and runs after
    restore (issue 14.8: a plain exec is not the container's, and `exec -- setsid -f`
    made chkpnt fail)."""
    ok("start", "xd", "--", "/bin/sh", "-c", "while :; do sleep 0.1; done")
    counter = "i=0; while :; do i=$((i+1)); echo $i > /tmp/xd-count; sleep 0.1; done"
    r = run("exec", "-d", "xd", "--", "/bin/sh", "-c", counter)
    assert r.returncode == 0, r.stderr

    def counters() -> list:
        ps = ok("exec", "xd", "--", "ps", "-ww", "-o", "pid=,ppid=,sid=,args=")
        return [ln.split() for ln in ps.splitlines() if "xd-count" in ln]

    assert wait_until(lambda: len(counters()) == 1, 10), ok("exec", "xd", "--", "ps", "-ef")
    pid, ppid, sid = counters()[0][:3]
    assert ppid == "1" and sid == pid  # the container's init adopted it, its own session
    chk = json.loads(ok("chkpnt", "xd", "--json"))
    validate(chk, "chkpnt")
    assert chk["status"] == "dumped" and chk["action"] == "chkpnt"
    rst = json.loads(ok("restore", "xd", "--json"))
    validate(rst, "restore")
    assert rst["status"] == "running" and rst["init_pid"]
    assert counters()[0][0] == pid  # the same process, same pid inside

    def count() -> int:
        out = ok("exec", "xd", "--", "cat", "/tmp/xd-count").strip()
        return int(out or 0)

    first = count()
    assert wait_until(lambda: count() > first, 10)  # it runs on
    ok("stop", "xd")


def test_named_checkpoints_leave_running_and_json(ctenv):
    ok("start", "nc", "--", "/bin/sh", "-c", "while :; do sleep 0.1; done")
    a = json.loads(ok("chkpnt", "nc", "--name", "a", "--leave-running", "--json"))
    validate(a, "chkpnt")
    assert a["status"] == "running" and a["action"] == "chkpnt"
    assert a["dumpfile"].endswith("/checkpoints/nc/a") and a["dumpfile_size"] > 0
    ok("chkpnt", "nc", "--name", "b", "--leave-running", "-v")
    assert (ctenv / "state" / "ct" / "nc" / "criu-dump.log").stat().st_size > 0  # -v kept it
    listed = json.loads(ok("checkpoints", "nc", "--json"))
    validate(listed, "checkpoints")
    assert [c["name"] for c in listed] == ["a", "b"]
    assert "NAME" in ok("checkpoints", "nc").splitlines()[0]
    ok("stop", "nc")
    r = json.loads(ok("restore", "nc", "--name", "a", "--json"))
    validate(r, "restore")
    assert r["status"] == "running" and r["dumpfile"] == a["dumpfile"]
    ok("stop", "nc")
    r2 = run("restore", "nc", "--name", "nope")
    assert r2.returncode == 1 and "no checkpoint 'nope'" in r2.stderr
    # rm takes the named checkpoints too
    r3 = run("rm", "nc")
    assert r3.returncode == 1 and "2 more" not in r3.stderr and "dump file" in r3.stderr
    ok("rm", "--force", "nc")
    assert not (ctenv / "state" / "checkpoints" / "nc").exists()


def test_a_dumpfile_that_is_not_ours_is_not_overwritten(ctenv, tmp_path):
    """issue 14.7: `chkpnt --dumpfile existing.txt` overwrote an unrelated file; missing
    parent directories were made silently."""
    ok("start", "ow", "--", "/bin/sh", "-c", "while :; do sleep 0.1; done")
    precious = tmp_path / "notes.txt"
    precious.write_text("mine\n")
    r = run("chkpnt", "ow", "--dumpfile", str(precious))
    assert r.returncode == 1 and "not a pycpt dump file" in r.stderr and "--overwrite" in r.stderr
    assert precious.read_text() == "mine\n"
    assert ok("status", "ow").strip() == "running"  # nothing was frozen or changed
    r = run("chkpnt", "ow", "--dumpfile", str(tmp_path / "no" / "such" / "f.dump"))
    assert r.returncode == 1 and "does not exist" in r.stderr and "mkdir -p" in r.stderr
    assert not (tmp_path / "no").exists()
    # a pycpt dump file may be replaced; --overwrite replaces the other kind
    own = tmp_path / "ow.dump"
    ok("chkpnt", "ow", "--dumpfile", str(own), "--leave-running")
    ok("chkpnt", "ow", "--dumpfile", str(own), "--leave-running")
    ok("chkpnt", "ow", "--dumpfile", str(precious), "--overwrite", "--leave-running")
    assert precious.read_bytes() != b"mine\n"
    ok("stop", "ow")


def test_restore_into_another_container_needs_replace(ctenv, tmp_path):
    """issue 14.7: `restore redis --dumpfile ct1.dump` turned the stopped redis into ct1's
    program silently. Restoring under a new id is the documented way."""
    ok("start", "one", "--", "/bin/sh", "-c", "while :; do sleep 0.1; done")
    ok("start", "two", "--", "/bin/sleep", "1000")
    ok("stop", "two")
    dump = tmp_path / "one.dump"
    ok("chkpnt", "one", "--dumpfile", str(dump))
    r = run("restore", "two", "--dumpfile", str(dump))
    assert r.returncode == 1 and "another program" in r.stderr and "--replace" in r.stderr
    assert json.loads(ok("status", "two", "--json"))["argv"] == ["/bin/sleep", "1000"]
    # under a new id: a new container running one's program
    ok("restore", "three", "--dumpfile", str(dump))
    info = json.loads(ok("status", "three", "--json"))
    assert info["status"] == "running" and info["argv"][0] == "/bin/sh"
    ok("stop", "three")
    ok("restore", "two", "--dumpfile", str(dump), "--replace")
    assert json.loads(ok("status", "two", "--json"))["argv"][0] == "/bin/sh"
    ok("stop", "two")


@pytest.mark.parametrize("verb", ["list", "status", "chkpnt", "restore", "check", "migrate"])
def test_every_state_verb_has_json_and_a_schema(verb):
    from pycpt.cli import JSON_SCHEMAS

    assert verb in JSON_SCHEMAS
    assert "--json" in ok(verb, "--help")


def test_migrate_onto_the_same_host_says_so_and_json_fits_its_schema(testhosts):
    """issue 14.15: `pycpt migrate --dry-run src m1` typed on src said "remove it there",
    "there" being the source itself."""
    src = testhosts["src"]

    def on_src(*args: str) -> subprocess.CompletedProcess:
        return src.run(["pycpt", *args], capture_output=True, text=True, timeout=300)

    assert on_src("start", "m1", "--", "/bin/sh", "-c", "sleep 1000").returncode == 0
    try:
        r = on_src("migrate", "--dry-run", "src", "m1")
        assert r.returncode == 1, r.stderr
        assert "already exists on" in r.stderr
        assert str(src.state_dir) in r.stderr and "cannot migrate onto itself" in r.stderr
        r = on_src("migrate", "--dry-run", "--json", "dst", "m1")
        assert r.returncode == 0, r.stderr
        stats = json.loads(r.stdout)
        validate(stats, "migrate")
        assert stats["dry_run"] is True
    finally:
        on_src("stop", "m1")


def _lacks_cap_sys_resource() -> bool:
    from pycpt._sys.procfs import cap_eff

    caps = cap_eff()
    return caps is not None and not caps & (1 << 24)


def test_tasks_of_other_users_are_refused_up_front(ctenv):
    """issue 14.13: nginx's www-data workers made chkpnt fail deep in CRIU with a generic
    hint; now it is refused before anything is frozen, with the reason and the fix."""
    if not _lacks_cap_sys_resource():
        pytest.skip("this process has CAP_SYS_RESOURCE: CRIU can dump such tasks")
    loop = (
        "setpriv --reuid=65534 --regid=65534 --clear-groups sleep 1000 & while :; do sleep 1; done"
    )
    ok("start", "nr", "--", "/bin/sh", "-c", loop)
    assert wait_until(lambda: "65534" in ok("exec", "nr", "--", "ps", "-e", "-o", "uid="), 10)
    r = run("chkpnt", "nr")
    assert r.returncode == 1 and "not root's" in r.stderr and "CAP_SYS_RESOURCE" in r.stderr
    assert "user root;" in r.stderr and "(sleep)" in r.stderr
    assert ok("status", "nr").strip() == "running"
    assert not (ctenv / "state" / "dump" / "Dump.nr").exists()
    ok("stop", "nr")


def test_check_says_what_is_missing_and_which_lock(engine):
    """issue 14.13 and 14.12: `pycpt check` called the missing CAP_SYS_RESOURCE harmless and
    did not say that the network is locked with nftables."""
    r = run("check", "--json")
    report = json.loads(r.stdout)
    validate(report, "check")
    items = {i["name"]: i for i in report["items"]}
    if _lacks_cap_sys_resource():
        cap = items["CAP_SYS_RESOURCE"]
        assert "cannot be checkpointed" in cap["detail"] and "user root;" in cap["fix"]
    lock = items["network lock"]
    if lock["detail"].startswith("iptables missing: pycpt uses"):
        assert "nftables" in lock["detail"] and "--network-lock nftables" in lock["detail"]


def test_migrate_draws_the_pages_on_a_terminal(testhosts, lazy_pipe_size):
    """issue 14.4: migration's `pages` stage was silent; on a terminal it now has a bar (the
    per-stage lines stay; piped, only they are printed)."""
    src = testhosts["src"]
    mib256 = MIB512.replace("512", "256").replace("/tmp/up", "/tmp/up2")
    r = src.run(["pycpt", "start", "mp", "--", sys.executable, "-c", mib256], capture_output=True)
    assert r.returncode == 0, r.stderr
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    time.sleep(3)  # its memory filled
    proc = src.popen(
        ["pycpt", "migrate", "--online", "dst", "mp"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    shown = b""
    while True:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:
                data = b""
            if not data:
                break
            shown += data
        elif proc.poll() is not None:
            break
    os.close(master)
    out = proc.stdout.read().decode() if proc.stdout else ""
    assert proc.wait(timeout=300) == 0, shown.decode(errors="replace")[-3000:]
    text = shown.decode(errors="replace")
    assert "migrated mp to dst" in out
    assert re.search(r"pages: +\d+%\|", text) or re.search(r"pages: +[\d.]+[kMG]?B ", text), text
    assert re.search(r"\] pages +[\d.]+ ms", text)  # the stage line is still there
    testhosts["dst"].run(["pycpt", "stop", "mp"], capture_output=True)


def test_the_readme_s_first_example_checkpoints_here(ctenv):
    """issue 14.13: the README's nginx example could not be checkpointed on the machine the
    README describes (its workers run as www-data)."""
    from pathlib import Path

    from pycpt.container import Container

    if not os.access("/usr/sbin/nginx", os.X_OK):
        pytest.skip("nginx is not installed (`make setup` installs it)")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    argv = ["/usr/sbin/nginx", "-g", "daemon off; master_process off;"]
    assert f'Container.start("web", {json.dumps(argv)})' in readme
    ct = Container.start("web", argv)
    try:
        assert wait_until(lambda: "nginx" in ok("exec", "web", "--", "ps", "-e", "-o", "comm="), 10)
        ct.chkpnt()
        ct = Container.restore("web")
        assert ct.status.value == "running"
    finally:
        run("stop", "web")
