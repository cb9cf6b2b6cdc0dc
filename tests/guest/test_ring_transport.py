"""The guest's RingTransport under the async client, against xenstored's
ring pump and a real engine, in one process (a shared page, an eventfd
pair): pipelining through a 1 KiB ring, reconnection, the error field."""

from __future__ import annotations

import pytest
import trio

import xenstore
from ringbuf.byte_ring import ByteRingRole, XenstoreRing
from ringbuf.evtchn import eventfd_pair
from ringbuf.layouts.xenstore import XENSTORE_ERROR_PROTO
from xenstore.client.ring_transport import RingError, RingTransport
from xenstore.core import Engine
from xenstore.daemon.domain_conn import DomainConnection
from xenstore.wire import HEADER, Op, Packet

DOMID = 7
HOME = f"/local/domain/{DOMID}"
pytestmark = pytest.mark.timeout(30)


class Server:
    """xenstored's side: engine + DomainConnection woken by its channel."""

    def __init__(self, page: bytearray, channel) -> None:
        self.engine = Engine()
        dom0 = self.engine.connect(0, True)
        for packet in (
            Packet(Op.INTRODUCE, 1, 0, b"%d\x001\x001\x00" % DOMID),
            Packet(Op.WRITE, 2, 0, HOME.encode() + b"\0"),
            Packet(Op.SET_PERMS, 3, 0, HOME.encode() + b"\0n%d\0" % DOMID),
        ):
            self.engine.handle(dom0, packet)
        self.dom0 = dom0
        ring = XenstoreRing(page, ByteRingRole.SERVER)
        ring.advertise_features(3)
        self.domain = DomainConnection(
            DOMID,
            self.engine.connect(DOMID, privileged=False),
            ring,
            channel,
            submit=self._submit,
            reset=self._reset,
            drop=self.engine.disconnect,
            outstanding_limit=lambda: 20,
        )
        self.channel = channel

    def _submit(self, conn, packets) -> None:
        for packet in packets:
            for target, out in self.engine.handle(conn, packet):
                if target is self.domain.conn:
                    self.domain.deliver(out)

    def _reset(self, conn):
        self.engine.disconnect(conn)
        return self.engine.connect(DOMID, privileged=False)

    async def run(self) -> None:
        try:
            while True:
                await trio.lowlevel.wait_readable(self.channel.wait_fd)
                self.domain.on_event()
        except trio.ClosedResourceError:
            pass  # the test is over


@pytest.fixture
async def ring_pair(nursery):
    page = bytearray(4096)
    guest_end, server_end = eventfd_pair()
    server = Server(page, server_end)
    nursery.start_soon(server.run)
    yield page, guest_end, server
    guest_end.close()
    server_end.close()


async def test_pipelined_requests_through_a_small_ring(ring_pair):
    page, channel, server = ring_pair
    big = b"x" * 1800

    async def worker(client, i: int) -> None:
        await client.write(f"data/k{i}", big + b"%d" % i)
        assert await client.read(f"data/k{i}") == big + b"%d" % i

    with trio.fail_after(10):
        async with xenstore.open_client(transport=RingTransport(page, channel)) as client:
            async with trio.open_nursery() as workers:
                for i in range(40):  # ~150 KiB each way through 1 KiB queues
                    workers.start_soon(worker, client, i)
            assert len(await client.directory("data")) == 40
            async with client.watch("data/k3") as events:
                assert await events.receive() == "data/k3"
                await client.write("data/k3", b"again")
                assert await events.receive() == "data/k3"
    assert server.domain.serving


async def test_reconnect_between_clients(ring_pair):
    page, channel, server = ring_pair
    with trio.fail_after(10):
        transport = RingTransport(page, channel)
        await transport.send_all(Packet(Op.WATCH, 1, 0, b"data\0t\0").encode())
        await transport.send_all(Packet(Op.READ, 2, 0, b"data\0").encode()[:9])  # half a header
        while server.engine.statistics()["watches"] == 0:
            await trio.sleep(0.001)
        await transport.reconnect()
        assert transport.ring.connection == 0
        assert server.engine.statistics()["watches"] == 0
        async with xenstore.open_client(transport=transport) as client:
            await client.write("data/z", b"1")
            assert await client.read("data/z") == b"1"


async def test_error_field_breaks_the_client(ring_pair):
    page, channel, server = ring_pair
    with trio.fail_after(10):
        transport = RingTransport(page, channel)
        async with xenstore.open_client(transport=transport) as client:
            assert await client.read("/local/domain/%d" % DOMID) == b""
            transport.ring.write(HEADER.pack(Op.WRITE, 9, 0, 5000))  # behind the client's back
            channel.notify()
            with pytest.raises(xenstore.ConnectionClosed, match="PROTO"):
                await client.read("data")
    assert server.domain.error == XENSTORE_ERROR_PROTO
    with pytest.raises(RingError, match="XENSTORE_ERROR_PROTO"):
        RingTransport(page, channel).send_nowait(b"x")  # a new client cannot use it either
