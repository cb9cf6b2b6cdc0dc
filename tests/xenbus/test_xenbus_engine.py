"""The driver layer over the real (pure) XenStore engine: unprivileged guest
and driver-domain connections, libxl's permission lists, watch filtering."""

from __future__ import annotations

import errno

import pytest
import trio

from engine_store import EngineHub
from test_xenbus_driver import BlkBack, BlkFront, Grants, Running, start_connected, wait_for
from xenbus.driver import transact
from xenbus.handshake import parse_error
from xenbus.paths import DeviceId, domain_path, guest_home_perms, guest_writable_perms
from xenstore.wire import XenStoreError

# A driver domain (1) serves a guest (5): neither is privileged.
DEV = DeviceId("vbd", frontend_domid=5, backend_domid=1, devid=51712)
TIMEOUT = 5


async def libxl_create(dom0, device: DeviceId) -> None:
    """The toolstack's part (libxl__domain_make + libxl__device_generic_add)."""
    for domid in (device.frontend_domid, device.backend_domid):
        home = domain_path(domid)
        await dom0.write(home, b"")
        await dom0.set_perms(home, guest_home_perms(domid))
        await dom0.write(f"{home}/error", b"")
        await dom0.set_perms(f"{home}/error", guest_writable_perms(domid))

    async def body(tx):
        await tx.mkdir(device.frontend)
        await tx.set_perms(device.frontend, device.frontend_perms)
        await tx.mkdir(device.backend)
        await tx.set_perms(device.backend, device.backend_perms)
        for key, value in device.backend_links().items():
            await tx.write(f"{device.backend}/{key}", value.encode())
        for key, value in device.frontend_links().items():
            await tx.write(f"{device.frontend}/{key}", value.encode())

    await transact(dom0, body)


async def test_guest_and_driver_domain_connect_through_the_engine():
    hub, grants = EngineHub(), Grants()
    dom0 = hub.connect(0, privileged=True)
    await libxl_create(dom0, DEV)
    guest, driver_domain = hub.connect(5), hub.connect(1)
    front = BlkFront.for_device(guest, DEV, grants=grants)
    back = BlkBack.for_device(driver_domain, DEV, grants=grants)
    async with trio.open_nursery() as nursery:
        await start_connected(nursery, front, back)
        assert back.mapped == front.ring_ref
        assert await dom0.read(f"{DEV.frontend}/ring-ref") == str(front.ring_ref).encode()
        assert await dom0.read(f"{DEV.backend}/sectors") == b"2048"
        # Each end can read the other's directory but not write it.
        assert await guest.read(f"{DEV.backend}/state") == b"4"
        with pytest.raises(XenStoreError) as info:
            await guest.write(f"{DEV.backend}/state", b"6")
        assert info.value.name == "EACCES"
        with pytest.raises(XenStoreError):
            await driver_domain.write(f"{DEV.frontend}/state", b"6")

        # A third domain sees neither directory.
        stranger = hub.connect(7)
        for path in (DEV.frontend, DEV.backend):
            with pytest.raises(XenStoreError) as info:
                await stranger.read(f"{path}/state")
            assert info.value.name == "EACCES"

        # Close from the guest.
        front.request_close()
        await wait_for(
            lambda: front.statistics().state.name == "Closed" and back.statistics().state.name == "Closed",
            "both closed",
        )

        # Unplug by the toolstack, then removal: both drivers stop.
        async def unplug(tx):
            await tx.write(f"{DEV.backend}/online", b"0")

        await transact(dom0, unplug)
        await dom0.rm(DEV.frontend)
        await dom0.rm(DEV.backend)
        with trio.fail_after(TIMEOUT):
            await front.wait_stopped()
            await back.wait_stopped()
        assert back.removed, (back.statistics(), front.statistics())


async def test_backend_error_node_through_the_engine():
    hub, grants = EngineHub(), Grants()
    dom0 = hub.connect(0, privileged=True)
    await libxl_create(dom0, DEV)
    guest, driver_domain = hub.connect(5), hub.connect(1)
    back = BlkBack.for_device(driver_domain, DEV, grants=grants)
    async with trio.open_nursery() as nursery:
        await Running(nursery, back).start()
        await wait_for(lambda: back.statistics().state.name == "InitWait", "backend InitWait")

        async def hostile(tx):
            await tx.write(f"{DEV.frontend}/ring-ref", b"8")
            await tx.write(f"{DEV.frontend}/event-channel", b"3")
            await tx.write(f"{DEV.frontend}/protocol", b"vax-abi")
            await tx.write(f"{DEV.frontend}/state", b"3")

        await transact(guest, hostile)
        await wait_for(lambda: back.statistics().state.name == "Closing", "backend closing")
        code, message = parse_error(await dom0.read(DEV.backend_error))
        assert code == errno.ENOSYS and "vax-abi" in message
        assert DEV.backend_error.startswith("/local/domain/1/error/backend/vbd/5/51712")
        nursery.cancel_scope.cancel()
