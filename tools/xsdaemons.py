"""What the xenstored tools share: a minimal blocking wire client, and
starting our daemon next to another one (any XenStore daemon on a unix
socket, e.g. Xen's C xenstored) and stopping both again.

Stdlib + ``xenstore.wire`` only, so that the tools measure the daemons,
not a client library.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

from xenstore.wire import HEADER, Op  # noqa: E402


class Client:
    """One socket connection, requests and replies as raw payloads."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.buf = bytearray()
        self.req = 0
        #: Watch event payloads received so far (``replies`` sets them aside).
        self.events: list[bytes] = []

    def request(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        self.req += 1
        return HEADER.pack(op, self.req, tx, len(payload)) + payload

    def replies(self, n: int) -> list[tuple[int, bytes]]:
        """Read ``n`` replies (watch events go to :attr:`events`)."""
        out = []
        buf = self.buf
        recv = self.sock.recv
        while len(out) < n:
            while len(buf) < 16 or len(buf) < 16 + HEADER.unpack_from(buf)[3]:
                chunk = recv(1 << 16)
                if not chunk:
                    raise ConnectionError("daemon closed the connection")
                buf += chunk
            op, _, _, length = HEADER.unpack_from(buf)
            payload = bytes(buf[16 : 16 + length])
            del buf[: 16 + length]
            if op == Op.WATCH_EVENT:
                self.events.append(payload)
            else:
                out.append((op, payload))
        return out

    def call(self, op: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self.sock.sendall(self.request(op, payload, tx))
        return self.replies(1)[0]

    def pid_of_peer(self) -> int:
        cred = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        return struct.unpack("3i", cred)[0]


def start_ours(tmp: str, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """This checkout's daemon (wherever the tool is run from), default
    flags plus ``extra``, socket and state dir in ``tmp``."""
    path = os.path.join(tmp, "ours.sock")
    env = dict(os.environ, XENSTORED_PATH=path, PYTHONPATH=os.pathsep.join(filter(None, (_REPO, os.environ.get("PYTHONPATH")))))
    cmd = [sys.executable, "-m", "xenstore.daemon.main", "-N", "--state-dir", os.path.join(tmp, "state"), *extra]
    proc = subprocess.Popen(cmd, env=env)
    wait_socket(path, proc)
    return proc, path


def wait_socket(path: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("daemon exited at start-up")
        try:
            Client(path).sock.close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on {path}")


@contextlib.contextmanager
def daemons(compare_start: str | None, compare_socket: str | None, ours_args: list[str], prefix: str) -> Iterator[list[str]]:
    """The sockets of our fresh daemon and, if asked for, the other one:
    started by ``compare_start SOCKET`` (which prints its pid last), or
    already listening on ``compare_socket``.  Both stopped (a started one)
    and the temporary files removed on exit."""
    # SIGTERM cleans up like ^C.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tmp = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    theirs_pid = None
    ours_proc = None
    try:
        ours_proc, ours_path = start_ours(tmp, ours_args)
        theirs_path = compare_socket
        if compare_start:
            theirs_path = os.path.join(tmp, "theirs.sock")
            out = subprocess.run([compare_start, theirs_path], check=True, stdout=subprocess.PIPE, text=True).stdout
            theirs_pid = int(out.split()[-1])
            wait_socket(theirs_path)
        yield [ours_path] + ([theirs_path] if theirs_path else [])
    finally:
        if ours_proc is not None:
            ours_proc.send_signal(signal.SIGTERM)
            ours_proc.wait(10)
        if theirs_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(theirs_pid, signal.SIGTERM)
        shutil.rmtree(tmp, ignore_errors=True)
