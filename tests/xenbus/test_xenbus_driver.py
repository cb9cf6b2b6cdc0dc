"""The trio driver layer: a frontend and a backend driven against each other
through an in-memory store, including restarts, unplug and state floods."""

from __future__ import annotations

import errno
import itertools

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from fake_store import FakeStore
from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from xenbus.console import (
    XENCONSOLE_CONNECTED,
    XENCONSOLE_DISCONNECTED,
    ConsoleRingInfo,
    XenconsInterface,
    console_frontend_entries,
)
from xenbus.driver import Backend, ChangeFlag, Frontend, read_directory, transact
from xenbus.handshake import (
    BlkBackendDisk,
    BlkBackendFeatures,
    BlkFrontendRings,
    HandshakeError,
    NetBackendFeatures,
    NetFrontendRings,
    NetQueue,
    RingQueue,
    parse_error,
)
from xenbus.paths import DeviceId
from xenbus.state import XenbusState

S = XenbusState
VBD = DeviceId("vbd", frontend_domid=5, backend_domid=0, devid=51712)
VIF = DeviceId("vif", frontend_domid=5, backend_domid=0, devid=0)
TIMEOUT = 5


class Grants:
    """A toy grant table shared by both ends: refs are live until revoked."""

    def __init__(self) -> None:
        self.live: set[int] = set()
        self._refs = itertools.count(8)

    def grant(self) -> int:
        ref = next(self._refs)
        self.live.add(ref)
        return ref

    def revoke(self, ref: int) -> None:
        self.live.discard(ref)


class BlkFront(Frontend):
    def __init__(self, store, nodename, domid, grants: Grants) -> None:
        super().__init__(store, nodename, domid)
        self.grants = grants
        self.ring_ref: int | None = None
        self.disk: BlkBackendDisk | None = None
        self.publishes = 0

    async def publish(self, backend_values):
        BlkBackendFeatures.of_assoc(backend_values)
        self.publishes += 1
        self.ring_ref = self.grants.grant()
        return BlkFrontendRings((RingQueue((self.ring_ref,), 17),)).to_assoc()

    async def connect(self, backend_values):
        self.disk = BlkBackendDisk.of_assoc(backend_values)
        return {}

    async def disconnect(self):
        if self.ring_ref is not None:
            self.grants.revoke(self.ring_ref)
        self.ring_ref = None
        self.disk = None


class BlkBack(Backend):
    def __init__(self, store, nodename, domid, grants: Grants, gate: trio.Event | None = None) -> None:
        super().__init__(store, nodename, domid)
        self.grants = grants
        self.features = BlkBackendFeatures(max_indirect_segments=256, max_queues=1)
        self.mapped: int | None = None
        self.removed = False
        self.gate = gate
        self.connects = 0

    async def publish(self, frontend_values):
        return self.features.to_assoc()

    async def connect(self, frontend_values):
        rings = BlkFrontendRings.of_assoc(frontend_values, self.features)
        if self.gate is not None:
            await self.gate.wait()
        ref = rings.queues[0].ring_refs[0]
        if ref not in self.grants.live:
            raise HandshakeError(errno.EINVAL, f"mapping ring-ref {ref}", "ring-ref")
        self.mapped = ref
        self.connects += 1
        return BlkBackendDisk(sectors=2048, sector_size=512).to_assoc()

    async def disconnect(self):
        self.mapped = None

    async def remove(self):
        self.removed = True


class NetFront(Frontend):
    skip_initialised = True

    def __init__(self, store, nodename, domid) -> None:
        super().__init__(store, nodename, domid)
        self.connected_calls = 0

    async def publish(self, backend_values):
        NetBackendFeatures.of_assoc(backend_values)
        return NetFrontendRings((NetQueue(100, 101, 7),)).to_assoc()

    async def connect(self, backend_values):
        self.connected_calls += 1
        return {}


