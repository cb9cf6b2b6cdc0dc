"""PV console pieces in one process: the page pump, the daemon's sessions and
attach protocol, the guest console, start info and configs; then both
console kinds over a real hypervisor service (in-process) and the real
XenStore engine, including a backend restart."""

from __future__ import annotations

import os

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_store import EngineHub
from ringbuf.byte_ring import ByteRingRole, ConsoleRing
from ringbuf.evtchn import eventfd_pair
from ringbuf.grants import GNTTAB_RESERVED_CONSOLE
from ringbuf.hypervisor import HypervisorService, open_hypervisor
from ringbuf.layouts.console import XenconsInterface
from ringbuf.memory import FrameAllocator
from test_xenbus_engine import libxl_create
from xenbus.backend_host import BackendHost
from xenbus.console_backend import console_backend_factory, pump_console
from xenbus.console_frontend import ConsoleFrontend, GuestConsole
from xenbus.consoled import ATTACH_MAX, CLIENT_BACKLOG, INPUT_LIMIT, ConsoleSession, ConsoleSessions, parse_attach
from xenbus.frontend_host import FrontendHost
from xenbus.paths import DeviceId
from xenbus.start_info import ENV_CONSOLE_GFN, ENV_CONSOLE_PORT, ConsoleStart, magic_frames
from xenbus.toolstack.config import ConfigError, DomainConfig, parse_config
from xenstore.wire import Op, XenStoreError, join_strings

TIMEOUT = 10


async def wait_until(predicate, what: str) -> None:
    with trio.fail_after(TIMEOUT):
        while not predicate():
            await trio.sleep(0.002)


def read_log(path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


# ---- the pump ---------------------------------------------------------------


async def test_pump_carries_output_and_input_and_ends_with_the_guest(tmp_path):
    page = bytearray(4096)
    guest_port, backend_port = eventfd_pair()
    guest = GuestConsole(page, guest_port)
    session = ConsoleSession(5, 0, str(tmp_path / "guest-5.log"))
    ring = ConsoleRing(page, ByteRingRole.SERVER)
    finished = trio.Event()

    async def backend():
        await pump_console(ring, backend_port, session)
        finished.set()

    async with trio.open_nursery() as nursery:
        guest_scope = trio.CancelScope()

        async def guest_run():
            with guest_scope:
                await guest.run()

        nursery.start_soon(guest_run)
        nursery.start_soon(backend)
        await guest.write("hello\r\n")
        await wait_until(lambda: read_log(session.log_path) == b"hello\r\n", "output logged")
        session.feed(b"keys")
        with trio.fail_after(TIMEOUT):
            assert await guest.read() == b"keys"
        # Much more than the 2 KiB ring: flows as the backend drains it.
        big = bytes(range(256)) * 40
        with trio.fail_after(TIMEOUT):
            assert await guest.write(big)
        await wait_until(lambda: read_log(session.log_path) == b"hello\r\n" + big, "big output logged")
        # The guest closes its port: the pump drains what is left and returns.
        guest.write_nowait(b"bye")
        guest_scope.cancel()
        await trio.sleep(0)
        guest_port.close()
        with trio.fail_after(TIMEOUT):
            await finished.wait()
    assert read_log(session.log_path).endswith(b"bye")
    session.close()


async def test_pump_stops_serving_a_guest_that_corrupts_its_indices(tmp_path):
    page = bytearray(4096)
    iface = XenconsInterface.from_buffer(page)
    iface.out_prod = iface.out_cons + 5000  # more than the ring holds
    del iface
    guest_port, backend_port = eventfd_pair()
    session = ConsoleSession(5, 0, str(tmp_path / "log"))
    with trio.fail_after(TIMEOUT):
        await pump_console(ConsoleRing(page, ByteRingRole.SERVER), backend_port, session)  # returns, no raise
    assert session.output_bytes == 0
    guest_port.close()
    backend_port.close()


async def test_guest_write_times_out_without_a_backend():
    page = bytearray(4096)
    guest_port, backend_port = eventfd_pair()
    guest = GuestConsole(page, guest_port)
    async with trio.open_nursery() as nursery:
        await nursery.start(guest.run)
        backend_port.close()  # the backend is gone
        assert await guest.write(b"x" * 2048, timeout=1)  # fits in the ring
        with trio.fail_after(TIMEOUT):
            assert not await guest.write(b"more", timeout=0.2)  # ring full, nobody drains
        nursery.cancel_scope.cancel()


# ---- daemon sessions and attach protocol --------------------------------------


async def test_session_bounds_input_and_drops_slow_clients(tmp_path):
    sessions = ConsoleSessions(str(tmp_path))
    session = sessions.endpoint(3, 1)
    assert sessions.endpoint(3, 1) is session
    assert session.log_path == str(tmp_path / "guest-3-1.log")
    assert sessions.log_path(3, 0) == str(tmp_path / "guest-3.log")
    woken = []
    session.set_wakeup(lambda: woken.append(1))
    session.feed(b"a" * (INPUT_LIMIT + 100))
    assert len(session.pending_input()) == INPUT_LIMIT and woken
    session.consumed_input(10)
    assert len(session.pending_input()) == INPUT_LIMIT - 10
    fast_send, fast = session.attach()
    slow_send, slow = session.attach()
    for i in range(CLIENT_BACKLOG + 1):
        session.guest_output(b"%d," % i)
        if i < 5:
            assert fast.receive_nowait() == b"%d," % i
        else:
            while True:
                try:
                    fast.receive_nowait()
                except trio.WouldBlock:
                    break
    assert slow_send not in session.clients and fast_send in session.clients
    sessions.release(3, 1)
    assert not session.clients and (3, 1) not in sessions.sessions
    assert read_log(session.log_path).startswith(b"0,1,2,")


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0x7FEF), st.one_of(st.none(), st.integers(0, 0xFFFF)))
def test_parse_attach_round_trip(domid, devid):
    line = b"ATTACH %d" % domid + (b"" if devid is None else b" %d" % devid)
    assert parse_attach(line) == (domid, devid or 0)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=ATTACH_MAX))
