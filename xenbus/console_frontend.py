"""Guest half of the PV console (Linux ``hvc_xen``'s primary console).

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
"""

from __future__ import annotations

from typing import Any

import trio

from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from ringbuf.evtchn import EventChannel, PeerClosedError

from .start_info import ConsoleStart

__all__ = ["GuestConsole", "open_guest_console"]


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