class NetBack(Backend):
    async def publish(self, frontend_values):
        return NetBackendFeatures().to_assoc()

    async def connect(self, frontend_values):
        NetFrontendRings.of_assoc(frontend_values, NetBackendFeatures())
        return {}


async def create_device(store: FakeStore, device: DeviceId, **extra_front: str) -> None:
    """What the toolstack does: both directories in one transaction."""

    async def body(tx):
        for key, value in device.backend_links().items():
            await tx.write(f"{device.backend}/{key}", value.encode())
        for key, value in {**device.frontend_links(), **extra_front}.items():
            await tx.write(f"{device.frontend}/{key}", value.encode())

    await transact(store, body)


async def wait_for(predicate, what: str) -> None:
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.001)


class Running:
    """A driver task in its own cancel scope, so a test can "crash" it."""

    def __init__(self, nursery: trio.Nursery, driver) -> None:
        self.driver = driver
        self.scope = trio.CancelScope()
        self.nursery = nursery

    async def start(self):
        async def runner(task_status=trio.TASK_STATUS_IGNORED):
            with self.scope:
                await self.driver.run(task_status=task_status)

        await self.nursery.start(runner)
        return self

    def crash(self) -> None:
        self.scope.cancel()


async def test_change_flag_coalesces():
    flag = ChangeFlag()
    for _ in range(1000):
        flag.set()
    assert flag.pending
    with trio.fail_after(1):
        await flag.wait()
    assert not flag.pending and flag.raised == 1000 and flag.consumed == 1


async def test_read_directory_is_bounded_and_nested():
    store = FakeStore()
    await store.write("/d/a", b"1")
    await store.write("/d/queue-0/ring-ref", b"2")
    await store.write("/d/queue-0/deep/er", b"3")
    assert await read_directory(store, "/d") == {
        "a": b"1",
        "queue-0": b"",
        "queue-0/ring-ref": b"2",
        "queue-0/deep": b"",
    }
    for i in range(100):
        await store.write(f"/big/k{i}", b"x")
    assert len(await read_directory(store, "/big", limit=10)) == 10
    assert await read_directory(store, "/missing") == {}


async def test_block_handshake_connects_and_publishes_the_right_keys():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD, **{"virtual-device": "51712", "device-type": "disk"})
    front = BlkFront.for_device(store, VBD, grants=grants)
    back = BlkBack.for_device(store, VBD, grants=grants)
    async with trio.open_nursery() as nursery:
        await start_connected(nursery, front, back)
        assert store.value(f"{VBD.frontend}/state") == "4"
        assert store.value(f"{VBD.backend}/state") == "4"
        assert back.mapped == front.ring_ref and front.ring_ref in grants.live
        assert front.disk == BlkBackendDisk(sectors=2048, physical_sector_size=512)
        assert set(store.subtree(VBD.frontend)) == {
            "backend",
            "backend-id",
            "state",
            "virtual-device",
            "device-type",
            "ring-ref",
            "event-channel",
            "protocol",
            "feature-persistent",
        }
        assert set(store.subtree(VBD.backend)) == {
            "frontend",
            "frontend-id",
            "online",
            "state",
            "feature-max-indirect-segments",
            "multi-queue-max-queues",
            "max-ring-page-order",
            *BlkBackendDisk(sectors=1).to_assoc(),
        }
        # The state sequence of each end, as written to the store.
        fe_states = [v for p, v in store.writes if p == f"{VBD.frontend}/state"]
        be_states = [v for p, v in store.writes if p == f"{VBD.backend}/state"]
        assert fe_states == [b"1", b"3", b"4"]
        assert be_states == [b"1", b"2", b"4"]
        nursery.cancel_scope.cancel()