def test_parse_attach_never_crashes(line):
    try:
        domid, devid = parse_attach(line)
    except ValueError:
        return
    assert 0 <= domid < 0x7FF0 and 0 <= devid <= 0xFFFF


# ---- start info and configuration ----------------------------------------------


def test_console_start_from_env():
    assert ConsoleStart.from_env({}) is None
    start = ConsoleStart(254, 3)
    assert ConsoleStart.from_env(start.environment()) == start
    for bad in ({ENV_CONSOLE_GFN: "1"}, {ENV_CONSOLE_GFN: "x", ENV_CONSOLE_PORT: "1"},
                {ENV_CONSOLE_GFN: "1", ENV_CONSOLE_PORT: "99999999999"}):
        with pytest.raises(ValueError):
            ConsoleStart.from_env(bad)
    assert magic_frames(256) == (255, 254)


names = st.from_regex(r"[A-Za-z][A-Za-z0-9_.\-]{0,20}", fullmatch=True)


@settings(max_examples=100, deadline=None)
@given(names, st.integers(1, 1024), st.lists(st.text(st.characters(blacklist_categories=["Cs"]), min_size=1), min_size=1, max_size=4),
       st.integers(0, 8))
def test_config_round_trip(name, memory, command, consoles):
    text = f"# a guest\nname = {name!r}\nmemory = {memory}  # MiB\ncommand = {command!r}\nconsoles = {consoles}\n"
    config = parse_config(text)
    assert config == DomainConfig(name=name, command=command, memory_mib=memory, consoles=consoles)
    assert config.nr_pages == memory * 256


@pytest.mark.parametrize("text", [
    "", "memory = 1", 'name = "a b"', 'name = "12"', 'name = "x"\nmemory = 0', 'name = "x"\nmemory = "1"',
    'name = "x"\nwhat = 1', 'name = "x"\ncommand = []', 'name = "x"\ncommand = 5', 'name = "x"\nconsoles = 9',
    'name = "x"\nmemory = __import__("os")', "name",
])
def test_config_errors(text):
    with pytest.raises(ConfigError):
        parse_config(text)


def test_config_command_string_is_shell_split():
    assert parse_config('name = "x"\ncommand = "prog --flag \'a b\'"').command == ["prog", "--flag", "a b"]


# ---- both console kinds over a real hypervisor service and the engine -----------


