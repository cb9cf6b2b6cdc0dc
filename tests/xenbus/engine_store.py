"""``xenbus.driver.Store`` over the project's pure XenStore engine, in process.

Each :class:`EngineStore` is one connection (a domain, privileged or not),
so permissions, the watch permission filter and transaction conflicts are
the real engine's.  Requests are handled synchronously; watch events are
routed to per-watch memory channels.
"""

from __future__ import annotations

import itertools
import math
from contextlib import asynccontextmanager

import trio

from xenstore.core import Engine
from xenstore.wire import Op, Packet, XenStoreError, join_strings, split_strings


class EngineHub:
    """One engine shared by every connection of a test."""

    def __init__(self) -> None:
        self.engine = Engine()
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.watches: dict[tuple[int, bytes], trio.MemorySendChannel] = {}

    def connect(self, domid: int, privileged: bool = False) -> EngineStore:
        return EngineStore(self, self.engine.connect(domid=domid, privileged=privileged))

    def request(self, conn, op: Op, payload: bytes, tx_id: int = 0) -> bytes:
        packet = Packet(op, next(self._req_ids), tx_id, payload)
        reply = None
        for target, out in self.engine.handle(conn, packet):
            if out.op == Op.WATCH_EVENT:
                path, token = split_strings(out.payload)[:2]
                send = self.watches.get((target.id, token))
                if send is not None:
                    try:
                        send.send_nowait(path.decode())
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the watcher is shutting down
            elif target is conn:
                reply = out
        assert reply is not None, "the engine always answers"
        if reply.op == Op.ERROR:
            raise XenStoreError(split_strings(reply.payload)[0].decode())
        return reply.payload


class _Ops:
    def __init__(self, hub: EngineHub, conn, tx_id: int = 0) -> None:
        self.hub = hub
        self.conn = conn
        self.tx_id = tx_id

    async def _call(self, op: Op, payload: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        return self.hub.request(self.conn, op, payload, self.tx_id)

    async def read(self, path: str) -> bytes:
        return await self._call(Op.READ, join_strings(path))

    async def write(self, path: str, value: bytes) -> None:
        await self._call(Op.WRITE, path.encode() + b"\x00" + value)

    async def mkdir(self, path: str) -> None:
        await self._call(Op.MKDIR, join_strings(path))

    async def rm(self, path: str) -> None:
        await self._call(Op.RM, join_strings(path))

    async def directory(self, path: str) -> list[str]:
        return [name.decode() for name in split_strings(await self._call(Op.DIRECTORY, join_strings(path)))]

    async def set_perms(self, path: str, perms: tuple[str, ...]) -> None:
        await self._call(Op.SET_PERMS, join_strings(path, *perms))


class EngineStore(_Ops):
    def __init__(self, hub: EngineHub, conn) -> None:
        super().__init__(hub, conn)

    @asynccontextmanager
    async def transaction(self):
        await trio.lowlevel.checkpoint()
        tx_id = int(split_strings(self.hub.request(self.conn, Op.TRANSACTION_START, b"\x00"))[0])
        ops = _Ops(self.hub, self.conn, tx_id)
        try:
            yield ops
        except BaseException:
            self.hub.request(self.conn, Op.TRANSACTION_END, join_strings("F"), tx_id)
            raise
        await trio.lowlevel.checkpoint()
        self.hub.request(self.conn, Op.TRANSACTION_END, join_strings("T"), tx_id)

    @asynccontextmanager
    async def watch(self, path: str):
        token = f"w{next(self.hub._tokens)}".encode()
        send, receive = trio.open_memory_channel(math.inf)
        self.hub.watches[(self.conn.id, token)] = send
        await trio.lowlevel.checkpoint()
        self.hub.request(self.conn, Op.WATCH, join_strings(path.encode(), token))
        try:
            async with receive:
                yield receive
        finally:
            self.hub.watches.pop((self.conn.id, token), None)
            try:
                self.hub.request(self.conn, Op.UNWATCH, join_strings(path.encode(), token))
            except XenStoreError:
                pass