async def test_network_frontend_goes_straight_to_connected():
    store = FakeStore()
    await create_device(store, VIF, mac="00:16:3e:00:00:01")
    front, back = NetFront.for_device(store, VIF), NetBack.for_device(store, VIF)
    async with trio.open_nursery() as nursery:
        await start_connected(nursery, front, back)
        fe_states = [v for p, v in store.writes if p == f"{VIF.frontend}/state"]
        assert fe_states == [b"1", b"4"]
        assert front.connected_calls == 1
        assert store.value(f"{VIF.frontend}/request-rx-copy") == "1"
        nursery.cancel_scope.cancel()


async def start_connected(nursery, front, back) -> tuple[Running, Running]:
    """Start the backend, then the frontend; wait until both are connected."""
    back_task = await Running(nursery, back).start()
    front_task = await Running(nursery, front).start()
    with trio.fail_after(TIMEOUT):
        await front.wait_connected()
        await back.wait_connected()
    return front_task, back_task


async def connected_pair(nursery, store, grants, front_cls=BlkFront, back_cls=BlkBack):
    front = front_cls.for_device(store, VBD, grants=grants)
    back = back_cls.for_device(store, VBD, grants=grants)
    front_task, back_task = await start_connected(nursery, front, back)
    return front, back, front_task, back_task


async def test_frontend_close_tears_down_both_ends():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    async with trio.open_nursery() as nursery:
        front, back, *_ = await connected_pair(nursery, store, grants)
        front.request_close()
        await wait_for(
            lambda: store.value(f"{VBD.frontend}/state") == "6" and store.value(f"{VBD.backend}/state") == "6",
            "both closed",
        )
        await wait_for(lambda: back.mapped is None and front.ring_ref is None, "released")
        assert not grants.live
        # online is still 1: the backend waits for a new frontend, no removal.
        await trio.testing.wait_all_tasks_blocked()
        assert not back.removed
        assert store.value(f"{VBD.frontend}/state") == "6"
        fe_states = [v for p, v in store.writes if p == f"{VBD.frontend}/state"]
        assert fe_states[-2:] == [b"5", b"6"]
        nursery.cancel_scope.cancel()


async def test_toolstack_unplug_then_removal_stops_both_drivers():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    async with trio.open_nursery() as nursery:
        front, back, *_ = await connected_pair(nursery, store, grants)

        async def unplug(tx):  # libxl__initiate_device_generic_remove
            await tx.write(f"{VBD.backend}/online", b"0")
            await tx.write(f"{VBD.backend}/state", b"5")

        await transact(store, unplug)
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "6", "backend closed")
        assert back.mapped is None
        await wait_for(lambda: front.ring_ref is None, "frontend released its ring")
        await store.rm(VBD.frontend)
        await store.rm(VBD.backend)
        with trio.fail_after(TIMEOUT):
            await front.wait_stopped()
            await back.wait_stopped()
        assert back.removed
        # Nobody resurrected a removed directory.
        assert store.value(f"{VBD.frontend}/state") is None
        assert store.value(f"{VBD.backend}/state") is None


@pytest.mark.parametrize("who", ["backend", "frontend"])
async def test_restarted_end_reconnects(who):
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    async with trio.open_nursery() as nursery:
        front, back, front_task, back_task = await connected_pair(nursery, store, grants)
        first_ref = front.ring_ref
        if who == "backend":
            back_task.crash()  # its mappings die with it
            await back.wait_stopped()
            back = BlkBack.for_device(store, VBD, grants=grants)
            await Running(nursery, back).start()
        else:
            front_task.crash()
            await front.wait_stopped()
            grants.revoke(first_ref)  # a dead domain's grants are gone
            front = BlkFront.for_device(store, VBD, grants=grants)
            await Running(nursery, front).start()
        with trio.fail_after(TIMEOUT):
            await front.wait_connected()
            await back.wait_connected()
        await wait_for(
            lambda: store.value(f"{VBD.frontend}/state") == "4" and store.value(f"{VBD.backend}/state") == "4",
            "both connected again",
        )
        assert front.ring_ref != first_ref and front.ring_ref in grants.live
        assert back.mapped == front.ring_ref
        # The reset went through Closing/Closed, visible to the other end.
        be_states = [v for p, v in store.writes if p == f"{VBD.backend}/state"]
        assert b"6" in be_states
        nursery.cancel_scope.cancel()


