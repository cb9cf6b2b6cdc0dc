"""Backend halves of the PV console (what ``xenconsoled`` does per guest).

* :func:`pump_console` services one mapped ``struct xencons_interface``:
  guest output (``out``) goes to a :class:`ConsoleEndpoint` (the daemon's
  log file and attached clients), queued input goes into ``in``; the peer
  is notified whenever an index moved.  Event-channel wake-ups are hints
  only: every wake-up drains everything (watch events and notifications
  coalesce).
* :class:`PrimaryConsoleBackend` -- console device 0.  No XenBus
  negotiation (fact sheet: the frontend directory ``/local/domain/<F>/console``
  is read-only for the guest and has no ``state``): the toolstack wrote
  ``ring-ref`` and ``port``, the page is granted at ``GNTTAB_RESERVED_CONSOLE``
  (ref 0); the backend maps it, binds the port and serves it until its
  backend directory is removed.  A restarted daemon simply maps and binds
  again: the guest's port became unbound (bindable by us again) when the
  old daemon died, and whatever the guest wrote meanwhile is still in the
  ring.
* :class:`ConsoleBackend` -- secondary consoles (``device/console/<n>``,
  n >= 1), a normal :class:`xenbus.driver.Backend`: ``connect`` maps the
  frontend's granted page and binds its ``port``.

Both use a :class:`ConsoleHypervisor` (the subset of
:class:`ringbuf.hypervisor.HypervisorClient` they need).
"""

from __future__ import annotations

import errno as _errno
import logging
from collections.abc import Callable
from typing import Any, Protocol, Sequence

import trio

from ringbuf._trio_util import open_background_nursery
from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from ringbuf.evtchn import EventChannel, PeerClosedError
from ringbuf.grants import GNTTAB_RESERVED_CONSOLE, GrantError
from ringbuf.hypervisor import HypervisorError
from ringbuf.ring import RingIndexError
from xenstore.wire import XenStoreError

from .console import XENCONSOLE_CONNECTED, ConsoleBackendType, ConsoleRingInfo
from .driver import Backend, ChangeFlag, ConnectionTask, Store, StoreOps, read_directory, transact
from .handshake import HandshakeError
from .paths import DeviceId
from .state import XenbusState, format_state

__all__ = [
    "ConsoleEndpoint",
    "ConsoleHypervisor",
    "ConsoleEndpoints",
    "pump_console",
    "PrimaryConsoleBackend",
    "ConsoleBackend",
    "console_backend_factory",
]

log = logging.getLogger(__name__)


class ConsoleEndpoint(Protocol):
    """Where a console's bytes go and come from (the daemon side)."""

    def guest_output(self, data: bytes) -> None:
        """Bytes the guest wrote."""

    def pending_input(self) -> bytes:
        """Bytes waiting to go to the guest (not consumed yet)."""

    def consumed_input(self, count: int) -> None:
        """``count`` bytes of :meth:`pending_input` reached the ring."""

    def set_wakeup(self, wake: Callable[[], None] | None) -> None:
        """Call ``wake()`` whenever new input is queued."""


class ConsoleEndpoints(Protocol):
    """The daemon's consoles by ``(frontend domid, devid)``."""

    def endpoint(self, domid: int, devid: int) -> ConsoleEndpoint:
        """The endpoint of that console (the same one across reconnections)."""

    def release(self, domid: int, devid: int) -> None:
        """The device is gone for good: forget its endpoint."""


class ConsoleHypervisor(Protocol):
    async def map_grants(self, domid: int, refs: Sequence[int], readonly: bool = False) -> Any: ...

    async def unmap_grants(self, mapping: Any) -> None: ...

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> EventChannel: ...

    async def close_port(self, channel: EventChannel) -> None: ...


async def _notifications(channel: EventChannel, wake: ChangeFlag, gone: trio.Event) -> None:
    try:
        while True:
            await channel.wait()
            wake.set()
    except (PeerClosedError, trio.ClosedResourceError):
        gone.set()
        wake.set()


