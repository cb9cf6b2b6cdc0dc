"""An in-memory XenStore for driver tests (implements ``xenbus.driver.Store``).

Semantics kept from Xen: writes create missing ancestors; ``rm`` removes a
subtree; a watch fires once on registration and then for every change at,
below or (for ``rm``) above its path; transactions are optimistic and fail
with ``EAGAIN`` when anything they read or wrote changed meanwhile.
Permissions and quotas are not modelled.  Every operation is a trio
checkpoint so concurrent tasks interleave.
"""

from __future__ import annotations

import math
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from xenstore.wire import XenStoreError


def _parent(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def _related(event: str, watched: str, removal: bool) -> bool:
    if event == watched or event.startswith(watched.rstrip("/") + "/"):
        return True
    return removal and watched.startswith(event.rstrip("/") + "/")


@dataclass
class _Watch:
    path: str
    send: trio.MemorySendChannel
    receive: trio.MemoryReceiveChannel


@dataclass
class FakeStore:
    nodes: dict[str, bytes] = field(default_factory=lambda: {"/": b""})
    gens: dict[str, int] = field(default_factory=dict)
    counter: int = 0
    watches: list[_Watch] = field(default_factory=list)
    events_sent: int = 0
    max_queue: int = 0  # longest any watch queue got (driver drain speed)
    writes: list[tuple[str, bytes | None]] = field(default_factory=list)  # trace

    # ---- live operations -------------------------------------------------

    async def read(self, path: str) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._read(path)

    async def write(self, path: str, value: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self._write(path, value)

    async def mkdir(self, path: str) -> None:
        await trio.lowlevel.checkpoint()
        if path not in self.nodes:
            self._write(path, b"")

    async def rm(self, path: str) -> None:
        await trio.lowlevel.checkpoint()
        self._rm(path)

    async def directory(self, path: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        return self._directory(path)

    # ---- helpers shared with transactions ---------------------------------

    def _read(self, path: str) -> bytes:
        try:
            return self.nodes[path]
        except KeyError:
            raise XenStoreError("ENOENT", path) from None

    def _directory(self, path: str) -> list[str]:
        if path not in self.nodes:
            raise XenStoreError("ENOENT", path)
        prefix = path.rstrip("/") + "/"
        return [p[len(prefix) :] for p in self.nodes if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != "/"]

    def _bump(self, path: str) -> None:
        self.counter += 1
        self.gens[path] = self.counter

    def _write(self, path: str, value: bytes) -> None:
        missing = []
        p = path
        while p not in self.nodes:
            missing.append(p)
            p = _parent(p)
        for p in reversed(missing):
            self.nodes[p] = b""
            self._bump(p)
            self._bump(_parent(p))
        self.nodes[path] = bytes(value)
        self._bump(path)
        self.writes.append((path, bytes(value)))
        self._fire(path, removal=False)

    def _rm(self, path: str) -> None:
        if path not in self.nodes:
            raise XenStoreError("ENOENT", path)
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.nodes if p == path or p.startswith(prefix)]:
            del self.nodes[p]
            self._bump(p)
        self._bump(_parent(path))
        self.writes.append((path, None))
        self._fire(path, removal=True)

    def _fire(self, path: str, removal: bool) -> None:
        for watch in self.watches:
            if _related(path, watch.path, removal=False):
                self._send(watch, path)
            elif removal and _related(path, watch.path, removal=True):
                # A watch inside a removed subtree fires with its own path.
                self._send(watch, watch.path)

    def _send(self, watch: _Watch, path: str) -> None:
        try:
            watch.send.send_nowait(path)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            return
        self.events_sent += 1
        self.max_queue = max(self.max_queue, watch.send.statistics().current_buffer_used)

    # ---- Store protocol --------------------------------------------------

    @asynccontextmanager
    async def watch(self, path: str):
        send, receive = trio.open_memory_channel(math.inf)
        watch = _Watch(path, send, receive)
        self.watches.append(watch)
        self._send(watch, path)  # Xen fires every new watch once
        try:
            async with receive:
                yield receive
        finally:
            self.watches.remove(watch)
            send.close()

    @asynccontextmanager
    async def transaction(self):
        tx = FakeTransaction(self)
        yield tx
        await trio.lowlevel.checkpoint()
        tx.commit()

    # ---- test conveniences -------------------------------------------------

    def value(self, path: str) -> str | None:
        raw = self.nodes.get(path)
        return None if raw is None else raw.decode()

    def subtree(self, path: str) -> dict[str, str]:
        prefix = path.rstrip("/") + "/"
        return {p[len(prefix) :]: v.decode() for p, v in self.nodes.items() if p.startswith(prefix)}


class FakeTransaction:
    """Copy-on-write view; commit fails with EAGAIN on any conflict."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.start = store.counter
        self.view = dict(store.nodes)
        self.touched: set[str] = set()
        self.ops: list[tuple[str, str, bytes]] = []

    def _conflicted(self) -> bool:
        return any(self.store.gens.get(p, 0) > self.start for p in self.touched)

    async def read(self, path: str) -> bytes:
        await trio.lowlevel.checkpoint()
        self.touched.add(path)
        try:
            return self.view[path]
        except KeyError:
            raise XenStoreError("ENOENT", path) from None

    async def write(self, path: str, value: bytes) -> None:
        await trio.lowlevel.checkpoint()
        p = path
        while p not in self.view:
            self.view[p] = b""
            self.touched.add(p)
            p = _parent(p)
        self.touched.add(p)
        self.view[path] = bytes(value)
        self.touched.add(path)
        self.ops.append(("write", path, bytes(value)))

    async def mkdir(self, path: str) -> None:
        if path not in self.view:
            await self.write(path, b"")

    async def rm(self, path: str) -> None:
        await trio.lowlevel.checkpoint()
        self.touched.add(path)
        if path not in self.view:
            raise XenStoreError("ENOENT", path)
        prefix = path.rstrip("/") + "/"
        for p in [p for p in self.view if p == path or p.startswith(prefix)]:
            del self.view[p]
        self.ops.append(("rm", path, b""))

    async def directory(self, path: str) -> list[str]:
        await trio.lowlevel.checkpoint()
        self.touched.add(path)
        if path not in self.view:
            raise XenStoreError("ENOENT", path)
        prefix = path.rstrip("/") + "/"
        return [p[len(prefix) :] for p in self.view if p.startswith(prefix) and "/" not in p[len(prefix) :] and p != "/"]

    def commit(self) -> None:
        if self._conflicted():
            raise XenStoreError("EAGAIN")
        for op, path, value in self.ops:
            if op == "write":
                self.store._write(path, value)
            elif path in self.store.nodes:
                self.store._rm(path)