async def test_backend_waits_for_readiness():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    front = BlkFront.for_device(store, VBD, grants=grants)
    back = BlkBack.for_device(store, VBD, grants=grants)
    back.set_ready(False)  # e.g. the hotplug script has not run yet
    async with trio.open_nursery() as nursery:
        await Running(nursery, back).start()
        await Running(nursery, front).start()
        await wait_for(lambda: store.value(f"{VBD.frontend}/state") == "3", "frontend initialised")
        await trio.testing.wait_all_tasks_blocked()
        assert store.value(f"{VBD.backend}/state") == "2" and back.mapped is None
        back.set_ready()
        with trio.fail_after(TIMEOUT):
            await front.wait_connected()
        nursery.cancel_scope.cancel()


async def write_frontend_rings(store, values: dict[str, str], state: str) -> None:
    async def body(tx):
        for key, value in values.items():
            await tx.write(f"{VBD.frontend}/{key}", value.encode())
        await tx.write(f"{VBD.frontend}/state", state.encode())

    await transact(store, body)


async def test_state_flood_keeps_one_pending_event():
    """XSA-349: a frontend rewriting its state node in a loop while the
    backend is busy must not make the backend queue anything per event."""
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    gate = trio.Event()
    back = BlkBack.for_device(store, VBD, grants=grants, gate=gate)
    async with trio.open_nursery() as nursery:
        await Running(nursery, back).start()
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "2", "backend InitWait")
        ref = grants.grant()
        await write_frontend_rings(store, BlkFrontendRings((RingQueue((ref,), 3),)).to_assoc(), "3")
        await wait_for(lambda: back.statistics().steps >= 2, "backend in connect")  # blocked at the gate
        flood = 5000
        max_pending = 0
        for i in range(flood):
            await store.write(f"{VBD.frontend}/state", b"3")
            max_pending = max(max_pending, back.statistics().pending)
        stats = back.statistics()
        assert stats.events_seen >= flood  # every event was drained...
        assert max_pending <= 1  # ...into a single flag
        assert store.max_queue <= 4  # and drained as they came, not queued
        before = stats.wakeups
        gate.set()
        with trio.fail_after(TIMEOUT):
            await back.wait_connected()
        await trio.testing.wait_all_tasks_blocked()
        # The whole flood costs at most a couple of extra decision rounds.
        assert back.statistics().wakeups - before <= 2
        assert back.connects == 1
        nursery.cancel_scope.cancel()


async def test_hostile_frontend_gets_an_error_node_not_a_crash():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    back = BlkBack.for_device(store, VBD, grants=grants)
    async with trio.open_nursery() as nursery:
        await Running(nursery, back).start()
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "2", "backend InitWait")
        await write_frontend_rings(
            store, {"ring-ref": "8", "event-channel": "3", "protocol": "vax-abi"}, "3"
        )
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "5", "backend closing")
        code, message = parse_error(store.value(VBD.backend_error))
        assert code == errno.ENOSYS and "vax-abi" in message
        # Garbage state values are Unknown-but-present... the backend keeps running.
        await store.write(f"{VBD.frontend}/state", b"\xff\x00junk")
        await store.write(f"{VBD.frontend}/state", b"6")
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "6", "backend closed")
        # A well-behaved restart of the frontend is served again.
        ref = grants.grant()
        await store.write(f"{VBD.frontend}/state", b"1")
        await wait_for(lambda: store.value(f"{VBD.backend}/state") == "2", "backend InitWait again")
        await write_frontend_rings(store, BlkFrontendRings((RingQueue((ref,), 3),)).to_assoc(), "3")
        with trio.fail_after(TIMEOUT):
            await back.wait_connected()
        assert back.mapped == ref
        nursery.cancel_scope.cancel()


