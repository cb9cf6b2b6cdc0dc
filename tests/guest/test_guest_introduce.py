"""INTRODUCE against a real hypervisor service (cxenstored 4.17 order): the
daemon maps the ring and binds the channel first; a failure is the reply
(EINVAL for a domain the hypervisor does not know, a page that does not
map, a port that cannot be bound) and nothing fires; on success the ring is
live before the OK leaves.  The toolstack's later requests on the same
connection are answered after the INTRODUCE, in order."""

from __future__ import annotations

import os
import socket
import struct
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator

import pytest
import trio

from ringbuf.grants import GNTTAB_RESERVED_XENSTORE
from ringbuf.hypervisor import HypervisorError
from ringbuf.layouts.xenstore import XenstoreDomainInterface as Page
from xenbus.toolstack import GuestStore, write_domain_tree
from xenstore.wire import Op, Packet, PacketReader, XenStoreError

pytestmark = pytest.mark.timeout(60)

STEP_TIMEOUT = 15  # every wait (generous for 2 busy cores)
QUIET = 0.3  # how long "nothing fires" is watched for


async def assert_quiet(*watches: Any) -> None:
    """No event on any of ``watches`` for a while."""
    for watch in watches:
        with trio.move_on_after(QUIET):
            path = await watch.receive()
            raise AssertionError(f"unexpected event {path!r}")


@dataclass
class Created:
    """A created domain that is not running yet; ``fd`` its hypervisor
    connection (-1 once handed to a guest process)."""

    domid: int
    fd: int
    gfn: int
    port: int


@asynccontextmanager
async def created_domain(toolstack, *, seed: bool = True) -> AsyncIterator[Created]:
    """A created domain with an unbound port for us, its grant ref 1 seeded
    unless ``seed`` is false, its XenStore tree written.  Released (if it got
    introduced) and destroyed afterwards."""
    hv, xs = toolstack.hv, toolstack.xs
    domid, fd = await hv.create_domain(16)
    dom = Created(domid, fd, 15, 0)
    try:
        dom.port = await hv.alloc_unbound_for(domid, 0)
        if seed:
            await hv.seed_grant(domid, GNTTAB_RESERVED_XENSTORE, 0, dom.gfn)
        await write_domain_tree(xs, domid, dom.gfn, dom.port)
        yield dom
    finally:
        with trio.CancelScope(shield=True):
            try:
                await xs.release(domid)
            except XenStoreError as exc:
                if exc.name != "ENOENT":  # not introduced, or its guest died meanwhile
                    raise
            await xs.rm(f"/local/domain/{domid}")  # RM of a missing node is OK
            try:
                await hv.destroy_domain(domid)
            except HypervisorError as exc:
                if exc.code != "ESRCH":  # gone already (its guest process ended)
                    raise
            if dom.fd >= 0:
                os.close(dom.fd)


async def introduce_error(xs, domid: int, gfn: int, port: int) -> str:
    with pytest.raises(XenStoreError) as info:
        await xs.introduce(domid, gfn, port)
    return info.value.name


async def test_unknown_domain_is_einval_and_fires_nothing(toolstack):
    xs = toolstack.xs
    async with xs.watch("@introduceDomain") as introduced, xs.watch("@releaseDomain") as released:
        with trio.fail_after(STEP_TIMEOUT):
            await introduced.receive()  # the initial events
            await released.receive()
            assert await introduce_error(xs, 4000, 1, 1) == "EINVAL"
            assert not await xs.is_domain_introduced(4000)
            await assert_quiet(introduced, released)


async def test_unmappable_page_and_unbindable_port_are_einval(toolstack):
    xs = toolstack.xs
    async with xs.watch("@introduceDomain") as introduced, xs.watch("@releaseDomain") as released:
        with trio.fail_after(STEP_TIMEOUT):
            await introduced.receive()
            await released.receive()
            async with created_domain(toolstack, seed=False) as dom:
                assert await introduce_error(xs, dom.domid, dom.gfn, dom.port) == "EINVAL"  # ref 1 not seeded
                assert not await xs.is_domain_introduced(dom.domid)
            async with created_domain(toolstack) as dom:
                assert await introduce_error(xs, dom.domid, dom.gfn, dom.port + 1) == "EINVAL"  # not unbound
                assert await introduce_error(xs, dom.domid, dom.gfn, 0) == "EINVAL"  # port <= 0: refused up front
                assert not await xs.is_domain_introduced(dom.domid)
                await assert_quiet(introduced, released)
                # Nothing was left behind: the right port works.
                await xs.introduce(dom.domid, dom.gfn, dom.port)
                assert await introduced.receive() == "@introduceDomain"
                assert await xs.is_domain_introduced(dom.domid)


