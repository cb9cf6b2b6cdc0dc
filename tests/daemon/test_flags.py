"""Command line: forking, pid file, socket location, quota flags, shutdown."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time

import pytest

from xenstore.wire import Op

pytestmark = pytest.mark.timeout(60)

CMD = [sys.executable, "-m", "xenstore.daemon.main"]


def _wait_gone(pid, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


def test_forks_to_background_with_pid_file_and_cleans_up_on_sigterm(tmp_path):
    sock = str(tmp_path / "run" / "deep" / "socket")  # parent dirs are created
    pid_file = tmp_path / "xenstored.pid"
    env = dict(os.environ, XENSTORED_PATH=sock)
    # The foreground process returns once the daemon listens.
    done = subprocess.run([*CMD, "-F", str(pid_file), "--state-dir", str(tmp_path / "state")], env=env, timeout=30, capture_output=True)
    assert done.returncode == 0 and done.stdout == b"" and done.stderr == b""
    pid = int(pid_file.read_text())
    try:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        s = socket.socket(socket.AF_UNIX)
        s.connect(sock)
        s.close()
        assert os.getsid(pid) == pid or os.getsid(pid) != os.getsid(0)  # detached from our session
    finally:
        os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)
    assert not os.path.exists(sock) and not pid_file.exists()


def test_output_pid_and_rundir(tmp_path):
    rundir = tmp_path / "rundir"
    env = {k: v for k, v in os.environ.items() if k != "XENSTORED_PATH"}
    env["XENSTORED_RUNDIR"] = str(rundir)
    done = subprocess.run([*CMD, "-P", "-I", "on"], env=env, timeout=30, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    try:
        assert stat.S_ISSOCK(os.stat(rundir / "socket").st_mode)
    finally:
        os.kill(pid, signal.SIGTERM)
    assert _wait_gone(pid)


def test_foreground_sigint_and_pid_file(xenstored_factory, tmp_path):
    pid_file = tmp_path / "pid"
    d = xenstored_factory.start("-F", str(pid_file))
    assert int(pid_file.read_text()) == d.pid
    d.proc.send_signal(signal.SIGINT)
    assert d.proc.wait(10) == 0
    assert not os.path.exists(d.socket_path)
    assert d.stderr() == ""  # quiet without -V


def test_verbose_logs_to_stderr(xenstored_factory):
    d = xenstored_factory.start("-V")
    d.stop()
    assert "serving" in d.stderr() and "xenstored[" in d.stderr()


def test_quota_flags_reach_the_engine(xenstored_factory):
    d = xenstored_factory.start("-E", "77", "-S", "3000", "-W", "9", "-t", "3", "-A", "4", "-M", "1000", "-Q", "outstanding=5", "-Q", "transaction-nodes=99", "-q", "memory=12345")
    c = d.connect()
    op, text = c.call(Op.CONTROL, b"quota\0")
    text = text.decode()
    for name, value in [("nodes", 77), ("node-size", 3000), ("watches", 9), ("transactions", 3), ("permissions", 4), ("path-max", 1000), ("outstanding", 5), ("transaction-nodes", 99)]:
        assert any(line.split(":")[0].strip() == name and line.split(":")[1].split()[0] == str(value) for line in text.splitlines()), (name, text)
    op, text = c.call(Op.CONTROL, b"quota-soft\0")
    assert "12345" in text.decode()


def test_watch_event_timeout_flag_sets_the_guests_event_deadline():
    from xenstore.daemon.main import build_parser, config_from_args

    assert config_from_args(build_parser().parse_args([])).watch_event_timeout == 20.0  # cxenstored's default
    assert config_from_args(build_parser().parse_args(["-w", "watch-event=5"])).watch_event_timeout == 5.0
    assert config_from_args(build_parser().parse_args(["--timeout", "watch-event=0"])).watch_event_timeout == 0.0
    with pytest.raises(ValueError):
        config_from_args(build_parser().parse_args(["-w", "watch-event=-1"]))


@pytest.mark.parametrize("keep", [False, True])
def test_keep_orphans_flag(xenstored_factory, keep):
    """Released domain 5 owned /orphan: deleted, or with -K given to dom0."""
    d = xenstored_factory.start(*(["-K"] if keep else []))
    c = d.connect()
    assert c.call(Op.INTRODUCE, b"5\x001\x005\0")[0] == Op.INTRODUCE
    c.write("/orphan", b"v")
    assert c.call(Op.SET_PERMS, b"/orphan\0n5\0r7\0")[0] == Op.SET_PERMS
    assert c.call(Op.RELEASE, b"5\0") == (Op.RELEASE, b"OK\0")
    if keep:
        assert c.read("/orphan") == b"v"
        assert c.call(Op.GET_PERMS, b"/orphan\0") == (Op.GET_PERMS, b"n0\0r7\0")
    else:
        assert c.read("/orphan") is None


@pytest.mark.parametrize("args", [["-Q", "bogus=1"], ["-Q", "memory"], ["-q", "nodes=1"], ["-E", "-3"], ["-I", "maybe"], ["-w", "bogus=1"]])
def test_bad_flags_fail_cleanly(tmp_path, args):
    env = dict(os.environ, XENSTORED_PATH=str(tmp_path / "socket"))
    done = subprocess.run([*CMD, "-N", "--state-dir", str(tmp_path / "s"), *args], env=env, timeout=30, capture_output=True, text=True)
    assert done.returncode != 0 and done.stderr and "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "socket")


def test_second_daemon_on_the_same_socket_refuses(xenstored, tmp_path):
    env = dict(os.environ, XENSTORED_PATH=xenstored.socket_path)
    done = subprocess.run([*CMD, "-N", "-I", "on"], env=env, timeout=30, capture_output=True, text=True)
    assert done.returncode == 1 and "another daemon" in done.stderr
    assert xenstored.connect().read("/tool") == b""


def test_help_lists_xen_flags():
    done = subprocess.run([*CMD, "--help"], timeout=30, capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ["--no-fork", "--pid-file", "--trace-file", "--entry-nb", "--entry-size", "--watch-nb", "--transaction", "--perm-nb", "--path-max", "--quota", "--quota-soft", "--verbose", "--internal-db", "--state-dir", "--fsync", "--keep-orphans"]:
        assert flag in done.stdout