async def test_frontend_gives_up_after_a_fatal_error():
    store = FakeStore()
    await create_device(store, VIF)
    front = NetFront.for_device(store, VIF)
    async with trio.open_nursery() as nursery:
        await Running(nursery, front).start()
        # A backend without feature-rx-copy: netfront cannot work with it.
        await store.write(f"{VIF.backend}/feature-sg", b"1")
        await store.write(f"{VIF.backend}/state", b"2")
        await wait_for(lambda: store.value(f"{VIF.frontend}/state") == "5", "frontend closing")
        code, _ = parse_error(store.value(VIF.frontend_error))
        assert code == errno.EOPNOTSUPP
        await store.write(f"{VIF.backend}/state", b"6")
        await wait_for(lambda: store.value(f"{VIF.frontend}/state") == "6", "frontend closed")
        await trio.testing.wait_all_tasks_blocked()
        assert store.value(f"{VIF.frontend}/state") == "6"  # no retry loop
        nursery.cancel_scope.cancel()


class RejectingBack(BlkBack):
    async def connect(self, frontend_values):
        raise HandshakeError(errno.EINVAL, "this backend rejects every ring", "ring-ref")


async def test_frontend_stops_retrying_a_backend_that_always_fails():
    store, grants = FakeStore(), Grants()
    await create_device(store, VBD)
    front = BlkFront.for_device(store, VBD, grants=grants)
    back = RejectingBack.for_device(store, VBD, grants=grants)
    async with trio.open_nursery() as nursery:
        await Running(nursery, back).start()
        await Running(nursery, front).start()
        await wait_for(lambda: store.value(VBD.frontend_error) is not None, "frontend gives up")
        code, message = parse_error(store.value(VBD.frontend_error))
        assert code == errno.ECONNREFUSED and "8" in message
        await trio.testing.wait_all_tasks_blocked()
        assert front.publishes == 1 + front.max_reconnects
        assert store.value(f"{VBD.frontend}/state") == "6"
        assert parse_error(store.value(VBD.backend_error))[0] == errno.EINVAL
        assert not grants.live  # every ring it published was freed again
        nursery.cancel_scope.cancel()


# ---------------------------------------------------------------------------
# Random crashes and restarts of real drivers (hypothesis drives trio).

CHAOS = st.lists(
    st.tuples(
        st.sampled_from(["crash F", "crash B", "restart F", "restart B", "unready B", "ready B"]),
        st.integers(0, 6),  # scheduler steps to let pass before the next op
    ),
    max_size=10,
)


@given(ops=CHAOS)
@settings(max_examples=40, deadline=None)
def test_drivers_reconnect_after_random_crashes(ops):
    async def scenario():
        store, grants = FakeStore(), Grants()
        await create_device(store, VBD)
        async with trio.open_nursery() as nursery:
            ends = {
                "F": await Running(nursery, BlkFront.for_device(store, VBD, grants=grants)).start(),
                "B": await Running(nursery, BlkBack.for_device(store, VBD, grants=grants)).start(),
            }
            for op, pause in ops:
                for _ in range(pause):
                    await trio.lowlevel.checkpoint()
                verb, who = op.split()
                running = ends[who]
                if verb == "crash" and not running.scope.cancel_called:
                    running.crash()
                    await running.driver.wait_stopped()
                    if who == "F" and running.driver.ring_ref is not None:
                        grants.revoke(running.driver.ring_ref)  # a dead domain's grants go
                elif verb == "restart":
                    if not running.scope.cancel_called:
                        running.crash()
                        await running.driver.wait_stopped()
                        if who == "F" and running.driver.ring_ref is not None:
                            grants.revoke(running.driver.ring_ref)
                    cls = BlkFront if who == "F" else BlkBack
                    ends[who] = await Running(nursery, cls.for_device(store, VBD, grants=grants)).start()
                elif verb in ("unready", "ready") and not ends["B"].scope.cancel_called:
                    ends["B"].driver.set_ready(verb == "ready")
            # Bring every dead end back, make the backend ready, and wait.
            for who, cls in (("F", BlkFront), ("B", BlkBack)):
                if ends[who].scope.cancel_called:
                    ends[who] = await Running(nursery, cls.for_device(store, VBD, grants=grants)).start()
            ends["B"].driver.set_ready()
            front, back = ends["F"].driver, ends["B"].driver
            with trio.fail_after(TIMEOUT):
                await front.wait_connected()
                await back.wait_connected()
                await trio.testing.wait_all_tasks_blocked()
            assert front.connected and back.connected
            assert store.value(f"{VBD.frontend}/state") == "4" == store.value(f"{VBD.backend}/state")
            assert back.mapped == front.ring_ref and front.ring_ref in grants.live
            nursery.cancel_scope.cancel()

    trio.run(scenario)


