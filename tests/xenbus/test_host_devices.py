"""Device hosts (backend and frontend) over the real XenStore engine:
discovery, one driver per device, removal, re-creation, crashes, floods."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_store import EngineHub
from test_xenbus_driver import BlkBack, BlkFront, Grants
from test_xenbus_engine import libxl_create
from xenbus.backend_host import BackendHost
from xenbus.device_host import plan_devices
from xenbus.frontend_host import FrontendHost
from xenbus.paths import DeviceId
from xenstore.wire import XenStoreError

TIMEOUT = 5


async def wait_until(predicate, what: str) -> None:
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.002)


devices = st.builds(DeviceId, st.just("vbd"), st.integers(1, 4), st.just(0), st.integers(0, 4))


@settings(max_examples=200, deadline=None)
@given(st.sets(devices), st.sets(devices), st.sets(devices))
def test_plan_devices(present, running, finished):
    finished -= running
    plan = plan_devices(present, running, finished)
    # Every present device ends up with exactly one slot; nothing running is touched.
    assert plan.start == present - running - finished
    assert not plan.start & (running | finished)
    assert plan.forget <= finished and not plan.forget & present
    after = (running | finished | plan.start) - plan.forget
    assert present <= after


def dev(frontend: int, devid: int) -> DeviceId:
    return DeviceId("vbd", frontend_domid=frontend, backend_domid=0, devid=devid)


async def remove_device(dom0, device: DeviceId) -> None:
    await dom0.rm(device.frontend)
    await dom0.rm(device.backend)


async def test_hosts_run_one_driver_per_device_and_follow_removal():
    hub, grants = EngineHub(), Grants()
    dom0 = hub.connect(0, privileged=True)
    first, second = dev(5, 51712), dev(5, 51728)
    await libxl_create(dom0, first)
    made: list = []

    def backend(store, device):
        made.append(device)
        return BlkBack.for_device(store, device, grants=grants)

    back_host = BackendHost(dom0, 0, {"vbd": backend})
    front_host = FrontendHost(hub.connect(5), 5, {"vbd": lambda s, d: BlkFront.for_device(s, d, grants=grants)})
    async with trio.open_nursery() as nursery:
        await nursery.start(back_host.run)
        await nursery.start(front_host.run)
        assert set(back_host.devices) == {first} and set(front_host.devices) == {first}
        with trio.fail_after(TIMEOUT):
            await back_host.devices[first].driver.wait_connected()
            await front_host.devices[first].driver.wait_connected()

        # A hot-plugged second device gets its own pair of drivers.
        await libxl_create(dom0, second)
        await wait_until(lambda: second in back_host.devices and second in front_host.devices, "second device")
        with trio.fail_after(TIMEOUT):
            await back_host.devices[second].driver.wait_connected()
            await front_host.devices[second].driver.wait_connected()
        assert made == [first, second]

        # Removing the directories ends both drivers; the slots are forgotten.
        await remove_device(dom0, first)
        await wait_until(lambda: first not in back_host.devices and first not in front_host.devices, "forgotten")
        assert [s.device for s in back_host.running()] == [second]

        # The same device created again is a new device: new drivers.
        await libxl_create(dom0, first)
        await wait_until(lambda: first in back_host.devices and first in front_host.devices, "re-created")
        with trio.fail_after(TIMEOUT):
            await front_host.devices[first].driver.wait_connected()
        assert made == [first, second, first]
        nursery.cancel_scope.cancel()


async def test_a_crashing_driver_does_not_take_the_host_down():
    hub, grants = EngineHub(), Grants()
    dom0 = hub.connect(0, privileged=True)
    bad, good = dev(5, 1), dev(6, 2)

    class Exploding(BlkBack):
        async def publish(self, frontend_values):
            raise RuntimeError("boom")

    def backend(store, device):
        cls = Exploding if device == bad else BlkBack
        return cls.for_device(store, device, grants=grants)

    host = BackendHost(dom0, 0, {"vbd": backend})
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        await libxl_create(dom0, bad)
        await wait_until(lambda: bad in host.devices and host.devices[bad].done.is_set(), "bad driver finished")
        assert isinstance(host.devices[bad].failed, RuntimeError)
        # Not restarted while its directory is there...
        await libxl_create(dom0, good)
        await wait_until(lambda: good in host.devices, "good device")
        front = BlkFront.for_device(hub.connect(6), good, grants=grants)
        nursery.start_soon(front.run)
        with trio.fail_after(TIMEOUT):
            await front.wait_connected()
        assert host.devices[bad].done.is_set()
        # ...and forgotten once it is gone.
        await remove_device(dom0, bad)
        await wait_until(lambda: bad not in host.devices, "bad slot forgotten")
        nursery.cancel_scope.cancel()


async def test_a_guest_flooding_its_device_directory_gets_bounded_slots():
    hub = EngineHub()
    dom0 = hub.connect(0, privileged=True)
    real = dev(5, 7)
    await libxl_create(dom0, real)
    guest = hub.connect(5)
    # The guest owns its frontend directories: it can add junk next to them.
    for i in range(40):
        await dom0.write(f"/local/domain/5/device/vbd/{100 + i}/backend-id", b"0")
    await dom0.write("/local/domain/5/device/vbd/junk/backend-id", b"0")
    await dom0.write("/local/domain/5/device/vbd/0099/backend-id", b"0")
    await dom0.write("/local/domain/5/device/vbd/98/backend-id", b"99999")
    started: list[DeviceId] = []

    class Idle:
        def __init__(self, device):
            self.device = device

        async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
            started.append(self.device)
            task_status.started()
            await trio.sleep_forever()

    host = FrontendHost(guest, 5, {"vbd": lambda s, d: Idle(d)}, max_devices=10)
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        assert len(host.devices) == 10 == len(started)
        assert all(d.devid in range(7, 140) for d in started)
        nursery.cancel_scope.cancel()


# ---- random create / remove / crash sequences against a model ----------------

OPS = st.lists(
    st.tuples(st.sampled_from(["create", "remove", "crash"]), st.integers(0, 3)),
    min_size=1,
    max_size=25,
)


@settings(max_examples=30, deadline=None)
@given(OPS)
def test_backend_host_tracks_random_device_churn(ops):
    """Model: the set of device directories present.  After every step the
    host has exactly one slot per present device, never two live drivers
    for one device, and a crashed driver is not restarted while its
    directory stays (it is again once the directory is re-created)."""

    async def scenario():
        hub = EngineHub()
        dom0 = hub.connect(0, privileged=True)
        live: dict[DeviceId, int] = {}
        started: list[DeviceId] = []

        class Watching:
            """Runs until its backend directory goes away, or it is crashed."""

            def __init__(self, store, device):
                self.store, self.device = store, device
                self.crash = trio.Event()

            async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
                live[self.device] = live.get(self.device, 0) + 1
                assert live[self.device] == 1, "two live drivers for one device"
                started.append(self.device)
                try:
                    async with self.store.watch(self.device.backend) as events:
                        task_status.started()
                        async with trio.open_nursery() as nursery:
                            async def crash():
                                await self.crash.wait()
                                raise RuntimeError("crash")

                            nursery.start_soon(crash)
                            async for _ in events:
                                try:
                                    await self.store.read(f"{self.device.backend}/state")
                                except XenStoreError:
                                    nursery.cancel_scope.cancel()
                                    return
                finally:
                    live[self.device] -= 1

        host = BackendHost(dom0, 0, {"vbd": lambda s, d: Watching(s, d)})
        present: set[DeviceId] = set()
        crashed: set[DeviceId] = set()
        async with trio.open_nursery() as nursery:
            await nursery.start(host.run)
            for op, n in ops:
                device = dev(5, n)
                if op == "create" and device not in present:
                    await libxl_create(dom0, device)
                    present.add(device)
                    crashed.discard(device)
                elif op == "remove" and device in present:
                    await remove_device(dom0, device)
                    present.discard(device)
                elif op == "crash" and device in present and device in host.devices and not host.devices[device].done.is_set():
                    host.devices[device].driver.crash.set()
                    crashed.add(device)
                # Settle: every present device has a slot, running unless crashed.
                await wait_until(
                    lambda: set(host.devices) == present
                    and all(host.devices[d].done.is_set() == (d in crashed) for d in present),
                    f"host converged after {op} {n}",
                )
                assert all(count <= 1 for count in live.values())
            nursery.cancel_scope.cancel()
        # One driver per creation, none for crashes.
        creations = sum(1 for op, _ in ops if op == "create")
        assert len(started) <= creations

    trio.run(scenario)
