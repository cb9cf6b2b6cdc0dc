"""Byte-stream rings: the XenStore page and the PV console page.

Both pages hold two byte queues (one per direction) with free-running
uint32 producer/consumer indices; byte *x* of a stream lives at
``buf[x & (size - 1)]``. One ``ByteQueue`` implements the transfer
algorithm of xenstore-ring.txt for every queue:

1. read ``cons`` and ``prod`` once each;
2. sanity-check ``(prod - cons) mod 2^32 <= size`` (else ``RingIndexError``,
   cxenstored's XENSTORE_ERROR_RINGIDX);
3. copy the contiguous chunk, then the wrapped remainder;
4. publish the new index with one aligned 32-bit store.

There is no event-index hold-off on these rings: the caller notifies after
every read or write that moved bytes. On x86-64 no fence is needed here:
the only reordering is store->load, and both sides only ever load indices,
move data, then store their own index.

``ByteRing`` is one end (guest or server) of such a page, built from a
``ByteRingLayout``; ``XenstoreRing`` and ``ConsoleRing`` add the control
fields of each page.
"""

from __future__ import annotations

import ctypes
import enum
from dataclasses import dataclass

from .layouts.console import XENCONSOLE_CONNECTED, XenconsInterface
from .layouts.xenstore import (
    XENSTORE_CONNECTED,
    XENSTORE_RECONNECT,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
    XenstoreDomainInterface,
)
from .ring import RING_IDX_MASK, RingIndexError

__all__ = [
    "CONSOLE_LAYOUT",
    "XENSTORE_LAYOUT",
    "ByteQueue",
    "ByteQueueLayout",
    "ByteRing",
    "ByteRingLayout",
    "ByteRingRole",
    "ConsoleRing",
    "XenstoreRing",
]


class ByteRingRole(enum.Enum):
    GUEST = "guest"  # writes req/out, reads rsp/in
    SERVER = "server"  # xenstored / console backend: the opposite


@dataclass(frozen=True)
class ByteQueueLayout:
    """Field names (in the page's ctypes structure) of one direction."""

    data: str
    cons: str
    prod: str


@dataclass(frozen=True)
class ByteRingLayout:
    interface: type[ctypes.Structure]
    guest_to_server: ByteQueueLayout
    server_to_guest: ByteQueueLayout


XENSTORE_LAYOUT = ByteRingLayout(
    XenstoreDomainInterface,
    guest_to_server=ByteQueueLayout("req", "req_cons", "req_prod"),
    server_to_guest=ByteQueueLayout("rsp", "rsp_cons", "rsp_prod"),
)
CONSOLE_LAYOUT = ByteRingLayout(
    XenconsInterface,
    guest_to_server=ByteQueueLayout("out", "out_cons", "out_prod"),
    server_to_guest=ByteQueueLayout("in_", "in_cons", "in_prod"),
)


def _field_view(page: memoryview, interface: type[ctypes.Structure], name: str) -> memoryview:
    descriptor = getattr(interface, name)
    return page[descriptor.offset : descriptor.offset + descriptor.size]


class ByteQueue:
    """One direction of a byte ring: ``size`` (a power of two) bytes of data."""

    def __init__(self, data: memoryview, cons: memoryview, prod: memoryview, what: str) -> None:
        self.size = data.nbytes
        if self.size & (self.size - 1):
            raise ValueError(f"byte ring size must be a power of two, got {self.size}")
        self._data = data
        self._cons = cons.cast("I")  # one aligned 32-bit access each
        self._prod = prod.cast("I")
        self.what = what

    def _indices(self) -> tuple[int, int]:
        cons = self._cons[0]
        prod = self._prod[0]
        if (prod - cons) & RING_IDX_MASK > self.size:
            raise RingIndexError(f"{self.what} indices", prod, cons, self.size)
        return cons, prod

    @property
    def cons(self) -> int:
        return self._cons[0]

    @property
    def prod(self) -> int:
        return self._prod[0]

    def readable(self) -> int:
        cons, prod = self._indices()
        return (prod - cons) & RING_IDX_MASK

    def writable(self) -> int:
        return self.size - self.readable()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Producer side: copy as much of ``data`` as fits, publish, return the count."""
        src = memoryview(data).cast("B")
        cons, prod = self._indices()
        n = min(src.nbytes, self.size - ((prod - cons) & RING_IDX_MASK))
        if n == 0:
            return 0
        start = prod & (self.size - 1)
        first = min(n, self.size - start)
        self._data[start : start + first] = src[:first]
        if n > first:
            self._data[: n - first] = src[first:n]
        self._prod[0] = (prod + n) & RING_IDX_MASK
        return n

    def read(self, max_bytes: int | None = None) -> bytes:
        """Consumer side: copy out up to ``max_bytes`` available bytes and consume them."""
        cons, prod = self._indices()
        n = (prod - cons) & RING_IDX_MASK
        if max_bytes is not None:
            n = min(n, max_bytes)
        if n == 0:
            return b""
        start = cons & (self.size - 1)
        first = min(n, self.size - start)
        out = bytes(self._data[start : start + first])
        if n > first:
            out += bytes(self._data[: n - first])
        self._cons[0] = (cons + n) & RING_IDX_MASK
        return out

    def reset(self, fill: int = 0xFF) -> None:
        """Empty the queue (server side of a reconnection): indices to 0."""
        self._data[:] = bytes([fill]) * self.size
        self._cons[0] = 0
        self._prod[0] = 0

    def release(self) -> None:
        for view in (self._cons, self._prod, self._data):
            view.release()


class ByteRing:
    """One end of a two-queue byte ring page."""

    def __init__(self, buf: object, layout: ByteRingLayout, role: ByteRingRole) -> None:
        page = memoryview(buf)  # type: ignore[arg-type]
        if page.readonly:
            raise ValueError("byte ring buffer must be writable")
        page = page.cast("B")
        if page.nbytes < ctypes.sizeof(layout.interface):
            raise ValueError(f"{page.nbytes} bytes cannot hold {layout.interface.__name__}")
        self.role = role
        self.layout = layout
        self._page = page

        def queue(q: ByteQueueLayout) -> ByteQueue:
            return ByteQueue(
                _field_view(page, layout.interface, q.data),
                _field_view(page, layout.interface, q.cons),
                _field_view(page, layout.interface, q.prod),
                q.data,
            )

        up, down = queue(layout.guest_to_server), queue(layout.server_to_guest)
        self.outgoing, self.incoming = (up, down) if role is ByteRingRole.GUEST else (down, up)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue bytes for the peer; returns how many fit. Notify the peer if > 0."""
        return self.outgoing.write(data)

    def read(self, max_bytes: int | None = None) -> bytes:
        """Take bytes from the peer. Notify the peer if any were read (it may wait for space)."""
        return self.incoming.read(max_bytes)

    def readable(self) -> int:
        return self.incoming.readable()

    def writable(self) -> int:
        return self.outgoing.writable()

    def _word(self, name: str) -> memoryview:
        return _field_view(self._page, self.layout.interface, name)

    def release(self) -> None:
        self.outgoing.release()
        self.incoming.release()
        self._page.release()


