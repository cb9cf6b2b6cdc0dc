"""Shared fixtures: a real ``xenstored`` subprocess and a raw wire client.

    def test_x(xenstored):                 # a daemon on a temp socket + temp state dir
        c = xenstored.connect()            # WireConn: raw socket + xenstore.wire
        assert c.call(Op.WRITE, b"/a\\0v") == (Op.WRITE, b"OK\\0")

    def test_y(xenstored_factory):         # several daemons / custom flags / restarts
        d = xenstored_factory.start("-I", "on")
        d.kill()                            # SIGKILL; d.stop() is SIGTERM + wait
        d2 = xenstored_factory.start(state_dir=d.state_dir)

Each daemon runs ``python -m xenstore.daemon.main -N`` with ``XENSTORED_PATH``
set; its stderr goes to ``d.stderr_path``.  Every daemon is stopped and
every temp dir removed at teardown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from xenstore.wire import HEADER, Op, Packet

START_TIMEOUT = 15.0


class WireConn:
    """A blocking raw-socket XenStore client for tests."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)  # blocking: a full listen backlog makes a timed connect fail with EAGAIN
        self.sock.settimeout(timeout)
        self._buf = bytearray()
        self._req_id = 0
        #: Watch events received while waiting for replies, oldest first.
        self.events: list[tuple[bytes, bytes]] = []

    def send(self, op: int, payload: bytes = b"", tx_id: int = 0, req_id: int | None = None) -> int:
        if req_id is None:
            self._req_id += 1
            req_id = self._req_id
        self.sock.sendall(Packet(op, req_id, tx_id, payload).encode())
        return req_id

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_packet(self) -> Packet:
        while True:
            if len(self._buf) >= 16:
                op, req_id, tx_id, length = HEADER.unpack_from(self._buf)
                if len(self._buf) >= 16 + length:
                    payload = bytes(self._buf[16 : 16 + length])
                    del self._buf[: 16 + length]
                    return Packet(op, req_id, tx_id, payload)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("daemon closed the connection")
            self._buf += chunk

    def read_reply(self) -> Packet:
        """The next non-event packet (events are appended to ``events``)."""
        while True:
            packet = self.read_packet()
            if packet.op == Op.WATCH_EVENT:
                parts = packet.payload.split(b"\0")
                self.events.append((parts[0], parts[1]))
                continue
            return packet

    def wait_event(self) -> tuple[bytes, bytes]:
        while not self.events:
            packet = self.read_packet()
            if packet.op != Op.WATCH_EVENT:
                raise AssertionError(f"unexpected {packet!r} while waiting for an event")
            parts = packet.payload.split(b"\0")
            self.events.append((parts[0], parts[1]))
        return self.events.pop(0)

    def call(self, op: int, payload: bytes = b"", tx_id: int = 0) -> tuple[int, bytes]:
        req_id = self.send(op, payload, tx_id)
        reply = self.read_reply()
        assert reply.req_id == req_id, (reply, req_id)
        return reply.op, reply.payload

    def write(self, path: str, value: bytes, tx_id: int = 0) -> None:
        assert self.call(Op.WRITE, path.encode() + b"\0" + value, tx_id) == (Op.WRITE, b"OK\0")

    def read(self, path: str, tx_id: int = 0) -> bytes | None:
        op, payload = self.call(Op.READ, path.encode() + b"\0", tx_id)
        if op == Op.ERROR:
            assert payload == b"ENOENT\0", payload
            return None
        return payload

    def close(self) -> None:
        self.sock.close()


class DaemonProcess:
    """One ``xenstored -N`` subprocess."""

    def __init__(self, socket_path: str, state_dir: str, args: tuple[str, ...], stderr_path: str) -> None:
        self.socket_path = socket_path
        self.state_dir = state_dir
        self.args = args
        self.stderr_path = stderr_path
        env = dict(os.environ, XENSTORED_PATH=socket_path)
        cmd = [sys.executable, "-m", "xenstore.daemon.main", "-N", "--state-dir", state_dir, *args]
        self._stderr = open(stderr_path, "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr)
        self._conns: list[WireConn] = []
        self._wait_ready()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"xenstored exited with {self.proc.returncode}: {self.stderr()}")
            try:
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                probe.connect(self.socket_path)
                probe.close()
                return
            except OSError:
                probe.close()
                time.sleep(0.02)
        self.kill()
        raise RuntimeError(f"xenstored did not start: {self.stderr()}")

    def connect(self, timeout: float = 10.0) -> WireConn:
        conn = WireConn(self.socket_path, timeout)
        self._conns.append(conn)
        return conn

    def stderr(self) -> str:
        with open(self.stderr_path, "rb") as f:
            return f.read().decode(errors="replace")

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        self._close_conns()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: no clean-up at all."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_conns()
        self._stderr.close()

    def _close_conns(self) -> None:
        for conn in self._conns:
            conn.close()
        self._conns.clear()


class DaemonFactory:
    def __init__(self) -> None:
        self.tmpdir = tempfile.mkdtemp(prefix="xsd-", dir="/tmp")  # short: AF_UNIX paths <= 107 bytes
        self.daemons: list[DaemonProcess] = []
        self._count = 0

    def start(self, *args: str, state_dir: str | None = None, socket_path: str | None = None) -> DaemonProcess:
        """Start a daemon; reuse ``state_dir`` to restart on the same store."""
        self._count += 1
        if state_dir is None:
            state_dir = os.path.join(self.tmpdir, f"state{self._count}")
        if socket_path is None:
            socket_path = os.path.join(self.tmpdir, f"s{self._count}", "socket")
        stderr_path = os.path.join(self.tmpdir, f"stderr{self._count}")
        daemon = DaemonProcess(socket_path, state_dir, args, stderr_path)
        self.daemons.append(daemon)
        return daemon

    def cleanup(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@pytest.fixture
def xenstored_factory():
    factory = DaemonFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture(scope="module")
def xenstored_module_factory():
    """Like ``xenstored_factory`` but shared by a whole test module."""
    factory = DaemonFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def xenstored(xenstored_factory) -> DaemonProcess:
    return xenstored_factory.start()
