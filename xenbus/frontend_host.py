"""The frontend host: runs inside a guest and serves its split devices.

It watches ``/local/domain/<F>/device/<type>`` for every registered type
and runs one driver task per ``device/<type>/<devid>`` directory (Linux
``xenbus_probe_frontend``).  The backend domain of each device comes from
the device's own ``backend-id`` key, as the toolstack wrote it::

    host = FrontendHost(store, my_domid, {"console": ConsoleFrontend.for_device})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from xenstore.wire import XenStoreError

from .device_host import DeviceHost, DriverFactory, list_children
from .driver import Store
from .paths import DOMID_FIRST_RESERVED, DeviceId, frontend_type_dir

__all__ = ["FrontendHost"]

log = logging.getLogger(__name__)


class FrontendHost(DeviceHost):
    """Runs the frontend halves of the devices of guest ``domid``."""

    def __init__(self, store: Store, domid: int, drivers: Mapping[str, DriverFactory], **kwargs) -> None:
        super().__init__(store, domid, drivers, **kwargs)

    def type_dir(self, kind: str) -> str:
        return frontend_type_dir(self.domid, kind)

    async def list_devices(self, kind: str) -> set[DeviceId]:
        base = self.type_dir(kind)
        found: set[DeviceId] = set()
        for name in await list_children(self.store, base):
            if len(found) >= self.max_devices:
                break
            try:
                devid = int(name)
                backend_id = int((await self.store.read(f"{base}/{name}/backend-id")).strip())
                if str(devid) != name or not 0 <= backend_id < DOMID_FIRST_RESERVED:
                    raise ValueError(name)
                found.add(DeviceId(kind, self.domid, backend_id, devid))
            except XenStoreError:
                continue  # not filled in yet (the toolstack writes it in one transaction) or going away
            except ValueError:
                log.warning("ignoring %s/%s: not a device directory", base, name)
        return found
