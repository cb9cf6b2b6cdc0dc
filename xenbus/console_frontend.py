"""Guest half of the PV console (Linux ``hvc_xen``).

:class:`GuestConsole` writes the guest's output into ``out`` of its console
page and reads keyboard input from ``in``, notifying the backend after
every move.  The page and the port were set up by the toolstack
(``start_info``: :class:`xenbus.start_info.ConsoleStart`), so there is no
XenBus negotiation.

The backend (the console daemon) may die and come back at any time: while
its port is gone, output stays in the ring (up to 2048 bytes, then
:meth:`GuestConsole.write` waits for room) and the guest checks every
``retry`` seconds whether a new backend has bound the port; the new
backend reads everything queued.  Nothing ever waits forever on a dead
backend: :meth:`GuestConsole.write` takes an optional timeout.

:class:`ConsoleFrontend` is the XenBus frontend of secondary consoles
(``device/console/<n>``), run by a :class:`xenbus.frontend_host.FrontendHost`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from ringbuf._trio_util import open_background_nursery
from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from ringbuf.evtchn import EventChannel, PeerClosedError
from ringbuf.grants import GNTST_eagain, GrantError
from ringbuf.memory import FrameAllocator

from .console import XENCONSOLE_DISCONNECTED, ConsoleRingInfo, XenconsInterface
from .driver import ConnectionTask, Frontend
from .start_info import ConsoleStart

__all__ = ["GuestConsole", "open_guest_console", "ConsoleFrontend", "ConsoleSessionFn"]


class GuestConsole:
    """One end of a console page: ``ring`` (guest role) plus its port.

    :meth:`run` must be running (in a nursery) for waits to be woken: it is
    the only task waiting on the event channel, and wakes writers and
    readers (trio allows one waiter per eventfd).
    """

    def __init__(self, page: Any, channel: EventChannel, *, retry: float = 0.05) -> None:
        self.ring = ConsoleRing(page, ByteRingRole.GUEST)
        self.channel = channel
        self.retry = retry
        self._lot = trio.lowlevel.ParkingLot()
        self.written = 0  # bytes that reached the ring

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Forward event-channel wake-ups to waiting writers and readers."""
        task_status.started()
        while True:
            try:
                await self.channel.wait()
            except PeerClosedError:
                # No backend: look again later (a restarted daemon binds our
                # port again; then it reads what we queued meanwhile).
                await trio.sleep(self.retry)
            self._lot.unpark_all()

    def _notify(self) -> None:
        if not self.channel.peer_closed:
            self.channel.notify()

    def write_nowait(self, data: bytes) -> int:
        """Queue what fits; returns the count (notifies if > 0)."""
        count = self.ring.write(data)
        if count:
            self.written += count
            self._notify()
        return count

    async def write(self, data: bytes | str, *, timeout: float | None = None) -> bool:
        """Queue all of ``data``, waiting for room; ``False`` if ``timeout``
        passed first (what did not fit is dropped)."""
        view = memoryview(data.encode() if isinstance(data, str) else data)
        with trio.move_on_after(timeout if timeout is not None else float("inf")):
            while view:
                count = self.write_nowait(view)
                view = view[count:]
                if view:
                    await self._wait()
            return True
        return False

    async def read(self) -> bytes:
        """Wait for input from the backend (keyboard / ``uxl console``)."""
        while True:
            data = self.ring.read()
            if data:
                self._notify()
                return data
            await self._wait()

    async def _wait(self) -> None:
        # Parked until the next wake-up, or a retry period while no backend
        # serves us (then the caller simply looks at the ring again).
        with trio.move_on_after(self.retry if self.channel.peer_closed else float("inf")):
            await self._lot.park()

    def release(self) -> None:
        self.ring.release()


async def open_guest_console(hypervisor: Any, start: ConsoleStart) -> GuestConsole:
    """The primary console of this guest: our page ``start.gfn`` and our
    port ``start.port`` (allocated for the backend by the toolstack)."""
    channel = await hypervisor.attach_port(start.port)
    return GuestConsole(hypervisor.memory.page(start.gfn), channel)


#: What a guest does with a secondary console while it is connected; run in
#: the frontend's nursery, cancelled when the console disconnects.
ConsoleSessionFn = Callable[[GuestConsole, int], Awaitable[None]]


class ConsoleFrontend(Frontend):
    """A secondary console (``device/console/<n>``, n >= 1) of this guest.

    The XenBus frontend half: it allocates a zeroed page of our memory,
    grants it to the backend, allocates an unbound port for it and
    publishes ``ring-ref`` / ``port`` at once (``publish_early``, as
    ``hvc_xen`` does, fact sheet 5.3 shortcut).  Once both ends are
    ``Connected`` it runs ``session(console, connection_number)``; on a
    disconnect (the backend went away, or the device closes) the session is
    cancelled and the page, grant and port are released, so a reconnection
    starts from fresh ones.
    """

    publish_early = True

    def __init__(self, store, nodename: str, own_domid: int, *, hv: Any, frames: FrameAllocator,
                 session: ConsoleSessionFn | None = None) -> None:
        super().__init__(store, nodename, own_domid)
        self.hv = hv
        self.frames = frames
        self.session = session
        self.console: GuestConsole | None = None
        self.connections = 0  # how many times it reached Connected
        self._gfn: int | None = None
        self._ref: int | None = None
        self._session = ConnectionTask()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with self._session.open():
                await super().run(task_status=task_status)
        finally:
            with trio.CancelScope(shield=True):
                await self.disconnect()

    async def publish(self, backend_values: dict[str, bytes]) -> dict[str, str]:
        assert self.other is not None
        await self.disconnect()  # a republish starts from a fresh page
        gfn = self.frames.alloc()
        page = self.hv.memory.page(gfn)
        page[:] = bytes(len(page))
        page[XenconsInterface.connection.offset] = XENCONSOLE_DISCONNECTED
        self._gfn = gfn
        self._ref = self.hv.grant_access(self.other.domid, gfn)
        channel = await self.hv.alloc_unbound(self.other.domid)
        self.console = GuestConsole(page, channel)
        return ConsoleRingInfo(ring_ref=self._ref, port=channel.port).to_assoc()

    async def connect(self, backend_values: dict[str, bytes]) -> dict[str, str]:
        assert self._session.is_open and self.console is not None
        self.connections += 1
        console, number = self.console, self.connections

        async def serve() -> None:
            async with open_background_nursery() as nursery:
                await nursery.start(console.run)
                if self.session is not None:
                    await self.session(console, number)
                    nursery.cancel_scope.cancel()

        self._session.start(serve)
        return {}

    async def disconnect(self) -> None:
        self._session.cancel()
        console, self.console = self.console, None
        if console is not None:
            console.release()
            try:
                await self.hv.close_port(console.channel)
            except Exception:
                pass  # the service closes it with our connection anyway
        if self._ref is not None:
            await self._end_access(self._ref)
            self._ref = None
        if self._gfn is not None:
            self.frames.free(self._gfn)
            self._gfn = None

    async def _end_access(self, ref: int) -> None:
        # The backend unmaps when it sees us close; give it a moment.
        for _ in range(50):
            try:
                await self.hv.end_access(ref)
                return
            except GrantError as exc:
                if exc.status != GNTST_eagain:
                    return
            await trio.sleep(0.02)
        # Still mapped: leave the page to the backend (never reuse a frame
        # another domain may still write); it is reclaimed with the domain.
        self._gfn = None
