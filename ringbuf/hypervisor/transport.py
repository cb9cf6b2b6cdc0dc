"""One message per SOCK_SEQPACKET packet, with SCM_RIGHTS file descriptors."""

from __future__ import annotations

import array
import os
import socket
from typing import Sequence

import trio

from .protocol import MAX_FDS, MAX_MESSAGE, ProtocolError

__all__ = ["send_packet", "recv_packet", "close_fds"]

_ANCILLARY = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


async def send_packet(sock: trio.socket.SocketType, data: bytes, fds: Sequence[int] = ()) -> None:
    if len(fds) > MAX_FDS:
        raise ValueError(f"at most {MAX_FDS} fds per message")
    if fds:
        await sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        await sock.send(data)


async def recv_packet(sock: trio.socket.SocketType) -> tuple[bytes, list[int]]:
    """Next packet and the fds that came with it; ``(b"", [])`` at end of stream.

    Truncated data or fds are a :class:`ProtocolError` (the fds that did
    arrive are closed first).
    """
    data, ancdata, flags, _addr = await sock.recvmsg(MAX_MESSAGE + 1, _ANCILLARY)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(payload[: len(payload) - len(payload) % arr.itemsize])
            fds.extend(arr)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(data) > MAX_MESSAGE:
        close_fds(fds)
        raise ProtocolError("message or file descriptors truncated")
    return data, fds