async def test_ring_is_live_when_ok_arrives(toolstack):
    """A guest waiting for xenstore (``connection == 1``, garbage indices):
    when the OK arrives the indices are zero and ``connection`` is 0 already
    (cxenstored 4.17.3+ order); a guest started right after OK is served."""
    xs, hv = toolstack.xs, toolstack.hv
    async with created_domain(toolstack) as dom:
        domid, gfn, port = dom.domid, dom.gfn, dom.port
        memory, grant_table = await hv.foreign_memory(domid)
        try:
            page = memory.page(gfn)
            for field, value in (("req_prod", 7), ("rsp_cons", 3), ("connection", 1)):
                struct.pack_into("<I", page, getattr(Page, field).offset, value)

            def field(name: str) -> int:
                return struct.unpack_from("<I", page, getattr(Page, name).offset)[0]

            with trio.fail_after(STEP_TIMEOUT):
                await xs.introduce(domid, gfn, port)
            # Read right at the OK, without waiting for anything else.
            state = {name: field(name) for name in ("req_cons", "req_prod", "rsp_cons", "rsp_prod", "connection")}
            assert state == dict.fromkeys(state, 0), state
            assert field("server_features") & 1  # RECONNECTION offered
            page.release()
        finally:
            memory.close()
            grant_table.close()
        fd, dom.fd = dom.fd, -1
        guest = await toolstack.spawn_guest(GuestStore(domid, gfn, port), fd)
        assert await guest.call("read", "domid") == str(domid)
        await guest.call("write", "data/hello", "1")
        assert await xs.read(f"/local/domain/{domid}/data/hello") == b"1"
        guest.kill()
        await guest.proc.wait()
        toolstack.guests.remove(guest)


class RawConnection:
    """A bare socket connection to xenstored: pipelined requests."""

    def __init__(self, path: str) -> None:
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path = path
        self.reader = PacketReader()

    async def __aenter__(self) -> "RawConnection":
        await self.sock.connect(self.path)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.sock.close()

    async def send(self, *packets: Packet) -> None:
        data = memoryview(b"".join(p.encode() for p in packets))
        while data:
            data = data[await self.sock.send(data) :]

    async def receive(self, n: int) -> list[tuple[int, int, bytes]]:
        """The next ``n`` packets as (req_id, op, payload)."""
        out: list[tuple[int, int, bytes]] = []
        with trio.fail_after(STEP_TIMEOUT):
            while len(out) < n:
                packet = self.reader.next_packet()
                if packet is None:
                    data = await self.sock.recv(65536)
                    assert data, "xenstored closed the connection"
                    self.reader.feed(data)
                    continue
                out.append((packet.req_id, int(packet.op), packet.payload))
        return out


async def test_pipelined_requests_are_answered_after_the_introduce(toolstack, guest_xenstored):
    async with created_domain(toolstack) as dom:
        domid, gfn, port = dom.domid, dom.gfn, dom.port
        async with RawConnection(guest_xenstored.socket_path) as conn:
            await conn.send(
                Packet(Op.INTRODUCE, 1, 0, b"%d\0%d\0%d\0" % (domid, gfn, port)),
                Packet(Op.IS_DOMAIN_INTRODUCED, 2, 0, b"%d\0" % domid),
                Packet(Op.WRITE, 3, 0, b"/pipelined\0after"),
                Packet(Op.READ, 4, 0, b"/pipelined\0"),
            )
            assert await conn.receive(4) == [
                (1, Op.INTRODUCE, b"OK\0"),
                (2, Op.IS_DOMAIN_INTRODUCED, b"T\0"),
                (3, Op.WRITE, b"OK\0"),
                (4, Op.READ, b"after"),
            ]
            # A failing one, the same way.
            await conn.send(
                Packet(Op.INTRODUCE, 5, 0, b"4001\x001\x001\0"),
                Packet(Op.IS_DOMAIN_INTRODUCED, 6, 0, b"4001\0"),
                Packet(Op.RM, 7, 0, b"/pipelined\0"),
            )
            assert await conn.receive(3) == [
                (5, Op.ERROR, b"EINVAL\0"),
                (6, Op.IS_DOMAIN_INTRODUCED, b"F\0"),
                (7, Op.RM, b"OK\0"),
            ]


async def test_toolstack_hangs_up_before_the_reply(toolstack, guest_xenstored):
    """The introduction still happens; its reply and the requests queued
    behind it are dropped; the daemon carries on."""
    xs = toolstack.xs
    async with created_domain(toolstack) as dom:
        domid, gfn, port = dom.domid, dom.gfn, dom.port
        async with xs.watch("@introduceDomain") as introduced:
            with trio.fail_after(STEP_TIMEOUT):
                await introduced.receive()
                async with RawConnection(guest_xenstored.socket_path) as conn:
                    await conn.send(
                        Packet(Op.INTRODUCE, 1, 0, b"%d\0%d\0%d\0" % (domid, gfn, port)),
                        Packet(Op.WRITE, 2, 0, b"/hung-up\0"),
                    )
                assert await introduced.receive() == "@introduceDomain"
                assert await xs.is_domain_introduced(domid)
                with pytest.raises(XenStoreError, match="ENOENT"):
                    await xs.read("/hung-up")
    assert guest_xenstored.alive(), guest_xenstored.stderr()