@pytest.fixture
async def hypervisor(tmp_path):
    path = str(tmp_path / "hv.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(HypervisorService().serve, path)
        yield path
        nursery.cancel_scope.cancel()


async def test_consoles_over_the_hypervisor_survive_a_backend_restart(hypervisor, tmp_path):
    hub = EngineHub()
    dom0_store = hub.connect(0, privileged=True)
    sessions = ConsoleSessions(str(tmp_path))
    async with open_hypervisor(hypervisor) as dom0:
        domid, fd = await dom0.create_domain(64)
        async with open_hypervisor(fd=fd) as guest_hv:
            # The toolstack: primary console page + port, a secondary console device.
            _, console_gfn = magic_frames(64)
            port = await dom0.alloc_unbound_for(domid, 0)
            await dom0.seed_grant(domid, GNTTAB_RESERVED_CONSOLE, 0, console_gfn)
            primary = DeviceId("console", domid, 0, 0)
            secondary = DeviceId("console", domid, 0, 1)
            await libxl_create(dom0_store, secondary)
            for key, value in {**primary.backend_links(), "protocol": "vt100"}.items():
                await dom0_store.write(f"{primary.backend}/{key}", value.encode())
            for key, value in {"ring-ref": str(console_gfn), "port": str(port), "type": "xenconsoled"}.items():
                await dom0_store.write(f"{primary.frontend}/{key}", value.encode())

            frames = FrameAllocator(0, 62)
            connections: list[int] = []

            async def session(console, number):
                connections.append(number)
                await console.write(f"hello #{number}\r\n")
                await trio.sleep_forever()

            guest_store = hub.connect(domid)
            front_host = FrontendHost(guest_store, domid, {
                "console": lambda s, d: ConsoleFrontend.for_device(s, d, hv=guest_hv, frames=frames, session=session)})
            primary_console = GuestConsole(guest_hv.memory.page(console_gfn), await guest_hv.attach_port(port))

            async with trio.open_nursery() as nursery:
                await nursery.start(primary_console.run)
                await nursery.start(front_host.run)
                await primary_console.write(b"boot\r\n")  # before any backend exists

                async def backend(*, task_status=trio.TASK_STATUS_IGNORED):
                    host = BackendHost(dom0_store, 0, {"console": console_backend_factory(dom0, sessions)})
                    with trio.CancelScope() as scope:
                        task_status.started(scope)
                        await host.run()

                scope = await nursery.start(backend)
                log0, log1 = tmp_path / f"guest-{domid}.log", tmp_path / f"guest-{domid}-1.log"
                await wait_until(lambda: read_log(log0) == b"boot\r\n", "primary console output")
                await wait_until(lambda: read_log(log1) == b"hello #1\r\n", "secondary console output")
                front = front_host.devices[secondary].driver
                assert front.connected and frames.free_frames == 61

                # The backend dies (its mappings and ports go with it: here we
                # cancel it and close what it held), output keeps coming...
                scope.cancel()
                await primary_console.write(b"while away\r\n")
                await trio.sleep(0.1)
                # ...and a new backend picks both consoles up again.
                await nursery.start(backend)
                await wait_until(lambda: read_log(log0) == b"boot\r\nwhile away\r\n", "output kept in the ring")
                await wait_until(lambda: read_log(log1) == b"hello #1\r\nhello #2\r\n", "secondary reconnected")
                assert connections == [1, 2]
                assert frames.free_frames == 61  # the first page was given back
                # Removing the secondary device ends its frontend and frees its page.
                await dom0_store.rm(secondary.frontend)
                await dom0_store.rm(secondary.backend)
                await wait_until(lambda: secondary not in front_host.devices, "frontend forgotten")
                assert frames.free_frames == 62
                nursery.cancel_scope.cancel()
    sessions.close()
    assert os.path.exists(tmp_path / f"guest-{domid}.log")


async def test_a_frontend_naming_a_bogus_grant_gets_an_error_node(hypervisor, tmp_path):
    hub = EngineHub()
    dom0_store = hub.connect(0, privileged=True)
    sessions = ConsoleSessions(str(tmp_path))
    async with open_hypervisor(hypervisor) as dom0:
        domid, fd = await dom0.create_domain(16)
        async with open_hypervisor(fd=fd):
            dev = DeviceId("console", domid, 0, 1)
            await libxl_create(dom0_store, dev)
            guest = hub.connect(domid)
            # A hostile guest: a ref it never granted, a port that does not exist.
            for key, value in {"ring-ref": "4000", "port": "77", "state": "3"}.items():
                await guest.write(f"{dev.frontend}/{key}", value.encode())
            host = BackendHost(dom0_store, 0, {"console": console_backend_factory(dom0, sessions)})
            async with trio.open_nursery() as nursery:
                await nursery.start(host.run)
                error_node = f"/local/domain/0/error/backend/console/{domid}/1/error"

                def errored():
                    try:
                        return hub.request(dom0_store.conn, Op.READ, join_strings(error_node))
                    except XenStoreError:
                        return None

                await wait_until(errored, "the backend's error node")
                assert errored().startswith(b"22 mapping ring-ref 4000")
                await wait_until(lambda: hub.request(dom0_store.conn, Op.READ, join_strings(f"{dev.backend}/state")) == b"5",
                                 "backend Closing")
                assert host.devices[dev].failed is None  # reported, not crashed
                nursery.cancel_scope.cancel()
