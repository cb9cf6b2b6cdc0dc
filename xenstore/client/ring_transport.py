"""The guest's way to xenstored: its XenStore ring page and event channel.

Code inside a guest domain uses the same client API as dom0 code::

    async with xenstore.open_guest_client() as c:   # reads the environment below
        await c.write("data/hello", b"1")            # relative to ~ = /local/domain/<domid>

A guest process is started by the toolstack with (the analogue of Xen's
``start_info.store_mfn`` / ``store_evtchn``):

* ``UXEN_HYPERVISOR_FD`` -- its connection to the hypervisor service (this
  connection *is* the domain);
* ``UXEN_STORE_GFN``     -- the frame of its memory holding the ring page;
* ``UXEN_STORE_PORT``    -- its unbound event-channel port xenstored binds to.

:class:`RingTransport` moves the client's bytes through the page with the
xenstore-ring.txt algorithm (:class:`ringbuf.byte_ring.XenstoreRing`,
notify after every read or write that moved bytes) and offers the
guest-initiated reconnection handshake (:meth:`RingTransport.reconnect`).
"""

from __future__ import annotations

import os
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, AsyncIterator

import trio

from ringbuf.byte_ring import ByteRingRole, XenstoreRing
from ringbuf.evtchn import EventChannel
from ringbuf.layouts.xenstore import (
    XENSTORE_CONNECTED,
    XENSTORE_ERROR_COMM,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_SERVER_FEATURE_ERROR,
)
from ringbuf.ring import RingIndexError

from ._transport import Transport

if TYPE_CHECKING:
    from ringbuf.hypervisor import HypervisorClient

    from ._async import Client

__all__ = [
    "ENV_STORE_GFN",
    "ENV_STORE_PORT",
    "RingTransport",
    "RingError",
    "open_ring_transport",
    "open_guest_client",
    "store_location_from_env",
]

ENV_STORE_GFN = "UXEN_STORE_GFN"
ENV_STORE_PORT = "UXEN_STORE_PORT"

_ERROR_NAMES = {
    XENSTORE_ERROR_COMM: "COMM",
    XENSTORE_ERROR_RINGIDX: "RINGIDX",
    XENSTORE_ERROR_PROTO: "PROTO",
}


class RingError(trio.BrokenResourceError):
    """xenstored stopped serving this ring (``code``: XENSTORE_ERROR_*), or
    the ring's indices are impossible."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


def store_location_from_env(environ: os._Environ | dict[str, str] = os.environ) -> tuple[int, int]:
    """``(gfn, port)`` from ``$UXEN_STORE_GFN`` / ``$UXEN_STORE_PORT``."""
    try:
        return int(environ[ENV_STORE_GFN]), int(environ[ENV_STORE_PORT])
    except KeyError as exc:
        raise RuntimeError(f"not started as a guest with a XenStore ring: ${exc.args[0]} is not set") from None


class RingTransport(Transport):
    """The guest end of a XenStore ring page plus its event channel.

    ``page`` is the writable 4 KiB ring page (a view into the guest's own
    memory); ``channel`` the bound event channel to xenstored.  The transport
    does not own the channel.  The client's reader and writer tasks share the
    channel: whichever waits first waits on it, the other parks and is woken
    with it (one waiter per eventfd is all trio allows).
    """

    def __init__(self, page: object, channel: EventChannel) -> None:
        self.ring = XenstoreRing(page, ByteRingRole.GUEST)
        self.channel = channel
        self._lot = trio.lowlevel.ParkingLot()
        self._leader = False  # some task is waiting on the channel
        self._closed = False
        self._reconnecting = False

    # -- waiting -------------------------------------------------------------

    async def _wait_event(self) -> None:
        """Until the next notification (possibly spurious: re-check after)."""
        if self._leader:
            await self._lot.park()
            return
        self._leader = True
        try:
            await self.channel.wait()
        finally:
            self._leader = False
            self._lot.unpark_all()

    def _check(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("ring transport is closed")
        ring = self.ring
        if ring.server_features & XENSTORE_SERVER_FEATURE_ERROR:
            code = ring.error
            if code:
                name = _ERROR_NAMES.get(code, str(code))
                raise RingError(f"xenstored stopped serving this domain (XENSTORE_ERROR_{name})", code)

    # -- Transport -----------------------------------------------------------

    def send_nowait(self, data: bytes) -> int:
        self._check()
        if self._reconnecting:
            return 0
        try:
            sent = self.ring.write(data)
        except RingIndexError as exc:
            raise RingError(str(exc)) from None
        if sent:
            self.channel.notify()
        return sent

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            await trio.lowlevel.checkpoint_if_cancelled()
            view = view[self.send_nowait(view) :]
            if view:
                await self._wait_event()  # for space

    async def receive_some(self) -> bytes:
        while True:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._check()
            if not self._reconnecting:
                try:
                    data = self.ring.read()
                except RingIndexError as exc:
                    raise RingError(str(exc)) from None
                if data:
                    self.channel.notify()  # xenstored may wait for space
                    return data
            await self._wait_event()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            self._lot.unpark_all()
            self.ring.release()
        await trio.lowlevel.checkpoint()

    # -- reconnection ------------------------------------------------------------

    async def reconnect(self) -> None:
        """The guest-initiated ring reset (xenstore-ring.txt): xenstored drops
        this connection's partial packets, queued replies, watches and
        transactions and restarts the byte streams on a packet boundary.

        Only between clients: a :class:`~xenstore.client.Client` running on
        this transport would lose its framing.  Raises ``RuntimeError`` if
        the server does not offer XENSTORE_SERVER_FEATURE_RECONNECTION.
        """
        self._check()
        self.ring.request_reconnect()
        self._reconnecting = True
        try:
            self.channel.notify()
            while self.ring.connection != XENSTORE_CONNECTED:
                await self._wait_event()
        finally:
            self._reconnecting = False
        self._check()


async def open_ring_transport(
    hypervisor: "HypervisorClient", gfn: int | None = None, port: int | None = None
) -> RingTransport:
    """A :class:`RingTransport` on frame ``gfn`` of our memory and our port
    ``port`` (both default to the environment, see the module docstring).
    If a reconnection is in progress (``connection == 1``) it waits for the
    server to finish it first, as the ring protocol requires."""
    if gfn is None or port is None:
        env_gfn, env_port = store_location_from_env()
        gfn = env_gfn if gfn is None else gfn
        port = env_port if port is None else port
    channel = await hypervisor.attach_port(port)
    transport = RingTransport(hypervisor.memory.page(gfn), channel)
    while transport.ring.connection != XENSTORE_CONNECTED:
        await transport._wait_event()
    return transport


@asynccontextmanager
async def open_guest_client(
    *,
    hypervisor: "HypervisorClient | None" = None,
    gfn: int | None = None,
    port: int | None = None,
) -> AsyncIterator["Client"]:
    """The async XenStore client of a guest domain, over its ring.

    Without ``hypervisor`` the domain's connection is opened from
    ``$UXEN_HYPERVISOR_FD`` and closed at the end of the block (which, for
    a guest, ends the domain).
    """
    from ringbuf.hypervisor import open_hypervisor

    from ._async import open_client

    async with AsyncExitStack() as stack:
        if hypervisor is None:
            hypervisor = await stack.enter_async_context(open_hypervisor())
        transport = await open_ring_transport(hypervisor, gfn, port)
        async with open_client(transport=transport) as client:
            yield client
