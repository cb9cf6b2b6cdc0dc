"""Hostile guests, the reconnection handshake, and ring vs socket latency
(cross-process)."""

from __future__ import annotations

import statistics
import time

import pytest
import trio

from ringbuf.layouts.xenstore import (
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
)
from xenstore.wire import HEADER, Op

pytestmark = pytest.mark.timeout(60)


async def wait_ring_error(guest) -> int:
    with trio.fail_after(10):
        while not (state := await guest.ring())["error"]:
            await trio.sleep(0.01)
    return state["error"]


async def test_features_are_offered(toolstack):
    guest = await toolstack.start_guest()
    state = await guest.ring()
    assert state["features"] == XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR
    assert state["connection"] == 0 and state["error"] == 0


@pytest.mark.parametrize(
    "attack, error",
    [
        ({"op": "poke", "field": "req_prod", "value": 0x12345678}, XENSTORE_ERROR_RINGIDX),
        ({"op": "poke", "field": "rsp_cons", "value": 0xFFFF0000}, XENSTORE_ERROR_RINGIDX),
        ({"op": "raw", "hex": HEADER.pack(Op.WRITE, 99, 0, 4097).hex()}, XENSTORE_ERROR_PROTO),
    ],
    ids=["req_prod", "rsp_cons", "len-4097"],
)
async def test_hostile_guest_is_dropped_alone(toolstack, guest_xenstored, attack, error):
    xs = toolstack.xs
    good = await toolstack.start_guest("good")
    bad = await toolstack.start_guest("bad")
    await bad.call("write", "data/x", "1")
    await bad.command(op="watch", path="data", id=1)
    assert await bad.next_event(1) == "data"
    await bad.command(**attack)
    assert await wait_ring_error(bad) == error
    assert guest_xenstored.alive()
    usage = (await xs.control("quota", str(bad.domid))).decode()
    assert "watches         :        0" in usage  # its connection is gone
    await xs.write(f"{bad.home}/data/y", "2")  # would fire its watch: nothing arrives
    assert await good.call("read", "name") == "good"
    await good.call("write", "data/still", "ok")
    assert await xs.read(f"{good.home}/data/still") == b"ok"
    assert await xs.is_domain_introduced(bad.domid)  # ignored, not released (cxenstored)
    reply = await bad.command(op="call", method="read", args=["name"])
    assert reply.get("error") == "ConnectionClosed", reply  # its client saw the error field


async def test_reconnection_handshake(toolstack):
    xs = toolstack.xs
    guest = await toolstack.start_guest()
    await guest.command(op="watch", path="data", id=1)
    assert await guest.next_event(1) == "data"
    await guest.command(op="tx_start")
    # Half a request on the ring: the reset must discard it.
    await guest.command(op="raw", hex=HEADER.pack(Op.READ, 77, 0, 6).hex()[:20])
    usage = (await xs.control("quota", str(guest.domid))).decode()
    assert "watches         :        1" in usage and "transactions    :        1" in usage
    assert (await guest.command(op="reconnect")) == {"ok": None}
    state = await guest.ring()
    assert state["connection"] == 0 and state["error"] == 0
    usage = (await xs.control("quota", str(guest.domid))).decode()
    assert "watches         :        0" in usage and "transactions    :        0" in usage
    assert await guest.call("read", "domid") == str(guest.domid)  # framing restarted
    await guest.call("write", "data/after", "1")
    assert await xs.read(f"{guest.home}/data/after") == b"1"


async def test_reintroduce_rebinds_the_channel_and_restarts_the_ring(toolstack):
    """Resume: the toolstack introduces the running domain again with a new
    port; xenstored rebinds, drops the old connection's state and restarts
    the ring at index 0 (no @introduceDomain: the domain is not new)."""
    xs, hv = toolstack.xs, toolstack.hv
    guest = await toolstack.start_guest()
    await guest.command(op="watch", path="data", id=1)
    assert await guest.next_event(1) == "data"
    async with xs.watch("@introduceDomain") as introduced:
        with trio.fail_after(10):
            await introduced.receive()
            port = await hv.alloc_unbound_for(guest.domid, 0)
            await xs.introduce(guest.domid, guest.store.gfn, port)
            assert await guest.next_event(1) is None  # the old binding is closed: client cut off
            assert await guest.command(op="reopen", port=port) == {"ok": None}
            assert await guest.call("read", "domid") == str(guest.domid)
            with trio.move_on_after(0.3):
                await introduced.receive()
                raise AssertionError("@introduceDomain fired for a known domain")
    usage = (await xs.control("quota", str(guest.domid))).decode()
    assert "watches         :        0" in usage
    await guest.call("write", "data/resumed", "1")
    assert await xs.read(f"{guest.home}/data/resumed") == b"1"


async def test_read_latency_ring_vs_socket(toolstack):
    """One guest READ round trip over the ring vs dom0's over the socket
    (same daemon, same client library, sequential; medians of n)."""
    guest = await toolstack.start_guest()
    n = 1000
    ring_seconds = (await guest.command(op="bench", path="domid", n=n))["ok"]
    xs = toolstack.xs
    path = f"{guest.home}/domid"
    for _ in range(20):
        await xs.read(path)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await xs.read(path)
        times.append(time.perf_counter() - start)
    socket_seconds = statistics.median(times)
    print(f"\nREAD round trip: ring {ring_seconds * 1e6:.0f} us, socket {socket_seconds * 1e6:.0f} us")
    assert 0 < ring_seconds < 0.05 and 0 < socket_seconds < 0.05
