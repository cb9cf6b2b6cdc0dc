"""Device hosts: find the devices of a domain in XenStore and run one driver
task per device.

A *host* watches the type directories of the devices it serves --
``/local/domain/<B>/backend/<type>`` in a backend domain,
``/local/domain/<F>/device/<type>`` in a guest -- and keeps exactly one
driver task running per device directory, owned by the host's nursery:

* a directory that appears gets a driver (made by the factory registered
  for its type) and its task;
* a driver that returns (the device was removed, or it gave up) is not
  restarted while its directory is still there; once the directory is gone
  the slot is forgotten, so a device created again later gets a new driver;
* a driver that crashes is logged and treated like one that returned: one
  broken device never takes the host (or the other devices) down.

Writing a device type means writing its two protocol halves (subclasses of
:class:`xenbus.driver.Frontend` / :class:`~xenbus.driver.Backend`, or any
object with an ``async run(*, task_status)``); the plumbing is here.

:func:`plan_devices` is the pure decision (what to start, what to forget);
:class:`DeviceHost` is the trio shell, specialised by
:class:`xenbus.backend_host.BackendHost` and
:class:`xenbus.frontend_host.FrontendHost`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import trio

from ringbuf._trio_util import open_background_nursery
from xenstore.wire import XenStoreError

from .driver import ChangeFlag, Store
from .paths import DeviceId

__all__ = ["DeviceTask", "DriverFactory", "DevicePlan", "plan_devices", "DeviceHost", "HostedDevice", "list_children"]

log = logging.getLogger(__name__)


class DeviceTask(Protocol):
    """What a host runs per device: a driver (``Frontend``/``Backend``) or
    anything else with the same ``run`` (started once its watches are set)."""

    async def run(self, *, task_status: trio.TaskStatus[None] = ...) -> None: ...


#: ``factory(store, device)`` -> the driver of one device.
DriverFactory = Callable[[Store, DeviceId], DeviceTask]


@dataclass(frozen=True)
class DevicePlan:
    start: frozenset[DeviceId]  # present, never seen: start a driver
    forget: frozenset[DeviceId]  # finished and gone: drop the slot


def plan_devices(present: Iterable[DeviceId], running: Iterable[DeviceId], finished: Iterable[DeviceId]) -> DevicePlan:
    """Pure: reconcile the devices listed in XenStore with the host's slots.

    ``running`` and ``finished`` are the host's slots (disjoint).  A running
    driver whose directory vanished is left alone: it notices by itself
    (its own ``state`` node reads ``Unknown``) and finishes cleanly.
    """
    present, running, finished = frozenset(present), frozenset(running), frozenset(finished)
    return DevicePlan(start=present - running - finished, forget=finished - present)


@dataclass
class HostedDevice:
    """One slot of a host: the device, its driver and whether it still runs."""

    device: DeviceId
    driver: DeviceTask
    done: trio.Event = field(default_factory=trio.Event)
    failed: BaseException | None = None


class DeviceHost:
    """Common machinery; use :class:`~xenbus.backend_host.BackendHost` or
    :class:`~xenbus.frontend_host.FrontendHost`.

    ``drivers`` maps a device type (``"console"``, ``"vbd"``...) to its
    factory.  ``max_devices`` bounds the slots per type: the directories
    may be writable by another domain (a guest's own ``device`` tree), so a
    flood of entries must not become a flood of tasks.
    """

    def __init__(self, store: Store, domid: int, drivers: Mapping[str, DriverFactory], *, max_devices: int = 256) -> None:
        self.store = store
        self.domid = domid
        self.drivers = dict(drivers)
        self.max_devices = max_devices
        self.devices: dict[DeviceId, HostedDevice] = {}
        self._changed = {kind: ChangeFlag() for kind in self.drivers}
        self._scanned = trio.Event()  # replaced after every scan (tests and wait_for)

    # ---- specialised by the two hosts ------------------------------------

    def type_dir(self, kind: str) -> str:
        """The directory watched and listed for ``kind``."""
        raise NotImplementedError

    async def list_devices(self, kind: str) -> set[DeviceId]:
        """The devices of ``kind`` currently in XenStore."""
        raise NotImplementedError

    # ---- public surface --------------------------------------------------

    def running(self) -> list[HostedDevice]:
        return [slot for slot in self.devices.values() if not slot.done.is_set()]

    async def wait_scanned(self) -> None:
        """Wait until the next scan of any type directory has finished."""
        await self._scanned.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled.  ``started`` once every type directory is
        watched and the devices present at that time have their drivers
        started (each driver's own ``started`` included)."""
        async with open_background_nursery() as nursery:
            for kind in self.drivers:
                await nursery.start(self._serve_type, kind, nursery)
            task_status.started()

    # ---- internals ---------------------------------------------------------

    async def _serve_type(self, kind: str, nursery: trio.Nursery, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        flag = self._changed[kind]
        async with open_background_nursery() as watchers:
            await watchers.start(self._drain_watch, kind, flag)
            await self._scan(kind, nursery)
            task_status.started()
            while True:
                await flag.wait()
                await self._scan(kind, nursery)

    async def _drain_watch(self, kind: str, flag: ChangeFlag, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One flag however many events arrive (the directory may be guest
        # writable): memory does not grow with the event rate.
        async with self.store.watch(self.type_dir(kind)) as events:
            task_status.started()
            async for _ in events:
                flag.set()

    async def _scan(self, kind: str, nursery: trio.Nursery) -> None:
        try:
            present = await self.list_devices(kind)
        except XenStoreError as exc:
            log.warning("dom%d: cannot list %s: %s", self.domid, self.type_dir(kind), exc)
            present = set()
        mine = {d: s for d, s in self.devices.items() if d.kind == kind}
        plan = plan_devices(
            present,
            running=(d for d, s in mine.items() if not s.done.is_set()),
            finished=(d for d, s in mine.items() if s.done.is_set()),
        )
        for device in plan.forget:
            del self.devices[device]
        room = self.max_devices - sum(1 for d in self.devices if d.kind == kind)
        for device in sorted(plan.start, key=lambda d: (d.frontend_domid, d.devid)):
            if room <= 0:
                log.warning("dom%d: more than %d %s devices; ignoring %s", self.domid, self.max_devices, kind, device)
                break
            room -= 1
            try:
                driver = self.drivers[kind](self.store, device)
            except Exception:
                log.exception("dom%d: cannot create a driver for %s", self.domid, device)
                slot = HostedDevice(device, None)  # type: ignore[arg-type]
                slot.done.set()
                self.devices[device] = slot
                continue
            slot = HostedDevice(device, driver)
            self.devices[device] = slot
            await nursery.start(self._run_driver, slot)
        scanned, self._scanned = self._scanned, trio.Event()
        scanned.set()

    async def _run_driver(self, slot: HostedDevice, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # The driver runs right in this task (no nursery in between), so a
        # crash is caught here as the driver's own exception.
        status = _RecordingTaskStatus(task_status)
        try:
            await slot.driver.run(task_status=status)
        except Exception as exc:
            # One broken device never takes the host down.
            slot.failed = exc
            log.exception("dom%d: driver of %s failed", self.domid, slot.device)
        finally:
            slot.done.set()
            if not status.called:
                task_status.started()
            # A finished slot is forgotten by the next scan if its directory
            # is gone; make sure that scan happens.
            flag = self._changed.get(slot.device.kind)
            if flag is not None:
                flag.set()


class _RecordingTaskStatus:
    """Passes ``started()`` on to ``status`` and remembers that it did."""

    def __init__(self, status: trio.TaskStatus[None]) -> None:
        self._status = status
        self.called = False

    def started(self, value: None = None) -> None:
        self._status.started(value)
        self.called = True


async def list_children(store: Store, path: str) -> list[str]:
    """``directory`` that treats a missing node as empty."""
    try:
        return await store.directory(path)
    except XenStoreError as exc:
        if exc.name == "ENOENT":
            return []
        raise
