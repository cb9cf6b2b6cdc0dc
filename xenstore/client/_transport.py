"""How the async client moves bytes: a tiny, pluggable interface.

A :class:`Transport` sends bytes and receives bytes — nothing about
XenStore.  Today there is the unix socket (dom0 tools, the daemon's
socket); a guest domain's shared-memory ring plugs in later with the same
two methods.
"""

from __future__ import annotations

import abc

import trio

from ._paths import daemon_socket_path

__all__ = ["Transport", "StreamTransport", "open_unix_transport"]


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


async def open_unix_transport(path: str | None = None) -> StreamTransport:
    """Connect to the daemon's unix socket (libxenstore's path rules).

    Without ``path``: ``$XENSTORED_PATH``, else ``$XENSTORED_RUNDIR/socket``,
    else ``/var/run/xenstored/socket``.  (The kernel's xenbus device is
    only supported by the blocking client.)
    """
    return StreamTransport(await trio.open_unix_socket(path if path is not None else daemon_socket_path()))
