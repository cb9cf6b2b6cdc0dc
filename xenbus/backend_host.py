"""The backend host: a driver-domain (dom0) process serving split devices.

It watches ``/local/domain/<B>/backend/<type>`` for every registered type
and runs one driver task per ``backend/<type>/<F>/<devid>`` directory (three
path levels below ``backend``, like Linux ``xenbus_probe_backend``)::

    host = BackendHost(store, 0, {"console": ConsoleBackend.for_device})
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from .device_host import DeviceHost, DriverFactory, list_children
from .driver import Store
from .paths import DeviceId, backend_type_dir

__all__ = ["BackendHost"]

log = logging.getLogger(__name__)


class BackendHost(DeviceHost):
    """Runs the backend halves of the devices whose backend is domain ``domid``."""

    def __init__(self, store: Store, domid: int, drivers: Mapping[str, DriverFactory], **kwargs) -> None:
        super().__init__(store, domid, drivers, **kwargs)

    def type_dir(self, kind: str) -> str:
        return backend_type_dir(self.domid, kind)

    async def list_devices(self, kind: str) -> set[DeviceId]:
        base = self.type_dir(kind)
        found: set[DeviceId] = set()
        for frontend in await list_children(self.store, base):
            for devid in await list_children(self.store, f"{base}/{frontend}"):
                try:
                    found.add(DeviceId(kind, int(frontend), self.domid, int(devid)))
                except ValueError:
                    log.warning("ignoring %s/%s/%s: not a device directory", base, frontend, devid)
                if len(found) > self.max_devices:
                    return found
        return found
