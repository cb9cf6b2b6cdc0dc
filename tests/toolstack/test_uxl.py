"""End to end across processes: hypervisor service + xenstored (hypervisor
link) + console daemon + ``uxl`` + demo guests talking XenStore over their
rings and writing their PV consoles."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from host import process_alive, wait_until

pytestmark = pytest.mark.timeout(120)


def guest_pid(host, domid: int) -> int:
    return int(wait_until(lambda: host.read(f"/libxl/{domid}/guest-pid"), "guest pid"))


def test_create_runs_a_guest_whose_console_reaches_the_log(host):
    domid = host.create("alpha", "--interval", "0.05", "--message", "hi-alpha")
    log = host.wait_log(domid, b"tick 3\r\n")
    assert log.startswith(b"userxen guest alpha (domid %d) booted. hi-alpha\r\n" % domid)
    # The tree the toolstack wrote (fact sheet 4.1) with libxl's permissions.
    home = f"/local/domain/{domid}"
    with host.xs() as xs:
        assert xs.read(f"{home}/name") == b"alpha"
        assert [str(p) for p in xs.get_perms(home)] == ["n0", f"r{domid}"]
        assert [str(p) for p in xs.get_perms(f"{home}/control/shutdown")] == [f"n{domid}"]
        assert xs.read(f"{home}/console/type") == b"xenconsoled"
        assert int(xs.read(f"{home}/console/port")) > 0
        vm = xs.read(f"{home}/vm").decode()
        assert xs.read(f"{vm}/name") == b"alpha"
        backend = f"/local/domain/0/backend/console/{domid}/0"
        assert xs.read(f"{backend}/frontend") == f"{home}/console".encode()
        assert xs.read(f"{backend}/state") == b"4"  # served by the console daemon
        # The guest wrote its features over its own ring connection.
        assert wait_until(lambda: xs.read(f"{home}/control/feature-poweroff") == b"1", "feature-poweroff")
        assert xs.is_domain_introduced(domid)
    listing = host.uxl("list").stdout.decode().splitlines()
    assert listing[0].split() == ["Name", "ID", "Mem", "VCPUs", "State", "Time(s)"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert rows["Domain-0"][1] == "0"
    assert rows["alpha"][1:3] == [str(domid), "1"]
    assert host.uxl("domid", "alpha").stdout.strip() == str(domid).encode()
    assert host.uxl("domname", str(domid)).stdout.strip() == b"alpha"
    # Names are unique.
    again = host.uxl("create", "alpha", check=False)
    assert again.returncode == 1 and b"already exists" in again.stderr
    host.uxl("destroy", "alpha")


def test_console_attach_round_trip(host):
    domid = host.create("bravo", "--interval", "5")
    host.wait_log(domid, b"booted")
    proc = subprocess.Popen([sys.executable, "-m", "xenbus.toolstack.uxl", "console", "bravo"], env=host.env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        received = bytearray()

        def reader():
            while True:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    return
                received.extend(chunk)

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        time.sleep(0.3)  # let it attach
        proc.stdin.write(b"ping\r")
        proc.stdin.flush()
        wait_until(lambda: b"ping\r\n" in received, "the guest's echo through the console")
        proc.stdin.write(b"\x1d")  # Ctrl-] detaches
        proc.stdin.flush()
        assert proc.wait(10) == 0
        thread.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The input went through the guest's ring, so the echo is in the log too.
    assert b"ping\r\n" in host.log(domid)
    # The daemon's socket protocol, driven directly.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(host.console_path)
        sock.sendall(b"ATTACH 4000\n")
        assert sock.recv(100).startswith(b"ERR no console 0 for domain 4000")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(host.console_path)
        sock.sendall(b"ATTACH %d\nxyz\r" % domid)
        data = b""
        while b"xyz\r\n" not in data:
            data += sock.recv(4096)
        assert data.startswith(b"OK\n")
    bad = host.uxl("console", "nosuchdomain", check=False)
    assert bad.returncode == 1 and b"no domain named" in bad.stderr
    host.uxl("destroy", str(domid))


def _watch_release(host):
    """A raw watch on @releaseDomain (its first event is the registration's)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(host.xs_path)
    from xenstore.wire import Op, Packet

    sock.sendall(Packet(Op.WATCH, 1, 0, b"@releaseDomain\0tok\0").encode())
    return sock


def _count_release_events(sock, want: int, timeout: float = 10.0) -> int:
    from xenstore.wire import Op, PacketReader

    reader = PacketReader()
    events = 0
    deadline = time.monotonic() + timeout
    while events < want and time.monotonic() < deadline:
        try:
            data = sock.recv(4096)
        except socket.timeout:
            break
        reader.feed(data)
        for packet in reader:
            if packet.op == Op.WATCH_EVENT and packet.payload.startswith(b"@releaseDomain\0"):
                events += 1
    return events


def assert_cleaned_up(host, domid: int, vm: bytes, pids: list[int]) -> None:
    for path in (f"/local/domain/{domid}", vm.decode(), f"/libxl/{domid}", f"/local/domain/0/backend/console/{domid}"):
        assert host.read(path) is None, path
    with host.xs() as xs:
        assert not xs.is_domain_introduced(domid)
    wait_until(lambda: not any(process_alive(p) for p in pids), "guest and monitor processes gone")
    assert str(domid) not in [row.split()[1] for row in host.uxl("list").stdout.decode().splitlines()[1:]]


def test_shutdown_powers_the_guest_off_and_cleans_up(host):
    domid = host.create("charlie", "--interval", "0.05")
    host.wait_log(domid, b"tick 1")
    vm = host.read(f"/local/domain/{domid}/vm")
    pids = [guest_pid(host, domid), int(host.read(f"/libxl/{domid}/monitor-pid"))]
    watch = _watch_release(host)
    try:
        assert _count_release_events(watch, 1) == 1  # the registration event
        host.uxl("shutdown", "-w", "charlie", timeout=30)
        assert b"charlie: poweroff requested, shutting down\r\n" in host.log(domid)
        assert_cleaned_up(host, domid, vm, pids)
        assert _count_release_events(watch, 1) >= 1
    finally:
        watch.close()
    # Nothing left to shut down.
    again = host.uxl("shutdown", "charlie", check=False)
    assert again.returncode == 1


def test_destroy_kills_the_guest_and_cleans_up(host):
    domid = host.create("delta", "--interval", "0.05")
    host.wait_log(domid, b"booted")
    vm = host.read(f"/local/domain/{domid}/vm")
    pids = [guest_pid(host, domid), int(host.read(f"/libxl/{domid}/monitor-pid"))]
    watch = _watch_release(host)
    attached = socket.socket(socket.AF_UNIX)
    try:
        attached.settimeout(10)
        attached.connect(host.console_path)
        attached.sendall(b"ATTACH %d\n" % domid)
        assert attached.recv(3) == b"OK\n"
        assert _count_release_events(watch, 1) == 1
        host.uxl("destroy", "delta")
        assert_cleaned_up(host, domid, vm, pids)
        assert _count_release_events(watch, 1) >= 1
        # An attached console sees the console go away (end of stream), no hang.
        while attached.recv(4096):
            pass
    finally:
        watch.close()
        attached.close()
    assert host.uxl("destroy", "delta", check=False).returncode == 1
    assert host.uxl("destroy", "0", check=False).returncode == 1


def secondary_log(host, domid: int, devid: int) -> bytes:
    try:
        with open(os.path.join(host.log_dir, f"guest-{domid}-{devid}.log"), "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def test_console_daemon_restart_resumes_guest_output(host):
    out = host.uxl("create", "echo", "--consoles", "1", "--", sys.executable, "-m", "xenbus.guest", "--interval", "0.02")
    domid = int(out.stdout.decode().rsplit("id ", 1)[1].rstrip(")\n"))
    host.wait_log(domid, b"tick 3\r\n")
    # The secondary console is a XenBus device: both ends Connected.
    wait_until(lambda: b"echo: console 1 connected (#1)\r\n" in secondary_log(host, domid, 1), "console 1")
    assert host.read(f"/local/domain/{domid}/device/console/1/state") == b"4"
    assert host.read(f"/local/domain/0/backend/console/{domid}/1/state") == b"4"
    host.kill_consoled()
    killed_at = len(host.log(domid))
    time.sleep(0.5)  # ~25 ticks (~250 bytes) wait in the guest's 2 KiB ring
    assert len(host.log(domid)) == killed_at  # nobody serves the console now
    host.start_consoled(via_uxl=True)
    log = host.wait_log(domid, b"tick 60\r\n", timeout=15)
    # Nothing lost: every tick line from 1 to 60 is there, in order.
    lines = [line for line in log.split(b"\r\n") if line.startswith(b"tick ")]
    assert lines[:60] == [b"tick %d" % n for n in range(1, 61)]
    # The secondary console went through the XenBus reset and reconnected
    # with a fresh page (the restarted backend had lost its mapping).
    wait_until(lambda: b"echo: console 1 connected (#2)\r\n" in secondary_log(host, domid, 1), "console 1 reconnected")
    # And the new daemon serves attaches again, on both consoles.
    for devid in (0, 1):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(host.console_path)
            sock.sendall(b"ATTACH %d %d\nabc\r" % (domid, devid))
            data = b""
            while b"abc\r\n" not in data:
                data += sock.recv(4096)
            assert data.startswith(b"OK\n")
    host.uxl("destroy", "echo")
    assert host.read(f"/local/domain/0/backend/console/{domid}") is None


def test_create_from_a_config_file(host, tmp_path):
    cfg = tmp_path / "foxtrot.cfg"
    cfg.write_text(f'name = "foxtrot"  # the name\nmemory = 2\ncommand = ["{sys.executable}", "-m", "xenbus.guest", "--message", "from-cfg"]\n')
    out = host.uxl("create", str(cfg)).stdout.decode()
    domid = int(out.rsplit("id ", 1)[1].rstrip(")\n"))
    host.wait_log(domid, b"from-cfg")
    assert host.read(f"/local/domain/{domid}/memory/target") == b"2048"
    rows = {line.split()[0]: line.split() for line in host.uxl("list").stdout.decode().splitlines()[1:]}
    assert rows["foxtrot"][2] == "2"
    host.uxl("destroy", "foxtrot")
    bad = tmp_path / "bad.cfg"
    bad.write_text('name = "x"\nbogus = 1\n')
    result = host.uxl("create", str(bad), check=False)
    assert result.returncode == 1 and b"unknown key 'bogus'" in result.stderr


def test_console_on_a_terminal_is_raw_and_ctrl_bracket_detaches(host):
    import pty
    import select
    import termios

    domid = host.create("golf", "--interval", "10")
    host.wait_log(domid, b"booted")
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "xenbus.toolstack.uxl", "console", "golf"], env=host.env,
                            stdin=slave, stdout=slave, stderr=slave)
    try:
        time.sleep(0.5)
        os.write(master, b"qq\r")
        out = b""
        deadline = time.monotonic() + 10
        while b"qq\r\n" not in out and time.monotonic() < deadline:
            if select.select([master], [], [], 0.1)[0]:
                out += os.read(master, 4096)
        # Raw mode: no local echo, so the only copy is the guest's echo.
        assert out == b"qq\r\n"
        os.write(master, b"\x1d")
        assert proc.wait(10) == 0
        assert termios.tcgetattr(slave) == before  # the terminal is restored
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        os.close(slave)
    host.uxl("destroy", "golf")
