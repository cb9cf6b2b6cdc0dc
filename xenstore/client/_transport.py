"""How the async client moves bytes: a tiny, pluggable interface.

A :class:`Transport` sends bytes and receives bytes — nothing about
XenStore.  Today there is the unix socket (dom0 tools, the daemon's
socket); a guest domain's shared-memory ring plugs in later with the same
two methods.
"""

from __future__ import annotations

import abc
import os
import socket

import trio

from ._paths import daemon_socket_path

__all__ = ["Transport", "StreamTransport", "UnixSocketTransport", "open_unix_transport"]


class Transport(abc.ABC):
    """A reliable, ordered byte stream to the daemon."""

    @abc.abstractmethod
    async def send_all(self, data: bytes) -> None:
        """Send every byte (the client never calls this concurrently)."""

    @abc.abstractmethod
    async def receive_some(self) -> bytes:
        """Some bytes; ``b""`` once the peer has closed the stream."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Close; idempotent."""

    def send_nowait(self, data: bytes) -> int:
        """Send what can go without blocking; returns the byte count.

        Optional fast path (the default sends nothing): the client tries it
        first so a request usually leaves without a task switch, and never
        half-sent by a cancellation since nothing here awaits.
        """
        return 0


class StreamTransport(Transport):
    """Any :class:`trio.abc.Stream` (a socket, or a memory stream in tests)."""

    def __init__(self, stream: trio.abc.Stream, receive_size: int = 65536) -> None:
        self.stream = stream
        self._receive_size = receive_size

    async def send_all(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def receive_some(self) -> bytes:
        return bytes(await self.stream.receive_some(self._receive_size))

    async def aclose(self) -> None:
        await self.stream.aclose()


class UnixSocketTransport(Transport):
    """A connected unix socket driven with trio's low-level readiness waits."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    @classmethod
    async def connect(cls, path: str) -> "UnixSocketTransport":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            try:
                sock.connect(path)
            except BlockingIOError:  # a busy listener: wait, then check
                await trio.lowlevel.wait_writable(sock)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise OSError(err, os.strerror(err), path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send_nowait(self, data: bytes) -> int:
        try:
            return self._sock.send(data, socket.MSG_NOSIGNAL)
        except BlockingIOError:
            return 0

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.checkpoint_if_cancelled()
            sent = self.send_nowait(view)
            if not sent:
                await trio.lowlevel.wait_writable(self._sock)
            view = view[sent:]

    async def receive_some(self) -> bytes:
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            try:
                return self._sock.recv(65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(self._sock)

    async def aclose(self) -> None:
        if self._sock.fileno() >= 0:
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
        await trio.lowlevel.checkpoint()


async def open_unix_transport(path: str | None = None) -> UnixSocketTransport:
    """Connect to the daemon's unix socket (libxenstore's path rules).

    Without ``path``: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``,
    else ``/var/run/xenstored/socket``.  (The kernel's xenbus device is
    only supported by the blocking client.)
    """
    return await UnixSocketTransport.connect(path if path is not None else daemon_socket_path())