async def pump_console(ring: ConsoleRing, channel: EventChannel, endpoint: ConsoleEndpoint) -> None:
    """Service the console page until the guest's port goes away.

    Returns once the peer port is closed (the guest died or closed it),
    after a last drain so that its final words are kept.  A guest that
    corrupts its indices is logged and no longer served (``xenconsoled``
    does the same); it never raises on guest input."""
    wake = ChangeFlag()
    gone = trio.Event()
    endpoint.set_wakeup(wake.set)
    try:
        async with open_background_nursery() as nursery:
            nursery.start_soon(_notifications, channel, wake, gone)
            while True:
                moved = False
                data = ring.read()
                if data:
                    endpoint.guest_output(data)
                    moved = True
                pending = endpoint.pending_input()
                if pending:
                    count = ring.write(pending)
                    if count:
                        endpoint.consumed_input(count)
                        moved = True
                if moved and not gone.is_set():
                    channel.notify()
                if gone.is_set():
                    nursery.cancel_scope.cancel()
                    return
                await wake.wait()
    except RingIndexError as exc:
        log.warning("console of port %d: corrupt ring indices (%s); no longer served", channel.port, exc)
    finally:
        endpoint.set_wakeup(None)


class _MappedConsole:
    """A mapped console page and its bound port; released exactly once."""

    def __init__(self, hv: ConsoleHypervisor, mapping: Any, channel: EventChannel) -> None:
        self.hv = hv
        self.mapping = mapping
        self.channel = channel
        self.ring = ConsoleRing(mapping.pages[0], ByteRingRole.SERVER)
        self.ring.set_connection(XENCONSOLE_CONNECTED)

    @classmethod
    async def open(cls, hv: ConsoleHypervisor, domid: int, ref: int, port: int) -> _MappedConsole:
        mapping = await hv.map_grants(domid, [ref])
        try:
            channel = await hv.bind_interdomain(domid, port)
        except BaseException:
            with trio.CancelScope(shield=True):
                await hv.unmap_grants(mapping)
            raise
        return cls(hv, mapping, channel)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            self.ring.release()
            try:
                await self.hv.close_port(self.channel)
            except Exception as exc:  # the service may be gone: nothing left to release
                log.debug("closing console port: %s", exc)
            try:
                await self.hv.unmap_grants(self.mapping)
            except Exception as exc:
                log.debug("unmapping console page: %s", exc)