class XenstoreRing(ByteRing):
    """One end of ``struct xenstore_domain_interface`` plus its control fields."""

    def __init__(self, buf: object, role: ByteRingRole) -> None:
        super().__init__(buf, XENSTORE_LAYOUT, role)
        self._features = self._word("server_features").cast("I")
        self._connection = self._word("connection").cast("I")
        self._error = self._word("error").cast("I")
        self._evtchn_port = self._word("evtchn_port").cast("I")

    @property
    def server_features(self) -> int:
        return self._features[0]

    @property
    def connection(self) -> int:
        return self._connection[0]

    @property
    def error(self) -> int:
        return self._error[0]

    @property
    def evtchn_port(self) -> int:
        return self._evtchn_port[0]

    # -- server side -------------------------------------------------------
    def advertise_features(self, bits: int) -> None:
        """Server: add feature bits (never cleared)."""
        self._require(ByteRingRole.SERVER)
        self._features[0] = self._features[0] | bits

    def set_error(self, code: int) -> None:
        """Server: record why it stopped talking to this guest (XENSTORE_ERROR_*)."""
        self._require(ByteRingRole.SERVER)
        self._error[0] = code

    def reconnect_requested(self) -> bool:
        return self._connection[0] == XENSTORE_RECONNECT

    def complete_reconnect(self) -> None:
        """Server: empty both queues (like oxenstored: indices 0, data 0xFF), then
        set ``connection`` back to CONNECTED. The caller drops the connection's
        partial packets, watches and transactions, and notifies the guest."""
        self._require(ByteRingRole.SERVER)
        self.outgoing.reset()
        self.incoming.reset()
        self._connection[0] = XENSTORE_CONNECTED

    # -- guest side --------------------------------------------------------
    def request_reconnect(self) -> None:
        """Guest: ask for a ring reset (needs the RECONNECTION feature); then notify
        and ignore everything but ``connection`` until it reads CONNECTED."""
        self._require(ByteRingRole.GUEST)
        if not self.server_features & XENSTORE_SERVER_FEATURE_RECONNECTION:
            raise RuntimeError("server does not offer XENSTORE_SERVER_FEATURE_RECONNECTION")
        self._connection[0] = XENSTORE_RECONNECT

    def _require(self, role: ByteRingRole) -> None:
        if self.role is not role:
            raise RuntimeError(f"only the {role.value} may do this on a xenstore ring")

    def release(self) -> None:
        for view in (self._features, self._connection, self._error, self._evtchn_port):
            view.release()
        super().release()


class ConsoleRing(ByteRing):
    """One end of ``struct xencons_interface`` (out: guest->backend, in: backend->guest)."""

    def __init__(self, buf: object, role: ByteRingRole) -> None:
        super().__init__(buf, CONSOLE_LAYOUT, role)
        self._connection = self._word("connection")  # a single byte

    @property
    def connected(self) -> bool:
        """Whether the backend services the ring (0 = CONNECTED, also Xen's historic default)."""
        return self._connection[0] == XENCONSOLE_CONNECTED

    def set_connection(self, value: int) -> None:
        """Backend: XENCONSOLE_CONNECTED once it maps and services the page."""
        if self.role is not ByteRingRole.SERVER:
            raise RuntimeError("only the console backend sets the connection flag")
        self._connection[0] = value

    def release(self) -> None:
        self._connection.release()
        super().release()
