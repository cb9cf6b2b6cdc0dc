"""The tools redo their whole transaction on EAGAIN, printing only the last
attempt's output (a scripted daemon makes the conflict deterministic)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

from xenstore.wire import Op, Packet, PacketReader

pytestmark = pytest.mark.timeout(60)


class ScriptedDaemon:
    """Answers READ from a dict; fails the first ``conflicts`` commits with EAGAIN."""

    def __init__(self, path: str, values: dict[bytes, bytes], conflicts: int) -> None:
        self.values = values
        self.conflicts = conflicts
        self.log: list[tuple[int, int]] = []  # (op, tx_id) of every request
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(path)
        self.listener.listen(1)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _reply(self, request: Packet) -> Packet:
        if request.op == Op.TRANSACTION_START:
            return request.reply(Op.TRANSACTION_START, b"%d\0" % (len(self.log) + 100))
        if request.op == Op.TRANSACTION_END:
            if request.payload == b"T\0" and self.conflicts:
                self.conflicts -= 1
                return request.error_reply("EAGAIN")
            return request.reply(Op.TRANSACTION_END, b"OK\0")
        if request.op == Op.READ:
            value = self.values.get(request.args[0])
            return request.reply(Op.READ, value) if value is not None else request.error_reply("ENOENT")
        return request.error_reply("ENOSYS")

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        reader = PacketReader()
        with conn:
            while data := conn.recv(65536):
                reader.feed(data)
                for request in reader:
                    self.log.append((request.op, request.tx_id))
                    conn.sendall(self._reply(request).encode())

    def close(self) -> None:
        self.listener.close()


def run_read(socket_path: str, *paths: str) -> subprocess.CompletedProcess:
    code = "import sys; from xenstore.cli.main import main_read; sys.argv[0] = 'xenstore-read'; sys.exit(main_read())"
    env = dict(os.environ, XENSTORED_PATH=socket_path)
    return subprocess.run([sys.executable, "-c", code, *paths], env=env, capture_output=True, timeout=30)


@pytest.mark.parametrize("conflicts", [0, 1, 3])
def test_read_retries_the_transaction_on_eagain(tmp_path, conflicts):
    daemon = ScriptedDaemon(str(tmp_path / "s"), {b"/a": b"1", b"/b": b"two"}, conflicts)
    try:
        done = run_read(str(tmp_path / "s"), "/a", "/b")
    finally:
        daemon.close()
    assert (done.returncode, done.stdout, done.stderr) == (0, b"1\ntwo\n", b"")  # printed once
    starts = [tx for op, tx in daemon.log if op == Op.TRANSACTION_START]
    assert len(starts) == conflicts + 1
    reads = [tx for op, tx in daemon.log if op == Op.READ]
    assert len(reads) == 2 * (conflicts + 1) and all(reads)  # every read inside a transaction


def test_failed_read_aborts_without_retry(tmp_path):
    daemon = ScriptedDaemon(str(tmp_path / "s"), {b"/a": b"1"}, conflicts=5)
    try:
        done = run_read(str(tmp_path / "s"), "/a", "/nope")
    finally:
        daemon.close()
    # Like Xen's tool: the output gathered so far is still printed, status 1.
    assert (done.returncode, done.stdout, done.stderr) == (1, b"1\n", b"xenstore-read: couldn't read path /nope\n")
    assert [op for op, _ in daemon.log].count(Op.TRANSACTION_START) == 1