class PrimaryConsoleBackend:
    """Console device 0 of one guest, served like ``xenconsoled`` does."""

    def __init__(self, store: Store, device: DeviceId, hv: ConsoleHypervisor, endpoints: ConsoleEndpoints) -> None:
        if not device.is_primary_console:
            raise ValueError(f"not a primary console: {device!r}")
        self.store = store
        self.device = device
        self.hv = hv
        self.endpoints = endpoints
        self.serving = trio.Event()  # set once the page is mapped and the port bound
        self.served = 0  # how many times it (re)connected

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until the backend directory is removed (or cancelled)."""
        removed = trio.Event()
        async with open_background_nursery() as nursery:
            await nursery.start(self._watch_removal, removed)
            task_status.started()
            if not removed.is_set():
                nursery.start_soon(self._serve)
                await removed.wait()
            nursery.cancel_scope.cancel()
        self.endpoints.release(self.device.frontend_domid, self.device.devid)

    async def _exists(self) -> bool:
        try:
            await self.store.read(f"{self.device.backend}/frontend-id")
        except XenStoreError:
            return False
        return True

    async def _watch_removal(self, removed: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self.store.watch(self.device.backend) as events:
            if not await self._exists():
                removed.set()
            task_status.started()
            async for _ in events:
                if not await self._exists():
                    removed.set()
                    return

    async def _serve(self) -> None:
        device = self.device
        values = await read_directory(self.store, device.frontend, depth=1)
        backend_type = values.get("type", b"").decode(errors="replace")
        if backend_type and backend_type != ConsoleBackendType.XENCONSOLED:
            log.info("%s is served by %r, not by us", device.frontend, backend_type)
            return
        try:
            info = ConsoleRingInfo.of_assoc(values)
        except HandshakeError as exc:
            log.warning("%s: %s", device.frontend, exc)
            return
        try:
            # ring-ref is the page's frame; like xenconsoled we map the
            # reserved grant the domain builder seeded for us instead.
            console = await _MappedConsole.open(self.hv, device.frontend_domid, GNTTAB_RESERVED_CONSOLE, info.port)
        except Exception as exc:
            log.warning("dom%d console: cannot connect: %s", device.frontend_domid, exc)
            return
        try:
            self.served += 1
            await self._set_state(XenbusState.Connected)
            self.serving.set()
            endpoint = self.endpoints.endpoint(device.frontend_domid, device.devid)
            await pump_console(console.ring, console.channel, endpoint)
            log.info("dom%d console: the guest closed its port", device.frontend_domid)
        finally:
            await console.aclose()

    async def _set_state(self, state: XenbusState) -> None:
        """Record that the console is served (without resurrecting a
        removed directory: fact sheet 5.4)."""
        path = f"{self.device.backend}/state"

        async def body(tx: StoreOps) -> None:
            try:
                await tx.read(path)
            except XenStoreError as exc:
                if exc.name == "ENOENT":
                    return
                raise
            await tx.write(path, format_state(state).encode())

        await transact(self.store, body)


class ConsoleBackend(Backend):
    """A secondary console (``device/console/<n>``, n >= 1): XenBus handshake,
    then the same page service as the primary console."""

    def __init__(self, store: Store, nodename: str, own_domid: int, *, hv: ConsoleHypervisor, endpoints: ConsoleEndpoints) -> None:
        super().__init__(store, nodename, own_domid)
        self.hv = hv
        self.endpoints = endpoints
        self._console: _MappedConsole | None = None
        self._pump = ConnectionTask()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            async with self._pump.open():
                await super().run(task_status=task_status)
        finally:
            if self._console is not None:
                console, self._console = self._console, None
                await console.aclose()

    async def connect(self, frontend_values: dict[str, bytes]) -> dict[str, str]:
        assert self.other is not None and self._pump.is_open
        info = ConsoleRingInfo.of_assoc(frontend_values)
        await self.disconnect()
        try:
            self._console = await _MappedConsole.open(self.hv, self.other.domid, info.ring_ref, info.port)
        except (GrantError, HypervisorError) as exc:
            # The frontend's keys name no usable grant/port: its fault, so an
            # error node and Closing (fact sheet 5.5), never a crash.
            raise HandshakeError(_errno.EINVAL, f"mapping ring-ref {info.ring_ref} / binding port {info.port}: {exc}", "ring-ref") from None
        devid = int(self.nodename.rsplit("/", 1)[1])
        endpoint = self.endpoints.endpoint(self.other.domid, devid)
        console = self._console
        self._pump.start(lambda: pump_console(console.ring, console.channel, endpoint))
        return {}

    async def remove(self) -> None:
        assert self.other is not None
        self.endpoints.release(self.other.domid, int(self.nodename.rsplit("/", 1)[1]))

    async def disconnect(self) -> None:
        self._pump.cancel()
        if self._console is not None:
            console, self._console = self._console, None
            await console.aclose()


def console_backend_factory(hv: ConsoleHypervisor, endpoints: ConsoleEndpoints) -> Callable[[Store, DeviceId], Any]:
    """The ``"console"`` entry of a :class:`~xenbus.backend_host.BackendHost`."""

    def make(store: Store, device: DeviceId) -> Any:
        if device.is_primary_console:
            return PrimaryConsoleBackend(store, device, hv, endpoints)
        return ConsoleBackend.for_device(store, device, hv=hv, endpoints=endpoints)

    return make