# ---------------------------------------------------------------------------
# A secondary PV console: the frontend publishes ring-ref/port at once (no
# wait for InitWait), the backend services the page (ringbuf's ConsoleRing).

CONSOLE = DeviceId("console", frontend_domid=5, backend_domid=0, devid=1)


class ConsoleFront(Frontend):
    publish_early = True

    def __init__(self, store, nodename, domid, pages: dict) -> None:
        super().__init__(store, nodename, domid)
        self.pages = pages  # "grant ref" -> page, shared with the backend

    async def publish(self, backend_values):
        page = bytearray(4096)
        page[XenconsInterface.connection.offset] = XENCONSOLE_DISCONNECTED  # Xen 4.21
        self.pages[21] = page
        self.ring = ConsoleRing(page, ByteRingRole.GUEST)
        return ConsoleRingInfo(ring_ref=21, port=9).to_assoc()


class ConsoleBack(Backend):
    def __init__(self, store, nodename, domid, pages: dict) -> None:
        super().__init__(store, nodename, domid)
        self.pages = pages

    async def connect(self, frontend_values):
        info = ConsoleRingInfo.of_assoc(frontend_values)
        self.ring = ConsoleRing(self.pages[info.ring_ref], ByteRingRole.SERVER)
        self.ring.set_connection(XENCONSOLE_CONNECTED)
        return {}


async def test_secondary_console_connects_and_carries_bytes():
    store, pages = FakeStore(), {}

    async def toolstack(tx):
        for key, value in CONSOLE.backend_links().items():
            await tx.write(f"{CONSOLE.backend}/{key}", value.encode())
        for key, value in console_frontend_entries(CONSOLE, backend_type="ioemu").items():
            await tx.write(f"{CONSOLE.frontend}/{key}", value.encode())

    await transact(store, toolstack)
    front = ConsoleFront.for_device(store, CONSOLE, pages=pages)
    back = ConsoleBack.for_device(store, CONSOLE, pages=pages)
    async with trio.open_nursery() as nursery:
        await Running(nursery, front).start()
        # Published before any backend exists.
        await wait_for(lambda: store.value(f"{CONSOLE.frontend}/state") == "3", "frontend initialised")
        assert store.value(f"{CONSOLE.frontend}/port") == "9"
        assert store.value(f"{CONSOLE.frontend}/event-channel") is None
        assert not front.ring.connected
        await Running(nursery, back).start()
        with trio.fail_after(TIMEOUT):
            await front.wait_connected()
            await back.wait_connected()
        assert front.ring.connected
        assert front.ring.write(b"login: ") == 7
        assert back.ring.read() == b"login: "
        fe_states = [v for p, v in store.writes if p == f"{CONSOLE.frontend}/state"]
        assert fe_states == [b"1", b"3", b"4"]
        nursery.cancel_scope.cancel()
